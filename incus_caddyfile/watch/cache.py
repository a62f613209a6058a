"""The instances watch knows, and which of them a cycle must fetch again."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ..incus import IncusApi, IncusTimeout
from ..model import UNKNOWN, Instance, with_last_known
from .triggers import Trigger

Key = tuple[str, str]  # (project, instance)


class InstanceCache:
    """A full listing once, then single instances refreshed as their events come; a full
    listing again whenever events may have been missed (start, reconnect, profile changes,
    the periodic resync). Until the first listing worked, `instances` is None. An instance
    that turns unknown (its cluster member unreachable) keeps the addresses it had here."""

    def __init__(
        self,
        collect: Callable[[IncusApi], list[Instance]],
        fetch: Callable[[IncusApi, str, str], Instance | None],
    ) -> None:
        self.collect, self.fetch = collect, fetch
        self.instances: dict[Key, Instance] | None = None
        self.dirty: set[Key] = set()
        self.full = True
        self.late: str | None = None  # why the last full listing that was due did not happen
        self.unanswered: list[str] = []  # instances whose refresh timed out (now unknown)

    def want(self, trigger: Trigger) -> None:
        """Note what a trigger asks to fetch again."""
        if trigger.kind.local:
            return  # re-render from the cache: nothing to fetch
        if trigger.full or self.instances is None:
            self.full = True
        else:
            self.dirty.add((trigger.project, trigger.instance))
            if trigger.old_name:
                self.dirty.add((trigger.project, trigger.old_name))

    def missed_events(self) -> None:
        self.full = True

    def refresh(self, api: IncusApi, full_due: bool = True) -> list[Instance]:
        """Fetch what is wanted; the instances fetched. Raises IncusError (then nothing in
        the cache changed, and what was wanted still is).

        A full listing that times out (Incus waits for a cluster member cut off from the
        network) is not fatal once there is a cache: the instances with events are
        refreshed on their own meanwhile, `late` says why, and the full listing stays owed
        (tried again when `full_due`). An instance whose own refresh times out is unknown."""
        self.late, self.unanswered = None, []
        if self.instances is None or (self.full and full_due):
            try:
                return self._relist(api)
            except IncusTimeout as exc:
                if self.instances is None:
                    raise
                self.late = str(exc)
        updates = {key: self._fetch(api, key) for key in sorted(self.dirty)}
        for key, update in updates.items():
            self.put(key, update)
        self.dirty.clear()
        return [inst for key in updates if (inst := self.get(key)) is not None]

    def _relist(self, api: IncusApi) -> list[Instance]:
        known = self.instances or {}
        listing = [with_last_known(i, known.get((i.project, i.name))) for i in self.collect(api)]
        self.instances = {(i.project, i.name): i for i in listing}
        self.full = False
        self.dirty.clear()
        return listing

    def _fetch(self, api: IncusApi, key: Key) -> Instance | None:
        try:
            return self.fetch(api, *key)
        except IncusTimeout as exc:
            self.unanswered.append(f"{key[0]}/{key[1]}: {exc}; taken as {UNKNOWN} (unknown)")
            known = self.get(key)
            return None if known is None else dataclasses.replace(known, status=UNKNOWN)

    def get(self, key: Key) -> Instance | None:
        return (self.instances or {}).get(key)

    def put(self, key: Key, inst: Instance | None) -> None:
        """One instance as now known (None: it is gone)."""
        if self.instances is None:
            return
        if inst is None:
            self.instances.pop(key, None)
        else:
            self.instances[key] = with_last_known(inst, self.instances.get(key))

    def listing(self) -> list[Instance]:
        return list((self.instances or {}).values())
