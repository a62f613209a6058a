"""Which instances are out of their pools right now, and why: what watch hands the model as
`draining`. The model decides what that means (a pool keeps a member only while no other
can serve); this part only keeps the set.

An instance is drained from the moment Incus announces that it stops, restarts or is
deleted (an operation event, seconds before the lifecycle event that says it is over), so
new requests go to the other members while it finishes its own. It comes back when the
operation fails or is cancelled. After a restart, and after a start, it stays out (it is
"warming") until its port accepts connections, probed without poisoning the host's ARP
entry (see `model.needs_own_address`); a warm-up gives up after a timeout and lets it in.
"""

from __future__ import annotations

from dataclasses import dataclass

from .triggers import Kind, Phase, Trigger

Key = tuple[str, str]  # (project, instance)
# A drain whose end the stream never told (it cannot miss one while connected; this only
# bounds the harm of a bug or an operation Incus never finishes).
MAX_DRAIN_S = 600.0


@dataclass
class _Drain:
    why: str  # the operation (stop, restart, delete) or "start"
    until: float  # it ends by itself then
    warming: bool = False  # the operation is over; waiting for the port


class Drains:
    def __init__(self, warmup_timeout: float, enabled: bool = True) -> None:
        self.warmup_timeout = warmup_timeout
        self.enabled = enabled
        self._drains: dict[Key, _Drain] = {}

    def __contains__(self, key: Key) -> bool:
        return key in self._drains

    def keys(self) -> frozenset[Key]:
        return frozenset(self._drains)

    def warming(self) -> list[Key]:
        return [key for key, d in self._drains.items() if d.warming]

    def note(self, trigger: Trigger, now: float) -> bool:
        """Follow an operation or a start; True when the set changed."""
        if not self.enabled or not trigger.instance:
            return False
        key = (trigger.project, trigger.instance)
        if trigger.kind is Kind.OPERATION:
            if trigger.phase is Phase.BEGUN:
                return self._set(key, _Drain(trigger.action, now + MAX_DRAIN_S))
            if trigger.phase is Phase.FAILED or trigger.action != "restart":
                return self.end(key)  # failed: back; stopped or deleted: gone anyway
            return self._warm(key, "restart", now)  # restarted: back once its port accepts
        if trigger.kind is Kind.INCUS and trigger.action == "instance-started":
            return self._warm(key, "start", now)
        return False

    def _warm(self, key: Key, why: str, now: float) -> bool:
        return self._set(key, _Drain(why, now + self.warmup_timeout, warming=True))

    def _set(self, key: Key, drain: _Drain) -> bool:
        before = self._drains.get(key)
        self._drains[key] = drain
        return before is None or before.warming != drain.warming

    def end(self, key: Key) -> bool:
        """The instance is back in its pools (or gone); True when it was drained."""
        return self._drains.pop(key, None) is not None

    def expire(self, now: float) -> list[Key]:
        """Drains that ran out of time end; their keys."""
        over = [key for key, d in self._drains.items() if now >= d.until]
        for key in over:
            del self._drains[key]
        return over

    def deadline(self) -> float | None:
        return min((d.until for d in self._drains.values()), default=None)

    def clear(self) -> bool:
        """Events were missed (the stream was lost): no operation is known to be under way."""
        changed = bool(self._drains)
        self._drains.clear()
        return changed
