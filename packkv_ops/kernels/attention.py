"""Fused decode attention on the packed cache (twin of ``reference.attention``).

Flash-decoding: programs ``(sequence x KV head, split)``; each split walks a range of virtual blocks (compressed
chunks, then exact ring tokens, then zero keys up to ``out_len``), decodes each block's K and V once for all
query heads of the KV group (GQA) and all queries, and keeps an online softmax in fp32. Partial results are
merged by a log-sum-exp reduction. K and V are never materialised in global memory. Lengths are read from
device tensors, so nothing here depends on the sequence length but the grid, which follows the storage's
capacity (``out_len``), fixed between growths.
"""

from __future__ import annotations

import functools
import logging
import math
import os

import torch
import triton
import triton.language as tl

from ..layout import Layout
from ..storage import PackedLayer
from ._launch import INTERPRET, launch, next_pow2, num_sms, plain_eager, resident_programs
from .hadamard import fwht_rows
from .inductor_compat import keep_maxnreg
from .tiles import (
    decode_operand, decode_pair_windows, exact_rows, group_scale_rows, ints_to_f16, lane_order_tokens, pair_bits,
    decode_paths, pair_fields, pair_values, paired_scan_fits,
)

log = logging.getLogger(__name__)
_warned_slow: set[tuple] = set()


def _warn_if_per_value(lay: Layout, ts: int) -> None:
    """Say once per stream and layout when a configuration leaves the fast decode (``tiles.decode_paths``):
    nothing else would tell a user why a tighter error bound made attention several times slower."""
    p, d, kq, vq = lay.pack_size, lay.head_dim, lay.k.qbits, lay.v.qbits
    for i, stream in enumerate("kv"):
        key = (stream, p, d, ts, kq, vq)
        if decode_paths(p, d, ts, kq, vq)[i] != "per-value" or key in _warned_slow:
            continue
        _warned_slow.add(key)
        fits = [c for c in (8, 16, 32) if decode_paths(c, d, min(max(ts, c), lay.block_size), kq, vq)[i] != "per-value"]
        qbits = (kq, vq)[i]
        hint = (f"pack_size={max(fits)} keeps the fast path" if fits else
                f"no pack size does at {qbits}-bit ints; {stream}_rel > 1/255 (<= 8 bits) with pack_size=8 would")
        log.warning("PackKV attention: %s packs of %d x %d-bit ints are decoded value by value on the GPU (about "
                    "2.6x slower attention); %s", stream.upper(), p, qbits, hint)


LOG2E = 1.4426950408889634
# tf32x3 keeps fp32 accuracy on tensor cores; the interpreter computes in fp32 whatever is asked.
DOT_PRECISION = "ieee" if INTERPRET else "tf32x3"


@triton.jit
def _dot_split(a, b16):
    """``a @ b16`` for fp32 ``a`` (|a| <= 1) and exact fp16 ``b16``: two fp16 tensor-core products (a = hi + lo)
    give fp32-level accuracy."""
    hi = a.to(tl.float16)
    lo = (a - hi.to(tl.float32)).to(tl.float16)
    return tl.dot(hi, b16) + tl.dot(lo, b16)


@triton.jit
def _split(a):
    hi = a.to(tl.float16)
    return hi, (a - hi.to(tl.float32)).to(tl.float16)


@triton.jit
def _exact_operand(ints, QBITS: tl.constexpr):
    if QBITS <= 10:
        return ints_to_f16(ints)
    else:
        return ints.to(tl.float32)


@triton.jit
def _dot_ints(a, ints_t, QBITS: tl.constexpr, DOT: tl.constexpr, EXACT: tl.constexpr):
    """``a @ ints_t`` for |a| <= 1 and integer operand ``ints_t`` (fp16-exact below 1024, else fp32). ``EXACT``
    keeps fp32 accuracy (two fp16 products); otherwise ``a`` is rounded to fp16 once (2^-11 relative: finer than
    the bf16/fp16 inputs and outputs it serves, as in flash attention's P @ V)."""
    if QBITS <= 10:
        if EXACT:
            return _dot_split(a, ints_t)
        else:
            return tl.dot(a.to(tl.float16), ints_t)
    else:
        return tl.dot(a, ints_t, input_precision=DOT)


@triton.jit
def _pow2_normalizer(x):
    """``2^-k`` with ``max|x| < 2^k`` per row: scaling by it is exact, so a bf16/fp16 query stays exact in fp16."""
    e = tl.max(tl.abs(x), 1).to(tl.int32, bitcast=True) & 0x7F800000
    e = tl.minimum(e, 252 << 23)
    return (0x7E800000 - e).to(tl.float32, bitcast=True)


@triton.jit
def _online_update(s, ok, m_i, l_i):
    """One step of the online softmax (log2 units): probabilities p, rescale alpha, new max and sum."""
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _visible(pos, qi, row_ok, b, hq, out_len, mask_ptr, smb, smh, smq, sml,
             HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr,
             MASK_ROW: tl.constexpr = False):  # fmt: skip
    """Which (row, token) pairs attend, and the additive mask (log2 units) for float masks."""
    ok = row_ok[:, None] & (pos < out_len)[None, :]  # a split's blocks past the end fall out here
    if IS_CAUSAL:  # scaled_dot_product_attention's is_causal: top-left aligned
        ok = ok & (pos[None, :] <= qi[:, None])
    add = tl.zeros(ok.shape, tl.float32)
    if HAS_MASK and MASK_ROW:  # one mask row for every head and query (a decode step's padding mask): [TS] loads
        mv = tl.load(mask_ptr + b * smb + pos * sml, mask=pos < out_len, other=0)[None, :]
        if MASK_BOOL:
            ok = ok & (mv != 0)
        else:
            add = add + mv.to(tl.float32) * 1.4426950408889634
    elif HAS_MASK:
        mv = tl.load(mask_ptr + b * smb + hq[:, None] * smh + qi[:, None] * smq + pos[None, :] * sml, mask=ok, other=0)
        if MASK_BOOL:
            ok = ok & (mv != 0)
        else:
            add = mv.to(tl.float32) * 1.4426950408889634
    return ok, add


@triton.jit
def _tile_side_loads(
    b, v, kvh, r, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, perm_ptr, out_len, NB, H,
    T: tl.constexpr, TS: tl.constexpr, D: tl.constexpr, K_GROUP: tl.constexpr, V_GROUP: tl.constexpr,
    HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, LANE_ORDER: tl.constexpr = False,
):  # fmt: skip
    """A compressed tile's scales, zeros and (where needed) permutation, in the order of the decoded tiles' rows:
    loads that do not depend on the decode, issued before it so their latency overlaps it."""
    ks, kz = group_scale_rows(k_scale_ptr, k_zero_ptr, b, v, kvh, NB, H, r * TS, T, TS, D, K_GROUP, LANE_ORDER)
    vs, vz = group_scale_rows(v_scale_ptr, v_zero_ptr, b, v, kvh, NB, H, r * TS, T, TS, D, V_GROUP, LANE_ORDER)
    # Original positions matter only to a mask, causality, or a block cut by out_len: otherwise the permutation
    # is not read (the load is predicated off).
    need = HAS_MASK or IS_CAUSAL or (v + 1) * T > out_len
    perm = tl.load(perm_ptr + (b * NB + v) * T + r * TS + lane_order_tokens(TS, LANE_ORDER), mask=need, other=0)
    return ks, kz, vs, vz, perm


@triton.jit
def _compressed_tile(
    kx, vt, m_i, l_i, acc, b, v, ks, kz, vs, vz, perm,
    qn, q_hi, q_lo, qsum, score_scale, qi, row_ok, hq, out_len, mask_ptr, smb, smh, smq, sml,
    T: tl.constexpr, TS: tl.constexpr, D: tl.constexpr, K_QBITS: tl.constexpr, K_GROUP: tl.constexpr,
    V_QBITS: tl.constexpr, V_GROUP: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT: tl.constexpr, EXACT: tl.constexpr, FUSED_RED: tl.constexpr = False,
    MASK_ROW: tl.constexpr = False,
):  # fmt: skip
    """One tile of a compressed block: scores from the K operand ``kx`` (ints, repacked order) and its scales and
    zeros, online softmax, and the weighted V operand ``vt`` into ``acc``. Returns the new (m_i, l_i, acc)."""
    kt = tl.trans(kx)
    if K_GROUP == 2:  # per-channel scales fold into the query
        smax = tl.max(ks, 0)
        qs = qn * (ks / smax)[None, :]
        s = (_dot_ints(qs, kt, K_QBITS, DOT, EXACT) + tl.sum(qs * kz[None, :], 1)[:, None]) * smax
    else:
        if K_QBITS <= 10:
            raw = tl.dot(q_hi, kt)
            if EXACT:
                raw += tl.dot(q_lo, kt)
        else:
            raw = tl.dot(qn, kt, input_precision=DOT)
        s = (raw + kz[None, :] * qsum[:, None]) * ks[None, :]
    pos = v * T + perm.to(tl.int32)
    ok, add = _visible(pos, qi, row_ok, b, hq, out_len, mask_ptr, smb, smh, smq, sml,
                       HAS_MASK, MASK_BOOL, IS_CAUSAL, MASK_ROW)  # fmt: skip
    if FUSED_RED and V_GROUP != 2:
        # Two cross-warp reductions per tile instead of four: the scores' and the V scales' maxima in one pass,
        # then the probabilities' and the weighted zeros' sums in one pass (each reduction costs barriers); joined
        # tensors rather than tuple reductions, which lower to more instructions (1,335 vs 1,367 at 16 rows).
        s = tl.where(ok, s * score_scale + add, float("-inf"))
        s_max, v_max = tl.split(tl.max(tl.join(s, tl.broadcast_to(vs[None, :], s.shape)), 1))
        m_new = tl.maximum(m_i, s_max)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        w = p * (vs[None, :] / v_max[:, None])
        p_sum, wz = tl.split(tl.sum(tl.join(p, w * vz[None, :]), 1))
        blk = (_dot_ints(w, vt, V_QBITS, DOT, EXACT) + wz[:, None]) * v_max[:, None]
        return m_new, l_i * alpha + p_sum, acc * alpha[:, None] + blk
    p, alpha, m_i, l_i = _online_update(s * score_scale + add, ok, m_i, l_i)
    if V_GROUP == 2:  # sum_t p (Q + z_c) s_c
        blk = (_dot_ints(p, vt, V_QBITS, DOT, EXACT) + tl.sum(p, 1)[:, None] * vz[None, :]) * vs[None, :]
    else:  # sum_t (p s_t) (Q + z_t), weights normalized by the tile's largest scale
        smax = tl.max(vs, 0)
        w = p * (vs / smax)[None, :]
        blk = (_dot_ints(w, vt, V_QBITS, DOT, EXACT) + tl.sum(w * vz[None, :], 1)[:, None]) * smax
    return m_i, l_i, acc * alpha[:, None] + blk


@triton.jit
def _compressed_tile_t(
    kx, vt, m_i, l_i, acc_t, l_t, z_t, b, v, ks, kz, vs, vz, perm,
    q_hi_t, q_lo_t, qsum, score_scale, qi, row_ok, hq, out_len, mask_ptr, smb, smh, smq, sml,
    T: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr,
    EXACT: tl.constexpr, MASK_ROW: tl.constexpr, DEFER_SUMS: tl.constexpr,
):  # fmt: skip
    """``_compressed_tile`` with the query rows as the MMAs' N dimension (token groups, ints below 1024): scores
    ``K @ q^T`` ``[TS, M]`` and ``acc^T += V^T @ P^T`` ``[D, M]``, so the decoded tiles are the A operands and the
    few query rows are padded to the MMA's 8 columns instead of its 16 rows.

    With ``DEFER_SUMS`` the softmax denominators and the V zeros' terms (``sum_t p s_t z_t``, one per row) stay
    per token in ``l_t`` / ``z_t`` ``[TS, M]``, rescaled like ``acc_t``, and are summed over the tokens once after
    the loop (``_fold_deferred_sums``): the token sum ran across the warps, a shared-memory round trip and
    barriers per tile; the elementwise update is a few FMAs per thread."""
    raw = tl.dot(kx, q_hi_t)
    if EXACT:
        raw += tl.dot(kx, q_lo_t)
    s = (raw + kz[:, None] * qsum[None, :]) * ks[:, None]
    pos = v * T + perm.to(tl.int32)
    ok, add = _visible(pos, qi, row_ok, b, hq, out_len, mask_ptr, smb, smh, smq, sml,
                       HAS_MASK, MASK_BOOL, IS_CAUSAL, MASK_ROW)  # fmt: skip
    s = tl.where(tl.trans(ok), s * score_scale[None, :] + tl.trans(add), float("-inf"))
    s_max, smax = tl.split(tl.max(tl.join(s, tl.broadcast_to(vs[:, None], s.shape)), 0))
    m_new = tl.maximum(m_i, s_max)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[None, :])
    alpha = tl.exp2(m_i - m_safe)
    pvs = p * vs[:, None]
    w = pvs * (1.0 / smax)[None, :]
    if EXACT:
        pv = _dot_split(tl.trans(w), vt)
        blk = tl.trans(pv)
    else:
        blk = tl.dot(tl.trans(vt), w.to(tl.float16))
    if DEFER_SUMS:
        l_t = l_t * alpha[None, :] + p
        z_t = z_t * alpha[None, :] + pvs * vz[:, None]
        return m_new, l_i * alpha, acc_t * alpha[None, :] + blk * smax[None, :], l_t, z_t
    p_sum, wz = tl.split(tl.sum(tl.join(p, w * vz[:, None]), 0))
    blk = (blk + wz[None, :]) * smax[None, :]
    return m_new, l_i * alpha + p_sum, acc_t * alpha[None, :] + blk, l_t, z_t


@triton.jit
def _attention_kernel(
    q_ptr, acc_ptr, m_ptr, l_ptr,
    pool_ptr, k_meta_ptr, k_off_ptr, k_scale_ptr, k_zero_ptr, v_meta_ptr, v_off_ptr, v_scale_ptr, v_zero_ptr,
    perm_ptr, ring_k_ptr, ring_v_ptr, n_blocks_ptr, n_win_ptr,
    mask_ptr, smb, smh, smq, sml,
    out_len, NB, S, H, HQ, TQ, Q0, N_REP, n_virtual, NS, qk_scale,
    T: tl.constexpr, D: tl.constexpr, P: tl.constexpr, TILE: tl.constexpr, M_PAD: tl.constexpr,
    K_QBITS: tl.constexpr, K_MBITS: tl.constexpr, K_MW: tl.constexpr, K_GROUP: tl.constexpr,
    V_QBITS: tl.constexpr, V_MBITS: tl.constexpr, V_MW: tl.constexpr, V_GROUP: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT: tl.constexpr,
    USE_ASM: tl.constexpr, PACKWISE: tl.constexpr, EXACT: tl.constexpr, WINDOWS: tl.constexpr = True,
    SKIP_DECODE: tl.constexpr = False, PAIRED: tl.constexpr = True, CHANNEL_ROWS: tl.constexpr = True,
    FUSED_RED: tl.constexpr = False, BALANCED: tl.constexpr = True, MASK_ROW: tl.constexpr = False,
    EARLY_LOADS: tl.constexpr = True, PAIRS: tl.constexpr = True, ZERO_COUNT: tl.constexpr = True,
    PREFETCH: tl.constexpr = 1, ZERO_SPAN: tl.constexpr = True, ZCHUNK: tl.constexpr = 1024,
    ROTATE: tl.constexpr = False, ROT_SCALE: tl.constexpr = 1.0, ROWS_AS_N: tl.constexpr = False,
    LANES: tl.constexpr = 2, DEFER_SUMS: tl.constexpr = False,
):  # fmt: skip
    # Tokens per tile: the requested TILE, clamped to whole pack rows within a block.
    TS: tl.constexpr = T if TILE >= T else (P if TILE <= P else TILE)
    # The query rows as the MMAs' N dimension in the compressed-block loop (_compressed_tile_t).
    ROWS_N: tl.constexpr = ROWS_AS_N and K_GROUP != 2 and V_GROUP != 2 and K_QBITS <= 10 and V_QBITS <= 10
    # Lane order (tiles._lane_values): both streams' tiles, and so their scales and permutation, in the order two
    # values of a pack leave one extraction. Only with the rows as N: with the rows as M (16 rows) the lanes cost
    # more than they save (1,373 / 1,406 in lane / token order vs 1,354 sm_90 loop instructions).
    # Packs wider than 64 bits decode as halves (tiles.split_packs; PAIRED guarantees the halves fit).
    K_PE: tl.constexpr = P // 2 if P * K_QBITS > 64 else P
    V_PE: tl.constexpr = P // 2 if P * V_QBITS > 64 else P
    # LANE_ORDER is the lane width: 4 values when both streams' ints have <= 4 bits, else 2 (<= 8 bits); 0: none.
    LANE_ORDER: tl.constexpr = (4 if K_QBITS <= 4 and V_QBITS <= 4 else 2) if (
        LANES == 2 and PAIRED and ROWS_N and (K_PE == 8 or K_PE == 16) and (V_PE == 8 or V_PE == 16) and K_QBITS <= 8
        and V_QBITS <= 8) else 0  # fmt: skip
    LANE_MODE: tl.constexpr = LANE_ORDER if LANE_ORDER else (1 if LANES == 1 else 0)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // H
    kvh = pid % H
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor may pass Python floats as fp64
    # Rows: every query of every query head in this KV group.
    rows = tl.arange(0, M_PAD)
    row_ok = rows < N_REP * TQ
    hq = kvh * N_REP + rows // TQ
    qi = rows % TQ
    qv = qi + Q0  # the query's index in the whole query block (causality, mask rows) when the rows are chunked
    cc = tl.arange(0, D)
    q = tl.load(q_ptr + ((b * HQ + hq) * TQ + qi)[:, None] * D + cc[None, :], mask=row_ok[:, None], other=0.0)
    q = q.to(tl.float32)
    if ROTATE:  # the query in the cache's coordinates, as rotation.rotate gives it: fp32 sums, one rounding
        q = (fwht_rows(q, M_PAD, D) * ROT_SCALE).to(q_ptr.dtype.element_ty).to(tl.float32)
    # Compressed tokens multiply the raw ints by a normalized query (fp16 tensor cores), then apply the
    # group's scale and zero to the scores: q . (Q + z) s = s (q . Q + z sum(q)) for token groups.
    inv = _pow2_normalizer(q)
    qn = q * inv[:, None]
    qsum = tl.sum(qn, 1)
    score_scale = (qk_scale / inv)[:, None]
    q_hi, q_lo = _split(qn)  # once: the fp16 halves of the query are the A operand of every block

    nb = tl.load(n_blocks_ptr + b)
    total = nb * T + tl.load(n_win_ptr + b)
    m_i = tl.full((M_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((M_PAD,), tl.float32)
    acc = tl.zeros((M_PAD, D), tl.float32)
    # Each split takes an equal share of the compressed blocks (read from the device), then of the virtual blocks
    # after them (ring tokens, then zero keys up to out_len). In a compiled step out_len is the storage's capacity,
    # up to twice the length: cut over out_len alone (BALANCED=False, a benchmark variant), half the splits would
    # get only cheap zero tiles. The virtual blocks go to the splits in reverse order: the last splits hold the
    # remainder of the compressed blocks (often none at batch 1: 1,022 blocks in 66 splits of 16 leave 2 idle), and a
    # ring tile costs one or two compressed ones (32 KB of exact K/V to read). Splits 0-2 took them before: in one
    # wave the slowest program sets the kernel's time, 6-10% over the others at B1/64K (modelled, untimed).
    nbv = tl.minimum(nb, n_virtual)  # blocks past out_len are not attended
    if BALANCED:
        c_per = tl.cdiv(nbv, NS)
        c_lo = tl.minimum(split * c_per, nbv)
        c_hi = tl.minimum(c_lo + c_per, nbv)
        e_per = tl.cdiv(n_virtual - nbv, NS)
        e_lo = nbv + (NS - 1 - split) * e_per
        e_hi = tl.minimum(e_lo + e_per, n_virtual)
    else:
        per = tl.cdiv(n_virtual, NS)
        c_lo = tl.minimum(split * per, nbv)
        c_hi = tl.minimum(split * per + per, nbv)
        e_lo = tl.maximum(split * per, nbv)
        e_hi = tl.minimum(split * per + per, n_virtual)
    if PREFETCH > 0 and TS == T and PAIRED and not SKIP_DECODE:
        # Software-pipelined by hand (one tile per block): the next block's payload offsets and metadata fields
        # (PREFETCH 1), and with PREFETCH 2 also its pack starts and payload words, are loaded while this block
        # is decoded, so the chain offset/fields -> scan -> payload loads -> values is no longer waited for in
        # each iteration. Reads ahead of the last block are clamped to it (in bounds; the payload is not read).
        # Names differ from the ring loop's below (Triton types a name once per function).
        chunk = (b * NB + tl.minimum(c_lo, NB - 1)) * H + kvh
        k_off = tl.load(k_off_ptr + chunk)
        v_off = tl.load(v_off_ptr + chunk)
        fk, fv = pair_fields(k_meta_ptr + chunk * K_MW, v_meta_ptr + chunk * V_MW, 0, TS, D, P, K_MBITS, V_MBITS,
                             USE_ASM)  # fmt: skip
        if PREFETCH > 1:
            nxt_k_lo, nxt_k_hi, nxt_v_lo, nxt_v_hi, _kb, _vb = pair_bits(
                fk, fv, pool_ptr + k_off, pool_ptr + v_off, 0, 0, c_lo < c_hi, P, K_QBITS, V_QBITS, USE_ASM, False,
                True)  # fmt: skip
        if ROWS_N:
            acc_t = tl.trans(acc)
            q_hi_t = tl.trans(q_hi)
            q_lo_t = tl.trans(q_lo)
            scale_rows = tl.reshape(score_scale, (M_PAD,))
            l_t = tl.zeros((TS, M_PAD), tl.float32)  # DEFER_SUMS: per-token partial sums (see _compressed_tile_t)
            z_t = tl.zeros((TS, M_PAD), tl.float32)
        for v in range(c_lo, c_hi):
            ks, kz, vs, vz, perm = _tile_side_loads(b, v, kvh, 0, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr,
                                                    perm_ptr, out_len, NB, H, T, TS, D, K_GROUP, V_GROUP, HAS_MASK,
                                                    IS_CAUSAL, LANE_ORDER)  # fmt: skip
            chunk = (b * NB + tl.minimum(v + 1, c_hi - 1)) * H + kvh
            fk_c, fv_c = fk, fv
            k_off_n = tl.load(k_off_ptr + chunk)
            v_off_n = tl.load(v_off_ptr + chunk)
            fk, fv = pair_fields(k_meta_ptr + chunk * K_MW, v_meta_ptr + chunk * V_MW, 0, TS, D, P, K_MBITS,
                                 V_MBITS, USE_ASM)  # fmt: skip
            if PREFETCH > 1:
                cur_k_lo, cur_k_hi, cur_v_lo, cur_v_hi = nxt_k_lo, nxt_k_hi, nxt_v_lo, nxt_v_hi
                nxt_k_lo, nxt_k_hi, nxt_v_lo, nxt_v_hi, _kb, _vb = pair_bits(
                    fk, fv, pool_ptr + k_off_n, pool_ptr + v_off_n, 0, 0, v + 1 < c_hi, P, K_QBITS, V_QBITS, USE_ASM,
                    False, True)  # fmt: skip
            else:
                cur_k_lo, cur_k_hi, cur_v_lo, cur_v_hi, _kb, _vb = pair_bits(
                    fk_c, fv_c, pool_ptr + k_off, pool_ptr + v_off, 0, 0, None, P, K_QBITS, V_QBITS, USE_ASM, False)
            k_off, v_off = k_off_n, v_off_n
            kx, vt = pair_values(fk_c, fv_c, cur_k_lo, cur_k_hi, cur_v_lo, cur_v_hi, TS, D, P, K_QBITS, V_QBITS,
                                 USE_ASM, CHANNEL_ROWS, PAIRS, LANE_MODE)  # fmt: skip
            if ROWS_N:
                m_i, l_i, acc_t, l_t, z_t = _compressed_tile_t(
                    kx, vt, m_i, l_i, acc_t, l_t, z_t, b, v, ks, kz, vs, vz, perm,
                    q_hi_t, q_lo_t, qsum, scale_rows, qv, row_ok, hq, out_len, mask_ptr, smb, smh, smq, sml,
                    T, HAS_MASK, MASK_BOOL, IS_CAUSAL, EXACT, MASK_ROW, DEFER_SUMS)  # fmt: skip
            else:
                m_i, l_i, acc = _compressed_tile(
                    kx, vt, m_i, l_i, acc, b, v, ks, kz, vs, vz, perm,
                    qn, q_hi, q_lo, qsum, score_scale, qv, row_ok, hq, out_len, mask_ptr, smb, smh, smq, sml,
                    T, TS, D, K_QBITS, K_GROUP, V_QBITS, V_GROUP, HAS_MASK, MASK_BOOL, IS_CAUSAL, DOT, EXACT,
                    FUSED_RED, MASK_ROW)  # fmt: skip
        if ROWS_N:
            if DEFER_SUMS:  # l_t, z_t carry the scale of the final m_i like acc_t and l_i
                l_i += tl.sum(l_t, 0)
                acc_t += tl.sum(z_t, 0)[None, :]
            acc = tl.trans(acc_t)
        c_hi = c_lo  # done: the loop below runs no iteration
    for v in range(c_lo, c_hi):  # compressed blocks
        chunk = (b * NB + v) * H + kvh
        k_base = pool_ptr + tl.load(k_off_ptr + chunk)
        v_base = pool_ptr + tl.load(v_off_ptr + chunk)
        k_bits = tl.zeros((), tl.int32)
        v_bits = tl.zeros((), tl.int32)
        for r in range(0, T // TS):  # a runtime loop: unrolling it would keep four tiles live
            if EARLY_LOADS:
                ks, kz, vs, vz, perm = _tile_side_loads(b, v, kvh, r, k_scale_ptr, k_zero_ptr, v_scale_ptr,
                                                        v_zero_ptr, perm_ptr, out_len, NB, H, T, TS, D, K_GROUP,
                                                        V_GROUP, HAS_MASK, IS_CAUSAL, LANE_ORDER)  # fmt: skip
            if SKIP_DECODE:  # benchmark only: the rest of the kernel without value extraction
                kx = _exact_operand(tl.zeros((TS, D), tl.int32) + (tl.load(k_base + r) & 7), K_QBITS)
                vt = _exact_operand(tl.zeros((TS, D), tl.int32) + (tl.load(v_base + r) & 7), V_QBITS)
            elif PAIRED:
                kx, vt, k_bits, v_bits = decode_pair_windows(
                    k_base, k_meta_ptr + chunk * K_MW, v_base, v_meta_ptr + chunk * V_MW, r * (TS // P), k_bits,
                    v_bits, TS, D, P, K_QBITS, K_MBITS, V_QBITS, V_MBITS, USE_ASM, CHANNEL_ROWS, TS < T or not FUSED_RED, PAIRS,
                    LANE_MODE)
            else:
                kx, k_bits = decode_operand(k_base, k_meta_ptr + chunk * K_MW, r * (TS // P), k_bits,
                                            TS, D, P, K_QBITS, K_MBITS, USE_ASM, PACKWISE, WINDOWS)  # fmt: skip
                vt, v_bits = decode_operand(v_base, v_meta_ptr + chunk * V_MW, r * (TS // P), v_bits,
                                            TS, D, P, V_QBITS, V_MBITS, USE_ASM, PACKWISE, WINDOWS)  # fmt: skip
            if not EARLY_LOADS:  # after the decode (before 2026-12-04f)
                ks, kz, vs, vz, perm = _tile_side_loads(b, v, kvh, r, k_scale_ptr, k_zero_ptr, v_scale_ptr,
                                                        v_zero_ptr, perm_ptr, out_len, NB, H, T, TS, D, K_GROUP,
                                                        V_GROUP, HAS_MASK, IS_CAUSAL, LANE_ORDER)  # fmt: skip
            m_i, l_i, acc = _compressed_tile(
                kx, vt, m_i, l_i, acc, b, v, ks, kz, vs, vz, perm,
                qn, q_hi, q_lo, qsum, score_scale, qv, row_ok, hq, out_len, mask_ptr, smb, smh, smq, sml,
                T, TS, D, K_QBITS, K_GROUP, V_QBITS, V_GROUP, HAS_MASK, MASK_BOOL, IS_CAUSAL, DOT, EXACT, FUSED_RED,
                MASK_ROW)
    # Exact ring tokens after the compressed blocks, then zero keys up to out_len.
    # Zero keys score exactly 0 for every row where no causal cut or per-row mask applies (ZC): they enter the
    # softmax as a count, per tile, or (ZERO_SPAN) for the split's whole zero range in one pass after its ring tiles.
    ZC: tl.constexpr = ZERO_COUNT and not IS_CAUSAL and (not HAS_MASK or (MASK_ROW and MASK_BOOL))
    SPAN: tl.constexpr = ZERO_SPAN and ZC
    if SPAN:  # the blocks holding ring tokens; the zero keys after them are counted below
        e_ring = tl.minimum(e_hi, tl.maximum(e_lo, tl.cdiv(total, T)))
    else:
        e_ring = e_hi
    for v in range(e_lo, e_ring):
        for r in range(0, T // TS):
            if v * T + r * TS >= total:
                # Past the sequence's end, up to out_len (the storage's capacity in compiled steps, up to 2x the
                # length): zero keys and values, as decompress gives. Scores are 0 (+ mask): softmax bookkeeping
                # only, no loads, no products.
                pos = v * T + r * TS + tl.arange(0, TS)
                if SPAN:  # counted after the loop
                    pass
                elif ZC:
                    # Every visible zero key scores exactly 0 for every row: one online step with their count
                    # instead of a [rows, tokens] softmax tile (a bool decode mask is one row, read as [TS]).
                    vis = pos < out_len
                    if HAS_MASK:
                        vis = vis & (tl.load(mask_ptr + b * smb + pos * sml, mask=vis, other=0) != 0)
                    n = tl.where(row_ok, tl.sum(vis.to(tl.float32), 0), 0.0)
                    m_new = tl.where(n > 0, tl.maximum(m_i, 0.0), m_i)
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                    alpha = tl.exp2(m_i - m_safe)
                    l_i = l_i * alpha + n * tl.exp2(-m_safe)
                    m_i = m_new
                    acc = acc * alpha[:, None]
                else:
                    ok, add = _visible(pos, qv, row_ok, b, hq, out_len, mask_ptr, smb, smh, smq, sml,
                                       HAS_MASK, MASK_BOOL, IS_CAUSAL, MASK_ROW)  # fmt: skip
                    p, alpha, m_i, l_i = _online_update(add, ok, m_i, l_i)
                    acc = acc * alpha[:, None]
            else:
                k, pos = exact_rows(ring_k_ptr, b, kvh, v * T + r * TS, total, H, S, TS, D)
                ok, add = _visible(pos, qv, row_ok, b, hq, out_len, mask_ptr, smb, smh, smq, sml,
                                   HAS_MASK, MASK_BOOL, IS_CAUSAL, MASK_ROW)  # fmt: skip
                val, pos = exact_rows(ring_v_ptr, b, kvh, v * T + r * TS, total, H, S, TS, D)
                if EXACT:  # fp32-level accuracy from fp16 halves
                    k_hi, k_lo = _split(tl.trans(k))
                    s = tl.dot(q_hi, k_hi) + tl.dot(q_hi, k_lo) + tl.dot(q_lo, k_hi)
                    p, alpha, m_i, l_i = _online_update(s * score_scale + add, ok, m_i, l_i)
                    p_hi, p_lo = _split(p)
                    v_hi, v_lo = _split(val)
                    acc = acc * alpha[:, None] + tl.dot(p_hi, v_hi) + tl.dot(p_hi, v_lo) + tl.dot(p_lo, v_hi)
                else:  # in the cache's dtype, exact for its values (the query is scaled by a power of two)
                    if USE_ASM:  # on the GPU (the interpreter has no bf16 products: fp32 there)
                        kd = tl.trans(k).to(ring_k_ptr.dtype.element_ty)
                        s = tl.dot(qn.to(kd.dtype), kd)
                    else:
                        s = tl.dot(qn, tl.trans(k), input_precision=DOT)
                    p, alpha, m_i, l_i = _online_update(s * score_scale + add, ok, m_i, l_i)
                    if USE_ASM:
                        vd = val.to(ring_v_ptr.dtype.element_ty)
                        acc = acc * alpha[:, None] + tl.dot(p.to(vd.dtype), vd)
                    else:
                        acc = acc * alpha[:, None] + tl.dot(p, val, input_precision=DOT)

    if SPAN:
        # The split's zero tiles: those starting at or after the sequence's end, up to out_len. Without a mask
        # their count is closed-form; a bool decode mask is summed in chunks of ZCHUNK tokens, so a split's ~1K
        # zero keys at 2x capacity cost one or two dependent loads instead of one per tile.
        zlo = tl.maximum(e_lo * T, tl.cdiv(total, TS) * TS)
        zhi = tl.minimum(e_hi * T, out_len)
        if HAS_MASK:
            cnt = tl.zeros((ZCHUNK,), tl.float32)
            for p0 in range(zlo, zhi, ZCHUNK):
                pos = p0 + tl.arange(0, ZCHUNK)
                vis = pos < zhi
                cnt += (tl.load(mask_ptr + b * smb + pos * sml, mask=vis, other=0) != 0).to(tl.float32)
            n = tl.sum(cnt, 0)
        else:
            n = tl.maximum(zhi - zlo, 0).to(tl.float32)
        n = tl.where(row_ok, n, 0.0)
        m_new = tl.where(n > 0, tl.maximum(m_i, 0.0), m_i)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + n * tl.exp2(-m_safe)
        m_i = m_new
        acc = acc * alpha[:, None]

    part = ((b * HQ + hq) * TQ + qi) * NS + split
    tl.store(acc_ptr + part[:, None] * D + cc[None, :], acc, mask=row_ok[:, None])
    tl.store(m_ptr + part, m_i, mask=row_ok)
    tl.store(l_ptr + part, l_i, mask=row_ok)


# Launch defaults, from the graph-timed sweep in benchmarks/kernels.py (--sweep; H200, Llama-3.1-8B shapes, batch
# 1 and 8, 8K-128K): 64-token tiles and a 128-register cap were best or within 5% of the best at every size. They
# are fixed rather than chosen by triton.autotune: the autotuner picked the same tile and cap at every size, and
# its wrapper adds more host time per eager call than the kernel runs at short contexts.
# The split count fills whole waves: WAVES times the programs the GPU holds at once (registers allow 4 per SM at
# 4 warps x 128 registers). Every program does the same work, so a partial last wave costs a whole one: the
# former rule, about 8 programs per SM (SPLIT_FACTOR), launched 1,088 programs at B8 for 528 slots, 2.06 waves
# (ncu), and it confounded the earlier sweeps of warps, tiles and register caps, whose slot counts differ.
# One wave (B1/128K 0.201 vs 0.210 ms for two, B8/32K 0.395 vs 0.390: variants_h200_2026-12-04f).
TILE, MAXNREG, NUM_WARPS, WAVES = 64, 128, 4, 1
# The next block's offsets and metadata fields are loaded an iteration ahead (2% in two runs on the H200,
# variants_h200_2026-12-04g); prefetching its payload words too (2) costs registers and spills more than it hides.
PREFETCH = 1
# The query rows' padding (``min_rows``: to a power of two, not to 16) and their place in the products
# (``rows_as_n``: K @ q^T and V^T @ P^T, the rows as the MMAs' N dimension), read at each call so a benchmark can
# switch them for a whole compiled model (decode_e2e.py --rows-as-16 for the old). Together 0.338 / 0.173 ms vs 0.394 / 0.201
# (B8/32K, B1/128K; H200, variants_h200_2026-12-04i): loop 1,319 vs 1,479 sm_90 instructions (1,181 since 2026-12-04j:
# metadata fields read per channel and row, the token reductions joined; untimed).
MIN_ROWS = 1
ROWS_AS_N = True
# Up to this many padded rows: the MMAs' N dimension is 8, and at 16 rows the M dimension is faster (0.455 vs 0.394
# ms at B8/32K); past 128 rows the transposed products do not even compile for sm_90 (ptxas fails at 256).
ROWS_AS_N_MAX = 8
MAX_ROWS = 64  # query rows (query heads of a KV group x queries) per program; longer query blocks run in chunks
SPLIT_FACTOR = 8  # the former rule's programs per SM (benchmark variant: split_factor=8)
# ops.attention on a Hadamard-rotated cache: rotate the query and the output inside the attention and merge kernels
# (rotate=True) instead of two fused Inductor kernels per layer around the op (~3 us each at batch 1, 64 graph
# nodes per step): 64K e2e step 10.73 vs 11.14 ms (H200, 2026-12-04h; decode_e2e.py --rotate-around-kernel for the
# old path). Until 2026-12-04j the kernels multiplied by the D x D matrix built in registers, which needed head_dim
# <= 128; the fast Walsh-Hadamard transform (hadamard.fwht_rows) does every supported head_dim.
ROTATE_IN_KERNEL = True
ROTATE_MAX_DIM = 256
# The warp-specialized Gluon kernel (gluon_attention.py) for the decode steps it covers: None (the default) takes it
# for CUDA tensors (it needs sm_90; elsewhere, and for what it does not cover, the Triton kernel runs), True also on
# the CPU (its body run eagerly: the tests' slow check), False never. On the H100 (2026-12-06) it is 2.1-2.2x SDPA
# against ~1x for the Triton kernel, and takes Llama-3.1-8B's decode from 3.5-3.7x to 4.11x static at 64K. Read at each
# call, so a benchmark switches it for a whole compiled model (decode_e2e.py --paths ... packkv_triton);
# PACKKV_GLUON_ATTENTION=0 / 1 sets it to False / True.
GLUON: bool | None = {"0": False, "1": True}.get(os.environ.get("PACKKV_GLUON_ATTENTION", ""))


@functools.cache
def _configured(num_warps: int, num_stages: int, maxnreg: int | None):
    """The kernel with its launch options as a one-config ``triton.autotune``: the form in which Inductor
    (``wrap_triton``) carries launch options into compiled code (the register cap with ``keep_maxnreg``); one
    config means no benchmarking."""
    keep_maxnreg()
    return triton.autotune([triton.Config({}, num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg)], key=[])(
        _attention_kernel
    )


def attention(
    q: torch.Tensor,
    st: PackedLayer,
    out_len: int,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    splits: int | None = None,
    num_warps: int = NUM_WARPS,
    num_stages: int = 1,
    precision: str = DOT_PRECISION,
    maxnreg: int | None = MAXNREG,
    sub_tile: int = TILE,
    packwise: bool = True,
    windows: bool = True,
    split_factor: int | None = None,
    waves: int = WAVES,
    exact: bool | None = None,
    skip_decode: bool = False,
    paired: bool = True,
    channel_rows: bool = True,
    fused_reductions: bool = False,
    balanced: bool = True,
    mask_row: bool = True,
    early_loads: bool = True,
    pairs: bool = True,
    zero_count: bool = True,
    prefetch: int = PREFETCH,
    zero_span: bool = True,
    zero_chunk: int = 1024,
    rotate: bool = False,
    min_rows: int | None = None,
    rows_as_n: bool | None = None,
    lanes: int = 2,
    defer_sums: bool = False,
    gluon: bool | None = None,
) -> torch.Tensor:
    """``scaled_dot_product_attention(q, *decompress(st, out_len), attn_mask=mask, ...)`` without materialising K/V.

    Launch parameters default to the measured best (see ``TILE``); benchmarks vary them:

    * ``sub_tile`` (tokens per tile), ``num_warps``, ``num_stages``, ``maxnreg`` (register cap; None: uncapped);
    * ``waves``: the split count fills this many waves of resident programs, unless ``splits`` fixes it
      (``split_factor``: the former rule, that many programs per SM whatever fits at once);
    * ``packwise`` / ``windows``: value extraction per value, pack-wise with a select, or from two 32-bit windows
      per pack (the default); ``paired``: one prefix scan for the K and V pack starts where ``paired_scan_fits``,
      else one per stream; ``channel_rows``: decoded tiles built channel-major (``tiles._window_values``);
    * ``fused_reductions``: on the rows-as-M path, two cross-warp reductions per tile instead of four, each over
      a joined pair of tensors (tuple reductions were within 1% on the H200; joined, 1,335 vs 1,354 sm_90 loop
      instructions at 16 rows, untimed; the ``rows_as_n`` path always joins its reductions);
      ``early_loads``: scales, zeros and permutation loaded before the decode (False: after it); ``pairs``: on
      the GPU, values are extracted two per asm block (``tiles._halves_1024``; False: one LOP3 per value);
      ``lanes``: with the rows as N (``rows_as_n``) and both streams' ints of <= 4 bits in packs of 8 or 16, the
      values are extracted two per shift from lane-paired windows (``tiles._lane_values``) and the tiles, their
      scales and permutation are in lane order (2, the default; sm_90 loop 1,053 vs 1,181 instructions, untimed);
      1: lane extraction wherever a stream fits, rows in token order (1,150); 0: ``pairs`` alone (before
      2026-12-05);
    * ``zero_count``: zero keys past the length (up to ``out_len``) enter the softmax as one count per tile where
      their scores are all 0 (no mask, or a bool mask read as one row; not causal); False: as a softmax tile;
      ``zero_span`` (the default): count a split's zero keys in one pass after its ring tiles (closed form without
      a mask, the mask summed in ``zero_chunk``-token chunks) instead of one count per tile (False): at ``out_len``
      2x, 0.398 vs 0.416 ms at B8/32K, with a bool decode mask 0.396 vs 0.445 (H200, 2026-12-04h);
    * ``prefetch``: the compressed-block loop loads the next block's offsets and metadata fields (1), and also its
      pack bits (2), while the current block is decoded (one tile per block, paired scan only; 0: no prefetch);
      1 is the default (0.385 / 0.197 ms vs 0.394 / 0.200 at B8/32K, B1/128K; 2 is slower: 0.413 / 0.210);
    * ``balanced``: splits share the compressed blocks (False: they cut ``out_len`` evenly); ``mask_row``: a mask
      broadcast over heads and queries is loaded as one row per tile (False: as a ``[rows, tokens]`` tile);
    * ``rotate``: ``q`` and the result are in the model's coordinates and the cache is Hadamard-rotated: the
      kernel rotates the query and the merge rotates the output back (``rotate(attention(rotate(q)))``, without
      two Inductor kernels per layer around the op); False: the caller rotates;
    * ``min_rows`` (None: ``MIN_ROWS``, 1): the query rows (``n_rep x TQ``, 4 in Llama-3.1-8B's decode) padded
      to a power of two of at least this many (16: the former default). Alone, the MMAs still pad to 16 rows but
      the softmax and the accumulator shrink (sm_90 loop 1,443 vs 1,479 instructions at 4 rows); ``rows_as_n``
      (None: ``ROWS_AS_N``, True): on token-grouped K and V (the defaults) the compressed blocks compute ``K @
      q^T`` and ``acc^T += V^T @ P^T``: the decoded tiles are the MMAs' A operands and the query rows their N
      dimension (padded to 8, not 16): with ``min_rows=1`` 1,319 loop instructions vs 1,479 (a decode step's bool
      row mask with in-kernel rotations: 1,401 vs 1,504), 0.338 / 0.173 ms vs 0.394 / 0.201 at B8/32K, B1/128K
      (H200, 2026-12-04i); other groupings, and more than ``ROWS_AS_N_MAX`` padded rows, keep the rows as the M
      dimension; a query block of more than ``MAX_ROWS`` rows runs in chunks of queries (one launch each);
    * ``gluon`` (None: ``GLUON``, by default on for CUDA tensors): a decode step the Gluon kernel covers
      (``gluon_attention.supported``: sm_90, the default layout) runs on it, and its partials are
      merged by ``_merge_kernel``; the rest stays here. True: it must cover the call (a ``ValueError`` says why it
      does not); the Triton launch parameters above then do not apply. False: the Triton kernel;
    * ``skip_decode`` (benchmarks only, wrong results) replaces value extraction by a constant to show what the
      rest of the kernel costs.

    fp32 queries get fp32-accurate products (``exact``); bf16/fp16 queries get fp16 tensor-core operands, finer
    than their own rounding."""
    lay = st.layout
    _warn_if_per_value(lay, min(max(sub_tile, lay.pack_size), lay.block_size))
    B, HQ, TQ, D = q.shape
    min_rows = MIN_ROWS if min_rows is None else min_rows
    rows_as_n = ROWS_AS_N if rows_as_n is None else rows_as_n
    if rotate and D > ROTATE_MAX_DIM:
        raise ValueError(f"rotate=True needs head_dim <= {ROTATE_MAX_DIM}, got {D}: rotate around the kernel")
    H, T = lay.num_heads, lay.block_size
    n_rep = HQ // H
    n_virtual = max(1, -(-out_len // T))
    chosen_splits = splits  # the caller's (or split_factor's) split count; None: each kernel's own rule
    if splits is None and split_factor is not None:  # the former rule: programs per SM, whatever fits at once
        splits = chosen_splits = -(-split_factor * num_sms(q.device) // (B * H))
    elif splits is None:  # whole waves (a partial last wave of equal programs costs a full one)
        slots = resident_programs(q.device, num_warps, maxnreg) * num_sms(q.device)
        splits = max(1, waves * slots // (B * H))
    ns = max(1, min(splits, n_virtual))
    if mask is not None:
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        # Broadcast dimensions read with stride 0; no expanded or converted copy (a bool mask is read as bool).
        mask_bool = mask.dtype == torch.bool
        strides = tuple(mask.stride(i) if mask.shape[i] > 1 else 0 for i in range(4))
    else:
        mask_bool, strides = True, (0, 0, 0, 0)
    # A mask broadcast over heads and queries (decode's padding mask, [B, 1, 1, L]) is read as one row per tile.
    row_mask = mask_row and mask is not None and strides[1] == 0 and strides[2] == 0
    sm_scale = 1.0 / math.sqrt(D) if scale is None else scale
    use_gluon = GLUON if gluon is None else gluon
    if use_gluon is None:
        use_gluon = q.device.type == "cuda"
    if use_gluon:
        from . import gluon_attention

        why = gluon_attention.supported(q, lay, st.ring_k.dtype, mask, is_causal, out_len)
        if why is None:
            return _gluon_attention(q, st, out_len, mask, sm_scale, rotate, chosen_splits, n_virtual)
        if gluon:
            raise ValueError(f"the Gluon attention kernel does not cover this call: {why}")
        log.debug("attention: the Triton kernel, as the Gluon kernel does not cover this call: %s", why)
    if log.isEnabledFor(logging.DEBUG):  # once per trace in compiled code: what to check when a step is slow
        log.debug("attention launch: grid (%d, %d), q %s %s, out_len %s, mask %s, row mask %s, warps %d, maxnreg %s",
                  B * H, ns, tuple(q.shape), q.dtype, out_len, None if mask is None else (tuple(mask.shape),
                  mask.dtype, strides), row_mask, num_warps, maxnreg)  # fmt: skip
    if INTERPRET:
        kernel, meta = _attention_kernel, dict(TILE=sub_tile, num_warps=num_warps, num_stages=num_stages)
    else:
        kernel, meta = _configured(num_warps, num_stages, maxnreg), dict(TILE=sub_tile)
    # A long query block (chunked prefill, speculative tokens) runs in chunks of at most MAX_ROWS rows per program:
    # the rows are the products' M or N dimension and the softmax's registers (256 rows do not compile for sm_90).
    step = TQ if n_rep * TQ <= MAX_ROWS else max(1, MAX_ROWS // n_rep)
    out = torch.empty(B, HQ, TQ, D, dtype=q.dtype, device=q.device)
    for q0 in range(0, TQ, step):
        tq = min(step, TQ - q0)
        qc = q if tq == TQ else q[:, :, q0 : q0 + tq]
        oc = out if tq == TQ else torch.empty(B, HQ, tq, D, dtype=q.dtype, device=q.device)
        _launch_rows(kernel, meta, qc, oc, q0, st, ns, mask, strides, out_len, n_rep, n_virtual, sm_scale,
                     max(min_rows, next_pow2(n_rep * tq)), is_causal, mask_bool, row_mask, precision, packwise,
                     windows, exact, skip_decode, rows_as_n, channel_rows, fused_reductions, early_loads, pairs,
                     zero_count, prefetch, zero_span, zero_chunk, rotate, balanced, paired, sub_tile, lanes, defer_sums)  # fmt: skip
        if oc is not out:
            out[:, :, q0 : q0 + tq] = oc
    return out


def _gluon_attention(q, st, out_len, mask, sm_scale, rotate, splits, n_virtual) -> torch.Tensor:
    """A decode step on the Gluon kernel (``gluon_attention``; it rotates the query, in fp32, rounded to fp16 once),
    its partials merged and rotated back by ``_merge_kernel``."""
    from . import gluon_attention

    B, HQ, _, D = q.shape
    H = st.layout.num_heads
    if splits is None:
        splits = gluon_attention.splits_for(q, H, out_len, num_sms(q.device))
    ns = max(1, min(splits, n_virtual))
    log.debug("attention on the Gluon kernel: grid (%d, %d), q %s %s, out_len %s, mask %s", B * H, ns, tuple(q.shape),
              q.dtype, out_len, None if mask is None else (tuple(mask.shape), mask.dtype, mask.stride()))  # fmt: skip
    op = gluon_attention.partials if plain_eager((q, st.pool, mask)) else torch.ops.packkv._gluon_decode_partials
    acc, m, l = op(
        q, st.pool, st.k_offsets, st.v_offsets, st.k_meta, st.v_meta, st.k_scale, st.k_zero, st.v_scale, st.v_zero,
        st.ring_k, st.ring_v, st.n_blocks, st.n_win, st.perm, mask, out_len, ns, sm_scale, rotate, st.layout.k.qbits,
        st.layout.v.qbits)  # fmt: skip
    out = torch.empty(B, HQ, 1, D, dtype=q.dtype, device=q.device)
    launch(_merge_kernel)[(B * HQ,)](acc, m, l, out, ns, D=D, BS=merge_chunk(D), ROTATE=rotate, ROT_SCALE=1.0 / math.sqrt(D))
    return out


def _launch_rows(
    kernel, meta, q, out, q0, st, ns, mask, strides, out_len, n_rep, n_virtual, sm_scale, m_pad, is_causal,
    mask_bool, row_mask, precision, packwise, windows, exact, skip_decode, rows_as_n, channel_rows,
    fused_reductions, early_loads, pairs, zero_count, prefetch, zero_span, zero_chunk, rotate, balanced, paired,
    sub_tile, lanes, defer_sums,
) -> None:  # fmt: skip
    """One attention launch and its merge for the query rows ``q0 ..`` of a query block (``attention``)."""
    lay = st.layout
    B, HQ, TQ, D = q.shape
    H, T = lay.num_heads, lay.block_size
    acc = torch.empty(B, HQ, TQ, ns, D, dtype=torch.float32, device=q.device)
    m = torch.empty(B, HQ, TQ, ns, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    launch(kernel)[(B * H, ns)](
        q.contiguous(), acc, m, l,
        st.pool, st.k_meta, st.k_offsets, st.k_scale, st.k_zero, st.v_meta, st.v_offsets, st.v_scale, st.v_zero,
        st.perm, st.ring_k, st.ring_v, st.n_blocks, st.n_win,
        mask if mask is not None else st.n_win, *strides,
        out_len, st.block_capacity, lay.ring_size, H, HQ, TQ, q0, n_rep, n_virtual, ns, sm_scale * LOG2E,
        T=T, D=D, P=lay.pack_size, M_PAD=m_pad,
        K_QBITS=lay.k.qbits, K_MBITS=lay.k.mbits, K_MW=lay.meta_words(lay.k), K_GROUP=lay.k.grouping,
        V_QBITS=lay.v.qbits, V_MBITS=lay.v.mbits, V_MW=lay.meta_words(lay.v), V_GROUP=lay.v.grouping,
        HAS_MASK=mask is not None, MASK_BOOL=mask_bool, IS_CAUSAL=is_causal, DOT=precision, USE_ASM=not INTERPRET,
        PACKWISE=packwise, WINDOWS=windows, EXACT=q.dtype == torch.float32 if exact is None else exact, SKIP_DECODE=skip_decode,
        ROWS_AS_N=rows_as_n and m_pad <= ROWS_AS_N_MAX, CHANNEL_ROWS=channel_rows, FUSED_RED=fused_reductions, EARLY_LOADS=early_loads, PAIRS=pairs, ZERO_COUNT=zero_count, PREFETCH=prefetch, ZERO_SPAN=zero_span, ZCHUNK=zero_chunk, ROTATE=rotate, ROT_SCALE=1.0 / math.sqrt(D), BALANCED=balanced, LANES=lanes, DEFER_SUMS=defer_sums, MASK_ROW=row_mask, PAIRED=paired and windows and packwise and paired_scan_fits(
            min(max(sub_tile, lay.pack_size), T), D, lay.pack_size, lay.k.qbits, lay.v.qbits), **meta,
    )  # fmt: skip
    launch(_merge_kernel)[(B * HQ * TQ,)](acc, m, l, out, ns, D=D, BS=merge_chunk(D), ROTATE=rotate, ROT_SCALE=1.0 / math.sqrt(D))


@triton.jit
def merge_partials(acc_ptr, m_ptr, l_ptr, row, NS, D: tl.constexpr, BS: tl.constexpr):
    """Output row ``row``'s ``NS`` partials folded in one pass, ``BS`` splits per chunk: the running maximum
    ``top`` (log2 units), the unnormalized output ``num [D]`` and the per-lane sums ``den [BS]``, both against
    ``top`` (``_merge_kernel`` normalizes; ``fused_append`` first adds the step's token as one more split)."""
    s = tl.arange(0, BS)
    cc = tl.arange(0, D)
    top = tl.max(tl.full((BS,), float("-inf"), tl.float32), 0)
    num = tl.zeros((D,), tl.float32)
    den = tl.zeros((BS,), tl.float32)
    for s0 in range(0, NS, BS):
        ok = s0 + s < NS
        mc = tl.load(m_ptr + row * NS + s0 + s, mask=ok, other=float("-inf"))
        lc = tl.load(l_ptr + row * NS + s0 + s, mask=ok, other=0.0)
        a = tl.load(acc_ptr + (row * NS + s0 + s)[:, None] * D + cc[None, :], mask=ok[:, None], other=0.0)
        new = tl.maximum(top, tl.max(mc, 0))
        safe = tl.where(new == float("-inf"), 0.0, new)  # nothing visible yet: weights 0, not NaN
        alpha = tl.exp2(top - safe)
        w = tl.exp2(mc - safe)
        num = num * alpha + tl.sum(a * w[:, None], 0)
        den = den * alpha + w * lc
        top = new
    return top, num, den


@triton.jit
def _merge_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, NS, D: tl.constexpr, BS: tl.constexpr,
                  ROTATE: tl.constexpr = False, ROT_SCALE: tl.constexpr = 1.0):  # fmt: skip
    """One output row from its ``NS`` partial (acc, max, sum): one launch instead of a chain of small torch ops
    (eager decode is bound by launches). Twin of ``merge_splits``; ``ROTATE``: the row rotated back to the model's
    coordinates (the rotation is linear, so it commutes with the merge), rounded once.

    One pass, ``BS`` splits per chunk, each chunk's max, sums and outputs loaded together and folded into running
    ones (rescaled when the max grows): up to ``BS`` splits cost one round trip to memory. The kernel is latency
    bound (a few KB per row): a pass for the max and another for the sums cost 4 round trips at 33 splits in
    chunks of 32 (2.7 us per layer in the 64K decode step, H100 2026-12-06c)."""
    row = tl.program_id(0).to(tl.int64)
    cc = tl.arange(0, D)
    top, num, den = merge_partials(acc_ptr, m_ptr, l_ptr, row, NS, D, BS)
    o = num / tl.sum(den, 0)
    if ROTATE:
        o = tl.reshape(fwht_rows(tl.reshape(o, (1, D)), 1, D), (D,)) * ROT_SCALE
    tl.store(out_ptr + row * D + cc, o.to(out_ptr.dtype.element_ty))


def merge_chunk(d: int) -> int:
    """Splits per chunk of ``_merge_kernel``: 64 (one round trip for a batch-1 decode step's 33 splits) while its
    ``[64, D]`` fp32 chunk stays within 64 registers per thread (4 warps)."""
    return 64 if d <= 128 else 32


def merge_splits(acc: torch.Tensor, m: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Combine per-split (acc, max, sum) of an online softmax (log2 units) into the attention output (reference
    of ``_merge_kernel``)."""
    top = m.amax(-1, keepdim=True)
    w = torch.exp2(m - torch.where(top == float("-inf"), 0.0, top))
    return (acc * w[..., None]).sum(-2) / (l * w).sum(-1)[..., None]
