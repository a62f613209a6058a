"""CLI behaviour without Incus: options, settings precedence, messages, exit codes.

The Incus listing is replaced by plain model data here (the integration tests use the real
daemon); everything after the listing is the real code.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from incus_caddyfile import cli, pipeline
from incus_caddyfile.destinations import LocalFile
from incus_caddyfile.labels import HTTP as L
from incus_caddyfile.model import Instance
from incus_caddyfile.pipeline import Status
from incus_caddyfile.settings import Settings
from incus_caddyfile.targets import Target

from .fakes import FakeCaddy
from .helpers import inst

FLEET = [inst("web", host="web.example.org")]


@pytest.fixture
def fleet(monkeypatch: pytest.MonkeyPatch) -> list[Instance]:
    listing = list(FLEET)
    monkeypatch.setattr(pipeline, "connect", lambda settings: None)
    monkeypatch.setattr(pipeline, "collect", lambda api, *args, **kwargs: listing)
    monkeypatch.setattr(pipeline, "checker", lambda settings, api: FakeCaddy())

    def fake_caddy_target(settings: Settings, api: object) -> Target | None:
        if settings.output is None:
            return None
        return Target(LocalFile(settings.output), FakeCaddy())

    monkeypatch.setattr(pipeline.targets, "for_settings", fake_caddy_target)
    return listing


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli.main, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_render_prints_caddyfile_on_stdout_only(fleet: list[Instance]) -> None:
    code, out, err = invoke("render")
    assert code == 0
    assert "web.example.org {" in out
    assert err == ""


def test_rejections_go_to_stderr_with_exit_3(fleet: list[Instance]) -> None:
    fleet.append(inst("bad", host="bad.example.org", port="http"))
    code, out, err = invoke("render")
    assert code == Status.REJECTED == 3
    assert "bad.example.org" not in out
    assert "warning: rejected default/bad: user.caddyserver.http.upstream.port='http'" in err


def test_incus_unreachable_exits_4_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "Caddyfile"
    code, stdout, err = invoke("render", "--incus", str(tmp_path / "no.socket"), "-o", str(out))
    assert code == Status.INCUS_ERROR == 4
    assert stdout == ""
    assert f"no Incus socket at {tmp_path / 'no.socket'}" in err
    assert "nothing was written" in err
    assert not out.exists()


def test_incus_unreachable_when_printing_prints_nothing(tmp_path: Path) -> None:
    code, stdout, _ = invoke("render", "--incus", str(tmp_path / "no.socket"))
    assert (code, stdout) == (4, "")


def test_flag_beats_env_beats_file_beats_default(fleet: list[Instance], tmp_path: Path) -> None:
    config = tmp_path / "settings.toml"
    config.write_text('email = "file@example.org"\nglobal-option = ["http_port 1111"]\n')
    env = {"INCUS_CADDYFILE_CONFIG": str(config)}
    _, out, _ = invoke("render", env=env)
    assert "email file@example.org" in out and "http_port 1111" in out
    _, out, _ = invoke("render", env={**env, "INCUS_CADDYFILE_EMAIL": "env@example.org"})
    assert "email env@example.org" in out and "http_port 1111" in out
    _, out, _ = invoke(
        "render",
        "--email",
        "flag@example.org",
        env={**env, "INCUS_CADDYFILE_EMAIL": "env@example.org"},
    )
    assert "email flag@example.org" in out


def test_global_option_env_is_one_option_per_line(fleet: list[Instance]) -> None:
    env = {"INCUS_CADDYFILE_GLOBAL_OPTION": "http_port 8080\ndebug\n"}
    _, out, _ = invoke("render", env=env)
    assert "\thttp_port 8080\n\tdebug\n" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--global-option", "admin off"], "set 'admin' with --caddy-admin"),
        (["--global-option", "debug\n}\nimport x"], "must be one non-empty line"),
        (["--wildcard", "example.org"], "must start with '*.'"),
        (["--caddy-admin", "not an address"], "expected host:port"),
        (["--email", "x { y"], "not an email address"),
        (["--check"], "give --output"),
        (["--stream-close-delay", "5 minutes"], "--stream-close-delay: not a duration"),
        (["--dial-timeout", "1s}"], "--dial-timeout: not a duration"),
        (["--lb-try-duration", "-1s"], "--lb-try-duration: not a duration"),
        (["--fail-duration", "1d"], "--fail-duration: not a duration"),
        (["--lb-retries", "-1"], "--lb-retries"),
    ],
)
def test_bad_settings_are_usage_errors(
    fleet: list[Instance], args: list[str], message: str
) -> None:
    code, out, err = invoke("render", *args)
    assert code == Status.USAGE == 2
    assert out == ""
    assert message in err


def test_unknown_key_in_settings_file_is_a_usage_error(tmp_path: Path) -> None:
    config = tmp_path / "s.toml"
    config.write_text('emial = "x@example.org"\n')
    code, _, err = invoke("render", "--config", str(config))
    assert code == 2 and "unknown setting 'emial'" in err


def test_template_error_names_template_and_line(fleet: list[Instance], tmp_path: Path) -> None:
    template = tmp_path / "mine.j2"
    template.write_text("{% for s in sites %}\n{{ s.nope }}\n{% endfor %}\n")
    code, out, err = invoke("render", "--template", str(template))
    assert code == Status.TEMPLATE_ERROR == 8
    assert out == ""
    assert f"{template}:2:" in err and "nope" in err


def test_own_template_gets_the_documented_context(fleet: list[Instance], tmp_path: Path) -> None:
    """Every name the README's "Template context" documents, used once."""
    fleet[:] = [
        inst("web", host="web.example.net"),
        inst(
            "api",
            host="a.example.org",
            address="198.18.0.11",
            **{
                L + "matchers.path": "/api",
                L + "upstream.scheme": "h2c",
                L + "upstream.lb_policy": "first",
                L + "upstream.stream_close_delay": "1h",
            },
        ),
        inst("all", host="*.example.org", address="198.18.0.12"),
    ]
    template = tmp_path / "list.j2"
    template.write_text(
        "{% for s in sites %}{{ s.host }} {{ s.dials|join(',') }} {{ s.instances|join(',') }}"
        " {{ s.only_route.urls|join(',') }} {{ s.has_default }} {{ s.matcher }}|{% endfor %}"
        "{% for w in wildcard_sites %}{{ w.domain }}:"
        "{% for s in w.sites %}{% for r in s.routes %}{{ s.host }}{{ r.path }} {{ r.matcher }}"
        " {{ r.urls|join(',') }} {{ r.upstreams[0].scheme }} {{ r.upstreams[0].url }}"
        " {{ r.options.lb_policy }} {{ r.options.block }} {{ r.fallback }}"
        " {{ r.options.stream_close_delay }} {{ r.tuning.stream_close_delay }}"
        " {{ r.tuning.lb_try_duration }} {{ r.tuning.lb_retries }} {{ r.tuning.dial_timeout }}"
        " {{ r.tuning.fail_duration }} {{ r.tuning.any }} {{ r.block }}"
        " {{ r.instances|join(',') }}{% endfor %}{% endfor %}"
        " {{ w.catch_all.host }}{% endfor %}|"
        "{{ options.any }} {{ options.lines|join(';') }} {{ options.extra|join(';') }}"
        " {{ scheme_prefix }}|{{ snippets_file }}|{{ sites_dir }}|{{ generator }}\n"
    )
    code, out, err = invoke(
        "render",
        "--template",
        str(template),
        "--wildcard",
        "*.example.org",
        "--global-option",
        "servers {",
        "--global-option",
        "protocols h1",
        "--global-option",
        "}",
        "--scheme",
        "http",
    )
    assert code == 0, err
    assert out == (
        "web.example.net 198.18.0.10:80 default/web 198.18.0.10:80 True @web_example_net|"
        "*.example.org:a.example.org/api @path_api h2c://198.18.0.11:80 h2c"
        " h2c://198.18.0.11:80 first True False 1h 1h None 3 1s None True True"
        " default/api *.example.org|"
        "True servers {;\tprotocols h1;} servers {;protocols h1;} http://|None|None"
        "|incus-caddyfile\n"
    )


def test_help_lists_exit_codes_and_examples() -> None:
    for args in (["--help"], ["render", "--help"]):
        code, out, _ = invoke(*args)
        assert code == 0
        assert "Exit codes:" in out and "Example" in out
        for status in Status:
            assert f"  {status.value}  " in out


def test_module_entry_point_runs() -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "incus_caddyfile", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0 and "incus-caddyfile" in proc.stdout


def test_project_policy_from_settings_file(fleet: list[Instance], tmp_path: Path) -> None:
    fleet[:] = [
        inst("shop", project="tenant-a", host="shop.a.example.org"),
        inst("squat", project="tenant-b", host="www.a.example.org", address="198.18.0.20"),
        inst("hidden", project="staging", host="staging.example.org", address="198.18.0.21"),
    ]
    config = tmp_path / "s.toml"
    config.write_text(
        '[projects]\nexclude = ["staging"]\n\n[projects.tenant-a]\ndomains = ["*.a.example.org"]\n'
    )
    code, out, err = invoke("render", "--config", str(config))
    assert code == Status.REJECTED
    assert "shop.a.example.org {" in out
    assert "www.a.example.org" not in out and "staging" not in out
    squat = "rejected tenant-b/squat: user.caddyserver.http.matchers.host='www.a.example.org':"
    assert squat in err
    assert "reserved for project tenant-a by the settings file" in err
    assert "staging" not in err  # projects the settings leave out are silent


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[projects.a]\ndomains = ["x y"]\n', "[projects.a] domains: 'x y'"),
        ('[projects.a]\ndomain = ["a.org"]\n', "may only hold `domains"),
        ("[projects]\ninclude = 'a'\n", "projects.include must be a list"),
    ],
)
def test_bad_policy_is_a_usage_error(tmp_path: Path, toml: str, message: str) -> None:
    config = tmp_path / "s.toml"
    config.write_text(toml)
    code, _, err = invoke("render", "--config", str(config))
    assert code == 2 and message in err


def test_global_option_blocks_span_lines(fleet: list[Instance]) -> None:
    code, out, _ = invoke(
        "render",
        "--global-option",
        "servers {",
        "--global-option",
        "protocols h1 h2",
        "--global-option",
        "}",
    )
    assert code == 0
    assert "\tservers {\n\t\tprotocols h1 h2\n\t}\n" in out


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["servers {"], "a block is not closed"),
        (["}"], "closes no block"),
        (["a { b"], "unbalanced braces"),
    ],
)
def test_global_option_blocks_must_close(
    fleet: list[Instance], lines: list[str], message: str
) -> None:
    args = [a for line in lines for a in ("--global-option", line)]
    code, _, err = invoke("render", *args)
    assert code == 2 and message in err


def test_default_incus_socket_honours_incus_socket_and_incus_dir(tmp_path: Path) -> None:
    from incus_caddyfile.settings import default_incus_socket

    assert default_incus_socket({"INCUS_SOCKET": "/x/s.sock", "INCUS_DIR": "/y"}) == "/x/s.sock"
    assert default_incus_socket({"INCUS_DIR": str(tmp_path)}) == str(tmp_path / "unix.socket")
    assert default_incus_socket({}) in ("/var/lib/incus/unix.socket", "/run/incus/unix.socket")


@pytest.mark.parametrize("command", ["routes", "render"])
def test_an_unreadable_snippets_file_is_a_usage_error(
    fleet: list[Instance], command: str, tmp_path: Path
) -> None:
    """`routes --snippets /missing` used to end in a TemplateError traceback (render: exit 8)."""
    code, out, err = invoke(command, "--snippets", str(tmp_path / "missing.caddy"))
    assert code == 2 and out == ""
    assert "--snippets: cannot read" in err and "Traceback" not in err


# ---- the output file is the operator's


def test_dash_means_stdout(fleet: list[Instance]) -> None:
    code, out, _err = invoke("render", "-o", "-")
    assert code == 0 and out.startswith("# Generated by incus-caddyfile")


@pytest.mark.parametrize("special", ["/dev/null", "fifo", "dir"])
def test_an_output_that_is_not_a_regular_file_is_refused(
    fleet: list[Instance], special: str, tmp_path: Path
) -> None:
    import os

    path = Path(special)
    if special == "fifo":
        path = tmp_path / "fifo"
        os.mkfifo(path)
    elif special == "dir":
        path = tmp_path
    before = os.lstat("/dev/stdout")
    code, out, err = invoke("render", "-o", str(path))
    assert code == 2 and out == ""
    assert "--output" in err and ("not a regular file" in err or "directory" in err)
    assert os.lstat("/dev/stdout") == before  # the system's link is untouched


def test_dev_stdout_is_refused_not_replaced_and_does_not_hang() -> None:
    """`-o /dev/stdout | head` used to replace the system's /dev/stdout link and hang."""
    import os
    import subprocess
    import sys

    before = os.lstat("/dev/stdout")
    proc = subprocess.run(
        f"{sys.executable} -m incus_caddyfile render -o /dev/stdout | head -1",
        shell=True, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert "--output: /dev/stdout is not a regular file" in proc.stderr
    assert os.lstat("/dev/stdout") == before and os.path.islink("/dev/stdout")


def test_output_through_a_symlink_replaces_the_target_and_keeps_the_link(
    fleet: list[Instance], tmp_path: Path
) -> None:
    (tmp_path / "srv").mkdir()
    real = tmp_path / "srv" / "Caddyfile"
    real.write_text("old\n")
    link = tmp_path / "Caddyfile"
    link.symlink_to("srv/Caddyfile")
    code, _, err = invoke("render", "-o", str(link), "--no-reload")
    assert code == 0, err
    assert link.is_symlink() and real.read_text().startswith("# Generated by incus-caddyfile")
    assert sorted(p.name for p in (tmp_path / "srv").iterdir()) == ["Caddyfile"]  # no temp left


def test_relative_imports_are_rendered_absolute(
    fleet: list[Instance], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("snippets.caddy").write_text("(auth) {\n}\n")
    Path("sites").mkdir()
    code, out, _ = invoke("render", "--snippets", "snippets.caddy", "--sites-dir", "sites")
    assert code == 0
    assert f"import {tmp_path}/snippets.caddy\n" in out and f"import {tmp_path}/sites/*" in out


def test_a_sites_dir_that_does_not_exist_is_a_usage_error(
    fleet: list[Instance], tmp_path: Path
) -> None:
    code, _out, err = invoke("render", "--sites-dir", str(tmp_path / "nope"))
    assert code == 2 and "--sites-dir" in err and "is not a directory" in err


def test_watch_without_its_output_directory_fails_at_start(tmp_path: Path) -> None:
    code, _, err = invoke("watch", "-o", str(tmp_path / "missing" / "Caddyfile"))
    assert code == 2 and "does not exist" in err


# ---- messages that name what the operator wrote


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"INCUS_CADDYFILE_RELOAD": "maybe"}, "the environment variable INCUS_CADDYFILE_RELOAD"),
        ({"INCUS_CADDYFILE_SCHEME": "gopher"}, "the environment variable INCUS_CADDYFILE_SCHEME"),
    ],
)
def test_a_bad_environment_value_names_the_variable(env: dict[str, str], named: str) -> None:
    code, _, err = invoke("render", env=env)
    assert code == 2 and named in err and "--reload'" not in err


def test_a_bad_settings_file_value_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "s.toml"
    config.write_text('scheme = "gopher"\n')
    code, _, err = invoke("render", "--config", str(config))
    assert code == 2 and "'scheme' in the settings file" in err


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            '[projects]\ninclude = ["a"]\noutput = "/etc/caddy/Caddyfile"\n',
            "'output' is inside [projects]: settings go before the first [table] header",
        ),
        ('[projects]\nincludes = ["a"]\n', "unknown key 'projects.includes' (did you mean"),
        ('outptu = "x"\n', "unknown setting 'outptu' (did you mean 'output'?)"),
        ('[projects.shop]\ndomain = ["a.org"]\n', "unknown key 'domain' in [projects.shop]"),
    ],
)
def test_settings_file_mistakes_say_where_keys_belong(
    toml: str, message: str, tmp_path: Path
) -> None:
    config = tmp_path / "s.toml"
    config.write_text(toml)
    code, _, err = invoke("render", "--config", str(config))
    assert code == 2 and message in err, err
    assert "may only hold `domains" not in err or "domain" in toml


@pytest.mark.parametrize("admin", ["127.0.0.1:99999", "127.0.0.1:0", "localhost:65536"])
def test_an_admin_port_out_of_range_is_refused(admin: str) -> None:
    code, _, err = invoke("render", "--caddy-admin", admin)
    assert code == 2 and "port 1-65535" in err


def test_a_missing_included_template_is_named(fleet: list[Instance], tmp_path: Path) -> None:
    template = tmp_path / "main.j2"
    template.write_text('# top\n{% include "missing.j2" %}\n')
    code, _, err = invoke("render", "--template", str(template))
    assert code == 8 and "template 'missing.j2' not found" in err and "main.j2:2" in err


def test_reload_command_help_says_there_is_no_shell() -> None:
    _, out, _ = invoke("render", "--help")
    assert "without a shell" in " ".join(out.split())


# ---- routes


def test_routes_shows_paths_reasons_and_duplicate_hosts(
    fleet: list[Instance], tmp_path: Path
) -> None:
    fleet[:] = [
        inst("api", host="bar.localhost", **{L + "matchers.path": "/api"}),
        inst("twice", host="a.localhost a.localhost", address="198.18.0.11"),
        inst("hidden", project="staging", host="s.localhost", address="198.18.0.12"),
    ]
    config = tmp_path / "s.toml"
    config.write_text('[projects]\nexclude = ["staging"]\n')
    code, out, _ = invoke("routes", "--config", str(config))
    assert code == 0
    lines = out.splitlines()
    assert any("bar.localhost/api" in line and "routed" in line for line in lines)
    twice = next(line for line in lines if " twice " in line)
    assert "partly" not in twice and " routed " in twice
    hidden = lines.index(next(line for line in lines if " hidden " in line))
    assert "project not included by the settings" in lines[hidden + 1]


def test_routes_has_its_own_exit_codes_and_no_write_options() -> None:
    _, out, _ = invoke("routes", "--help")
    assert "listed" in out and "Caddy rejected" not in out
    options = [line.split()[0] for line in out.splitlines() if line.startswith("  -")]
    for option in ("-o,", "--output", "--reload-command", "--reload", "--reload / --no-reload"):
        assert option not in options
    code, _, err = invoke("routes", "--output", "x")
    assert code == 2 and "No such option" in err


# ---- traffic settings


def test_traffic_settings_from_flags_environment_and_file(
    fleet: list[Instance], tmp_path: Path
) -> None:
    config = tmp_path / "s.toml"
    config.write_text('stream-close-delay = "1h"\nlb-retries = 7\nfail-duration = "0"\n')
    fleet.append(inst("web2", host="web.example.org", address="198.18.0.11"))
    code, out, err = invoke(
        "render", "--config", str(config), "--dial-timeout", "250ms",
        env={"INCUS_CADDYFILE_LB_TRY_DURATION": "9s"},
    )  # fmt: skip
    assert code == 0, err
    assert "\t\tstream_close_delay 1h\n" in out and "\t\tlb_retries 7\n" in out
    assert "\t\t\tdial_timeout 250ms\n" in out and "\t\tlb_try_duration 9s\n" in out
    assert "fail_duration" not in out  # 0: off, though the pool has two members


def test_all_traffic_settings_off_give_the_plain_directive(fleet: list[Instance]) -> None:
    code, out, _ = invoke(
        "render", "--stream-close-delay", "0", "--lb-try-duration", "0", "--lb-retries", "0",
        "--dial-timeout", "0", "--fail-duration", "0",
    )  # fmt: skip
    assert code == 0 and "\treverse_proxy 198.18.0.10:80\n}" in out


def test_lb_retries_in_the_settings_file_is_a_number(tmp_path: Path) -> None:
    config = tmp_path / "s.toml"
    config.write_text('lb-retries = "3"\n')
    code, _, err = invoke("render", "--config", str(config))
    assert code == 2 and "lb-retries must be a whole number" in err
