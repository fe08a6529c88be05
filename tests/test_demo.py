"""The main job, ``python -m packkv demo``, on the default real model (short context so CI stays quick)."""

from __future__ import annotations

import re

import pytest

from packkv.__main__ import main

pytestmark = pytest.mark.slow


def test_demo_generates_and_reports_the_cache(smollm, capsys):
    assert main(["demo", "--context-tokens", "400", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "rotation='hadamard'" in out  # the defaults
    assert "--- generated with PackKVCache ---" in out
    ratio = float(re.search(r"compressed part : \d+ tokens/layer, .* -> ([\d.]+)x", out).group(1))
    assert ratio > 3, out
    assert re.search(r"speed +: [\d.]+ tokens/s", out) and "uncompressed DynamicCache" in out


def test_demo_refuses_bad_knobs(smollm, capsys):
    with pytest.raises(ValueError, match="k_rel"):
        main(["demo", "--k-rel", "0", "--no-compare"])
    with pytest.raises(SystemExit):
        main(["demo", "--rotation", "random"])
    assert "invalid choice" in capsys.readouterr().err
