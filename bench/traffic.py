"""Benchmark: client traffic through a real Caddy while routes change, each figure next to a
baseline measured in the same run.

Setup: a throwaway fleet of labelled busybox containers (default 150, hosts
`<name>.bench.localhost`, port 80) in 3 Incus projects named `icfx-<random>-p<n>`, and in
the first project: a pool of 3 instances (host `pool-<random>.traffic.localhost`) and a
websocket instance, both running scripts/icf_server.c on port 8081 (HTTP/1.1 keep-alive with
a graceful stop, websocket echo; pushed into the image and respawned by its init), and a
stopped instance with `upstream.require_ready=true` (its lease known). One Caddy on loopback
ports. Every `watch` run here renders only the fleet's projects (a settings file with a
`[projects]` policy), so other users of this Incus do not change the files.

Clients (tests/harness.Load): GET traffic with keep-alive over 8 connections. The
browser-like client sends a GET that failed on a reused keep-alive connection before any
byte of the answer once more on a new connection, as browsers do; anything else that is not
a 200 with the expected body counts as failed. `raw_errors` counts every socket error of a
first attempt: what a client that never retries would have seen.

What is measured:

1. Websocket survival: a websocket through Caddy to the websocket instance; 20 reloads
   (POST /load of two configs the tool rendered for the fleet, one without one instance,
   alternately: reloads caused by another instance), a message echoed after each.
   Goal 20/20. Baseline: the same Caddyfiles rendered with `--stream-close-delay 0`.
2. Rolling restart: `incus restart` of each pool member in turn (busybox's init stops
   icf_server gracefully: SIGTERM, 1 s, SIGKILL; ~2.5 s), waiting until the member serves
   again, under 200 requests/s to the pool. Failed requests, goal 0. Baseline: `watch
   --no-drain --lb-retries 0 --stream-close-delay 0` (draining, retries and the stream delay
   off by their settings).
3. Kill: `incus stop --force` of a pool member under the same load (then started again).
   Failed requests, goal 0. Baseline as in 2.
4. Reloads: 100 reloads (as in 1, every 100 ms) under 200 requests/s to an unrelated fleet
   host. Failed requests with the browser-like client, goal 0; raw socket errors reported.
   Baseline: the configs rendered with the traffic settings off.
5. Readiness: start the require_ready instance and, in turn, the same image without
   require_ready (the baseline), 20 rounds each. Each notes inside the instance, from its
   init, the wall-clock time its port 80 first accepts (icf_server --port-open, dialling
   127.0.0.1 every 0.5 ms: no packet from the host, so the host's ARP entry is not touched
   by the measurement); the benchmark GETs through Caddy every 10 ms.
   Start-to-first-200 = first 200 through Caddy - the port's first accept. Goal p50 <= 40
   ms, p95 <= 80 ms; reported with the baseline's figures and the ratio, and a median
   timeline from watch's cycle records (steps_ms, waited) and Caddy's log. `--only
   readiness` runs this alone; `--compare-ref REF` adds the same rounds with the watch of
   an older commit, in blocks of 5 in turn.
6. Back-to-back changes: two `incus config set` of the upstream port on two instances, one
   right after the other (10 pairs, 4.5 s apart): seconds from each command's return until
   Caddy serves the change. Goal p95 <= 300 ms. Reloads of a burst (30 fleet instances
   started at once) goal <= 3, and of 50 noise events goal 0 (bench/watch.py's
   measurements). Baseline: the code before these changes (a fixed 2 s hold).
7. Caddy work per change: the admin requests of one change as watch makes them (from
   Caddy's log: one POST /load per change; POST /adapt only for watch's periodic check
   whether Caddy runs the file) and the time of POST /load alone against POST /adapt + POST
   /load (the previous order) for the fleet's Caddyfile.

Everything is removed in a `finally` (projects, instances, processes, temp files), also on
Ctrl-C or SIGTERM. Only the local Incus unix socket, loopback and the lab's instances are
used. Figures go to stdout and to bench/results/traffic.json; a missed goal still exits 0.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import repo_root  # noqa: F401  (sys.path: the repository root, for tests.harness)
from fleet import (
    DHCP_TIMEOUT_S,
    BenchError,
    Fleet,
    cleanup,
    common_parser,
    create_project,
    host,
    incus,
    launch_all,
    run_and_clean_up,
    wait_for_addresses,
    write_json,
)
from watch import (
    Events,
    Prober,
    Target,
    Watch,
    global_ipv4,
    mark,
    measure_burst,
    measure_noise,
    project_client,
    set_state,
    start_caddy,
    stats_ms,
)

from incus_caddyfile import pipeline
from incus_caddyfile.caddy import AdminAPI
from incus_caddyfile.incus import PylxdApi
from incus_caddyfile.labels import KEY_PORT, KEY_REQUIRE_READY
from incus_caddyfile.policy import Policy
from incus_caddyfile.render import render
from incus_caddyfile.settings import Settings, default_incus_socket
from tests.harness import (
    ICF_SERVER_PORT,
    ROOT,
    Caddy,
    HarnessError,
    Load,
    WebSocket,
    build_icf_server,
    install_icf_server,
    labels,
    launch,
    proxied_routes,
    routed,
    wait_for,
)

RESULTS = ROOT / "bench" / "results" / "traffic.json"
PROJECT_PREFIX = "icfx-"
# The last commit before the traffic changes (issue 11): the baseline's code.
BASELINE_REF = "3f60ca0"
RATE = 200.0
WORKERS = 8
OFF = ["--no-drain", "--lb-retries", "0", "--stream-close-delay", "0"]
SETTINGS_OFF = {"stream_close_delay": "0", "lb_try_duration": "0", "lb_retries": 0,
                "dial_timeout": "0", "fail_duration": "0"}  # fmt: skip
READY_BLOCK = 5  # readiness rounds per watch when codes are compared in turn
READY_P50_MS, READY_P95_MS, BACK_TO_BACK_P95_MS = 40.0, 80.0, 300.0
ROUND_TIMEOUT_S = 15.0


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


# ---------------------------------------------------------------- the special instances


@dataclass
class Cast:
    """The instances this benchmark drives, besides the fleet."""

    project: str
    suffix: str
    pool: list[str] = field(default_factory=list)
    ws: str = ""
    ready: str = ""  # upstream.require_ready=true
    plain: str = ""  # the same without require_ready: the readiness baseline

    @property
    def pool_host(self) -> str:
        return f"pool-{self.suffix}.traffic.localhost"

    @property
    def ws_host(self) -> str:
        return f"ws-{self.suffix}.traffic.localhost"


def cast_instances(fleet: Fleet, exe: Path, endpoint: str) -> Cast:
    cast = Cast(fleet.projects[0], fleet.suffix)
    cast.pool = [f"tp{i}-{fleet.suffix}" for i in (1, 2, 3)]
    cast.ws, cast.ready = f"tws-{fleet.suffix}", f"trdy-{fleet.suffix}"
    cast.plain = f"tpln-{fleet.suffix}"
    for name in cast.pool:
        launch(cast.project, name, labels(cast.pool_host, ICF_SERVER_PORT), run=incus)
    launch(cast.project, cast.ws, labels(cast.ws_host, ICF_SERVER_PORT), run=incus)
    ready = {**labels(host(cast.ready)), KEY_REQUIRE_READY: "true"}
    launch(cast.project, cast.ready, ready, run=incus)
    launch(cast.project, cast.plain, labels(host(cast.plain)), run=incus)
    client = project_client(endpoint, cast.project)
    for name in [*cast.pool, cast.ws, cast.ready, cast.plain]:
        api = client.api.instances[name]
        if not wait_for(lambda api=api: global_ipv4(api.state.get().json()["metadata"]), 60, 0.2):
            raise BenchError(f"{name} got no IPv4 address within 60 s")
    for name in [*cast.pool, cast.ws]:
        install_icf_server(cast.project, name, exe, run=incus)
    for name in (cast.ready, cast.plain):
        watch_port_at_boot(cast.project, name, exe)
        set_state(client, name, "stop")  # started once: its lease is known
    return cast


def member_address(endpoint: str, project: str, name: str) -> str | None:
    state = project_client(endpoint, project).api.instances[name].state.get().json()
    return global_ipv4(state["metadata"])


def port_open(address: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------- configs rendered by the tool


def fleet_settings(caddy: Caddy, fleet: Fleet, **extra: Any) -> Settings:
    return Settings(
        scheme="http",
        caddy_admin=caddy.admin,
        global_options=(f"http_port {caddy.http_port}",),
        policy=Policy(include=tuple(f"{p}" for p in fleet.projects)),
        **extra,
    )


def two_configs(endpoint: str, settings: Settings, leave_out: str) -> tuple[str, str]:
    """The fleet's Caddyfile, and the same without one instance (as if it had stopped)."""
    instances = pipeline.collect(PylxdApi(endpoint))
    full = render(pipeline.model_for(settings, instances), settings)
    fewer = [i for i in instances if i.name != leave_out]
    return full, render(pipeline.model_for(settings, fewer), settings)


# ---------------------------------------------------------------- 1. websocket, 4. reloads


def websocket_survival(caddy: Caddy, cast: Cast, texts: tuple[str, str], reloads: int) -> int:
    """Reloads the websocket survived (counted until the first it did not)."""
    admin = AdminAPI(caddy.admin)
    admin.load(texts[0])
    if not wait_for(lambda: "icf_server" in caddy.get(cast.ws_host)[1], 30, 0.1):
        raise BenchError(f"{cast.ws_host} is not served through Caddy")
    ws = WebSocket(caddy.http_port, cast.ws_host)
    try:
        if not ws.echo("before"):
            raise BenchError("the websocket does not echo before any reload")
        for i in range(reloads):
            admin.load(texts[(i + 1) % 2])
            if not ws.echo(f"after reload {i + 1}"):
                return i
        return reloads
    finally:
        ws.close()


def reloads_under_load(
    caddy: Caddy, stable: str, texts: tuple[str, str], reloads: int
) -> dict[str, Any]:
    admin = AdminAPI(caddy.admin)
    admin.load(texts[0])
    if not wait_for(lambda: caddy.serves(stable, "hello from"), 30, 0.1):
        raise BenchError(f"{stable} is not served through Caddy")
    with Load(caddy.http_port, stable, RATE, WORKERS) as load:
        time.sleep(1.0)
        for i in range(reloads):
            admin.load(texts[(i + 1) % 2])
            time.sleep(0.1)
        time.sleep(1.0)
    return load.result.summary()


# ---------------------------------------------------------------- 2, 3. pool under changes


def wait_back(endpoint: str, watch: Watch, cast: Cast, name: str) -> None:
    """The member serves again (its port, then its place in the file, then 1 s)."""
    address = wait_for(lambda: member_address(endpoint, cast.project, name), 60, 0.1)
    if not address or not wait_for(lambda: port_open(address, ICF_SERVER_PORT), 60, 0.05):
        raise BenchError(f"{name} did not serve again within 60 s")
    if not wait_for(lambda: f"{address}:{ICF_SERVER_PORT}" in watch.routes(), 60, 0.05):
        raise BenchError(f"{name} did not get back into the pool:\n{watch.tail()}")
    time.sleep(1.0)


def rolling_restart(endpoint: str, caddy: Caddy, watch: Watch, cast: Cast) -> dict[str, Any]:
    began = time.monotonic()
    with Load(caddy.http_port, cast.pool_host, RATE, WORKERS, needle="icf_server") as load:
        time.sleep(1.0)
        for name in cast.pool:
            incus("restart", name, "--project", cast.project)
            wait_back(endpoint, watch, cast, name)
    return {**load.result.summary(), "took_s": round(time.monotonic() - began, 1)}


def kill_member(endpoint: str, caddy: Caddy, watch: Watch, cast: Cast) -> dict[str, Any]:
    victim = cast.pool[0]
    with Load(caddy.http_port, cast.pool_host, RATE, WORKERS, needle="icf_server") as load:
        time.sleep(1.0)
        incus("stop", "--force", victim, "--project", cast.project)
        time.sleep(3.0)
    incus("start", victim, "--project", cast.project)
    wait_back(endpoint, watch, cast, victim)
    return load.result.summary()


def pool_phase(
    endpoint: str, caddy: Caddy, workdir: Path, fleet: Fleet, cast: Cast, extra: list[str]
) -> dict[str, Any]:
    watch = fleet_watch(workdir, caddy, fleet, *extra)
    try:
        wait_pool(caddy, watch, cast)
        restart = rolling_restart(endpoint, caddy, watch, cast)
        kill = kill_member(endpoint, caddy, watch, cast)
        watch.alive()
    finally:
        watch.stop()
    return {"watch_args": extra, "rolling_restart": restart, "kill": kill}


def wait_pool(caddy: Caddy, watch: Watch, cast: Cast) -> None:
    def all_three() -> bool:
        bodies = {caddy.get(cast.pool_host)[1] for _ in range(30)}
        return sum("icf_server" in b for b in bodies) == 3

    if not wait_for(all_three, 60, 0.2):
        raise BenchError(f"the pool is not served by its 3 members:\n{watch.tail()}")


# ---------------------------------------------------------------- watch


def fleet_watch(workdir: Path, caddy: Caddy, fleet: Fleet, *extra: str, code: Path = ROOT) -> Watch:
    """watch for this fleet only (a [projects] policy), started and settled."""
    config = workdir / "fleet.toml"
    config.write_text(
        "[projects]\ninclude = [" + ", ".join(f'"{p}"' for p in fleet.projects) + "]\n"
    )
    output = workdir / "Caddyfile"
    watch = Watch(output, caddy, mark(fleet), "--config", config, *extra, code=code)
    try:
        first = watch.wait_cycle(lambda _c: True, 0, 120)
        if first.get("error"):
            raise BenchError(f"watch's first cycle failed: {first.get('message')}")
        if not wait_for(lambda: all(routed(watch.routes(), h) for h in fleet.hosts()), 60, 0.2):
            raise BenchError(f"watch did not route the whole fleet:\n{watch.tail()}")
        watch.settle()
    except BaseException:
        watch.stop()
        raise
    return watch


# ---------------------------------------------------------------- 5. readiness


PORT_OPEN_FILE = "/icf-port-open"


def watch_port_at_boot(project: str, name: str, exe: Path) -> None:
    """Have the instance's init note, at every boot, when its port 80 first accepts a
    connection (icf_server --port-open, from inside: no packet from the host, so the host's
    ARP entry is not touched by the measurement)."""
    incus("file", "push", str(exe), f"{name}/icf_server", "--mode", "0755", "--project", project)
    line = f"::once:/icf_server --port-open 80 {PORT_OPEN_FILE}"
    script = f"grep -qxF '{line}' /etc/inittab || echo '{line}' >> /etc/inittab"
    incus("exec", name, "--project", project, "--", "sh", "-c", script)


def port_opened(project: str, name: str, since: float) -> float | None:
    """Wall-clock time the port first accepted in this boot (None: not yet)."""
    try:
        text = incus("file", "pull", f"{name}{PORT_OPEN_FILE}", "-", "--project", project)
        value = float(text.strip())
    except (BenchError, HarnessError, ValueError):
        return None
    return value if value >= since else None


def readiness_round(endpoint: str, caddy: Caddy, watch: Watch, project: str, name: str
                    ) -> dict[str, Any]:  # fmt: skip
    """One start; times in ms after the port's first accept (the figure: first_200)."""
    client = project_client(endpoint, project)
    target = Target(project, name)
    after = len(watch.cycles())
    wall_start = time.time()
    set_state(client, name, "start")
    t0, wall0 = time.monotonic(), time.time()
    prober = Prober(caddy, target, t0)
    prober.run()
    opened = wait_for(lambda: port_opened(project, name, wall_start), 10, 0.1)
    cycles = [c for c in watch.cycles()[after:] if any(name in t for t in c["triggers"])]
    loads = [at for at, uri in caddy.admin_requests(wall0) if uri == "/load"]
    set_state(client, name, "stop")
    if not wait_for(lambda: not routed(watch.routes(), target.hostname), 15, 0.05):
        raise BenchError(f"{target.hostname} still routed 15 s after it stopped")
    time.sleep(2.5)  # the reload bucket refills
    if prober.first is None or not opened:
        return {"first_200": None, "port_opened": bool(opened), "served": prober.first}

    def rel(wall: float) -> float:
        return ms(wall - opened)

    return {
        "first_200": rel(wall0 + prober.first),
        "cycles": [cycle_span(c, rel) for c in cycles],
        "loads": [rel(at) for at in loads][:4],
        "port_after_start_ms": ms(opened - wall0),
    }


def cycle_span(cycle: dict[str, Any], rel: Callable[[float], float]) -> dict[str, Any]:
    """A watch cycle in ms after the port opened: when it began and was logged, its triggers,
    its steps (incus, model, render, caddy: load and write) and the polls that ended as it began."""
    end = float(cycle["ts"])
    return {
        "began": rel(end - float(cycle["duration_ms"]) / 1000),
        "logged": rel(end),
        "triggers": cycle["triggers"],
        "steps_ms": cycle.get("steps_ms") or {},
        "waited": cycle.get("waited") or {},
    }


def where_time_goes(sample: dict[str, Any]) -> dict[str, float | None]:
    """One round's steps in ms after the port's first accept: the start event's cycle, the
    address seen in the instance's state, the routing cycle begun (after a poll: as the poll
    saw the port accept), the render done, Caddy's /load received, the cycle logged (after /load
    returned and the file was written), the first 200 through Caddy."""
    cycles = sample.get("cycles") or []
    started = next((c for c in cycles if any(t.startswith("instance-started") for t in
                                              c["triggers"])), None)  # fmt: skip
    routing = next((c for c in cycles if c["waited"] or any(
        t.startswith(("address", "warm")) for t in c["triggers"])), started)  # fmt: skip
    out: dict[str, float | None] = {
        "start_cycle_began": started["began"] if started else None,
        "address_seen": None, "routing_cycle_began": None, "rendered": None, "load_received": None,
        "routing_cycle_logged": None, "first_200": sample.get("first_200"),
    }  # fmt: skip
    if routing is None:
        return out
    waited = next(iter(routing["waited"].values()), None)
    began = routing["began"]
    if waited and waited.get("address_ms") is not None:
        out["address_seen"] = round(began - (waited["total_ms"] - waited["address_ms"]), 1)
    out["routing_cycle_began"] = began
    steps = routing["steps_ms"]
    work = steps.get("incus", 0) + steps.get("model", 0) + steps.get("render", 0)
    out["rendered"] = round(began + work, 1)
    out["load_received"] = next((at for at in sample.get("loads") or [] if at >= began), None)
    out["routing_cycle_logged"] = routing["logged"]
    return out


def median_steps(rounds: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    steps = [where_time_goes(r) for r in rounds if r.get("first_200") is not None]
    keys = steps[0].keys() if steps else []
    out: dict[str, float | None] = {}
    for key in keys:
        values = [v for s in steps if (v := s[key]) is not None]
        out[key] = round(statistics.median(values), 1) if values else None
    return out


def measure_readiness(
    endpoint: str, caddy: Caddy, watch: Watch, cast: Cast, rounds: int
) -> dict[str, Any]:
    """Rounds of the require_ready instance and of the plain one (the baseline), in turn, so
    that both see the same machine."""
    return readiness_figures(readiness_samples(endpoint, caddy, watch, cast, rounds), cast)


def readiness_samples(
    endpoint: str, caddy: Caddy, watch: Watch, cast: Cast, rounds: int
) -> dict[str, list[dict[str, Any]]]:
    samples: dict[str, list[dict[str, Any]]] = {cast.ready: [], cast.plain: []}
    for i in range(rounds):
        for name, taken in samples.items():
            sample = readiness_round(endpoint, caddy, watch, cast.project, name)
            taken.append(sample)
            print(f"  readiness round {i + 1} {name}: {sample}", flush=True)
    return samples


def readiness_figures(samples: dict[str, list[dict[str, Any]]], cast: Cast) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, name in (("require_ready", cast.ready), ("plain", cast.plain)):
        values = [None if s["first_200"] is None else s["first_200"] / 1000 for s in samples[name]]
        out[key] = {**stats_ms(values), "steps_p50_ms": median_steps(samples[name]),
                    "rounds": samples[name]}  # fmt: skip
    ready, plain = out["require_ready"], out["plain"]
    out["ratio_p50"] = _ratio(ready["p50_ms"], plain["p50_ms"])
    out["ratio_p95"] = _ratio(ready["p95_ms"], plain["p95_ms"])
    return out


def compare_readiness(
    endpoint: str, caddy: Caddy, workdir: Path, fleet: Fleet, cast: Cast, rounds: int,
    codes: dict[str, Path], run: Run,
) -> dict[str, Any]:  # fmt: skip
    """measure_readiness with each code (e.g. this tree and a commit before a change), in
    blocks of READY_BLOCK rounds in turn, a watch of that code for each block."""
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {
        label: {cast.ready: [], cast.plain: []} for label in codes
    }
    done = 0
    while done < rounds:
        block = min(READY_BLOCK, rounds - done)
        for label, code in codes.items():
            print(f"  {block} rounds with the code of {label} ...", flush=True)
            watch = fleet_watch(workdir, caddy, fleet, "--resync-interval", "3600", code=code)
            run.watches.append(watch)
            try:
                for name, taken in readiness_samples(endpoint, caddy, watch, cast, block).items():
                    samples[label][name].extend(taken)
            finally:
                watch.stop()
                run.watches.remove(watch)
        done += block
    return {label: readiness_figures(s, cast) for label, s in samples.items()}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 2)


# ---------------------------------------------------------------- 6. back to back


def served_after(caddy: Caddy, hostname: str, needle: str, timeout: float = 10.0) -> float | None:
    started = time.monotonic()
    found = wait_for(lambda: needle in caddy.get(hostname)[1], timeout, 0.005)
    return time.monotonic() - started if found else None


def back_to_back(caddy: Caddy, watch: Watch, fleet: Fleet, pairs: int) -> dict[str, Any]:
    (pa, a), (pb, b) = fleet.members()[:2]
    values: list[float | None] = []
    for i in range(pairs):
        port = "8080" if i % 2 == 0 else "80"
        time.sleep(4.5)  # a quiet spell, as between deploys
        for project, name in ((pa, a), (pb, b)):
            incus("config", "set", name, f"{KEY_PORT}={port}", "--project", project)
            values.append(served_after(caddy, host(name), f"port {port}"))
    watch.alive()
    figures = stats_ms(values)
    figures["second_of_pair"] = stats_ms(values[1::2])
    return figures


# ---------------------------------------------------------------- 7. Caddy work per change


def caddy_work(caddy: Caddy, texts: tuple[str, str], watch_log: list[dict[str, Any]],
               since: float, rounds: int = 20) -> dict[str, Any]:  # fmt: skip
    posts = [uri for _, uri in caddy.admin_requests(since)]
    admin = AdminAPI(caddy.admin)
    one, two = [], []
    for i in range(rounds):
        started = time.perf_counter()
        admin.load(texts[i % 2])
        one.append(time.perf_counter() - started)
        started = time.perf_counter()
        admin.adapt(texts[(i + 1) % 2])
        admin.load(texts[(i + 1) % 2])
        two.append(time.perf_counter() - started)
    changes = sum(1 for c in watch_log if c.get("reloaded"))
    return {
        "load_ms": round(statistics.median(one) * 1000, 1),
        "adapt_then_load_ms": round(statistics.median(two) * 1000, 1),
        "watch_changes": changes,
        "watch_posts": {"/load": posts.count("/load"), "/adapt": posts.count("/adapt")},
        "sites": proxied_routes(texts[0]),
    }


# ---------------------------------------------------------------- the run


def baseline_code(workdir: Path, ref: str) -> Path | None:
    """The repository at `ref` (git archive), to run the previous code as a baseline."""
    target = workdir / f"code-{ref}"
    if target.exists():
        return target
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], capture_output=True,
                             check=False, timeout=60)  # fmt: skip
    if archive.returncode != 0:
        print(f"no baseline code: git archive {ref} failed", file=sys.stderr)
        return None
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True, timeout=60)
    return target


@dataclass
class Run:
    endpoint: str
    jobs: int
    projects: list[str] = field(default_factory=list)
    caddy: Caddy | None = None
    workdir: Path | None = None
    watches: list[Watch] = field(default_factory=list)

    def close(self) -> bool:
        for watch in self.watches:
            watch.stop()
        if self.caddy is not None:
            self.caddy.stop()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return cleanup(self.endpoint, self.projects, self.jobs)


def bench(args: argparse.Namespace, run: Run) -> dict[str, Any]:
    began = time.monotonic()
    run.workdir = Path(tempfile.mkdtemp(prefix="icfx-bench-"))
    exe = build_icf_server(run.workdir)
    base = baseline_code(run.workdir, args.baseline_ref)
    fleet = Fleet.new(PROJECT_PREFIX, args.projects, args.instances)
    print(f"creating {fleet.size} instances in {', '.join(fleet.projects)} ...", flush=True)
    for project in fleet.projects:
        create_project(project, args.instances, run.projects)
    launch_all(fleet.members(), args.jobs)
    wait_for_addresses(run.endpoint, fleet, DHCP_TIMEOUT_S)
    cast = cast_instances(fleet, exe, run.endpoint)
    run.caddy = caddy = start_caddy(run.workdir)
    out: dict[str, Any] = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
                           "instances": fleet.size, "baseline_ref": args.baseline_ref}  # fmt: skip
    if args.only == "readiness":
        print("5. readiness (require_ready and plain, in turn) ...", flush=True)
        codes = {"this tree": ROOT}
        before = baseline_code(run.workdir, args.compare_ref) if args.compare_ref else None
        if before is not None:
            codes[args.compare_ref] = before
        arms = compare_readiness(run.endpoint, caddy, run.workdir, fleet, cast, args.rounds,
                                 codes, run)  # fmt: skip
        out["readiness"] = arms.pop("this tree")
        out["readiness_code_before"] = arms
        out["goals"] = goals(out)
        out["total_s"] = round(time.monotonic() - began, 1)
        return out
    stable = host(fleet.members()[-1][1])
    leave_out = fleet.members()[1][1]
    on = two_configs(run.endpoint, fleet_settings(caddy, fleet), leave_out)
    off = two_configs(run.endpoint, fleet_settings(caddy, fleet, **SETTINGS_OFF), leave_out)

    print("1. websocket across reloads ...", flush=True)
    out["websocket"] = {
        "reloads": args.reloads_ws,
        "survived": websocket_survival(caddy, cast, on, args.reloads_ws),
        "baseline_survived": websocket_survival(caddy, cast, off, args.reloads_ws),
    }
    print("4. an unrelated host during reloads ...", flush=True)
    out["reloads"] = {
        "reloads": args.reloads,
        "result": reloads_under_load(caddy, stable, on, args.reloads),
        "baseline": reloads_under_load(caddy, stable, off, args.reloads),
    }
    print("2, 3. rolling restart and kill, baseline (draining, retries, delay off) ...")
    out["pool_baseline"] = pool_phase(run.endpoint, caddy, run.workdir, fleet, cast, OFF)
    print("2, 3. rolling restart and kill ...", flush=True)
    out["pool"] = pool_phase(run.endpoint, caddy, run.workdir, fleet, cast, [])

    print("5-7. watch: readiness, back-to-back, burst, noise, Caddy work ...", flush=True)
    watch = fleet_watch(run.workdir, caddy, fleet, "--resync-interval", "3600")
    run.watches.append(watch)
    since = time.time()  # after the start cycle (which asks Caddy what it runs: /adapt)
    out["readiness"] = measure_readiness(run.endpoint, caddy, watch, cast, args.rounds)
    out["back_to_back"] = back_to_back(caddy, watch, fleet, args.pairs)
    events = Events(run.endpoint)
    try:
        out["noise"] = measure_noise(caddy, watch, fleet)
        out["burst"] = measure_burst(run.endpoint, caddy, watch, fleet, events, args.burst)
    finally:
        events.close()
    cycles = [c for c in watch.cycles() if float(c.get("ts", 0)) >= since]
    watch.stop()
    run.watches.remove(watch)
    out["caddy_work"] = caddy_work(caddy, on, cycles, since)

    if base is not None:
        print("6. the same with the previous code (baseline) ...", flush=True)
        watch = fleet_watch(run.workdir, caddy, fleet, code=base)
        run.watches.append(watch)
        out["back_to_back_baseline"] = back_to_back(caddy, watch, fleet, args.pairs)
        events = Events(run.endpoint)
        try:
            out["burst_baseline"] = measure_burst(
                run.endpoint, caddy, watch, fleet, events, args.burst
            )
        finally:
            events.close()
        watch.stop()
        run.watches.remove(watch)
    out["goals"] = goals(out)
    out["total_s"] = round(time.monotonic() - began, 1)
    return out


def readiness_goals(ready: dict[str, Any]) -> dict[str, bool]:
    r = ready["require_ready"]
    return {
        "readiness p50 <= 40 ms": (r["p50_ms"] or 1e9) <= READY_P50_MS,
        "readiness p95 <= 80 ms": (r["p95_ms"] or 1e9) <= READY_P95_MS,
    }


def goals(f: dict[str, Any]) -> dict[str, bool]:
    if "websocket" not in f:  # --only readiness
        return readiness_goals(f["readiness"])
    ws, pool, b2b = f["websocket"], f["pool"], f["back_to_back"]
    return {
        **readiness_goals(f["readiness"]),
        "websocket 20/20": ws["survived"] == ws["reloads"],
        "rolling restart 0 failed": pool["rolling_restart"]["failed"] == 0,
        "kill 0 failed": pool["kill"]["failed"] == 0,
        "reloads 0 failed (browser-like)": f["reloads"]["result"]["failed"] == 0,
        "back-to-back p95 <= 300 ms": (b2b["p95_ms"] or 1e9) <= BACK_TO_BACK_P95_MS,
        "burst <= 3 reloads": f["burst"]["reloads"] <= 3,
        "noise 0 reloads": f["noise"]["reloads"] == 0,
        "one adaptation per change": f["caddy_work"]["watch_posts"]["/load"]
        == f["caddy_work"]["watch_changes"],
    }


def report(f: dict[str, Any]) -> None:
    def load_line(r: dict[str, Any]) -> str:
        return (f"{r['failed']} failed of {r['sent']} ({r['rate']}/s), {r['raw_errors']} raw "
                f"socket errors, {r['retried']} browser retries {r['failures'] or ''}")  # fmt: skip

    print(f"\n== traffic benchmark: {f['instances']} instances (baseline ref {f['baseline_ref']})")
    if "websocket" in f:
        ws, pool, base = f["websocket"], f["pool"], f["pool_baseline"]
        print(f"1. websocket across {ws['reloads']} reloads: survived {ws['survived']}/"
              f"{ws['reloads']} (baseline without stream_close_delay: {ws['baseline_survived']}/"
              f"{ws['reloads']})")  # fmt: skip
        print(f"2. rolling restart, 3 members, {RATE:.0f} req/s: "
              f"{load_line(pool['rolling_restart'])}")  # fmt: skip
        print(f"   baseline ({' '.join(base['watch_args'])}): {load_line(base['rolling_restart'])}")
        print(f"3. member killed (stop --force): {load_line(pool['kill'])}")
        print(f"   baseline: {load_line(base['kill'])}")
        rel = f["reloads"]
        print(f"4. unrelated host during {rel['reloads']} reloads: {load_line(rel['result'])}")
        print(f"   baseline (traffic settings off): {load_line(rel['baseline'])}")
    report_readiness(f["readiness"])
    for ref, r in (f.get("readiness_code_before") or {}).items():
        print(f"   the same with the code of {ref}, in turn:")
        report_readiness(r)
    if "websocket" in f:
        report_changes(f)
    print("goals: " + ", ".join(f"{k}: {'MET' if v else 'MISSED'}" for k, v in f["goals"].items()))


def report_readiness(r: dict[str, Any]) -> None:
    ready, plain = r["require_ready"], r["plain"]
    print(f"5. start-to-first-200 from the port's first accept, {len(ready['rounds'])} rounds"
          " each, in turn:")  # fmt: skip
    for label, s in (("require_ready=true", ready), ("without (baseline)", plain)):
        print(f"   {label:20} p50 {s['p50_ms']} ms, p95 {s['p95_ms']} ms, max {s['max_ms']} ms")
    print(f"   ratio require_ready / baseline: p50 {r['ratio_p50']}, p95 {r['ratio_p95']}")
    for label, s in (("require_ready=true", ready), ("without (baseline)", plain)):
        steps = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in s["steps_p50_ms"].items())
        print(f"   {label}, median ms after the port opened: {steps}")


def report_changes(f: dict[str, Any]) -> None:
    r, b = f["back_to_back"], f.get("back_to_back_baseline")
    line = f"6. back-to-back change to 200: p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms, max "
    line += f"{r['max_ms']} ms"
    if b:
        line += f" (baseline: p50 {b['p50_ms']} ms, p95 {b['p95_ms']} ms)"
    print(line)
    burst = f["burst"]
    b = f.get("burst_baseline")
    print(
        f"   burst of {burst['instances']} starts: {burst['reloads']} reloads"
        + (f" (baseline {b['reloads']})" if b else "")
        + f"; noise: {f['noise']['events']} events, {f['noise']['reloads']} reloads"
    )
    w = f["caddy_work"]
    print(f"7. Caddy work per change at {w['sites']} sites: POST /load {w['load_ms']} ms; the "
          f"previous /adapt + /load {w['adapt_then_load_ms']} ms; watch made "
          f"{w['watch_posts']['/load']} POST /load for {w['watch_changes']} changes (and "
          f"{w['watch_posts']['/adapt']} POST /adapt: its periodic check whether Caddy runs "
          "the file, not per change)")  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = common_parser(__doc__, RESULTS)
    parser.add_argument("--rounds", type=int, default=20, help="readiness rounds")
    parser.add_argument("--pairs", type=int, default=10, help="back-to-back pairs")
    parser.add_argument("--burst", type=int, default=30, help="instances started at once")
    parser.add_argument("--reloads", type=int, default=100, help="reloads under load")
    parser.add_argument("--reloads-ws", type=int, default=20, help="reloads for the websocket")
    parser.add_argument("--baseline-ref", default=BASELINE_REF, help="the previous code's commit")
    parser.add_argument("--only", choices=["all", "readiness"], default="all",
                        help="readiness: measure 5 alone (and its baseline)")  # fmt: skip
    parser.add_argument("--compare-ref", default=None,
                        help="--only readiness: also this commit's code, in turn")  # fmt: skip
    args = parser.parse_args(argv)
    if not 1 <= args.projects <= 9 or not 3 <= args.instances <= 999:
        parser.error("need 1 <= --projects <= 9 and 3 <= --instances <= 999")
    if not 1 <= args.burst <= args.instances - 2:
        parser.error("need 1 <= --burst <= --instances - 2")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run(default_incus_socket(), args.jobs)

    def measure() -> None:
        figures = bench(args, run)
        report(figures)
        write_json(args.json, figures)

    return run_and_clean_up(measure, run.close)


if __name__ == "__main__":
    sys.exit(main())
