"""The fleet of the scale benchmark (bench/scale.py): `size` labelled instances of the lab
image over a few projects, the first `running` of them started and the rest created only,
on a bridge of the benchmark's own with a subnet big enough for all of them.

Creating 1000 instances takes minutes, so a fleet can be kept (`--keep`) and used again
(`--reuse`); a reused fleet is brought back to its shape first (missing instances created,
the first `running` started, the others stopped), since a churn run moves instances about.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import repo_root  # noqa: F401  (sys.path: the repository root, for tests.harness)
from fleet import (
    BenchError,
    Fleet,
    claim,
    create_project,
    find_kept,
    get,
    incus,
    labels,
    project_instances,
    run_parallel,
)

from tests import harness

INCUS_DIR = Path(os.environ.get("INCUS_DIR", "/var/lib/incus"))


@dataclass(frozen=True)
class ScaleFleet(Fleet):
    """A Fleet whose first `running` members run; only those have routes (`hosts`)."""

    running: int = 0

    def up(self) -> list[tuple[str, str]]:
        return self.members()[: self.running]

    def down(self) -> list[tuple[str, str]]:
        return self.members()[self.running :]

    def hosts(self) -> dict[str, tuple[str, str]]:
        up = Fleet.hosts(self)
        return {h: pn for h, pn in up.items() if pn in set(self.up())}


# ---------------------------------------------------------------- the bridge


def ensure_network(name: str, subnet: str) -> bool:
    """The benchmark's bridge (no NAT, no IPv6); True when it was created here. An existing
    bridge of that name must have that subnet: another one may belong to someone else."""
    found = incus("query", f"/1.0/networks/{name}", check=False)
    if found.strip():
        have = json.loads(found).get("config", {}).get("ipv4.address")
        if have != subnet:
            raise BenchError(f"network {name} exists with ipv4.address={have}, not {subnet}")
        return False
    _check_free(subnet)
    incus("network", "create", name, f"ipv4.address={subnet}", "ipv4.nat=false",
          "ipv6.address=none")  # fmt: skip
    return True


def _check_free(subnet: str) -> None:
    """No other Incus network overlaps the subnet (the lab and the cluster use 198.18.x)."""
    mine = ipaddress.ip_interface(subnet).network
    for net in json.loads(incus("network", "list", "--format", "json")):
        for option in ("ipv4.address", "ipv6.address"):
            with contextlib.suppress(ValueError):
                other = ipaddress.ip_interface((net.get("config") or {}).get(option, "")).network
                if other.version == mine.version and other.overlaps(mine):
                    raise BenchError(f"{subnet} overlaps network {net['name']} ({other})")


def delete_network(name: str, tries: int = 40) -> None:
    """Incus 6.0.4 can fail to delete a bridge while veths come and go on the host ("Failed
    to delete bridge children interfaces ... does not exist"): try again, bounded."""
    for _ in range(tries):
        incus("network", "delete", name, check=False)
        if not incus("query", f"/1.0/networks/{name}", check=False).strip():
            return
        time.sleep(0.5)
    print(f"bench: could not delete network {name}: remove it with incus network delete")


def lease_file(network: str) -> Path:
    """Where Incus' dnsmasq keeps the bridge's leases; the leases API reads this file."""
    return INCUS_DIR / "networks" / network / "dnsmasq.leases"


def empty_leases(network: str) -> None:
    """Empty the bridge's lease table, as after an incusd restart (dnsmasq starts afresh and
    lists only the DHCP exchanges made since). dnsmasq writes the file again, whole, at its
    next lease change: call this right before what must see it empty."""
    lease_file(network).write_text("")


def refill_leases(endpoint: str, fleet: ScaleFleet, network: str) -> None:
    """Undo empty_leases: dnsmasq still holds every lease in memory and writes them all to
    the file at its next lease change, so one member's restart (a DHCP exchange) does."""
    if leases(endpoint, network, fleet.projects) >= fleet.running:
        return
    project, name = fleet.up()[0]
    incus("restart", "--force", name, "--project", project)


def leases(endpoint: str, network: str, projects: tuple[str, ...]) -> int:
    return sum(
        len(get(endpoint, f"networks/{network}/leases", {"project": p}) or []) for p in projects
    )


# ---------------------------------------------------------------- creating and converging


def launch(project: str, name: str, start: bool) -> None:
    harness.launch(project, name, labels(name), start=start, run=incus)


def create(fleet: ScaleFleet, network: str, jobs: int, ours: list[str]) -> None:
    for project in fleet.projects:
        create_project(project, fleet.size, ours, network)
    up = set(fleet.up())
    tasks = [partial(launch, p, n, (p, n) in up) for p, n in fleet.members()]
    failures = run_parallel(jobs, tasks)
    if failures:
        raise BenchError(f"{len(failures)} launches failed, first: {failures[0]}")


def reuse(endpoint: str, prefix: str, projects: int, size: int, running: int) -> ScaleFleet | None:
    kept = find_kept(endpoint, prefix, projects, size)
    if kept is None:
        return None
    claim(kept)
    return ScaleFleet(kept.suffix, kept.projects, kept.size, running)


def converge(endpoint: str, fleet: ScaleFleet, jobs: int) -> int:
    """Bring a reused fleet back to its shape. Returns how many instances it touched."""
    status: dict[tuple[str, str], str] = {}
    for project in fleet.projects:
        for name, state in project_instances(endpoint, project).items():
            status[(project, name)] = state
    up = set(fleet.up())
    tasks = []
    for p, n in fleet.members():
        if (p, n) not in status:
            tasks.append(partial(launch, p, n, (p, n) in up))
        elif (p, n) in up and status[(p, n)] != "Running":
            tasks.append(partial(incus, "start", n, "--project", p))
        elif (p, n) not in up and status[(p, n)] != "Stopped":
            tasks.append(partial(incus, "stop", "--force", n, "--project", p))
    failures = run_parallel(jobs, tasks)
    if failures:
        raise BenchError(f"{len(failures)} of {len(tasks)} fixes failed, first: {failures[0]}")
    return len(tasks)


def wait_up(endpoint: str, fleet: ScaleFleet, network: str, timeout: float) -> float:
    """Until every member that should run runs with an IPv4 address it reports itself and a
    lease on the bridge. Returns the seconds waited."""
    started = time.monotonic()
    expected = set(fleet.up())
    ready: set[tuple[str, str]] = set()
    while True:
        leased = {
            lease.get("address")
            for p in fleet.projects
            for lease in get(endpoint, f"networks/{network}/leases", {"project": p}) or []
        }
        ready = set()
        for p in fleet.projects:
            for raw in get(endpoint, "instances", {"recursion": "2", "project": p}) or []:
                if raw.get("status") != "Running":
                    continue
                eth0 = ((raw.get("state") or {}).get("network") or {}).get("eth0") or {}
                v4 = [a["address"] for a in eth0.get("addresses") or [] if a["family"] == "inet"]
                if v4 and v4[0] in leased:
                    ready.add((p, raw["name"]))
        if expected <= ready:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise BenchError(
                f"only {len(expected & ready)} of {len(expected)} instances addressed and"
                f" leased within {timeout:.0f} s"
            )
        time.sleep(2.0)
