"""The link to Incus: a client and its event stream, opened again with backoff when lost."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..incus import EventSource, IncusApi, IncusError
from ..settings import Settings
from .timing import Retry


class IncusLink:
    """`client` is usable while `connected`; after a loss, `due` says when to try again."""

    def __init__(self, connect: Callable[[Settings], IncusApi], first: float, cap: float):
        self.connect = connect
        self.client: IncusApi | None = None
        self.stream: EventSource | None = None
        self.connected = False
        self.retry = Retry(first, cap)
        self.retry.at = 0.0  # connect at once

    def due(self, now: float) -> bool:
        return not self.connected and self.retry.due(now)

    def open(
        self,
        settings: Settings,
        on_event: Callable[[dict[str, Any]], None],
        on_close: Callable[[], None],
        now: float,
    ) -> str | None:
        """Connect and subscribe; None on success, else why not (a retry is scheduled)."""
        try:
            client = self.connect(settings)
            stream = client.events(on_event, on_close)
            stream.start()
        except IncusError as exc:
            delay = self.retry.schedule(now)
            return f"Incus unreachable ({exc}); retrying in {delay:.1f} s"
        self.client, self.stream, self.connected = client, stream, True
        self.retry.clear()
        return None

    def lost(self, now: float) -> float | None:
        """The link broke: close the stream; the delay until the next try (None: it was
        already down)."""
        if not self.connected:
            return None
        self.connected = False
        self.close()
        return self.retry.schedule(now)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
