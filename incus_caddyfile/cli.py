"""The command line: options in, one library call, messages out, errors to exit codes."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from . import __version__, pipeline, targets
from .edge.snapshot import routes_json, rows_from_json
from .incus import IncusError
from .labels import (
    DEFAULT_DIAL_TIMEOUT,
    DEFAULT_FAIL_DURATION,
    DEFAULT_LB_RETRIES,
    DEFAULT_LB_TRY_DURATION,
    DEFAULT_STREAM_CLOSE_DELAY,
)
from .model import RouteRow
from .pipeline import EXIT_CODES_HELP, Report, RunMode, Status
from .render import TemplateError
from .settings import (
    DEFAULT_INCUS_TIMEOUT,
    DEFAULT_RELOAD_BURST,
    ENV_PREFIX,
    FILE_KEYS,
    Settings,
    SettingsError,
    TargetSpec,
    check_paths,
    default_cache_dir,
    load_file,
    load_policy,
    parse_target,
)

F = TypeVar("F", bound=Callable[..., Any])
FILE_KEY_OF = {param: key for key, param in FILE_KEYS.items()}


class _Option(click.Option):
    """An option whose bad value is blamed on where it came from: the flag, the environment
    variable, or the settings file's key."""

    def get_error_hint(self, ctx: click.Context | None) -> str:
        source = ctx.get_parameter_source(self.name) if ctx and self.name else None
        if source is click.core.ParameterSource.ENVIRONMENT and self.envvar:
            names = [self.envvar] if isinstance(self.envvar, str) else list(self.envvar)
            used = next((n for n in names if n in os.environ), names[0])
            return f"the environment variable {used}"
        if source is click.core.ParameterSource.DEFAULT_MAP and self.name:
            return f"'{FILE_KEY_OF.get(self.name, self.name)}' in the settings file"
        return super().get_error_hint(ctx)


def option(*names: str, **attrs: Any) -> Callable[[F], F]:
    return click.option(*names, cls=_Option, **attrs)


class _LinesType(click.ParamType):  # type: ignore[type-arg]
    """A string option whose environment variable holds one value per line."""

    name = "line"
    envvar_list_splitter = "\n"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return str(value).strip() if isinstance(value, str) else value


class _TargetType(click.ParamType):  # type: ignore[type-arg]
    """`--target KEY=VALUE,...` (parsed with the settings, so that a bad one names its key);
    the settings file's `[[targets]]` arrive parsed already."""

    name = "target"
    envvar_list_splitter = "\n"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return value if isinstance(value, TargetSpec) else str(value).strip()


def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """--config is eager: its values become click defaults, below flags and env variables."""
    if value:
        try:
            ctx.default_map = {**(ctx.default_map or {}), **load_file(Path(value))}
        except SettingsError as exc:
            raise click.UsageError(str(exc)) from None
    return value


def _env(name: str) -> str:
    return ENV_PREFIX + name


def _apply(func: F, options: list[Callable[[Any], Any]]) -> F:
    for option in reversed(options):
        func = option(func)
    return func


def settings_options(func: F) -> F:
    """The options every command that renders and writes shares (settings, in precedence
    order)."""
    return _apply(func, SOURCE_OPTIONS + RENDER_OPTIONS + WRITE_OPTIONS)


def view_options(func: F) -> F:
    """The options of a command that renders but writes nothing (`routes`; its targets are
    asked what they run)."""
    return _apply(func, SOURCE_OPTIONS + RENDER_OPTIONS + [TARGET_OPTION])


SOURCE_OPTIONS: list[Callable[[Any], Any]] = [
    option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False),
        envvar=_env("CONFIG"),
        is_eager=True,
        expose_value=True,
        callback=_load_config,
        help="TOML settings file; keys are the long option names (e.g. caddy-admin).",
    ),
    option(
        "--incus",
        envvar=_env("INCUS"),
        metavar="PATH|URL",
        help="Incus unix socket, or https://HOST:8443 for a remote one. Default: $INCUS_SOCKET,"
        " $INCUS_DIR/unix.socket, /var/lib/incus/unix.socket or /run/incus/unix.socket.",
    ),
    option(
        "--incus-cert",
        envvar=_env("INCUS_CERT"),
        metavar="FILE",
        help="Client certificate for a remote Incus (default: the incus client's own).",
    ),
    option(
        "--incus-key",
        envvar=_env("INCUS_KEY"),
        metavar="FILE",
        help="Key of --incus-cert.",
    ),
    option(
        "--incus-server-cert",
        envvar=_env("INCUS_SERVER_CERT"),
        metavar="FILE",
        help="Pin the remote Incus server's certificate (e.g. its server.crt).",
    ),
    option(
        "--incus-timeout",
        type=click.FloatRange(0, 3600, min_open=True),
        default=DEFAULT_INCUS_TIMEOUT,
        show_default=True,
        envvar=_env("INCUS_TIMEOUT"),
        metavar="SECONDS",
        help="How long one Incus request may take (connecting, and waiting for each answer)"
        " before it fails, naming the request; e.g. a cluster member cut off.",
    ),
]
RENDER_OPTIONS: list[Callable[[Any], Any]] = [
    option(
        "--template",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar=_env("TEMPLATE"),
        help="Your own Jinja template instead of the default.",
    ),
    click.option("--email", envvar=_env("EMAIL"), help="ACME account email (global option)."),
    option(
        "--caddy-admin",
        envvar=_env("CADDY_ADMIN"),
        metavar="ADDR",
        help="Caddy admin endpoint, host:port or unix//path; rendered as the admin option"
        " and used to check and reload. Default: localhost:2019.",
    ),
    option(
        "--global-option",
        "global_options",
        multiple=True,
        type=_LinesType(),
        envvar=_env("GLOBAL_OPTION"),
        metavar="LINE",
        help="Extra global option line, repeatable, e.g. 'http_port 8080'"
        " (one per line in the environment variable).",
    ),
    option(
        "--wildcard",
        "wildcards",
        multiple=True,
        envvar=_env("WILDCARD"),
        metavar="*.DOMAIN",
        help="Serve hosts under this wildcard from one site with one wildcard"
        " certificate; repeatable.",
    ),
    option(
        "--acme-dns",
        envvar=_env("ACME_DNS"),
        metavar="'PROVIDER ARGS'",
        help="acme_dns global option, needed for wildcard certificates.",
    ),
    option(
        "--scheme",
        type=click.Choice(["https", "http"]),
        default="https",
        envvar=_env("SCHEME"),
        show_default=True,
        help="https: Caddy's automatic HTTPS; http: plain-HTTP sites (behind another"
        " TLS terminator, or a lab).",
    ),
    option(
        "--caddy-instance",
        envvar=_env("CADDY_INSTANCE"),
        metavar="PROJECT/NAME",
        help="Caddy runs in this Incus instance: write --output (default /etc/caddy/Caddyfile)"
        " there through the Incus file API, check and reload it with caddy (exec).",
    ),
    option(
        "--snippets",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar=_env("SNIPPETS"),
        metavar="FILE",
        help="Caddyfile of your snippets `(name) { ... }`; imported, and instances may name"
        " them in user.caddyserver.http.import.",
    ),
    option(
        "--sites-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar=_env("SITES_DIR"),
        metavar="DIR",
        help="Directory of your own hand-written site files, imported at the end.",
    ),
    option(
        "--stream-close-delay",
        default=DEFAULT_STREAM_CLOSE_DELAY,
        show_default=True,
        envvar=_env("STREAM_CLOSE_DELAY"),
        metavar="DURATION",
        help="Websockets and other upgraded connections outlive a reload by this long"
        " (stream_close_delay); 0: closed at every reload. An instance's"
        " upstream.stream_close_delay label sets its pool's.",
    ),
    option(
        "--lb-try-duration",
        default=DEFAULT_LB_TRY_DURATION,
        show_default=True,
        envvar=_env("LB_TRY_DURATION"),
        metavar="DURATION",
        help="A request whose upstream cannot be reached is tried again for up to this long,"
        " 250 ms apart (lb_try_duration); 0: off. A reload during that wait makes it a 502.",
    ),
    option(
        "--lb-retries",
        type=click.IntRange(0, 100),
        default=DEFAULT_LB_RETRIES,
        show_default=True,
        envvar=_env("LB_RETRIES"),
        metavar="N",
        help="A request whose upstream cannot be reached is tried again at once, on another"
        " member, at most this many times (lb_retries); 0: off.",
    ),
    option(
        "--dial-timeout",
        default=DEFAULT_DIAL_TIMEOUT,
        show_default=True,
        envvar=_env("DIAL_TIMEOUT"),
        metavar="DURATION",
        help="How long a connection to an instance may take before the request is retried"
        " elsewhere (transport dial_timeout); 0: Caddy's default (3s).",
    ),
    option(
        "--fail-duration",
        default=DEFAULT_FAIL_DURATION,
        show_default=True,
        envvar=_env("FAIL_DURATION"),
        metavar="DURATION",
        help="Passive health in pools of two or more: a member that failed is left out for"
        " this long (fail_duration); 0: off.",
    ),
    option(
        "--cache-dir",
        envvar=_env("CACHE_DIR"),
        metavar="DIR",
        help="For an output that is not a file on this host (stdout, --caddy-instance), the"
        " routes and addresses the last run saw are kept here (an output file keeps them"
        " beside itself): an instance whose cluster member is unreachable keeps its route,"
        " and an address the lease tables lost costs no request. Default:"
        " $XDG_CACHE_HOME/incus-caddyfile, else ~/.cache/incus-caddyfile.",
    ),
    option(
        "--cache/--no-cache",
        default=True,
        envvar=_env("CACHE"),
        show_default=True,
        help="--no-cache: keep nothing in --cache-dir (a render to stdout then remembers"
        " nothing). A --cache-dir from a stronger source (flag, then variable, then settings"
        " file) turns it back on, as does --cache.",
    ),
    option(
        "--caddy-bin",
        envvar=_env("CADDY_BIN"),
        metavar="PATH",
        help="caddy executable used to check the config when the admin API is not"
        " reachable. Default: caddy on PATH.",
    ),
]


TARGET_OPTION = option(
    "--target",
    "targets",
    multiple=True,
    type=_TargetType(),
    envvar=_env("TARGET"),
    metavar="KEY=VALUE,...",
    help="One Caddy edge of several, repeatable: admin=ADDR (or command=CMD, or"
    " instance=PROJECT/NAME), output=FILE, and optionally name=, caddy-bin=. Every target"
    " gets the same bytes. Instead of --output/--reload-command/--caddy-instance (one target).",
)
# What only a command that writes the file uses (not `routes`).
WRITE_OPTIONS: list[Callable[[Any], Any]] = [
    TARGET_OPTION,
    option(
        "--output",
        "-o",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar=_env("OUTPUT"),
        help="Write here (atomically) instead of printing.",
    ),
    option(
        "--reload-command",
        envvar=_env("RELOAD_COMMAND"),
        metavar="CMD",
        help="Reload with this command (e.g. 'systemctl reload caddy') instead of the admin"
        " API. Split like a shell would (quotes group words) but run without a shell: no"
        " pipes, redirections or $VARS (write a script for those).",
    ),
    option(
        "--reload/--no-reload",
        default=True,
        envvar=_env("RELOAD"),
        show_default=True,
        help="Reload Caddy after the file changed.",
    ),
]


# The listener's token: watch checks it, routes and doctor --from send it.
TOKEN_OPTIONS: list[Callable[[Any], Any]] = [
    option(
        "--listen-token",
        envvar=_env("LISTEN_TOKEN"),
        metavar="TOKEN",
        help="Token of watch's listener: every request but /healthz carries it (Bearer, or"
        " the Basic password).",
    ),
    option(
        "--listen-token-file",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar=_env("LISTEN_TOKEN_FILE"),
        metavar="FILE",
        help="Read the token from this file's first line.",
    ),
]


def on_demand_option(func: F) -> F:
    return option(
        "--on-demand-tls/--no-on-demand-tls",
        default=False,
        envvar=_env("ON_DEMAND_TLS"),
        show_default=True,
        help="Get each site's certificate at its first TLS handshake, and only for hosts an"
        " instance routes (Caddy asks watch --listen's /ask). watch only: render refuses it.",
    )(func)


def token_options(func: F) -> F:
    return _apply(func, TOKEN_OPTIONS)


def from_options(func: F) -> F:
    """`--from URL` and the token: read a running watch instead of Incus and Caddy."""
    return _apply(
        func,
        [
            option(
                "--from",
                "from_url",
                envvar=_env("FROM"),
                metavar="URL",
                help="Read what a running `watch --listen` sees, at URL (127.0.0.1:PORT,"
                " http://HOST:PORT or unix//path), instead of asking Incus and Caddy.",
            ),
            *TOKEN_OPTIONS,
        ],
    )


def _from_token(token: str | None, token_file: Path | None) -> str | None:
    from .edge.serve import EdgeSetupError, read_token

    try:
        return read_token(token, token_file)
    except EdgeSetupError as exc:
        raise click.UsageError(str(exc)) from None


def make_settings(**kwargs: Any) -> Settings:
    """Options to the frozen Settings value; invalid settings are usage errors (exit 2)."""
    config = Path(kwargs.pop("config_file")) if kwargs.get("config_file") else None
    cache = bool(kwargs.pop("cache", True))
    values = {k: v for k, v in kwargs.items() if v is not None}
    if str(values.get("output")) == "-":  # -o - : stdout, as if no --output
        del values["output"]
    for name in ("template", "output", "snippets", "sites_dir"):
        if name in values:
            values[name] = Path(values[name])
    for name in ("snippets", "sites_dir"):  # rendered into import lines, which Caddy
        if name in values:  # resolves against its own working directory, not ours
            values[name] = Path(os.path.abspath(values[name]))
    if "global_options" in values:
        values["global_options"] = tuple(o for o in values["global_options"] if o)  # blank lines
    if "wildcards" in values:
        values["wildcards"] = tuple(values["wildcards"])
    try:
        if "targets" in values:
            values["targets"] = tuple(
                t if isinstance(t, TargetSpec) else parse_target(t, f"--target {n}")
                for n, t in enumerate((t for t in values["targets"] if t), 1)
            )
        values["cache_dir"] = _cache_dir(cache, values.get("cache_dir"))
        settings = Settings(**values, config_file=config, policy=load_policy(config))
        check_paths(settings)
        return settings
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None


# Where a value came from, weakest first: the precedence of flags, variables and the file.
_SOURCE_RANK = {
    click.core.ParameterSource.DEFAULT_MAP: 1,
    click.core.ParameterSource.ENVIRONMENT: 2,
    click.core.ParameterSource.COMMANDLINE: 3,
}


def _rank(name: str) -> int:
    ctx = click.get_current_context(silent=True)
    source = ctx.get_parameter_source(name) if ctx is not None else None
    return _SOURCE_RANK.get(source, 0) if source is not None else 0


def _cache_dir(cache: bool, given: Path | str | None) -> Path | None:
    """--cache-dir (made absolute), else the default; None with --no-cache, unless the
    directory was given by a stronger source than it (one option, two names)."""
    if given is not None and not str(given).strip():
        raise SettingsError("--cache-dir: an empty path (use --no-cache to keep nothing)")
    if not cache and _rank("cache") >= _rank("cache_dir"):
        return None
    return Path(os.path.abspath(given)) if given else default_cache_dir()


def _say(message: str) -> None:
    click.echo(f"incus-caddyfile: {message}", err=True)


def print_report(report: Report, quiet: bool) -> None:
    """Messages go to stderr; stdout is only the Caddyfile or the diff."""
    if report.model is not None:
        for rejection in report.model.rejections:
            _say(f"warning: {rejection}")
        if not quiet:  # projects the settings leave out are not news
            for skip in report.model.skipped:
                if not skip.excluded:
                    _say(str(skip))
    for warning in report.warnings:
        _say(f"warning: {warning}")
    if report.error is not None and not report.edges:  # several: one line per target
        _say(f"error: {report.message}")


EXIT_EPILOG = "Exit codes:\n\n\b\n" + EXIT_CODES_HELP


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_EPILOG)
@click.version_option(__version__, prog_name="incus-caddyfile")
def main() -> None:
    """Render a Caddyfile from user.caddyserver.* keys on Incus instances, in all projects.

    \b
    Example:
        incus config set web user.caddyserver.http.enable=true
        incus config set web user.caddyserver.http.matchers.host=web.example.org
        incus config set web user.caddyserver.http.upstream.port=80
        incus-caddyfile render > Caddyfile
        incus-caddyfile render --output /etc/caddy/Caddyfile
    """


@main.command(epilog=EXIT_EPILOG)
@settings_options
@option("--check", is_flag=True, help="Write nothing; exit 1 if the file would change.")
@option("--diff", is_flag=True, help="Write nothing; print a unified diff against --output.")
@option("--quiet", "-q", is_flag=True, help="Do not report skipped (stopped ...) instances.")
@on_demand_option
def render(check: bool, diff: bool, quiet: bool, **kwargs: Any) -> None:
    """Render the Caddyfile once: print it, or write it and reload Caddy if it changed.

    With --output the file is written atomically, only when its bytes change, after Caddy
    has checked the new config; then Caddy is reloaded through its admin API (or
    --reload-command). A config Caddy rejects leaves the old file in place.

    \b
    Examples:
        incus-caddyfile render > Caddyfile
        incus-caddyfile render -o /etc/caddy/Caddyfile --caddy-admin unix//run/caddy/admin.sock
        incus-caddyfile render -o Caddyfile --check --diff
        incus-caddyfile render --wildcard '*.example.org' --acme-dns 'cloudflare {env.CF_API_TOKEN}'
    """
    settings = make_settings(**kwargs)
    if settings.on_demand_tls:
        raise click.UsageError(
            "--on-demand-tls: Caddy asks before each certificate whether the host is routed,"
            " and only `incus-caddyfile watch --listen 127.0.0.1:PORT --on-demand-tls` is there"
            " to answer; render cannot (without the ask, every name would get a certificate)"
        )
    to_file = targets.writes_file(settings)
    if (check or diff) and not to_file:
        raise click.UsageError("--check and --diff compare with a file: give --output")
    report = pipeline.run(settings, RunMode(check=check, diff=diff))
    print_report(report, quiet)
    if not to_file and report.error is None and report.text is not None:
        sys.stdout.write(report.text)
    if report.diff:
        sys.stdout.write(report.diff)
    if report.edges:
        for edge in report.edges:
            _say(f"{edge.target}: {edge.state}: {edge.summary()}")
    elif report.error is None and report.target is not None:
        _say(f"{report.target}: {report.summary()}")
    sys.exit(report.return_code())


def _parse_debounce(
    _ctx: click.Context, _param: click.Parameter, value: str
) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value.split(":"))
    except ValueError:
        raise click.BadParameter("expected MIN:MAX in seconds, e.g. 0.05:0.5") from None
    if not 0 <= low <= high:
        raise click.BadParameter("needs 0 <= MIN <= MAX")
    return low, high


def _plain_default(param: click.Parameter) -> Any:
    """A parameter's own default (click marks "no default" with a sentinel object)."""
    default = param.default
    if default is None or isinstance(default, str | bool | int | float | tuple | list):
        return default
    return () if getattr(param, "multiple", False) else None


def _settings_loader(ctx: click.Context, kwargs: dict[str, Any]) -> Callable[[], Settings]:
    """Re-read the settings file on change, keeping what came from flags and the environment."""
    sources = click.core.ParameterSource
    from_file = {
        name
        for name in kwargs
        if ctx.get_parameter_source(name) in (sources.DEFAULT_MAP, sources.DEFAULT)
    }
    params = {p.name: p for p in ctx.command.params if p.name}

    def load() -> Settings:
        values = dict(kwargs)
        config = values.get("config_file")
        file_values = load_file(Path(config)) if config else {}
        for name in from_file:
            values[name] = file_values.get(name, _plain_default(params[name]))
        return make_settings(**values)

    return load


@main.command(epilog=EXIT_EPILOG)
@settings_options
@option(
    "--debounce",
    default="0.05:2",
    envvar=_env("DEBOUNCE"),
    show_default=True,
    callback=_parse_debounce,
    metavar="MIN:MAX",
    help="Seconds of quiet to wait after an event; MAX: the longest wait, and in a"
    " sustained burst the time between two reloads (see --reload-burst).",
)
@option(
    "--reload-burst",
    type=click.IntRange(1, 100),
    default=DEFAULT_RELOAD_BURST,
    show_default=True,
    envvar=_env("RELOAD_BURST"),
    metavar="N",
    help="Up to N reloads may follow each other at once (each change applied MIN after its"
    " event); after that one per MAX while changes keep coming (a token bucket). 1: every"
    " two reloads at least MAX apart.",
)
@option(
    "--drain/--no-drain",
    default=True,
    show_default=True,
    envvar=_env("DRAIN"),
    help="Take a pool member out of its pool the moment Incus starts to stop, restart or"
    " delete it (back if that fails); after a start or restart it joins once its port"
    " accepts connections.",
)
@option(
    "--resync-interval",
    type=click.FloatRange(min=1),
    default=300.0,
    show_default=True,
    envvar=_env("RESYNC_INTERVAL"),
    metavar="SECONDS",
    help="Full re-listing of Incus as a safety net, besides events.",
)
@option(
    "--address-timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    envvar=_env("ADDRESS_TIMEOUT"),
    metavar="SECONDS",
    help="How long to poll (from 50 ms, backing off) for a started instance's address.",
)
@option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    envvar=_env("LOG_FORMAT"),
    help="One line per cycle on stderr; json for machines.",
)
@option(
    "--listen",
    envvar=_env("LISTEN"),
    metavar="ADDR",
    help="Serve health, readiness, routes, metrics, a status page and the on-demand TLS"
    " ask here: 127.0.0.1:PORT or unix//path (another address needs a token). Default: off.",
)
@token_options
@on_demand_option
def watch(
    debounce: tuple[float, float],
    reload_burst: int,
    drain: bool,
    resync_interval: float,
    address_timeout: float,
    log_format: str,
    listen: str | None,
    listen_token: str | None,
    listen_token_file: Path | None,
    **kwargs: Any,
) -> None:
    """Keep --output true to Incus: render at start, then on every relevant Incus event.

    Follows instance, profile and project lifecycle events in all projects; polls a started
    instance for its address instead of sleeping; reconnects when Incus restarts (keeping the
    last good file meanwhile); retries a failed reload until Caddy is back; re-renders when
    the template or the settings file changes. SIGHUP forces a full resync; SIGTERM and
    SIGINT stop it with status 0.

    \b
    Examples:
        incus-caddyfile watch -o /etc/caddy/Caddyfile --caddy-admin unix//run/caddy/admin.sock
        incus-caddyfile watch --config /etc/incus-caddyfile.toml --log-format json
        incus-caddyfile watch -o /etc/caddy/Caddyfile --listen 127.0.0.1:9180
        incus-caddyfile watch --target instance=edge/caddy1 --target instance=edge/caddy2
    """
    from .edge import serve
    from .watch.cyclelog import Log
    from .watch.loop import Watcher, WatchOptions

    ctx = click.get_current_context()
    load = _settings_loader(ctx, kwargs)
    try:
        settings = load()
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None
    if not targets.writes_file(settings):
        raise click.UsageError("watch needs --output (the Caddyfile to keep up to date)")
    directory = settings.output.parent if settings.output else None
    if settings.caddy_instance is None and directory is not None and not directory.is_dir():
        # fail now, so that a supervisor (Restart=on-failure) sees it, not retry forever
        raise click.UsageError(f"--output: the directory {directory} does not exist")
    for spec in settings.targets:
        if spec.instance is None and spec.output and not spec.output.parent.is_dir():
            raise click.UsageError(
                f"{spec.where} ({spec.label}): output: the directory {spec.output.parent}"
                " does not exist"
            )
    options = WatchOptions(
        debounce_min=debounce[0],
        debounce_max=debounce[1],
        reload_burst=reload_burst,
        drain=drain,
        resync_interval=resync_interval,
        address_timeout=address_timeout,
        log_format=log_format,
    )
    log = Log(log_format)
    edge = None
    if listen:
        try:
            edge = serve.setup(listen, listen_token, listen_token_file, settings.reload, log)
            if settings.on_demand_tls:
                serve.check_ask(edge)
        except serve.EdgeSetupError as exc:
            raise click.UsageError(str(exc)) from None
    elif settings.on_demand_tls:
        raise click.UsageError(
            "--on-demand-tls needs --listen 127.0.0.1:PORT: Caddy asks the watch there before"
            " it gets a certificate"
        )
    load = serve.with_ask(load, edge.ask_url if edge is not None else None)
    if edge is not None:
        edge.listener.start()
        where = edge.listener.where
        log("listen", f"serving the status page, /metrics and /ask on {where}", url=where)
    try:
        code = Watcher(load, options, log=log, observer=edge.state if edge else None).run()
    finally:
        if edge is not None:
            edge.listener.stop()
    sys.exit(code)


ROUTES_EPILOG = (
    "Exit codes:\n\n\b\n  0  listed\n  2  usage: bad option, setting or settings file (with"
    " --from: or the watch's token)\n"
    "  4  Incus (with --from: the watch) unreachable or the listing failed\n"
    "  8  the template failed"
)


@main.command(epilog=ROUTES_EPILOG)
@view_options
@option(
    "--state-of",
    "state_of",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar=_env("OUTPUT"),
    metavar="FILE",
    help="The file render writes (nothing is written): an instance whose cluster member is"
    " unreachable is shown with the route it last had, as render keeps it beside that file."
    " Default: the settings file's output; without one, what a render to stdout keeps in"
    " --cache-dir.",
)
@option("--json", "as_json", is_flag=True, help="One JSON array on stdout, for scripts.")
@from_options
def routes(
    state_of: Path | None,
    as_json: bool,
    from_url: str | None,
    listen_token: str | None,
    listen_token_file: Path | None,
    **kwargs: Any,
) -> None:
    """Show every instance with user.caddyserver.* keys: routed, or exactly why not.

    Columns: project, instance, state, cluster member, hosts, upstream, and the verdict with
    its reasons. Settings (policy, wildcards) apply as they do for render.

    \b
    Examples:
        incus-caddyfile routes
        incus-caddyfile routes --json | jq '.[] | select(.state != "routed")'
        incus-caddyfile routes --from 127.0.0.1:9180
    """
    if state_of is None:  # the settings file's output: the file whose state is read
        file_output = (click.get_current_context().default_map or {}).get("output")
        state_of = Path(file_output) if file_output else None
    settings = make_settings(**kwargs, output=state_of)
    if from_url:
        _routes_from(from_url, _from_token(listen_token, listen_token_file), as_json)
        return
    try:
        rows, warnings, states = pipeline.routes(settings)
    except IncusError as exc:
        _say(f"error: {exc}")
        sys.exit(int(Status.INCUS_ERROR))
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None
    except TemplateError as exc:
        _say(f"error: template error: {exc}")
        sys.exit(int(Status.TEMPLATE_ERROR))
    for warning in warnings:
        _say(f"warning: {warning}")
    for state in states:  # stdout stays the routes (the JSON is /routes' own)
        _say(f"target {state.name}: {state.state}: {state.detail}")
    if as_json:
        click.echo(routes_json(rows), nl=False)
    else:
        click.echo(format_routes(rows), nl=False)


def _routes_from(url: str, token: str | None, as_json: bool) -> None:
    """routes --from: the rows a running watch serves (its /routes is routes --json)."""
    from .edge import client

    try:
        answer = client.get(url, "/routes", token)
        if answer.status != 200:
            raise client.EdgeUnreachable(f"/routes answered {answer.status}: {answer.body}")
        rows = rows_from_json(answer.body)
    except client.AddressError as exc:
        raise click.UsageError(str(exc)) from None
    except client.EdgeRefused as exc:
        _say(f"error: {exc}")
        sys.exit(int(Status.USAGE))
    except (client.EdgeUnreachable, ValueError) as exc:
        _say(f"error: {exc}")
        sys.exit(int(Status.INCUS_ERROR))
    if as_json:
        click.echo(answer.body, nl=False)
    else:
        click.echo(format_routes(rows), nl=False)


def format_routes(rows: list[RouteRow]) -> str:
    """A plain table; reasons go on indented lines under their instance."""
    header = ("PROJECT", "INSTANCE", "STATUS", "LOCATION", "ROUTE", "HOSTS", "UPSTREAM")
    table = [header] + [
        (
            r.project,
            r.instance,
            r.status,
            r.location or "-",
            r.state,
            " ".join(r.asked) or "-",
            r.upstream or "-",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
    out = []
    for n, line in enumerate(table):
        cells = [c.ljust(w) for c, w in zip(line, widths, strict=False)] + [line[-1]]
        out.append("  ".join(cells).rstrip())
        if n:
            out.extend(f"    {reason}" for reason in rows[n - 1].reasons)
    return "\n".join(out) + "\n"


@main.command(epilog="Exit codes: 0 every check passed, 1 a check failed, 2 usage.")
@settings_options
@from_options
def doctor(
    from_url: str | None,
    listen_token: str | None,
    listen_token_file: Path | None,
    **kwargs: Any,
) -> None:
    """Check everything a render needs; print a one-line fix for each failed check.

    Checks: Incus reachable, permission to list all projects, Caddy's admin endpoint, the
    template renders, Caddy accepts the result, the output path is writable.

    \b
    Example:
        incus-caddyfile doctor -o /etc/caddy/Caddyfile --caddy-admin unix//run/caddy/admin.sock
        incus-caddyfile doctor --from 127.0.0.1:9180
    """
    from . import doctor as checks

    settings = make_settings(**kwargs)
    if from_url:
        from .edge import client

        try:
            found = client.doctor_checks(from_url, _from_token(listen_token, listen_token_file))
        except client.AddressError as exc:
            raise click.UsageError(str(exc)) from None
    else:
        found = checks.run(settings)
    failed = False
    for check in found:
        click.echo(f"{'ok  ' if check.ok else 'FAIL'}  {check.name}: {check.detail}")
        if not check.ok:
            failed = True
            click.echo(f"      fix: {check.fix}")
    sys.exit(1 if failed else 0)
