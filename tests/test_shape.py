"""Which sites share one block (a host matcher and a map): `shape.layout`."""

from __future__ import annotations

import dataclasses

from incus_caddyfile.labels import HTTP as L
from incus_caddyfile.model import Instance, Site, Tuning, build
from incus_caddyfile.render import render
from incus_caddyfile.settings import Settings
from incus_caddyfile.shape import GROUP_AT, GROUP_MAX, chunks, layout, shape

from .helpers import inst


def sites_of(instances: list[Instance], tuning: Tuning | None = None) -> tuple[Site, ...]:
    return build(instances, (), tuning=tuning or Tuning()).sites


def alike(
    count: int, prefix: str = "svc", domain: str = "example.org", **labels: str
) -> list[Instance]:
    """`count` instances with one plain host each."""
    return [
        inst(f"{prefix}{i}", host=f"{prefix}{i}.{domain}",
             address=f"198.18.{i // 200}.{i % 200 + 10}", **labels)
        for i in range(count)
    ]  # fmt: skip


def every_site_once(sites: tuple[Site, ...]) -> None:
    out = layout(sites)
    seen = [s.host for g in out.groups for s in g.sites] + [s.host for s in out.sites]
    assert sorted(seen) == sorted(s.host for s in sites)


def test_a_small_fleet_keeps_one_site_per_host() -> None:
    sites = sites_of(alike(GROUP_AT - 1))
    out = layout(sites)
    assert out.groups == ()
    assert out.sites == sites


def test_enough_alike_hosts_make_one_group_in_host_order() -> None:
    sites = sites_of(list(reversed(alike(GROUP_AT))))
    out = layout(sites)
    assert len(out.groups) == 1 and out.sites == ()
    group = out.groups[0]
    assert group.hosts == sorted(s.host for s in sites)
    assert group.entries[0] == ("svc0.example.org", "198.18.0.10:80", "default/svc0")
    assert group.source == "{labels.2}.{labels.1}.{labels.0}"
    assert group.urls == ["{incus_upstream}"]


def test_routes_that_keep_their_own_block() -> None:
    """A pool (its passive health state must stay its own), a path, an https or h2c upstream,
    health_uri, a host with no instance up, and a wildcard host are never grouped, however
    many there are."""
    count = GROUP_AT + 2
    fleets = {
        "pool": [*alike(count), *alike(count, prefix="svc")],
        "path": alike(count, **{L + "matchers.path": "/api"}),
        "https": alike(count, port="443", **{L + "upstream.scheme": "https"}),
        "h2c": alike(count, **{L + "upstream.scheme": "h2c"}),
        "health": alike(count, **{L + "upstream.health_uri": "/health"}),
        "fallback": alike(count, status="Stopped", **{L + "fallback": "true"}),
    }
    for what, fleet in fleets.items():
        if what == "pool":  # the second copy joins each host as a second member
            fleet = [dataclasses.replace(i, name=f"{i.name}-{n}") for n, i in enumerate(fleet)]
        sites = sites_of(fleet)
        assert len(sites) == count, what
        assert all(shape(s) is None for s in sites), what
        assert layout(sites).groups == (), what
    wildcard = Site("*.example.org", sites_of(alike(1))[0].routes)
    assert shape(wildcard) is None


def test_different_options_or_label_counts_make_different_groups() -> None:
    fleet = [
        *alike(GROUP_AT),
        *alike(GROUP_AT, prefix="ws", **{L + "upstream.stream_close_delay": "1h"}),
        *alike(GROUP_AT, prefix="deep", domain="a.example.org"),
        *alike(3, prefix="lone", **{L + "upstream.lb_policy": "first"}),
    ]
    sites = sites_of(fleet)
    out = layout(sites)
    assert [g.hosts[0] for g in out.groups] == [
        "deep0.a.example.org", "svc0.example.org", "ws0.example.org"
    ]  # fmt: skip
    assert [g.number for g in out.groups] == [1, 2, 3]
    assert out.groups[0].source == "{labels.3}.{labels.2}.{labels.1}.{labels.0}"
    assert out.groups[2].route.tuning.stream_close_delay == "1h"
    assert [s.host for s in out.sites] == ["lone0.example.org", "lone1.example.org",
                                           "lone2.example.org"]  # fmt: skip
    every_site_once(sites)


def test_a_pool_with_passive_health_off_is_still_a_pool() -> None:
    """Without fail_duration a pool has no passive health, but two upstreams cannot be one
    placeholder: it keeps its block."""
    second = [dataclasses.replace(i, name=i.name + "b") for i in alike(GROUP_AT)]
    fleet = [*alike(GROUP_AT), *second]
    sites = sites_of(fleet, Tuning(fail_duration=None))
    assert layout(sites).groups == ()


def test_ipv6_upstreams_are_bracketed_in_the_map() -> None:
    fleet = [
        inst(f"v{i}", host=f"v{i}.example.org", address=f"fd42::{i + 1}",
             **{L + "upstream.family": "ipv6"})
        for i in range(GROUP_AT)
    ]  # fmt: skip
    group = layout(sites_of(fleet)).groups[0]
    assert group.entries[0][1] == "[fd42::1]:80"


def test_the_rendered_group_lists_every_host_once_in_matcher_and_map() -> None:
    settings = Settings(scheme="http")
    fleet = alike(40)
    text = render(build(fleet, (), tuning=settings.tuning), settings)
    for i in range(40):
        host = f"svc{i}.example.org"
        assert text.count(f"http://{host},") + text.count(f"http://{host} {{") == 1
        assert text.count(f"\t\t{host} ") == 1
    assert text.count("reverse_proxy") == 1


def test_a_large_fleet_is_split_into_even_groups_in_host_order() -> None:
    sites = sites_of(alike(2 * GROUP_MAX + 3))
    out = layout(sites)
    sizes = [len(g.sites) for g in out.groups]
    assert len(sizes) == 3 and max(sizes) - min(sizes) <= 1 and max(sizes) <= GROUP_MAX
    hosts = [h for g in out.groups for h in g.hosts]
    assert hosts == sorted(s.host for s in sites)
    assert [g.number for g in out.groups] == [1, 2, 3]


def test_chunks_are_even_and_never_larger_than_asked() -> None:
    for count in range(1, 60):
        for most in range(1, 12):
            items = list(range(count))
            parts = chunks(items, most)
            sizes = [len(p) for p in parts]
            assert sum(sizes) == count and max(sizes) <= most
            assert max(sizes) - min(sizes) <= 1
            assert len(parts) == -(-count // most)
            assert [s for p in parts for s in p] == items
