"""Readiness: does an instance's port accept a TCP connection yet? (I/O at the edge.)

Only instances the model names (`probe_target`: up, and `upstream.require_ready=true`) are
probed, in parallel, each with a short timeout, so a fleet of slow starters costs one timeout,
not one each.
"""

from __future__ import annotations

import dataclasses
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .model import Instance, probe_target

TIMEOUT = 0.5
MAX_PARALLEL = 32
NET_DEVICES = Path("/sys/class/net")  # a managed bridge is a device of its own name
ARP_TABLE = Path("/proc/net/arp")  # the host's IPv4 neighbour table (any user may read it)
ATF_COM = 0x2  # a complete entry: the MAC is known


def accepts(address: str, port: int, timeout: float = TIMEOUT) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def annotate(instances: list[Instance], timeout: float = TIMEOUT) -> list[Instance]:
    """The same instances, with `ready` set for those that asked to be probed."""
    targets = {i: t for i, inst in enumerate(instances) if (t := probe_target(inst)) is not None}
    if not targets:
        return instances
    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(targets))) as pool:
        futures = {
            i: pool.submit(accepts, addr, port, timeout) for i, (addr, port) in targets.items()
        }
        results = {i: f.result() for i, f in futures.items()}
    return [
        dataclasses.replace(inst, ready=results[i]) if i in results else inst
        for i, inst in enumerate(instances)
    ]


def neighbours(hwaddr: str, table: Path | None = None) -> list[str]:
    """IPv4 addresses the host's neighbour table resolves to this MAC now (complete entries
    only). Dialling such an address cannot leave the entry incomplete (no ARP request is
    needed), unlike dialling an address the host has no entry for. Empty when the table
    cannot be read (not Linux, or Incus on another host)."""
    try:
        lines = (table or ARP_TABLE).read_text().splitlines()[1:]
    except OSError:
        return []
    out = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 4 and fields[3].lower() == hwaddr.lower():
            try:
                complete = int(fields[2], 16) & ATF_COM
            except ValueError:
                continue
            if complete:
                out.append(fields[0])
    return out


def bridged_here(network: str, devices: Path | None = None) -> bool:
    """The Incus network is a bridge on this host (watch runs beside Incus), so the host's
    neighbour table learns its instances' addresses."""
    return bool(network) and "/" not in network and ((devices or NET_DEVICES) / network).exists()
