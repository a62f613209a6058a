"""The pipeline's write / check / reload / restore paths, with a file in memory and a fake
Caddy: every exit status of the contract, and "the file on disk is always a config Caddy
accepted"."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from incus_caddyfile import pipeline, targets
from incus_caddyfile.output import Changed
from incus_caddyfile.pipeline import RunMode, Status, apply
from incus_caddyfile.settings import Settings

from .fake_incus import FakeIncus
from .fakes import fake_target
from .helpers import inst

FLEET = [inst("web", host="web.example.org"), inst("api", host="api.example.org")]
SETTINGS = Settings(scheme="http")


def test_a_new_file_is_checked_then_written_then_loaded() -> None:
    target, file, caddy = fake_target()
    report = apply(SETTINGS, FLEET, target)
    assert caddy.calls == ["check", "load"]
    assert report.written and report.reloaded and report.changed is Changed.YES
    assert file.data == (report.text or "").encode() and caddy.loaded == report.text
    assert report.return_code() == Status.OK and report.summary() == "written, Caddy reloaded"


def test_the_same_bytes_are_neither_written_nor_reloaded() -> None:
    target, file, caddy = fake_target()
    apply(SETTINGS, FLEET, target)
    caddy.calls.clear()
    report = apply(SETTINGS, FLEET, target)
    assert caddy.calls == ["running"] and file.writes == 1
    assert report.summary() == "unchanged" and report.return_code() == Status.OK


def test_an_unchanged_file_that_caddy_does_not_run_is_reloaded() -> None:
    target, _file, caddy = fake_target()
    apply(SETTINGS, FLEET, target)
    caddy.loaded = "something else"  # e.g. Caddy restarted with an old config
    report = apply(SETTINGS, FLEET, target)
    assert report.reloaded and caddy.loaded == report.text
    assert "was not running the current file" in report.warnings[0]
    assert apply(SETTINGS, FLEET, target, RunMode(verify_running=False)).reloaded is False


def test_a_config_caddy_rejects_at_check_leaves_the_file_alone() -> None:
    target, file, caddy = fake_target(b"old\n", rejects="api.example.org")
    report = apply(SETTINGS, FLEET, target)
    assert file.data == b"old\n" and caddy.calls == ["check"]
    assert report.return_code() == Status.CADDY_REJECTED
    assert "kept as it was" in report.message


def test_a_config_caddy_rejects_at_load_is_rolled_back() -> None:
    target, file, caddy = fake_target(b"old\n")
    caddy.check = lambda text: "lenient checker"  # type: ignore[method-assign]
    caddy.rejects = "api.example.org"
    report = apply(SETTINGS, FLEET, target)
    assert file.data == b"old\n" and not report.written
    assert report.return_code() == Status.CADDY_REJECTED


def test_a_failed_reload_marks_it_pending_and_the_next_run_retries() -> None:
    target, file, caddy = fake_target(load_fails=True, says_running=False)
    report = apply(SETTINGS, FLEET, target)
    assert report.written and file.marked and report.return_code() == Status.RELOAD_FAILED
    caddy.load_fails = False
    again = apply(SETTINGS, FLEET, target)  # file unchanged; Caddy cannot say what it runs
    assert again.reloaded and not file.marked and again.return_code() == Status.OK
    caddy.calls.clear()
    apply(SETTINGS, FLEET, target)
    assert caddy.calls == ["running"]  # nothing pending: no reload


def test_an_unreachable_checker_warns_and_the_file_is_still_written() -> None:
    target, _file, caddy = fake_target()
    caddy.reachable = False
    report = apply(SETTINGS, FLEET, target)
    assert report.written and "not checked by Caddy" in report.warnings[0]
    assert report.return_code() == Status.RELOAD_FAILED


def test_a_write_that_fails_changes_nothing() -> None:
    target, file, caddy = fake_target(b"old\n")
    file.fail_write = True
    report = apply(SETTINGS, FLEET, target)
    assert file.data == b"old\n" and "load" not in caddy.calls
    assert report.return_code() == Status.WRITE_FAILED


def test_no_reload_writes_only() -> None:
    target, _file, caddy = fake_target()
    report = apply(Settings(scheme="http", reload=False), FLEET, target)
    assert report.written and caddy.calls == ["check"]


@pytest.mark.parametrize("mode", [RunMode(check=True), RunMode(diff=True)])
def test_check_and_diff_write_nothing(mode: RunMode) -> None:
    target, file, caddy = fake_target(b"old\n")
    report = apply(SETTINGS, FLEET, target, mode)
    assert file.data == b"old\n" and caddy.calls == []
    assert report.summary() == "would change"
    expected = Status.WOULD_CHANGE if mode.check else Status.OK
    assert report.return_code() == expected
    assert (report.diff is not None) == mode.diff


def test_rejected_labels_are_exit_3_after_applying_the_rest() -> None:
    target, _file, _ = fake_target()
    report = apply(SETTINGS, [*FLEET, inst("bad", host="bad host!")], target)
    assert report.written and report.return_code() == Status.REJECTED


def test_stdout_only_renders() -> None:
    report = apply(SETTINGS, FLEET, None)
    assert report.text and report.target is None and report.changed is None


def test_an_unreadable_snippets_file_is_a_settings_error(tmp_path: Path) -> None:
    target, file, caddy = fake_target()
    settings = Settings(scheme="http", snippets=tmp_path / "missing.caddy")
    report = apply(settings, FLEET, target)
    assert report.return_code() == Status.USAGE == 2
    assert "settings error: --snippets: cannot read" in report.message
    assert file.data is None and caddy.calls == []


def test_a_broken_template_is_exit_8(tmp_path: Path) -> None:
    template = tmp_path / "t.j2"
    template.write_text("{{ nope }}\n")
    target, file, _ = fake_target()
    report = apply(Settings(template=template), FLEET, target)
    assert report.return_code() == Status.TEMPLATE_ERROR and file.data is None


def test_an_incus_failure_writes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeIncus.from_recording()
    fake.fail_on = {"list_instances"}
    monkeypatch.setattr(pipeline, "connect", lambda settings: fake)
    report = pipeline.run(Settings(output=Path("/nonexistent/Caddyfile")))
    assert report.return_code() == Status.INCUS_ERROR and "nothing was written" in report.message


class CaddyInInstance:
    """What `incus exec` does in an instance that runs Caddy: caddy adapt/reload/version,
    and sh -c "chmod && mv" over the FakeIncus file map."""

    def __init__(self, fake: FakeIncus, rejects: str | None = None) -> None:
        self.fake, self.rejects, self.reloads = fake, rejects, 0

    def __call__(self, project: str, name: str, argv: list[str]) -> tuple[int, str, str]:
        files = self.fake.files.setdefault((project, name), {})
        if argv[:2] == ["caddy", "adapt"]:
            text = files.get(argv[3], b"").decode()
            if self.rejects and self.rejects in text:
                return 1, "", f'{{"level":"error","msg":"adapt: {self.rejects} refused"}}'
            return 0, "{}", ""
        if argv[:2] == ["caddy", "reload"]:
            self.reloads += 1
            return 0, "", ""
        if argv[:2] == ["sh", "-c"]:
            words = shlex.split(argv[2].replace("&&", " && "))
            if "mv" in words:
                source, dest = words[-2], words[-1]
                files[dest] = files.pop(source)
            elif words[:2] == ["rm", "-f"]:
                files.pop(words[2], None)
            return 0, "", ""
        if argv[:2] == ["rm", "-f"]:
            files.pop(argv[2], None)
            return 0, "", ""
        return 127, "", f"{argv[0]}: not found"


INSTANCE = ("icfrec-a", "rec-plain")
IN_INSTANCE = Settings(scheme="http", caddy_instance="/".join(INSTANCE))


def test_a_caddy_inside_an_instance_is_checked_written_and_reloaded_there() -> None:
    fake = FakeIncus.from_recording()
    caddy = CaddyInInstance(fake)
    fake.exec_result = caddy
    target = targets.for_settings(IN_INSTANCE, fake)
    assert target is not None and target.name == "icfrec-a/rec-plain:/etc/caddy/Caddyfile"
    report = apply(IN_INSTANCE, FLEET, target)
    files = fake.files[INSTANCE]
    assert report.written and report.reloaded and caddy.reloads == 1
    assert files["/etc/caddy/Caddyfile"] == (report.text or "").encode()
    assert set(files) == {"/etc/caddy/Caddyfile"}  # the temp file is gone
    fake.exec_result = CaddyInInstance(fake, rejects="api.example.org")
    again = apply(IN_INSTANCE, [*FLEET, inst("x", host="x.example.org")], target)
    assert again.return_code() == Status.CADDY_REJECTED
    assert "api.example.org refused" in again.message
    assert files["/etc/caddy/Caddyfile"] == (report.text or "").encode()


def test_a_caddy_instance_that_cannot_reload_leaves_a_pending_mark_there() -> None:
    fake = FakeIncus.from_recording()
    caddy = CaddyInInstance(fake)

    def no_reload(project: str, name: str, argv: list[str]) -> tuple[int, str, str]:
        if argv[:2] == ["caddy", "reload"]:
            return 1, "", "Error: connection refused"
        return caddy(project, name, argv)

    fake.exec_result = no_reload
    target = targets.for_settings(IN_INSTANCE, fake)
    report = apply(IN_INSTANCE, FLEET, target)
    assert report.return_code() == Status.RELOAD_FAILED
    assert "/etc/caddy/.Caddyfile.reload-pending" in fake.files[INSTANCE]
    fake.exec_result = caddy
    again = apply(IN_INSTANCE, FLEET, target)  # unchanged file, but the mark says reload
    assert again.reloaded and "/etc/caddy/.Caddyfile.reload-pending" not in fake.files[INSTANCE]


def test_an_unreachable_instance_is_a_write_failure() -> None:
    fake = FakeIncus.from_recording()
    fake.fail_on = {"read_file"}
    report = apply(IN_INSTANCE, FLEET, targets.for_settings(IN_INSTANCE, fake))
    assert report.return_code() == Status.WRITE_FAILED
