"""Step 4: compare with what is on disk, and write atomically only when the bytes differ.

Atomic means: a temp file in the same directory, fsync, os.replace, fsync of the directory,
mode and owner of the old file kept. A single-file bind mount (Docker/Podman/Incus disk device)
cannot be renamed over (EBUSY, or EXDEV): only then the file is rewritten in place, and the
caller is told so it can say it.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import glob
import os
import tempfile
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

NEW_FILE_MODE = 0o644
STALE_TEMP_AGE = 60.0  # seconds; a temp file this old was left by a killed writer


class Changed(Enum):
    NO = "unchanged"
    YES = "changed"


class OutputError(Exception):
    """The output could not be read or written; the old file is untouched."""


@dataclass(frozen=True)
class Written:
    in_place: bool  # True when a rename was impossible and the file was rewritten in place


def read_current(path: Path) -> bytes | None:
    """The bytes on disk now, or None when there is no file yet."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OutputError(f"cannot read {path}: {exc.strerror}") from None


def compare(current: bytes | None, new: bytes) -> Changed:
    return Changed.NO if current == new else Changed.YES


def unified_diff(path: Path | str, current: bytes | None, new: bytes) -> str:
    old_lines = (current or b"").decode("utf-8", "replace").splitlines(keepends=True)
    new_lines = new.decode("utf-8", "replace").splitlines(keepends=True)
    return "".join(
        difflib.unified_diff(old_lines, new_lines, fromfile=f"{path} (on disk)", tofile=f"{path}")
    )


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_metadata(path: Path, fd: int) -> None:
    """Give the temp file the old file's mode and owner (a new file gets 0644)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        os.fchmod(fd, NEW_FILE_MODE)
        return
    os.fchmod(fd, st.st_mode & 0o7777)
    with contextlib.suppress(PermissionError):  # only root may give a file away
        os.fchown(fd, st.st_uid, st.st_gid)


def _write_in_place(path: Path, data: bytes) -> None:
    with path.open("r+b") as fh:
        fh.write(data)
        fh.truncate()
        fh.flush()
        os.fsync(fh.fileno())


def remove_stale_temps(path: Path, now: float | None = None) -> list[Path]:
    """Delete temp files of ours that a killed writer left next to `path` (old ones only,
    so a concurrent writer's fresh temp file is left alone)."""
    now = time.time() if now is None else now
    removed = []
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            if now - candidate.stat().st_mtime > STALE_TEMP_AGE:
                candidate.unlink()
                removed.append(candidate)
    return removed


def write_atomic(path: Path, data: bytes) -> Written:
    """Replace `path` with `data` so a reader sees the old or the new file, never a mix.
    A symbolic link is kept: the file it points to is replaced, beside itself."""
    path = Path(os.path.realpath(path)) if path.is_symlink() else path
    directory = path.parent if str(path.parent) else Path(".")
    remove_stale_temps(path)
    tmp_name: str | None = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb") as fh:
            _copy_metadata(path, fh.fileno())
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.replace(tmp_name, path)
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.EXDEV):
                raise
            _write_in_place(path, data)
            return Written(in_place=True)
        tmp_name = None
        _fsync_dir(directory)
        return Written(in_place=False)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
