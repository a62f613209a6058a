"""A real 3-member Incus cluster (scripts/lab.sh cluster up: one incusd per network namespace,
next to the lab's), real Caddy, real HTTP: instances on every member are routed, events of
every member reach watch through one member's stream, a member that dies or is cut off does
not take the routes of its instances (nor hold back the others), and a moved instance keeps
one route.

The session fixture brings the cluster up when it is not (about 10 s) and down again at the
end if it did; instance names carry the prefix icc and this session's pid (container names
are host-wide cgroup names: they must never equal one of the lab's)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from incus_caddyfile.model import KEY_HOST, LAST_ROUTE_KEPT

from ..helpers import skip_or_fail
from .conftest import ROOT, Caddy, WatchProcess, labels, render_and_start, run_cli, wait_for

pytestmark = pytest.mark.integration

LAB = ROOT / "scripts" / "lab.sh"
MEMBER = ROOT / "scripts" / "cluster" / "member.sh"
DIRPFX = os.environ.get("ICC_DIRPFX", "/var/lib/icc-m")
IMAGE = os.environ.get("ICC_IMAGE", "icc-busybox")
SESSION = f"icc{os.getpid():x}"


class Cluster:
    """The cluster's members, through the incus client (INCUS_DIR per member)."""

    def __init__(self) -> None:
        self.made: list[str] = []

    def socket(self, member: int) -> str:
        return f"{DIRPFX}{member}/unix.socket"

    def incus(self, member: int, *args: str, timeout: float = 120) -> str:
        env = {**os.environ, "INCUS_DIR": f"{DIRPFX}{member}"}
        done = subprocess.run(
            ["incus", *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
        )
        assert done.returncode == 0, f"incus {' '.join(args)}: {done.stderr}"
        return done.stdout

    def set_host(self, name: str, host: str) -> None:
        """Set the host label (retried while a member that just started says it is not ready
        yet; bounded)."""
        args = ["config", "set", name, f"{KEY_HOST}={host}"]
        env = {**os.environ, "INCUS_DIR": f"{DIRPFX}1"}
        deadline = time.monotonic() + 60
        while True:
            done = subprocess.run(["incus", *args], capture_output=True, text=True, env=env,
                                  timeout=120, check=False)  # fmt: skip
            if done.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert done.returncode == 0, f"incus {' '.join(args)}: {done.stderr}"

    def member(self, action: str, member: int) -> None:
        subprocess.run(["bash", str(MEMBER), action, str(member)], check=True, timeout=120)

    def launch(self, tag: str, member: int, host: str | None = None) -> str:
        """A running instance on that member (on its bridge), labelled for host (default
        NAME.localhost) on port 80, whose address is known."""
        name = f"{SESSION}-{tag}-{uuid.uuid4().hex[:4]}"
        config = [f"--config={k}={v}" for k, v in labels(host or f"{name}.localhost").items()]
        self.made.append(name)
        self.incus(1, "launch", IMAGE, name, "--target", f"m{member}",
                   "--network", f"iccbr{member}", *config)  # fmt: skip
        assert self.address(name), f"{name} got no address"
        return name

    def listed(self, name: str) -> dict[str, Any]:
        found = json.loads(self.incus(1, "query", f"/1.0/instances/{name}?recursion=1"))
        return dict(found)

    def status(self, name: str) -> str:
        raw = json.loads(self.incus(1, "query", "/1.0/instances?recursion=1"))
        return next(str(i["status"]) for i in raw if i["name"] == name)

    def address(self, name: str, timeout: float = 30) -> str:
        def lookup() -> str | None:
            state = json.loads(self.incus(1, "query", f"/1.0/instances/{name}/state"))
            for addr in ((state.get("network") or {}).get("eth0") or {}).get("addresses", []):
                if addr["family"] == "inet" and addr["scope"] == "global":
                    return str(addr["address"])
            return None

        return str(wait_for(lookup, timeout, interval=0.2) or "")

    def cleanup(self) -> None:
        for name in self.made:
            subprocess.run(
                ["incus", "delete", "-f", name], capture_output=True, timeout=120, check=False,
                env={**os.environ, "INCUS_DIR": f"{DIRPFX}1"},
            )  # fmt: skip


def _lab(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(LAB), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    if os.geteuid() != 0:
        skip_or_fail("the Incus cluster needs root (network namespaces, incusd)")
    if shutil.which("incus") is None or not Path("/usr/libexec/incus/incusd").exists():
        skip_or_fail("Incus is not installed (run scripts/lab.sh up)")
    brought_up = False
    if _lab("cluster", "status").returncode != 0:
        started = time.monotonic()
        up = _lab("cluster", "up")
        if up.returncode != 0:
            skip_or_fail(f"scripts/lab.sh cluster up failed: {up.stdout}{up.stderr}")
        brought_up = True
        print(f"cluster up in {time.monotonic() - started:.1f} s")
    owned = Cluster()
    try:
        yield owned
    finally:
        for member in (1, 2, 3):  # a failed test may have left a member down or cut off
            subprocess.run(["bash", str(MEMBER), "mend", str(member)], check=False)
            subprocess.run(["bash", str(MEMBER), "start", str(member)], check=False, timeout=120)
        owned.cleanup()
        if brought_up:
            _lab("cluster", "down")


@pytest.fixture(autouse=True)
def only_test_projects(monkeypatch: pytest.MonkeyPatch) -> None:
    """(Overrides the lab's policy of only this session's projects: the cluster is this
    module's own, and its instances live in the default project.)"""
    monkeypatch.delenv("INCUS_CADDYFILE_CONFIG", raising=False)


@pytest.fixture(scope="module")
def fleet(cluster: Cluster) -> dict[int, str]:
    """One labelled instance on each member: member -> name."""
    return {member: cluster.launch(f"w{member}", member) for member in (1, 2, 3)}


@pytest.fixture
def member_back(cluster: Cluster) -> Iterator[Callable[[int], None]]:
    """Whatever a test does to a member, it is back (linked, running, online) afterwards."""
    touched: list[int] = []
    yield touched.append
    for member in touched:
        cluster.member("mend", member)
        cluster.member("start", member)
        assert wait_for(lambda: _lab("cluster", "status").returncode == 0, 90, interval=1)


def watch_on(
    start_watch: Callable[..., WatchProcess], out: Path, caddy: Caddy, cluster: Cluster
) -> WatchProcess:
    stub = caddy.stub_config(out.parent / "stub.Caddyfile")
    caddy.start(stub)
    watch = start_watch(out, "--incus", cluster.socket(1), *caddy.render_args)
    watch.wait_cycles(1)
    return watch


def serves(caddy: Caddy, name: str, host: str | None = None, timeout: float = 30) -> bool:
    return f"hello from {name}" in caddy.wait_body(
        host or f"{name}.localhost", f"hello from {name}", timeout
    )


def routes_json(cluster: Cluster, caddy: Caddy, *args: str, member: int = 1) -> dict[str, Any]:
    result = run_cli("routes", "--json", "--incus", cluster.socket(member), *caddy.render_args,
                     *args)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return {row["instance"]: row for row in json.loads(result.stdout)}


def test_every_members_instances_are_routed_and_routes_names_each_member(
    cluster: Cluster, fleet: dict[int, str], caddy: Caddy, tmp_path: Path
) -> None:
    render_and_start(caddy, tmp_path / "Caddyfile", "--incus", cluster.socket(1))
    for name in fleet.values():
        assert serves(caddy, name, timeout=10)
    rows = routes_json(cluster, caddy, member=2)  # any member's socket sees the cluster
    for member, name in fleet.items():
        assert rows[name]["location"] == f"m{member}" and rows[name]["state"] == "routed"
    shown = run_cli("routes", "--incus", cluster.socket(3), *caddy.render_args).stdout
    line = next(line for line in shown.splitlines() if fleet[3] in line)
    assert " m3 " in line and " routed " in line


def test_an_event_on_m3_reaches_watch_through_m1s_stream(
    cluster: Cluster, caddy: Caddy, start_watch: Callable[..., WatchProcess], tmp_path: Path
) -> None:
    watch = watch_on(start_watch, tmp_path / "Caddyfile", caddy, cluster)
    seen = len(watch.cycles())
    started = time.monotonic()
    name = cluster.launch("ev", 3)
    assert serves(caddy, name)
    print(f"launch on m3 to HTTP through Caddy: {time.monotonic() - started:.2f} s")
    index = watch.wait_cycle(
        lambda c: any(name in t and t.startswith("instance-") for t in c["triggers"]), seen
    )
    assert watch.cycles()[index]["error"] is None
    cluster.incus(1, "delete", "-f", name)
    assert wait_for(lambda: f"{name}.localhost" not in watch.routes(), 30)


def test_a_dead_member_keeps_its_routes_and_the_others_changes_are_applied(
    cluster: Cluster,
    fleet: dict[int, str],
    caddy: Caddy,
    start_watch: Callable[..., WatchProcess],
    member_back: Callable[[int], None],
    tmp_path: Path,
) -> None:
    watch = watch_on(start_watch, tmp_path / "Caddyfile", caddy, cluster)
    lost, healthy = fleet[3], fleet[2]
    for name in fleet.values():
        assert serves(caddy, name)
    rendered = tmp_path / "render" / "Caddyfile"
    rendered.parent.mkdir()
    once = ["render", "-o", rendered, "--no-reload", "--incus", cluster.socket(1),
            *caddy.render_args]  # fmt: skip
    assert run_cli(*once).returncode == 0  # keeps .Caddyfile.state.json beside it
    address = cluster.address(lost)

    member_back(3)
    cluster.member("kill", 3)  # its containers keep running and serving
    assert wait_for(lambda: cluster.status(lost) == "Error", 30)
    seen = len(watch.cycles())
    watch.signal(signal.SIGHUP)  # a full listing while m3 is down
    index = watch.wait_cycle(lambda c: "signal" in c["triggers"], seen)
    cycle = watch.cycles()[index]
    assert cycle["error"] is None, watch.log_text()
    print(f"watch cycle (full listing) with m3 dead: {cycle['duration_ms']} ms,"
          f" {cycle['incus_requests']} requests")  # fmt: skip
    watch.wait_log("addresses from each instance's state")
    assert f"{lost}.localhost" in watch.routes() and address in watch.routes()
    assert serves(caddy, lost, timeout=5)  # real HTTP to the dead member's container

    # a change on a healthy member is applied meanwhile (its event, through m1's stream)
    seen = len(watch.cycles())
    cluster.set_host(healthy, f"moved-{healthy}.localhost")
    assert serves(caddy, healthy, f"moved-{healthy}.localhost")
    index = watch.wait_cycle(lambda c: c["written"], seen)
    changed = watch.cycles()[index]
    print(f"watch cycle (one instance) with m3 dead: {changed['duration_ms']} ms")

    # render and routes, run once, keep the route from the state beside the output
    result = run_cli(*once)
    assert result.returncode == 0, result.stderr
    assert f"kept default/{lost}: {LAST_ROUTE_KEPT}" in result.stderr
    assert address in rendered.read_text() and f"moved-{healthy}.localhost" in rendered.read_text()
    row = routes_json(cluster, caddy, "--state-of", str(rendered))[lost]
    assert row["state"] == "unknown" and row["status"] == "Error"
    assert LAST_ROUTE_KEPT in row["reasons"] and row["upstream"] == f"{address}:80"

    # the member comes back: everything converges, without a restart
    back = time.monotonic()
    cluster.member("start", 3)

    def converged() -> bool:
        rerun = run_cli(*once)
        quiet = "warning" not in rerun.stderr and "kept" not in rerun.stderr
        return rerun.returncode == 0 and quiet

    assert wait_for(converged, 60, interval=0.5)
    print(f"render converged {time.monotonic() - back:.1f} s after m3 was started again")
    assert routes_json(cluster, caddy)[lost]["state"] == "routed"
    cluster.set_host(lost, f"back-{lost}.localhost")  # (retried while m3 is not ready)
    accepted = time.monotonic()
    assert serves(caddy, lost, f"back-{lost}.localhost")  # m3's events reach watch again
    print(f"watch applied a change on m3 {time.monotonic() - accepted:.1f} s after Incus"
          f" took it, {time.monotonic() - back:.1f} s after m3 was started again")  # fmt: skip
    cluster.set_host(lost, f"{lost}.localhost")
    cluster.set_host(healthy, f"{healthy}.localhost")


def test_a_member_cut_off_does_not_stall_watch(
    cluster: Cluster,
    fleet: dict[int, str],
    caddy: Caddy,
    start_watch: Callable[..., WatchProcess],
    member_back: Callable[[int], None],
    tmp_path: Path,
) -> None:
    """Its link down: Incus holds every full listing ~20 s while it waits for the member;
    watch gives up on it after --incus-timeout (5 s) and applies other changes meanwhile."""
    watch = watch_on(start_watch, tmp_path / "Caddyfile", caddy, cluster)
    cut, healthy = fleet[3], fleet[2]
    for name in fleet.values():
        assert serves(caddy, name)
    member_back(3)
    cluster.member("cut", 3)
    seen = len(watch.cycles())
    watch.signal(signal.SIGHUP)  # a full listing, which Incus holds up
    index = watch.wait_cycle(lambda c: "signal" in c["triggers"], seen, timeout=30)
    held = watch.cycles()[index]
    assert held["error"] is None and 4500 < held["duration_ms"] < 8000, held
    print(f"watch cycle whose full listing timed out (m3 cut off): {held['duration_ms']} ms")
    watch.wait_log("got no answer within 5 s (--incus-timeout)")
    assert f"{cut}.localhost" in watch.routes()  # its route is kept

    started = time.monotonic()
    cluster.set_host(healthy, f"cut-{healthy}.localhost")
    assert serves(caddy, healthy, f"cut-{healthy}.localhost", timeout=30)
    applied = time.monotonic() - started
    print(f"a change on m2 applied {applied:.1f} s after it was made, m3 cut off")
    print("\n".join(f"{c['triggers']} {c['duration_ms']} ms" for c in watch.cycles()[seen:]))
    assert applied < 5  # not after the listing Incus holds (20 s), nor its 5 s timeout

    once = time.monotonic()
    result = run_cli("render", "--incus", cluster.socket(1), *caddy.render_args)
    took = time.monotonic() - once
    print(f"render with m3 cut off: exit {result.returncode} in {took:.1f} s")
    assert took < 15 and result.returncode in (0, 4), result.stderr
    if result.returncode == 4:  # the listing itself was held: named, and nothing written
        assert "got no answer within 5 s (--incus-timeout)" in result.stderr
    cycles = [c["duration_ms"] for c in watch.cycles()[seen:]]
    print(f"watch cycles while cut off: {len(cycles)}, longest {max(cycles)} ms")

    cluster.member("mend", 3)
    back = time.monotonic()
    cluster.set_host(cut, f"mended-{cut}.localhost")
    assert serves(caddy, cut, f"mended-{cut}.localhost", timeout=60)
    print(f"a change on m3 applied {time.monotonic() - back:.1f} s after its link came back")
    cluster.set_host(cut, f"{cut}.localhost")
    cluster.set_host(healthy, f"{healthy}.localhost")


def test_a_moved_instance_keeps_one_route_updated(
    cluster: Cluster, caddy: Caddy, start_watch: Callable[..., WatchProcess], tmp_path: Path
) -> None:
    watch = watch_on(start_watch, tmp_path / "Caddyfile", caddy, cluster)
    name = cluster.launch("mv", 2)
    before = cluster.address(name)
    assert serves(caddy, name)
    cluster.incus(1, "stop", name)
    cluster.incus(1, "move", name, "--target", "m1")
    cluster.incus(1, "config", "device", "set", name, "eth0", "network=iccbr1")  # m1's bridge
    cluster.incus(1, "start", name)
    after = cluster.address(name)
    assert after != before and after.startswith("198.18.101.")
    assert serves(caddy, name)
    text = watch.routes()
    assert text.count(f"http://{name}.localhost") == 1 and after in text and before not in text
    assert cluster.listed(name)["location"] == "m1"
    cluster.incus(1, "delete", "-f", name)
