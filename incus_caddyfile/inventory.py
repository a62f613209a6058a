"""Step 1: raw Incus data in, plain model instances out, through the narrow `IncusApi`.

Listing strategy, chosen for cost: the instance listing at recursion=1 gives every instance's
expanded config without live state (~30 ms for 150 instances, against ~400 ms for recursion=2,
which gathers state for each one). Addresses of labelled instances that are up come from the
managed bridges' DHCP leases, one request per (project, network) pair whatever the fleet size;
only an instance the leases do not cover (a static address set inside it, an unmanaged network,
IPv6) costs a state request of its own; those are asked together, a few in flight at once
(`IncusApi.instance_states`). Which instances want an address, and whether the one found is
enough, is the model's rule (`wants_address`, `missing_address`, `needs_own_address`); this
module only asks it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .incus import IncusApi, IncusError, StatesFailed
from .labels import PREFIX
from .model import (
    UNKNOWN,
    Instance,
    Nic,
    missing_address,
    needs_own_address,
    wants_address,
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
LeaseMaps = Mapping[tuple[str, str], Mapping[str, list[str]]]


@dataclass(frozen=True)
class NicRef:
    """A NIC device as the instance's config describes it (no addresses yet)."""

    device: str
    interface: str  # its name inside the instance
    network: str | None  # the managed network whose leases can tell its address
    hwaddr: str
    host_name: str = ""  # its host-side device, named anew by Incus at every start ("": not)


def nic_refs(raw: Mapping[str, Any]) -> list[NicRef]:
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
        # Only a name Incus makes up at each start tells one boot from the next: none for a
        # NIC whose host-side name the operator set (the same at every start), nor for one
        # off a managed network (no subnet to check a remembered address against).
        pinned = bool(dev.get("host_name")) or network is None
        host_name = "" if pinned else str(config.get(f"volatile.{device}.host_name") or "")
        out.append(NicRef(device, dev.get("name") or device, network, hwaddr, host_name))
    return out


def bare_instance(raw: Mapping[str, Any], project: str | None = None) -> Instance:
    """An instance from its listing entry: identity, status and labels, no addresses."""
    return Instance(
        project=project or raw.get("project") or "default",
        name=raw["name"],
        status=raw.get("status", ""),
        type=raw.get("type", ""),
        created_at=raw.get("created_at", ""),
        location=raw.get("location", ""),
        config={
            k: v for k, v in (raw.get("expanded_config") or {}).items() if k.startswith(PREFIX)
        },
    )


def lease_map(leases: Iterable[Mapping[str, Any]]) -> dict[str, list[str]]:
    """MAC -> addresses, from a network's lease list."""
    out: dict[str, list[str]] = {}
    for lease in leases:
        hwaddr = str(lease.get("hwaddr") or "").lower()
        if hwaddr and lease.get("address"):
            out.setdefault(hwaddr, []).append(str(lease["address"]))
    return out


def state_addresses(state: Mapping[str, Any] | None) -> dict[str, list[str]]:
    """Interface name -> addresses, from an instance's live state."""
    network = (state or {}).get("network") or {}
    return {
        ifname: [a["address"] for a in iface.get("addresses") or [] if a.get("address")]
        for ifname, iface in network.items()
    }


def network_bounds(config: Mapping[str, Any]) -> tuple[list[IPNetwork], set[IPAddress]]:
    """A managed network's subnets and its own (gateway) addresses, from its config."""
    subnets: list[IPNetwork] = []
    own: set[IPAddress] = set()
    for option in ("ipv4.address", "ipv6.address"):
        try:
            iface = ipaddress.ip_interface(str(config.get(option, "")))
        except ValueError:
            continue  # none, auto, or not set
        subnets.append(iface.network)
        own.add(iface.ip)
    return subnets, own


def within(addresses: Iterable[str], subnets: list[IPNetwork], own: set[IPAddress]) -> list[str]:
    """The addresses inside the subnets and not the network's own; all of them when the
    network has no subnets (not managed: nothing to check against)."""
    if not subnets:
        return list(addresses)
    kept = []
    for raw in addresses:
        try:
            addr = ipaddress.ip_address(raw.split("%")[0])
        except ValueError:
            continue
        if addr not in own and any(addr in net for net in subnets):
            kept.append(raw)
    return kept


Bounds = dict[tuple[str, str], tuple[list[IPNetwork], set[IPAddress]]]


@dataclass
class LeaseOutage:
    """Leases calls that failed, remembered by a caller that lists often (watch). With a
    cluster member down, every leases call (any bridge) fails with "peer node is down", and
    while a member is cut off each one takes ~5 s to: after a failure the leases are not
    asked for `pause` seconds, and addresses come from each instance's state meanwhile."""

    pause: float = 30.0
    until: float = float("-inf")

    def open(self, now: float) -> bool:
        return now >= self.until

    def failed(self, now: float) -> None:
        self.until = now + self.pause


class AddressMemo:
    """Addresses found for a NIC (from its lease, or its live state inside its managed
    network), kept for as long as that NIC stays up: Incus names a NIC's host-side device
    anew at every start (`volatile.<nic>.host_name`), so the same name means the same boot,
    and the instance still has the address it had. When the leases miss the NIC (an incusd
    restart empties the lease tables; the instances renew within the hour) the memo gives
    its address without a state request. A caller that lists often keeps one (watch)."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, str, str], tuple[str, tuple[str, ...]]] = {}

    def recall(self, inst: Instance, ref: NicRef) -> tuple[str, ...]:
        host_name, addresses = self._known.get((inst.project, inst.name, ref.device), ("", ()))
        return addresses if ref.host_name and host_name == ref.host_name else ()

    def note(self, inst: Instance, refs: Iterable[NicRef]) -> None:
        by_device = {n.name: n.addresses for n in inst.nics}
        for ref in refs:
            key = (inst.project, inst.name, ref.device)
            if ref.host_name and by_device.get(ref.device):
                self._known[key] = (ref.host_name, by_device[ref.device])
            else:
                self._known.pop(key, None)

    def keep_only(self, instances: Iterable[Instance]) -> None:
        """Forget the NICs of instances that are gone (after a full listing)."""
        present = {(i.project, i.name) for i in instances}
        self._known = {k: v for k, v in self._known.items() if k[:2] in present}

    def clear(self) -> None:
        self._known.clear()

    def __len__(self) -> int:
        return len(self._known)

    def entries(self) -> dict[str, dict[str, Any]]:
        """What it holds, as plain data (`render` keeps it beside its output: lastknown)."""
        return {
            "/".join(key): {"host_name": host_name, "addresses": list(addresses)}
            for key, (host_name, addresses) in sorted(self._known.items())
        }

    @classmethod
    def of(cls, entries: Mapping[str, Any]) -> AddressMemo:
        """The memo `entries` gave. Raises ValueError on anything else."""
        memo = cls()
        for key, entry in entries.items():
            project, name, device = str(key).split("/")
            addresses = entry["addresses"]
            if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
                raise ValueError("addresses must be a list of strings")
            memo._known[(project, name, device)] = (str(entry["host_name"]), tuple(addresses))
        return memo


class Inventory:
    """The fleet as model data, read through an IncusApi. Raises IncusError rather than
    return a partial listing. `bounds`: managed networks' subnets already known (a caller
    that asks often may keep them; a network change makes watch re-list everything)."""

    def __init__(
        self,
        api: IncusApi,
        bounds: Bounds | None = None,
        considers: Callable[[str], bool] | None = None,
        outage: LeaseOutage | None = None,
        clock: Callable[[], float] = time.monotonic,
        memo: AddressMemo | None = None,
    ) -> None:
        """`considers(project)`: whether the project counts (the settings' policy); the
        instances of the others are listed without addresses, at no request of their own.
        `outage`: failed leases calls, remembered across inventories (see LeaseOutage).
        `memo`: addresses of NICs still up since they were found (see AddressMemo).
        After a listing, `self.notes` says what it had to do without (failed requests), for
        the cycle's warnings."""
        self.api = api
        self._bounds: Bounds = {} if bounds is None else bounds
        self.considers = considers or (lambda project: True)
        self.outage = outage or LeaseOutage()
        self.clock = clock
        self.memo = memo
        self.notes: list[str] = []
        self._network_projects: set[str] | None = None  # (see _network_home)

    def instances(self) -> list[Instance]:
        """Every instance of every project."""
        raws = self.api.list_instances()
        bare = [bare_instance(raw) for raw in raws]
        leases = self._lease_maps(
            (inst, raw)
            for inst, raw in zip(bare, raws, strict=True)
            if self._wants(inst) and not needs_own_address(inst)
        )
        leased = [self._leased(inst, raw, leases) for inst, raw in zip(bare, raws, strict=True)]
        found = self._with_states(leased, raws)
        self._remember(found, raws)
        if self.memo is not None:
            self.memo.keep_only(found)
        return found

    def instance(
        self,
        project: str,
        name: str,
        own: bool = False,
        just_up: Callable[[str], bool] | None = None,
    ) -> Instance | None:
        """One instance, refreshed on its own (a few requests whatever the fleet size);
        None when it no longer exists. `own`: its addresses as it reports them itself (those
        it has configured), not its leases. `just_up(network)`: it was down before, and the
        host can tell addresses on this network by itself (its neighbour table): if it turns
        out to need its own address on such a network, none is asked (its live state, the
        slowest request, would not have it yet), and its NICs come without addresses, for a
        poll to find them."""
        raw = self.api.get_instance(project, name)
        if raw is None:
            return None
        inst = bare_instance(raw, project)
        refs = nic_refs(raw)
        if (
            just_up is not None
            and self._wants(inst)
            and needs_own_address(inst)
            and any(r.hwaddr and r.network and just_up(r.network) for r in refs)
        ):
            for ref in refs:  # the subnets a poll checks addresses against
                if ref.network:
                    self._network_bounds(inst.project, ref.network)
            nics = tuple(Nic(r.device, (), r.network or "", r.interface, r.hwaddr) for r in refs)
            return dataclasses.replace(inst, nics=nics)
        own = own or needs_own_address(inst)
        wanted = [(inst, raw)] if self._wants(inst) and not own else []
        leased = self._leased(inst, raw, self._lease_maps(wanted), own)
        found = self._with_states([leased], [raw], own)
        self._remember(found, [raw])
        return found[0]

    def _remember(self, insts: list[Instance], raws: list[dict[str, Any]]) -> None:
        if self.memo is not None:
            for inst, raw in zip(insts, raws, strict=True):
                if self._wants(inst):
                    self.memo.note(inst, nic_refs(raw))

    def _wants(self, inst: Instance) -> bool:
        return wants_address(inst) and self.considers(inst.project)

    def _lease_maps(self, wanted: Iterable[tuple[Instance, Mapping[str, Any]]]) -> LeaseMaps:
        """Leases of each (project, network) the wanted instances use. When a leases call
        fails (a cluster member down fails them all), none is asked any more: the instances
        then find their addresses in their own state (`_with_states`)."""
        pairs = sorted(
            {(inst.project, n.network) for inst, raw in wanted for n in nic_refs(raw) if n.network}
        )
        maps: dict[tuple[str, str], Mapping[str, list[str]]] = {}
        if pairs and not self.outage.open(self.clock()):
            self.notes.append(
                "leases not asked (they failed less than"
                f" {self.outage.pause:g} s ago); addresses from each instance's state"
            )
            return maps
        for pair in pairs:
            try:
                maps[pair] = lease_map(self.api.network_leases(*pair))
            except IncusError as exc:
                self.outage.failed(self.clock())
                self.notes.append(f"{exc}; addresses from each instance's state instead")
                break
        return maps

    def _leased(
        self, inst: Instance, raw: Mapping[str, Any], leases: LeaseMaps, own: bool = False
    ) -> Instance:
        """The instance with its NICs' addresses from the leases (or, for a NIC the leases
        miss, from the memo); unchanged when it wants none, or when only an address it has
        configured will do (`own`, or require_ready: `needs_own_address`)."""
        if not self._wants(inst) or own or needs_own_address(inst):
            return inst
        nics = []
        for r in nic_refs(raw):
            found = tuple(leases.get((inst.project, r.network or ""), {}).get(r.hwaddr, []))
            if not found and self.memo is not None:
                found = self.memo.recall(inst, r)
                if found and r.network:  # (kept in a file too: checked as a state is)
                    found = tuple(within(found, *self._network_bounds(inst.project, r.network)))
            nics.append(Nic(r.device, found, r.network or "", r.interface, r.hwaddr))
        return dataclasses.replace(inst, nics=tuple(nics))

    def _needs_state(self, inst: Instance, own: bool) -> bool:
        """The model's rule: only the live state can tell this instance's address (the
        leases do not give the one its labels ask for, or only a configured one will do)."""
        return self._wants(inst) and (own or needs_own_address(inst) or missing_address(inst))

    def _with_states(
        self, insts: list[Instance], raws: list[dict[str, Any]], own: bool = False
    ) -> list[Instance]:
        """Addresses from the live state for the instances that need it, asked of Incus
        together (a few requests in flight at once: after an incusd restart the leases
        cover almost nobody, and one at a time took 2.5 s for 150 instances). One whose
        state fails (its cluster member went down) is unknown; when the whole request fails
        without saying which, each is asked on its own."""
        needing = [i for i, inst in enumerate(insts) if self._needs_state(inst, own)]
        if not needing:
            return insts
        keys = [(insts[i].project, insts[i].name) for i in needing]
        failed: Mapping[tuple[str, str], IncusError] = {}
        try:
            states: Mapping[tuple[str, str], Any] = self.api.instance_states(keys)
        except StatesFailed as exc:
            states, failed = exc.answers, exc.errors
        except IncusError:
            states = {}
        out = list(insts)
        for i, key in zip(needing, keys, strict=True):
            inst, refs = insts[i], nic_refs(raws[i])
            try:
                if key in failed:
                    raise failed[key]
                state = states[key] if key in states else self.api.instance_state(*key)
            except IncusError as exc:
                out[i] = self._unreachable(inst, exc)
                continue
            out[i] = dataclasses.replace(inst, nics=self._state_nics(inst, refs, state))
        return out

    def own(self, inst: Instance) -> Instance | None:
        """The instance with the addresses it reports itself now, from its live state alone
        (one request; its NICs as the last refresh knew them). None when it is gone."""
        state = self.api.instance_state(inst.project, inst.name)
        if state is None:
            return None
        refs = [
            NicRef(n.name, n.interface or n.name, n.network or None, n.hwaddr) for n in inst.nics
        ]
        status = str(state.get("status") or inst.status)
        return dataclasses.replace(inst, status=status, nics=self._state_nics(inst, refs, state))

    def nearby(self, inst: Instance, resolved: Callable[[str], list[str]]) -> Instance | None:
        """The instance with, as its NICs' addresses, those the host's neighbour table
        already resolves to their MACs (`resolved(mac)`), inside their managed networks'
        subnets; None when there are none. Candidates only: an address is the instance's own
        once it answers on it (a TCP connection to it is accepted). Only NICs on managed
        networks whose subnets are known count (no Incus request here)."""
        nics = []
        for nic in inst.nics:
            subnets, own = self._bounds.get((inst.project, nic.network), ([], set()))
            found = resolved(nic.hwaddr) if nic.hwaddr and subnets else []
            nics.append(dataclasses.replace(nic, addresses=tuple(within(found, subnets, own))))
        if not any(n.addresses for n in nics):
            return None
        return dataclasses.replace(inst, nics=tuple(nics))

    def _unreachable(self, inst: Instance, exc: IncusError) -> Instance:
        """Its state could not be had (its cluster member went down meanwhile): Incus cannot
        tell now, which is what the unknown status says; the model keeps its last route."""
        self.notes.append(f"{inst.project}/{inst.name}: {exc}; taken as {UNKNOWN} (unknown)")
        return dataclasses.replace(inst, status=UNKNOWN, nics=())

    def _state_nics(
        self, inst: Instance, refs: list[NicRef], state: Mapping[str, Any] | None
    ) -> tuple[Nic, ...]:
        """Addresses the instance reports for its Incus NICs. Whoever runs the instance sets
        these, so on a managed network only addresses inside its subnets count, and never
        the network's own (gateway) address: a tenant cannot point a route at the host or at
        another network. Interfaces Incus did not create are ignored."""
        by_ifname = state_addresses(state)
        nics = []
        for ref in refs:
            found = by_ifname.get(ref.interface, [])
            if ref.network:
                found = within(found, *self._network_bounds(inst.project, ref.network))
            nics.append(Nic(ref.device, tuple(found), ref.network or "", ref.interface, ref.hwaddr))
        return tuple(nics)

    def _network_bounds(self, project: str, network: str) -> tuple[list[IPNetwork], set[IPAddress]]:
        """Cached per inventory: a network's subnets do not change within a cycle. Asked
        once per network, not per project using it: Incus answers each with the network's
        `used_by`, which it finds among every instance (~40 ms at 1000 instances)."""
        key = (project, network)
        if key not in self._bounds:
            home = (self._network_home(project), network)
            if home not in self._bounds:
                raw = self.api.get_network(*home) or {}
                self._bounds[home] = network_bounds(raw.get("config") or {})
            self._bounds[key] = self._bounds[home]
        return self._bounds[key]

    def _network_home(self, project: str) -> str:
        """The project whose networks `project` uses: its own (features.networks), else the
        default project's. Asked once per inventory, and only for a project other than the
        default; when that fails, the network is asked of the project itself."""
        if project == "default":
            return project
        if self._network_projects is None:
            try:
                self._network_projects = self.api.network_projects()
            except IncusError:
                self._network_projects = set()
        owns = project in self._network_projects or not self._network_projects
        return project if owns else "default"
