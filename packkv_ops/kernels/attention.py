"""Fused decode attention on the packed cache (twin of ``reference.attention``).

Flash-decoding: programs ``(sequence x KV head, split)``; each split walks a range of virtual blocks (compressed
chunks, then exact ring tokens, then zero keys up to ``out_len``), decodes each block's K and V once for all
query heads of the KV group (GQA) and all queries, and keeps an online softmax in fp32. Partial results are
merged by a log-sum-exp reduction. K and V are never materialised in global memory. Lengths are read from
device tensors, so nothing here depends on the sequence length but the grid, which follows the storage's
capacity (``out_len``), fixed between growths.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..storage import PackedLayer
from ._launch import INTERPRET, launch, next_pow2, num_sms
from .tiles import chunk_positions, decode_chunk, exact_tile

LOG2E = 1.4426950408889634
# tf32x3 keeps fp32 accuracy on tensor cores; the interpreter computes in fp32 whatever is asked.
DOT_PRECISION = "ieee" if INTERPRET else "tf32x3"


@triton.jit
def _attention_kernel(
    q_ptr, acc_ptr, m_ptr, l_ptr,
    pool_ptr, k_meta_ptr, k_off_ptr, k_scale_ptr, k_zero_ptr, v_meta_ptr, v_off_ptr, v_scale_ptr, v_zero_ptr,
    perm_ptr, ring_k_ptr, ring_v_ptr, n_blocks_ptr, n_win_ptr,
    mask_ptr, smb, smh, smq, sml,
    out_len, NB, S, H, HQ, TQ, N_REP, blocks_per_split, NS, qk_scale,
    T: tl.constexpr, D: tl.constexpr, P: tl.constexpr, M_PAD: tl.constexpr,
    K_QBITS: tl.constexpr, K_MBITS: tl.constexpr, K_MW: tl.constexpr, K_GROUP: tl.constexpr,
    V_QBITS: tl.constexpr, V_MBITS: tl.constexpr, V_MW: tl.constexpr, V_GROUP: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // H
    kvh = pid % H
    # Rows: every query of every query head in this KV group.
    rows = tl.arange(0, M_PAD)
    row_ok = rows < N_REP * TQ
    hq = kvh * N_REP + rows // TQ
    qi = rows % TQ
    cc = tl.arange(0, D)
    q = tl.load(q_ptr + ((b * HQ + hq) * TQ + qi)[:, None] * D + cc[None, :], mask=row_ok[:, None], other=0.0)
    q = q.to(tl.float32)

    nb = tl.load(n_blocks_ptr + b)
    total = nb * T + tl.load(n_win_ptr + b)
    n_virtual = tl.cdiv(out_len, T)

    m_i = tl.full((M_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((M_PAD,), tl.float32)
    acc = tl.zeros((M_PAD, D), tl.float32)
    for i in range(0, blocks_per_split):
        v = split * blocks_per_split + i
        if v < nb:
            k = decode_chunk(pool_ptr, k_meta_ptr, k_off_ptr, k_scale_ptr, k_zero_ptr, b, v, kvh, NB, H,
                             T, D, P, K_QBITS, K_MBITS, K_MW, K_GROUP)  # fmt: skip
            val = decode_chunk(pool_ptr, v_meta_ptr, v_off_ptr, v_scale_ptr, v_zero_ptr, b, v, kvh, NB, H,
                               T, D, P, V_QBITS, V_MBITS, V_MW, V_GROUP)  # fmt: skip
            pos = chunk_positions(perm_ptr, b, v, NB, T)
        else:
            k, pos = exact_tile(ring_k_ptr, b, kvh, v, total, H, S, T, D)
            val, pos = exact_tile(ring_v_ptr, b, kvh, v, total, H, S, T, D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT) * qk_scale  # log2 units
        ok = row_ok[:, None] & (pos < out_len)[None, :]  # a split's blocks past the end fall out here
        if IS_CAUSAL:  # scaled_dot_product_attention's is_causal: top-left aligned
            ok = ok & (pos[None, :] <= qi[:, None])
        if HAS_MASK:
            mp = mask_ptr + b * smb + hq[:, None] * smh + qi[:, None] * smq + pos[None, :] * sml
            mv = tl.load(mp, mask=ok, other=0)
            if MASK_BOOL:
                ok = ok & (mv != 0)
            else:
                s = s + mv.to(tl.float32) * 1.4426950408889634
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, val, input_precision=DOT)
        m_i = m_new

    part = ((b * HQ + hq) * TQ + qi) * NS + split
    tl.store(acc_ptr + part[:, None] * D + cc[None, :], acc, mask=row_ok[:, None])
    tl.store(m_ptr + part, m_i, mask=row_ok)
    tl.store(l_ptr + part, l_i, mask=row_ok)


def attention(
    q: torch.Tensor,
    st: PackedLayer,
    out_len: int,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    splits: int | None = None,
    num_warps: int = 4,
    precision: str = DOT_PRECISION,
) -> torch.Tensor:
    """``scaled_dot_product_attention(q, *decompress(st, out_len), attn_mask=mask, ...)`` without materialising K/V."""
    lay = st.layout
    B, HQ, TQ, D = q.shape
    H, T = lay.num_heads, lay.block_size
    n_rep = HQ // H
    n_virtual = max(1, -(-out_len // T))
    if splits is None:
        splits = -(-2 * num_sms(q.device) // (B * H))  # about two programs per SM
    per_split = -(-n_virtual // max(1, min(splits, n_virtual)))
    ns = -(-n_virtual // per_split)
    acc = torch.empty(B, HQ, TQ, ns, D, dtype=torch.float32, device=q.device)
    m = torch.empty(B, HQ, TQ, ns, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    if mask is not None:
        mask = mask.expand(B, HQ, TQ, mask.shape[-1])  # broadcast dims get stride 0: nothing is copied
        mask_bool = mask.dtype == torch.bool
        if mask_bool:
            mask = mask.view(torch.uint8)
        strides = mask.stride()
    else:
        mask_bool, strides = True, (0, 0, 0, 0)
    sm_scale = 1.0 / math.sqrt(D) if scale is None else scale
    launch(_attention_kernel)[(B * H, ns)](
        q.contiguous(), acc, m, l,
        st.pool, st.k_meta, st.k_offsets, st.k_scale, st.k_zero, st.v_meta, st.v_offsets, st.v_scale, st.v_zero,
        st.perm, st.ring_k, st.ring_v, st.n_blocks, st.n_win,
        mask if mask is not None else st.n_win, *strides,
        out_len, st.block_capacity, lay.ring_size, H, HQ, TQ, n_rep, per_split, ns, sm_scale * LOG2E,
        T=T, D=D, P=lay.pack_size, M_PAD=max(16, next_pow2(n_rep * TQ)),
        K_QBITS=lay.k.qbits, K_MBITS=lay.k.mbits, K_MW=lay.meta_words(lay.k), K_GROUP=lay.k.grouping,
        V_QBITS=lay.v.qbits, V_MBITS=lay.v.mbits, V_MW=lay.meta_words(lay.v), V_GROUP=lay.v.grouping,
        HAS_MASK=mask is not None, MASK_BOOL=mask_bool, IS_CAUSAL=is_causal, DOT=precision, num_warps=num_warps,
    )  # fmt: skip
    return merge_splits(acc, m, l).to(q.dtype)


def merge_splits(acc: torch.Tensor, m: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Combine per-split (acc, max, sum) of an online softmax (log2 units) into the attention output."""
    top = m.amax(-1, keepdim=True)
    w = torch.exp2(m - torch.where(top == float("-inf"), 0.0, top))
    return (acc * w[..., None]).sum(-2) / (l * w).sum(-1)[..., None]
