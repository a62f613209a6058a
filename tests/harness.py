"""What the integration tests and the benchmarks (bench/) both drive: the lab's names, the
incus client, lab projects and instances, bounded polling, loopback ports, a real Caddy
process, `incus-caddyfile watch` as a process, percentiles.

No pytest here: the bench scripts import this module too. Failures are exceptions (or plain
asserts); deciding between a skip and a failure is the caller's business.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import math
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from incus_caddyfile.caddy import AdminAPI
from incus_caddyfile.labels import KEY_ENABLE, KEY_HOST, KEY_PORT

ROOT = Path(__file__).resolve().parents[1]
NETWORK = os.environ.get("INCUS_CADDYFILE_LAB_NETWORK", "icfbr0")
NETWORK2 = os.environ.get("INCUS_CADDYFILE_LAB_NETWORK2", "icfbr1")  # dual stack
IMAGE = os.environ.get("INCUS_CADDYFILE_LAB_IMAGE", "icf-busybox")
POOL = "default"
INCUS_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 3.0
# How long a test waits for a state that takes Incus work (a watch cycle, a route through
# Caddy) before it gives up. A bound, not an expectation: when the bridges list no leases
# (after an incusd restart, say) every full listing asks each labelled instance for its state,
# and one render takes seconds. Tests wait for the state itself; this only ends a hang.
STATE_TIMEOUT = 120.0


# ---------------------------------------------------------------- small helpers


class HarnessError(RuntimeError):
    """The incus client failed or timed out, or a process did not start."""


def incus(*args: str, check: bool = True, timeout: float = INCUS_TIMEOUT_S) -> str:
    """Run the incus client; its stdout. A timeout, or with `check` a non-zero exit, raises."""
    cmd = ["incus", *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise HarnessError(f"timed out after {timeout:.0f} s: {' '.join(cmd)}") from None
    if check and done.returncode != 0:
        raise HarnessError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    """Poll until predicate() is truthy; bounded in time. Returns the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[Any] | None) -> None:
    """Terminate, and kill when it does not exit within 10 s. None or exited: nothing to do."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def p95(values: Sequence[float]) -> float:
    """Nearest-rank 95th percentile (of 15 samples: the largest; of 20: the 19th smallest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def labels(host: str, port: int | str = 80, enable: str = "true") -> dict[str, str]:
    """The three keys that route an instance: host, upstream port, enable."""
    return {KEY_ENABLE: enable, KEY_HOST: host, KEY_PORT: str(port)}


# ---------------------------------------------------------------- lab projects and instances
# `run` is the incus client to use: this module's `incus`, or a caller's variant of it (the
# benchmarks add `--force-local`).


def create_project(
    name: str,
    *config: str,
    created: list[str] | None = None,
    run: Callable[..., str] = incus,
    network: str = NETWORK,
) -> None:
    """A project without images of its own (it uses the lab image), whose default profile has
    a root disk on the lab pool and eth0 on the lab bridge (or `network`). `config`: more
    `key=value`.
    `created` gets the name as soon as the project exists, so that a caller can remove it
    even when the profile changes fail."""
    run("project", "create", name, "-c", "features.images=false",
        *(arg for item in config for arg in ("-c", item)))  # fmt: skip
    if created is not None:
        created.append(name)
    run("profile", "device", "add", "default", "root", "disk", "path=/", f"pool={POOL}",
        "--project", name)  # fmt: skip
    run("profile", "device", "add", "default", "eth0", "nic", f"network={network}", "name=eth0",
        "--project", name)  # fmt: skip


def launch(
    project: str,
    name: str,
    config: dict[str, str] | None = None,
    profiles: tuple[str, ...] = ("default",),
    start: bool = True,
    network: str | None = None,
    run: Callable[..., str] = incus,
) -> None:
    """An instance of the lab image (created only, with start=False)."""
    args = ["launch" if start else "init", IMAGE, name, "--project", project]
    if network:
        args += ["--network", network]
    for profile in profiles:
        args += ["-p", profile]
    for key, value in (config or {}).items():
        args += ["-c", f"{key}={value}"]
    run(*args)


def remove_project(project: str, run: Callable[..., str] = incus) -> None:
    """The project, its instances and its profiles; what is already gone is no error."""
    listing = run("list", "--project", project, "--format", "json", check=False)
    for inst in json.loads(listing or "[]"):
        run("delete", "--force", inst["name"], "--project", project, check=False)
    profiles = run("profile", "list", "--project", project, "--format", "json", check=False)
    for prof in json.loads(profiles or "[]"):
        if prof["name"] != "default":
            run("profile", "delete", prof["name"], "--project", project, check=False)
    run("project", "delete", project, check=False)


GUEST_READY_C = ROOT / "scripts" / "guest_ready.c"


def build_guest_ready(workdir: Path) -> Path:
    """scripts/guest_ready.c compiled static (for the busybox image): it tells Incus through
    the guest API (/dev/incus/sock) that the instance is Ready."""
    exe = workdir / "guest_ready"
    if not exe.exists():
        subprocess.run(
            ["gcc", "-static", "-Os", "-o", str(exe), str(GUEST_READY_C)],
            capture_output=True, text=True, check=True, timeout=120,
        )  # fmt: skip
    return exe


def set_guest_state(
    project: str, name: str, exe: Path, state: str = "Ready", run: Callable[..., str] = incus
) -> None:
    """Run the guest API call inside the instance (state Ready, or Started to undo it)."""
    run("file", "push", str(exe), f"{name}/guest_ready", "--mode", "0755", "--project", project)
    run("exec", name, "--project", project, "--", "/guest_ready", state)


ICF_SERVER_C = ROOT / "scripts" / "icf_server.c"
ICF_SERVER_PORT = 8081


def build_icf_server(workdir: Path) -> Path:
    """scripts/icf_server.c compiled static: a small HTTP/1.1 (keep-alive, /sleep/MS) and
    websocket echo server with a graceful shutdown, for the busybox lab image."""
    exe = workdir / "icf_server"
    if not exe.exists():
        subprocess.run(
            ["gcc", "-static", "-Os", "-o", str(exe), str(ICF_SERVER_C)],
            capture_output=True, text=True, check=True, timeout=120,
        )  # fmt: skip
    return exe


def install_icf_server(
    project: str,
    name: str,
    exe: Path,
    port: int = ICF_SERVER_PORT,
    run: Callable[..., str] = incus,
) -> None:
    """Push icf_server into a running lab instance and have its init respawn it on `port`
    (inittab, re-read on SIGHUP), so it is back after every restart; returns once the
    instance has it (the port itself is the caller's to wait for)."""
    run("file", "push", str(exe), f"{name}/icf_server", "--mode", "0755", "--project", project)
    line = f"::respawn:/icf_server {port} {name}"
    script = f"grep -qxF '{line}' /etc/inittab || echo '{line}' >> /etc/inittab; kill -HUP 1"
    run("exec", name, "--project", project, "--", "sh", "-c", script)


def status_of(project: str, name: str, run: Callable[..., str] = incus) -> str:
    data = json.loads(run("query", f"/1.0/instances/{name}?project={project}"))
    return str(data["status"])


def projects_named(prefix: str, run: Callable[..., str] = incus) -> list[str]:
    """The projects whose name starts with prefix."""
    data = json.loads(run("project", "list", "--format", "json"))
    return [p["name"] for p in data if p["name"].startswith(prefix)]


# ---------------------------------------------------------------- generated Caddyfiles


def routed(text: str, hostname: str) -> bool:
    """The generated file proxies this host somewhere: a site of its own with a
    reverse_proxy, or an entry in a host group's map (`\t\tHOST DIAL # PROJECT/NAME`)."""
    if re.search(rf"^\t+{re.escape(hostname)} \S+ # ", text, re.MULTILINE):
        return True
    start = text.find(f"\nhttp://{hostname} {{\n")
    if start < 0:
        return False
    end = text.find("\n}\n", start)
    return "reverse_proxy " in text[start : end if end >= 0 else len(text)]


def proxied_routes(text: str) -> int:
    """How many routes the generated file proxies: a host group's map entries count one each."""
    entries = len(re.findall(r"^\t+\S+ \S+ # ", text, re.MULTILINE))
    return text.count("reverse_proxy ") - text.count("reverse_proxy {incus_upstream}") + entries


# ---------------------------------------------------------------- Caddy


class Caddy:
    """A real Caddy process on loopback ports picked here, logging JSON to workdir/caddy.log."""

    def __init__(
        self,
        exe: str | Path,
        workdir: Path,
        unix_admin: bool = False,
        timeout: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self.exe = str(exe)
        self.workdir = workdir
        self.timeout = timeout  # of one request through Caddy
        self.http_port = free_port()
        self.admin_port = free_port()
        self.admin = f"127.0.0.1:{self.admin_port}"
        if unix_admin:
            self.admin = f"unix/{workdir}/admin.sock"
        self.log = workdir / "caddy.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}  # more environment variables for the process

    @property
    def render_args(self) -> list[str]:
        """What render (or watch) needs to produce a config for this Caddy."""
        return [
            "--scheme",
            "http",
            "--caddy-admin",
            self.admin,
            "--global-option",
            f"http_port {self.http_port}",
        ]

    def stub_config(self, path: Path) -> Path:
        """Write a Caddy config with no sites yet, on this Caddy's admin endpoint and port."""
        path.write_text(f"{{\n\tadmin {self.admin}\n\thttp_port {self.http_port}\n}}\n")
        return path

    def start(self, config: Path) -> None:
        xdg = str(self.workdir / "xdg")
        env = {**os.environ, "XDG_CONFIG_HOME": xdg, "XDG_DATA_HOME": xdg, **self.env}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.exe, "run", "--config", str(config), "--adapter", "caddyfile"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        if not wait_for(self.admin_up, 15):
            raise HarnessError(f"Caddy did not start: {self.log.read_text()[-2000:]}")

    def admin_up(self) -> bool:
        return AdminAPI(self.admin, timeout=1).ping()

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def request(self, host: str, path: str = "/") -> tuple[int, dict[str, str], str]:
        """One request through Caddy with this Host header; (0, {}, error) when it fails."""
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=self.timeout)
            conn.request("GET", path, headers={"Host": host})
            response = conn.getresponse()
            body = response.read().decode("utf-8", "replace")
            conn.close()
            return response.status, dict(response.getheaders()), body
        except (OSError, http.client.HTTPException) as exc:
            return 0, {}, str(exc)

    def get(self, host: str, path: str = "/") -> tuple[int, str]:
        status, _, body = self.request(host, path)
        return status, body

    def serves(self, host: str, needle: str, path: str = "/") -> bool:
        """One request answers 200 with needle in the body."""
        status, body = self.get(host, path)
        return status == 200 and needle in body

    def wait_body(
        self, host: str, needle: str, timeout: float = STATE_TIMEOUT, path: str = "/"
    ) -> str:
        """Request (bounded in time) until the body contains needle; returns the last answer."""
        last: list[str] = [""]

        def probe() -> bool:
            status, body = self.get(host, path)
            last[0] = f"{status} {body}"
            return status == 200 and needle in body

        wait_for(probe, timeout, interval=0.2)
        return last[0]

    def load_count(self) -> int:
        """How many times Caddy's admin API received POST /load (from its own log)."""
        text = self.log.read_text(errors="replace")
        return sum(1 for line in text.splitlines() if '"uri":"/load"' in line.replace(" ", ""))

    def admin_requests(self, since: float) -> list[tuple[float, str]]:
        """(wall time, uri) of POST requests Caddy's admin API received since `since`."""
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if '"admin.api"' not in line or '"POST"' not in line:
                continue
            with contextlib.suppress(ValueError, KeyError, TypeError):
                record = json.loads(line)
                if float(record["ts"]) >= since:
                    out.append((float(record["ts"]), str(record["uri"])))
        return out


# ---------------------------------------------------------------- client traffic

# Errors of a request on a reused keep-alive connection before any byte of the answer: the
# server closed the idle connection as the request went out. Browsers send such a GET again
# on a new connection; the browser-like client does too (once).
_EARLY_CLOSE = (
    http.client.RemoteDisconnected,
    ConnectionResetError,
    BrokenPipeError,
    ConnectionAbortedError,
)


@dataclass
class LoadResult:
    """What a Load saw. `failed`: requests without a 200 (with the needle) in the end, after
    the browser-like retry; `raw_errors`: socket errors of first attempts, which a client
    that never retries would have counted as failures."""

    sent: int = 0
    ok: int = 0
    failed: int = 0
    retried: int = 0
    raw_errors: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # the first few failures
    seconds: float = 0.0

    def note_failure(self, what: str) -> None:
        self.failed += 1
        self.statuses[what.split(":")[0]] += 1
        if len(self.examples) < 5:
            self.examples.append(what)

    def summary(self) -> dict[str, Any]:
        return {
            "sent": self.sent, "ok": self.ok, "failed": self.failed, "retried": self.retried,
            "raw_errors": self.raw_errors, "rate": round(self.sent / self.seconds, 1)
            if self.seconds else None, "failures": dict(self.statuses),
            "examples": self.examples,
        }  # fmt: skip


class Load:
    """Steady GET traffic through Caddy to one host: `rate` requests per second over
    `workers` threads, each on its own keep-alive connection (a new one after an error or a
    `Connection: close`). Bounded: it stops at stop() or after `limit` seconds.

    browser=True: a GET that fails on a reused connection before any byte of the answer is
    sent again once on a new connection, as browsers do; anything else that is not a 200
    (with `needle` in the body) is a failure."""

    def __init__(
        self,
        port: int,
        host: str,
        rate: float = 200.0,
        workers: int = 8,
        path: str = "/",
        needle: str = "hello from",
        browser: bool = True,
        limit: float = 300.0,
        timeout: float = 10.0,
    ) -> None:
        self.port, self.host, self.path, self.needle = port, host, path, needle
        self.interval = workers / rate
        self.browser, self.limit, self.timeout = browser, limit, timeout
        self.result = LoadResult()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._work, args=(i,), name=f"load-{i}", daemon=True)
            for i in range(workers)
        ]
        self._started = 0.0

    def __enter__(self) -> Load:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._started = time.monotonic()
        for thread in self._threads:
            thread.start()

    def stop(self) -> LoadResult:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout + 5)
        self.result.seconds = time.monotonic() - self._started
        return self.result

    def snapshot(self) -> LoadResult:
        with self._lock:
            return LoadResult(**{**self.result.__dict__, "statuses": Counter(self.result.statuses),
                                 "examples": list(self.result.examples)})  # fmt: skip

    def _connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)

    def _work(self, index: int) -> None:
        conn, used = self._connection(), 0
        deadline = time.monotonic() + self.limit
        next_at = time.monotonic() + index * self.interval / len(self._threads)
        while not self._stop.is_set() and time.monotonic() < deadline:
            self._stop.wait(max(0.0, next_at - time.monotonic()))
            if self._stop.is_set():
                break
            next_at = max(next_at + self.interval, time.monotonic())
            conn, used = self._one(conn, used)
        conn.close()

    def _one(
        self, conn: http.client.HTTPConnection, used: int
    ) -> tuple[http.client.HTTPConnection, int]:
        """One request (and the browser's retry); the connection to use next."""
        with self._lock:
            self.result.sent += 1
        for attempt in (1, 2):
            try:
                conn.request("GET", self.path, headers={"Host": self.host})
                response = conn.getresponse()
            except _EARLY_CLOSE as exc:
                conn.close()
                conn, reused, used = self._connection(), used > 0, 0
                with self._lock:
                    self.result.raw_errors += 1
                    if self.browser and reused and attempt == 1:
                        self.result.retried += 1
                        continue
                    how = "a retry" if attempt == 2 else "reused" if reused else "a new connection"
                    self.result.note_failure(
                        f"{type(exc).__name__}: {exc} (on {how}, at {time.time():.3f})"
                    )
                return conn, used
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                with self._lock:
                    self.result.raw_errors += 1
                    self.result.note_failure(f"{type(exc).__name__}: {exc}")
                return self._connection(), 0
            try:
                body = response.read().decode("utf-8", "replace")
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                with self._lock:
                    self.result.raw_errors += 1
                    self.result.note_failure(f"{type(exc).__name__} in the body: {exc}")
                return self._connection(), 0
            with self._lock:
                if response.status == 200 and self.needle in body:
                    self.result.ok += 1
                else:
                    self.result.note_failure(f"{response.status}: {body[:80]!r}")
            if response.will_close:
                conn.close()
                return self._connection(), 0
            return conn, used + 1
        return conn, used


# ---------------------------------------------------------------- websocket client


class WebSocketClosed(ConnectionError):
    """The websocket ended (closed by the other side, or the connection broke)."""


class WebSocket:
    """A minimal websocket client (RFC 6455): text messages, masked as a client must; enough
    to hold one long-lived connection through Caddy and see whether it survives."""

    def __init__(self, port: int, host: str, path: str = "/", timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise WebSocketClosed(f"no handshake answer: {head!r}")
            head += chunk
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            self.sock.close()
            raise WebSocketClosed(f"handshake refused: {status.decode(errors='replace')}")
        self.buffer = head.split(b"\r\n\r\n", 1)[1]

    def send(self, text: str) -> None:
        data = text.encode()
        mask = os.urandom(4)
        if len(data) < 126:
            header = struct.pack("!BB", 0x81, 0x80 | len(data))
        else:
            header = struct.pack("!BBH", 0x81, 0x80 | 126, len(data))
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        try:
            self.sock.sendall(header + mask + masked)
        except OSError as exc:
            raise WebSocketClosed(str(exc)) from None

    def _read(self, count: int) -> bytes:
        while len(self.buffer) < count:
            try:
                chunk = self.sock.recv(65536)
            except OSError as exc:
                raise WebSocketClosed(str(exc)) from None
            if not chunk:
                raise WebSocketClosed("the connection was closed")
            self.buffer += chunk
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def receive(self) -> str:
        """The next text message (an echo); WebSocketClosed when the stream ended."""
        while True:
            first, second = self._read(2)
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", self._read(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", self._read(8))
            payload = self._read(length)
            opcode = first & 0x0F
            if opcode == 0x8:
                raise WebSocketClosed("closed by the other side")
            if opcode == 0x1:
                return payload.decode()

    def echo(self, text: str) -> bool:
        """Send a message and read it back: True while the websocket works."""
        try:
            self.send(text)
            return self.receive() == text
        except (WebSocketClosed, TimeoutError):
            return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# ---------------------------------------------------------------- watch


def triggered_by(trigger: str) -> Callable[[dict[str, Any]], bool]:
    """Matches a logged watch cycle with that trigger ("file" matches "file /the/path")."""
    return lambda cycle: any(
        t == trigger or t.startswith(trigger + " ") for t in cycle.get("triggers", [])
    )


@dataclass
class Record:
    """One JSON log record of watch and when it was read (time.monotonic())."""

    received: float
    data: dict[str, Any]


class WatchProcess:
    """`python -m incus_caddyfile watch -o OUTPUT --log-format json ARGS` as a real process,
    its log lines collected by a reader thread."""

    def __init__(self, output: Path | None, *args: str | Path, code: Path = ROOT) -> None:
        """`code`: the source tree whose incus_caddyfile runs (another checkout or an older
        commit, for a baseline). `output` None: the args name the files (`--target`)."""
        self.output = output or Path("/nonexistent")
        self.records: list[Record] = []
        self.raw: list[str] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "incus_caddyfile", "watch",
             *(["-o", str(output)] if output else []), "--log-format", "json", *map(str, args)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=code,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, name="watch-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            now = time.monotonic()
            with self._lock:
                self.raw.append(line)
                with contextlib.suppress(ValueError):  # a traceback would be plain text
                    self.records.append(Record(now, json.loads(line)))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cycle_records(self) -> list[Record]:
        with self._lock:
            return [r for r in self.records if r.data.get("event") == "cycle"]

    def cycles(self) -> list[dict[str, Any]]:
        return [r.data for r in self.cycle_records()]

    def log_text(self, lines: int | None = None) -> str:
        """The log so far, or its last `lines` lines."""
        with self._lock:
            return "".join(self.raw if lines is None else self.raw[-lines:])

    def wait_cycles(self, count: int, timeout: float = STATE_TIMEOUT) -> list[dict[str, Any]]:
        wait_for(lambda: len(self.cycle_records()) >= count, timeout, interval=0.05)
        cycles = self.cycles()
        assert len(cycles) >= count, f"expected {count} cycles, log: {self.log_text()}"
        return cycles

    def wait_cycle(
        self,
        match: Callable[[dict[str, Any]], bool],
        after: int = 0,
        timeout: float = STATE_TIMEOUT,
    ) -> int:
        """Wait for the first logged cycle from index `after` on that matches; its index."""

        def find() -> int | None:
            for index, cycle in enumerate(self.cycles()[after:], start=after):
                if match(cycle):
                    return index
            return None

        found = wait_for(lambda: find() is not None, timeout, interval=0.05)
        assert found, f"no such cycle after #{after}, log: {self.log_text()}"
        index = find()
        assert index is not None
        return index

    def wait_log(self, needle: str, timeout: float = STATE_TIMEOUT) -> None:
        def logged() -> bool:
            with self._lock:
                return any(needle in line for line in self.raw)

        found = wait_for(logged, timeout)
        assert found, f"{needle!r} not logged: {self.log_text()}"

    def routes(self) -> str:
        """The output file as it is now ("" before the first write)."""
        try:
            return self.output.read_text()
        except FileNotFoundError:
            return ""

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self) -> int:
        stop_process(self.proc)
        self._reader.join(timeout=5)
        return int(self.proc.returncode)
