"""Small helpers shared by the tests (not fixtures): the CI switch, test data factories."""

from __future__ import annotations

import os

import pytest

from incus_caddyfile.labels import KEY_ENABLE, KEY_HOST, KEY_PORT
from incus_caddyfile.model import Instance, Nic

IN_CI = os.environ.get("CI", "").lower() == "true"


def skip_or_fail(reason: str) -> None:
    """Locally a missing real component skips; in CI it is a failure, never a silent skip."""
    if IN_CI:
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


def inst(
    name: str,
    host: str | None = "web.example.org",
    port: str | None = "80",
    enable: str | None = "true",
    project: str = "default",
    status: str = "Running",
    address: str = "198.18.0.10",
    created_at: str = "2026-01-01T00:00:00Z",
    **extra: str,
) -> Instance:
    config = {KEY_ENABLE: enable, KEY_HOST: host, KEY_PORT: port, **extra}
    return Instance(
        project=project,
        name=name,
        status=status,
        created_at=created_at,
        config={k: v for k, v in config.items() if v is not None},
        nics=(Nic("eth0", (address,)),),
    )
