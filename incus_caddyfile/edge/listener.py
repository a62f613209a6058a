"""The HTTP listener of `watch --listen`: a stdlib threading server on its own threads that reads
only the published snapshot (and the metrics registry). No request reaches Incus or Caddy.

Security model: a loopback address or a unix socket may listen without a token (whoever can
reach it can already read the Caddyfile on this host); any other address needs one, and with a
token every request except `/healthz` must carry it (`Authorization: Bearer TOKEN`, or HTTP
Basic with the token as password, which a browser asks for). Read-only: GET and HEAD only.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import json
import os
import socket
import socketserver
import stat
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from .. import __version__
from . import page
from .address import Address
from .metrics import CONTENT_TYPE, Metrics
from .snapshot import Board, routes_json

ENDPOINTS = ("/", "/healthz", "/readyz", "/routes", "/state", "/metrics", "/ask")
REQUEST_TIMEOUT_S = 10.0  # a client that sends nothing for this long is dropped
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:;"
    " frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Frame-Options": "DENY",
}
TEXT = "text/plain; charset=utf-8"
JSON = "application/json"


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


def _text(status: int, message: str, **headers: str) -> Response:
    return Response(status, TEXT, (message + "\n").encode(), headers)


class EdgeApp:
    """Requests to responses, from the board and the metrics: no sockets here (the tests call
    `handle` directly)."""

    def __init__(
        self,
        board: Board,
        metrics: Metrics,
        token: str | None = None,
        clock: Callable[[], float] | None = None,
        wall: Callable[[], float] | None = None,
    ) -> None:
        import time

        self.board, self.metrics, self.token = board, metrics, token
        self.clock = clock or time.monotonic
        self.wall = wall or time.time

    def authorized(self, headers: Mapping[str, str]) -> bool:
        if self.token is None:
            return True
        given = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
        scheme, _, credentials = given.partition(" ")
        secret = ""
        if scheme.lower() == "bearer":
            secret = credentials.strip()
        elif scheme.lower() == "basic":
            with contextlib.suppress(binascii.Error, UnicodeDecodeError):
                secret = (
                    base64.b64decode(credentials.strip(), validate=True).decode().partition(":")[2]
                )
        return hmac.compare_digest(secret.encode(), self.token.encode())

    def handle(self, method: str, target: str, headers: Mapping[str, str]) -> Response:
        if method not in ("GET", "HEAD"):
            return _text(405, "read-only: GET and HEAD only", Allow="GET, HEAD")
        url = urlsplit(target)
        path = url.path.rstrip("/") or "/"
        if path not in ENDPOINTS:
            return _text(404, f"not found; endpoints: {' '.join(ENDPOINTS)}")
        if path == "/healthz":
            return _text(200, "ok: the process is alive")
        if not self.authorized(headers):
            return _text(
                401,
                "a token is required (Authorization: Bearer TOKEN)",
                **{"WWW-Authenticate": 'Basic realm="incus-caddyfile", charset="UTF-8"'},
            )
        snap = self.board.current()
        if path == "/ask":
            domain = parse_qs(url.query).get("domain", [""])[0]
            if not domain:
                return _text(400, "expected ?domain=NAME")
            allowed = snap.asks(domain)
            self.metrics.asks.labels("allowed" if allowed else "denied").inc()
            if allowed:
                return _text(200, f"{domain} is routed")
            return _text(404, f"{domain} is not routed")
        if path == "/readyz":
            ready, reason = snap.readiness()
            return _text(200 if ready else 503, reason)
        if path == "/routes":
            return Response(200, JSON, routes_json(snap.rows).encode())
        if path == "/state":
            body = json.dumps(snap.state_json(self.clock(), __version__), indent=2) + "\n"
            return Response(200, JSON, body.encode())
        if path == "/metrics":
            return Response(200, CONTENT_TYPE, self.metrics.exposition())
        refresh = page.refresh_of(url.query)
        html = page.render(snap, self.wall(), self.clock(), __version__, refresh)
        return Response(200, "text/html; charset=utf-8", html.encode(), PAGE_HEADERS)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: Caddy's ask and Prometheus reuse connections
    timeout = REQUEST_TIMEOUT_S
    server_version = "incus-caddyfile"
    sys_version = ""
    app: EdgeApp  # set on the subclass a Listener makes

    def _serve(self) -> None:
        response = self.app.handle(self.command, self.path, dict(self.headers.items()))
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in {**SECURITY_HEADERS, **response.headers}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: watch's stderr is its cycle log (and may be JSON)."""

    def address_string(self) -> str:
        return str(self.client_address[0]) if self.client_address else "unix"


class _TCPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _TCP6Server(_TCPServer):
    address_family = socket.AF_INET6


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class Listener:
    """Bound at construction (a bad address or a busy port fails at start, as OSError), served
    from `start` on its own thread until `stop`."""

    def __init__(self, address: Address, app: EdgeApp) -> None:
        self.address = address
        # TCP_NODELAY: headers and body are two writes; with Nagle's algorithm and the
        # client's delayed ACK, each answer on a kept-alive connection waited ~40 ms.
        handler = type(
            "Handler", (_Handler,), {"app": app, "disable_nagle_algorithm": not address.unix}
        )
        self.server: socketserver.BaseServer
        if address.path is not None:
            _clear_stale_socket(Path(address.path))
            old = os.umask(0o117)  # the socket is created 0660: owner and group only
            try:
                self.server = _UnixServer(address.path, handler)
            finally:
                os.umask(old)
        else:
            cls = _TCP6Server if address.ipv6 else _TCPServer
            self.server = cls((address.host, address.port), handler)
        self.thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound TCP port (the one picked, for port 0)."""
        if self.address.path is not None:
            return 0
        return int(self.server.server_address[1])  # type: ignore[index]

    @property
    def where(self) -> str:
        return f"unix/{self.address.path}" if self.address.path else self.address.url(self.port)

    def start(self) -> None:
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.5}, name="listen",
            daemon=True,
        )  # fmt: skip
        self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.server.shutdown()
            self.thread.join(timeout=5)
        self.server.server_close()
        if self.address.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.address.path)


def _clear_stale_socket(path: Path) -> None:
    """A socket left by a process that is gone is removed; anything else there is an error."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: stale
        return
    finally:
        probe.close()
    raise OSError(f"{path}: another process listens there")
