"""Instances that are up but still without their address (Incus sends no event when a DHCP
lease comes): each is fetched again on a backoff from 50 ms, until it has it or times out."""

from __future__ import annotations

from dataclasses import dataclass

from .timing import Backoff

Key = tuple[str, str]  # (project, instance)


@dataclass
class _Poll:
    due: float
    deadline: float
    backoff: Backoff


class AddressPolls:
    def __init__(self, first: float, timeout: float, cap: float = 1.0, factor: float = 1.5):
        self.first, self.timeout, self.cap, self.factor = first, timeout, cap, factor
        self._polls: dict[Key, _Poll] = {}

    def __contains__(self, key: Key) -> bool:
        return key in self._polls

    def start(self, key: Key, now: float) -> None:
        if key not in self._polls:
            backoff = Backoff(self.first, self.cap, self.factor)
            self._polls[key] = _Poll(now + backoff.next(), now + self.timeout, backoff)

    def deadlines(self) -> list[float]:
        return [p.due for p in self._polls.values()]

    def due(self, now: float) -> list[Key]:
        return [key for key, poll in self._polls.items() if now >= poll.due]

    def expired(self, key: Key, now: float) -> bool:
        return now >= self._polls[key].deadline

    def again(self, key: Key, now: float) -> None:
        poll = self._polls[key]
        poll.due = now + poll.backoff.next()

    def drop(self, key: Key) -> None:
        self._polls.pop(key, None)
