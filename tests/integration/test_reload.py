"""Ways to reach Caddy: admin over a unix socket, an operator's reload command, Caddy down."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from .conftest import LABELS, Caddy, Lab, render_and_start, run_cli

pytestmark = pytest.mark.integration


def test_reload_through_admin_unix_socket(lab: Lab, caddy_unix: Caddy, tmp_path: Path) -> None:
    project, name = lab.labelled("unix")
    out = tmp_path / "Caddyfile"
    render_and_start(caddy_unix, out)
    assert f"admin {caddy_unix.admin}\n" in out.read_text()
    assert "port 80" in caddy_unix.wait_body(f"{name}.localhost", "port 80")

    lab.set(project, name, **{f"{LABELS}upstream.port": "8080"})
    result = run_cli("render", "-o", out, *caddy_unix.render_args)

    assert result.returncode == 0, result.stderr
    assert "Caddy reloaded" in result.stderr
    assert "port 8080" in caddy_unix.wait_body(f"{name}.localhost", "port 8080", timeout=5)


def test_reload_command(lab: Lab, caddy: Caddy, tmp_path: Path) -> None:
    project, name = lab.labelled("cmd")
    out = tmp_path / "Caddyfile"
    render_and_start(caddy, out)
    lab.set(project, name, **{f"{LABELS}upstream.port": "8080"})
    command = f"{caddy.exe} reload --config {out} --adapter caddyfile --address {caddy.admin}"

    result = run_cli("render", "-o", out, *caddy.render_args, "--reload-command", command)

    assert result.returncode == 0, result.stderr
    assert "port 8080" in caddy.wait_body(f"{name}.localhost", "port 8080", timeout=5)

    def with_email(reload_command: str) -> subprocess.CompletedProcess[str]:
        # a global option that changes Caddy's config (the email alone does not, with http)
        return run_cli("render", "-o", out, *caddy.render_args, "--email", "a@example.org",
                       "--global-option", "grace_period 7s",
                       "--reload-command", reload_command)  # fmt: skip

    failing = with_email("false")
    assert failing.returncode == 6
    assert "reload command 'false' failed" in failing.stderr
    marker = tmp_path / ".Caddyfile.reload-pending"
    assert marker.exists()

    # the file is now unchanged, but Caddy (asked through its admin endpoint, though the
    # reload is a command) does not run it: it is reloaded
    again = with_email(command)
    assert again.returncode == 0, again.stderr
    assert "unchanged, Caddy reloaded" in again.stderr
    assert not marker.exists()
    quiet = with_email("false")
    assert quiet.returncode == 0 and "unchanged\n" in quiet.stderr  # nothing pending now


def test_caddy_down_checks_with_the_executable(lab: Lab, tmp_path: Path) -> None:
    """No admin endpoint: `caddy adapt` checks the text; the file is written, reload fails."""
    _project, name = lab.labelled("down")
    out = tmp_path / "Caddyfile"
    dead = ["--scheme", "http", "--caddy-admin", "127.0.0.1:9"]

    rejected = run_cli("render", "-o", out, *dead, "--global-option", "no_such_option")
    assert rejected.returncode == 5
    assert "unrecognized global option: no_such_option" in rejected.stderr
    assert not out.exists()

    result = run_cli("render", "-o", out, *dead)
    assert result.returncode == 6
    assert "was written but Caddy was not reloaded" in result.stderr
    assert f"{name}.localhost" in out.read_text()


def test_unchanged_file_but_stale_caddy_is_reloaded(lab: Lab, caddy: Caddy, tmp_path: Path) -> None:
    """A reload that failed (Caddy down) is made good by the next run, though the file is
    unchanged: Caddy's running config is compared with the file's."""
    _project, name = lab.labelled("stale")
    out = tmp_path / "Caddyfile"
    first = run_cli("render", "-o", out, *caddy.render_args)  # no Caddy yet: reload fails
    assert first.returncode == 6, first.stderr
    caddy.start(caddy.stub_config(tmp_path / "stale.Caddyfile"))
    assert "hello" not in caddy.get(f"{name}.localhost")[1]

    result = run_cli("render", "-o", out, *caddy.render_args)

    assert result.returncode == 0, result.stderr
    assert "unchanged, Caddy reloaded" in result.stderr
    assert "hello from" in caddy.wait_body(f"{name}.localhost", "hello from", timeout=5)
    again = run_cli("render", "-o", out, *caddy.render_args)
    assert "unchanged\n" in again.stderr and caddy.load_count() == 1


def test_a_change_costs_caddy_one_adaptation(lab: Lab, caddy: Caddy, tmp_path: Path) -> None:
    """Through the admin API a change is one POST /load (Caddy adapts it and keeps its running
    config if it refuses), and the file is written after it: no POST /adapt before."""
    project, name = lab.labelled("once")
    out = tmp_path / "Caddyfile"
    render_and_start(caddy, out)
    since = time.time()
    lab.set(project, name, **{f"{LABELS}upstream.port": "8080"})
    result = run_cli("render", "-o", out, *caddy.render_args)
    assert result.returncode == 0, result.stderr
    assert "port 8080" in caddy.wait_body(f"{name}.localhost", "port 8080", timeout=5)
    assert ":8080" in out.read_text()
    assert [uri for _, uri in caddy.admin_requests(since)] == ["/load"]

    # a config Caddy refuses (a global option it does not know) is loaded, refused, not written
    before = out.read_bytes()
    since = time.time()
    refused = run_cli("render", "-o", out, *caddy.render_args, "--global-option", "no_such_opt")
    assert refused.returncode == 5, refused.stderr
    assert out.read_bytes() == before
    assert "port 8080" in caddy.get(f"{name}.localhost")[1]
    assert next(uri for _, uri in caddy.admin_requests(since)) == "/load"
