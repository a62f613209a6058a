"""The status page of `watch --listen` in a real browser: Debian's Chromium driven by Playwright
(its own browser download is never used), against a real watch over the real lab.

It reads the rendered text of a routed, a rejected and a stopped instance with JavaScript off
(the page needs none), sees the page reload itself, takes screenshots at desktop and phone
widths (files under test-artifacts/, named in the JUnit properties), checks that the phone
layout needs no sideways scrolling, and has axe-core (the copy shipped in the PyPI package
axe-playwright-python) check headings, table headers, contrast and the rest of WCAG 2.1 AA."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ..helpers import skip_or_fail
from .conftest import ROOT, Caddy, Lab, WatchProcess, labels, wait_for
from .test_edge_e2e import get, listen_url

pytestmark = pytest.mark.integration

StartWatch = Callable[..., WatchProcess]
CHROMIUM = os.environ.get("INCUS_CADDYFILE_CHROMIUM", "/usr/bin/chromium")
# As root Chromium needs --no-sandbox; the rest keeps it off the network (none but loopback
# here) and quick to start.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]  # fmt: skip
ARTIFACTS = Path(os.environ.get("INCUS_CADDYFILE_TEST_ARTIFACTS", ROOT / "test-artifacts"))
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
AXE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_or_fail("playwright is not installed (pip install -e '.[test]')")
    if shutil.which(CHROMIUM) is None:
        skip_or_fail(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()


def axe_script() -> str:
    try:
        import axe_playwright_python
    except ImportError:
        skip_or_fail("axe-playwright-python (which ships axe-core) is not installed")
    return (Path(axe_playwright_python.__file__).parent / "axe.min.js").read_text()


def axe_violations(page: Any, skip: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """axe-core's WCAG 2.1 A/AA and best-practice rules on the page, less `skip`."""
    page.evaluate(axe_script())
    result = page.evaluate(
        """([tags, skip]) => axe.run(document, {
            runOnly: {type: 'tag', values: tags},
            rules: Object.fromEntries(skip.map(id => [id, {enabled: false}])),
        })""",
        [AXE_TAGS, list(skip)],
    )
    assert {"color-contrast", "th-has-data-cells", "page-has-heading-one"} <= {
        rule["id"] for rule in result["passes"] + result["violations"] + result["inapplicable"]
    }, "axe did not run the rules this test is about"
    return [
        {"id": v["id"], "impact": v["impact"], "help": v["help"],
         "nodes": [n["html"][:120] for n in v["nodes"][:3]]}
        for v in result["violations"]
    ]  # fmt: skip


@pytest.fixture
def fleet(
    lab: Lab, caddy: Caddy, tmp_path: Path, start_watch: StartWatch
) -> tuple[str, dict[str, str]]:
    """A watch with a routed, a rejected and a stopped instance in a project of its own."""
    caddy.start(caddy.stub_config(tmp_path / "stub.Caddyfile"))
    project = lab.project()
    tag = project[-4:]
    names = {"routed": f"ok-{tag}", "rejected": f"bad-{tag}", "stopped": f"off-{tag}"}
    watch = start_watch(tmp_path / "Caddyfile", *caddy.render_args, "--listen", "127.0.0.1:0")
    url = listen_url(watch)
    lab.launch(project, names["routed"], labels(f"{names['routed']}.localhost"))
    lab.launch(project, names["rejected"], labels(f"{names['rejected']}.localhost", port="eighty"))
    lab.launch(project, names["stopped"], labels(f"{names['stopped']}.localhost"), start=False)
    watch.wait_cycle(lambda c: f"{names['routed']}.localhost" in c.get("added", []))

    def all_seen() -> bool:
        routes = get(url, "/routes")[1]
        return all(f'"instance": "{n}"' in routes for n in names.values())

    assert wait_for(all_seen, 60), get(url, "/routes")
    return url, {k: f"{project}/{v}" for k, v in names.items()}


def row_text(page: Any, instance: str) -> str:
    """The rendered text of the instance's row in the Instances table."""
    row = page.locator("section[aria-labelledby=instances] tbody tr", has_text=instance + " ")
    if row.count() == 0:  # the cell holds only "project/name": match it exactly
        row = page.locator("section[aria-labelledby=instances] tbody tr").filter(
            has=page.get_by_text(instance, exact=True)
        )
    assert row.count() == 1, f"{instance}: {row.count()} rows"
    return str(row.inner_text())


def shoot(page: Any, name: str, record_property: Callable[[str, object], None]) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"status-page-{name}.png"
    page.screenshot(path=str(path), full_page=False)
    record_property(f"screenshot-{name}", str(path))
    assert path.stat().st_size > 10_000
    return path


def test_status_page_in_chromium(
    browser: Any,
    fleet: tuple[str, dict[str, str]],
    record_property: Callable[[str, object], None],
) -> None:
    url, who = fleet
    context = browser.new_context(viewport=DESKTOP, java_script_enabled=False)
    try:
        page = context.new_page()
        response = page.goto(url + "/")
        assert response is not None and response.status == 200
        assert page.locator("h1").inner_text().startswith("incus-caddyfile edge")

        routed = row_text(page, who["routed"])
        assert "Running" in routed and "routed" in routed and ":80" in routed
        rejected = row_text(page, who["rejected"])
        assert "not routed" in rejected and "not a port number" in rejected
        stopped = row_text(page, who["stopped"])
        assert "Stopped" in stopped and "not running (Stopped)" in stopped
        rejections = page.locator("section[aria-labelledby=rejected]").inner_text()
        assert who["rejected"] in rejections and "eighty" in rejections
        routes = page.locator("section[aria-labelledby=routes]").inner_text()
        assert f"{who['routed'].split('/')[1]}.localhost" in routes
        health = page.locator("section[aria-labelledby=health]").inner_text()
        assert "connected" in health and "current" in health
        assert "start" in page.locator("section[aria-labelledby=cycles]").inner_text()
        shoot(page, "desktop", record_property)

        with page.expect_event("load", timeout=15_000):  # <meta http-equiv="refresh">
            pass
        assert who["routed"] in page.locator("section[aria-labelledby=instances]").inner_text()

        page.set_viewport_size(PHONE)
        page.goto(url + "/")
        assert "not running (Stopped)" in row_text(page, who["stopped"])
        shoot(page, "phone", record_property)
    finally:
        context.close()


def test_status_page_accessibility(browser: Any, fleet: tuple[str, dict[str, str]]) -> None:
    """Every rule on the page as it is after `stop reloading`; on the self-reloading default
    page every rule but meta-refresh, which flags any timed reload: WCAG 2.2.1 asks that the
    user can turn it off, and the page's first link does that (checked here)."""
    url, _who = fleet
    for viewport in (DESKTOP, PHONE):
        context = browser.new_context(viewport=viewport)
        try:
            page = context.new_page()
            page.goto(url + "/")
            assert page.locator("meta[http-equiv=refresh]").count() == 1
            assert axe_violations(page, skip=("meta-refresh",)) == [], f"at {viewport['width']} px"
            page.get_by_role("link", name="stop reloading").click()
            assert page.url.endswith("/?refresh=0")
            assert page.locator("meta[http-equiv=refresh]").count() == 0
            assert axe_violations(page) == [], f"at {viewport['width']} px, not reloading"
            overflow = page.evaluate(
                "() => document.documentElement.scrollWidth - window.innerWidth"
            )
            assert overflow <= 0, f"sideways scrolling at {viewport['width']} px: {overflow} px"
        finally:
            context.close()
