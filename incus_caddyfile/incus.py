"""The only module that talks to Incus (through pylxd): the narrow `IncusApi` interface, listing
only the calls the tool makes, and its real implementation over pylxd.

It moves raw API data (the `metadata` of each answer, as `incus query` prints it) and decides
nothing: turning that data into model instances is `inventory`'s job.
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import pylxd
import requests
from pylxd import exceptions as pylxd_exc
from pylxd.client import EventType, get_session_for_url
from pylxd.client import _WebsocketClient as _PylxdWebsocket  # keeps its Origin handling

from .settings import DEFAULT_INCUS_TIMEOUT, Settings, default_incus_socket

# Live-state requests in flight at once when several instances need theirs (the listing's
# fallback when the leases do not cover them, e.g. after an incusd restart). Measured with
# 300 running instances out of 1157: 23 s one at a time, 17 s with 4, 9.7 s with 8, 11.5 s
# with 16 (incusd gathers each state on its own; more only queue up there).
STATE_CONCURRENCY = 8
Key = tuple[str, str]  # (project, instance)


class IncusError(Exception):
    """Incus could not be reached or a request failed; nothing must be rendered from it."""


EXEC_TIMEOUT = 60.0  # seconds a command run in an instance (and its file transfers) may take


class IncusTimeout(IncusError):
    """A request got no answer in time (--incus-timeout) from an Incus that may still answer
    others: a listing that waits for a cluster member cut off from the network."""


class StatesFailed(IncusError):
    """Some of several live states could not be had: the first failure's message, and what
    every instance answered (`answers`) or why it did not (`errors`), so that a caller need
    not ask the others again."""

    def __init__(
        self, answers: dict[Key, dict[str, Any] | None], errors: dict[Key, IncusError]
    ) -> None:
        super().__init__(str(next(iter(errors.values()))))
        self.answers = answers
        self.errors = errors


def _check_socket(path: str) -> None:
    """Say plainly what is wrong with a local socket path (pylxd's message is about URLs)."""
    if not os.path.exists(path):
        raise IncusError(
            f"no Incus socket at {path}: is incusd running? (set --incus or INCUS_SOCKET)"
        )
    if not os.access(path, os.R_OK | os.W_OK):
        raise IncusError(
            f"no permission to use the Incus socket {path}: run as root or as a member of"
            " the incus-admin group"
        )


@dataclass(frozen=True)
class Tls:
    """Client certificate and key, and the server certificate to pin, for a remote Incus."""

    cert: str | None = None
    key: str | None = None
    server_cert: str | None = None  # None: verify against the system's CAs


def default_client_cert() -> tuple[str, str] | None:
    """The certificate the `incus` client itself uses ($INCUS_CONF or ~/.config/incus)."""
    conf = os.environ.get("INCUS_CONF") or os.path.expanduser("~/.config/incus")
    cert, key = os.path.join(conf, "client.crt"), os.path.join(conf, "client.key")
    return (cert, key) if os.path.exists(cert) and os.path.exists(key) else None


def _remote_client(
    endpoint: str, tls: Tls, project: str | None = None, timeout: float | None = None
) -> pylxd.Client:
    """pylxd over HTTPS with a client certificate and, if given, a pinned server certificate.

    The session ignores REQUESTS_CA_BUNDLE and friends: with them set, requests would
    silently replace the pinned certificate by the system bundle.
    """
    if (tls.cert is None) != (tls.key is None):
        raise IncusError("give both --incus-cert and --incus-key, or neither")
    cert = (tls.cert, tls.key) if tls.cert and tls.key else default_client_cert()
    if cert is None:
        raise IncusError(
            f"no client certificate for {endpoint}: give --incus-cert and --incus-key (or"
            " create ~/.config/incus/client.crt with the incus client)"
        )
    for path in (*cert, tls.server_cert):
        if path is not None and not os.path.exists(path):
            raise IncusError(f"no such file: {path}")
    verify: str | bool = tls.server_cert or True
    session = get_session_for_url(endpoint, verify=verify, cert=cert)
    session.trust_env = False
    client = pylxd.Client(
        endpoint=endpoint,
        cert=cert,
        verify=verify,
        session=session,
        project=project,
        timeout=timeout,
    )
    if tls.server_cert:  # pin the event stream (websocket) too
        client.ssl_options = {
            **(client.ssl_options or {}),
            "ca_certs": tls.server_cert,
            "cert_reqs": ssl.CERT_REQUIRED,
        }
    if (client.host_info or {}).get("auth") != "trusted":
        raise IncusError(
            f"Incus at {endpoint} does not trust this client certificate: add it with"
            " `incus config trust add-certificate`"
        )
    return client


def _reason(exc: Exception) -> str:
    """The useful end of a requests/urllib3 error chain (e.g. the fingerprint mismatch)."""
    text = str(exc)
    if "Fingerprints did not match" in text:
        return "the server certificate is not the pinned one (--incus-server-cert)"
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "its certificate is not trusted: pin it with --incus-server-cert"
    return text


class EventSource(Protocol):
    """A stream of Incus events; events and the end of the stream go to callbacks."""

    def start(self) -> None: ...
    def close(self) -> None: ...


class IncusApi(Protocol):
    """Only the Incus calls the tool makes. Every method raises IncusError on failure.

    Answers are the raw `metadata` of the API (dicts as `incus query` prints them).
    """

    endpoint: str
    requests: int  # API requests made so far (benchmarks, the watch log)

    def list_instances(self) -> list[dict[str, Any]]: ...
    def get_instance(self, project: str, name: str) -> dict[str, Any] | None: ...
    def instance_state(self, project: str, name: str) -> dict[str, Any] | None: ...
    def instance_states(self, keys: Sequence[Key]) -> dict[Key, dict[str, Any] | None]: ...
    def network_leases(self, project: str, network: str) -> list[dict[str, Any]]: ...
    def get_network(self, project: str, network: str) -> dict[str, Any] | None: ...
    def list_projects(self) -> list[str]: ...
    def network_projects(self) -> set[str]: ...
    def server_version(self) -> str: ...
    def exec(self, project: str, name: str, argv: list[str]) -> tuple[int, str, str]: ...
    def read_file(self, project: str, name: str, path: str) -> bytes | None: ...
    def write_file(self, project: str, name: str, path: str, data: bytes) -> None: ...
    def events(
        self, on_event: Callable[[dict[str, Any]], None], on_close: Callable[[], None]
    ) -> EventSource: ...


def connect(settings: Settings) -> PylxdApi:
    """The Incus the settings name (a local socket by default). Raises IncusError."""
    tls = Tls(settings.incus_cert, settings.incus_key, settings.incus_server_cert)
    return PylxdApi(settings.incus or default_incus_socket(), tls, settings.incus_timeout)


class PylxdApi:
    """The real IncusApi, over pylxd (a unix socket, or HTTPS with a client certificate)."""

    def __init__(
        self, endpoint: str, tls: Tls | None = None, timeout: float = DEFAULT_INCUS_TIMEOUT
    ) -> None:
        """`timeout`: seconds one request may take to connect, and to send each answer."""
        self.endpoint = endpoint
        self.tls = tls or Tls()
        self.timeout = timeout
        self.requests = 0
        self._counting = threading.Lock()  # instance_states makes requests from a pool
        self._by_project: dict[str, pylxd.Client] = {}
        try:
            if not endpoint.startswith("https://"):
                _check_socket(endpoint)
            self._client = self._new_client(None)
        except requests.Timeout:
            raise IncusError(f"cannot connect to Incus at {endpoint}: {self._late('')}") from None
        except (pylxd_exc.ClientConnectionFailed, requests.RequestException, OSError) as exc:
            raise IncusError(f"cannot connect to Incus at {endpoint}: {_reason(exc)}") from None

    def _new_client(self, project: str | None, timeout: float | None = None) -> pylxd.Client:
        timeout = timeout or self.timeout
        if self.endpoint.startswith("https://"):
            return _remote_client(self.endpoint, self.tls, project, timeout)
        return pylxd.Client(endpoint=self.endpoint, project=project, timeout=timeout)

    def _late(self, path: str) -> str:
        """A request that timed out, named (GET /1.0/PATH) with the limit it broke."""
        url = f"/1.0/{path}" if path else "/1.0"
        return f"request GET {url} got no answer within {self.timeout:g} s (--incus-timeout)"

    def _get(self, path: str, params: dict[str, str], missing_ok: bool = False) -> Any:
        """GET one API path below /1.0; any failure becomes IncusError naming the path.
        missing_ok: a 404 answers None."""
        node = self._client.api
        for part in path.split("/"):
            node = node[part]
        with self._counting:
            self.requests += 1
        try:
            response = node.get(params=params)
            return response.json()["metadata"]
        except pylxd_exc.NotFound as exc:
            if missing_ok:
                return None
            raise IncusError(f"Incus request {path} failed: {exc}") from None
        except requests.Timeout:
            raise IncusTimeout(f"Incus {self._late(path)}") from None
        except (pylxd_exc.LXDAPIException, requests.RequestException, OSError, ValueError) as exc:
            raise IncusError(f"Incus request {path} failed: {exc}") from None

    def list_instances(self) -> list[dict[str, Any]]:
        """Every instance in every project, with expanded config and devices, no live state."""
        data = self._get("instances", {"recursion": "1", "all-projects": "true"})
        if not isinstance(data, list):
            raise IncusError("Incus returned an unexpected instance listing")
        return data

    def get_instance(self, project: str, name: str) -> dict[str, Any] | None:
        raw = self._get(f"instances/{name}", {"project": project}, missing_ok=True)
        if raw is not None and not isinstance(raw, dict):
            raise IncusError(f"Incus returned an unexpected answer for {project}/{name}")
        return raw

    def instance_state(self, project: str, name: str) -> dict[str, Any] | None:
        state = self._get(f"instances/{name}/state", {"project": project}, missing_ok=True)
        return state if isinstance(state, dict) else None

    def instance_states(self, keys: Sequence[Key]) -> dict[Key, dict[str, Any] | None]:
        """The live state of each instance (None: gone), STATE_CONCURRENCY requests at a
        time: Incus has no request for the state of just some instances, and one at a time
        each waits for the last. Raises StatesFailed (an IncusError) once all have answered,
        when any failed."""
        if len(keys) <= 1:
            return {key: self.instance_state(*key) for key in keys}

        def one(key: Key) -> dict[str, Any] | IncusError | None:
            try:
                return self.instance_state(*key)
            except IncusError as exc:
                return exc

        with ThreadPoolExecutor(min(STATE_CONCURRENCY, len(keys)), "incus-state") as pool:
            answers = dict(zip(keys, pool.map(one, keys), strict=True))
        errors = {key: a for key, a in answers.items() if isinstance(a, IncusError)}
        states = {key: a for key, a in answers.items() if not isinstance(a, IncusError)}
        if errors:
            raise StatesFailed(states, errors)
        return states

    def network_leases(self, project: str, network: str) -> list[dict[str, Any]]:
        """A managed network's DHCP leases; none for an unmanaged or unknown network."""
        try:
            data = self._get(f"networks/{network}/leases", {"project": project}, missing_ok=True)
        except IncusError as exc:
            if "not managed" in str(exc).lower() or "not found" in str(exc).lower():
                return []
            raise
        return [lease for lease in data or [] if isinstance(lease, dict)]

    def get_network(self, project: str, network: str) -> dict[str, Any] | None:
        data = self._get(f"networks/{network}", {"project": project}, missing_ok=True)
        return data if isinstance(data, dict) else None

    def list_projects(self) -> list[str]:
        """Names of the projects this client may see."""
        urls = self._get("projects", {})
        return sorted(str(u).rsplit("/", 1)[-1] for u in urls or [])

    def network_projects(self) -> set[str]:
        """The projects with networks of their own (features.networks); every other project
        uses the default project's networks."""
        projects = self._get("projects", {"recursion": "1"})
        own = {"default"}
        for project in projects if isinstance(projects, list) else []:
            config = project.get("config") or {} if isinstance(project, dict) else {}
            if str(config.get("features.networks", "")).lower() == "true":
                own.add(str(project.get("name")))
        return own

    def server_version(self) -> str:
        env = (self._client.host_info or {}).get("environment") or {}
        return str(env.get("server_version") or "?")

    def _project_client(self, project: str) -> pylxd.Client:
        """pylxd's instance objects (file API, exec) are bound to one project. An exec's
        answer waits for the command (a Caddy's reload inside the instance): these requests
        may take up to EXEC_TIMEOUT, or the timeout if that is longer."""
        if project not in self._by_project:
            try:
                self._by_project[project] = self._new_client(
                    project, max(self.timeout, EXEC_TIMEOUT)
                )
            except (pylxd_exc.ClientConnectionFailed, requests.RequestException, OSError) as exc:
                raise IncusError(f"cannot use project {project}: {_reason(exc)}") from None
        return self._by_project[project]

    def _instance_object(self, project: str, name: str) -> Any:
        try:
            return self._project_client(project).instances.get(name)
        except pylxd_exc.NotFound:
            raise IncusError(f"no instance {project}/{name}") from None
        except (pylxd_exc.LXDAPIException, requests.RequestException, OSError) as exc:
            raise IncusError(f"cannot reach instance {project}/{name}: {exc}") from None

    def exec(self, project: str, name: str, argv: list[str]) -> tuple[int, str, str]:
        """Run a command in an instance: (exit code, stdout, stderr)."""
        inst = self._instance_object(project, name)
        self.requests += 1
        try:
            result = inst.execute(argv)
        except (pylxd_exc.LXDAPIException, requests.RequestException, OSError) as exc:
            raise IncusError(f"exec in {project}/{name} failed: {exc}") from None
        return int(result.exit_code), str(result.stdout), str(result.stderr)

    def read_file(self, project: str, name: str, path: str) -> bytes | None:
        """A file's bytes from an instance, or None when there is no such file."""
        inst = self._instance_object(project, name)
        self.requests += 1
        try:
            return bytes(inst.files.get(path))
        except pylxd_exc.NotFound:
            return None
        except (pylxd_exc.LXDAPIException, requests.RequestException, OSError) as exc:
            raise IncusError(f"reading {path} in {project}/{name} failed: {exc}") from None

    def write_file(self, project: str, name: str, path: str, data: bytes) -> None:
        inst = self._instance_object(project, name)
        self.requests += 1
        try:
            inst.files.put(path, data, mode="0600")
        except (pylxd_exc.LXDAPIException, requests.RequestException, OSError) as exc:
            raise IncusError(f"writing {path} in {project}/{name} failed: {exc}") from None

    def events(
        self, on_event: Callable[[dict[str, Any]], None], on_close: Callable[[], None]
    ) -> EventStream:
        """Lifecycle and operation events of all projects, on a thread of their own."""
        return EventStream(self._client, on_event, on_close, self.timeout)


class EventStream:
    """`GET /1.0/events?type=lifecycle,operation&all-projects=true` over pylxd's websocket
    client (operations: a stop is announced at its start only by one).

    Events are only passed on (they are triggers, not data); when the stream ends for any
    reason `on_close` is called once, and the caller decides when to reconnect.
    """

    def __init__(
        self,
        client: pylxd.Client,
        on_event: Callable[[dict[str, Any]], None],
        on_close: Callable[[], None],
        timeout: float | None = None,
    ) -> None:
        """`timeout`: seconds the connect and handshake may take (then it reads unbounded:
        a quiet stream is not a broken one)."""
        stream = self
        self._timeout = timeout
        self._closed_once = threading.Lock()

        class _Socket(_PylxdWebsocket):  # type: ignore[misc]
            def received_message(self, message: Any) -> None:
                try:
                    data = json.loads(message.data.decode("utf-8"))
                except ValueError:
                    return
                if isinstance(data, dict):
                    on_event(data)

            def closed(self, code: int, reason: Any = None) -> None:
                stream._notify_close()

        self._on_close = on_close
        # pylxd builds the URL without all-projects; the query is ours to extend.
        self._socket = client.events(
            websocket_client=_Socket, event_types={EventType.Lifecycle, EventType.Operation}
        )
        self._socket.resource += "&all-projects=true"
        self._thread: threading.Thread | None = None

    def _notify_close(self) -> None:
        if self._closed_once.acquire(blocking=False):
            self._on_close()

    def start(self) -> None:
        """Connect (raises IncusError when that fails) and read events on a daemon thread."""
        try:
            self._socket.sock.settimeout(self._timeout)
            self._socket.connect()
            self._socket.sock.settimeout(None)
        except TimeoutError:
            raise IncusError(
                f"cannot open the Incus event stream: no answer within {self._timeout:g} s"
                " (--incus-timeout)"
            ) from None
        except Exception as exc:  # ws4py raises plain socket and handshake errors
            raise IncusError(f"cannot open the Incus event stream: {exc}") from None
        self._thread = threading.Thread(target=self._run, name="incus-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._socket.run()
        finally:
            self._notify_close()

    def close(self) -> None:
        with contextlib.suppress(Exception):  # already gone: nothing to close
            self._socket.close()
