"""Atomic output on a real filesystem: compare first, keep mode and owner, bind-mount fallback."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from incus_caddyfile.output import Changed, compare, read_current, unified_diff, write_atomic

from .helpers import skip_or_fail


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_new_file_is_written_with_0644(tmp_path: Path) -> None:
    target = tmp_path / "Caddyfile"
    assert read_current(target) is None
    written = write_atomic(target, b"a {\n}\n")
    assert not written.in_place
    assert target.read_bytes() == b"a {\n}\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert leftovers(tmp_path) == []


def test_replacing_keeps_mode_and_owner_and_changes_inode(tmp_path: Path) -> None:
    target = tmp_path / "Caddyfile"
    target.write_bytes(b"old\n")
    os.chmod(target, 0o640)
    if os.geteuid() == 0:
        os.chown(target, 1234, 5678)
    before = target.stat()
    write_atomic(target, b"new\n")
    after = target.stat()
    assert target.read_bytes() == b"new\n"
    assert stat.S_IMODE(after.st_mode) == 0o640
    assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)
    assert after.st_ino != before.st_ino  # replaced by rename, not rewritten
    assert leftovers(tmp_path) == []


def test_compare_and_diff() -> None:
    assert compare(b"x", b"x") is Changed.NO
    assert compare(None, b"x") is Changed.YES
    diff = unified_diff(Path("C"), b"a\nb\n", b"a\nc\n")
    assert "-b\n+c\n" in diff


@pytest.fixture
def bind_mounted_file(tmp_path: Path) -> Iterator[Path]:
    """A single file bind-mounted over another, as containers do with /etc/caddy/Caddyfile."""
    source = tmp_path / "host-Caddyfile"
    source.write_bytes(b"old\n")
    target_dir = tmp_path / "container"
    target_dir.mkdir()
    target = target_dir / "Caddyfile"
    target.write_bytes(b"")
    proc = subprocess.run(
        ["mount", "--bind", str(source), str(target)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        skip_or_fail(f"cannot bind-mount here: {proc.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=False)


@pytest.mark.root
def test_bind_mounted_file_falls_back_to_in_place_write(
    bind_mounted_file: Path, tmp_path: Path
) -> None:
    written = write_atomic(bind_mounted_file, b"new content\n")
    assert written.in_place
    assert bind_mounted_file.read_bytes() == b"new content\n"
    assert (tmp_path / "host-Caddyfile").read_bytes() == b"new content\n"  # seen on the host
    assert leftovers(bind_mounted_file.parent) == []


def test_stale_temp_files_of_a_killed_writer_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "Caddyfile"
    stale = tmp_path / ".Caddyfile.abc123.tmp"
    fresh = tmp_path / ".Caddyfile.def456.tmp"
    other = tmp_path / ".other.abc.tmp"
    for p in (stale, fresh, other):
        p.write_bytes(b"partial")
    os.utime(stale, (0, 0))
    os.utime(other, (0, 0))
    write_atomic(target, b"new\n")
    assert not stale.exists()
    assert fresh.exists() and other.exists()  # young, or not ours
