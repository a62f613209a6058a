"""The instances watch knows, and which of them a cycle must fetch again."""

from __future__ import annotations

from collections.abc import Callable

from ..incus import IncusApi
from ..model import Instance, with_last_known
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

    def refresh(self, api: IncusApi) -> list[Instance]:
        """Fetch what is wanted; the instances fetched. Raises IncusError (then nothing in
        the cache changed, and what was wanted still is)."""
        if self.full or self.instances is None:
            known = self.instances or {}
            listing = [
                with_last_known(i, known.get((i.project, i.name))) for i in self.collect(api)
            ]
            self.instances = {(i.project, i.name): i for i in listing}
            self.full = False
            self.dirty.clear()
            return listing
        updates = {key: self.fetch(api, *key) for key in sorted(self.dirty)}
        for key, update in updates.items():
            self.put(key, update)
        self.dirty.clear()
        return [inst for key in updates if (inst := self.get(key)) is not None]

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
