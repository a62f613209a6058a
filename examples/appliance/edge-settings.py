#!/usr/bin/python3
"""edge-settings: the settings file of incus-caddyfile in the edge appliance.

Installed as /usr/libexec/incus-caddyfile-edge/edge-settings and run by
incus-caddyfile-watch.service before `watch` starts and on `systemctl reload`. It merges,
later sources winning key by key:

1. [defaults] of /usr/share/incus-caddyfile-edge/appliance.toml (and [restricted], the HTTPS
   access to the host's Incus, when no host socket is proxied to /var/lib/incus/unix.socket);
2. the operator's file /var/lib/edge/settings.toml (on the state volume: `incus file push`);
3. the operator's config key user.incus-caddyfile.settings (TOML text, on the instance or a
   profile; read through the Incus guest API, /dev/incus/sock);
4. [fixed] of appliance.toml: output, admin socket, sites-dir.
Global options add up instead: the appliance's, then the file's, then the key's.

It writes /run/incus-caddyfile/settings.toml atomically (watch re-reads it when it changes)
and makes the edge's client certificate for a restricted Incus access on first use. Exit 1,
with the reason on stderr (the journal), when a source is not valid TOML: the previous
settings then stay in force.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

APPLIANCE = Path(os.environ.get("EDGE_APPLIANCE", "/usr/share/incus-caddyfile-edge/appliance.toml"))
STATE = Path(os.environ.get("EDGE_STATE", "/var/lib/edge"))
OPERATOR_FILE = STATE / "settings.toml"
KEY = "user.incus-caddyfile.settings"
GUEST_API = os.environ.get("EDGE_GUEST_API", "/dev/incus/sock")
HOST_SOCKET = Path(os.environ.get("EDGE_HOST_SOCKET", "/var/lib/incus/unix.socket"))
OUTPUT = Path(os.environ.get("EDGE_OUTPUT", "/run/incus-caddyfile/settings.toml"))
CERT_DIR = STATE / "incus"


def note(message: str) -> None:
    print(f"edge-settings: {message}", file=sys.stderr)


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=5)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(self.path)


def guest_api(path: str) -> tuple[int, str] | None:
    """GET path from the Incus guest API: (status, body), or None when there is no API."""
    if not os.path.exists(GUEST_API):
        return None
    conn = UnixHTTPConnection(GUEST_API)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    except OSError as exc:
        note(f"cannot read {path} from {GUEST_API}: {exc}")
        return None
    finally:
        conn.close()


def config_key() -> str | None:
    """The key's value (on the instance or one of its profiles); None when it is not set."""
    answer = guest_api(f"/1.0/config/{KEY}")
    if answer is None:
        note(f"no Incus guest API at {GUEST_API} (security.guestapi=false?): {KEY} is not read")
        return None
    status, body = answer
    if status == 404:
        return None
    if status != 200:
        note(f"cannot read {KEY}: HTTP {status} {body[:200]}")
        return None
    return body


def host_socket_proxied() -> bool:
    """Whether a proxy device brings the host's Incus socket to HOST_SOCKET. Incus makes the
    socket shortly after the instance started, so the devices tell, not the file; wait (10 s
    at most) until it is there."""
    answer = guest_api("/1.0/devices")
    if answer is None or answer[0] != 200:
        return HOST_SOCKET.exists()
    devices = json.loads(answer[1])
    if not any(
        d.get("type") == "proxy" and d.get("listen") == f"unix:{HOST_SOCKET}"
        for d in devices.values()
    ):
        return False
    deadline = time.monotonic() + 10
    while not HOST_SOCKET.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if not HOST_SOCKET.exists():
        note(f"a proxy device should make {HOST_SOCKET}, but it is not there")
    return True


def is_volume(path: Path) -> bool:
    """Something is mounted on path (a bind mount of the same file system counts)."""
    with open("/proc/self/mountinfo") as mounts:
        return any(line.split()[4] == str(path) for line in mounts)


def parse(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SystemExit(f"edge-settings: {where} is not valid TOML: {exc}") from None


def as_list(value: Any) -> list[Any]:
    return [value] if isinstance(value, str) else list(value)


def merge(
    appliance: dict[str, Any], sources: list[tuple[str, dict[str, Any]]], socket_proxied: bool
) -> dict[str, Any]:
    fixed = dict(appliance.get("fixed", {}))
    merged: dict[str, Any] = dict(appliance.get("defaults", {}))
    if not socket_proxied:
        merged.update(appliance.get("restricted", {}))
    options = as_list(fixed.pop("global-option", []))
    for where, values in sources:
        for key, value in values.items():
            if key == "global-option":
                options += as_list(value)  # global options add up, in order
            elif key in fixed:
                note(f"{where}: {key} is set by the appliance ({fixed[key]!r}); ignored")
            else:
                merged[key] = value
    merged.update(fixed)
    merged["global-option"] = options
    return merged


BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def toml_key(key: str) -> str:
    return key if BARE_KEY.match(key) else json.dumps(key)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def dump(table: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[str]:
    lines = [
        f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)
    ]
    for key, value in table.items():
        if isinstance(value, dict):
            path = (*prefix, key)
            lines += ["", "[" + ".".join(toml_key(p) for p in path) + "]", *dump(value, path)]
    return lines


def client_certificate() -> None:
    """The edge's own key pair for a restricted Incus access, made once, kept on the volume."""
    cert, key = CERT_DIR / "client.crt", CERT_DIR / "client.key"
    if cert.exists() and key.exists():
        return
    CERT_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    name = f"incus-caddyfile-edge-{socket.gethostname()}"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp384r1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "3650", "-subj", f"/CN={name}"],
        check=True, capture_output=True,
    )  # fmt: skip
    key.chmod(0o600)
    note(f"made {cert} (trust it on the host: incus config trust add-certificate)")


def main() -> int:
    appliance = tomllib.loads(APPLIANCE.read_text())
    sources: list[tuple[str, dict[str, Any]]] = []
    used = []
    if OPERATOR_FILE.exists():
        sources.append((str(OPERATOR_FILE), parse(OPERATOR_FILE.read_text(), str(OPERATOR_FILE))))
        used.append(str(OPERATOR_FILE))
    value = config_key()
    if value is not None:
        sources.append((KEY, parse(value, f"the config key {KEY}")))
        used.append(KEY)
    merged = merge(appliance, sources, host_socket_proxied())
    if not is_volume(STATE):
        note(f"{STATE} is not a volume: certificates and settings there do not survive a rebuild")
    if str(merged.get("incus", "")).startswith("https:") and STATE.is_dir():
        client_certificate()
    text = "# Written by edge-settings from: appliance.toml"
    text += "".join(f", {u}" for u in used) + ". Do not edit: it is overwritten.\n"
    text += "\n".join(dump(merged)) + "\n"
    tomllib.loads(text)  # what watch will read must parse
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    if OUTPUT.exists() and OUTPUT.read_text() == text:
        note(f"{OUTPUT} unchanged (sources: appliance.toml{''.join(', ' + u for u in used)})")
        return 0
    tmp = OUTPUT.with_name(f".{OUTPUT.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o600)
    os.replace(tmp, OUTPUT)
    incus = merged.get("incus", f"{HOST_SOCKET} (the host's socket)")
    note(f"wrote {OUTPUT} from appliance.toml{''.join(', ' + u for u in used)}; Incus: {incus}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
