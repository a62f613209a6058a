"""The optional labels: allowlists, pools, paths, readiness, fallback, snippets."""

from __future__ import annotations

import dataclasses

import pytest

from incus_caddyfile import labels as lb
from incus_caddyfile.labels import HTTP as L
from incus_caddyfile.model import Instance, Nic, build, pick_address

from .helpers import inst


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/api", "/api"),
        ("/api/", "/api"),
        ("/", None),
        ("/a/b-c_d.e~f", "/a/b-c_d.e~f"),
        (" /x ", "/x"),
    ],
)
def test_path_accepts(raw: str, expected: str | None) -> None:
    assert lb.parse_path(raw) == expected


@pytest.mark.parametrize(
    "raw", ["api", "/api*", "/api?x=1", "/a b", "/a{", "/a#b", "//x", "/%2e", "/é", ""]
)
def test_path_rejects(raw: str) -> None:
    with pytest.raises(lb.InvalidValue):
        lb.parse_path(raw)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("upstream.family", "ipv5"),
        ("upstream.scheme", "ftp"),
        ("upstream.lb_policy", "cookie"),
        ("upstream.health_uri", "healthz"),
        ("upstream.network", "eth0 {"),
        ("upstream.tls_insecure", "yes"),
        ("upstream.require_ready", "1"),
        ("fallback", "on"),
        ("import", "not-defined"),
        ("matchers.path", "/a b"),
    ],
)
def test_invalid_optional_value_keeps_the_instance_out(key: str, value: str) -> None:
    model = build([inst("web", **{L + key: value})], snippets=("defined",))
    assert model.sites == ()
    [rejection] = model.rejections
    assert rejection.key == L + key and not rejection.ignored


def test_import_names_only_defined_snippets() -> None:
    assert lb.parse_imports("a, b a", ["a", "b"]) == ("a", "b")
    with pytest.raises(lb.InvalidValue, match="not a snippet the operator defined: a, b"):
        lb.parse_imports("/etc/passwd", ["a", "b"])
    with pytest.raises(lb.InvalidValue, match="none are defined"):
        lb.parse_imports("a", [])


def test_pick_address_by_network_and_family() -> None:
    instance = Instance(
        "p",
        "i",
        nics=(
            Nic("eth0", ("198.18.0.5", "fd00::5"), network="front"),
            Nic("eth1", ("198.18.1.5", "fe80::1", "fd00:1::5"), network="back"),
        ),
    )
    assert pick_address(instance) == "198.18.0.5"
    assert pick_address(instance, network="back") == "198.18.1.5"
    assert pick_address(instance, network="eth1", family="ipv6") == "fd00:1::5"
    assert pick_address(instance, family="ipv6") == "fd00::5"
    assert pick_address(instance, network="nope") is None
    v6only = Instance("p", "i", nics=(Nic("eth0", ("fd00::7",)),))
    assert pick_address(v6only, family="any") == "fd00::7"
    assert pick_address(v6only) is None


def test_ipv6_upstream_is_bracketed() -> None:
    v6 = Instance(
        "p",
        "i",
        config={
            L + "enable": "true",
            L + "matchers.host": "a.example.org",
            L + "upstream.port": "80",
            L + "upstream.family": "ipv6",
        },
        nics=(Nic("eth0", ("fd00::7",)),),
    )
    assert build([v6]).sites[0].dials == ["[fd00::7]:80"]


def test_waiting_for_ipv6_address_is_explained() -> None:
    model = build([inst("web", **{L + "upstream.family": "ipv6"})])
    assert model.skipped[0].reason == "running but has no IPv6 address yet"
    web = inst("web", **{L + "upstream.network": "back"})
    with_back = dataclasses.replace(web, nics=(*web.nics, Nic("eth1", (), "back")))
    model = build([with_back])
    assert model.skipped[0].reason == "running but has no IPv4 address on back yet"


@pytest.mark.parametrize("network", ["eth9", "nosuchnet"])
def test_a_nic_or_network_the_instance_does_not_have_is_named(network: str) -> None:
    model = build([inst("web", **{L + "upstream.network": network})])
    assert model.skipped[0].reason == f"has no NIC or network named {network}"


@pytest.mark.parametrize(("ready", "routed"), [(None, False), (False, False), (True, True)])
def test_require_ready(ready: bool | None, routed: bool) -> None:
    base = inst("web", **{L + "upstream.require_ready": "true"})
    model = build(
        [Instance(base.project, base.name, config=base.config, nics=base.nics, ready=ready)]
    )
    assert bool(model.sites) == routed
    if not routed:
        assert model.skipped[0].reason == "port 80 does not accept connections yet"


def test_pool_takes_options_from_its_earliest_instance() -> None:
    first = inst(
        "a",
        address="198.18.0.1",
        created_at="2025-01-01T00:00:00Z",
        **{L + "upstream.lb_policy": "round_robin"},
    )
    later = inst(
        "b",
        address="198.18.0.2",
        created_at="2026-01-01T00:00:00Z",
        **{L + "upstream.lb_policy": "least_conn"},
    )
    model = build([later, first])
    [route] = model.sites[0].routes
    assert route.options.lb_policy == "round_robin" and route.instances == [
        "default/a",
        "default/b",
    ]
    [notice] = model.rejections
    assert notice.ignored and notice.instance == "b" and "takes it from default/a" in notice.reason


def test_a_different_scheme_cannot_join_a_pool() -> None:
    first = inst("a", address="198.18.0.1", created_at="2025-01-01T00:00:00Z")
    later = inst(
        "b",
        address="198.18.0.2",
        port="8443",
        created_at="2026-01-01T00:00:00Z",
        **{L + "upstream.scheme": "https"},
    )
    model = build([first, later])
    assert model.sites[0].instances == ["default/a"]
    [rejection] = model.rejections
    assert not rejection.ignored and "one pool has one scheme" in rejection.reason


def test_paths_are_routes_longest_first_and_default_last() -> None:
    fleet = [
        inst("root", address="198.18.0.1"),
        inst("a", address="198.18.0.2", **{L + "matchers.path": "/a"}),
        inst("ab", address="198.18.0.3", **{L + "matchers.path": "/a/b"}),
    ]
    [site] = build(fleet).sites
    assert [r.path for r in site.routes] == ["/a/b", "/a", None]
    assert site.only_route is None and site.has_default


def test_fallback_keeps_a_stopped_host() -> None:
    down = inst("web", status="Stopped", **{L + "fallback": "true"})
    [site] = build([down]).sites
    assert site.routes[0].upstreams == () and site.routes[0].fallback
    assert build([inst("web", status="Stopped")]).sites == ()


def test_fallback_does_not_hand_a_host_to_another_project() -> None:
    holder = inst(
        "old",
        project="a",
        status="Stopped",
        created_at="2025-01-01T00:00:00Z",
        **{L + "fallback": "true"},
    )
    other = inst("new", project="b", created_at="2026-01-01T00:00:00Z")
    [site] = build([holder, other]).sites
    assert site.routes[0].upstreams == () and site.routes[0].fallback


@pytest.mark.parametrize(
    ("raw", "expected"), [("5m", "5m"), (" 30s ", "30s"), ("0", "0"), ("1m30s", "1m30s"),
                          ("250ms", "250ms"), ("2h", "2h")],
)  # fmt: skip
def test_duration_accepts(raw: str, expected: str) -> None:
    assert lb.parse_duration(raw) == expected


@pytest.mark.parametrize(
    "raw", ["", "5", "5 m", "1d", "-1s", "1.5s", "5M", "5m}", "{env.X}", "5m\nimport x", "00s0"]
)
def test_duration_rejects(raw: str) -> None:
    with pytest.raises(lb.InvalidValue):
        lb.parse_duration(raw)


def _proxied(fleet: list[Instance]) -> dict[str, lb.Tuning]:
    return {s.host: s.routes[0].tuning for s in build(fleet).sites}


def test_stream_close_delay_label_sets_its_pools_delay() -> None:
    tuned = _proxied([
        inst("a", host="a.example.org", **{L + "upstream.stream_close_delay": "1h"}),
        inst("b", host="b.example.org", address="198.18.0.11",
             **{L + "upstream.stream_close_delay": "0"}),
        inst("c", host="c.example.org", address="198.18.0.12"),
    ])  # fmt: skip
    assert tuned["a.example.org"].stream_close_delay == "1h"
    assert tuned["b.example.org"].stream_close_delay is None  # 0: off for that pool
    assert tuned["c.example.org"].stream_close_delay == lb.DEFAULT_STREAM_CLOSE_DELAY


def test_an_invalid_stream_close_delay_keeps_the_instance_out() -> None:
    model = build([inst("a", **{L + "upstream.stream_close_delay": "5 minutes"})])
    assert not model.sites
    assert [r.key for r in model.rejections] == [L + "upstream.stream_close_delay"]


def test_passive_health_only_where_another_member_can_take_over() -> None:
    tuned = _proxied([
        inst("one", host="one.example.org"),
        inst("p1", host="pool.example.org", address="198.18.0.11"),
        inst("p2", host="pool.example.org", address="198.18.0.12"),
        inst("p3", host="pool.example.org", address="198.18.0.13", status="Stopped"),
    ])  # fmt: skip
    assert tuned["one.example.org"].fail_duration is None
    assert tuned["pool.example.org"].fail_duration == lb.DEFAULT_FAIL_DURATION


def test_tuning_zero_means_off() -> None:
    off = lb.Tuning("0", "0", 0, "0", "0")
    assert not off.any and off.dial_timeout is None and lb.Tuning().any
