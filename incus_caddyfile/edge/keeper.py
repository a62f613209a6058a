"""The watch loop's observer behind `--listen`: it keeps what the loop reports (on the loop's
thread only), counts the metrics, and publishes a new immutable snapshot at each change."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..model import Instance, explain
from ..pipeline import Report, Status
from ..watch.triggers import Kind, Trigger
from .metrics import Metrics
from .snapshot import CYCLES_KEPT, Board, CycleRecord, Snapshot, TargetRecord

# A reload was asked of Caddy and did not happen, by the cycle's error.
RELOAD_FAILURES = {Status.RELOAD_FAILED: "unreachable", Status.CADDY_REJECTED: "rejected"}


def outcome_of(report: Report | None) -> str:
    """One word for what a cycle did: unchanged, applied (written and/or Caddy reloaded), or
    the error (incus_error, caddy_rejected, reload_failed, write_failed, template_error ...)."""
    if report is None:
        return "incus_error"
    if report.error is not None:
        return report.error.name.lower()
    return "applied" if report.written or report.reloaded else "unchanged"


def trigger_label(triggers: Sequence[Trigger]) -> str:
    """The metrics' `trigger` of a cycle: what opened it (the Incus action, or the kind)."""
    if not triggers:
        return "none"
    first = triggers[0]
    return first.action if first.kind is Kind.INCUS and first.action else first.kind.value


F = TypeVar("F", bound=Callable[..., None])


def _guarded(method: F) -> F:
    """A fault in keeping the served state must not stop the watch from routing: it is
    logged, and the state stays as it was."""

    @functools.wraps(method)
    def call(self: EdgeState, *args: Any, **kwargs: Any) -> None:
        try:
            method(self, *args, **kwargs)
        except Exception as exc:  # the loop goes on; the page shows the last good state
            self.log("warning", f"the listener's state was not updated: {exc!r}")

    return call  # type: ignore[return-value]


def _no_log(event: str, message: str, **fields: Any) -> None:
    pass


EVENT_OWED_S = 30.0  # as long as watch polls a started instance for its address


class EdgeState:
    """Implements watch.observer.Observer. `clock` is the loop's clock (durations, ages);
    `wall` gives the times the page shows."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        reloading: bool = True,
        process_metrics: bool = True,
        log: Callable[..., None] = _no_log,
    ) -> None:
        self.clock, self.wall, self.log = clock, wall, log
        self.board = Board(Snapshot(started_wall=wall(), reloading=reloading))
        self.metrics = Metrics(self.board, clock, process=process_metrics)
        self.state = self.board.current()  # the loop's copy; replaced, never changed
        self.first_event: float | None = None  # earliest Incus event not yet applied
        self.ever_connected = False

    def _publish(self, **changes: object) -> None:
        self.state = dataclasses.replace(self.state, **changes)  # type: ignore[arg-type]
        self.board.publish(self.state)

    # ---- Observer ----
    @_guarded
    def noted(self, trigger: Trigger, now: float) -> None:
        if trigger.kind is Kind.INCUS and self.first_event is None:
            self.first_event = now

    @_guarded
    def connected(self, now: float) -> None:
        reconnect = self.ever_connected
        self.ever_connected = True
        if reconnect:
            self.metrics.reconnects.inc()
        self._publish(
            incus_connected=True,
            incus_reason="",
            resync_pending=reconnect,
            reconnects=self.state.reconnects + reconnect,
        )

    @_guarded
    def disconnected(self, why: str, now: float) -> None:
        self._publish(incus_connected=False, incus_reason=why)

    @_guarded
    def cycle(
        self,
        report: Report | None,
        triggers: Sequence[Trigger],
        changes: dict[str, list[str]],
        duration: float,
        instances: Sequence[Instance],
        now: float,
    ) -> None:
        outcome = outcome_of(report)
        m = self.metrics
        m.cycles.labels(trigger_label(triggers), outcome).inc()
        m.cycle_duration.observe(duration)
        record = CycleRecord(
            at=self.wall(),
            triggers=tuple(str(t) for t in dict.fromkeys(triggers)),
            added=tuple(changes.get("added", ())),
            removed=tuple(changes.get("removed", ())),
            changed=tuple(changes.get("changed", ())),
            outcome=outcome,
            summary="error: Incus failed during the refresh; nothing was rendered"
            if report is None
            else report.summary(),
            duration=duration,
            ok=report is not None and report.error is None,
        )
        cycles = (record, *self.state.cycles)[:CYCLES_KEPT]
        if report is None:
            self._publish(cycles=cycles, cycle_count=self.state.cycle_count + 1)
            return
        for edge in report.by_target():
            if edge.reloaded:
                m.reloads.inc()
            if edge.error in RELOAD_FAILURES:
                m.reload_failures.labels(RELOAD_FAILURES[edge.error]).inc()
        if report.reloaded and self.first_event is not None:
            m.event_to_reload.observe(max(0.0, now - self.first_event))
        # The event is owed a reload until one happens: a start's own cycle often finds no
        # address yet, and the reload comes with the address (or port) a poll finds later.
        # An event that never leads to one (noise) is forgotten after EVENT_OWED_S.
        if report.reloaded or (
            self.first_event is not None and now - self.first_event > EVENT_OWED_S
        ):
            self.first_event = None
        ok = report.error is None
        fields: dict[str, object] = {
            "targets": self._targets(report),
            "cycles": cycles,
            "cycle_count": self.state.cycle_count + 1,
            "last_error": None if ok else report.message,
            "reload_pending": report.error == Status.RELOAD_FAILED,
            "resync_pending": False,  # the listing (full after a reconnect) succeeded
        }
        if report.model is not None:
            sites = tuple(report.model.all_sites)
            fields.update(
                rows=tuple(explain(instances, report.model)),
                sites=sites,
                rejections=report.model.rejections,
                hosts=frozenset(s.host for s in sites),
            )
        if ok:
            fields.update(synced=True, last_sync=now, last_sync_wall=self.wall())
        elif report.error == Status.PARTIAL:
            fields.update(synced=True)  # listed and rendered; some targets lag (they say why)
        self._publish(**fields)

    def _targets(self, report: Report) -> tuple[TargetRecord, ...]:
        """Each target's state after this cycle (a target keeps its `since` while its state
        stays); a cycle that rendered nothing (template error ...) leaves them as they were."""
        edges = report.by_target()
        if not edges:
            return self.state.targets
        before = {t.name: t for t in self.state.targets}
        out = []
        for edge in edges:
            name = edge.target or ""
            reason = "" if edge.error is None else edge.message
            old = before.get(name)
            since = old.since_wall if old is not None and old.state == edge.state else self.wall()
            out.append(TargetRecord(name, edge.state, reason, since))
        return tuple(out)
