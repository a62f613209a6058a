"""Caddy inside an Incus instance: the Caddyfile is written, checked and reloaded there
through the Incus API (file push, exec), and real HTTP goes through that Caddy."""

from __future__ import annotations

import http.client
from pathlib import Path

import pytest

from incus_caddyfile.caddy import find_caddy

from ..helpers import skip_or_fail
from .conftest import Lab, incus, labels, run_cli, wait_for

pytestmark = pytest.mark.integration
PORT = 8081  # the image's own httpd has 80 and 8080
CADDY_ENV = "HOME=/tmp XDG_DATA_HOME=/tmp XDG_CONFIG_HOME=/tmp"


def get(address: str, host: str) -> tuple[int, str]:
    try:
        conn = http.client.HTTPConnection(address, PORT, timeout=3)
        conn.request("GET", "/", headers={"Host": host})
        response = conn.getresponse()
        return response.status, response.read().decode()
    except OSError as exc:
        return 0, str(exc)


def test_caddy_inside_an_instance(lab: Lab, tmp_path: Path) -> None:
    exe = find_caddy()
    if exe is None:
        skip_or_fail("no caddy executable to put into the instance")
    project = lab.project()
    tag = project[-4:]
    app, edge = f"app-{tag}", f"edge-{tag}"
    lab.launch(project, app, labels(f"{app}.localhost"))
    lab.launch(project, edge)
    lab.address(project, app)
    edge_ip = lab.address(project, edge)
    incus("file", "push", str(exe), f"{edge}/bin/caddy", "--mode", "0755", "--project", project)
    lab.exec(
        project,
        edge,
        f"mkdir -p /etc/caddy && printf '{{\\n\\thttp_port {PORT}\\n}}\\n' > /etc/caddy/Caddyfile",
    )
    lab.exec(
        project,
        edge,
        f"{CADDY_ENV} busybox setsid caddy run --config /etc/caddy/Caddyfile"
        " --adapter caddyfile > /tmp/caddy.log 2>&1 < /dev/null &",
    )
    assert wait_for(
        lambda: (
            "{"
            in lab.exec(project, edge, "busybox wget -qO- http://localhost:2019/config/ || true")
        ),
        15,
    )
    args = [
        "--caddy-instance",
        f"{project}/{edge}",
        "--scheme",
        "http",
        "--global-option",
        f"http_port {PORT}",
        "--config",
        tmp_path / "only.toml",
    ]
    (tmp_path / "only.toml").write_text(f'[projects]\ninclude = ["{project}"]\n')

    result = run_cli("render", *args)

    assert result.returncode == 0, result.stderr
    assert f"{project}/{edge}:/etc/caddy/Caddyfile: written, Caddy reloaded" in result.stderr
    assert wait_for(lambda: f"hello from {app}" in get(edge_ip, f"{app}.localhost")[1], 10)
    inside = incus("file", "pull", f"{edge}/etc/caddy/Caddyfile", "-", "--project", project)
    assert f"http://{app}.localhost {{" in inside

    again = run_cli("render", *args)
    assert again.returncode == 0 and "Caddyfile: unchanged" in again.stderr

    rejected = run_cli("render", *args, "--global-option", "no_such_option")
    assert rejected.returncode == 5, rejected.stderr
    assert "unrecognized global option: no_such_option" in rejected.stderr
    assert incus("file", "pull", f"{edge}/etc/caddy/Caddyfile", "-", "--project", project) == (
        inside
    )
    assert "tmp" not in lab.exec(project, edge, "ls -a /etc/caddy")
    assert f"hello from {app}" in get(edge_ip, f"{app}.localhost")[1]
