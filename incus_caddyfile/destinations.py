"""Where the Caddyfile goes: a file on this host, or a file inside an Incus instance.

Both read what is there, replace it atomically, put back a previous text, and keep a
"reload pending" mark beside the file (a reload that failed after a write must be retried by
the next run, even by a Caddy that cannot say what it runs).
"""

from __future__ import annotations

import contextlib
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from . import output
from .caddy import temp_path
from .output import OutputError


class Destination(Protocol):
    @property
    def name(self) -> str: ...

    def read(self) -> bytes | None: ...  # None: no file yet
    def write(self, data: bytes) -> str | None: ...  # a note for the operator, if any
    def restore(self, previous: bytes | None) -> None: ...
    def pending(self) -> bool: ...
    def set_pending(self, pending: bool) -> None: ...


@dataclass
class LocalFile:
    """A file on this host, replaced by an atomic rename."""

    path: Path

    @property
    def name(self) -> str:
        return str(self.path)

    def read(self) -> bytes | None:
        return output.read_current(self.path)

    def write(self, data: bytes) -> str | None:
        if output.write_atomic(self.path, data).in_place:
            return (
                f"{self.path} could not be replaced by rename (a single-file bind mount?);"
                " it was rewritten in place"
            )
        return None

    def restore(self, previous: bytes | None) -> None:
        if previous is None:  # there was no file: remove the new one (not a link to it)
            Path(os.path.realpath(self.path)).unlink(missing_ok=True)
        else:
            output.write_atomic(self.path, previous)

    @property
    def _marker(self) -> Path:
        return self.path.parent / f".{self.path.name}.reload-pending"

    def pending(self) -> bool:
        return self._marker.exists()

    def set_pending(self, pending: bool) -> None:
        with contextlib.suppress(OSError):  # best effort: the exit code said it already
            if pending:
                self._marker.touch()
            else:
                self._marker.unlink(missing_ok=True)


class InstanceFiles(Protocol):
    """Files and commands inside an instance. Raises OutputError when it cannot be reached."""

    @property
    def name(self) -> str: ...

    def get(self, path: str) -> bytes | None: ...
    def put(self, path: str, data: bytes) -> None: ...
    def sh(self, script: str) -> tuple[int, str]: ...


@dataclass
class InstanceFile:
    """A file inside an Incus instance: pushed beside the target, then moved over it (a
    rename inside the instance: atomic)."""

    files: InstanceFiles
    path: str

    @property
    def name(self) -> str:
        return f"{self.files.name}:{self.path}"

    def read(self) -> bytes | None:
        return self.files.get(self.path)

    def write(self, data: bytes) -> str | None:
        temp = temp_path(self.path)
        self.files.put(temp, data)
        code, message = self.files.sh(
            f"chmod 0644 {shlex.quote(temp)} && mv -f {shlex.quote(temp)} {shlex.quote(self.path)}"
        )
        if code != 0:
            raise OutputError(f"cannot write {self.name}: {message}")
        return None

    def restore(self, previous: bytes | None) -> None:
        if previous is None:
            self.files.sh(f"rm -f {shlex.quote(self.path)}")
        else:
            self.write(previous)

    @property
    def _marker(self) -> str:
        directory, _, base = self.path.rpartition("/")
        return f"{directory}/.{base}.reload-pending"

    def pending(self) -> bool:
        try:
            return self.files.get(self._marker) is not None
        except OutputError:
            return False

    def set_pending(self, pending: bool) -> None:
        with contextlib.suppress(OutputError):
            if pending:
                self.files.put(self._marker, b"")
            elif self.pending():
                self.files.sh(f"rm -f {shlex.quote(self._marker)}")
