"""The examples are real: settings files load, systemd units call valid commands, and the
watch unit reloads Caddy on the admin socket the Caddy drop-in creates."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from incus_caddyfile.cli import main
from incus_caddyfile.settings import FILE_KEYS, load_file

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
UNITS = sorted((EXAMPLES / "systemd").glob("incus-caddyfile*.service"))


def exec_starts(unit: Path) -> list[list[str]]:
    """Every ExecStart of the unit, the commented alternatives too."""
    lines = unit.read_text().splitlines()
    return [
        shlex.split(ln.lstrip("#").split("=", 1)[1])
        for ln in lines
        if ln.lstrip("#").startswith("ExecStart=")
    ]


def test_settings_example_has_every_key_and_loads(tmp_path: Path) -> None:
    text = (EXAMPLES / "incus-caddyfile.toml").read_text()
    for key in FILE_KEYS:
        assert f"{key} =" in text, key
    uncommented = tmp_path / "all.toml"  # every commented-out setting switched on
    uncommented.write_text(
        "\n".join(
            ln[2:] if ln.startswith("# ") and ln[2:].split(" = ")[0] in FILE_KEYS else ln
            for ln in text.splitlines()
        )
    )
    assert load_file(EXAMPLES / "incus-caddyfile.toml")
    assert set(load_file(uncommented)) == set(FILE_KEYS.values())


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_commands_parse(unit: Path) -> None:
    commands = exec_starts(unit)
    assert commands
    for argv in commands:
        assert Path(argv[0]).name == "incus-caddyfile"
        ctx = main.make_context("incus-caddyfile", argv[1:2])  # the command
        command = main.commands[argv[1]]
        command.make_context(argv[1], argv[2:], parent=ctx)  # raises on an unknown option


def test_watch_unit_matches_the_caddy_admin_socket() -> None:
    unit = (EXAMPLES / "systemd" / "incus-caddyfile-watch.service").read_text()
    dropin = (EXAMPLES / "systemd" / "caddy-admin-socket.conf").read_text()
    [argv, *_] = exec_starts(EXAMPLES / "systemd" / "incus-caddyfile-watch.service")
    assert argv[1] == "watch"
    admin = argv[argv.index("--caddy-admin") + 1]
    assert admin == "unix//run/caddy/admin.sock"
    assert "RuntimeDirectory=caddy\n" in dropin  # creates /run/caddy for that socket
    assert f"admin {admin}" in dropin
    assert "Restart=on-failure" in unit
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit


def test_wildcard_example_renders_acme_dns_and_one_wildcard_site(tmp_path: Path) -> None:
    from incus_caddyfile.model import build
    from incus_caddyfile.render import render
    from incus_caddyfile.settings import Settings

    from .helpers import inst

    values = load_file(EXAMPLES / "wildcard" / "incus-caddyfile.toml")
    settings = Settings(
        email=values["email"],
        caddy_admin=values["caddy_admin"],
        wildcards=tuple(values["wildcards"]),
        acme_dns=values["acme_dns"],
    )
    fleet = [inst("a", host="a.example.org"), inst("b", host="b.example.org")]
    text = render(build(fleet, settings.wildcards), settings)
    assert "\tacme_dns cloudflare {env.CF_API_TOKEN}\n" in text
    assert text.count("*.example.org {") == 1
    assert "\t@a_example_org host a.example.org\n" in text
    assert "\thandle {\n\t\tabort\n\t}\n" in text
