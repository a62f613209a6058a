"""Hostile label values never change the structure of the Caddyfile.

Property: for any label values, the rendered Caddyfile is accepted by the real Caddy (its
admin /adapt endpoint, i.e. `caddy adapt`), every site address and upstream in Caddy's own
parse of it matches the allowlist, and the sites are exactly the valid claims. The oracle
for "valid" here is written independently of incus_caddyfile.model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from incus_caddyfile.caddy import AdminAPI
from incus_caddyfile.labels import HTTP, KEY_ENABLE, KEY_HOST, KEY_PORT
from incus_caddyfile.model import Instance, Nic, build
from incus_caddyfile.render import render
from incus_caddyfile.settings import Settings

pytestmark = pytest.mark.caddy  # every test here asks the real Caddy

CORPUS = json.loads((Path(__file__).parent / "corpus" / "hostile_values.json").read_text())
KEYS = {"host": KEY_HOST, "port": KEY_PORT, "enable": KEY_ENABLE}
GOOD = {"host": "good.example.org", "port": "80", "enable": "true"}

# The oracle: an independent statement of the allowlist.
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
HOST_RE = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})*")
DIAL_RE = re.compile(r"198\.18\.\d{1,3}\.\d{1,3}:\d{1,5}")


def oracle_hosts(value: str) -> list[str] | None:
    parts = [p for p in re.split(r"[ \t,]+", value.strip()) if p]
    if not parts or not value.isascii():
        return None
    hosts = [p.lower() for p in parts]
    if all(HOST_RE.fullmatch(h) and len(h) <= 253 and h != "import" for h in hosts):
        return hosts
    return None


def oracle_port(value: str) -> bool:
    v = value.strip()
    return v.isascii() and v.isdigit() and 1 <= int(v) <= 65535


def oracle_enable(value: str) -> bool:
    return value.strip().lower() == "true"


def oracle_routed(labels: dict[str, str]) -> list[str]:
    if not (oracle_enable(labels["enable"]) and oracle_port(labels["port"])):
        return []
    return oracle_hosts(labels["host"]) or []


def fleet_of(label_sets: list[dict[str, str]]) -> list[Instance]:
    return [
        Instance(
            project="default",
            name=f"i{n}",
            created_at=f"2026-01-01T00:00:{n:02d}Z",
            config={KEYS[k]: v for k, v in labels.items()},
            nics=(Nic("eth0", (f"198.18.0.{n + 1}",)),),
        )
        for n, labels in enumerate(label_sets)
    ]


def caddy_sites(config: dict[str, Any]) -> dict[str, set[str]]:
    """Host -> dials, from Caddy's own JSON for the Caddyfile."""
    out: dict[str, set[str]] = {}
    for server in config.get("apps", {}).get("http", {}).get("servers", {}).values():
        for route in server.get("routes", []):
            hosts = [h for m in route.get("match", []) for h in m.get("host", [])]
            dials = set(_dials(route))
            for host in hosts:
                out.setdefault(host, set()).update(dials)
    return out


def _dials(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if "dial" in node:
            yield node["dial"]
        for value in node.values():
            yield from _dials(value)
    elif isinstance(node, list):
        for value in node:
            yield from _dials(value)


def check(admin: AdminAPI, label_sets: list[dict[str, str]], scheme: str = "https") -> None:
    fleet = fleet_of(label_sets)
    text = render(build(fleet), Settings(scheme=scheme))
    config = admin.adapt(text)  # raises CaddyRejected if Caddy refuses it
    sites = caddy_sites(config)
    expected: dict[str, set[str]] = {}
    for inst, labels in zip(fleet, label_sets, strict=True):
        for host in oracle_routed(labels):
            dial = f"{inst.nics[0].addresses[0]}:{int(labels['port'].strip())}"
            expected.setdefault(host, set()).add(dial)
    assert sites == expected
    for host, dials in sites.items():
        assert HOST_RE.fullmatch(host), host
        assert all(DIAL_RE.fullmatch(d) for d in dials), dials


NASTY = [
    "\n",
    "\r",
    "}",
    "{",
    '"',
    "'",
    "`",
    "#",
    "{$HOME}",
    "{env.X}",
    "{file./x}",
    "import",
    " ",
    ",",
    "\t",
    "\x00",
    "\u0435",
    "\uff0e",
    "\u200b",
    "\u202e",
    "*",
    ".",
    "-",
    ":",
    "/",
    "\\",
    "@",
    "..",
    "*.",
    "80",
    "true",
    "a.example.org",
]
fragment = st.one_of(
    st.sampled_from(NASTY), st.text(max_size=8), st.from_regex(r"[a-z0-9-]{1,10}", fullmatch=True)
)
value = st.one_of(
    st.lists(fragment, max_size=8).map("".join),
    st.text(max_size=40),
    st.text(min_size=200, max_size=400),
)
labels = st.fixed_dictionaries(
    {
        "host": st.one_of(
            value, st.from_regex(r"(\*\.)?[a-z]{1,8}(\.[a-z]{1,8}){0,3}", fullmatch=True)
        ),
        "port": st.one_of(value, st.integers(-5, 70000).map(str)),
        "enable": st.one_of(value, st.sampled_from(["true", "TRUE", " true ", "false"])),
    }
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(labels, min_size=1, max_size=4), st.sampled_from(["https", "http"]))
def test_any_label_values_render_a_caddyfile_caddy_accepts(
    caddy_admin: AdminAPI, label_sets: list[dict[str, str]], scheme: str
) -> None:
    check(caddy_admin, label_sets, scheme)


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 40
    assert {e["accepted"] for e in CORPUS} == {True, False}


@pytest.mark.parametrize("entry", CORPUS, ids=lambda e: f"{e['key']}:{e['value'][:30]!r}")
def test_corpus_value_verdict(entry: dict[str, Any]) -> None:
    labels = {**GOOD, entry["key"]: entry["value"]}
    model = build(fleet_of([labels]))
    routed = bool(model.sites)
    assert routed == entry["accepted"], [str(r) for r in model.rejections]
    assert routed == bool(oracle_routed(labels))  # the oracle agrees with the corpus
    if not routed:
        [rejection] = [r for r in model.rejections if not r.ignored]
        assert rejection.key == KEYS[entry["key"]]


def test_whole_corpus_in_one_fleet_is_accepted_by_caddy(caddy_admin: AdminAPI) -> None:
    label_sets = [{**GOOD, e["key"]: e["value"]} for e in CORPUS]
    for n, labels in enumerate(label_sets):  # distinct good hosts, so every claim counts
        if labels["host"] == GOOD["host"]:
            labels["host"] = f"good{n}.example.org"
    check(caddy_admin, label_sets)


# The optional labels, fuzzed on one instance at a time (pools are unit-tested elsewhere).
SNIPPETS_FILE = Path(__file__).parent / "fixtures" / "snippets.caddy"
DEFINED = ("security-headers", "internal-only")
PATH_RE = re.compile(r"/[A-Za-z0-9._~/-]*")
VALID = {
    "matchers.path": st.from_regex(r"/[a-z0-9/._~-]{0,12}", fullmatch=True),
    "upstream.health_uri": st.from_regex(r"/[a-z]{0,8}", fullmatch=True),
    "upstream.scheme": st.sampled_from(["http", "HTTPS", " h2c "]),
    "upstream.lb_policy": st.sampled_from(["round_robin", "least_conn", "first"]),
    "upstream.family": st.sampled_from(["ipv4", "any"]),
    "upstream.network": st.just("eth0"),
    "import": st.sampled_from(["security-headers", "internal-only, security-headers"]),
}
# Mostly plausible values (so routed results are checked too), hostile ones a quarter of the time.
OPTIONAL = {HTTP + k: st.one_of(value, v, v, v) for k, v in VALID.items()}


def oracle_optional(key: str, raw: str) -> bool | None:
    """Valid (True), invalid (False), or valid but leaving the instance without an address
    (None), by an independent statement of each allowlist."""
    v = raw.strip()
    short = key.rsplit(".", 1)[1]
    if short == "path":
        return bool(PATH_RE.fullmatch(v)) and "//" not in v and len(v) <= 256
    if short == "health_uri":
        return bool(PATH_RE.fullmatch(v)) and len(v) <= 256
    if short in ("scheme", "lb_policy", "family"):
        allowed = {
            "scheme": {"http", "https", "h2c"},
            "lb_policy": {
                "random",
                "round_robin",
                "least_conn",
                "first",
                "ip_hash",
                "client_ip_hash",
                "uri_hash",
            },
            "family": {"ipv4", "ipv6", "any"},
        }[short]
        if v.lower() not in allowed:
            return False
        return None if v.lower() == "ipv6" else True  # the fleet has IPv4 only
    if short == "network":
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", v):
            return False
        return True if v == "eth0" else None
    names = [n for n in re.split(r"[ \t,]+", v) if n]
    return bool(names) and all(n in DEFINED for n in names)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional=OPTIONAL))
def test_any_optional_label_values_render_a_caddyfile_caddy_accepts(
    caddy_admin: AdminAPI, extra: dict[str, str]
) -> None:
    base = {"host": "fuzz.example.org", "port": "8080", "enable": "true"}
    [inst] = fleet_of([base])
    inst = Instance(
        inst.project,
        inst.name,
        created_at=inst.created_at,
        nics=inst.nics,
        config={**inst.config, **extra},
    )
    text = render(build([inst], snippets=DEFINED), Settings(snippets=SNIPPETS_FILE))
    sites = caddy_sites(caddy_admin.adapt(text))
    verdicts = [oracle_optional(k, v) for k, v in extra.items()]
    routed = all(v is True for v in verdicts)
    assert sites == ({"fuzz.example.org": {"198.18.0.1:8080"}} if routed else {})
    for host, dials in sites.items():
        assert HOST_RE.fullmatch(host) and all(DIAL_RE.fullmatch(d) for d in dials)
