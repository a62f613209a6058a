"""Whole fleets with random combinations of every optional label, through the real Caddy.

Properties, for any fleet: Caddy accepts the rendered config as it is (the model knows every
rule Caddy enforces about these labels, so nothing is left for Caddy to refuse); an instance
is routed exactly when an oracle written independently of the model says its labels are
valid and it is up with the address it asks for; and no instance changes whether another is
routed (each instance is routed in the fleet exactly as it is alone).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from incus_caddyfile.caddy import AdminAPI
from incus_caddyfile.labels import HTTP
from incus_caddyfile.model import Instance, Model, Nic, build
from incus_caddyfile.render import render
from incus_caddyfile.settings import Settings

pytestmark = pytest.mark.caddy

SNIPPETS = Path(__file__).parent / "fixtures" / "snippets.caddy"
DEFINED = ("security-headers", "internal-only")

# Each optional label: plausible values, valid and not, so that combinations are common.
OPTIONAL: dict[str, list[str]] = {
    "matchers.path": ["/api", "/api/v1", "/", "/a b", "/x/*"],
    "upstream.port": ["80", "443", "8080", "8443", "80/tcp", "0"],
    "upstream.scheme": ["http", "https", "h2c", "HTTPS", "gopher"],
    "upstream.tls_insecure": ["true", "false", "yes"],
    "upstream.lb_policy": ["first", "round_robin", "ip_hash", "fastest"],
    "upstream.health_uri": ["/healthz", "/", "health"],
    "upstream.family": ["ipv4", "ipv6", "any", "ipx"],
    "upstream.network": ["eth0", "eth1", "back", "eth9"],
    "upstream.require_ready": ["true", "false"],
    "fallback": ["true", "false", "1"],
    "import": ["security-headers", "internal-only security-headers", "undefined"],
    "enable": ["true", "false", "TRUE", "yes"],
}
STATUSES = ["Running", "Running", "Ready", "Frozen", "Stopped", "Error"]


@st.composite
def fleets(draw: st.DrawFn) -> list[Instance]:
    size = draw(st.integers(1, 7))
    fleet = []
    for n in range(size):
        chosen = draw(st.dictionaries(st.sampled_from(sorted(OPTIONAL)), st.just(""), max_size=6))
        labels = {k: draw(st.sampled_from(OPTIONAL[k])) for k in chosen}
        config = {
            HTTP + "enable": "true",
            HTTP + "matchers.host": f"h{n}.example.org",  # its own host: no conflicts
            HTTP + "upstream.port": "8080",
            **{HTTP + k: v for k, v in labels.items()},
        }
        nics = (Nic("eth0", (f"198.18.0.{n + 1}",), "lab"),)
        if draw(st.booleans()):  # a second NIC, dual stack, on another network
            nics += (Nic("eth1", (f"198.18.1.{n + 1}", f"fd42::{n + 1}"), "back"),)
        fleet.append(
            Instance(
                project=f"p{n % 3}",
                name=f"i{n}",
                status=draw(st.sampled_from(STATUSES)),
                created_at=f"2026-01-01T00:00:{n:02d}Z",
                config=config,
                nics=nics,
                ready=draw(st.sampled_from([True, False, None])),
            )
        )
    return fleet


# ---- the oracle: the rules restated, independently of incus_caddyfile.labels and .model

PATH = re.compile(r"/[A-Za-z0-9._~/-]*")


def oracle_address(inst: Instance, network: str | None, family: str) -> str | None:
    nics = [n for n in sorted(inst.nics, key=lambda n: n.name)
            if network is None or network in (n.name, n.network)]  # fmt: skip
    addresses = [a for n in nics for a in n.addresses]
    for want_v6 in {"ipv4": [False], "ipv6": [True], "any": [False, True]}[family]:
        for a in addresses:
            if (":" in a) == want_v6:
                return a
    return None


def oracle_routed(inst: Instance) -> bool:
    """Valid labels, up, with the address (and open port) asked for."""
    v = {k.removeprefix(HTTP): val for k, val in inst.config.items()}
    if v["enable"].lower() != "true":
        return False
    port = v["upstream.port"]
    if not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
        return False
    scheme = v.get("upstream.scheme", "http").lower()
    if scheme not in ("http", "https", "h2c"):
        return False
    if (scheme, int(port)) in {("https", 80), ("http", 443), ("h2c", 443)}:
        return False  # Caddy refuses these pairs
    if v.get("upstream.tls_insecure", "false").lower() not in ("true", "false"):
        return False
    if v.get("upstream.tls_insecure", "false").lower() == "true" and scheme != "https":
        return False
    if v.get("upstream.lb_policy", "first") not in ("first", "round_robin", "ip_hash"):
        return False
    path = v.get("matchers.path", "/")
    if not PATH.fullmatch(path) or "//" in path:
        return False
    if not PATH.fullmatch(v.get("upstream.health_uri", "/")):
        return False
    family = v.get("upstream.family", "ipv4").lower()
    if family not in ("ipv4", "ipv6", "any"):
        return False
    if v.get("fallback", "false").lower() not in ("true", "false"):
        return False
    if v.get("upstream.require_ready", "false") not in ("true", "false"):
        return False
    if "import" in v and not all(n in DEFINED for n in v["import"].split()):
        return False
    # Error: its cluster member cannot be asked; it keeps the route to what it last had
    if inst.status not in ("Running", "Ready", "Frozen", "Error"):
        return False
    if oracle_address(inst, v.get("upstream.network"), family) is None:
        return False
    return v.get("upstream.require_ready") != "true" or inst.ready is True


def routed(model: Model) -> set[str]:
    return {u.instance for s in model.all_sites for u in s.upstreams}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleets())
def test_random_fleets_render_what_caddy_accepts_and_route_every_valid_instance(
    caddy_admin: AdminAPI, fleet: list[Instance]
) -> None:
    model = build(fleet, snippets=DEFINED)
    text = render(model, Settings(scheme="http", snippets=SNIPPETS))
    config: dict[str, Any] = caddy_admin.adapt(text)  # raises CaddyRejected if refused
    servers = config.get("apps", {}).get("http", {}).get("servers", {}).values()
    hosts = {h for srv in servers for r in srv.get("routes", []) for m in r.get("match", [])
             for h in m.get("host", [])}  # fmt: skip
    assert hosts == {s.host for s in model.all_sites}
    expected = {i.name for i in fleet if oracle_routed(i)}
    assert routed(model) == expected
    for inst in fleet:  # nobody changes another's fate
        alone = build([inst], snippets=DEFINED)
        assert (inst.name in routed(alone)) == (inst.name in routed(model)), inst.name
