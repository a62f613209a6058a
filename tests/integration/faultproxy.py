"""A unix-socket proxy in front of the real incusd that breaks one response on purpose."""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path


class FaultProxy:
    """Forwards to `upstream`; once a request containing `trigger` has passed, the response
    stream is cut after `allow` more bytes (0: at once). Every other byte is the real one."""

    def __init__(self, upstream: str, path: Path, trigger: bytes, allow: int) -> None:
        self.upstream, self.path, self.trigger, self.allow = upstream, path, trigger, allow
        self.cuts = 0
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(16)
        self._server.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.connect(self.upstream)
        armed = threading.Event()

        def upstream_pump() -> None:
            with contextlib.suppress(OSError):
                while chunk := client.recv(65536):
                    if self.trigger in chunk:
                        armed.set()
                    server.sendall(chunk)

        threading.Thread(target=upstream_pump, daemon=True).start()
        remaining = self.allow
        with contextlib.suppress(OSError):
            while chunk := server.recv(65536):
                if armed.is_set():
                    if len(chunk) >= remaining:
                        client.sendall(chunk[:remaining])
                        self.cuts += 1
                        break
                    remaining -= len(chunk)
                client.sendall(chunk)
        for sock in (client, server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        self._thread.join(timeout=2)
