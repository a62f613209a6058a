"""The label schema: which `user.caddyserver.*` keys exist and the allowlist of each value.

Pure. Caddyfile quoting is not escaping (a newline, a brace, `import`, `{$VAR}` or `{env.X}`
would change the structure of the generated file), so every value an instance owner writes
is checked here against a strict allowlist before it can reach a template.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

PREFIX = "user.caddyserver."
HTTP = PREFIX + "http."
KEY_ENABLE = HTTP + "enable"
KEY_HOST = HTTP + "matchers.host"
KEY_PATH = HTTP + "matchers.path"
KEY_PORT = HTTP + "upstream.port"
KEY_NETWORK = HTTP + "upstream.network"
KEY_FAMILY = HTTP + "upstream.family"
KEY_SCHEME = HTTP + "upstream.scheme"
KEY_TLS_INSECURE = HTTP + "upstream.tls_insecure"
KEY_LB_POLICY = HTTP + "upstream.lb_policy"
KEY_HEALTH_URI = HTTP + "upstream.health_uri"
KEY_REQUIRE_READY = HTTP + "upstream.require_ready"
KEY_FALLBACK = HTTP + "fallback"
KEY_IMPORT = HTTP + "import"
KEY_STREAM_CLOSE_DELAY = HTTP + "upstream.stream_close_delay"
KNOWN_KEYS = frozenset(
    {
        KEY_ENABLE, KEY_HOST, KEY_PATH, KEY_PORT, KEY_NETWORK, KEY_FAMILY, KEY_SCHEME,
        KEY_TLS_INSECURE, KEY_LB_POLICY, KEY_HEALTH_URI, KEY_REQUIRE_READY, KEY_FALLBACK,
        KEY_IMPORT, KEY_STREAM_CLOSE_DELAY,
    }
)  # fmt: skip

FAMILIES = ("ipv4", "ipv6", "any")
UPSTREAM_SCHEMES = ("http", "https", "h2c")  # how Caddy speaks to an instance
LB_POLICIES = (
    "random", "round_robin", "least_conn", "first", "ip_hash", "client_ip_hash", "uri_hash",
)  # fmt: skip

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_PORT = re.compile(r"[0-9]{1,5}")
_SEPARATORS = re.compile(r"[ \t,]+")
_PATH = re.compile(r"/[A-Za-z0-9._~/-]*")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# A Caddy duration as this tool writes it: `0`, or whole numbers with units (`5m`, `1m30s`).
_DURATION = re.compile(r"0|(?:[0-9]{1,6}(?:ms|s|m|h))+")
MAX_HOSTNAME = 253
MAX_PATH = 256
# Bare words Caddy reads as directives where a site address would stand.
CADDYFILE_KEYWORDS = frozenset({"import"})
MAX_SHOWN_VALUE = 80
T = TypeVar("T")


class InvalidValue(ValueError):
    """A label or setting value outside the allowlist; the message is the reason."""


def show(value: str) -> str:
    """An untrusted value for a message: escaped, and cut when very long."""
    shown = repr(value)
    if len(shown) > MAX_SHOWN_VALUE:
        shown = shown[: MAX_SHOWN_VALUE - 3] + "..."
    return shown


_PLAIN_KEY = re.compile(r"[a-z0-9._-]+")


def show_key(key: str) -> str:
    """A config key for a message: as it is when plain, else escaped (a trailing space or a
    control character must be visible)."""
    return key if _PLAIN_KEY.fullmatch(key) else show(key)


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


def split_list(raw: str) -> list[str]:
    """Values separated by spaces, tabs or commas (never newlines: those are refused)."""
    return [p for p in _SEPARATORS.split(raw.strip()) if p]


def valid_hosts(raw: str) -> list[str]:
    """The hostnames of a host label that are valid, the others left out (a holder whose
    labels became invalid still holds the valid hosts it names)."""
    hosts = []
    for part in split_list(raw):
        try:
            hosts.append(parse_hostname(part))
        except InvalidValue:
            continue
    return list(dict.fromkeys(hosts))


def parse_hosts(raw: str) -> list[str]:
    """Hostnames separated by spaces or commas. Raises on the first invalid one."""
    parts = split_list(raw)
    if not parts:
        raise InvalidValue("no hostname given")
    hosts = []
    for part in parts:
        try:
            hosts.append(parse_hostname(part))
        except InvalidValue as exc:
            raise InvalidValue(f"{show(part)}: {exc}") from None
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


def parse_choice(raw: str, choices: Iterable[str]) -> str:
    value = raw.strip().lower()
    options = tuple(choices)
    if value not in options:
        raise InvalidValue(f"must be one of: {', '.join(options)}")
    return value


def parse_path(raw: str) -> str | None:
    """A path prefix such as `/api`: letters, digits and `._~-/`. `/` means the whole host
    (None). A trailing slash is dropped, so `/api/` and `/api` are the same route."""
    value = raw.strip()
    if len(value) > MAX_PATH or not _PATH.fullmatch(value) or "//" in value:
        raise InvalidValue(
            "not a path prefix: '/' then letters, digits and . _ ~ - / (no wildcards, no query)"
        )
    value = value.rstrip("/")
    return value or None


def parse_uri_path(raw: str) -> str:
    """A request path such as `/healthz` (same alphabet as a path prefix)."""
    value = raw.strip()
    if len(value) > MAX_PATH or not _PATH.fullmatch(value):
        raise InvalidValue("not a path: '/' then letters, digits and . _ ~ - /")
    return value


def parse_duration(raw: str) -> str:
    """A duration for Caddy: `0` (off), or numbers with units ms, s, m, h (`500ms`, `5m`,
    `1m30s`)."""
    value = raw.strip()
    if not _DURATION.fullmatch(value):
        raise InvalidValue(
            "not a duration: 0, or numbers with units ms, s, m, h (500ms, 5m, 1m30s)"
        )
    return value


def parse_name(raw: str) -> str:
    """A NIC or network name: letters, digits, `_`, `.`, `-`."""
    value = raw.strip()
    if not _NAME.fullmatch(value):
        raise InvalidValue("not a NIC or network name")
    return value


def parse_imports(raw: str, defined: Iterable[str]) -> tuple[str, ...]:
    """Snippet names; only snippets the operator defined (--snippets) may be named."""
    names = split_list(raw)
    known = frozenset(defined)
    if not names:
        raise InvalidValue("no snippet name given")
    for name in names:
        if name not in known:
            allowed = ", ".join(sorted(known)) or "none are defined (--snippets)"
            raise InvalidValue(f"{show(name)} is not a snippet the operator defined: {allowed}")
    return tuple(dict.fromkeys(names))


def usable_address(raw: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address a proxy can dial: not loopback, link-local, multicast or unspecified."""
    try:
        addr = ipaddress.ip_address(raw.split("%")[0])
    except ValueError:
        return None
    if addr.is_loopback or addr.is_link_local or addr.is_multicast or addr.is_unspecified:
        return None
    return addr


@dataclass(frozen=True)
class Reach:
    """How an instance wants to be reached: port, which NIC or network, which family."""

    port: int
    network: str | None = None
    family: str = "ipv4"
    require_ready: bool = False


@dataclass(frozen=True)
class RouteOptions:
    """How Caddy proxies a route; a pool takes these from its earliest instance."""

    scheme: str = "http"
    tls_insecure: bool = False
    lb_policy: str | None = None
    health_uri: str | None = None
    imports: tuple[str, ...] = ()
    stream_close_delay: str | None = None  # None: the setting's (--stream-close-delay)

    @property
    def block(self) -> bool:
        """True when reverse_proxy needs a `{ }` block for these options."""
        return bool(self.tls_insecure or self.lb_policy or self.health_uri)


# What keeps traffic flowing through changes, as the settings give it (README "Traffic").
DEFAULT_STREAM_CLOSE_DELAY = "5m"
# Off: between tries Caddy waits lb_try_interval (250 ms), and a reload ends that wait with a
# 502 for every request in it (the old config's context is cancelled). lb_retries alone
# retries at once, and a reload does not stop it.
DEFAULT_LB_TRY_DURATION = "0"
DEFAULT_LB_RETRIES = 3
DEFAULT_DIAL_TIMEOUT = "1s"
DEFAULT_FAIL_DURATION = "10s"


def _on(duration: str | None) -> str | None:
    """A duration setting, None when it is off (`0`)."""
    return None if duration in (None, "0") else duration


@dataclass(frozen=True)
class Tuning:
    """How Caddy treats the traffic of a route, each None (or 0) when off:

    - stream_close_delay: upgraded connections (websockets, streams) outlive a config reload
      by this long, instead of being closed at once;
    - lb_try_duration, lb_retries: a request whose upstream cannot be reached is tried on
      another (retries stop at whichever limit comes first);
    - dial_timeout: how long a connection to an upstream may take before that counts as a
      failure (and the request is retried);
    - fail_duration: passive health, only in pools of two or more: an upstream that failed
      is left out for this long.
    """

    stream_close_delay: str | None = DEFAULT_STREAM_CLOSE_DELAY
    lb_try_duration: str | None = DEFAULT_LB_TRY_DURATION
    lb_retries: int = DEFAULT_LB_RETRIES
    dial_timeout: str | None = DEFAULT_DIAL_TIMEOUT
    fail_duration: str | None = DEFAULT_FAIL_DURATION

    def __post_init__(self) -> None:
        for name in ("stream_close_delay", "lb_try_duration", "dial_timeout", "fail_duration"):
            object.__setattr__(self, name, _on(getattr(self, name)))

    @property
    def any(self) -> bool:
        return bool(
            self.stream_close_delay or self.lb_try_duration or self.lb_retries
            or self.dial_timeout or self.fail_duration
        )  # fmt: skip


@dataclass(frozen=True)
class Labels:
    """One instance's labels, all valid."""

    hosts: tuple[str, ...]
    path: str | None
    reach: Reach
    options: RouteOptions
    fallback: bool


@dataclass(frozen=True)
class Problem:
    """A key whose value was refused (or, with ignored=True, skipped over)."""

    key: str
    value: str | None
    reason: str
    ignored: bool = False


class _Reader:
    """Reads optional keys, collecting a Problem for each invalid value."""

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels
        self.problems: list[Problem] = []

    def get(self, key: str, parser: Callable[[str], T], default: T) -> T:
        if key not in self.labels:
            return default
        try:
            return parser(self.labels[key])
        except InvalidValue as exc:
            self.problems.append(Problem(key, self.labels[key], str(exc)))
            return default

    def required(self, key: str, parser: Callable[[str], T], what: str) -> T | None:
        if key not in self.labels:
            self.problems.append(Problem(key, None, f"missing: the instance needs {what}"))
            return None
        return self.get(key, parser, None)


def reach_of(labels: dict[str, str]) -> Reach | None:
    """Only how to reach the instance (for the address lookup and readiness probes);
    None when those values are not valid."""
    r = _Reader(labels)
    reach = _read_reach(r)
    return None if r.problems else reach


def _read_reach(r: _Reader) -> Reach | None:
    port = r.required(KEY_PORT, parse_port, "the port it serves HTTP on")
    reach = Reach(
        port=port or 0,
        network=r.get(KEY_NETWORK, parse_name, None),
        family=r.get(KEY_FAMILY, lambda v: parse_choice(v, FAMILIES), "ipv4"),
        require_ready=r.get(KEY_REQUIRE_READY, parse_bool, False),
    )
    return None if port is None else reach


# Caddy refuses an upstream whose scheme and port conflict (reverseproxy's
# parseUpstreamDialAddress): the well-known port of the other protocol.
_CONFLICTING_PORT = {"http": 443, "https": 80, "h2c": 443}


def combination_problems(
    labels: dict[str, str], reach: Reach, options: RouteOptions
) -> list[Problem]:
    """Values valid alone that Caddy refuses together, or that would make every request fail."""
    problems = []
    scheme_set = KEY_SCHEME in labels
    if reach.port == _CONFLICTING_PORT[options.scheme]:
        what = "the HTTPS port" if reach.port == 443 else "the HTTP port"
        fix = "set upstream.scheme=https" if options.scheme == "http" else "use another port"
        problems.append(
            Problem(
                KEY_SCHEME if scheme_set else KEY_PORT,
                labels.get(KEY_SCHEME if scheme_set else KEY_PORT),
                f"scheme {options.scheme} with {KEY_PORT}={reach.port} ({what}): Caddy refuses"
                f" this pair; {fix}",
            )
        )
    if options.tls_insecure and options.scheme != "https":
        problems.append(
            Problem(
                KEY_TLS_INSECURE,
                labels.get(KEY_TLS_INSECURE),
                f"only for {KEY_SCHEME}=https (with {options.scheme}, Caddy would speak TLS to a"
                " plain-HTTP port and every request would fail)",
            )
        )
    return problems


def parse(
    labels: dict[str, str], snippets: Iterable[str] = ()
) -> tuple[Labels | None, list[Problem]]:
    """All of an instance's labels. None (with the problems) when any known key is invalid:
    routing without a value that was meant (a path, an auth snippet) would be worse."""
    r = _Reader(labels)
    for key in sorted(labels):
        if key not in KNOWN_KEYS:
            r.problems.append(Problem(key, labels[key], "unknown key, check the spelling", True))
    hosts = r.required(KEY_HOST, parse_hosts, "at least one hostname")
    reach = _read_reach(r)
    options = RouteOptions(
        scheme=r.get(KEY_SCHEME, lambda v: parse_choice(v, UPSTREAM_SCHEMES), "http"),
        tls_insecure=r.get(KEY_TLS_INSECURE, parse_bool, False),
        lb_policy=r.get(KEY_LB_POLICY, lambda v: parse_choice(v, LB_POLICIES), None),
        health_uri=r.get(KEY_HEALTH_URI, parse_uri_path, None),
        imports=r.get(KEY_IMPORT, lambda v: parse_imports(v, snippets), ()),
        stream_close_delay=r.get(KEY_STREAM_CLOSE_DELAY, parse_duration, None),
    )
    path = r.get(KEY_PATH, parse_path, None)
    fallback = r.get(KEY_FALLBACK, parse_bool, False)
    if reach is not None and not any(not p.ignored for p in r.problems):
        r.problems.extend(combination_problems(labels, reach, options))
    if not hosts or reach is None or any(not p.ignored for p in r.problems):
        return None, r.problems
    return Labels(tuple(dict.fromkeys(hosts)), path, reach, options, fallback), r.problems
