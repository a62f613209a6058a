"""Faults: nothing gets written from a broken Incus answer, the old file survives every
write failure, and a writer killed at any point leaves the old or the new file, whole."""

from __future__ import annotations

import contextlib
import functools
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from incus_caddyfile.settings import default_incus_socket

from ..helpers import skip_or_fail
from .conftest import ROOT, STATE_TIMEOUT, Lab, run_cli, wait_for
from .faultproxy import FaultProxy

pytestmark = pytest.mark.integration

OLD = "# the previous, good Caddyfile\n"
NO_CADDY = ["--scheme", "http", "--no-reload", "--caddy-admin", "127.0.0.1:9"]


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def routed(lab: Lab) -> str:
    """One labelled running instance, so that listings, leases and sites are not empty."""
    _project, name = lab.labelled("f")
    return name


def test_incus_socket_with_nobody_listening(tmp_path: Path) -> None:
    dead = tmp_path / "dead.socket"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(dead))
    s.close()  # the file stays, nobody listens: like incusd killed
    out = tmp_path / "Caddyfile"
    out.write_text(OLD)

    result = run_cli("render", "-o", out, "--incus", dead, *NO_CADDY)

    assert result.returncode == 4, result.stderr
    assert "nothing was written" in result.stderr and "Traceback" not in result.stderr
    assert out.read_text() == OLD


@pytest.mark.parametrize(
    ("trigger", "allow"),
    [(b"GET /1.0/instances?", 1500), (b"GET /1.0/networks/", 0)],
    ids=["listing-cut-half-way", "leases-request-dropped"],
)
def test_listing_failing_half_way_writes_nothing(
    routed: str, tmp_path: Path, trigger: bytes, allow: int
) -> None:
    proxy = FaultProxy(default_incus_socket(), tmp_path / "proxy.socket", trigger, allow)
    out = tmp_path / "Caddyfile"
    out.write_text(OLD)
    try:
        result = run_cli("render", "-o", out, "--incus", proxy.path, *NO_CADDY)
    finally:
        proxy.close()

    assert proxy.cuts >= 1  # the fault really happened
    assert result.returncode == 4, result.stderr
    assert "nothing was written" in result.stderr and "Traceback" not in result.stderr
    assert out.read_text() == OLD
    assert temp_files(tmp_path) == []


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "mnt"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        skip_or_fail(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_read_only_output_directory(routed: str, tmpfs: Path) -> None:
    out = tmpfs / "Caddyfile"
    out.write_text(OLD)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)

    result = run_cli("render", "-o", out, *NO_CADDY)

    assert result.returncode == 7, result.stderr
    assert "Read-only file system" in result.stderr and "Traceback" not in result.stderr
    assert out.read_text() == OLD
    assert temp_files(tmpfs) == []


def test_disk_full(routed: str, lab: Lab, tmpfs: Path) -> None:
    project = lab.projects[-1]
    many = " ".join(f"h{i}-{routed}.localhost" for i in range(60))  # a Caddyfile of > 4 KiB
    lab.set(project, routed, **{"user.caddyserver.http.matchers.host": many})
    out = tmpfs / "Caddyfile"
    out.write_text(OLD)
    fd = os.open(tmpfs / "filler", os.O_WRONLY | os.O_CREAT)
    try:  # fill the tmpfs to the last byte
        with contextlib.suppress(OSError):
            while os.write(fd, b"x" * 4096):
                pass
    finally:
        os.close(fd)

    result = run_cli("render", "-o", out, *NO_CADDY)

    assert result.returncode == 7, result.stderr
    assert "No space left on device" in result.stderr and "Traceback" not in result.stderr
    assert out.read_text() == OLD
    assert temp_files(tmpfs) == []


# Times one round of its loop (as long as this disk's fsyncs take), says so, then loops.
WRITER = """
import sys, time
from pathlib import Path
from incus_caddyfile.output import write_atomic
target, a, b = Path(sys.argv[1]), Path(sys.argv[2]).read_bytes(), Path(sys.argv[3]).read_bytes()
started = time.monotonic()
write_atomic(target, b)
write_atomic(target, a)
print("ready", time.monotonic() - started, flush=True)
while True:
    write_atomic(target, b)
    write_atomic(target, a)
"""


def test_sigkill_while_writing_leaves_old_or_new_file(tmp_path: Path) -> None:
    rng = random.Random(1234)
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.write_bytes(b"A" * 400_000 + b"\n")
    b.write_bytes(b"B" * 500_000 + b"\n")
    target = tmp_path / "out" / "Caddyfile"
    target.parent.mkdir()
    target.write_bytes(a.read_bytes())
    kills, seen = 150, set()
    # each kill at its own point of the writer's next two rounds, spread evenly over them
    points = [2 * (i + rng.random()) / kills for i in range(kills)]
    rng.shuffle(points)
    for point in points:
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(target), str(a), str(b)],
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        assert proc.stdout is not None
        word, round_s = proc.stdout.readline().split()
        assert word == b"ready"
        wait_for(lambda: False, point * float(round_s), interval=0.0005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        content = target.read_bytes()
        assert content in (a.read_bytes(), b.read_bytes()), f"torn file: {len(content)} bytes"
        seen.add(content[:1])
    assert seen == {b"A", b"B"}  # the kills really landed at different points


def test_sigkill_during_render_leaves_old_or_new_file(
    routed: str, lab: Lab, tmp_path: Path
) -> None:
    out = tmp_path / "Caddyfile"
    only_ours = tmp_path / "settings.toml"  # other projects may change meanwhile
    only_ours.write_text(f'[projects]\ninclude = ["{lab.projects[-1]}"]\n')
    command = [sys.executable, "-m", "incus_caddyfile", "render", "-o", str(out), *NO_CADDY]
    command += ["--config", str(only_ours)]

    def start(stderr: int = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
        out.write_text(OLD)
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, cwd=ROOT)

    def written_or_exited(proc: subprocess.Popen[bytes]) -> bool:
        return out.read_bytes() != OLD.encode() or proc.poll() is not None

    # One render, unharmed, measured: how long this lab takes to the write (seconds when
    # every instance's address costs a request of its own), and what it writes.
    began = time.monotonic()
    first = start(stderr=subprocess.PIPE)
    wait_for(lambda: written_or_exited(first), STATE_TIMEOUT, interval=0.002)
    to_write = time.monotonic() - began
    _, err = first.communicate(timeout=STATE_TIMEOUT)
    assert first.returncode == 0, err.decode()
    new = out.read_bytes()
    assert new != OLD.encode()

    rng = random.Random(99)
    spread, after_write = 15, 5
    # kills spread evenly over the measured time to the write (the next render may be a
    # little faster: then a late one lands after its write), then kills once the new file
    # is seen, while the process finishes
    points = [(i + rng.random()) / spread * to_write for i in range(spread)]
    points += [STATE_TIMEOUT] * after_write
    outcomes = []
    for point in points:
        proc = start()
        wait_for(functools.partial(written_or_exited, proc), point, interval=0.002)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        content = out.read_bytes()
        assert content in (OLD.encode(), new), f"killed at {point:.3f} s: {content[:200]!r}"
        outcomes.append(content == new)
    # killed both before and after the write
    assert set(outcomes) == {True, False}, f"{outcomes}, {to_write:.3f} s to the write"
