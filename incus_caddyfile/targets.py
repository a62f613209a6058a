"""Where the Caddyfile goes, and the Caddy that runs it: a file on this host, or a file in
an Incus instance whose Caddy is driven through the Incus API (file push, exec).

Both do the same five things for the pipeline: read what is there, have Caddy check a new
text, write it atomically, reload, and say whether Caddy already runs a text.
"""

from __future__ import annotations

import contextlib
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from . import caddy, output
from .incus import IncusClient, IncusError
from .settings import Settings

DEFAULT_INSTANCE_PATH = "/etc/caddy/Caddyfile"


class Target(Protocol):
    @property
    def name(self) -> str: ...

    def read(self) -> bytes | None: ...
    def check(self, text: str) -> str: ...
    def write(self, data: bytes) -> bool: ...
    def reload(self, text: str) -> None: ...
    def running(self, text: str) -> bool | None: ...
    def restore(self, previous: bytes | None) -> None: ...
    def pending(self) -> bool: ...
    def set_pending(self, pending: bool) -> None: ...


@dataclass
class LocalFile:
    """A file on this host; Caddy through its admin API or the operator's reload command."""

    path: Path
    settings: Settings

    @property
    def name(self) -> str:
        return str(self.path)

    def read(self) -> bytes | None:
        return output.read_current(self.path)

    def check(self, text: str) -> str:
        return caddy.check(text, self.settings.caddy_admin, self.settings.caddy_bin)

    def write(self, data: bytes) -> bool:
        return output.write_atomic(self.path, data).in_place

    def reload(self, text: str) -> None:
        if self.settings.reload_command:
            caddy.run_reload_command(self.settings.reload_command)
        else:
            caddy.AdminAPI(self.settings.caddy_admin).load(text)

    def running(self, text: str) -> bool | None:
        if self.settings.reload_command:
            return None  # a reload command gives no way to ask
        return caddy.AdminAPI(self.settings.caddy_admin).running(text)

    def restore(self, previous: bytes | None) -> None:
        if previous is None:
            self.path.unlink(missing_ok=True)
        else:
            output.write_atomic(self.path, previous)

    @property
    def _marker(self) -> Path:
        return self.path.parent / f".{self.path.name}.reload-pending"

    def pending(self) -> bool:
        """A reload failed after this file was written (and the next run must retry it)."""
        return self._marker.exists()

    def set_pending(self, pending: bool) -> None:
        with contextlib.suppress(OSError):  # best effort: the exit code said it already
            if pending:
                self._marker.touch()
            else:
                self._marker.unlink(missing_ok=True)


@dataclass
class InstanceFile:
    """The Caddyfile of a Caddy that runs inside an Incus instance (`--caddy-instance`).

    The new text is pushed next to the target and checked there with `caddy adapt`, then
    moved over the target (a rename inside the instance: atomic), then Caddy is reloaded
    with `caddy reload`, all through the Incus API.
    """

    settings: Settings
    project: str
    instance: str
    path: str
    caddy_bin: str = "caddy"
    _client: IncusClient | None = None

    @property
    def client(self) -> IncusClient:
        if self._client is None:
            from .pipeline import connect

            try:
                self._client = connect(self.settings)
            except IncusError as exc:
                raise output.OutputError(str(exc)) from None
        return self._client

    @property
    def name(self) -> str:
        return f"{self.project}/{self.instance}:{self.path}"

    @property
    def _temp(self) -> str:
        directory, _, base = self.path.rpartition("/")
        return f"{directory}/.{base}.incus-caddyfile.tmp"

    def _run(self, *argv: str) -> tuple[int, str]:
        try:
            code, out, err = self.client.exec(self.project, self.instance, list(argv))
        except IncusError as exc:
            raise caddy.CaddyUnreachable(f"{self.name}: {exc}") from None
        return code, (err or out).strip()

    def read(self) -> bytes | None:
        try:
            return self.client.read_file(self.project, self.instance, self.path)
        except IncusError as exc:
            raise output.OutputError(f"cannot read {self.name}: {exc}") from None

    def check(self, text: str) -> str:
        self._push(text.encode())
        code, message = self._run(self.caddy_bin, "adapt", "--config", self._temp,
                                  "--adapter", "caddyfile")  # fmt: skip
        if code == 0:
            return f"caddy adapt in {self.project}/{self.instance}"
        self._run("rm", "-f", self._temp)
        if code in (126, 127):
            raise caddy.CaddyUnreachable(f"no {self.caddy_bin} in {self.project}/{self.instance}")
        raise caddy.CaddyRejected(caddy.last_error_line(message, self._temp))

    def _push(self, data: bytes) -> None:
        try:
            self.client.write_file(self.project, self.instance, self._temp, data)
        except IncusError as exc:
            raise output.OutputError(f"cannot write {self.name}: {exc}") from None

    def write(self, data: bytes) -> bool:
        self._push(data)
        script = f"chmod 0644 {shlex.quote(self._temp)} && mv -f {shlex.quote(self._temp)} " + (
            shlex.quote(self.path)
        )
        try:
            code, message = self._run("sh", "-c", script)
        except caddy.CaddyError as exc:
            raise output.OutputError(str(exc)) from None
        if code != 0:
            raise output.OutputError(f"cannot write {self.name}: {message}")
        return False

    def reload(self, text: str) -> None:
        code, message = self._run(self.caddy_bin, "reload", "--config", self.path,
                                  "--adapter", "caddyfile")  # fmt: skip
        if code == 0:
            return
        reason = caddy.last_error_line(message, "")
        if "connection refused" in message or "no such file" in message.lower():
            raise caddy.CaddyUnreachable(f"Caddy in {self.project}/{self.instance}: {reason}")
        raise caddy.CaddyRejected(reason)

    def running(self, text: str) -> bool | None:
        return None  # the admin endpoint is inside the instance

    @property
    def _marker(self) -> str:
        directory, _, base = self.path.rpartition("/")
        return f"{directory}/.{base}.reload-pending"

    def pending(self) -> bool:
        try:
            return self.client.read_file(self.project, self.instance, self._marker) is not None
        except (IncusError, output.OutputError):
            return False

    def set_pending(self, pending: bool) -> None:
        with contextlib.suppress(IncusError, output.OutputError, caddy.CaddyError):
            if pending:
                self.client.write_file(self.project, self.instance, self._marker, b"")
            elif self.pending():
                self._run("rm", "-f", self._marker)

    def restore(self, previous: bytes | None) -> None:
        if previous is None:
            self._run("rm", "-f", self.path)
        else:
            self.write(previous)


def for_settings(settings: Settings) -> Target | None:
    """The target the settings name, or None when the Caddyfile goes to stdout."""
    if settings.caddy_instance:
        project, _, name = settings.caddy_instance.rpartition("/")
        return InstanceFile(
            settings=settings,
            project=project or "default",
            instance=name,
            path=str(settings.output or DEFAULT_INSTANCE_PATH),
            caddy_bin=settings.caddy_bin or "caddy",
        )
    if settings.output is not None:
        return LocalFile(settings.output, settings)
    return None
