"""Host groups end to end: sixteen or more alike hosts share one site block and a map from host
to upstream (incus_caddyfile/shape.py). Real incusd, real Caddy, real HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest

from incus_caddyfile.shape import GROUP_AT

from .conftest import Caddy, Lab, labels, render_and_start

pytestmark = pytest.mark.integration

PER_INSTANCE = 6
INSTANCES = 3  # 18 hosts: one group


def test_each_host_of_a_group_reaches_its_own_instance(
    lab: Lab, caddy: Caddy, tmp_path: Path
) -> None:
    assert PER_INSTANCE * INSTANCES >= GROUP_AT
    project = lab.project()
    tag = project[-4:]
    names = [f"grp{n}-{tag}" for n in range(INSTANCES)]
    hosts = {name: [f"h{k}-{name}.localhost" for k in range(PER_INSTANCE)] for name in names}
    # the first one's upstream port has nothing listening: a broken service in the group
    broken, *others = names
    for name in names:
        lab.launch(project, name, labels(" ".join(hosts[name]), 81 if name == broken else 80))
    for name in names:
        lab.address(project, name)
    out = tmp_path / "Caddyfile"
    render_and_start(caddy, out)

    text = out.read_text()
    assert text.count("reverse_proxy {incus_upstream}") == 1, text
    assert text.count("map {labels.1}.{labels.0} {incus_upstream}") == 1, text
    assert all(f"{h} " in text for name in names for h in hosts[name]), text
    for name in others:
        for host in hosts[name]:
            assert f"hello from {name} " in caddy.wait_body(host, "hello"), host
            # host names ignore case; the map is asked in lower case
            status, body = caddy.get(host.upper())
            assert (status, body.strip()) == (200, f"hello from {name} port 80"), host

    # One tenant's broken service must not turn the group's shared upstream away for the
    # others (a placeholder upstream shares Caddy's health state: none is kept for it).
    for _ in range(10):
        assert caddy.get(hosts[broken][0])[0] == 502
    for name in others:
        for host in hosts[name]:
            assert caddy.get(host) == (200, f"hello from {name} port 80\n"), host

    # a host outside the group misses the matcher (Caddy's empty answer), never the map
    assert "hello" not in caddy.get(f"nobody-{tag}.localhost")[1]
