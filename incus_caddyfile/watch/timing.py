"""When to run: the debounce window and exponential backoff. Time is passed in (testable)."""

from __future__ import annotations


class TokenBucket:
    """How many reloads may follow each other: up to `capacity` at once, then one every
    `period` while changes keep coming (a token comes back every `period`). Isolated changes
    (a restart, a deploy script's two steps) go through at once; a sustained burst costs one
    reload per `period`. period 0: no limit."""

    def __init__(self, capacity: int, period: float) -> None:
        if capacity < 1 or period < 0:
            raise ValueError("a token bucket needs capacity >= 1 and period >= 0")
        self.capacity, self.period = capacity, period
        self.tokens = float(capacity)
        self.stamp = float("-inf")  # when `tokens` was counted

    def _level(self, now: float) -> float:
        if self.period == 0 or self.stamp == float("-inf"):
            return float(self.capacity)
        return min(float(self.capacity), self.tokens + (now - self.stamp) / self.period)

    def ready_at(self) -> float:
        """When a token is there (-inf: now)."""
        if self.period == 0 or self.tokens >= 1 or self.stamp == float("-inf"):
            return float("-inf")
        return self.stamp + (1 - self.tokens) * self.period

    def take(self, now: float) -> None:
        """One token (an urgent cycle may take one that is not there yet: the next wait)."""
        self.tokens = max(self._level(now) - 1, -float(self.capacity))
        self.stamp = now


class Debouncer:
    """When to run the next cycle after triggers.

    - `min_wait`: quiet after the last trigger, so simultaneous events make one cycle.
    - `max_wait`: no trigger waits longer than this after the first one of a burst (a steady
      stream still gets cycles).
    - `burst`: cycles that change the file (so reload Caddy) take a token from a bucket of
      `burst` tokens, one of which comes back every `max_wait`: up to `burst` changes are
      applied at once, each `min_wait` after its event; a sustained burst costs one reload
      per `max_wait`. With burst 1, two reloads are at least `max_wait` apart.
    - `gap`: no cycle begins sooner than this after one that changed the file, urgent or
      not. A reload closes the clients' idle keep-alive connections; they (browsers too)
      send the request again at once on a new connection, and a second reload a few tens
      of ms later closes such new connections without an answer (accepted by the config
      it replaces): a failed request. Measured on loopback, pairs of reloads under 100
      requests/s with keep-alive: 30 ms apart, 5 and 11 failed in 80 pairs; 150 and 250
      ms apart, none.
    """

    def __init__(self, min_wait: float, max_wait: float, burst: int = 2, gap: float = 0.0) -> None:
        if not 0 <= min_wait <= max_wait or gap < 0:
            raise ValueError("debounce needs 0 <= min <= max and gap >= 0")
        self.min_wait, self.max_wait, self.gap = min_wait, max_wait, gap
        self.changed_at = float("-inf")  # when the last cycle that changed the file ended
        self.first: float | None = None
        self.last: float | None = None
        self.urgent = False  # the next cycle does not wait for a token
        self.bucket = TokenBucket(burst, max_wait)

    def note(self, now: float) -> None:
        if self.first is None:
            self.first = now
        self.last = now

    def deadline(self) -> float | None:
        if self.first is None or self.last is None:
            return None
        quiet = min(self.last + self.min_wait, self.first + self.max_wait)
        at = quiet if self.urgent else max(quiet, self.bucket.ready_at())
        return max(at, self.changed_at + self.gap)

    def due(self, now: float) -> bool:
        deadline = self.deadline()
        return deadline is not None and now >= deadline

    def hurry(self, now: float) -> None:
        """The change awaited has happened: no quiet time needed (the bucket still applies)."""
        if self.first is not None:
            self.last = now - self.min_wait

    def urge(self, now: float) -> None:
        """Run the next cycle now, token or not (a member to take out of its pool before it
        stops); it still takes a token, so what follows waits for it."""
        self.note(now)
        self.hurry(now)
        self.urgent = True

    def fired(self, now: float, changed: bool) -> None:
        """A cycle ran; if it changed the file, it took a token."""
        self.first = self.last = None
        self.urgent = False
        if changed:
            self.bucket.take(now)
            self.changed_at = now


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
