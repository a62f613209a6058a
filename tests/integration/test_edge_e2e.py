"""`watch --listen` against the real lab, a real Caddy and real HTTP: readiness follows Incus
(through a proxy that can be switched off, so the shared incusd is never killed), metrics move
with the fleet and parse with prometheus_client's own parser, /routes is `routes --json`, and
the token guards a non-loopback listener."""

from __future__ import annotations

import base64
import http.client
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from incus_caddyfile.settings import default_incus_socket

from ..harness import NETWORK
from .conftest import (
    SESSION,
    STATE_TIMEOUT,
    Caddy,
    Lab,
    WatchProcess,
    incus,
    labels,
    run_cli,
    triggered_by,
    wait_for,
)
from .switchproxy import SwitchProxy

pytestmark = pytest.mark.integration

StartWatch = Callable[..., WatchProcess]
TOKEN = "edge-test-token-0123456789abcdef"


def listen_url(watch: WatchProcess) -> str:
    """The address the watch logged it listens on (it was given port 0)."""
    watch.wait_log('"event": "listen"')
    [record] = [r.data for r in watch.records if r.data.get("event") == "listen"]
    return str(record["url"])


def get(url: str, path: str, **headers: str) -> tuple[int, str]:
    host, _, port = url.removeprefix("http://").rpartition(":")
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=10)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of the samples of /metrics with that name and those labels (0 when none),
    parsed by prometheus_client's parser."""
    status, text = get(url, "/metrics")
    assert status == 200, text
    return sum(
        float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


@pytest.fixture
def watched(
    lab: Lab, caddy: Caddy, tmp_path: Path, start_watch: StartWatch
) -> tuple[Lab, Caddy, WatchProcess, str, str]:
    caddy.start(caddy.stub_config(tmp_path / "stub.Caddyfile"))
    project = lab.project()
    watch = start_watch(tmp_path / "Caddyfile", *caddy.render_args, "--listen", "127.0.0.1:0")
    url = listen_url(watch)
    watch.wait_cycles(1)
    return lab, caddy, watch, project, url


def test_readyz_follows_incus_through_a_proxy_switched_off_and_on(
    lab: Lab, caddy: Caddy, tmp_path: Path, start_watch: StartWatch
) -> None:
    caddy.start(caddy.stub_config(tmp_path / "stub.Caddyfile"))
    proxy = SwitchProxy(default_incus_socket(), tmp_path / "incus.socket")
    try:
        watch = start_watch(
            tmp_path / "Caddyfile", *caddy.render_args, "--incus", proxy.path,
            "--listen", "127.0.0.1:0",
        )  # fmt: skip
        url = listen_url(watch)
        assert wait_for(lambda: get(url, "/readyz")[0] == 200, STATE_TIMEOUT)
        assert get(url, "/healthz")[0] == 200

        proxy.down()  # Incus is gone for this watch: its event stream ends
        watch.wait_log("keeping the last good Caddyfile")
        status, reason = get(url, "/readyz")
        assert status == 503 and "the Incus event stream is down" in reason, reason
        assert get(url, "/healthz")[0] == 200  # alive all the same
        assert metric(url, "incus_caddyfile_incus_connected") == 0

        proxy.up()
        watch.wait_log("reconnected to Incus")
        assert wait_for(lambda: get(url, "/readyz")[0] == 200, STATE_TIMEOUT), get(url, "/readyz")
        assert metric(url, "incus_caddyfile_incus_reconnects_total") >= 1
        assert metric(url, "incus_caddyfile_incus_connected") == 1
    finally:
        proxy.close()


def test_metrics_move_as_instances_start_and_stop(
    watched: tuple[Lab, Caddy, WatchProcess, str, str],
) -> None:
    """Counters only go up and gauges follow the fleet. The lab is shared: a cycle's `trigger`
    label is whichever event opened it, maybe another session's, so cycles are counted over
    every trigger."""
    lab, caddy, watch, project, url = watched
    reloads = metric(url, "incus_caddyfile_reloads_total")
    applied = metric(url, "incus_caddyfile_cycles_total", outcome="applied")
    name = f"m-{project[-4:]}"
    host = f"{name}.localhost"
    lab.launch(project, name, labels(host))
    assert "hello from" in caddy.wait_body(host, "hello from")

    def routed() -> float:
        return metric(url, "incus_caddyfile_instances", verdict="routed", project=project)

    def skipped() -> float:
        return metric(url, "incus_caddyfile_instances", verdict="skipped", project=project)

    assert wait_for(lambda: routed() == 1, STATE_TIMEOUT)
    assert metric(url, "incus_caddyfile_reloads_total") > reloads
    assert metric(url, "incus_caddyfile_cycles_total", outcome="applied") > applied
    assert metric(url, "incus_caddyfile_event_to_reload_seconds_count") >= 1
    assert metric(url, "incus_caddyfile_cycle_duration_seconds_count") >= 2
    assert get(url, f"/ask?domain={host}")[0] == 200

    before = len(watch.cycles())
    reloads = metric(url, "incus_caddyfile_reloads_total")
    applied = metric(url, "incus_caddyfile_cycles_total", outcome="applied")
    incus("stop", "--force", name, "--project", project)
    watch.wait_cycle(lambda c: host in c.get("removed", []), after=before)
    assert wait_for(lambda: skipped() == 1 and routed() == 0, 10)
    assert metric(url, "incus_caddyfile_reloads_total") > reloads
    assert metric(url, "incus_caddyfile_cycles_total", outcome="applied") > applied
    assert get(url, f"/ask?domain={host}")[0] == 404
    seconds = metric(url, "incus_caddyfile_seconds_since_last_sync")
    assert 0 <= seconds < STATE_TIMEOUT
    assert metric(url, "incus_caddyfile_ready") == 1


def test_routes_endpoint_is_routes_json(watched: tuple[Lab, Caddy, WatchProcess, str, str]) -> None:
    lab, _caddy, watch, project, url = watched
    tag = project[-4:]
    lab.launch(project, f"ok-{tag}", labels(f"ok-{tag}.localhost"))
    lab.launch(project, f"off-{tag}", labels(f"off-{tag}.localhost"), start=False)
    lab.launch(project, f"bad-{tag}", labels(f"bad-{tag}.localhost", port="eighty"))
    watch.wait_cycle(lambda c: f"ok-{tag}.localhost" in c.get("added", []))

    def ours(text: str) -> list[dict[str, Any]]:
        """The rows of this session's projects: both also list every other project's
        instances (not routed: excluded), which a benchmark's churn may change at any time."""
        return [r for r in json.loads(text) if r["project"].startswith(SESSION)]

    def same() -> list[dict[str, Any]] | None:
        """/routes, `routes --json`, /routes again: equal when nobody changed the lab between."""
        before = get(url, "/routes")[1]
        printed = run_cli("routes", "--json")
        assert printed.returncode == 0, printed.stderr
        after = get(url, "/routes")[1]
        if len(json.loads(before)) != len(json.loads(printed.stdout)):
            return None
        return ours(before) if ours(before) == ours(after) == ours(printed.stdout) else None

    # the lab is shared: another session's change between the reads differs honestly; retry
    found = wait_for(same, STATE_TIMEOUT, interval=1.0)
    assert found, "/routes never equalled routes --json"
    rows = {r["instance"]: r for r in found if r["project"] == project}
    assert rows[f"ok-{tag}"]["state"] == "routed"
    assert rows[f"off-{tag}"]["reasons"] == ["not running (Stopped)"]
    assert "not a port number" in rows[f"bad-{tag}"]["reasons"][0]


def _bridge_address() -> str:
    """The host's own address on the lab bridge: not loopback, reachable only from here and
    from the lab's instances."""
    return incus("network", "get", NETWORK, "ipv4.address").strip().split("/")[0]


def test_token_is_enforced_on_a_non_loopback_listener(
    lab: Lab, caddy: Caddy, tmp_path: Path, start_watch: StartWatch
) -> None:
    caddy.start(caddy.stub_config(tmp_path / "stub.Caddyfile"))
    out = tmp_path / "Caddyfile"
    address = _bridge_address()

    refused = run_cli("watch", "-o", out, *caddy.render_args, "--listen", f"{address}:0")
    assert refused.returncode == 2 and "a token is required" in refused.stderr

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    watch = start_watch(
        out, *caddy.render_args, "--listen", f"{address}:0", "--listen-token-file", token_file
    )
    url = listen_url(watch)
    assert url.startswith(f"http://{address}:")
    watch.wait_cycle(triggered_by("start"))
    for path in ("/", "/readyz", "/routes", "/metrics", "/state", "/ask?domain=x.localhost"):
        assert get(url, path)[0] == 401, path
        assert get(url, path, Authorization="Bearer not-the-token-at-all")[0] == 401, path
    assert get(url, "/healthz")[0] == 200
    assert get(url, "/readyz", Authorization=f"Bearer {TOKEN}")[0] == 200
    basic = base64.b64encode(f"ops:{TOKEN}".encode()).decode()
    assert get(url, "/routes", Authorization=f"Basic {basic}")[0] == 200
    assert metric_with_token(url) > 0


def metric_with_token(url: str) -> float:
    status, text = get(url, "/metrics", Authorization=f"Bearer {TOKEN}")
    assert status == 200
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "incus_caddyfile_cycles_total"
    )


def test_no_token_needed_on_loopback(watched: tuple[Lab, Caddy, WatchProcess, str, str]) -> None:
    _lab, _caddy, _watch, _project, url = watched
    for path in ("/", "/readyz", "/routes", "/metrics", "/state"):
        assert get(url, path)[0] == 200, path


def test_routes_and_doctor_from_the_running_watch(
    watched: tuple[Lab, Caddy, WatchProcess, str, str],
) -> None:
    lab, _caddy, watch, project, url = watched
    name = f"f-{project[-4:]}"
    lab.launch(project, name, labels(f"{name}.localhost"))
    watch.wait_cycle(lambda c: f"{name}.localhost" in c.get("added", []))

    table = run_cli("routes", "--from", url)
    assert table.returncode == 0, table.stderr
    [line] = [ln for ln in table.stdout.splitlines() if f" {name} " in ln]
    assert line.split()[:5] == [project, name, "Running", "none", "routed"]
    printed = run_cli("routes", "--from", url, "--json")
    assert printed.returncode == 0 and printed.stderr == ""
    assert json.loads(printed.stdout) == json.loads(get(url, "/routes")[1])

    doctor = run_cli("doctor", "--from", url)
    assert doctor.returncode == 0, doctor.stdout
    assert "ok    incus: the event stream is up" in doctor.stdout
    assert "ok    caddy: runs the current file" in doctor.stdout
    assert "ok    ready: ready: Caddy runs the current file" in doctor.stdout
