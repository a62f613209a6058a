"""watch against real incusd and real Caddy: routes follow Incus, and survive what goes wrong."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import (
    LABELS,
    ROOT,
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


def gone(caddy: Caddy, host: str, timeout: float = STATE_TIMEOUT) -> bool:
    """True once Caddy stops proxying the host (bounded)."""
    return bool(wait_for(lambda: "hello" not in caddy.get(host)[1], timeout, interval=0.1))


@pytest.fixture
def running(
    lab: Lab, caddy: Caddy, tmp_path: Path, start_watch: StartWatch
) -> tuple[Lab, Caddy, WatchProcess, str]:
    caddy.start(caddy.stub_config(tmp_path / "stub.Caddyfile"))
    project = lab.project()
    watch = start_watch(tmp_path / "Caddyfile", *caddy.render_args)
    watch.wait_cycles(1)
    return lab, caddy, watch, project


def launch_routed(running: tuple[Lab, Caddy, WatchProcess, str], tag: str) -> tuple[str, str]:
    """Launch <tag>-<project suffix> in the watched project, labelled for port 80, and wait
    until Caddy routes its host to it. Returns (name, host)."""
    lab, caddy, _watch, project = running
    name = f"{tag}-{project[-4:]}"
    host = f"{name}.localhost"
    lab.launch(project, name, labels(host, 80))
    assert f"hello from {name} port 80" in caddy.wait_body(host, "port 80")
    return name, host


def test_routes_follow_start_change_stop_rename_delete(
    running: tuple[Lab, Caddy, WatchProcess, str],
) -> None:
    lab, caddy, watch, project = running
    name, host = launch_routed(running, "w")

    lab.set(project, name, **{f"{LABELS}upstream.port": "8080"})
    assert "port 8080" in caddy.wait_body(host, "port 8080")

    incus("stop", "--force", name, "--project", project)
    assert gone(caddy, host)

    incus("rename", name, f"{name}-b", "--project", project)
    incus("start", f"{name}-b", "--project", project)
    assert f"hello from {name}-b" in caddy.wait_body(host, f"{name}-b")

    incus("delete", "--force", f"{name}-b", "--project", project)
    assert gone(caddy, host)
    assert host not in watch.output.read_text()


def test_profile_change_adds_and_removes_the_keys(
    running: tuple[Lab, Caddy, WatchProcess, str],
) -> None:
    lab, caddy, watch, project = running
    name = f"p-{project[-4:]}"
    host = f"{name}.localhost"
    incus("profile", "create", "caddy-web", "--project", project)
    lab.launch(project, name, {f"{LABELS}matchers.host": host}, profiles=("default", "caddy-web"))
    lab.address(project, name)
    # the watch has seen it running (not merely not yet): a host key alone routes nothing
    watch.wait_cycle(triggered_by(f"instance-started {project}/{name}"))
    assert "hello" not in caddy.get(host)[1]

    incus(
        "profile",
        "set",
        "caddy-web",
        f"{LABELS}enable=true",
        f"{LABELS}upstream.port=80",
        "--project",
        project,
    )
    assert "hello from" in caddy.wait_body(host, "hello from")

    incus("profile", "unset", "caddy-web", f"{LABELS}enable", "--project", project)
    assert gone(caddy, host)


def test_instance_in_another_project_and_noise(
    running: tuple[Lab, Caddy, WatchProcess, str],
) -> None:
    lab, caddy, watch, _project = running
    other = lab.project()
    name = f"o-{other[-4:]}"
    host = f"{name}.localhost"
    lab.launch(other, name, labels(host))
    # the cycle that added the route is logged (its line comes after Caddy's reload), so
    # the launch's cycles are all behind us
    routed = watch.wait_cycle(lambda c: host in c.get("added", []))
    assert "hello from" in caddy.wait_body(host, "hello from")
    before = routed + 1
    loads = caddy.load_count()

    for _ in range(5):  # noise: exec, file pull, metadata: no cycle, no reload
        incus("exec", name, "--project", other, "--", "sh", "-c", ":")
        incus("file", "pull", f"{name}/etc/inittab", "-", "--project", other)
    unlabelled = f"u-{other[-4:]}"
    incus("launch", "icf-busybox", unlabelled, "--project", other)
    # a snapshot freezes the container for a moment (paused, resumed): the route stays
    incus("snapshot", "create", name, "snap0", "--project", other)
    served = [caddy.get(host)[1] for _ in range(10)]
    incus("snapshot", "delete", name, "snap0", "--project", other)
    # Incus events arrive in order: once the cycle of one last harmless change is logged,
    # so is every cycle the noise before it caused
    lab.set(other, unlabelled, **{"user.icft.marker": "1"})
    watch.wait_cycle(triggered_by(f"instance-updated {other}/{unlabelled}"), after=before)

    cycles = watch.cycles()[before:]
    assert all("instance-exec" not in " ".join(c["triggers"]) for c in cycles)
    assert not any(c["written"] or c["reloaded"] for c in cycles), cycles
    assert caddy.load_count() == loads
    assert all(f"hello from {name}" in body for body in served)


def test_sighup_resyncs_and_sigterm_exits_0(running: tuple[Lab, Caddy, WatchProcess, str]) -> None:
    _lab, _caddy, watch, _project = running
    before = len(watch.cycles())
    watch.signal(signal.SIGHUP)
    watch.wait_cycle(triggered_by("signal"), after=before)  # a full resync takes what it takes
    assert watch.stop() == 0


def test_template_change_rerenders(
    lab: Lab, caddy: Caddy, tmp_path: Path, start_watch: StartWatch
) -> None:
    template = tmp_path / "mine.j2"
    template.write_text((ROOT / "templates" / "Caddyfile.j2").read_text())
    caddy.start(caddy.stub_config(tmp_path / "stub.Caddyfile"))
    out = tmp_path / "Caddyfile"
    watch = start_watch(out, *caddy.render_args, "--template", template)
    start = watch.wait_cycle(triggered_by("start"))  # however long the first listing takes

    template.write_text(template.read_text() + "# operator was here\n")

    watch.wait_cycle(triggered_by("file"), after=start + 1)
    assert "# operator was here" in out.read_text()


def test_incusd_restart_keeps_routes_and_resyncs(
    running: tuple[Lab, Caddy, WatchProcess, str],
) -> None:
    lab, caddy, watch, project = running
    name, host = launch_routed(running, "r")
    good = watch.output.read_bytes()

    # the lab's daemon only: a cluster's member daemons (test_cluster.py) are not the lab's
    subprocess.run(["bash", str(ROOT / "scripts" / "lab.sh"), "kill"], check=True, timeout=30)
    try:
        watch.wait_log("keeping the last good Caddyfile")
        for _ in range(5):  # served from the last good config while Incus is down
            assert "port 80" in caddy.get(host)[1]
        assert watch.output.read_bytes() == good
    finally:
        subprocess.run(["bash", str(ROOT / "scripts" / "lab.sh"), "start"], check=True, timeout=120)
    watch.wait_log("reconnected to Incus")
    lab.set(project, name, **{f"{LABELS}upstream.port": "8080"})
    assert "port 8080" in caddy.wait_body(host, "port 8080")


def test_caddy_down_then_back_gets_the_current_config(
    running: tuple[Lab, Caddy, WatchProcess, str], tmp_path: Path
) -> None:
    lab, caddy, watch, project = running
    name, host = launch_routed(running, "c")

    caddy.stop()
    lab.set(project, name, **{f"{LABELS}upstream.port": "8080"})
    watch.wait_log("Caddy was not reloaded")
    assert ":8080" in watch.output.read_text()  # the file is the latest good render

    caddy.start(caddy.stub_config(tmp_path / "stub2.Caddyfile"))  # started stale
    # made good by the next reload retry, up to 30 s away (the backoff's cap)
    assert "port 8080" in caddy.wait_body(host, "port 8080")


def test_periodic_resync_is_a_safety_net(
    lab: Lab, caddy: Caddy, tmp_path: Path, start_watch: StartWatch
) -> None:
    caddy.start(caddy.stub_config(tmp_path / "stub.Caddyfile"))
    watch = start_watch(tmp_path / "Caddyfile", *caddy.render_args, "--resync-interval", "1")
    # two timer cycles, however long each full listing takes
    first = watch.wait_cycle(triggered_by("timer"))
    second = watch.wait_cycle(triggered_by("timer"), after=first + 1)
    cycles = watch.cycles()[: second + 1]
    assert not any(c["written"] for c in cycles[1:])  # nothing changed: nothing written


def test_settings_file_and_sites_dir_changes(
    lab: Lab,
    caddy: Caddy,
    tmp_path: Path,
    start_watch: StartWatch,
    only_test_projects: Path,
) -> None:
    caddy.start(caddy.stub_config(tmp_path / "stub.Caddyfile"))
    settings = tmp_path / "settings.toml"
    settings.write_text(only_test_projects.read_text())
    sites = tmp_path / "sites"
    sites.mkdir()
    out = tmp_path / "Caddyfile"
    watch = start_watch(out, *caddy.render_args, "--config", settings, "--sites-dir", sites)
    watch.wait_cycles(1)
    loads = caddy.load_count()

    # a new hand-written site: the generated bytes stay the same, Caddy is reloaded anyway
    (sites / "extra.caddy").write_text('http://extra.localhost {\n\trespond "by hand"\n}\n')
    assert "by hand" in caddy.wait_body("extra.localhost", "by hand")
    assert caddy.load_count() > loads

    # the settings file is read again: a new setting shows in the file
    settings.write_text('email = "ops@example.org"\n' + only_test_projects.read_text())
    emailed = wait_for(lambda: "\temail ops@example.org\n" in out.read_text(), STATE_TIMEOUT)
    assert emailed, "".join(watch.raw)
