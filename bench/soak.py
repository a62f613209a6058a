"""Soak of `incus-caddyfile watch`: seeded random operations and faults, checked by an oracle.

A seeded random driver runs against `watch`, a real Caddy and the lab's real incusd. After
every quiet period an oracle, computed from a plain Incus listing by rules written out here
(not the package's model), must equal what Caddy serves.

Setup: --projects Incus projects `icfsoak-<random>-p<n>`, each with a profile `soak` that
carries an upstream port, and --instances busybox containers of the lab image, created one
by one (creation order decides who holds a host, so it follows the seed), most of them
started, labelled at random from a small set of hosts `hNN.soak.localhost` so that hosts
collide: pools within a project, conflicts across projects. A Caddy runs from a stub config
on loopback ports, and `python -m incus_caddyfile watch --config SETTINGS -o DIR/Caddyfile
--scheme http --caddy-admin ... --global-option "http_port ..."` keeps it current; SETTINGS
holds `[projects] include = ["icfsoak-<random>-*"]`, so watch routes this run's projects only.

The driver (random.Random(--seed)) runs bursts of 1-15 operations (longer while a fault
lasts), then goes quiet:
  lifecycle  start, stop, restart, pause, resume, rename (stopped), delete, create
  labels     set hosts (random, or a host of another project: a conflict, or of the same
             project: a pool), drop the host, enable true/false, port 80/8080, an invalid
             port (80/tcp, abc, 0, 65536), an unknown key (ignored by the tool), unset the
             local port (the profile's, if any, then counts)
  profile    attach or detach `soak`, change its port
  guest      `guest ready`: scripts/guest_ready.c, built here (gcc -static), pushed into the
             instance and run: PATCH /1.0 {"state":"Ready"} on /dev/incus/sock
Faults (--faults, a comma list) start during a burst, with probability --fault-rate per
operation and each kind at least once, and end before the quiet period:
  caddy      Caddy killed (SIGKILL) for 2-10 operations and 2-8 s, then started again from
             the stub config or from the output file (seeded)
  readonly   the output directory bind-mounted read-only for 2-10 operations and 2-8 s
  incusd     the incusd daemon (argv[0] /usr/libexec/incus/incusd, not its fork* helpers)
             killed with SIGKILL, `scripts/lab.sh start` 1-5 s later. It disturbs every user
             of the lab: leave it out of short runs.
Fault durations are counted in operations (plus a least time the driver waits out), so a
seed replays the same operations in the same order (timings, addresses and what incusd
answers may still differ; the HTTP sample has a random generator of its own).

The oracle (from `GET /1.0/instances?recursion=2` of each project): an instance claims the
hosts of its host label while enable is set and not `false`; it is routed when enable is
`true`, its hosts are LDH names (lowercased) and its port is 1-65535 in digits, its status is
Running, Frozen or Ready and its eth0 has a global IPv4 address. A host is held by its
earliest claimant (created_at, project, name), valid labels or not, running or not; claimants
of other projects are rejected, those of the holder's project form its pool. Caddy must serve
`http://HOST` for each held host with a routed pool member, proxying to exactly the pool's
routed `address:port`s.

The check after each burst: poll (every 0.3 s) the oracle and Caddy's admin API (`GET
/config/`: every route's hosts and upstream dials). Once they have been equal
at least 3 s after the last action, --http-sample served hosts (none with a Frozen member: it
cannot answer) and 2 unserved ones are requested through Caddy's HTTP port with their Host
header: a served host must answer 200 `hello from NAME port PORT` of a pool member, an
unserved one must not. The time to converge is from the last action to the start of the
equality that held. A difference still there --bound seconds after the last action is a
divergence; one already seen at an earlier check and unchanged for 5 s is declared at once
(a repeat), so a lasting disagreement does not cost --bound at every check. While Incus cannot
be listed (another user of the shared lab restarting incusd), there is no verdict: the bound
moves on, up to 10 bounds.

Report (stdout and --json): operations, faults, checks, divergences (goal 0: each with the
hosts, the oracle's reasoning, the burst before it and a tag: `ready` when only Ready members
are missing, `invalid-holder` when another project's instance serves a host whose holder has
invalid labels, `unexplained` otherwise), the longest time to converge, reloads (Caddy's
POST /load count). Every failure line names the seed; exit 1 on a divergence or an error.

Everything is removed in a `finally` (mount, processes, projects, instances, profiles, temp
files; incusd started again if this run killed it), also on Ctrl-C or SIGTERM. Only the local
Incus unix socket, loopback and the lab's bridge are used.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import repo_root  # noqa: F401  (sys.path: the repository root, for tests.harness)
from fleet import (
    BenchError,
    Fleet,
    common_parser,
    create_project,
    get,
    incus,
    run_and_clean_up,
    run_parallel,
    signals_ignored,
    write_json,
)
from watch import start_caddy

from incus_caddyfile.settings import default_incus_socket
from tests.harness import (
    ROOT,
    Caddy,
    HarnessError,
    WatchProcess,
    build_guest_ready,
    launch,
    p95,
    projects_named,
    remove_project,
    set_guest_state,
    wait_for,
)
from tests.test_hostile import caddy_sites

RESULTS = ROOT / "bench" / "results" / "soak.json"
PROJECT_PREFIX = "icfsoak-"
DOMAIN = "soak.localhost"
PROFILE = "soak"
FAULT_KINDS = ("caddy", "readonly", "incusd")
INCUSD = "/usr/libexec/incus/incusd"
QUIET_S = 3.0  # the driver's silence before the oracle must hold
INCUS_DOWN_BOUNDS = 10  # while Incus cannot be listed the bound moves, up to 10 bounds
REPEAT_S = 5.0  # a divergence seen before, unchanged this long: declared without the bound
FIRST_EXTRA_S = 30.0  # more bound for the first check: watch's start, the fleet's DHCP
POLL_S = 0.3
MAX_BURST = 15
MAX_FAULT_OPS = 10  # a fault lasts 2-10 operations (the burst goes on until it ends)
PORTS = ("80", "8080")  # the lab image's httpd listens on both
INVALID_PORTS = ("80/tcp", "abc", "0", "65536")
PICK_TRIES = 20
CLEANUP_WAIT_S = 180.0  # for incusd, at the end

# The label keys, typed out rather than imported: the oracle shares no code with the tool.
ENABLE = "user.caddyserver.http.enable"
HOST = "user.caddyserver.http.matchers.host"
PORT = "user.caddyserver.http.upstream.port"
TYPO = "user.caddyserver.http.upstream.prot"  # an unknown key: ignored, with a warning

# ---------------------------------------------------------------- the oracle

ROUTING_STATUSES = ("Running", "Frozen", "Ready")
LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def valid_hostname(name: str) -> bool:
    return 0 < len(name) <= 253 and all(LDH_LABEL.fullmatch(p) for p in name.split("."))


def valid_port(value: str | None) -> bool:
    return (
        value is not None
        and re.fullmatch(r"[0-9]{1,5}", value) is not None
        and (1 <= int(value) <= 65535)
    )


def created_order(stamp: str) -> tuple[str, int]:
    """An Incus created_at (UTC, 0-9 fraction digits) as something that sorts correctly."""
    base, _, rest = stamp.partition(".")
    digits = re.match(r"[0-9]*", rest)
    fraction = digits.group() if digits else ""
    return base.rstrip("Z"), int(fraction.ljust(9, "0")[:9])


def eth0_ipv4(raw: dict[str, Any]) -> str | None:
    iface = ((raw.get("state") or {}).get("network") or {}).get("eth0") or {}
    for addr in iface.get("addresses") or []:
        if addr.get("family") == "inet" and addr.get("scope") == "global":
            return str(addr["address"])
    return None


@dataclass(frozen=True)
class Claimant:
    """An instance whose labels claim hosts, and whether it is routed now (`dial`)."""

    project: str
    name: str
    status: str
    created: str
    hosts: tuple[str, ...]
    problem: str | None  # why its labels are invalid
    dial: str | None  # "address:port" when routed

    @property
    def order(self) -> tuple[tuple[str, int], str, str]:
        return created_order(self.created), self.project, self.name

    def __str__(self) -> str:
        state = f"invalid {self.problem}" if self.problem else f"dial {self.dial or '-'}"
        return f"{short(self.project)}/{self.name} {self.status} {state} created {self.created}"


def claimant(raw: dict[str, Any]) -> Claimant | None:
    config = raw.get("expanded_config") or {}
    enable, label = config.get(ENABLE), config.get(HOST)
    if enable is None or enable.lower() == "false" or label is None:
        return None
    named = [h.lower() for h in re.split(r"[\s,]+", label) if h]
    hosts = tuple(dict.fromkeys(h for h in named if valid_hostname(h)))
    problem = None
    if enable.lower() != "true":
        problem = f"enable={enable!r}"
    elif not named or len(hosts) != len(set(named)):
        problem = f"host={label!r}"
    elif not valid_port(config.get(PORT)):
        problem = f"port={config.get(PORT)!r}"
    status, address = str(raw.get("status", "")), eth0_ipv4(raw)
    dial = None
    if problem is None and status in ROUTING_STATUSES and address:
        dial = f"{address}:{int(config[PORT])}"
    project = str(raw.get("project") or "default")
    return Claimant(
        project, raw["name"], status, str(raw.get("created_at", "")), hosts, problem, dial
    )


@dataclass(frozen=True)
class Expectation:
    """One claimed host: its holder, the holder project's pool, the rejected claimants."""

    host: str
    holder: Claimant
    pool: tuple[Claimant, ...]
    rejected: tuple[Claimant, ...]

    @property
    def dials(self) -> tuple[str, ...]:
        return tuple(sorted({c.dial for c in self.pool if c.dial}))


def oracle(raws: Sequence[dict[str, Any]]) -> dict[str, Expectation]:
    claims: dict[str, list[Claimant]] = {}
    for raw in raws:
        found = claimant(raw)
        if found is None:
            continue
        for host in found.hosts:
            claims.setdefault(host, []).append(found)
    out = {}
    for host, group in claims.items():
        group.sort(key=lambda c: c.order)
        holder = group[0]
        mine = tuple(c for c in group if c.project == holder.project)
        others = tuple(c for c in group if c.project != holder.project)
        out[host] = Expectation(host, holder, mine, others)
    return out


def expected_sites(expected: dict[str, Expectation]) -> dict[str, tuple[str, ...]]:
    return {h: e.dials for h, e in expected.items() if e.dials}


# ---------------------------------------------------------------- what Caddy serves


def served_sites(caddy: Caddy) -> dict[str, tuple[str, ...]]:
    """Host -> sorted upstream dials, from Caddy's running config (GET /config/ on its admin
    API), read by the hostile-values test's reader of Caddy's JSON."""
    conn = http.client.HTTPConnection("127.0.0.1", caddy.admin_port, timeout=3)
    try:
        conn.request("GET", "/config/")
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status != 200:
        raise OSError(f"Caddy admin answered {response.status}: {body[:200]!r}")
    sites = caddy_sites(json.loads(body or b"null") or {})
    return {h: tuple(sorted(d)) for h, d in sites.items()}


# ---------------------------------------------------------------- divergences


@dataclass(frozen=True)
class Difference:
    host: str
    want: tuple[str, ...]
    got: tuple[str, ...]
    tag: str
    why: str

    def __str__(self) -> str:
        return (
            f"{self.host} [{self.tag}]: oracle {list(self.want) or 'no site'}, Caddy "
            f"{list(self.got) or 'no site'}; {self.why}"
        )


def tag_of(exp: Expectation | None, want: tuple[str, ...], got: tuple[str, ...]) -> str:
    """The known reasons (rules the tool is being changed to follow), else `unexplained`."""
    if exp is None:
        return "unexplained"
    missing, extra = set(want) - set(got), set(got) - set(want)
    status = {c.dial: c.status for c in exp.pool if c.dial}
    if missing and not extra and all(status[d] == "Ready" for d in missing):
        return "ready"
    rivals = {c.dial for c in exp.rejected if c.dial}
    if exp.holder.problem and extra and extra <= rivals:
        return "invalid-holder"
    return "unexplained"


def differences(
    expected: dict[str, Expectation], served: dict[str, tuple[str, ...]]
) -> list[Difference]:
    want_all = expected_sites(expected)
    out = []
    for host in sorted(set(want_all) | set(served)):
        want, got = want_all.get(host, ()), served.get(host, ())
        if want == got:
            continue
        exp = expected.get(host)
        why = "no instance claims it"
        if exp is not None:
            why = f"holder {exp.holder}; pool " + ", ".join(str(c) for c in exp.pool)
            if exp.rejected:
                why += "; rejected " + ", ".join(str(c) for c in exp.rejected)
        out.append(Difference(host, want, got, tag_of(exp, want, got), why))
    return out


def short(project: str) -> str:
    """`icfsoak-abc123-p1` -> `p1`: enough in a line about one run."""
    return project.rsplit("-", 1)[-1]


# ---------------------------------------------------------------- Incus


@dataclass(frozen=True)
class Inst:
    """An instance as the driver picks it: status, own and expanded labels, profiles."""

    project: str
    name: str
    status: str
    local: dict[str, str]
    labels: dict[str, str]
    profiles: tuple[str, ...]

    def __str__(self) -> str:
        return f"{short(self.project)}/{self.name}"


def listing(endpoint: str, projects: Sequence[str], recursion: int) -> list[dict[str, Any]]:
    out = []
    for project in projects:
        params = {"recursion": str(recursion), "project": project}
        for raw in get(endpoint, "instances", params) or []:
            out.append({**raw, "project": project})
    return out


def incusd_pids() -> list[int]:
    """The incusd daemon (not its fork* helpers, which run containers' file and exec)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0] == INCUSD.encode() and not (len(argv) > 1 and argv[1].startswith(b"fork")):
            try:  # a cluster member of scripts/cluster runs with an INCUS_DIR of its own
                if b"\0INCUS_DIR=" in b"\0" + (entry / "environ").read_bytes():
                    continue
            except OSError:
                continue
            pids.append(int(entry.name))
    return pids


def incus_up() -> bool:
    try:
        return subprocess.run(["incus", "info"], capture_output=True, timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def start_incusd() -> None:
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "lab.sh"), "start"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0 or not wait_for(incus_up, 30, 0.5):
        raise BenchError(f"incusd did not come back: {done.stderr.strip()}")


def mounted(path: Path) -> bool:
    """A mount point at path (field 5 of /proc/self/mountinfo)."""
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return any(line.split()[4] == str(path) for line in lines)


def run_root(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


# ---------------------------------------------------------------- faults


@dataclass
class Fault:
    kind: str
    ops_left: int
    mode: str  # caddy: where it comes back from
    least_s: float  # and it lasts at least this long
    began: float
    at_s: float  # after the soak began
    detail: str = ""


class Faults:
    """The faults of one run: started and ended by the driver, logged with their timings."""

    def __init__(self, soak: Soak) -> None:
        self.soak = soak
        self.active: dict[str, Fault] = {}
        self.log: list[dict[str, Any]] = []
        self.mount_point = soak.output.parent
        self.killed_incusd = False

    def begin(self, kind: str, ops: int, mode: str, least_s: float) -> str:
        now = time.monotonic()
        fault = Fault(kind, ops, mode, least_s, now, now - self.soak.began)
        if kind == "caddy":
            proc = self.soak.caddy.proc
            if proc is not None:
                proc.kill()
                proc.wait(timeout=10)
            self.soak.caddy.proc = None
            fault.detail = f"Caddy killed, back from the {mode} after {ops} operations"
            fault.detail += f" and {least_s:.1f} s"
        elif kind == "readonly":
            run_root("mount", "--bind", str(self.mount_point), str(self.mount_point))
            run_root("mount", "-o", "remount,bind,ro", str(self.mount_point))
            fault.detail = f"{self.mount_point} read-only for {ops} operations, {least_s:.1f} s"
        self.active[kind] = fault
        return fault.detail

    def incusd(self, down_s: float) -> str:
        """Kill incusd, wait, start it again: the driver waits meanwhile (it needs Incus)."""
        began = time.monotonic()
        pids = incusd_pids()
        self.killed_incusd = True
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in pids), 10, 0.1)
        time.sleep(down_s)
        start_incusd()
        self.killed_incusd = False
        took = time.monotonic() - began
        detail = f"incusd (pid {', '.join(map(str, pids))}) killed, up again after {took:.1f} s"
        self.logged("incusd", began - self.soak.began, took, detail)
        return detail

    def tick(self) -> list[str]:
        """One operation done: end the faults whose count ran out."""
        ended = []
        for fault in list(self.active.values()):
            fault.ops_left -= 1
            if fault.ops_left <= 0:
                ended.append(self.end(fault))
        return ended

    def end_all(self) -> list[str]:
        return [self.end(f) for f in list(self.active.values())]

    def end(self, fault: Fault) -> str:
        """End a fault, once it lasted its time (the driver waits meanwhile)."""
        time.sleep(max(0.0, fault.began + fault.least_s - time.monotonic()))
        del self.active[fault.kind]
        if fault.kind == "caddy":
            caddy, config = self.soak.caddy, self.soak.output
            if fault.mode != "output file" or not config.exists():
                config = caddy.stub_config(self.soak.workdir / "stub.Caddyfile")
            caddy.start(config)
        elif fault.kind == "readonly":
            self.unmount()
        took = time.monotonic() - fault.began
        self.logged(fault.kind, fault.at_s, took, fault.detail)
        return f"{fault.kind} ended after {took:.1f} s"

    def logged(self, kind: str, at_s: float, took: float, detail: str) -> None:
        self.log.append(
            {"kind": kind, "at_s": round(at_s, 1), "down_s": round(took, 1), "detail": detail}
        )

    def unmount(self) -> None:
        for _ in range(20):
            if not mounted(self.mount_point):
                return
            done = subprocess.run(
                ["umount", str(self.mount_point)], capture_output=True, timeout=30, check=False
            )
            if done.returncode != 0:
                time.sleep(0.5)
        if mounted(self.mount_point):
            run_root("umount", "-l", str(self.mount_point))

    def close(self) -> None:
        """At the end, whatever happened: no mount left, incusd running if we killed it."""
        if mounted(self.mount_point):
            self.unmount()
        if self.killed_incusd and not incus_up():
            start_incusd()


# ---------------------------------------------------------------- the driver


class Driver:
    """Seeded random operations on this run's instances; each picks from a fresh listing
    (sorted), so the same seed makes the same choices when Incus answers the same."""

    def __init__(self, soak: Soak, rng: random.Random) -> None:
        self.soak = soak
        self.rng = rng
        self.serial = 0
        self.hosts = [f"h{i:02d}.{DOMAIN}" for i in range(max(4, soak.args.instances * 2 // 3))]
        # (name, weight, operation): an operation returns what it did, None without a candidate
        table: list[tuple[str, int, Callable[[list[Inst]], str | None]]] = [
            ("start", 10, partial(self.lifecycle, "start", ("Stopped",))),
            ("stop", 6, partial(self.lifecycle, "stop", ("Running", "Ready"))),
            ("restart", 5, partial(self.lifecycle, "restart", ("Running", "Ready"))),
            ("pause", 4, partial(self.lifecycle, "pause", ("Running", "Ready"))),
            ("resume", 4, partial(self.lifecycle, "resume", ("Frozen",))),
            ("rename", 3, self.rename),
            ("delete", 3, self.delete),
            ("create", 4, self.create),
            ("hosts", 6, self.set_hosts),
            ("conflict", 5, partial(self.share_host, False)),
            ("pool", 3, partial(self.share_host, True)),
            ("drop-host", 2, partial(self.unset, HOST)),
            ("disable", 3, partial(self.set_enable, "false")),
            ("enable", 4, partial(self.set_enable, "true")),
            ("port", 4, partial(self.set_port, PORTS)),
            ("invalid-port", 4, partial(self.set_port, INVALID_PORTS)),
            ("unset-port", 2, partial(self.unset, PORT)),
            ("unknown-key", 2, self.typo),
            ("profile-add", 2, partial(self.profile, "add")),
            ("profile-remove", 2, partial(self.profile, "remove")),
            ("profile-port", 2, self.profile_port),
            ("ready", 6 if soak.guest_ready is not None else 0, self.ready),
        ]
        self.ops = {name: op for name, _, op in table}
        self.names = [name for name, _, _ in table]
        self.weights = [weight for _, weight, _ in table]

    # ---- labels for new instances
    def host_value(self) -> str:
        hosts = [self.rng.choice(self.hosts)]
        if self.rng.random() < 0.1:
            hosts.append(self.rng.choice(self.hosts))
        value = ", ".join(hosts)
        return value.upper() if self.rng.random() < 0.1 else value

    def port_value(self, choices: Sequence[str] = PORTS) -> str:
        return self.rng.choice(INVALID_PORTS if self.rng.random() < 0.1 else choices)

    def new_labels(self) -> tuple[dict[str, str], bool]:
        """Labels of a new instance and whether it uses the `soak` profile (for its port)."""
        if self.rng.random() < 0.1:
            return {}, self.rng.random() < 0.3
        config = {
            ENABLE: self.rng.choice(("true", "true", "True", "false")),
            HOST: self.host_value(),
        }
        profile = self.rng.random() < 0.3
        if not profile or self.rng.random() < 0.3:
            config[PORT] = self.port_value()
        return config, profile

    def new_name(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}{self.serial:03d}"

    # ---- choosing
    def view(self) -> list[Inst]:
        raws = listing(self.soak.endpoint, self.soak.projects, 1)
        out = [
            Inst(
                raw["project"],
                raw["name"],
                raw.get("status", ""),
                {k: v for k, v in (raw.get("config") or {}).items() if k.startswith("user.")},
                {
                    k: v
                    for k, v in (raw.get("expanded_config") or {}).items()
                    if k.startswith("user.caddyserver.")
                },
                tuple(raw.get("profiles") or ()),
            )
            for raw in raws
        ]
        return sorted(out, key=lambda i: (i.project, i.name))

    def pick(self, view: list[Inst], keep: Callable[[Inst], bool]) -> Inst | None:
        candidates = [i for i in view if keep(i)]
        return self.rng.choice(candidates) if candidates else None

    def step(self) -> tuple[str, str]:
        """One operation, chosen at random among those that have a candidate now. Returns
        (kind, what was done); an incus failure raises HarnessError."""
        view = self.view()
        for _ in range(PICK_TRIES):
            kind = self.rng.choices(self.names, self.weights)[0]
            done = self.ops[kind](view)
            if done is not None:
                return kind, done
        raise BenchError(f"no operation found a candidate in {PICK_TRIES} tries")

    def run(self, inst: Inst, *args: str) -> None:
        incus(*args, "--project", inst.project)

    # ---- the operations
    def lifecycle(self, action: str, statuses: tuple[str, ...], view: list[Inst]) -> str | None:
        inst = self.pick(view, lambda i: i.status in statuses)
        if inst is None:
            return None
        force = ["--force"] if action in ("stop", "restart") else []
        self.run(inst, action, inst.name, *force)
        return f"{action} {inst} ({inst.status})"

    def rename(self, view: list[Inst]) -> str | None:
        inst = self.pick(view, lambda i: i.status == "Stopped")
        if inst is None:
            return None
        new = self.new_name("n")
        self.run(inst, "rename", inst.name, new)
        return f"rename {inst} to {new}"

    def delete(self, view: list[Inst]) -> str | None:
        if len(view) <= self.soak.args.instances - 3:
            return None
        inst = self.pick(view, lambda i: i.status != "Frozen")
        if inst is None:
            return None
        self.run(inst, "delete", "--force", inst.name)
        return f"delete {inst} ({inst.status})"

    def create(self, view: list[Inst]) -> str | None:
        if len(view) >= self.soak.args.instances + 6:
            return None
        project = self.rng.choice(self.soak.projects)
        name = self.new_name("s")
        config, profile = self.new_labels()
        start = self.rng.random() < 0.8
        profiles = ("default", PROFILE) if profile else ("default",)
        launch(project, name, config, profiles, start=start, run=incus)
        return f"create {short(project)}/{name}{' started' if start else ''} {labels_text(config)}"

    def set_labels(self, inst: Inst, values: dict[str, str]) -> str:
        self.run(inst, "config", "set", inst.name, *(f"{k}={v}" for k, v in values.items()))
        return f"set {inst} {labels_text(values)}"

    def set_hosts(self, view: list[Inst]) -> str | None:
        inst = self.pick(view, lambda i: True)
        return None if inst is None else self.set_labels(inst, {HOST: self.host_value()})

    def share_host(self, same_project: bool, view: list[Inst]) -> str | None:
        """Claim a host another instance claims: in another project (a conflict) or in the
        same one (a pool)."""
        claimed = [(i, h) for i in view for h in hosts_of(i)]
        inst = self.pick(
            view,
            lambda i: any(
                (o.project == i.project) == same_project and o.name != i.name for o, _ in claimed
            ),
        )
        if inst is None:
            return None
        hosts = sorted(
            {
                h
                for o, h in claimed
                if (o.project == inst.project) == same_project and o.name != inst.name
            }
        )
        return self.set_labels(inst, {HOST: self.rng.choice(hosts)})

    def unset(self, key: str, view: list[Inst]) -> str | None:
        inst = self.pick(view, lambda i: key in i.local)
        if inst is None:
            return None
        self.run(inst, "config", "unset", inst.name, key)
        return f"unset {inst} {key.rsplit('.', 1)[-1]}"

    def set_enable(self, value: str, view: list[Inst]) -> str | None:
        inst = self.pick(view, lambda i: i.labels.get(ENABLE, "").lower() != value)
        if inst is None:
            return None
        values = {ENABLE: value if self.rng.random() < 0.7 else value.upper()}
        if value == "true" and HOST not in inst.labels:
            values[HOST] = self.host_value()
        return self.set_labels(inst, values)

    def set_port(self, choices: Sequence[str], view: list[Inst]) -> str | None:
        inst = self.pick(view, lambda i: ENABLE in i.labels)
        return None if inst is None else self.set_labels(inst, {PORT: self.rng.choice(choices)})

    def typo(self, view: list[Inst]) -> str | None:
        inst = self.pick(view, lambda i: ENABLE in i.labels)
        if inst is None:
            return None
        if TYPO in inst.local:
            self.run(inst, "config", "unset", inst.name, TYPO)
            return f"unset {inst} {TYPO}"
        return self.set_labels(inst, {TYPO: "81"})

    def profile(self, action: str, view: list[Inst]) -> str | None:
        inst = self.pick(view, lambda i: (PROFILE in i.profiles) == (action == "remove"))
        if inst is None:
            return None
        self.run(inst, "profile", action, inst.name, PROFILE)
        return f"profile {action} {inst} {PROFILE}"

    def profile_port(self, view: list[Inst]) -> str | None:
        project = self.rng.choice(self.soak.projects)
        value = self.port_value()
        incus("profile", "set", PROFILE, f"{PORT}={value}", "--project", project)
        return f"profile set {short(project)}/{PROFILE} port={value}"

    def ready(self, view: list[Inst]) -> str | None:
        inst = self.pick(view, lambda i: i.status == "Running")
        if inst is None or self.soak.guest_ready is None:
            return None
        set_guest_state(inst.project, inst.name, self.soak.guest_ready, run=incus)
        return f"guest ready {inst}"


def hosts_of(inst: Inst) -> list[str]:
    return [h.lower() for h in re.split(r"[\s,]+", inst.labels.get(HOST, "")) if h]


def labels_text(config: dict[str, str]) -> str:
    return " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in config.items()) or "(no labels)"


# ---------------------------------------------------------------- the soak


@dataclass
class Check:
    index: int
    at_s: float
    converged_s: float | None  # None: it did not
    polls: int
    incus_down: int  # polls that could not list Incus (they extend the bound)
    differences: list[Difference] = field(default_factory=list)
    repeat: bool = False  # declared early: the same as a divergence seen before
    problem: str | None = None  # Incus or Caddy could not be read, or an HTTP answer was wrong


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.sample_rng = random.Random(args.seed + 1)  # used at timing-dependent moments
        self.endpoint = default_incus_socket()
        self.fleet = Fleet.new(PROJECT_PREFIX, args.projects, 0)
        self.projects: list[str] = list(self.fleet.projects)
        self.created: list[str] = []
        self.workdir = Path(tempfile.mkdtemp(prefix="icfsoak-"))
        self.output = self.workdir / "out" / "Caddyfile"
        self.output.parent.mkdir()
        self.began = time.monotonic()
        self._caddy: Caddy | None = None  # started in setup
        self.watch: WatchProcess | None = None
        self.faults = Faults(self)
        self.guest_ready = self.guest_helper()
        self.driver = Driver(self, self.rng)
        self.op_log: list[dict[str, Any]] = []
        self.burst: list[str] = []  # what happened since the last check
        self.checks: list[Check] = []
        self.divergences: list[dict[str, Any]] = []
        self.persistent: set[tuple[str, tuple[str, ...], tuple[str, ...]]] = set()
        self.http_requests = 0
        self.http_failures: list[str] = []
        self.loads_at_start = 0
        self.driving = 0.0  # when the driver began (0: not yet)
        self.kinds = [k for k in FAULT_KINDS if k in args.faults]
        self.seen: set[str] = set()  # fault kinds that happened

    @property
    def caddy(self) -> Caddy:
        assert self._caddy is not None, "Caddy is started in setup"
        return self._caddy

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.began:6.1f} s] {text}", flush=True)

    # ---- setup
    def setup(self) -> None:
        self.say(f"projects {', '.join(self.projects)}, {self.args.instances} instances ...")
        for project in self.projects:
            create_project(project, self.args.instances, self.created)
            incus("profile", "create", PROFILE, "--project", project)
            incus("profile", "set", PROFILE, f"{PORT}=8080", "--project", project)
        starts = []
        for i in range(self.args.instances):  # one by one: creation order follows the seed
            project = self.projects[i % len(self.projects)]
            name = self.driver.new_name("s")
            config, profile = self.driver.new_labels()
            profiles = ("default", PROFILE) if profile else ("default",)
            launch(project, name, config, profiles, start=False, run=incus)
            if self.rng.random() < 0.8:
                starts.append(partial(incus, "start", name, "--project", project))
        failures = run_parallel(self.args.jobs, starts)
        if failures:
            raise BenchError(f"{len(failures)} starts failed, first: {failures[0]}")
        self._caddy = start_caddy(self.workdir)
        settings = self.workdir / "settings.toml"
        pattern = f"{PROJECT_PREFIX}{self.fleet.suffix}-*"
        settings.write_text(f'[projects]\ninclude = ["{pattern}"]\n')
        self.watch = WatchProcess(self.output, "--config", settings, *self.caddy.render_args)
        self.say(
            f"watch (pid {self.watch.pid}) on {pattern}; Caddy HTTP port "
            f"{self.caddy.http_port}, admin {self.caddy.admin}"
        )

    def guest_helper(self) -> Path | None:
        """The `guest ready` helper, or None (then no such operations) without gcc."""
        try:
            exe: Path = build_guest_ready(self.workdir)
            return exe
        except (OSError, subprocess.SubprocessError) as exc:
            print(
                f"soak: cannot build guest_ready, no `guest ready` operations: {exc}",
                file=sys.stderr,
            )
            return None

    # ---- the loop
    def run(self) -> None:
        args = self.args
        self.setup()
        self.check(args.bound + FIRST_EXTRA_S)
        self.loads_at_start = self.caddy.load_count()
        self.began = driving = self.driving = time.monotonic()
        kinds, seen = self.kinds, self.seen
        forced = {
            k: self.rng.randrange(args.ops // 10, max(args.ops * 8 // 10, 1) + 1) for k in kinds
        }
        ops = 0
        hard_ops, hard_s = args.ops * 4, args.minutes * 60 * 3 + 120
        while ops < hard_ops and time.monotonic() - driving < hard_s:
            if ops >= args.ops and time.monotonic() - driving >= args.minutes * 60:
                break
            length = self.rng.randint(1, MAX_BURST)
            for step in range(length + MAX_FAULT_OPS):  # on while a fault lasts
                if step >= length and not self.faults.active:
                    break
                kind = self.fault_due(kinds, forced, seen, ops)
                if kind is not None:
                    self.fault(kind)
                self.operate(ops)
                ops += 1
                time.sleep(self.rng.choice((0, 0, 0.1, 0.3)))
            for ended in self.faults.end_all():
                self.burst.append(ended)
            self.check(args.bound)

    def fault_due(
        self, kinds: list[str], forced: dict[str, int], seen: set[str], ops: int
    ) -> str | None:
        """The fault kind to start before operation `ops`, if any. Draws the same random
        numbers whatever is active, so the seed replays."""
        roll, pick = self.rng.random(), self.rng.choice(kinds) if kinds else None
        due = [k for k in kinds if forced[k] <= ops and k not in seen]
        kind = due[0] if due else (pick if roll < self.args.fault_rate else None)
        if kind is None or kind in self.faults.active:
            return None
        seen.add(kind)
        return kind

    def fault(self, kind: str) -> None:
        ops = self.rng.randint(2, MAX_FAULT_OPS)
        mode = self.rng.choice(("stub config", "output file"))
        seconds = self.rng.uniform(1, 5) if kind == "incusd" else self.rng.uniform(2, 8)
        if kind == "incusd":
            done = self.faults.incusd(seconds)
        else:
            done = self.faults.begin(kind, ops, mode, seconds)
        self.say(f"fault: {done}")
        self.burst.append(f"fault {done}")

    def operate(self, index: int) -> None:
        started = time.monotonic()
        record: dict[str, Any] = {"i": index, "at_s": round(started - self.began, 2)}
        try:
            kind, done = self.driver.step()
            record.update(kind=kind, what=done, ok=True)
        except BenchError:
            raise
        except Exception as exc:  # an incus command failed (or a listing): counted, go on
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            record.update(kind="failed", what=text[:300], ok=False)
        record["took_s"] = round(time.monotonic() - started, 2)
        self.op_log.append(record)
        self.burst.append(f"{'' if record['ok'] else 'FAILED '}{record['what']}")
        for ended in self.faults.tick():
            self.burst.append(ended)

    # ---- the check
    def alive(self) -> None:
        assert self.watch is not None
        if self.watch.proc.poll() is not None:
            raise BenchError(
                f"watch exited with {self.watch.proc.returncode} (seed {self.args.seed}):\n"
                f"{self.watch.log_text(20)}"
            )

    def observe(self) -> tuple[dict[str, Expectation] | None, list[Difference], str | None]:
        try:
            expected = oracle(listing(self.endpoint, self.projects, 2))
        except Exception as exc:  # pylxd and requests raise many kinds; retried until the bound
            return None, [], f"Incus listing failed: {exc}"
        try:
            served = served_sites(self.caddy)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            return expected, [], f"Caddy admin API: {exc}"
        return expected, differences(expected, served), None

    def check(self, bound: float) -> None:
        index = len(self.checks)
        quiet_from = time.monotonic()
        deadline = quiet_from + bound
        equal_since: float | None = None
        last_sig: frozenset[Any] = frozenset()
        sig_since = quiet_from
        polls = incus_down = 0
        while True:
            self.alive()
            polls += 1
            expected, diffs, problem = self.observe()
            now = time.monotonic()
            if expected is None:  # Incus is down (another user of the lab?): no verdict yet
                incus_down += 1
                deadline = min(max(deadline, now + bound), quiet_from + INCUS_DOWN_BOUNDS * bound)
            sig = frozenset((d.host, d.want, d.got) for d in diffs)
            if sig != last_sig:
                last_sig, sig_since = sig, now
            if problem is None and not diffs and expected is not None:
                equal_since = equal_since or now
                if now - quiet_from >= QUIET_S:
                    failed = self.http_sample(expected)
                    if not failed:
                        took = equal_since - quiet_from
                        self.done(Check(index, now - self.began, took, polls, incus_down))
                        return
                    problem, equal_since = "; ".join(failed), None
            else:
                equal_since = None
            repeat = bool(sig) and sig <= self.persistent and now - sig_since >= REPEAT_S
            if now >= deadline or (repeat and now - quiet_from >= QUIET_S):
                at = now - self.began
                self.done(Check(index, at, None, polls, incus_down, diffs, repeat, problem))
                return
            time.sleep(max(0.0, POLL_S - (time.monotonic() - now)))

    def http_sample(self, expected: dict[str, Expectation]) -> list[str]:
        """Requests through Caddy's HTTP port; what went wrong (empty: all good)."""
        served = [
            e
            for e in expected.values()
            if e.dials and all(c.status != "Frozen" for c in e.pool if c.dial)
        ]
        unserved = [h for h in self.driver.hosts if h not in expected_sites(expected)]
        picks = self.sample_rng.sample(served, min(self.args.http_sample, len(served)))
        failed = []
        for exp in sorted(picks, key=lambda e: e.host):
            answers = {
                f"hello from {c.name} port {c.dial.rsplit(':', 1)[1]}" for c in exp.pool if c.dial
            }
            status, body = self.caddy.get(exp.host)
            self.http_requests += 1
            if status != 200 or body.strip() not in answers:
                failed.append(
                    f"GET {exp.host}: {status} {body.strip()[:80]!r}, want one of {sorted(answers)}"
                )
        for host in self.sample_rng.sample(unserved, min(2, len(unserved))):
            status, body = self.caddy.get(host)
            self.http_requests += 1
            if status == 200 and "hello from" in body:
                failed.append(f"GET {host} (no site): {status} {body.strip()[:80]!r}")
        self.http_failures += failed
        return failed

    def done(self, check: Check) -> None:
        self.checks.append(check)
        burst, self.burst = self.burst, []
        if check.converged_s is not None:
            self.say(
                f"check {check.index}: converged in {check.converged_s:.2f} s "
                f"({len(burst)} actions before it)"
            )
            return
        first = not {(d.host, d.want, d.got) for d in check.differences} <= self.persistent
        self.persistent |= {(d.host, d.want, d.got) for d in check.differences}
        entry = {
            "check": check.index,
            "at_s": round(check.at_s, 1),
            "repeat": check.repeat,
            "new": first,
            "problem": check.problem,
            "differences": [
                {"host": d.host, "oracle": d.want, "caddy": d.got, "tag": d.tag, "why": d.why}
                for d in check.differences
            ],
            "burst": burst,
            "watch_log": self.watch.log_text(8) if self.watch else "",
        }
        self.divergences.append(entry)
        what = "repeat" if check.repeat else "new" if first else "again"
        print(
            f"soak: DIVERGENCE (seed {self.args.seed}) at check {check.index}, {what}: "
            f"{check.problem or ''}",
            file=sys.stderr,
            flush=True,
        )
        for diff in check.differences:
            print(f"  {diff}", file=sys.stderr)
        if first:
            print("  after: " + " | ".join(burst[-15:]), file=sys.stderr, flush=True)

    # ---- the report
    def report(self) -> dict[str, Any]:
        """The figures so far (also after an error or Ctrl-C, once watch runs)."""
        args, kinds = self.args, self.kinds
        assert self.watch is not None
        driven_s = time.monotonic() - self.driving if self.driving else 0.0
        ok = [r for r in self.op_log if r["ok"]]
        by_kind: dict[str, int] = {}
        for r in ok:
            by_kind[r["kind"]] = by_kind.get(r["kind"], 0) + 1
        faults: dict[str, int] = {}
        for f in self.faults.log:
            faults[f["kind"]] = faults.get(f["kind"], 0) + 1
        times = [c.converged_s for c in self.checks if c.converged_s is not None]
        cycles = self.watch.cycles()
        tags: dict[str, int] = {}
        for d in self.divergences:
            for diff in d["differences"]:
                tags[diff["tag"]] = tags.get(diff["tag"], 0) + 1
        return {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "seed": args.seed,
            "replay": replay_command(args),
            "projects": self.projects,
            "instances": args.instances,
            "faults_enabled": kinds,
            "driven_s": round(driven_s, 1),
            "full_soak": len(self.op_log) >= 500
            and driven_s >= 600
            and args.instances >= 30
            and len(self.projects) >= 3
            and set(kinds) == set(FAULT_KINDS),
            "operations": {
                "total": len(self.op_log),
                "ok": len(ok),
                "failed": len(self.op_log) - len(ok),
                "by_kind": by_kind,
                "failures": [r["what"] for r in self.op_log if not r["ok"]][:20],
            },
            "faults": {
                "total": len(self.faults.log),
                "by_kind": faults,
                "never_happened": sorted(set(kinds) - self.seen),
                "log": self.faults.log,
            },
            "checks": len(self.checks),
            "converged": len(times),
            "checks_with_incus_down": sum(1 for c in self.checks if c.incus_down),
            "divergences": len(self.divergences),
            "distinct_divergences": len(self.persistent),
            "divergence_tags": tags,
            "divergence_log": self.divergences,
            "converge_s": {
                "max": rounded(max(times, default=None)),
                "p50": rounded(statistics.median(times) if times else None),
                "p95": rounded(p95(times) if times else None),
            },
            "reloads": self.caddy.load_count() - self.loads_at_start,
            "watch": {
                "cycles": len(cycles),
                "cycles_failed": sum(1 for c in cycles if c.get("error")),
                "cycles_reloaded": sum(1 for c in cycles if c.get("reloaded")),
            },
            "http": {
                "requests": self.http_requests,
                "failures": len(self.http_failures),
                "failure_samples": self.http_failures[:10],
            },
            "operation_log": self.op_log,
        }

    # ---- the end
    def close(self, keep_logs: bool) -> bool:
        ok = True
        try:
            self.faults.close()
        except BenchError as exc:
            print(f"soak: cleanup: {exc}", file=sys.stderr)
            ok = False
        if self.watch is not None:
            self.watch.stop()
            (self.workdir / "watch.log").write_text(self.watch.log_text())
        if self._caddy is not None:
            self._caddy.stop()
        try:
            ok = remove_projects(self.created, self.args.jobs) and ok
        finally:
            if keep_logs or self.divergences or not ok:
                print(f"logs kept in {self.workdir} (watch.log, caddy.log, out/Caddyfile)")
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)
        return ok


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def remove_projects(projects: Sequence[str], jobs: int) -> bool:
    """Every project of this run, with its instances and profiles; signals ignored. Waits
    (bounded) for an incusd that someone restarts, and tries twice."""
    if not projects:
        return True
    print(f"cleanup: deleting {', '.join(projects)} ...", flush=True)
    prefix = projects[0].rsplit("-", 1)[0] + "-"
    left: list[str] = list(projects)
    with signals_ignored():
        for _ in range(2):
            if not wait_for(incus_up, CLEANUP_WAIT_S, 1.0):
                continue
            tasks = [partial(remove_project, p, run=incus) for p in left]
            run_parallel(max(jobs, len(left)), tasks)
            try:
                left = projects_named(prefix, run=incus)
            except HarnessError:
                continue
            if not left:
                return True
    print(
        f"cleanup: LEFT BEHIND: {', '.join(left)} (remove with `incus delete --force NAME "
        f"--project P`, `incus profile delete {PROFILE} --project P`, `incus project delete P`)",
        file=sys.stderr,
    )
    return False


def replay_command(args: argparse.Namespace) -> str:
    return (
        f".venv/bin/python bench/soak.py --seed {args.seed} --ops {args.ops} --minutes "
        f"{args.minutes:g} --instances {args.instances} --projects {args.projects} --faults "
        f"{','.join(args.faults) or 'none'} --fault-rate {args.fault_rate:g}"
    )


def print_report(r: dict[str, Any]) -> None:
    ops, faults, conv = r["operations"], r["faults"], r["converge_s"]
    print(
        f"\n== soak, seed {r['seed']}: {r['instances']} instances in {len(r['projects'])} "
        f"projects, driven {r['driven_s']:.0f} s"
        f"{'' if r['full_soak'] else ' (shorter than the full soak)'}"
    )
    print(
        f"operations: {ops['total']} ({ops['failed']} failed): "
        + ", ".join(f"{k} {v}" for k, v in sorted(ops["by_kind"].items()))
    )
    print(
        f"faults: {faults['total']}: "
        + (", ".join(f"{k} {v}" for k, v in sorted(faults["by_kind"].items())) or "none")
        + (f" (never happened: {faults['never_happened']})" if faults["never_happened"] else "")
    )
    print(
        f"checks: {r['checks']}, converged {r['converged']}; longest time to converge "
        f"{conv['max']} s (p50 {conv['p50']}, p95 {conv['p95']})"
    )
    print(
        f"divergences: {r['divergences']} (goal 0), distinct {r['distinct_divergences']}"
        + (f", by tag {r['divergence_tags']}" if r["divergence_tags"] else "")
    )
    print(
        f"reloads: {r['reloads']} (Caddy POST /load); watch cycles {r['watch']['cycles']}, "
        f"{r['watch']['cycles_failed']} failed; HTTP requests {r['http']['requests']}, "
        f"{r['http']['failures']} wrong before converging"
    )
    print(f"replay: {r['replay']}")


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = common_parser(__doc__, RESULTS)
    parser.set_defaults(instances=33)
    options: list[tuple[str, Any, Any, str]] = [
        ("--seed", int, None, "random seed (default: a random one, printed)"),
        ("--ops", int, 500, "operations, at least"),
        ("--minutes", float, 10.0, "driving time, at least"),
        ("--faults", str, ",".join(FAULT_KINDS), "comma list of caddy, readonly, incusd; none"),
        ("--fault-rate", float, 0.04, "probability of a fault before each operation"),
        ("--bound", float, 30.0, "seconds after the last action before a difference counts"),
        ("--http-sample", int, 5, "served hosts requested through Caddy at each check"),
    ]
    for flag, kind, default, text in options:
        parser.add_argument(flag, type=kind, default=default, help=text)
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp directory")
    args = parser.parse_args(argv)
    args.faults = [] if args.faults in ("", "none") else args.faults.split(",")
    if unknown := set(args.faults) - set(FAULT_KINDS):
        parser.error(f"unknown faults {sorted(unknown)}; known: {', '.join(FAULT_KINDS)}")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 2**31)
    if not (1 <= args.projects <= 9 and 3 <= args.instances <= 200 and args.ops >= 1):
        parser.error("need 1 <= --projects <= 9, 3 <= --instances <= 200, --ops >= 1")
    if args.minutes < 0 or args.bound < QUIET_S or not 0 <= args.fault_rate <= 1:
        parser.error("need --minutes >= 0, --bound >= 3, 0 <= --fault-rate <= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("soak: needs root (incus, mount)", file=sys.stderr)
        return 1
    print(f"soak: seed {args.seed}; replay with: {replay_command(args)}", flush=True)
    soak = Soak(args)

    def body() -> None:
        try:
            soak.run()
        finally:
            if soak.watch is not None:
                figures = soak.report()
                print_report(figures)
                write_json(args.json, figures)
        if figures["divergences"]:
            raise BenchError(
                f"{figures['divergences']} divergences ({figures['distinct_divergences']} "
                f"distinct); seed {args.seed}; replay: {figures['replay']}"
            )

    def clean_up() -> bool:
        return soak.close(args.keep_logs)

    code = run_and_clean_up(body, clean_up)
    if code:
        print(f"soak: FAILED, seed {args.seed}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
