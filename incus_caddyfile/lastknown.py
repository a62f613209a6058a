"""The addresses instances last had, kept for the next run.

An instance whose cluster member is unreachable lists as status Error, without addresses,
while its containers keep serving; the model then keeps the route it last had
(`model.with_last_known`). `watch` knows that route from its cache; `render` runs once, so
it keeps the labels, creation times and addresses of the instances that could be routed in
a state file, replaced atomically right after the output (and only when they changed):
`.NAME.state.json` beside an output file NAME, or, for an output that is not a file on this
host (stdout, a Caddy inside an instance), a file of its own in the cache directory
(`Keeper`).

The file is a cache, never a source of routes by itself: it is read only for an instance in
Error, and for addresses of NICs still up on the boot it saw (`inventory.AddressMemo`); a
missing, unreadable or corrupt file, or one written for another output (copied along with
it), only means nothing is known to keep (said in a warning).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISDIR, S_ISREG
from typing import Any

from . import output
from .inventory import AddressMemo
from .model import PREFIX, Instance, Nic, is_unknown, keeps_route, with_last_known
from .output import OutputError

VERSION = 1
Key = tuple[str, str]


def state_path(path: Path) -> Path:
    return path.parent / f".{path.name}.state.json"


@dataclass(frozen=True)
class Keeper:
    """Where one output's state is kept (`file`), and the output it is for (`owner`: written
    into the file and checked on reading, so a state copied along with another output, or
    one for another Incus, is not taken for this one's). `cached`: in the cache directory,
    whose trust is checked before every read and write (see `distrust`)."""

    file: Path
    owner: str
    cached_here: bool = False

    @classmethod
    def beside(cls, output: Path) -> Keeper:
        """For an output file on this host: `.NAME.state.json` beside it."""
        return cls(state_path(output), os.path.abspath(output))

    @classmethod
    def cached(cls, directory: Path, owner: str) -> Keeper:
        """For an output that is not a file here: a file in the cache directory, named by
        a digest of `owner` (which says what is rendered, from which Incus, on which
        host, under which project policy)."""
        digest = hashlib.sha256(owner.encode("utf-8", "surrogateescape")).hexdigest()[:20]
        return cls(directory / f"state-{digest}.json", owner, cached_here=True)

    def distrust(self) -> tuple[str | None, bool]:
        """Why the cache directory's file must not be read (None: it may), and whether the
        directory itself is to blame. Its routes are believed for instances in Error, so
        only this user may have written it: the directory must be this user's and not
        writable by others (a cache under /tmp is not), and the file a regular file (not
        a link, a FIFO ...) of this user's that others cannot write. A missing file is
        fine (FileNotFoundError for a missing directory)."""
        where = self.file.parent
        st = where.stat()
        if st.st_uid != os.geteuid() or st.st_mode & 0o022 or not S_ISDIR(st.st_mode):
            return f"{where} may be written by others than this user", True
        try:
            st = os.lstat(self.file)
        except FileNotFoundError:
            return None, False
        if not S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            return f"{self.file} is not a file only this user may write", False
        if st.st_size > MAX_STATE_BYTES:
            return f"{self.file} is larger than a state this tool writes", False
        return None, False


# A state of 1000 instances is ~0.2 MB; a file far larger was not written by this tool.
MAX_STATE_BYTES = 64 * 1024 * 1024
# Warnings about keeping the state already said by this process: watch would repeat an
# unwritable cache directory's every cycle (and log every idle check for it).
_said: set[str] = set()


def encode(keeper: Keeper, instances: Iterable[Instance], memo: AddressMemo | None = None) -> bytes:
    """The labels, creation time and addresses of the labelled instances that are up (or
    unknown, with what they last had), sorted: equal fleets give equal bytes, so an
    unchanged state is not written again; and `memo`'s addresses of NICs by boot."""
    known: dict[str, Any] = {}
    for inst in sorted(instances, key=lambda i: (i.project, i.name)):
        if inst.labels and keeps_route(inst) and any(n.addresses for n in inst.nics):
            known[f"{inst.project}/{inst.name}"] = {
                "config": dict(inst.labels),
                "created_at": inst.created_at,
                "nics": [
                    {"name": n.name, "addresses": list(n.addresses), "network": n.network,
                     "interface": n.interface}
                    for n in inst.nics
                ],
                "ready": inst.ready,
            }  # fmt: skip
    data = {"version": VERSION, "output": keeper.owner, "instances": known}
    if memo is not None:
        data["memo"] = memo.entries()
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()


@dataclass
class Known:
    """What a state file holds: key -> an instance (status Running) with the addresses it
    had, and `render -o`'s memo; `problem`: why the file gave nothing (missing is no
    problem)."""

    instances: dict[Key, Instance] = field(default_factory=dict)
    problem: str | None = None
    memo: AddressMemo = field(default_factory=AddressMemo)


def _nic(raw: Mapping[str, Any]) -> Nic:
    addresses = raw.get("addresses")
    if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
        raise ValueError("addresses must be a list of strings")
    return Nic(
        str(raw["name"]), tuple(addresses), str(raw.get("network") or ""),
        str(raw.get("interface") or ""),
    )  # fmt: skip


def decode(keeper: Keeper, data: bytes) -> Known:
    """A state file's content, checked (the addresses still go through the model's
    allowlist like any other: `labels.usable_address`)."""
    where = keeper.file
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("version") != VERSION:
            raise ValueError(f"not a version {VERSION} state")
        if doc.get("output") != keeper.owner:
            return Known(problem=f"{where} was written for {doc.get('output')!r}; ignored")
        known = {}
        for key, entry in dict(doc["instances"]).items():
            project, _, name = str(key).partition("/")
            ready = entry.get("ready")
            config = dict(entry["config"])
            if not all(isinstance(v, str) for v in config.values()):
                raise ValueError("label values must be strings")
            known[(project, name)] = Instance(
                project, name, created_at=str(entry.get("created_at") or ""),
                config={str(k): v for k, v in config.items() if str(k).startswith(PREFIX)},
                nics=tuple(_nic(n) for n in entry["nics"]),
                ready=ready if isinstance(ready, bool) else None,
            )  # fmt: skip
        return Known(known, memo=AddressMemo.of(dict(doc.get("memo") or {})))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        return Known(problem=f"{where} is not a state this tool wrote ({exc}); ignored")


def load(keeper: Keeper) -> Known:
    try:
        if keeper.cached_here:
            why, _ = keeper.distrust()
            if why:
                return Known(problem=f"{why}; ignored")
        data = keeper.file.read_bytes()
    except FileNotFoundError:
        return Known(problem=None)
    except OSError as exc:
        return Known(problem=f"cannot read {keeper.file}: {exc.strerror}")
    return decode(keeper, data)


def recall(
    keeper: Keeper, instances: list[Instance], known: Known | None = None
) -> tuple[list[Instance], list[str]]:
    """The instances, those in Error without addresses given the ones they last had (the
    file is read only when there is such an instance); and warnings. `known`: the file as
    the caller read it already (it said its problem)."""
    lost = [i for i in instances if is_unknown(i) and not i.nics]
    if not lost:
        return instances, []
    warnings = []
    if known is None:
        known = load(keeper)
        warnings = [known.problem] if known.problem else []
    if not known.instances:
        return instances, warnings
    return [with_last_known(i, known.instances.get((i.project, i.name))) for i in instances], (
        warnings
    )


def remember(
    keeper: Keeper, instances: Iterable[Instance], memo: AddressMemo | None = None
) -> str | None:
    """Replace the kept state when it changed; a warning when it cannot be written (the
    output itself is fine: only a later run's memory of routes is lost), said once per
    process. A cache directory is made (mode 0700) when missing; nothing is written into
    one others may write to, and a file there that is not to be trusted is replaced."""
    data = encode(keeper, instances, memo)
    try:
        if keeper.cached_here:
            keeper.file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            why, whole_place = keeper.distrust()
            if whole_place:
                return _once(f"last known routes not kept: {why}")
            if why:
                keeper.file.unlink()  # (the directory is this user's: so is the name)
        if output.read_current(keeper.file) != data:
            output.write_atomic(keeper.file, data)
            if keeper.cached_here:
                keeper.file.chmod(0o600)  # (a new file is 0644)
    except OSError as exc:
        return _once(f"last known routes not kept: {exc.filename or keeper.file}: {exc.strerror}")
    except OutputError as exc:
        return _once(f"last known routes not kept: {exc}")
    return None


def _once(warning: str) -> str | None:
    if warning in _said:
        return None
    _said.add(warning)
    return warning
