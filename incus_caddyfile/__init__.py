"""incus-caddyfile: a Caddyfile rendered from Incus instance labels, across all projects."""

__version__ = "0.1.0"
