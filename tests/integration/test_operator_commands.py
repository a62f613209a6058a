"""routes and doctor against the real lab and a real Caddy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import LABELS, Caddy, Lab, labels, run_cli

pytestmark = pytest.mark.integration


def test_routes_table_and_json(lab: Lab, tmp_path: Path) -> None:
    project = lab.project()
    tag = project[-4:]
    lab.launch(project, f"ok-{tag}", labels(f"ok-{tag}.localhost"))
    lab.launch(project, f"off-{tag}", labels(f"off-{tag}.localhost"), start=False)
    lab.launch(project, f"bad-{tag}", labels(f"bad-{tag}.localhost", port="eighty"))
    address = lab.address(project, f"ok-{tag}")

    table = run_cli("routes")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "PROJECT",
        "INSTANCE",
        "STATUS",
        "LOCATION",
        "ROUTE",
        "HOSTS",
        "UPSTREAM",
    ]
    [ok] = [ln for ln in lines if f"ok-{tag} " in ln]
    assert ok.split() == [
        project,
        f"ok-{tag}",
        "Running",
        "none",
        "routed",
        f"ok-{tag}.localhost",
        f"{address}:80",
    ]
    assert (
        "    not running (Stopped)"
        in lines[lines.index(next(ln for ln in lines if f"off-{tag} " in ln)) + 1]
    )

    result = run_cli("routes", "--json")
    assert result.returncode == 0 and result.stderr == ""
    rows = {r["instance"]: r for r in json.loads(result.stdout) if r["project"] == project}
    assert rows[f"ok-{tag}"]["state"] == "routed"
    assert rows[f"ok-{tag}"]["location"] == "none"
    assert rows[f"off-{tag}"]["state"] == "not routed"
    assert "not a port number" in rows[f"bad-{tag}"]["reasons"][0]


def test_routes_with_incus_down_exits_4(tmp_path: Path) -> None:
    result = run_cli("routes", "--incus", tmp_path / "none.socket")
    assert result.returncode == 4 and result.stdout == ""
    assert "no Incus socket" in result.stderr


def test_doctor_all_good(lab: Lab, caddy: Caddy, tmp_path: Path) -> None:
    caddy.start(caddy.stub_config(tmp_path / "stub"))
    result = run_cli("doctor", "-o", tmp_path / "Caddyfile", *caddy.render_args)
    assert result.returncode == 0, result.stdout
    names = [ln.split(":")[0].split(maxsplit=1)[1] for ln in result.stdout.splitlines()]
    assert names == ["incus", "projects", "caddy admin", "template", "caddy accepts", "output"]
    assert all(ln.startswith("ok") for ln in result.stdout.splitlines())


def test_doctor_and_routes_see_the_snippets_render_sees(lab: Lab, tmp_path: Path) -> None:
    """An instance importing a snippet the settings define is fine for all three commands."""
    project = lab.project()
    name = f"snip-{project[-4:]}"
    lab.launch(project, name, {**labels(f"{name}.localhost"), LABELS + "import": "via"})
    lab.address(project, name)
    snippets = tmp_path / "snippets.caddy"
    snippets.write_text("(via) {\n\theader X-Via incus-caddyfile\n}\n")
    args = ["--snippets", snippets, "--scheme", "http"]

    assert run_cli("render", *args, "--no-reload").returncode == 0
    doctor = run_cli("doctor", *args, "--no-reload")
    assert "ok    template: renders 1 site(s), 0 rejected value(s)" in doctor.stdout
    rows = json.loads(run_cli("routes", "--json", *args).stdout)
    assert [r["state"] for r in rows if r["instance"] == name] == ["routed"]


def test_doctor_reports_each_failure_with_a_fix(lab: Lab, tmp_path: Path) -> None:
    result = run_cli(
        "doctor",
        "-o",
        tmp_path / "missing" / "Caddyfile",
        "--caddy-admin",
        "127.0.0.1:9",
        "--global-option",
        "no_such_option",
    )
    assert result.returncode == 1
    out = result.stdout
    assert "ok    incus: Incus" in out and "ok    projects: can list" in out
    assert "FAIL  caddy admin: no Caddy admin endpoint answers at 127.0.0.1:9" in out
    assert "FAIL  caddy accepts: Caddy rejects the config: Caddyfile:" in out
    assert "unrecognized global option: no_such_option" in out
    assert f"FAIL  output: directory {tmp_path / 'missing'} does not exist" in out
    assert out.count("      fix: ") == 3
