"""What the appliance tests share: images built by scripts/appliance.sh, throwaway projects
(icfa-*) with the systemd containers in them, a real ACME server (Pebble, Debian's package), an
image server (a real Caddy serving a SimpleStreams tree over HTTPS) and verified HTTPS requests.

Everything listens on 127.0.0.1 (Pebble's API may listen on the lab bridge's own address
instead) or lives in the lab's Incus. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..harness import (
    NETWORK,
    POOL,
    ROOT,
    HarnessError,
    create_project,
    free_port,
    incus,
    remove_project,
    stop_process,
    wait_for,
)
from ..helpers import skip_or_fail

PREFIX = "icfa-"
OWNER_KEY = "user.icfa.owner"  # host:pid of the test run that made the project
APPLIANCE_SH = ROOT / "scripts" / "appliance.sh"
BUILD_TIMEOUT_S = 1800.0  # a cold build downloads Debian and the wheels


def owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def require_root_tools(*tools: str) -> None:
    """The appliance tests build images (debootstrap, chroot): root and the tools of
    scripts/install-deps.sh. Without them: skip, or fail in CI."""
    if os.geteuid() != 0:
        skip_or_fail("building an appliance image needs root")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        skip_or_fail(f"missing {', '.join(missing)} (run scripts/install-deps.sh)")


# ---------------------------------------------------------------- image builds


@dataclass
class Build:
    seconds: float
    cached: bool  # the debootstrap tree came from the cache
    log: str
    out: Path

    @property
    def image_bytes(self) -> int:
        return sum(
            p.stat().st_size for p in (self.out / "incus.tar.xz", self.out / "rootfs.squashfs")
        )


def build_image(kind: str, out: Path, tree: Path | None = None) -> Build:
    """scripts/appliance.sh KIND (build: the edge, podman-lab), into out (and the tree)."""
    env = {
        **os.environ,
        "APPLIANCE_OUT": str(out),
        "APPLIANCE_TREE": str(tree) if tree else "",
        "PYTHON": str(Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin" / "python"),
    }
    if not Path(env["PYTHON"]).exists():
        env["PYTHON"] = "python3"
    start = time.monotonic()
    try:
        done = subprocess.run(
            ["bash", str(APPLIANCE_SH), kind],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise HarnessError(f"appliance.sh {kind} took more than {BUILD_TIMEOUT_S:.0f} s") from None
    seconds = time.monotonic() - start
    log = done.stdout + done.stderr
    if done.returncode != 0:
        raise HarnessError(f"appliance.sh {kind} failed ({done.returncode}):\n{log[-4000:]}")
    return Build(seconds, "from the cache" in log, log, out)


# ---------------------------------------------------------------- projects


def _owner_alive(value: str) -> bool:
    host, _, pid = value.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_icfa_project(name: str) -> None:
    """Instances, profiles, custom volumes, images, then the project; gone is no error."""
    if not name.startswith(PREFIX):
        raise ValueError(f"not a project of these tests: {name}")
    listing = incus("list", "--project", name, "--format", "json", check=False)
    for inst in json.loads(listing or "[]"):
        incus("delete", "--force", inst["name"], "--project", name, check=False)
    profiles = incus("profile", "list", "--project", name, "--format", "json", check=False)
    for profile in json.loads(profiles or "[]"):  # before the volumes they name
        if profile["name"] != "default":
            incus("profile", "delete", profile["name"], "--project", name, check=False)

    def volumes() -> list[str]:
        out = incus(
            "storage", "volume", "list", POOL, "--project", name, "--format", "json", check=False
        )
        return [v["name"] for v in json.loads(out or "[]") if v.get("type") == "custom"]

    def no_volumes() -> bool:  # a volume is busy for a moment after its instance went
        for volume in volumes():
            incus("storage", "volume", "delete", POOL, volume, "--project", name, check=False)
        return not volumes()

    wait_for(no_volumes, 10, interval=0.5)
    # Only a project with images of its own: without, `image list/delete --project` would act
    # on the default project's images (the lab's image among them).
    project = json.loads(incus("query", f"/1.0/projects/{name}", check=False) or "{}")
    if project.get("config", {}).get("features.images") == "true":
        images = incus("image", "list", "--project", name, "--format", "json", check=False)
        for image in json.loads(images or "[]"):
            incus("image", "delete", image["fingerprint"], "--project", name, check=False)
    remove_project(name)


def remove_leftovers() -> None:
    """Projects of an earlier run of these tests on this machine whose process is gone."""
    for project in json.loads(incus("project", "list", "--format", "json")):
        value = project.get("config", {}).get(OWNER_KEY)
        if project["name"].startswith(PREFIX) and value and not _owner_alive(value):
            remove_icfa_project(project["name"])


@dataclass
class Projects:
    """Throwaway projects icfa-<run>-<suffix>, removed by cleanup()."""

    run: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    names: list[str] = field(default_factory=list)

    def name(self, suffix: str) -> str:
        return f"{PREFIX}{self.run}-{suffix}"

    def apps(self, suffix: str) -> str:
        """A project for labelled instances of the lab image (no images of its own)."""
        name = self.name(suffix)
        create_project(name, f"{OWNER_KEY}={owner()}", created=self.names)
        return name

    def systemd(self, suffix: str) -> str:
        """A project for systemd containers: its own images (a remote's image is cached
        here and removed with it), profiles and custom volumes."""
        name = self.name(suffix)
        incus(
            "project",
            "create",
            name,
            "-c",
            "features.images=true",
            "-c",
            "features.profiles=true",
            "-c",
            "features.storage.volumes=true",
            "-c",
            f"{OWNER_KEY}={owner()}",
        )
        self.names.append(name)
        incus(
            "profile",
            "device",
            "add",
            "default",
            "root",
            "disk",
            "path=/",
            f"pool={POOL}",
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

    def cleanup(self) -> None:
        for name in reversed(self.names):
            remove_icfa_project(name)
        left = [p["name"] for p in json.loads(incus("project", "list", "--format", "json"))]
        left = [name for name in self.names if name in left]
        self.names.clear()
        if left:
            raise HarnessError(f"could not remove the projects {left}")


# ---------------------------------------------------------------- systemd containers


def incus_input(text: str, *args: str, timeout: float = 120) -> str:
    """The incus client with text on its standard input (`profile edit`, `file push -`)."""
    cmd = ["incus", *args]
    try:
        done = subprocess.run(
            cmd, input=text, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise HarnessError(f"timed out after {timeout:.0f} s: {' '.join(cmd)}") from None
    if done.returncode != 0:
        raise HarnessError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def execute(project: str, name: str, *argv: str, check: bool = True, timeout: float = 60) -> str:
    return incus("exec", name, "--project", project, "--", *argv, check=check, timeout=timeout)


def wait_systemd(project: str, name: str, timeout: float = 120) -> str:
    """Until systemd in the container has booted (running or degraded). Right after start,
    `incus exec` may fail ("Failed to connect to bus"): retried, bounded."""
    state = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = max(1.0, deadline - time.monotonic())
        with contextlib.suppress(HarnessError):
            state = execute(
                project, name, "systemctl", "is-system-running", "--wait", check=False, timeout=left
            ).strip()
        if state in ("running", "degraded"):
            if state == "degraded":
                failed = execute(project, name, "systemctl", "--failed", "--no-legend", check=False)
                raise AssertionError(f"{project}/{name} booted degraded:\n{failed}")
            return state
        time.sleep(0.2)
    raise AssertionError(
        f"{project}/{name}: systemd did not finish booting in {timeout} s ({state!r})"
    )


def unit(project: str, name: str, service: str) -> dict[str, str]:
    """MainPID, ActiveState, NRestarts of a unit."""
    out = execute(
        project,
        name,
        "systemctl",
        "show",
        "-p",
        "MainPID",
        "-p",
        "ActiveState",
        "-p",
        "NRestarts",
        service,
    )
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal_since(project: str, name: str, service: str, since: float) -> list[tuple[float, str]]:
    """(time.time() of the entry, message) of the unit's log entries since `since`."""
    argv = ["journalctl", "-u", service, "--no-pager", "-o", "json", "--since", f"@{since:.6f}"]
    out = execute(project, name, *argv, check=False)
    entries = []
    for line in out.splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            record = json.loads(line)
            entries.append((int(record["__REALTIME_TIMESTAMP"]) / 1e6, str(record["MESSAGE"])))
    return entries


def journal(project: str, name: str, service: str, lines: int = 200, when: bool = False) -> str:
    """The unit's last log lines (with when: each with its time, to the microsecond)."""
    style = "short-precise" if when else "cat"
    argv = ["journalctl", "-u", service, "--no-pager", "-o", style, "-n", str(lines)]
    return execute(project, name, *argv, check=False)


# ---------------------------------------------------------------- processes


def _start(
    argv: list[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


class Pebble:
    """A real ACME server on loopback: pebble and pebble-challtestsrv from Debian's `pebble`.
    The test DNS answers 127.0.0.1 for every name, and validation connects to http_port
    (HTTP-01) and tls_port (TLS-ALPN-01) there, where the edge's published ports listen."""

    def __init__(
        self, workdir: Path, http_port: int, tls_port: int, address: str = "127.0.0.1"
    ) -> None:
        self.dir = workdir
        self.address = address  # where the ACME API listens (a bridge's address: instances)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.http_port, self.tls_port = http_port, tls_port
        self.acme_port, self.mgmt_port = free_port(), free_port()
        self.dns_port = free_udp_port()
        self.log = self.dir / "pebble.log"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.listener_ca = self.dir / "listener-ca.pem"
        self.root = self.dir / "pebble-root.pem"

    @property
    def directory(self) -> str:
        return f"https://{self.address}:{self.acme_port}/dir"

    def _listener_certificate(self) -> None:
        """The package has no certificate for Pebble's own HTTPS: a small CA and one for
        127.0.0.1 and the listening address."""
        d = self.dir
        ips = dict.fromkeys(["127.0.0.1", self.address])
        openssl(
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            str(d / "listener-ca.key"),
            "-out",
            str(self.listener_ca),
            "-days",
            "2",
            "-subj",
            "/CN=icfa Pebble listener CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        )
        openssl(
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            str(d / "listener.key"),
            "-out",
            str(d / "listener.csr"),
            "-subj",
            "/CN=localhost",
        )
        (d / "listener.ext").write_text(
            f"subjectAltName=DNS:localhost,{','.join(f'IP:{ip}' for ip in ips)}\n"
            "basicConstraints=critical,CA:FALSE\n"
            "extendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n"
        )
        openssl(
            "x509",
            "-req",
            "-in",
            str(d / "listener.csr"),
            "-CA",
            str(self.listener_ca),
            "-CAkey",
            str(d / "listener-ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            str(d / "listener.ext"),
            "-out",
            str(d / "listener.pem"),
        )

    def start(self) -> None:
        self._listener_certificate()
        config = {
            "pebble": {
                "listenAddress": f"{self.address}:{self.acme_port}",
                "managementListenAddress": f"{self.address}:{self.mgmt_port}",
                "certificate": str(self.dir / "listener.pem"),
                "privateKey": str(self.dir / "listener.key"),
                "httpPort": self.http_port,
                "tlsPort": self.tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }
        }
        (self.dir / "pebble.json").write_text(json.dumps(config))
        dns = f"127.0.0.1:{self.dns_port}"
        self.procs.append(
            _start(
                [
                    "pebble-challtestsrv",
                    "-defaultIPv4",
                    "127.0.0.1",
                    "-defaultIPv6",
                    "",
                    "-dns01",
                    dns,
                    "-http01",
                    "",
                    "-https01",
                    "",
                    "-tlsalpn01",
                    "",
                    "-management",
                    f"127.0.0.1:{free_port()}",
                ],
                self.dir / "challtestsrv.log",
            )
        )
        env = {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"}
        self.procs.append(
            _start(
                ["pebble", "-config", str(self.dir / "pebble.json"), "-dnsserver", dns],
                self.log,
                env,
            )
        )
        ctx = ssl.create_default_context(cafile=str(self.listener_ca))

        def fetch_root() -> bool:
            answer = get(self.address, self.mgmt_port, "localhost", ctx, "/roots/0")
            if answer.status == 200:
                self.root.write_text(answer.body)
            return answer.status == 200

        if not wait_for(fetch_root, 15, interval=0.1):
            raise HarnessError(f"Pebble did not start: {self.log.read_text()[-2000:]}")

    def orders(self) -> int:
        """New orders Pebble received so far (from its log)."""
        return self.log.read_text(errors="replace").count("POST /order-plz")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc)
        self.procs.clear()


class ImageServer:
    """A real Caddy serving a directory (the SimpleStreams tree) over HTTPS on 127.0.0.1, with
    a certificate from Caddy's own CA; clients pin that certificate."""

    def __init__(self, caddy: str | Path, tree: Path, workdir: Path) -> None:
        self.caddy, self.tree, self.dir = str(caddy), tree, workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> None:
        config = self.dir / "Caddyfile"
        config.write_text(
            "{\n\tadmin off\n\tskip_install_trust\n\tauto_https disable_redirects\n"
            f"\thttp_port {free_port()}\n\thttps_port {self.port}\n"
            f"\tstorage file_system {self.dir / 'data'}\n}}\n\n"
            f"{self.url} {{\n\ttls internal\n\troot * {self.tree}\n\tfile_server\n}}\n"
        )
        xdg = str(self.dir / "xdg")
        self.proc = _start(
            [self.caddy, "run", "--config", str(config), "--adapter", "caddyfile"],
            self.dir / "caddy.log",
            {"XDG_DATA_HOME": xdg, "XDG_CONFIG_HOME": xdg},
        )
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # only: is it up?
        index = "/streams/v1/index.json"
        up = wait_for(
            lambda: get("127.0.0.1", self.port, "127.0.0.1", ctx, index).status == 200, 15
        )
        if not up:
            raise HarnessError(
                f"image server did not start: {(self.dir / 'caddy.log').read_text()}"
            )

    def certificate(self) -> str:
        """The server's certificate (PEM), as a client pins it."""
        return ssl.get_server_certificate(("127.0.0.1", self.port), timeout=5)

    def stop(self) -> None:
        stop_process(self.proc)


class IncusClient:
    """The incus client with its own configuration directory (INCUS_CONF): remotes added here
    never touch the lab's client configuration."""

    def __init__(self, conf: Path) -> None:
        self.conf = conf
        self.conf.mkdir(parents=True, exist_ok=True)

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 300, input_text: str | None = None
    ) -> str:
        cmd = ["incus", *args]
        env = {**os.environ, "INCUS_CONF": str(self.conf)}
        try:
            done = subprocess.run(
                cmd,
                input=input_text,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                env=env,
            )
        except subprocess.TimeoutExpired:
            raise HarnessError(f"timed out after {timeout:.0f} s: {' '.join(cmd)}") from None
        if check and done.returncode != 0:
            raise HarnessError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def add_simplestreams(self, name: str, server: ImageServer) -> None:
        """`incus remote add NAME URL --protocol simplestreams`, with the server's certificate
        pinned (servercerts/NAME.crt: the client checks it, and hands it to incusd, which
        downloads the image)."""
        self("remote", "add", name, server.url, "--protocol", "simplestreams", "--public")
        certs = self.conf / "servercerts"
        certs.mkdir(exist_ok=True)
        (certs / f"{name}.crt").write_text(server.certificate())


# ---------------------------------------------------------------- requests


@dataclass
class Answer:
    status: int  # 0: no answer (the error is in body)
    body: str
    headers: dict[str, str] = field(default_factory=dict)


def get(
    address: str,
    port: int,
    host: str,
    context: ssl.SSLContext | None,
    path: str = "/",
    source: str | None = None,
    timeout: float = 3.0,
) -> Answer:
    """One GET to address:port with this Host (and SNI, over TLS when context is given), from
    the source address if given."""
    try:
        raw = socket.create_connection(
            (address, port), timeout=timeout, source_address=(source, 0) if source else None
        )
    except OSError as exc:
        return Answer(0, str(exc))
    sock: socket.socket = raw
    try:
        if context is not None:
            sock = context.wrap_socket(raw, server_hostname=host)
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.sock = sock
        conn.request("GET", path, headers={"Host": host})
        response = conn.getresponse()
        body = response.read().decode("utf-8", "replace")
        conn.close()
        return Answer(response.status, body, {k.lower(): v for k, v in response.getheaders()})
    except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
        return Answer(0, str(exc))
    finally:
        sock.close()
        raw.close()


def wait_https(
    port: int, host: str, context: ssl.SSLContext, needle: str, timeout: float, **kwargs: Any
) -> tuple[bool, str, float]:
    """Poll (bounded) until a verified HTTPS GET answers 200 with needle in the body: (served,
    last answer, seconds it took)."""
    start = time.monotonic()
    last = [""]

    def served() -> bool:
        answer = get("127.0.0.1", port, host, context, timeout=1.0, **kwargs)
        last[0] = f"{answer.status} {answer.body[:300]}"
        return answer.status == 200 and needle in answer.body

    ok = bool(wait_for(served, timeout, interval=0.05))
    return ok, last[0], time.monotonic() - start


def verified(cafile: Path) -> ssl.SSLContext:
    """TLS that trusts only cafile (and checks the host name)."""
    return ssl.create_default_context(cafile=str(cafile))


def poll(predicate: Callable[[], Any], timeout: float, message: Callable[[], str]) -> Any:
    value = wait_for(predicate, timeout, interval=0.1)
    assert value, message()
    return value
