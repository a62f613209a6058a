"""`routes --from URL` and `doctor --from URL`: read what a running `watch --listen` serves, so
the operator sees what the running edge sees (no Incus or Caddy request of their own)."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from typing import Any

from ..doctor import Check
from ..unixhttp import UnixConnection
from .address import AddressError, parse

__all__ = [
    "AddressError", "Answer", "EdgeRefused", "EdgeUnreachable", "doctor_checks", "get", "get_json",
]  # fmt: skip

TIMEOUT_S = 10.0


class EdgeUnreachable(Exception):
    """No watch answered at the address, or it answered with an error."""


class EdgeRefused(EdgeUnreachable):
    """The watch wants a token (401): none was given, or a wrong one."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: str


def get(url: str, path: str, token: str | None, timeout: float = TIMEOUT_S) -> Answer:
    """GET `path` of the watch at `url` (`http://HOST:PORT`, `HOST:PORT` or `unix//path`).
    Raises EdgeUnreachable (EdgeRefused on 401), AddressError for a bad URL."""
    address = parse(url, "--from")
    conn: http.client.HTTPConnection
    if address.path is not None:
        conn = UnixConnection(address.path, timeout)
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


def doctor_checks(url: str, token: str | None) -> list[Check]:
    """`doctor --from`: the running watch's own view (its /state), check by check."""
    try:
        state = get_json(url, "/state", token)
    except EdgeUnreachable as exc:
        fix = (
            "give the watch's token: --listen-token-file FILE"
            if isinstance(exc, EdgeRefused)
            else "start `incus-caddyfile watch --listen ADDR` (or fix --from to its address)"
        )
        return [Check("watch", False, str(exc), fix)]
    checks = [Check("watch", True, f"incus-caddyfile {state.get('version', '?')} answers at {url}")]
    incus, caddy = state.get("incus", {}), state.get("caddy", {})
    if incus.get("connected"):
        resync = "; resyncing after a reconnect" if incus.get("resync_pending") else ""
        detail = f"the event stream is up ({incus.get('reconnects', 0)} reconnect(s)){resync}"
        checks.append(Check("incus", True, detail))
    else:
        checks.append(Check(
            "incus", False, f"the watch cannot reach Incus: {incus.get('reason')}",
            "start incusd (the watch reconnects by itself, with backoff); see its log",
        ))  # fmt: skip
    if caddy.get("current"):
        how = "" if caddy.get("reloading", True) else " (--no-reload: not reloaded by the watch)"
        checks.append(Check("caddy", True, f"runs the current file{how}"))
    elif caddy.get("reload_pending"):
        checks.append(Check(
            "caddy", False, f"a reload is pending: {state.get('last_error')}",
            "start Caddy with the watch's admin address; the watch retries the reload",
        ))  # fmt: skip
    else:
        checks.append(Check(
            "caddy", False, str(state.get("last_error") or "no full sync yet"),
            "see the last cycle below and the watch's log",
        ))  # fmt: skip
    targets = state.get("targets") or []
    for target in targets[:] if len(targets) > 1 else ():
        current = target.get("state") == "current"
        checks.append(Check(
            f"target {target.get('name')}", current,
            str(target.get("state")) + (f": {target['reason']}" if target.get("reason") else ""),
            "" if current else "start that Caddy (or fix its admin address); the watch retries it",
        ))  # fmt: skip
    cycles = state.get("last_cycles") or []
    if cycles:
        last = cycles[0]
        detail = (
            f"{last.get('outcome')} after {', '.join(last.get('triggers', []))}:"
            f" {last.get('summary')} ({last.get('duration_ms')} ms);"
            f" {state.get('cycles', 0)} cycle(s) in all"
        )
        fix = (
            ""
            if last.get("ok")
            else "see the message; `incus-caddyfile routes --from` shows each instance"
        )
        checks.append(Check("last cycle", bool(last.get("ok")), detail, fix))
    counts = state.get("counts", {})
    checks.append(Check(
        "routes", True,
        f"{counts.get('sites', 0)} site(s); {counts.get('routed', 0)} instance(s) routed,"
        f" {counts.get('not_routed', 0)} not routed, {counts.get('unknown', 0)} unknown;"
        f" {counts.get('rejected_labels', 0)} rejected label value(s)",
    ))  # fmt: skip
    since = state.get("seconds_since_sync")
    age = f"; last successful cycle {since:.0f} s ago" if since is not None else ""
    checks.append(Check("ready", bool(state.get("ready")), f"{state.get('reason')}{age}",
                        "see the checks above"))  # fmt: skip
    return checks
