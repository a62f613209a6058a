"""`render` keeps the addresses of NICs by boot beside its output (lastknown), so that after an
incusd restart empties the lease tables the next run asks no state of instances still running
on the boot it saw."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from incus_caddyfile import lastknown, pipeline, targets
from incus_caddyfile.destinations import LocalFile
from incus_caddyfile.settings import Settings
from incus_caddyfile.targets import Target

from .fake_incus import FakeIncus
from .fakes import FakeCaddy


def without_leases(fake: FakeIncus) -> None:
    for project in ("icfrec-a", "icfrec-b", "icfrec-c"):
        for network in ("icfbr0", "icfbr1"):
            fake.set_leases(project, network, [])


def state_requests(fake: FakeIncus) -> set[str]:
    singles = {args[1] for name, *args in fake.calls if name == "instance_state"}
    return singles | {name for batch in fake.state_batches for _, name in batch}


@pytest.fixture
def setup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[FakeIncus, Settings]:
    fake = FakeIncus.from_recording()
    out = tmp_path / "Caddyfile"
    monkeypatch.setattr(pipeline, "connect", lambda settings: fake)
    edge = Target(LocalFile(out), FakeCaddy())
    monkeypatch.setattr(targets, "all_for_settings", lambda settings, api=None: [edge])
    return fake, Settings(scheme="http", output=out)


def render(fake: FakeIncus, settings: Settings) -> str:
    fake.calls.clear()
    fake.state_batches.clear()
    report = pipeline.run(settings)
    assert report.error is None, report.message
    assert settings.output is not None
    return settings.output.read_text()


def test_after_the_leases_are_lost_render_asks_no_state_of_instances_on_the_same_boot(
    setup: tuple[FakeIncus, Settings],
) -> None:
    fake, settings = setup
    first = render(fake, settings)
    assert settings.output is not None
    kept = json.loads(lastknown.state_path(settings.output).read_text())["memo"]
    assert "icfrec-a/rec-web/eth0" in kept
    without_leases(fake)
    assert render(fake, settings) == first
    assert state_requests(fake) <= {"rec-ready"}  # require_ready always asks its own

    # started again (a new host-side device): asked; its new address routed
    fake.set_config("icfrec-a", "rec-web", "volatile.eth0.host_name", "vethrestarted")
    fake.set_state("icfrec-a", "rec-web", {"network": {}})
    text = render(fake, settings)
    assert "rec-web" in state_requests(fake)
    assert text != first  # rec-web has no address now: its host is no longer routed to it


def test_a_memo_address_outside_the_managed_network_is_not_taken(
    setup: tuple[FakeIncus, Settings],
) -> None:
    """The file is checked like an instance's own state: an address written into it that is
    not inside the NIC's managed subnet (or is the network's own) never becomes a route."""
    fake, settings = setup
    first = render(fake, settings)
    assert settings.output is not None
    state = lastknown.state_path(settings.output)
    doc = json.loads(state.read_text())
    web = doc["memo"]["icfrec-a/rec-web/eth0"]
    web["addresses"] = ["198.18.77.1"]  # the bridge's own address: the host
    state.write_text(json.dumps(doc))
    without_leases(fake)
    fake.set_state("icfrec-a", "rec-web", {"network": {}})  # its state has nothing either
    text = render(fake, settings)
    assert "198.18.77.1:" not in text
    assert text != first


@pytest.mark.parametrize("content", ["{not json", '{"version": 1, "output": "/elsewhere"}', ""])
def test_an_unusable_memo_only_costs_state_requests(
    setup: tuple[FakeIncus, Settings], content: str
) -> None:
    fake, settings = setup
    first = render(fake, settings)
    assert settings.output is not None
    lastknown.state_path(settings.output).write_text(content)
    without_leases(fake)
    assert render(fake, settings) == first
    assert "rec-web" in state_requests(fake)


def test_a_nic_whose_host_side_name_is_pinned_is_never_taken_from_the_memo(
    setup: tuple[FakeIncus, Settings],
) -> None:
    """With the NIC's `host_name` set by the operator, Incus gives its host-side device the
    same name at every start: the name no longer tells one boot from the next, so an
    address found before a restart could be another instance's by now. Its state is asked."""
    fake, settings = setup
    raw = fake.recorded("icfrec-a", "rec-web")
    state = fake.instance_state("icfrec-a", "rec-web")
    raw["expanded_devices"]["eth0"]["host_name"] = "vethpinned"
    raw["expanded_config"]["volatile.eth0.host_name"] = "vethpinned"
    fake.add(raw, state)
    first = render(fake, settings)
    assert settings.output is not None
    kept = json.loads(lastknown.state_path(settings.output).read_text())["memo"]
    assert "icfrec-a/rec-web/eth0" not in kept and kept  # the others are kept
    without_leases(fake)
    assert render(fake, settings) == first
    assert "rec-web" in state_requests(fake)
