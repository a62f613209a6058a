"""Step 1, and the only module that talks to Incus (through pylxd).

Listing strategy, chosen for cost: `GET /1.0/instances?recursion=1&all-projects=true` returns
every instance's expanded config without live state (~30 ms for 150 instances, against ~400 ms
for recursion=2, which gathers state for each one). Addresses of labelled running instances come
from the managed bridges' DHCP leases, one request per (project, network) pair whatever the
fleet size; only an instance with no lease (static address set inside it, unmanaged network)
costs a state request of its own.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import ssl
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pylxd
import requests
from pylxd import exceptions as pylxd_exc
from pylxd.client import EventType, get_session_for_url
from pylxd.client import _WebsocketClient as _PylxdWebsocket  # keeps its Origin handling

from .labels import PREFIX, reach_of
from .model import ROUTABLE_STATUSES, Instance, Nic, pick_address

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class IncusError(Exception):
    """Incus could not be reached or a request failed; nothing must be rendered from it."""


@dataclass(frozen=True)
class _NicRef:
    device: str
    interface: str
    network: str | None
    hwaddr: str


def _nics(raw: Mapping[str, Any]) -> list[_NicRef]:
    """NIC devices in name order, with the network whose leases can tell their address."""
    config = raw.get("expanded_config") or {}
    out = []
    for device, dev in sorted((raw.get("expanded_devices") or {}).items()):
        if dev.get("type") != "nic":
            continue
        network = dev.get("network") or (
            dev.get("parent") if dev.get("nictype") == "bridged" else None
        )
        hwaddr = (dev.get("hwaddr") or config.get(f"volatile.{device}.hwaddr") or "").lower()
        out.append(_NicRef(device, dev.get("name") or device, network, hwaddr))
    return out


def _is_candidate(raw: Mapping[str, Any]) -> bool:
    """Labelled and running (or paused): the only instances whose address is worth a request."""
    config = raw.get("expanded_config") or {}
    return raw.get("status") in ROUTABLE_STATUSES and any(k.startswith(PREFIX) for k in config)


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


def _remote_client(endpoint: str, tls: Tls, project: str | None = None) -> pylxd.Client:
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
        endpoint=endpoint, cert=cert, verify=verify, session=session, project=project
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


class IncusClient:
    """A narrow client: only the calls this tool makes."""

    def __init__(self, endpoint: str, tls: Tls | None = None) -> None:
        self.endpoint = endpoint
        self.tls = tls or Tls()
        self.requests = 0  # API requests made, for benchmarks and the watch log
        self._by_project: dict[str, pylxd.Client] = {}
        self._subnets: dict[tuple[str, str], tuple[list[IPNetwork], set[IPAddress]]] = {}
        try:
            if not endpoint.startswith("https://"):
                _check_socket(endpoint)
            self._client = self._new_client(None)
        except (pylxd_exc.ClientConnectionFailed, requests.RequestException, OSError) as exc:
            raise IncusError(f"cannot connect to Incus at {endpoint}: {_reason(exc)}") from None

    def _new_client(self, project: str | None) -> pylxd.Client:
        if self.endpoint.startswith("https://"):
            return _remote_client(self.endpoint, self.tls, project)
        return pylxd.Client(endpoint=self.endpoint, project=project)

    def _get(self, path: str, params: dict[str, str]) -> Any:
        """GET one API path below /1.0; any failure becomes IncusError naming the path."""
        node = self._client.api
        for part in path.split("/"):
            node = node[part]
        self.requests += 1
        try:
            response = node.get(params=params)
            return response.json()["metadata"]
        except pylxd_exc.NotFound:
            raise
        except (pylxd_exc.LXDAPIException, requests.RequestException, OSError, ValueError) as exc:
            raise IncusError(f"Incus request {path} failed: {exc}") from None

    def list_raw(self) -> list[dict[str, Any]]:
        """Every instance in every project, with expanded config and devices, no live state."""
        try:
            data = self._get("instances", {"recursion": "1", "all-projects": "true"})
        except pylxd_exc.NotFound as exc:
            raise IncusError(f"Incus instance listing failed: {exc}") from None
        if not isinstance(data, list):
            raise IncusError("Incus returned an unexpected instance listing")
        return data

    def leases(self, project: str, network: str) -> dict[str, list[str]]:
        """MAC -> addresses on a managed network. Unmanaged or unknown networks have none."""
        try:
            data = self._get(f"networks/{network}/leases", {"project": project})
        except pylxd_exc.NotFound:
            return {}
        except IncusError as exc:
            if "not managed" in str(exc).lower() or "not found" in str(exc).lower():
                return {}
            raise
        out: dict[str, list[str]] = {}
        for lease in data or []:
            hwaddr = (lease.get("hwaddr") or "").lower()
            if hwaddr and lease.get("address"):
                out.setdefault(hwaddr, []).append(lease["address"])
        return out

    def state_addresses(self, project: str, name: str) -> dict[str, list[str]]:
        """Interface name -> addresses, from the instance's live state (one request)."""
        try:
            state = self._get(f"instances/{name}/state", {"project": project})
        except pylxd_exc.NotFound:
            return {}  # deleted between the listing and now: it has no address
        network = (state or {}).get("network") or {}
        return {
            ifname: [a["address"] for a in iface.get("addresses") or [] if a.get("address")]
            for ifname, iface in network.items()
        }

    def server_version(self) -> str:
        env = (self._client.host_info or {}).get("environment") or {}
        return str(env.get("server_version") or "?")

    def projects(self) -> list[str]:
        """Names of the projects this client may see (one request)."""
        try:
            urls = self._get("projects", {})
        except pylxd_exc.NotFound as exc:
            raise IncusError(f"Incus project listing failed: {exc}") from None
        return sorted(str(u).rsplit("/", 1)[-1] for u in urls or [])

    def instance(self, project: str, name: str) -> Instance | None:
        """One instance, refreshed on its own (a few requests, whatever the fleet size).

        None when it no longer exists. Raises IncusError when Incus cannot answer.
        """
        try:
            raw = self._get(f"instances/{name}", {"project": project})
        except pylxd_exc.NotFound:
            return None
        if not isinstance(raw, dict):
            raise IncusError(f"Incus returned an unexpected answer for {project}/{name}")
        raw.setdefault("project", project)
        candidates = [raw] if _is_candidate(raw) else []
        return self._to_instance(raw, self._lease_maps(candidates))

    def _project_client(self, project: str) -> pylxd.Client:
        """pylxd's instance objects (file API, exec) are bound to one project."""
        if project not in self._by_project:
            try:
                self._by_project[project] = self._new_client(project)
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
        """Lifecycle events of all projects, delivered on a thread of their own."""
        return EventStream(self._client, on_event, on_close)

    def list_instances(self) -> list[Instance]:
        """The fleet as plain model data. Raises IncusError rather than return a partial list."""
        raws = self.list_raw()
        candidates = [r for r in raws if _is_candidate(r)]
        lease_maps = self._lease_maps(candidates)
        return [self._to_instance(r, lease_maps) for r in raws]

    def _lease_maps(
        self, candidates: Iterable[Mapping[str, Any]]
    ) -> dict[tuple[str, str], dict[str, list[str]]]:
        pairs = sorted(
            {(r["project"], n.network) for r in candidates for n in _nics(r) if n.network}
        )
        return {pair: self.leases(*pair) for pair in pairs}

    def _to_instance(
        self, raw: Mapping[str, Any], lease_maps: Mapping[tuple[str, str], dict[str, list[str]]]
    ) -> Instance:
        project = raw.get("project") or "default"
        nics: list[Nic] = []
        if _is_candidate(raw):
            refs = _nics(raw)
            for ref in refs:
                found = lease_maps.get((project, ref.network or ""), {}).get(ref.hwaddr, [])
                nics.append(Nic(ref.device, tuple(found), ref.network or ""))
            if self._needs_state(raw, nics):
                nics = self._nics_from_state(project, raw["name"], refs)
        return Instance(
            project=project,
            name=raw["name"],
            status=raw.get("status", ""),
            type=raw.get("type", ""),
            created_at=raw.get("created_at", ""),
            location=raw.get("location", ""),
            config={
                k: v for k, v in (raw.get("expanded_config") or {}).items() if k.startswith(PREFIX)
            },
            nics=tuple(nics),
        )

    @staticmethod
    def _needs_state(raw: Mapping[str, Any], nics: list[Nic]) -> bool:
        """Leases cover IPv4 on managed bridges; anything else needs the live state."""
        config = raw.get("expanded_config") or {}
        reach = reach_of({k: v for k, v in config.items() if k.startswith(PREFIX)})
        if reach is None:
            return not any(n.addresses for n in nics)
        probe = Instance(project="", name="", nics=tuple(nics))
        return pick_address(probe, reach.network, reach.family) is None

    def _nics_from_state(self, project: str, name: str, refs: list[_NicRef]) -> list[Nic]:
        """Addresses the instance reports for its Incus NICs. Whoever runs the instance sets
        these, so on a managed network only addresses inside its subnets count, and never
        the network's own (gateway) address: a tenant cannot point a route at the host or at
        another network. Interfaces Incus did not create are ignored."""
        by_ifname = self.state_addresses(project, name)
        nics = []
        for ref in refs:
            found = by_ifname.get(ref.interface, [])
            if ref.network:
                found = self._within_network(project, ref.network, found)
            nics.append(Nic(ref.device, tuple(found), ref.network or ""))
        return nics

    def _within_network(self, project: str, network: str, addresses: list[str]) -> list[str]:
        subnets, own = self._network_subnets(project, network)
        if not subnets:
            return addresses  # not a managed network: nothing to check against
        kept = []
        for raw in addresses:
            try:
                addr = ipaddress.ip_address(raw.split("%")[0])
            except ValueError:
                continue
            if addr not in own and any(addr in net for net in subnets):
                kept.append(raw)
        return kept

    def _network_subnets(
        self, project: str, network: str
    ) -> tuple[list[IPNetwork], set[IPAddress]]:
        """A managed network's subnets and its own addresses (cached per client)."""
        key = (project, network)
        if key not in self._subnets:
            try:
                config = (self._get(f"networks/{network}", {"project": project}) or {}).get(
                    "config"
                ) or {}
            except pylxd_exc.NotFound:
                config = {}
            subnets: list[IPNetwork] = []
            own: set[IPAddress] = set()
            for option in ("ipv4.address", "ipv6.address"):
                try:
                    iface = ipaddress.ip_interface(str(config.get(option, "")))
                except ValueError:
                    continue  # none, auto, or not set
                subnets.append(iface.network)
                own.add(iface.ip)
            self._subnets[key] = (subnets, own)
        return self._subnets[key]


class EventStream:
    """`GET /1.0/events?type=lifecycle&all-projects=true` over pylxd's websocket client.

    Events are only passed on (they are triggers, not data); when the stream ends for any
    reason `on_close` is called once, and the caller decides when to reconnect.
    """

    def __init__(
        self,
        client: pylxd.Client,
        on_event: Callable[[dict[str, Any]], None],
        on_close: Callable[[], None],
    ) -> None:
        stream = self
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
        self._socket = client.events(websocket_client=_Socket, event_types={EventType.Lifecycle})
        self._socket.resource += "&all-projects=true"
        self._thread: threading.Thread | None = None

    def _notify_close(self) -> None:
        if self._closed_once.acquire(blocking=False):
            self._on_close()

    def start(self) -> None:
        """Connect (raises IncusError when that fails) and read events on a daemon thread."""
        try:
            self._socket.connect()
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
