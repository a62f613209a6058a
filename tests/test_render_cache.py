"""A `render` whose output is not a file on this host (stdout, a Caddy inside an instance)
keeps what `render -o` keeps beside its file in the cache directory instead (lastknown.Keeper):
after an incusd restart empties the lease tables it asks no state of instances still on the
boot it saw, and an instance whose cluster member is down keeps its route."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from incus_caddyfile import cli, lastknown, pipeline, targets
from incus_caddyfile.model import LAST_ROUTE_KEPT
from incus_caddyfile.policy import Policy
from incus_caddyfile.settings import Settings, default_cache_dir

from .fake_incus import FakeIncus
from .fakes import FakeCaddy
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


def member_down(fake: FakeIncus, project: str, name: str) -> None:
    """As real Incus lists an instance whose cluster member is down: Error, no config."""
    fake.set_status(project, name, "Error")
    for key in fake.recorded(project, name).get("expanded_config", {}):
        fake.set_config(project, name, key, None)


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
    member_down(fake, "icfrec-a", "rec-web")
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
    assert lastknown.load(b).problem is not None and not lastknown.load(b).memo
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
    [kept] = kept_files(cache)
    before = kept.read_bytes()
    cache.chmod(0o777)
    without_leases(fake)
    report = stdout(fake, settings)
    assert report.text == first
    assert "rec-web" in state_requests(fake)  # the memo was not taken
    assert any(w.endswith("may be written by others than this user; ignored")
               for w in report.warnings), report.warnings  # fmt: skip
    assert any(w.startswith("last known routes not kept: ") for w in report.warnings)
    assert kept.read_bytes() == before  # nothing is written into such a place either
    member_down(fake, "icfrec-a", "rec-web")
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
    assert any("is not a file only this user may write" in w for w in report.warnings)
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600  # written again, its own
    assert stdout(fake, settings).text == first and state_requests(fake) <= {"rec-ready"}


@pytest.mark.parametrize("place", ["private", "shared"])
def test_a_link_in_the_cache_is_never_written_through(
    fake: FakeIncus, tmp_path: Path, place: str
) -> None:
    """A link planted under the state file's name (its name is predictable) must not make
    a render overwrite what it points to: in a place others may write, nothing is written;
    in the user's own, the link is replaced by the file."""
    cache = tmp_path / "cache"
    settings = Settings(scheme="http", cache_dir=cache)
    keeper = pipeline.state_keeper(settings)
    assert keeper is not None
    cache.mkdir(mode=0o700)
    if place == "shared":
        cache.chmod(0o1777)
    victim = tmp_path / "authorized_keys"
    victim.write_text("ssh-ed25519 AAAA precious\n")
    keeper.file.symlink_to(victim)
    report = stdout(fake, settings)
    assert report.text and victim.read_text() == "ssh-ed25519 AAAA precious\n"
    assert keeper.file.is_symlink() == (place == "shared")
    if place == "private":
        assert json.loads(keeper.file.read_text())["output"] == keeper.owner


def test_a_fifo_in_the_cache_does_not_hang_render(fake: FakeIncus, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    settings = Settings(scheme="http", cache_dir=cache)
    keeper = pipeline.state_keeper(settings)
    assert keeper is not None
    cache.mkdir(mode=0o700)
    os.mkfifo(keeper.file)
    signal.alarm(20)  # a read of the FIFO would block for ever: fail instead
    try:
        report = stdout(fake, settings)
    finally:
        signal.alarm(0)
    assert report.text and keeper.file.is_file()
    assert any("is not a file only this user may write" in w for w in report.warnings)


def test_each_host_and_project_policy_has_its_own_file(tmp_path: Path) -> None:
    """A unix socket's path is the same on every host (a cache on a shared home), and two
    renders that count different projects keep different routes."""
    base = Settings(cache_dir=tmp_path)
    a = pipeline.cache_owner(base)
    assert a.startswith("stdout from ") and f" on {socket.gethostname()}" in a
    only = pipeline.cache_owner(Settings(cache_dir=tmp_path, policy=Policy(include=("a-*",))))
    assert only != a and "a-*" in only
    remote = pipeline.cache_owner(Settings(cache_dir=tmp_path, incus="https://h:8443"))
    assert remote == "stdout from https://h:8443"


def test_odd_inputs_give_warnings_not_tracebacks(fake: FakeIncus, tmp_path: Path) -> None:
    keeper = lastknown.Keeper.cached(tmp_path, "stdout from /run/\udcff/unix.socket")
    assert keeper.file.name.startswith("state-")  # a path that is not UTF-8
    nested = b"[" * 200_000 + b"]" * 200_000
    assert "is not a state this tool wrote" in (lastknown.decode(keeper, nested).problem or "")


def test_the_state_is_kept_with_the_first_target_that_holds_the_config(tmp_path: Path) -> None:
    from incus_caddyfile.settings import parse_target

    from .fakes import MemoryFile
    from .helpers import inst

    cache = tmp_path / "cache"
    settings = Settings(
        scheme="http", cache_dir=cache,
        targets=(parse_target("instance=edge/a", "1"), parse_target("instance=edge/b", "2")),
    )  # fmt: skip
    down = targets.Target(MemoryFile(name="a"), FakeCaddy(name="a", reachable=False), "a")
    up = targets.Target(MemoryFile(name="b"), FakeCaddy(name="b"), "b")
    web = inst("web", address="198.18.103.5")
    report = pipeline.apply_all(settings, [web], [down, up])
    assert report.error is pipeline.Status.PARTIAL
    assert len(kept_files(cache)) == 1  # b serves it: a later run may keep its route


def run_cli(args: list[str], env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli.main, ["render", "--scheme", "http", *args], env=env)


@pytest.mark.parametrize(
    ("args", "env", "file", "kept_in"),
    [
        ([], {}, "", "default"),
        (["--no-cache"], {}, "", None),
        (["--cache-dir", "flag"], {}, "cache = false\n", "flag"),  # a flag beats the file
        ([], {"INCUS_CADDYFILE_CACHE": "false"}, 'cache-dir = "file"\n', None),  # env > file
        (["--no-cache"], {"INCUS_CADDYFILE_CACHE_DIR": "env"}, "", None),  # flag > env
        ([], {"INCUS_CADDYFILE_CACHE_DIR": "env"}, "cache = false\n", "env"),
        (["--cache"], {}, "cache = false\n", "default"),
    ],
)
def test_cache_and_cache_dir_follow_the_precedence_of_their_sources(
    fake: FakeIncus,
    tmp_path: Path,
    own_cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    env: dict[str, str],
    file: str,
    kept_in: str | None,
) -> None:
    monkeypatch.setattr(targets, "all_for_settings", lambda settings, api=None: [])
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "settings.toml"
    config.write_text(file)
    result = run_cli([*args, "--config", str(config)], env=env)
    assert result.exit_code == 3, result.output  # (the recording has rejected labels)
    places = {"default": own_cache_dir, **{n: tmp_path / n for n in ("flag", "env", "file")}}
    assert {n for n, d in places.items() if kept_files(d)} == ({kept_in} if kept_in else set())


def test_an_empty_cache_dir_is_a_usage_error(fake: FakeIncus) -> None:
    result = run_cli(["--cache-dir", ""])
    assert result.exit_code == 2 and "--cache-dir: an empty path" in result.output


def routes_cli(args: list[str]) -> Result:
    return CliRunner().invoke(cli.main, ["routes", "--scheme", "http", *args])


def test_routes_shows_the_route_a_stdout_render_kept_and_says_a_problem_once(
    fake: FakeIncus, tmp_path: Path, own_cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(targets, "all_for_settings", lambda settings, api=None: [])
    monkeypatch.setattr(pipeline, "checker", lambda settings, api: FakeCaddy())
    assert run_cli([]).exit_code == 3
    member_down(fake, "icfrec-a", "rec-web")
    shown = routes_cli([])
    assert shown.exit_code == 0, shown.output
    assert LAST_ROUTE_KEPT in shown.output
    [kept] = kept_files(own_cache_dir)
    kept.write_text("{not json")
    shown = routes_cli([])
    assert shown.output.count("is not a state this tool wrote") == 1, shown.output


def test_routes_reads_the_state_beside_the_settings_file_s_output(
    fake: FakeIncus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not the stdout render's: the file that `render --config` writes is the one whose
    state counts."""
    out = tmp_path / "Caddyfile"
    config = tmp_path / "settings.toml"
    config.write_text(f'output = "{out}"\nreload = false\n')
    monkeypatch.setattr(pipeline, "checker", lambda settings, api: FakeCaddy())
    monkeypatch.setattr(targets, "all_for_settings", lambda settings, api=None: [])
    assert run_cli([]).exit_code == 3  # to stdout: kept in the cache
    member_down(fake, "icfrec-a", "rec-web")
    shown = routes_cli(["--config", str(config)])
    assert LAST_ROUTE_KEPT not in shown.output  # nothing kept beside `out` yet
    assert lastknown.state_path(out).exists() is False


def test_a_run_reads_the_kept_state_once(
    fake: FakeIncus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The memo and the last known routes come from one read of the file, whose problem is
    said once: with an instance in Error, both are needed in the same run."""
    settings = Settings(scheme="http", cache_dir=tmp_path / "cache")
    first = stdout(fake, settings).text
    member_down(fake, "icfrec-a", "rec-web")
    reads: list[lastknown.Keeper] = []
    load = lastknown.load
    monkeypatch.setattr(lastknown, "load", lambda keeper: reads.append(keeper) or load(keeper))
    assert stdout(fake, settings).text == first and len(reads) == 1
    [kept] = kept_files(tmp_path / "cache")
    kept.write_text("{not json")
    report = stdout(fake, settings)
    assert len(reads) == 2
    assert sum("is not a state this tool wrote" in w for w in report.warnings) == 1
