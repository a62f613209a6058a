"""What watch tells the operator: one line per record on stderr, text or JSON."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

from ..model import Model
from ..pipeline import Report
from .triggers import Trigger, some, summarise


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


class CycleLog:
    """The record of each cycle, and each rejection once (not on every cycle)."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.reported: frozenset[str] = frozenset()

    def rejections(self, model: Model) -> None:
        current = {str(r): r for r in model.rejections}
        for text, rejection in current.items():
            if text not in self.reported:
                self.log(
                    "rejected",
                    text,
                    project=rejection.project,
                    instance=rejection.instance,
                    key=rejection.key,
                )
        self.reported = frozenset(current)

    def cycle(
        self,
        report: Report,
        triggers: list[Trigger],
        changes: dict[str, list[str]],
        duration: float,
        requests: int,
        first: bool = False,
        steps: dict[str, float] | None = None,
        waited: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """One line; the first cycle of a process says what the file holds (there is no
        "before" to compare with), later ones what changed. `steps` (seconds: incus (the
        refresh), model, render, caddy, and within it load and write) and `waited` (the polls
        for an address or an open port that ended before it) say where its time went, in the
        JSON record."""
        if report.model is not None:
            self.rejections(report.model)
        for warning in report.warnings:
            self.log("warning", warning)
        if first:
            hosts = [s.host for s in report.model.all_sites] if report.model else []
            what = f"{len(hosts)} sites{': ' + some(hosts) if hosts else ''}"
        else:
            counts = {k: len(v) for k, v in changes.items()}
            detail = "; ".join(f"{k} {some(v)}" for k, v in changes.items() if v)
            what = (
                f"sites +{counts.get('added', 0)} -{counts.get('removed', 0)}"
                f" ~{counts.get('changed', 0)}{': ' + detail if detail else ''}"
            )
        several = (
            {
                "targets": {
                    e.target: {"state": e.state, "summary": e.summary()} for e in report.edges
                }
            }
            if report.edges
            else {}
        )
        self.log(
            "cycle",
            f"{what}; {report.summary()} (after {summarise(triggers)})",
            **changes,
            **several,
            triggers=[str(t) for t in triggers],
            written=report.written,
            reloaded=report.reloaded,
            error=report.error.name.lower() if report.error is not None else None,
            incus_requests=requests,
            duration_ms=round(duration * 1000, 1),
            steps_ms={k: round(v * 1000, 1) for k, v in (steps or {}).items()},
            **({"waited": waited} if waited else {}),
        )
