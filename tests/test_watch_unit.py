"""The parts of watch, each alone: event classification, debounce (with an injected clock),
backoff, the cycle log, the instance cache, the address polls and the drains."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from incus_caddyfile.model import build
from incus_caddyfile.watch.cache import InstanceCache
from incus_caddyfile.watch.cyclelog import Log, site_changes
from incus_caddyfile.watch.drains import Drains
from incus_caddyfile.watch.polls import AddressPolls
from incus_caddyfile.watch.timing import Backoff, Debouncer, Retry, TokenBucket
from incus_caddyfile.watch.triggers import Kind, Phase, Trigger, classify

from .fake_incus import operation_event
from .helpers import inst


def event(action: str, source: str = "/1.0/instances/web?project=shop", **meta: object) -> dict:
    return {
        "type": "lifecycle",
        "project": "shop",
        "metadata": {"action": action, "source": source, **meta},
    }


@pytest.mark.parametrize(
    "action",
    [
        "created",
        "started",
        "stopped",
        "shutdown",
        "restarted",
        "paused",
        "resumed",
        "updated",
        "deleted",
        "restored",
        "ready",
    ],
)
def test_instance_lifecycle_events_refresh_that_instance(action: str) -> None:
    trigger = Trigger(Kind.INCUS, f"instance-{action}", "shop", "web")
    assert classify(event(f"instance-{action}")) == trigger


def test_rename_carries_the_old_name() -> None:
    trigger = classify(
        event("instance-renamed", "/1.0/instances/new?project=shop", context={"old_name": "old"})
    )
    assert trigger == Trigger(Kind.INCUS, "instance-renamed", "shop", "new", "old")


@pytest.mark.parametrize(
    "action",
    [
        "profile-updated",
        "profile-renamed",
        "profile-deleted",
        "project-created",
        "project-updated",
        "project-deleted",
    ],
)
def test_profile_and_project_events_resync_everything(action: str) -> None:
    trigger = classify(event(action, "/1.0/profiles/caddy-web?project=shop"))
    assert trigger is not None and trigger.full


@pytest.mark.parametrize(
    "action",
    [
        "instance-exec",
        "instance-file-pushed",
        "instance-file-retrieved",
        "instance-console",
        "instance-log-retrieved",
        "instance-snapshot-created",
        "instance-backup-created",
        "instance-metadata-updated",
        "image-created",
        "storage-volume-created",
        "",
    ],
)
def test_noise_triggers_nothing(action: str) -> None:
    assert classify(event(action)) is None


def test_non_lifecycle_messages_are_ignored() -> None:
    assert classify({"type": "logging", "metadata": {"action": "instance-started"}}) is None


def test_project_defaults_from_the_source_query() -> None:
    msg = event("instance-started", "/1.0/instances/web?project=p2")
    del msg["project"]
    assert classify(msg) == Trigger(Kind.INCUS, "instance-started", "p2", "web")
    msg = event("instance-started", "/1.0/instances/web")
    del msg["project"]
    assert classify(msg) == Trigger(Kind.INCUS, "instance-started", "default", "web")


def test_debounce_waits_for_quiet() -> None:
    d = Debouncer(0.05, 0.5)
    assert d.deadline() is None and not d.due(100.0)
    d.note(100.0)
    assert not d.due(100.04)
    assert d.due(100.05)


def test_debounce_is_extended_by_each_event_up_to_max() -> None:
    d = Debouncer(0.05, 0.5)
    t = 10.0
    d.note(t)
    fired_at = None
    for step in range(1, 100):  # an event every 40 ms: never 50 ms of quiet
        now = t + step * 0.04
        if d.due(now):
            fired_at = now
            break
        d.note(now)
    assert fired_at is not None and fired_at == pytest.approx(t + 0.52)
    assert d.deadline() == pytest.approx(t + 0.5)
    d.fired(fired_at, changed=False)
    assert d.deadline() is None


def test_with_a_burst_of_one_reloads_are_max_apart() -> None:
    """--reload-burst 1: the fixed hold of before (two reloads at least MAX apart)."""
    d = Debouncer(0.05, 2.0, burst=1)
    d.note(0.0)
    assert d.deadline() == pytest.approx(0.05)
    d.fired(0.05, changed=True)  # reloaded Caddy
    d.note(0.3)  # the next change of a burst
    assert d.deadline() == pytest.approx(2.05)
    assert not d.due(2.0) and d.due(2.05)
    d.fired(2.05, changed=False)  # nothing changed: no token taken
    d.note(2.1)
    assert d.deadline() == pytest.approx(2.15)


def test_two_back_to_back_changes_are_both_applied_at_once() -> None:
    """A restart or a deploy script's two steps: the second change does not wait."""
    d = Debouncer(0.05, 2.0, burst=2)
    d.note(0.0)
    d.fired(0.05, changed=True)
    d.note(0.3)
    assert d.deadline() == pytest.approx(0.35)
    d.fired(0.35, changed=True)
    d.note(0.6)  # a third change right away: now it is a burst, held for a token
    assert d.deadline() == pytest.approx(0.35 + (1 - 0.15) * 2.0)


def test_the_bucket_refills_one_token_per_period_up_to_its_capacity() -> None:
    bucket = TokenBucket(2, 2.0)
    assert bucket.ready_at() == float("-inf")
    bucket.take(10.0)
    bucket.take(10.0)
    assert bucket.ready_at() == pytest.approx(12.0)
    bucket.take(12.0)  # the token that came back
    assert bucket.ready_at() == pytest.approx(14.0)
    assert bucket._level(100.0) == 2.0  # a quiet spell refills it, never beyond capacity
    assert TokenBucket(1, 0.0).ready_at() == float("-inf")
    with pytest.raises(ValueError):
        TokenBucket(0, 1.0)


def _reloads(d: Debouncer, events: list[float], until: float = 10.0) -> list[float]:
    """Drive the debouncer with a fake clock; when each cycle that reloaded ran."""
    events, at, now = sorted(events), [], 0.0
    while now < until:
        while events and events[0] <= now:
            d.note(events.pop(0))
        if d.due(now):
            d.fired(now, changed=True)
            at.append(now)
        now = round(now + 0.01, 2)
    return at


# The start events of 30 instances started at once in the lab (ms after the first)
LAB_BURST_MS = [0, 250, 266, 386, 491, 523, 670, 679, 679, 729, 1016, 1050, 1131, 1231, 1251,
                1252, 1259, 1283, 1330, 1374, 1437, 1497, 1523, 1731, 1755, 1812, 1846, 1856,
                1909, 1934]  # fmt: skip


def test_a_burst_of_30_starts_costs_three_reloads() -> None:
    at = _reloads(Debouncer(0.05, 2.0, burst=2), [ms / 1000 for ms in LAB_BURST_MS])
    assert at == pytest.approx([0.05, 0.32, 2.05], abs=0.011)  # the last start at 1.934 s


def test_a_sustained_burst_costs_one_reload_per_max_after_the_first_two() -> None:
    """30 changes 100 ms apart (3 s): 2 at once, then one per 2 s, not 30."""
    at = _reloads(Debouncer(0.05, 2.0, burst=2), [i * 0.1 for i in range(30)])
    assert at == pytest.approx([0.05, 0.15, 2.05, 4.05], abs=0.011)
    at = _reloads(Debouncer(0.05, 2.0, burst=1), [i * 0.1 for i in range(30)])
    assert at == pytest.approx([0.05, 2.05, 4.05], abs=0.011)  # the fixed hold, for comparison


def test_an_isolated_change_after_a_quiet_spell_is_fast() -> None:
    d = Debouncer(0.05, 2.0)
    d.fired(0.0, changed=True)
    d.fired(0.1, changed=True)
    d.note(5.0)
    assert d.deadline() == pytest.approx(5.05)


def test_debounce_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError):
        Debouncer(1.0, 0.5)


def test_backoff_doubles_to_a_cap_and_resets() -> None:
    b = Backoff(0.5, 3.0)
    assert [b.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    b.reset()
    assert b.next() == 0.5


def test_site_changes() -> None:
    before = build([inst("a", host="a.example.org"), inst("b", host="b.example.org")])
    after = build([inst("a", host="a.example.org", port="81"), inst("c", host="c.example.org")])
    assert site_changes(before, after) == {
        "added": ["c.example.org"],
        "removed": ["b.example.org"],
        "changed": ["a.example.org"],
    }
    assert site_changes(None, before)["added"] == ["a.example.org", "b.example.org"]


def test_json_log_is_one_object_per_line() -> None:
    out = io.StringIO()
    Log("json", out)("cycle", "sites +1", added=["a"])
    record = json.loads(out.getvalue())
    assert record["event"] == "cycle" and record["added"] == ["a"]
    out = io.StringIO()
    Log("text", out)("cycle", "sites +1")
    assert out.getvalue() == "incus-caddyfile: sites +1\n"


def test_hurry_applies_an_awaited_change_without_quiet_time() -> None:
    d = Debouncer(0.05, 2.0, burst=1)
    d.note(1.0)
    d.hurry(1.0)
    assert d.due(1.0)
    d.fired(1.0, changed=True)
    d.note(1.5)
    d.hurry(1.5)
    assert d.deadline() == pytest.approx(3.0)  # the bucket still applies


def test_a_rename_refreshes_the_new_and_the_old_name() -> None:
    """Incus renames only stopped instances, so no route shows it; the cache must still
    drop the old name (else a later start of another instance under it would be stale)."""
    cache = InstanceCache(lambda api: [], lambda api, p, n: None)
    cache.instances, cache.full = {}, False  # as after the first listing
    trigger = classify(
        event("instance-renamed", "/1.0/instances/new?project=shop", context={"old_name": "old"})
    )
    assert trigger is not None
    cache.want(trigger)
    assert cache.dirty == {("shop", "new"), ("shop", "old")}
    assert not cache.full


def test_cache_lists_once_then_fetches_only_what_events_name() -> None:
    fleet = {("p", "a"): inst("a", project="p"), ("p", "b"): inst("b", project="p")}
    fetched: list[tuple[str, str]] = []

    def fetch(api: object, project: str, name: str) -> object:
        fetched.append((project, name))
        return fleet.get((project, name))

    cache = InstanceCache(lambda api: list(fleet.values()), fetch)  # type: ignore[arg-type]
    cache.want(Trigger(Kind.START))
    assert len(cache.refresh(None)) == 2 and fetched == []  # type: ignore[arg-type]
    del fleet[("p", "b")]
    cache.want(Trigger(Kind.INCUS, "instance-deleted", "p", "b"))
    cache.want(Trigger(Kind.FILE, detail="/etc/caddy/snippets"))  # local: nothing to fetch
    assert cache.refresh(None) == [] and fetched == [("p", "b")]  # type: ignore[arg-type]
    assert [i.name for i in cache.listing()] == ["a"]
    cache.want(Trigger(Kind.INCUS, "profile-updated"))
    assert cache.full


def test_trigger_kinds_are_local_or_fetch() -> None:
    assert {k for k in Kind if k.local} == {
        Kind.FILE, Kind.ADDRESS, Kind.RETRY, Kind.OPERATION, Kind.WARM, Kind.CADDY_CHECK,
    }  # fmt: skip
    assert Trigger(Kind.TIMER).full and not Trigger(Kind.FILE, detail="x").full
    assert str(Trigger(Kind.INCUS, "instance-started", "p", "a")) == "instance-started p/a"
    assert str(Trigger(Kind.FILE, detail="/t.j2")) == "file /t.j2"


def test_address_polls_back_off_and_expire() -> None:
    polls = AddressPolls(first=0.05, timeout=1.0)
    polls.start(("p", "a"), 10.0)
    polls.start(("p", "a"), 10.5)  # already polled: unchanged
    assert polls.deadlines() == [pytest.approx(10.05)]
    assert polls.due(10.04) == [] and polls.due(10.05) == [("p", "a")]
    polls.again(("p", "a"), 10.05)
    assert polls.deadlines() == [pytest.approx(10.05 + 0.06)]  # 1.2x
    assert not polls.expired(("p", "a"), 10.9) and polls.expired(("p", "a"), 11.0)
    polls.drop(("p", "a"))
    assert ("p", "a") not in polls and polls.deadlines() == []


def test_a_poll_probes_only_the_port_once_the_address_is_there() -> None:
    polls = AddressPolls(first=0.02, timeout=1.0)
    polls.start(("p", "a"), 10.0)
    assert polls.port(("p", "a")) is None
    polls.probe_port(("p", "a"), ("198.18.0.1", 80), 10.02)
    assert polls.port(("p", "a")) == ("198.18.0.1", 80)
    assert polls.due(10.02) == [("p", "a")]  # at once, then 5 ms, 6 ms ...
    polls.again(("p", "a"), 10.02)
    assert polls.deadlines() == [pytest.approx(10.025)]
    polls.again(("p", "a"), 10.025)
    assert polls.deadlines() == [pytest.approx(10.031)]
    assert polls.expired(("p", "a"), 11.0)  # the same deadline as the address phase


# ---- operations: drain before stop


def op(description: str, status: str, project: str = "p", name: str = "web") -> dict[str, Any]:
    return operation_event(project, name, description, status)


@pytest.mark.parametrize(
    ("description", "status", "expected"),
    [
        ("Stopping instance", "Pending", ("stop", Phase.BEGUN)),
        ("Stopping instance", "Running", ("stop", Phase.BEGUN)),
        ("Stopping instance", "Success", ("stop", Phase.DONE)),
        ("Stopping instance", "Failure", ("stop", Phase.FAILED)),
        ("Restarting instance", "Running", ("restart", Phase.BEGUN)),
        ("Restarting instance", "Cancelled", ("restart", Phase.FAILED)),
        ("Deleting instance", "Running", ("delete", Phase.BEGUN)),
        ("Starting instance", "Running", None),
        ("Executing command", "Running", None),
        ("Snapshotting instance", "Running", None),
    ],
)
def test_operation_events_that_drain(
    description: str, status: str, expected: tuple[str, Phase] | None
) -> None:
    trigger = classify(op(description, status))
    if expected is None:
        assert trigger is None
        return
    assert trigger is not None and (trigger.action, trigger.phase) == expected
    assert (trigger.kind, trigger.project, trigger.instance) == (Kind.OPERATION, "p", "web")
    assert str(trigger) == f"{expected[0]}-{expected[1].value} p/web"


def test_an_operation_on_several_instances_or_none_is_not_followed() -> None:
    event = op("Stopping instance", "Running")
    event["metadata"]["resources"]["instances"].append("/1.0/instances/b?project=p")
    assert classify(event) is None
    event["metadata"]["resources"] = {}
    assert classify(event) is None
    event = op("Stopping instance", "Running")
    event["metadata"]["status_code"] = "103"  # not the shape Incus sends
    assert classify(event) is None


def trig(verb: str, phase: Phase, name: str = "web") -> Trigger:
    return Trigger(Kind.OPERATION, verb, "p", name, phase=phase)


def test_a_stop_drains_until_it_is_over_or_failed() -> None:
    drains = Drains(warmup_timeout=30.0)
    assert drains.note(trig("stop", Phase.BEGUN), 1.0)
    assert not drains.note(trig("stop", Phase.BEGUN), 1.0)  # Pending and Running: once
    assert drains.keys() == {("p", "web")} and not drains.warming()
    assert drains.note(trig("stop", Phase.DONE), 3.0) and not drains.keys()
    drains.note(trig("delete", Phase.BEGUN), 4.0)
    assert drains.note(trig("delete", Phase.FAILED), 4.5) and not drains.keys()


def test_a_restart_stays_drained_until_its_port_accepts() -> None:
    drains = Drains(warmup_timeout=30.0)
    drains.note(trig("restart", Phase.BEGUN), 1.0)
    assert drains.note(trig("restart", Phase.DONE), 4.0)  # drained still, now warming
    assert drains.warming() == [("p", "web")]
    assert drains.deadline() == pytest.approx(34.0)
    assert drains.end(("p", "web")) and not drains.keys()


def test_a_started_instance_warms_up_and_gives_up_after_the_timeout() -> None:
    drains = Drains(warmup_timeout=30.0)
    assert drains.note(Trigger(Kind.INCUS, "instance-started", "p", "web"), 1.0)
    assert not drains.note(Trigger(Kind.INCUS, "instance-updated", "p", "web"), 1.0)
    assert drains.expire(30.9) == [] and drains.expire(31.0) == [("p", "web")]
    assert not drains.keys()


def test_missed_events_clear_the_drains_and_off_means_off() -> None:
    drains = Drains(warmup_timeout=30.0)
    drains.note(trig("stop", Phase.BEGUN), 1.0)
    assert drains.clear() and not drains.keys() and not drains.clear()
    off = Drains(warmup_timeout=30.0, enabled=False)
    assert not off.note(trig("stop", Phase.BEGUN), 1.0) and not off.keys()


def test_an_urgent_cycle_does_not_wait_for_a_token_but_takes_one() -> None:
    d = Debouncer(0.05, 2.0, burst=1)
    d.note(0.0)
    d.fired(0.05, changed=True)  # the bucket is empty until 2.05
    d.urge(0.5)
    assert d.due(0.5)
    d.fired(0.5, changed=True)
    d.note(0.6)
    assert d.deadline() == pytest.approx(0.5 + (1 + 0.775) * 2.0)  # in debt: the next waits


def test_retry_backs_off_until_cleared() -> None:
    retry = Retry(1.0, 3.0)
    assert not retry.due(0.0)
    assert [retry.schedule(0.0) for _ in range(3)] == [1.0, 2.0, 3.0]
    assert retry.due(3.0)
    retry.take()
    assert not retry.due(100.0)
    retry.clear()
    assert retry.schedule(0.0) == 1.0
