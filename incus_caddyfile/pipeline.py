"""One cycle: incus -> model -> render -> write -> reload-if-changed. Results are data.

Order of the write: render, compare with the file on disk (equal bytes: stop, no reload),
have Caddy check the text, replace the file atomically, reload; if Caddy refuses the reload,
put the previous file back, so the file on disk is always a config Caddy accepted.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum

from . import caddy, output, probe, targets
from .incus import IncusClient, IncusError, Tls
from .model import Instance, Model, RouteRow, build, explain
from .output import Changed, OutputError
from .render import TemplateError, render
from .settings import Settings, default_incus_socket
from .targets import Target


class Status(IntEnum):
    """The exit-code contract (README "Exit codes"; repeated in --help)."""

    OK = 0  # rendered; written and reloaded if it changed, or already up to date
    WOULD_CHANGE = 1  # --check: the file on disk differs from what would be written
    USAGE = 2  # bad option, setting or settings file
    REJECTED = 3  # rendered and applied, but some instances' labels were rejected
    INCUS_ERROR = 4  # Incus unreachable or the listing failed: nothing written
    CADDY_REJECTED = 5  # Caddy refused the config: the previous file was kept
    RELOAD_FAILED = 6  # the file was written but Caddy could not be reloaded
    WRITE_FAILED = 7  # the output file could not be written: the previous file is intact
    TEMPLATE_ERROR = 8  # the template failed to load or render: nothing written


EXIT_MEANINGS = {
    Status.OK: "ok: written (and Caddy reloaded) if it changed, or already up to date",
    Status.WOULD_CHANGE: "--check: the file would change",
    Status.USAGE: "usage: bad option, setting or settings file",
    Status.REJECTED: "done, but some instances' labels were rejected (see stderr)",
    Status.INCUS_ERROR: "Incus unreachable or the listing failed: nothing written",
    Status.CADDY_REJECTED: "Caddy rejected the config: the previous file kept",
    Status.RELOAD_FAILED: "file written, but reloading Caddy failed",
    Status.WRITE_FAILED: "the output file could not be written: previous file intact",
    Status.TEMPLATE_ERROR: "the template failed: nothing written",
}
EXIT_CODES_HELP = "\n".join(f"  {s.value}  {EXIT_MEANINGS[s]}" for s in Status)


@dataclass
class Report:
    """What one cycle did. `return_code` is the exit status of the command that ran it."""

    text: str | None = None
    model: Model | None = None
    changed: Changed | None = None
    written: bool = False
    in_place: bool = False
    checked_by: str | None = None
    reloaded: bool = False
    diff: str | None = None
    error: Status | None = None
    message: str = ""
    warnings: list[str] = field(default_factory=list)

    def summary(self, dry_run: bool = False) -> str:
        """What happened to the file and Caddy, in the words `render` and `watch` print."""
        if self.error is not None:
            return f"error: {self.message}"
        reloaded = ", Caddy reloaded" if self.reloaded else ""
        if self.changed is Changed.NO:
            return "unchanged" + reloaded
        if dry_run:
            return "would change"
        return "written" + reloaded

    def fail(self, status: Status, message: str) -> Report:
        self.error, self.message = status, message
        return self

    def return_code(self, check: bool = False) -> int:
        if self.error is not None:
            return int(self.error)
        if check and self.changed is Changed.YES:
            return int(Status.WOULD_CHANGE)
        if self.model is not None and any(not r.ignored for r in self.model.rejections):
            return int(Status.REJECTED)
        return int(Status.OK)


def connect(settings: Settings) -> IncusClient:
    tls = Tls(settings.incus_cert, settings.incus_key, settings.incus_server_cert)
    return IncusClient(settings.incus or default_incus_socket(), tls)


def collect(settings: Settings, client: IncusClient | None = None) -> list[Instance]:
    """Step 1 (and the readiness probes it asks for). Raises IncusError: a failed or partial
    listing is never rendered."""
    return probe.annotate((client or connect(settings)).list_instances())


_SNIPPET = re.compile(r"^\(([A-Za-z0-9_.-]+)\)", re.MULTILINE)


def model_for(settings: Settings, instances: list[Instance]) -> Model:
    """Step 2 with every setting that shapes it (wildcards, policy, the operator's snippets);
    render, routes and doctor all build their model here. Raises TemplateError when the
    snippets file cannot be read."""
    return build(instances, settings.wildcards, settings.policy, snippet_names(settings))


def snippet_names(settings: Settings) -> tuple[str, ...]:
    """Names of the snippets `(name) { ... }` the operator's --snippets file defines."""
    if settings.snippets is None:
        return ()
    try:
        return tuple(_SNIPPET.findall(settings.snippets.read_text()))
    except OSError as exc:
        raise TemplateError(f"cannot read the snippets file {settings.snippets}: {exc}") from None


def run(
    settings: Settings,
    *,
    check: bool = False,
    diff: bool = False,
    lister: Callable[[Settings], list[Instance]] | None = None,
) -> Report:
    """The whole cycle, from the Incus listing to a reloaded Caddy."""
    report = Report()
    try:
        instances = (lister or collect)(settings)
    except IncusError as exc:
        return report.fail(Status.INCUS_ERROR, f"{exc}; nothing was written")
    return apply(settings, instances, report, check=check, diff=diff)


def apply(
    settings: Settings,
    instances: list[Instance],
    report: Report,
    *,
    check: bool = False,
    diff: bool = False,
    verify_running: bool = True,
    target: Target | None = None,
    force_reload: bool = False,
) -> Report:
    """Steps 2-5 from a listing already made (watch keeps its own cache of instances).

    verify_running: when the file is unchanged, still ask Caddy whether it runs it (and
    reload if not). watch turns it off while it knows its last reload succeeded.
    target: where to write (default: the one the settings name); watch keeps one.
    force_reload: reload even when the file is unchanged (a file it imports changed).
    """
    try:
        report.model = model_for(settings, instances)
        report.text = render(report.model, settings)
    except TemplateError as exc:
        return report.fail(Status.TEMPLATE_ERROR, f"template error: {exc}; nothing was written")
    target = target or targets.for_settings(settings)
    if target is None:
        return report
    return _write_and_reload(
        settings,
        target,
        report,
        check=check,
        diff=diff,
        verify_running=verify_running,
        force_reload=force_reload,
    )


def _write_and_reload(
    settings: Settings,
    target: Target,
    report: Report,
    *,
    check: bool,
    diff: bool,
    verify_running: bool,
    force_reload: bool = False,
) -> Report:
    assert report.text is not None
    new = report.text.encode()
    try:
        current = target.read()
    except OutputError as exc:
        return report.fail(Status.WRITE_FAILED, str(exc))
    report.changed = output.compare(current, new)
    if diff:
        report.diff = output.unified_diff(target.name, current, new)
    if check or diff:
        return report
    if report.changed is Changed.NO:
        if settings.reload:
            _reload_if_stale(target, report, verify=verify_running, force=force_reload)
        return report

    try:
        report.checked_by = target.check(report.text)
    except caddy.CaddyRejected as exc:
        return report.fail(
            Status.CADDY_REJECTED,
            f"Caddy rejected the new config, {target.name} kept as it was: {exc}",
        )
    except caddy.CaddyUnreachable as exc:
        report.warnings.append(f"the new config was not checked by Caddy: {exc}")
    except OutputError as exc:
        return report.fail(Status.WRITE_FAILED, f"{exc}; the previous file is intact")

    try:
        report.in_place = target.write(new)
    except OutputError as exc:
        return report.fail(Status.WRITE_FAILED, f"{exc}; the previous file is intact")
    report.written = True
    if report.in_place:
        report.warnings.append(
            f"{target.name} could not be replaced by rename (a single-file bind mount?);"
            " it was rewritten in place"
        )
    if settings.reload:
        _reload(target, current, report)
    return report


def _reload(target: Target, previous: bytes | None, report: Report) -> None:
    assert report.text is not None
    try:
        target.reload(report.text)
        report.reloaded = True
        target.set_pending(False)
    except caddy.CaddyRejected as exc:
        _restore(target, previous, report)
        report.fail(
            Status.CADDY_REJECTED,
            f"Caddy rejected the new config and keeps running the old one: {exc}",
        )
    except caddy.CaddyError as exc:
        target.set_pending(True)  # the next run (or watch's retry) reloads, file unchanged
        report.fail(
            Status.RELOAD_FAILED, f"{target.name} was written but Caddy was not reloaded: {exc}"
        )


def _reload_if_stale(target: Target, report: Report, *, verify: bool, force: bool) -> None:
    """The file is current, but is Caddy? Reload when Caddy says it runs something else
    (verify), when a reload failed after the file was written (the pending mark, for
    targets that cannot say what they run), or when forced (watch: an imported file
    changed). A failed reload leaves the mark, so the next run tries again."""
    assert report.text is not None
    try:
        if not force:
            running = target.running(report.text) if verify else None
            if running is True:
                target.set_pending(False)
                return
            if running is None and not target.pending():
                return
        target.reload(report.text)
    except caddy.CaddyRejected as exc:
        report.fail(Status.CADDY_REJECTED, f"Caddy rejected the current file: {exc}")
        return
    except caddy.CaddyError as exc:
        target.set_pending(True)
        report.fail(Status.RELOAD_FAILED, f"the file is current but Caddy was not reloaded: {exc}")
        return
    target.set_pending(False)
    report.reloaded = True
    if not force:
        report.warnings.append("Caddy was not running the current file; reloaded it")


def _restore(target: Target, previous: bytes | None, report: Report) -> None:
    """Put back the file Caddy is still running, so disk and Caddy agree."""
    try:
        target.restore(previous)
        report.written = False
    except (OSError, OutputError, caddy.CaddyError) as exc:
        report.warnings.append(f"could not restore the previous {target.name}: {exc}")


def routes(settings: Settings) -> list[RouteRow]:
    """Every labelled instance with its verdict (for `routes`). Raises IncusError."""
    instances = collect(settings)
    return explain(instances, model_for(settings, instances))
