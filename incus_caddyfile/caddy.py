"""The only module that talks to Caddy: check a Caddyfile, and reload it.

Through the admin API (`POST /adapt`, `POST /load` with Content-Type text/caddyfile, over TCP
or a unix socket), with the `caddy` executable as the checker of last resort, or with an
operator's reload command.
"""

from __future__ import annotations

import http.client
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_ADMIN = "localhost:2019"
TIMEOUT = 10.0


class CaddyError(Exception):
    """Base for anything Caddy-related that went wrong."""


class CaddyRejected(CaddyError):
    """Caddy looked at the config and refused it; the message is Caddy's reason."""


class CaddyUnreachable(CaddyError):
    """No Caddy answered (admin endpoint down, or no executable to check with)."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body or b"null")
    except ValueError:
        raise CaddyError("the admin endpoint did not answer with JSON") from None
    return data if isinstance(data, dict) else {}


def _caddy_message(body: bytes) -> str:
    try:
        data = json.loads(body)
        if isinstance(data, dict) and "error" in data:
            return str(data["error"])
    except ValueError:
        pass
    return body.decode("utf-8", "replace").strip()


class AdminAPI:
    """Caddy's admin endpoint, given as Caddy writes it: `host:port` or `unix//path`."""

    def __init__(self, address: str | None, timeout: float = TIMEOUT) -> None:
        self.address = address or DEFAULT_ADMIN
        self.timeout = timeout
        if self.address == "off":
            raise CaddyUnreachable("the admin endpoint is off; use --reload-command")

    def _connection(self) -> http.client.HTTPConnection:
        addr = self.address
        if addr.startswith("unix/"):
            path = addr[len("unix/") :].split("|", 1)[0]  # Caddy allows a |mode suffix
            return _UnixConnection(path, self.timeout)
        addr = addr.removeprefix("tcp/")
        host, _, port = addr.rpartition(":")
        host = host.strip("[]") or "localhost"
        return http.client.HTTPConnection(host, int(port), timeout=self.timeout)

    def _request(self, method: str, path: str, text: str | None = None) -> bytes:
        conn = self._connection()
        headers = {"Content-Type": "text/caddyfile"} if text is not None else {}
        try:
            conn.request(
                method, path, body=None if text is None else text.encode(), headers=headers
            )
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise CaddyUnreachable(f"Caddy admin endpoint {self.address}: {exc}") from None
        finally:
            conn.close()
        if response.status == 400:
            raise CaddyRejected(_caddy_message(body))
        if response.status >= 300:
            raise CaddyError(
                f"Caddy admin {path} answered {response.status}: {_caddy_message(body)}"
            )
        return body

    def ping(self) -> bool:
        """True when a Caddy answers on the admin endpoint."""
        try:
            self._request("GET", "/config/")
            return True
        except CaddyError:
            return False

    def adapt(self, text: str) -> dict[str, Any]:
        """Parse and adapt without applying: the JSON config, if Caddy accepts the text."""
        return _json_object(self._request("POST", "/adapt", text)).get("result") or {}

    def running(self, text: str) -> bool:
        """True when Caddy already runs exactly this Caddyfile (compared as adapted JSON)."""
        return self.adapt(text) == _json_object(self._request("GET", "/config/"))

    def load(self, text: str) -> None:
        """Apply the config. Caddy keeps its running config if this one fails."""
        self._request("POST", "/load", text)


def find_caddy(explicit: str | None = None) -> str | None:
    """The caddy executable: the setting, else PATH, else beside this Python (a venv's bin)."""
    if explicit:
        return explicit
    found = shutil.which("caddy")
    if found:
        return found
    sibling = Path(sys.executable).parent / "caddy"
    return str(sibling) if sibling.exists() else None


def adapt_with_binary(text: str, caddy_bin: str | None = None) -> None:
    """`caddy adapt` on the text: parses the Caddyfile without any running Caddy."""
    exe = find_caddy(caddy_bin)
    if exe is None:
        raise CaddyUnreachable("no caddy executable found (set --caddy-bin)")
    with tempfile.TemporaryDirectory(prefix="incus-caddyfile-") as tmp:
        path = Path(tmp) / "Caddyfile"
        path.write_text(text)
        try:
            proc = subprocess.run(
                [exe, "adapt", "--config", str(path), "--adapter", "caddyfile"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CaddyUnreachable(f"cannot run {exe}: {exc}") from None
    if proc.returncode != 0:
        raise CaddyRejected(last_error_line(proc.stderr, tmp))


def last_error_line(stderr: str, tmpdir: str) -> str:
    """Caddy logs (as JSON lines) and then errors; keep the last error, without our temp path."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    message = lines[-1] if lines else "caddy adapt failed"
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("level") == "error":
                message = str(entry.get("error") or entry.get("msg") or message)
                break
        else:
            message = line
            break
    message = message.removeprefix("Error: ")
    return message.replace(tmpdir + os.sep, "") if tmpdir else message


def check(text: str, admin: str | None, caddy_bin: str | None) -> str:
    """Have Caddy check the text before it replaces anything; returns who checked it.

    The admin endpoint is asked first (it is the Caddy that will run the config); when it is
    unreachable the executable is. Raises CaddyRejected, or CaddyUnreachable when neither works.
    """
    try:
        AdminAPI(admin).adapt(text)
        return "admin API"
    except CaddyRejected:
        raise
    except CaddyError:  # unreachable, or something that is not a Caddy admin API answered
        adapt_with_binary(text, caddy_bin)
        return "caddy adapt"


def run_reload_command(command: str) -> None:
    """Run the operator's reload command (e.g. `systemctl reload caddy`)."""
    try:
        proc = subprocess.run(
            shlex.split(command), capture_output=True, text=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CaddyUnreachable(f"reload command {command!r} failed: {exc}") from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        reason = detail[-1] if detail else f"exit status {proc.returncode}"
        raise CaddyError(f"reload command {command!r} failed: {reason}")
