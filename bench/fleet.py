"""Shared by the benchmarks: a throwaway fleet of labelled busybox containers in the lab,
the arguments and the results file every benchmark has.

A fleet is `size` running containers of the lab image, spread round-robin over a few Incus
projects named `<prefix><suffix>-p<n>` (the suffix is random, so concurrent runs do not meet),
each labelled to serve `<name>.bench.localhost` on port 80. Everything here works on the local
Incus unix socket only (`incus --force-local`, pylxd on the socket path), and removes only
projects it was given.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import signal
import string
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import pylxd
import repo_root  # noqa: F401  (sys.path: the repository root, for tests.harness)
from pylxd import exceptions as pylxd_exc

from incus_caddyfile import model
from incus_caddyfile.labels import PREFIX
from tests import harness
from tests.harness import NETWORK, HarnessError

KEPT_KEY = "user.icfb.kept"  # set on every project of a fleet kept with --keep
SIZE_KEY = "user.icfb.instances"  # fleet size, so --reuse only picks a fleet of the same size
DOMAIN = "bench.localhost"
DHCP_TIMEOUT_S = 120.0
LISTING = {"recursion": "2", "all-projects": "true"}


class BenchError(Exception):
    """The benchmark cannot go on (setup failed, or a measurement went wrong)."""


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
    def new(cls, prefix: str, projects: int, size: int) -> Fleet:
        alphabet = string.ascii_lowercase + string.digits
        suffix = "".join(secrets.choice(alphabet) for _ in range(6))
        return cls(suffix, project_names(prefix, suffix, projects), size)

    def members(self) -> list[tuple[str, str]]:
        """(project, instance) for every instance, spread round-robin over the projects.
        A larger fleet with the same suffix has the smaller one's members first."""
        count = len(self.projects)
        return [
            (self.projects[i % count], f"b{i % count}-{i:03d}-{self.suffix}")
            for i in range(self.size)
        ]

    def hosts(self) -> dict[str, tuple[str, str]]:
        """Expected bench host -> (project, instance) serving it."""
        return {host(name): (project, name) for project, name in self.members()}


def project_names(prefix: str, suffix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{suffix}-p{p}" for p in range(count))


def host(name: str) -> str:
    return f"{name}.{DOMAIN}"


def labels(name: str) -> dict[str, str]:
    return harness.labels(host(name))


# ---------------------------------------------------------------- talking to Incus


def incus(*args: str, check: bool = True) -> str:
    """Run the incus CLI against the local socket only; a failure raises HarnessError."""
    return harness.incus("--force-local", "-q", *args, check=check)


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


def create_project(name: str, size: int, created: list[str], network: str = NETWORK) -> None:
    """A lab project of a fleet; in `created` from the moment it exists (ours to delete)."""
    harness.create_project(name, f"{SIZE_KEY}={size}", created=created, run=incus, network=network)


def launch(project: str, name: str) -> None:
    harness.launch(project, name, labels(name), run=incus)


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
        except HarnessError as exc:
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
        print(
            "cleanup: LEFT BEHIND (remove by hand with incus delete --force / "
            "incus project delete):",
            file=sys.stderr,
        )
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
    except HarnessError as exc:
        print(f"bench: cannot mark the fleet as kept, deleting it: {exc}", file=sys.stderr)
        return False
    print(
        f"kept: {', '.join(projects)} (use --reuse to run on them again; remove with "
        f"`incus delete --force NAME --project P` and `incus project delete P`)"
    )
    return True


def find_kept(endpoint: str, prefix: str, projects: int, size: int) -> Fleet | None:
    """A fleet left by --keep with the same prefix and shape, or None."""
    pattern = re.compile(re.escape(prefix) + r"([a-z0-9]{6})-p([0-9]+)")
    found: dict[str, set[int]] = {}
    for name, config in existing_projects(endpoint).items():
        match = pattern.fullmatch(name)
        if match and config.get(KEPT_KEY) == "true" and config.get(SIZE_KEY) == str(size):
            found.setdefault(match.group(1), set()).add(int(match.group(2)))
    for suffix, indexes in sorted(found.items()):
        if indexes == set(range(projects)):
            return Fleet(suffix, project_names(prefix, suffix, projects), size)
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
    """Wait until every fleet instance is running with an IPv4 address in its state and a
    DHCP lease (the tool reads the leases, a naive listing the state). Returns seconds waited."""
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
    raise BenchError(
        f"only {len(ready)} of {len(expected)} instances got an IPv4 address within {timeout:.0f} s"
    )


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


def naive_instance(raw: dict[str, Any]) -> model.Instance:
    """A recursion=2 listing entry to model data: addresses from the live state."""
    network = (raw.get("state") or {}).get("network") or {}
    nics = tuple(
        model.Nic(
            ifname, tuple(a["address"] for a in iface.get("addresses") or [] if a.get("address"))
        )
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
        config={k: v for k, v in config.items() if k.startswith(PREFIX)},
        nics=nics,
    )


# ---------------------------------------------------------------- arguments and results


def common_parser(doc: str | None, results: Path) -> argparse.ArgumentParser:
    """The options every benchmark has: fleet size and spread, parallelism, results file."""
    out = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    out.add_argument("--instances", type=int, default=150, help="fleet size")
    out.add_argument("--projects", type=int, default=3, help="projects to spread it over")
    out.add_argument("--jobs", type=int, default=4, help="parallel incus launch/delete")
    out.add_argument("--json", type=Path, default=results, help="where to write the figures")
    return out


def write_json(path: Path, figures: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"figures written to {path}")


# ---------------------------------------------------------------- signals


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise Terminated(f"signal {signum}")


def raise_on_sigterm() -> None:
    """SIGTERM raises Terminated (a BaseException), so `finally` blocks clean up."""
    signal.signal(signal.SIGTERM, _terminate)


@contextmanager
def signals_ignored() -> Iterator[None]:
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_and_clean_up(body: Callable[[], object], clean_up: Callable[[], bool]) -> int:
    """A benchmark's exit code: run body, then clean_up whatever happened (also after an
    error, Ctrl-C or SIGTERM; signals are ignored meanwhile). 0 only when both succeeded."""
    raise_on_sigterm()
    ok = False
    try:
        body()
        ok = True
    except (BenchError, HarnessError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
    except (KeyboardInterrupt, Terminated):
        print("bench: interrupted", file=sys.stderr)
    finally:
        with signals_ignored():
            ok = clean_up() and ok
    return 0 if ok else 1
