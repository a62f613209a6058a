"""Traffic never breaks because of us: real clients through real Caddy to real instances while
watch reloads Caddy for other instances' changes, drains members that stop, and retries.

The instances run scripts/icf_server.c (pushed into the busybox image): HTTP/1.1 with
keep-alive and a graceful stop, and a websocket echo.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ..harness import NETWORK, Load, WebSocket
from .conftest import (
    ICF_SERVER_PORT,
    LABELS,
    STATE_TIMEOUT,
    Caddy,
    Lab,
    WatchProcess,
    incus,
    labels,
    triggered_by,
    wait_for,
)

pytestmark = pytest.mark.integration

StartWatch = Callable[..., WatchProcess]


def reloaded(caddy: Caddy, watch: WatchProcess, text: str, timeout: float = STATE_TIMEOUT) -> str:
    """Wait until watch wrote another file than `text`, which it does once Caddy's POST
    /load returned (so Caddy runs the new config); the new text."""
    assert wait_for(lambda: watch.output.read_text() != text, timeout, interval=0.02)
    return watch.output.read_text()


def websocket_server(lab: Lab, icf_server: Path, project: str, tag: str) -> str:
    """A running instance labelled for <name>.localhost on icf_server's port; its host."""
    name = f"{tag}-{project[-4:]}"
    lab.launch(project, name, labels(f"{name}.localhost", ICF_SERVER_PORT))
    lab.address(project, name)
    lab.serve(project, name, icf_server)
    return f"{name}.localhost"


def test_a_websocket_survives_reloads_caused_by_other_instances(
    lab: Lab, caddy: Caddy, tmp_path: Path, start_watch: StartWatch, icf_server: Path
) -> None:
    caddy.start(caddy.stub_config(tmp_path / "stub.Caddyfile"))
    project = lab.project()
    host = websocket_server(lab, icf_server, project, "ws")
    others = [f"o{i}-{project[-4:]}" for i in (1, 2)]
    for name in others:
        lab.launch(project, name, labels(f"{name}.localhost"))

    # Caddy's default, for comparison: the websocket is closed at the first reload.
    watch = start_watch(tmp_path / "Caddyfile", *caddy.render_args, "--stream-close-delay", "0")
    assert "icf_server" in caddy.wait_body(host, "icf_server")
    assert "stream_close_delay" not in watch.output.read_text()
    ws = WebSocket(caddy.http_port, host)
    assert ws.echo("before")
    text = watch.output.read_text()
    incus("stop", "--force", others[0], "--project", project)
    reloaded(caddy, watch, text)
    assert not ws.echo("after one reload"), "without stream_close_delay it should be closed"
    ws.close()
    watch.stop()

    # The default: 5 minutes of stream_close_delay in every reverse_proxy.
    watch = start_watch(tmp_path / "Caddyfile", *caddy.render_args)
    assert wait_for(lambda: "stream_close_delay 5m" in watch.output.read_text(), STATE_TIMEOUT)
    ws = WebSocket(caddy.http_port, host)
    assert ws.echo("start")
    first, text = caddy.load_count(), watch.output.read_text()
    running = {others[0]: False, others[1]: True}
    survived = 0
    for i in range(20):  # each start or stop of another instance changes the file: a reload
        name = others[i % 2]
        incus("start" if not running[name] else "stop", *(["--force"] if running[name] else []),
              name, "--project", project)  # fmt: skip
        running[name] = not running[name]
        text = reloaded(caddy, watch, text)
        survived += ws.echo(f"after reload {i + 1}")
    ws.close()
    assert caddy.load_count() - first >= 20
    assert survived == 20, f"the websocket answered after {survived} of 20 reloads"


def pool(lab: Lab, project: str, tag: str, size: int = 3) -> tuple[str, list[str]]:
    """`size` running instances serving one host (busybox httpd, port 80); host and names."""
    host = f"{tag}-{project[-4:]}.localhost"
    names = [f"{tag}{i}-{project[-4:]}" for i in range(1, size + 1)]
    for name in names:
        lab.launch(project, name, labels(host))
    for name in names:
        lab.address(project, name)
    return host, names


def test_a_pool_member_killed_under_load_costs_no_request(
    lab: Lab, caddy: Caddy, tmp_path: Path, start_watch: StartWatch
) -> None:
    caddy.start(caddy.stub_config(tmp_path / "stub.Caddyfile"))
    project = lab.project()
    host, names = pool(lab, project, "k")
    watch = start_watch(tmp_path / "Caddyfile", *caddy.render_args)
    all_served = wait_for(lambda: len({caddy.get(host)[1] for _ in range(30)}) == 3, STATE_TIMEOUT)
    assert all_served, watch.log_text()

    with Load(caddy.http_port, host, rate=100, workers=4) as load:
        time.sleep(1.0)
        incus("stop", "--force", names[0], "--project", project)
        gone = wait_for(lambda: names[0] not in watch.output.read_text(), STATE_TIMEOUT)
        time.sleep(2.0)  # traffic on the two left, with the dead one's passive health
    result = load.result
    assert gone
    assert result.ok > 250 and result.failed == 0, result.summary()


def served_after(caddy: Caddy, host: str, needle: str, timeout: float = 10.0) -> float | None:
    """Seconds until a request through Caddy answers with needle (polled every 10 ms)."""
    started = time.monotonic()
    found = wait_for(lambda: needle in caddy.get(host)[1], timeout, interval=0.01)
    return time.monotonic() - started if found else None


def test_back_to_back_changes_are_applied_without_a_hold(
    lab: Lab, caddy: Caddy, tmp_path: Path, start_watch: StartWatch
) -> None:
    """Two changes in a row (a deploy script's two steps): the second is not held for the
    one before it (a fixed 2 s hold before: measured 1.6 s)."""
    caddy.start(caddy.stub_config(tmp_path / "stub.Caddyfile"))
    project = lab.project()
    names = [f"b{i}-{project[-4:]}" for i in (1, 2)]
    for name in names:
        lab.launch(project, name, labels(f"{name}.localhost"))
        lab.address(project, name)
    watch = start_watch(tmp_path / "Caddyfile", *caddy.render_args)
    for name in names:
        assert "port 80" in caddy.wait_body(f"{name}.localhost", "port 80")
    seconds: list[float | None] = []
    for port in ("8080", "80", "8080", "80", "8080"):
        time.sleep(4.1)  # tokens come back one per 2 s: a full bucket, as after any quiet spell
        for name in names:
            lab.set(project, name, **{f"{LABELS}upstream.port": port})
            seconds.append(served_after(caddy, f"{name}.localhost", f"port {port}"))
    seconds_ok = [s for s in seconds if s is not None]
    assert len(seconds_ok) == len(seconds), (seconds, watch.log_text())
    assert max(seconds_ok) < 1.0, seconds  # the second of each pair too
    assert sorted(seconds_ok)[len(seconds_ok) // 2] < 0.5, seconds


def served_by(caddy: Caddy, host: str, count: int = 40) -> set[str]:
    """Which instances answered `count` requests to host through Caddy."""
    bodies = {caddy.get(host)[1] for _ in range(count)}
    return {b.split()[2] for b in bodies if b.startswith("hello from ")}


def test_a_rolling_restart_under_load_costs_no_request(
    lab: Lab, caddy: Caddy, tmp_path: Path, start_watch: StartWatch, icf_server: Path
) -> None:
    """`incus restart` of each member of a 3-member pool in turn (icf_server: a graceful
    stop, ~2.5 s with busybox's init), under 100 requests/s with keep-alive. Each member
    leaves the pool when its restart begins and rejoins once its port accepts."""
    caddy.start(caddy.stub_config(tmp_path / "stub.Caddyfile"))
    project = lab.project()
    host = f"r-{project[-4:]}.localhost"
    names = [f"r{i}-{project[-4:]}" for i in (1, 2, 3)]
    for name in names:
        lab.launch(project, name, labels(host, ICF_SERVER_PORT))
    for name in names:
        lab.address(project, name)
        lab.serve(project, name, icf_server)
    watch = start_watch(tmp_path / "Caddyfile", *caddy.render_args)
    assert wait_for(lambda: served_by(caddy, host) == set(names), STATE_TIMEOUT)

    with Load(caddy.http_port, host, rate=100, workers=4, needle="icf_server") as load:
        for name in names:
            before = len(watch.cycles())
            incus("restart", name, "--project", project)
            back = watch.wait_cycle(triggered_by(f"warm {project}/{name}"), after=before)
            assert any(
                triggered_by(f"restart-begun {project}/{name}")(c) and c["changed"] == [host]
                for c in watch.cycles()[before:back]
            ), watch.log_text(30)
        time.sleep(0.5)
    result = load.result
    assert result.ok > 500 and result.failed == 0, result.summary()
    assert served_by(caddy, host) == set(names)


def test_a_stop_that_fails_brings_the_member_back(
    lab: Lab, caddy: Caddy, tmp_path: Path, start_watch: StartWatch
) -> None:
    """A stop announced, then failed (the instance ignores its halt signal, the timeout
    runs out): the member is out of its pool while the stop runs and back after."""
    caddy.start(caddy.stub_config(tmp_path / "stub.Caddyfile"))
    project = lab.project()
    host, names = pool(lab, project, "f", size=2)
    incus("stop", "--force", names[0], "--project", project)
    incus("config", "set", names[0], "raw.lxc", "lxc.signal.halt=SIGHUP", "--project", project)
    incus("start", names[0], "--project", project)
    lab.address(project, names[0])
    watch = start_watch(tmp_path / "Caddyfile", *caddy.render_args)
    assert wait_for(lambda: served_by(caddy, host) == set(names), STATE_TIMEOUT)
    address = lab.address(project, names[0])

    with Load(caddy.http_port, host, rate=50, workers=2) as load:
        before = len(watch.cycles())
        stop = incus("stop", names[0], "--timeout", "2", "--project", project, check=False)
        failed = watch.wait_cycle(triggered_by(f"stop-failed {project}/{names[0]}"), before)
        time.sleep(0.5)
    cycles = watch.cycles()[before : failed + 1]
    assert stop == "" and any(triggered_by(f"stop-begun {project}/{names[0]}")(c) for c in cycles)
    assert f"{address}:80" in watch.output.read_text()  # back in its pool
    assert served_by(caddy, host) == set(names)
    assert load.result.failed == 0, load.result.summary()


def test_a_require_ready_start_is_found_in_the_hosts_neighbour_table(
    lab: Lab, caddy: Caddy, tmp_path: Path, start_watch: StartWatch
) -> None:
    """On the bridge's host, a started require_ready instance is routed once its port
    accepts, found through the host's neighbour table: its poll dials the address the table
    resolves to its MAC and asks its live state (150-400 ms on a busy incusd) only from
    0.5 s on. (That the start's own cycle does not ask it either is test_watch_loop's.)"""
    if not (Path("/sys/class/net") / NETWORK).exists():
        pytest.skip(f"the lab bridge {NETWORK} is not on this host")
    caddy.start(caddy.stub_config(tmp_path / "stub.Caddyfile"))
    project = lab.project()
    name = f"rr-{project[-4:]}"
    host = f"{name}.localhost"
    lab.launch(project, name, {**labels(host), f"{LABELS}upstream.require_ready": "true"})
    lab.address(project, name)
    watch = start_watch(tmp_path / "Caddyfile", *caddy.render_args)
    assert "hello from" in caddy.wait_body(host, "hello from")
    incus("stop", "--force", name, "--project", project)
    assert wait_for(lambda: host not in watch.output.read_text(), STATE_TIMEOUT)
    before = len(watch.cycles())
    incus("start", name, "--project", project)
    found = watch.wait_cycle(triggered_by(f"address {project}/{name}"), after=before)
    waited = watch.cycles()[found]["waited"][f"{project}/{name}"]
    assert waited["probes"] >= 1 and (waited["polls"] == 0 or waited["total_ms"] >= 500), waited
    assert "hello from" in caddy.wait_body(host, "hello from")
