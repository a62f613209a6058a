"""Readiness: does an instance's port accept a TCP connection yet? (I/O at the edge.)

Only instances the model names (`probe_target`: up, and `upstream.require_ready=true`) are
probed, in parallel, each with a short timeout, so a fleet of slow starters costs one timeout,
not one each.
"""

from __future__ import annotations

import dataclasses
import socket
from concurrent.futures import ThreadPoolExecutor

from .model import Instance, probe_target

TIMEOUT = 0.5
MAX_PARALLEL = 32


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
