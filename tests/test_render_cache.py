"""A `render` whose output is not a file on this host (stdout, a Caddy inside an instance)
keeps what `render -o` keeps beside its file in the cache directory instead (lastknown.Keeper):
after an incusd restart empties the lease tables it asks no state of instances still on the
boot it saw, and an instance whose cluster member is down keeps its route."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from incus_caddyfile import cli, lastknown, pipeline, targets
from incus_caddyfile.model import LAST_ROUTE_KEPT
from incus_caddyfile.settings import Settings, default_cache_dir

from .fake_incus import FakeIncus
from .test_render_memo import state_requests, without_leases


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeIncus:
    fake = FakeIncus.from_recording()
    monkeypatch.setattr(pipeline, "connect", lambda settings: fake)
    return fake


def stdout(fake: FakeIncus, settings: Settings) -> pipeline.Report:
    fake.calls.clear()
    fake.state_batches.clear()
    report = pipeline.run(settings)
    assert report.error is None, report.message
    return report


def kept_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("state-*.json")) if cache.is_dir() else []


def test_stdout_render_keeps_its_memo_in_the_cache_and_asks_no_state_after_the_leases_go(
    fake: FakeIncus, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    settings = Settings(scheme="http", cache_dir=cache)
    first = stdout(fake, settings).text
    [kept] = kept_files(cache)
    doc = json.loads(kept.read_text())
    assert doc["output"].startswith("stdout from ") and "icfrec-a/rec-web/eth0" in doc["memo"]
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700  # every tenant's labels are in it

    without_leases(fake)
    assert stdout(fake, settings).text == first
    assert state_requests(fake) <= {"rec-ready"}  # require_ready always asks its own

    # started again (a new host-side device): its memo entry is not for this boot
    fake.set_config("icfrec-a", "rec-web", "volatile.eth0.host_name", "vethrestarted")
    fake.set_state("icfrec-a", "rec-web", {"network": {}})
    assert stdout(fake, settings).text != first
    assert "rec-web" in state_requests(fake)


def test_without_a_cache_dir_stdout_render_keeps_nothing_and_asks(
    fake: FakeIncus, tmp_path: Path
) -> None:
    settings = Settings(scheme="http")  # cache_dir None: --no-cache
    first = stdout(fake, settings).text
    without_leases(fake)
    assert stdout(fake, settings).text == first
    assert "rec-web" in state_requests(fake)


def test_stdout_render_keeps_the_route_of_an_instance_whose_member_is_down(
    fake: FakeIncus, tmp_path: Path
) -> None:
    settings = Settings(scheme="http", cache_dir=tmp_path / "cache")
    first = stdout(fake, settings)
    fake.set_status("icfrec-a", "rec-web", "Error")
    for key in fake.recorded("icfrec-a", "rec-web").get("expanded_config", {}):
        fake.set_config("icfrec-a", "rec-web", key, None)  # as real Incus lists it
    report = stdout(fake, settings)
    assert report.text == first.text  # the same route, to the address it last had
    assert report.model is not None
    assert ("rec-web", LAST_ROUTE_KEPT) in [(k.instance, k.reason) for k in report.model.skipped]

    settings = Settings(scheme="http", cache_dir=tmp_path / "empty")  # nothing kept there
    assert stdout(fake, settings).text != first.text


def test_each_incus_and_output_has_its_own_file_and_a_foreign_one_is_ignored(
    fake: FakeIncus, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    here = Settings(scheme="http", cache_dir=cache, incus="/run/a/unix.socket")
    there = Settings(scheme="http", cache_dir=cache, incus="/run/b/unix.socket")
    stdout(fake, here)
    stdout(fake, there)
    assert len(kept_files(cache)) == 2
    a, b = (pipeline.state_keeper(s) for s in (here, there))
    assert a is not None and b is not None and a.file != b.file
    b.file.write_bytes(a.file.read_bytes())  # a copy of another Incus's state: not trusted
    assert lastknown.load(b).problem is not None and not lastknown.memo(b)[0]
    without_leases(fake)
    stdout(fake, there)
    assert "rec-web" in state_requests(fake)  # its memo was not taken


def test_a_cache_that_cannot_be_written_is_a_warning_and_the_caddyfile_is_printed(
    fake: FakeIncus, tmp_path: Path
) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the directory should be")
    report = stdout(fake, Settings(scheme="http", cache_dir=blocker / "sub"))
    assert report.text and any("last known routes not kept" in w for w in report.warnings)


def test_a_caddy_in_an_instance_keeps_its_state_in_the_cache_too(tmp_path: Path) -> None:
    settings = Settings(caddy_instance="edge/caddy", cache_dir=tmp_path / "c")
    keeper = pipeline.state_keeper(settings)
    assert keeper is not None and keeper.file.parent == tmp_path / "c"
    assert keeper.owner.startswith("edge/caddy:/etc/caddy/Caddyfile from ")
    other = pipeline.state_keeper(Settings(caddy_instance="edge/caddy2", cache_dir=tmp_path))
    assert other is not None and other.owner != keeper.owner
    beside = pipeline.state_keeper(Settings(output=tmp_path / "Caddyfile", cache_dir=tmp_path))
    assert beside == lastknown.Keeper.beside(tmp_path / "Caddyfile")  # a file keeps its own


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"XDG_CACHE_HOME": "/x/cache", "HOME": "/home/u"}, "/x/cache/incus-caddyfile"),
        ({"XDG_CACHE_HOME": "relative", "HOME": "/home/u"}, "/home/u/.cache/incus-caddyfile"),
        ({"HOME": "/home/u"}, "/home/u/.cache/incus-caddyfile"),
        ({}, None),
        ({"HOME": ""}, None),
    ],
)
def test_the_default_cache_dir_follows_xdg(env: dict[str, str], expected: str | None) -> None:
    found = default_cache_dir(env)
    assert (str(found) if found else None) == expected


def test_cli_render_to_stdout_uses_the_cache_dir_and_no_cache_keeps_nothing(
    fake: FakeIncus, tmp_path: Path, own_cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(targets, "all_for_settings", lambda settings, api=None: [])
    runner = CliRunner()
    result = runner.invoke(cli.main, ["render", "--scheme", "http", "--no-cache"])
    assert result.exit_code == 3, result.output  # (the recording has rejected labels)
    assert not own_cache_dir.exists()
    result = runner.invoke(cli.main, ["render", "--scheme", "http"])
    assert result.exit_code == 3, result.output  # (the recording has rejected labels)
    assert len(kept_files(own_cache_dir)) == 1  # $XDG_CACHE_HOME/incus-caddyfile
    mine = tmp_path / "mine"
    env = {"INCUS_CADDYFILE_CACHE_DIR": os.path.relpath(mine)}
    result = runner.invoke(cli.main, ["render", "--scheme", "http"], env=env)
    assert result.exit_code == 3, result.output  # (the recording has rejected labels)
    assert len(kept_files(mine)) == 1


def test_a_cache_others_may_write_is_not_read(fake: FakeIncus, tmp_path: Path) -> None:
    """Its routes would be believed for instances in Error, and its addresses after the
    leases go: a state file in a directory another user may write to (a group- or
    world-writable cache directory) is never read, and every run says so."""
    cache = tmp_path / "cache"
    settings = Settings(scheme="http", cache_dir=cache)
    first = stdout(fake, settings).text
    cache.chmod(0o777)
    without_leases(fake)
    report = stdout(fake, settings)
    assert report.text == first
    assert "rec-web" in state_requests(fake)  # the memo was not taken
    assert any("may be written by others" in w for w in report.warnings), report.warnings
    assert any("kept, but not to be read" in w for w in report.warnings), report.warnings
    fake.set_status("icfrec-a", "rec-web", "Error")
    for key in fake.recorded("icfrec-a", "rec-web").get("expanded_config", {}):
        fake.set_config("icfrec-a", "rec-web", key, None)
    assert stdout(fake, settings).text != first  # no route kept from it


def test_a_state_file_others_may_write_is_not_read_and_is_made_private(
    fake: FakeIncus, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    settings = Settings(scheme="http", cache_dir=cache)
    first = stdout(fake, settings).text
    [kept] = kept_files(cache)
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    kept.chmod(0o666)
    without_leases(fake)
    report = stdout(fake, settings)
    assert report.text == first and "rec-web" in state_requests(fake)
    assert any("may be written by others" in w for w in report.warnings), report.warnings
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600  # written again, its own
    assert stdout(fake, settings).text == first and state_requests(fake) <= {"rec-ready"}
