"""Helpers shared by the tests: build a layer's storage from plain K/V through the public ops."""

from __future__ import annotations

import torch

from packkv.ops import Layout, PackedLayer, PackKVConfig
from packkv.ops.reference import flush_count


def spec(lay: Layout) -> tuple:
    return lay.spec()


def fill(
    cfg: PackKVConfig,
    k: torch.Tensor,
    v: torch.Tensor,
    steps: list[int] | None = None,
    block_capacity: int | None = None,
    pool_words: int | None = None,
) -> PackedLayer:
    """A layer holding the tokens of ``k``/``v`` [B, H, L, D], appended in ``steps`` (default: all at once)."""
    B, H, L, D = k.shape
    lay = Layout.from_config(cfg, H, D)
    nb = block_capacity or (L // cfg.block_size + 1)
    pw = pool_words or B * nb * H * (lay.max_chunk_words(lay.k) + lay.max_chunk_words(lay.v))
    st = PackedLayer.empty(lay, B, k.dtype, k.device, nb, pw)
    steps = steps or [L]
    assert sum(steps) == L
    pos = 0
    for p in steps:
        n_flush = flush_count(int(st.n_win[0]), p, lay)
        torch.ops.packkv.append_(*st.tensors(), k[:, :, pos : pos + p], v[:, :, pos : pos + p], n_flush, *spec(lay))
        pos += p
    return st


def n_tokens(st: PackedLayer) -> int:
    return int(st.n_blocks[0]) * st.layout.block_size + int(st.n_win[0])
