"""The optional labels, end to end: real incusd, real Caddy, real HTTP through Caddy."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import LABELS as L
from .conftest import NETWORK2, Caddy, Lab, incus, labels, render_and_start, run_cli, wait_for

pytestmark = pytest.mark.integration


def render(caddy: Caddy, out: Path, *extra: str | Path) -> str:
    result = run_cli("render", "-o", out, *caddy.render_args, *extra)
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_path_prefixes_share_a_host(lab: Lab, caddy: Caddy, tmp_path: Path) -> None:
    project = lab.project()
    tag = project[-4:]
    host = f"shared-{tag}.localhost"
    lab.launch(project, f"site-{tag}", labels(host))
    lab.launch(project, f"api-{tag}", {**labels(host), L + "matchers.path": "/api"})
    lab.address(project, f"site-{tag}")
    lab.address(project, f"api-{tag}")
    lab.exec(project, f"api-{tag}", "mkdir -p /www80/api && echo api-app > /www80/api/index.html")
    lab.exec(project, f"site-{tag}", "echo site-app > /www80/apixyz")

    render_and_start(caddy, tmp_path / "Caddyfile")

    assert f"hello from site-{tag}" in caddy.wait_body(host, "hello")
    assert "api-app" in caddy.wait_body(host, "api-app", path="/api/")
    assert caddy.get(host, "/apixyz")[1] == "site-app\n"  # a prefix is a whole path segment


def test_network_and_ipv6_family(lab: Lab, caddy: Caddy, tmp_path: Path) -> None:
    project = lab.project()
    tag = project[-4:]
    # two NICs: eth0 on the default lab bridge, eth1 on the dual-stack one
    lab.launch(
        project,
        f"two-{tag}",
        {**labels(f"two-{tag}.localhost"), L + "upstream.network": NETWORK2},
        start=False,
    )
    incus(
        "config",
        "device",
        "add",
        f"two-{tag}",
        "eth1",
        "nic",
        f"network={NETWORK2}",
        "name=eth1",
        "--project",
        project,
    )
    incus("start", f"two-{tag}", "--project", project)
    lab.address(project, f"two-{tag}")
    lab.exec(
        project,
        f"two-{tag}",
        "ip link set eth1 up && udhcpc -i eth1 -s /etc/udhcpc.script -q -n >/dev/null 2>&1",
    )
    back = lab.address(project, f"two-{tag}", nic="eth1")
    # IPv6 only: dialled in brackets over the dual-stack bridge
    lab.launch(
        project,
        f"six-{tag}",
        {**labels(f"six-{tag}.localhost"), L + "upstream.family": "ipv6"},
        network=NETWORK2,
    )
    v6 = lab.address(project, f"six-{tag}", family="inet6")

    out = tmp_path / "Caddyfile"
    render_and_start(caddy, out)

    text = out.read_text()
    assert f"reverse_proxy {back}:80" in text
    assert f"reverse_proxy [{v6}]:80" in text
    assert f"hello from two-{tag}" in caddy.wait_body(f"two-{tag}.localhost", "hello")
    assert f"hello from six-{tag}" in caddy.wait_body(f"six-{tag}.localhost", "hello")


def test_round_robin_and_health_checks(lab: Lab, caddy: Caddy, tmp_path: Path) -> None:
    project = lab.project()
    tag = project[-4:]
    rr, hc = f"rr-{tag}.localhost", f"hc-{tag}.localhost"
    for n in (1, 2):
        lab.launch(project, f"rr{n}-{tag}", {**labels(rr), L + "upstream.lb_policy": "round_robin"})
        lab.launch(project, f"hc{n}-{tag}", {**labels(hc), L + "upstream.health_uri": "/healthz"})
        lab.address(project, f"rr{n}-{tag}")
        lab.address(project, f"hc{n}-{tag}")
    lab.exec(project, f"hc1-{tag}", "echo ok > /www80/healthz")  # hc2 answers 404: unhealthy

    render_and_start(caddy, tmp_path / "Caddyfile")

    caddy.wait_body(rr, "hello")
    bodies = [caddy.get(rr)[1].split()[2] for _ in range(6)]
    assert bodies[0] != bodies[1] and bodies[0::2] == [bodies[0]] * 3  # strict alternation
    assert wait_for(lambda: all(f"hc1-{tag}" in caddy.get(hc)[1] for _ in range(8)), 10)


def test_fallback_page_require_ready_and_snippets(lab: Lab, caddy: Caddy, tmp_path: Path) -> None:
    project = lab.project()
    tag = project[-4:]
    lab.launch(
        project,
        f"down-{tag}",
        {**labels(f"down-{tag}.localhost"), L + "fallback": "true"},
        start=False,
    )
    lab.launch(
        project,
        f"slow-{tag}",
        {**labels(f"slow-{tag}.localhost", 9000), L + "upstream.require_ready": "true"},
    )
    lab.launch(project, f"snip-{tag}", {**labels(f"snip-{tag}.localhost"), L + "import": "via"})
    lab.address(project, f"slow-{tag}")
    lab.address(project, f"snip-{tag}")
    snippets = tmp_path / "snippets.caddy"
    snippets.write_text("(via) {\n\theader X-Via incus-caddyfile\n}\n")
    out = tmp_path / "Caddyfile"

    stderr = render_and_start(caddy, out, "--snippets", snippets)
    assert f"skipped {project}/slow-{tag}: port 9000 does not accept connections yet" in stderr

    status, _, body = caddy.request(f"down-{tag}.localhost")
    assert status == 503 and f"down-{tag}.localhost is not available right now" in body
    status, headers, body = caddy.request(f"snip-{tag}.localhost")
    assert status == 200 and headers.get("X-Via") == "incus-caddyfile"
    assert "hello" not in caddy.get(f"slow-{tag}.localhost")[1]

    lab.exec(project, f"slow-{tag}", "httpd -p 9000 -h /www80")  # the port opens
    render(caddy, out, "--snippets", snippets)
    assert f"hello from slow-{tag}" in caddy.wait_body(f"slow-{tag}.localhost", "hello")

    incus("start", f"down-{tag}", "--project", project)
    lab.address(project, f"down-{tag}")
    render(caddy, out, "--snippets", snippets)
    assert f"hello from down-{tag}" in caddy.wait_body(f"down-{tag}.localhost", "hello")


def test_operator_sites_dir(lab: Lab, caddy: Caddy, tmp_path: Path) -> None:
    sites = tmp_path / "sites"
    sites.mkdir()
    (sites / "static.caddy").write_text('http://static.localhost {\n\trespond "by hand"\n}\n')
    render_and_start(caddy, tmp_path / "Caddyfile", "--sites-dir", sites)
    assert "by hand" in caddy.wait_body("static.localhost", "by hand")


def test_import_of_an_undefined_snippet_is_rejected(lab: Lab, tmp_path: Path) -> None:
    project = lab.project()
    tag = project[-4:]
    lab.launch(project, f"x-{tag}", {**labels(f"x-{tag}.localhost"), L + "import": "../../etc"})
    result = run_cli("render", "--scheme", "http")
    assert result.returncode == 3
    assert f"rejected {project}/x-{tag}: {L}import='../../etc'" in result.stderr
    assert f"x-{tag}.localhost" not in result.stdout


def test_addresses_an_instance_sets_itself_are_kept_inside_its_network(
    lab: Lab, caddy: Caddy, tmp_path: Path
) -> None:
    """With no lease for the family, the address comes from the instance's own report. A
    tenant adding another bridge's own address, or one from elsewhere, must not turn the
    route towards them: only addresses inside the NIC's network count."""
    project = lab.project()
    name = f"spoof-{project[-4:]}"
    lab.launch(project, name, {**labels(f"{name}.localhost"), L + "upstream.family": "ipv6"})
    lab.address(project, name)  # IPv4 from the lab bridge, which has no IPv6 at all
    lab.exec(
        project,
        name,
        "ip -6 addr add fd42:4943:4643::1/128 dev eth0 && ip -6 addr add 2001:db8::5/64 dev eth0",
    )
    assert wait_for(
        lambda: "2001:db8::5" in incus("list", name, "--project", project, "-c", "6", "-f", "csv"),
        10,
    )
    out = tmp_path / "Caddyfile"

    result = run_cli("render", "-o", out, "--no-reload", *caddy.render_args)

    assert result.returncode == 0, result.stderr
    assert f"skipped {project}/{name}: running but has no IPv6 address yet" in result.stderr
    text = out.read_text()
    assert f"{name}.localhost" not in text
    assert "fd42:4943:4643::1" not in text and "2001:db8::5" not in text
