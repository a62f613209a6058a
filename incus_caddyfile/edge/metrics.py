"""Prometheus metrics of `watch --listen`, over prometheus_client, in a registry of their own.

Counters and histograms are counted by the watch loop as cycles end (prometheus_client's own
locks make them safe to read from the listener's threads). Gauges of the fleet are not kept
at all: they are read from the published snapshot when `/metrics` is scraped, so a scrape
never sees half of an update.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as CONTENT_TYPE
from prometheus_client.exposition import generate_latest

from ..model import RouteRow
from .snapshot import Board, Snapshot

__all__ = ["CONTENT_TYPE", "Metrics", "verdicts"]

PREFIX = "incus_caddyfile"
CYCLE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


def verdict_of(row: RouteRow, rejected: set[tuple[str, str]]) -> str:
    """routed: at least one of its hosts is routed; unknown: Incus cannot tell its status;
    rejected: not routed, and a label value was rejected; skipped: the rest (stopped,
    disabled, no address yet, project left out by the settings)."""
    if row.routed:
        return "routed"
    if row.state == "unknown":
        return "unknown"
    return "rejected" if (row.project, row.instance) in rejected else "skipped"


def rejected_instances(snapshot: Snapshot) -> set[tuple[str, str]]:
    return {(r.project, r.instance) for r in snapshot.rejections if not r.ignored}


def verdicts(snapshot: Snapshot) -> Tally[tuple[str, str]]:
    """(verdict, project) -> how many labelled instances (see `verdict_of`)."""
    rejected = rejected_instances(snapshot)
    return Tally((verdict_of(row, rejected), row.project) for row in snapshot.rows)


class _SnapshotCollector:
    """The gauges, computed from the snapshot at scrape time."""

    def __init__(self, board: Board, clock: Callable[[], float]) -> None:
        self.board, self.clock = board, clock
        self.start = clock()

    def describe(self) -> list[Metric]:
        return []  # nothing to check at registration; names are fixed below

    def collect(self) -> Iterator[Metric]:
        snap = self.board.current()
        ready, _ = snap.readiness()
        yield _gauge(
            "ready", "1 when /readyz answers 200: synced, and Caddy runs the current file", ready
        )
        yield _gauge(
            "incus_connected", "1 while the Incus event stream is up", snap.incus_connected
        )
        yield _gauge(
            "reload_pending",
            "1 while a failed reload of Caddy waits for its retry",
            snap.reload_pending,
        )
        since = snap.last_sync if snap.last_sync is not None else self.start
        yield _gauge(
            "seconds_since_last_sync",
            "Seconds since the last cycle that applied without error (since the start, before"
            " the first)",
            self.clock() - since,
        )
        yield _gauge(
            "sites", "Sites in the Caddyfile (routed or with a fallback page)", len(snap.sites)
        )
        targets = GaugeMetricFamily(
            f"{PREFIX}_target_current",
            "1 while the target (a Caddy edge) runs the current file; 0 when its reload is"
            " pending or it failed",
            labels=["target"],
        )
        for target in snap.targets:
            targets.add_metric([target.name], float(target.state == "current"))
        yield targets
        instances = GaugeMetricFamily(
            f"{PREFIX}_instances",
            "Labelled instances by verdict (routed, skipped, rejected, unknown) and project",
            labels=["verdict", "project"],
        )
        for (verdict, project), count in sorted(verdicts(snap).items()):
            instances.add_metric([verdict, project], count)
        yield instances
        labels = GaugeMetricFamily(
            f"{PREFIX}_rejected_labels",
            "Label values rejected now, by key (route: Caddy refused the instance's route)",
            labels=["key"],
        )
        keys = Tally(r.key or "route" for r in snap.rejections if not r.ignored)
        for key, count in sorted(keys.items()):
            labels.add_metric([key], count)
        yield labels


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=float(value))


class Metrics:
    """The registry `/metrics` serves; the keeper counts into it."""

    def __init__(self, board: Board, clock: Callable[[], float], process: bool = True) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no `_created` series
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.cycles = Counter(
            f"{PREFIX}_cycles", "Cycles by trigger (the Incus action, or start, timer, file ...)"
            " and outcome (unchanged, applied, incus_error, caddy_rejected, reload_failed ...)",
            ["trigger", "outcome"], registry=r,
        )  # fmt: skip
        self.reloads = Counter(f"{PREFIX}_reloads", "Reloads of Caddy that succeeded", registry=r)
        self.reload_failures = Counter(
            f"{PREFIX}_reload_failures",
            "Reloads that did not happen: Caddy unreachable, or it refused the config",
            ["reason"], registry=r,
        )  # fmt: skip
        self.cycle_duration = Histogram(
            f"{PREFIX}_cycle_duration_seconds", "Duration of a cycle (refresh, render, write,"
            " reload)", buckets=CYCLE_BUCKETS, registry=r,
        )  # fmt: skip
        self.event_to_reload = Histogram(
            f"{PREFIX}_event_to_reload_seconds",
            "From the first Incus event of a change to the end of the reload that applied it",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.reconnects = Counter(
            f"{PREFIX}_incus_reconnects", "Times the Incus event stream was connected again",
            registry=r,
        )  # fmt: skip
        self.asks = Counter(
            f"{PREFIX}_ask_requests", "On-demand TLS questions (/ask) by answer (allowed, denied)",
            ["answer"], registry=r,
        )  # fmt: skip
        for answer in ("allowed", "denied"):
            self.asks.labels(answer)
        for reason in ("unreachable", "rejected"):
            self.reload_failures.labels(reason)
        self.snapshot_collector = _SnapshotCollector(board, clock)
        r.register(self.snapshot_collector)
        if process:
            ProcessCollector(registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
