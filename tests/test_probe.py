"""Readiness probes: who is probed is the model's one reachability rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from incus_caddyfile import probe
from incus_caddyfile.labels import KEY_REQUIRE_READY
from incus_caddyfile.model import ROUTABLE_STATUSES, awaits_address, build, probe_target

from .helpers import inst


@pytest.mark.parametrize("status", sorted(ROUTABLE_STATUSES))
def test_every_routable_status_is_probed_and_keeps_its_route(
    status: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A paused (Frozen) instance with require_ready used to be skipped by the probe (which
    tested the literal "Running"), so its route was dropped while it was paused."""
    dialled: list[tuple[str, int]] = []

    def accepts(address: str, port: int, timeout: float = 0.5) -> bool:
        dialled.append((address, port))
        return True

    monkeypatch.setattr(probe, "accepts", accepts)
    instance = inst("web", status=status, **{KEY_REQUIRE_READY: "true"})
    assert probe_target(instance) == ("198.18.0.10", 80)
    [probed] = probe.annotate([instance])
    assert dialled == [("198.18.0.10", 80)] and probed.ready is True
    assert build([probed]).sites[0].host == "web.example.org"
    assert not awaits_address(probed)


def test_instances_that_are_down_or_do_not_ask_are_not_probed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(probe, "accepts", lambda *a, **k: pytest.fail("probed"))
    fleet = [inst("a", status="Stopped", **{KEY_REQUIRE_READY: "true"}), inst("b")]
    assert probe.annotate(fleet) == fleet


def test_a_port_that_does_not_answer_yet_is_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe, "accepts", lambda *a, **k: False)
    [probed] = probe.annotate([inst("web", **{KEY_REQUIRE_READY: "true"})])
    assert probed.ready is False and awaits_address(probed)
    assert build([probed]).sites == ()


ARP = """IP address       HW type     Flags       HW address            Mask     Device
198.18.77.166    0x1         0x2         10:66:6a:e7:d0:83     *        icfbr0
198.18.77.167    0x1         0x0         10:66:6a:e7:d0:84     *        icfbr0
198.18.77.168    0x1         0x2         10:66:6A:E7:D0:85     *        icfbr0
"""


def test_neighbours_are_the_complete_entries_of_a_mac(tmp_path: Path) -> None:
    table = tmp_path / "arp"
    table.write_text(ARP)
    assert probe.neighbours("10:66:6a:e7:d0:83", table) == ["198.18.77.166"]
    assert probe.neighbours("10:66:6a:e7:d0:84", table) == []  # incomplete: never dialled
    assert probe.neighbours("10:66:6a:e7:d0:85", table) == ["198.18.77.168"]
    assert probe.neighbours("10:66:6a:e7:d0:83", tmp_path / "missing") == []
