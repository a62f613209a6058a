"""The status page of `watch --listen`: server-rendered HTML from `templates/status.html.j2`
(shipped in the wheel beside Caddyfile.j2), no JavaScript, refreshed by the browser itself.

The template gets plain view data built here from the snapshot; every value is HTML-escaped
(autoescape), since host names and reasons come from instance labels."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

import jinja2

from ..model import RouteRow
from ..render import default_template_dir
from .metrics import rejected_instances, verdict_of
from .snapshot import EXCLUDED, Snapshot

TEMPLATE = "status.html.j2"
REFRESH_S = 5  # the default; ?refresh=0 turns it off (WCAG 2.2.1: the user can stop it)
REFRESH_RANGE = (2, 3600)


def refresh_of(query: str) -> int:
    """Seconds between reloads asked in the query (`?refresh=N`, 0: off), else the default."""
    from urllib.parse import parse_qs

    value = parse_qs(query).get("refresh", [""])[0]
    if not value.isdigit():
        return REFRESH_S
    seconds = int(value)
    return 0 if seconds == 0 else min(max(seconds, REFRESH_RANGE[0]), REFRESH_RANGE[1])


@functools.lru_cache(maxsize=1)
def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(default_template_dir())),
        undefined=jinja2.StrictUndefined,
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template(TEMPLATE)


def ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s ago"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


@dataclass(frozen=True)
class RouteView:
    address: str  # host + path
    instances: list[str]
    upstreams: list[str]
    state: str
    css: str
    reason: str


@dataclass(frozen=True)
class InstanceView:
    row: RouteRow
    verdict: str
    css: str


TARGET_CSS = {"current": "ok", "pending": "warn", "failed": "bad"}
VERDICT_CSS = {"routed": "ok", "rejected": "bad", "unknown": "warn", "skipped": "muted"}


def _routes(snap: Snapshot) -> list[RouteView]:
    out = []
    for site in snap.sites:
        for route in site.routes:
            address = site.host + (route.path or "")
            if route.upstreams:
                state, css, reason = "routed", "ok", ""
                if route.options.scheme != "http":
                    reason = f"to the instances over {route.options.scheme}"
            else:
                state, css = "fallback page", "warn"
                reason = "no instance is up: Caddy answers 503 with a short page"
            out.append(RouteView(address, route.instances, route.urls, state, css, reason))
    return out


def view(
    snap: Snapshot, wall_now: float, clock_now: float, version: str, refresh: int = REFRESH_S
) -> dict[str, Any]:
    """The template's context."""
    ready, reason = snap.readiness()
    rejected = rejected_instances(snap)
    instances: list[InstanceView] = []
    excluded: list[InstanceView] = []
    for row in snap.rows:
        verdict = verdict_of(row, rejected)
        item = InstanceView(row, verdict, VERDICT_CSS[verdict])
        (excluded if row.reasons == (EXCLUDED,) else instances).append(item)
    if snap.incus_connected and not snap.resync_pending:
        incus = ("connected", "ok", "the event stream is up")
    elif snap.incus_connected:
        incus = ("resyncing", "warn", "reconnected; listing everything again")
    else:
        incus = ("down", "bad", snap.incus_reason)
    if not snap.synced:
        caddy = ("waiting", "warn", "no full sync yet")
    elif snap.reload_pending:
        caddy = ("reload pending", "bad", snap.last_error or "")
    elif snap.last_error:
        caddy = ("last cycle failed", "bad", snap.last_error)
    elif not snap.reloading:
        caddy = ("not reloaded", "muted", "--no-reload: the file is current")
    else:
        caddy = ("current", "ok", "Caddy runs the current file")
    since = None if snap.last_sync is None else clock_now - snap.last_sync
    return {
        "version": version,
        "refresh": refresh,
        "default_refresh": REFRESH_S,
        "now": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(wall_now)),
        "ready": ready,
        "reason": reason,
        "incus": incus,
        "caddy": caddy,
        "last_sync": ago(since),
        "counts": snap.counts(),
        "cycle_count": snap.cycle_count,
        "targets": [
            (t, TARGET_CSS.get(t.state, "bad"), ago(wall_now - t.since_wall)) for t in snap.targets
        ]
        if len(snap.targets) > 1
        else [],
        "reconnects": snap.reconnects,
        "routes": _routes(snap),
        "instances": instances,
        "excluded": excluded,
        "rejections": [r for r in snap.rejections if not r.ignored],
        "ignored": [r for r in snap.rejections if r.ignored],
        "cycles": [
            {
                "when": time.strftime("%H:%M:%S", time.localtime(c.at)),
                "ago": ago(wall_now - c.at),
                "record": c,
            }
            for c in snap.cycles
        ],
    }


def render(
    snap: Snapshot, wall_now: float, clock_now: float, version: str, refresh: int = REFRESH_S
) -> str:
    return _template().render(view(snap, wall_now, clock_now, version, refresh))
