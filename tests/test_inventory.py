"""The Incus mapping (raw API data -> model instances), against a recording of the real lab
replayed by FakeIncus: which requests are made, where addresses come from, and the managed-
subnet check on addresses an instance reports itself."""

from __future__ import annotations

import pytest

from incus_caddyfile.incus import IncusError
from incus_caddyfile.inventory import AddressMemo, Inventory, within
from incus_caddyfile.model import Instance, build, wants_address

from .fake_incus import FakeIncus


@pytest.fixture
def fake() -> FakeIncus:
    return FakeIncus.from_recording()


def by_name(instances: list[Instance]) -> dict[str, Instance]:
    return {i.name: i for i in instances}


def addresses(inst: Instance) -> dict[str, tuple[str, ...]]:
    return {n.name: n.addresses for n in inst.nics if n.addresses}


def test_the_listing_maps_every_status_and_keeps_only_caddy_keys(fake: FakeIncus) -> None:
    fleet = by_name(Inventory(fake).instances())
    assert {n: i.status for n, i in fleet.items()} == {
        "rec-web": "Running", "rec-alt": "Running", "rec-plain": "Running",
        "rec-stopped": "Stopped", "rec-frozen": "Frozen", "rec-profiled": "Running",
        "rec-ready": "Ready", "rec-static": "Running", "rec-v6": "Running",
        "rec-dual": "Running",
    }  # fmt: skip
    assert all(k.startswith("user.caddyserver.") for i in fleet.values() for k in i.config)
    assert fleet["rec-profiled"].labels  # from the profile: expanded_config
    assert fleet["rec-web"].project == "icfrec-a" and fleet["rec-web"].created_at


def test_addresses_come_from_leases_one_request_per_project_and_network(
    fake: FakeIncus,
) -> None:
    web = fake.recorded("icfrec-a", "rec-web")
    mac = web["expanded_config"]["volatile.eth0.hwaddr"].lower()
    lease = next(
        lease["address"] for lease in fake.network_leases("icfrec-a", "icfbr0")
        if lease["hwaddr"].lower() == mac
    )  # fmt: skip
    fake.calls.clear()
    fleet = by_name(Inventory(fake).instances())
    assert addresses(fleet["rec-web"]) == {"eth0": (lease,)}
    calls = [name for name, *_ in fake.calls]
    assert calls.count("list_instances") == 1
    leases = [args for name, *args in fake.calls if name == "network_leases"]
    assert len(leases) == len({tuple(a) for a in leases})  # never the same pair twice


def test_instances_that_are_down_or_unlabelled_cost_no_address_request(fake: FakeIncus) -> None:
    fleet = by_name(Inventory(fake).instances())
    assert fleet["rec-stopped"].nics == () and fleet["rec-plain"].nics == ()
    states = {args[1] for name, *args in fake.calls if name == "instance_state"}
    assert "rec-stopped" not in states and "rec-plain" not in states
    assert not wants_address(fleet["rec-stopped"]) and not wants_address(fleet["rec-plain"])


def test_a_paused_instance_keeps_its_address(fake: FakeIncus) -> None:
    frozen = by_name(Inventory(fake).instances())["rec-frozen"]
    assert frozen.status == "Frozen" and addresses(frozen)["eth0"]


def test_without_a_lease_the_address_comes_from_the_live_state(fake: FakeIncus) -> None:
    fleet = by_name(Inventory(fake).instances())
    static = fleet["rec-static"]
    assert addresses(static) == {"eth0": ("198.18.77.254",)}  # device eth0, net0 inside
    states = [args[1] for name, *args in fake.calls if name == "instance_state"]
    assert "rec-static" in states and "rec-web" not in states


def test_ipv6_on_a_second_nic(fake: FakeIncus) -> None:
    v6 = by_name(Inventory(fake).instances())["rec-v6"]
    assert any(":" in a for a in addresses(v6)["eth1"])
    model = build([v6])
    assert model.sites[0].dials[0].startswith("[fd42:")


@pytest.mark.parametrize(
    "reported",
    [
        "198.18.77.1",  # the network's own address: the host
        "10.0.0.5",  # outside the managed subnet
        "127.0.0.1",  # loopback
    ],
)
def test_an_address_the_instance_reports_counts_only_inside_its_managed_network(
    fake: FakeIncus, reported: str
) -> None:
    state = fake.instance_state("icfrec-b", "rec-static")
    assert state is not None
    iface = state["network"]["net0"]
    iface["addresses"] = [{"family": "inet", "address": reported, "scope": "global"}]
    fake.set_state("icfrec-b", "rec-static", state)
    static = by_name(Inventory(fake).instances())["rec-static"]
    assert addresses(static) == {}
    assert build([static]).sites == ()


def test_within_keeps_everything_on_an_unmanaged_network() -> None:
    assert within(["10.0.0.5"], [], set()) == ["10.0.0.5"]


def test_one_instance_refresh_costs_the_instance_and_its_leases(fake: FakeIncus) -> None:
    before = fake.requests
    web = Inventory(fake).instance("icfrec-a", "rec-web")
    assert web is not None and addresses(web)["eth0"]
    assert fake.requests - before == 2
    fake.remove("icfrec-a", "rec-web")
    assert Inventory(fake).instance("icfrec-a", "rec-web") is None


def test_a_failed_listing_fails_the_whole_listing(fake: FakeIncus) -> None:
    """(A failed leases or state request does not: tests/test_member_down.py.)"""
    fake.fail_on = {"list_instances"}
    with pytest.raises(IncusError):
        Inventory(fake).instances()


def test_require_ready_takes_the_address_the_instance_reports_itself(fake: FakeIncus) -> None:
    """Not its lease: dialling a leased address the instance has not configured yet would
    leave the host's ARP entry incomplete (~1 s for the next try)."""
    fleet = by_name(Inventory(fake).instances())
    assert addresses(fleet["rec-ready"])  # Ready, require_ready: from its live state
    assert ("instance_state", "icfrec-b", "rec-ready") in fake.calls
    fake.set_state("icfrec-b", "rec-ready", {"network": {}})  # leased, not configured yet
    fake.calls.clear()
    inst = Inventory(fake).instance("icfrec-b", "rec-ready")
    assert inst is not None and not addresses(inst)
    assert "network_leases" not in [c[0] for c in fake.calls]  # state (and its subnet), no leases


def test_own_addresses_on_request_instead_of_the_lease(fake: FakeIncus) -> None:
    fake.set_state("icfrec-a", "rec-web", {"network": {}})
    leased = Inventory(fake).instance("icfrec-a", "rec-web")
    own = Inventory(fake).instance("icfrec-a", "rec-web", own=True)
    assert leased is not None and addresses(leased) == {"eth0": ("198.18.77.166",)}
    assert own is not None and not addresses(own)


def test_projects_the_policy_leaves_out_cost_no_address_request(fake: FakeIncus) -> None:
    fleet = by_name(Inventory(fake, considers=lambda project: project == "icfrec-a").instances())
    asked = {args[0] for name, *args in fake.calls if name in ("network_leases", "instance_state")}
    assert asked == {"icfrec-a"}
    assert addresses(fleet["rec-web"]) and fleet["rec-static"].nics == ()  # icfrec-b: none


def without_leases(fake: FakeIncus) -> None:
    """Every lease table empty, as after an incusd restart (dnsmasq starts afresh)."""
    for project in ("icfrec-a", "icfrec-b", "icfrec-c"):
        for network in ("icfbr0", "icfbr1"):
            fake.set_leases(project, network, [])


def test_without_leases_the_states_are_asked_together_for_just_the_instances_that_need_them(
    fake: FakeIncus,
) -> None:
    leased = by_name(Inventory(fake).instances())
    without_leases(fake)
    fake.calls.clear()
    fleet = by_name(Inventory(fake).instances())

    def found(insts: dict[str, Instance]) -> dict[str, set[str]]:
        return {n: {a for nic in i.nics for a in nic.addresses} for n, i in insts.items()}

    assert found(fleet) == found(leased)  # the same addresses, from the live state
    assert len(fake.state_batches) == 2  # the first listing's fallback, then this one's
    asked = {name for _, name in fake.state_batches[-1]}
    assert asked == {n for n, i in fleet.items() if wants_address(i)}
    assert "rec-stopped" not in asked and "rec-plain" not in asked
    states = [args for name, *args in fake.calls if name == "instance_state"]
    assert sorted(states) == sorted([list(k) for k in fake.state_batches[-1]])  # once each


def test_without_leases_an_address_the_instance_reports_must_be_inside_its_network(
    fake: FakeIncus,
) -> None:
    without_leases(fake)
    state = fake.instance_state("icfrec-a", "rec-web")
    assert state is not None
    state["network"]["eth0"]["addresses"] = [
        {"family": "inet", "address": "198.18.77.1", "scope": "global"}  # the host's
    ]
    fake.set_state("icfrec-a", "rec-web", state)
    fleet = by_name(Inventory(fake).instances())
    assert addresses(fleet["rec-web"]) == {} and addresses(fleet["rec-alt"])


def test_a_state_request_that_fails_makes_those_instances_unknown(fake: FakeIncus) -> None:
    """Asked together, then each on its own: one whose state fails (its cluster member went
    down) is unknown, said in a note; the listing itself stands."""
    without_leases(fake)
    fake.fail_on = {"instance_state"}
    inventory = Inventory(fake)
    fleet = by_name(inventory.instances())
    assert fleet["rec-web"].status == "Error" and not fleet["rec-web"].nics
    assert any("icfrec-a/rec-web" in note and "unknown" in note for note in inventory.notes)
    asked = [args[1] for name, *args in fake.calls if name == "instance_state"]
    assert sorted(asked) == sorted(set(asked))  # each once: a failure is not asked again


def test_with_leases_only_the_instances_they_do_not_cover_are_asked(fake: FakeIncus) -> None:
    Inventory(fake).instances()
    asked = {name for batch in fake.state_batches for _, name in batch}
    assert asked == {"rec-static", "rec-ready"}  # an address set inside; require_ready


def state_requests(fake: FakeIncus) -> set[str]:
    return {args[1] for name, *args in fake.calls if name == "instance_state"}


def test_the_memo_gives_addresses_of_nics_up_since_without_a_state_request(
    fake: FakeIncus,
) -> None:
    """What watch's resync after an incusd restart sees: empty lease tables, the same
    instances still running with the addresses they had."""
    memo = AddressMemo()
    before = by_name(Inventory(fake, memo=memo).instances())
    without_leases(fake)
    fake.calls.clear()
    after = by_name(Inventory(fake, memo=memo).instances())
    assert {n: addresses(i) for n, i in after.items()} == {
        n: addresses(i) for n, i in before.items()
    }
    # rec-static's address came from its state the first time: same boot, same address;
    # require_ready always asks (only an address it has configured will do)
    assert state_requests(fake) == {"rec-ready"}


def test_a_nic_started_again_is_not_taken_from_the_memo(fake: FakeIncus) -> None:
    memo = AddressMemo()
    Inventory(fake, memo=memo).instances()
    without_leases(fake)
    fake.set_config("icfrec-a", "rec-web", "volatile.eth0.host_name", "vethrestarted")
    fake.set_state("icfrec-a", "rec-web", {"network": {}})  # no address configured yet
    fake.calls.clear()
    web = by_name(Inventory(fake, memo=memo).instances())["rec-web"]
    assert "rec-web" in state_requests(fake) and addresses(web) == {}


def test_the_memo_forgets_instances_that_are_gone(fake: FakeIncus) -> None:
    memo = AddressMemo()
    Inventory(fake, memo=memo).instances()
    remembered = len(memo)
    fake.remove("icfrec-a", "rec-web")
    Inventory(fake, memo=memo).instances()
    assert len(memo) == remembered - 1
    fake.calls.clear()
    without_leases(fake)
    assert Inventory(fake, memo=memo).instance("icfrec-a", "rec-alt") is not None
    assert "rec-alt" not in state_requests(fake)  # one instance's refresh uses it too


def network_requests(fake: FakeIncus) -> list[tuple[str, ...]]:
    return [tuple(args) for name, *args in fake.calls if name == "get_network"]


def test_a_network_projects_share_is_asked_once_not_per_project(fake: FakeIncus) -> None:
    """Projects without networks of their own (no features.networks) use the default
    project's: its subnets are asked once, whatever the number of projects (each answer
    costs Incus a search of every instance for the network's used_by)."""
    shared = fake.get_network("icfrec-a", "icfbr0")
    fake._networks = {("default", "icfbr0"): shared, ("icfrec-c", "icfbr1"): shared}
    without_leases(fake)
    fake.calls.clear()
    fleet = by_name(Inventory(fake).instances())
    assert addresses(fleet["rec-web"]) and addresses(fleet["rec-alt"])
    asked = network_requests(fake)
    assert ("default", "icfbr0") in asked and len(asked) == len(set(asked))
    assert not [a for a in asked if a[0] in ("icfrec-a", "icfrec-b") and a[1] == "icfbr0"]
    assert ("icfrec-c", "icfbr1") in asked  # its own network, asked of it


def test_when_the_projects_cannot_be_listed_each_project_is_asked(fake: FakeIncus) -> None:
    without_leases(fake)
    fake.fail_on = {"network_projects"}
    fake.calls.clear()
    fleet = by_name(Inventory(fake).instances())
    assert addresses(fleet["rec-web"])
    assert {a[0] for a in network_requests(fake)} >= {"icfrec-a", "icfrec-b"}
