"""A cluster member down, with the fakes: leases that fail, state requests that fail, and the
one rule that an instance in Error (unknown) keeps the route it last had: in the model, in
watch's cache, and in render's state file beside the output. The real cluster:
tests/integration/test_cluster.py."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from incus_caddyfile import lastknown, pipeline
from incus_caddyfile.incus import IncusError, IncusTimeout, PylxdApi
from incus_caddyfile.inventory import Inventory, LeaseOutage
from incus_caddyfile.lastknown import Keeper
from incus_caddyfile.model import LAST_ROUTE_KEPT, Instance, build, explain, with_last_known
from incus_caddyfile.settings import Settings, SettingsError, load_file

from .fake_incus import FakeIncus
from .fakes import fake_target
from .helpers import inst
from .test_watch_loop import Loop, ports_answer  # noqa: F401  (autouse: no real dials)


@pytest.fixture
def fake() -> FakeIncus:
    return FakeIncus.from_recording()


def by_name(instances: list[Instance]) -> dict[str, Instance]:
    return {i.name: i for i in instances}


def address(i: Instance) -> str | None:
    return next((a for n in i.nics for a in n.addresses), None)


def all_addresses(i: Instance) -> set[str]:
    return {a for n in i.nics for a in n.addresses}


# ---- inventory: what a failed request costs


def test_failed_leases_fall_back_to_each_instances_state_and_say_so(fake: FakeIncus) -> None:
    expected = {i.name: all_addresses(i) for i in Inventory(fake).instances()}
    fake.fail_on = {"network_leases"}
    fake.calls.clear()
    inventory = Inventory(fake)
    fleet = by_name(inventory.instances())
    assert {n: all_addresses(i) for n, i in fleet.items()} == expected  # all, from state
    assert [c for c in fake.calls if c[0] == "network_leases"] == [
        ("network_leases", "icfrec-a", "icfbr0")
    ]  # the first failure stops the others (a member down fails them all)
    assert ("instance_state", "icfrec-a", "rec-web") in fake.calls
    assert any("addresses from each instance's state" in n for n in inventory.notes)


def test_after_a_leases_failure_they_are_not_asked_for_a_while(fake: FakeIncus) -> None:
    now = [100.0]
    outage = LeaseOutage(pause=30.0)
    fake.fail_on = {"network_leases"}
    Inventory(fake, outage=outage, clock=lambda: now[0]).instances()
    fake.fail_on = set()
    fake.calls.clear()
    now[0] = 129.0
    later = Inventory(fake, outage=outage, clock=lambda: now[0])
    assert address(by_name(later.instances())["rec-web"]) == "198.18.77.166"
    assert "network_leases" not in [c[0] for c in fake.calls]
    assert any("leases not asked" in n for n in later.notes)
    now[0] = 130.0
    Inventory(fake, outage=outage, clock=lambda: now[0]).instances()
    assert "network_leases" in [c[0] for c in fake.calls]  # asked again after the pause


def test_an_instance_whose_state_fails_is_unknown(
    fake: FakeIncus, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = fake.instance_state

    def state(project: str, name: str) -> dict[str, Any] | None:
        if name == "rec-web":
            raise IncusError("Incus request instances/rec-web/state failed: peer node is down")
        return real(project, name)

    monkeypatch.setattr(fake, "instance_state", state)
    fake.fail_on = {"network_leases"}
    inventory = Inventory(fake)
    fleet = by_name(inventory.instances())
    assert fleet["rec-web"].status == "Error" and not fleet["rec-web"].nics
    assert fleet["rec-alt"].status == "Running" and address(fleet["rec-alt"])
    assert any(n.startswith("icfrec-a/rec-web: ") and "unknown" in n for n in inventory.notes)


# ---- the model: the one rule


def test_an_unknown_instance_keeps_the_route_it_last_had() -> None:
    lost = inst("web", status="Error", address="198.18.103.5")
    model = build([lost])
    assert [s.host for s in model.sites] == ["web.example.org"]
    assert model.sites[0].dials == ["198.18.103.5:80"]
    [skip] = model.skipped
    assert skip.unknown and skip.reason == LAST_ROUTE_KEPT
    [row] = explain([lost], model)
    assert row.state == "unknown" and row.routed == ("web.example.org",)
    assert row.reasons == (LAST_ROUTE_KEPT,)


def test_an_unknown_instance_without_a_known_route_holds_its_hosts_unrouted() -> None:
    lost = Instance("default", "web", "Error", config=inst("web").config)
    other = inst("squat", project="other", created_at="2027-01-01T00:00:00Z")
    model = build([lost, other])
    assert model.sites == ()
    assert "already claimed by default/web" in model.rejections[0].reason
    assert model.skipped[0].unknown and "no earlier route" in model.skipped[0].reason


def test_only_an_unknown_instance_takes_the_addresses_it_had_when_it_could_route() -> None:
    lost = Instance("default", "web", "Error", config=inst("web").config)
    running = inst("web", address="198.18.101.7")
    assert with_last_known(lost, running).nics == running.nics
    assert with_last_known(lost, inst("web", status="Stopped")) == lost
    assert with_last_known(lost, None) == lost
    assert with_last_known(running, inst("web", address="198.18.101.9")) == running
    chained = with_last_known(lost, with_last_known(lost, running))  # unknown twice in a row
    assert chained.nics == running.nics


# ---- render: the state file beside the output


def test_render_keeps_an_unknown_instances_route_from_the_state_beside_the_output(
    tmp_path: Path,
) -> None:
    settings = Settings(scheme="http", output=tmp_path / "Caddyfile")
    state = tmp_path / ".Caddyfile.state.json"
    web, api = inst("web", address="198.18.103.5"), inst("api", host="api.example.org")
    target, _file, _caddy = fake_target()
    first = pipeline.apply(settings, [web, api], target)
    assert first.error is None and state.exists()
    lost = Instance("default", "web", "Error", config=web.config)
    report = pipeline.apply(settings, [lost, api], target)
    assert "198.18.103.5:80" in (report.text or "") and report.error is None
    assert report.model is not None and report.model.skipped[0].reason == LAST_ROUTE_KEPT

    state.write_text("{not json")
    report = pipeline.apply(settings, [lost, api], target)
    assert "198.18.103.5" not in (report.text or "")  # no route known: host held, unrouted
    assert any("is not a state this tool wrote" in w for w in report.warnings)

    state.unlink()
    report = pipeline.apply(settings, [lost, api], target)
    assert "198.18.103.5" not in (report.text or "") and not report.warnings  # missing: fine


def test_a_state_from_another_output_is_ignored(tmp_path: Path) -> None:
    web = inst("web", address="198.18.103.5")
    lastknown.remember(Keeper.beside(tmp_path / "other"), [web])
    (tmp_path / ".other.state.json").rename(tmp_path / ".Caddyfile.state.json")
    lost = Instance("default", "web", "Error", config=web.config)
    instances, warnings = lastknown.recall(Keeper.beside(tmp_path / "Caddyfile"), [lost])
    assert instances == [lost] and "was written for" in warnings[0]


def test_the_state_is_written_only_when_it_changes_and_only_read_for_unknowns(
    tmp_path: Path,
) -> None:
    out = Keeper.beside(tmp_path / "Caddyfile")
    web = inst("web", address="198.18.103.5")
    assert lastknown.remember(out, [web, inst("down", status="Stopped")]) is None
    state = out.file
    before = state.stat().st_ino
    lastknown.remember(out, [web])  # the stopped one was not in it anyway
    assert state.stat().st_ino == before
    state.write_text("garbage")  # not read: nobody is unknown
    assert lastknown.recall(out, [web]) == ([web], [])


def test_a_state_that_cannot_be_written_is_a_warning_not_a_failure(tmp_path: Path) -> None:
    out = Keeper.beside(tmp_path / "Caddyfile")
    out.file.mkdir()  # a directory where the file should be
    warning = lastknown.remember(out, [inst("web")])
    assert warning is not None and "last known routes not kept" in warning


# ---- watch: its cache, a member down, and back


def test_watch_keeps_the_last_route_of_an_unknown_instance_and_applies_the_rest() -> None:
    loop = Loop()
    loop.run_for(0.1)
    assert "198.18.77.166:80" in loop.text  # rec-web, a.example.test
    # rec-web's member dies: it lists as Error, its state fails, and so do all leases
    loop.incus.set_status("icfrec-a", "rec-web", "Error")
    loop.incus.fail_on = {"network_leases"}
    loop.watcher.cache.missed_events()  # a full listing (as after a resync)
    loop.incus.set_status("icfrec-a", "rec-alt", "Stopped")  # a change on a healthy member
    loop.emit("icfrec-a", "rec-alt", "instance-stopped")
    loop.run_for(0.5)
    assert loop.watcher.link.connected
    assert "198.18.77.166:80" in loop.text and "alt.example.test" not in loop.text
    assert any("addresses from each instance's state" in line for line in loop.cycle_lines) or (
        "addresses from each instance's state" in loop.log.getvalue()
    )
    # the member is back (no event says so): the unknown instance is listed again every
    # 10 s until it is known, and everything converges without a restart
    loop.incus.set_status("icfrec-a", "rec-web", "Running")
    loop.incus.fail_on = set()
    loop.run_for(10.5, step=0.05)
    back = loop.watcher.cache.get(("icfrec-a", "rec-web"))
    assert back is not None and back.status == "Running" and "198.18.77.166:80" in loop.text
    assert "timer unknown instances" in loop.log.getvalue()
    assert not loop.watcher.unknowns
    cycles = loop.watcher.cycles
    loop.run_for(10.5, step=0.05)
    assert loop.watcher.cycles == cycles  # no more re-listing once nothing is unknown


# ---- the timeout on every Incus request


def test_an_incus_that_does_not_answer_fails_within_the_timeout_naming_the_request(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "silent.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(8)
    held: list[socket.socket] = []
    threading.Thread(
        target=lambda: [held.append(server.accept()[0]) for _ in range(8)], daemon=True
    ).start()
    started = time.monotonic()
    with pytest.raises(IncusError) as caught:
        PylxdApi(path, timeout=0.3)
    took = time.monotonic() - started
    assert 0.25 < took < 2.0
    assert "GET /1.0 got no answer within 0.3 s (--incus-timeout)" in str(caught.value)
    server.close()
    for conn in held:
        conn.close()


def test_incus_timeout_is_a_checked_setting(tmp_path: Path) -> None:
    assert Settings().incus_timeout == 5.0
    assert Settings(incus_timeout=0.5).incus_timeout == 0.5
    with pytest.raises(SettingsError, match="--incus-timeout"):
        Settings(incus_timeout=0)
    config = tmp_path / "s.toml"
    config.write_text('incus-timeout = "soon"\n')
    with pytest.raises(SettingsError, match="incus-timeout must be a number"):
        load_file(config)
    config.write_text("incus-timeout = 2.5\n")
    assert load_file(config)["incus_timeout"] == 2.5
    assert os.environ.get("INCUS_CADDYFILE_INCUS_TIMEOUT") is None  # (the CLI reads it)


def test_a_listing_that_times_out_does_not_hold_back_single_instance_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A member cut off from the network: Incus holds every full listing (20 s in the lab)
    while single instances of the other members answer at once."""
    loop = Loop()
    loop.run_for(0.1)
    listing = loop.incus.list_instances

    def held(*_args: object) -> list[dict[str, Any]]:
        raise IncusTimeout("Incus request GET /1.0/instances got no answer within 5 s")

    monkeypatch.setattr(loop.incus, "list_instances", held)
    loop.watcher.hup()  # a full listing is due
    loop.run_for(0.3)
    assert loop.watcher.link.connected  # not a lost Incus: no reconnect
    assert "tried again in 5 s" in loop.log.getvalue()
    assert not loop.watcher.outage.open(loop.clock())  # leases wait for every member too
    loop.incus.set_status("icfrec-a", "rec-alt", "Stopped")
    loop.emit("icfrec-a", "rec-alt", "instance-stopped")
    loop.run_for(0.3)
    assert "alt.example.test" not in loop.text  # applied at once, the listing still owed
    assert "a.example.test" in loop.text
    loop.run_for(5.0, step=0.05)
    assert "tried again in 10 s" in loop.log.getvalue()  # retried, with backoff
    monkeypatch.setattr(loop.incus, "list_instances", listing)
    loop.run_for(10.5, step=0.05)
    assert loop.watcher.listing_retry.at is None and not loop.watcher.cache.full


def _half_answering(path: str) -> socket.socket:
    """A unix socket that answers GET /1.0 like Incus and never answers anything else."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(8)
    body = b'{"type":"sync","status_code":200,"metadata":{"auth":"trusted","api_extensions":[]}}'

    def serve() -> None:
        held = []
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)
            request = conn.recv(65536)
            if request.startswith(b"GET /1.0 "):
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                    + str(len(body)).encode() + b"\r\n\r\n" + body
                )  # fmt: skip

    threading.Thread(target=serve, daemon=True).start()
    return server


def test_the_event_stream_connect_is_bounded_by_the_timeout_too(tmp_path: Path) -> None:
    server = _half_answering(str(tmp_path / "half.sock"))
    api = PylxdApi(str(tmp_path / "half.sock"), timeout=0.3)
    stream = api.events(lambda event: None, lambda: None)
    started = time.monotonic()
    with pytest.raises(IncusError, match=r"event stream: no answer within 0\.3 s"):
        stream.start()
    assert time.monotonic() - started < 2.0
    with pytest.raises(IncusError, match=r"GET /1\.0/instances got no answer within 0\.3 s"):
        api.list_instances()
    server.close()
