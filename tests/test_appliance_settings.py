"""The edge appliance's settings merge (examples/appliance/edge-settings.py), run as the
appliance runs it, against a guest API served on a unix socket here: the result is a
settings file incus-caddyfile accepts, the appliance's own keys cannot be overridden, global
options add up, the config key wins over the file, and a source that is not TOML changes
nothing. No root, no Incus."""

from __future__ import annotations

import http.server
import json
import socketserver
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from incus_caddyfile.settings import Settings, load_file, load_policy

APPLIANCE = Path(__file__).resolve().parents[1] / "examples" / "appliance"
KEY = "user.incus-caddyfile.settings"
HOST_SOCKET_DEVICE = {
    "type": "proxy",
    "bind": "instance",
    "listen": "unix:{socket}",
    "connect": "unix:/var/lib/incus/unix.socket",
}


@dataclass
class GuestApi:
    """What /dev/incus/sock answers: the instance's user.* keys and its devices."""

    path: Path
    config: dict[str, str]
    devices: dict[str, dict[str, str]]


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@pytest.fixture
def guest_api(tmp_path: Path) -> Iterator[GuestApi]:
    api = GuestApi(tmp_path / "guest.sock", {}, {})

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/1.0/devices":
                status, body = 200, json.dumps(api.devices)
            elif self.path.startswith("/1.0/config/") and self.path[12:] in api.config:
                status, body = 200, api.config[self.path[12:]]
            else:
                status, body = 404, "not found"
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def address_string(self) -> str:
            return "guest"

        def log_message(self, *args: object) -> None:
            pass

    server = _Server(str(api.path), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Run:
    returncode: int
    stderr: str
    output: Path

    def settings(self) -> dict[str, object]:
        return tomllib.loads(self.output.read_text())


def run(tmp_path: Path, api: GuestApi, host_socket: bool = True) -> Run:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    sock = tmp_path / "host-incus.sock"
    if host_socket:
        sock.touch()
        api.devices["incus-socket"] = {**HOST_SOCKET_DEVICE, "listen": f"unix:{sock}"}
    output = tmp_path / "run" / "settings.toml"
    env = {
        "EDGE_APPLIANCE": str(APPLIANCE / "appliance.toml"),
        "EDGE_STATE": str(state),
        "EDGE_GUEST_API": str(api.path),
        "EDGE_HOST_SOCKET": str(sock),
        "EDGE_OUTPUT": str(output),
        "PATH": "/usr/bin:/bin",
    }
    done = subprocess.run(
        [sys.executable, str(APPLIANCE / "edge-settings.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return Run(done.returncode, done.stderr, output)


def accepted(path: Path) -> Settings:
    """The merged file as incus-caddyfile reads it: known keys, a valid [projects] table,
    global options that pass its checks."""
    values = load_file(path)
    load_policy(path)
    return Settings(
        email=values.get("email"),
        caddy_admin=values["caddy_admin"],
        global_options=tuple(values["global_options"]),
    )


def test_without_operator_settings_the_appliance_defaults_are_valid(
    tmp_path: Path, guest_api: GuestApi
) -> None:
    result = run(tmp_path, guest_api)
    assert result.returncode == 0, result.stderr
    merged = result.settings()
    assert merged["output"] == "/etc/caddy/Caddyfile"
    assert merged["caddy-admin"] == "unix//run/caddy/admin.sock"
    assert merged["sites-dir"] == "/etc/caddy/sites"
    assert merged["snippets"] == "/etc/caddy/snippets.caddy"
    assert "incus" not in merged  # the proxied host socket, at the tool's default path
    options = accepted(result.output).global_options
    assert options[:3] == ("default_bind fd/4 {", "protocols h1 h2", "}")
    assert "allow 127.0.0.1/32 ::1/128" in options


def test_the_key_wins_over_the_file_and_global_options_add_up(
    tmp_path: Path, guest_api: GuestApi
) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "settings.toml").write_text(
        'email = "file@example.org"\nscheme = "https"\nglobal-option = ["grace_period 3s"]\n'
    )
    guest_api.config[KEY] = (
        'email = "key@example.org"\nglobal-option = "debug"\n'
        '[projects]\ninclude = ["shop", "tenant-*"]\n[projects.shop]\ndomains = ["*.shop.test"]\n'
    )
    result = run(tmp_path, guest_api)
    assert result.returncode == 0, result.stderr
    merged = result.settings()
    assert merged["email"] == "key@example.org"
    assert merged["scheme"] == "https"
    options = accepted(result.output).global_options
    assert options[-2:] == ("grace_period 3s", "debug")
    policy = load_policy(result.output)
    assert policy.include == ("shop", "tenant-*")
    assert policy.domains == (("shop", ("*.shop.test",)),)
    assert "settings.toml, user.incus-caddyfile.settings" in result.output.read_text()


def test_the_appliance_keys_cannot_be_changed(tmp_path: Path, guest_api: GuestApi) -> None:
    guest_api.config[KEY] = 'output = "/tmp/elsewhere"\ncaddy-admin = "localhost:2019"\n'
    result = run(tmp_path, guest_api)
    assert result.returncode == 0, result.stderr
    assert result.settings()["output"] == "/etc/caddy/Caddyfile"
    assert result.settings()["caddy-admin"] == "unix//run/caddy/admin.sock"
    assert f"{KEY}: output is set by the appliance" in result.stderr


def test_without_the_host_socket_it_uses_a_restricted_certificate(
    tmp_path: Path, guest_api: GuestApi
) -> None:
    result = run(tmp_path, guest_api, host_socket=False)
    assert result.returncode == 0, result.stderr
    merged = result.settings()
    assert merged["incus"] == "https://127.0.0.1:8443"
    assert merged["incus-server-cert"] == "/var/lib/edge/incus/server.crt"
    cert = tmp_path / "state" / "incus" / "client.crt"
    assert cert.read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert (tmp_path / "state" / "incus" / "client.key").stat().st_mode & 0o077 == 0
    made = cert.read_text()
    again = run(tmp_path, guest_api, host_socket=False)  # made once, then kept
    assert again.returncode == 0 and cert.read_text() == made
    assert "unchanged" in again.stderr


def test_a_source_that_is_not_toml_changes_nothing(tmp_path: Path, guest_api: GuestApi) -> None:
    assert run(tmp_path, guest_api).returncode == 0
    before = (tmp_path / "run" / "settings.toml").read_text()
    guest_api.config[KEY] = 'email = "unterminated\n'
    result = run(tmp_path, guest_api)
    assert result.returncode == 1
    assert f"the config key {KEY} is not valid TOML" in result.stderr
    assert (tmp_path / "run" / "settings.toml").read_text() == before
