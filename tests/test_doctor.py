"""doctor checks the target the settings name, through the objects render uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from incus_caddyfile import doctor
from incus_caddyfile.settings import Settings

from .fake_incus import FakeIncus

EDGE = ("icfrec-a", "rec-plain")  # a recorded instance standing in for a Caddy appliance


@pytest.fixture(autouse=True)
def ports_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Readiness probes answer at once (the recorded addresses are not dialled)."""
    from incus_caddyfile import probe

    monkeypatch.setattr(probe, "accepts", lambda *args, **kwargs: True)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeIncus:
    fake = FakeIncus.from_recording()
    monkeypatch.setattr(doctor, "connect", lambda settings: fake)
    return fake


def caddy_in_instance(project: str, name: str, argv: list[str]) -> tuple[int, str, str]:
    if argv[:2] == ["caddy", "version"]:
        return 0, "v2.11.7 h1:abc\n", ""
    if argv[:2] == ["caddy", "adapt"]:
        return 0, "{}", ""
    return 0, "", ""


def test_caddy_inside_an_instance_is_checked_there(fake: FakeIncus) -> None:
    """It used to check localhost:2019 and print "ok output: stdout"."""
    fake.exec_result = caddy_in_instance
    checks = {c.name: c for c in doctor.run(Settings(caddy_instance="/".join(EDGE)))}
    assert checks["caddy admin"].ok and "icfrec-a/rec-plain" in checks["caddy admin"].detail
    assert checks["caddy accepts"].ok
    assert "caddy adapt in icfrec-a/rec-plain" in checks["caddy accepts"].detail
    assert checks["output"].detail == "icfrec-a/rec-plain:/etc/caddy/Caddyfile can be read"
    assert not any("localhost:2019" in c.detail or "stdout" in c.detail for c in checks.values())
    argvs = [argv for *_, argv in fake.execs]
    assert ["caddy", "version"] in argvs and any(a[:2] == ["caddy", "adapt"] for a in argvs)


def test_a_caddy_instance_without_caddy_fails_with_a_fix(fake: FakeIncus) -> None:
    fake.exec_result = (127, "", "sh: caddy: not found")
    checks = {c.name: c for c in doctor.run(Settings(caddy_instance="/".join(EDGE)))}
    assert not checks["caddy admin"].ok and "no working caddy" in checks["caddy admin"].detail
    assert not checks["caddy accepts"].ok


def test_a_caddy_instance_is_unknown_while_incus_is_down(monkeypatch: pytest.MonkeyPatch) -> None:
    from incus_caddyfile.incus import IncusError

    def down(settings: Settings) -> FakeIncus:
        raise IncusError("no Incus socket at /nowhere")

    monkeypatch.setattr(doctor, "connect", down)
    checks = doctor.run(Settings(caddy_instance="p/edge"))
    assert [c.name for c in checks] == ["incus", "caddy admin", "template"]
    assert not checks[1].ok and "reached through Incus" in checks[1].detail


def test_a_missing_snippets_file_is_named(fake: FakeIncus, tmp_path: Path) -> None:
    settings = Settings(snippets=tmp_path / "missing", output=tmp_path / "Caddyfile")
    checks = {c.name: c for c in doctor.run(settings)}
    assert not checks["template"].ok and "--snippets" in checks["template"].detail
