"""Routing without leases: after an incusd restart a bridge's lease table lists almost none of
the running instances (dnsmasq starts afresh; they renew within the hour). The listing then
takes their addresses from their live state, asked together, and routes them as before.

The test's instances live on a bridge of its own, whose lease file it empties (the leases
API reads that file): the lab's bridges and incusd are shared and left alone. Needs root.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from incus_caddyfile import pipeline
from incus_caddyfile.incus import PylxdApi, connect
from incus_caddyfile.labels import KEY_PORT
from incus_caddyfile.settings import Settings, load_policy

from ..harness import HarnessError, create_project
from ..helpers import skip_or_fail
from .conftest import SESSION, Caddy, Lab, WatchProcess, incus, labels, run_cli

pytestmark = pytest.mark.integration

INCUS_DIR = Path(os.environ.get("INCUS_DIR", "/var/lib/incus"))
CANDIDATE_SUBNETS = [f"198.18.{n}.1/24" for n in range(84, 88)]  # 198.18.80/22: bench/scale.py


def _taken() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    nets = []
    for net in json.loads(incus("network", "list", "--format", "json")):
        with contextlib.suppress(ValueError):
            address = (net.get("config") or {}).get("ipv4.address", "")
            nets.append(ipaddress.ip_interface(address).network)
    return nets


@pytest.fixture(scope="module")
def bridge(lab_ready: None) -> Iterator[str]:
    """A managed bridge of this module's own, on the first free test subnet."""
    name = f"icfnl{uuid.uuid4().hex[:5]}"
    taken = _taken()
    subnet = next(
        (s for s in CANDIDATE_SUBNETS
         if not any(ipaddress.ip_interface(s).network.overlaps(t) for t in taken)),
        None,
    )  # fmt: skip
    if subnet is None:
        skip_or_fail(f"no free subnet among {CANDIDATE_SUBNETS}")
    create_network(name, str(subnet))
    try:
        if not os.access(lease_file(name), os.W_OK):
            skip_or_fail(f"cannot empty {lease_file(name)} (needs root)")
        yield name
    finally:
        delete_network(name)


def create_network(name: str, subnet: str, tries: int = 5) -> None:
    """Incus can fail to create a bridge while other instances come and go on the host
    ("Failed to delete bridge children interfaces: ... does not exist"): try again."""
    for attempt in range(tries):
        try:
            incus("network", "create", name, f"ipv4.address={subnet}", "ipv4.nat=false",
                  "ipv6.address=none")  # fmt: skip
            return
        except HarnessError:
            incus("network", "delete", name, check=False)
            if attempt == tries - 1:
                raise
            time.sleep(1.0)


def delete_network(name: str, tries: int = 40) -> None:
    """The same Incus race as create_network, bounded; what is left is named."""
    for _ in range(tries):
        incus("network", "delete", name, check=False)
        if not incus("query", f"/1.0/networks/{name}", check=False).strip():
            return
        time.sleep(0.5)
    raise AssertionError(f"could not delete network {name} (remove it with incus network delete)")


def lease_file(network: str) -> Path:
    return INCUS_DIR / "networks" / network / "dnsmasq.leases"


def empty_leases(network: str, project: str) -> None:
    """As after an incusd restart: the lease table lists none of the running instances.
    (dnsmasq writes the file again at its next lease change; nothing here makes one.)"""
    lease_file(network).write_text("")
    listed = json.loads(
        incus("network", "list-leases", network, "--project", project, "--format", "json")
    )
    assert listed == [], listed


def fleet(lab: Lab, bridge: str, count: int = 3) -> tuple[str, list[str]]:
    """A project on the bridge with `count` running labelled instances, all addressed."""
    project = SESSION + uuid.uuid4().hex[:6]
    create_project(project, created=lab.projects, network=bridge)
    names = [f"nl{i}-{project[-4:]}" for i in range(count)]
    for name in names:
        lab.launch(project, name, labels(f"{name}.localhost"))
    for name in names:
        lab.address(project, name)
    return project, names


def test_render_routes_every_instance_with_empty_lease_tables(
    lab: Lab, bridge: str, caddy: Caddy, tmp_path: Path
) -> None:
    project, names = fleet(lab, bridge)
    empty_leases(bridge, project)
    out = tmp_path / "Caddyfile"

    result = run_cli("render", "-o", out, "--no-reload", *caddy.render_args)

    assert result.returncode == 0, result.stderr
    for name in names:
        assert f"reverse_proxy {lab.address(project, name)}:80" in out.read_text()
    caddy.start(out)
    for name in names:
        body = caddy.wait_body(f"{name}.localhost", f"hello from {name}")
        assert f"hello from {name} port 80" in body


def test_watch_routes_and_follows_an_event_with_empty_lease_tables(
    lab: Lab, bridge: str, caddy: Caddy, tmp_path: Path
) -> None:
    project, names = fleet(lab, bridge)
    empty_leases(bridge, project)
    out = caddy.stub_config(tmp_path / "Caddyfile")
    caddy.start(out)
    watch = WatchProcess(out, *caddy.render_args)
    try:
        watch.wait_cycles(1)
        for name in names:
            assert "hello from" in caddy.wait_body(f"{name}.localhost", f"hello from {name}")
        # one instance's event: refreshed on its own, its address again from its state
        incus("config", "set", names[0], f"{KEY_PORT}=8080", "--project", project)
        body = caddy.wait_body(f"{names[0]}.localhost", "port 8080")
        assert f"hello from {names[0]} port 8080" in body
        assert lease_file(bridge).read_text() == ""  # still no lease was listed
    finally:
        watch.stop()
    assert not any(c.get("error") for c in watch.cycles()), watch.log_text()


def test_watch_resyncs_after_the_lease_tables_emptied_without_asking_each_state(
    lab: Lab, bridge: str, caddy: Caddy, tmp_path: Path
) -> None:
    """As after an incusd restart under a running watch: the instances keep running, their
    leases are gone from the table; the next full listing takes their addresses from what
    watch found for the same NIC boot (volatile.<nic>.host_name), not one state each."""
    project, names = fleet(lab, bridge)
    out = caddy.stub_config(tmp_path / "Caddyfile")
    caddy.start(out)
    watch = WatchProcess(out, *caddy.render_args, "--resync-interval", "3")
    try:
        watch.wait_cycles(1)
        with_leases = timer_resync(watch)
        empty_leases(bridge, project)
        without = timer_resync(watch)
        # watch lists every project (the policy applies to the model): the requests include
        # other users' leases, so compare with the resync before; without the memo there
        # would be one state request per instance more (and the network's subnet)
        more = without["incus_requests"] - with_leases["incus_requests"]
        assert more < len(names), (with_leases, without)
        for name in names:
            assert "hello from" in caddy.wait_body(f"{name}.localhost", f"hello from {name}")
    finally:
        watch.stop()
    assert not any(c.get("error") for c in watch.cycles()), watch.log_text()


def timer_resync(watch: WatchProcess) -> dict[str, Any]:
    """The next periodic full listing's cycle record."""
    after = len(watch.cycles())
    index = watch.wait_cycle(lambda c: c.get("triggers") == ["timer"], after)
    return watch.cycles()[index]


def test_stdout_render_keeps_its_memo_in_the_cache_and_asks_no_state_after_the_leases_go(
    lab: Lab,
    bridge: str,
    caddy: Caddy,
    tmp_path: Path,
    own_cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`render > Caddyfile` keeps nothing beside a file, so it keeps its memo in the cache
    directory: after the lease tables are emptied, the next run prints the same Caddyfile
    without one state request per instance (counted in-process against the same Incus)."""
    project, names = fleet(lab, bridge)
    first = run_cli("render", *caddy.render_args)
    assert first.returncode == 0, first.stderr
    assert len(list(own_cache_dir.glob("state-*.json"))) == 1
    empty_leases(bridge, project)

    again = run_cli("render", *caddy.render_args)
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout
    out = tmp_path / "Caddyfile"
    out.write_text(again.stdout)
    caddy.start(out)
    for name in names:
        assert f"reverse_proxy {lab.address(project, name)}:80" in again.stdout
        assert "hello from" in caddy.wait_body(f"{name}.localhost", f"hello from {name}")

    def requests(cache: Path | None) -> int:
        """One render's Incus requests with the lease table empty from start to end (dnsmasq
        writes the whole table again at any lease change on the bridge, e.g. a renewal by
        an instance of this module's other tests: such a run is run again)."""
        apis: list[PylxdApi] = []

        def counted(settings: Settings) -> PylxdApi:
            apis.append(connect(settings))
            return apis[-1]

        monkeypatch.setattr(pipeline, "connect", counted)
        # the policy the commands run with (only_test_projects): it names the cache's file
        policy = load_policy(Path(os.environ["INCUS_CADDYFILE_CONFIG"]))
        settings = Settings(scheme="http", cache_dir=cache, policy=policy)
        for _ in range(10):
            apis.clear()
            lease_file(bridge).write_text("")  # (as empty_leases, without its check)
            report = pipeline.run(settings)
            assert report.error is None and report.text, report.message
            if lease_file(bridge).read_text() == "":
                return apis[0].requests
        raise AssertionError(f"the lease table of {bridge} kept filling up")

    with_memo, without = requests(own_cache_dir), requests(None)
    assert without - with_memo >= len(names), (with_memo, without)  # one state each
