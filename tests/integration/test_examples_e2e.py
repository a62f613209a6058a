"""The examples, exercised for real where this machine can: the socket-activated Caddy of
examples/podman (systemd-socket-activate stands in for the quadlet's caddy.socket; there is
no Podman here), and the Incus profile of examples/incus."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from ..helpers import skip_or_fail
from .conftest import LABELS as L
from .conftest import ONLY_TEST_PROJECTS, ROOT, Caddy, Lab, free_port, incus, run_cli, wait_for

pytestmark = pytest.mark.integration
PODMAN = ROOT / "examples" / "podman"


def curl(*args: str) -> str:
    proc = subprocess.run(
        ["curl", "-s", "--max-time", "3", *args], capture_output=True, text=True, check=False
    )
    return proc.stdout


def test_socket_activated_caddy_from_the_podman_example(
    lab: Lab, caddy: Caddy, tmp_path: Path
) -> None:
    if shutil.which("systemd-socket-activate") is None:
        skip_or_fail("systemd-socket-activate is not installed")
    project, name = lab.labelled("sa")
    example = tomllib.loads((PODMAN / "incus-caddyfile.toml").read_text())
    admin = f"unix/{tmp_path}/admin.sock"
    out = tmp_path / "Caddyfile"
    # The example's settings file, with this test's paths (flags beat the file); the local
    # CA of *.localhost certificates must not be installed into this machine's trust store.
    options = [*example["global-option"], "skip_install_trust"]
    settings = tmp_path / "podman.toml"  # the example, limited to the tests' projects
    settings.write_text((PODMAN / "incus-caddyfile.toml").read_text() + ONLY_TEST_PROJECTS)
    args = [
        "--config",
        settings,
        "-o",
        out,
        "--caddy-admin",
        admin,
        "--sites-dir",
        PODMAN / "sites",
        *(a for o in options for a in ("--global-option", o)),
    ]
    first = run_cli("render", *args, "--no-reload")
    assert first.returncode == 0, first.stderr
    http, https = free_port(), free_port()
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    with (tmp_path / "caddy.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                "systemd-socket-activate",
                "-l",
                f"127.0.0.1:{http}",
                "-l",
                f"127.0.0.1:{https}",
                caddy.exe,
                "run",
                "--config",
                str(out),
                "--adapter",
                "caddyfile",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        resolve = f"{name}.localhost:{https}:127.0.0.1"
        url = f"https://{name}.localhost:{https}/"
        assert wait_for(
            lambda: f"hello from {name}" in curl("-k", "--resolve", resolve, url), 15
        ), (tmp_path / "caddy.log").read_text()[-2000:]
        redirect = curl(
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
            "-H",
            f"Host: {name}.localhost",
            f"http://127.0.0.1:{http}/x",
        )
        assert redirect == f"308 https://{name}.localhost/x"

        lab.set(project, name, **{L + "upstream.port": "8080"})  # reload over the admin socket
        second = run_cli("render", *args)
        assert second.returncode == 0, second.stderr
        assert "written, Caddy reloaded" in second.stderr
        assert wait_for(lambda: "port 8080" in curl("-k", "--resolve", resolve, url), 10)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_incus_profile_example_routes_a_launched_appliance(lab: Lab, tmp_path: Path) -> None:
    project = lab.project()
    profile = (ROOT / "examples" / "incus" / "caddy-web.yaml").read_text()
    subprocess.run(
        ["incus", "profile", "create", "caddy-web", "--project", project],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        ["incus", "profile", "edit", "caddy-web", "--project", project],
        input=profile,
        text=True,
        check=True,
        capture_output=True,
    )
    name = f"app-{project[-4:]}"
    # as the README says: an image with no keys of its own, routed by profile + one key
    incus(
        "launch",
        "icf-busybox",
        name,
        "--project",
        project,
        "-p",
        "default",
        "-p",
        "caddy-web",
        "-c",
        f"{L}matchers.host={name}.localhost",
    )
    address = lab.address(project, name)
    result = run_cli("render", "--scheme", "http")
    assert f"http://{name}.localhost {{\n\treverse_proxy {address}:80 {{\n" in result.stdout
