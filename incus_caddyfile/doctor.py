"""`doctor`: check each thing a render needs, and say how to fix what fails.

It checks the target the settings name (a local file and its Caddy, or a Caddy inside an
instance) through the same objects `render` uses, so a pass here means render can do it.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import pipeline, targets
from .caddy import CaddyError, InstanceCaddy
from .destinations import LocalFile
from .incus import IncusApi, IncusError, connect
from .model import Instance
from .output import OutputError
from .render import TemplateError, render
from .settings import Settings, SettingsError, default_incus_socket


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def run(settings: Settings) -> list[Check]:
    """All checks, in the order a render meets them; those that need Incus say so when it
    cannot be reached, and the rest still run."""
    endpoint = settings.incus or default_incus_socket()
    api: IncusApi | None
    try:
        api = connect(settings)
    except IncusError as exc:
        api = None
        checks = [
            Check(
                "incus",
                False,
                str(exc),
                "start incusd, point --incus/INCUS_SOCKET at its socket, and run as root or"
                " as a member of incus-admin",
            )
        ]
    else:
        checks = [Check("incus", True, f"Incus {api.server_version()} at {endpoint}")]
        checks.append(_projects_check(api))
    return checks + _target_checks(settings, api)


def _projects_check(api: IncusApi) -> Check:
    try:
        projects = api.list_projects()
        instances = api.list_instances()
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


def _render_check(settings: Settings, api: IncusApi | None) -> tuple[list[Instance] | None, Check]:
    """The template over the fleet (over no instances when Incus cannot be listed, so the
    operator's own settings are still checked). The instances, when it renders."""
    try:
        instances = pipeline.collect(api, settings.policy) if api is not None else []
        model = pipeline.model_for(settings, instances)
        render(model, settings)
    except IncusError as exc:
        return None, Check("template", False, str(exc), "see the Incus checks above")
    except SettingsError as exc:
        return None, Check("template", False, str(exc), "fix --snippets (a readable file)")
    except TemplateError as exc:
        return None, Check(
            "template", False, str(exc), "fix the template at the line named, or drop --template"
        )
    rejected = len([r for r in model.rejections if not r.ignored])
    fleet = "" if api is not None else " (without instances: Incus is not reachable)"
    detail = f"renders {len(model.all_sites)} site(s), {rejected} rejected value(s){fleet}"
    return instances, Check("template", True, detail)


def _target_checks(settings: Settings, api: IncusApi | None) -> list[Check]:
    """Caddy, the template, Caddy's verdict on the result, and the output file (of each
    target, named after it when the settings give `--target`s)."""
    instances, rendered = _render_check(settings, api)
    try:
        edges = targets.all_for_settings(settings, api)
    except ValueError:
        where = settings.caddy_instance or "an instance"
        unreachable = Check(
            "caddy admin",
            False,
            f"Caddy runs in {where}, reached through Incus, which is not reachable",
            "see the Incus checks above",
        )
        return [unreachable, rendered]
    if not edges:
        return [rendered, Check("output", True, "stdout (no --output)")]

    def named(name: str, target: targets.Target) -> str:
        return f"{name} ({target.name})" if settings.targets else name

    checks = [_caddy_check(settings, t, named("caddy admin", t)) for t in edges]
    checks.append(rendered)
    refused: dict[tuple[str, str], str] = {}
    for target in edges:
        if instances is not None:
            check, refused = _accepts_check(
                settings, instances, target, named("caddy accepts", target), refused
            )
            checks.append(check)
        checks.append(_output_check(target, named("output", target)))
    return checks


def _caddy_check(settings: Settings, target: targets.Target, name: str) -> Check:
    if not settings.reload:
        return Check(name, True, "not used (--no-reload)")
    try:
        return Check(name, True, target.caddy.ping())
    except CaddyError as exc:
        if isinstance(target.caddy, InstanceCaddy):
            fix = (
                f"start {target.caddy.shell.name} with caddy installed in it (or set"
                " --caddy-bin to its path there), or fix the instance's name"
            )
        else:
            fix = (
                "start Caddy with the same `admin` address, or set --caddy-admin to the one it"
                " uses (or use --reload-command / --no-reload)"
            )
        return Check(name, False, str(exc), fix)


def _accepts_check(
    settings: Settings,
    instances: list[Instance],
    target: targets.Target,
    name: str = "caddy accepts",
    already: dict[tuple[str, str], str] | None = None,
) -> tuple[Check, dict[tuple[str, str], str]]:
    """Caddy's verdict, as render would meet it: the config, and each instance's route
    (without the routes an earlier target's Caddy refused: every edge gets the same bytes).
    Also the routes refused so far."""
    verdict = pipeline.ask_caddy(settings, instances, target.caddy, already)
    refused = {**verdict.refused, **(already or {})}
    if verdict.whole is not None:
        return Check(
            name,
            False,
            f"Caddy rejects the config: {verdict.whole}",
            "fix the --global-option/--acme-dns values, the snippets or sites, or the template",
        ), refused
    if verdict.unasked is not None:
        return Check(
            name,
            False,
            verdict.unasked,
            "start Caddy, or install caddy on PATH / set --caddy-bin",
        ), refused
    if verdict.refused:
        listed = "; ".join(f"{p}/{n}: {why}" for (p, n), why in sorted(verdict.refused.items()))
        return Check(
            name,
            False,
            f"valid without the routes of {len(verdict.refused)} instance(s), which Caddy"
            f" refuses (Caddy refused its route): {listed}",
            "their labels (or the template's use of them) must change; the other routes are"
            " applied (see `incus-caddyfile routes`)",
        ), refused
    return Check(name, True, f"the rendered config is valid ({verdict.checked_by})"), refused


def _output_check(target: targets.Target, name: str = "output") -> Check:
    destination = target.destination
    if not isinstance(destination, LocalFile):
        try:
            destination.read()
        except OutputError as exc:
            return Check(name, False, str(exc), "check the instance and the path in it")
        return Check(name, True, f"{destination.name} can be read")
    path = destination.path
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        return Check(
            name,
            False,
            f"directory {directory} does not exist",
            f"create it: mkdir -p {directory}",
        )
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        os.close(fd)
        os.unlink(temp)
    except OSError as exc:
        return Check(
            name,
            False,
            f"cannot create files in {directory}: {exc.strerror}",
            "give the tool write access to that directory (the atomic write puts a"
            " temp file next to the output), or mount it read-write",
        )
    if path.exists() and not os.access(path, os.W_OK):
        return Check(
            name, False, f"{path} is not writable", f"fix its permissions: chmod u+w {path}"
        )
    return Check(name, True, f"{path} can be written")
