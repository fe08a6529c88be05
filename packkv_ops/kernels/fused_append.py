"""A decode step's one-token append folded into the attention's merge (``packkv::append_attention_``, which the FX
rewrite puts in place of a decode step's ``append_`` + ``attention``: ``inductor.rewrite.fuse_decode_appends``).

Twin of ``token.append_token`` followed by ``attention.attention(..., gluon=True)``: the Gluon kernel attends over
the stored tokens as they are *before* the append (``gluon_attention.partials(..., totals=)``: the new token's
position is not counted among the zero keys, and each sequence's length goes to ``totals``), then one merge kernel
per output row adds the new token as one more split and stores the token. Its score is ``q . k_new`` in the model's
coordinates (the rotation is orthogonal; the unfused path scores the rotated token rounded to the ring's dtype, so
the two differ by that rounding) and its value is added after the partials' sum is rotated back. The programs of
each KV head's first query row write the rotated token into the ring, the one of each sequence's first row advances
``n_win``: nothing else in this launch reads ``n_win`` (the partials' kernel has finished; the merge reads
``totals``), so the count cannot race. As ``append_token``, a NaN/Inf anywhere in the batch's new K/V stores nothing
for any sequence (the host sees the counters not advance) and the token is not attended.

Why: the compiled 64K decode step runs three PackKV kernels per layer (append 2.7 us, attention ~52, merge 2.7,
H100 2026-12-06c); this removes the append's launch. Measured (H100, 2026-12-06g, ``fused_append_cost.py``, per
layer in a CUDA graph of 8): B1/64K 60.3-61.2 vs 60.7-61.8 us, B1/128K 106.9-107.3 vs 108.5-108.8, B8/32K
209.0-211.8 vs 216.5-217.5, B1/8K 17.4 vs 20.0-20.1. In the 64K e2e step (profiled) this merge took 4.5 us
against the plain merge's 2.4 and the append's 2.8: every program rotated the token (two 128-point FWHTs), where
only a KV head's first row stores it. Since 2026-12-06h the token's rotation, ring stores and count run in ``B *
H`` programs of their own beside the merges (H100, same call, main / this / main, per layer: B1/64K 58.73, 59.32 /
58.07, 58.58 / 58.74, 59.02 us; B1/8K 17.48, 17.57 / 17.24, 17.27 / 17.84, 17.83; B8/32K 207.5, 207.8 / 207.4, 201.7
/ 202.1, 207.9). Putting the append into the partials' kernel instead would race (one program advancing
``n_win`` while others of the launch read it) and would need the token rotated inside the Gluon producers.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..rotation import is_hadamard
from ..storage import PackedLayer
from ._launch import next_pow2
from .attention import merge_partials
from .hadamard import fwht_rows
from .token import _non_finite

LOG2E = 1.4426950408889634


@triton.jit
def _merge_append_kernel(
    acc_ptr, m_ptr, l_ptr, out_ptr, NS, q_ptr, k_ptr, v_ptr, skb, skh, svb, svh, tot_ptr, mask_ptr, smb,
    ring_k_ptr, ring_v_ptr, n_win_ptr, B, H, HQ, S, qk_scale, inv_sqrt,
    D: tl.constexpr, BS: tl.constexpr, HP: tl.constexpr, ROTATE: tl.constexpr, HAS_MASK: tl.constexpr,
):  # fmt: skip
    """Programs ``0 .. B*HQ-1``: output row ``b * HQ + hq``, its ``NS`` partials (rotated coordinates, log2 units;
    as ``_merge_kernel``) and the sequence's new token (model coordinates), rotated back and normalized once.
    Programs ``B*HQ ..``: one per (sequence, KV head), the token rotated into the ring and the count, so no merge
    program carries the token's two FWHTs on its path (they run beside the merges, on other SMs)."""
    row = tl.program_id(0)
    inv_sqrt = tl.cast(inv_sqrt, tl.float32)
    # The whole batch's new K/V finite? (every program checks all of it, as append_token: a few KB from L2)
    h = tl.arange(0, HP)[:, None]
    c = tl.arange(0, D)[None, :]
    hm = h < H
    bad = tl.zeros((HP, D), tl.int32)
    for i in range(B):
        bad |= _non_finite(tl.load(k_ptr + i * skb + h * skh + c, mask=hm, other=0.0))
        bad |= _non_finite(tl.load(v_ptr + i * svb + h * svh + c, mask=hm, other=0.0))
    ok = tl.max(tl.max(bad, 1), 0) == 0
    cc = tl.arange(0, D)
    if row < B * HQ:
        b = row // HQ
        hq = row % HQ
        kvh = hq // (HQ // H)
        pos = tl.load(tot_ptr + b)
        vis = ok
        if HAS_MASK:
            vis = vis & (tl.load(mask_ptr + b * smb + pos) != 0)
        # The partials, one pass in chunks of BS splits (as _merge_kernel).
        r = row.to(tl.int64)
        top, num, den = merge_partials(acc_ptr, m_ptr, l_ptr, r, NS, D, BS)
        # The new token: its score in the model's coordinates, then one more split.
        kn = tl.load(k_ptr + b * skb + kvh * skh + cc).to(tl.float32)
        vn = tl.load(v_ptr + b * svb + kvh * svh + cc).to(tl.float32)
        qr = tl.load(q_ptr + r * D + cc).to(tl.float32)
        s_new = tl.where(vis, tl.sum(qr * kn, 0) * qk_scale, float("-inf"))
        new = tl.maximum(top, s_new)
        safe = tl.where(new == float("-inf"), 0.0, new)
        alpha = tl.exp2(top - safe)
        w_new = tl.exp2(s_new - safe)
        num = num * alpha
        if ROTATE:  # the partials are in the cache's coordinates: back to the model's (linear: before the division)
            num = tl.reshape(fwht_rows(tl.reshape(num, (1, D)), 1, D), (D,)) * inv_sqrt
        o = (num + w_new * tl.where(vis, vn, 0.0)) / (tl.sum(den, 0) * alpha + w_new)  # (0 x NaN is NaN)
        tl.store(out_ptr + r * D + cc, o.to(out_ptr.dtype.element_ty))
    else:  # the token into the ring, rotated as append_token rotates it; the count (each sequence's head 0)
        t = row - B * HQ
        b = t // H
        kvh = t % H
        pos = tl.load(tot_ptr + b)
        dst = ((b * H + kvh).to(tl.int64) * S + pos % S) * D + cc
        kr = tl.load(k_ptr + b * skb + kvh * skh + cc)
        vr = tl.load(v_ptr + b * svb + kvh * svh + cc)
        if ROTATE:
            kr = (tl.reshape(fwht_rows(tl.reshape(kr.to(tl.float32), (1, D)), 1, D), (D,)) * inv_sqrt).to(kr.dtype)
            vr = (tl.reshape(fwht_rows(tl.reshape(vr.to(tl.float32), (1, D)), 1, D), (D,)) * inv_sqrt).to(vr.dtype)
        tl.store(ring_k_ptr + dst, kr.to(ring_k_ptr.dtype.element_ty), mask=ok)
        tl.store(ring_v_ptr + dst, vr.to(ring_v_ptr.dtype.element_ty), mask=ok)
        nw = tl.load(n_win_ptr + b)
        tl.store(n_win_ptr + b, nw + 1, mask=ok & (kvh == 0))


def covers(q: torch.Tensor, st: PackedLayer, mask: torch.Tensor | None, is_causal: bool, scale: float | None,
           out_len: int) -> bool:
    """Whether ``append_and_attend`` computes this decode step (else append and attention run in turn): the Gluon
    kernel's case (``gluon_attention.supported``; ``attention.GLUON`` not off), the default scale, and a rotation
    the merge applies (none or Hadamard)."""
    from . import attention as A
    from . import gluon_attention as ga

    D = q.shape[-1]
    if A.GLUON is False or (A.GLUON is None and q.device.type != "cuda"):
        return False
    if scale is not None and abs(scale - 1.0 / math.sqrt(D)) > 1e-12:
        return False
    if st.layout.rotation and not is_hadamard(st.layout.rotation, D):
        return False
    return ga.supported(q, st.layout, st.ring_k.dtype, mask, is_causal, out_len) is None


def append_and_attend(q: torch.Tensor, st: PackedLayer, new_k: torch.Tensor, new_v: torch.Tensor, out_len: int,
                      mask: torch.Tensor | None, rotation: int = 0, splits: int | None = None) -> torch.Tensor:  # fmt: skip
    """``append_token(st, new_k, new_v, rotation)`` then the decode step's attention of ``q`` over ``st`` (both
    in the model's coordinates; the Gluon kernel's case, ``gluon_attention.supported``), in two launches instead
    of three. ``mask``: the step's bool padding mask over ``out_len`` positions (the new token's included)."""
    from . import gluon_attention as ga
    from ._launch import num_sms
    from .attention import merge_chunk

    B, HQ, _, D = q.shape
    H = st.layout.num_heads
    rotate = is_hadamard(rotation, D)
    if splits is None:
        splits = ga.splits_for(q, H, out_len, num_sms(q.device))
    n_virtual = -(-out_len // st.layout.block_size)
    ns = max(1, min(splits, n_virtual))
    totals = torch.empty(B, dtype=torch.int32, device=q.device)
    if mask is not None:
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
    acc, m, l = ga.partials(q, st.pool, st.k_offsets, st.v_offsets, st.k_meta, st.v_meta, st.k_scale, st.k_zero,
                            st.v_scale, st.v_zero, st.ring_k, st.ring_v, st.n_blocks, st.n_win, st.perm, mask, out_len,
                            ns, 1.0 / math.sqrt(D), rotate, st.layout.k.qbits, st.layout.v.qbits, totals)  # fmt: skip
    new_k = new_k if new_k.stride(-1) == 1 else new_k.contiguous()
    new_v = new_v if new_v.stride(-1) == 1 else new_v.contiguous()
    out = torch.empty(B, HQ, 1, D, dtype=q.dtype, device=q.device)
    smb = 0 if mask is None or mask.shape[0] == 1 else mask.stride(0)
    _merge_append_kernel[(B * HQ + B * H,)](
        acc, m, l, out, ns, q.contiguous(), new_k, new_v, new_k.stride(0), new_k.stride(1), new_v.stride(0),
        new_v.stride(1), totals, st.n_win if mask is None else mask, smb, st.ring_k, st.ring_v, st.n_win, B, H, HQ,
        st.layout.ring_size, LOG2E / math.sqrt(D), 1.0 / math.sqrt(D),
        D=D, BS=merge_chunk(D), HP=next_pow2(H), ROTATE=rotate, HAS_MASK=mask is not None,
    )  # fmt: skip
    return out
