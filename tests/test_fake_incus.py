"""FakeIncus replays the lab recording (tests/fixtures/incus/lab.json) faithfully."""

from __future__ import annotations

from typing import Any

import pytest

from incus_caddyfile.incus import IncusError

from .fake_incus import FakeIncus, lifecycle_event

A, B, C = "icfrec-a", "icfrec-b", "icfrec-c"


@pytest.fixture
def fake() -> FakeIncus:
    return FakeIncus.from_recording()


def addresses(state: dict[str, Any], ifname: str, family: str) -> list[str]:
    iface = (state.get("network") or {}).get(ifname) or {}
    return [
        a["address"]
        for a in iface.get("addresses") or []
        if a["family"] == family and a["scope"] == "global"
    ]


def hwaddr(raw: dict[str, Any], device: str) -> str:
    return str(raw["expanded_config"][f"volatile.{device}.hwaddr"]).lower()


def test_listing_has_the_recorded_statuses(fake: FakeIncus) -> None:
    listing = fake.list_instances()
    statuses = {(r["project"], r["name"]): r["status"] for r in listing}
    assert statuses == {
        (A, "rec-web"): "Running",
        (A, "rec-alt"): "Running",
        (A, "rec-plain"): "Running",
        (A, "rec-stopped"): "Stopped",
        (A, "rec-frozen"): "Frozen",
        (B, "rec-profiled"): "Running",
        (B, "rec-ready"): "Ready",
        (B, "rec-static"): "Running",
        (C, "rec-v6"): "Running",
        (C, "rec-dual"): "Running",
    }
    assert {r["status_code"] for r in listing if r["status"] == "Ready"} == {113}
    assert fake.requests == 1
    assert fake.server_version() == "6.0.4"
    assert fake.requests == 1  # known since connecting


def test_profile_labels_only_in_expanded_config(fake: FakeIncus) -> None:
    raw = fake.get_instance(B, "rec-profiled")
    assert raw is not None
    assert raw["profiles"] == ["default", "caddy"]
    assert not any(k.startswith("user.caddyserver.") for k in raw["config"])
    assert raw["expanded_config"]["user.caddyserver.http.matchers.host"] == "b.example.test"


def test_leases_map_hwaddr_to_the_running_instances_addresses(fake: FakeIncus) -> None:
    for project in (A, B):
        leases = {
            lease["hwaddr"].lower(): lease["address"]
            for lease in fake.network_leases(project, "icfbr0")
        }
        for raw in fake.list_instances():
            if raw["project"] != project or raw["status"] not in ("Running", "Frozen", "Ready"):
                continue
            state = fake.instance_state(project, raw["name"])
            assert state is not None
            if raw["name"] == "rec-static":  # no DHCP: only its state knows its address
                assert hwaddr(raw, "eth0") not in leases
                assert addresses(state, "net0", "inet")
                continue
            assert leases[hwaddr(raw, "eth0")] in addresses(state, "eth0", "inet")


def test_ipv6_instance_has_its_v6_address_on_eth1(fake: FakeIncus) -> None:
    raw = fake.get_instance(C, "rec-v6")
    state = fake.instance_state(C, "rec-v6")
    assert raw is not None and state is not None
    assert raw["expanded_config"]["user.caddyserver.http.upstream.network"] == "eth1"
    assert raw["expanded_devices"]["eth1"]["network"] == "icfbr1"
    (v6,) = addresses(state, "eth1", "inet6")
    assert v6.startswith("fd42:4943:4643:")
    leases = fake.network_leases(C, "icfbr1")
    assert {"hwaddr": hwaddr(raw, "eth1"), "address": v6}.items() <= next(
        lease for lease in leases if lease["address"] == v6
    ).items()
    network = fake.get_network(C, "icfbr1")
    assert network is not None
    assert network["config"]["ipv6.address"] == "fd42:4943:4643::1/64"


def test_unknown_keys_answer_none_or_empty(fake: FakeIncus) -> None:
    assert fake.get_instance(A, "nope") is None
    assert fake.instance_state("nope", "rec-web") is None
    assert fake.network_leases(A, "nope") == []
    assert fake.get_network(A, "nope") is None
    assert fake.requests == 4
    assert "default" in fake.list_projects() and A in fake.list_projects()


def test_answers_are_copies(fake: FakeIncus) -> None:
    raw = fake.get_instance(A, "rec-web")
    assert raw is not None
    raw["status"] = "Stopped"
    fake.list_instances()[0]["expanded_config"].clear()
    again = fake.get_instance(A, "rec-web")
    assert again is not None and again["status"] == "Running"
    assert fake.list_instances()[0]["expanded_config"]


def test_fault_injection_raises_incus_error(fake: FakeIncus) -> None:
    fake.fail_on = {"network_leases", "events"}
    with pytest.raises(IncusError):
        fake.network_leases(A, "icfbr0")
    assert fake.requests == 1  # the failed request was made
    assert fake.list_instances()
    with pytest.raises(IncusError):
        fake.events(lambda e: None, lambda: None).start()


def test_mutators(fake: FakeIncus) -> None:
    fake.set_status(A, "rec-web", "Stopped")
    state = fake.instance_state(A, "rec-web")
    assert state is not None and state["status_code"] == 102 and state["network"] is None
    fake.set_status(A, "rec-web", "Error")
    with pytest.raises(IncusError):
        fake.instance_state(A, "rec-web")
    fake.set_config(A, "rec-alt", "user.caddyserver.http.enable", "false")
    alt = fake.get_instance(A, "rec-alt")
    assert alt is not None and alt["expanded_config"]["user.caddyserver.http.enable"] == "false"
    fake.remove(A, "rec-plain")
    assert fake.get_instance(A, "rec-plain") is None
    clone = {**fake.recorded(A, "rec-alt"), "project": "other", "name": "clone"}
    fake.add(clone)
    assert ("other", "clone") in fake.instance_keys() and "other" in fake.list_projects()
    state = fake.instance_state("other", "clone")
    assert state == {"network": {}, "status": "Running", "status_code": 103}


def test_exec_and_files(fake: FakeIncus) -> None:
    assert fake.exec(A, "rec-web", ["caddy", "version"]) == (0, "", "")
    fake.exec_result = lambda project, name, argv: (1, "", f"{name}: {argv[0]} not found")
    assert fake.exec(A, "rec-web", ["caddy"]) == (1, "", "rec-web: caddy not found")
    assert fake.execs[0] == (A, "rec-web", ["caddy", "version"])
    assert fake.read_file(A, "rec-web", "/etc/caddy/Caddyfile") is None
    fake.write_file(A, "rec-web", "/etc/caddy/Caddyfile", b"x")
    assert fake.read_file(A, "rec-web", "/etc/caddy/Caddyfile") == b"x"
    with pytest.raises(IncusError):
        fake.exec(A, "gone", ["true"])


def test_events(fake: FakeIncus) -> None:
    got: list[dict[str, Any]] = []
    closed: list[bool] = []
    source = fake.events(got.append, lambda: closed.append(True))
    assert fake.last_events is source
    assert not source.emit(lifecycle_event(A, "rec-web"))  # not started yet
    source.start()
    assert source.emit(lifecycle_event(A, "rec-web", "instance-started"))
    assert got[0]["metadata"]["source"] == f"/1.0/instances/rec-web?project={A}"
    source.drop()
    source.close()
    assert closed == [True]
    assert not source.emit(lifecycle_event(A, "rec-web"))
