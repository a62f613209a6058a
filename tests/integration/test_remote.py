"""Remote Incus over HTTPS: client certificates, a pinned server certificate, and a
certificate restricted to some projects that sees only those. The lab's own incusd listens
on a loopback port for these tests."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import (
    Lab,
    WatchProcess,
    free_port,
    incus,
    labels,
    run_cli,
    self_signed_cert,
)

pytestmark = pytest.mark.integration
SERVER_CERT = "/var/lib/incus/server.crt"


@dataclass
class Remote:
    url: str
    workdir: Path

    def args(self, who: str, server_cert: str = SERVER_CERT) -> list[str]:
        return [
            "--incus",
            self.url,
            "--incus-cert",
            str(self.workdir / f"{who}.crt"),
            "--incus-key",
            str(self.workdir / f"{who}.key"),
            "--incus-server-cert",
            server_cert,
        ]


def make_cert(workdir: Path, who: str) -> Path:
    return self_signed_cert(workdir / f"{who}.key", workdir / f"{who}.crt", f"icft-{who}")


@pytest.fixture
def remote(lab: Lab, tmp_path: Path) -> Iterator[Remote]:
    port = free_port()
    incus("config", "set", "core.https_address", f"127.0.0.1:{port}")
    try:
        yield Remote(f"https://127.0.0.1:{port}", tmp_path)
    finally:
        for entry in json.loads(incus("config", "trust", "list", "--format", "json")):
            if entry["name"].startswith("icft-"):
                incus("config", "trust", "remove", entry["fingerprint"], check=False)
        incus("config", "unset", "core.https_address", check=False)


def trust(remote: Remote, who: str, *extra: str) -> None:
    cert = make_cert(remote.workdir, who)
    incus(
        "config",
        "trust",
        "add-certificate",
        str(cert),
        "--name",
        f"icft-{who}-{uuid.uuid4().hex[:6]}",
        *extra,
    )


def test_remote_with_full_and_restricted_certificates(lab: Lab, remote: Remote) -> None:
    a, ra = lab.labelled("ra")
    _b, rb = lab.labelled("rb")
    trust(remote, "full")
    trust(remote, "tenant", "--restricted", "--projects", a)

    full = run_cli("render", "--scheme", "http", *remote.args("full"))
    assert full.returncode == 0, full.stderr
    assert f"{ra}.localhost" in full.stdout and f"{rb}.localhost" in full.stdout

    seen = run_cli("routes", "--json", *remote.args("tenant"))
    assert seen.returncode == 0, seen.stderr
    assert {row["project"] for row in json.loads(seen.stdout)} == {a}


def test_remote_refuses_a_wrong_pin_and_an_untrusted_client(lab: Lab, remote: Remote) -> None:
    trust(remote, "full")
    wrong = make_cert(remote.workdir, "other")
    pinned = run_cli("render", *remote.args("full", server_cert=str(wrong)))
    assert pinned.returncode == 4
    assert "the server certificate is not the pinned one" in pinned.stderr
    make_cert(remote.workdir, "stranger")
    stranger = run_cli("render", *remote.args("stranger"))
    assert stranger.returncode == 4
    assert "does not trust this client certificate" in stranger.stderr
    assert "Traceback" not in pinned.stderr + stranger.stderr


def test_watch_over_https_follows_events(lab: Lab, remote: Remote, tmp_path: Path) -> None:
    trust(remote, "full")
    out = tmp_path / "Caddyfile"
    watch = WatchProcess(out, "--no-reload", "--scheme", "http", *remote.args("full"))
    try:
        watch.wait_cycles(1)
        project = lab.project()
        name = f"rw-{project[-4:]}"
        lab.launch(project, name, labels(f"{name}.localhost"))
        # the cycle that added it, after the full resync the new project asks for
        watch.wait_cycle(lambda c: f"{name}.localhost" in c.get("added", []))
        assert f"{name}.localhost" in out.read_text()
    finally:
        assert watch.stop() == 0
