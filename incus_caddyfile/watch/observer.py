"""Who else hears what the watch loop does: the state `watch --listen` serves (see `edge`).

The loop calls an `Observer` at a few named moments, on its own thread, with plain data. The
default, `Unobserved`, does nothing, so a watch without a listener pays nothing for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ..model import Instance
from ..pipeline import Report
from .triggers import Trigger


class Observer(Protocol):
    def noted(self, trigger: Trigger, now: float) -> None:
        """A trigger reached the loop (it will be part of the next cycle)."""

    def connected(self, now: float) -> None:
        """The Incus client and its event stream are up (at start, or again)."""

    def disconnected(self, why: str, now: float) -> None:
        """Incus cannot be reached, or its event stream ended."""

    def cycle(
        self,
        report: Report | None,
        triggers: Sequence[Trigger],
        changes: dict[str, list[str]],
        duration: float,
        instances: Sequence[Instance],
        now: float,
    ) -> None:
        """A cycle ended: `report` is what it did (None: Incus failed while it refreshed,
        nothing was rendered); `instances` is the listing it rendered from."""


class Unobserved:
    """The observer of a watch without a listener: nothing is kept, nothing is computed."""

    def noted(self, trigger: Trigger, now: float) -> None:
        pass

    def connected(self, now: float) -> None:
        pass

    def disconnected(self, why: str, now: float) -> None:
        pass

    def cycle(
        self,
        report: Report | None,
        triggers: Sequence[Trigger],
        changes: dict[str, list[str]],
        duration: float,
        instances: Sequence[Instance],
        now: float,
    ) -> None:
        pass
