"""Fakes of the pipeline's outside systems for fast tests: a file in memory and a Caddy that
does what the test says. (FakeIncus, the Incus side, is in fake_incus.py.)"""

from __future__ import annotations

from dataclasses import dataclass, field

from incus_caddyfile.caddy import CaddyError, CaddyRejected, CaddyUnreachable
from incus_caddyfile.output import OutputError
from incus_caddyfile.targets import Target


@dataclass
class MemoryFile:
    """A Destination in memory; `fail_write` makes writes fail like a read-only disk."""

    data: bytes | None = None
    fail_write: bool = False
    marked: bool = False
    writes: int = 0
    name: str = "memory:Caddyfile"

    def read(self) -> bytes | None:
        return self.data

    def write(self, data: bytes) -> str | None:
        if self.fail_write:
            raise OutputError(f"cannot write {self.name}: Read-only file system")
        self.data = data
        self.writes += 1
        return None

    def restore(self, previous: bytes | None) -> None:
        self.data = previous

    def pending(self) -> bool:
        return self.marked

    def set_pending(self, pending: bool) -> None:
        self.marked = pending


@dataclass
class FakeCaddy:
    """A Caddy that accepts everything unless told otherwise, and remembers what it runs."""

    rejects: str | None = None  # a substring: texts containing it are rejected
    reachable: bool = True
    load_fails: bool = False  # reachable, but the load fails (not a rejection)
    load_rejects: str | None = None  # only load() refuses texts with it (a port in use ...)
    says_running: bool = True  # False: answers running() with None, like a reload command
    load_checks: bool = False  # True: load() is the check too, like the admin API's /load
    loaded: str | None = None
    loads: int = 0
    checks: int = 0
    name: str = "fake Caddy"
    calls: list[str] = field(default_factory=list)

    def _reached(self, what: str) -> None:
        self.calls.append(what)
        if not self.reachable:
            raise CaddyUnreachable(f"{self.name} is down")

    def check(self, text: str) -> str:
        self._reached("check")
        self.checks += 1
        if self.rejects is not None and self.rejects in text:
            raise CaddyRejected(f"rejected because of {self.rejects!r}")
        return self.name

    def load(self, text: str) -> None:
        self._reached("load")
        if self.rejects is not None and self.rejects in text:
            raise CaddyRejected(f"rejected because of {self.rejects!r}")
        if self.load_fails:
            raise CaddyError("load failed")
        if self.load_rejects is not None and self.load_rejects in text:
            raise CaddyRejected(f"loading new config: {self.load_rejects} in use")
        self.loaded = text
        self.loads += 1

    def running(self, text: str) -> bool | None:
        self._reached("running")
        return (self.loaded == text) if self.says_running else None

    def ping(self) -> str:
        self._reached("ping")
        return f"{self.name} answers"


def fake_target(data: bytes | None = None, **caddy: object) -> tuple[Target, MemoryFile, FakeCaddy]:
    destination = MemoryFile(data)
    fake = FakeCaddy(**caddy)  # type: ignore[arg-type]
    return Target(destination, fake), destination, fake
