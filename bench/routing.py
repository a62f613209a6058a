"""Benchmark: what the generated Caddyfile's shape costs every request, measured with wrk.

Caddy tries a server's routes in order, so with one site block per host a request for the last
host pays for every host before it. The default template groups alike hosts into one site
block (a host matcher Caddy searches in log time) with a map from host to upstream
(`incus_caddyfile/shape.py`). This bench renders, with the real model and template:

- the baseline: a one-site config;
- for each fleet size N: the per-host layout (grouping turned off) and the grouped layout,
  each as plain sites and under a `*.DOMAIN` wildcard site;

loads each into one real Caddy through its admin API, and runs wrk (keep-alive, one thread)
against the first, the middle and the last host, interleaved in rounds; each run is paired
with a run of the one-site config just before it, in the same Caddy process. The upstreams are
a second real Caddy answering with the address it was dialled on, in a network namespace
the bench creates (root), where each host has its own address (198.18.240.0/22 is local
there, routed to it over a veth); every config is checked to route each measured host to its
own upstream before it is timed, and a non-2xx answer during a wrk run fails the bench.

Reported: per host, the median of its paired ratios, for requests/s and for Caddy's CPU time
per request (steadier on a shared machine); and each layout's worst host. Goal (issue 13):
every host at 1000 sites >= 0.9x.

The upstream is a static responder, not an Incus instance: the bench measures Caddy's
routing, which a slower upstream would hide. Needs `wrk` (Debian package) and Caddy.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import repo_root  # noqa: F401  (sys.path: the repository root, for tests.harness)

from incus_caddyfile import render as render_mod
from incus_caddyfile import shape
from incus_caddyfile.caddy import AdminAPI, find_caddy
from incus_caddyfile.labels import KEY_ENABLE, KEY_HOST, KEY_PORT
from incus_caddyfile.model import Instance, Nic, Site, build
from incus_caddyfile.settings import Settings
from tests.harness import Caddy, free_port, stop_process, wait_for

DOMAIN = "bench.test"
Layout = Callable[[Sequence[Site]], shape.Layout]


def per_host(sites: Sequence[Site]) -> shape.Layout:
    """Grouping off: one block per host, as before host groups."""
    return shape.layout(sites, at=len(sites) + 1)


LAYOUTS: dict[str, Layout] = {"per-host": per_host, "grouped": shape.layout}


UPSTREAMS = "198.18.240.0/22"  # local inside the namespace: one address per host
LINK_HOST, LINK_NS = "198.18.244.1", "198.18.244.2"


def upstream_address(i: int) -> str:
    return f"198.18.{240 + i // 250}.{i % 250 + 1}"


class Namespace:
    """A network namespace reached over a veth, where the upstreams' addresses are local."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.name, self.veth = f"icf-rt-{tag}", f"icfrt{tag}"

    def __enter__(self) -> Namespace:
        ip = self.ip
        taken = subprocess.run(["ip", "route", "show", UPSTREAMS], capture_output=True, text=True)
        if taken.stdout.strip():
            raise SystemExit(f"{UPSTREAMS} is routed already ({taken.stdout.strip()}):"
                             " does another bench/routing.py run?")  # fmt: skip
        ip("netns", "add", self.name)
        try:
            ip("link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.name)
            ip("addr", "add", f"{LINK_HOST}/30", "dev", self.veth)
            ip("link", "set", self.veth, "up")
            ip("-n", self.name, "addr", "add", f"{LINK_NS}/30", "dev", "eth0")
            ip("-n", self.name, "link", "set", "eth0", "up")
            ip("-n", self.name, "link", "set", "lo", "up")
            # an address with a prefix on lo makes the whole prefix local (as 127.0.0.1/8)
            ip("-n", self.name, "addr", "add", UPSTREAMS, "dev", "lo")
            ip("route", "add", UPSTREAMS, "via", LINK_NS, "dev", self.veth)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)

    @staticmethod
    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], capture_output=True, check=True, timeout=10)

    def command(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]


def fleet(size: int) -> list[Instance]:
    return [
        Instance(
            project="default",
            name=f"svc{i:04d}",
            config={KEY_ENABLE: "true", KEY_HOST: host(i), KEY_PORT: "80"},
            nics=(Nic("eth0", (upstream_address(i),)),),
        )
        for i in range(size)
    ]


def host(i: int) -> str:
    return f"svc{i:04d}.{DOMAIN}"


def caddyfile(size: int, layout: Layout, wildcard: bool, edge: Caddy, port: int) -> str:
    """The real model and template, with the upstreams' port set to the responder's."""
    settings = Settings(
        scheme="http",
        caddy_admin=edge.admin,
        global_options=(f"http_port {edge.http_port}",),
        wildcards=(f"*.{DOMAIN}",) if wildcard else (),
    )
    instances = [
        Instance(i.project, i.name, config={**i.config, KEY_PORT: str(port)}, nics=i.nics)
        for i in fleet(size)
    ]
    model = build(instances, settings.wildcards, tuning=settings.tuning)
    env = render_mod.environment(render_mod.default_template_dir())
    env.globals["layout"] = layout
    template = env.get_template(render_mod.DEFAULT_TEMPLATE)
    return template.render(render_mod.context(model, settings))


@dataclass(frozen=True)
class Config:
    name: str
    size: int
    layout: str
    wildcard: bool

    @property
    def hosts(self) -> list[int]:
        """The first, the middle and the last host (a one-site config has one)."""
        return sorted({0, self.size // 2, self.size - 1})


@dataclass(frozen=True)
class Run:
    """One wrk run: requests/s, and the Caddy's CPU seconds per request (user + system, from
    /proc): on a machine others load, requests/s moves with them; CPU per request much less."""

    rps: float
    cpu_per_request: float


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(caddy: Caddy, host_header: str, seconds: int) -> Run:
    """A keep-alive wrk run; raises when any answer was not 2xx/3xx or a socket failed."""
    assert caddy.proc is not None
    cpu = cpu_seconds(caddy.proc.pid)
    out = subprocess.run(
        ["wrk", "-t1", "-c16", f"-d{seconds}s", "-H", f"Host: {host_header}",
         f"http://127.0.0.1:{caddy.http_port}/"],
        capture_output=True, text=True, check=True, timeout=seconds + 30,
    ).stdout  # fmt: skip
    cpu = cpu_seconds(caddy.proc.pid) - cpu
    if "Non-2xx" in out or "Socket errors" in out:
        raise SystemExit(f"wrk against {host_header} saw failures:\n{out}")
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    count = re.search(r"(\d+) requests in", out)
    if rps is None or count is None:
        raise SystemExit(f"no request count in wrk output:\n{out}")
    return Run(float(rps.group(1)), cpu / max(int(count.group(1)), 1))


def check_routing(edge: Caddy, config: Config) -> None:
    """Each measured host answers from its own upstream (the responder echoes the address)."""
    for i in config.hosts:
        status, body = edge.get(host(i))
        if status != 200 or body.strip() != upstream_address(i):
            raise SystemExit(f"{config.name}: {host(i)} answered {status} {body!r}")
        status, body = edge.get(host(i).upper())  # host names are case-insensitive
        if status != 200 or body.strip() != upstream_address(i):
            raise SystemExit(f"{config.name}: {host(i).upper()} answered {status} {body!r}")


def load(edge: Caddy, text: str) -> None:
    AdminAPI(edge.admin, timeout=60).load(text)
    # a /load returns once the new config runs; one request makes sure the server is warm
    wait_for(lambda: edge.get(host(0))[0] == 200, 10)


ONE_SITE = Config("one site", 1, "per-host", False)


def configs(sizes: Sequence[int]) -> list[Config]:
    # the one-site config against itself shows the pairing's noise; one host under a
    # wildcard shows what the wildcard site itself costs (its pattern matcher, one more level)
    out = [ONE_SITE, Config("one host, wildcard", 1, "per-host", True)]
    for size in sizes:
        for layout in LAYOUTS:
            for wildcard in (False, True):
                kind = "wildcard" if wildcard else "sites"
                out.append(Config(f"{size} {kind} {layout}", size, layout, wildcard))
    return out


def responder(caddy_exe: str, workdir: Path, ns: Namespace) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = workdir / "responder.caddyfile"
    conf.write_text(
        "{\n\tadmin off\n\tauto_https off\n}\n\n"
        f'http://:{port} {{\n\trespond "{{http.request.local.host}}"\n}}\n'
    )
    proc = subprocess.Popen(
        ns.command([caddy_exe, "run", "--config", str(conf), "--adapter", "caddyfile"]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def up() -> bool:
        try:
            conn = http.client.HTTPConnection(upstream_address(0), port, timeout=1)
            conn.request("GET", "/")
            return conn.getresponse().status == 200
        except OSError:
            return False

    if not wait_for(up, 15):
        raise SystemExit("the upstream responder did not start")
    return proc, port


Pairs = dict[str, dict[int, list[tuple[Run, Run]]]]  # config -> host -> (one site, it)


def run(args: argparse.Namespace) -> dict[str, object]:
    caddy_exe = find_caddy()
    if caddy_exe is None or shutil.which("wrk") is None:
        raise SystemExit("needs caddy and wrk (apt-get install wrk)")
    pairs: Pairs = {}
    with tempfile.TemporaryDirectory(prefix="icf-routing-") as tmp, Namespace() as ns:
        workdir = Path(tmp)
        proc, port = responder(str(caddy_exe), workdir, ns)
        edge = Caddy(caddy_exe, workdir)
        try:
            edge.start(edge.stub_config(workdir / "stub.caddyfile"))
            plan = configs(args.sizes)
            texts = {
                c.name: caddyfile(c.size, LAYOUTS[c.layout], c.wildcard, edge, port) for c in plan
            }
            for c in plan:  # every config routes correctly before anything is timed
                load(edge, texts[c.name])
                check_routing(edge, c)
            one_site = texts[ONE_SITE.name]
            for round_no in range(args.rounds):
                order = plan if round_no % 2 == 0 else list(reversed(plan))
                for c in order:
                    for i in c.hosts:
                        # each run paired with the one-site config right before it, in the
                        # same Caddy process (a second process differs by a few %), both
                        # right after a /load: load from other users moves both alike
                        load(edge, one_site)
                        b = wrk(edge, host(0), args.duration)
                        load(edge, texts[c.name])
                        it = wrk(edge, host(i), args.duration)
                        pairs.setdefault(c.name, {}).setdefault(i, []).append((b, it))
                        print(f"round {round_no + 1} {c.name:26} {host(i):20}"
                              f" {it.rps:6.0f} req/s ({it.rps / b.rps:4.2f}x),"
                              f" CPU/request {b.cpu_per_request / it.cpu_per_request:4.2f}x",
                              flush=True)  # fmt: skip
        finally:
            edge.stop()
            stop_process(proc)
    return summarize(pairs, args)


def summarize(pairs: Pairs, args: argparse.Namespace) -> dict[str, object]:
    """Per host, the medians of its paired ratios (requests/s, and the inverse of CPU per
    request: both read "x the one-site config", higher is better); per config, its worst
    host by each."""
    rows = {}
    for name, by_host in pairs.items():
        rps = {
            host(i): statistics.median(it.rps / b.rps for b, it in v) for i, v in by_host.items()
        }
        cpu = {
            host(i): statistics.median(b.cpu_per_request / it.cpu_per_request for b, it in v)
            for i, v in by_host.items()
        }
        rows[name] = {
            "rps_ratio_by_host": rps,
            "cpu_ratio_by_host": cpu,
            "worst_rps_ratio": min(rps.values()),
            "worst_cpu_ratio": min(cpu.values()),
        }
    every_base = [b.rps for by_host in pairs.values() for v in by_host.values() for b, _ in v]
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average": os.getloadavg(),
        "rounds": args.rounds,
        "seconds_per_run": args.duration,
        "group_at": shape.GROUP_AT,
        "one_site_rps_median": statistics.median(every_base),
        "configs": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[150, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=2, help="seconds per wrk run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    summary = run(args)
    print(f"\none-site config: {summary['one_site_rps_median']:.0f} req/s (median of its runs)")
    print("worst host of each layout, as a ratio to the one-site config (higher is better):")
    print(f"{'layout':28} {'requests/s':>10} {'CPU/request':>12}")
    for name, row in summary["configs"].items():  # type: ignore[attr-defined]
        print(f"{name:28} {row['worst_rps_ratio']:9.2f}x {row['worst_cpu_ratio']:11.2f}x")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    sys.exit(0)


if __name__ == "__main__":
    main()
