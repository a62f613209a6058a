"""When to run: the debounce window and exponential backoff. Time is passed in (testable)."""

from __future__ import annotations


class Debouncer:
    """When to run the next cycle after triggers.

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


class Retry:
    """A one-shot timer with backoff: `schedule` after a failure, `clear` after a success."""

    def __init__(self, first: float, cap: float) -> None:
        self.backoff = Backoff(first, cap)
        self.at: float | None = None

    def schedule(self, now: float) -> float:
        delay = self.backoff.next()
        self.at = now + delay
        return delay

    def due(self, now: float) -> bool:
        return self.at is not None and now >= self.at

    def take(self) -> None:
        """The timer fired: it runs once."""
        self.at = None

    def clear(self) -> None:
        self.at = None
        self.backoff.reset()
