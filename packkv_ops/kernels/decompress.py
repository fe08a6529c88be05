"""Decompress a layer to K/V in original token order (twin of ``reference.decompress``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..storage import PackedLayer
from ._launch import launch
from .tiles import chunk_positions, decode_chunk, exact_tile


@triton.jit
def _decompress_kernel(
    k_out_ptr, v_out_ptr,
    pool_ptr, k_meta_ptr, k_off_ptr, k_scale_ptr, k_zero_ptr, v_meta_ptr, v_off_ptr, v_scale_ptr, v_zero_ptr,
    perm_ptr, ring_k_ptr, ring_v_ptr, n_blocks_ptr, n_win_ptr,
    out_len, NB, S, H,
    T: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
    K_QBITS: tl.constexpr, K_MBITS: tl.constexpr, K_MW: tl.constexpr, K_GROUP: tl.constexpr,
    V_QBITS: tl.constexpr, V_MBITS: tl.constexpr, V_MW: tl.constexpr, V_GROUP: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    v = tl.program_id(1)
    b = pid // H
    kvh = pid % H
    nb = tl.load(n_blocks_ptr + b)
    total = nb * T + tl.load(n_win_ptr + b)
    cc = tl.arange(0, D)
    if v < nb:
        k = decode_chunk(pool_ptr, k_meta_ptr, k_off_ptr, k_scale_ptr, k_zero_ptr, b, v, kvh, NB, H,
                         T, D, P, K_QBITS, K_MBITS, K_MW, K_GROUP)  # fmt: skip
        val = decode_chunk(pool_ptr, v_meta_ptr, v_off_ptr, v_scale_ptr, v_zero_ptr, b, v, kvh, NB, H,
                           T, D, P, V_QBITS, V_MBITS, V_MW, V_GROUP)  # fmt: skip
        pos = chunk_positions(perm_ptr, b, v, NB, T)
    else:
        k, pos = exact_tile(ring_k_ptr, b, kvh, v, total, H, S, T, D)
        val, pos = exact_tile(ring_v_ptr, b, kvh, v, total, H, S, T, D)
    dst = ((b * H + kvh) * out_len + pos)[:, None] * D + cc[None, :]
    keep = (pos < out_len)[:, None]
    tl.store(k_out_ptr + dst, k.to(k_out_ptr.dtype.element_ty), mask=keep)
    tl.store(v_out_ptr + dst, val.to(v_out_ptr.dtype.element_ty), mask=keep)


def decompress(st: PackedLayer, out_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    lay = st.layout
    B, H, D, T = st.batch, lay.num_heads, lay.head_dim, lay.block_size
    k = torch.empty(B, H, out_len, D, dtype=st.dtype, device=st.device)
    v = torch.empty_like(k)
    n_virtual = -(-out_len // T)
    if n_virtual == 0:
        return k, v
    launch(_decompress_kernel)[(B * H, n_virtual)](
        k, v,
        st.pool, st.k_meta, st.k_offsets, st.k_scale, st.k_zero, st.v_meta, st.v_offsets, st.v_scale, st.v_zero,
        st.perm, st.ring_k, st.ring_v, st.n_blocks, st.n_win,
        out_len, st.block_capacity, lay.ring_size, H,
        T=T, D=D, P=lay.pack_size,
        K_QBITS=lay.k.qbits, K_MBITS=lay.k.mbits, K_MW=lay.meta_words(lay.k), K_GROUP=lay.k.grouping,
        V_QBITS=lay.v.qbits, V_MBITS=lay.v.mbits, V_MW=lay.meta_words(lay.v), V_GROUP=lay.v.grouping,
    )  # fmt: skip
    return k, v
