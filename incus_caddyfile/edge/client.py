"""`routes --from URL` and `doctor --from URL`: read what a running `watch --listen` serves, so
the operator sees what the running edge sees (no Incus or Caddy request of their own)."""

from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass
from typing import Any

from .address import AddressError, parse

TIMEOUT_S = 10.0


class EdgeUnreachable(Exception):
    """No watch answered at the address, or it answered with an error."""


class EdgeRefused(EdgeUnreachable):
    """The watch wants a token (401): none was given, or a wrong one."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: str


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def get(url: str, path: str, token: str | None, timeout: float = TIMEOUT_S) -> Answer:
    """GET `path` of the watch at `url` (`http://HOST:PORT`, `HOST:PORT` or `unix//path`).
    Raises EdgeUnreachable (EdgeRefused on 401), AddressError for a bad URL."""
    address = parse(url, "--from")
    conn: http.client.HTTPConnection
    if address.path is not None:
        conn = _UnixConnection(address.path, timeout)
    else:
        conn = http.client.HTTPConnection(address.host, address.port, timeout=timeout)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        answer = Answer(response.status, response.read().decode("utf-8", "replace"))
    except (OSError, http.client.HTTPException) as exc:
        raise EdgeUnreachable(f"no watch answers at {address}: {exc}") from None
    finally:
        conn.close()
    if answer.status == 401:
        raise EdgeRefused(
            f"the watch at {address} wants its token: give --listen-token-file FILE (or"
            " INCUS_CADDYFILE_LISTEN_TOKEN)" + (" (the one given is wrong)" if token else "")
        )
    return answer


def get_json(url: str, path: str, token: str | None) -> Any:
    answer = get(url, path, token)
    if answer.status != 200:
        raise EdgeUnreachable(f"{path} answered {answer.status}: {answer.body.strip()}")
    try:
        return json.loads(answer.body)
    except ValueError:
        raise EdgeUnreachable(f"{path} did not answer with JSON: is {url} a watch?") from None


__all__ = ["AddressError", "Answer", "EdgeRefused", "EdgeUnreachable", "get", "get_json"]
