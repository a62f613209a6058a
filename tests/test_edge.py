"""`watch --listen` without root, Incus or Caddy: the watch loop driven with the fake clock, the
fake Incus and the fake Caddy (as in test_watch_loop), its state served by the real listener
on loopback, and the pieces (address, token, snapshot, metrics, page) one by one."""

from __future__ import annotations

import base64
import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from incus_caddyfile.edge import serve
from incus_caddyfile.edge.address import AddressError, parse
from incus_caddyfile.edge.keeper import EdgeState
from incus_caddyfile.edge.listener import EdgeApp, Listener
from incus_caddyfile.edge.page import EXCLUDED
from incus_caddyfile.edge.snapshot import Snapshot, routes_json, rows_from_json
from incus_caddyfile.model import build, explain
from incus_caddyfile.pipeline import Report, Status, collect
from incus_caddyfile.policy import Policy
from incus_caddyfile.watch.triggers import Kind, Trigger

from .helpers import inst
from .test_watch_loop import Loop, ports_answer  # noqa: F401  (the fixture: probes answer)

TOKEN = "s3cret-token-0123456789"


class Observed(Loop):
    """The fake-clock loop with an EdgeState observing it (on the same fake clock)."""

    def __init__(self, **options: float) -> None:
        self.edge = EdgeState(process_metrics=False)
        super().__init__(**options)
        self.edge.clock = self.clock
        self.edge.metrics.snapshot_collector.clock = self.clock
        self.watcher.observer = self.edge
        self.app = EdgeApp(self.edge.board, self.edge.metrics, clock=self.clock)

    def get(self, path: str, **headers: str) -> tuple[int, str]:
        response = self.app.handle("GET", path, headers)
        return response.status, response.body.decode()

    def metric(self, name: str, **labels: str) -> float:
        text = self.edge.metrics.exposition().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        raise KeyError(f"{name} {labels} not in /metrics")


@pytest.fixture
def loop() -> Observed:
    return Observed()


# ---------------------------------------------------------------- readiness


def test_not_ready_before_the_first_sync_then_ready(loop: Observed) -> None:
    status, body = loop.get("/readyz")
    assert status == 503 and "no full sync yet" in body
    assert loop.get("/healthz")[0] == 200
    loop.run_for(0.1)
    assert loop.get("/readyz") == (200, "ready: Caddy runs the current file\n")


def test_not_ready_while_incus_is_down_and_back_after_the_resync(loop: Observed) -> None:
    loop.run_for(0.1)
    stream = loop.incus.last_events
    assert stream is not None
    loop.incus.fail_on = {"events", "list_instances"}
    stream.drop()
    loop.run_for(0.2)
    status, body = loop.get("/readyz")
    assert status == 503 and "the Incus event stream is down" in body
    loop.incus.fail_on = set()
    loop.run_for(1.5)
    assert loop.get("/readyz")[0] == 200
    assert loop.metric("incus_caddyfile_incus_reconnects_total") >= 1
    assert (
        loop.metric("incus_caddyfile_cycles_total", trigger="reconnect", outcome="unchanged") == 1
    )


def test_not_ready_while_a_reload_is_pending(loop: Observed) -> None:
    loop.caddy.load_fails = True
    loop.run_for(0.1)
    status, body = loop.get("/readyz")
    assert status == 503 and "a reload of Caddy is pending" in body
    assert loop.metric("incus_caddyfile_reload_failures_total", reason="unreachable") == 1
    assert loop.metric("incus_caddyfile_reload_pending") == 1
    loop.caddy.load_fails = False
    loop.run_for(1.1)
    assert loop.get("/readyz")[0] == 200


def test_not_ready_after_a_failed_cycle(loop: Observed) -> None:
    loop.run_for(0.1)
    loop.caddy.rejects = "# Generated"
    loop.incus.set_status("icfrec-b", "rec-profiled", "Stopped")
    loop.emit("icfrec-b", "rec-profiled", "instance-stopped")
    loop.run_for(0.3)
    status, body = loop.get("/readyz")
    assert status == 503 and "the last cycle failed" in body and "Caddy rejected" in body
    assert loop.metric("incus_caddyfile_reload_failures_total", reason="rejected") == 1


# ---------------------------------------------------------------- routes, ask, metrics


def test_routes_is_what_routes_json_prints(loop: Observed) -> None:
    loop.run_for(0.1)
    status, body = loop.get("/routes")
    instances = collect(loop.incus)
    assert status == 200
    assert body == routes_json(explain(instances, build(instances)))
    rows = rows_from_json(body)
    assert {r.instance for r in rows if r.state == "routed"} >= {"rec-web", "rec-frozen"}
    assert {r.instance: r.state for r in rows}["rec-alt"] == "not routed"  # a bad path label


def test_ask_answers_routed_hosts_only(loop: Observed) -> None:
    loop.run_for(0.1)
    assert loop.get("/ask?domain=a.example.test")[0] == 200
    assert loop.get("/ask?domain=A.Example.Test.")[0] == 200
    assert loop.get("/ask?domain=stopped.example.test")[0] == 404  # held, not served
    assert loop.get("/ask?domain=nobody.example.test")[0] == 404
    assert loop.get("/ask")[0] == 400
    loop.incus.set_status("icfrec-a", "rec-web", "Stopped")
    loop.emit("icfrec-a", "rec-web", "instance-stopped")
    loop.run_for(0.3)
    assert loop.get("/ask?domain=a.example.test")[0] == 404  # gone with its instance
    assert loop.metric("incus_caddyfile_ask_requests_total", answer="allowed") == 2
    assert loop.metric("incus_caddyfile_ask_requests_total", answer="denied") == 3


def test_ask_is_answered_from_memory_in_well_under_a_millisecond(loop: Observed) -> None:
    loop.run_for(0.1)
    started = time.perf_counter()
    for _ in range(1000):
        loop.app.handle("GET", "/ask?domain=a.example.test", {})
    assert (time.perf_counter() - started) / 1000 < 0.001


def test_ask_allows_names_under_a_routed_wildcard_host() -> None:
    snap = Snapshot(hosts=frozenset({"*.apps.example.org", "web.example.org"}))
    assert snap.asks("shop.apps.example.org") and snap.asks("web.example.org")
    assert not snap.asks("a.b.apps.example.org") and not snap.asks("apps.example.org")
    assert not snap.asks("*.apps.example.org") and not snap.asks("")


def test_metrics_count_cycles_reloads_and_instances(loop: Observed) -> None:
    loop.run_for(0.1)
    assert loop.metric("incus_caddyfile_cycles_total", trigger="start", outcome="applied") == 1
    assert loop.metric("incus_caddyfile_reloads_total") == 1
    assert loop.metric("incus_caddyfile_instances", verdict="routed", project="icfrec-a") == 2
    assert loop.metric("incus_caddyfile_instances", verdict="rejected", project="icfrec-a") == 1
    assert loop.metric("incus_caddyfile_instances", verdict="skipped", project="icfrec-a") == 1
    assert loop.metric("incus_caddyfile_instances", verdict="routed", project="icfrec-c") == 2
    loop.clock.now += 1
    loop.incus.set_status("icfrec-a", "rec-web", "Stopped")
    loop.emit("icfrec-a", "rec-web", "instance-stopped")
    loop.run_for(0.3)
    assert (
        loop.metric("incus_caddyfile_cycles_total", trigger="instance-stopped", outcome="applied")
        == 1
    )
    assert loop.metric("incus_caddyfile_instances", verdict="routed", project="icfrec-a") == 1
    assert loop.metric("incus_caddyfile_instances", verdict="skipped", project="icfrec-a") == 2
    assert loop.metric("incus_caddyfile_reloads_total") == 2
    # one change: from its event to the end of its reload (the 50 ms debounce, fake clock)
    assert loop.metric("incus_caddyfile_event_to_reload_seconds_count") == 1
    assert 0.04 < loop.metric("incus_caddyfile_event_to_reload_seconds_sum") < 0.1
    assert loop.metric("incus_caddyfile_cycle_duration_seconds_count") == 2
    assert loop.metric("incus_caddyfile_seconds_since_last_sync") < 0.5
    loop.clock.now += 30
    assert loop.metric("incus_caddyfile_seconds_since_last_sync") > 30


def test_rejected_labels_are_counted_by_key_and_shown(loop: Observed) -> None:
    loop.incus.set_config("icfrec-a", "rec-web", "user.caddyserver.http.upstream.port", "eighty")
    loop.run_for(0.1)
    assert (
        loop.metric("incus_caddyfile_rejected_labels", key="user.caddyserver.http.upstream.port")
        == 1
    )
    assert loop.metric("incus_caddyfile_instances", verdict="rejected", project="icfrec-a") == 2
    page = loop.get("/")[1]
    assert "rec-web" in page and "eighty" in page and "not a port number" in page


def test_an_incus_failure_during_a_cycle_is_counted(loop: Observed) -> None:
    loop.run_for(0.1)
    loop.incus.fail_on = {"get_instance"}
    loop.emit("icfrec-a", "rec-web", "instance-stopped")
    loop.run_for(0.3)
    assert (
        loop.metric(
            "incus_caddyfile_cycles_total", trigger="instance-stopped", outcome="incus_error"
        )
        == 1
    )
    state = json.loads(loop.get("/state")[1])
    assert state["incus"]["connected"] is False and state["ready"] is False
    assert state["last_cycles"][0]["outcome"] == "incus_error"


def test_state_says_what_doctor_from_reads(loop: Observed) -> None:
    loop.run_for(0.1)
    state = json.loads(loop.get("/state")[1])
    assert state["ready"] is True and state["synced"] is True
    assert state["caddy"]["current"] is True and state["incus"]["connected"] is True
    assert state["counts"]["sites"] == 7
    assert state["last_cycles"][0]["triggers"] == ["start", "reconnect"]


# ---------------------------------------------------------------- the page


def test_page_shows_routes_instances_cycles_and_health(loop: Observed) -> None:
    loop.run_for(0.1)
    loop.incus.set_status("icfrec-a", "rec-web", "Stopped")
    loop.emit("icfrec-a", "rec-web", "instance-stopped")
    loop.run_for(0.3)
    status, page = loop.get("/")
    assert status == 200 and page.startswith("<!DOCTYPE html>")
    assert '<meta http-equiv="refresh"' in page and "<script" not in page
    assert "b.example.test" in page and "rec-profiled" in page  # a route, its instance
    assert "not running (Stopped)" in page  # a stopped instance's reason
    assert "instance-stopped icfrec-a/rec-web" in page and "removed" not in page
    assert "-a.example.test" in page  # what the last cycle changed
    assert "Caddy runs the current file" in page


def test_page_escapes_what_labels_carry() -> None:
    hostile = '<script>alert("x")</script>'
    fleet = [inst("evil", host=hostile), inst("ok")]
    model = build(fleet)
    state = EdgeState(process_metrics=False)
    report = Report(model=model)
    state.cycle(report, [Trigger(Kind.START)], {}, 0.01, fleet, 1.0)
    app = EdgeApp(state.board, state.metrics)
    page = app.handle("GET", "/", {}).body.decode()
    assert hostile not in page and "&lt;script&gt;" in page


def test_page_folds_instances_of_projects_left_out() -> None:
    fleet = [inst("in", project="mine"), inst("out", project="theirs", host="t.example.org")]
    model = build(fleet, policy=Policy(include=("mine",)))
    assert explain(fleet, model)[1].reasons == (EXCLUDED,)
    state = EdgeState(process_metrics=False)
    state.cycle(Report(model=model), [Trigger(Kind.START)], {}, 0.01, fleet, 1.0)
    page = EdgeApp(state.board, state.metrics).handle("GET", "/", {}).body.decode()
    assert "1 labelled instance(s) in projects the settings leave out" in page


# ---------------------------------------------------------------- tokens and addresses


def test_token_is_checked_on_every_endpoint_but_healthz() -> None:
    state = EdgeState(process_metrics=False)
    app = EdgeApp(state.board, state.metrics, token=TOKEN)
    for path in ("/", "/readyz", "/routes", "/metrics", "/state", "/ask?domain=x.org"):
        response = app.handle("GET", path, {})
        assert response.status == 401, path
        assert response.headers["WWW-Authenticate"].startswith("Basic")
    assert app.handle("GET", "/healthz", {}).status == 200
    assert app.handle("GET", "/routes", {"Authorization": f"Bearer {TOKEN}"}).status == 200
    basic = base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
    assert app.handle("GET", "/routes", {"Authorization": f"Basic {basic}"}).status == 200
    assert app.handle("GET", "/routes", {"Authorization": "Bearer wrong"}).status == 401
    assert app.handle("GET", "/routes", {"Authorization": "Basic !!"}).status == 401


def test_only_get_and_head() -> None:
    state = EdgeState(process_metrics=False)
    app = EdgeApp(state.board, state.metrics)
    assert app.handle("POST", "/routes", {}).status == 405
    assert app.handle("GET", "/nope", {}).status == 404


@pytest.mark.parametrize(
    ("value", "loopback"),
    [("127.0.0.1:9180", True), ("localhost:9180", True), ("[::1]:9180", True),
     ("127.0.0.2:1", True), ("unix//run/x.sock", True), ("0.0.0.0:9180", False),
     ("198.18.77.1:9180", False), ("[::]:9180", False)],
)  # fmt: skip
def test_addresses_and_which_are_loopback(value: str, loopback: bool) -> None:
    assert parse(value).loopback is loopback


@pytest.mark.parametrize(
    "value", [":9180", "9180", "127.0.0.1:99999", "example.org:80", "unix/relative.sock"]
)
def test_bad_addresses(value: str) -> None:
    with pytest.raises(AddressError):
        parse(value)


def test_non_loopback_without_token_is_refused(tmp_path: Path) -> None:
    with pytest.raises(serve.EdgeSetupError, match="a token is required"):
        serve.setup("0.0.0.0:0", None, None)
    with pytest.raises(serve.EdgeSetupError, match="at least 16"):
        serve.setup("0.0.0.0:0", "short", None)
    empty = tmp_path / "token"
    empty.write_text("\n")
    with pytest.raises(serve.EdgeSetupError, match="at least 16"):
        serve.setup("0.0.0.0:0", None, empty)
    with pytest.raises(serve.EdgeSetupError, match="not both"):
        serve.setup("127.0.0.1:0", TOKEN, empty)


# ---------------------------------------------------------------- the real listener


@pytest.fixture
def served(loop: Observed) -> Iterator[tuple[Observed, Listener]]:
    listener = Listener(parse("127.0.0.1:0"), loop.app)
    listener.start()
    try:
        yield loop, listener
    finally:
        listener.stop()


def http_get(port: int, path: str) -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        conn.close()


def test_the_listener_serves_the_published_state(served: tuple[Observed, Listener]) -> None:
    loop, listener = served
    assert http_get(listener.port, "/readyz")[0] == 503
    loop.run_for(0.1)
    status, headers, body = http_get(listener.port, "/readyz")
    assert status == 200 and headers["Cache-Control"] == "no-store"
    status, headers, body = http_get(listener.port, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith(
        "text/plain; version=0.0.4"
    )  # any Prometheus
    names = {f.name for f in text_string_to_metric_families(body)}
    assert {"incus_caddyfile_cycles", "incus_caddyfile_instances"} <= names
    status, headers, body = http_get(listener.port, "/")
    assert status == 200 and "default-src 'none'" in headers["Content-Security-Policy"]


def test_a_unix_socket_listener(tmp_path: Path, loop: Observed) -> None:
    path = tmp_path / "edge.sock"
    listener = Listener(parse(f"unix/{path}"), loop.app)
    listener.start()
    try:
        assert oct(path.stat().st_mode & 0o777) == "0o660"
        from incus_caddyfile.edge.client import get

        assert get(f"unix/{path}", "/healthz", None).status == 200
    finally:
        listener.stop()
    assert not path.exists()


def test_reload_failure_outcome_names() -> None:
    from incus_caddyfile.edge.keeper import outcome_of

    assert outcome_of(None) == "incus_error"
    assert outcome_of(Report(written=True)) == "applied"
    assert outcome_of(Report()) == "unchanged"
    assert outcome_of(Report().fail(Status.RELOAD_FAILED, "x")) == "reload_failed"


# ---------------------------------------------------------------- routes and doctor --from


def invoke(*args: str) -> tuple[int, str, str]:
    from click.testing import CliRunner

    from incus_caddyfile import cli

    result = CliRunner().invoke(cli.main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_routes_from_a_running_watch(served: tuple[Observed, Listener]) -> None:
    loop, listener = served
    loop.run_for(0.1)
    url = f"127.0.0.1:{listener.port}"
    code, out, err = invoke("routes", "--from", url, "--json")
    assert code == 0 and err == ""
    assert out == http_get(listener.port, "/routes")[2]
    code, table, _ = invoke("routes", "--from", f"http://{url}")
    assert code == 0 and table.splitlines()[0].split()[:2] == ["PROJECT", "INSTANCE"]
    assert "    not running (Stopped)" in table


def test_doctor_from_a_running_watch(served: tuple[Observed, Listener]) -> None:
    loop, listener = served
    url = f"127.0.0.1:{listener.port}"
    code, out, _ = invoke("doctor", "--from", url)
    assert code == 1 and "FAIL  ready: no full sync yet" in out
    loop.run_for(0.1)
    code, out, _ = invoke("doctor", "--from", url)
    assert code == 0, out
    assert "ok    incus: the event stream is up" in out
    assert "ok    caddy: runs the current file" in out
    assert "ok    last cycle: applied after start, reconnect" in out
    assert "ok    routes: 7 site(s); 7 instance(s) routed" in out
    loop.caddy.load_fails = True
    loop.incus.set_status("icfrec-b", "rec-profiled", "Stopped")
    loop.emit("icfrec-b", "rec-profiled", "instance-stopped")
    loop.run_for(0.3)
    code, out, _ = invoke("doctor", "--from", url)
    assert code == 1 and "FAIL  caddy: a reload is pending" in out


def test_from_without_a_watch_or_with_a_wrong_token(tmp_path: Path) -> None:
    code, _, err = invoke("routes", "--from", f"unix/{tmp_path}/none.sock")
    assert code == 4 and "no watch answers" in err
    code, out, _ = invoke("doctor", "--from", f"unix/{tmp_path}/none.sock")
    assert code == 1 and "FAIL  watch: no watch answers" in out
    state = EdgeState(process_metrics=False)
    listener = Listener(parse("127.0.0.1:0"), EdgeApp(state.board, state.metrics, token=TOKEN))
    listener.start()
    try:
        url = f"127.0.0.1:{listener.port}"
        code, _, err = invoke("routes", "--from", url)
        assert code == 2 and "wants its token" in err
        code, _, err = invoke("routes", "--from", url, "--listen-token", TOKEN)
        assert code == 0, err
    finally:
        listener.stop()
    code, _, err = invoke("routes", "--from", "example.org:80")
    assert code == 2 and "--from" in err


def test_watch_refuses_a_non_loopback_listener_without_a_token(tmp_path: Path) -> None:
    code, _, err = invoke("watch", "-o", str(tmp_path / "Caddyfile"), "--listen", "0.0.0.0:9180")
    assert code == 2 and "a token is required" in err


# ---------------------------------------------------------------- on-demand TLS

ASK = "http://127.0.0.1:9180/ask"


def test_render_refuses_on_demand_tls(tmp_path: Path) -> None:
    code, out, err = invoke("render", "--on-demand-tls")
    assert code == 2 and out == "" and "render cannot" in err
    settings = tmp_path / "s.toml"
    settings.write_text("on-demand-tls = true\n")
    code, _, err = invoke("render", "--config", str(settings))
    assert code == 2 and "render cannot" in err
    settings.write_text('on-demand-tls = "yes"\n')
    code, _, err = invoke("render", "--config", str(settings))
    assert code == 2 and "on-demand-tls must be true or false" in err


def test_watch_on_demand_tls_needs_a_loopback_tcp_listener(tmp_path: Path) -> None:
    out = str(tmp_path / "Caddyfile")
    code, _, err = invoke("watch", "-o", out, "--on-demand-tls")
    assert code == 2 and "needs --listen 127.0.0.1:PORT" in err
    code, _, err = invoke(
        "watch", "-o", out, "--on-demand-tls", "--listen", f"unix/{tmp_path}/edge.sock"
    )
    assert code == 2 and "loopback TCP address" in err
    assert not (tmp_path / "edge.sock").exists()  # the listener that was bound is gone
    code, _, err = invoke("watch", "-o", out, "--on-demand-tls", "--scheme", "http",
                          "--listen", "127.0.0.1:0")  # fmt: skip
    assert code == 2 and "drop --scheme http" in err


def on_demand_text(wildcards: tuple[str, ...] = ()) -> str:
    from incus_caddyfile.render import render
    from incus_caddyfile.settings import Settings

    fleet = [inst("web", host="web.example.org"), inst("shop", host="shop.apps.example.org")]
    settings = Settings(on_demand_tls=True, on_demand_ask=ASK, wildcards=wildcards)
    return render(build(fleet, wildcards), settings)


def test_on_demand_tls_renders_the_ask_and_each_site_on_demand() -> None:
    text = on_demand_text(("*.apps.example.org",))
    assert f"\ton_demand_tls {{\n\t\task {ASK}\n\t}}\n}}\n" in text
    assert "web.example.org {\n\ttls {\n\t\ton_demand\n\t}\n\n\treverse_proxy" in text
    assert "*.apps.example.org {\n\ttls {\n\t\ton_demand\n\t}\n\n\t@shop_apps" in text


@pytest.mark.caddy
def test_caddy_takes_the_on_demand_config(caddy_admin: object) -> None:
    config = caddy_admin.adapt(on_demand_text(("*.apps.example.org",)))  # type: ignore[attr-defined]
    tls = config["apps"]["tls"]["automation"]
    assert tls["on_demand"]["permission"] == {"endpoint": ASK, "module": "http"}
    subjects = {s for p in tls["policies"] if p.get("on_demand") for s in p["subjects"]}
    assert subjects == {"web.example.org", "*.apps.example.org"}


def test_a_fault_in_the_state_is_logged_and_the_loop_goes_on() -> None:
    logged: list[str] = []
    state = EdgeState(process_metrics=False, log=lambda event, message, **_: logged.append(message))
    broken = Report(model=build([inst("web")]))
    state.cycle(broken, [Trigger(Kind.START)], {}, 0.01, None, 1.0)  # type: ignore[arg-type]
    assert logged and "was not updated" in logged[0]
    assert state.board.current().cycle_count == 0  # the last good state stays


def test_the_authorization_header_in_any_case() -> None:
    state = EdgeState(process_metrics=False)
    app = EdgeApp(state.board, state.metrics, token=TOKEN)
    assert app.handle("GET", "/routes", {"AUTHORIZATION": f"bearer {TOKEN}"}).status == 200


def test_ask_on_a_kept_alive_connection_answers_at_once(
    served: tuple[Observed, Listener],
) -> None:
    """As Caddy asks: many questions on one connection. (Without TCP_NODELAY each answer
    waited ~40 ms for the client's delayed ACK.)"""
    loop, listener = served
    loop.run_for(0.1)
    conn = http.client.HTTPConnection("127.0.0.1", listener.port, timeout=5)
    took = []
    try:
        for n in range(100):
            started = time.perf_counter()
            conn.request("GET", f"/ask?domain={'a' if n % 2 else 'nobody'}.example.test")
            response = conn.getresponse()
            response.read()
            took.append(time.perf_counter() - started)
            assert response.status == (200 if n % 2 else 404)
    finally:
        conn.close()
    assert sorted(took)[50] < 0.005, f"median {sorted(took)[50] * 1000:.1f} ms"
