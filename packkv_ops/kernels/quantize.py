"""Quantize the blocks to compress and find their repacking permutation, in one kernel per block
(twin of ``codec.quantize_blocks``: ``quantize.quantize`` + ``repack.median_perm``).

One program per block of one sequence: it reads the block's tokens where they are (the oldest ring slots, then
the new tokens; no gathered copy), writes the integers in repacked order to a scratch tensor (each token's row at
its rank, so the packing kernel reads a chunk contiguously), and writes the permutation, scales and zeros into the
storage.
Token-grouped streams take two passes over the heads (min/max across heads, then quantize; the second pass
reads from L2). The median repacking counts, per token, the integers at or below each level (<= 16 levels),
then ranks the tokens with a T x T comparison: the same permutation as a stable descending sort.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import GROUP_TOKEN, GROUP_TOKEN_HEAD, ZERO_LIMIT, Layout
from ..storage import PackedLayer
from ._launch import launch, next_pow2

WARPS = 16  # launch width (16: fewest spills, fastest on the H200); benchmarks/kernels.py --compress-variants times others

_TOKEN = tl.constexpr(GROUP_TOKEN)
_TOKEN_HEAD = tl.constexpr(GROUP_TOKEN_HEAD)
_INV_ZERO_LIMIT = tl.constexpr(1.0 / ZERO_LIMIT)
_RINT_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: adding and subtracting it rounds |x| < 2**22 half-to-even


@triton.jit
def _rint(x):
    """Round half to even (``torch.round``) for |x| < 2**22, with two IEEE additions."""
    return (x + _RINT_MAGIC) - _RINT_MAGIC


@triton.jit
def _load_tokens(new_ptr, ring_ptr, b, h, k, nb, nw, P, snb, snh, snp, H, S, T: tl.constexpr, D: tl.constexpr):
    """fp32 ``[T, D]`` tile of head ``h``: block ``k`` of this call's flushes is ring window ++ new tokens."""
    t = tl.arange(0, T)
    c = tl.arange(0, D)
    logical = k * T + t
    from_ring = logical < nw
    slot = (nb * T + logical) % S
    ni = tl.minimum(tl.maximum(logical - nw, 0), P - 1).to(tl.int64)
    rp = ring_ptr + ((b * H + h) * S + slot).to(tl.int64)[:, None] * D + c[None, :]
    np_ = new_ptr + (b.to(tl.int64) * snb + h * snh + ni * snp)[:, None] + c[None, :]
    xr = tl.load(rp, mask=from_ring[:, None], other=0.0)
    xn = tl.load(np_, mask=(~from_ring)[:, None], other=0.0)
    return tl.where(from_ring[:, None], xr, xn).to(tl.float32)


@triton.jit
def _scale_zero(mn, mx, REL: tl.constexpr):
    """fp32 scale (rounded up to bf16) and zero of groups with minimum ``mn`` and maximum ``mx``."""
    amax = tl.maximum(tl.abs(mn), tl.abs(mx))
    step = tl.maximum((mx - mn) * REL, amax * _INV_ZERO_LIMIT)
    step = tl.where(step > 0, step, 1.0)
    u = step.to(tl.uint32, bitcast=True)
    u = tl.where((u & 0xFFFF) != 0, ((u >> 16) + 1) << 16, u)  # smallest bf16 >= step (positive, finite)
    sf = u.to(tl.float32, bitcast=True)
    return sf, _rint(tl.math.div_rn(mn, sf))


@triton.jit
def _token_range(new_ptr, ring_ptr, b, k, nb, nw, P, snb, snh, snp, H, S, T: tl.constexpr, D: tl.constexpr):
    """Per-token min and max over all heads and channels (``token`` grouping)."""
    mn = tl.full((T,), float("inf"), tl.float32)
    mx = tl.full((T,), float("-inf"), tl.float32)
    for h in range(H):
        x = _load_tokens(new_ptr, ring_ptr, b, h, k, nb, nw, P, snb, snh, snp, H, S, T, D)
        mn = tl.minimum(mn, tl.min(x, 1))
        mx = tl.maximum(mx, tl.max(x, 1))
    return mn, mx


@triton.jit
def _quantize_stream(
    new_ptr, ring_ptr, q_ptr, scale_ptr, zero_ptr, n, b, k, nb, nw, blk, rank, P, snb, snh, snp, NB, H, S,
    T: tl.constexpr, D: tl.constexpr, REL: tl.constexpr, QMAX: tl.constexpr, GROUP: tl.constexpr,
    LV: tl.constexpr, LVP: tl.constexpr, COUNT: tl.constexpr, FB: tl.constexpr,
):  # fmt: skip
    """Quantize one stream of block ``n``; scales/zeros land at slot ``rank[t]`` of storage block ``blk``.

    With ``COUNT`` (and ``rank`` unused) returns, per token, how many integers are ``<= l`` for each level
    ``l < LV - 1`` (``[T, LVP]``); the caller stores scales/zeros once the ranks are known (second call). With
    ``FB`` > 0 the counts go through a histogram of FB-bit fields per level in one uint64 per element, summed over
    the heads in registers and reduced across channels once per level at the end (not once per level and head)."""
    t = tl.arange(0, T)
    c = tl.arange(0, D)
    lv = tl.arange(0, LVP)
    cnt = tl.zeros((T, LVP), tl.int32)
    hist = tl.zeros((T, D), tl.uint64)
    if GROUP == _TOKEN:
        mn, mx = _token_range(new_ptr, ring_ptr, b, k, nb, nw, P, snb, snh, snp, H, S, T, D)
        sf, z = _scale_zero(mn, mx, REL)
        if not COUNT:
            base = (b * NB + blk).to(tl.int64) * T
            tl.store(scale_ptr + base + rank, sf.to(tl.bfloat16))
            tl.store(zero_ptr + base + rank, z.to(tl.int16))
    for h in range(H):
        x = _load_tokens(new_ptr, ring_ptr, b, h, k, nb, nw, P, snb, snh, snp, H, S, T, D)
        if GROUP == _TOKEN:
            s2, z2 = sf[:, None], z[:, None]
        elif GROUP == _TOKEN_HEAD:
            sh, zh = _scale_zero(tl.min(x, 1), tl.max(x, 1), REL)
            s2, z2 = sh[:, None], zh[:, None]
            if not COUNT:
                base = ((b * NB + blk) * H + h).to(tl.int64) * T
                tl.store(scale_ptr + base + rank, sh.to(tl.bfloat16))
                tl.store(zero_ptr + base + rank, zh.to(tl.int16))
        else:  # GROUP_CHANNEL: not moved by the permutation
            sc, zc = _scale_zero(tl.min(x, 0), tl.max(x, 0), REL)
            s2, z2 = sc[None, :], zc[None, :]
            if not COUNT:
                base = ((b * NB + blk) * H + h).to(tl.int64) * D
                tl.store(scale_ptr + base + c, sc.to(tl.bfloat16))
                tl.store(zero_ptr + base + c, zc.to(tl.int16))
        q = _rint(tl.math.div_rn(x, tl.broadcast_to(s2, (T, D)))) - z2
        q = tl.minimum(tl.maximum(q, 0.0), QMAX).to(tl.int32)
        if COUNT:
            if FB > 0:  # a field holds at most H counts: no carries
                hist += tl.where(q < LV - 1, tl.full((T, D), 1, tl.uint64) << (q.to(tl.uint64) * FB), 0)
            else:
                for lvl in tl.static_range(LV - 1):
                    below = tl.sum((q <= lvl).to(tl.int32), 1)
                    cnt += tl.where(lv[None, :] == lvl, below[:, None], 0)
        else:
            dst = q_ptr + ((n * H + h) * T + rank).to(tl.int64)[:, None] * D + c[None, :]  # repacked order
            tl.store(dst, q.to(q_ptr.dtype.element_ty))
    if COUNT and FB > 0:
        for lvl in tl.static_range(LV - 1):  # integers equal to lvl count for every level >= lvl
            eq = tl.sum(((hist >> (lvl * FB)) & ((1 << FB) - 1)).to(tl.int32), 1)
            cnt += tl.where(lv[None, :] >= lvl, eq[:, None], 0)
    return cnt


@triton.jit
def _quantize_kernel(
    new_k_ptr, new_v_ptr, ring_k_ptr, ring_v_ptr, n_blocks_ptr, n_win_ptr,
    kq_ptr, vq_ptr, perm_ptr, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr,
    NF, P, snb, snh, snp, NB, H, S,
    T: tl.constexpr, D: tl.constexpr,
    K_REL: tl.constexpr, K_QMAX: tl.constexpr, K_GROUP: tl.constexpr,
    V_REL: tl.constexpr, V_QMAX: tl.constexpr, V_GROUP: tl.constexpr,
    MEDIAN: tl.constexpr, LVP: tl.constexpr, FB: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0)  # block k of sequence b among this call's flushes
    b = n // NF
    k = n % NF
    nb = tl.load(n_blocks_ptr + b)
    nw = tl.load(n_win_ptr + b)
    blk = nb + k
    t = tl.arange(0, T)
    rank = t
    if MEDIAN:
        # Lower median of each token's V integers over all heads and channels: the number of levels l whose
        # count of integers <= l does not exceed the median's index yet.
        cnt = _quantize_stream(new_v_ptr, ring_v_ptr, vq_ptr, v_scale_ptr, v_zero_ptr, n, b, k, nb, nw, blk, rank,
                               P, snb, snh, snp, NB, H, S, T, D, V_REL, V_QMAX, V_GROUP, V_QMAX + 1, LVP, True, FB)  # fmt: skip
        lv = tl.arange(0, LVP)
        kth = (H * D - 1) // 2
        key = tl.sum(((cnt <= kth) & (lv[None, :] < V_QMAX)).to(tl.int32), 1)
        # Stable descending sort as ranks: tokens with a larger key, or the same key and a lower index, go first.
        ki = key[:, None]
        kj = key[None, :]
        ahead = (kj > ki) | ((kj == ki) & (t[None, :] < t[:, None]))
        rank = tl.sum(ahead.to(tl.int32), 1)
    tl.store(perm_ptr + (b * NB + blk).to(tl.int64) * T + rank, t.to(tl.uint8))
    _quantize_stream(new_v_ptr, ring_v_ptr, vq_ptr, v_scale_ptr, v_zero_ptr, n, b, k, nb, nw, blk, rank,
                     P, snb, snh, snp, NB, H, S, T, D, V_REL, V_QMAX, V_GROUP, V_QMAX + 1, LVP, False, 0)  # fmt: skip
    _quantize_stream(new_k_ptr, ring_k_ptr, kq_ptr, k_scale_ptr, k_zero_ptr, n, b, k, nb, nw, blk, rank,
                     P, snb, snh, snp, NB, H, S, T, D, K_REL, K_QMAX, K_GROUP, 2, 2, False, 0)  # fmt: skip


def quantize_flushed(
    st: PackedLayer, new_k: torch.Tensor, new_v: torch.Tensor, n_flush: int, median: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the ``n_flush`` oldest blocks of every sequence (ring window ++ new tokens) into storage block
    ``n_blocks[b] + k``: writes perm (identity unless ``median``), scales and zeros there, and returns the
    integers ``[B * n_flush, H, T, D]`` in the order of that perm (uint8, or int32 above 8 bits)."""
    lay: Layout = st.layout
    B, H, P, D = new_k.shape
    T = lay.block_size
    new_v = new_v if new_v.stride() == new_k.stride() else new_v.contiguous()
    if new_k.stride(-1) != 1 or new_v.stride() != new_k.stride():
        new_k, new_v = new_k.contiguous(), new_v.contiguous()
    qdt = torch.uint8 if max(lay.k.qbits, lay.v.qbits) <= 8 else torch.int32
    kq = torch.empty(B * n_flush, H, T, D, dtype=qdt, device=new_k.device)
    vq = torch.empty_like(kq)
    launch(_quantize_kernel)[(B * n_flush,)](
        new_k, new_v, st.ring_k, st.ring_v, st.n_blocks, st.n_win,
        kq, vq, st.perm, st.k_scale, st.k_zero, st.v_scale, st.v_zero,
        n_flush, P, new_k.stride(0), new_k.stride(1), new_k.stride(2), st.block_capacity, H, lay.ring_size,
        T=T, D=D,
        K_REL=lay.k.rel, K_QMAX=lay.k.qmax, K_GROUP=lay.k.grouping,
        V_REL=lay.v.rel, V_QMAX=lay.v.qmax, V_GROUP=lay.v.grouping,
        MEDIAN=median, LVP=next_pow2(lay.v.qmax + 1), FB=_histogram_bits(H, lay.v.qmax), num_warps=WARPS,
    )  # fmt: skip
    return kq, vq


def _histogram_bits(heads: int, qmax: int) -> int:
    """Bits per level of the median's in-register histogram (a field counts up to ``heads``), or 0 when the
    ``qmax`` levels below the top one do not fit one int64 (counted per head instead)."""
    fb = heads.bit_length()
    return fb if qmax * fb <= 64 else 0
