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
    began: float
    asked_at: float  # the address phase: when the next Incus request is due
    port: Target | None = None  # the port phase: probe this
    quick: Backoff | None = None  # the address phase's ticks between Incus requests
    polls: int = 0  # Incus requests of the address phase
    probes: int = 0  # connects of the port phase
    address_at: float | None = None  # when the address showed (the port phase began)


@dataclass(frozen=True)
class Waited:
    """How a poll went, for the cycle record (where the time of a start goes): seconds from
    its start to the address, and to its end (the open port, or the address alone)."""

    polls: int
    probes: int
    address_s: float | None
    total_s: float

    def as_log(self) -> dict[str, float | int | None]:
        ms = None if self.address_s is None else round(self.address_s * 1000, 1)
        return {"polls": self.polls, "probes": self.probes, "address_ms": ms,
                "total_ms": round(self.total_s * 1000, 1)}  # fmt: skip


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

    def start(self, key: Key, now: float, first_ask: float | None = None) -> None:
        """Poll this instance; `first_ask`: its first Incus request no sooner than this
        (quick looks come first)."""
        if key not in self._polls:
            backoff = Backoff(self.first, self.cap, self.factor)
            due = now + backoff.next()
            asked_at = due if first_ask is None else max(due, now + first_ask)
            self._polls[key] = _Poll(due, now + self.timeout, backoff, now, asked_at)

    def probe_port(self, key: Key, target: Target, now: float) -> None:
        """The address is there: from now on only the port is probed, at once first."""
        poll = self._polls[key]
        poll.port, poll.due, poll.backoff = target, now, Backoff(*self.port_backoff)
        poll.address_at = now

    def port(self, key: Key) -> Target | None:
        return self._polls[key].port

    def deadlines(self) -> list[float]:
        return [p.due for p in self._polls.values()]

    def due(self, now: float) -> list[Key]:
        return [key for key, poll in self._polls.items() if now >= poll.due]

    def expired(self, key: Key, now: float) -> bool:
        return now >= self._polls[key].deadline

    def polled(self, key: Key, incus: bool) -> None:
        """One try made: an Incus request, or a connect."""
        poll = self._polls[key]
        if incus:
            poll.polls += 1
        else:
            poll.probes += 1

    def asks(self, key: Key, now: float) -> bool:
        """In the address phase, an Incus request is due (not only a quick look)."""
        return now >= self._polls[key].asked_at

    def again(self, key: Key, now: float, asked: bool = True, quick: bool = False) -> None:
        """The next try. In the address phase: `asked`, an Incus request was made (the next
        one follows the backoff); `quick`, look again sooner, between Incus requests, on
        the port phase's short backoff (a look that costs no Incus request)."""
        poll = self._polls[key]
        if poll.port is not None:
            poll.due = now + poll.backoff.next()
            return
        if asked:
            poll.asked_at = now + poll.backoff.next()
        poll.due = poll.asked_at
        if quick:
            poll.quick = poll.quick or Backoff(*self.port_backoff)
            poll.due = min(poll.due, now + poll.quick.next())

    def drop(self, key: Key, now: float | None = None) -> Waited | None:
        """The poll is over; how it went (None: there was none)."""
        poll = self._polls.pop(key, None)
        if poll is None or now is None:
            return None
        address = None if poll.address_at is None else poll.address_at - poll.began
        return Waited(poll.polls, poll.probes, address, now - poll.began)
