"""A target: where the Caddyfile goes (a Destination) and the Caddy that runs it, as the
settings name them. The pipeline only ever talks to a Target.

A Caddy inside an Incus instance (`--caddy-instance`) is reached through the cycle's own
Incus client, handed in: no second connection.
"""

from __future__ import annotations

from dataclasses import dataclass

from .caddy import AdminCaddy, Caddy, CaddyUnreachable, CommandCaddy, InstanceCaddy
from .destinations import Destination, InstanceFile, LocalFile
from .incus import IncusApi, IncusError
from .output import OutputError
from .settings import Settings, TargetSpec, is_placeholder

DEFAULT_INSTANCE_PATH = "/etc/caddy/Caddyfile"


@dataclass(frozen=True)
class Target:
    destination: Destination
    caddy: Caddy
    label: str | None = None  # the operator's name for it (`--target name=...`)

    @property
    def name(self) -> str:
        return self.label or self.destination.name


@dataclass(frozen=True)
class InstanceAccess:
    """One instance's commands and files through the Incus API, with Incus failures told
    as the failure of whoever asked (Caddy unreachable, or the output not writable)."""

    api: IncusApi
    project: str
    instance: str

    @property
    def name(self) -> str:
        return f"{self.project}/{self.instance}"

    def _exec(self, argv: list[str]) -> tuple[int, str]:
        code, out, err = self.api.exec(self.project, self.instance, argv)
        return code, (err or out).strip()

    # caddy.Shell
    def run(self, argv: list[str]) -> tuple[int, str]:
        try:
            return self._exec(argv)
        except IncusError as exc:
            raise CaddyUnreachable(f"{self.name}: {exc}") from None

    def put(self, path: str, data: bytes) -> None:
        try:
            self.api.write_file(self.project, self.instance, path, data)
        except IncusError as exc:
            raise OutputError(f"cannot write {self.name}:{path}: {exc}") from None

    # destinations.InstanceFiles
    def get(self, path: str) -> bytes | None:
        try:
            return self.api.read_file(self.project, self.instance, path)
        except IncusError as exc:
            raise OutputError(f"cannot read {self.name}:{path}: {exc}") from None

    def sh(self, script: str) -> tuple[int, str]:
        try:
            return self._exec(["sh", "-c", script])
        except IncusError as exc:
            raise OutputError(f"{self.name}: {exc}") from None


def instance_ref(value: str) -> tuple[str, str]:
    """`PROJECT/NAME` or `NAME` (project default)."""
    project, _, name = value.rpartition("/")
    return project or "default", name


def writes_file(settings: Settings) -> bool:
    """True when the settings name a file to write (else the Caddyfile goes to stdout)."""
    return bool(settings.caddy_instance) or settings.output is not None or bool(settings.targets)


def all_for_settings(settings: Settings, api: IncusApi | None = None) -> list[Target]:
    """Every target the settings name, in their order: the `--target`s, else the one of the
    single-target flags (none: the Caddyfile goes to stdout)."""
    if not settings.targets:
        one = for_settings(settings, api)
        return [] if one is None else [one]
    return [for_spec(spec, settings, api) for spec in settings.targets]


def for_spec(spec: TargetSpec, settings: Settings, api: IncusApi | None = None) -> Target:
    """One `--target`: its own file and Caddy; `--caddy-admin` and `--caddy-bin` are the
    defaults of what it does not say."""
    caddy_bin = spec.caddy_bin or settings.caddy_bin
    if spec.instance is not None:
        if api is None:
            raise ValueError("a Caddy inside an instance is reached through an Incus client")
        access = InstanceAccess(api, *instance_ref(spec.instance))
        path = str(spec.output or DEFAULT_INSTANCE_PATH)
        return Target(
            InstanceFile(access, path), InstanceCaddy(access, path, caddy_bin or "caddy"), spec.name
        )
    assert spec.output is not None
    admin = spec.admin or settings.caddy_admin
    if admin is not None and is_placeholder(admin):
        admin = "off"  # {$VAR}: only that Caddy knows it; check with `caddy adapt` instead
    caddy: Caddy
    if spec.command is not None:
        caddy = CommandCaddy(spec.command, admin, caddy_bin)
    else:
        caddy = AdminCaddy(admin, caddy_bin)
    return Target(LocalFile(spec.output), caddy, spec.name)


def for_settings(settings: Settings, api: IncusApi | None = None) -> Target | None:
    """The target the settings name, or None when the Caddyfile goes to stdout. A Caddy in
    an instance needs the cycle's Incus client (`api`). With `--target`s: the first."""
    if settings.targets:
        return for_spec(settings.targets[0], settings, api)
    if settings.caddy_instance:
        if api is None:
            raise ValueError("a Caddy inside an instance is reached through an Incus client")
        access = InstanceAccess(api, *instance_ref(settings.caddy_instance))
        path = str(settings.output or DEFAULT_INSTANCE_PATH)
        caddy_bin = settings.caddy_bin or "caddy"
        return Target(InstanceFile(access, path), InstanceCaddy(access, path, caddy_bin))
    if not writes_file(settings):
        return None
    assert settings.output is not None
    caddy: Caddy
    if settings.reload_command:
        caddy = CommandCaddy(settings.reload_command, settings.caddy_admin, settings.caddy_bin)
    else:
        caddy = AdminCaddy(settings.caddy_admin, settings.caddy_bin)
    return Target(LocalFile(settings.output), caddy)
