"""watch: keep the Caddyfile and Caddy true to Incus for as long as the process runs.

Triggers (Incus lifecycle events, file changes, timers, SIGHUP) only say *that* something may
have changed; the data always comes from Incus. A single-instance event refreshes only that
instance (a few requests, whatever the fleet size) and the whole Caddyfile is re-rendered from
the cached listing; profile and project events, reconnects, SIGHUP and a periodic timer do a
full resync. Everything runs on one thread that owns the state; the event stream, the file
watcher and the signal handlers only put items on a queue.

`Watcher` is only the loop; its parts each do one job: `IncusLink` (connection and event
stream), `InstanceCache` (what to fetch), `Drains` (who is out of its pool: the model's
`draining`), `AddressPolls`, `Debouncer` (with its reload `TokenBucket`) and `Retry` (when),
`CycleLog` (what the operator reads), `FileWatcher` and `install_signals` (inputs).
"""

from __future__ import annotations

import dataclasses
import queue
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from .. import pipeline, probe, targets
from ..incus import IncusApi, IncusError, connect
from ..inventory import AddressMemo, Bounds, LeaseOutage
from ..model import (
    Instance,
    Model,
    awaits_address,
    is_unknown,
    is_up,
    needs_own_address,
    pool_mates,
    reach_target,
    wants_address,
)
from ..pipeline import Report, RunMode, Status
from ..settings import Settings
from .cache import InstanceCache
from .cyclelog import CycleLog, Log, site_changes
from .drains import Drains
from .inputs import FileWatcher, install_signals
from .link import IncusLink
from .observer import Observer, Unobserved
from .polls import AddressPolls, Key
from .timing import Debouncer, Retry
from .triggers import Kind, Phase, Trigger, classify


@dataclass(frozen=True)
class WatchOptions:
    debounce_min: float = 0.05
    debounce_max: float = 2.0
    reload_burst: int = 2
    reload_gap: float = 0.2  # between the end of a reload and the next cycle (see Debouncer)
    resync_interval: float = 300.0
    address_timeout: float = 30.0
    address_poll_first: float = 0.01
    drain: bool = True  # take members out of their pools while they stop, and warm them up
    reconnect_first: float = 0.5
    reconnect_cap: float = 30.0
    retry_first: float = 1.0  # a cycle that failed to write or reload is run again
    retry_cap: float = 5.0  # a retry is a render from the cache: cheap; converge fast
    # How often to ask Caddy whether it still runs the current file (a Caddy restarted with
    # another config sends no event); a render from the cache and one /adapt + GET /config.
    caddy_check_interval: float = 10.0
    # While an instance is unknown (its cluster member unreachable: no event says when it is
    # back), list everything again this often, so that its return is seen.
    unknown_recheck: float = 10.0
    listing_retry_first: float = 5.0
    listing_retry_cap: float = 30.0
    log_format: str = "text"


class Signal(Enum):
    """Queue items that are not triggers."""

    STOP = "stop"
    HUP = "hup"
    CLOSED = "closed"  # the Incus event stream ended


# Failures that may pass by themselves: a read-only or full disk, Caddy down or restarting.
RETRIED = frozenset({Status.WRITE_FAILED, Status.RELOAD_FAILED, Status.CADDY_REJECTED})

MakeTarget = Callable[[Settings, IncusApi | None], targets.Target | None]
MakeTargets = Callable[[Settings, IncusApi | None], list[targets.Target]]
PORT_PROBE_TIMEOUT = 0.2  # the address is configured: a closed port answers at once
# A neighbour-table candidate may not be configured yet: its SYN is dropped, and the loop
# waits this long for nothing (on a bridge, an answer takes well under a millisecond).
NEARBY_TIMEOUT = 0.005
# With the neighbour table to look at, the first live-state request of a poll waits this
# long: while it runs (up to ~200 ms on a busy host) the loop looks nowhere else.
NEARBY_FIRST_ASK = 0.5


class Watcher:
    """The watch loop. `connect` makes an Incus client; `load_settings` re-reads settings;
    `make_targets` names where the files go and which Caddy runs each (`make_target`: a
    single one); `clock` is injectable, and `step` runs one iteration, so the loop is testable
    without threads or sleeps.

    Each target is kept current on its own: a target whose write or reload failed is retried
    with its own backoff, and asked whether its Caddy runs the file (at start, after a
    failure, every `caddy_check_interval`), while the others, current, cost nothing."""

    def __init__(
        self,
        load_settings: Callable[[], Settings],
        options: WatchOptions,
        connect: Callable[[Settings], IncusApi] = connect,
        clock: Callable[[], float] = time.monotonic,
        log: Log | None = None,
        make_target: MakeTarget | None = None,
        observer: Observer | None = None,
        make_targets: MakeTargets = targets.all_for_settings,
    ) -> None:
        self.load_settings = load_settings
        self.settings = load_settings()
        self.options = options
        self.clock = clock
        self.log = log or Log(options.log_format)
        self.cycle_log = CycleLog(self.log)
        if make_target is not None:
            one = make_target
            make_targets = lambda settings, api: [t for t in [one(settings, api)] if t]  # noqa: E731
        self.make_targets = make_targets
        self.observer: Observer = observer or Unobserved()  # what `watch --listen` serves
        # SimpleQueue.put is reentrant: safe to call from the signal handlers.
        self.queue: queue.SimpleQueue[Trigger | Signal] = queue.SimpleQueue()
        self.debounce = Debouncer(
            options.debounce_min, options.debounce_max, options.reload_burst, options.reload_gap
        )
        self.link = IncusLink(connect, options.reconnect_first, options.reconnect_cap)
        self.bounds: Bounds = {}  # managed networks' subnets, for single-instance refreshes
        self.outage = LeaseOutage()  # leases calls failing (a cluster member down)
        self.notes: list[str] = []  # what this cycle's refresh had to do without
        # Addresses of NICs up since they were found: a resync after an incusd restart (lease
        # tables empty) asks no live state for them.
        self.memo = AddressMemo()
        self.cache = InstanceCache(
            # the projects the policy leaves out cost nothing
            lambda api: pipeline.collect(
                api, self.settings.policy, notes=self.notes, outage=self.outage, memo=self.memo
            ),
            self._fetch,
        )
        self.polls = AddressPolls(options.address_poll_first, options.address_timeout)
        self.drains = Drains(options.address_timeout, enabled=options.drain)
        self.retries: dict[str, Retry] = {}  # by target: a failed write or reload, again
        # A full listing that timed out is tried again after 5, 10, 20, 30 s; meanwhile
        # cycles refresh the instances with events on their own.
        self.listing_retry = Retry(options.listing_retry_first, options.listing_retry_cap)
        self.triggers: list[Trigger] = []
        self.waited: dict[str, dict[str, Any]] = {}  # polls that ended: the next cycle's log
        self.model: Model | None = None  # what the files hold
        # Targets whose Caddy runs the file, as far as we know: the others are asked what
        # they run (at start, after failures, on resync and every caddy_check_interval).
        self.verified: set[str] = set()
        self.target_names: list[str] = []  # of the last cycle
        self.next_resync = 0.0
        self.next_caddy_check = 0.0
        self.next_unknown_check = 0.0
        self.unknowns = False  # the cache holds instances in Error (see _recheck_unknown)
        self.cycles = 0

    # ---- inputs (any thread) ----
    def on_event(self, event: dict[str, Any]) -> None:
        trigger = classify(event)
        if trigger is not None:
            self.queue.put(trigger)

    def on_close(self) -> None:
        self.queue.put(Signal.CLOSED)

    def on_file(self, path: str) -> None:
        self.queue.put(Trigger(Kind.FILE, detail=path))

    def stop(self) -> None:
        self.queue.put(Signal.STOP)

    def hup(self) -> None:
        self.queue.put(Signal.HUP)

    # ---- the loop (one thread) ----
    def run(self) -> int:
        install_signals(self.stop, self.hup)
        files = FileWatcher(self.settings, self.on_file)
        files.start()
        self.begin()
        try:
            while (item := self._next_item()) is not Signal.STOP:
                self.step(item)
        finally:
            self.link.close()
            files.stop()
        self.log("stop", "stopped", cycles=self.cycles)
        return 0

    def begin(self) -> None:
        if self.settings.targets:
            names = [t.label for t in self.settings.targets]
            self.log("start", f"watching Incus events for {len(names)} targets", targets=names)
        else:
            self.log("start", "watching Incus events", output=str(self.settings.output))
        self.triggers.append(Trigger(Kind.START))

    def step(self, item: Trigger | Signal | None = None) -> None:
        """One iteration: take an item (None: a timer woke us), run what is due."""
        self._handle(item)
        self._run_timers()

    def next_deadline(self) -> float | None:
        deadlines = [
            self.debounce.deadline(),
            self.link.retry.at,
            *(r.at for r in self.retries.values()),
            None if self.cache.dirty else self.listing_retry.at,  # (dirty: a cycle is due)
            self.next_resync if self.link.connected else None,
            self.next_caddy_check if self.model is not None else None,
            self.drains.deadline(),
            self.next_unknown_check if self.unknowns and self.link.connected else None,
            *self.polls.deadlines(),
        ]
        return min((d for d in deadlines if d is not None), default=None)

    def _next_item(self) -> Trigger | Signal | None:
        deadline = self.next_deadline()
        timeout = None if deadline is None else max(0.0, deadline - self.clock())
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _drain(self) -> None:
        """Handle what is already queued, without waiting (a stop request is put back)."""
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return
            if item is Signal.STOP:
                self.queue.put(item)
                return
            self._handle(item)

    def _handle(self, item: Trigger | Signal | None) -> None:
        if item is Signal.CLOSED:
            self._disconnected("the Incus event stream ended")
        elif item is Signal.HUP:
            self._want(Trigger(Kind.SIGNAL))
        elif isinstance(item, Trigger):
            if item.project and not self.settings.policy.considers(item.project):
                return  # a project the settings leave out: nothing of it is rendered
            self._want(item)

    def _want(self, trigger: Trigger) -> None:
        """Record what a cycle must refresh, and start or extend the debounce window."""
        self.triggers.append(trigger)
        self.cache.want(trigger)
        now = self.clock()
        self.debounce.note(now)
        self.observer.noted(trigger, now)
        if trigger.kind is Kind.RECONNECT:
            self.drains.clear()  # operation events were missed
        if trigger.full:
            self.bounds.clear()  # a network may have changed
        if trigger.action.startswith("network-") or trigger.kind is Kind.SIGNAL:
            self.memo.clear()  # its subnet may have changed; SIGHUP: forget everything
        if self.drains.note(trigger, now):
            key = (trigger.project, trigger.instance)
            if trigger.phase is Phase.BEGUN:
                self.debounce.urge(now)  # about to go: take it out now, whatever the bucket
            elif key in self.drains:
                self.polls.start(key, now)  # back: warming until its port accepts

    def _run_timers(self) -> None:
        now = self.clock()
        if self.link.due(now):
            self._reconnect(now)
        if self.link.connected and now >= self.next_resync:
            self.next_resync = now + self.options.resync_interval
            if self.cache.instances is not None:  # the first listing is the start cycle's own
                self.verified.clear()
                self._want(Trigger(Kind.TIMER))
        self._recheck_unknown(now)
        if self.listing_retry.due(now) and not self.cache.dirty:  # changes first: fast
            self.listing_retry.take()
            self._want(Trigger(Kind.TIMER, detail="listing retry"))
        self._due_polls(now)
        for key in self.drains.expire(now):
            self._want(Trigger(Kind.WARM, project=key[0], instance=key[1], detail="timeout"))
        for name, retry in sorted(self.retries.items()):
            if retry.due(now):
                retry.take()
                self.verified.discard(name)
                several = len(self.target_names) > 1
                self._want(Trigger(Kind.RETRY, detail=name if several else ""))
        if self.model is not None and now >= self.next_caddy_check:
            self.next_caddy_check = now + self.options.caddy_check_interval
            if not self.triggers:  # a cycle already due verifies through its own reload
                self.verified.clear()
                self._want(Trigger(Kind.CADDY_CHECK))
        self._drain()  # events that queued up meanwhile (a slow poll) join this cycle
        if self.debounce.due(self.clock()):
            self.debounce.fired(self.clock(), changed=self._cycle())

    def _recheck_unknown(self, now: float) -> None:
        """Instances Incus could not tell about (status Error, keeping their last route):
        a full listing every `unknown_recheck` seconds until they are known again."""
        if self.unknowns and self.link.connected and now >= self.next_unknown_check:
            self.next_unknown_check = now + self.options.unknown_recheck
            self._want(Trigger(Kind.TIMER, detail="unknown instances"))

    # ---- Incus ----
    def _reconnect(self, now: float) -> None:
        failure = self.link.open(self.settings, self.on_event, self.on_close, now)
        if failure is not None:
            self.log("incus", failure)
            self.observer.disconnected(failure, now)
            return
        self.observer.connected(now)
        self.next_resync = now + self.options.resync_interval
        if self.cache.instances is not None:
            self.log("incus", "reconnected to Incus; full resync")
        self.verified.clear()
        self._want(Trigger(Kind.RECONNECT))

    def _disconnected(self, why: str) -> None:
        delay = self.link.lost(self.clock())
        if delay is None:
            return
        self.cache.missed_events()  # re-list everything once back
        self.observer.disconnected(why, self.clock())
        self.log("incus", f"{why}; keeping the last good Caddyfile, reconnecting in {delay:.1f} s")

    def _due_polls(self, now: float) -> None:
        """Instances that are up but not reachable yet (no address, or a port that must
        accept first): poll each when its backoff says so; when it is reachable, apply that
        now (no quiet wait), as far as the reload bucket allows."""
        client = self.link.client
        if not self.link.connected or client is None:
            return
        for key in self.polls.due(now):
            target = self.polls.port(key)
            if target is not None:
                self._poll_port(key, target)
                continue
            try:
                self._poll_incus(client, key)
            except IncusError as exc:
                self._disconnected(str(exc))
                return

    def _poll_incus(self, client: IncusApi, key: Key) -> None:
        """The address phase: fetch the instance (its own addresses when its port is to be
        probed, so that nothing dials an address it has not configured yet: then only its
        live state, one request, when its NICs are known)."""
        warming = key in self.drains
        known = self.cache.get(key)
        if warming and known is not None and not pool_mates(self.cache.listing(), known):
            self.drains.end(key)  # alone on its hosts: the model keeps it anyway (no change)
            warming = False
            if not awaits_address(known):  # nothing else to wait for (the event's own cycle
                self.polls.drop(key)  # refreshes it, and polls again if it must)
                return
        quick = known is not None and not warming and needs_own_address(known)
        if quick and known is not None:
            self.polls.polled(key, incus=False)
            found = pipeline.nearby(client, known, self.bounds, NEARBY_TIMEOUT)
            if found is not None:
                self.cache.put(key, found)
                return self._reached(key, found)
            if not self.polls.asks(key, self.clock()):
                return self._again(key, known, asked=False)
        self.polls.polled(key, incus=True)
        if known and (warming or needs_own_address(known)) and any(n.interface for n in known.nics):
            inst = pipeline.own_addresses(client, known, self.bounds)
        else:
            inst = pipeline.fetch(
                client, *key, own=warming, bounds=self.bounds, notes=self.notes,
                outage=self.outage,
            )  # fmt: skip
        self.cache.put(key, inst)
        if inst is None or not wants_address(inst):
            return self._reached(key, inst)  # gone or down: nothing to wait for
        target = reach_target(inst)
        if target is None:  # its address is not there yet
            return self._again(key, inst)
        if inst.ready or not (warming or needs_own_address(inst)):
            return self._reached(key, inst)
        self.polls.probe_port(key, target, self.clock())

    def _poll_port(self, key: Key, target: tuple[str, int]) -> None:
        """The port phase: the instance has configured its address, so a connect to it is
        safe and cheap (no Incus request); until it accepts."""
        self.polls.polled(key, incus=False)
        if probe.accepts(*target, timeout=PORT_PROBE_TIMEOUT):
            inst = self.cache.get(key)
            if inst is not None and reach_target(inst) == target and needs_own_address(inst):
                self.cache.put(key, dataclasses.replace(inst, ready=True))
            self._reached(key, inst)
        else:
            self._again(key, self.cache.get(key))

    def _again(self, key: Key, inst: Instance | None, asked: bool = True) -> None:
        """Not reached yet: try again later (`asked`: an Incus request was just made). An
        instance that must answer on its own address is looked for in the host's neighbour
        table between Incus requests, which costs none (see `pipeline.nearby`)."""
        if self.polls.expired(key, self.clock()):
            self._reached(key, inst, gave_up=True)  # let it in: Caddy's retries cover it
        else:
            quick = inst is not None and key not in self.drains and needs_own_address(inst)
            self.polls.again(key, self.clock(), asked=asked, quick=quick)

    def _reached(self, key: Key, inst: Instance | None, gave_up: bool = False) -> None:
        """The poll is over: the route can follow (its address, its open port, its return
        to its pools), or it never will (gone, down, timed out)."""
        waited = self.polls.drop(key, self.clock())
        back = self.drains.end(key)
        if gave_up and not back:
            return  # still without its address: nothing changed
        if waited is not None:
            self.waited[f"{key[0]}/{key[1]}"] = waited.as_log()
        kind = Kind.WARM if back else Kind.ADDRESS
        self._want(Trigger(kind, project=key[0], instance=key[1]))
        self.debounce.hurry(self.clock())

    def _fetch(self, client: IncusApi, project: str, name: str) -> Instance | None:
        """One instance for the cache. One that was down and must answer on its own
        address is not asked its live state here when the host's neighbour table will tell
        sooner (its bridge is on this host): the poll looks there first, and the cycle does
        not wait for the slowest Incus request (~200 ms on a busy host) while its port
        opens."""
        known = self.cache.get((project, name))
        just_up = probe.bridged_here if known is not None and not is_up(known) else None
        return pipeline.fetch(
            client, project, name, bounds=self.bounds, notes=self.notes, outage=self.outage,
            just_up=just_up, memo=self.memo,
        )  # fmt: skip

    @staticmethod
    def _bridged(inst: Instance) -> bool:
        return any(n.hwaddr and probe.bridged_here(n.network) for n in inst.nics)

    def _poll_waiting(self, instances: Iterable[Instance]) -> None:
        """Started instances still without an address (or open port): poll them, from 10 ms
        with backoff, instead of sleeping; the route appears when the address does. One
        whose own address the host's neighbour table can tell is looked for there first;
        its first Incus request waits NEARBY_FIRST_ASK."""
        for inst in instances:
            if awaits_address(inst) and self.settings.policy.considers(inst.project):
                first_ask = (
                    NEARBY_FIRST_ASK if needs_own_address(inst) and self._bridged(inst) else None
                )
                self.polls.start((inst.project, inst.name), self.clock(), first_ask)

    # ---- one cycle ----
    def _cycle(self) -> bool:
        """Refresh, render, write, reload. True when the file was written or Caddy reloaded."""
        client = self.link.client
        if not self.link.connected or client is None:
            return False  # keep the last good file; the reconnect will resync
        triggers, self.triggers = self.triggers, []
        files = [Path(t.detail) for t in triggers if t.kind is Kind.FILE]
        if files:
            self._reload_settings()
        started = self.clock()
        requests_before = client.requests
        try:
            # (adds to self.notes) A full listing that timed out waits for its retry.
            fetched = self.cache.refresh(client, full_due=self.listing_retry.at is None)
            refreshed = self.clock() - started
            self._late_listing()
        except IncusError as exc:
            self.triggers = triggers + self.triggers  # they still explain the next cycle
            self._disconnected(str(exc))
            self.observer.cycle(None, triggers, {}, self.clock() - started, [], self.clock())
            return False
        self._poll_waiting(fetched)
        mode = RunMode(
            # a snippet or site file changed: the Caddyfile's bytes may not, Caddy's must
            force_reload=any(self._imported(f) for f in files),
        )
        edges = self.make_targets(self.settings, client)
        self.target_names = [t.name for t in edges]
        unverified = {t.name for t in edges if t.name not in self.verified}
        report = pipeline.apply_all(
            self.settings, self.cache.listing(), edges, mode, self.drains.keys(), unverified
        )
        report.warnings[:0], self.notes[:] = self.notes, []
        self._after(report, triggers, started, client.requests - requests_before, refreshed)
        return report.written or report.reloaded

    def _after(
        self,
        report: Report,
        triggers: list[Trigger],
        started: float,
        requests: int,
        refreshed: float = 0.0,
    ) -> None:
        """Bookkeeping and the log after a cycle; `refreshed`: the seconds its Incus
        requests took."""
        first = self.model is None
        self.next_caddy_check = self.clock() + self.options.caddy_check_interval
        unknowns = any(is_unknown(i) for i in self.cache.listing())
        if unknowns and not self.unknowns:
            self.next_unknown_check = self.clock() + self.options.unknown_recheck
        self.unknowns = unknowns
        changes = site_changes(self.model, report.model) if report.model else {}
        if report.error in (None, Status.RELOAD_FAILED, Status.PARTIAL):
            self.model = report.model  # the file (of a target at least) holds this model
        for edge in report.by_target():
            self._after_target(edge)
        for gone in self.retries.keys() - set(self.target_names):
            del self.retries[gone]  # a target the settings no longer name
        duration = self.clock() - started
        quiet = all(t.kind is Kind.CADDY_CHECK for t in triggers) and not (
            report.error or report.written or report.reloaded or report.warnings
        )
        if quiet:
            return  # Caddy runs the current file: nothing to tell, every 10 s
        self.cycles += 1
        steps = {"incus": refreshed, **report.steps}
        waited, self.waited = self.waited, {}
        self.cycle_log.cycle(
            report, triggers, changes, duration, requests, first=first, steps=steps, waited=waited
        )
        self.observer.cycle(report, triggers, changes, duration, self.cache.listing(), self.clock())

    def _late_listing(self) -> None:
        """Say what the refresh had to do without: a full listing that timed out (retried
        with backoff, the cached instances rendered meanwhile), instances unanswered."""
        self.notes.extend(self.cache.unanswered)
        if self.cache.late is not None:
            # Leases, like the listing, are gathered from every member: they wait too.
            self.outage.failed(self.clock())
            delay = self.listing_retry.schedule(self.clock())
            self.notes.append(
                f"{self.cache.late}: rendered from the instances known, those with events"
                f" refreshed on their own; the full listing is tried again in {delay:.0f} s"
            )
        elif not self.cache.full:
            self.listing_retry.clear()

    def _after_target(self, edge: Report) -> None:
        """One target's outcome: a failure that may pass by itself (a read-only or full disk,
        Caddy down or restarting) is tried again with this target's own backoff, even when
        nothing else comes to trigger it; a success ends that."""
        name = edge.target or ""
        if edge.error in RETRIED:
            self.retries.setdefault(
                name, Retry(self.options.retry_first, self.options.retry_cap)
            ).schedule(self.clock())
            self.verified.discard(name)
        elif edge.error is None:
            if name in self.retries:
                self.retries.pop(name).clear()
            self.verified.add(name)

    def _imported(self, path: Path) -> bool:
        """A file the Caddyfile imports (so Caddy reads it), not one only we read."""
        snippets, sites = self.settings.snippets, self.settings.sites_dir
        return (snippets is not None and path == snippets.resolve()) or (
            sites is not None and path.parent == sites.resolve()
        )

    def _reload_settings(self) -> None:
        try:
            settings = self.load_settings()
        except Exception as exc:  # a half-saved settings file: keep the settings we have
            self.log("warning", f"settings not reloaded, keeping the previous ones: {exc}")
            return
        if settings.policy != self.settings.policy:
            self.cache.missed_events()  # events of newly included projects were not followed
        self.settings = settings
