"""FakeIncus: the IncusApi protocol replayed from a recording of a real Incus.

The recording (tests/fixtures/incus/lab.json, made by scripts/record_incus.py against the lab)
holds the raw `metadata` of every answer the tool reads. The fake hands out deep copies of it,
counts one request per call that would be an HTTP request, and answers None / [] for what the
recording does not know, as the protocol says. Tests change the fleet with small mutators and
inject faults with `fail_on`:

    fake = FakeIncus.from_recording()
    fake.set_status("icfrec-a", "rec-web", "Stopped")
    fake.fail_on = {"network_leases"}        # every network_leases call raises IncusError

Recorded fleet (see scripts/record_incus.py): icfrec-a/rec-web, rec-alt (8080), rec-plain
(unlabelled), rec-stopped (Stopped, with a stale lease), rec-frozen (Frozen);
icfrec-b/rec-profiled (labels from a profile), rec-ready (Ready, require_ready), rec-static (no
lease: device eth0 is net0 inside, static address); icfrec-c/rec-v6 (eth1 on icfbr1, IPv6 by
SLAAC), rec-dual (eth0 on icfbr1, IPv4 and IPv6).
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from incus_caddyfile.incus import IncusError, StatesFailed

RECORDING = Path(__file__).resolve().parent / "fixtures" / "incus" / "lab.json"

# Incus status codes (shared/api/status_code.go)
STATUS_CODES = {
    "Stopped": 102,
    "Running": 103,
    "Frozen": 110,
    "Error": 112,
    "Ready": 113,
}
# Statuses whose live state has no network (nothing runs)
_NO_NETWORK = frozenset({"Stopped", "Error"})

ExecResult = tuple[int, str, str]
ExecHandler = Callable[[str, str, list[str]], ExecResult]
Key = tuple[str, str]


def lifecycle_event(project: str, name: str, action: str = "instance-updated") -> dict[str, Any]:
    """A lifecycle event shaped like the ones Incus 6.0 sends on /1.0/events."""
    source = f"/1.0/instances/{name}?project={project}"
    return {
        "location": "none",
        "metadata": {
            "action": action,
            "name": name,
            "project": project,
            "requestor": {"address": "@", "protocol": "unix", "username": "root"},
            "source": source,
        },
        "project": project,
        "timestamp": "2026-01-01T00:00:00.000000000Z",
        "type": "lifecycle",
    }


# Operation status codes (shared/api/status_code.go), as operation events carry them
OPERATION_STATUS_CODES = {"Pending": 105, "Running": 103, "Success": 200, "Failure": 400,
                          "Cancelled": 401}  # fmt: skip


def operation_event(
    project: str,
    name: str,
    description: str = "Stopping instance",
    status: str = "Running",
    op_id: str = "0f0f0f0f-0000-4000-8000-000000000001",
) -> dict[str, Any]:
    """An operation event shaped like the ones Incus 6.0 sends on /1.0/events (a stop,
    restart or delete announces itself this way when it begins, and again when it ends)."""
    return {
        "location": "none",
        "metadata": {
            "class": "task",
            "created_at": "2026-01-01T00:00:00.000000000Z",
            "description": description,
            "err": "" if status != "Failure" else "Failed shutting down instance",
            "id": op_id,
            "location": "none",
            "may_cancel": False,
            "metadata": None,
            "resources": {"instances": [f"/1.0/instances/{name}?project={project}"]},
            "status": status,
            "status_code": OPERATION_STATUS_CODES[status],
            "updated_at": "2026-01-01T00:00:00.000000000Z",
        },
        "project": project,
        "timestamp": "2026-01-01T00:00:00.000000000Z",
        "type": "operation",
    }


class FakeEventSource:
    """What FakeIncus.events returns: start()/close() like the real stream, and emit()/drop()
    for the test. Events reach on_event only between start() and close()/drop(); on_close is
    called once, when the stream ends (drop, or close after start), as the real one does."""

    def __init__(
        self,
        on_event: Callable[[dict[str, Any]], None],
        on_close: Callable[[], None],
        fail: bool = False,
    ) -> None:
        self.on_event = on_event
        self.on_close = on_close
        self.fail = fail
        self.started = False
        self.closed = False
        self.emitted: list[dict[str, Any]] = []

    def start(self) -> None:
        if self.fail:
            raise IncusError("cannot open the Incus event stream: injected fault")
        self.started = True

    def close(self) -> None:
        self._end()

    def emit(self, event: dict[str, Any]) -> bool:
        """Deliver one event (a copy); False when the stream is not open."""
        if not self.started or self.closed:
            return False
        self.emitted.append(copy.deepcopy(event))
        self.on_event(copy.deepcopy(event))
        return True

    def drop(self) -> None:
        """The connection is lost: on_close is called (once)."""
        self.started = True  # a drop before start still ends the stream for the test
        self._end()

    @property
    def open(self) -> bool:
        return self.started and not self.closed

    def _end(self) -> None:
        if self.started and not self.closed:
            self.closed = True
            self.on_close()
        self.closed = True


def _as_listed(raw: dict[str, Any]) -> dict[str, Any]:
    if raw.get("status") != "Error":
        return copy.deepcopy(raw)
    kept = ("name", "project", "status", "status_code", "type", "location")
    return {
        **{k: raw.get(k) for k in kept},
        "config": None, "devices": None, "profiles": None,
        "created_at": "0001-01-01T00:00:00Z", "architecture": "",
    }  # fmt: skip


class FakeIncus:
    """IncusApi over a recording. Mutable; every answer is a deep copy."""

    def __init__(self, recording: dict[str, Any], endpoint: str = "fake:/var/lib/incus") -> None:
        self.endpoint = endpoint
        self.requests = 0
        self.fail_on: set[str] = set()  # method names whose calls raise IncusError
        self.server: dict[str, Any] = copy.deepcopy(recording.get("server") or {})
        # The real server always has the default project besides the recorded ones.
        self.projects: list[str] = sorted({"default", *recording.get("projects", [])})
        self._lock = threading.RLock()
        self._order: list[Key] = []
        self._raw: dict[Key, dict[str, Any]] = {}
        self._state: dict[Key, dict[str, Any] | None] = {}
        for listed in recording.get("instances") or []:
            key = (listed.get("project") or "default", listed["name"])
            detail = (recording.get("instance") or {}).get(key[0], {}).get(key[1])
            self._order.append(key)
            self._raw[key] = copy.deepcopy(detail or listed)
            self._state[key] = copy.deepcopy(
                (recording.get("state") or {}).get(key[0], {}).get(key[1])
            )
        self._leases: dict[Key, list[dict[str, Any]]] = {
            (project, net): copy.deepcopy(leases)
            for project, nets in (recording.get("leases") or {}).items()
            for net, leases in nets.items()
        }
        self._networks: dict[Key, dict[str, Any]] = {
            (project, net): copy.deepcopy(network)
            for project, nets in (recording.get("networks") or {}).items()
            for net, network in nets.items()
        }
        self.files: dict[Key, dict[str, bytes]] = {}
        self.execs: list[tuple[str, str, list[str]]] = []
        self.exec_result: ExecResult | ExecHandler = (0, "", "")
        self.event_sources: list[FakeEventSource] = []
        self.calls: list[tuple[str, ...]] = []  # (method, *arguments) of every request
        self.state_batches: list[list[Key]] = []  # the keys of each instance_states call

    @classmethod
    def from_recording(cls, path: str | Path = RECORDING) -> FakeIncus:
        return cls(json.loads(Path(path).read_text()))

    # --- the IncusApi protocol ----------------------------------------------------------------

    def list_instances(self) -> list[dict[str, Any]]:
        """An instance in Error (its cluster member down) is listed as the real Incus lists
        it: name, project, status, type and location only, no config or devices."""
        self._request("list_instances")
        with self._lock:
            return [_as_listed(self._raw[key]) for key in self._order]

    def get_instance(self, project: str, name: str) -> dict[str, Any] | None:
        """An instance in Error cannot be asked (500: its member is down): IncusError."""
        self._request("get_instance", project, name)
        with self._lock:
            raw = self._raw.get((project, name))
            if raw is not None and raw.get("status") == "Error":
                raise IncusError(f"Incus request instances/{name} failed: peer node is down")
            return copy.deepcopy(raw) if raw is not None else None

    def instance_state(self, project: str, name: str) -> dict[str, Any] | None:
        """The recorded live state; status follows set_status. A Stopped instance's state has
        no network; an Error one (cluster member down) cannot answer: IncusError."""
        self._request("instance_state", project, name)
        with self._lock:
            key = (project, name)
            if key not in self._raw:
                return None
            status = self._raw[key].get("status", "")
            if status == "Error":
                raise IncusError(f"Incus request instances/{name}/state failed: member offline")
            state = copy.deepcopy(self._state.get(key)) or {}
            state["status"] = status
            state["status_code"] = self._raw[key].get("status_code", 0)
            if status in _NO_NETWORK:
                state["network"] = None
            return state

    def instance_states(self, keys: list[Key]) -> dict[Key, dict[str, Any] | None]:
        """One instance_state request per key (the real one has a few in flight at once);
        `state_batches` records each call's keys."""
        self.state_batches.append(list(keys))
        answers: dict[Key, dict[str, Any] | None] = {}
        errors: dict[Key, IncusError] = {}
        for key in keys:
            try:
                answers[key] = self.instance_state(*key)
            except IncusError as exc:
                errors[key] = exc
        if errors:
            raise StatesFailed(answers, errors)
        return answers

    def network_leases(self, project: str, network: str) -> list[dict[str, Any]]:
        self._request("network_leases", project, network)
        with self._lock:
            return copy.deepcopy(self._leases.get((project, network), []))

    def get_network(self, project: str, network: str) -> dict[str, Any] | None:
        self._request("get_network", project, network)
        with self._lock:
            found = self._networks.get((project, network))
            if found is None:  # a network of the default project is seen from every project
                found = next((v for (_, n), v in self._networks.items() if n == network), None)
            return copy.deepcopy(found) if found is not None else None

    def list_projects(self) -> list[str]:
        self._request("list_projects")
        return sorted(self.projects)

    def network_projects(self) -> set[str]:
        """A project with a network recorded under its own name has networks of its own."""
        self._request("network_projects")
        with self._lock:
            return {"default"} | {project for project, _ in self._networks}

    def server_version(self) -> str:
        """From the server answer read at connect time: no request of its own."""
        self._check("server_version")
        env = self.server.get("environment") or {}
        return str(env.get("server_version") or "?")

    def exec(self, project: str, name: str, argv: list[str]) -> ExecResult:
        self._request("exec", project, name)
        self._known(project, name)
        self.execs.append((project, name, list(argv)))
        result = self.exec_result
        return result(project, name, list(argv)) if callable(result) else result

    def read_file(self, project: str, name: str, path: str) -> bytes | None:
        self._request("read_file", project, name, path)
        self._known(project, name)
        with self._lock:
            return self.files.get((project, name), {}).get(path)

    def write_file(self, project: str, name: str, path: str, data: bytes) -> None:
        self._request("write_file", project, name, path)
        self._known(project, name)
        with self._lock:
            self.files.setdefault((project, name), {})[path] = bytes(data)

    def events(
        self, on_event: Callable[[dict[str, Any]], None], on_close: Callable[[], None]
    ) -> FakeEventSource:
        """No request until start(); start() raises IncusError when "events" is in fail_on."""
        source = FakeEventSource(on_event, on_close, fail="events" in self.fail_on)
        self.event_sources.append(source)
        return source

    # --- for tests ----------------------------------------------------------------------------

    @property
    def last_events(self) -> FakeEventSource | None:
        """The event stream opened last (None: none yet)."""
        return self.event_sources[-1] if self.event_sources else None

    def instance_keys(self) -> list[Key]:
        """(project, name) of every instance, in listing order."""
        with self._lock:
            return list(self._order)

    def recorded(self, project: str, name: str) -> dict[str, Any]:
        """A copy of the raw instance, e.g. to add() a variant of it (KeyError: unknown)."""
        with self._lock:
            return copy.deepcopy(self._raw[(project, name)])

    def set_status(self, project: str, name: str, status: str) -> None:
        with self._lock:
            raw = self._raw[(project, name)]
            raw["status"] = status
            raw["status_code"] = STATUS_CODES.get(status, 0)

    def set_config(self, project: str, name: str, key: str, value: str | None) -> None:
        """Set (None: unset) one key of the expanded config."""
        with self._lock:
            config = self._raw[(project, name)].setdefault("expanded_config", {})
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value

    def set_state(self, project: str, name: str, state: dict[str, Any] | None) -> None:
        with self._lock:
            self._known(project, name)
            self._state[(project, name)] = copy.deepcopy(state)

    def set_leases(self, project: str, network: str, leases: list[dict[str, Any]]) -> None:
        with self._lock:
            self._leases[(project, network)] = copy.deepcopy(leases)

    def remove(self, project: str, name: str) -> None:
        with self._lock:
            key = (project, name)
            self._order.remove(key)
            del self._raw[key]
            self._state.pop(key, None)
            self.files.pop(key, None)

    def add(self, raw_instance: dict[str, Any], state: dict[str, Any] | None = None) -> None:
        """A new instance (or a replacement of one with the same project and name). Without a
        state, its live state is its status and no network."""
        raw = copy.deepcopy(raw_instance)
        raw.setdefault("project", "default")
        key = (raw["project"], raw["name"])
        with self._lock:
            if key not in self._raw:
                self._order.append(key)
            self._raw[key] = raw
            self._state[key] = copy.deepcopy(state) if state is not None else {"network": {}}
            if raw["project"] not in self.projects:
                self.projects.append(raw["project"])

    # --- internals ----------------------------------------------------------------------------

    def _check(self, method: str) -> None:
        if method in self.fail_on:
            raise IncusError(f"Incus request failed: injected fault in {method}")

    def _request(self, method: str, *args: str) -> None:
        """One API request: counted and logged, then failed when the test asked for it."""
        with self._lock:
            self.requests += 1
            self.calls.append((method, *args))
        self._check(method)

    def _known(self, project: str, name: str) -> None:
        if (project, name) not in self._raw:
            raise IncusError(f"no instance {project}/{name}")
