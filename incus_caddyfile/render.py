"""Pure step 3: the model and settings in, Caddyfile text out, through a strict Jinja template.

The default template ships inside the package (copied from the top-level templates/ at build
time); in a source checkout it is read from templates/ directly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

from .model import Model
from .settings import Settings, block_depths
from .shape import layout

DEFAULT_TEMPLATE = "Caddyfile.j2"


class TemplateError(Exception):
    """The template could not be loaded or rendered; the message names template and line."""


def default_template_dir() -> Path:
    packaged = resources.files("incus_caddyfile") / "templates"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "templates"


@dataclass(frozen=True)
class GlobalOptions:
    admin: str | None
    email: str | None
    acme_dns: str | None
    extra: tuple[str, ...]
    on_demand_ask: str | None = None  # `on_demand_tls { ask URL }`: watch --listen's /ask

    @property
    def lines(self) -> list[str]:
        """The extra lines, blocks (`servers {` ... `}`) indented as caddy fmt does."""
        return [
            "\t" * d + line.strip()
            for line, d in zip(self.extra, block_depths(self.extra), strict=True)
        ]

    @property
    def any(self) -> bool:
        return bool(self.admin or self.email or self.acme_dns or self.extra or self.on_demand_ask)


def context(model: Model, settings: Settings) -> dict[str, Any]:
    """The template context; documented in the README ("Template context").

    Only allowlisted data goes in: rejected values and skip reasons are reported on stderr,
    never handed to a template that might print them into the Caddyfile.
    """
    return {
        "sites": model.sites,
        "wildcard_sites": model.wildcard_sites,
        "options": GlobalOptions(
            admin=settings.caddy_admin,
            email=settings.email,
            acme_dns=settings.acme_dns,
            extra=settings.global_options,
            on_demand_ask=settings.on_demand_ask,
        ),
        "on_demand": settings.on_demand_ask is not None,
        "scheme_prefix": "http://" if settings.scheme == "http" else "",
        "snippets_file": str(settings.snippets) if settings.snippets else None,
        "sites_dir": str(settings.sites_dir) if settings.sites_dir else None,
        "generator": "incus-caddyfile",
    }


def environment(template_dir: Path) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,  # the output is a Caddyfile, not HTML; values are allowlisted instead
    )
    env.globals["layout"] = layout  # sites -> host groups and the rest (shape.py)
    return env


@functools.lru_cache(maxsize=1)
def _default_template() -> jinja2.Template:
    """Loaded once per process: an upgrade of the package under a running `watch` must not
    pair new template text with old code."""
    return environment(default_template_dir()).get_template(DEFAULT_TEMPLATE)


def render(model: Model, settings: Settings) -> str:
    """The operator's template is read on every call (watch re-renders when it changes)."""
    if settings.template is not None:
        template_dir, name = settings.template.parent, settings.template.name
    else:
        template_dir, name = default_template_dir(), DEFAULT_TEMPLATE
    try:
        if settings.template is None:
            template = _default_template()
        else:
            template = environment(template_dir).get_template(name)
        return template.render(context(model, settings))
    except jinja2.TemplateNotFound as exc:
        if exc.name != name:  # an {% include %} or {% import %} inside the template
            raise TemplateError(
                f"{template_dir / name}:{_error_line(exc, name)}: template {exc.name!r} not"
                f" found (looked in {template_dir})"
            ) from None
        raise TemplateError(f"template not found: {template_dir / name}") from None
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{exc.filename or name}:{exc.lineno}: {exc.message}") from None
    except jinja2.TemplateError as exc:
        raise TemplateError(f"{template_dir / name}:{_error_line(exc, name)}: {exc}") from None


def _error_line(exc: Exception, name: str) -> str:
    """The template line an exception was raised from, found in its traceback."""
    tb = exc.__traceback__
    line = "?"
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(name):
            line = str(tb.tb_lineno)
        tb = tb.tb_next
    return line
