"""PackKVConfig validates itself on construction and names the field at fault."""

from __future__ import annotations

import dataclasses

import pytest

from packkv.ops import PackKVConfig


def test_defaults_are_valid_and_frozen():
    cfg = PackKVConfig()
    assert (cfg.block_size, cfg.window, cfg.pack_size) == (64, 128, 16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.k_rel = 0.5


@pytest.mark.parametrize(
    "field,value",
    [
        ("k_rel", 0.0), ("k_rel", -0.1), ("k_rel", 1.5), ("k_rel", float("nan")), ("k_rel", "0.1"),
        ("v_rel", 1e-9), ("v_rel", True),
        ("k_grouping", "head"), ("v_grouping", None),
        ("block_size", 40), ("block_size", 48), ("block_size", 512), ("block_size", 8),
        ("window", 100), ("window", 0),
        ("pack_size", 4), ("pack_size", 24),
        ("repack", "sorted"),
    ],
)  # fmt: skip
def test_bad_field_is_named(field, value):
    with pytest.raises(ValueError, match=f"PackKVConfig.{field}"):
        PackKVConfig(**{field: value})


@pytest.mark.parametrize("rel,qmax,qbits", [(0.1, 11, 4), (0.2, 6, 3), (0.02, 51, 6), (1.0, 2, 2), (0.3, 4, 3)])
def test_integer_widths_follow_the_bound(rel, qmax, qbits):
    from packkv.ops.config import qmax_for

    assert qmax_for(rel) == qmax
    assert PackKVConfig(k_rel=rel).k_qbits == qbits


def test_round_trips_through_json():
    cfg = PackKVConfig(k_rel=0.05, k_grouping="channel", repack="greedy", pack_size=32, block_size=64, window=192)
    import json

    assert PackKVConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ValueError, match="unknown"):
        PackKVConfig.from_dict({"k_rel": 0.1, "bits": 4})
