"""Tenant policy (the settings file's [projects]): which projects count, which hosts each
may claim. Pure."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass


def parent_domain(host: str) -> str:
    """`shop.example.org` -> `example.org`; the domain a one-label wildcard would cover."""
    return host.split(".", 1)[1] if "." in host else ""


def _covers(pattern: str, host: str) -> bool:
    """Every name `host` can serve is allowed by `pattern` ('*.e' = anything below e)."""
    if not pattern.startswith("*."):
        return host == pattern
    below = pattern[2:]
    domain = host[2:] if host.startswith("*.") else host
    return (host.startswith("*.") and domain == below) or domain.endswith("." + below)


def _touches(pattern: str, host: str) -> bool:
    """Some name `host` can serve is in `pattern` (a wildcard host serves one label)."""
    if _covers(pattern, host):
        return True
    if host.startswith("*.") and not pattern.startswith("*."):
        return parent_domain(pattern) == host[2:]
    return False


@dataclass(frozen=True)
class Policy:
    """Which projects count, and which hosts each may claim (the settings' [projects]).

    A project with a `domains` list may claim only hosts those patterns cover; the patterns
    of every listed project are reserved for it, so no other project can claim into them.
    `"*"` gives the list for projects not named. No list at all: anything not reserved.
    """

    include: tuple[str, ...] = ()  # glob patterns of project names; empty: every project
    exclude: tuple[str, ...] = ()
    domains: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (project, patterns)

    def considers(self, project: str) -> bool:
        included = not self.include or any(fnmatch.fnmatchcase(project, p) for p in self.include)
        return included and not any(fnmatch.fnmatchcase(project, p) for p in self.exclude)

    def patterns(self, project: str) -> tuple[str, ...] | None:
        table = dict(self.domains)
        return table.get(project, table.get("*"))

    def refuses(self, project: str, host: str) -> str | None:
        """Why `project` may not claim `host`, or None when it may."""
        own = self.patterns(project)
        if own is not None and not any(_covers(p, host) for p in own):
            allowed = ", ".join(own) or "nothing"
            return f"project {project} may only claim hosts under: {allowed} (settings file)"
        if project in dict(self.domains):
            return None  # its own explicit list covers the host
        for other, patterns in self.domains:
            if other not in (project, "*") and any(_touches(p, host) for p in patterns):
                return f"reserved for project {other} by the settings file"
        return None
