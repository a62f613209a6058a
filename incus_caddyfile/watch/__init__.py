"""`incus-caddyfile watch`: the loop (`Watcher`) and its parts, one module each."""

from .loop import Watcher, WatchOptions

__all__ = ["WatchOptions", "Watcher"]
