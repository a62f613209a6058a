"""Benchmark: one render of a 150-instance fleet, tool against a naive recursion=2 listing.

What is measured, on a real fleet (by default 150 running, labelled busybox containers spread
over 3 throwaway Incus projects, created here and deleted afterwards):

(a) tool: `pipeline.run(Settings(scheme="http"))` in-process, the whole path the CLI takes:
    connect, list with `recursion=1` + one DHCP-lease request per (project, network), build the
    model, render the template.
(b) baseline: what a straightforward implementation would do: connect, one
    `GET /1.0/instances?recursion=2&all-projects=true` (live state of every instance, which
    Incus gathers one instance at a time), addresses from `state.network`, then the same
    `model.build` + `render.render`. Both (a) and (b) build a fresh pylxd client each round.
(c) the CLI as a process (`incus-caddyfile render --scheme http`), wall time, for information
    (interpreter start and imports included).

Why: the listing strategy in `incus_caddyfile/incus.py` exists to keep a render cheap as the
fleet grows (it runs on every change in `watch`). The target is median(a) / median(b) <= 0.6.

(a) and (b) are timed interleaved, alternating which goes first, after one untimed warm-up.
Every round checks that both rendered byte-identical text with all bench sites in it; a round
whose texts differ only outside the bench sites (another user of this Incus changed their
instances meanwhile) is discarded and repeated, a bounded number of times; any other difference
stops the benchmark with a non-zero exit. The fleet is removed in a `finally`, also on Ctrl-C
or SIGTERM, unless --keep is given (a kept fleet can be used again with --reuse).

Only the local Incus unix socket is used (`incus --force-local`, pylxd on the socket path).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import secrets
import shutil
import signal
import statistics
import string
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import pylxd
from pylxd import exceptions as pylxd_exc

from incus_caddyfile import model, pipeline, render
from incus_caddyfile.incus import IncusClient
from incus_caddyfile.settings import Settings, default_incus_socket

IMAGE = os.environ.get("INCUS_CADDYFILE_LAB_IMAGE", "icf-busybox")
NETWORK = os.environ.get("INCUS_CADDYFILE_LAB_NETWORK", "icfbr0")
POOL = "default"
PROJECT_PREFIX = "icfb-"
PROJECT_RE = re.compile(r"icfb-([a-z0-9]{6})-p([0-9]+)")
KEPT_KEY = "user.icfb.kept"  # set on every project of a fleet kept with --keep
SIZE_KEY = "user.icfb.instances"  # fleet size, so --reuse only picks a fleet of the same size
DOMAIN = "bench.localhost"
TARGET_RATIO = 0.6
DHCP_TIMEOUT_S = 120.0
CLI_TIMEOUT_S = 120.0
MAX_DISCARDED_ROUNDS = 5  # or --rounds, if larger
DISCARD_PAUSE_S = 1.0  # let a neighbour's instance finish starting
RESULTS = Path(__file__).resolve().parent / "results" / "render.json"
LISTING = {"recursion": "2", "all-projects": "true"}


class BenchError(Exception):
    """The benchmark cannot go on (setup failed, or (a) and (b) did not do the same work)."""


class Terminated(BaseException):
    """SIGTERM arrived; raised so that the `finally` cleanup runs."""


# ---------------------------------------------------------------- fleet description


@dataclass(frozen=True)
class Fleet:
    """The throwaway projects and instance names of one benchmark fleet."""

    suffix: str
    projects: tuple[str, ...]
    size: int

    @classmethod
    def new(cls, projects: int, size: int) -> Fleet:
        alphabet = string.ascii_lowercase + string.digits
        suffix = "".join(secrets.choice(alphabet) for _ in range(6))
        return cls(suffix, project_names(suffix, projects), size)

    def members(self) -> list[tuple[str, str]]:
        """(project, instance) for every instance, spread round-robin over the projects."""
        count = len(self.projects)
        return [
            (self.projects[i % count], f"b{i % count}-{i:03d}-{self.suffix}")
            for i in range(self.size)
        ]

    def hosts(self) -> dict[str, tuple[str, str]]:
        """Expected bench host -> (project, instance) serving it."""
        return {f"{name}.{DOMAIN}": (project, name) for project, name in self.members()}


def project_names(suffix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{PROJECT_PREFIX}{suffix}-p{p}" for p in range(count))


def labels(name: str) -> dict[str, str]:
    return {
        model.KEY_ENABLE: "true",
        model.KEY_HOST: f"{name}.{DOMAIN}",
        model.KEY_PORT: "80",
    }


# ---------------------------------------------------------------- talking to Incus


def incus(*args: str, timeout: float = 120.0) -> str:
    """Run the incus CLI against the local socket only; a failure raises BenchError."""
    cmd = ["incus", "--force-local", "-q", *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"timed out after {timeout:.0f} s: {' '.join(cmd)}") from None
    if done.returncode != 0:
        raise BenchError(f"failed ({done.returncode}): {' '.join(cmd)}: {done.stderr.strip()}")
    return done.stdout


def api(endpoint: str) -> Any:
    """The pylxd API root on the local socket."""
    return pylxd.Client(endpoint=endpoint).api


def get(endpoint: str, path: str, params: dict[str, str]) -> Any:
    node = api(endpoint)
    for part in path.split("/"):
        node = node[part]
    return node.get(params=params).json()["metadata"]


def project_instances(endpoint: str, project: str) -> dict[str, str]:
    """Instance name -> status in one project."""
    data = get(endpoint, "instances", {"recursion": "1", "project": project})
    return {raw["name"]: raw.get("status", "") for raw in data or []}


def existing_projects(endpoint: str) -> dict[str, dict[str, str]]:
    """Project name -> config, for every project."""
    return {p["name"]: p.get("config") or {} for p in get(endpoint, "projects", {"recursion": "1"})}


def run_parallel(jobs: int, tasks: Sequence[Callable[[], object]]) -> list[BaseException]:
    """Run tasks on a small pool; return the failures. Pending tasks are cancelled on Ctrl-C."""
    failures: list[BaseException] = []
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = [pool.submit(task) for task in tasks]
        for future in as_completed(futures):
            exc = future.exception()
            if exc is not None:
                failures.append(exc)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return failures


# ---------------------------------------------------------------- creating and removing


def create_project(name: str, size: int, created: list[str]) -> None:
    incus("project", "create", name, "-c", "features.images=false", "-c", f"{SIZE_KEY}={size}")
    created.append(name)  # from here on it is ours to delete
    incus("profile", "device", "add", "default", "root", "disk", "path=/", f"pool={POOL}",
          "--project", name)
    incus("profile", "device", "add", "default", "eth0", "nic", f"network={NETWORK}",
          "name=eth0", "--project", name)


def launch(project: str, name: str) -> None:
    config = [arg for k, v in labels(name).items() for arg in ("-c", f"{k}={v}")]
    incus("launch", IMAGE, name, "--project", project, *config)


def launch_all(members: Sequence[tuple[str, str]], jobs: int) -> None:
    failures = run_parallel(jobs, [partial(launch, p, n) for p, n in members])
    if failures:
        raise BenchError(f"{len(failures)} launches failed, first: {failures[0]}")


def delete_projects(endpoint: str, projects: Sequence[str], jobs: int) -> list[str]:
    """Delete projects of ours and every instance in them. Returns what could not be removed."""
    problems: list[str] = []
    doomed: list[tuple[str, str]] = []
    for project in projects:
        try:
            doomed += [(project, n) for n in sorted(project_instances(endpoint, project))]
        except pylxd_exc.NotFound:
            continue
        except Exception as exc:
            problems.append(f"{project}: cannot list instances: {exc}")
    tasks = [partial(incus, "delete", "--force", n, "--project", p) for p, n in doomed]
    problems += [str(exc) for exc in run_parallel(jobs, tasks)]
    for project in projects:
        try:
            incus("project", "delete", project)
        except BenchError as exc:
            if "not found" not in str(exc).lower():
                problems.append(str(exc))
    return problems


def cleanup(endpoint: str, projects: Sequence[str], jobs: int) -> bool:
    """Remove our projects; signals are ignored meanwhile so a second Ctrl-C cannot cut it."""
    if not projects:
        return True
    print(f"cleanup: deleting projects {', '.join(projects)} and their instances ...", flush=True)
    started = time.perf_counter()
    with signals_ignored():
        problems = delete_projects(endpoint, projects, jobs)
    if problems:
        print("cleanup: LEFT BEHIND (remove by hand with incus delete --force / "
              "incus project delete):", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return False
    print(f"cleanup: done in {time.perf_counter() - started:.1f} s")
    return True


def keep(projects: Sequence[str]) -> bool:
    """Mark the fleet as kept for --reuse. False (then it is deleted) if that fails."""
    try:
        with signals_ignored():
            for project in projects:
                incus("project", "set", project, f"{KEPT_KEY}=true")
    except BenchError as exc:
        print(f"bench: cannot mark the fleet as kept, deleting it: {exc}", file=sys.stderr)
        return False
    print(f"kept: {', '.join(projects)} (use --reuse to run on them again; remove with "
          f"`incus delete --force NAME --project P` and `incus project delete P`)")
    return True


def find_kept(endpoint: str, projects: int, size: int) -> Fleet | None:
    """A fleet left by --keep with the same shape, or None."""
    found: dict[str, set[int]] = {}
    for name, config in existing_projects(endpoint).items():
        match = PROJECT_RE.fullmatch(name)
        if match and config.get(KEPT_KEY) == "true" and config.get(SIZE_KEY) == str(size):
            found.setdefault(match.group(1), set()).add(int(match.group(2)))
    for suffix, indexes in sorted(found.items()):
        if indexes == set(range(projects)):
            return Fleet(suffix, project_names(suffix, projects), size)
    return None


def claim(fleet: Fleet) -> None:
    """Unmark a kept fleet while we use it: a concurrent --reuse will not pick it too."""
    for project in fleet.projects:
        incus("project", "unset", project, KEPT_KEY)


def top_up(endpoint: str, fleet: Fleet, jobs: int) -> None:
    """Launch missing instances and start stopped ones of a reused fleet."""
    present: dict[tuple[str, str], str] = {}
    for project in fleet.projects:
        for name, status in project_instances(endpoint, project).items():
            present[(project, name)] = status
    missing = [m for m in fleet.members() if m not in present]
    stopped = [m for m in fleet.members() if present.get(m) not in (None, "Running")]
    launch_all(missing, jobs)
    failures = run_parallel(jobs, [partial(incus, "start", n, "--project", p) for p, n in stopped])
    if failures:
        raise BenchError(f"{len(failures)} starts failed, first: {failures[0]}")


def wait_for_addresses(endpoint: str, fleet: Fleet, timeout: float) -> float:
    """Wait until every bench instance is running with an IPv4 address in its state and a
    DHCP lease (the tool reads the leases, the baseline the state). Returns seconds waited."""
    started = time.perf_counter()
    expected = {(p, n) for p, n in fleet.members()}
    ready: set[tuple[str, str]] = set()
    for _ in range(int(timeout) + 1):
        ready = addressed(endpoint, fleet) & expected
        if ready == expected:
            return time.perf_counter() - started
        if time.perf_counter() - started > timeout:
            break
        time.sleep(1.0)
    raise BenchError(f"only {len(ready)} of {len(expected)} instances got an IPv4 address "
                     f"within {timeout:.0f} s")


def addressed(endpoint: str, fleet: Fleet) -> set[tuple[str, str]]:
    leased: set[str] = set()
    for project in fleet.projects:
        leases = get(endpoint, f"networks/{NETWORK}/leases", {"project": project})
        leased |= {lease.get("address") for lease in leases or []}
    out = set()
    for raw in get(endpoint, "instances", LISTING):
        if raw.get("project") not in fleet.projects or raw.get("status") != "Running":
            continue
        ipv4 = model.pick_address(naive_instance(raw))
        if ipv4 is not None and ipv4 in leased:
            out.add((raw["project"], raw["name"]))
    return out


# ---------------------------------------------------------------- the two measured paths


@dataclass(frozen=True)
class Render:
    seconds: float
    text: str
    built: model.Model


def run_tool(settings: Settings) -> Render:
    """(a) The whole tool path, as the CLI runs it."""
    started = time.perf_counter()
    report = pipeline.run(settings)
    seconds = time.perf_counter() - started
    if report.error is not None or report.text is None or report.model is None:
        raise BenchError(f"the tool failed: {report.message}")
    return Render(seconds, report.text, report.model)


def naive_instance(raw: dict[str, Any]) -> model.Instance:
    """A recursion=2 listing entry to model data: addresses from the live state."""
    network = (raw.get("state") or {}).get("network") or {}
    nics = tuple(
        model.Nic(ifname, tuple(a["address"] for a in iface.get("addresses") or []
                                if a.get("address")))
        for ifname, iface in sorted(network.items())
        if ifname != "lo"
    )
    config = raw.get("expanded_config") or {}
    return model.Instance(
        project=raw.get("project") or "default",
        name=raw["name"],
        status=raw.get("status", ""),
        type=raw.get("type", ""),
        created_at=raw.get("created_at", ""),
        location=raw.get("location", ""),
        config={k: v for k, v in config.items() if k.startswith(model.PREFIX)},
        nics=nics,
    )


def run_baseline(settings: Settings, endpoint: str) -> Render:
    """(b) One recursion=2 listing, then the same model and template as the tool."""
    started = time.perf_counter()
    client = pylxd.Client(endpoint=endpoint)
    raws = client.api.instances.get(params=LISTING).json()["metadata"]
    instances = [naive_instance(raw) for raw in raws]
    fleet_model = model.build(instances, settings.wildcards)
    text = render.render(fleet_model, settings)
    return Render(time.perf_counter() - started, text, fleet_model)


def run_cli(cli: str) -> tuple[float, str]:
    """(c) The CLI as a process. Exit 3 (someone else's instance has rejected labels) is fine."""
    started = time.perf_counter()
    done = subprocess.run([cli, "render", "--scheme", "http"], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, check=False)
    seconds = time.perf_counter() - started
    if done.returncode not in (pipeline.Status.OK, pipeline.Status.REJECTED):
        raise BenchError(f"the CLI exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return seconds, done.stdout


# ---------------------------------------------------------------- checking the work is the same


def bench_sites(fleet_model: model.Model, fleet: Fleet) -> list[model.Site]:
    return [s for s in fleet_model.all_sites if s.host.endswith(f"-{fleet.suffix}.{DOMAIN}")]


def check_bench_sites(fleet_model: model.Model, fleet: Fleet, what: str) -> None:
    """All bench hosts routed, each to its own instance, and nothing about them rejected."""
    expected = fleet.hosts()
    got = {s.host: s for s in bench_sites(fleet_model, fleet)}
    if set(got) != set(expected):
        missing = sorted(set(expected) - set(got))
        raise BenchError(f"{what}: {len(got)} of {len(expected)} bench sites rendered; "
                         f"missing e.g. {missing[:3]}")
    for host, (project, name) in expected.items():
        upstreams = got[host].upstreams
        if [(u.project, u.instance) for u in upstreams] != [(project, name)]:
            raise BenchError(f"{what}: {host} routed to {got[host].instances}")
    ours = [str(r) for r in fleet_model.rejections if r.project in fleet.projects]
    ours += [str(s) for s in fleet_model.skipped if s.project in fleet.projects]
    if ours:
        raise BenchError(f"{what}: bench instances rejected or skipped, e.g. {ours[0]}")


def check_texts(text: str, fleet: Fleet, what: str) -> None:
    missing = [h for h in fleet.hosts() if f"\nhttp://{h} {{\n" not in text]
    if missing:
        raise BenchError(f"{what}: {len(missing)} bench sites missing from the text, "
                         f"e.g. {missing[0]}")


def same_work(a: Render, b: Render, fleet: Fleet) -> bool:
    """True when (a) and (b) rendered the same bytes. False when only sites outside the bench
    differ (the rest of this Incus changed between the two listings). Raises otherwise."""
    check_bench_sites(a.built, fleet, "tool")
    check_bench_sites(b.built, fleet, "baseline")
    check_texts(a.text, fleet, "tool")
    if a.text == b.text:
        return True
    if bench_sites(a.built, fleet) != bench_sites(b.built, fleet):
        raise BenchError("tool and baseline rendered different bench sites:\n"
                         + first_difference(a.text, b.text))
    return False


def first_difference(a: str, b: str) -> str:
    for i, (la, lb) in enumerate(zip(a.splitlines(), b.splitlines(), strict=False)):
        if la != lb:
            return f"  line {i + 1}:\n    tool:     {la!r}\n    baseline: {lb!r}"
    longer, name = (a, "tool") if len(a) > len(b) else (b, "baseline")
    extra = longer.splitlines()[min(len(a.splitlines()), len(b.splitlines())):]
    return f"  only {name} has more lines, from: {extra[:4]!r}"


# ---------------------------------------------------------------- measuring


@dataclass
class Samples:
    tool: list[float]
    baseline: list[float]
    cli: list[float]
    discarded: int = 0


def measure(settings: Settings, endpoint: str, fleet: Fleet, rounds: int) -> Samples:
    """Interleaved rounds of (a) and (b), alternating which goes first, after a warm-up."""
    same_work(run_tool(settings), run_baseline(settings, endpoint), fleet)  # warm-up, checked
    samples = Samples([], [], [])
    for attempt in range(rounds + max(MAX_DISCARDED_ROUNDS, rounds)):
        if len(samples.tool) == rounds:
            break
        if attempt % 2 == 0:
            a, b = run_tool(settings), run_baseline(settings, endpoint)
        else:
            b, a = run_baseline(settings, endpoint), run_tool(settings)
        if not same_work(a, b, fleet):
            samples.discarded += 1
            print(f"  round {attempt + 1} discarded: texts differ outside the bench sites "
                  f"(a concurrent change elsewhere in Incus?):\n{first_difference(a.text, b.text)}")
            time.sleep(DISCARD_PAUSE_S)
            continue
        samples.tool.append(a.seconds)
        samples.baseline.append(b.seconds)
    if len(samples.tool) < rounds:
        raise BenchError(f"{samples.discarded} rounds discarded: the rest of this Incus keeps "
                         "changing; the benchmark cannot compare like with like")
    return samples


def measure_cli(fleet: Fleet, rounds: int) -> list[float]:
    cli = shutil.which("incus-caddyfile", path=str(Path(sys.executable).parent)) or shutil.which(
        "incus-caddyfile")
    if cli is None:
        raise BenchError("incus-caddyfile is not installed next to this Python or on PATH")
    out = []
    for _ in range(rounds):
        seconds, text = run_cli(cli)
        check_texts(text, fleet, "CLI")
        out.append(seconds)
    return out


def tool_requests(settings: Settings) -> int:
    """Incus API requests one tool listing makes (besides the client's own GET /1.0)."""
    client = IncusClient(settings.incus or default_incus_socket())
    pipeline.collect(settings, client)
    return client.requests


def p95(values: Sequence[float]) -> float:
    """Nearest-rank 95th percentile (with 15 samples: the largest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def summary(values: Sequence[float]) -> dict[str, Any]:
    return {
        "median_ms": round(statistics.median(values) * 1000, 2),
        "p95_ms": round(p95(values) * 1000, 2),
        "samples_ms": [round(v * 1000, 2) for v in values],
    }


# ---------------------------------------------------------------- report


def report(figures: dict[str, Any]) -> None:
    rows = [("(a) tool, in-process", "tool"), ("(b) naive recursion=2", "baseline"),
            ("(c) CLI process", "cli")]
    print()
    print(f"fleet: {figures['instances']} instances in {figures['projects']} projects, "
          f"created in {figures['fleet_create_s']:.1f} s, all addressed after "
          f"{figures['dhcp_wait_s']:.1f} s more; {figures['other_instances']} other instances "
          "in this Incus")
    print(f"rounds: {figures['rounds']} interleaved (a)/(b), {figures['discarded_rounds']} "
          f"discarded; {figures['cli_rounds']} CLI; tool listing = "
          f"{figures['tool_requests']} API requests")
    print(f"{'':26}{'median':>10}{'p95':>10}")
    for label, key in rows:
        if figures[key]["samples_ms"]:
            s = figures[key]
            print(f"{label:26}{s['median_ms']:>8.1f}ms{s['p95_ms']:>8.1f}ms")
    verdict = "met" if figures["target_met"] else "MISSED"
    print(f"ratio median(a)/median(b) = {figures['ratio']:.3f}  "
          f"(target <= {TARGET_RATIO}): {verdict}")


def write_json(path: Path, figures: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"figures written to {path}")


# ---------------------------------------------------------------- signals


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise Terminated(f"signal {signum}")


@contextmanager
def signals_ignored() -> Iterator[None]:
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds of (a) and (b)")
    parser.add_argument("--cli-rounds", type=int, default=3, help="timed CLI runs (c)")
    parser.add_argument("--instances", type=int, default=150, help="fleet size")
    parser.add_argument("--projects", type=int, default=3, help="projects to spread it over")
    parser.add_argument("--jobs", type=int, default=4, help="parallel incus launch/delete")
    parser.add_argument("--keep", action="store_true", help="keep the fleet for another run")
    parser.add_argument("--reuse", action="store_true",
                        help="run on a fleet kept by --keep (same size) if there is one")
    parser.add_argument("--json", type=Path, default=RESULTS, help="where to write the figures")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.cli_rounds < 0 or not 1 <= args.projects <= 9:
        parser.error("need --rounds >= 1, --cli-rounds >= 0, 1 <= --projects <= 9")
    if not args.projects <= args.instances <= 999 or args.jobs < 1:
        parser.error("need --projects <= --instances <= 999 and --jobs >= 1")
    return args


def prepare(args: argparse.Namespace, endpoint: str, ours: list[str]) -> tuple[Fleet, float]:
    """Create (or reuse and top up) the fleet. Appends each project to `ours` once it exists."""
    started = time.perf_counter()
    fleet = find_kept(endpoint, args.projects, args.instances) if args.reuse else None
    if fleet is not None:
        print(f"reusing kept fleet {fleet.suffix}: {', '.join(fleet.projects)}")
        ours.extend(fleet.projects)
        claim(fleet)
        top_up(endpoint, fleet, args.jobs)
    else:
        fleet = Fleet.new(args.projects, args.instances)
        print(f"creating {fleet.size} instances in {', '.join(fleet.projects)} "
              f"({args.jobs} in parallel) ...", flush=True)
        for project in fleet.projects:
            create_project(project, fleet.size, ours)
        launch_all(fleet.members(), args.jobs)
    return fleet, time.perf_counter() - started


def bench(args: argparse.Namespace, endpoint: str, ours: list[str]) -> bool:
    """Everything between creating and removing the fleet. Returns whether the target was met."""
    fleet, create_s = prepare(args, endpoint, ours)
    print(f"fleet ready in {create_s:.1f} s; waiting for DHCP addresses ...", flush=True)
    dhcp_s = wait_for_addresses(endpoint, fleet, DHCP_TIMEOUT_S)
    settings = Settings(scheme="http")
    print(f"measuring {args.rounds} rounds ...", flush=True)
    samples = measure(settings, endpoint, fleet, args.rounds)
    samples.cli = measure_cli(fleet, args.cli_rounds)
    ratio = statistics.median(samples.tool) / statistics.median(samples.baseline)
    figures = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "instances": fleet.size,
        "projects": len(fleet.projects),
        "other_instances": len(get(endpoint, "instances", {"all-projects": "true"})) - fleet.size,
        "fleet_create_s": round(create_s, 2),
        "dhcp_wait_s": round(dhcp_s, 2),
        "rounds": args.rounds,
        "discarded_rounds": samples.discarded,
        "cli_rounds": args.cli_rounds,
        "tool_requests": tool_requests(settings),
        "tool": summary(samples.tool),
        "baseline": summary(samples.baseline),
        "cli": summary(samples.cli) if samples.cli else {"samples_ms": []},
        "ratio": round(ratio, 4),
        "target": f"<= {TARGET_RATIO}",
        "target_met": ratio <= TARGET_RATIO,
    }
    report(figures)
    write_json(args.json, figures)
    return bool(figures["target_met"])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    endpoint = default_incus_socket()
    signal.signal(signal.SIGTERM, _terminate)
    ours: list[str] = []
    ok = False
    try:
        bench(args, endpoint, ours)
        ok = True
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
    except (KeyboardInterrupt, Terminated):
        print("bench: interrupted", file=sys.stderr)
    finally:
        if args.keep and len(ours) == args.projects and keep(ours):
            pass
        else:
            ok = cleanup(endpoint, ours, args.jobs) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
