"""The render pipeline end to end: real incusd, real Caddy, real HTTP through Caddy."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from .conftest import LABELS, Caddy, Lab, incus, labels, render_and_start, run_cli

pytestmark = pytest.mark.integration


def test_walkthrough_foo_served_through_caddy(lab: Lab, caddy: Caddy, tmp_path: Path) -> None:
    project = lab.project()
    lab.launch(project, "foo", labels("foo.localhost", 80))
    lab.address(project, "foo")
    out = tmp_path / "Caddyfile"

    result = run_cli("render", "--output", out, "--no-reload", *caddy.render_args)

    assert result.returncode == 0, result.stderr
    assert "foo.localhost" in out.read_text()
    caddy.start(out)
    assert "hello from foo port 80" in caddy.wait_body("foo.localhost", "hello from foo")


def test_render_prints_to_stdout_and_messages_to_stderr(lab: Lab) -> None:
    project = lab.project()
    lab.launch(project, "icft-print", labels("print.localhost"))
    address = lab.address(project, "icft-print")
    lab.launch(project, "icft-badport", labels("badport.localhost", port="80 {"))

    result = run_cli("render")

    assert result.returncode == 3  # rendered, with a rejected instance
    assert f"reverse_proxy {address}:80" in result.stdout
    assert "badport" not in result.stdout
    assert f"rejected {project}/icft-badport: {LABELS}upstream.port='80 {{'" in result.stderr


def test_projects_profiles_stopped_and_load_balancing(
    lab: Lab, caddy: Caddy, tmp_path: Path
) -> None:
    a, b = lab.project(), lab.project()
    suffix = a[-4:]
    # two instances behind one host in project a
    lab.launch(a, f"lb1-{suffix}", labels(f"lb-{suffix}.localhost"))
    lab.launch(a, f"lb2-{suffix}", labels(f"lb-{suffix}.localhost"))
    # a stopped one in project a
    lab.launch(a, f"off-{suffix}", labels(f"off-{suffix}.localhost"), start=False)
    # project b: enable and port come from a profile, the host from the instance
    incus("profile", "create", "caddy-web", "--project", b)
    incus(
        "profile",
        "set",
        "caddy-web",
        f"{LABELS}enable=true",
        f"{LABELS}upstream.port=8080",
        "--project",
        b,
    )
    lab.launch(
        b,
        f"prof-{suffix}",
        {f"{LABELS}matchers.host": f"prof-{suffix}.localhost"},
        profiles=("default", "caddy-web"),
    )
    for project, name in [(a, f"lb1-{suffix}"), (a, f"lb2-{suffix}"), (b, f"prof-{suffix}")]:
        lab.address(project, name)
    out = tmp_path / "Caddyfile"

    result = run_cli("render", "-o", out, "--no-reload", *caddy.render_args)

    assert result.returncode == 0, result.stderr
    assert f"skipped {a}/off-{suffix}: not running (Stopped)" in result.stderr
    text = out.read_text()
    assert f"off-{suffix}.localhost" not in text
    caddy.start(out)
    assert f"hello from prof-{suffix} port 8080" in caddy.wait_body(
        f"prof-{suffix}.localhost", "port 8080"
    )
    seen: set[str] = set()
    for _ in range(60):  # random load balancing: both answer within a bounded number of tries
        status, body = caddy.get(f"lb-{suffix}.localhost")
        assert status == 200, body
        seen.add(body.split()[2])
        if len(seen) == 2:
            break
    assert seen == {f"lb1-{suffix}", f"lb2-{suffix}"}
    status, _ = caddy.get(f"off-{suffix}.localhost")
    assert status == 200 and "hello" not in caddy.get(f"off-{suffix}.localhost")[1]


def test_changed_port_rewrites_reloads_and_routes(lab: Lab, caddy: Caddy, tmp_path: Path) -> None:
    project, name = lab.labelled("port", 80)
    out = tmp_path / "Caddyfile"
    render_and_start(caddy, out)
    assert "port 80" in caddy.wait_body(f"{name}.localhost", "port 80")
    before = out.read_text()
    loads = caddy.load_count()

    lab.set(project, name, **{f"{LABELS}upstream.port": "8080"})
    result = run_cli("render", "-o", out, *caddy.render_args)

    assert result.returncode == 0, result.stderr
    assert "written, Caddy reloaded" in result.stderr
    assert out.read_text() != before and ":8080" in out.read_text()
    assert caddy.load_count() == loads + 1
    assert "port 8080" in caddy.wait_body(f"{name}.localhost", "port 8080", timeout=5)


def test_unchanged_second_run_writes_nothing_and_does_not_reload(
    lab: Lab, caddy: Caddy, tmp_path: Path
) -> None:
    lab.labelled("same")
    out = tmp_path / "Caddyfile"
    render_and_start(caddy, out)
    first = os.stat(out)
    loads = caddy.load_count()

    result = run_cli("render", "-o", out, *caddy.render_args)

    assert result.returncode == 0, result.stderr
    assert "unchanged" in result.stderr
    second = os.stat(out)
    assert (second.st_ino, second.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    assert caddy.load_count() == loads
    check = run_cli("render", "-o", out, "--check", *caddy.render_args)
    assert check.returncode == 0, check.stderr


def test_check_and_diff_report_a_change_without_writing(
    lab: Lab, caddy: Caddy, tmp_path: Path
) -> None:
    _project, name = lab.labelled("diff")
    out = tmp_path / "Caddyfile"
    out.write_text("# old\n")

    result = run_cli("render", "-o", out, "--check", "--diff", *caddy.render_args)

    assert result.returncode == 1
    assert result.stdout.startswith(f"--- {out} (on disk)")
    assert f"+http://{name}.localhost {{" in result.stdout
    assert out.read_text() == "# old\n"


def test_config_caddy_rejects_keeps_old_file_and_routes(
    lab: Lab, caddy: Caddy, tmp_path: Path
) -> None:
    _project, name = lab.labelled("rej")
    out = tmp_path / "Caddyfile"
    render_and_start(caddy, out)
    good = out.read_bytes()

    result = run_cli("render", "-o", out, *caddy.render_args, "--global-option", "no_such_option")

    assert result.returncode == 5
    assert "unrecognized global option: no_such_option" in result.stderr
    assert out.read_bytes() == good
    assert "hello from" in caddy.wait_body(f"{name}.localhost", "hello from", timeout=3)
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".Caddyfile")]
    assert left == [".Caddyfile.state.json"]  # (the last known routes), no temp, no mark


def test_reload_rejected_by_caddy_restores_previous_file(
    lab: Lab, caddy: Caddy, tmp_path: Path
) -> None:
    """/adapt would accept the text but /load fails (its port is taken): the file is not
    replaced (through the admin API the text is loaded before it is written) and Caddy keeps
    running the old config."""
    _project, name = lab.labelled("rb")
    out = tmp_path / "Caddyfile"
    render_and_start(caddy, out)
    good = out.read_bytes()

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "render",
            "-o",
            out,
            "--scheme",
            "http",
            "--caddy-admin",
            caddy.admin,
            "--global-option",
            f"http_port {port}",
        )

    assert result.returncode == 5, result.stderr
    assert (
        "Caddy rejected the new config" in result.stderr
        and "address already in use" in result.stderr
    )
    assert out.read_bytes() == good
    assert "hello from" in caddy.wait_body(f"{name}.localhost", "hello from", timeout=3)
