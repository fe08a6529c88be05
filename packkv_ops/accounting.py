"""Size accounting: every byte PackKV holds, and the paper's accounting for comparison.

* ``exact_bytes``: what the storage really holds for its live tokens, by component. The compressed part
  (payload, pack metadata, scales/zeros, payload offsets, permutation) and the exact ring are separate, and
  the fp16 equivalent of each is given so ratios can be formed either way.
* ``paper_bytes``: PackKV paper §4.2 (reference ``bit_pack``): ``P * sum(widths) + (N/P) * F * (b + lenbits)``
  bits per layer for K and V, ``b = ceil(log2(#distinct ints))``; excludes scales, zeros and offsets.
* ``quant_only_bytes``: the paper's quantization-only baseline (§2.3): the same integers at a fixed
  ``ceil(log2(#distinct))`` bits, plus 2-byte scale and zero per group.
* ``fixed_width_bytes``: the same integers at the configuration's fixed ``qbits``, plus the scales and zeros
  PackKV stores; what a plain fixed-width quantizer of the same error bound would hold.
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from .codec import unpack_chunks
from .layout import SCALE_DTYPE, ZERO_DTYPE
from .storage import PackedLayer

FP16_BYTES = 2


def _live(st: PackedLayer) -> torch.Tensor:
    return torch.arange(st.block_capacity, device=st.device)[None, :] < st.n_blocks[:, None].long()


def exact_bytes(st: PackedLayer) -> Counter:
    """Bytes held for the live tokens of one layer, by component (plus fp16 equivalents and token counts)."""
    lay = st.layout
    H, D, T = lay.num_heads, lay.head_dim, lay.block_size
    live = _live(st)
    n_live = int(live.sum())
    kw, vw = st.chunk_words()
    c = Counter()
    c["payload"] = 4 * int(kw.sum() + vw.sum())
    c["meta"] = 4 * n_live * H * (lay.meta_words(lay.k) + lay.meta_words(lay.v))
    group = sum(math.prod(lay.group_shape(s)) for s in (lay.k, lay.v))
    c["scale_zero"] = n_live * group * (SCALE_DTYPE.itemsize + ZERO_DTYPE.itemsize)
    c["offsets"] = n_live * H * 4 * 2
    c["perm"] = n_live * T
    c["compressed"] = c["payload"] + c["meta"] + c["scale_zero"] + c["offsets"] + c["perm"]
    c["compressed_tokens"] = n_live * T
    c["fp16_compressed"] = n_live * T * H * D * FP16_BYTES * 2
    win_tokens = int(st.n_win.sum())
    c["window_tokens"] = win_tokens
    c["window"] = win_tokens * H * D * st.dtype.itemsize * 2
    c["fp16_window"] = win_tokens * H * D * FP16_BYTES * 2
    c["allocated"] = sum(t.numel() * t.element_size() for t in st.tensors())
    return c


def _ints(st: PackedLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """All live ints of K and V, ``[N, H, T, D]`` each (repacked order)."""
    lay = st.layout
    live = _live(st)
    kq = unpack_chunks(st.k_meta[live], st.pool, st.k_offsets[live], lay.k, lay)
    vq = unpack_chunks(st.v_meta[live], st.pool, st.v_offsets[live], lay.v, lay)
    return kq, vq


def paper_bytes(st: PackedLayer) -> Counter:
    """The paper's bit-packing size (§4.2) of K and V, and its quant-only baseline (§2.3)."""
    lay = st.layout
    c = Counter()
    live = _live(st)
    for name, q, s, scale in zip("kv", _ints(st), (lay.k, lay.v), (st.k_scale[live], st.v_scale[live])):
        if q.numel() == 0:
            continue
        n, h, t, d = q.shape
        b = max(1, math.ceil(math.log2(int(torch.unique(q).numel()))))
        lenbits = math.ceil(math.log2(b + 1))
        qr = q.reshape(n, h, lay.rows, lay.pack_size, d)
        widths = torch.ceil(torch.log2((qr.amax(3) - qr.amin(3) + 1).double())).long()
        packs = n * h * lay.rows * d
        bits = lay.pack_size * int(widths.sum()) + packs * (b + lenbits)
        c[f"{name}_packed"] = bits // 8
        c[f"{name}_quant_only"] = q.numel() * b // 8 + scale.numel() * 2 * 2
        c[f"{name}_fp16"] = q.numel() * FP16_BYTES
    return c


def fixed_width_bytes(st: PackedLayer) -> int:
    """The live ints at the configured fixed width ``qbits``, plus the scales and zeros stored with them."""
    lay = st.layout
    n_live = int(_live(st).sum())
    elems = n_live * lay.block_size * lay.num_heads * lay.head_dim
    group = sum(math.prod(lay.group_shape(s)) for s in (lay.k, lay.v))
    return math.ceil(elems * (lay.k.qbits + lay.v.qbits) / 8) + n_live * group * (
        SCALE_DTYPE.itemsize + ZERO_DTYPE.itemsize
    )


def ratio(numer: float, denom: float) -> float:
    return numer / denom if denom else float("nan")


def stream_bytes(st: PackedLayer) -> Counter:
    """``exact_bytes`` split by stream: every byte held for the live compressed blocks of K and of V.

    Keys ``k_<part>`` / ``v_<part>`` for ``payload``, ``meta``, ``scale_zero``, ``offsets``, ``perm`` and their
    sum ``compressed``, with ``k_fp16`` / ``v_fp16`` the fp16 bytes of the same tokens. The block permutation
    is shared by K and V (one byte per token): half of it is charged to each, so
    ``k_compressed + v_compressed == exact_bytes(st)["compressed"]``. The exact ring is not included
    (``exact_bytes`` reports it).
    """
    lay = st.layout
    H, D, T = lay.num_heads, lay.head_dim, lay.block_size
    n_live = int(_live(st).sum())
    c = Counter()
    for name, words, s in zip("kv", st.chunk_words(), (lay.k, lay.v)):
        c[f"{name}_payload"] = 4 * int(words.sum())
        c[f"{name}_meta"] = 4 * n_live * H * lay.meta_words(s)
        c[f"{name}_scale_zero"] = n_live * math.prod(lay.group_shape(s)) * (SCALE_DTYPE.itemsize + ZERO_DTYPE.itemsize)
        c[f"{name}_offsets"] = n_live * H * 4
        c[f"{name}_perm"] = n_live * T / 2
        c[f"{name}_compressed"] = sum(c[f"{name}_{p}"] for p in ("payload", "meta", "scale_zero", "offsets", "perm"))
        c[f"{name}_fp16"] = n_live * T * H * D * FP16_BYTES
    return c


def fixed_width_stream_bytes(st: PackedLayer) -> Counter:
    """``fixed_width_bytes`` split by stream (``k`` and ``v``): the live ints at the fixed width ``qbits`` plus
    that stream's scales and zeros (no pack metadata, no permutation, no offsets)."""
    lay = st.layout
    n_live = int(_live(st).sum())
    elems = n_live * lay.block_size * lay.num_heads * lay.head_dim
    c = Counter()
    for name, s in zip("kv", (lay.k, lay.v)):
        c[name] = elems * s.qbits / 8 + n_live * math.prod(lay.group_shape(s)) * (
            SCALE_DTYPE.itemsize + ZERO_DTYPE.itemsize
        )
    return c
