"""The state of the edge as `watch` holds it: immutable plain data, published whole after each
cycle and each change of the Incus link, read by the listener's threads (never changed)."""

from __future__ import annotations

import dataclasses
import json
import threading
from dataclasses import dataclass, field
from typing import Any

from ..model import Rejection, RouteRow, Site
from ..policy import parent_domain
from ..watch.triggers import some

CYCLES_KEPT = 20  # the last cycles the page and /state show
# model.build's reason for an instance whose project the settings leave out
EXCLUDED = "project not included by the settings"


def row_json(row: RouteRow) -> dict[str, Any]:
    return {**dataclasses.asdict(row), "state": row.state}


def routes_json(rows: list[RouteRow] | tuple[RouteRow, ...]) -> str:
    """What `routes --json` prints (and `/routes` serves): one JSON array, a newline."""
    return json.dumps([row_json(r) for r in rows], indent=2) + "\n"


def rows_from_json(text: str) -> list[RouteRow]:
    """`routes --json` output back to rows (for `routes --from`). Raises ValueError."""
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError("expected a JSON array of routes")
    names = {f.name for f in dataclasses.fields(RouteRow)}
    rows = []
    for item in data:
        if not isinstance(item, dict) or not {"project", "instance"} <= item.keys():
            raise ValueError("expected objects with project and instance")
        values: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in item.items() if k in names
        }
        rows.append(RouteRow(**values))
    return rows


@dataclass(frozen=True)
class CycleRecord:
    """One cycle as the page and /state show it."""

    at: float  # wall-clock time (time.time()) of its end
    triggers: tuple[str, ...]
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    outcome: str = ""  # the metrics' word: unchanged, applied, incus_error, reload_failed ...
    summary: str = ""  # the log's words: "written, Caddy reloaded", "error: ..."
    duration: float = 0.0  # seconds
    ok: bool = True

    @property
    def trigger_summary(self) -> str:
        return some(list(self.triggers), 5, sep=", ")

    @property
    def changes(self) -> str:
        parts = [
            f"{sign}{some(list(hosts))}"
            for sign, hosts in (("+", self.added), ("-", self.removed), ("~", self.changed))
            if hosts
        ]
        return "; ".join(parts) or "no site changed"

    def as_json(self) -> dict[str, Any]:
        return {
            "at": round(self.at, 3),
            "triggers": list(self.triggers),
            "added": list(self.added),
            "removed": list(self.removed),
            "changed": list(self.changed),
            "outcome": self.outcome,
            "summary": self.summary,
            "duration_ms": round(self.duration * 1000, 1),
            "ok": self.ok,
        }


@dataclass(frozen=True)
class TargetRecord:
    """One Caddy edge as its last cycle left it: current (its Caddy runs the file), pending
    (the file is written, the reload is owed and retried), failed (with the reason)."""

    name: str
    state: str
    reason: str = ""
    since_wall: float = 0.0  # when it entered this state (time.time())

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "reason": self.reason,
            "since": round(self.since_wall, 3),
        }


@dataclass(frozen=True)
class Snapshot:
    """Everything the listener serves. `clock` values are the watch loop's clock
    (time.monotonic in a real process); `*_wall` ones are time.time()."""

    started_wall: float = 0.0
    synced: bool = False  # a full sync succeeded since the start
    last_sync: float | None = None  # clock of the last cycle that applied without error
    last_sync_wall: float | None = None
    incus_connected: bool = False
    incus_reason: str = "not connected yet"  # why it is down
    resync_pending: bool = False  # reconnected; the full resync has not completed yet
    reload_pending: bool = False  # the file is written, Caddy not reloaded: retried
    last_error: str | None = None  # the last cycle failed: its message
    reloading: bool = True  # False with --no-reload: Caddy is not ours to reload
    rows: tuple[RouteRow, ...] = ()
    sites: tuple[Site, ...] = ()
    rejections: tuple[Rejection, ...] = ()
    cycles: tuple[CycleRecord, ...] = ()  # newest first
    cycle_count: int = 0
    reconnects: int = 0
    hosts: frozenset[str] = field(default_factory=frozenset)  # sites' hosts: routed or fallback
    targets: tuple[TargetRecord, ...] = ()  # each Caddy edge, in the settings' order

    @property
    def lagging(self) -> list[TargetRecord]:
        """Several targets: those that do not run the current file."""
        return [t for t in self.targets if t.state != "current"] if len(self.targets) > 1 else []

    def readiness(self) -> tuple[bool, str]:
        """Ready: the first full sync succeeded and Caddy runs the current file; else why not."""
        why = None
        if not self.incus_connected:
            why = f"the Incus event stream is down: {self.incus_reason}"
        elif self.resync_pending:
            why = "reconnected to Incus; the full resync has not completed yet"
        elif self.lagging:
            why = "not every target runs the current file: " + "; ".join(
                f"{t.name} {t.state}: {t.reason}" for t in self.lagging
            )
        elif self.reload_pending:
            why = f"a reload of Caddy is pending: {self.last_error}"
        elif self.last_error:
            why = f"the last cycle failed: {self.last_error}"
        if not self.synced:
            return False, "no full sync yet" + (f": {why}" if why else "")
        if why is not None:
            return False, why
        if not self.reloading:
            return True, "ready: the file is current (Caddy is not reloaded: --no-reload)"
        return True, "ready: Caddy runs the current file"

    def asks(self, domain: str) -> bool:
        """On-demand TLS: may Caddy get a certificate for this name? Only for a host a site
        serves now (routed, or reserved with a fallback page), or a name one label under a
        wildcard host (`*.example.org`) that a site serves."""
        name = domain.strip().lower().rstrip(".")
        if not name or name.startswith("*"):
            return False
        return name in self.hosts or ("*." + parent_domain(name)) in self.hosts

    def counts(self) -> dict[str, int]:
        """Labelled instances by route state; those of projects left out counted apart."""
        left_out = [r for r in self.rows if r.reasons == (EXCLUDED,)]
        states = [r.state for r in self.rows if r.reasons != (EXCLUDED,)]
        return {
            "sites": len(self.sites),
            "instances": len(self.rows),
            "routed": sum(s in ("routed", "partly routed") for s in states),
            "not_routed": sum(s == "not routed" for s in states),
            "unknown": sum(s == "unknown" for s in states),
            "left_out": len(left_out),
            "rejected_labels": sum(not r.ignored for r in self.rejections),
        }

    def state_json(self, now: float, version: str) -> dict[str, Any]:
        """What `/state` serves (and `doctor --from` reads)."""
        ready, reason = self.readiness()
        return {
            "version": version,
            "ready": ready,
            "reason": reason,
            "synced": self.synced,
            "seconds_since_sync": None
            if self.last_sync is None
            else round(now - self.last_sync, 3),
            "incus": {
                "connected": self.incus_connected,
                "reason": "" if self.incus_connected else self.incus_reason,
                "reconnects": self.reconnects,
                "resync_pending": self.resync_pending,
            },
            "caddy": {
                "current": self.synced and not self.reload_pending and not self.last_error,
                "reload_pending": self.reload_pending,
                "reloading": self.reloading,
            },
            "targets": [t.as_json() for t in self.targets],
            "last_error": self.last_error,
            "cycles": self.cycle_count,
            "last_cycles": [c.as_json() for c in self.cycles],
            "counts": self.counts(),
        }


class Board:
    """Where the loop publishes the current snapshot and the listener's threads read it: the
    reference is swapped under a lock; the snapshot itself never changes."""

    def __init__(self, first: Snapshot) -> None:
        self._lock = threading.Lock()
        self._current = first

    def publish(self, snapshot: Snapshot) -> None:
        with self._lock:
            self._current = snapshot

    def current(self) -> Snapshot:
        with self._lock:
            return self._current
