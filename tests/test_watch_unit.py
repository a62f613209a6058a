"""The parts of watch, each alone: event classification, debounce (with an injected clock),
backoff, the cycle log, the instance cache and the address polls."""

from __future__ import annotations

import io
import json

import pytest

from incus_caddyfile.model import build
from incus_caddyfile.watch.cache import InstanceCache
from incus_caddyfile.watch.cyclelog import Log, site_changes
from incus_caddyfile.watch.polls import AddressPolls
from incus_caddyfile.watch.timing import Backoff, Debouncer, Retry
from incus_caddyfile.watch.triggers import Kind, Trigger, classify

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


def test_after_a_change_the_next_cycle_waits_max() -> None:
    d = Debouncer(0.05, 2.0)
    d.note(0.0)
    assert d.deadline() == pytest.approx(0.05)
    d.fired(0.05, changed=True)  # reloaded Caddy
    d.note(0.3)  # the next change of a burst
    assert d.deadline() == pytest.approx(2.05)
    assert not d.due(2.0) and d.due(2.05)
    d.fired(2.05, changed=False)  # nothing changed: no hold
    d.note(2.1)
    assert d.deadline() == pytest.approx(2.15)


def test_a_burst_of_30_changes_costs_one_reload_per_max() -> None:
    """30 changes 100 ms apart (3 s), each cycle reloading: 2 reloads, not 30."""
    d = Debouncer(0.05, 2.0)
    events = [i * 0.1 for i in range(30)]
    reloads = 0
    now = 0.0
    while now < 10:
        if events and events[0] <= now:
            d.note(events.pop(0))
        if d.due(now):
            d.fired(now, changed=True)
            reloads += 1
        now = round(now + 0.01, 2)
    assert reloads == 3  # at 0.05 s, at 2.05 s, and the tail at 4.05 s


def test_an_isolated_change_after_a_quiet_spell_is_fast() -> None:
    d = Debouncer(0.05, 2.0)
    d.fired(0.0, changed=True)
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
    d = Debouncer(0.05, 2.0)
    d.note(1.0)
    d.hurry(1.0)
    assert d.due(1.0)
    d.fired(1.0, changed=True)
    d.note(1.5)
    d.hurry(1.5)
    assert d.deadline() == pytest.approx(3.0)  # the hold of a burst still applies


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
    assert {k for k in Kind if k.local} == {Kind.FILE, Kind.ADDRESS, Kind.RETRY}
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
    assert polls.deadlines() == [pytest.approx(10.05 + 0.075)]
    assert not polls.expired(("p", "a"), 10.9) and polls.expired(("p", "a"), 11.0)
    polls.drop(("p", "a"))
    assert ("p", "a") not in polls and polls.deadlines() == []


def test_retry_backs_off_until_cleared() -> None:
    retry = Retry(1.0, 3.0)
    assert not retry.due(0.0)
    assert [retry.schedule(0.0) for _ in range(3)] == [1.0, 2.0, 3.0]
    assert retry.due(3.0)
    retry.take()
    assert not retry.due(100.0)
    retry.clear()
    assert retry.schedule(0.0) == 1.0
