"""benchmarks/format_options.py: the current format's row is the storage's own size, every alternative is larger."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))
from benchmarks import format_options  # noqa: E402


def test_format_options_price_each_alternative_against_the_stored_bytes(tmp_path):
    out = tmp_path / "f.json"
    assert format_options.main(["--tokens", "1024", "--heads", "2", "--out", str(out)]) == 0
    rows = {r["option"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == list(format_options.OPTIONS)
    assert rows["current"]["vs_current"] == 1.0
    # Coarser widths and rounded-up widths can only hold more bits than per-pack widths.
    assert all(r["vs_current"] >= 1.0 for r in rows.values())
    assert rows["block width"]["total_bits_per_value"] >= max(rows["row width"]["total_bits_per_value"] - 0.02,
                                                              rows["channel width"]["total_bits_per_value"] - 0.02)
