"""The cost of `watch --listen`, for bench/watch.py (measure 5) and on its own
(`python bench/listener.py [--watch]`: the listener's work per cycle, without a lab; with
--watch, /ask under load against a real watch of the lab). A paced load of `/ask`
questions (as Caddy asks them with on-demand TLS) on one keep-alive connection, its latency,
and the watch's cycle latency with the listener on and under that load, against the same
figures with the listener off. Loopback only; the load is bounded in count and time."""

from __future__ import annotations

import http.client
import math
import statistics
import threading
import time
from collections.abc import Sequence
from typing import Any

from tests.harness import WatchProcess, wait_for

ASK_RATE = 200.0  # questions per second
MAX_SECONDS = 900.0  # the load stops by itself after this, whatever happens


def listen_url(watch: WatchProcess, timeout: float = 30.0) -> str:
    """The address the watch logged it listens on (given port 0)."""

    def find() -> str | None:
        return next(
            (str(r.data["url"]) for r in watch.records if r.data.get("event") == "listen"), None
        )

    url = wait_for(find, timeout, 0.05)
    if not url:
        raise RuntimeError(f"watch logged no listen address:\n{watch.log_text(10)}")
    return str(url)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class AskLoad:
    """`GET /ask?domain=NAME` at `rate` per second on one keep-alive connection (a new one if
    it breaks), cycling through `names`, from `start` until `stop` (or MAX_SECONDS)."""

    def __init__(self, url: str, names: Sequence[str], rate: float = ASK_RATE) -> None:
        host, _, port = url.removeprefix("http://").rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.names, self.rate = list(names), rate
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}
        self.errors = 0
        self.late = 0  # questions sent later than their slot (the client fell behind)
        self.elapsed = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ask-load", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        interval = 1.0 / self.rate
        began = time.perf_counter()
        limit = int(self.rate * MAX_SECONDS)
        for n in range(limit):
            slot = began + n * interval
            delay = slot - time.perf_counter()
            if delay > 0:
                if self._stop.wait(delay):
                    break
            elif delay < -interval:
                self.late += 1
            if self._stop.is_set():
                break
            name = self.names[n % len(self.names)]
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
                sent = time.perf_counter()
                conn.request("GET", f"/ask?domain={name}")
                response = conn.getresponse()
                response.read()
                self.latencies.append(time.perf_counter() - sent)
                self.statuses[response.status] = self.statuses.get(response.status, 0) + 1
            except (OSError, http.client.HTTPException):
                self.errors += 1
                if conn is not None:
                    conn.close()
                conn = None
        self.elapsed = time.perf_counter() - began
        if conn is not None:
            conn.close()

    def figures(self) -> dict[str, Any]:
        done = self.latencies
        return {
            "requests": len(done),
            "rate_per_s": round(len(done) / self.elapsed, 1) if self.elapsed else None,
            "target_rate_per_s": self.rate,
            "p50_ms": round(statistics.median(done) * 1000, 3) if done else None,
            "p99_ms": round(percentile(done, 0.99) * 1000, 3) if done else None,
            "max_ms": round(max(done) * 1000, 3) if done else None,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": self.errors,
            "late": self.late,
        }


def publish_cost(size: int, repeat: int = 20) -> dict[str, Any]:
    """What the listener adds to each cycle, without a lab: the keeper's work after a cycle
    (explain the fleet, count, publish the snapshot) over a synthetic fleet of `size`
    labelled instances, against building the model and rendering (which every cycle does)."""
    from incus_caddyfile.edge.keeper import EdgeState
    from incus_caddyfile.labels import KEY_ENABLE, KEY_HOST, KEY_PORT
    from incus_caddyfile.model import Instance, Nic, build
    from incus_caddyfile.pipeline import Report
    from incus_caddyfile.render import render
    from incus_caddyfile.settings import Settings
    from incus_caddyfile.watch.triggers import Kind, Trigger

    fleet = [
        Instance(
            project=f"p{n % 3}", name=f"i{n}", status="Running" if n % 10 else "Stopped",
            config={KEY_ENABLE: "true", KEY_HOST: f"h{n}.bench.localhost", KEY_PORT: "80"},
            nics=(Nic("eth0", (f"198.18.{n // 250}.{n % 250 + 1}",)),),
        )
        for n in range(size)
    ]  # fmt: skip
    settings = Settings(scheme="http")
    state = EdgeState(process_metrics=False)
    cycle, keep = [], []
    for _ in range(repeat):
        began = time.perf_counter()
        model = build(fleet)
        render(model, settings)
        cycle.append(time.perf_counter() - began)
        began = time.perf_counter()
        state.cycle(Report(model=model, written=True), [Trigger(Kind.TIMER)], {}, 0.0, fleet, 0.0)
        keep.append(time.perf_counter() - began)
    return {
        "instances": size,
        "model_and_render_ms": round(statistics.median(cycle) * 1000, 2),
        "keeper_ms": round(statistics.median(keep) * 1000, 2),
    }


def ask_against_watch(seconds: float = 15.0) -> dict[str, Any]:
    """/ask at ASK_RATE against a real `watch --listen` of this Incus (all projects; the file
    goes to a temp directory, Caddy is not reloaded), while it runs its cycles as they come."""
    import json
    import tempfile
    import urllib.request
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="icf-listener-") as workdir:
        watch = WatchProcess(
            Path(workdir) / "Caddyfile", "--scheme", "http", "--no-reload",
            "--caddy-admin", "127.0.0.1:9", "--listen", "127.0.0.1:0",
        )  # fmt: skip
        try:
            url = listen_url(watch)
            watch.wait_cycles(1, timeout=120)
            with urllib.request.urlopen(url + "/routes", timeout=10) as answer:
                rows = json.loads(answer.read())
            hosts = [h for r in rows if r["state"] == "routed" for h in r["routed"]][:20]
            load = AskLoad(url, hosts + [f"nobody{n}.example.test" for n in range(20)])
            cycles = len(watch.cycles())
            load.start()
            time.sleep(min(seconds, MAX_SECONDS))
            load.stop()
            return {**load.figures(), "watch_cycles_during": len(watch.cycles()) - cycles}
        finally:
            watch.stop()


if __name__ == "__main__":
    import sys

    import repo_root  # noqa: F401  (sys.path: the repository root)

    for n in (150, 1000):
        print(publish_cost(n))
    if "--watch" in sys.argv:  # needs the lab (a reachable Incus)
        print(ask_against_watch())
