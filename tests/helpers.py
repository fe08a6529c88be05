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


# The mat-vec kernels' error bound, in fp32 roundings of the int and zero terms they sum apart.
MATVEC_ROUNDINGS = 8


def int_and_zero_terms(st: PackedLayer, stream: str, n_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 ``|Q| |s|`` and ``z s`` of a stream's first blocks, ``[B, H, n_blocks * T, D]`` in storage order: the
    two sums the mat-vec kernels compute apart (dequantized values are ``(Q + z) s``)."""
    from packkv.ops.codec import unpack_chunks

    lay = st.layout
    meta, off, scale, zero = (getattr(st, f"{stream}_{f}")[:, :n_blocks] for f in ("meta", "offsets", "scale", "zero"))
    q = unpack_chunks(meta, st.pool, off, getattr(lay, stream), lay).double()
    ints, zeros = q.abs() * scale.double().abs(), (zero.double() * scale.double()).expand_as(q)
    B, nb, H, T, D = q.shape
    return tuple(x.permute(0, 2, 1, 3, 4).reshape(B, H, nb * T, D) for x in (ints, zeros))
