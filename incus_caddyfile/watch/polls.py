"""Instances that are up but not reachable yet, polled until they are (Incus sends no event
when a DHCP lease comes, nor when a port opens).

Two phases. Address: the instance is fetched from Incus again on a backoff, until it has the
address its labels ask for (its own address, as it reports it, when its port is to be
probed). Port: once it has configured that address, only its port is probed, with a TCP
connect and no Incus request, on a short backoff, until it accepts. A poll gives up after
`timeout`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .timing import Backoff

Key = tuple[str, str]  # (project, instance)
Target = tuple[str, int]  # (address, port)


@dataclass
class _Poll:
    due: float
    deadline: float
    backoff: Backoff
    port: Target | None = None  # the port phase: probe this


class AddressPolls:
    def __init__(
        self,
        first: float,
        timeout: float,
        cap: float = 1.0,
        factor: float = 1.2,
        port_first: float = 0.005,
        port_cap: float = 0.2,
        port_factor: float = 1.2,
    ) -> None:
        self.first, self.timeout, self.cap, self.factor = first, timeout, cap, factor
        self.port_backoff = (port_first, port_cap, port_factor)
        self._polls: dict[Key, _Poll] = {}

    def __contains__(self, key: Key) -> bool:
        return key in self._polls

    def start(self, key: Key, now: float) -> None:
        if key not in self._polls:
            backoff = Backoff(self.first, self.cap, self.factor)
            self._polls[key] = _Poll(now + backoff.next(), now + self.timeout, backoff)

    def probe_port(self, key: Key, target: Target, now: float) -> None:
        """The address is there: from now on only the port is probed, at once first."""
        poll = self._polls[key]
        poll.port, poll.due, poll.backoff = target, now, Backoff(*self.port_backoff)

    def port(self, key: Key) -> Target | None:
        return self._polls[key].port

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
