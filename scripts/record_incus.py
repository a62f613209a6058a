#!/usr/bin/env python3
"""Record the Incus answers incus-caddyfile reads, from a small throwaway fleet in the lab.

    python3 scripts/record_incus.py tests/fixtures/incus/lab.json

Needs the lab of scripts/lab.sh (bridges icfbr0 and icfbr1, image icf-busybox), root (or the
incus-admin group) and gcc for the guest program that marks an instance Ready. Uses only the
standard library, the `incus` CLI (`incus query` prints the `metadata` of an API answer) and the
lab helpers of tests/harness.py (the repository root goes on sys.path for them).

It creates the projects icfrec-a, icfrec-b and icfrec-c (removing leftovers of an interrupted
run first, and only those), starts the fleet below, records every answer the tool reads, and
removes the projects again whatever happens:

    icfrec-a  rec-web      labelled, running                      eth0 icfbr0 (DHCP)
              rec-alt      labelled (port 8080), running          eth0 icfbr0 (DHCP)
              rec-plain    no labels, running                     eth0 icfbr0 (DHCP)
              rec-stopped  labelled, stopped                      eth0 icfbr0
              rec-frozen   labelled, paused (Frozen)              eth0 icfbr0 (DHCP)
    icfrec-b  rec-profiled labels from the profile `caddy` only    eth0 icfbr0 (DHCP)
              rec-ready    labelled, require_ready, status Ready  eth0 icfbr0 (DHCP)
              rec-static   labelled, no lease: device eth0 is the interface net0 inside,
                           its address set statically with `ip addr add`
    icfrec-c  rec-v6       labelled for eth1 / ipv6               eth0 icfbr0 (DHCP),
                                                                  eth1 icfbr1 (SLAAC only)
              rec-dual     labelled for ipv6 (no network label)   eth0 icfbr1 (DHCP + SLAAC)

The recording (JSON, indent 1, sorted keys) holds the raw `metadata` of:
    server     GET /1.0
    instances  GET /1.0/instances?recursion=1&all-projects=true (only the icfrec-* projects)
    instance   {project: {name: GET /1.0/instances/NAME?project=P}}
    state      {project: {name: GET /1.0/instances/NAME/state?project=P}}
    leases     {project: {network: GET /1.0/networks/NET/leases?project=P}}
    networks   {project: {network: GET /1.0/networks/NET?project=P}}
    projects   the project names created here
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # the repository root, for tests.harness
    sys.path.insert(0, str(HERE.parent))

from incus_caddyfile.labels import HTTP  # noqa: E402
from tests import harness  # noqa: E402
from tests.harness import NETWORK as NET  # noqa: E402
from tests.harness import NETWORK2 as NET2  # noqa: E402  (dual stack: SLAAC)
from tests.harness import create_project, incus, projects_named  # noqa: E402

PREFIX = "icfrec-"
PROJECTS = [PREFIX + "a", PREFIX + "b", PREFIX + "c"]


def log(message: str) -> None:
    print(f"record: {message}", file=sys.stderr, flush=True)


def query(path: str) -> Any:
    """The `metadata` of one GET answer."""
    return json.loads(incus("query", path))


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 30) -> Any:
    """harness.wait_for, but a timeout raises and says what it waited for."""
    value = harness.wait_for(predicate, timeout, interval=0.2)
    if not value:
        raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
    return value


def labels(host: str, port: int = 80, **extra: str) -> dict[str, str]:
    """harness.labels plus more keys below user.caddyserver.http. (`__` stands for `.`)."""
    keys = harness.labels(host, port)
    keys.update({HTTP + k.replace("__", "."): v for k, v in extra.items()})
    return keys


# --- projects ---------------------------------------------------------------------------------


def remove_project(project: str) -> None:
    if not project.startswith(PREFIX):  # never touch anyone else's projects
        raise ValueError(project)
    harness.remove_project(project)


# --- instances --------------------------------------------------------------------------------


def init(
    project: str,
    name: str,
    config: dict[str, str] | None = None,
    profiles: tuple[str, ...] = ("default",),
    network: str | None = None,
) -> None:
    """Create (not start) an instance of the lab image."""
    harness.launch(project, name, config, profiles, start=False, network=network)


def start(project: str, name: str) -> None:
    incus("start", name, "--project", project)


def run_in(project: str, name: str, script: str) -> str:
    return incus("exec", name, "--project", project, "--", "sh", "-c", script)


def global_addresses(project: str, name: str, ifname: str, family: str) -> list[str]:
    state = query(f"/1.0/instances/{name}/state?project={project}") or {}
    iface = (state.get("network") or {}).get(ifname) or {}
    return [
        a["address"]
        for a in iface.get("addresses") or []
        if a.get("family") == family and a.get("scope") == "global"
    ]


def wait_address(project: str, name: str, ifname: str = "eth0", family: str = "inet") -> str:
    found = wait_for(
        f"a global {family} address on {project}/{name} {ifname}",
        lambda: global_addresses(project, name, ifname, family),
    )
    return str(found[0])


def wait_lease(project: str, network: str, name: str, family: int = 4) -> None:
    def leased() -> bool:
        for lease in query(f"/1.0/networks/{network}/leases?project={project}") or []:
            addr = ipaddress.ip_address(lease.get("address", "0.0.0.0"))
            if lease.get("hostname") == name and addr.version == family:
                return True
        return False

    wait_for(f"a lease of {project}/{name} on {network}", leased)


def wait_status(project: str, name: str, status: str) -> None:
    wait_for(
        f"{project}/{name} to be {status}",
        lambda: query(f"/1.0/instances/{name}?project={project}").get("status") == status,
    )


def free_static_address(network: str) -> str:
    """An address of the network's subnet that no lease (in any project) uses, from the top."""
    config = query(f"/1.0/networks/{network}").get("config") or {}
    iface = ipaddress.ip_interface(config["ipv4.address"])
    used = {
        lease.get("address")
        for lease in query(f"/1.0/networks/{network}/leases?all-projects=true") or []
    }
    for addr in reversed(list(iface.network.hosts())):
        if str(addr) not in used and addr != iface.ip:
            return str(addr)
    raise RuntimeError(f"no free address on {network}")


def mark_ready(project: str, name: str, workdir: Path) -> bool:
    """rec-ready tells Incus through the guest API that it is Ready (needs gcc)."""
    try:
        harness.set_guest_state(project, name, harness.build_guest_ready(workdir))
    except (OSError, subprocess.CalledProcessError, harness.HarnessError) as exc:
        log(f"guest_ready in {project}/{name} failed, it stays Running: {exc}")
        return False
    wait_status(project, name, "Ready")
    return True


def build_fleet(workdir: Path) -> None:
    a, b, c = PROJECTS
    for project in PROJECTS:
        create_project(project)

    # icfrec-a: the plain cases
    init(a, "rec-web", labels("a.example.test"))
    init(a, "rec-alt", labels("alt.example.test", 8080, matchers__path="/api/*"))
    init(a, "rec-plain")
    init(a, "rec-stopped", labels("stopped.example.test"))
    init(a, "rec-frozen", labels("frozen.example.test"))

    # icfrec-b: labels from a profile; Ready; a static address without a lease
    incus("profile", "create", "caddy", "--project", b)
    for key, value in labels("b.example.test").items():
        incus("profile", "set", "caddy", f"{key}={value}", "--project", b)
    init(b, "rec-profiled", profiles=("default", "caddy"))
    init(b, "rec-ready", labels("ready.example.test", upstream__require_ready="true"))
    init(b, "rec-static", labels("static.example.test"))
    incus("config", "device", "override", "rec-static", "eth0", "name=net0", "--project", b)

    # icfrec-c: IPv6 on a second NIC (SLAAC only), and a dual-stack first NIC
    init(c, "rec-v6", labels("v6.example.test", upstream__network="eth1",
                             upstream__family="ipv6"))  # fmt: skip
    incus("config", "device", "add", "rec-v6", "eth1", "nic", f"network={NET2}", "name=eth1",
          "--project", c)  # fmt: skip
    init(c, "rec-dual", labels("dual.example.test", upstream__family="ipv6"), network=NET2)

    everyone = [(a, n) for n in ("rec-web", "rec-alt", "rec-plain", "rec-stopped", "rec-frozen")]
    everyone += [(b, n) for n in ("rec-profiled", "rec-ready", "rec-static")]
    everyone += [(c, "rec-v6"), (c, "rec-dual")]
    for project, name in everyone:
        start(project, name)

    # The image brings up eth0 with udhcpc; rec-static has no eth0 (its NIC is net0 inside).
    static = free_static_address(NET)
    run_in(b, "rec-static", f"ip link set net0 up && ip addr add {static}/24 dev net0")
    run_in(c, "rec-v6", "ip link set eth1 up")  # the image's rcS only raises eth0
    for project, name in everyone:
        if name == "rec-static":
            wait_address(project, name, "net0")
            continue
        net = NET2 if name == "rec-dual" else NET
        wait_address(project, name)
        wait_lease(project, net, name)
    wait_address(c, "rec-v6", "eth1", "inet6")
    wait_lease(c, NET2, "rec-v6", family=6)
    wait_address(c, "rec-dual", "eth0", "inet6")
    time.sleep(2)  # let the SLAAC addresses finish duplicate address detection

    incus("stop", "--force", "rec-stopped", "--project", a)
    incus("pause", "rec-frozen", "--project", a)
    wait_status(a, "rec-frozen", "Frozen")
    if mark_ready(b, "rec-ready", workdir):
        log("rec-ready is Ready")


# --- recording --------------------------------------------------------------------------------


def networks_of(raw: dict[str, Any]) -> set[str]:
    """The networks whose leases could hold an address of this instance's NICs."""
    out = set()
    for dev in (raw.get("expanded_devices") or {}).values():
        if dev.get("type") != "nic":
            continue
        network = dev.get("network") or (
            dev.get("parent") if dev.get("nictype") == "bridged" else None
        )
        if network:
            out.add(network)
    return out


def record() -> dict[str, Any]:
    listing = query("/1.0/instances?recursion=1&all-projects=true") or []
    instances = sorted(
        (r for r in listing if r.get("project") in PROJECTS),
        key=lambda r: (r["project"], r["name"]),
    )
    out: dict[str, Any] = {
        "server": query("/1.0"),
        "instances": instances,
        "instance": {p: {} for p in PROJECTS},
        "state": {p: {} for p in PROJECTS},
        "leases": {p: {} for p in PROJECTS},
        "networks": {p: {} for p in PROJECTS},
        "projects": list(PROJECTS),
    }
    pairs: set[tuple[str, str]] = set()
    for raw in instances:
        project, name = raw["project"], raw["name"]
        out["instance"][project][name] = query(f"/1.0/instances/{name}?project={project}")
        out["state"][project][name] = query(f"/1.0/instances/{name}/state?project={project}")
        pairs |= {(project, net) for net in networks_of(raw)}
    for project, net in sorted(pairs):
        out["leases"][project][net] = query(f"/1.0/networks/{net}/leases?project={project}")
        out["networks"][project][net] = query(f"/1.0/networks/{net}?project={project}")
    return out


def summary(data: dict[str, Any]) -> str:
    lines = []
    for raw in data["instances"]:
        project, name = raw["project"], raw["name"]
        network = (data["state"][project][name] or {}).get("network") or {}
        nics = []
        for ifname, iface in sorted(network.items()):
            if ifname == "lo":
                continue
            addrs = [
                a["address"] for a in iface.get("addresses") or [] if a.get("scope") == "global"
            ]
            nics.append(f"{ifname}={','.join(addrs) or '-'}")
        lines.append(f"  {project}/{name}: {raw['status']} {' '.join(nics)}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="where to write the recording (JSON)")
    parser.add_argument(
        "--keep", action="store_true", help="leave the fleet running (remove it by hand)"
    )
    args = parser.parse_args()
    if shutil.which("incus") is None:
        log("the incus client is not installed (run scripts/lab.sh up)")
        return 2
    for project in projects_named(PREFIX):  # left by an interrupted run
        log(f"removing the leftover project {project}")
        remove_project(project)
    try:
        with tempfile.TemporaryDirectory(prefix="icfrec-") as tmp:
            log("building the fleet")
            build_fleet(Path(tmp))
        log("recording")
        data = record()
    finally:
        if not args.keep:
            log("removing the fleet")
            for project in PROJECTS:
                remove_project(project)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    args.output.write_text(text)
    log(f"wrote {args.output} ({len(text.encode())} bytes)\n{summary(data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
