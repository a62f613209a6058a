"""Pure step 2: Incus instances in, validated sites out.

Nothing here does I/O. Label values are parsed by `labels` (the allowlists); this module
decides who holds which host (policy, conflicts between projects), pools instances into
routes and sorts everything, so that equal fleets render equal bytes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from . import labels as lb
from .labels import (  # re-exported: the model's vocabulary
    KEY_ENABLE,
    KEY_HOST,
    KEY_PORT,
    PREFIX,
    InvalidValue,
    RouteOptions,
    Tuning,
    parse_bool,
    parse_hostname,
    parse_hosts,
    parse_port,
    show,
    show_key,
    usable_address,
)
from .policy import Policy, parent_domain

__all__ = [
    "KEY_ENABLE", "KEY_HOST", "KEY_PORT", "PREFIX", "Instance", "InvalidValue", "Model", "Nic",
    "Policy", "Rejection", "Route", "RouteOptions", "RouteRow", "Site", "Skip", "Tuning",
    "Upstream", "WildcardSite", "build", "explain", "parse_bool", "parse_hostname", "parse_hosts",
    "parse_port", "pick_address",
]  # fmt: skip


# The statuses that route. A paused instance (Frozen) keeps its route: Incus freezes
# containers for a moment while it snapshots them, and dropping the site for that would cost
# two reloads and an outage. Every edge asks `is_up` (and the functions below), never the set.
# Ready is Running as the guest reported it through the guest API (`/dev/incus/sock`).
ROUTABLE_STATUSES = frozenset({"Running", "Frozen", "Ready"})
# Error: Incus cannot tell (an instance on an unreachable cluster member): unknown, not down.
# Its containers keep serving while their member's daemon is dead or cut off, so such an
# instance keeps the route it last had: the addresses it had when last seen, which watch
# keeps in its cache and render in a state file beside the output (`with_last_known`).
# Without them it holds its hosts, unrouted.
UNKNOWN = "Error"  # what the tool calls an instance Incus could not tell it about
UNKNOWN_STATUSES = frozenset({UNKNOWN})
LAST_ROUTE_KEPT = "unknown: member unreachable, last known route kept"


@dataclass(frozen=True)
class Nic:
    """One network interface of an instance, with the addresses Incus knows for it."""

    name: str
    addresses: tuple[str, ...] = ()
    network: str = ""  # the Incus network it is attached to, when known
    interface: str = ""  # its name inside the instance (the live state's), when known
    hwaddr: str = ""  # its MAC address, lower case, when known


@dataclass(frozen=True)
class Instance:
    """An Incus instance as the model needs it: only plain data, no client objects."""

    project: str
    name: str
    status: str = "Running"
    type: str = "container"
    created_at: str = ""
    location: str = ""
    config: Mapping[str, str] = field(default_factory=dict)
    nics: tuple[Nic, ...] = ()
    ready: bool | None = None  # its port accepted a connection (None: not probed)

    @property
    def labels(self) -> dict[str, str]:
        return {k: v for k, v in self.config.items() if k.startswith(PREFIX)}


@dataclass(frozen=True, order=True)
class Upstream:
    """One backend; ordered by project and instance so restarts do not reorder a pool."""

    project: str
    instance: str
    address: str
    port: int
    scheme: str = "http"

    @property
    def dial(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """What reverse_proxy takes: `addr:port`, or `https://` / `h2c://` in front."""
        return self.dial if self.scheme == "http" else f"{self.scheme}://{self.dial}"


@dataclass(frozen=True)
class Route:
    """A path prefix (None: the whole host) of a site, and the pool that serves it."""

    path: str | None
    upstreams: tuple[Upstream, ...]
    options: RouteOptions = field(default_factory=RouteOptions)
    fallback: bool = False  # with no upstream up: answer 503 with a short page
    tuning: Tuning = field(default_factory=Tuning)  # the settings, as this route takes them

    @property
    def block(self) -> bool:
        """True when reverse_proxy needs a `{ }` block (options or tuning to write)."""
        return self.options.block or self.tuning.any

    @property
    def urls(self) -> list[str]:
        return [u.url for u in self.upstreams]

    @property
    def dials(self) -> list[str]:
        return [u.dial for u in self.upstreams]

    @property
    def instances(self) -> list[str]:
        return [f"{u.project}/{u.instance}" for u in self.upstreams]

    @property
    def matcher(self) -> str:
        """A named-matcher name for the path (paths hold only [A-Za-z0-9._~/-])."""
        return "@path" + re.sub(r"[^A-Za-z0-9_-]", "_", self.path or "")


@dataclass(frozen=True)
class Site:
    """One host and its routes: longest path prefix first, the whole host last."""

    host: str
    routes: tuple[Route, ...]

    @property
    def upstreams(self) -> tuple[Upstream, ...]:
        return tuple(u for r in self.routes for u in r.upstreams)

    @property
    def dials(self) -> list[str]:
        return [u.dial for u in self.upstreams]

    @property
    def instances(self) -> list[str]:
        return list(dict.fromkeys(f"{u.project}/{u.instance}" for u in self.upstreams))

    @property
    def only_route(self) -> Route | None:
        """The site's one route, when it has a single route for the whole host (no path), so
        it needs no `handle` blocks; None otherwise."""
        if len(self.routes) == 1 and self.routes[0].path is None:
            return self.routes[0]
        return None

    @property
    def has_default(self) -> bool:
        return any(r.path is None for r in self.routes)

    @property
    def matcher(self) -> str:
        """A Caddy named-matcher name derived from the host (hosts are LDH, so this is safe)."""
        return "@" + self.host.replace("*", "_").replace(".", "_")


@dataclass(frozen=True)
class WildcardSite:
    """A `*.domain` site holding one matcher + handle per routed host under it."""

    domain: str
    sites: tuple[Site, ...]
    catch_all: Site | None = None  # a label host equal to the wildcard itself


@dataclass(frozen=True)
class Rejection:
    """A label value that was refused, with the reason.

    An invalid value keeps the whole instance out; a host lost to another project or to the
    policy only costs that host. `ignored` marks a value that was skipped over (an unknown
    key, a pool option that differs from the pool's) while the instance is still routed.
    """

    project: str
    instance: str
    key: str
    value: str | None  # None: the key is not set
    reason: str
    ignored: bool = False

    @property
    def what(self) -> str:
        """The key and value, or nothing for a verdict on the whole instance (key "")."""
        if not self.key:
            return ""
        value = "(not set)" if self.value is None else show(self.value)
        return f"{show_key(self.key)}={value}: "

    def __str__(self) -> str:
        verb = "ignored" if self.ignored else "rejected"
        return f"{verb} {self.project}/{self.instance}: {self.what}{self.reason}"


@dataclass(frozen=True)
class Skip:
    """An instance that carries labels but is not routed now (stopped, disabled ...), or
    whose status is unknown.

    unknown: Incus cannot say whether it runs (status Error: its cluster member is
    unreachable); it may still be routed, to the addresses it last had. excluded: its
    project is not included by the settings (not reported by render and watch, shown by
    routes)."""

    project: str
    instance: str
    reason: str
    unknown: bool = False
    excluded: bool = False

    def __str__(self) -> str:
        verb = "kept" if self.reason == LAST_ROUTE_KEPT else "skipped"
        return f"{verb} {self.project}/{self.instance}: {self.reason}"


@dataclass(frozen=True)
class Model:
    """Everything the template sees about the fleet, sorted so equal fleets render equal text."""

    sites: tuple[Site, ...]
    wildcard_sites: tuple[WildcardSite, ...] = ()
    rejections: tuple[Rejection, ...] = ()
    skipped: tuple[Skip, ...] = ()

    @property
    def all_sites(self) -> list[Site]:
        out = list(self.sites)
        for w in self.wildcard_sites:
            out.extend(w.sites)
            if w.catch_all:
                out.append(w.catch_all)
        return sorted(out, key=lambda s: s.host)


def pick_address(
    instance: Instance, network: str | None = None, family: str = "ipv4"
) -> str | None:
    """The first usable address of the family, NICs taken in name order so the choice is
    stable; `network` keeps only the NIC of that name or on that Incus network. `any`
    prefers IPv4."""
    nics = sorted(instance.nics, key=lambda n: n.name)
    if network is not None:
        nics = [n for n in nics if network in (n.name, n.network)]
    found = [a for n in nics for raw in n.addresses if (a := usable_address(raw)) is not None]
    versions = {"ipv4": (4,), "ipv6": (6,), "any": (4, 6)}[family]
    for version in versions:
        for addr in found:
            if addr.version == version:
                return str(addr)
    return None


def is_up(inst: Instance) -> bool:
    """The instance is in a status that routes."""
    return inst.status in ROUTABLE_STATUSES


def is_unknown(inst: Instance) -> bool:
    """Incus cannot tell whether it runs (its cluster member is unreachable)."""
    return inst.status in UNKNOWN_STATUSES


def keeps_route(inst: Instance) -> bool:
    """Up, or unknown: then it is routed to the addresses it had when last seen, if any."""
    return is_up(inst) or is_unknown(inst)


def with_last_known(inst: Instance, previous: Instance | None) -> Instance:
    """An unknown instance is listed with its name, status and member only (Incus cannot
    ask its member: no config, no addresses, a zero creation time). It takes its labels,
    creation time (its claim order), addresses and readiness from `previous`, as it was when
    last seen up (or unknown with them). Any other instance is returned as it is."""
    if not is_unknown(inst) or previous is None or not keeps_route(previous):
        return inst
    return dataclasses.replace(
        inst,
        config=inst.config or previous.config,
        created_at=inst.created_at if _known_time(inst.created_at) else previous.created_at,
        nics=inst.nics or previous.nics,
        ready=inst.ready if inst.nics else previous.ready,
    )


def _known_time(timestamp: str) -> bool:
    return bool(timestamp) and not timestamp.startswith("0001-01-01")


def wants_address(inst: Instance) -> bool:
    """Labelled and up: the only instances whose address is worth an Incus request."""
    return is_up(inst) and bool(inst.labels)


def address_of(inst: Instance, reach: lb.Reach) -> str | None:
    """The address an instance is proxied to, if it gets one: up, and holding a usable
    address of the family its labels ask for, on the NIC or network they name."""
    return pick_address(inst, reach.network, reach.family) if keeps_route(inst) else None


def missing_address(inst: Instance) -> bool:
    """Up and labelled, but without the address its labels ask for (with unusable reach
    labels: without any address), so its live state must tell."""
    if not wants_address(inst):
        return False
    reach = lb.reach_of(inst.labels)
    if reach is None:
        return not any(n.addresses for n in inst.nics)
    return address_of(inst, reach) is None


def needs_own_address(inst: Instance) -> bool:
    """Up, labelled, and routed only once its port accepts (require_ready): its address must
    be one the instance reports itself (it has configured it), not merely its DHCP lease.
    Dialling a leased address before the instance has configured it leaves the host's
    neighbour (ARP) entry incomplete, and the next dials wait for the kernel's next ARP try,
    about 1 s later (measured: routes ~590 ms after the port opened, instead of ~35 ms)."""
    reach = lb.reach_of(inst.labels) if wants_address(inst) else None
    return reach is not None and reach.require_ready


def reach_target(inst: Instance) -> tuple[str, int] | None:
    """(address, port) an up instance with valid reach labels is dialled at, if it has its
    address."""
    reach = lb.reach_of(inst.labels) if wants_address(inst) else None
    if reach is None:
        return None
    address = address_of(inst, reach)
    return (address, reach.port) if address else None


def pool_mates(instances: Iterable[Instance], inst: Instance) -> bool:
    """Another up instance of its project, with valid labels, serves one of its hosts on the
    same path: taking it out of its pools leaves someone to serve them."""
    mine = _serves(inst)
    if mine is None:
        return False
    for other in instances:
        if other.project != inst.project or other.name == inst.name or not is_up(other):
            continue
        theirs = _serves(other)
        if theirs and theirs.path == mine.path and set(theirs.hosts) & set(mine.hosts):
            return True
    return False


def _serves(inst: Instance) -> lb.Labels | None:
    """What an enabled instance's labels ask to serve (snippets aside), if they are valid."""
    try:
        if not parse_bool(inst.labels.get(KEY_ENABLE, "false")):
            return None
    except InvalidValue:
        return None
    values = {k: v for k, v in inst.labels.items() if k not in (KEY_ENABLE, lb.KEY_IMPORT)}
    return lb.parse(values)[0]


def probe_target(inst: Instance) -> tuple[str, int] | None:
    """(address, port) to probe for readiness, for an up instance that asks for it (its
    address is then its own: `needs_own_address`)."""
    return reach_target(inst) if needs_own_address(inst) else None


def awaits_address(inst: Instance) -> bool:
    """Up with valid labels, but its address (or, with require_ready, its open port) is not
    there yet: worth polling for, since Incus sends no event when it comes."""
    reach = lb.reach_of(inst.labels) if wants_address(inst) else None
    if reach is None:
        return False
    if address_of(inst, reach) is None:
        return True
    return reach.require_ready and inst.ready is not True


_TIMESTAMP = re.compile(r"(?P<base>[^.Z+]*)(?:\.(?P<frac>[0-9]+))?")


def creation_key(timestamp: str) -> tuple[str, int]:
    """Incus creation times (UTC, 0-9 fraction digits) in an order that compares correctly."""
    m = _TIMESTAMP.match(timestamp)
    assert m is not None  # the pattern matches any string
    return m["base"], int((m["frac"] or "0").ljust(9, "0")[:9])


@dataclass(frozen=True)
class _Claim:
    host: str
    project: str
    instance: str
    order: tuple[tuple[str, int], str, str]  # creation time, project, name: who claimed first
    path: str | None
    options: RouteOptions
    fallback: bool
    upstream: Upstream | None  # None: valid labels, but not routable now (stopped ...)
    holds_only: bool = False  # invalid labels (or refused by Caddy): holds the host, no route


def _unroutable(inst: Instance, wanted: lb.Labels, address: str | None) -> str | None:
    """Why an instance with valid labels gets no upstream right now, if it does not."""
    if is_unknown(inst) and address is None:
        return (
            f"unknown: Incus cannot reach it (status {inst.status}, its cluster member is down"
            " or cut off?), and no earlier route of it is known"
        )
    if not keeps_route(inst):
        return f"not running ({inst.status})"
    if address is None:
        reach = wanted.reach
        if reach.network and not any(reach.network in (n.name, n.network) for n in inst.nics):
            return f"has no NIC or network named {reach.network}"
        where = f" on {reach.network}" if reach.network else ""
        family = {"ipv4": "IPv4 ", "ipv6": "IPv6 ", "any": ""}[reach.family]
        return f"running but has no {family}address{where} yet"
    if wanted.reach.require_ready and inst.ready is not True:
        return f"port {wanted.reach.port} does not accept connections yet"
    return None


def _order(inst: Instance) -> tuple[tuple[str, int], str, str]:
    return (creation_key(inst.created_at), inst.project, inst.name)


def _holding(inst: Instance) -> list[_Claim]:
    """Claims that only hold the valid hosts an instance names, without a route: its labels
    became invalid (or Caddy refused its route), and a typo must not hand its hosts to
    another project. Only dropping the host label, enable=false or deleting it releases them."""
    return [
        _Claim(h, inst.project, inst.name, _order(inst), None, RouteOptions(), False, None, True)
        for h in lb.valid_hosts(inst.labels.get(KEY_HOST, ""))
    ]


def _claims_of(
    inst: Instance, snippets: Iterable[str], refused: str | None = None
) -> tuple[list[_Claim], list[Rejection], Skip | None]:
    """Validate one instance's labels; return its host claims, rejections, or why it is skipped.

    A stopped instance with valid labels still claims its hosts (without an upstream), so that
    another project cannot take a host over while its holder is down; so does one whose labels
    are invalid, or whose route Caddy refused (`refused`: Caddy's reason).
    """
    values = inst.labels
    if KEY_ENABLE not in values:
        return [], [], Skip(inst.project, inst.name, f"{KEY_ENABLE} is not set")
    try:
        if not parse_bool(values[KEY_ENABLE]):
            return [], [], Skip(inst.project, inst.name, f"{KEY_ENABLE} is false")
    except InvalidValue as exc:
        reject = Rejection(inst.project, inst.name, KEY_ENABLE, values[KEY_ENABLE], str(exc))
        return _holding(inst), [reject], None
    wanted, problems = lb.parse({k: v for k, v in values.items() if k != KEY_ENABLE}, snippets)
    rejections = [
        Rejection(inst.project, inst.name, p.key, p.value, p.reason, p.ignored) for p in problems
    ]
    if wanted is None:
        return _holding(inst), rejections, None
    if refused is not None:
        verdict = Rejection(
            inst.project, inst.name, "", None, f"Caddy refused its route: {refused}"
        )
        return _holding(inst), [*rejections, verdict], None
    reach = wanted.reach
    address = address_of(inst, reach)
    why_not = _unroutable(inst, wanted, address)
    upstream = None
    if why_not is None and address is not None:
        upstream = Upstream(inst.project, inst.name, address, reach.port, wanted.options.scheme)
    claims = [
        _Claim(h, inst.project, inst.name, _order(inst), wanted.path, wanted.options,
               wanted.fallback, upstream)
        for h in wanted.hosts
    ]  # fmt: skip
    skip = None
    if why_not or is_unknown(inst):
        skip = Skip(inst.project, inst.name, why_not or LAST_ROUTE_KEPT, unknown=is_unknown(inst))
    return claims, rejections, skip


def _overlapping(host: str) -> list[str]:
    """Hosts whose sites would serve some of the same names: itself, and a wildcard and an
    exact host one label below it (Caddy's `*.` matches exactly one label)."""
    if host.startswith("*."):
        return [host]  # exact hosts under it are found through their own wildcard key
    return [host, "*." + parent_domain(host)] if parent_domain(host) else [host]


def _hold(claims: Iterable[_Claim]) -> tuple[list[_Claim], list[Rejection]]:
    """Decide who holds each host. Claims are taken oldest first; a claim that overlaps a
    kept claim from another project (the same host, or a wildcard and a host under it) is
    refused, naming the holder. One project may pool a host (load balancing) and may hold
    both a wildcard and hosts under it. A stopped holder still holds: its host gets no site
    rather than going to another project.
    """
    kept: dict[str, list[_Claim]] = {}
    rejections: list[Rejection] = []
    children: dict[str, list[_Claim]] = {}  # "*.d" -> kept exact claims one label under d
    for claim in sorted(claims, key=lambda c: (c.order, c.host)):
        rivals = [k for h in _overlapping(claim.host) for k in kept.get(h, [])]
        rivals += children.get(claim.host, [])
        holder = next((r for r in rivals if r.project != claim.project), None)
        if holder is not None:
            what = "host" if holder.host == claim.host else f"overlapping {holder.host}"
            rejections.append(
                Rejection(
                    claim.project,
                    claim.instance,
                    KEY_HOST,
                    claim.host,
                    f"{what} already claimed by {holder.project}/{holder.instance}"
                    " (created earlier, in another project)",
                )
            )
            continue
        kept.setdefault(claim.host, []).append(claim)
        if not claim.host.startswith("*.") and parent_domain(claim.host):
            children.setdefault("*." + parent_domain(claim.host), []).append(claim)
    return [c for group in kept.values() for c in group], rejections


_POOL_OPTIONS = {
    "tls_insecure": lb.KEY_TLS_INSECURE,
    "lb_policy": lb.KEY_LB_POLICY,
    "health_uri": lb.KEY_HEALTH_URI,
    "imports": lb.KEY_IMPORT,
    "stream_close_delay": lb.KEY_STREAM_CLOSE_DELAY,
}


def _tuning(base: Tuning, options: RouteOptions, members: int) -> Tuning:
    """The settings as one route takes them: the pool's own stream_close_delay label wins;
    passive health only where another member can take over (two or more upstreams), since
    a lone upstream marked down would turn every request away until fail_duration ends."""
    return dataclasses.replace(
        base,
        stream_close_delay=options.stream_close_delay or base.stream_close_delay,
        fail_duration=base.fail_duration if members > 1 else None,
    )


def _pool(
    host: str,
    path: str | None,
    group: list[_Claim],
    tuning: Tuning,
    draining: frozenset[tuple[str, str]] = frozenset(),
) -> tuple[Route | None, list[Rejection]]:
    """One route from the claims of one host and path (all of one project): the earliest
    claim sets the pool's options; a different scheme cannot share the pool. Members that
    are draining are left out while another member can serve; a pool of only draining
    members keeps them (there is nowhere else to send its requests)."""
    group = sorted(group, key=lambda c: c.order)
    first = group[0]
    rejections = []
    members = []
    for c in group:
        if c.options.scheme != first.options.scheme:
            rejections.append(Rejection(
                c.project, c.instance, lb.KEY_SCHEME, c.options.scheme,
                f"{host}{path or ''} is served over {first.options.scheme} by"
                f" {first.project}/{first.instance}; one pool has one scheme",
            ))  # fmt: skip
            continue
        members.append(c)
        for attr, key in _POOL_OPTIONS.items():
            mine = getattr(c.options, attr)
            if mine and mine != getattr(first.options, attr):  # set, and not the pool's
                rejections.append(Rejection(
                    c.project, c.instance, key, str(getattr(c.options, attr)),
                    f"the pool for {host}{path or ''} takes it from"
                    f" {first.project}/{first.instance}", ignored=True,
                ))  # fmt: skip
    upstreams = tuple(sorted(c.upstream for c in members if c.upstream is not None))
    staying = tuple(u for u in upstreams if (u.project, u.instance) not in draining)
    upstreams = staying or upstreams
    fallback = any(c.fallback for c in members)
    if not upstreams and not fallback:
        return None, rejections
    route_tuning = _tuning(tuning, first.options, len(upstreams))
    return Route(path, upstreams, first.options, fallback, route_tuning), rejections


def _sites(
    claims: list[_Claim], tuning: Tuning, draining: frozenset[tuple[str, str]]
) -> tuple[list[Site], list[Rejection]]:
    by_route: dict[tuple[str, str | None], list[_Claim]] = {}
    for c in claims:
        if c.holds_only:
            continue  # holds its host against other projects, routes nothing
        by_route.setdefault((c.host, c.path), []).append(c)
    routes: dict[str, list[Route]] = {}
    rejections: list[Rejection] = []
    for (host, path), group in sorted(by_route.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        route, refused = _pool(host, path, group, tuning, draining)
        rejections.extend(refused)
        if route is not None:
            routes.setdefault(host, []).append(route)
    sites = [
        Site(host, tuple(sorted(rs, key=lambda r: (r.path is None, -len(r.path or ""), r.path))))
        for host, rs in sorted(routes.items())
    ]
    return sites, rejections


def in_wildcard(host: str, domain: str) -> bool:
    """True when `host` is exactly one label under the wildcard `domain` ('*.example.org')."""
    suffix = domain[1:]  # ".example.org"
    return host.endswith(suffix) and "." not in host[: -len(suffix)] and host != suffix[1:]


def _group_wildcards(
    sites: list[Site], wildcards: Iterable[str]
) -> tuple[list[Site], list[WildcardSite]]:
    remaining = list(sites)
    groups: list[WildcardSite] = []
    for domain in sorted(wildcards):
        inside = [s for s in remaining if s.host != domain and in_wildcard(s.host, domain)]
        catch_all = next((s for s in remaining if s.host == domain), None)
        taken = {s.host for s in inside} | ({domain} if catch_all else set())
        remaining = [s for s in remaining if s.host not in taken]
        groups.append(WildcardSite(domain, tuple(inside), catch_all))
    return remaining, groups


def _allowed(claims: list[_Claim], policy: Policy) -> tuple[list[_Claim], list[Rejection]]:
    kept, refused = [], []
    for claim in claims:
        reason = policy.refuses(claim.project, claim.host)
        if reason is None:
            kept.append(claim)
        else:
            refused.append(Rejection(claim.project, claim.instance, KEY_HOST, claim.host, reason))
    return kept, refused


def build(
    instances: Iterable[Instance],
    wildcards: Iterable[str] = (),
    policy: Policy | None = None,
    snippets: Iterable[str] = (),
    refused: Mapping[tuple[str, str], str] | None = None,
    tuning: Tuning | None = None,
    draining: Iterable[tuple[str, str]] = (),
) -> Model:
    """Turn the listing into a model. Invalid values are rejected one by one, never fatal.
    `refused`: instances whose routes Caddy refused, with Caddy's reason; they hold their
    hosts but get no route. `tuning`: how Caddy treats the routes' traffic (the settings).
    `draining`: (project, name) of instances that are stopping, restarting or being deleted,
    or that came back and whose port does not accept yet (watch knows): each is left out of
    its pools while another member can serve them."""
    policy = policy or Policy()
    refused = refused or {}
    snippets = tuple(snippets)
    claims: list[_Claim] = []
    rejections: list[Rejection] = []
    skipped: list[Skip] = []
    for inst in sorted(instances, key=lambda i: (i.project, i.name)):
        if not inst.labels:
            continue
        if not policy.considers(inst.project):
            reason = "project not included by the settings"
            skipped.append(Skip(inst.project, inst.name, reason, excluded=True))
            continue
        verdict = refused.get((inst.project, inst.name))
        inst_claims, inst_rejections, skip = _claims_of(inst, snippets, verdict)
        inst_claims, disallowed = _allowed(inst_claims, policy)
        rejections.extend(inst_rejections + disallowed)
        claims.extend(inst_claims)
        if skip is not None:
            skipped.append(skip)
    held, conflicts = _hold(claims)
    sites, pool_rejections = _sites(held, tuning or Tuning(), frozenset(draining))
    plain, grouped = _group_wildcards(sites, wildcards)
    return Model(
        sites=tuple(plain),
        wildcard_sites=tuple(grouped),
        rejections=tuple(
            sorted(
                rejections + conflicts + pool_rejections,
                key=lambda r: (r.project, r.instance, r.key),
            )
        ),
        skipped=tuple(skipped),
    )


@dataclass(frozen=True)
class RouteRow:
    """One labelled instance, as `incus-caddyfile routes` shows it."""

    project: str
    instance: str
    status: str
    location: str
    hosts: tuple[str, ...]  # the valid hosts it asks for
    upstream: str | None  # address:port, when it has one
    routed: tuple[str, ...]  # hosts (with path) Caddy sends to it
    reasons: tuple[str, ...]  # why (some) hosts are not routed, or what was ignored
    path: str | None = None  # the path prefix it asks for
    unknown: bool = False  # Incus cannot tell its status (cluster member unreachable)

    @property
    def asked(self) -> tuple[str, ...]:
        """The hosts it asks for, with its path: what `routed` is compared with."""
        return tuple(h + (self.path or "") for h in self.hosts)

    @property
    def state(self) -> str:
        if self.unknown:  # routed to its last known address, or not at all
            return "unknown"
        if self.routed and set(self.asked) <= set(self.routed):
            return "routed"
        return "partly routed" if self.routed else "not routed"


def explain(instances: Iterable[Instance], model: Model) -> list[RouteRow]:
    """Per instance: what it asks for, what it got, and why not (from the model's verdicts)."""
    routed: dict[tuple[str, str], list[str]] = {}
    dials: dict[tuple[str, str], str] = {}
    for site in model.all_sites:
        for route in site.routes:
            for u in route.upstreams:
                routed.setdefault((u.project, u.instance), []).append(
                    site.host + (route.path or "")
                )
                dials[(u.project, u.instance)] = u.dial
    reasons: dict[tuple[str, str], list[str]] = {}
    for r in model.rejections:
        value = "(not set)" if r.value is None else show(r.value)
        prefix = "ignored" if r.ignored else "rejected"
        reasons.setdefault((r.project, r.instance), []).append(
            f"{prefix} {r.key}={value}: {r.reason}"
        )
    unknown = {(sk.project, sk.instance) for sk in model.skipped if sk.unknown}
    for sk in model.skipped:
        reasons.setdefault((sk.project, sk.instance), []).append(sk.reason)
    rows = []
    for inst in sorted(instances, key=lambda i: (i.project, i.name)):
        if not inst.labels:
            continue
        key = (inst.project, inst.name)
        hosts = tuple(lb.valid_hosts(inst.labels.get(KEY_HOST, "")))
        try:
            path = lb.parse_path(inst.labels.get(lb.KEY_PATH, "/"))
        except InvalidValue:
            path = None
        rows.append(
            RouteRow(
                project=inst.project,
                instance=inst.name,
                status=inst.status,
                location=inst.location,
                hosts=hosts,
                upstream=dials.get(key) or _would_dial(inst),
                routed=tuple(sorted(routed.get(key, []))),
                reasons=tuple(reasons.get(key, [])),
                path=path,
                unknown=key in unknown,
            )
        )
    return rows


def _would_dial(inst: Instance) -> str | None:
    """address:port of a running instance that is not routed, when both are known."""
    reach = lb.reach_of(inst.labels)
    address = address_of(inst, reach) if reach is not None else None
    if reach is None or address is None:
        return None
    return Upstream(inst.project, inst.name, address, reach.port).dial if address else None
