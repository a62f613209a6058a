"""Settings: one frozen value built from flags, INCUS_CADDYFILE_* variables and a TOML file.

Precedence (highest first): command-line flag, environment variable, settings file, default.
The CLI gets that order from click (flags and `envvar`, then `default_map` filled from the
file); this module defines the value, reads the file and validates what the operator wrote.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .labels import (
    DEFAULT_DIAL_TIMEOUT,
    DEFAULT_FAIL_DURATION,
    DEFAULT_LB_RETRIES,
    DEFAULT_LB_TRY_DURATION,
    DEFAULT_STREAM_CLOSE_DELAY,
    InvalidValue,
    Tuning,
    parse_duration,
    parse_hostname,
)
from .policy import Policy

ENV_PREFIX = "INCUS_CADDYFILE_"
SITE_SCHEMES = ("https", "http")  # how Caddy serves the generated sites (--scheme)

# TOML key -> click parameter name. TOML keys are the long option names.
FILE_KEYS = {
    "incus": "incus",
    "incus-cert": "incus_cert",
    "incus-key": "incus_key",
    "incus-server-cert": "incus_server_cert",
    "incus-timeout": "incus_timeout",
    "template": "template",
    "output": "output",
    "email": "email",
    "caddy-admin": "caddy_admin",
    "global-option": "global_options",
    "wildcard": "wildcards",
    "acme-dns": "acme_dns",
    "scheme": "scheme",
    "reload-command": "reload_command",
    "reload": "reload",
    "caddy-bin": "caddy_bin",
    "snippets": "snippets",
    "caddy-instance": "caddy_instance",
    "sites-dir": "sites_dir",
    "stream-close-delay": "stream_close_delay",
    "lb-try-duration": "lb_try_duration",
    "lb-retries": "lb_retries",
    "dial-timeout": "dial_timeout",
    "fail-duration": "fail_duration",
    "on-demand-tls": "on_demand_tls",
    "cache-dir": "cache_dir",
    "cache": "cache",
}
# Keys only `watch` reads (its own options, not part of Settings): checked here all the same.
WATCH_KEYS = {"reload-burst": "reload_burst", "drain": "drain"}
FILE_KEYS.update(WATCH_KEYS)
DEFAULT_RELOAD_BURST = 2
DURATION_KEYS = ("stream-close-delay", "lb-try-duration", "dial-timeout", "fail-duration")
INTEGER_KEYS = ("lb-retries", "reload-burst")
NUMBER_KEYS = ("incus-timeout",)
# Seconds any one Incus request may take (connect and each read; the event stream's connect).
# A healthy Incus answers every request the tool makes well within it (the listing of 1000
# instances at recursion=1: ~0.2 s); a partitioned cluster member made a listing block 20 s
# and each leases call 5 s, which would stall watch's other work that long.
DEFAULT_INCUS_TIMEOUT = 5.0
# Tables the file may hold that are not options (reserved for per-project policy).
FILE_TABLES = frozenset({"projects", "targets"})
# Global options with a setting of their own: rendering them twice would confuse Caddy or us.
OWNED_OPTIONS = {"admin": "--caddy-admin", "email": "--email", "acme_dns": "--acme-dns"}


class SettingsError(ValueError):
    """A setting the operator gave is unusable; the message says which and why."""


# A target's keys (`--target KEY=VALUE,...`, or a `[[targets]]` table of the settings file).
TARGET_KEYS = ("name", "admin", "command", "instance", "output", "caddy-bin")
_TARGET_SPLIT = re.compile(r",(?=\s*[A-Za-z][A-Za-z0-9_-]*\s*=)")  # a comma before KEY=
# An admin option every edge fills from its own environment ({$VAR} or {$VAR:default}).
_ENV_PLACEHOLDER = re.compile(r"\{\$[A-Za-z_][A-Za-z0-9_]*(:[^{}\s]*)?\}")


@dataclass(frozen=True)
class TargetSpec:
    """One Caddy edge the rendered Caddyfile goes to, as the operator wrote it: a Caddy
    reached at its admin endpoint (`admin`), reloaded by a command (`command`, with `admin`
    to ask what it runs), or running inside an Incus instance (`instance`); each with its
    own `output` file. `where` names it in error messages (`--target 2`, `[[targets]] 1`)."""

    where: str
    name: str | None = None
    admin: str | None = None
    command: str | None = None
    instance: str | None = None
    output: Path | None = None
    caddy_bin: str | None = None

    @property
    def kind(self) -> str:
        return "instance" if self.instance else "command" if self.command else "admin"

    @property
    def label(self) -> str:
        """How logs, metrics and pages name it: `name`, else its output (inside its
        instance: PROJECT/NAME:path)."""
        if self.name:
            return self.name
        if self.instance:
            return f"{self.instance}:{self.output or '/etc/caddy/Caddyfile'}"
        return str(self.output)


def parse_target(text: str, where: str) -> TargetSpec:
    """`admin=unix//run/caddy-a.sock,output=/etc/caddy/a/Caddyfile`: comma-separated
    KEY=VALUE pairs (a comma starts a new pair only before `WORD=`, so a command may hold
    other commas). Raises SettingsError naming the target and the key."""
    values: dict[str, str] = {}
    for part in _TARGET_SPLIT.split(text.strip()):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SettingsError(
                f"{where} {text!r}: expected KEY=VALUE pairs separated by commas"
                f" (keys: {', '.join(TARGET_KEYS)}), got {part!r}"
            )
        values[key] = value.strip()
    return target_from(values, where)


def target_from(values: dict[str, Any], where: str) -> TargetSpec:
    """A target from its keys (parsed from `--target`, or a `[[targets]]` table)."""
    for key, value in values.items():
        if key not in TARGET_KEYS:
            raise SettingsError(
                f"{where}: unknown key {key!r}{_did_you_mean(key, list(TARGET_KEYS))}"
                f" (keys: {', '.join(TARGET_KEYS)})"
            )
        if not isinstance(value, str) or not value.strip():
            raise SettingsError(f"{where}: {key} must be a non-empty string, got {value!r}")
    kinds = [k for k in ("command", "instance") if k in values]
    if len(kinds) > 1 or ("instance" in values and "admin" in values):
        given = ", ".join(k for k in ("admin", "command", "instance") if k in values)
        raise SettingsError(
            f"{where}: give one of admin, command or instance (a command may add admin, to"
            f" ask Caddy what it runs), got {given}"
        )
    if not ({"admin", "command", "instance"} & values.keys()):
        raise SettingsError(f"{where}: which Caddy? give admin=ADDR, command=CMD or instance=P/N")
    if "output" not in values and "instance" not in values:
        raise SettingsError(f"{where}: output=FILE is missing (every target has its own file)")
    output = Path(values["output"]) if "output" in values else None
    return TargetSpec(
        where=where,
        name=values.get("name"),
        admin=values.get("admin"),
        command=values.get("command"),
        instance=values.get("instance"),
        output=output,
        caddy_bin=values.get("caddy-bin"),
    )


@dataclass(frozen=True)
class Settings:
    incus: str | None = None
    incus_cert: str | None = None
    incus_key: str | None = None
    incus_server_cert: str | None = None
    incus_timeout: float = DEFAULT_INCUS_TIMEOUT
    template: Path | None = None
    output: Path | None = None
    email: str | None = None
    caddy_admin: str | None = None
    global_options: tuple[str, ...] = ()
    wildcards: tuple[str, ...] = ()
    acme_dns: str | None = None
    scheme: str = "https"
    reload_command: str | None = None
    reload: bool = True
    caddy_bin: str | None = None
    snippets: Path | None = None
    sites_dir: Path | None = None
    caddy_instance: str | None = None  # PROJECT/NAME: Caddy runs in this Incus instance
    stream_close_delay: str = DEFAULT_STREAM_CLOSE_DELAY
    lb_try_duration: str = DEFAULT_LB_TRY_DURATION
    lb_retries: int = DEFAULT_LB_RETRIES
    dial_timeout: str = DEFAULT_DIAL_TIMEOUT
    fail_duration: str = DEFAULT_FAIL_DURATION
    on_demand_tls: bool = False  # certificates at the first handshake, for routed hosts only
    on_demand_ask: str | None = None  # what Caddy asks first: watch's /ask (set by watch)
    targets: tuple[TargetSpec, ...] = ()  # several edges (--target); () : the flags' one
    # Where state is kept for an output that is not a file on this host (stdout, a Caddy in
    # an instance): the last known routes and addresses (lastknown). None: kept nowhere.
    cache_dir: Path | None = None
    config_file: Path | None = None
    policy: Policy = field(default_factory=Policy)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def tuning(self) -> Tuning:
        """How Caddy treats the generated routes' traffic (retries, streams, timeouts)."""
        return Tuning(
            stream_close_delay=self.stream_close_delay,
            lb_try_duration=self.lb_try_duration,
            lb_retries=self.lb_retries,
            dial_timeout=self.dial_timeout,
            fail_duration=self.fail_duration,
        )


_ONE_LINE_UNSAFE = re.compile(r"[\r\n\x00]")
_INSTANCE_REF = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]*/)?[A-Za-z0-9][A-Za-z0-9-]{0,62}")
_PATH_TOKEN = re.compile(r"[A-Za-z0-9_./@%+=:,~-]+")
_ADMIN = re.compile(r"(unix/.+|(tcp/)?[A-Za-z0-9.\-\[\]:]*:[0-9]{1,5}|off)")
_EMAIL = re.compile(r"[^\s{}\"'`#]+@[^\s{}\"'`#]+")


def _one_line(name: str, value: str, balanced: bool = True) -> None:
    if _ONE_LINE_UNSAFE.search(value) or not value.strip():
        raise SettingsError(f"{name}: must be one non-empty line, got {value!r}")
    if balanced and value.count("{") != value.count("}"):
        raise SettingsError(f"{name}: unbalanced braces in {value!r}")


def block_depths(lines: tuple[str, ...]) -> list[int]:
    """The nesting depth of each global option line: a line ending in `{` opens a block
    (e.g. `servers {`), a line `}` closes it. Raises when the blocks do not close."""
    depths, depth = [], 0
    for line in lines:
        text = line.strip()
        if text == "}":
            depth -= 1
            if depth < 0:
                raise SettingsError(f"--global-option: '}}' closes no block: {lines!r}")
        depths.append(depth)
        if text.endswith("{"):
            depth += 1
        if text != "}" and text.count("{") - text.endswith("{") != text.count("}"):
            raise SettingsError(f"--global-option: unbalanced braces in {line!r}")
    if depth:
        raise SettingsError(f"--global-option: a block is not closed with a '}}' line: {lines!r}")
    return depths


def validate(s: Settings) -> None:
    """Operator settings are trusted but checked, so a typo fails here, not inside Caddy."""
    if s.email is not None and not _EMAIL.fullmatch(s.email):
        raise SettingsError(f"--email: not an email address: {s.email!r}")
    if s.caddy_admin is not None and not (s.targets and is_placeholder(s.caddy_admin)):
        _check_admin("--caddy-admin", s.caddy_admin)
    for option in s.global_options:
        _one_line("--global-option", option, balanced=False)
    for option, depth in zip(s.global_options, block_depths(s.global_options), strict=True):
        name = option.split()[0]
        if depth == 0 and name in OWNED_OPTIONS:
            raise SettingsError(
                f"--global-option {option!r}: set {name!r} with {OWNED_OPTIONS[name]} instead"
            )
    for wildcard in s.wildcards:
        if not wildcard.startswith("*."):
            raise SettingsError(f"--wildcard: must start with '*.', got {wildcard!r}")
        try:
            parse_hostname(wildcard)
        except InvalidValue as exc:
            raise SettingsError(f"--wildcard {wildcard!r}: {exc}") from None
    if s.acme_dns is not None:
        _one_line("--acme-dns", s.acme_dns)
    if s.scheme not in SITE_SCHEMES:
        raise SettingsError(f"--scheme: must be one of {', '.join(SITE_SCHEMES)}, got {s.scheme!r}")
    for name, path in (("--snippets", s.snippets), ("--sites-dir", s.sites_dir)):
        if path is not None and not _PATH_TOKEN.fullmatch(str(path)):
            raise SettingsError(
                f"{name}: {str(path)!r} is rendered into an import line: use a path without"
                " spaces, quotes, braces or #"
            )
    if s.caddy_instance is not None:
        if not _INSTANCE_REF.fullmatch(s.caddy_instance):
            raise SettingsError(
                f"--caddy-instance: expected PROJECT/NAME or NAME, got {s.caddy_instance!r}"
            )
        if s.output is not None and not s.output.is_absolute():
            raise SettingsError("--output: with --caddy-instance, an absolute path in it")
    if (
        isinstance(s.incus_timeout, bool)
        or not isinstance(s.incus_timeout, int | float)
        or not 0 < s.incus_timeout <= 3600
    ):
        raise SettingsError(
            f"--incus-timeout: seconds, more than 0 and at most 3600, got {s.incus_timeout!r}"
        )
    if s.reload_command is not None and not s.reload_command.strip():
        raise SettingsError("--reload-command: empty command")
    if s.on_demand_tls and s.scheme != "https":
        raise SettingsError("--on-demand-tls: certificates are for HTTPS sites; drop --scheme http")
    if s.on_demand_ask is not None and not re.fullmatch(r"http://[^\s{}]+/ask", s.on_demand_ask):
        raise SettingsError(
            f"on-demand ask URL: expected http://HOST:PORT/ask, got {s.on_demand_ask!r}"
        )
    _validate_targets(s)
    for key in DURATION_KEYS:
        name = FILE_KEYS[key]
        value = getattr(s, name)
        try:
            if not isinstance(value, str) or parse_duration(value) != value:
                raise InvalidValue("not a duration: 0, or numbers with units ms, s, m, h")
        except InvalidValue as exc:
            raise SettingsError(f"--{key}: {exc}, got {getattr(s, name)!r}") from None
    if (
        isinstance(s.lb_retries, bool)
        or not isinstance(s.lb_retries, int)
        or not (0 <= s.lb_retries <= 100)
    ):
        raise SettingsError(f"--lb-retries: a number from 0 to 100, got {s.lb_retries!r}")


def is_placeholder(value: str) -> bool:
    """`{$CADDY_ADMIN}`: Caddy substitutes its own environment variable when it adapts the
    text, so every edge fills in its own value from the same bytes."""
    return bool(_ENV_PLACEHOLDER.fullmatch(value))


def _check_admin(name: str, value: str) -> None:
    port = value.rpartition(":")[2] if not value.startswith("unix/") else "1"
    if not _ADMIN.fullmatch(value) or not (value == "off" or 1 <= int(port) <= 65535):
        raise SettingsError(
            f"{name}: expected host:port (port 1-65535), unix//path or off, got {value!r}"
        )


SINGLE_TARGET_FLAGS = {
    "output": "--output",
    "reload_command": "--reload-command",
    "caddy_instance": "--caddy-instance",
}


def _validate_targets(s: Settings) -> None:
    """Several edges get the same bytes: each target's file is its own, and the `admin`
    option rendered for all must be each Caddy's own (Caddy moves its admin endpoint to the
    one in the config it loads)."""
    if not s.targets:
        return
    mixed = [flag for name, flag in SINGLE_TARGET_FLAGS.items() if getattr(s, name)]
    if mixed:
        raise SettingsError(
            f"--target: give the targets alone, or {', '.join(mixed)} for a single one, not"
            " both (put that file in a target: --target admin=ADDR,output=FILE)"
        )
    rendered = s.caddy_admin or "localhost:2019"
    names: dict[str, str] = {}
    files: dict[str, str] = {}
    for spec in s.targets:
        where = f"{spec.where} ({spec.label})"
        if spec.admin is not None:
            _check_admin(f"{where}: admin", spec.admin)
            if spec.admin != rendered and not is_placeholder(rendered):
                raise SettingsError(
                    f"{where}: admin={spec.admin} is not the admin option every edge is given"
                    f" ({rendered}; Caddy moves its admin endpoint to the one in the config it"
                    " loads, and all edges get the same bytes): give each Caddy its address in"
                    " its environment and set --caddy-admin '{$CADDY_ADMIN}' (or the same"
                    " admin= on every target)"
                )
        if spec.instance is not None:
            if is_placeholder(rendered):
                raise SettingsError(
                    f"{where}: instance: `caddy reload` adapts the file inside the instance, in"
                    f" its own environment, not Caddy's, so {rendered} would not be Caddy's"
                    " admin address there: give the Caddies in instances one admin address"
                    " (--caddy-admin)"
                )
            if not _INSTANCE_REF.fullmatch(spec.instance):
                raise SettingsError(
                    f"{where}: instance: expected PROJECT/NAME or NAME, got {spec.instance!r}"
                )
            if spec.output is not None and not spec.output.is_absolute():
                raise SettingsError(f"{where}: output: an absolute path inside the instance")
        spot = place(spec)
        if spot in files:
            raise SettingsError(
                f"{where}: output {spec.output or '/etc/caddy/Caddyfile'} is {files[spot]}'s"
                " output too: each target needs its own file"
            )
        files[spot] = spec.where
        if spec.label in names:
            raise SettingsError(f"{where}: the name {spec.label!r} is {names[spec.label]}'s too")
        names[spec.label] = spec.where


def place(spec: TargetSpec) -> str:
    """Where a target's file is (to find two targets writing one file; to name the state
    of files in instances)."""
    if spec.instance is not None:
        project, _, name = spec.instance.rpartition("/")
        return f"{project or 'default'}/{name}:{spec.output or '/etc/caddy/Caddyfile'}"
    return os.path.realpath(str(spec.output))


def check_paths(s: Settings) -> None:
    """What the settings name on this host exists and is of the right kind (called by the
    CLI: the Settings value itself stays free of file system reads)."""
    if s.sites_dir is not None and not s.sites_dir.is_dir():
        raise SettingsError(f"--sites-dir: {s.sites_dir} is not a directory")
    if s.output is not None and s.caddy_instance is None:
        check_output_path(s.output)
    for spec in s.targets:
        if spec.instance is None and spec.output is not None:
            try:
                check_output_path(spec.output)
            except SettingsError as exc:
                raise SettingsError(f"{spec.where} ({spec.label}): {exc}") from None


def check_output_path(path: Path) -> None:
    """The output must be a regular file (or a link to one), or not exist yet: the atomic
    write replaces it by rename, which would replace a device, a FIFO or a link itself."""
    try:
        mode = path.stat().st_mode  # follows links
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SettingsError(f"--output: cannot use {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a device or FIFO?)"
        raise SettingsError(
            f"--output: {path} is {kind}; give a file path, or -o - (or no --output) for stdout"
        )


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read settings file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from None


def _strings(path: Path, where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SettingsError(f"{path}: {where} must be a list of strings")
    return tuple(value)


def load_policy(path: Path | None) -> Policy:
    """The [projects] table: include/exclude globs, and per-project domain patterns."""
    if path is None:
        return Policy()
    table = _read_toml(path).get("projects", {})
    if not isinstance(table, dict):
        raise SettingsError(f"{path}: [projects] must be a table")
    include = _strings(path, "projects.include", table.get("include", []))
    exclude = _strings(path, "projects.exclude", table.get("exclude", []))
    domains = []
    for project, entry in sorted(table.items()):
        if project in ("include", "exclude"):
            continue
        where = f"[projects.{project}]"
        if not isinstance(entry, dict):
            raise SettingsError(f"{path}: {_misplaced(project)}")
        if set(entry) - {"domains"}:
            unknown = sorted(set(entry) - {"domains"})[0]
            raise SettingsError(
                f"{path}: unknown key {unknown!r} in {where}{_did_you_mean(unknown, ['domains'])}"
                f"; {where} may only hold `domains = [...]`"
            )
        patterns = _strings(path, f"{where} domains", entry.get("domains", []))
        for pattern in patterns:
            try:
                parse_hostname(pattern)
            except InvalidValue as exc:
                raise SettingsError(f"{path}: {where} domains: {pattern!r}: {exc}") from None
        domains.append((project, tuple(p.lower() for p in patterns)))
    return Policy(include=include, exclude=exclude, domains=tuple(domains))


def _did_you_mean(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _misplaced(key: str) -> str:
    """A plain key found in [projects]: a misspelt include/exclude, or a setting written
    after the [projects] header (TOML puts every key after a header into that table)."""
    if key in FILE_KEYS:
        return (
            f"{key!r} is inside [projects]: settings go before the first [table] header"
            " (TOML puts every key after `[projects]` into that table)"
        )
    return (
        f"unknown key 'projects.{key}'{_did_you_mean(key, ['include', 'exclude'])}:"
        " [projects] holds include, exclude and [projects.NAME] tables of domains"
    )


def load_file(path: Path) -> dict[str, Any]:
    """Read a settings file into click parameter names. Unknown keys are an error (typos)."""
    data = _read_toml(path)
    load_policy(path)  # fail early (as a usage error) on a bad [projects] table
    out: dict[str, Any] = {}
    if "targets" in data:
        out["targets"] = tuple(load_targets(path, data["targets"]))
    for key, value in data.items():
        if key in FILE_TABLES:
            continue
        if key not in FILE_KEYS:
            known = ", ".join(sorted(FILE_KEYS))
            hint = _did_you_mean(key, sorted(FILE_KEYS))
            raise SettingsError(f"{path}: unknown setting {key!r}{hint} (known: {known})")
        if key in ("global-option", "wildcard"):
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise SettingsError(f"{path}: {key} must be a string or a list of strings")
        elif key in ("reload", "drain", "on-demand-tls", "cache"):
            if not isinstance(value, bool):
                raise SettingsError(f"{path}: {key} must be true or false")
        elif key in INTEGER_KEYS:
            if isinstance(value, bool) or not isinstance(value, int):
                raise SettingsError(f"{path}: {key} must be a whole number")
        elif key in NUMBER_KEYS:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise SettingsError(f"{path}: {key} must be a number")
        elif not isinstance(value, str):
            raise SettingsError(f"{path}: {key} must be a string")
        out[FILE_KEYS[key]] = value
    return out


def load_targets(path: Path, value: Any) -> list[TargetSpec]:
    """`[[targets]]` tables: each with the keys of `--target`."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise SettingsError(f"{path}: targets must be [[targets]] tables")
    return [target_from(dict(v), f"{path}: [[targets]] {n}") for n, v in enumerate(value, 1)]


def default_cache_dir(env: dict[str, str] | None = None) -> Path | None:
    """$XDG_CACHE_HOME/incus-caddyfile, else ~/.cache/incus-caddyfile; None without a home
    (a service account may have none: then nothing is kept)."""
    env = dict(os.environ) if env is None else env
    base = env.get("XDG_CACHE_HOME", "")
    if os.path.isabs(base):
        return Path(base) / "incus-caddyfile"
    home = env.get("HOME", "")
    return Path(home) / ".cache" / "incus-caddyfile" if os.path.isabs(home) else None


def default_incus_socket(env: dict[str, str] | None = None) -> str:
    """INCUS_SOCKET, else $INCUS_DIR/unix.socket, else the first of the usual paths that exists."""
    env = dict(os.environ) if env is None else env
    if env.get("INCUS_SOCKET"):
        return env["INCUS_SOCKET"]
    if env.get("INCUS_DIR"):
        return str(Path(env["INCUS_DIR"]) / "unix.socket")
    candidates = ["/var/lib/incus/unix.socket", "/run/incus/unix.socket"]
    return next((c for c in candidates if Path(c).exists()), candidates[0])
