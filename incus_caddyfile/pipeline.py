"""One cycle: incus -> model -> render -> write -> reload-if-changed. Results are data.

Order of the write: render, compare with the file on disk (equal bytes: stop, no reload).
Through Caddy's admin API: load the text (Caddy adapts it once, and keeps its running config
if it refuses), then replace the file atomically, and put Caddy back on the previous file if
that fails. Otherwise (a reload command, a Caddy in an instance, --no-reload, the admin API
down): have Caddy check the text, replace the file, reload; if Caddy refuses the reload, put
the previous file back. Either way the file on disk is always a config Caddy accepted.
"""

from __future__ import annotations

import dataclasses
import re
import socket
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

from . import lastknown, output, probe, targets
from .caddy import AdminCaddy, Caddy, CaddyError, CaddyRejected, CaddyUnreachable
from .incus import IncusApi, IncusError, connect
from .inventory import AddressMemo, Bounds, Inventory, LeaseOutage
from .model import Instance, Model, RouteRow, build, explain, reach_target
from .output import Changed, OutputError
from .policy import Policy
from .render import TemplateError, render
from .settings import Settings, SettingsError, TargetSpec, default_incus_socket, place
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
    PARTIAL = 9  # several targets: some run the new config, others failed (each named)


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
    Status.PARTIAL: "several targets: applied to some, others failed (see stderr)",
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
    # Seconds per step, where a cycle's time goes: "incus" (the listing), "model", "render",
    # "caddy" (compare with the file, Caddy's check or /load, the write; within it "load"
    # and "write"). For the cycle log, bench/scale.py and bench/traffic.py.
    steps: dict[str, float] = field(default_factory=dict)
    # Several targets: what happened at each (same model and text); empty with one target.
    edges: list[Report] = field(default_factory=list)
    # Instances whose routes a Caddy refused (found by bisection), with Caddy's reason.
    refused: dict[Key, str] = field(default_factory=dict)

    def by_target(self) -> list[Report]:
        """What happened at each target: the edges, or this report for a single target."""
        return self.edges or ([self] if self.target is not None else [])

    @property
    def state(self) -> str:
        """A target's state: current (Caddy runs the file, or --no-reload and the file is
        written), pending (the file is written, Caddy's reload is owed and retried), failed."""
        if self.error is None:
            return "current"
        return "pending" if self.error == Status.RELOAD_FAILED else "failed"

    @contextmanager
    def timed(self, step: str) -> Iterator[None]:
        """Add the time the block takes to `steps` (where a cycle's time goes)."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.steps[step] = self.steps.get(step, 0.0) + time.perf_counter() - began

    def summary(self) -> str:
        """What happened to the file and Caddy, in the words `render` and `watch` print."""
        if self.edges:
            return "; ".join(f"{e.target}: {e.summary()}" for e in self.edges)
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


def collect(
    api: IncusApi,
    policy: Policy | None = None,
    notes: list[str] | None = None,
    outage: LeaseOutage | None = None,
    memo: AddressMemo | None = None,
) -> list[Instance]:
    """Step 1 (and the readiness probes it asks for). Raises IncusError: a failed listing is
    never rendered. Projects the policy leaves out cost no address request. What had to be
    done without (leases that failed; an instance whose state failed, then unknown) is
    added to `notes`; `outage`: failed leases remembered across cycles (watch); `memo`:
    addresses of NICs still up since they were found, kept by the caller (watch)."""
    considers = policy.considers if policy is not None else None
    inventory = Inventory(api, considers=considers, outage=outage, memo=memo)
    try:
        return probe.annotate(inventory.instances())
    finally:
        if notes is not None:
            notes.extend(inventory.notes)


def fetch(
    api: IncusApi,
    project: str,
    name: str,
    own: bool = False,
    bounds: Bounds | None = None,
    notes: list[str] | None = None,
    outage: LeaseOutage | None = None,
    just_up: Callable[[str], bool] | None = None,
    memo: AddressMemo | None = None,
) -> Instance | None:
    """One instance refreshed (and probed, if it asks to be); None when it is gone. `own`:
    its addresses as it reports them itself (configured), not its DHCP lease; `bounds`:
    managed networks' subnets the caller keeps (see Inventory); `notes`, `outage`, `memo`:
    as for collect; `just_up`: it was down (see Inventory.instance)."""
    inventory = Inventory(api, bounds, outage=outage, memo=memo)
    try:
        inst = inventory.instance(project, name, own, just_up)
    finally:
        if notes is not None:
            notes.extend(inventory.notes)
    return None if inst is None else probe.annotate([inst])[0]


def state_keeper(settings: Settings) -> lastknown.Keeper | None:
    """Where the last known routes are kept: beside the output file on this host (with
    several targets, the first that writes one); for an output that is not a file here
    (stdout, a Caddy inside an instance), in the cache directory, under a name that says
    what is rendered from which Incus; None with no cache directory (--no-cache)."""
    output = local_output(settings)
    if output is not None:
        return lastknown.Keeper.beside(output)
    if settings.cache_dir is None:
        return None
    return lastknown.Keeper.cached(settings.cache_dir, cache_owner(settings))


def cache_owner(settings: Settings) -> str:
    """Whose state a file in the cache directory is: what is rendered, from which Incus (a
    unix socket's path is the same on every host: a cache on a shared home must not mix
    two hosts'), and, when the policy leaves projects out, which ones count (two renders
    that list different projects would otherwise replace each other's)."""
    incus = settings.incus or f"{default_incus_socket()} on {socket.gethostname()}"
    owner = f"{rendered_to(settings)} from {incus}"
    policy = settings.policy
    if policy.include or policy.exclude:
        owner += f", projects {list(policy.include) or ['*']} but not {list(policy.exclude)}"
    return owner


def local_output(settings: Settings) -> Path | None:
    """The output file on this host (with several targets, the first that writes one)."""
    if settings.targets:
        local = (Path(t.output) for t in settings.targets if t.instance is None and t.output)
        return next(local, None)
    return settings.output if settings.caddy_instance is None else None


def rendered_to(settings: Settings) -> str:
    """What an output that is not a file on this host is: stdout, or files in instances."""
    if settings.targets:
        return ", ".join(place(t) for t in settings.targets)
    if settings.caddy_instance is not None:
        spec = TargetSpec(
            "--caddy-instance", instance=settings.caddy_instance, output=settings.output
        )
        return place(spec)
    return "stdout"


def kept_state(settings: Settings, notes: list[str]) -> lastknown.Known | None:
    """What the last run kept (last known routes, the addresses of NICs by boot), read
    once per run; why nothing could be taken from there is added to `notes`. None when
    nothing is kept for these settings."""
    keeper = state_keeper(settings)
    if keeper is None:
        return None
    known = lastknown.load(keeper)
    if known.problem:
        notes.append(known.problem)
    return known


def recall(
    settings: Settings, instances: list[Instance], known: lastknown.Known | None = None
) -> tuple[list[Instance], list[str]]:
    """Instances in Error (cluster member unreachable) with the addresses they last had, as
    the last run kept them (`known`: as read already); warnings when that memory is
    unusable."""
    keeper = state_keeper(settings)
    return lastknown.recall(keeper, instances, known) if keeper is not None else (instances, [])


def own_addresses(api: IncusApi, inst: Instance, bounds: Bounds | None = None) -> Instance | None:
    """The instance with the addresses it has configured now (one request: its live state),
    probed if it asks to be; None when it is gone. For polls of an instance whose NICs are
    known from a refresh."""
    found = Inventory(api, bounds).own(inst)
    return None if found is None else probe.annotate([found])[0]


def nearby(
    api: IncusApi, inst: Instance, bounds: Bounds | None = None, timeout: float = probe.TIMEOUT
) -> Instance | None:
    """The instance, ready, at an address it answers on that the host already resolves to
    its MAC (its DHCP answer went out), found without an Incus request: the address is in
    the host's neighbour table with the NIC's MAC, inside its managed network's subnet, and
    its port accepts a connection (which proves the instance has configured the address).
    None when there is no such address yet. Dialling only complete neighbour entries never
    leaves one incomplete (a dial before the instance configured its address would, and
    the next dials would wait about 1 s for the kernel's next ARP try)."""
    candidate = Inventory(api, bounds).nearby(inst, probe.neighbours)
    target = reach_target(candidate) if candidate is not None else None
    if candidate is None or target is None or not probe.accepts(*target, timeout=timeout):
        return None
    return dataclasses.replace(candidate, ready=True)


_SNIPPET = re.compile(r"^\(([A-Za-z0-9_.-]+)\)", re.MULTILINE)
Key = tuple[str, str]  # (project, instance)


def model_for(
    settings: Settings,
    instances: list[Instance],
    refused: Mapping[tuple[str, str], str] | None = None,
    draining: Iterable[Key] = (),
) -> Model:
    """Step 2 with every setting that shapes it (wildcards, policy, the operator's snippets);
    render, routes and doctor all build their model here. `refused`: instances whose routes
    Caddy refused (see `accepted_config`); `draining`: instances watch takes out of their
    pools. Raises SettingsError when the snippets file cannot be read."""
    return build(
        instances,
        settings.wildcards,
        settings.policy,
        snippet_names(settings),
        refused,
        tuning=settings.tuning,
        draining=draining,
    )


class WholeConfigRejected(Exception):
    """Caddy refuses the config even without any instance's route: the operator's template,
    global options, snippets or sites are at fault. The message is Caddy's."""


def accepted_config(
    settings: Settings,
    instances: list[Instance],
    caddy: Caddy,
    reason: str,
    draining: Iterable[Key] = (),
    already: Mapping[Key, str] | None = None,
) -> tuple[Model, str, dict[Key, str]]:
    """Caddy refused the rendered config (`reason`): find the instances whose routes cause
    it, by asking Caddy about parts of the config, and return the model and text without
    their routes, and Caddy's reason for each. Cost only on this failure path: about
    2 log2(n) checks for one culprit among n instances.

    `already`: routes another Caddy refused: kept out (every edge gets the same bytes).

    Raises WholeConfigRejected when the config fails without any instance's route, and
    CaddyError when Caddy stops answering meanwhile.
    """
    found: dict[Key, str] = dict(already or {})
    candidates = sorted(
        (i.project, i.name) for i in instances if i.labels and (i.project, i.name) not in found
    )
    drained = frozenset(draining)

    def attempt(keep: set[Key]) -> tuple[Model, str, str | None]:
        refused = {k: "" for k in candidates if k not in keep} | found
        model = model_for(settings, instances, refused, drained)
        text = render(model, settings)
        try:
            caddy.check(text)
        except CaddyRejected as exc:
            return model, text, str(exc)
        return model, text, None

    if attempt(set())[2] is not None:
        raise WholeConfigRejected(reason)

    def search(group: list[Key]) -> None:
        why = attempt(set(group))[2]
        if why is None:
            return
        if len(group) == 1:
            found[group[0]] = why
            return
        half = len(group) // 2
        search(group[:half])
        search(group[half:])

    search(candidates)
    model, text, why = attempt(set(candidates))
    if why is not None:
        # Routes that fail only together: admit instances oldest first, refusing each whose
        # route makes the config fail (who was there first keeps its route, as with hosts).
        kept: set[Key] = set()
        for inst in sorted(instances, key=lambda i: (i.created_at, i.project, i.name)):
            key = (inst.project, inst.name)
            if key not in candidates or key in found:
                continue
            why = attempt(kept | {key})[2]
            if why is None:
                kept.add(key)
            else:
                found[key] = why
        model, text, why = attempt(kept)
        if why is not None:
            raise WholeConfigRejected(why)
    return model, text, found


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
    """The whole cycle, from the Incus listing to a reloaded Caddy (every target's)."""
    mode = mode or RunMode()
    notes: list[str] = []
    listing = Report(mode)
    kept = kept_state(settings, notes)
    try:
        with listing.timed("incus"):
            api = connect(settings)
            instances = collect(api, settings.policy, notes, memo=kept.memo if kept else None)
    except IncusError as exc:
        return listing.fail(Status.INCUS_ERROR, f"{exc}; nothing was written")
    edges = targets.all_for_settings(settings, api)
    report = apply_all(settings, instances, edges, mode, kept=kept)
    report.warnings[:0] = notes
    report.steps = listing.steps | report.steps
    return report


def apply_all(
    settings: Settings,
    instances: list[Instance],
    edges: Sequence[Target],
    mode: RunMode | None = None,
    draining: Iterable[Key] = (),
    verify: Collection[str] | None = None,
    kept: lastknown.Known | None = None,
) -> Report:
    """Steps 2-5 for every target: one model, one render, the same bytes to each, all at
    once; a target that is down or refuses does not stop the others (its report says why).
    `verify`: the targets to ask whether they run the file when it is unchanged (None: as
    `mode` says); `kept`: what the last run kept (see apply). With one target this
    is `apply`, report for report."""
    mode = mode or RunMode()

    def mode_for(target: Target) -> RunMode:
        if verify is None:
            return mode
        return dataclasses.replace(mode, verify_running=target.name in verify)

    if len(edges) <= 1:
        one = edges[0] if edges else None
        return apply(settings, instances, one, mode_for(one) if one else mode, draining, kept)
    drained = frozenset(draining)
    report, instances = _rendered(settings, instances, mode, drained, kept)
    if report.error is not None:
        return report

    def apply_to(target: Target) -> Report:
        edge = Report(
            mode_for(target), model=report.model, text=report.text, refused=dict(report.refused)
        )
        edge.target = target.name
        return _write_and_reload(settings, instances, target, edge, drained)

    # The targets are applied at the same time: one that is slow to answer (a host down
    # without a reset) does not delay the others' reloads. A route one Caddy refuses is kept
    # out of every edge's config (the same bytes on each, so a client gets the same answer
    # from either): the edges that took the config with it get the one without it. Each
    # pass refuses at least one more route, so this ends.
    with ThreadPoolExecutor(len(edges), thread_name_prefix="target") as pool:
        for _ in range(len(instances) + 2):
            report.edges = list(pool.map(apply_to, edges))
            more = [(t, e) for t, e in zip(edges, report.edges, strict=True)
                    if e.refused.keys() - report.refused.keys()]  # fmt: skip
            if not more:
                break
            for target, edge in more:
                _refused_by(settings, instances, report, edge, target.name, drained)
    # The state is kept once: with the target whose file it sits beside, or (kept in the
    # cache directory) with the first target that holds the new config.
    output = local_output(settings)
    for target, edge in zip(edges, report.edges, strict=True):
        if target.destination.name == str(output) or (output is None and _holds(edge)):
            _remember(settings, instances, edge, kept)  # its warning: the edge's, summed below
            break
    return _summed(report)


def _refused_by(
    settings: Settings,
    instances: list[Instance],
    report: Report,
    edge: Report,
    name: str,
    draining: frozenset[Key],
) -> None:
    """Routes this target's Caddy refused: the config without them, for every target, with
    the reason naming the target (another edge may have taken them: its Caddy differs)."""
    for key, why in edge.refused.items():  # (those refused before keep their reason)
        report.refused.setdefault(key, f"{why} (at {name})")
    report.model = model_for(settings, instances, report.refused, draining)
    report.text = render(report.model, settings)


def _summed(report: Report) -> Report:
    """The whole cycle's outcome from its targets': errors only when one failed, PARTIAL
    when some are current and others not."""
    edges = report.edges
    report.target = ", ".join(e.target or "" for e in edges)
    report.written = any(e.written for e in edges)
    report.reloaded = any(e.reloaded for e in edges)
    changed = [e.changed for e in edges if e.changed is not None]
    report.changed = Changed.YES if Changed.YES in changed else (changed[0] if changed else None)
    diffs = [e.diff for e in edges if e.diff]
    report.diff = "".join(diffs) if diffs else None
    report.warnings += [f"{e.target}: {w}" for e in edges for w in e.warnings]  # (after the
    # cycle's own: the last known routes recalled for every target)
    failed = [e for e in edges if e.error is not None]
    if failed:
        message = "; ".join(f"{e.target}: {e.message}" for e in failed)
        status = failed[0].error if len(failed) == len(edges) else Status.PARTIAL
        assert status is not None
        report.fail(status, message)
    return report


def apply(
    settings: Settings,
    instances: list[Instance],
    target: Target | None,
    mode: RunMode | None = None,
    draining: Iterable[Key] = (),
    kept: lastknown.Known | None = None,
) -> Report:
    """Steps 2-5 from a listing already made (watch keeps its own cache of instances).
    `target`: where the file goes and the Caddy that runs it (None: only render);
    `draining`: instances to take out of their pools (see model.build); `kept`: what the
    last run kept, as `render` read it (watch keeps its own in memory): its last known
    routes, and its memo of the addresses of NICs by boot, kept again for the next run."""
    drained = frozenset(draining)
    report, instances = _rendered(settings, instances, mode or RunMode(), drained, kept)
    if report.error is not None:
        return report
    if target is not None:
        report.target = target.name
        with report.timed("caddy"):
            _write_and_reload(settings, instances, target, report, drained)
    _remember(settings, instances, report, kept)  # (stdout: in the cache directory)
    return report


def _rendered(
    settings: Settings,
    instances: list[Instance],
    mode: RunMode,
    drained: frozenset[Key],
    kept: lastknown.Known | None = None,
) -> tuple[Report, list[Instance]]:
    """Steps 2-3: the model and the text, from the instances with the routes that the ones
    in Error last had (the instances returned; `kept`: as read already)."""
    report = Report(mode)
    instances, report.warnings = recall(settings, instances, kept)
    try:
        with report.timed("model"):
            report.model = model_for(settings, instances, draining=drained)
        with report.timed("render"):
            report.text = render(report.model, settings)
    except SettingsError as exc:
        report.fail(Status.USAGE, f"settings error: {exc}; nothing was written")
    except TemplateError as exc:
        report.fail(Status.TEMPLATE_ERROR, f"template error: {exc}; nothing was written")
    return report, instances


def _remember(
    settings: Settings, instances: list[Instance], report: Report, kept: lastknown.Known | None
) -> None:
    """Keep the addresses of this listing beside the output once the output holds it (so
    the next run can keep the route of an instance whose member becomes unreachable), with
    the memo `kept` brought (render; watch keeps its own)."""
    memo = kept.memo if kept is not None else None
    keeper = state_keeper(settings)
    if keeper is None or report.mode.dry_run or not _holds(report):
        return
    if memo is None and not report.written and keeper.file.exists():
        return  # the output, and so the routes it was kept for, did not change
    warning = lastknown.remember(keeper, instances, memo)  # (written only when it changed)
    if warning:
        report.warnings.append(warning)


def _holds(report: Report) -> bool:
    """Its output holds the new config (written; Caddy may have failed to reload it)."""
    return report.error is None or report.error is Status.RELOAD_FAILED


def _write_and_reload(
    settings: Settings,
    instances: list[Instance],
    target: Target,
    report: Report,
    draining: frozenset[Key],
) -> Report:
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
    if settings.reload and target.caddy.load_checks:
        return _load_then_write(settings, instances, target, current, report, draining)
    return _check_then_write(settings, instances, target, current, report, draining)


def _check_then_write(
    settings: Settings,
    instances: list[Instance],
    target: Target,
    current: bytes | None,
    report: Report,
    draining: frozenset[Key],
) -> Report:
    """Caddy checks the text, the file is replaced, Caddy is reloaded (put the previous file
    back if Caddy refuses after all): for a Caddy whose reload is not its check (a reload
    command, a Caddy in an instance), with --no-reload, or when the admin API is down."""
    assert report.text is not None
    new = report.text.encode()
    try:
        target.caddy.check(report.text)
    except CaddyRejected as exc:
        if not _without_refused_routes(
            settings, instances, target.caddy, report, str(exc), draining
        ):
            return report
        new = (report.text or "").encode()
        report.changed = output.compare(current, new)
        if report.changed is Changed.NO:
            if settings.reload:
                _reload_if_stale(target, report)
            return report
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


def _load_then_write(
    settings: Settings,
    instances: list[Instance],
    target: Target,
    current: bytes | None,
    report: Report,
    draining: frozenset[Key],
) -> Report:
    """One adaptation per change: Caddy's admin `/load` adapts the text and applies it, or
    refuses it and keeps running what it ran, so it is the check too. The file is replaced
    only once Caddy took the text, so it is still always a config Caddy accepted; if it
    cannot be replaced, Caddy is put back on the previous file. A Caddy that does not answer
    gets the other order (checked by `caddy adapt`, written, the reload left pending)."""
    assert report.text is not None
    try:
        with report.timed("load"):
            target.caddy.load(report.text)
    except CaddyRejected as exc:
        reason = _refused_text(target.caddy, report.text, exc)
        if reason is None:  # the text is fine; running it is not (a port in use ...)
            return report.fail(
                Status.CADDY_REJECTED,
                f"Caddy rejected the new config and keeps running the old one, {report.target}"
                f" kept as it was: {exc}",
            )
        if not _without_refused_routes(settings, instances, target.caddy, report, reason, draining):
            return report
        report.changed = output.compare(current, (report.text or "").encode())
        if report.changed is Changed.NO:
            _reload_if_stale(target, report)
            return report
        try:
            target.caddy.load(report.text or "")
        except CaddyRejected as again:
            return report.fail(
                Status.CADDY_REJECTED,
                f"Caddy rejected the new config, {report.target} kept as it was: {again}",
            )
        except CaddyError:
            return _check_then_write(settings, instances, target, current, report, draining)
    except CaddyError:
        return _check_then_write(settings, instances, target, current, report, draining)
    report.reloaded = True
    try:
        with report.timed("write"):
            note = target.destination.write((report.text or "").encode())
    except OutputError as exc:
        _unload(target, current, report)
        return report.fail(Status.WRITE_FAILED, f"{exc}; the previous file is intact")
    report.written = True
    target.destination.set_pending(False)
    if note:
        report.warnings.append(note)
    return report


def _refused_text(caddy: Caddy, text: str, refusal: CaddyRejected) -> str | None:
    """Caddy refused to load the text: is it the text (then Caddy's reason, for finding the
    routes that cause it) or only running it? (None: the text adapts; a failure path only.)"""
    try:
        caddy.check(text)
    except CaddyRejected as exc:
        return str(exc)
    except CaddyError:
        return str(refusal)
    return None


def _unload(target: Target, previous: bytes | None, report: Report) -> None:
    """The new text could not be written after Caddy took it: put Caddy back on the file,
    so that disk and Caddy agree again."""
    report.reloaded = False
    if previous is None:
        report.warnings.append(
            f"Caddy runs a config that is not in {target.name} (there was no previous file to"
            " put back); the next run loads the file"
        )
        target.destination.set_pending(True)
        return
    try:
        target.caddy.load(previous.decode("utf-8", "replace"))
    except CaddyError as exc:
        target.destination.set_pending(True)
        report.warnings.append(f"could not put Caddy back on the previous {target.name}: {exc}")


def _without_refused_routes(
    settings: Settings,
    instances: list[Instance],
    caddy: Caddy,
    report: Report,
    reason: str,
    draining: frozenset[Key] = frozenset(),
) -> bool:
    """Caddy refused the config: drop the routes that cause it (the report's model and text
    become the accepted config, the instances are rejected with Caddy's reason). False (the
    report failed) when the config fails as a whole, or Caddy stopped answering."""
    try:
        report.model, report.text, report.refused = accepted_config(
            settings, instances, caddy, reason, draining, report.refused
        )
    except WholeConfigRejected as exc:
        report.fail(
            Status.CADDY_REJECTED,
            f"Caddy rejected the new config even without any instance's route (check the"
            f" template, global options, snippets and sites), {report.target} kept as it was:"
            f" {exc}",
        )
        return False
    except CaddyError as exc:
        report.fail(
            Status.CADDY_REJECTED,
            f"Caddy rejected the new config, {report.target} kept as it was: {reason}"
            f" (and could not be asked which routes cause it: {exc})",
        )
        return False
    return True


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
                if mode.verify_running:
                    report.warnings.append(
                        f"cannot tell whether Caddy runs the current file ({target.caddy.name}"
                        " cannot say); not reloaded"
                    )
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


@dataclass(frozen=True)
class Verdict:
    """What Caddy says of the rendered config: accepted (maybe without the routes of some
    instances, `refused`), refused as a whole (`whole`), or not asked (`unasked`)."""

    model: Model
    text: str
    refused: dict[Key, str] = field(default_factory=dict)
    whole: str | None = None
    unasked: str | None = None
    checked_by: str = ""  # who said so (the admin API, `caddy adapt` ...)

    @property
    def warnings(self) -> list[str]:
        if self.whole:
            return [f"Caddy refuses the config even without any instance's route: {self.whole}"]
        if self.unasked:
            return [f"Caddy could not be asked, so its verdict is missing: {self.unasked}"]
        return []


def ask_caddy(
    settings: Settings,
    instances: list[Instance],
    caddy: Caddy,
    already: Mapping[Key, str] | None = None,
) -> Verdict:
    """The model and text as Caddy would take them (for `routes` and `doctor`, which show
    what render would apply). `already`: routes another edge's Caddy refused. Raises
    SettingsError and TemplateError."""
    model = model_for(settings, instances, already or None)
    text = render(model, settings)
    try:
        checked_by = caddy.check(text)
    except CaddyRejected as exc:
        try:
            accepted, accepted_text, refused = accepted_config(
                settings, instances, caddy, str(exc), already=already
            )
        except WholeConfigRejected as whole:
            return Verdict(model, text, dict(already or {}), whole=str(whole))
        except (CaddyError, OutputError) as error:
            return Verdict(model, text, dict(already or {}), unasked=str(error))
        return Verdict(accepted, accepted_text, refused, checked_by=caddy.name)
    except (CaddyError, OutputError) as exc:
        return Verdict(model, text, dict(already or {}), unasked=str(exc))
    return Verdict(model, text, dict(already or {}), checked_by=checked_by)


def ask_all(settings: Settings, instances: list[Instance], edges: Sequence[Target]) -> Verdict:
    """`ask_caddy` of every target's Caddy, each one's refusals kept out for the next (the
    same bytes for all); the last verdict, with every refusal, naming the target when there
    are several."""
    verdict: Verdict | None = None
    refused: dict[Key, str] = {}
    for target in edges:
        verdict = ask_caddy(settings, instances, target.caddy, refused)
        if len(edges) > 1:
            refused |= {k: f"{w} (at {target.name})" if k not in refused else w
                        for k, w in verdict.refused.items()}  # fmt: skip
        else:
            refused = dict(verdict.refused)
    if verdict is None:
        raise ValueError("no target to ask")
    if len(edges) > 1 and refused:
        model = model_for(settings, instances, refused)
        verdict = dataclasses.replace(
            verdict, model=model, text=render(model, settings), refused=refused
        )
    return verdict


@dataclass(frozen=True)
class TargetState:
    """Does this target's Caddy run the config render would apply? (`routes`.)"""

    name: str
    state: str  # current, pending (it runs another config), unknown, failed
    detail: str = ""


def target_state(target: Target, text: str) -> TargetState:
    try:
        running = target.caddy.running(text)
    except CaddyError as exc:
        return TargetState(target.name, "failed", str(exc))
    if running is None:
        return TargetState(target.name, "unknown", f"{target.caddy.name} cannot say what it runs")
    if running:
        return TargetState(target.name, "current", "runs the current config")
    return TargetState(target.name, "pending", "runs another config: the next render loads it")


def checker(settings: Settings, api: IncusApi | None) -> Caddy:
    """The Caddy that render would ask: the target's, or the admin endpoint (with `caddy
    adapt` as the fallback) when the Caddyfile goes to stdout."""
    target = targets.for_settings(settings, api)
    if target is not None:
        return target.caddy
    return AdminCaddy(settings.caddy_admin, settings.caddy_bin)


def routes(settings: Settings) -> tuple[list[RouteRow], list[str], list[TargetState]]:
    """Every labelled instance with its verdict, Caddy's included (for `routes`), warnings,
    and with `--target`s each target's state. Raises IncusError, SettingsError and
    TemplateError."""
    api = connect(settings)
    notes: list[str] = []
    kept = kept_state(settings, notes)
    listed = collect(api, settings.policy, notes, memo=kept.memo if kept else None)
    instances, recalled = recall(settings, listed, kept)
    if not settings.targets:
        verdict = ask_caddy(settings, instances, checker(settings, api))
        return explain(instances, verdict.model), notes + recalled + verdict.warnings, []
    edges = targets.all_for_settings(settings, api)
    verdict = ask_all(settings, instances, edges)
    states = [target_state(t, verdict.text) for t in edges]
    return explain(instances, verdict.model), notes + recalled + verdict.warnings, states
