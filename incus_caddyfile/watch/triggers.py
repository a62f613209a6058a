"""Why a cycle runs: Incus events turned into triggers, and the tool's own trigger kinds.

Triggers only say *that* something may have changed; the data always comes from Incus.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any
from urllib.parse import parse_qs, urlparse

# Lifecycle actions that can change routes. Everything else (exec, file, console, log,
# snapshot, backup, metadata ...) is noise and triggers nothing at all.
INSTANCE_ACTIONS = frozenset(
    "instance-" + a
    for a in [
        "created", "started", "stopped", "shutdown", "restarted", "paused", "resumed",
        "renamed", "updated", "deleted", "restored", "ready",
    ]
)  # fmt: skip
FULL_RESYNC_ACTIONS = frozenset(
    {"profile-updated", "profile-renamed", "profile-deleted", "profile-created"}
    | {"project-created", "project-updated", "project-renamed", "project-deleted"}
    | {"network-updated"}
)


class Kind(Enum):
    """What started a cycle."""

    START = "start"
    INCUS = "incus"  # an Incus lifecycle event (its action is on the trigger)
    TIMER = "timer"  # the periodic resync
    SIGNAL = "signal"  # SIGHUP
    RECONNECT = "reconnect"  # the event stream is back: events were missed
    FILE = "file"  # the template, settings, snippets or a site file changed
    ADDRESS = "address"  # an instance polled for got its address (or open port)
    RETRY = "retry"  # a cycle that failed to write or reload runs again

    @property
    def local(self) -> bool:
        """Re-render from the cache: nothing to fetch from Incus."""
        return self in (Kind.FILE, Kind.ADDRESS, Kind.RETRY)


@dataclass(frozen=True)
class Trigger:
    """One reason for a cycle. `instance` is set when it concerns one instance only."""

    kind: Kind
    action: str = ""  # the Incus action, for Kind.INCUS
    project: str = ""
    instance: str = ""
    old_name: str = ""  # a rename's previous name
    detail: str = ""  # e.g. the file that changed

    @property
    def full(self) -> bool:
        """Needs a full re-listing (not one instance, and not from the cache)."""
        return not self.instance and not self.kind.local

    def __str__(self) -> str:
        what = self.action or self.kind.value
        if self.instance:
            return f"{what} {self.project}/{self.instance}"
        return f"{what} {self.detail}" if self.detail else what


def classify(event: dict[str, Any]) -> Trigger | None:
    """An Incus event as a trigger, or None for noise."""
    if event.get("type") != "lifecycle":
        return None
    meta = event.get("metadata") or {}
    action = str(meta.get("action") or "")
    if action in FULL_RESYNC_ACTIONS:
        return Trigger(Kind.INCUS, action)
    if action not in INSTANCE_ACTIONS:
        return None
    source = urlparse(str(meta.get("source") or ""))
    prefix = "/1.0/instances/"
    if not source.path.startswith(prefix):
        return Trigger(Kind.INCUS, action)  # unexpected shape: be safe, resync everything
    name = source.path[len(prefix) :].split("/")[0]
    project = (
        event.get("project") or parse_qs(source.query).get("project", ["default"])[0] or "default"
    )
    old_name = str((meta.get("context") or {}).get("old_name") or "")
    return Trigger(Kind.INCUS, action, str(project), name, old_name)


def summarise(triggers: list[Trigger], most: int = 5) -> str:
    """The distinct triggers of a cycle, the first few of them."""
    return some([str(t) for t in dict.fromkeys(triggers)], most, sep=", ")


def some(items: list[str], most: int = 5, sep: str = " ") -> str:
    """The first few items, and how many more (the JSON log has them all)."""
    more = f" (+{len(items) - most} more)" if len(items) > most else ""
    return sep.join(items[:most]) + more
