"""Setting up `watch --listen`: the address, the token, the state the loop feeds, the listener."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..settings import Settings, SettingsError
from .address import AddressError, parse
from .keeper import EdgeState
from .listener import EdgeApp, Listener


class EdgeSetupError(ValueError):
    """The listener cannot be set up as asked (a usage error: exit 2)."""


def read_token(token: str | None, token_file: Path | None) -> str | None:
    """The token from --listen-token or the first line of --listen-token-file (not both)."""
    if token is not None and token_file is not None:
        raise EdgeSetupError("give --listen-token or --listen-token-file, not both")
    if token_file is not None:
        try:
            lines = token_file.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise EdgeSetupError(f"--listen-token-file: cannot read {token_file}: {why}") from None
        token = lines[0] if lines else ""
        where = f"--listen-token-file {token_file}"
    else:
        where = "--listen-token"
    if token is None:
        return None
    token = token.strip()
    if len(token) < 16 or any(c.isspace() for c in token):
        raise EdgeSetupError(
            f"{where}: the token must be at least 16 characters without spaces"
            " (e.g. `openssl rand -hex 32`)"
        )
    return token


@dataclass
class Edge:
    state: EdgeState
    listener: Listener

    @property
    def ask_url(self) -> str:
        """What Caddy asks before it gets a certificate on demand."""
        return self.listener.address.url(self.listener.port) + "/ask"


def setup(
    listen: str,
    token: str | None,
    token_file: Path | None,
    reloading: bool = True,
    log: Callable[..., None] | None = None,
) -> Edge:
    """Check the address and token, bind the listener (not serving yet). Raises
    EdgeSetupError: a non-loopback address without a token, a bad address, a busy port."""
    try:
        address = parse(listen)
    except AddressError as exc:
        raise EdgeSetupError(str(exc)) from None
    secret = read_token(token, token_file)
    if not address.loopback and secret is None:
        raise EdgeSetupError(
            f"--listen {listen}: not a loopback address, so a token is required: give"
            " --listen-token-file FILE (or INCUS_CADDYFILE_LISTEN_TOKEN); or listen on"
            " 127.0.0.1:PORT or unix//path"
        )
    state = (
        EdgeState(reloading=reloading) if log is None else EdgeState(reloading=reloading, log=log)
    )
    try:
        listener = Listener(address, EdgeApp(state.board, state.metrics, secret))
    except OSError as exc:
        raise EdgeSetupError(f"--listen {listen}: {exc.strerror or exc}") from None
    return Edge(state, listener)


def check_ask(edge: Edge) -> None:
    """On-demand TLS: Caddy asks over plain HTTP and sends no token, so the listener must be
    on a loopback TCP address (Caddy runs on this host, next to the file the watch writes)."""
    address = edge.listener.address
    if address.unix or not address.loopback:
        edge.listener.stop()
        raise EdgeSetupError(
            f"--on-demand-tls: Caddy asks the watch over HTTP, without a token: --listen must"
            f" be a loopback TCP address such as 127.0.0.1:9180, not {address}"
        )


def with_ask(load: Callable[[], Settings], ask_url: str | None) -> Callable[[], Settings]:
    """The settings, with the ask URL filled in when they turn on-demand TLS on (the settings
    file may turn it on later: without a listener that reload is refused and logged)."""

    def load_with_ask() -> Settings:
        settings = load()
        if not settings.on_demand_tls:
            return settings
        if ask_url is None:
            raise SettingsError("--on-demand-tls needs --listen 127.0.0.1:PORT")
        return dataclasses.replace(settings, on_demand_ask=ask_url)

    return load_with_ask
