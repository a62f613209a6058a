"""watch: keep the Caddyfile and Caddy true to Incus for as long as the process runs.

Triggers (Incus lifecycle events, file changes, timers, SIGHUP) only say *that* something may
have changed; the data always comes from Incus. A single-instance event refreshes only that
instance (a few requests, whatever the fleet size) and the whole Caddyfile is re-rendered from
the cached listing; profile and project events, reconnects, SIGHUP and a periodic timer do a
full resync. Everything runs on one thread that owns the state; the event stream and the file
watcher only put triggers on a queue.
"""

from __future__ import annotations

import json
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import parse_qs, urlparse

from . import pipeline, probe
from .incus import IncusApi, IncusError, connect
from .inventory import Inventory
from .model import Instance, Model, awaits_address
from .pipeline import Report, RunMode, Status
from .settings import Settings

# Lifecycle actions that can change routes. Everything else (exec, file, console, log,
# snapshot, backup, metadata ...) is noise and triggers nothing at all.
INSTANCE_ACTIONS = frozenset(
    "instance-" + a
    for a in [
        "created",
        "started",
        "stopped",
        "shutdown",
        "restarted",
        "paused",
        "resumed",
        "renamed",
        "updated",
        "deleted",
        "restored",
        "ready",
    ]
)
# Triggers that need no Incus request: re-render from the cache (and re-check Caddy).
LOCAL_KINDS = frozenset({"file", "address", "reload-retry"})
FULL_RESYNC_ACTIONS = frozenset(
    {"profile-updated", "profile-renamed", "profile-deleted", "profile-created"}
    | {"project-created", "project-updated", "project-renamed", "project-deleted"}
    | {"network-updated"}
)


@dataclass(frozen=True)
class Trigger:
    """Why a cycle runs. `instance` is set for a single-instance event."""

    kind: str  # an Incus action, or one of LOCAL_KINDS, "timer", "signal", "reconnect", "start"
    project: str = ""
    instance: str = ""
    old_name: str = ""
    detail: str = ""

    @property
    def full(self) -> bool:
        return not self.instance

    def __str__(self) -> str:
        if self.instance:
            return f"{self.kind} {self.project}/{self.instance}"
        return f"{self.kind} {self.detail}" if self.detail else self.kind


def classify(event: dict[str, Any]) -> Trigger | None:
    """An Incus event as a trigger, or None for noise."""
    if event.get("type") != "lifecycle":
        return None
    meta = event.get("metadata") or {}
    action = str(meta.get("action") or "")
    if action in FULL_RESYNC_ACTIONS:
        return Trigger(action)
    if action not in INSTANCE_ACTIONS:
        return None
    source = urlparse(str(meta.get("source") or ""))
    prefix = "/1.0/instances/"
    if not source.path.startswith(prefix):
        return Trigger(action)  # unexpected shape: be safe, resync everything
    name = source.path[len(prefix) :].split("/")[0]
    project = (
        event.get("project") or parse_qs(source.query).get("project", ["default"])[0] or "default"
    )
    old_name = str((meta.get("context") or {}).get("old_name") or "")
    return Trigger(action, str(project), name, old_name)


class Debouncer:
    """When to run the next cycle after triggers. Time is passed in, so it is testable.

    - `min_wait`: quiet after the last trigger, so simultaneous events make one cycle.
    - `max_wait`: no trigger waits longer than this after the first one of a burst (a steady
      stream still gets cycles), and two cycles that changed the file (so reloaded Caddy)
      are at least this far apart. An isolated change is applied after `min_wait`; a burst
      of changes costs one reload per `max_wait`.
    """

    def __init__(self, min_wait: float, max_wait: float) -> None:
        if not 0 <= min_wait <= max_wait:
            raise ValueError("debounce needs 0 <= min <= max")
        self.min_wait, self.max_wait = min_wait, max_wait
        self.first: float | None = None
        self.last: float | None = None
        self.hold_until = float("-inf")  # set by a cycle that changed the file

    def note(self, now: float) -> None:
        if self.first is None:
            self.first = now
        self.last = now

    def deadline(self) -> float | None:
        if self.first is None or self.last is None:
            return None
        return max(min(self.last + self.min_wait, self.first + self.max_wait), self.hold_until)

    def due(self, now: float) -> bool:
        deadline = self.deadline()
        return deadline is not None and now >= deadline

    def hurry(self, now: float) -> None:
        """The change awaited has happened: no quiet time needed (the hold still applies)."""
        if self.first is not None:
            self.last = now - self.min_wait

    def fired(self, now: float, changed: bool) -> None:
        """A cycle ran; if it changed the file, hold the next one back for `max_wait`."""
        self.first = self.last = None
        if changed:
            self.hold_until = now + self.max_wait


class Backoff:
    """Exponential backoff with a cap; `next()` returns the delay to wait now."""

    def __init__(self, first: float, cap: float, factor: float = 2.0) -> None:
        self.first, self.cap, self.factor = first, cap, factor
        self.current = first

    def next(self) -> float:
        delay = self.current
        self.current = min(self.current * self.factor, self.cap)
        return delay

    def reset(self) -> None:
        self.current = self.first


@dataclass(frozen=True)
class WatchOptions:
    debounce_min: float = 0.05
    debounce_max: float = 2.0
    resync_interval: float = 300.0
    address_timeout: float = 30.0
    address_poll_first: float = 0.05
    reconnect_first: float = 0.5
    reconnect_cap: float = 30.0
    reload_retry_first: float = 1.0
    reload_retry_cap: float = 30.0
    log_format: str = "text"


class Log:
    """One line per record on stderr: text for people, JSON for machines."""

    def __init__(self, fmt: str, stream: TextIO | None = None) -> None:
        self.fmt = fmt
        self.stream = stream or sys.stderr

    def __call__(self, event: str, message: str, **fields: Any) -> None:
        if self.fmt == "json":
            record = {"ts": round(time.time(), 3), "event": event, "message": message, **fields}
            line = json.dumps(record, sort_keys=False, default=str)
        else:
            line = f"incus-caddyfile: {message}"
        print(line, file=self.stream, flush=True)


def site_changes(before: Model | None, after: Model) -> dict[str, list[str]]:
    """Hosts added, removed and changed (other upstreams) between two models."""
    old = {s.host: s.dials for s in before.all_sites} if before else {}
    new = {s.host: s.dials for s in after.all_sites}
    return {
        "added": sorted(new.keys() - old.keys()),
        "removed": sorted(old.keys() - new.keys()),
        "changed": sorted(h for h in new.keys() & old.keys() if new[h] != old[h]),
    }


def _some(items: list[str], most: int = 5, sep: str = " ") -> str:
    """The first few items, and how many more (the JSON log has them all)."""
    more = f" (+{len(items) - most} more)" if len(items) > most else ""
    return sep.join(items[:most]) + more


def _summarise(triggers: Iterable[Trigger], most: int = 5) -> str:
    return _some([str(t) for t in dict.fromkeys(triggers)], most, sep=", ")


@dataclass
class _AddressPoll:
    project: str
    name: str
    due: float
    deadline: float
    backoff: Backoff


_STOP = object()
_HUP = object()
_CLOSED = object()


@dataclass
class _State:
    cache: dict[tuple[str, str], Instance] | None = None  # None until a full listing worked
    model: Model | None = None
    triggers: list[Trigger] = field(default_factory=list)
    dirty: set[tuple[str, str]] = field(default_factory=set)
    full: bool = True
    polls: dict[tuple[str, str], _AddressPoll] = field(default_factory=dict)
    connected: bool = False
    reconnect_at: float | None = 0.0
    reload_retry_at: float | None = None
    verify_caddy: bool = True  # ask Caddy what it runs: at start, after failures, on resync
    reported: frozenset[str] = frozenset()  # rejections already logged
    next_resync: float = 0.0


class Watcher:
    """The watch loop. `connect` makes an Incus client; `load_settings` re-reads settings."""

    def __init__(
        self,
        load_settings: Callable[[], Settings],
        options: WatchOptions,
        connect: Callable[[Settings], IncusApi] = connect,
        clock: Callable[[], float] = time.monotonic,
        log: Log | None = None,
    ) -> None:
        self.load_settings = load_settings
        self.settings = load_settings()
        self.options = options
        self.connect = connect
        self.clock = clock
        self.log = log or Log(options.log_format)
        # SimpleQueue.put is reentrant: safe to call from the signal handlers.
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.debounce = Debouncer(options.debounce_min, options.debounce_max)
        self.reconnect_backoff = Backoff(options.reconnect_first, options.reconnect_cap)
        self.reload_backoff = Backoff(options.reload_retry_first, options.reload_retry_cap)
        self.state = _State()
        self.client: IncusApi | None = None
        self.stream: Any = None
        self.cycles = 0
        self.stop_event = threading.Event()

    # ---- inputs (any thread) ----
    def on_event(self, event: dict[str, Any]) -> None:
        trigger = classify(event)
        if trigger is not None:
            self.queue.put(trigger)

    def on_close(self) -> None:
        self.queue.put(_CLOSED)

    def stop(self) -> None:
        self.queue.put(_STOP)

    def hup(self) -> None:
        self.queue.put(_HUP)

    # ---- the loop (one thread) ----
    def run(self) -> int:
        self._install_signals()
        files = self._start_file_watcher()
        self.log("start", "watching Incus events", output=str(self.settings.output))
        self.state.triggers.append(Trigger("start"))
        try:
            while True:
                item = self._next_item()
                if item is _STOP:
                    break
                self._handle(item)
                self._run_timers()
        finally:
            self.stop_event.set()
            if self.stream is not None:
                self.stream.close()
            if files is not None:
                files.join(timeout=2)
        self.log("stop", "stopped", cycles=self.cycles)
        return 0

    def _next_item(self) -> Any:
        deadlines = [d for d in self._deadlines() if d is not None]
        timeout = max(0.0, min(deadlines) - self.clock()) if deadlines else None
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _deadlines(self) -> list[float | None]:
        s = self.state
        return [
            self.debounce.deadline(),
            s.reconnect_at,
            s.reload_retry_at,
            s.next_resync if s.connected else None,
            *(p.due for p in s.polls.values()),
        ]

    def _drain(self) -> None:
        """Handle what is already queued, without waiting (a stop request is put back)."""
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return
            if item is _STOP:
                self.queue.put(item)
                return
            self._handle(item)

    def _handle(self, item: Any) -> None:
        now = self.clock()
        if item is None:
            return
        if item is _CLOSED:
            self._disconnected("the Incus event stream ended")
        elif item is _HUP:
            self._want(Trigger("signal"), now)
        elif isinstance(item, Trigger):
            self._want(item, now)

    def _want(self, trigger: Trigger, now: float) -> None:
        """Record what a cycle must refresh, and start or extend the debounce window."""
        s = self.state
        s.triggers.append(trigger)
        if trigger.kind in LOCAL_KINDS:
            pass  # re-render from the cache: nothing to fetch
        elif trigger.full or s.cache is None:
            s.full = True
        else:
            s.dirty.add((trigger.project, trigger.instance))
            if trigger.old_name:
                s.dirty.add((trigger.project, trigger.old_name))
        self.debounce.note(now)

    def _poll_address(self, project: str, name: str, now: float) -> None:
        backoff = Backoff(self.options.address_poll_first, 1.0, factor=1.5)
        self.state.polls[(project, name)] = _AddressPoll(
            project, name, now + backoff.next(), now + self.options.address_timeout, backoff
        )

    def _run_timers(self) -> None:
        s = self.state
        now = self.clock()
        if s.reconnect_at is not None and now >= s.reconnect_at:
            self._reconnect(now)
        if now >= s.next_resync and s.connected:
            s.next_resync = now + self.options.resync_interval
            if s.cache is not None:  # the first listing is the start cycle's own
                s.verify_caddy = True
                self._want(Trigger("timer"), now)
        self._due_polls(now)
        if s.reload_retry_at is not None and now >= s.reload_retry_at:
            s.reload_retry_at = None
            s.verify_caddy = True
            self._want(Trigger("reload-retry"), now)
        self._drain()  # events that queued up meanwhile (a slow poll) join this cycle
        if self.debounce.due(self.clock()):
            self.debounce.fired(self.clock(), changed=self._cycle())

    def _due_polls(self, now: float) -> None:
        """Instances waiting for an address: refresh each when its backoff says so."""
        if not self.state.connected or self.client is None:
            return
        for key, poll in list(self.state.polls.items()):
            if now < poll.due:
                continue
            try:
                inst = self._fetch(poll.project, poll.name)
            except IncusError as exc:
                self._disconnected(str(exc))
                return
            if not self._waiting_for_address(inst) or now >= poll.deadline:
                del self.state.polls[key]
                if inst is not None and self.state.cache is not None:
                    self.state.cache[key] = inst
                    if not self._waiting_for_address(inst):
                        # The awaited change itself: apply it now (no quiet wait), unless a
                        # burst's reload hold says otherwise.
                        self._want(Trigger("address", poll.project, poll.name), self.clock())
                        self.debounce.hurry(self.clock())
                continue
            poll.due = self.clock() + poll.backoff.next()

    @staticmethod
    def _waiting_for_address(inst: Instance | None) -> bool:
        return inst is not None and awaits_address(inst)

    # ---- Incus connection ----
    def _reconnect(self, now: float) -> None:
        s = self.state
        try:
            self.client = self.connect(self.settings)
            self.stream = self.client.events(self.on_event, self.on_close)
            self.stream.start()
        except IncusError as exc:
            delay = self.reconnect_backoff.next()
            s.reconnect_at = now + delay
            self.log("incus", f"Incus unreachable ({exc}); retrying in {delay:.1f} s")
            return
        s.connected, s.reconnect_at = True, None
        self.reconnect_backoff.reset()
        s.next_resync = now + self.options.resync_interval
        if s.cache is not None:
            self.log("incus", "reconnected to Incus; full resync")
        s.verify_caddy = True
        self._want(Trigger("reconnect"), now)

    def _disconnected(self, why: str) -> None:
        s = self.state
        if not s.connected:
            return
        s.connected = False
        s.full = True  # events were missed: re-list everything once back
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        delay = self.reconnect_backoff.next()
        s.reconnect_at = self.clock() + delay
        self.log(
            "incus",
            f"{why}; keeping the last good Caddyfile, reconnecting in {delay:.1f} s",
        )

    # ---- one cycle ----
    def _fetch(self, project: str, name: str) -> Instance | None:
        """One instance, refreshed (and probed, if it asks to be). Raises IncusError."""
        assert self.client is not None
        inst = Inventory(self.client).instance(project, name)
        return None if inst is None else probe.annotate([inst])[0]

    def _refresh(self) -> bool:
        """Bring the cache up to date. False (and nothing changed) when Incus failed."""
        s = self.state
        assert self.client is not None
        try:
            if s.full or s.cache is None:
                listing = pipeline.collect(self.settings, self.client)
                s.cache = {(i.project, i.name): i for i in listing}
                s.full = False
                s.dirty.clear()
                self._poll_waiting(listing)
                return True
            updates = {key: self._fetch(*key) for key in sorted(s.dirty)}
        except IncusError as exc:
            self._disconnected(str(exc))
            return False
        for key, update in updates.items():
            if update is None:
                s.cache.pop(key, None)
                s.polls.pop(key, None)
            else:
                s.cache[key] = update
        s.dirty.clear()
        self._poll_waiting(u for u in updates.values() if u is not None)
        return True

    def _poll_waiting(self, instances: Iterable[Instance]) -> None:
        """Started instances still without an address (or open port): poll them, from 50 ms
        with backoff, instead of sleeping; the route appears when the address does."""
        for inst in instances:
            key = (inst.project, inst.name)
            if self._waiting_for_address(inst) and key not in self.state.polls:
                self._poll_address(inst.project, inst.name, self.clock())

    def _cycle(self) -> bool:
        """Refresh, render, write, reload. True when the file was written or Caddy reloaded."""
        s = self.state
        if not s.connected or self.client is None:
            return False  # keep the last good file; the reconnect will resync
        triggers, s.triggers = s.triggers, []
        if any(t.kind == "file" for t in triggers):
            self._reload_settings()
        started = self.clock()
        requests_before = self.client.requests
        if not self._refresh():
            s.triggers = triggers + s.triggers  # not lost: they still explain the next cycle
            return False
        assert s.cache is not None
        mode = RunMode(
            verify_running=s.verify_caddy,
            # a snippet or site file changed: the Caddyfile's bytes may not, Caddy's must
            force_reload=any(t.kind == "file" for t in triggers),
        )
        report = pipeline.apply(self.settings, list(s.cache.values()), mode, self.client)
        self.cycles += 1
        self._after(report, triggers, started, self.client.requests - requests_before)
        return report.written or report.reloaded

    def _after(
        self, report: Report, triggers: list[Trigger], started: float, requests: int
    ) -> None:
        s = self.state
        changes = site_changes(s.model, report.model) if report.model else {}
        if report.error is None or report.error == Status.RELOAD_FAILED:
            s.model = report.model  # the file now holds this model
        if report.error == Status.RELOAD_FAILED:
            delay = self.reload_backoff.next()
            s.reload_retry_at = self.clock() + delay
            s.verify_caddy = True
        elif report.error is None:
            self.reload_backoff.reset()
            s.verify_caddy = False
        self._log_cycle(report, triggers, changes, started, requests)

    def _log_cycle(
        self,
        report: Report,
        triggers: list[Trigger],
        changes: dict[str, list[str]],
        started: float,
        requests: int,
    ) -> None:
        if report.model is not None:  # each rejection once, not on every cycle
            current = {str(r): r for r in report.model.rejections}
            for text, rejection in current.items():
                if text not in self.state.reported:
                    self.log(
                        "rejected",
                        text,
                        project=rejection.project,
                        instance=rejection.instance,
                        key=rejection.key,
                    )
            self.state.reported = frozenset(current)
        for warning in report.warnings:
            self.log("warning", warning)
        counts = {k: len(v) for k, v in changes.items()}
        outcome = report.summary()
        detail = "; ".join(f"{k} {_some(v)}" for k, v in changes.items() if v)
        self.log(
            "cycle",
            f"sites +{counts.get('added', 0)} -{counts.get('removed', 0)}"
            f" ~{counts.get('changed', 0)}{': ' + detail if detail else ''}; {outcome}"
            f" (after {_summarise(triggers)})",
            **changes,
            triggers=[str(t) for t in triggers],
            written=report.written,
            reloaded=report.reloaded,
            error=report.error.name.lower() if report.error is not None else None,
            incus_requests=requests,
            duration_ms=round((self.clock() - started) * 1000, 1),
        )

    def _reload_settings(self) -> None:
        try:
            self.settings = self.load_settings()
        except Exception as exc:  # a half-saved settings file: keep the settings we have
            self.log("warning", f"settings not reloaded, keeping the previous ones: {exc}")

    # ---- process plumbing ----
    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        signal.signal(signal.SIGHUP, lambda *_: self.hup())

    def watched_files(self) -> list[Path]:
        paths = [self.settings.template, self.settings.config_file, self.settings.snippets]
        return [p.resolve() for p in paths if p is not None]

    def _start_file_watcher(self) -> threading.Thread | None:
        files = self.watched_files()
        if not files and self.settings.sites_dir is None:
            return None
        thread = threading.Thread(
            target=self._watch_files, args=(files,), name="file-watch", daemon=True
        )
        thread.start()
        return thread

    def _watch_files(self, files: list[Path]) -> None:
        import watchfiles

        # Watch the directories: editors replace files by rename, which a file watch misses.
        directories = {str(f.parent) for f in files}
        wanted = {str(f) for f in files}
        sites = str(self.settings.sites_dir.resolve()) if self.settings.sites_dir else None
        if sites:
            directories.add(sites)

        def relevant(_change: object, path: str) -> bool:
            return path in wanted or (sites is not None and str(Path(path).parent) == sites)

        for changes in watchfiles.watch(
            *sorted(directories),
            stop_event=self.stop_event,
            debounce=50,
            step=20,
            recursive=False,
            watch_filter=relevant,
        ):
            for _change, path in changes:
                self.queue.put(Trigger("file", detail=path))
