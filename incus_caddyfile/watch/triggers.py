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
# Operations that take an instance out of its pools from their start (the lifecycle event
# comes when they are over): their description, as Incus words it, and our name for them.
DRAINING_OPERATIONS = {
    "Stopping instance": "stop",
    "Restarting instance": "restart",
    "Deleting instance": "delete",
}
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
    CADDY_CHECK = "caddy-check"  # is Caddy still running the current file?
    OPERATION = "operation"  # Incus began (or ended) stopping, restarting or deleting one
    WARM = "warm"  # a drained instance that came back accepts connections (or timed out)

    @property
    def local(self) -> bool:
        """Re-render from the cache: nothing to fetch from Incus."""
        return self in (
            Kind.FILE, Kind.ADDRESS, Kind.RETRY, Kind.CADDY_CHECK, Kind.OPERATION, Kind.WARM
        )  # fmt: skip


class Phase(Enum):
    """Where an operation is: begun (Pending or Running), done (Success), failed (Failure
    or Cancelled)."""

    BEGUN = "begun"
    DONE = "done"
    FAILED = "failed"


# An operation's status_code (Incus' shared/api/status_code.go): Pending, Running; Success;
# Failure, Cancelled. (Operation statuses, not instance statuses: those are the model's.)
OPERATION_PHASES = {
    105: Phase.BEGUN,
    103: Phase.BEGUN,
    200: Phase.DONE,
    400: Phase.FAILED,
    401: Phase.FAILED,
}


@dataclass(frozen=True)
class Trigger:
    """One reason for a cycle. `instance` is set when it concerns one instance only."""

    kind: Kind
    action: str = ""  # the Incus action, for Kind.INCUS
    project: str = ""
    instance: str = ""
    old_name: str = ""  # a rename's previous name
    detail: str = ""  # e.g. the file that changed
    phase: Phase | None = None  # for Kind.OPERATION

    @property
    def full(self) -> bool:
        """Needs a full re-listing (not one instance, and not from the cache)."""
        return not self.instance and not self.kind.local

    def __str__(self) -> str:
        what = self.action or self.kind.value
        if self.phase is not None:
            what = f"{what}-{self.phase.value}"
        if self.instance:
            return f"{what} {self.project}/{self.instance}"
        return f"{what} {self.detail}" if self.detail else what


def _instance_of(url: str, event: dict[str, Any]) -> tuple[str, str] | None:
    """(project, name) of an instance URL (/1.0/instances/NAME?project=P)."""
    source = urlparse(url)
    prefix = "/1.0/instances/"
    if not source.path.startswith(prefix):
        return None
    name = source.path[len(prefix) :].split("/")[0]
    project = (
        event.get("project") or parse_qs(source.query).get("project", ["default"])[0] or "default"
    )
    return str(project), name


def classify_operation(event: dict[str, Any]) -> Trigger | None:
    """A stop, restart or delete of one instance, begun or over; None for any other
    operation (exec, file, snapshot, start ...)."""
    meta = event.get("metadata") or {}
    verb = DRAINING_OPERATIONS.get(str(meta.get("description") or ""))
    code = meta.get("status_code")
    phase = OPERATION_PHASES.get(code) if isinstance(code, int) else None
    instances = (meta.get("resources") or {}).get("instances") or []
    if verb is None or phase is None or len(instances) != 1:
        return None
    found = _instance_of(str(instances[0]), event)
    if found is None:
        return None
    return Trigger(Kind.OPERATION, verb, *found, detail=str(meta.get("id") or ""), phase=phase)


def _project_event_of(action: str, meta: dict[str, Any]) -> str:
    """The project a project's own event is about (created, updated, deleted), so that watch
    can ignore those of projects its settings leave out; "" for any other resync event (a
    rename may bring a project in or out; a profile may serve other projects)."""
    source = urlparse(str(meta.get("source") or ""))
    prefix = "/1.0/projects/"
    if action == "project-renamed" or not source.path.startswith(prefix):
        return ""
    return source.path[len(prefix) :].split("/")[0]


def classify(event: dict[str, Any]) -> Trigger | None:
    """An Incus event as a trigger, or None for noise."""
    if event.get("type") == "operation":
        return classify_operation(event)
    if event.get("type") != "lifecycle":
        return None
    meta = event.get("metadata") or {}
    action = str(meta.get("action") or "")
    if action in FULL_RESYNC_ACTIONS:
        return Trigger(Kind.INCUS, action, project=_project_event_of(action, meta))
    if action not in INSTANCE_ACTIONS:
        return None
    found = _instance_of(str(meta.get("source") or ""), event)
    if found is None:
        return Trigger(Kind.INCUS, action)  # unexpected shape: be safe, resync everything
    old_name = str((meta.get("context") or {}).get("old_name") or "")
    return Trigger(Kind.INCUS, action, *found, old_name)


def summarise(triggers: list[Trigger], most: int = 5) -> str:
    """The distinct triggers of a cycle, the first few of them."""
    return some([str(t) for t in dict.fromkeys(triggers)], most, sep=", ")


def some(items: list[str], most: int = 5, sep: str = " ") -> str:
    """The first few items, and how many more (the JSON log has them all)."""
    more = f" (+{len(items) - most} more)" if len(items) > most else ""
    return sep.join(items[:most]) + more
