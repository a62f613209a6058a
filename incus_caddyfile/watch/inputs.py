"""Inputs from outside the loop's thread: POSIX signals, and changes of the files a render
reads (template, settings, snippets, site files). Each only puts an item on the queue."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path

from ..settings import Settings


def install_signals(stop: Callable[[], None], hup: Callable[[], None]) -> None:
    """SIGTERM and SIGINT stop, SIGHUP forces a resync (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, lambda *_: stop())
    signal.signal(signal.SIGINT, lambda *_: stop())
    signal.signal(signal.SIGHUP, lambda *_: hup())


def watched_files(settings: Settings) -> list[Path]:
    paths = [settings.template, settings.config_file, settings.snippets]
    return [p.resolve() for p in paths if p is not None]


class FileWatcher:
    """A thread that calls `changed(path)` for each change of the files (and of the sites
    directory) the settings name. The files are fixed at start."""

    def __init__(self, settings: Settings, changed: Callable[[str], None]) -> None:
        self.files = watched_files(settings)
        self.sites = str(settings.sites_dir.resolve()) if settings.sites_dir else None
        self.changed = changed
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        if not self.files and self.sites is None:
            return
        self.thread = threading.Thread(target=self._run, name="file-watch", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=2)

    def _run(self) -> None:
        import watchfiles

        # Watch the directories: editors replace files by rename, which a file watch misses.
        directories = {str(f.parent) for f in self.files}
        wanted = {str(f) for f in self.files}
        sites = self.sites
        if sites:
            directories.add(sites)

        def relevant(_change: object, path: str) -> bool:
            return path in wanted or (sites is not None and str(Path(path).parent) == sites)

        for changes in watchfiles.watch(
            *sorted(directories),
            stop_event=self.stop_event,
            debounce=50,
            step=20,
            recursive=False,
            watch_filter=relevant,
        ):
            for _change, path in changes:
                self.changed(path)
