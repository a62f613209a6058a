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
from ..inventory import AddressMemo, Bounds
from ..model import (
    Instance,
    Model,
    awaits_address,
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
    log_format: str = "text"


class Signal(Enum):
    """Queue items that are not triggers."""

    STOP = "stop"
    HUP = "hup"
    CLOSED = "closed"  # the Incus event stream ended


# Failures that may pass by themselves: a read-only or full disk, Caddy down or restarting.
RETRIED = frozenset({Status.WRITE_FAILED, Status.RELOAD_FAILED, Status.CADDY_REJECTED})

MakeTarget = Callable[[Settings, IncusApi | None], targets.Target | None]
PORT_PROBE_TIMEOUT = 0.2  # the address is configured: a closed port answers at once


class Watcher:
    """The watch loop. `connect` makes an Incus client; `load_settings` re-reads settings;
    `make_target` names where the file goes and which Caddy runs it; `clock` is injectable,
    and `step` runs one iteration, so the loop is testable without threads or sleeps."""

    def __init__(
        self,
        load_settings: Callable[[], Settings],
        options: WatchOptions,
        connect: Callable[[Settings], IncusApi] = connect,
        clock: Callable[[], float] = time.monotonic,
        log: Log | None = None,
        make_target: MakeTarget = targets.for_settings,
        observer: Observer | None = None,
    ) -> None:
        self.load_settings = load_settings
        self.settings = load_settings()
        self.options = options
        self.clock = clock
        self.log = log or Log(options.log_format)
        self.cycle_log = CycleLog(self.log)
        self.make_target = make_target
        self.observer: Observer = observer or Unobserved()  # what `watch --listen` serves
        # SimpleQueue.put is reentrant: safe to call from the signal handlers.
        self.queue: queue.SimpleQueue[Trigger | Signal] = queue.SimpleQueue()
        self.debounce = Debouncer(options.debounce_min, options.debounce_max, options.reload_burst)
        self.link = IncusLink(connect, options.reconnect_first, options.reconnect_cap)
        self.bounds: Bounds = {}  # managed networks' subnets, for single-instance refreshes
        # Addresses of NICs up since they were found: a resync after an incusd restart (lease
        # tables empty) asks no live state for them.
        self.memo = AddressMemo()
        self.cache = InstanceCache(
            lambda api: pipeline.collect(api, memo=self.memo),
            lambda api, p, n: pipeline.fetch(api, p, n, bounds=self.bounds, memo=self.memo),
        )
        self.polls = AddressPolls(options.address_poll_first, options.address_timeout)
        self.drains = Drains(options.address_timeout, enabled=options.drain)
        self.retry = Retry(options.retry_first, options.retry_cap)
        self.triggers: list[Trigger] = []
        self.model: Model | None = None  # what the file holds
        self.verify_caddy = True  # ask Caddy what it runs: at start, after failures, on resync
        self.next_resync = 0.0
        self.next_caddy_check = 0.0
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
            self.retry.at,
            self.next_resync if self.link.connected else None,
            self.next_caddy_check if self.model is not None else None,
            self.drains.deadline(),
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
                self.verify_caddy = True
                self._want(Trigger(Kind.TIMER))
        self._due_polls(now)
        for key in self.drains.expire(now):
            self._want(Trigger(Kind.WARM, project=key[0], instance=key[1], detail="timeout"))
        if self.retry.due(now):
            self.retry.take()
            self.verify_caddy = True
            self._want(Trigger(Kind.RETRY))
        if self.model is not None and now >= self.next_caddy_check:
            self.next_caddy_check = now + self.options.caddy_check_interval
            if not self.triggers:  # a cycle already due verifies through its own reload
                self.verify_caddy = True
                self._want(Trigger(Kind.CADDY_CHECK))
        self._drain()  # events that queued up meanwhile (a slow poll) join this cycle
        if self.debounce.due(self.clock()):
            self.debounce.fired(self.clock(), changed=self._cycle())

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
        self.verify_caddy = True
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
        if known and (warming or needs_own_address(known)) and any(n.interface for n in known.nics):
            inst = pipeline.own_addresses(client, known, self.bounds)
        else:
            inst = pipeline.fetch(client, *key, own=warming, bounds=self.bounds)
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
        if probe.accepts(*target, timeout=PORT_PROBE_TIMEOUT):
            inst = self.cache.get(key)
            if inst is not None and reach_target(inst) == target and needs_own_address(inst):
                self.cache.put(key, dataclasses.replace(inst, ready=True))
            self._reached(key, inst)
        else:
            self._again(key, self.cache.get(key))

    def _again(self, key: Key, inst: Instance | None) -> None:
        if self.polls.expired(key, self.clock()):
            self._reached(key, inst, gave_up=True)  # let it in: Caddy's retries cover it
        else:
            self.polls.again(key, self.clock())

    def _reached(self, key: Key, inst: Instance | None, gave_up: bool = False) -> None:
        """The poll is over: the route can follow (its address, its open port, its return
        to its pools), or it never will (gone, down, timed out)."""
        self.polls.drop(key)
        back = self.drains.end(key)
        if gave_up and not back:
            return  # still without its address: nothing changed
        kind = Kind.WARM if back else Kind.ADDRESS
        self._want(Trigger(kind, project=key[0], instance=key[1]))
        self.debounce.hurry(self.clock())

    def _poll_waiting(self, instances: Iterable[Instance]) -> None:
        """Started instances still without an address (or open port): poll them, from 10 ms
        with backoff, instead of sleeping; the route appears when the address does."""
        for inst in instances:
            if awaits_address(inst) and self.settings.policy.considers(inst.project):
                self.polls.start((inst.project, inst.name), self.clock())

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
            fetched = self.cache.refresh(client)
            listed = self.clock() - started
        except IncusError as exc:
            self.triggers = triggers + self.triggers  # they still explain the next cycle
            self._disconnected(str(exc))
            self.observer.cycle(None, triggers, {}, self.clock() - started, [], self.clock())
            return False
        self._poll_waiting(fetched)
        mode = RunMode(
            verify_running=self.verify_caddy,
            # a snippet or site file changed: the Caddyfile's bytes may not, Caddy's must
            force_reload=any(self._imported(f) for f in files),
        )
        target = self.make_target(self.settings, client)
        report = pipeline.apply(
            self.settings, self.cache.listing(), target, mode, self.drains.keys()
        )
        report.timings = {"incus": listed} | report.timings
        self._after(report, triggers, started, client.requests - requests_before)
        return report.written or report.reloaded

    def _after(
        self, report: Report, triggers: list[Trigger], started: float, requests: int
    ) -> None:
        first = self.model is None
        self.next_caddy_check = self.clock() + self.options.caddy_check_interval
        changes = site_changes(self.model, report.model) if report.model else {}
        if report.error is None or report.error == Status.RELOAD_FAILED:
            self.model = report.model  # the file now holds this model
        if report.error in RETRIED:
            # Nothing else may come to trigger the next try (the disk is writable again,
            # Caddy is back): try again, with backoff.
            self.retry.schedule(self.clock())
            self.verify_caddy = True
        elif report.error is None:
            self.retry.clear()
            self.verify_caddy = False
        duration = self.clock() - started
        quiet = all(t.kind is Kind.CADDY_CHECK for t in triggers) and not (
            report.error or report.written or report.reloaded or report.warnings
        )
        if quiet:
            return  # Caddy runs the current file: nothing to tell, every 10 s
        self.cycles += 1
        self.cycle_log.cycle(report, triggers, changes, duration, requests, first=first)
        self.observer.cycle(report, triggers, changes, duration, self.cache.listing(), self.clock())

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
