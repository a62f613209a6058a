"""Pure: how the sites are laid out in the generated Caddyfile, for Caddy's routing cost.

Caddy tries a server's routes in order, one host matcher each, so a request for the last of
1000 one-host sites pays for 999 misses first (measured: 0.38x the requests/s of a one-site
config). A host matcher of more than 100 hosts is searched in log time instead. So hosts
whose sites are alike (one route for the whole host, to one plain-HTTP upstream, with the
same options) share one site block, and a `map` from host to upstream picks the dial
address.

What may share a block is decided here and only here. A shared `reverse_proxy` keeps one
health state for its placeholder upstream, so a route with passive or active health checks
(a pool, `health_uri`) keeps its own block: one tenant's failing instance must never mark
another's down. A placeholder upstream cannot carry a scheme either, so `https://` and
`h2c://` upstreams keep theirs too.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from .model import Route, Site

# Below this many alike hosts a group saves little (each route costs ~1 % of the requests/s
# of a one-site config) and one block per host reads better: small fleets keep them.
GROUP_AT = 16

# Caddy's map is searched in order (a few ns an entry) and a missed group costs a route
# (~150 ns: the host matcher's binary search and the route itself): groups of at most 250
# hosts keep both small at 1000 hosts. Groups of more than 100 hosts get the binary search.
GROUP_MAX = 250

UPSTREAM_PLACEHOLDER = "{incus_upstream}"

T = TypeVar("T")


@dataclass(frozen=True)
class HostGroup:
    """Alike sites served by one block: a host matcher of all their hosts and a map from host
    to upstream. `number` names the group's matcher (`@incus_group_N`) inside a wildcard site."""

    number: int
    sites: tuple[Site, ...]

    @property
    def hosts(self) -> list[str]:
        return [s.host for s in self.sites]

    @property
    def route(self) -> Route:
        """The route every member has, but for its upstream: options and tuning to render."""
        route = self.sites[0].only_route
        assert route is not None
        return route

    @property
    def entries(self) -> list[tuple[str, str, str]]:
        """(host, dial address, instance) for each member, in host order."""
        out = []
        for site in self.sites:
            route = site.only_route
            assert route is not None
            out.append((site.host, route.dials[0], route.instances[0]))
        return out

    @property
    def source(self) -> str:
        """The request's host, in lower case, as a map source: `{labels.N}` placeholders give
        lower-cased labels, and the map compares exactly while host matchers ignore case.
        Every host of a group has the same number of labels."""
        count = self.hosts[0].count(".") + 1
        return ".".join(f"{{labels.{i}}}" for i in reversed(range(count)))

    @property
    def matcher(self) -> str:
        return f"@incus_group_{self.number}"

    @property
    def urls(self) -> list[str]:
        return [UPSTREAM_PLACEHOLDER]


@dataclass(frozen=True)
class Layout:
    """The sites of one server (or of one wildcard site): groups first, then the rest."""

    groups: tuple[HostGroup, ...]
    sites: tuple[Site, ...]


def shape(site: Site) -> Hashable | None:
    """What a site must share with another to be served from the same block; None when it
    needs a block of its own."""
    route = site.only_route
    if route is None or len(route.upstreams) != 1:
        return None  # paths, pools, the 503 page of a host with no instance up
    upstream = route.upstreams[0]
    if upstream.scheme != "http" or route.options.health_uri or route.tuning.fail_duration:
        return None
    if site.host.startswith("*."):
        return None  # a wildcard host is matched by pattern, never by the map
    return (site.host.count("."), route.options, route.tuning)


def layout(sites: Sequence[Site], at: int = GROUP_AT, most: int = GROUP_MAX) -> Layout:
    """Group alike sites when at least `at` share a shape, in groups of at most `most` hosts
    (of even sizes, in host order); keep the others (and small groups) as they are, in their
    order."""
    by_shape: dict[Hashable, list[Site]] = {}
    for site in sites:
        key = shape(site)
        if key is not None:
            by_shape.setdefault(key, []).append(site)
    grouped = [
        chunk
        for alike in by_shape.values()
        if len(alike) >= at
        for chunk in chunks(sorted(alike, key=lambda s: s.host), most)
    ]
    grouped.sort(key=lambda g: g[0].host)
    members = {s.host for g in grouped for s in g}
    return Layout(
        groups=tuple(HostGroup(i, tuple(g)) for i, g in enumerate(grouped, start=1)),
        sites=tuple(s for s in sites if s.host not in members),
    )


def chunks(items: list[T], most: int) -> list[list[T]]:
    """The items in the fewest runs of at most `most`, of sizes that differ by one at most."""
    count = -(-len(items) // most)
    size, extra = divmod(len(items), count)
    out, start = [], 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out
