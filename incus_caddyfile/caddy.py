"""The only module that talks to Caddy: check a Caddyfile, load it, ask what runs.

One small interface, `Caddy`, with three implementations: the admin API (`POST /adapt`,
`POST /load` with Content-Type text/caddyfile, over TCP or a unix socket), an operator's
reload command, and a Caddy inside an Incus instance driven by `caddy adapt`/`caddy reload`
through a `Shell` (exec and file push, supplied by the caller). The `caddy` executable is the
checker of last resort when no admin endpoint answers.
"""

from __future__ import annotations

import http.client
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Protocol

from .unixhttp import UnixConnection

DEFAULT_ADMIN = "localhost:2019"
TIMEOUT = 10.0


class CaddyError(Exception):
    """Base for anything Caddy-related that went wrong."""


class CaddyRejected(CaddyError):
    """Caddy looked at the config and refused it; the message is Caddy's reason."""


class CaddyUnreachable(CaddyError):
    """No Caddy answered (admin endpoint down, or no executable to check with)."""


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
            return UnixConnection(path, self.timeout)
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


def _check_with(text: str, admin: str | None, caddy_bin: str | None) -> str:
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


class Caddy(Protocol):
    """A Caddy the tool drives. Each call raises CaddyRejected (Caddy refused the config) or
    CaddyUnreachable / CaddyError (no answer, or some other failure)."""

    @property
    def name(self) -> str: ...

    # True when load() checks too: it adapts the text and applies it atomically, or raises
    # CaddyRejected and keeps the running config (Caddy's admin /load). Then a change needs
    # one adaptation, not a check and a load.
    @property
    def load_checks(self) -> bool: ...

    def check(self, text: str) -> str: ...  # returns who checked it
    def load(self, text: str) -> None: ...  # apply the config just written
    def running(self, text: str) -> bool | None: ...  # None: this Caddy cannot say
    def ping(self) -> str: ...  # what answered; raises CaddyError when nothing does


class AdminCaddy:
    """A Caddy reached through its admin endpoint; `caddy adapt` checks when it is down."""

    def __init__(self, admin: str | None, caddy_bin: str | None = None) -> None:
        self.admin = admin or DEFAULT_ADMIN
        self.caddy_bin = caddy_bin

    @property
    def name(self) -> str:
        return f"Caddy admin endpoint {self.admin}"

    @property
    def load_checks(self) -> bool:
        return True  # POST /load adapts, and keeps the running config when it refuses

    def check(self, text: str) -> str:
        return _check_with(text, self.admin, self.caddy_bin)

    def load(self, text: str) -> None:
        AdminAPI(self.admin).load(text)

    def running(self, text: str) -> bool | None:
        return AdminAPI(self.admin).running(text)

    def ping(self) -> str:
        if not AdminAPI(self.admin).ping():
            raise CaddyUnreachable(f"no Caddy admin endpoint answers at {self.admin}")
        return f"Caddy answers at {self.admin}"


class CommandCaddy(AdminCaddy):
    """A Caddy reloaded by the operator's command (e.g. `systemctl reload caddy`), split with
    shlex and run without a shell; checked like AdminCaddy. It cannot say what it runs."""

    def __init__(self, command: str, admin: str | None = None, caddy_bin: str | None = None):
        super().__init__(admin, caddy_bin)
        self.command = command

    @property
    def name(self) -> str:
        return f"reload command {self.command!r}"

    @property
    def load_checks(self) -> bool:
        return False  # a command cannot tell a refusal from Caddy being away

    def load(self, text: str) -> None:
        try:
            proc = subprocess.run(
                shlex.split(self.command), capture_output=True, text=True, timeout=120,
                check=False,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CaddyUnreachable(f"reload command {self.command!r} failed: {exc}") from None
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            reason = detail[-1] if detail else f"exit status {proc.returncode}"
            raise CaddyError(f"reload command {self.command!r} failed: {reason}")

    def running(self, text: str) -> bool | None:
        """Asked of the admin endpoint when one answers; None when it cannot be known."""
        try:
            return AdminAPI(self.admin).running(text)
        except CaddyError:
            return None

    def ping(self) -> str:
        return f"not used (reload command {self.command!r})"


class Shell(Protocol):
    """Commands and files inside the instance where a Caddy runs: `run` raises
    CaddyUnreachable when the instance cannot be reached, `put` the output's OutputError."""

    @property
    def name(self) -> str: ...

    def run(self, argv: list[str]) -> tuple[int, str]: ...  # exit code, stderr or stdout
    def put(self, path: str, data: bytes) -> None: ...


def temp_path(path: str) -> str:
    """Where a new config is put beside `path` before it is checked and moved over it."""
    directory, _, base = path.rpartition("/")
    return f"{directory}/.{base}.incus-caddyfile.tmp"


class InstanceCaddy:
    """A Caddy inside an Incus instance: the text is checked there with `caddy adapt` (on a
    temp file beside the Caddyfile), and loaded with `caddy reload` of the Caddyfile."""

    def __init__(self, shell: Shell, path: str, caddy_bin: str = "caddy") -> None:
        self.shell, self.path, self.caddy_bin = shell, path, caddy_bin

    @property
    def name(self) -> str:
        return f"Caddy in {self.shell.name}"

    @property
    def load_checks(self) -> bool:
        return False  # `caddy reload` reads the file: it must be written first

    def check(self, text: str) -> str:
        temp = temp_path(self.path)
        self.shell.put(temp, text.encode())
        code, message = self.shell.run(
            [self.caddy_bin, "adapt", "--config", temp, "--adapter", "caddyfile"]
        )
        self.shell.run(["rm", "-f", temp])
        if code == 0:
            return f"caddy adapt in {self.shell.name}"
        if code in (126, 127):
            raise CaddyUnreachable(f"no {self.caddy_bin} in {self.shell.name}")
        raise CaddyRejected(last_error_line(message, temp))

    def load(self, text: str) -> None:
        code, message = self.shell.run(
            [self.caddy_bin, "reload", "--config", self.path, "--adapter", "caddyfile"]
        )
        if code == 0:
            return
        reason = last_error_line(message, "")
        if "connection refused" in message or "no such file" in message.lower():
            raise CaddyUnreachable(f"{self.name}: {reason}")
        raise CaddyRejected(reason)

    def running(self, text: str) -> bool | None:
        return None  # its admin endpoint is inside the instance

    def ping(self) -> str:
        code, message = self.shell.run([self.caddy_bin, "version"])
        if code != 0:
            raise CaddyUnreachable(f"no working {self.caddy_bin} in {self.shell.name}: {message}")
        return f"Caddy {message.split()[0] if message else '?'} in {self.shell.name}"
