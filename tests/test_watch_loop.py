"""The watch loop as a whole, driven step by step with a fake clock, the fake Incus (replaying
a recording of the lab) and a fake Caddy: no threads, no sleeps, no root."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from incus_caddyfile import probe
from incus_caddyfile.settings import Settings
from incus_caddyfile.watch.loop import Watcher, WatchOptions

from .fake_incus import FakeIncus, lifecycle_event, operation_event
from .fakes import FakeCaddy, MemoryFile, fake_target


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Loop:
    """A Watcher wired to fakes, and the test's hands on them."""

    def __init__(self, settings: Settings | None = None, **options: float) -> None:
        options.setdefault("debounce_max", 0.2)  # the hold after a reload: short here
        self.settings = settings or Settings(scheme="http")
        self.clock = Clock()
        self.incus = FakeIncus.from_recording()
        self.target, self.file, self.caddy = fake_target()
        self.log = io.StringIO()
        self.connects = 0
        self.watcher = Watcher(
            lambda: self.settings,
            WatchOptions(**options),  # type: ignore[arg-type]
            connect=self._connect,
            clock=self.clock,
            log=None,
            make_target=lambda settings, api: self.target,
        )
        self.watcher.log.stream = self.log
        self.watcher.begin()

    def _connect(self, settings: Settings) -> FakeIncus:
        self.connects += 1
        return self.incus

    def run_for(self, seconds: float, step: float = 0.01) -> None:
        """Advance the clock, running the loop at each step (the queue drains each time)."""
        end = self.clock.now + seconds
        while self.clock.now < end:
            self.watcher.step()
            self.clock.now = round(self.clock.now + step, 6)

    def emit(self, project: str, name: str, action: str) -> None:
        stream = self.incus.last_events
        assert stream is not None
        assert stream.emit(lifecycle_event(project, name, action))

    @property
    def text(self) -> str:
        return (self.file.data or b"").decode()

    @property
    def cycle_lines(self) -> list[str]:
        return [line for line in self.log.getvalue().splitlines() if " (after " in line]


@pytest.fixture(autouse=True)
def ports_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Readiness probes answer at once (the recorded addresses are not dialled)."""
    monkeypatch.setattr(probe, "accepts", lambda *args, **kwargs: True)


@pytest.fixture
def loop() -> Loop:
    return Loop()


def test_start_lists_once_renders_and_loads(loop: Loop) -> None:
    loop.run_for(0.1)
    assert loop.connects == 1 and loop.watcher.cycles == 1
    assert "http://a.example.test" in loop.text and "http://b.example.test" in loop.text
    assert "stopped.example.test" not in loop.text  # stopped: holds its host, no site
    assert loop.caddy.loaded == loop.text and loop.file.writes == 1
    assert "(after start, reconnect)" in loop.cycle_lines[0]


def test_one_instance_event_costs_one_instance_refresh(loop: Loop) -> None:
    loop.run_for(0.1)
    before = loop.incus.requests
    loop.incus.set_status("icfrec-a", "rec-web", "Stopped")
    loop.emit("icfrec-a", "rec-web", "instance-stopped")
    loop.run_for(0.3)
    assert loop.watcher.cycles == 2
    assert loop.incus.requests - before == 1  # the instance itself; no leases when stopped
    assert "a.example.test" not in loop.text and "b.example.test" in loop.text


def test_noise_events_cost_nothing(loop: Loop) -> None:
    loop.run_for(0.1)
    before = loop.incus.requests
    for action in ("instance-exec", "instance-file-pushed", "instance-snapshot-created"):
        loop.emit("icfrec-a", "rec-web", action)
    loop.run_for(1.0)
    assert loop.watcher.cycles == 1 and loop.incus.requests == before


def test_unchanged_output_neither_writes_nor_reloads(loop: Loop) -> None:
    loop.run_for(0.1)
    loop.emit("icfrec-a", "rec-web", "instance-updated")  # nothing really changed
    loop.run_for(0.3)
    assert loop.watcher.cycles == 2 and loop.file.writes == 1 and loop.caddy.loads == 1
    assert "unchanged" in loop.cycle_lines[-1]


def test_a_lost_stream_keeps_the_file_and_resyncs_after_reconnect(loop: Loop) -> None:
    loop.run_for(0.1)
    good = loop.text
    stream = loop.incus.last_events
    assert stream is not None
    loop.incus.fail_on = {"events", "list_instances"}
    stream.drop()
    loop.run_for(0.2)
    assert not loop.watcher.link.connected and loop.text == good
    assert "reconnecting in 0.5 s" in loop.log.getvalue()
    loop.incus.set_status("icfrec-b", "rec-profiled", "Stopped")  # missed while away
    loop.incus.fail_on = set()
    loop.run_for(1.5)  # the retry after 0.5 s, then 1 s backoff at most
    assert loop.watcher.link.connected and loop.connects >= 2
    assert "b.example.test" not in loop.text  # the full resync saw the missed change


def test_a_failed_listing_is_never_rendered(loop: Loop) -> None:
    loop.run_for(0.1)
    good = loop.text
    loop.incus.fail_on = {"get_instance"}
    loop.emit("icfrec-a", "rec-web", "instance-stopped")
    loop.run_for(0.3)
    assert loop.text == good and not loop.watcher.link.connected


def test_a_failed_reload_is_retried_with_backoff(loop: Loop) -> None:
    loop.caddy.load_fails = True
    loop.run_for(0.1)
    assert loop.file.writes == 1 and loop.file.marked  # written, reload pending
    assert "error: " in loop.cycle_lines[-1]
    loop.caddy.load_fails = False
    loop.run_for(1.1)  # first retry after 1 s
    assert loop.caddy.loaded == loop.text and not loop.file.marked


def test_a_route_caddy_refuses_costs_only_its_instance(loop: Loop) -> None:
    loop.run_for(0.1)
    loop.caddy.rejects = "frozen.example.test"  # a Caddy that refuses this host
    loop.incus.set_config("icfrec-a", "rec-frozen", "user.caddyserver.http.upstream.port", "81")
    loop.incus.set_status("icfrec-b", "rec-profiled", "Stopped")  # another change meanwhile
    loop.emit("icfrec-a", "rec-frozen", "instance-updated")
    loop.emit("icfrec-b", "rec-profiled", "instance-stopped")
    loop.run_for(0.3)
    assert "frozen.example.test" not in loop.text and "b.example.test" not in loop.text
    assert "a.example.test" in loop.text and loop.caddy.loaded == loop.text
    assert "rejected icfrec-a/rec-frozen: Caddy refused its route" in loop.log.getvalue()


def test_a_config_refused_as_a_whole_keeps_the_previous_file(loop: Loop) -> None:
    loop.run_for(0.1)
    good = loop.text
    loop.caddy.rejects = "# Generated"  # refused whatever the instances
    loop.incus.set_status("icfrec-b", "rec-profiled", "Stopped")
    loop.emit("icfrec-b", "rec-profiled", "instance-stopped")
    loop.run_for(0.3)
    assert loop.text == good and loop.caddy.loaded == good
    assert "Caddy rejected" in loop.cycle_lines[-1]


def test_an_address_that_comes_later_is_polled_for_and_applied_at_once() -> None:
    loop = Loop()
    web = loop.incus.recorded("icfrec-a", "rec-web")
    loop.incus.set_leases("icfrec-a", "icfbr0", [])  # no lease yet
    loop.incus.set_state("icfrec-a", "rec-web", {"network": {}})
    loop.run_for(0.1)
    assert "a.example.test" not in loop.text
    assert ("icfrec-a", "rec-web") in loop.watcher.polls
    mac = web["expanded_config"]["volatile.eth0.hwaddr"]
    loop.incus.set_leases(
        "icfrec-a", "icfbr0", [{"hwaddr": mac, "address": "198.18.77.166", "type": "dynamic"}]
    )
    loop.run_for(0.3)
    assert "http://a.example.test" in loop.text
    assert "198.18.77.166:80" in loop.text
    assert ("icfrec-a", "rec-web") not in loop.watcher.polls


def test_an_imported_file_reloads_caddy_though_the_bytes_are_the_same(tmp_path: Path) -> None:
    snippets = tmp_path / "snippets.caddy"
    snippets.write_text("(auth) {\n}\n")
    loop = Loop(Settings(scheme="http", snippets=snippets))
    loop.run_for(0.1)
    loop.watcher.on_file(str(snippets))
    loop.run_for(0.3)
    assert loop.caddy.loads == 2 and loop.file.writes == 1


def test_a_settings_file_change_with_the_same_output_does_not_reload(tmp_path: Path) -> None:
    loop = Loop(Settings(scheme="http", config_file=tmp_path / "settings.toml"))
    loop.run_for(0.1)
    loop.watcher.on_file(str(tmp_path / "settings.toml"))
    loop.run_for(0.3)
    assert loop.watcher.cycles == 2 and loop.caddy.loads == 1


def test_the_first_cycle_says_what_the_file_holds(loop: Loop) -> None:
    loop.run_for(0.1)
    assert loop.cycle_lines[0].startswith("incus-caddyfile: 7 sites: a.example.test")
    assert "sites +" not in loop.cycle_lines[0]


def test_periodic_resync_lists_everything_again() -> None:
    loop = Loop(resync_interval=5.0)
    loop.run_for(0.1)
    listed = loop.incus.requests
    loop.run_for(5.1, step=0.05)
    assert loop.watcher.cycles == 2 and loop.incus.requests > listed
    assert "(after timer)" in loop.cycle_lines[-1]


def test_the_loop_sleeps_until_its_next_deadline(loop: Loop) -> None:
    loop.run_for(0.1)
    deadline = loop.watcher.next_deadline()
    # the next look at Caddy, 10 s after the first cycle (the resync is at 300 s)
    assert deadline is not None and deadline == pytest.approx(loop.clock.now - 0.1 + 10, abs=0.2)


def test_memory_file_and_fake_caddy_defaults() -> None:
    assert MemoryFile().read() is None and FakeCaddy().running("x") is False


def _port_change(loop: Loop, name: str, port: str) -> None:
    loop.incus.set_config("icfrec-a", name, "user.caddyserver.http.upstream.port", port)
    loop.emit("icfrec-a", name, "instance-updated")


def test_two_changes_in_a_row_are_both_applied_at_once() -> None:
    loop = Loop(debounce_max=2.0)  # the defaults: 0.05:2, a bucket of 2 reloads
    loop.run_for(0.1)
    loop.run_for(4.0, step=0.1)  # the start cycle's reload is long past
    _port_change(loop, "rec-web", "8080")
    loop.run_for(0.1)
    assert ":8080" in loop.text and loop.caddy.loads == 2
    _port_change(loop, "rec-frozen", "8081")
    loop.run_for(0.1)
    assert loop.caddy.loads == 2  # 0.2 s after a reload first (see the next test)
    loop.run_for(0.1)
    assert ":8081" in loop.text and loop.caddy.loads == 3  # no 2 s hold


def test_a_reload_keeps_a_gap_after_the_one_before_even_a_drain() -> None:
    """A reload closes idle keep-alive connections; clients send the request again on new
    connections at once, and a second reload tens of ms later closed those without an
    answer (a failed request, seen in the rolling-restart test: a member's return and the
    next member's drain came ~50 ms apart). The next cycle waits 0.2 s after a reload."""
    loop = pool_loop()
    _port_change(loop, "rec-frozen", "8081")
    loop.run_for(0.06, step=0.002)
    first = loop.caddy.loads
    operation(loop, "Stopping instance", "Running")  # urgent: out of its pool now
    loop.run_for(0.19, step=0.002)
    assert loop.caddy.loads == first and WEB_ADDRESS in loop.text  # not yet
    loop.run_for(0.03, step=0.002)
    assert loop.caddy.loads == first + 1 and WEB_ADDRESS not in loop.text


def test_a_sustained_burst_is_paced_by_the_bucket() -> None:
    loop = Loop(debounce_max=2.0)
    loop.run_for(0.1)
    loop.run_for(4.0, step=0.1)  # a quiet spell: the bucket is full again
    loads = loop.caddy.loads
    for i in range(30):  # 30 changes, 100 ms apart
        _port_change(loop, "rec-web", str(8000 + i))
        loop.run_for(0.1)
    loop.run_for(4.0)
    assert ":8029" in loop.text
    assert loop.caddy.loads - loads == 4  # two at once, then one per 2 s (0.05, 0.15, 2.05, 4.05)


def test_a_bucket_of_one_holds_reloads_max_apart() -> None:
    loop = Loop(debounce_max=2.0, reload_burst=1)
    loop.run_for(0.1)
    _port_change(loop, "rec-web", "8080")
    loop.run_for(1.0)
    assert ":8080" not in loop.text  # held: the start cycle reloaded less than 2 s ago
    loop.run_for(1.1)
    assert ":8080" in loop.text


# ---- drain before stop (operation events), warm-up after a (re)start

WEB = ("icfrec-a", "rec-web")
WEB_ADDRESS, MATE_ADDRESS = "198.18.77.166:80", "198.18.77.170:80"


def with_a_pool_mate(loop: Loop) -> None:
    """rec-web2: a second member of rec-web's pool (a.example.test), with its own lease."""
    raw = loop.incus.recorded(*WEB)
    raw["name"] = "rec-web2"
    raw["created_at"] = "2030-01-01T00:00:00Z"
    raw["expanded_config"]["volatile.eth0.hwaddr"] = "10:66:6a:00:00:02"
    state = loop.incus.instance_state(*WEB)
    assert state is not None
    state["network"]["eth0"]["addresses"][0]["address"] = MATE_ADDRESS.split(":")[0]
    loop.incus.add(raw, state)
    leases = loop.incus.network_leases("icfrec-a", "icfbr0")
    leases.append({"hwaddr": "10:66:6a:00:00:02", "address": MATE_ADDRESS.split(":")[0]})
    loop.incus.set_leases("icfrec-a", "icfbr0", leases)


def pool_loop(**options: float) -> Loop:
    loop = Loop(debounce_max=2.0, **options)
    with_a_pool_mate(loop)
    loop.run_for(0.1)
    loop.run_for(4.0, step=0.1)  # long past the start cycle: a full bucket
    assert WEB_ADDRESS in loop.text and MATE_ADDRESS in loop.text
    return loop


def operation(loop: Loop, description: str, status: str, name: str = "rec-web") -> None:
    stream = loop.incus.last_events
    assert stream is not None
    assert stream.emit(operation_event("icfrec-a", name, description, status))


def test_a_member_leaves_its_pool_the_moment_its_stop_begins() -> None:
    loop = pool_loop()
    loads = loop.caddy.loads
    operation(loop, "Stopping instance", "Pending")
    operation(loop, "Stopping instance", "Running")
    loop.run_for(0.06)
    assert WEB_ADDRESS not in loop.text and MATE_ADDRESS in loop.text
    assert loop.caddy.loads == loads + 1
    assert "(after stop-begun icfrec-a/rec-web)" in loop.cycle_lines[-1]
    # the stop takes seconds; when it is over the member is gone anyway: no other reload
    loop.run_for(2.0)
    loop.incus.set_status(*WEB, "Stopped")
    operation(loop, "Stopping instance", "Success")
    loop.emit(*WEB, "instance-shutdown")
    loop.run_for(0.3)
    assert WEB_ADDRESS not in loop.text and loop.caddy.loads == loads + 1
    assert not loop.watcher.drains.keys()


def test_a_stop_that_fails_brings_the_member_back() -> None:
    loop = pool_loop()
    operation(loop, "Stopping instance", "Running")
    loop.run_for(0.1)
    assert WEB_ADDRESS not in loop.text
    operation(loop, "Stopping instance", "Failure")
    loop.run_for(0.3)  # 0.2 s after the drain's reload at the soonest
    assert WEB_ADDRESS in loop.text and MATE_ADDRESS in loop.text


def test_a_drain_does_not_wait_for_a_reload_token() -> None:
    loop = pool_loop(reload_burst=1)
    loop.incus.set_config(*WEB, "user.caddyserver.http.upstream.port", "80")  # no change
    loop.watcher.debounce.bucket.take(loop.clock.now)  # a reload just happened
    operation(loop, "Stopping instance", "Running", name="rec-web2")
    loop.run_for(0.06)
    assert MATE_ADDRESS not in loop.text


def test_a_host_with_a_single_instance_keeps_routing_while_it_stops() -> None:
    loop = Loop(debounce_max=2.0)
    loop.run_for(0.1)
    before, loads = loop.text, loop.caddy.loads
    operation(loop, "Stopping instance", "Running")
    loop.run_for(0.3)
    assert loop.text == before and loop.caddy.loads == loads  # nowhere else to send it


def test_a_restarted_member_rejoins_once_its_port_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = pool_loop()
    open_ports: set[tuple[str, int]] = set()
    probed: list[tuple[str, int]] = []

    def accepts(address: str, port: int, timeout: float = 0.5) -> bool:
        probed.append((address, port))
        return (address, port) in open_ports

    monkeypatch.setattr(probe, "accepts", accepts)
    operation(loop, "Restarting instance", "Running")
    loop.run_for(0.1)
    assert WEB_ADDRESS not in loop.text
    # the restart is over: running again, its lease known, but its address not configured yet
    loop.incus.set_state(*WEB, {"network": {}})
    operation(loop, "Restarting instance", "Success")
    loop.emit(*WEB, "instance-restarted")
    loop.run_for(0.3)  # its cycle comes 0.2 s after the drain's reload at the soonest
    loop.incus.calls.clear()
    loop.run_for(0.2)
    assert WEB_ADDRESS not in loop.text and probed == []  # nothing dials an unconfigured address
    polled = {c[0] for c in loop.incus.calls}
    assert polled == {"instance_state"}  # one request a poll: its live state
    web = loop.incus.recorded(*WEB)
    loop.incus.set_state(*WEB, {"network": {"eth0": {"addresses": [
        {"address": "198.18.77.166", "family": "inet", "scope": "global"}]}}})  # fmt: skip
    loop.run_for(0.3)
    assert probed and WEB_ADDRESS not in loop.text  # configured; its port is still closed
    open_ports.add(("198.18.77.166", 80))
    loop.run_for(0.3)
    assert WEB_ADDRESS in loop.text and MATE_ADDRESS in loop.text
    assert "(after warm icfrec-a/rec-web)" in loop.cycle_lines[-1]
    assert web["name"] == "rec-web" and not loop.watcher.drains.keys()


def test_a_warm_up_gives_up_after_the_address_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = pool_loop(address_timeout=2.0)
    monkeypatch.setattr(probe, "accepts", lambda *args, **kwargs: False)
    loop.emit(*WEB, "instance-started")  # a start of a member: it warms up too
    loop.run_for(0.5)
    assert WEB_ADDRESS not in loop.text
    loop.run_for(2.0)
    assert WEB_ADDRESS in loop.text  # let in; Caddy's retries cover a port that stays closed


def test_without_drain_a_stop_changes_nothing_until_it_is_over() -> None:
    loop = pool_loop(drain=False)
    loads = loop.caddy.loads
    operation(loop, "Stopping instance", "Running")
    loop.run_for(0.3)
    assert WEB_ADDRESS in loop.text and loop.caddy.loads == loads


def test_a_lost_stream_forgets_the_drains() -> None:
    loop = pool_loop()
    operation(loop, "Stopping instance", "Running")
    loop.run_for(0.1)
    stream = loop.incus.last_events
    assert stream is not None
    stream.drop()
    loop.run_for(2.0)  # reconnected, everything listed again: the stop's end may be missed
    assert loop.watcher.link.connected and WEB_ADDRESS in loop.text


def test_events_of_projects_the_settings_leave_out_cost_nothing() -> None:
    """On an Incus shared with others, their instances' events make no cycle (and no
    request) that would delay ours."""
    from incus_caddyfile.policy import Policy

    loop = Loop(Settings(scheme="http", policy=Policy(include=("icfrec-a",))))
    loop.run_for(0.1)
    before, cycles = loop.incus.requests, loop.watcher.cycles
    for _ in range(5):
        loop.emit("icfrec-b", "rec-profiled", "instance-updated")
    stream = loop.incus.last_events
    assert stream is not None
    stream.emit(operation_event("icfrec-b", "rec-profiled", "Stopping instance", "Running"))
    loop.run_for(0.5)
    assert loop.watcher.cycles == cycles and loop.incus.requests == before
    loop.emit("icfrec-a", "rec-web", "instance-updated")
    loop.run_for(0.3)
    assert loop.watcher.cycles == cycles + 1


def test_others_projects_come_and_go_without_a_resync_of_ours() -> None:
    """Seen in the lab: other test sessions create and delete projects all the time; each
    project event re-listed everything, and every labelled instance of every project cost
    a state request (when the leases are short): 50 s per listing on a shared Incus."""
    from incus_caddyfile.policy import Policy

    loop = Loop(Settings(scheme="http", policy=Policy(include=("icfrec-a",))))
    loop.run_for(0.1)
    assert not [c for c in loop.incus.calls if c[1:2] == ("icfrec-b",)]  # no address asked
    stream = loop.incus.last_events
    assert stream is not None
    before, cycles = loop.incus.requests, loop.watcher.cycles
    for action in ("project-created", "project-deleted"):
        event = lifecycle_event("default", "other-tenant", action)
        event["metadata"]["source"] = "/1.0/projects/other-tenant"
        assert stream.emit(event)
    loop.run_for(0.5)
    assert loop.watcher.cycles == cycles and loop.incus.requests == before
    event = lifecycle_event("default", "icfrec-a", "project-updated")
    event["metadata"]["source"] = "/1.0/projects/icfrec-a"
    assert stream.emit(event)
    loop.run_for(0.3)
    assert loop.watcher.cycles == cycles + 1 and "(after project-updated" in loop.cycle_lines[-1]


def test_a_failed_write_is_retried_when_nothing_else_happens(loop: Loop) -> None:
    """Found by the soak: a read-only output directory failed the cycle, and the change
    waited for the next event (or the resync, minutes later) once the disk was back."""
    loop.run_for(0.1)
    loop.file.fail_write = True
    loop.incus.set_status("icfrec-b", "rec-profiled", "Stopped")
    loop.emit("icfrec-b", "rec-profiled", "instance-stopped")
    loop.run_for(0.5)
    assert "b.example.test" in loop.text  # not written
    loop.file.fail_write = False  # the disk is back; no event comes
    loop.run_for(2.5)
    assert "b.example.test {" not in loop.text.replace("http://", "")
    assert "(after retry)" in loop.cycle_lines[-1]


def test_a_policy_change_relists_everything(tmp_path: Path) -> None:
    from incus_caddyfile.policy import Policy

    settings = [Settings(scheme="http", policy=Policy(include=("icfrec-a",)))]
    loop = Loop()
    loop.watcher.load_settings = lambda: settings[0]
    loop.watcher.settings = settings[0]
    loop.run_for(0.1)
    assert "b.example.test" not in loop.text
    loop.incus.set_status("icfrec-b", "rec-profiled", "Stopped")  # unseen: excluded
    loop.emit("icfrec-b", "rec-profiled", "instance-stopped")
    settings[0] = Settings(scheme="http")  # now every project counts
    loop.watcher.on_file(str(tmp_path / "settings.toml"))
    loop.run_for(0.3)
    assert "ready.example.test" in loop.text  # icfrec-b is listed afresh
    assert "b.example.test {" not in loop.text.replace("http://", "")  # and its stop is seen


def test_a_caddy_restarted_with_another_config_is_noticed_without_an_event(loop: Loop) -> None:
    """Found by the soak (seed 4242): Caddy came back from a stub config in a quiet spell and
    served nothing until the next change or the 300 s resync."""
    loop.run_for(0.1)
    loads = loop.caddy.loads
    loop.caddy.loaded = "{\n}\n"  # restarted with a config of its own
    loop.run_for(11.0, step=0.1)
    assert loop.caddy.loaded == loop.text and loop.caddy.loads == loads + 1
    assert "was not running the current file" in loop.log.getvalue()


def test_quiet_caddy_checks_log_nothing_and_count_no_cycle(loop: Loop) -> None:
    loop.run_for(0.1)
    lines = len(loop.log.getvalue().splitlines())
    loop.run_for(25.0, step=0.25)
    assert loop.watcher.cycles == 1 and len(loop.log.getvalue().splitlines()) == lines
    assert loop.caddy.calls.count("running") >= 2  # it did ask


# ---- require_ready: found in the host's neighbour table between Incus requests

READY_KEY = "user.caddyserver.http.upstream.require_ready"
WEB_MAC = "10:66:6a:e7:d0:83"


def arp_line(address: str, mac: str, flags: str = "0x2") -> str:
    return f"{address:17}0x1         {flags:12}{mac}     *        icfbr0\n"


def test_a_ready_instance_answering_at_a_resolved_address_is_routed_without_its_state(
    monkeypatch: pytest.MonkeyPatch, no_host_neighbours: Path
) -> None:
    """A start of a require_ready instance: while its live state does not show its address
    yet, the host's neighbour table is looked at between the Incus requests; an address it
    resolves to the instance's MAC (complete, inside the managed subnet) is dialled, and
    the route follows as soon as the port accepts, with no further Incus request."""
    loop = Loop(debounce_max=2.0)
    loop.incus.set_config(*WEB, READY_KEY, "true")
    loop.run_for(0.1)
    loop.run_for(4.0, step=0.1)
    address = WEB_ADDRESS.split(":")[0]
    assert WEB_ADDRESS in loop.text
    dialled: list[tuple[str, int]] = []
    open_ports: set[tuple[str, int]] = set()

    def accepts(host: str, port: int, timeout: float = 0.5) -> bool:
        dialled.append((host, port))
        return (host, port) in open_ports

    monkeypatch.setattr(probe, "accepts", accepts)
    loop.incus.set_status(*WEB, "Stopped")
    loop.emit(*WEB, "instance-stopped")
    loop.run_for(0.5)
    assert WEB_ADDRESS not in loop.text
    # started again; its address not configured yet (not in its state)
    loop.incus.set_status(*WEB, "Running")
    loop.incus.set_state(*WEB, {"status": "Running", "network": {}})
    (no_host_neighbours.parent / "net" / "icfbr0").mkdir()  # its bridge is on this host
    loop.incus.calls.clear()
    no_host_neighbours.write_text(
        no_host_neighbours.read_text()
        + arp_line(address, WEB_MAC, "0x0")  # incomplete: never dialled
        + arp_line("10.9.9.9", WEB_MAC)  # outside the bridge's subnet: never dialled
    )
    loop.emit(*WEB, "instance-started")
    loop.run_for(0.3)
    assert dialled == [] and WEB_ADDRESS not in loop.text
    # neither the start's cycle nor the poll asked its live state yet (the table first)
    assert "instance_state" not in [c[0] for c in loop.incus.calls]
    no_host_neighbours.write_text(no_host_neighbours.read_text() + arp_line(address, WEB_MAC))
    loop.run_for(0.1)
    assert set(dialled) == {(address, 80)} and WEB_ADDRESS not in loop.text  # port closed
    open_ports.add((address, 80))
    loop.incus.calls.clear()
    loop.run_for(0.1)
    assert WEB_ADDRESS in loop.text  # routed, its state still without the address
    assert "(after address icfrec-a/rec-web)" in loop.cycle_lines[-1]
    assert not any(c[0] == "instance_state" for c in loop.incus.calls)


def test_after_an_incusd_restart_the_resync_asks_no_state_of_instances_still_up(
    loop: Loop,
) -> None:
    """The lease tables are empty after an incusd restart; the instances kept running (and
    their addresses): the resync after the reconnect finds them without a state request."""
    loop.run_for(0.1)
    good = loop.text
    stream = loop.incus.last_events
    assert stream is not None
    loop.incus.fail_on = {"events"}
    stream.drop()
    loop.run_for(0.2)
    for project in ("icfrec-a", "icfrec-b", "icfrec-c"):
        for network in ("icfbr0", "icfbr1"):
            loop.incus.set_leases(project, network, [])
    loop.incus.fail_on = set()
    loop.incus.calls.clear()
    loop.run_for(1.5)
    assert loop.watcher.link.connected and ("list_instances",) in loop.incus.calls
    assert loop.text == good
    asked = {args[1] for name, *args in loop.incus.calls if name == "instance_state"}
    assert asked == {"rec-ready"}  # require_ready: only an address it configured will do
