"""Puts the repository root on sys.path, so that `python bench/<script>.py` finds the test
harness (tests/harness.py) the benchmarks share with the integration tests. Import it before
anything from `tests`."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
