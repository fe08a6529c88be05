"""The register path's floor: decode attention with no shared-memory stages, each warp decoding its own values
straight into ``mma.sync`` operand registers, on a synthetic fragment-ordered format (issue 4's open question,
NOTES 2026-12-08).

The shipped Gluon kernel (``gluon_attention.py``) decodes into shared-memory stages that a wgmma warpgroup reads;
with free decode (zero tiles) it still takes 0.126 ms at B8/32K, 3.3x SDPA, against issue 4's ~6.8x: the stage
handshake and the wgmma chain (cross-warp maximum, P through shared memory, fences, barriers) cost that much per
64 tokens. Here every warp is its own flash-decoding split: ``S = Q K^T`` and ``O += P V`` as ``mma.sync``
m16n8k16 (query heads in M, padded to 16), K^T and V as B operands decoded in registers, P reused from the S
accumulator as the A operand (no conversion through memory), the online softmax within the warp (a quad's
shuffles). No barrier, no shared memory.

The format is what makes that possible, and it is synthetic here (fixed width 2 bits): per 16-token step and
stream, each lane owns 4 words holding exactly the 64 values its B-operand fragment needs, two 16-bit lanes per
word (the pair of values one fp16x2 register holds: one ``shr`` + one ``lop3`` decode a pair), a per-word minimum
(a byte of one metadata word per lane and step) and per-token scales and zeros (applied to S and P after the
products, as the shipped kernels do): 2.75 bits read per value (PackKV's defaults on real K/V: ~2.3). ``VAR``
instead reads packs of varying width as the shipped kernel does (each lane's packs at a warp-scanned offset, up to
three gathered words, two windows and lane joins per pack). Left out: padding masks, the exact window, GQA other
than 4, head_dim other than 128.

Measured (one H100, 2026-12-08, ``benchmarks/results/kernels/register_path_h100_2026-12-08.json``): the fixed
format 0.121 ms at B8/32K (2.9x SDPA, 1.6x the shipped kernel), ``VAR`` 0.215 (slower than the shipped 0.194). Not
issue 4's ~6.8x: NOTES 2026-12-08 says why.

    python scripts/gluon_sm90/register_path.py            # sm_90 build on the CPU: SASS counts, registers
    python scripts/gluon_sm90/register_path.py --gpu      # check against a torch reference, time beside SDPA
                                                          # and the shipped Gluon kernel's partials
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from packkv.ops.kernels.gluon_attention import _add, _funnel_clamp, _lane_join, _lanes_1024, _pack_bits

D, R, M = 128, 4, 16  # head_dim, query heads per KV head (GQA 4), the MMA's rows
STEP = 16  # tokens per step: one k16 slice of P V, two n8 slices of S
NW = 4  # payload words per lane and step and stream (64 values x 2 bits)
LOG2E = 1.4426950408889634
# (steps per softmax update, K's minima as a product, rescale only when a maximum rose, packs of varying width)
VARIANTS = ((2, False, False, False), (4, False, False, False), (2, True, False, False), (4, True, False, False),
            (2, True, True, False), (4, True, True, False), (2, False, False, True), (2, False, True, True),
            (4, False, True, True))


PAIR_ASM = gl.constexpr("{ .reg .b32 r; shr.b32 r, $1, $3; lop3.b32 r, r, 0x00030003, 0x64006400, 0xea; add.rn.f16x2 $0, r, $5; }")
PAIR_RAW_ASM = gl.constexpr("{ .reg .b32 r; shr.b32 r, $1, $3; lop3.b32 $0, r, 0x00030003, 0x64006400, 0xea; }")


@gluon.jit
def _pair(x, sh, mn):
    """Two values of a word, one per 16-bit lane, as fp16 ``min + delta``: ``(x >> sh) & 0x00030003`` with the
    fp16 exponent of 1024 or'ed in, plus ``min - 1024`` in both halves."""
    return gl.inline_asm_elementwise(PAIR_ASM, "=r,r,r,r,r,r,r", [x, sh, mn], dtype=gl.float16, is_pure=True, pack=2)


@gluon.jit
def _pair_raw(x, sh):
    """``_pair`` without the minimum: ``1024 + delta`` (``FOLD``: the minima enter as a product of their own)."""
    return gl.inline_asm_elementwise(PAIR_RAW_ASM, "=r,r,r,r,r", [x, sh], dtype=gl.float16, is_pure=True, pack=2)


@gluon.jit
def _words(w_ptr, m_ptr, step):
    """A step's words ``[8 (lane >> 2), 4 (lane & 3), 2, 2 (word bits)]`` and their minima as fp16x2 offsets."""
    LW: gl.constexpr = gl.BlockedLayout([1, 4], [32, 1], [1, 1], [1, 0])
    lane = gl.arange(0, 32, gl.SliceLayout(1, LW))
    wi = gl.arange(0, 4, gl.SliceLayout(0, LW))
    x = gl.load(w_ptr + (step * 32 + gl.expand_dims(lane, 1)) * 4 + gl.expand_dims(wi, 0)).to(gl.uint32, bitcast=True)
    meta = gl.load(m_ptr + step * 32 + lane).to(gl.uint32, bitcast=True)
    mn = (gl.expand_dims(meta, 1) >> gl.expand_dims(wi.to(gl.uint32) * 8, 0)) & 0xF
    mp = 0xE400E400 - mn * 0x20002  # fp16 (min - 1024) in both halves
    return gl.reshape(x, (8, 4, 2, 2)), gl.reshape(mp, (8, 4, 2, 2))


@gluon.jit
def _values(x, mp):
    """``[8, 4, 2, 2, 2 (half), 2, 2, 2 (j)]`` fp16: value ``j`` of lane ``half`` of each word."""
    x2 = gl.join(x, x)
    m2 = gl.join(mp, mp)
    z = x2 & 0  # folded: the shifts are constants
    p0 = _pair(x2, z, m2)
    p1 = _pair(x2, z + 2, m2)
    p2 = _pair(x2, z + 4, m2)
    p3 = _pair(x2, z + 6, m2)
    p4 = _pair(x2, z + 8, m2)
    p5 = _pair(x2, z + 10, m2)
    p6 = _pair(x2, z + 12, m2)
    p7 = _pair(x2, z + 14, m2)
    return gl.join(gl.join(gl.join(p0, p1), gl.join(p2, p3)), gl.join(gl.join(p4, p5), gl.join(p6, p7)))


@gluon.jit
def _values_raw(x):
    """``_values`` without the minima."""
    x2 = gl.join(x, x)
    z = x2 & 0
    p0 = _pair_raw(x2, z)
    p1 = _pair_raw(x2, z + 2)
    p2 = _pair_raw(x2, z + 4)
    p3 = _pair_raw(x2, z + 6)
    p4 = _pair_raw(x2, z + 8)
    p5 = _pair_raw(x2, z + 10)
    p6 = _pair_raw(x2, z + 12)
    p7 = _pair_raw(x2, z + 14)
    return gl.join(gl.join(gl.join(p0, p1), gl.join(p2, p3)), gl.join(gl.join(p4, p5), gl.join(p6, p7)))


@gluon.jit
def _var_values(w_ptr, off_ptr, m_ptr, step):
    """``VAR``: a step's values as ``_values`` lays them out, from packs of varying width: each lane's 4 packs
    (fields ``min | width << 4``, a byte each of the lane's metadata word) back to back in its bit stream, the 32
    lanes' streams back to back from the step's offset (a warp scan of the lanes' sizes). Value ``8 window + 4 half
    + j`` of a pack sits in ``j0, j1, j2 = j & 1, j >> 1, window``; each pack is read and decoded as the shipped
    kernel does (``_pack_bits``: up to 3 gathered words; two windows of 8 values; a shift, a LOP3 and an add per
    pair)."""
    LW: gl.constexpr = gl.BlockedLayout([1, 4], [32, 1], [1, 1], [1, 0])
    lane = gl.arange(0, 32, gl.SliceLayout(1, LW))
    wi = gl.arange(0, 4, gl.SliceLayout(0, LW))
    meta = gl.load(m_ptr + step * 32 + lane).to(gl.uint32, bitcast=True)
    f = (gl.expand_dims(meta, 1) >> gl.expand_dims(wi.to(gl.uint32) * 8, 0)) & 0xFF
    w = (f >> 4) & 7
    size = w * 16
    tot = gl.convert_layout(gl.sum(size, 1), gl.BlockedLayout([1], [32], [1], [0]))  # a scan takes no slice layout
    first = gl.convert_layout(gl.associative_scan(tot, 0, _add) - tot, gl.SliceLayout(1, LW))  # moves nothing
    start = gl.expand_dims(first, 1) + gl.associative_scan(size, 1, _add) - size
    lo, hi = _pack_bits(w_ptr + gl.load(off_ptr + step), start.to(gl.int32), size.to(gl.int32))
    wl = w * 4
    lj0 = gl.reshape(_lane_join(lo, wl), (8, 4, 2, 2))
    lj1 = gl.reshape(_lane_join(_funnel_clamp(lo, hi, wl * 2), wl), (8, 4, 2, 2))
    m = ((w & 0) + 1 << w) - 1
    m2 = gl.reshape(m | (m << 16), (8, 4, 2, 2))
    mu2 = gl.reshape(0xE400E400 - (f & 0xF) * 0x20002, (8, 4, 2, 2))
    w = gl.reshape(w, (8, 4, 2, 2))
    a0 = gl.join(lj0, lj0)
    a1 = gl.join(lj1, lj1)
    m2 = gl.join(m2, m2)
    mu2 = gl.join(mu2, mu2)
    w2 = gl.join(w, w)
    p0 = _lanes_1024(a0, w2 * 0, m2, mu2)
    p1 = _lanes_1024(a0, w2, m2, mu2)
    p2 = _lanes_1024(a0, w2 * 2, m2, mu2)
    p3 = _lanes_1024(a0, w2 * 3, m2, mu2)
    p4 = _lanes_1024(a1, w2 * 0, m2, mu2)
    p5 = _lanes_1024(a1, w2, m2, mu2)
    p6 = _lanes_1024(a1, w2 * 2, m2, mu2)
    p7 = _lanes_1024(a1, w2 * 3, m2, mu2)
    return gl.join(gl.join(gl.join(p0, p1), gl.join(p2, p3)), gl.join(gl.join(p4, p5), gl.join(p6, p7)))


@gluon.jit
def _k_operand(w_ptr, m_ptr, step, LB: gl.constexpr, FOLD: gl.constexpr, VAR: gl.constexpr, off_ptr):
    """K^T of a step, ``[D, 16]``: channel ``half + 2 (lane & 3) + 8 j + 64 w0``, token ``(lane >> 2) + 8 w1``
    (``FOLD``: ``1024 + delta``, the minima left out)."""
    if VAR:
        v = _var_values(w_ptr, off_ptr, m_ptr, step)
    elif FOLD:
        LW: gl.constexpr = gl.BlockedLayout([1, 4], [32, 1], [1, 1], [1, 0])
        lane = gl.arange(0, 32, gl.SliceLayout(1, LW))
        wi = gl.arange(0, 4, gl.SliceLayout(0, LW))
        x = gl.load(w_ptr + (step * 32 + gl.expand_dims(lane, 1)) * 4 + gl.expand_dims(wi, 0)).to(gl.uint32,
                                                                                                    bitcast=True)
        v = _values_raw(gl.reshape(x, (8, 4, 2, 2)))
    else:
        x, mp = _words(w_ptr, m_ptr, step)
        v = _values(x, mp)
    v = gl.permute(v, (3, 7, 6, 5, 1, 4, 2, 0))
    return gl.convert_layout(gl.reshape(v, (128, 16)), LB)


@gluon.jit
def _k_minima(m_ptr, step, LB: gl.constexpr):
    """``FOLD``: a step's K minima as a B operand ``[16, 16]``: row ``2 (lane & 3) + w0`` (the word's channel
    group; rows 8-15 zero), column its token ``(lane >> 2) + 8 w1``."""
    LW: gl.constexpr = gl.BlockedLayout([1, 4], [32, 1], [1, 1], [1, 0])
    lane = gl.arange(0, 32, gl.SliceLayout(1, LW))
    wi = gl.arange(0, 4, gl.SliceLayout(0, LW))
    meta = gl.load(m_ptr + step * 32 + lane).to(gl.uint32, bitcast=True)
    mn = ((gl.expand_dims(meta, 1) >> gl.expand_dims(wi.to(gl.uint32) * 8, 0)) & 0xF).to(gl.float16)
    mn = gl.reshape(mn, (8, 4, 2, 2))
    mn = gl.permute(gl.join(mn, mn * 0.0), (4, 1, 3, 2, 0))
    return gl.convert_layout(gl.reshape(mn, (16, 16)), LB)


@gluon.jit
def _group_sums(q, LA: gl.constexpr):
    """``FOLD``: the queries summed over each word's 16 channels, ``[16, 16]`` (columns 8-15 zero), an A operand."""
    g = gl.sum(gl.sum(gl.reshape(q, (16, 2, 8, 4, 2)), 4), 2)  # [16, w0, lane & 3]
    g = gl.reshape(gl.permute(g, (0, 2, 1)), (16, 8))
    g = gl.reshape(gl.permute(gl.join(g, g * 0.0), (0, 2, 1)), (16, 16))
    return gl.convert_layout(g.to(gl.float16), LA)


@gluon.jit
def _v_operand(w_ptr, m_ptr, step, LB: gl.constexpr, VAR: gl.constexpr, off_ptr):
    """V of a step, ``[16, D]``: token ``half + 2 (lane & 3) + 8 j0``, channel ``(lane >> 2) + 8 j1 + 16 j2 + 32 w0
    + 64 w1``."""
    if VAR:
        v = _var_values(w_ptr, off_ptr, m_ptr, step)
    else:
        x, mp = _words(w_ptr, m_ptr, step)
        v = _values(x, mp)
    v = gl.permute(v, (5, 1, 4, 2, 3, 7, 6, 0))
    return gl.convert_layout(gl.reshape(v, (16, 128)), LB)


@gluon.jit
def _scores(qa, qg, qsum, kw, km, ks_ptr, kz_ptr, s, t, LB: gl.constexpr, mma: gl.constexpr, FOLD: gl.constexpr,
            VAR: gl.constexpr, ko):  # fmt: skip
    """Scores of step ``s`` (tokens ``t``), log2 units: K's per-token zero and scale applied to the product
    (``FOLD``: the minima as a second product ``qg @ minima``, and 1024 less per value in the zero)."""
    sc = mma_v2(qa, _k_operand(kw, km, s, LB, FOLD, VAR, ko), gl.zeros([16, 16], gl.float32, mma))
    ks = gl.load(ks_ptr + t).to(gl.float32)
    kz = gl.load(kz_ptr + t).to(gl.float32)
    if FOLD:
        sc = mma_v2(qg, _k_minima(km, s, LB), sc)
        kz = kz - 1024.0
    return (sc + gl.expand_dims(qsum, 1) * gl.expand_dims(kz, 0)) * gl.expand_dims(ks, 0)


@gluon.jit
def _pv(o, z, p, vw, vm, vs_ptr, vz_ptr, s, t, LA: gl.constexpr, LB: gl.constexpr, VAR: gl.constexpr, vo):
    """``O += P V`` for step ``s``: V's per-token scale folded into P, its zeros summed apart (``z``)."""
    p = p * gl.expand_dims(gl.load(vs_ptr + t).to(gl.float32), 0)
    z = z + gl.sum(p * gl.expand_dims(gl.load(vz_ptr + t).to(gl.float32), 0), 1)
    return mma_v2(gl.convert_layout(p.to(gl.float16), LA), _v_operand(vw, vm, s, LB, VAR, vo), o), z


@gluon.jit
def register_path_kernel(q_ptr, kw_ptr, km_ptr, vw_ptr, vm_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, ko_ptr, vo_ptr,
                         acc_ptr, m_ptr, l_ptr, steps, per_split, NS, qk_scale, R: gl.constexpr, D: gl.constexpr,
                         TURN: gl.constexpr, FOLD: gl.constexpr, LAZY: gl.constexpr, VAR: gl.constexpr):  # fmt: skip
    """One warp: the partials of KV head ``pid // NS`` over steps ``[split * per_split, ...)``, ``TURN`` steps (2:
    32 tokens, 4: 64) per softmax update (the host makes ``per_split`` a multiple of ``TURN``)."""
    pid = gl.program_id(0)
    bh = pid // NS
    lo = (pid % NS) * per_split
    hi = gl.minimum(lo + per_split, steps)
    gl.static_assert(not (VAR and FOLD), "VAR packs keep their minima in the decode")
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    LA: gl.constexpr = gl.DotOperandLayout(0, mma, 2)
    LB: gl.constexpr = gl.DotOperandLayout(1, mma, 2)
    ROW: gl.constexpr = gl.SliceLayout(1, mma)
    COL: gl.constexpr = gl.SliceLayout(0, mma)
    rq = gl.arange(0, 16, gl.SliceLayout(1, LA))
    cq = gl.arange(0, D, gl.SliceLayout(0, LA))
    q = gl.load(q_ptr + (bh * R + gl.expand_dims(rq, 1)) * D + gl.expand_dims(cq, 0), mask=gl.expand_dims(rq < R, 1),
                other=0.0).to(gl.float32) * qk_scale  # fmt: skip
    qa = q.to(gl.float16)
    qsum = gl.convert_layout(gl.sum(qa.to(gl.float32), 1), ROW)
    qg = qa
    if FOLD:
        qg = _group_sums(qa.to(gl.float32), LA)
    m_i = gl.full([16], -1.0e30, gl.float32, ROW)
    l_i = gl.zeros([16], gl.float32, ROW)
    z_i = gl.zeros([16], gl.float32, ROW)
    o = gl.zeros([16, D], gl.float32, mma)
    kw = kw_ptr + bh * steps * (32 * 4)
    vw = vw_ptr + bh * steps * (32 * 4)
    if VAR:  # one pool per stream, each step's payload at its offset
        kw = kw_ptr
        vw = vw_ptr
    ko = ko_ptr + bh * steps
    vo = vo_ptr + bh * steps
    km = km_ptr + bh * steps * 32
    vm = vm_ptr + bh * steps * 32
    tok = gl.arange(0, 16, COL)
    for s in range(lo, hi, TURN):
        t = bh * steps * 16 + s * 16 + tok
        s0 = _scores(qa, qg, qsum, kw, km, ks_ptr, kz_ptr, s, t, LB, mma, FOLD, VAR, ko)
        s1 = _scores(qa, qg, qsum, kw, km, ks_ptr, kz_ptr, s + 1, t + 16, LB, mma, FOLD, VAR, ko)
        top = gl.maximum(gl.max(s0, 1), gl.max(s1, 1))
        if TURN == 4:
            s2 = _scores(qa, qg, qsum, kw, km, ks_ptr, kz_ptr, s + 2, t + 32, LB, mma, FOLD, VAR, ko)
            s3 = _scores(qa, qg, qsum, kw, km, ks_ptr, kz_ptr, s + 3, t + 48, LB, mma, FOLD, VAR, ko)
            top = gl.maximum(top, gl.maximum(gl.max(s2, 1), gl.max(s3, 1)))
        m_new = gl.maximum(m_i, top)
        alpha = gl.exp2(m_i - m_new)
        p0 = gl.exp2(s0 - gl.expand_dims(m_new, 1))
        p1 = gl.exp2(s1 - gl.expand_dims(m_new, 1))
        l_i = l_i * alpha + gl.sum(p0, 1) + gl.sum(p1, 1)
        if LAZY:  # rescale only when a row's maximum rose (alpha is exactly 1 in every row otherwise)
            if gl.max(m_new - m_i, 0) > 0:
                o = o * gl.expand_dims(alpha, 1)
                z_i = z_i * alpha
        else:
            o = o * gl.expand_dims(alpha, 1)
            z_i = z_i * alpha
        o, z_i = _pv(o, z_i, p0, vw, vm, vs_ptr, vz_ptr, s, t, LA, LB, VAR, vo)
        o, z_i = _pv(o, z_i, p1, vw, vm, vs_ptr, vz_ptr, s + 1, t + 16, LA, LB, VAR, vo)
        if TURN == 4:
            p2 = gl.exp2(s2 - gl.expand_dims(m_new, 1))
            p3 = gl.exp2(s3 - gl.expand_dims(m_new, 1))
            l_i = l_i + gl.sum(p2, 1) + gl.sum(p3, 1)
            o, z_i = _pv(o, z_i, p2, vw, vm, vs_ptr, vz_ptr, s + 2, t + 32, LA, LB, VAR, vo)
            o, z_i = _pv(o, z_i, p3, vw, vm, vs_ptr, vz_ptr, s + 3, t + 48, LA, LB, VAR, vo)
        m_i = m_new
    o = o + gl.expand_dims(z_i, 1)  # V's zeros: sum_t p_t scale_t zero_t, the same in every channel
    ro = gl.arange(0, 16, ROW)
    co = gl.arange(0, D, COL)
    keep = ro < R
    part = (bh * NS + pid % NS) * R
    gl.store(acc_ptr + (part + gl.expand_dims(ro, 1)) * D + gl.expand_dims(co, 0), o, mask=gl.expand_dims(keep, 1))
    gl.store(m_ptr + part + ro, m_i, mask=keep)
    gl.store(l_ptr + part + ro, l_i, mask=keep)


# ----------------------------------------------------------------------------------------------------------------
# The format in torch (the reference), and the data.


def _lane_values(words: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """``words [..., 32, 4]`` int32 and ``meta [..., 32]`` -> ``[..., 8, 4, 2, 2, 2 (half), 2, 2, 2 (j)]`` values
    as the kernel's ``_values`` lays them out (``min + delta``)."""
    w = words.long() & 0xFFFFFFFF
    half = torch.arange(2, device=words.device)
    j = torch.arange(8, device=words.device)
    sh = (16 * half[:, None] + 2 * j[None, :]).view(2, 2, 2, 2).permute(0, 3, 2, 1)  # [half, j0, j1, j2]
    vals = (w[..., None, None, None, None] >> sh) & 3
    mn = (meta.long()[..., None] >> (8 * torch.arange(4, device=words.device))) & 0xF  # [..., 32, 4]
    vals = vals + mn[..., None, None, None, None]
    return vals.reshape(*words.shape[:-2], 8, 4, 2, 2, 2, 2, 2, 2)


def _var_lane_values(pool: torch.Tensor, off: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """``VAR``'s format: ``pool`` int32 words, ``off [...]`` each step's first word, ``meta [..., 32]`` -> values
    as ``_var_values`` lays them out."""
    dev = pool.device
    f = (meta.long()[..., None] >> (8 * torch.arange(4, device=dev))) & 0xFF  # [..., 32, 4]
    w, mn = (f >> 4) & 7, f & 0xF
    size = 16 * w
    tot = size.sum(-1)
    start = (32 * off.long()[..., None, None] + (tot.cumsum(-1) - tot)[..., None] + size.cumsum(-1) - size)
    k = torch.arange(16, device=dev)
    bit = start[..., None] + 8 * w[..., None] * (k // 8) + w[..., None] * (k % 8)  # [..., 32, 4, 16]
    words = pool.long() & 0xFFFFFFFF
    both = words[bit >> 5] | (words[(bit >> 5) + 1] << 32)
    vals = ((both >> (bit & 31)) & ((1 << w[..., None]) - 1)) + mn[..., None]
    # value k = 8 window + 4 half + j0 + 2 j1 -> [..., half, j0, j1, j2 = window]
    vals = vals.view(*vals.shape[:-1], 2, 2, 2, 2).permute(*range(vals.dim() - 1), -3, -1, -2, -4)
    return vals.reshape(*meta.shape[:-1], 8, 4, 2, 2, 2, 2, 2, 2)


def decode(data: dict, part: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer K and V ``[BH, steps * 16, D]`` of the synthetic format (KV heads ``part``)."""
    if "ko" in data:  # VAR
        kl = _var_lane_values(data["kw"], data["ko"][part], data["km"][part])
        vl = _var_lane_values(data["vw"], data["vo"][part], data["vm"][part])
    else:
        kl = _lane_values(data["kw"][part], data["km"][part])
        vl = _lane_values(data["vw"][part], data["vm"][part])
    bh, steps = kl.shape[:2]
    kt = kl.permute(0, 1, 5, 9, 8, 7, 3, 6, 4, 2).reshape(bh, steps, 128, 16)
    v = vl.permute(0, 1, 7, 3, 6, 4, 5, 9, 8, 2).reshape(bh, steps, 16, 128)
    return kt.transpose(-1, -2).reshape(bh, steps * 16, 128), v.reshape(bh, steps * 16, 128)


# Widths of the VAR packs, as real K/V's packs of this shape have them (SmolLM2 K/V tiled to 8B shapes, Hadamard,
# k_rel 0.1 / v_rel 0.2; NOTES 2026-12-08): K's packs (one token, 16 channels) 0-4 bits, V's (one channel, 16 tokens)
# 0-3.
K_WIDTHS = (0.001, 0.001, 0.178, 0.735, 0.085)
V_WIDTHS = (0.200, 0.245, 0.528, 0.027, 0.0)


def make_data(bh: int, steps: int, var: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random payload words and minima below 16 (values stay under 2^11: exact in fp16), bf16 scales, int16 zeros;
    ``var``: widths drawn from ``K_WIDTHS`` / ``V_WIDTHS``, each step's payload at its offset in one pool."""
    g = torch.Generator().manual_seed(seed)

    def stream(widths):
        mins = torch.randint(0, 16, (bh, steps, 32, 4), generator=g)
        w = torch.multinomial(torch.tensor(widths), bh * steps * 128, True, generator=g).view(bh, steps, 32, 4) if var \
            else torch.zeros_like(mins)  # fmt: skip
        meta = ((mins | (w << 4)) << (8 * torch.arange(4))).sum(-1).to(torch.int32)
        if not var:
            return dict(w=torch.randint(-2**31, 2**31, (bh, steps, 32, 4), generator=g).to(torch.int32), m=meta)
        words = (16 * w.sum((-2, -1)) + 31) // 32  # per step
        off = (words.flatten().cumsum(0) - words.flatten()).view(bh, steps).to(torch.int32)
        total = int(words.sum()) + 2  # two spare words: a pack's three-word read stays inside
        return dict(w=torch.randint(-2**31, 2**31, (total,), generator=g).to(torch.int32), m=meta, o=off)

    k, v = stream(K_WIDTHS), stream(V_WIDTHS)
    n = bh * steps * 16
    data = dict(kw=k["w"], km=k["m"], vw=v["w"], vm=v["m"],
                ks=(torch.rand(n, generator=g) * 0.2 + 0.05).to(torch.bfloat16),
                kz=torch.randint(-8, 1, (n,), generator=g).to(torch.int16),
                vs=(torch.rand(n, generator=g) * 0.2 + 0.05).to(torch.bfloat16),
                vz=torch.randint(-4, 1, (n,), generator=g).to(torch.int16))
    if var:
        data |= dict(ko=k["o"], vo=v["o"])
    return data


def bits_per_value(data: dict) -> float:
    """Payload, metadata, scales and zeros read per K/V value."""
    values = 2 * data["ks"].numel() * D
    return 8 * sum(t.numel() * t.element_size() for t in data.values()) / values


def reference(q: torch.Tensor, data: dict, scale: float, chunk: int = 4) -> torch.Tensor:
    """fp32 attention of ``q [BH, R, D]`` over the decoded cache (``chunk`` KV heads at a time)."""
    outs = []
    n = data["km"].shape[1] * STEP
    for i in range(0, q.shape[0], chunk):
        part = slice(i, i + chunk)
        k, v = decode(data, part)
        toks = slice(i * n, (i + k.shape[0]) * n)
        k = (k.float() + data["kz"][toks].float().view(-1, n, 1)) * data["ks"][toks].float().view(-1, n, 1)
        v = (v.float() + data["vz"][toks].float().view(-1, n, 1)) * data["vs"][toks].float().view(-1, n, 1)
        outs.append(torch.softmax(q[part].float() @ k.transpose(-1, -2) * scale, -1) @ v)
    return torch.cat(outs)


def _f16(bits: torch.Tensor) -> torch.Tensor:
    return (bits & 0xFFFF).to(torch.int32).to(torch.int16).view(torch.float16).float()


def _pair_twin(x, sh, mn, add: bool = True):
    """The torch twin of ``_pair`` (``add``) and ``_pair_raw`` for ``gluon_eager``: pairs are two consecutive
    elements of the last axis."""
    r = ((x >> sh) & 0x00030003) | 0x64006400
    lo, hi = _f16(r).half(), _f16(r >> 16).half()
    if add:
        lo, hi = lo + _f16(mn).half(), hi + _f16(mn >> 16).half()
    return torch.where(torch.arange(x.shape[-1]) % 2 == 0, lo, hi)


def run_kernel(q: torch.Tensor, data: dict, scale: float, splits: int, turn: int = 2, fold: bool = False,
               lazy: bool = False) -> tuple[torch.Tensor, ...]:
    """The partials (acc ``[BH, NS, R, D]``, max and sum ``[BH, NS, R]``, log2 units) over about ``splits``
    splits per KV head; ``data`` from ``make_data`` (with ``ko``: the VAR format)."""
    bh = q.shape[0]
    steps = data["km"].shape[1]
    var = "ko" in data
    if steps % turn:
        raise ValueError(f"{steps} steps of 16 tokens: not a multiple of the turn ({turn})")
    if var and fold:
        raise ValueError("the VAR format does not fold K's minima")
    per = -(-steps // splits)
    per += -per % turn
    ns = -(-steps // per)
    acc = torch.empty(bh, ns, R, D, device=q.device, dtype=torch.float32)
    m = torch.empty(bh, ns, R, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    offs = (data["ko"], data["vo"]) if var else (data["km"], data["vm"])  # (unused without VAR)
    args = (q, data["kw"], data["km"], data["vw"], data["vm"], data["ks"], data["kz"], data["vs"], data["vz"], *offs,
            acc, m, l, steps, per, ns, scale * LOG2E)  # fmt: skip
    if q.device.type == "cpu":  # the body eagerly (gluon_eager), as the tests run it
        from packkv.ops.kernels import gluon_eager

        gluon_eager.ASM[PAIR_ASM.value] = _pair_twin
        gluon_eager.ASM[PAIR_RAW_ASM.value] = lambda x, sh: _pair_twin(x, sh, None, add=False)
        gluon_eager.run(register_path_kernel, (bh * ns, 1), *args, module=sys.modules[__name__], R=R, D=D,
                        TURN=turn, FOLD=fold, LAZY=lazy, VAR=var)  # fmt: skip
        return acc, m, l
    register_path_kernel[(bh * ns,)](*args, R, D, turn, fold, lazy, var, num_warps=1)
    return acc, m, l


def merge(acc, m, l) -> torch.Tensor:
    top = m.amax(1, keepdim=True)
    w = torch.exp2(m - top)
    return (acc * w[..., None]).sum(1) / (l * w).sum(1)[..., None]


def on_gpu(cases: list[str], out: Path | None = None) -> list[dict]:
    """Per case: the error against the torch reference, then medians of CUDA-graph replays (L2 flushed) of this
    kernel at a few split counts, of the shipped Gluon kernel's partials on a PackKV cache of random K/V of the same
    shape, and of SDPA on the bf16 cache."""
    import torch.nn.functional as F

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from kernels import bench_ms, compress, make_kv

    from packkv.ops import PackKVConfig
    from packkv.ops.kernels import gluon_attention as ga

    dev, heads, scale = "cuda", 8, 1 / math.sqrt(D)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for case in cases:
        batch, ctx = map(int, case.split("x"))
        bh, steps = batch * heads, ctx // STEP
        q = torch.randn(bh, R, D, device=dev, dtype=torch.bfloat16)
        row = dict(batch=batch, context=ctx)
        for var in (False, True):
            data = {k: t.to(dev) for k, t in make_data(bh, steps, var).items()}
            want = reference(q, data, scale)
            row[f"bits_per_value{'_var' if var else ''}"] = bits_per_value(data)
            for turn, fold, lazy, v in VARIANTS:
                if v != var:
                    continue
                name = f"turn{turn}{'_fold' if fold else ''}{'_lazy' if lazy else ''}{'_var' if var else ''}"
                per_sm = 12 if turn == 2 else 8  # one-warp programs per SM at ~168 / ~225 registers
                for waves in (0.5, 1, 2, 4):
                    ns = max(1, round(waves * sms * per_sm / bh))
                    got = merge(*run_kernel(q, data, scale, ns, turn, fold, lazy))
                    row[f"{name}_splits_{ns}_err"] = ((got - want).abs().max() / want.abs().max()).item()
                    row[f"{name}_splits_{ns}_ms"] = bench_ms(
                        lambda ns=ns, t=turn, f=fold, z=lazy, d=data: run_kernel(q, d, scale, ns, t, f, z))
            del data, want
        best = min(v for k, v in row.items() if k.endswith("_ms") and "_var_" not in k)
        best_var = min(v for k, v in row.items() if k.endswith("_ms") and "_var_" in k)
        k, v = make_kv(batch, ctx, heads, D, "random", dev)
        qs = torch.randn(batch, heads * R, 1, D, device=dev, dtype=torch.bfloat16)
        row["sdpa_ms"] = bench_ms(lambda: F.scaled_dot_product_attention(qs, k, v, enable_gqa=True))
        st, _ = compress(PackKVConfig(), k, v)
        del k, v
        ns = ga.splits_for(qs, heads, ctx, sms)
        row["shipped_partials_ms"] = bench_ms(lambda: ga.partials(
            qs, st.pool, st.k_offsets, st.v_offsets, st.k_meta, st.v_meta, st.k_scale, st.k_zero, st.v_scale,
            st.v_zero, st.ring_k, st.ring_v, st.n_blocks, st.n_win, st.perm, None, ctx, ns, scale, True,
            st.layout.k.qbits, st.layout.v.qbits))  # fmt: skip
        row["best_ms"] = best
        row["best_vs_sdpa"] = row["sdpa_ms"] / best
        row["best_var_ms"] = best_var
        row["best_var_vs_sdpa"] = row["sdpa_ms"] / best_var
        row["shipped_vs_sdpa"] = row["sdpa_ms"] / row["shipped_partials_ms"]
        rows.append(row)
        print(json.dumps({k_: round(v_, 5) if isinstance(v_, float) else v_ for k_, v_ in row.items()}), flush=True)
        if out:  # after each case: a run cut short keeps what it measured
            out.mkdir(parents=True, exist_ok=True)
            (out / "register_path.json").write_text(json.dumps(rows, indent=1))
        del st
        torch.cuda.empty_cache()
    return rows


def build() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from decode_attention_pipeline import innermost_loops
    from sass import compile_gluon, report, sass_of

    sig = {"q_ptr": "*bf16", "kw_ptr": "*i32", "km_ptr": "*i32", "vw_ptr": "*i32", "vm_ptr": "*i32", "ks_ptr": "*bf16",
           "kz_ptr": "*i16", "vs_ptr": "*bf16", "vz_ptr": "*i16", "ko_ptr": "*i32", "vo_ptr": "*i32",
           "acc_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "steps": "i32", "per_split": "i32", "NS": "i32",
           "qk_scale": "fp32", "R": "constexpr", "D": "constexpr", "TURN": "constexpr", "FOLD": "constexpr",
           "LAZY": "constexpr", "VAR": "constexpr"}  # fmt: skip
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(sig) if name.endswith("_ptr") or name == "steps"}
    for turn, fold, lazy, var in VARIANTS:
        ck = compile_gluon(register_path_kernel, sig, {"R": R, "D": D, "TURN": turn, "FOLD": fold, "LAZY": lazy,
                                                      "VAR": var}, aligned, num_warps=1)  # fmt: skip
        report(f"register_path_kernel, {16 * turn}-token turns{', K minima folded' if fold else ''}"
               f"{', lazy rescale' if lazy else ''}{', packs of varying width (VAR)' if var else ''}", ck,
               ("HMMA", "LDG", "STS", "LDS", "SHFL", "LOP3", "SHF", "HADD2", "MUFU", "LDL", "STL"))  # fmt: skip
        n, top = innermost_loops(sass_of(ck), "HMMA")[0]
        values = 2 * turn * STEP * D // 32  # per thread and turn: K and V
        print(f"   loop: {n} instructions per turn and warp ({n / values:.2f} per value and thread; the shipped "
              f"kernel ~6): {top}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--device", choices=("cpu",), default=None, help="dry run on the CPU (the body eagerly)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--cases", nargs="+", default=["8x32768", "1x131072", "8x131072"], help="BATCHxCONTEXT")
    args = p.parse_args(argv)
    if args.device == "cpu":  # dry run: the body eagerly on a tiny cache, each variant against the reference
        for turn, fold, lazy, var in VARIANTS:
            data = make_data(2, 8, var, seed=1)
            q = torch.randn(2, R, D, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
            want = reference(q, data, 1 / math.sqrt(D))
            got = merge(*run_kernel(q, data, 1 / math.sqrt(D), 3, turn, fold, lazy))
            err = ((got - want).abs().max() / want.abs().max()).item()
            print(json.dumps(dict(turn=turn, fold=fold, lazy=lazy, var=var, err=err)), flush=True)
        return 0
    if not args.gpu:
        build()
        return 0
    on_gpu(args.cases, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
