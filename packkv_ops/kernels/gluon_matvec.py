"""The paper's kernel pair (decompress + mat-vec on packed blocks, the benchmark protocol of issue 4) as
warp-specialized Gluon kernels for sm_90: ``matvec``'s windows pair decoded as ``gluon_attention`` decodes.
Twins: ``matvec.reference_k_matvec`` / ``reference_v_matvec``; CPU check: the body run eagerly (``gluon_eager``,
``tests/test_gluon_matvec.py``).

Why: on the H100 the Triton windows pair is 1.22-1.39x ``torch.matmul``'s GEMV for K and 0.90-1.57x for V
(2026-12-07e), while the Gluon attention kernel decodes both streams and runs the softmax in less time than the
Triton K mat-vec alone (0.188 vs 0.157 + 0.207 ms at B8/32K). Here two decoding warpgroups decode *one* stream's
64-token blocks into shared-memory stages (``gluon_attention``'s producer minus the other stream: one prefix scan,
one set of pack gathers) and a 4-warp consumer multiplies each tile on tensor cores:

* K: ``S = K q^T`` with the normalized query's fp16 high and low halves as the wgmma's first two columns (exact for
  a bf16 query, ~22 bits of an fp32 one), then ``s (raw + z sum(q)) / inv`` per token;
* V: ``O^T += V^T U`` with ``u = w s`` (the weights times the token scales) as two fp16 columns (high, low),
  normalized by a running power of two (the accumulator rescaled exactly when it grows), plus ``sum u z``.

What it decodes is what the attention kernel decodes (``supported``); ``matvec`` takes the Triton pair elsewhere.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from ..layout import Layout
from .gluon_attention import (
    PRODUCER_REGS,
    SMEM_PER_SM,
    T_BLOCK,
    _stage_cols,
    _stream_producer,
    maxnreg,
    stage_channel,
)
from .matvec import check_matvec_input

COLS, STAGES = 8, 2  # COLS: the wgmma's N (two used: the operand's fp16 high and low halves)
# (The low half goes in scaled by 2^22, exact, so that it stays a normal fp16 where the high half is small or an
# fp16 subnormal: each element keeps ~22 bits, or an absolute 2^-36 of the largest. Unscaled, the low half of an
# element below ~2^-13 of the largest was a subnormal and lost its bits; the first run on the H200 (2026-12-07i) had
# 2.3e-4 relative error against the per-value pair at B8/128K, from V's weights.)
# Launch options, timed on an H100 (2026-12-07i, ``scripts/gluon_sm90/packed_matvec.py --gpu``, paper setting, real
# K/V structure; K / V ms at head_dim 128 B8/32K and B1/128K): the first build (none of them) 0.128 / 0.151 and
# 0.068 / 0.081; PREFETCH 0.107 / 0.149 and 0.059 / 0.082; PIPE 0.128 / 0.142; both 0.130 / 0.133 and 0.070 /
# 0.066; both at 56 / 64 registers **0.109 / 0.118 and 0.059 / 0.065** (the default); head_dim 64 B1/128K 0.038 /
# 0.041 against 0.044 / 0.057.
# PREFETCH: the producers' software pipeline over the blocks (``gluon_attention._stream_producer``); one stream's registers leave room for
# it, which the attention's two streams did not (``gluon_attention.PREFETCH``).
PREFETCH = int(os.environ.get("PACKKV_GLUON_MATVEC_PREFETCH", "1"))
# PIPE: the consumers' products pipelined one block deep (``_k_consumer`` / ``_v_consumer``).
PIPE = int(os.environ.get("PACKKV_GLUON_MATVEC_PIPE", "1"))
# The register cap per thread of a launch and the decoding warps' share of the pool (setmaxnreg) up to head_dim 128:
# one stream's decode fits in 56 / 64 (no spill in the sm_90 build) and an SM then holds 3 programs at head_dim 128
# instead of 2 (4 at 64). At 256 the attention's 96 / 88 (56 spills there). 0: the attention's everywhere.
MAXNREG = int(os.environ.get("PACKKV_GLUON_MATVEC_MAXNREG", "56"))
# V's products summed in registers every BLOCK_SUMS blocks (``_v_consumer``; 0: one chain per split). Opt-in: timed on
# an H100 (2026-12-07k, gluon_matvec_settings_h100_2026-12-07k.log) 16 costs V +4-8 % and 1 +9-14 % for an error
# that is already below bf16's (B8/128K: 1.4e-4 -> 1.6e-6 at 16, 6.6e-7 at 1). 1 (2026-12-07i): each block's product from zero; its sm_90 build at head_dim 128 spills 52 bytes
# (the consumer's 40 registers of 56 / 64) and the producer loop grows 308 -> 317. G > 1 (2026-12-07j): the products
# chained on the accumulator for G blocks, each group's sum added in registers and the next chain restarted over it
# (``use_acc`` off): one accumulator more than the chain, no spill at 128 / 64 / 256, the producer loop as the chain's
# (308), the consumer's +8 adds and a wait once per group. At 16 the truncating adds per output fall from ~4 per
# block of the split (B8/128K: ~1,360) to 64 per group plus one rounding per group.
BLOCK_SUMS = int(os.environ.get("PACKKV_GLUON_MATVEC_BLOCK_SUMS", "0"))
PRODUCER_REGS_MV = int(os.environ.get("PACKKV_GLUON_MATVEC_PRODUCER_REGS", "64"))


@gluon.jit
def _pow2_inv(amax):
    """``2^-k`` with ``amax < 2^(k - 1)`` (``attention._pow2_normalizer``): scaling by it is exact."""
    e = gl.minimum(amax.to(gl.int32, bitcast=True) & 0x7F800000, 252 << 23)
    return (0x7E800000 - e).to(gl.float32, bitcast=True)


@gluon.jit
def _halves(x, R: gl.constexpr):
    """``[M, R]`` products of the fp16 high half (column 0) and the low half scaled by 2^22 (column 1) summed."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                  instr_shape=[16, R, 16])  # fmt: skip
    c = gl.expand_dims(gl.arange(0, R, gl.SliceLayout(0, mma)), 0)
    return gl.sum(gl.where(c == 1, x * (1.0 / 4194304.0), x), axis=1)


@gluon.jit
def _k_out(raw, i, scale_ptr, zero_ptr, out_ptr, qsum, inv, head, b, lo, NB, lane_tok, T: gl.constexpr,
           R: gl.constexpr):  # fmt: skip
    """Block ``i``'s scores from its product: the halves' columns summed, then ``s (q.Q + z sum q)``."""
    tok = (b * NB + lo + i) * T + lane_tok
    sc = gl.load(scale_ptr + tok).to(gl.float32)
    z = gl.load(zero_ptr + tok).to(gl.float32)
    gl.store(out_ptr + (head * NB + lo + i) * T + lane_tok, (_halves(raw, R) + z * qsum) * sc / inv)


@gluon.jit
def _k_consumer(q_s, qsum, inv, bufs, ready, empty, scale_ptr, zero_ptr, out_ptr, head, b, lo, hi, NB,
                T: gl.constexpr, R: gl.constexpr, STAGES: gl.constexpr, PIPE: gl.constexpr):  # fmt: skip
    """``PIPE``: block ``i``'s product is issued before block ``i - 1``'s scores are computed and stored (the
    product's latency off the chain); else each block's product is waited for before its scores."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                  instr_shape=[16, R, 16])  # fmt: skip
    toks: gl.constexpr = gl.SliceLayout(1, mma)
    i_t = gl.arange(0, T, toks)
    k8 = i_t % 8
    lane_tok = i_t - k8 + (k8 & 1) * 4 + (k8 >> 1)  # the stage's rows are in lane order
    zero = gl.zeros([T, R], gl.float32, mma)
    prev = zero
    n = hi - lo
    for i in range(0, n):
        s = i % STAGES
        mbarrier.wait(ready.index(s), phase=(i // STAGES) & 1)
        acc = warpgroup_mma(bufs.index(s).permute([1, 0]), q_s.permute([1, 0]), zero, use_acc=False, is_async=True)
        if PIPE:  # one wait: block i - 1's product done, block i's left in flight (its registers not read)
            raw, prev = warpgroup_mma_wait(num_outstanding=1, deps=(prev, acc))
            if i > 0:
                mbarrier.arrive(empty.index((i - 1) % STAGES), count=1)
                _k_out(raw, i - 1, scale_ptr, zero_ptr, out_ptr, qsum, inv, head, b, lo, NB, lane_tok, T, R)
        else:
            raw = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(empty.index(s), count=1)
            _k_out(raw, i, scale_ptr, zero_ptr, out_ptr, qsum, inv, head, b, lo, NB, lane_tok, T, R)
    if PIPE:
        if n > 0:
            raw = warpgroup_mma_wait(num_outstanding=0, deps=(prev,))
            mbarrier.arrive(empty.index((n - 1) % STAGES), count=1)
            _k_out(raw, n - 1, scale_ptr, zero_ptr, out_ptr, qsum, inv, head, b, lo, NB, lane_tok, T, R)


@gluon.jit
def _v_weights(i, w_ptr, scale_ptr, zero_ptr, head, b, lo, NB, n_blocks, lane_tok, T: gl.constexpr):
    """Block ``i``'s ``u = w s`` and ``u z`` per token (rows in lane order)."""
    tok = (b * NB + lo + i) * T + lane_tok
    u = gl.load(w_ptr + (head * n_blocks + lo + i) * T + lane_tok).to(gl.float32) * gl.load(scale_ptr + tok).to(
        gl.float32)  # fmt: skip
    return u, u * gl.load(zero_ptr + tok).to(gl.float32)


@gluon.jit
def _v_consumer(u_s, bufs, ready, empty, scale_ptr, zero_ptr, w_ptr, part_ptr, head, split, b, lo, hi, NB, n_blocks,
                T: gl.constexpr, D: gl.constexpr, R: gl.constexpr, STAGES: gl.constexpr, PIPE: gl.constexpr,
                BLOCK_SUMS: gl.constexpr):  # fmt: skip
    """``PIPE``: one normalizer for the split (its largest ``|u|``, from a first pass over the weights and scales),
    two buffers for ``U`` and the products chained on the accumulator, each waited for one block later; else a
    running normalizer (the accumulator rescaled when it grows) and each product waited for before the next.
    ``BLOCK_SUMS``: each block's product (1) or each group of ``BLOCK_SUMS`` blocks' chained products from a zero
    accumulator, added to the sum in registers (rounded to nearest), instead of chaining all the products on one
    wgmma accumulator, whose fp32 adds truncate: biased, so the error grows with the blocks of a split (1.4e-4 of the
    largest output at B8/128K on the H100, 2026-12-07i)."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                  instr_shape=[16, R, 16])  # fmt: skip
    toks: gl.constexpr = gl.SliceLayout(1, mma)
    cols: gl.constexpr = gl.SliceLayout(0, mma)
    i_t = gl.arange(0, T, toks)
    k8 = i_t % 8
    lane_tok = i_t - k8 + (k8 & 1) * 4 + (k8 >> 1)
    col = gl.expand_dims(gl.arange(0, R, cols), 0)
    o_t = gl.zeros([D, R], gl.float32, mma)
    o_c = gl.zeros([D, R], gl.float32, mma)  # BLOCK_SUMS > 1: the current group's chain
    zero = gl.zeros([D, R], gl.float32, mma)
    prev = zero
    zsum = gl.zeros([T], gl.float32, toks)
    n = hi - lo
    if PIPE:
        big = zsum
        for i in range(0, n):
            u, uz = _v_weights(i, w_ptr, scale_ptr, zero_ptr, head, b, lo, NB, n_blocks, lane_tok, T)
            big = gl.maximum(big, gl.maximum(u, -u))
        inv = _pow2_inv(gl.max(big, axis=0))
        for i in range(0, n):
            s = i % STAGES
            u, uz = _v_weights(i, w_ptr, scale_ptr, zero_ptr, head, b, lo, NB, n_blocks, lane_tok, T)
            zsum = zsum + uz
            un = gl.expand_dims(u * inv, 1)
            u_hi = un.to(gl.float16).to(gl.float32)
            ub = u_s.index(i % 2)  # read by block i - 2's product, which was waited for at block i - 1
            ub.store(gl.where(col == 0, u_hi, gl.where(col == 1, (un - u_hi) * 4194304.0, 0.0)).to(gl.float16))
            fence_async_shared()
            gl.thread_barrier()
            mbarrier.wait(ready.index(s), phase=(i // STAGES) & 1)
            if BLOCK_SUMS == 1:  # block i's product from zero, block i - 1's (done) added in registers
                acc = warpgroup_mma(bufs.index(s), ub, zero, use_acc=False, is_async=True)
                blk, prev = warpgroup_mma_wait(num_outstanding=1, deps=(prev, acc))
                o_t = o_t + blk
            elif BLOCK_SUMS:  # a group's chain (done) added in registers, the next group's chain started over it
                if i % BLOCK_SUMS == 0:
                    o_c = warpgroup_mma_wait(num_outstanding=0, deps=(o_c,))
                    o_t = o_t + o_c
                o_c = warpgroup_mma(bufs.index(s), ub, o_c, use_acc=i % BLOCK_SUMS != 0, is_async=True)
                o_c = warpgroup_mma_wait(num_outstanding=1, deps=(o_c,))
            else:
                o_t = warpgroup_mma(bufs.index(s), ub, o_t, is_async=True)
                o_t = warpgroup_mma_wait(num_outstanding=1, deps=(o_t,))
            if i > 0:
                mbarrier.arrive(empty.index((i - 1) % STAGES), count=1)
        if BLOCK_SUMS == 1:
            o_t = o_t + warpgroup_mma_wait(num_outstanding=0, deps=(prev,))
        elif BLOCK_SUMS:
            o_t = o_t + warpgroup_mma_wait(num_outstanding=0, deps=(o_c,))
        else:
            o_t = warpgroup_mma_wait(num_outstanding=0, deps=(o_t,))
        if n > 0:
            mbarrier.arrive(empty.index((n - 1) % STAGES), count=1)
    else:
        top = gl.max(zsum, axis=0)  # the largest |u| so far (0: the normalizer is 2^-1 * 2^127)
        inv = _pow2_inv(top)
        for i in range(0, n):
            s = i % STAGES
            u, uz = _v_weights(i, w_ptr, scale_ptr, zero_ptr, head, b, lo, NB, n_blocks, lane_tok, T)
            zsum = zsum + uz
            top = gl.maximum(top, gl.max(gl.maximum(u, -u), axis=0))
            inv_new = _pow2_inv(top)
            o_t = o_t * (inv_new / inv)  # a power of two <= 1: exact
            if BLOCK_SUMS > 1:
                o_c = o_c * (inv_new / inv)
            inv = inv_new
            un = gl.expand_dims(u * inv, 1)
            u_hi = un.to(gl.float16).to(gl.float32)
            ub = u_s.index(0)
            ub.store(gl.where(col == 0, u_hi, gl.where(col == 1, (un - u_hi) * 4194304.0, 0.0)).to(gl.float16))
            fence_async_shared()
            gl.thread_barrier()
            mbarrier.wait(ready.index(s), phase=(i // STAGES) & 1)
            if BLOCK_SUMS == 1:
                acc = warpgroup_mma(bufs.index(s), ub, zero, use_acc=False, is_async=True)
                o_t = o_t + warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            elif BLOCK_SUMS:
                if i % BLOCK_SUMS == 0:
                    o_t = o_t + o_c
                acc = warpgroup_mma(bufs.index(s), ub, o_c, use_acc=i % BLOCK_SUMS != 0, is_async=True)
                o_c = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            else:
                acc = warpgroup_mma(bufs.index(s), ub, o_t, is_async=True)
                o_t = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(empty.index(s), count=1)
        if BLOCK_SUMS > 1:
            o_t = o_t + o_c
    cd = gl.arange(0, D, gl.SliceLayout(1, mma))
    y = _halves(o_t, R) / inv + gl.sum(zsum, axis=0)
    gl.store(part_ptr + (head * gl.num_programs(1) + split) * D + stage_channel(cd, D), y)


@gluon.jit
def matvec_kernel(x_ptr, out_ptr, pool_ptr, meta_ptr, off_ptr, scale_ptr, zero_ptr, NB, H, n_blocks,
                  T: gl.constexpr, D: gl.constexpr, R: gl.constexpr, STAGES: gl.constexpr, QBITS: gl.constexpr,
                  PRODUCER_REGS: gl.constexpr, IS_K: gl.constexpr, PREFETCH: gl.constexpr = 0,
                  PIPE: gl.constexpr = 0, BLOCK_SUMS: gl.constexpr = 0):  # fmt: skip
    """Program (sequence x KV head, split) over the split's share of the first ``n_blocks`` compressed blocks of one
    stream. K (``IS_K``): ``x_ptr`` the queries ``[B, H, D]``, ``out_ptr`` the scores ``[B, H, NB * T]`` (storage
    order). V: ``x_ptr`` the weights ``[B, H, n_blocks * T]`` (storage order), ``out_ptr`` the splits' partial
    sums ``[B, H, NS, D]``."""
    head = gl.program_id(0)
    split = gl.program_id(1)
    b = head // H
    kvh = head % H
    per = gl.cdiv(n_blocks, gl.num_programs(1))
    lo = gl.minimum(split * per, n_blocks)
    hi = gl.minimum(lo + per, n_blocks)
    stage: gl.constexpr = gl.NVMMASharedLayout.get_default_for([D, T], gl.float16)
    bufs = gl.allocate_shared_memory(gl.float16, [STAGES, D, T], stage)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    if IS_K:
        # The query, pow2-normalized, as rows 0 (fp16 high half) and 1 (low half) of the [R, D] operand.
        ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [gl.num_warps(), 1], [1, 0])
        r = gl.expand_dims(gl.arange(0, R, gl.SliceLayout(1, ld)), 1)
        c = gl.expand_dims(gl.arange(0, D, gl.SliceLayout(0, ld)), 0)
        q = gl.load(x_ptr + head * D + c + r * 0, mask=r < 2, other=0.0).to(gl.float32)
        inv = _pow2_inv(gl.max(gl.max(gl.maximum(q, -q), axis=1), axis=0))
        qn = q * inv
        q_hi = qn.to(gl.float16).to(gl.float32)
        qsum = gl.sum(gl.sum(gl.where(r == 0, qn, 0.0), axis=1), axis=0)
        q = _stage_cols(gl.where(r == 0, q_hi, (qn - q_hi) * 4194304.0).to(gl.float16), R, D)
        q_s = gl.allocate_shared_memory(gl.float16, [R, D], gl.NVMMASharedLayout.get_default_for([R, D], gl.float16),
                                        value=q)  # fmt: skip
        fence_async_shared()
        gl.warp_specialize([
            (_k_consumer, (q_s, qsum, inv, bufs, ready, empty, scale_ptr, zero_ptr, out_ptr, head, b, lo, hi, NB, T, R,
                           STAGES, PIPE)),
            (_stream_producer, (pool_ptr, off_ptr, meta_ptr, pool_ptr, bufs, ready, empty, b, kvh, lo, hi, 0, 0, 0, 0,
                                NB, H, 1, T, D, STAGES, QBITS, 0, 2, PREFETCH)),
            (_stream_producer, (pool_ptr, off_ptr, meta_ptr, pool_ptr, bufs, ready, empty, b, kvh, lo, hi, 0, 0, 0, 0,
                                NB, H, 1, T, D, STAGES, QBITS, 1, 2, PREFETCH)),
        ], [D // 32, D // 32], [PRODUCER_REGS, PRODUCER_REGS])  # fmt: skip
    else:
        u_s = gl.allocate_shared_memory(gl.float16, [2, T, R], gl.NVMMASharedLayout.get_default_for([T, R], gl.float16))
        fence_async_shared()
        gl.warp_specialize([
            (_v_consumer, (u_s, bufs, ready, empty, scale_ptr, zero_ptr, x_ptr, out_ptr, head, split, b, lo, hi, NB,
                           n_blocks, T, D, R, STAGES, PIPE, BLOCK_SUMS)),
            (_stream_producer, (pool_ptr, off_ptr, meta_ptr, pool_ptr, bufs, ready, empty, b, kvh, lo, hi, 0, 0, 0, 0,
                                NB, H, 1, T, D, STAGES, QBITS, 0, 2, PREFETCH)),
            (_stream_producer, (pool_ptr, off_ptr, meta_ptr, pool_ptr, bufs, ready, empty, b, kvh, lo, hi, 0, 0, 0, 0,
                                NB, H, 1, T, D, STAGES, QBITS, 1, 2, PREFETCH)),
        ], [D // 32, D // 32], [PRODUCER_REGS, PRODUCER_REGS])  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------------------------
def supported(lay: Layout, stream: str, device: torch.device) -> str | None:
    """``None`` where these kernels decode the stream of a layer of layout ``lay`` on ``device``, else why not."""
    s = getattr(lay, stream)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) != (9, 0):
        return "it needs an sm_90 GPU (Hopper)"
    if (lay.pack_size, lay.block_size) != (16, T_BLOCK):
        return f"it decodes packs of 16 in 64-token blocks, not packs of {lay.pack_size} in blocks of {lay.block_size}"
    if not 2 <= s.qbits <= 4:
        return f"it decodes 2- to 4-bit ints, not {s.qbits}-bit"
    if s.grouping:
        return "it reads token-grouped scales and zeros only"
    return None


def _regs(head_dim: int) -> tuple[int | None, int]:
    """The launch's register cap and the decoding warps' share (``MAXNREG``, ``PRODUCER_REGS_MV``)."""
    if head_dim > 128 or not MAXNREG:
        return maxnreg(head_dim), PRODUCER_REGS
    return MAXNREG, PRODUCER_REGS_MV or PRODUCER_REGS


def programs_per_sm_mv(head_dim: int) -> int:
    """Programs an SM holds: 65,536 registers over the cap of 4 + 2 x ``head_dim / 32`` warps, and the stages'
    shared memory (one stream: ``gluon_attention.programs_per_sm`` with half the stages)."""
    cap = _regs(head_dim)[0] or 255
    by_regs = 65536 // (cap * 32 * (4 + 2 * head_dim // 32))
    by_smem = SMEM_PER_SM // (STAGES * head_dim * T_BLOCK * 2 + 4096)
    return max(1, min(by_regs, by_smem))


def _splits(batch: int, heads: int, n_blocks: int, head_dim: int, device: torch.device) -> int:
    """Runs of blocks per (sequence, head): one wave of resident programs (``gluon_attention.splits_for``)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(n_blocks, programs_per_sm_mv(head_dim) * sms // (batch * heads)))


def _launch(x: Tensor, out: Tensor, st, stream: str, n_blocks: int, splits: int, is_k: bool) -> None:
    lay = st.layout
    s = getattr(lay, stream)
    args = (x, out, st.pool, getattr(st, f"{stream}_meta"), getattr(st, f"{stream}_offsets"),
            getattr(st, f"{stream}_scale"), getattr(st, f"{stream}_zero"), st.block_capacity, lay.num_heads, n_blocks)
    cap, producer_regs = _regs(lay.head_dim)
    meta = dict(T=T_BLOCK, D=lay.head_dim, R=COLS, STAGES=STAGES, QBITS=s.qbits, PRODUCER_REGS=producer_regs,
                IS_K=is_k, PREFETCH=PREFETCH, PIPE=PIPE, BLOCK_SUMS=BLOCK_SUMS)  # fmt: skip
    grid = (st.batch * lay.num_heads, splits)
    if x.device.type == "cpu":
        from . import gluon_eager, gluon_matvec

        gluon_eager.run(matvec_kernel, grid, *args, module=gluon_matvec, **meta)
    else:
        matvec_kernel[grid](*args, **meta, num_warps=4, **({"maxnreg": cap} if cap else {}))


def k_matvec(q: Tensor, st, n_blocks: int, splits: int | None = None) -> Tensor:
    """Scores ``[B, H, n_blocks * T]`` (fp32) of one query per KV head ``q[B, H, D]`` against the first
    ``n_blocks`` compressed blocks, in storage order (``matvec.k_matvec``)."""
    check_matvec_input(q, st, n_blocks, "k")
    B, H = st.batch, st.layout.num_heads
    out = torch.empty(B, H, st.block_capacity * T_BLOCK, dtype=torch.float32, device=q.device)
    if n_blocks > 0:
        ns = splits or _splits(B, H, n_blocks, st.layout.head_dim, q.device)
        _launch(q.contiguous(), out, st, "k", n_blocks, ns, True)
    return out[:, :, : n_blocks * T_BLOCK]


def v_matvec(w: Tensor, st, n_blocks: int, splits: int | None = None) -> Tensor:
    """``sum_n w[b, h, n] v_hat[b, h, n]`` over the first ``n_blocks`` compressed blocks (weights in storage order;
    missing ones count as zeros): ``[B, H, D]`` fp32 (``matvec.v_matvec``)."""
    check_matvec_input(w, st, n_blocks, "v")
    B, H, D = st.batch, st.layout.num_heads, st.layout.head_dim
    if n_blocks == 0:
        return torch.zeros(B, H, D, dtype=torch.float32, device=w.device)
    if w.shape[-1] != n_blocks * T_BLOCK:
        w = torch.nn.functional.pad(w[..., : n_blocks * T_BLOCK], (0, max(0, n_blocks * T_BLOCK - w.shape[-1])))
    ns = splits or _splits(B, H, n_blocks, D, w.device)
    part = torch.empty(B, H, ns, D, dtype=torch.float32, device=w.device)
    _launch(w.contiguous(), part, st, "v", n_blocks, ns, False)
    return part.sum(2)
