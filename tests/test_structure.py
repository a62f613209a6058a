"""The shape of the package: no import cycle, one module per outside system, and the
reachability rule written once (the edges ask the model, they never test a status)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "incus_caddyfile"
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "imports.py"


def _imports_script():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("imports_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sources() -> dict[str, str]:
    return {str(p.relative_to(PACKAGE)): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_module_imports_a_module_that_imports_it() -> None:
    script = _imports_script()
    edges = script.graph()
    assert "incus_caddyfile.pipeline" in edges["incus_caddyfile.watch.loop"]
    assert script.cycles(edges) == []


def test_the_cycle_finder_finds_cycles() -> None:
    script = _imports_script()
    assert script.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_only_the_incus_module_talks_to_incus() -> None:
    talkers = [
        n
        for n, text in sources().items()
        if re.search(r"^\s*(import|from) (pylxd|requests)\b", text, re.M)
    ]
    assert talkers == ["incus.py"]


def test_only_the_caddy_module_runs_caddy() -> None:
    runners = [n for n, text in sources().items() if "subprocess" in text]
    assert runners == ["caddy.py"]


def test_statuses_are_named_only_by_the_model() -> None:
    """Which statuses route is one rule (model.ROUTABLE_STATUSES and the functions over it):
    a status literal anywhere else would re-decide it."""
    statuses = re.compile(r"""["'](Running|Frozen|Stopped|Ready|Error)["']""")
    named = [n for n, text in sources().items() if statuses.search(text)]
    assert named == ["model.py"]
