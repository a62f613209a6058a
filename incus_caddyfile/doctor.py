"""`doctor`: check each thing a render needs, and say how to fix what fails."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import caddy, pipeline
from .incus import IncusClient, IncusError
from .render import TemplateError, render
from .settings import Settings, default_incus_socket


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def run(settings: Settings) -> list[Check]:
    """All checks, in the order a render meets them. Later ones are skipped when Incus fails."""
    checks: list[Check] = []
    endpoint = settings.incus or default_incus_socket()
    try:
        client = pipeline.connect(settings)
    except IncusError as exc:
        return [
            Check(
                "incus",
                False,
                str(exc),
                "start incusd, point --incus/INCUS_SOCKET at its socket, and run as root or"
                " as a member of incus-admin",
            ),
            *_caddy_checks(settings, None),
            _output_check(settings),
        ]
    checks.append(Check("incus", True, f"Incus {client.server_version()} at {endpoint}"))
    checks.append(_projects_check(client))
    checks.extend(_caddy_checks(settings, client))
    checks.append(_output_check(settings))
    return checks


def _projects_check(client: IncusClient) -> Check:
    try:
        projects = client.projects()
        instances = client.list_raw()
    except IncusError as exc:
        return Check(
            "projects",
            False,
            str(exc),
            "the tool needs to list instances in all projects: use root or incus-admin"
            " (or a certificate trusted for the projects you route)",
        )
    return Check(
        "projects", True, f"can list {len(projects)} project(s) and {len(instances)} instance(s)"
    )


def _caddy_checks(settings: Settings, client: IncusClient | None) -> list[Check]:
    """Admin endpoint, template, and Caddy's verdict on the result (with no instances when
    Incus cannot be listed, so the operator's own settings are still checked)."""
    checks = [_admin_check(settings)]
    try:
        instances = client.list_instances() if client is not None else []
        model = pipeline.model_for(settings, instances)
        text = render(model, settings)
    except IncusError as exc:
        return [*checks, Check("render", False, str(exc), "see the Incus checks above")]
    except TemplateError as exc:
        fix = "fix the template at the line named, or drop --template"
        return [*checks, Check("template", False, str(exc), fix)]
    rejected = len([r for r in model.rejections if not r.ignored])
    fleet = "" if client is not None else " (without instances: Incus is not reachable)"
    detail = f"renders {len(model.all_sites)} site(s), {rejected} rejected value(s){fleet}"
    checks.append(Check("template", True, detail))
    try:
        by = caddy.check(text, settings.caddy_admin, settings.caddy_bin)
        checks.append(Check("caddy accepts", True, f"the rendered config is valid ({by})"))
    except caddy.CaddyRejected as exc:
        checks.append(
            Check(
                "caddy accepts",
                False,
                f"Caddy rejects the config: {exc}",
                "fix the --global-option/--acme-dns values or the template",
            )
        )
    except caddy.CaddyError as exc:
        checks.append(
            Check(
                "caddy accepts",
                False,
                str(exc),
                "start Caddy, or install caddy on PATH / set --caddy-bin",
            )
        )
    return checks


def _admin_check(settings: Settings) -> Check:
    if not settings.reload:
        return Check("caddy admin", True, "not used (--no-reload)")
    if settings.reload_command:
        return Check("caddy admin", True, f"not used (reload command {settings.reload_command!r})")
    address = settings.caddy_admin or caddy.DEFAULT_ADMIN
    try:
        up = caddy.AdminAPI(address).ping()
    except caddy.CaddyError as exc:
        up, address = False, f"{address} ({exc})"
    if up:
        return Check("caddy admin", True, f"Caddy answers at {address}")
    return Check(
        "caddy admin",
        False,
        f"no Caddy admin endpoint answers at {address}",
        "start Caddy with the same `admin` address, or set --caddy-admin to the one it"
        " uses (or use --reload-command / --no-reload)",
    )


def _output_check(settings: Settings) -> Check:
    if settings.output is None:
        return Check("output", True, "stdout (no --output)")
    directory = settings.output.parent if str(settings.output.parent) else Path(".")
    if not directory.is_dir():
        return Check(
            "output",
            False,
            f"directory {directory} does not exist",
            f"create it: mkdir -p {directory}",
        )
    try:
        fd, name = tempfile.mkstemp(
            prefix=f".{settings.output.name}.", suffix=".tmp", dir=directory
        )
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        return Check(
            "output",
            False,
            f"cannot create files in {directory}: {exc.strerror}",
            "give the tool write access to that directory (the atomic write puts a"
            " temp file next to the output), or mount it read-write",
        )
    if settings.output.exists() and not os.access(settings.output, os.W_OK):
        return Check(
            "output",
            False,
            f"{settings.output} is not writable",
            f"fix its permissions: chmod u+w {settings.output}",
        )
    return Check("output", True, f"{settings.output} can be written")
