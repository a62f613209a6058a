"""One cycle: incus -> model -> render -> write -> reload-if-changed. Results are data.

Order of the write: render, compare with the file on disk (equal bytes: stop, no reload),
have Caddy check the text, replace the file atomically, reload; if Caddy refuses the reload,
put the previous file back, so the file on disk is always a config Caddy accepted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import IntEnum

from . import output, probe, targets
from .caddy import CaddyError, CaddyRejected, CaddyUnreachable
from .incus import IncusApi, IncusError, connect
from .inventory import Inventory
from .model import Instance, Model, RouteRow, build, explain
from .output import Changed, OutputError
from .render import TemplateError, render
from .settings import Settings, SettingsError
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


@dataclass(frozen=True)
class RunMode:
    """How a cycle treats the file and Caddy.

    check, diff: write nothing (compare, or show the diff).
    verify_running: when the file is unchanged, still ask Caddy whether it runs it (and
        reload if not); watch turns it off while it knows its last reload succeeded.
    force_reload: reload even when the file is unchanged (a file it imports changed).
    """

    check: bool = False
    diff: bool = False
    verify_running: bool = True
    force_reload: bool = False

    @property
    def dry_run(self) -> bool:
        return self.check or self.diff


@dataclass
class Report:
    """What one cycle did. `return_code()` is the exit status of the command that ran it."""

    mode: RunMode = field(default_factory=RunMode)
    target: str | None = None  # the name of the file written (None: stdout)
    text: str | None = None
    model: Model | None = None
    changed: Changed | None = None
    written: bool = False
    reloaded: bool = False
    diff: str | None = None
    error: Status | None = None
    message: str = ""
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """What happened to the file and Caddy, in the words `render` and `watch` print."""
        if self.error is not None:
            return f"error: {self.message}"
        reloaded = ", Caddy reloaded" if self.reloaded else ""
        if self.changed is Changed.NO:
            return "unchanged" + reloaded
        if self.mode.dry_run:
            return "would change"
        return "written" + reloaded

    def fail(self, status: Status, message: str) -> Report:
        self.error, self.message = status, message
        return self

    def return_code(self) -> int:
        if self.error is not None:
            return int(self.error)
        if self.mode.check and self.changed is Changed.YES:
            return int(Status.WOULD_CHANGE)
        if self.model is not None and any(not r.ignored for r in self.model.rejections):
            return int(Status.REJECTED)
        return int(Status.OK)


def collect(api: IncusApi) -> list[Instance]:
    """Step 1 (and the readiness probes it asks for). Raises IncusError: a failed or partial
    listing is never rendered."""
    return probe.annotate(Inventory(api).instances())


def fetch(api: IncusApi, project: str, name: str) -> Instance | None:
    """One instance refreshed (and probed, if it asks to be); None when it is gone."""
    inst = Inventory(api).instance(project, name)
    return None if inst is None else probe.annotate([inst])[0]


_SNIPPET = re.compile(r"^\(([A-Za-z0-9_.-]+)\)", re.MULTILINE)


def model_for(settings: Settings, instances: list[Instance]) -> Model:
    """Step 2 with every setting that shapes it (wildcards, policy, the operator's snippets);
    render, routes and doctor all build their model here. Raises SettingsError when the
    snippets file cannot be read."""
    return build(instances, settings.wildcards, settings.policy, snippet_names(settings))


def snippet_names(settings: Settings) -> tuple[str, ...]:
    """Names of the snippets `(name) { ... }` the operator's --snippets file defines."""
    if settings.snippets is None:
        return ()
    try:
        return tuple(_SNIPPET.findall(settings.snippets.read_text()))
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise SettingsError(f"--snippets: cannot read {settings.snippets}: {reason}") from None


def run(settings: Settings, mode: RunMode | None = None) -> Report:
    """The whole cycle, from the Incus listing to a reloaded Caddy."""
    mode = mode or RunMode()
    try:
        api = connect(settings)
        instances = collect(api)
    except IncusError as exc:
        return Report(mode).fail(Status.INCUS_ERROR, f"{exc}; nothing was written")
    return apply(settings, instances, targets.for_settings(settings, api), mode)


def apply(
    settings: Settings,
    instances: list[Instance],
    target: Target | None,
    mode: RunMode | None = None,
) -> Report:
    """Steps 2-5 from a listing already made (watch keeps its own cache of instances).
    `target`: where the file goes and the Caddy that runs it (None: only render)."""
    report = Report(mode or RunMode())
    try:
        report.model = model_for(settings, instances)
        report.text = render(report.model, settings)
    except SettingsError as exc:
        return report.fail(Status.USAGE, f"settings error: {exc}; nothing was written")
    except TemplateError as exc:
        return report.fail(Status.TEMPLATE_ERROR, f"template error: {exc}; nothing was written")
    if target is None:
        return report
    report.target = target.name
    return _write_and_reload(settings, target, report)


def _write_and_reload(settings: Settings, target: Target, report: Report) -> Report:
    assert report.text is not None
    mode = report.mode
    new = report.text.encode()
    try:
        current = target.destination.read()
    except OutputError as exc:
        return report.fail(Status.WRITE_FAILED, str(exc))
    report.changed = output.compare(current, new)
    if mode.diff:
        report.diff = output.unified_diff(target.name, current, new)
    if mode.dry_run:
        return report
    if report.changed is Changed.NO:
        if settings.reload:
            _reload_if_stale(target, report)
        return report

    try:
        target.caddy.check(report.text)
    except CaddyRejected as exc:
        return report.fail(
            Status.CADDY_REJECTED,
            f"Caddy rejected the new config, {target.name} kept as it was: {exc}",
        )
    except CaddyUnreachable as exc:
        report.warnings.append(f"the new config was not checked by Caddy: {exc}")
    except OutputError as exc:
        return report.fail(Status.WRITE_FAILED, f"{exc}; the previous file is intact")

    try:
        note = target.destination.write(new)
    except OutputError as exc:
        return report.fail(Status.WRITE_FAILED, f"{exc}; the previous file is intact")
    report.written = True
    if note:
        report.warnings.append(note)
    if settings.reload:
        _reload(target, current, report)
    return report


def _reload(target: Target, previous: bytes | None, report: Report) -> None:
    assert report.text is not None
    try:
        target.caddy.load(report.text)
        report.reloaded = True
        target.destination.set_pending(False)
    except CaddyRejected as exc:
        _restore(target, previous, report)
        report.fail(
            Status.CADDY_REJECTED,
            f"Caddy rejected the new config and keeps running the old one: {exc}",
        )
    except CaddyError as exc:
        target.destination.set_pending(True)  # the next run (or watch's retry) reloads
        report.fail(
            Status.RELOAD_FAILED, f"{target.name} was written but Caddy was not reloaded: {exc}"
        )


def _reload_if_stale(target: Target, report: Report) -> None:
    """The file is current, but is Caddy? Reload when Caddy says it runs something else
    (verify_running), when a reload failed after the file was written (the pending mark, for
    Caddies that cannot say what they run), or when forced (watch: an imported file
    changed). A failed reload leaves the mark, so the next run tries again."""
    assert report.text is not None
    mode = report.mode
    try:
        if not mode.force_reload:
            running = target.caddy.running(report.text) if mode.verify_running else None
            if running is True:
                target.destination.set_pending(False)
                return
            if running is None and not target.destination.pending():
                return
        target.caddy.load(report.text)
    except CaddyRejected as exc:
        report.fail(Status.CADDY_REJECTED, f"Caddy rejected the current file: {exc}")
        return
    except CaddyError as exc:
        target.destination.set_pending(True)
        report.fail(Status.RELOAD_FAILED, f"the file is current but Caddy was not reloaded: {exc}")
        return
    target.destination.set_pending(False)
    report.reloaded = True
    if not mode.force_reload:
        report.warnings.append("Caddy was not running the current file; reloaded it")


def _restore(target: Target, previous: bytes | None, report: Report) -> None:
    """Put back the file Caddy is still running, so disk and Caddy agree."""
    try:
        target.destination.restore(previous)
        report.written = False
    except (OSError, OutputError, CaddyError) as exc:
        report.warnings.append(f"could not restore the previous {target.name}: {exc}")


def routes(settings: Settings) -> list[RouteRow]:
    """Every labelled instance with its verdict (for `routes`). Raises IncusError, and
    SettingsError when the snippets file cannot be read."""
    instances = collect(connect(settings))
    return explain(instances, model_for(settings, instances))
