"""What `--listen` and `--from` name: `HOST:PORT` (an IP address or `localhost`; `[::1]:PORT` for
IPv6) or `unix//path`. Only a loopback address or a unix socket may listen without a token."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


class AddressError(ValueError):
    """The address cannot be used; the message says why."""


@dataclass(frozen=True)
class Address:
    host: str = ""  # "" for a unix socket
    port: int = 0
    path: str | None = None  # the unix socket

    @property
    def unix(self) -> bool:
        return self.path is not None

    @property
    def loopback(self) -> bool:
        """Reachable from this host only: a unix socket, `localhost` or a loopback IP."""
        if self.path is not None or self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def ipv6(self) -> bool:
        return ":" in self.host

    def url(self, port: int | None = None) -> str:
        """`http://HOST:PORT`, for an HTTP client on this host (IPv6 in brackets)."""
        host = f"[{self.host}]" if self.ipv6 else self.host
        return f"http://{host}:{self.port if port is None else port}"

    def __str__(self) -> str:
        return f"unix/{self.path}" if self.path is not None else self.url().removeprefix("http://")


def parse(value: str, what: str = "--listen") -> Address:
    """`HOST:PORT`, `[IPv6]:PORT`, `unix//path`; `http://HOST:PORT` is taken too (for --from).
    Port 0 (listen only): any free port. Raises AddressError."""
    text = value.strip()
    if text.startswith("unix/"):
        path = text[len("unix/") :]
        if not path.startswith("/"):
            raise AddressError(f"{what}: a unix socket needs an absolute path: unix//run/x.sock")
        return Address(path=path)
    text = text.removeprefix("http://").rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise AddressError(
            f"{what}: expected HOST:PORT (e.g. 127.0.0.1:9180) or unix//path, got {value!r}"
        )
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host:
        raise AddressError(
            f"{what}: name the address to listen on: 127.0.0.1:{port} for this host only,"
            f" 0.0.0.0:{port} for every interface (with a token)"
        )
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise AddressError(
                f"{what}: {host!r} is not an IP address (or localhost); name the address itself"
            ) from None
    return Address(host=host, port=int(port))
