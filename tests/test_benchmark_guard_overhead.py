"""benchmarks/guard_overhead.py on a 2-layer model: all rows run side by side and report a guard check."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from benchmarks import guard_overhead  # noqa: E402


def test_guard_overhead_reports_both_filters_with_and_without_the_step_plan(tmp_path):
    assert guard_overhead.main(["--layers", "2", "--steps", "2", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "guard_overhead.json").read_text())["rows"]
    assert [(r["step_plan"], r["guard_filter"]) for r in rows] == [
        (plan, name) for plan in (False, True) for name in guard_overhead.FILTERS]
    assert all(math.isfinite(r["guard_check_us"]) and r["guard_check_us"] > 0 and r["step_ms"] > 0 for r in rows)
    torch._dynamo.reset()
