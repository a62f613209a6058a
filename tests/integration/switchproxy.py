"""A unix-socket proxy in front of the real incusd that can be switched off and on: off, it cuts
every connection through it (the event stream ends, as when incusd is killed) and refuses new
ones; on, it forwards again. The tool talks to its socket (`--incus`), so Incus goes down for
that one process only, and the shared lab's daemon is never touched."""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path


class SwitchProxy:
    def __init__(self, upstream: str, path: Path) -> None:
        self.upstream, self.path = upstream, path
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._server: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.accepted = 0
        self.up()

    def up(self) -> None:
        """Listen on `path` again (a fresh socket file) and forward."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(self.path))
        server.listen(64)
        server.settimeout(0.2)
        self._server = server
        self._thread = threading.Thread(target=self._accept, args=(server,), daemon=True)
        self._thread.start()

    def down(self) -> None:
        """Stop listening and cut every connection: to the tool, Incus is gone. The socket
        file stays, with nobody listening (connect: refused), as after incusd was killed."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        if self._thread is not None:
            self._thread.join(timeout=2)
        with self._lock:
            victims, self._open = self._open, set()
        for sock in victims:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.down()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _accept(self, server: socket.socket) -> None:
        while self._server is server:
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(self.upstream)
        except OSError:
            client.close()
            upstream.close()
            return
        with self._lock:
            self._open.update({client, upstream})

        def pump(src: socket.socket, dst: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while chunk := src.recv(65536):
                    dst.sendall(chunk)
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
        pump(upstream, client)
        with self._lock:
            self._open.difference_update({client, upstream})
        client.close()
        upstream.close()
