"""Benchmark, scale mode: a large fleet (by default 1000 labelled instances over 5 projects,
300 of them running, the rest created and never started) on a bridge of its own.

Parts (`--parts`, all by default), each figure a ratio or a count against a baseline taken
in the same run:

render    `pipeline.run` in-process (the whole path of `render` to stdout, its memo kept in
          a cache directory as the command does) against the naive `recursion=2` listing +
          the same model and template, interleaved rounds (bench/render.py's two paths).
          Goal: median ratio <= 0.15.
noleases  the same, with the bridge's lease table emptied before every round (as after an
          incusd restart), after a run with the leases that kept its memo: the tool must
          find addresses without leases. Goal: <= 0.15. Also timed: watch's full listing
          with its memo, `render -o FILE` with the memo kept beside FILE, and `render
          --no-cache` (keeps nothing: one state request per running instance).
events    `watch` (a real process, a real Caddy): the Incus requests of the cycle that one
          `incus config set` (one instance-updated event) causes. Goal: the same count
          whatever the fleet size (compare the results of a 150 and a 1000 run).
cycle     the split of watch's cycles (Incus, model, render, Caddy) on a full resync (SIGHUP)
          and on a single-instance event, from its JSON cycle log, against a real Caddy.
rss       `watch` under churn for `--churn-minutes`: every `--churn-every` seconds a running
          member is stopped and a stopped one started (the number running stays the same),
          and now and then a label changes; watch's VmRSS sampled every `--rss-every` s.
          Goal: <= 80 MiB, and flat (the last quarter's median within 5% of the second's).

The fleet is removed at the end unless `--keep` (a kept fleet is used again by `--reuse`);
the bridge too, when it was created here and nothing is kept. Only the local Incus socket
and loopback addresses are used. Emptying the lease file needs write access to
$INCUS_DIR/networks/NET/ (root).
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import render as render_bench
import repo_root  # noqa: F401  (sys.path: the repository root, for tests.harness)
import watch as watch_bench
from fleet import (
    BenchError,
    cleanup,
    common_parser,
    get,
    host,
    incus,
    keep,
    run_and_clean_up,
    write_json,
)
from scalefleet import (
    ScaleFleet,
    converge,
    create,
    delete_network,
    empty_leases,
    ensure_network,
    lease_file,
    leases,
    refill_leases,
    reuse,
    wait_up,
)

from incus_caddyfile import pipeline
from incus_caddyfile.incus import connect
from incus_caddyfile.inventory import AddressMemo
from incus_caddyfile.labels import KEY_PORT
from incus_caddyfile.settings import Settings, default_incus_socket
from tests.harness import ROOT, Caddy, HarnessError, wait_for

PROJECT_PREFIX = "ics-"
T = TypeVar("T")
RESULTS_DIR = ROOT / "bench" / "results"
PARTS = ("render", "noleases", "events", "cycle", "rss")
UP_TIMEOUT_S = 300.0
TARGET_RATIO = 0.15
RSS_LIMIT_MIB = 80.0
RSS_FLAT = 0.05  # the last quarter's median RSS within 5% of the second quarter's
START_TIMEOUT_S = 300.0  # watch's first cycle: with empty lease tables it asks every state


@dataclass
class Run:
    """What this run made and must remove."""

    endpoint: str
    args: argparse.Namespace
    projects: list[str] = field(default_factory=list)
    network_created: bool = False
    workdir: Path | None = None
    caddy: Caddy | None = None
    watch: watch_bench.Watch | None = None

    def close(self) -> bool:
        args = self.args
        if self.watch is not None:
            self.watch.stop()
        if self.caddy is not None:
            self.caddy.stop()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if args.keep and len(self.projects) == args.projects and keep(self.projects):
            return True
        ok = cleanup(self.endpoint, self.projects, args.jobs)
        if self.network_created and ok:
            delete_network(args.network)
        return ok


def prepare(run: Run) -> ScaleFleet:
    args = run.args
    run.network_created = ensure_network(args.network, args.subnet)
    started = time.monotonic()
    fleet = None
    if args.reuse:
        fleet = reuse(run.endpoint, PROJECT_PREFIX, args.projects, args.instances, args.running)
    if fleet is not None:
        run.projects.extend(fleet.projects)
        touched = converge(run.endpoint, fleet, args.jobs)
        refill_leases(run.endpoint, fleet, args.network)
        print(f"reusing kept fleet {fleet.suffix} ({touched} instances fixed up)", flush=True)
    else:
        new = ScaleFleet.new(PROJECT_PREFIX, args.projects, args.instances)
        fleet = ScaleFleet(new.suffix, new.projects, new.size, args.running)
        print(
            f"creating {fleet.size} instances ({fleet.running} started) in"
            f" {', '.join(fleet.projects)} on {args.network} ...",
            flush=True,
        )
        create(fleet, args.network, args.jobs, run.projects)
    waited = wait_up(run.endpoint, fleet, args.network, UP_TIMEOUT_S)
    print(
        f"fleet ready in {time.monotonic() - started:.0f} s ({waited:.0f} s of it waiting for"
        " addresses)",
        flush=True,
    )
    return fleet


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = common_parser(__doc__, RESULTS_DIR / "scale.json")
    parser.set_defaults(instances=1000, projects=5)
    parser.add_argument("--running", type=int, default=300, help="members started")
    parser.add_argument("--network", default="icsbr0", help="the fleet's own bridge")
    parser.add_argument("--subnet", default="198.18.80.1/22", help="its ipv4.address")
    parser.add_argument("--parts", default=",".join(PARTS), help="what to measure (or none)")
    parser.add_argument("--keep", action="store_true", help="keep the fleet for another run")
    parser.add_argument("--reuse", action="store_true", help="use a kept fleet of this shape")
    parser.add_argument("--rounds", type=int, default=7, help="timed render rounds")
    parser.add_argument("--churn-minutes", type=float, default=5.0, help="rss: churn duration")
    parser.add_argument("--churn-every", type=float, default=3.0, help="rss: s between actions")
    parser.add_argument("--rss-every", type=float, default=30.0, help="rss: s between samples")
    parser.add_argument("--seed", type=int, default=13, help="rss: churn's random seed")
    parser.add_argument(
        "--no-leases-watch",
        action="store_true",
        help="events: empty the lease table before watch starts (its first cycle then asks"
        " each running member's state)",
    )
    args = parser.parse_args(argv)
    args.parts = [p for p in args.parts.split(",") if p and p != "none"]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; known: {', '.join(PARTS)}")
    if not 1 <= args.projects <= 9 or not args.projects <= args.instances <= 9999:
        parser.error("need 1 <= --projects <= 9 and --projects <= --instances <= 9999")
    if not 1 <= args.running <= args.instances or args.jobs < 1:
        parser.error("need 1 <= --running <= --instances and --jobs >= 1")
    return args


# ---------------------------------------------------------------- render and noleases


def render_round(
    settings: Settings, endpoint: str, fleet: ScaleFleet, tool_first: bool
) -> tuple[render_bench.Render, render_bench.Render, dict[str, float], bool]:
    """One timed (a)/(b) pair, the tool's split, and whether the whole texts are equal.
    Other users of this Incus change their instances all the time, and a naive listing at
    this size takes seconds: a pair counts when the fleet's own sites are equal, and the
    number of pairs that differed elsewhere is reported. Any difference in the fleet's
    sites stops the benchmark."""
    if tool_first:
        report, b = tool_report(settings), render_bench.run_baseline(settings, endpoint)
    else:
        b, report = render_bench.run_baseline(settings, endpoint), tool_report(settings)
    assert report.model is not None
    a = render_bench.Render(sum(report.steps.values()), report.text or "", report.model)
    render_bench.check_texts(a.text, fleet, "tool")
    ours_a = render_bench.bench_sites(a.built, fleet)
    ours_b = render_bench.bench_sites(b.built, fleet)
    if ours_a != ours_b or len(ours_a) != len(fleet.hosts()):
        raise BenchError(
            f"tool and baseline differ on the fleet's sites ({len(ours_a)}, {len(ours_b)} of"
            f" {len(fleet.hosts())}):\n" + render_bench.first_difference(a.text, b.text)
        )
    return a, b, report.steps, a.text == b.text


def tool_report(settings: Settings) -> pipeline.Report:
    report = pipeline.run(settings)
    if report.error is not None or report.text is None or report.model is None:
        raise BenchError(f"the tool failed: {report.message}")
    return report


def measure_render(run: Run, fleet: ScaleFleet, no_leases: bool) -> dict[str, Any]:
    """Interleaved rounds after a warm-up; with no_leases the lease table is emptied before
    each round (and checked empty)."""
    # `render` to stdout as the command runs it: keeping its memo in a cache directory
    workdir = Path(tempfile.mkdtemp(prefix="ics-render-"))
    args, settings = run.args, Settings(scheme="http", cache_dir=workdir / "cache")
    bare = Settings(scheme="http")  # --no-cache: keeps nothing, so asks every state
    tool: list[float] = []
    base: list[float] = []
    splits: list[dict[str, float]] = []
    others_changed = 0
    memo, memo_times, file_times, bare_times = AddressMemo(), [], [], []
    with_file = Settings(scheme="http", output=workdir / "Caddyfile", reload=False)
    if no_leases:  # what a running watch found before the lease tables were emptied
        refill_leases(run.endpoint, fleet, args.network)
        pipeline.collect(connect(settings), memo=memo)
        tool_report(with_file)  # `render -o`: its memo kept beside the file
        tool_report(settings)  # `render`: in the cache directory
    refilled = [0]

    def leaseless(timed: Callable[[], T]) -> T:
        """`timed` with the lease table empty from start to end, when no_leases: dnsmasq
        writes the whole table again at any lease change (a renewal by any running member,
        every few seconds at this size), so it is emptied right before and checked right
        after; a run that saw it refilled is run again."""
        if not no_leases:
            return timed()
        for _ in range(20):
            empty_leases(args.network)
            if not leases(run.endpoint, args.network, fleet.projects):  # (the API agrees)
                result = timed()
                if lease_file(args.network).stat().st_size == 0:
                    return result
            refilled[0] += 1
        raise BenchError(f"the lease table of {args.network} kept filling up")

    for attempt in range(args.rounds + 1):
        a, b, split, same = leaseless(
            partial(render_round, settings, run.endpoint, fleet, attempt % 2 == 0)
        )
        if attempt == 0:
            continue  # warm-up (checked, not timed)
        others_changed += not same
        if no_leases:
            memo_times.append(leaseless(partial(resync_with_memo, bare, memo, fleet, a)))
            file_times.append(leaseless(partial(timed_render, with_file, fleet, a)))
            bare_times.append(leaseless(partial(timed_render, bare, fleet, a)))
        tool.append(a.seconds)
        base.append(b.seconds)
        splits.append(split)

    def requests_of(kept: AddressMemo | None) -> int:
        """The Incus requests of one listing with this memo (None: none)."""
        api = connect(settings)
        pipeline.collect(api, memo=kept)
        return api.requests

    kept = pipeline.kept_state(settings, [])
    tool_requests = leaseless(partial(requests_of, kept.memo if kept else None))
    memo_figures = {}
    if no_leases:
        memo_requests = leaseless(partial(requests_of, memo))
        bare_requests = leaseless(partial(requests_of, None))
    refill_leases(run.endpoint, fleet, args.network)
    ratio = statistics.median(tool) / statistics.median(base)
    if no_leases:
        memo_ratio = statistics.median(memo_times) / statistics.median(base)
        file_ratio = statistics.median(file_times) / statistics.median(base)
        bare_ratio = statistics.median(bare_times) / statistics.median(base)
        memo_figures = {
            "render_no_cache": render_bench.summary(bare_times),
            "render_no_cache_ratio": round(bare_ratio, 4),
            "render_no_cache_requests": bare_requests,
            "render_o_with_kept_memo": render_bench.summary(file_times),
            "render_o_with_kept_memo_ratio": round(file_ratio, 4),
            "render_o_target_met": file_ratio <= TARGET_RATIO,
            "with_memo": render_bench.summary(memo_times),
            "with_memo_requests": memo_requests,
            "with_memo_ratio": round(memo_ratio, 4),
            "with_memo_target_met": memo_ratio <= TARGET_RATIO,
        }
    return {
        "lease_table": "emptied before each round" if no_leases else "as it is",
        "rounds": len(tool),
        "rounds_where_others_changed": others_changed,
        "runs_again_after_dnsmasq_refilled_the_table": refilled[0],
        "tool": render_bench.summary(tool),
        "baseline": render_bench.summary(base),
        "tool_split_median_ms": {
            k: round(statistics.median(s.get(k, 0.0) for s in splits) * 1000, 1) for k in splits[0]
        },
        "tool_requests": tool_requests,
        "ratio": round(ratio, 4),
        "target": f"<= {TARGET_RATIO}",
        "target_met": ratio <= TARGET_RATIO,
        **memo_figures,
    }


def resync_with_memo(
    settings: Settings, memo: AddressMemo, fleet: ScaleFleet, tool: render_bench.Render
) -> float:
    """What watch's full listing costs with the lease tables empty: the same path as the
    tool, with the addresses it found before (its AddressMemo). Checked against the tool."""
    started = time.perf_counter()
    instances = pipeline.collect(connect(settings), memo=memo)
    report = pipeline.apply(settings, instances, None)
    seconds = time.perf_counter() - started
    assert report.model is not None
    if render_bench.bench_sites(report.model, fleet) != render_bench.bench_sites(tool.built, fleet):
        raise BenchError("the listing with the memo routes the fleet differently")
    return seconds


def timed_render(settings: Settings, fleet: ScaleFleet, tool: render_bench.Render) -> float:
    """Another way to run `render` (`-o FILE` with the memo kept beside FILE; --no-cache)
    with the lease tables empty: the whole path, timed; checked against the tool's routes."""
    started = time.perf_counter()
    report = tool_report(settings)
    seconds = time.perf_counter() - started
    assert report.model is not None
    if render_bench.bench_sites(report.model, fleet) != render_bench.bench_sites(tool.built, fleet):
        raise BenchError(f"render ({settings.output or 'stdout'}) routes the fleet differently")
    return seconds


# ---------------------------------------------------------------- events and cycle split


def start_watch(run: Run, fleet: ScaleFleet) -> watch_bench.Watch:
    """A real Caddy and `watch` for it; returns once watch routed the fleet and settled."""
    if run.workdir is None:
        run.workdir = Path(tempfile.mkdtemp(prefix="ics-scale-"))
    if run.caddy is None:
        run.caddy = watch_bench.start_caddy(run.workdir)
    watch = watch_bench.Watch(run.workdir / "Caddyfile", run.caddy, watch_bench.mark(fleet))
    run.watch = watch
    first = watch.wait_cycle(lambda _c: True, 0, START_TIMEOUT_S)
    if first.get("error"):
        raise BenchError(f"watch's first cycle failed: {first.get('message')}")
    text = watch.routes()
    missing = [h for h in fleet.hosts() if not watch_bench.routed(text, h)]
    if missing:
        raise BenchError(f"watch's first cycle did not route {len(missing)} hosts")
    watch.settle()
    return watch


def cycle_figures(cycle: dict[str, Any]) -> dict[str, Any]:
    return {
        "triggers": cycle.get("triggers"),
        "incus_requests": cycle.get("incus_requests"),
        "duration_ms": cycle.get("duration_ms"),
        "steps_ms": cycle.get("steps_ms"),
        "reloaded": cycle.get("reloaded"),
    }


def median_split(cycles: Sequence[dict[str, Any]]) -> dict[str, float]:
    keys = sorted({k for c in cycles for k in c.get("steps_ms") or {}})
    return {
        k: round(statistics.median((c.get("steps_ms") or {}).get(k, 0.0) for c in cycles), 1)
        for k in keys
    }


def measure_events(run: Run, fleet: ScaleFleet) -> dict[str, Any]:
    """watch's first cycle (the full listing, the whole config to Caddy), then one event at
    a time (bench/watch.py's port changes), then a full resync (SIGHUP, file unchanged)."""
    if run.args.no_leases_watch:
        empty_leases(run.args.network)
    watch = start_watch(run, fleet)
    assert run.caddy is not None
    first = watch.cycles()[0]
    sample = watch_bench.measure_requests(watch, run.caddy, fleet)
    after = len(watch.cycles())
    watch.signal(signal.SIGHUP)
    resync = watch.wait_cycle(lambda c: "signal" in (c.get("triggers") or []), after)
    refill_leases(run.endpoint, fleet, run.args.network)
    events = sample["samples"]
    return {
        "start_cycle": cycle_figures(first),
        "requests_per_event": sample["values"],
        "event_cycles_split_median_ms": median_split(
            [c for c in watch.cycles() if c.get("triggers") in [[s["triggers"][0]] for s in events]]
        ),
        "event_samples": events,
        "disturbed_samples": len(sample["disturbed"]),
        "resync_cycle": cycle_figures(resync),
        "all_served": all(s["served"] for s in events),
    }


# ---------------------------------------------------------------- rss under churn


class Churn:
    """Stops a running member and starts a stopped one, or changes a running member's port
    label; the set of running members is tracked here (it starts as the fleet's shape).
    A failed incus command (another user restarting incusd, say) is counted and the churn
    goes on; MAX_FAILURES in a row stop the benchmark."""

    MAX_FAILURES = 20

    def __init__(self, fleet: ScaleFleet, seed: int) -> None:
        self.rng = random.Random(seed)
        self.up = list(fleet.up())
        self.down = list(fleet.down())
        self.ports: dict[tuple[str, str], str] = {}
        self.actions = {"swap": 0, "port": 0, "failed": 0}
        self.failures_in_a_row = 0

    def step(self) -> None:
        try:
            self._step()
            self.failures_in_a_row = 0
        except HarnessError as exc:
            self.actions["failed"] += 1
            self.failures_in_a_row += 1
            print(f"  churn: {exc}", flush=True)
            if self.failures_in_a_row >= self.MAX_FAILURES:
                raise BenchError(f"{self.MAX_FAILURES} churn actions failed in a row") from None

    def _step(self) -> None:
        if self.rng.random() < 0.7 and len(self.up) > 1 and self.down:
            sp, sn = self.up.pop(self.rng.randrange(len(self.up)))
            try:
                incus("stop", "--force", sn, "--project", sp)
            except HarnessError:
                self.up.append((sp, sn))
                raise
            self.down.append((sp, sn))
            tp, tn = self.down.pop(self.rng.randrange(len(self.down) - 1))
            try:
                incus("start", tn, "--project", tp)
            except HarnessError:
                self.down.append((tp, tn))
                raise
            self.up.append((tp, tn))
            self.actions["swap"] += 1
        else:
            p, n = self.rng.choice(self.up)
            port = "8080" if self.ports.get((p, n), "80") == "80" else "80"
            incus("config", "set", n, f"{KEY_PORT}={port}", "--project", p)
            self.ports[(p, n)] = port
            self.actions["port"] += 1


def measure_rss(run: Run, fleet: ScaleFleet) -> dict[str, Any]:
    """watch under churn for --churn-minutes; VmRSS every --rss-every seconds. In the end the
    file must route exactly the members running then."""
    args = run.args
    watch = run.watch or start_watch(run, fleet)
    churn = Churn(fleet, args.seed)
    samples: list[tuple[float, float]] = []
    began = time.monotonic()
    next_sample = began
    cycles_before = len(watch.cycles())
    while time.monotonic() - began < args.churn_minutes * 60:
        if watch.proc.poll() is not None:
            raise BenchError(f"watch exited with {watch.proc.returncode}:\n{watch.tail()}")
        now = time.monotonic()
        if now >= next_sample:
            rss_kib, cpu_ms = watch_bench.proc_figures(watch.pid)
            samples.append((round(now - began, 1), round(rss_kib / 1024, 1)))
            print(
                f"  {now - began:7.0f} s  rss {rss_kib / 1024:6.1f} MiB"
                f"  cpu {cpu_ms / 1000:7.1f} s  cycles {len(watch.cycles()) - cycles_before}"
                f"  {churn.actions}",
                flush=True,
            )
            next_sample += args.rss_every
        churn.step()
        time.sleep(args.churn_every)
    end_rss, end_cpu = watch_bench.proc_figures(watch.pid)
    samples.append((round(time.monotonic() - began, 1), round(end_rss / 1024, 1)))
    settled = settle_routes(watch, churn)
    cycles = watch.cycles()[cycles_before:]
    mibs = [m for _, m in samples]
    quarter = max(1, len(mibs) // 4)
    second, last = (
        statistics.median(mibs[quarter : 2 * quarter]),
        statistics.median(mibs[-quarter:]),
    )
    flat = abs(last - second) <= RSS_FLAT * second
    return {
        "minutes": round((time.monotonic() - began) / 60, 1),
        "churn": churn.actions,
        "cycles": len(cycles),
        "failed_cycles": sum(1 for c in cycles if c.get("error")),
        "cpu_s": round(end_cpu / 1000, 1),
        "rss_mib_samples": samples,
        "rss_mib_max": max(mibs),
        "rss_mib_second_quarter_median": second,
        "rss_mib_last_quarter_median": last,
        "routes_match_running_members": settled,
        "target": f"<= {RSS_LIMIT_MIB} MiB and flat (last quarter within {RSS_FLAT:.0%})",
        "target_met": max(mibs) <= RSS_LIMIT_MIB and flat,
    }


def settle_routes(watch: watch_bench.Watch, churn: Churn) -> bool:
    """Whether the file ends up routing exactly the members running now (bounded wait)."""
    up = {host(n) for _, n in churn.up}
    down = {host(n) for _, n in churn.down}

    def matches() -> bool:
        text = watch.routes()
        return all(watch_bench.routed(text, h) for h in up) and not any(
            watch_bench.routed(text, h) for h in down
        )

    return bool(wait_for(matches, 120, 1.0))


# ---------------------------------------------------------------- report


def report(figures: dict[str, Any]) -> None:
    print(
        f"\nfleet: {figures['instances']} instances ({figures['running']} running) in"
        f" {figures['projects']} projects; {figures['other_instances']} other instances"
    )
    for part in ("render", "noleases"):
        f = figures.get(part)
        if f:
            print(
                f"{part}: tool {f['tool']['median_ms']} ms (split {f['tool_split_median_ms']},"
                f" {f['tool_requests']} requests) vs naive {f['baseline']['median_ms']} ms:"
                f" ratio {f['ratio']} (target {f['target']}: "
                f"{'met' if f['target_met'] else 'MISSED'})"
            )
        if f and "with_memo" in f:
            print(
                f"  with watch's memo: {f['with_memo']['median_ms']} ms,"
                f" {f['with_memo_requests']} requests: ratio {f['with_memo_ratio']}"
                f" ({'met' if f['with_memo_target_met'] else 'MISSED'})"
            )
            print(
                f"  render -o with its kept memo: {f['render_o_with_kept_memo']['median_ms']}"
                f" ms: ratio {f['render_o_with_kept_memo_ratio']}"
                f" ({'met' if f['render_o_target_met'] else 'MISSED'})"
            )
            print(
                f"  render --no-cache: {f['render_no_cache']['median_ms']} ms,"
                f" {f['render_no_cache_requests']} requests: ratio {f['render_no_cache_ratio']}"
            )
    ev = figures.get("events")
    if ev:
        print(
            f"events: requests per single-instance event {ev['requests_per_event']};"
            f" event cycle split (median) {ev['event_cycles_split_median_ms']}"
        )
        for name in ("start_cycle", "resync_cycle"):
            c = ev[name]
            print(
                f"  {name}: {c['duration_ms']} ms, {c['incus_requests']} requests,"
                f" split {c['steps_ms']}"
            )
    rss = figures.get("rss")
    if rss:
        print(
            f"rss: {rss['minutes']} min of churn {rss['churn']}, {rss['cycles']} cycles"
            f" ({rss['failed_cycles']} failed), max {rss['rss_mib_max']} MiB, median"
            f" {rss['rss_mib_second_quarter_median']} -> {rss['rss_mib_last_quarter_median']}"
            f" MiB; routes match: {rss['routes_match_running_members']}; target"
            f" {rss['target']}: {'met' if rss['target_met'] else 'MISSED'}"
        )


def bench(run: Run) -> dict[str, Any]:
    args = run.args
    fleet = prepare(run)
    figures: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "instances": fleet.size,
        "running": fleet.running,
        "projects": len(fleet.projects),
        "other_instances": len(get(run.endpoint, "instances", {"all-projects": "true"}))
        - fleet.size,
    }
    for part in args.parts:
        print(f"{part} ...", flush=True)
        if part in ("render", "noleases"):
            figures[part] = measure_render(run, fleet, part == "noleases")
        elif part in ("events", "cycle"):
            figures["events"] = figures.get("events") or measure_events(run, fleet)
        elif part == "rss":
            figures["rss"] = measure_rss(run, fleet)
        write_json(args.json, figures)  # what was measured so far survives a later failure
    report(figures)
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run(default_incus_socket(), args)
    return run_and_clean_up(lambda: bench(run), run.close)


if __name__ == "__main__":
    sys.exit(main())
