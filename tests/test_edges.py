"""Several Caddy edges (`--target`), with fakes: the target specs and their errors, one render
applied to every target, one target down or rejecting, each target's state in the report,
the watch loop's per-target retries and checks, and the listener's view of the targets."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from incus_caddyfile import pipeline, probe
from incus_caddyfile.caddy import CaddyUnreachable
from incus_caddyfile.cli import main
from incus_caddyfile.edge.keeper import EdgeState
from incus_caddyfile.pipeline import RunMode, Status, apply_all
from incus_caddyfile.settings import Settings, SettingsError, TargetSpec, load_file, parse_target
from incus_caddyfile.targets import Target, all_for_settings
from incus_caddyfile.watch.loop import Watcher, WatchOptions

from .fake_incus import FakeIncus
from .fakes import FakeCaddy, MemoryFile
from .helpers import inst

FLEET = [inst("web", host="web.example.org"), inst("api", host="api.example.org")]
SETTINGS = Settings(scheme="http")


def edges(count: int = 2, **caddy: object) -> list[tuple[Target, MemoryFile, FakeCaddy]]:
    out = []
    for n in range(count):
        name = "abcdef"[n]
        file = MemoryFile(name=f"memory:{name}")
        fake = FakeCaddy(name=f"fake Caddy {name}", **caddy)  # type: ignore[arg-type]
        out.append((Target(file, fake, name), file, fake))
    return out


# ---------------------------------------------------------------- the specs


def test_a_target_spec_names_its_caddy_and_its_file() -> None:
    spec = parse_target("name=a,admin=unix//run/caddy-a.sock,output=/etc/caddy/a/Caddyfile", "t")
    assert (spec.name, spec.admin, spec.output, spec.kind) == (
        "a", "unix//run/caddy-a.sock", Path("/etc/caddy/a/Caddyfile"), "admin"
    )  # fmt: skip
    command = parse_target("command=sh -c 'a, b',output=/x/Caddyfile", "t")
    assert command.command == "sh -c 'a, b'" and command.kind == "command"  # a comma inside
    instance = parse_target("instance=edge/caddy2", "t")
    assert instance.kind == "instance" and instance.label == "edge/caddy2:/etc/caddy/Caddyfile"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("admin=127.0.0.1:2019", "output=FILE is missing"),
        ("output=/x/Caddyfile", "which Caddy?"),
        ("admin=x:1,outptu=/x/C", "unknown key 'outptu' (did you mean 'output'?)"),
        ("admin=localhost:2019,instance=e/c,output=/x/C", "give one of admin, command or instance"),
        ("admin=,output=/x/C", "admin must be a non-empty string"),
        ("just-a-path", "expected KEY=VALUE pairs"),
    ],
)
def test_a_bad_target_spec_names_the_target_and_the_key(text: str, says: str) -> None:
    with pytest.raises(SettingsError, match=r"^--target 2") as error:
        parse_target(text, "--target 2")
    assert says in str(error.value)


def spec(text: str, n: int = 1) -> TargetSpec:
    return parse_target(text, f"--target {n}")


def test_two_targets_with_one_file_are_refused(tmp_path: Path) -> None:
    a = spec(f"admin=localhost:2019,output={tmp_path}/Caddyfile")
    b = spec(f"command=true,output={tmp_path}/./Caddyfile", 2)
    with pytest.raises(SettingsError, match=r"--target 2 .*is --target 1's output too"):
        Settings(targets=(a, b))


def test_edges_on_other_admin_addresses_need_the_admin_option_from_their_environment() -> None:
    a = spec("name=a,admin=127.0.0.1:2020,output=/a/Caddyfile")
    b = spec("name=b,admin=127.0.0.1:2021,output=/b/Caddyfile", 2)
    with pytest.raises(SettingsError, match=r"--target 1 \(a\): admin=127.0.0.1:2020 is not"):
        Settings(targets=(a, b))  # Caddy would move its admin endpoint to localhost:2019
    settings = Settings(targets=(a, b), caddy_admin="{$CADDY_ADMIN}")
    assert [t.name for t in all_for_settings(settings)] == ["a", "b"]
    with pytest.raises(SettingsError, match="--caddy-admin"):
        Settings(caddy_admin="{$CADDY_ADMIN}")  # one target: the tool must connect to it
    inside = spec("instance=edge/c3", 3)
    with pytest.raises(SettingsError, match=r"--target 3 .*: instance: `caddy reload` adapts"):
        Settings(targets=(a, b, inside), caddy_admin="{$CADDY_ADMIN}")


def test_targets_and_the_single_target_flags_do_not_mix() -> None:
    with pytest.raises(SettingsError, match="--output"):
        Settings(output=Path("/x/C"), targets=(spec("admin=localhost:2019,output=/y/C"),))


def test_the_settings_file_takes_targets_tables(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        '[[targets]]\nname = "a"\nadmin = "localhost:2019"\noutput = "/a/Caddyfile"\n'
        '[[targets]]\ninstance = "edge/c2"\n'
    )
    found = load_file(path)["targets"]
    assert [(t.name, t.kind) for t in found] == [("a", "admin"), (None, "instance")]
    path.write_text('[[targets]]\nadmin = "localhost:2019"\noutptu = "/a"\n')
    with pytest.raises(SettingsError, match=r"\[\[targets\]\] 1: unknown key 'outptu'"):
        load_file(path)


def test_a_bad_target_on_the_command_line_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        ["render", "--target", f"admin=localhost:2019,output={tmp_path}/a",
         "--target", "admin=localhost:2019"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "--target 2" in result.output and "output=FILE is missing" in result.output


# ---------------------------------------------------------------- one cycle, every target


def test_one_render_gives_every_target_the_same_bytes() -> None:
    (a, fa, ca), (b, fb, cb) = edges()
    report = apply_all(SETTINGS, FLEET, [a, b])
    assert fa.data == fb.data == (report.text or "").encode() and ca.loaded == cb.loaded
    assert [e.state for e in report.edges] == ["current", "current"]
    assert report.return_code() == Status.OK and report.written and report.reloaded
    assert report.summary() == "a: written, Caddy reloaded; b: written, Caddy reloaded"


def test_a_target_that_is_down_does_not_hold_back_the_others() -> None:
    (a, fa, ca), (b, fb, cb) = edges()
    ca.reachable = False
    report = apply_all(SETTINGS, FLEET, [a, b])
    assert cb.loaded == report.text and fb.data == (report.text or "").encode()
    first, second = report.edges
    assert first.state == "pending" and first.error == Status.RELOAD_FAILED and fa.marked
    assert second.state == "current"
    assert report.return_code() == Status.PARTIAL == 9
    assert report.message.startswith("a: ") and "fake Caddy a is down" in report.message


def test_a_target_slow_to_answer_does_not_delay_the_others() -> None:
    """The targets are applied at once: the first one's Caddy answers only after the second
    one has loaded (applied one after the other, it would wait out its 2 s and fail)."""
    (a, _fa, ca), (b, _fb, cb) = edges()
    loaded = threading.Event()

    def slow_load(text: str) -> None:
        if not loaded.wait(2.0):
            raise CaddyUnreachable("timed out")
        FakeCaddy.load(ca, text)

    def fast_load(text: str) -> None:
        FakeCaddy.load(cb, text)
        loaded.set()

    ca.load = slow_load  # type: ignore[method-assign]
    cb.load = fast_load  # type: ignore[method-assign]
    report = apply_all(SETTINGS, FLEET, [a, b])
    assert [e.state for e in report.edges] == ["current", "current"]
    assert ca.loaded == cb.loaded == report.text


def test_every_target_down_is_that_failure() -> None:
    (a, _fa, ca), (b, _fb, cb) = edges()
    ca.reachable = cb.reachable = False
    report = apply_all(SETTINGS, FLEET, [a, b])
    assert report.return_code() == Status.RELOAD_FAILED
    assert [e.state for e in report.edges] == ["pending", "pending"]


def test_a_target_that_refuses_the_whole_config_fails_alone() -> None:
    (a, fa, _ca), (b, _fb, cb) = edges()
    a.caddy.rejects = "# Generated by incus-caddyfile"  # type: ignore[attr-defined]
    report = apply_all(SETTINGS, FLEET, [a, b])
    assert fa.data is None and cb.loaded == report.text
    assert [e.state for e in report.edges] == ["failed", "current"]
    assert report.return_code() == Status.PARTIAL


def test_a_route_one_target_refuses_is_kept_out_of_every_target() -> None:
    """The edges must serve the same routes: the second Caddy refuses api's route (another
    version, a missing module), so neither serves it, and the first is loaded again."""
    (a, fa, ca), (b, fb, cb) = edges()
    cb.rejects = "api.example.org"
    report = apply_all(SETTINGS, FLEET, [a, b])
    assert "api.example.org" not in (report.text or "") and "web.example.org" in report.text
    assert fa.data == fb.data == report.text.encode() and ca.loaded == cb.loaded == report.text
    assert ca.loads == 2  # first with api's route, then without it
    [verdict] = [r for r in report.model.rejections if r.instance == "api"]  # type: ignore[union-attr]
    assert verdict.reason.endswith("(at b)") and "Caddy refused its route" in verdict.reason
    assert report.return_code() == Status.REJECTED
    assert [e.state for e in report.edges] == ["current", "current"]


def test_check_and_diff_cover_every_target() -> None:
    (a, _fa, _ca), (b, fb, _cb) = edges()
    apply_all(SETTINGS, FLEET, [a])  # a is current, b has no file yet
    report = apply_all(SETTINGS, FLEET, [a, b], RunMode(check=True, diff=True))
    assert report.return_code() == Status.WOULD_CHANGE and fb.data is None
    assert (report.diff or "").startswith("--- b (on disk)\n+++ b\n") and "--- a" not in report.diff


def test_only_the_targets_named_are_asked_what_they_run() -> None:
    (a, _fa, ca), (b, _fb, cb) = edges()
    apply_all(SETTINGS, FLEET, [a, b])
    ca.calls.clear()
    cb.calls.clear()
    apply_all(SETTINGS, FLEET, [a, b], verify={"b"})
    assert ca.calls == [] and cb.calls == ["running"]


# ---------------------------------------------------------------- watch


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def ports_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe, "accepts", lambda *args, **kwargs: True)


def watcher(two: list[Target], observer: EdgeState | None = None) -> tuple[Watcher, Clock]:
    clock = Clock()
    incus = FakeIncus.from_recording()
    w = Watcher(
        lambda: SETTINGS,
        WatchOptions(debounce_max=0.2),
        connect=lambda settings: incus,
        clock=clock,
        make_targets=lambda settings, api: two,
        observer=observer,
    )
    w.log.stream = io.StringIO()
    w.begin()
    return w, clock


def run_for(w: Watcher, clock: Clock, seconds: float, step: float = 0.01) -> None:
    end = clock.now + seconds
    while clock.now < end:
        w.step()
        clock.now = round(clock.now + step, 6)


def test_watch_brings_a_target_that_comes_back_current_without_an_event() -> None:
    (a, fa, ca), (b, fb, cb) = edges()
    cb.reachable = False
    w, clock = watcher([a, b])
    run_for(w, clock, 0.1)
    assert ca.loaded is not None and fa.data == fb.data  # b's file is written, its reload owed
    assert "b" in w.retries and "a" not in w.retries
    run_for(w, clock, 3.5)  # retries at 1 s and 2 s more: b still down; a is not asked
    assert cb.loaded is None and ca.calls.count("running") == 0
    cb.reachable = True  # b's Caddy is back, with whatever config it had
    run_for(w, clock, 4.5)  # the next retry (backoff: 4 s, at most 5 s)
    assert cb.loaded == ca.loaded and not w.retries and not fb.marked
    lines = w.log.stream.getvalue().splitlines()  # type: ignore[attr-defined]
    assert any(
        "(after retry b)" in line and "b: unchanged, Caddy reloaded" in line for line in lines
    )


def test_the_periodic_check_reloads_one_target_restarted_behind_our_back() -> None:
    (a, _fa, ca), (b, _fb, cb) = edges()
    w, clock = watcher([a, b])
    run_for(w, clock, 0.1)
    good = cb.loaded
    cb.loaded = "a stub config"  # b's Caddy restarted from another config
    run_for(w, clock, 10.5)
    assert cb.loaded == good and ca.loads == 1 and cb.loads == 2


def test_the_listener_shows_each_target_and_is_not_ready_while_one_lags() -> None:
    (a, _fa, _ca), (b, _fb, cb) = edges()
    cb.reachable = False
    state = EdgeState(process_metrics=False)
    w, clock = watcher([a, b], state)
    run_for(w, clock, 0.1)
    snap = state.board.current()
    assert [(t.name, t.state) for t in snap.targets] == [("a", "current"), ("b", "pending")]
    ready, why = snap.readiness()
    assert not ready and why.startswith("not every target runs the current file: b pending")
    served = snap.state_json(clock(), "test")
    assert (
        served["targets"][1]["state"] == "pending" and "is down" in served["targets"][1]["reason"]
    )
    metrics = state.metrics.exposition().decode()
    assert 'incus_caddyfile_target_current{target="a"} 1.0' in metrics
    assert 'incus_caddyfile_target_current{target="b"} 0.0' in metrics
    cb.reachable = True
    run_for(w, clock, 1.5)
    snap = state.board.current()
    assert [t.state for t in snap.targets] == ["current", "current"] and snap.readiness()[0]


def test_doctor_from_a_watch_checks_each_target(monkeypatch: pytest.MonkeyPatch) -> None:
    from incus_caddyfile.edge import client

    state = {
        "version": "t", "ready": False, "reason": "r", "incus": {"connected": True},
        "caddy": {"current": False}, "counts": {},
        "targets": [{"name": "a", "state": "current", "reason": ""},
                    {"name": "b", "state": "failed", "reason": "refused"}],
    }  # fmt: skip
    monkeypatch.setattr(client, "get_json", lambda url, path, token: json.loads(json.dumps(state)))
    checks = {c.name: c for c in client.doctor_checks("127.0.0.1:1", None)}
    assert checks["target a"].ok and not checks["target b"].ok
    assert checks["target b"].detail == "failed: refused"


def test_routes_reports_each_targets_state(monkeypatch: pytest.MonkeyPatch) -> None:
    (a, _fa, ca), (b, _fb, cb) = edges()
    ca.loaded = None
    cb.reachable = False
    fake = FakeIncus.from_recording()
    monkeypatch.setattr(pipeline, "connect", lambda settings: fake)
    monkeypatch.setattr(pipeline.targets, "all_for_settings", lambda settings, api: [a, b])
    settings = Settings(scheme="http", targets=(spec("admin=localhost:2019,output=/a/C"),))
    _rows, _warnings, states = pipeline.routes(settings)
    assert [(s.name, s.state) for s in states] == [("a", "pending"), ("b", "failed")]


def test_the_settings_example_s_targets_load(tmp_path: Path) -> None:
    """examples/incus-caddyfile.toml: its commented [[targets]] switched on (and its single
    `output` off) give two valid targets."""
    text = (Path(__file__).resolve().parents[1] / "examples" / "incus-caddyfile.toml").read_text()
    head, _, block = text.partition("# [[targets]]")
    block = "# [[targets]]" + block
    on = "\n".join(ln[2:] if ln.startswith("# ") else "" if ln == "#" else ln
                   for ln in block.splitlines())  # fmt: skip
    head = "\n".join(ln for ln in head.splitlines() if not ln.startswith("output ="))
    path = tmp_path / "edges.toml"
    path.write_text(head + "\n" + on + "\n")
    values = load_file(path)
    settings = Settings(caddy_admin=values["caddy_admin"], targets=values["targets"], scheme="http")
    assert [t.label for t in settings.targets] == ["edge1", "edge2"]


def test_doctor_names_each_target_s_checks(tmp_path: Path) -> None:
    from incus_caddyfile import doctor
    from incus_caddyfile.destinations import LocalFile

    checks = [
        doctor._output_check(
            Target(LocalFile(tmp_path / n / "Caddyfile"), FakeCaddy(), n), f"output ({n})"
        )
        for n in ("a", "b")
    ]
    (tmp_path / "a").mkdir()
    checks.append(
        doctor._output_check(Target(LocalFile(tmp_path / "a" / "C"), FakeCaddy()), "output (a)")
    )
    assert [(c.name, c.ok) for c in checks] == [
        ("output (a)", False), ("output (b)", False), ("output (a)", True)
    ]  # fmt: skip


def test_with_several_targets_an_unknown_instance_keeps_its_route(tmp_path: Path) -> None:
    """The last known routes are kept beside the first target that writes a file here, and
    every target gets them while the instance's member is unreachable."""
    from incus_caddyfile.destinations import LocalFile
    from incus_caddyfile.model import Instance

    out = tmp_path / "Caddyfile"
    settings = Settings(
        scheme="http",
        targets=(spec("instance=edge/caddy", 1), spec(f"command=true,output={out}", 2)),
    )
    ((_, far, _),) = edges(1)  # stands for the Caddy inside an instance: no state kept there
    two = [Target(far, FakeCaddy(name="fake b"), "b"), Target(LocalFile(out), FakeCaddy(), "a")]
    web, api = inst("web", address="198.18.103.5"), inst("api", host="api.example.org")
    first = apply_all(settings, [web, api], two)
    assert first.error is None and (tmp_path / ".Caddyfile.state.json").exists()
    lost = Instance("default", "web", "Error", config=web.config)
    report = apply_all(settings, [lost, api], two)
    assert report.error is None, report.message
    assert "198.18.103.5:80" in out.read_text() and "198.18.103.5:80" in far.data.decode()


def test_with_several_targets_all_in_instances_the_state_is_kept_in_the_cache(
    tmp_path: Path,
) -> None:
    """No target writes a file here: the last known routes are kept in the cache directory
    (once), and a state that cannot be used is said in the cycle's warnings, not lost among
    the targets' own."""
    from incus_caddyfile.model import Instance

    cache = tmp_path / "cache"
    settings = Settings(
        scheme="http", cache_dir=cache,
        targets=(spec("instance=edge/caddy", 1), spec("instance=edge/caddy2", 2)),
    )  # fmt: skip
    pair = [t for t, _, _ in edges(2)]
    web, api = inst("web", address="198.18.103.5"), inst("api", host="api.example.org")
    assert apply_all(settings, [web, api], pair).error is None
    [kept] = list(cache.glob("state-*.json"))
    assert "edge/caddy:/etc/caddy/Caddyfile, edge/caddy2:" in json.loads(kept.read_text())["output"]
    lost = Instance("default", "web", "Error", config=web.config)
    report = apply_all(settings, [lost, api], pair)
    assert "198.18.103.5:80" in (report.text or "")
    kept.write_text("{not json")
    report = apply_all(settings, [lost, api], pair)
    assert "198.18.103.5:80" not in (report.text or "")
    assert any("is not a state this tool wrote" in w for w in report.warnings), report.warnings
