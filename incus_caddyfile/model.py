"""Pure step 2: Incus instances in, validated sites out.

Nothing here does I/O. Every value an instance owner wrote is checked against a strict
allowlist before it can reach a template, because Caddyfile quoting is not escaping: a newline,
a brace, `import` or `{env.X}` in a label would change the structure of the generated file.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

PREFIX = "user.caddyserver."
KEY_ENABLE = PREFIX + "http.enable"
KEY_HOST = PREFIX + "http.matchers.host"
KEY_PORT = PREFIX + "http.upstream.port"
KNOWN_KEYS = frozenset({KEY_ENABLE, KEY_HOST, KEY_PORT})

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_PORT = re.compile(r"[0-9]{1,5}")
_HOST_SEPARATORS = re.compile(r"[ \t,]+")
MAX_HOSTNAME = 253
# Bare words Caddy reads as directives where a site address would stand.
CADDYFILE_KEYWORDS = frozenset({"import"})
MAX_SHOWN_VALUE = 80


@dataclass(frozen=True)
class Nic:
    """One network interface of an instance, with the addresses Incus knows for it."""

    name: str
    addresses: tuple[str, ...] = ()


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

    @property
    def ref(self) -> str:
        return f"{self.project}/{self.name}"

    @property
    def labels(self) -> dict[str, str]:
        return {k: v for k, v in self.config.items() if k.startswith(PREFIX)}


@dataclass(frozen=True, order=True)
class Upstream:
    """One backend of a site; ordered by project and instance so restarts do not reorder."""

    project: str
    instance: str
    address: str
    port: int

    @property
    def dial(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Site:
    """One host and the upstreams that serve it (several means load balancing)."""

    host: str
    upstreams: tuple[Upstream, ...]

    @property
    def dials(self) -> list[str]:
        return [u.dial for u in self.upstreams]

    @property
    def instances(self) -> list[str]:
        return [f"{u.project}/{u.instance}" for u in self.upstreams]

    @property
    def matcher(self) -> str:
        """A Caddy named-matcher name derived from the host (hosts are LDH, so this is safe)."""
        return "@" + self.host.replace("*", "_").replace(".", "_")


@dataclass(frozen=True)
class WildcardSite:
    """A `*.domain` site holding one matcher + handle per routed host under it."""

    domain: str
    routes: tuple[Site, ...]
    fallback: Site | None = None


@dataclass(frozen=True)
class Rejection:
    """A label value that was refused, with the reason.

    A bad enable, host or port value keeps the whole instance out; a host lost to another
    project only costs that host. `ignored` marks a value that was skipped over (an unknown
    key) while the instance is still routed.
    """

    project: str
    instance: str
    key: str
    value: str | None  # None: the key is not set
    reason: str
    ignored: bool = False

    def __str__(self) -> str:
        value = "(not set)" if self.value is None else _show(self.value)
        verb = "ignored" if self.ignored else "rejected"
        return f"{verb} {self.project}/{self.instance}: {self.key}={value}: {self.reason}"


@dataclass(frozen=True)
class Skip:
    """An instance that carries labels but is deliberately not routed (stopped, disabled ...)."""

    project: str
    instance: str
    reason: str

    def __str__(self) -> str:
        return f"skipped {self.project}/{self.instance}: {self.reason}"


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
            out.extend(w.routes)
            if w.fallback:
                out.append(w.fallback)
        return sorted(out, key=lambda s: s.host)


class InvalidValue(ValueError):
    """A label or setting value outside the allowlist; the message is the reason."""


def _show(value: str) -> str:
    """Render an untrusted value for a message: escaped, and cut when very long."""
    shown = repr(value)
    if len(shown) > MAX_SHOWN_VALUE:
        shown = shown[: MAX_SHOWN_VALUE - 3] + "..."
    return shown


def parse_hostname(raw: str) -> str:
    """One hostname: LDH labels, optionally a single leading `*.`; returned lowercased."""
    if not raw.isascii():
        raise InvalidValue("not an ASCII hostname (write internationalised names as xn-- punycode)")
    host = raw.lower()
    if len(host) > MAX_HOSTNAME:
        raise InvalidValue(f"hostname longer than {MAX_HOSTNAME} characters")
    labels = host.split(".")
    if labels[0] == "*":
        labels = labels[1:]
        if not labels:
            raise InvalidValue("a wildcard needs a domain after '*.'")
    if host in CADDYFILE_KEYWORDS:
        raise InvalidValue("a Caddyfile keyword, not usable as a site address")
    for label in labels:
        if label == "*" or "*" in label:
            raise InvalidValue("'*' is only allowed as the whole first label ('*.example.org')")
        if not _LABEL.fullmatch(label):
            raise InvalidValue(
                "not a hostname: labels are letters, digits and inner hyphens, 1-63 characters,"
                " separated by single dots"
            )
    return host


def parse_hosts(raw: str) -> list[str]:
    """Hostnames separated by spaces or commas. Raises on the first invalid one."""
    parts = [p for p in _HOST_SEPARATORS.split(raw.strip()) if p]
    if not parts:
        raise InvalidValue("no hostname given")
    hosts = []
    for part in parts:
        try:
            hosts.append(parse_hostname(part))
        except InvalidValue as exc:
            raise InvalidValue(f"{_show(part)}: {exc}") from None
    return hosts


def parse_port(raw: str) -> int:
    value = raw.strip()
    if not _PORT.fullmatch(value) or not 1 <= int(value) <= 65535:
        raise InvalidValue("not a port number from 1 to 65535")
    return int(value)


def parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("true", "false"):
        return value == "true"
    raise InvalidValue("must be true or false")


def usable_address(raw: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address a proxy can dial: not loopback, link-local, multicast or unspecified."""
    try:
        addr = ipaddress.ip_address(raw.split("%")[0])
    except ValueError:
        return None
    if addr.is_loopback or addr.is_link_local or addr.is_multicast or addr.is_unspecified:
        return None
    return addr


def pick_address(instance: Instance) -> str | None:
    """The first usable IPv4 address, NICs taken in name order so the choice is stable."""
    for nic in sorted(instance.nics, key=lambda n: n.name):
        for raw in nic.addresses:
            addr = usable_address(raw)
            if addr is not None and addr.version == 4:
                return str(addr)
    return None


def _parent(host: str) -> str:
    """`shop.example.org` -> `example.org`; the domain a one-label wildcard would cover."""
    return host.split(".", 1)[1] if "." in host else ""


def _covers(pattern: str, host: str) -> bool:
    """Every name `host` can serve is allowed by `pattern` ('*.e' = anything below e)."""
    if not pattern.startswith("*."):
        return host == pattern
    below = pattern[2:]
    domain = host[2:] if host.startswith("*.") else host
    return (host.startswith("*.") and domain == below) or domain.endswith("." + below)


def _touches(pattern: str, host: str) -> bool:
    """Some name `host` can serve is in `pattern` (a wildcard host serves one label)."""
    if _covers(pattern, host):
        return True
    if host.startswith("*.") and not pattern.startswith("*."):
        return _parent(pattern) == host[2:]
    return False


@dataclass(frozen=True)
class Policy:
    """Which projects count, and which hosts each may claim (the settings' [projects]).

    A project with a `domains` list may claim only hosts those patterns cover; the patterns
    of every listed project are reserved for it, so no other project can claim into them.
    `"*"` gives the list for projects not named. No list at all: anything not reserved.
    """

    include: tuple[str, ...] = ()  # glob patterns of project names; empty: every project
    exclude: tuple[str, ...] = ()
    domains: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (project, patterns)

    def considers(self, project: str) -> bool:
        included = not self.include or any(fnmatch.fnmatchcase(project, p) for p in self.include)
        return included and not any(fnmatch.fnmatchcase(project, p) for p in self.exclude)

    def patterns(self, project: str) -> tuple[str, ...] | None:
        table = dict(self.domains)
        return table.get(project, table.get("*"))

    def refuses(self, project: str, host: str) -> str | None:
        """Why `project` may not claim `host`, or None when it may."""
        own = self.patterns(project)
        if own is not None and not any(_covers(p, host) for p in own):
            allowed = ", ".join(own) or "nothing"
            return f"project {project} may only claim hosts under: {allowed} (settings file)"
        if project in dict(self.domains):
            return None  # its own explicit list covers the host
        for other, patterns in self.domains:
            if other not in (project, "*") and any(_touches(p, host) for p in patterns):
                return f"reserved for project {other} by the settings file"
        return None


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
    upstream: Upstream | None  # None: valid labels, but not routable now (stopped, no address)


def _claims_of(inst: Instance) -> tuple[list[_Claim], list[Rejection], Skip | None]:
    """Validate one instance's labels; return its host claims, rejections, or why it is skipped.

    A stopped instance with valid labels still claims its hosts (without an upstream), so that
    another project cannot take a host over while its holder is down.
    """
    labels = inst.labels
    rejections: list[Rejection] = []

    def reject(key: str, reason: str, ignored: bool = False) -> None:
        rejections.append(
            Rejection(inst.project, inst.name, key, labels.get(key), reason, ignored=ignored)
        )

    if KEY_ENABLE not in labels:
        return [], [], Skip(inst.project, inst.name, f"{KEY_ENABLE} is not set")
    try:
        if not parse_bool(labels[KEY_ENABLE]):
            return [], [], Skip(inst.project, inst.name, f"{KEY_ENABLE} is false")
    except InvalidValue as exc:
        reject(KEY_ENABLE, str(exc))
        return [], rejections, None

    for key in sorted(labels):
        if key not in KNOWN_KEYS:
            reject(key, "unknown key, check the spelling", ignored=True)

    hosts: list[str] = []
    port: int | None = None
    if KEY_HOST not in labels:
        reject(KEY_HOST, "missing: the instance needs at least one hostname")
    else:
        try:
            hosts = parse_hosts(labels[KEY_HOST])
        except InvalidValue as exc:
            reject(KEY_HOST, str(exc))
    if KEY_PORT not in labels:
        reject(KEY_PORT, "missing: the port the instance serves HTTP on")
    else:
        try:
            port = parse_port(labels[KEY_PORT])
        except InvalidValue as exc:
            reject(KEY_PORT, str(exc))
    if not hosts or port is None:
        return [], rejections, None

    upstream: Upstream | None = None
    skip: Skip | None = None
    address = pick_address(inst)
    if inst.status != "Running":
        skip = Skip(inst.project, inst.name, f"not running ({inst.status})")
    elif address is None:
        skip = Skip(inst.project, inst.name, "running but has no IPv4 address yet")
    else:
        upstream = Upstream(inst.project, inst.name, address, port)
    order = (creation_key(inst.created_at), inst.project, inst.name)
    claims = [_Claim(h, inst.project, inst.name, order, upstream) for h in dict.fromkeys(hosts)]
    return claims, rejections, skip


def _overlapping(host: str) -> list[str]:
    """Hosts whose sites would serve some of the same names: itself, and a wildcard and an
    exact host one label below it (Caddy's `*.` matches exactly one label)."""
    if host.startswith("*."):
        return [host]  # exact hosts under it are found through their own wildcard key
    return [host, "*." + _parent(host)] if _parent(host) else [host]


def _resolve(claims: Iterable[_Claim]) -> tuple[list[Site], list[Rejection]]:
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
        if not claim.host.startswith("*.") and _parent(claim.host):
            children.setdefault("*." + _parent(claim.host), []).append(claim)
    sites = []
    for host in sorted(kept):
        upstreams = sorted(c.upstream for c in kept[host] if c.upstream is not None)
        if upstreams:
            sites.append(Site(host, tuple(upstreams)))
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
        routes = [s for s in remaining if s.host != domain and in_wildcard(s.host, domain)]
        fallback = next((s for s in remaining if s.host == domain), None)
        taken = {s.host for s in routes} | ({domain} if fallback else set())
        remaining = [s for s in remaining if s.host not in taken]
        groups.append(WildcardSite(domain, tuple(routes), fallback))
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
    instances: Iterable[Instance], wildcards: Iterable[str] = (), policy: Policy | None = None
) -> Model:
    """Turn the listing into a model. Invalid values are rejected one by one, never fatal."""
    policy = policy or Policy()
    claims: list[_Claim] = []
    rejections: list[Rejection] = []
    skipped: list[Skip] = []
    for inst in sorted(instances, key=lambda i: (i.project, i.name)):
        if not inst.labels:
            continue
        if not policy.considers(inst.project):
            skipped.append(Skip(inst.project, inst.name, "project not included by the settings"))
            continue
        inst_claims, inst_rejections, skip = _claims_of(inst)
        inst_claims, refused = _allowed(inst_claims, policy)
        rejections.extend(refused)
        claims.extend(inst_claims)
        rejections.extend(inst_rejections)
        if skip is not None:
            skipped.append(skip)
    sites, conflicts = _resolve(claims)
    rejections.extend(conflicts)
    plain, grouped = _group_wildcards(sites, wildcards)
    return Model(
        sites=tuple(plain),
        wildcard_sites=tuple(grouped),
        rejections=tuple(sorted(rejections, key=lambda r: (r.project, r.instance, r.key))),
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
    routed: tuple[str, ...]  # hosts Caddy sends to it
    reasons: tuple[str, ...]  # why (some) hosts are not routed, or what was ignored

    @property
    def state(self) -> str:
        if self.routed and len(self.routed) == len(self.hosts):
            return "routed"
        return "partly routed" if self.routed else "not routed"


def explain(instances: Iterable[Instance], model: Model) -> list[RouteRow]:
    """Per instance: what it asks for, what it got, and why not (from the model's verdicts)."""
    routed: dict[tuple[str, str], list[str]] = {}
    dials: dict[tuple[str, str], str] = {}
    for site in model.all_sites:
        for u in site.upstreams:
            routed.setdefault((u.project, u.instance), []).append(site.host)
            dials[(u.project, u.instance)] = u.dial
    reasons: dict[tuple[str, str], list[str]] = {}
    for r in model.rejections:
        value = "(not set)" if r.value is None else _show(r.value)
        prefix = "ignored" if r.ignored else "rejected"
        reasons.setdefault((r.project, r.instance), []).append(
            f"{prefix} {r.key}={value}: {r.reason}"
        )
    for sk in model.skipped:
        reasons.setdefault((sk.project, sk.instance), []).append(sk.reason)
    rows = []
    for inst in sorted(instances, key=lambda i: (i.project, i.name)):
        if not inst.labels:
            continue
        key = (inst.project, inst.name)
        try:
            hosts = tuple(parse_hosts(inst.labels.get(KEY_HOST, "")))
        except InvalidValue:
            hosts = ()
        upstream = dials.get(key) or _would_dial(inst)
        rows.append(
            RouteRow(
                project=inst.project,
                instance=inst.name,
                status=inst.status,
                location=inst.location,
                hosts=hosts,
                upstream=upstream,
                routed=tuple(sorted(routed.get(key, []))),
                reasons=tuple(reasons.get(key, [])),
            )
        )
    return rows


def _would_dial(inst: Instance) -> str | None:
    """address:port of a running instance that is not routed, when both are known."""
    address = pick_address(inst) if inst.status == "Running" else None
    try:
        port = parse_port(inst.labels.get(KEY_PORT, ""))
    except InvalidValue:
        return None
    return Upstream(inst.project, inst.name, address, port).dial if address else None
