"""No tenant can block or steal another's routes, in any state Incus can be in: real incusd,
real Caddy, real HTTP through Caddy to real instances."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from incus_caddyfile.render import DEFAULT_TEMPLATE, default_template_dir

from ..harness import build_guest_ready, set_guest_state, status_of
from .conftest import LABELS as L
from .conftest import Caddy, Lab, incus, labels, render_and_start, run_cli, wait_for

pytestmark = pytest.mark.integration


def render(caddy: Caddy, out: Path, *extra: str | Path) -> subprocess.CompletedProcess[str]:
    return run_cli("render", "-o", out, *caddy.render_args, *extra)


def routes(*extra: str | Path) -> dict[str, dict[str, object]]:
    result = run_cli("routes", "--json", "--scheme", "http", *extra)
    assert result.returncode == 0, result.stderr
    return {row["instance"]: row for row in json.loads(result.stdout)}


def test_a_pair_caddy_refuses_costs_only_its_instance(
    lab: Lab, caddy: Caddy, tmp_path: Path
) -> None:
    """https with port 80 used to make Caddy refuse the whole file: nobody's change applied."""
    web_project, web = lab.labelled("pair")
    out = tmp_path / "Caddyfile"
    render_and_start(caddy, out)
    lab.set(web_project, web, **{L + "upstream.scheme": "https"})
    _other_project, other = lab.labelled("newcomer")

    result = render(caddy, out)

    assert result.returncode == 3, result.stderr
    assert f"rejected {web_project}/{web}: {L}upstream.scheme='https'" in result.stderr
    assert f"{L}upstream.port=80" in result.stderr
    assert f"hello from {other}" in caddy.wait_body(f"{other}.localhost", "hello")
    row = routes()[web]
    assert row["state"] == "not routed"
    assert any("Caddy refuses this pair" in str(r) for r in row["reasons"])  # type: ignore[attr-defined]


def _template_refused_for(host_prefix: str, path: Path) -> Path:
    """The default template, plus a directive Caddy does not know in the sites whose host
    starts with the prefix: a route Caddy refuses for a reason the model cannot know."""
    text = (default_template_dir() / DEFAULT_TEMPLATE).read_text()
    site = "{{ scheme_prefix }}{{ site.host }} {\n"
    assert site in text
    path.write_text(
        text.replace(
            site,
            site + f'{{% if site.host.startswith("{host_prefix}") %}}\n\tno_such_directive\n'
            "{% endif %}\n",
        )
    )
    return path


def test_caddy_finds_the_instance_whose_route_it_refuses(
    lab: Lab, caddy: Caddy, tmp_path: Path
) -> None:
    _good_project, good = lab.labelled("good")
    bad_project, bad = lab.labelled("bad")
    template = _template_refused_for("bad-", tmp_path / "template.j2")
    out = tmp_path / "Caddyfile"
    render_and_start(caddy, out)

    result = render(caddy, out, "--template", template)

    assert result.returncode == 3, result.stderr
    refused = f"rejected {bad_project}/{bad}: Caddy refused its route:"
    assert refused in result.stderr and "no_such_directive" in result.stderr
    assert f"hello from {good}" in caddy.wait_body(f"{good}.localhost", "hello")
    assert f"{bad}.localhost" not in out.read_text()
    row = routes("--template", template, "--caddy-admin", caddy.admin)[bad]
    assert row["state"] == "not routed"
    assert any("Caddy refused its route" in str(r) for r in row["reasons"])  # type: ignore[attr-defined]
    assert routes("--template", template, "--caddy-admin", caddy.admin)[good]["state"] == "routed"
    doctor = run_cli("doctor", "-o", out, *caddy.render_args, "--template", template)
    assert f"{bad_project}/{bad}" in doctor.stdout and "Caddy refused its route" in doctor.stdout


def test_a_config_refused_without_any_route_keeps_the_previous_file(
    lab: Lab, caddy: Caddy, tmp_path: Path
) -> None:
    lab.labelled("whole")
    out = tmp_path / "Caddyfile"
    render_and_start(caddy, out)
    before = out.read_bytes()
    result = render(caddy, out, "--global-option", "no_such_option")
    assert result.returncode == 5
    assert "even without any instance's route" in result.stderr
    assert out.read_bytes() == before


@pytest.mark.parametrize(
    "typo",
    [{L + "upstream.port": "80/tcp"}, {L + "import": "via"}, {L + "enable": "yes"}],
    ids=["port", "unknown-snippet", "enable"],
)
def test_a_typo_by_a_holder_does_not_hand_its_host_to_another_project(
    lab: Lab, caddy: Caddy, tmp_path: Path, typo: dict[str, str]
) -> None:
    holder_project, holder = lab.labelled("holder")
    host = f"{holder}.localhost"
    rival_project = lab.project()
    rival = f"rival-{rival_project[-4:]}"
    lab.launch(rival_project, rival, labels(host))
    lab.address(rival_project, rival)
    out = tmp_path / "Caddyfile"
    render_and_start(caddy, out, expect=3)  # the rival is refused: the host is held
    assert f"hello from {holder}" in caddy.wait_body(host, "hello")

    lab.set(holder_project, holder, **typo)
    result = render(caddy, out)

    assert result.returncode == 3, result.stderr
    assert f"already claimed by {holder_project}/{holder}" in result.stderr
    assert host not in out.read_text()
    assert not caddy.serves(host, f"hello from {rival}")
    assert routes()[rival]["state"] == "not routed"

    incus("config", "unset", holder, L + "matchers.host", "--project", holder_project)
    assert render(caddy, out).returncode in (0, 3)
    assert f"hello from {rival}" in caddy.wait_body(host, f"hello from {rival}")


def test_an_instance_the_guest_marks_ready_is_routed(
    lab: Lab, caddy: Caddy, tmp_path: Path, start_watch: object
) -> None:
    project, name = lab.labelled("ready")
    out = tmp_path / "Caddyfile"
    render_and_start(caddy, out)
    watch = start_watch(out, *caddy.render_args)  # type: ignore[operator]
    start = watch.wait_cycle(lambda c: True)

    set_guest_state(project, name, build_guest_ready(tmp_path))

    assert wait_for(lambda: status_of(project, name) == "Ready", 15)
    ready_cycle = watch.wait_cycle(
        lambda c: any(t == f"instance-ready {project}/{name}" for t in c["triggers"]),
        after=start + 1,
    )
    assert watch.cycles()[ready_cycle]["error"] is None
    assert f"hello from {name}" in caddy.wait_body(f"{name}.localhost", "hello")
    assert render(caddy, out).returncode == 0
    row = routes()[name]
    assert row["status"] == "Ready" and row["state"] == "routed"


def test_a_paused_instance_that_asks_for_readiness_keeps_its_route(
    lab: Lab, caddy: Caddy, tmp_path: Path
) -> None:
    project = lab.project()
    name = f"paused-{project[-4:]}"
    lab.launch(project, name, {**labels(f"{name}.localhost"), L + "upstream.require_ready": "true"})
    lab.address(project, name)
    out = tmp_path / "Caddyfile"
    render_and_start(caddy, out)
    assert f"{name}.localhost" in out.read_text()
    incus("pause", name, "--project", project)
    try:
        result = render(caddy, out)
        assert result.returncode == 0, result.stderr
        assert f"{name}.localhost" in out.read_text()
        row = routes()[name]
        assert row["status"] == "Frozen" and row["state"] == "routed"
    finally:
        incus("start", name, "--project", project)


def test_relative_snippets_work_whatever_caddys_working_directory(
    lab: Lab, caddy: Caddy, tmp_path: Path
) -> None:
    project = lab.project()
    name = f"rel-{project[-4:]}"
    lab.launch(project, name, {**labels(f"{name}.localhost"), L + "import": "via"})
    lab.address(project, name)
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "snippets.caddy").write_text("(via) {\n\theader X-Via relative\n}\n")
    out = tmp_path / "Caddyfile"
    caddy.start(caddy.stub_config(tmp_path / "stub"))  # Caddy's working directory is not work
    proc = run_cli(
        "render", "-o", out, *caddy.render_args, "--snippets", "snippets.caddy", cwd=work
    )
    assert proc.returncode == 0, proc.stderr
    assert f"import {work}/snippets.caddy" in out.read_text()
    assert wait_for(lambda: caddy.request(f"{name}.localhost")[1].get("X-Via") == "relative", 10)
