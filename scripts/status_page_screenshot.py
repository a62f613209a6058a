#!/usr/bin/env python3
"""Make docs/status-page.png, the README's picture of the status page: the real page, served by
the real listener, over the watch loop fed by the recorded lab (tests/fixtures/incus/lab.json)
and a fake Caddy, shot by Debian's Chromium through Playwright. No Incus, no root.

    .venv/bin/python scripts/status_page_screenshot.py [OUT.png] [WIDTH]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from incus_caddyfile import probe  # noqa: E402
from incus_caddyfile.edge.address import parse  # noqa: E402
from incus_caddyfile.edge.listener import Listener  # noqa: E402
from tests.test_edge import Observed  # noqa: E402

CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "status-page.png"
    width = int(sys.argv[2]) if len(sys.argv) > 2 else 1100
    probe.accepts = lambda *args, **kwargs: True  # the recorded addresses are not dialled
    loop = Observed()
    loop.run_for(0.1)
    loop.incus.set_config("icfrec-b", "rec-static", "user.caddyserver.http.upstream.port", "80a")
    loop.emit("icfrec-b", "rec-static", "instance-updated")
    loop.run_for(0.3)
    loop.incus.set_status("icfrec-c", "rec-v6", "Stopped")
    loop.emit("icfrec-c", "rec-v6", "instance-stopped")
    loop.run_for(0.3)
    listener = Listener(parse("127.0.0.1:0"), loop.app)
    listener.start()
    try:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": width, "height": 800})
            page.goto(f"http://127.0.0.1:{listener.port}/?refresh=0")
            page.screenshot(path=str(out), full_page=True)
            browser.close()
    finally:
        listener.stop()
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
