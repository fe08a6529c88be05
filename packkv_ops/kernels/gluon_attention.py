"""Fused decode attention on the packed cache as a warp-specialized Gluon kernel for sm_90 (Hopper): the attention
op's kernel for the decode steps it covers since 2026-12-06 (``attention.GLUON``; twin of ``reference.attention``;
its CPU check is ``gluon_eager``). On the H100 (2026-12-06c, one wave of programs) 0.200 ms at batch 8 / 32K and
0.108 at batch 1 / 128K: 1.46x / 1.44x the Triton kernel, 1.8x SDPA on the bf16 cache in the same run
(``benchmarks/kernels.py`` gives 2.14x / 1.85x with its own SDPA timing); a decode step's padding mask with a
left-padded sequence costs 6-8% more.

Why a second kernel: the Triton kernel (``attention.py``) decodes, multiplies and runs the softmax in the same
warps, joined by ~20 barriers per tile, and spends 8.35 thread-instructions per decoded value; Triton cannot state
the layouts that would remove its scan's and its MMA operands' moves (NOTES.md, 2026-12-05c). Here two
decoding warpgroups (``PRODUCERS``) take turns decoding 64-token blocks into shared-memory stages (each thread
owns 4 consecutive packs of a row: one warp scan for both streams' pack starts) while a 4-warp consumer runs
``S = K q^T`` and ``O^T += V^T P`` as wgmma, with the online softmax and the scales between them: 530 + 222 sm_90
instructions per compressed block and warp (consumer with the padding mask; 174 per window tile), 0.70x the Triton
kernel's 4 x 1,069.

What it decodes (``supported`` says why not, for anything else, and ``attention`` keeps the Triton kernel there):
packs of 16 in 64-token blocks, 2- to 4-bit ints in each stream (``k_rel`` / ``v_rel`` from 0.07 to 0.5: the
defaults' 4-bit K and 3-bit V), token-grouped scales and zeros, head_dim 64, 128 or 256, one query per
sequence (decode) for up to 8 query heads per KV head, bf16/fp16; the exact window, zero keys up to ``out_len``
and a decode step's bool padding mask (one row per sequence). On a Hadamard-rotated cache it rotates the query
itself (``ROTATE``: the fast Walsh-Hadamard transform in fp32, as ``hadamard.fwht_rows``); the partials go out in
the Triton kernel's layout and its ``_merge_kernel`` merges them and rotates the output back.

Its logic is checked on the CPU by running its body eagerly (``gluon_eager``; ``tests/test_gluon_attention.py``);
its compilation for sm_90 by ``tests/test_kernel_build.py``; its synchronization and speed only on the GPU
(``scripts/gluon_sm90/packed_decode_attention.py --gpu``, the ``cuda`` tests, ``benchmarks/kernels.py``).
"""

from __future__ import annotations

import math
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

LOG2E = 1.4426950408889634
T_BLOCK, ROWS, STAGES = 64, 8, 2  # ROWS: the wgmma's N (query heads)
# Every head_dim PackKV stores: 128 (Llama, Mistral, Qwen 7B+), 64 (Llama-3.2-1B, Qwen2.5-0.5B/1.5B, SmolLM2), 256
# (Gemma). Each decoding thread owns 4 packs of a pack row whatever the head_dim, so a decoding partition has D / 32
# warps (a pack row of 16 tokens per warp at 128, two at 64, half of one at 256): a program is 4 + 2 x D / 32 warps.
# H100 (2026-12-07b, ``packed_decode_attention.py --dims``, real K/V structure, B8/32K and B1/128K): head_dim 64
# (Llama-3.2-1B shapes) 0.124 / 0.067 ms against the Triton kernel's 0.201 / 0.105 (1.6x; SDPA 0.194 / 0.106), 256
# (Gemma-2-9B shapes) 0.382 / 0.201 against 0.691 / 0.351 (1.7-1.8x; SDPA 0.756 / 0.393), 128 0.192 / 0.099 against
# 0.284 / 0.146. ``PACKKV_GLUON_HEAD_DIMS`` (e.g. "128") keeps the others on the Triton kernel.
BUILT_HEAD_DIMS = (64, 128, 256)
HEAD_DIMS = tuple(int(d) for d in os.environ.get("PACKKV_GLUON_HEAD_DIMS", "64,128,256").split(",") if d.strip())
if not set(HEAD_DIMS) <= set(BUILT_HEAD_DIMS):
    raise ValueError(f"PACKKV_GLUON_HEAD_DIMS={os.environ['PACKKV_GLUON_HEAD_DIMS']!r}: the Gluon kernel is built for "
                     f"head_dim {', '.join(map(str, BUILT_HEAD_DIMS))}")
# Launch options, timed on the H100 (2026-12-05e, one decoding warpgroup: 160 producer registers -3%, one program
# per SM -25%, PREFETCH 0 -10%, 3 stages +1%). Uncapped, ptxas reserves 255 registers per thread: one program
# per SM. The default (2026-12-06, H100, scripts/gluon_sm90/packed_decode_attention.py --gpu): two decoding
# warpgroups at MAXNREG 80 (88 for the decoders, 64 left for the wgmma warpgroup), no prefetch, two programs per SM:
# 0.207 ms at B8/32K and 0.116 at B1/128K against 0.238 / 0.132 for one warpgroup at 128 registers with prefetch;
# with prefetch at 88 registers it spills (0.260), with 4 stages 0.301.
MAXNREG: int | None = 80
PRODUCER_REGS = 88  # what setmaxnreg gives the decoding warps out of the pool
# At head_dim 256 the consumer's accumulators (16 fp32 per thread for O) spill at 80 (sm_90 build: 43 local loads per
# tile); at 96 nothing spills, and one program per SM is what its 130 KB of stages allow anyway.
MAXNREG_256 = 96
# Programs an SM holds: registers bind (2 at MAXNREG 80 x 12 warps for head_dim 128, 3 at 8 warps for 64), shared
# memory at 256 (1). None: computed (``programs_per_sm``); a number: set by hand (launch experiments).
PROGRAMS_PER_SM: int | None = None
SMEM_PER_SM = 227 * 1024  # sm_90's shared memory for the blocks of one SM


def maxnreg(head_dim: int) -> int | None:
    """The register cap per thread of a launch for this head_dim."""
    return MAXNREG_256 if head_dim > 128 and MAXNREG else MAXNREG



def programs_per_sm(head_dim: int) -> int:
    """Programs of this kernel an SM holds at once: 65,536 registers (the cap per thread of every warp) and the
    stages' shared memory (K and V tiles of ``head_dim x 64`` fp16 per stage, plus ~4 KB)."""
    if PROGRAMS_PER_SM is not None:
        return PROGRAMS_PER_SM
    warps = 4 + PRODUCERS * head_dim // 32
    by_regs = 65536 // ((maxnreg(head_dim) or 255) * 32 * warps)
    by_smem = SMEM_PER_SM // (STAGES * 2 * head_dim * T_BLOCK * 2 + 4096)
    return max(1, min(by_regs, by_smem))
# Waves of them per launch. Until 2026-12-06b every Gluon timing ran two waves (the caller's split count, the Triton
# kernel's, reached this kernel already set): 66 splits at batch 1 x 8 KV heads on 132 SMs, 8 at batch 8. One wave
# (H100, 2026-12-06c): B1/128K 0.108 vs 0.117 ms, B8/32K 0.203 vs 0.208 (scripts/gluon_sm90/packed_decode_attention.py
# --gpu); in the 64K e2e step the attention 52.8 vs 58.3 us per layer, the merge 2.7 vs 3.6 us, the step 9.77 vs
# 9.98 ms (each alone in a fresh process). PACKKV_GLUON_WAVES sets it.
WAVES = int(os.environ.get("PACKKV_GLUON_WAVES", "1"))
# The producer loads block i + 2's fields and offsets and block i + 1's pack bits while it decodes block i (1), or
# each block's in its own iteration (0: two dependent global round trips per block; hidden instead by the second
# decoding warpgroup, and the prefetch's registers do not fit in 88).
PREFETCH = 0
# Decoding warpgroups per program: 2 take turns over the blocks, 16 decoding warps per SM instead of 8 to hide the
# gathers' latency (ncu, 2026-12-05e: latency-bound, 0.50 issued warps per scheduler).
PRODUCERS = 2
# With a padding mask: scan the split's compressed positions first and let only the tiles from the first to the
# last block holding a hidden key run the per-tile mask gathers (a decode step's usual mask hides none, or only a
# left padding; see ``_consumer``). Tiles that need no gather branch around it (MASK_BRANCH) or run it predicated
# off. H100, 2026-12-06b (gluon_mask_branch_h100_2026-12-06b.log; then a split gathered in all its tiles if any was
# hidden), a decode step's mask (out_len 2x, every key up to the length visible, one left-padded sequence) / a mask
# with 10% holes, B8/32K and B1/128K: scan + branch 0.211 / 0.252 and 0.122 / 0.137 ms, scan + predicated 0.229 /
# 0.241 and 0.127 / 0.135, neither (every tile gathers) 0.241 / 0.238 and 0.134 / 0.134; unmasked 0.210 and 0.117.
# With one wave (2026-12-06c) the left-padded split gathering all its tiles made the kernel 21% slower than unmasked
# at B8/32K (0.246 vs 0.203 ms): hence the block range. With it (one wave, H100 2026-12-06c,
# gluon_mask_scan_final_h100_2026-12-06c.log): step mask 0.217 / 0.113 ms at B8/32K / B1/128K (unmasked 0.203 /
# 0.108), 10% holes 0.258 / 0.134 (no scan, every tile gathering: 0.237 / 0.122).
MASK_SCAN = True
MASK_BRANCH = True
# Chunks of 1,024 mask positions per round trip of the scans (1: one load at a time, as timed until 2026-12-06b).
SCAN = 1
# Each decoding warpgroup can ask L2 for the fields and the (at most) payload of its block ``L2_AHEAD`` turns ahead
# while it decodes the current one (sm_90 bulk L2 prefetches; the offsets they need load with the current block's
# fields). Off: it bought nothing (H100 2026-12-06d, scripts/gluon_sm90/launch_cost.py, partials at B1/64K 0.0595 ms
# with 0, 0.0609 / 0.0615 / 0.0623 with 1 / 2 / 3; B8/32K 0.203 vs 0.206-0.208): the producers' loads are not
# waiting on DRAM, and the look-ahead costs 69 instructions per block (530 -> 599). Kept as an option for a layout
# whose gathers do miss.
L2_AHEAD = int(os.environ.get("PACKKV_GLUON_L2_AHEAD", "0"))
# The consumer's schedule was tried four other ways, each right on the H100 and none faster (NOTES 2026-12-06d/e;
# the code is in git at 062d14c, gluon_attention.SCALES_AHEAD / MMA_AHEAD / WARP_MAX / LAZY_MAX): a tile's scales one
# tile ahead, the next tile's S before this tile's softmax, the tile maximum through one shared buffer, a lazy
# running maximum off the chain to the P V product. The kernel is bound by instruction issue, not by the order.
# Benchmarks only, wrong results: what the rest of the kernel costs without a part of the producers' work. 1: no
# pack-bit gathers (the fields stand in for the bits; the decode runs as usual); 2: no loads at all (fields made up
# from the block index); 3: no loads and no decode (zero tiles). scripts/gluon_sm90/launch_cost.py times them.
SKIP = 0
# Benchmarks only, wrong results: the consumer without a part of its chain per tile (bits): 1 no scale and zero
# loads, 2 no S = K q^T product, 4 no P V product, 8 no running maximum (exp2 of the raw scores), 16 (with 4) no P
# store, fence and barrier either. With SKIP = 3 what is left is the handshake. launch_cost.py --consumer-ablation.
CSKIP = 0
# The consumer takes two compressed blocks per step of its chain (``_pair``): the chain (wait, S wgmma, maximum across
# the warps, exp2, P to shared memory, fence, barrier, P V wgmma, wait) sets the kernel's time even with no decode at
# all (zero tiles: 0.158 ms at B8/32K, NOTES 2026-12-07b). On the H100 (pair_step.py, 2026-12-07d) the zero-tile
# time falls 20-23 % and the kernel's 1-5 % (B1/64K: even): now the producers bound it. Any STAGES; 0 turns it off.
PAIR = bool(int(os.environ.get("PACKKV_GLUON_PAIR", "1")))
# Tried and removed (2026-12-07f): each window's four value pairs from one asm block shifting the window by the
# pack's width in a chain instead of by ``w * j`` (16 fewer producer instructions per tile and warp, 530 -> 514)
# timed no faster on the H100 (B8/32K 0.1946 vs 0.1933 ms, B1/128K 0.1023 vs 0.1019, head_dim 64 / 256 -0.4 / -0.6 %,
# interleaved rounds): scripts/gluon_sm90/experiments/chained_lane_shifts.patch.


@gluon.jit
def _funnel(lo, hi, sh):
    """Low 32 bits of (hi:lo) >> sh, sh < 32."""
    return gl.inline_asm_elementwise("shf.r.wrap.b32 $0, $1, $2, $3;", "=r,r,r,r", [lo, hi, sh], dtype=gl.uint32,
                                     is_pure=True, pack=1)  # fmt: skip


@gluon.jit
def _funnel_clamp(lo, hi, sh):
    """Low 32 bits of (hi:lo) >> sh, sh <= 32."""
    return gl.inline_asm_elementwise("shf.r.clamp.b32 $0, $1, $2, $3;", "=r,r,r,r", [lo, hi, sh], dtype=gl.uint32,
                                     is_pure=True, pack=1)  # fmt: skip


@gluon.jit
def _prefetch_l2(ptr, nbytes, on):
    """Ask L2 for ``nbytes`` (a multiple of 16) from ``ptr`` (16-byte aligned) if ``on``: a hint, nothing waits for
    it and nothing changes if it comes late."""
    return gl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $3; mov.b32 $0, 0; }",
        "=r,l,r,r", [ptr, on, nbytes], dtype=gl.int32, is_pure=False, pack=1)  # fmt: skip


@gluon.jit
def _prefetch_block(pool_ptr, k_meta_ptr, v_meta_ptr, chunk, ko, vo, on, pool_words, N: gl.constexpr,
                    K_MBITS: gl.constexpr, V_MBITS: gl.constexpr, K_QBITS: gl.constexpr, V_QBITS: gl.constexpr):  # fmt: skip
    """A block's fields (both streams) and the most its payloads can span from their offsets ``ko`` / ``vo`` (words,
    rounded down to 16 bytes and clipped to the pool), as four L2 prefetches. Scalar operands: each warp issues the
    four as uniform instructions (the requests repeat per warp; a per-lane predicate instead made ptxas loop over
    the lanes' operands, +84 instructions per block)."""
    gl.static_assert((N * K_MBITS // 8) % 16 == 0)
    gl.static_assert((N * V_MBITS // 8) % 16 == 0)
    z = chunk * 0
    _prefetch_l2(k_meta_ptr + chunk * (N * K_MBITS // 32), N * K_MBITS // 8 + z, on)
    _prefetch_l2(v_meta_ptr + chunk * (N * V_MBITS // 32), N * V_MBITS // 8 + z, on)
    ka = ko & ~3  # 16-byte aligned (the pool's base is)
    va = vo & ~3
    kn = gl.minimum(N * K_QBITS // 2 + 4, pool_words - ka) & ~3  # words: 16 values of at most QBITS bits a pack
    vn = gl.minimum(N * V_QBITS // 2 + 4, pool_words - va) & ~3
    _prefetch_l2(pool_ptr + ka, kn * 4, on & (kn > 0))
    _prefetch_l2(pool_ptr + va, vn * 4, on & (vn > 0))


@gluon.jit
def _lane_join(win, sh):
    """``win``'s low 16 bits, and those of ``win >> sh`` as the high half (``tiles._lane_join``)."""
    return gl.inline_asm_elementwise("{ .reg .b32 t; shr.b32 t, $1, $2; prmt.b32 $0, $1, t, 0x5410; }", "=r,r,r",
                                     [win, sh], dtype=gl.uint32, is_pure=True, pack=1)  # fmt: skip


@gluon.jit
def _lanes_1024(win, o, m2, mu2):
    """Two values per shift as fp16 ``min + delta`` (``tiles._lanes_1024``), left packed in one register: the
    inputs are ``[..., 2]`` with both elements equal (a broadcast, no register), the output's pair is the low lane's
    value then the high lane's, i.e. two consecutive rows in lane order."""
    return gl.inline_asm_elementwise(
        "{ .reg .b32 r; shr.b32 r, $1, $3; lop3.b32 r, r, $5, 0x64006400, 0xea; add.rn.f16x2 $0, r, $7; }",
        "=r,r,r,r,r,r,r,r,r", [win, o, m2, mu2], dtype=gl.float16, is_pure=True, pack=2)  # fmt: skip


@gluon.jit
def _per_pair(x, z3):
    """``[N]`` -> ``[N, 4, 2]``, equal along the new axes (``z3``: zeros of that shape and layout, folded away)."""
    return gl.expand_dims(gl.expand_dims(x, 1), 2) + z3


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _fields_by_4(meta_ptr, N: gl.constexpr, D: gl.constexpr, MBITS: gl.constexpr, LB: gl.constexpr):
    """``_fields`` for all ``N`` packs, each thread's 4 consecutive packs (4 channels of one row, ``4 MBITS <= 32``
    bits) from one pair of words instead of a pair per pack."""
    L4: gl.constexpr = gl.BlockedLayout([1, 4], [32, 1], [gl.num_warps(), 1], [1, 0])
    RW: gl.constexpr = D * MBITS // 32
    g = gl.arange(0, N // 4, gl.SliceLayout(1, L4))
    gb = (g % (D // 4)) * (4 * MBITS)
    widx = (g // (D // 4)) * RW + (gb >> 5)
    sh = (gb & 31).to(gl.uint32)
    lo = gl.load(meta_ptr + widx).to(gl.uint32, bitcast=True)
    hi = gl.load(meta_ptr + widx + 1, mask=sh + 4 * MBITS > 32, other=0).to(gl.uint32, bitcast=True)
    x = gl.expand_dims(_funnel(lo, hi, sh), 1)
    i = gl.arange(0, 4, gl.SliceLayout(0, L4)).to(gl.uint32)
    f = (x >> gl.expand_dims(i * MBITS, 0)) & ((1 << MBITS) - 1)
    return gl.convert_layout(gl.reshape(f, (N,)), LB)


@gluon.jit
def _pack_bits(base_ptr, start, size):
    wi = start >> 5
    sh = start & 31
    used = sh + size
    w0 = gl.load(base_ptr + wi).to(gl.uint32, bitcast=True)
    w1 = gl.load(base_ptr + wi + 1, mask=used > 32, other=0).to(gl.uint32, bitcast=True)
    w2 = gl.load(base_ptr + wi + 2, mask=used > 64, other=0).to(gl.uint32, bitcast=True)
    return _funnel(w0, w1, sh), _funnel(w1, w2, sh)


@gluon.jit
def _pack_values(f, lo, hi, QBITS: gl.constexpr, L2: gl.constexpr):
    """The 16 values of each pack (lanes of 4), as ``[N, 16]`` fp16 in lane order (row ``8k + 2j + lane`` is token
    ``8k + 4 lane + j``: ``tiles.lane_order_tokens``)."""
    w = f >> QBITS
    wl = w * 4
    lj0 = _lane_join(lo, wl)
    lj1 = _lane_join(_funnel_clamp(lo, hi, wl * 2), wl)  # the second window of 8 values, from bit 8 w
    # [N, 4 (j), 2 (lane)]: the lane axis is the asm's packed pair
    L3: gl.constexpr = gl.BlockedLayout([4, 4, 2], [32, 1, 1], [gl.num_warps(), 1, 1], [2, 1, 0])
    PK: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, L3))
    w = gl.convert_layout(w, PK)
    f = gl.convert_layout(f, PK)
    m = (gl.full(w.shape, 1, gl.uint32, PK) << w) - 1
    j = gl.arange(0, 4, gl.SliceLayout(0, gl.SliceLayout(2, L3))).to(gl.uint32)
    z3 = gl.zeros([f.shape[0], 4, 2], gl.uint32, L3)
    o = gl.expand_dims(gl.expand_dims(w, 1) * gl.expand_dims(j, 0), 2) + z3
    m2 = _per_pair(m | (m << 16), z3)
    mu2 = _per_pair(0xE400E400 - (f & ((1 << QBITS) - 1)) * 0x20002, z3)
    a = _lanes_1024(_per_pair(gl.convert_layout(lj0, PK), z3), o, m2, mu2)  # window 0: rows 2j + lane
    b = _lanes_1024(_per_pair(gl.convert_layout(lj1, PK), z3), o, m2, mu2)
    x = gl.join(a, b)  # [N, 4 (j), 2 (lane), 2 (window)]
    return gl.reshape(gl.permute(x, (0, 3, 1, 2)), (f.shape[0], 16))


@gluon.jit
def _ring_tile(ring_ptr, b, kvh, p0, total, H, S, T: gl.constexpr, D: gl.constexpr):
    """Exact tokens ``p0 .. p0 + T`` of the window as a ``[D, T]`` fp16 tile (slot ``p % S``; zeros past
    ``total``)."""
    LR: gl.constexpr = gl.BlockedLayout([8, 1], [D // 8, 256 // D], [1, gl.num_warps()], [0, 1])  # 16-byte loads along D
    cc = gl.arange(0, D, gl.SliceLayout(1, LR))
    pos = p0 + gl.arange(0, T, gl.SliceLayout(0, LR))
    live = gl.expand_dims(pos < total, 0)
    slot = gl.expand_dims((b * H + kvh) * S + pos % S, 0)
    x = gl.load(ring_ptr + slot * D + gl.expand_dims(cc, 1), mask=live, other=0.0)
    return x.to(gl.float16)


@gluon.jit
def _stage_rows(x, D: gl.constexpr, T: gl.constexpr):
    """A ``[D, T]`` tile with channel ``4 l + c`` at row ``(D / 4) c + l`` (the stage's channel order, see
    ``stage_channel``). The decoding thread ``l`` of a warp holds channels ``4 l .. 4 l + 3``: in channel order each
    16-byte store of a warp would hit 2 of the 128-byte swizzle's 8 positions (16 wavefronts instead of 4, ncu
    2026-12-05e); in this order its lanes' rows are consecutive. Dot products do not depend on the channel order
    when the queries (``_stage_cols``) share it; the output is stored back in channel order."""
    return gl.reshape(gl.permute(gl.reshape(x, (D // 4, 4, T)), (1, 0, 2)), (D, T))


@gluon.jit
def _stage_cols(x, R: gl.constexpr, D: gl.constexpr):
    """``[R, D]`` queries in the stage's channel order (``_stage_rows``)."""
    return gl.reshape(gl.permute(gl.reshape(x, (R, D // 4, 4)), (0, 2, 1)), (R, D))


@gluon.jit
def stage_channel(row, D: gl.constexpr):
    """The channel held by row ``row`` of a stage (and of the output accumulator)."""
    return 4 * (row % (D // 4)) + row // (D // 4)


@gluon.jit
def _block_meta(k_meta_ptr, v_meta_ptr, k_off_ptr, v_off_ptr, chunk, N: gl.constexpr, D: gl.constexpr,
                LB: gl.constexpr, K_MBITS: gl.constexpr, V_MBITS: gl.constexpr):  # fmt: skip
    """A block's pack fields (both streams) and payload offsets: the loads that depend on the block index only."""
    fk = _fields_by_4(k_meta_ptr + chunk * (N * K_MBITS // 32), N, D, K_MBITS, LB)
    fv = _fields_by_4(v_meta_ptr + chunk * (N * V_MBITS // 32), N, D, V_MBITS, LB)
    return fk, fv, gl.load(k_off_ptr + chunk), gl.load(v_off_ptr + chunk)


@gluon.jit
def _block_bits(pool_ptr, fk, fv, ko, vo, K_QBITS: gl.constexpr, V_QBITS: gl.constexpr):
    """Each pack's 64 bits, both streams, at the pack starts of one prefix scan (16 bits per stream)."""
    sk = (fk >> K_QBITS) * 16  # pack sizes: width x 16 values
    sv = (fv >> V_QBITS) * 16
    both = sk | (sv << 16)
    excl = gl.associative_scan(both, 0, _add) - both
    k_lo, k_hi = _pack_bits(pool_ptr + ko, (excl & 0xFFFF).to(gl.int32), sk.to(gl.int32))
    v_lo, v_hi = _pack_bits(pool_ptr + vo, (excl >> 16).to(gl.int32), sv.to(gl.int32))
    return k_lo, k_hi, v_lo, v_hi


@gluon.jit
def _decode_producer(pool_ptr, k_off_ptr, v_off_ptr, k_meta_ptr, v_meta_ptr, ring_k_ptr, ring_v_ptr, k_bufs, v_bufs,
                     ready, empty, b, kvh, lo, hi, r_lo, r_hi, nb, total, NB, H, S, T: gl.constexpr,
                     D: gl.constexpr, STAGES: gl.constexpr, PREFETCH: gl.constexpr, K_QBITS: gl.constexpr,
                     V_QBITS: gl.constexpr, par, NPAR: gl.constexpr, pool_words, L2_AHEAD: gl.constexpr,
                     SKIP: gl.constexpr):  # fmt: skip
    P: gl.constexpr = 16
    N: gl.constexpr = (T // P) * D  # packs per block and stream, in stream order (row-major: row, channel)
    # Each thread: 4 consecutive packs of one row (channels 4l .. 4l+3), warp w = pack row w.
    L2: gl.constexpr = gl.BlockedLayout([4, 4], [32, 1], [gl.num_warps(), 1], [1, 0])
    # The same packs per thread as a 1-D layout: the scan does not take a slice layout; the conversions to
    # SliceLayout(1, L2) below move nothing (same threads, same registers).
    LB: gl.constexpr = gl.BlockedLayout([4], [32], [gl.num_warps()], [0])
    LP: gl.constexpr = gl.SliceLayout(1, L2)
    K_MBITS: gl.constexpr = K_QBITS + K_QBITS.bit_length()  # a field: the pack minimum, then its width
    V_MBITS: gl.constexpr = V_QBITS + V_QBITS.bit_length()
    # PREFETCH: a software pipeline over the blocks, so that a block's three dependent global round trips (fields
    # and offsets, then pack bits, then nothing) do not stall 4 warps in turn: block i + 2's fields and offsets and
    # block i + 1's pack bits are loaded while block i is decoded. Past the last block the index is clamped (a
    # block that exists: harmless loads, never used).
    last = gl.maximum(hi - 1, 0)
    base = b * NB
    fk, fv, ko, vo = _block_meta(k_meta_ptr, v_meta_ptr, k_off_ptr, v_off_ptr,
                                 (base + gl.minimum(lo + par, last)) * H + kvh, N, D, LB, K_MBITS, V_MBITS)  # fmt: skip
    k_lo, k_hi, v_lo, v_hi = _block_bits(pool_ptr, fk, fv, ko, vo, K_QBITS, V_QBITS)
    nfk, nfv, nko, nvo = _block_meta(k_meta_ptr, v_meta_ptr, k_off_ptr, v_off_ptr,
                                     (base + gl.minimum(lo + par + NPAR, last)) * H + kvh, N, D, LB, K_MBITS, V_MBITS)  # fmt: skip
    for i in range(par, hi - lo, NPAR):  # this partition's blocks (NPAR partitions take turns)
        s = i % STAGES
        if PREFETCH:
            nk_lo, nk_hi, nv_lo, nv_hi = _block_bits(pool_ptr, nfk, nfv, nko, nvo, K_QBITS, V_QBITS)
            n2fk, n2fv, n2ko, n2vo = _block_meta(k_meta_ptr, v_meta_ptr, k_off_ptr, v_off_ptr,
                                                 (base + gl.minimum(lo + i + 2 * NPAR, last)) * H + kvh, N, D, LB,
                                                 K_MBITS, V_MBITS)  # fmt: skip
        elif SKIP >= 2:  # (benchmarks only) fields made up from the block index, no load
            made = (gl.arange(0, N, LB) * 668265261 + i).to(gl.uint32)
            fk = made & ((1 << K_MBITS) - 1)
            fv = (made >> 7) & ((1 << V_MBITS) - 1)
            k_lo, k_hi, v_lo, v_hi = made * 40503, made ^ fk, made * 69069, made ^ fv
        else:  # each block's loads in its own iteration
            fk, fv, ko, vo = _block_meta(k_meta_ptr, v_meta_ptr, k_off_ptr, v_off_ptr, (base + lo + i) * H + kvh, N,
                                         D, LB, K_MBITS, V_MBITS)  # fmt: skip
            if L2_AHEAD > 0:  # the offsets of the block L2_AHEAD turns ahead, in the same round trip as the fields
                ahead = lo + i + L2_AHEAD * NPAR
                ca = (base + gl.minimum(ahead, last)) * H + kvh
                koa = gl.load(k_off_ptr + ca)
                voa = gl.load(v_off_ptr + ca)
            if SKIP == 1:  # (benchmarks only) no pack-bit gathers
                k_lo, k_hi, v_lo, v_hi = fk * 40503, fk ^ ko.to(gl.uint32), fv * 69069, fv ^ vo.to(gl.uint32)
            else:
                k_lo, k_hi, v_lo, v_hi = _block_bits(pool_ptr, fk, fv, ko, vo, K_QBITS, V_QBITS)
            if L2_AHEAD > 0:
                _prefetch_block(pool_ptr, k_meta_ptr, v_meta_ptr, ca, koa, voa, ahead < hi, pool_words, N, K_MBITS,
                                V_MBITS, K_QBITS, V_QBITS)  # fmt: skip
        if SKIP == 3:  # (benchmarks only) zero tiles
            kx = gl.zeros([N, P], gl.float16, L2)
            vx = gl.zeros([N, P], gl.float16, L2)
        else:
            kx = _pack_values(gl.convert_layout(fk, LP), gl.convert_layout(k_lo, LP), gl.convert_layout(k_hi, LP),
                              K_QBITS, L2)  # [N, 16]: pack (row r, channel c), its 16 tokens  # fmt: skip
            vx = _pack_values(gl.convert_layout(fv, LP), gl.convert_layout(v_lo, LP), gl.convert_layout(v_hi, LP),
                              V_QBITS, L2)  # fmt: skip
        # [D, T]: channel c, token 16 r + t (lane order within each pack); rows in the stage's order
        kt = _stage_rows(gl.reshape(gl.permute(gl.reshape(kx, (T // P, D, P)), (1, 0, 2)), (D, T)), D, T)
        vt = _stage_rows(gl.reshape(gl.permute(gl.reshape(vx, (T // P, D, P)), (1, 0, 2)), (D, T)), D, T)
        mbarrier.wait(empty.index(s), phase=((i // STAGES) & 1) ^ 1)
        k_bufs.index(s).store(kt)
        v_bufs.index(s).store(vt)
        fence_async_shared()
        gl.thread_barrier()  # every producer thread's stores before the one arrive
        mbarrier.arrive(ready.index(s), count=1)
        if PREFETCH:
            fk, fv, k_lo, k_hi, v_lo, v_hi = nfk, nfv, nk_lo, nk_hi, nv_lo, nv_hi
            nfk, nfv, nko, nvo = n2fk, n2fv, n2ko, n2vo
    # Then the split's tiles of the exact window (the ring), in token order.
    n_c = hi - lo
    for j in range((par + NPAR - n_c % NPAR) % NPAR, r_hi - r_lo, NPAR):  # tile i = n_c + j is this partition's
        i = n_c + j
        s = i % STAGES
        p0 = (nb + r_lo + j) * T
        kt = _stage_rows(_ring_tile(ring_k_ptr, b, kvh, p0, total, H, S, T, D), D, T)
        vt = _stage_rows(_ring_tile(ring_v_ptr, b, kvh, p0, total, H, S, T, D), D, T)
        mbarrier.wait(empty.index(s), phase=((i // STAGES) & 1) ^ 1)
        k_bufs.index(s).store(kt)
        v_bufs.index(s).store(vt)
        fence_async_shared()
        gl.thread_barrier()
        mbarrier.arrive(ready.index(s), count=1)


@gluon.jit
def _stream_fields(meta_ptr, off_ptr, chunk, N: gl.constexpr, D: gl.constexpr, MBITS: gl.constexpr, LB: gl.constexpr):
    """A block's pack fields and payload offset: the loads that depend on the block index only."""
    return _fields_by_4(meta_ptr + chunk * (N * MBITS // 32), N, D, MBITS, LB), gl.load(off_ptr + chunk)


@gluon.jit
def _stream_bits(pool_ptr, f, off, QBITS: gl.constexpr):
    """Each pack's 64 bits at the pack starts of one prefix scan of the packs' sizes (width x 16 values)."""
    size = (f >> QBITS) * 16
    start = gl.associative_scan(size, 0, _add) - size
    return _pack_bits(pool_ptr + off, start.to(gl.int32), size.to(gl.int32))


@gluon.jit
def _stream_producer(pool_ptr, off_ptr, meta_ptr, ring_ptr, bufs, ready, empty, b, kvh, lo, hi, r_lo, r_hi, nb, total,
                     NB, H, S, T: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr, QBITS: gl.constexpr, par,
                     NPAR: gl.constexpr, PREFETCH: gl.constexpr):  # fmt: skip
    """``_decode_producer`` for one stream: compressed blocks ``lo + par, lo + par + NPAR, ...`` as ``[D, T]`` fp16
    ints in the stage's row order, then the window's tiles ``r_lo .. r_hi`` from ``ring_ptr`` (none in the mat-vec
    pair, ``gluon_matvec``). ``PREFETCH``: the next block's pack bits and the one after's fields are loaded while
    this one decodes (a software pipeline over the blocks; past the last block the index is clamped: harmless loads
    of a block that exists, never used): one stream's registers leave room for it."""
    P: gl.constexpr = 16
    N: gl.constexpr = (T // P) * D
    L2: gl.constexpr = gl.BlockedLayout([4, 4], [32, 1], [gl.num_warps(), 1], [1, 0])
    LB: gl.constexpr = gl.BlockedLayout([4], [32], [gl.num_warps()], [0])
    LP: gl.constexpr = gl.SliceLayout(1, L2)
    MBITS: gl.constexpr = QBITS + QBITS.bit_length()
    last = gl.maximum(hi - 1, 0)
    base = b * NB
    if PREFETCH:
        f, off = _stream_fields(meta_ptr, off_ptr, (base + gl.minimum(lo + par, last)) * H + kvh, N, D, MBITS, LB)
        w_lo, w_hi = _stream_bits(pool_ptr, f, off, QBITS)
        nf, noff = _stream_fields(meta_ptr, off_ptr, (base + gl.minimum(lo + par + NPAR, last)) * H + kvh, N, D, MBITS, LB)
    for i in range(par, hi - lo, NPAR):
        s = i % STAGES
        if PREFETCH:
            nw_lo, nw_hi = _stream_bits(pool_ptr, nf, noff, QBITS)
            n2f, n2off = _stream_fields(meta_ptr, off_ptr, (base + gl.minimum(lo + i + 2 * NPAR, last)) * H + kvh, N, D,
                                 MBITS, LB)  # fmt: skip
        else:
            f, off = _stream_fields(meta_ptr, off_ptr, (base + lo + i) * H + kvh, N, D, MBITS, LB)
            w_lo, w_hi = _stream_bits(pool_ptr, f, off, QBITS)
        x = _pack_values(gl.convert_layout(f, LP), gl.convert_layout(w_lo, LP), gl.convert_layout(w_hi, LP), QBITS,
                         L2)  # fmt: skip
        t = _stage_rows(gl.reshape(gl.permute(gl.reshape(x, (T // P, D, P)), (1, 0, 2)), (D, T)), D, T)
        mbarrier.wait(empty.index(s), phase=((i // STAGES) & 1) ^ 1)
        bufs.index(s).store(t)
        fence_async_shared()
        gl.thread_barrier()
        mbarrier.arrive(ready.index(s), count=1)
        if PREFETCH:
            f, w_lo, w_hi = nf, nw_lo, nw_hi
            nf, noff = n2f, n2off
    n_c = hi - lo
    for j in range((par + NPAR - n_c % NPAR) % NPAR, r_hi - r_lo, NPAR):  # tile i = n_c + j is this partition's
        i = n_c + j
        s = i % STAGES
        t = _stage_rows(_ring_tile(ring_ptr, b, kvh, (nb + r_lo + j) * T, total, H, S, T, D), D, T)
        mbarrier.wait(empty.index(s), phase=((i // STAGES) & 1) ^ 1)
        bufs.index(s).store(t)
        fence_async_shared()
        gl.thread_barrier()
        mbarrier.arrive(ready.index(s), count=1)


@gluon.jit
def _butterfly(x, M: gl.constexpr, D: gl.constexpr, H: gl.constexpr):
    """One stage of the fast Walsh-Hadamard transform (``hadamard._butterfly``): ``(a, b) -> (a + b, a - b)`` for
    the index pairs that differ in bit ``H``. ``gl.split`` needs the pair in one thread: an explicit layout."""
    pair: gl.constexpr = gl.BlockedLayout([1, 1, 1, 2], [1, 4, 8, 1], [gl.num_warps(), 1, 1, 1], [3, 2, 1, 0])
    x = gl.convert_layout(gl.permute(gl.reshape(x, (M, D // (2 * H), 2, H)), (0, 1, 3, 2)), pair)
    a, b = gl.split(x)
    return gl.reshape(gl.permute(gl.join(a + b, a - b), (0, 1, 3, 2)), (M, D))


@gluon.jit
def _packed_in(i, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, perm_ptr, mask_ptr, smb, b, lo, NB, g_lo, g_hi,
               i_t, lane_tok, T: gl.constexpr, R: gl.constexpr, HAS_MASK: gl.constexpr, MASK_BRANCH: gl.constexpr,
               CSKIP: gl.constexpr):  # fmt: skip
    """Compressed block ``i``'s token scales and zeros (K and V) and which of its keys the mask leaves visible (the
    mask gathered only between the split's first and last hidden position)."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                  instr_shape=[16, R, 16])  # fmt: skip
    toks: gl.constexpr = gl.SliceLayout(1, mma)
    tok = (b * NB + lo + i) * T + lane_tok
    if CSKIP & 1:  # (benchmarks only)
        ks = gl.full([T], 1.0, gl.float32, toks)
        kz = gl.zeros([T], gl.float32, toks)
        vs = ks
        vz = kz
    else:
        ks = gl.load(k_scale_ptr + tok).to(gl.float32)
        kz = gl.load(k_zero_ptr + tok).to(gl.float32)
        vs = gl.load(v_scale_ptr + tok).to(gl.float32)
        vz = gl.load(v_zero_ptr + tok).to(gl.float32)
    live = i_t >= 0
    if HAS_MASK:
        if MASK_BRANCH:
            if (i >= g_lo) & (i <= g_hi):
                perm = gl.load(perm_ptr + tok).to(gl.int32)
                live = gl.load(mask_ptr + b * smb + (lo + i) * T + perm) != 0
        else:  # the same gathers predicated off instead of branched around
            g = (i >= g_lo) & (i <= g_hi) & (i_t >= 0)
            perm = gl.load(perm_ptr + tok, mask=g, other=0).to(gl.int32)
            live = gl.load(mask_ptr + b * smb + (lo + i) * T + perm, mask=g, other=1) != 0
    return ks, kz, vs, vz, live


@gluon.jit
def _tile(i, PACKED: gl.constexpr, q_s, qs, k_bufs, v_bufs, p_s, ready, empty, k_scale_ptr, k_zero_ptr, v_scale_ptr,
          v_zero_ptr, perm_ptr, mask_ptr, smb, b, lo, nb, r_lo, n_c, total, NB, qk_scale, g_lo, g_hi, i_t, lane_tok,
          m_i, l_t, z_t, o_t, T: gl.constexpr, D: gl.constexpr, R: gl.constexpr, STAGES: gl.constexpr,
          HAS_MASK: gl.constexpr, MASK_BRANCH: gl.constexpr, CSKIP: gl.constexpr = 0):  # fmt: skip
    """The consumer's tile ``i``: a compressed block (``PACKED``: its scales and zeros, the mask only between the
    split's first and last hidden position) or one of the window's exact tiles (scale 1, zero 0, positions past
    the length hidden). Two loops over this instead of one whose tiles test which kind they are: 222 and 174
    sm_90 instructions per tile and warp instead of 249 (the predicates, the loads' defaults and their selects
    go; H100 2026-12-06f, ``launch_cost.py``: B1/64K 0.0616-0.0620 ms vs 0.0628, B1/128K 0.1069-0.1074 vs 0.1109,
    B8/32K 0.2004-0.2006 vs 0.2035). ``CSKIP``: the benchmarks' ablation bits (module ``CSKIP``)."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                  instr_shape=[16, R, 16])  # fmt: skip
    toks: gl.constexpr = gl.SliceLayout(1, mma)
    s = i % STAGES
    if PACKED:
        ks, kz, vs, vz, live = _packed_in(i, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, perm_ptr, mask_ptr,
                                          smb, b, lo, NB, g_lo, g_hi, i_t, lane_tok, T, R, HAS_MASK, MASK_BRANCH,
                                          CSKIP)  # fmt: skip
    else:
        ks = gl.full([T], 1.0, gl.float32, toks)
        kz = gl.zeros([T], gl.float32, toks)
        vs = ks
        vz = kz
        pos = (nb + r_lo + i - n_c) * T + i_t
        live = pos < total
        if HAS_MASK:
            live = live & (gl.load(mask_ptr + b * smb + pos, mask=live, other=0) != 0)
    mbarrier.wait(ready.index(s), phase=(i // STAGES) & 1)
    if CSKIP & 2:  # (benchmarks only)
        raw = gl.zeros([T, R], gl.float32, mma)
    else:
        acc = warpgroup_mma(k_bufs.index(s).permute([1, 0]), q_s.permute([1, 0]),
                            gl.zeros([T, R], gl.float32, mma), use_acc=False, is_async=True)  # fmt: skip
        raw = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    sc = (raw + gl.expand_dims(kz, 1) * gl.expand_dims(qs, 0)) * gl.expand_dims(ks * qk_scale, 1)
    sc = gl.where(gl.expand_dims(live, 1), sc, float("-inf"))
    if CSKIP & 8:  # (benchmarks only)
        m_new = gl.maximum(m_i, 0.0)
    else:
        m_new = gl.maximum(m_i, gl.max(sc, axis=0))
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(sc - gl.expand_dims(m_safe, 0))
    alpha = gl.expand_dims(gl.exp2(m_i - m_safe), 0)
    pvs = p * gl.expand_dims(vs, 1)
    l_t = l_t * alpha + p
    z_t = z_t * alpha + pvs * gl.expand_dims(vz, 1)
    o_t = o_t * alpha
    if (CSKIP & 20) != 20:
        p_s.store(pvs.to(gl.float16))  # V's scale folded into the weights (no per-tile normalization)
        fence_async_shared()
        gl.thread_barrier()
    if not (CSKIP & 4):  # (CSKIP & 4: benchmarks only)
        acc = warpgroup_mma(v_bufs.index(s), p_s, o_t, is_async=True)
        o_t = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(empty.index(s), count=1)
    return m_new, l_t, z_t, o_t


@gluon.jit
def _pair(i, q_s, qs, k_bufs, v_bufs, p_s, p_s1, ready, empty, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr,
          perm_ptr, mask_ptr, smb, b, lo, NB, qk_scale, g_lo, g_hi, i_t, lane_tok, m_i, l_t, z_t, o_t,
          T: gl.constexpr, D: gl.constexpr, R: gl.constexpr, STAGES: gl.constexpr, HAS_MASK: gl.constexpr,
          MASK_BRANCH: gl.constexpr, CSKIP: gl.constexpr = 0):  # fmt: skip
    """Compressed blocks ``i`` and ``i + 1`` in one step of the consumer's chain (``PAIR``): both S products
    in flight together, one maximum across the warps (a shared-memory round and a barrier) for 128 tokens, one P
    store, fence and barrier, both P V products chained on the accumulator. The chain's fixed latencies are paid
    once per 128 tokens instead of once per 64."""
    gl.static_assert(CSKIP <= 1, "the pair step takes no consumer ablation but CSKIP 1")
    # With 2 stages block i (even) is in stage 0 and i + 1 in 1; known at compile time, the products' 48 shared
    # memory descriptors are hoisted out of the loop, do not fit the uniform registers and spill (sm_90 build, 80
    # registers: 546 instructions per step, 113 local loads in the kernel). Computed per step from an opaque 0: 433.
    # At head_dim 64 the hoisted ones fit (319 per step, 357 from the opaque 0).
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                  instr_shape=[16, R, 16])  # fmt: skip
    if (STAGES == 2) & (D <= 64):  # half as many descriptors: they fit
        s0 = 0
        s1 = 1
    elif STAGES == 2:
        s0 = (i >> 30) & 1  # 0: blocks are fewer than 2^30; opaque so the descriptors are computed per step (below)
        s1 = s0 ^ 1
    else:
        s0 = i % STAGES
        s1 = (i + 1) % STAGES
    ks0, kz0, vs0, vz0, live0 = _packed_in(i, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, perm_ptr, mask_ptr,
                                           smb, b, lo, NB, g_lo, g_hi, i_t, lane_tok, T, R, HAS_MASK, MASK_BRANCH,
                                           CSKIP)  # fmt: skip
    ks1, kz1, vs1, vz1, live1 = _packed_in(i + 1, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, perm_ptr,
                                           mask_ptr, smb, b, lo, NB, g_lo, g_hi, i_t, lane_tok, T, R, HAS_MASK,
                                           MASK_BRANCH, CSKIP)  # fmt: skip
    zero = gl.zeros([T, R], gl.float32, mma)
    mbarrier.wait(ready.index(s0), phase=(i // STAGES) & 1)
    a0 = warpgroup_mma(k_bufs.index(s0).permute([1, 0]), q_s.permute([1, 0]), zero, use_acc=False, is_async=True)
    mbarrier.wait(ready.index(s1), phase=((i + 1) // STAGES) & 1)
    a1 = warpgroup_mma(k_bufs.index(s1).permute([1, 0]), q_s.permute([1, 0]), zero, use_acc=False, is_async=True)
    raw0, raw1 = warpgroup_mma_wait(num_outstanding=0, deps=(a0, a1))
    sc0 = (raw0 + gl.expand_dims(kz0, 1) * gl.expand_dims(qs, 0)) * gl.expand_dims(ks0 * qk_scale, 1)
    sc0 = gl.where(gl.expand_dims(live0, 1), sc0, float("-inf"))
    sc1 = (raw1 + gl.expand_dims(kz1, 1) * gl.expand_dims(qs, 0)) * gl.expand_dims(ks1 * qk_scale, 1)
    sc1 = gl.where(gl.expand_dims(live1, 1), sc1, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(gl.maximum(sc0, sc1), axis=0))
    m_safe = gl.expand_dims(gl.where(m_new == float("-inf"), 0.0, m_new), 0)
    p0 = gl.exp2(sc0 - m_safe)
    p1 = gl.exp2(sc1 - m_safe)
    alpha = gl.exp2(gl.expand_dims(m_i, 0) - m_safe)
    pvs0 = p0 * gl.expand_dims(vs0, 1)
    pvs1 = p1 * gl.expand_dims(vs1, 1)
    l_t = l_t * alpha + (p0 + p1)
    z_t = z_t * alpha + (pvs0 * gl.expand_dims(vz0, 1) + pvs1 * gl.expand_dims(vz1, 1))
    o_t = o_t * alpha
    p_s.store(pvs0.to(gl.float16))
    p_s1.store(pvs1.to(gl.float16))
    fence_async_shared()
    gl.thread_barrier()
    acc = warpgroup_mma(v_bufs.index(s0), p_s, o_t, is_async=True)
    acc = warpgroup_mma(v_bufs.index(s1), p_s1, acc, is_async=True)
    o_t = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(empty.index(s0), count=1)
    mbarrier.arrive(empty.index(s1), count=1)
    return m_new, l_t, z_t, o_t


@gluon.jit
def _consumer(q_s, qsum, k_bufs, v_bufs, p_s, p_s1, ready, empty, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr,
              perm_ptr, mask_ptr, smb, acc_ptr, m_ptr, l_ptr, row0, n_rep, split, b, lo, hi, r_lo, r_hi, nb, total,
              z_lo, z_hi, NB, qk_scale, T: gl.constexpr, D: gl.constexpr, R: gl.constexpr, STAGES: gl.constexpr,
              HAS_MASK: gl.constexpr, MASK_SCAN: gl.constexpr, MASK_BRANCH: gl.constexpr, SCAN: gl.constexpr,
              CSKIP: gl.constexpr, PAIR: gl.constexpr):  # fmt: skip
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                  instr_shape=[16, R, 16])  # fmt: skip
    rows: gl.constexpr = gl.SliceLayout(0, mma)
    toks: gl.constexpr = gl.SliceLayout(1, mma)
    qs = gl.convert_layout(qsum, rows)
    n_c = hi - lo
    # The padding mask's scans come before the tiles, where their loads overlap the producers' first decode
    # instead of the softmax: the zero keys from the length up to out_len (a compiled step passes the storage's
    # capacity; up to twice the length right after a growth), this split's share [z_lo, z_hi), each scoring exactly
    # 0 and adding nothing to O, so only the visible ones' count enters the softmax; and (MASK_SCAN) the first and
    # last of the split's compressed positions that are masked. A decode step's mask hides none, or a left padding:
    # the tiles outside that range skip their mask gather, which waits on the permutation's gather (two dependent
    # round trips per tile, ~11% of the kernel at B1/128K, H100 2026-12-06).
    zl: gl.constexpr = gl.BlockedLayout([8], [32], [gl.num_warps()], [0])
    if HAS_MASK:  # SCAN chunks of 1,024 per round trip: their loads issue together (a long split's scans stall it)
        cnt = gl.zeros([1024], gl.float32, zl)
        for z0 in range(z_lo, z_hi, 1024 * SCAN):
            for u in gl.static_range(SCAN):
                zpos = z0 + u * 1024 + gl.arange(0, 1024, zl)
                vis = zpos < z_hi
                vis = vis & (gl.load(mask_ptr + b * smb + zpos, mask=vis, other=0) != 0)
                cnt = cnt + gl.where(vis, 1.0, 0.0)
        n = gl.sum(cnt, axis=0)
        if MASK_SCAN:  # the first and last block holding a hidden position: only the tiles between them gather
            # Forward to the first round that finds a hidden position, then (if one) backward from the split's end
            # to the first round that finds one: a mask without any scans the split once, a left padding once and
            # a round, a mask with holes two rounds.
            first = lo * 0 + 2**30
            p0 = lo * T
            while (p0 < hi * T) & (first == 2**30):
                h = gl.full([1024], 2**30, gl.int32, zl)
                for u in gl.static_range(SCAN):
                    ppos = p0 + u * 1024 + gl.arange(0, 1024, zl)
                    inr = ppos < hi * T
                    hid = inr & (gl.load(mask_ptr + b * smb + ppos, mask=inr, other=0) == 0)
                    h = gl.minimum(h, gl.where(hid, ppos, 2**30))
                first = gl.min(h, axis=0)
                p0 = p0 + 1024 * SCAN
            last = lo * 0 - 1
            p1 = hi * T
            while (first < 2**30) & (last < 0) & (p1 > first):  # finds ``first`` at the latest
                h = gl.full([1024], -1, gl.int32, zl)
                for u in gl.static_range(SCAN):
                    ppos = p1 - (u + 1) * 1024 + gl.arange(0, 1024, zl)
                    inr = ppos >= first
                    hid = inr & (gl.load(mask_ptr + b * smb + ppos, mask=inr, other=1) == 0)
                    h = gl.maximum(h, gl.where(hid, ppos, -1))
                last = gl.max(h, axis=0)
                p1 = p1 - 1024 * SCAN
            g_lo = first // T - lo  # (tile indices; none hidden: g_lo > g_hi)
            g_hi = gl.where(last >= 0, last // T - lo, -1)
        else:
            g_lo = n_c * 0
            g_hi = n_c
    else:
        n = gl.maximum(z_hi - z_lo, 0).to(gl.float32)
        g_lo = n_c * 0  # (unused without a mask)
        g_hi = n_c
    i_t = gl.arange(0, T, toks)
    k8 = i_t % 8
    lane_tok = i_t - k8 + (k8 & 1) * 4 + (k8 >> 1)  # the stage's rows are in lane order
    m_i = gl.full([R], float("-inf"), gl.float32, rows)
    l_t = gl.zeros([T, R], gl.float32, mma)
    z_t = gl.zeros([T, R], gl.float32, mma)
    o_t = gl.zeros([D, R], gl.float32, mma)
    # Compressed blocks first (rows in lane order, token-grouped scales and zeros: [B, NB, 1, T, 1]), then the
    # ring's exact tiles (rows in token order, scale 1, zero 0, positions past the length masked).
    n_pair = (n_c // 2) * 2 if PAIR else n_c * 0
    if PAIR:  # two compressed blocks per step of the chain; an odd one left goes alone
        for j in range(n_c // 2):
            m_i, l_t, z_t, o_t = _pair(2 * j, q_s, qs, k_bufs, v_bufs, p_s, p_s1, ready, empty, k_scale_ptr, k_zero_ptr,
                                       v_scale_ptr, v_zero_ptr, perm_ptr, mask_ptr, smb, b, lo, NB, qk_scale, g_lo,
                                       g_hi, i_t, lane_tok, m_i, l_t, z_t, o_t, T, D, R, STAGES, HAS_MASK,
                                       MASK_BRANCH, CSKIP)  # fmt: skip
    for i in range(n_pair, n_c):
        m_i, l_t, z_t, o_t = _tile(i, True, q_s, qs, k_bufs, v_bufs, p_s, ready, empty, k_scale_ptr, k_zero_ptr,
                                   v_scale_ptr, v_zero_ptr, perm_ptr, mask_ptr, smb, b, lo, nb, r_lo, n_c, total, NB,
                                   qk_scale, g_lo, g_hi, i_t, lane_tok, m_i, l_t, z_t, o_t, T, D, R, STAGES, HAS_MASK,
                                   MASK_BRANCH, CSKIP)
    for i in range(n_c, n_c + r_hi - r_lo):
        m_i, l_t, z_t, o_t = _tile(i, False, q_s, qs, k_bufs, v_bufs, p_s, ready, empty, k_scale_ptr, k_zero_ptr,
                                   v_scale_ptr, v_zero_ptr, perm_ptr, mask_ptr, smb, b, lo, nb, r_lo, n_c, total, NB,
                                   qk_scale, g_lo, g_hi, i_t, lane_tok, m_i, l_t, z_t, o_t, T, D, R, STAGES, HAS_MASK,
                                   MASK_BRANCH, CSKIP)
    o_t = o_t + gl.expand_dims(gl.sum(z_t, axis=0), 0)
    l_i = gl.sum(l_t, axis=0)
    # The n visible zero keys (counted above) enter the softmax.
    m_new = gl.where(n > 0, gl.maximum(m_i, 0.0), m_i)
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_safe)
    l_i = l_i * alpha + n * gl.exp2(-m_safe)
    o_t = o_t * gl.expand_dims(alpha, 0)
    m_i = m_new
    # The Triton kernel's partials: acc [B, HQ, 1, NS, D], m and l [B, HQ, 1, NS]; the padding rows are not stored.
    ns = gl.num_programs(1)
    cd = gl.arange(0, D, gl.SliceLayout(1, mma))
    cr = gl.arange(0, R, rows)
    part = (row0 + cr) * ns + split
    gl.store(acc_ptr + gl.expand_dims(part, 0) * D + gl.expand_dims(stage_channel(cd, D), 1), o_t,
             mask=gl.expand_dims(cr < n_rep, 0) & gl.expand_dims(cd >= 0, 1))  # fmt: skip
    gl.store(m_ptr + part, m_i, mask=cr < n_rep)
    gl.store(l_ptr + part, l_i, mask=cr < n_rep)


@gluon.jit
def decode_attention_kernel(q_ptr, pool_ptr, k_off_ptr, v_off_ptr, k_meta_ptr, v_meta_ptr, k_scale_ptr,
                            k_zero_ptr, v_scale_ptr, v_zero_ptr, ring_k_ptr, ring_v_ptr, n_blocks_ptr, n_win_ptr,
                            perm_ptr, mask_ptr, smb, out_len, acc_ptr, m_ptr, l_ptr, NB, H, S, n_rep, qk_scale,
                            pool_words, tot_ptr, T: gl.constexpr, D: gl.constexpr, R: gl.constexpr, STAGES: gl.constexpr,
                            PRODUCER_REGS: gl.constexpr = 128, HAS_MASK: gl.constexpr = False,
                            PREFETCH: gl.constexpr = 1, ROTATE: gl.constexpr = False, PRODUCERS: gl.constexpr = 1,
                            ROT_SCALE: gl.constexpr = 1.0, LOG2_D: gl.constexpr = 7, K_QBITS: gl.constexpr = 4,
                            V_QBITS: gl.constexpr = 3, MASK_SCAN: gl.constexpr = True,
                            MASK_BRANCH: gl.constexpr = True, SCAN: gl.constexpr = 4,
                            L2_AHEAD: gl.constexpr = 0, SKIP: gl.constexpr = 0,
                            CSKIP: gl.constexpr = 0, APPEND: gl.constexpr = False,
                            PAIR: gl.constexpr = False):  # fmt: skip
    """Program (sequence x KV head, split): the KV head's ``n_rep`` query rows (``q_ptr``: ``[B, HQ, 1, D]``,
    rotated, padded to ``R`` with zeros) against the split's share of the sequence's compressed blocks of a
    ``PackedLayer`` (its pool, offsets, metadata, scales and zeros as they are stored) and its share of the exact
    window; writes the split's unnormalized output, row maxima (log2 units) and sums. ``APPEND``: the step's new
    token (position ``total``) is attended by the merge (``fused_append``), not as a zero key here; each sequence's
    ``total`` goes to ``tot_ptr`` for it."""
    head = gl.program_id(0)
    split = gl.program_id(1)
    ns = gl.num_programs(1)
    b = head // H
    kvh = head % H
    nb = gl.load(n_blocks_ptr + b)
    total = nb * T + gl.load(n_win_ptr + b)
    per = gl.cdiv(nb, ns)  # each sequence's blocks shared by the splits (ragged batches: per sequence)
    lo = gl.minimum(split * per, nb)
    hi = gl.minimum(lo + per, nb)
    # The window's tiles go to the last splits (as in the Triton kernel: the last splits hold the remainder of the
    # compressed blocks, often none).
    n_ring = gl.cdiv(total - nb * T, T)
    r_per = gl.cdiv(n_ring, ns)
    r_lo = gl.minimum((ns - 1 - split) * r_per, n_ring)
    r_hi = gl.minimum(r_lo + r_per, n_ring)
    zt = total
    if APPEND:  # the appended token's position is not a zero key
        zt = total + 1
        if (kvh == 0) & (split == 0):
            gl.store(tot_ptr + b, total)
    z_per = gl.cdiv(gl.maximum(out_len - zt, 0), ns)  # the zero keys past the length, shared by the splits
    z_lo = zt + split * z_per
    z_hi = gl.minimum(z_lo + z_per, gl.maximum(out_len, zt))
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [gl.num_warps(), 1], [1, 0])
    r = gl.arange(0, R, gl.SliceLayout(1, ld))
    q = gl.load(q_ptr + gl.expand_dims(head * n_rep + r, 1) * D + gl.expand_dims(gl.arange(0, D, gl.SliceLayout(0, ld)), 0),
                mask=gl.expand_dims(r < n_rep, 1), other=0.0).to(gl.float32)  # fmt: skip
    if ROTATE:  # into the cache's coordinates: q S / sqrt(D), S the Sylvester matrix (hadamard.fwht_rows), in fp32
        for st in gl.static_range(LOG2_D):
            q = _butterfly(q, R, D, 1 << st)
        q = gl.convert_layout(q, ld) * ROT_SCALE
    q = _stage_cols(q.to(gl.float16), R, D)
    qsum = gl.sum(q.to(gl.float32), axis=1)
    q_s = gl.allocate_shared_memory(gl.float16, [R, D], gl.NVMMASharedLayout.get_default_for([R, D], gl.float16),
                                    value=q)  # fmt: skip
    p_s = gl.allocate_shared_memory(gl.float16, [T, R], gl.NVMMASharedLayout.get_default_for([T, R], gl.float16))
    if PAIR:  # the second block's weights
        p_s1 = gl.allocate_shared_memory(gl.float16, [T, R], gl.NVMMASharedLayout.get_default_for([T, R], gl.float16))
    else:
        p_s1 = p_s
    stage: gl.constexpr = gl.NVMMASharedLayout.get_default_for([D, T], gl.float16)
    k_bufs = gl.allocate_shared_memory(gl.float16, [STAGES, D, T], stage)
    v_bufs = gl.allocate_shared_memory(gl.float16, [STAGES, D, T], stage)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    fence_async_shared()
    # (The argument lists are written out: a tuple variable would turn the constexprs into tensors.)
    if PRODUCERS == 1:
        gl.warp_specialize([
            (_consumer, (q_s, qsum, k_bufs, v_bufs, p_s, p_s1, ready, empty, k_scale_ptr, k_zero_ptr, v_scale_ptr,
                         v_zero_ptr, perm_ptr, mask_ptr, smb, acc_ptr, m_ptr, l_ptr, head * n_rep, n_rep, split, b, lo,
                         hi, r_lo, r_hi, nb, total, z_lo, z_hi, NB, qk_scale, T, D, R, STAGES, HAS_MASK, MASK_SCAN, MASK_BRANCH, SCAN, CSKIP, PAIR)),
            (_decode_producer, (pool_ptr, k_off_ptr, v_off_ptr, k_meta_ptr, v_meta_ptr, ring_k_ptr, ring_v_ptr, k_bufs,
                                v_bufs, ready, empty, b, kvh, lo, hi, r_lo, r_hi, nb, total, NB, H, S, T, D, STAGES,
                                PREFETCH, K_QBITS, V_QBITS, 0, 1, pool_words, L2_AHEAD, SKIP)),
        ], [D // 32], [PRODUCER_REGS])
    else:  # two decoding warpgroups taking turns over the blocks: twice the warps to hide the gathers' latency
        gl.warp_specialize([
            (_consumer, (q_s, qsum, k_bufs, v_bufs, p_s, p_s1, ready, empty, k_scale_ptr, k_zero_ptr, v_scale_ptr,
                         v_zero_ptr, perm_ptr, mask_ptr, smb, acc_ptr, m_ptr, l_ptr, head * n_rep, n_rep, split, b, lo,
                         hi, r_lo, r_hi, nb, total, z_lo, z_hi, NB, qk_scale, T, D, R, STAGES, HAS_MASK, MASK_SCAN, MASK_BRANCH, SCAN, CSKIP, PAIR)),
            (_decode_producer, (pool_ptr, k_off_ptr, v_off_ptr, k_meta_ptr, v_meta_ptr, ring_k_ptr, ring_v_ptr, k_bufs,
                                v_bufs, ready, empty, b, kvh, lo, hi, r_lo, r_hi, nb, total, NB, H, S, T, D, STAGES,
                                PREFETCH, K_QBITS, V_QBITS, 0, 2, pool_words, L2_AHEAD, SKIP)),
            (_decode_producer, (pool_ptr, k_off_ptr, v_off_ptr, k_meta_ptr, v_meta_ptr, ring_k_ptr, ring_v_ptr, k_bufs,
                                v_bufs, ready, empty, b, kvh, lo, hi, r_lo, r_hi, nb, total, NB, H, S, T, D, STAGES,
                                PREFETCH, K_QBITS, V_QBITS, 1, 2, pool_words, L2_AHEAD, SKIP)),
        ], [D // 32, D // 32], [PRODUCER_REGS, PRODUCER_REGS])  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------------------------
def supported(q: Tensor, lay: Layout, ring_dtype: torch.dtype, mask: Tensor | None, is_causal: bool,
              out_len: int) -> str | None:  # fmt: skip
    """``None`` where this kernel computes the attention of ``q`` over a layer of layout ``lay``, else why not."""
    if q.device.type == "cuda" and torch.cuda.get_device_capability(q.device) != (9, 0):
        return f"it needs an sm_90 GPU (Hopper), not sm_{''.join(map(str, torch.cuda.get_device_capability(q.device)))}"
    if (lay.pack_size, lay.block_size) != (16, T_BLOCK):
        return f"it decodes packs of 16 in 64-token blocks; this layer has packs of {lay.pack_size}, blocks of {lay.block_size}"
    if not (2 <= lay.k.qbits <= 4 and 2 <= lay.v.qbits <= 4):
        return (f"it decodes 2- to 4-bit ints (lanes of 4 in a pack's 64 bits); this layer has {lay.k.qbits}-bit K, "
                f"{lay.v.qbits}-bit V")
    if lay.k.grouping or lay.v.grouping:
        return "it reads token-grouped scales and zeros only"
    if q.dim() != 4 or q.shape[-1] not in HEAD_DIMS:
        return f"it needs head_dim {', '.join(map(str, HEAD_DIMS))}, got query shape {tuple(q.shape)}"
    if q.shape[2] != 1:
        return f"it computes one query per sequence (decode), got {q.shape[2]}"
    if q.shape[1] // lay.num_heads > ROWS:
        return f"it takes at most {ROWS} query heads per KV head, got {q.shape[1] // lay.num_heads}"
    if q.dtype not in (torch.bfloat16, torch.float16) or ring_dtype not in (torch.bfloat16, torch.float16):
        return f"it takes bf16/fp16 queries and caches (fp16 products), got {q.dtype} / {ring_dtype}"
    if is_causal:
        return "it has no causal mask"
    if mask is not None:
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        if mask.dtype != torch.bool or mask.shape[1] != 1 or mask.shape[2] != 1:
            return f"it reads a bool padding mask [B, 1, 1, L] only, got {mask.dtype} {tuple(mask.shape)}"
        if mask.stride(-1) != 1 or mask.shape[-1] < out_len:
            return f"its mask must be contiguous over {out_len} keys, got shape {tuple(mask.shape)} strides {mask.stride()}"
    return None


def splits_for(q: Tensor, num_heads: int, out_len: int, sms: int) -> int:
    """Programs per (sequence, KV head): ``WAVES`` waves of ``programs_per_sm`` per SM, at most one per block."""
    per_sm = programs_per_sm(q.shape[-1])
    return max(1, min(WAVES * per_sm * sms // (q.shape[0] * num_heads), -(-out_len // T_BLOCK)))


def partials(
    q: Tensor,
    pool: Tensor, k_offsets: Tensor, v_offsets: Tensor, k_meta: Tensor, v_meta: Tensor,
    k_scale: Tensor, k_zero: Tensor, v_scale: Tensor, v_zero: Tensor,
    ring_k: Tensor, ring_v: Tensor, n_blocks: Tensor, n_win: Tensor, perm: Tensor,
    mask: Tensor | None, out_len: int, splits: int, scale: float, rotate: bool, k_qbits: int, v_qbits: int,
    totals: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The per-split partials (acc ``[B, HQ, 1, NS, D]``, max and sum ``[B, HQ, 1, NS]``; log2 units) of the
    attention of the queries ``q`` (``rotate``: in the model's coordinates, rotated in the kernel; else in the
    cache's) over a layer's tensors (``k_qbits`` / ``v_qbits``: its layout's int widths), for
    ``attention._merge_kernel``. ``totals`` (int32 ``[B]``): the step appends a token that the merge attends
    (``fused_append``); each sequence's length before it is written there and the zero keys start after it. On CPU
    tensors
    it runs the kernel's body eagerly (``gluon_eager``): the tests' path, not a fast one. Traced code calls it as
    the op below; plain eager calls skip the dispatcher (host time, as ``_launch._Launcher`` does)."""
    B, HQ, _, D = q.shape
    H, S = ring_k.shape[1], ring_k.shape[2]
    acc = torch.empty(B, HQ, 1, splits, D, dtype=torch.float32, device=q.device)
    m = torch.empty(B, HQ, 1, splits, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    if mask is not None:
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
    smb = 0 if mask is None or mask.shape[0] == 1 else mask.stride(0)
    args = (q.contiguous(), pool, k_offsets, v_offsets, k_meta, v_meta, k_scale, k_zero, v_scale, v_zero, ring_k,
            ring_v, n_blocks, n_win, perm, n_win if mask is None else mask, smb, out_len, acc, m, l, k_scale.shape[1],
            H, S, HQ // H, scale * LOG2E, pool.numel(), n_win if totals is None else totals)  # fmt: skip
    # The bulk prefetches need 16-byte aligned addresses: a storage whose tensors are views at odd offsets (none
    # that PackKV makes) goes without them.
    ahead = L2_AHEAD if all(t.data_ptr() % 16 == 0 for t in (pool, k_meta, v_meta)) else 0
    meta = dict(T=T_BLOCK, D=D, R=ROWS, STAGES=STAGES, PRODUCER_REGS=PRODUCER_REGS, HAS_MASK=mask is not None,
                PREFETCH=PREFETCH, PRODUCERS=PRODUCERS, ROTATE=rotate, ROT_SCALE=1.0 / math.sqrt(D), LOG2_D=D.bit_length() - 1,
                K_QBITS=k_qbits, V_QBITS=v_qbits, MASK_SCAN=MASK_SCAN, MASK_BRANCH=MASK_BRANCH, SCAN=SCAN,
                L2_AHEAD=ahead, SKIP=SKIP, CSKIP=CSKIP, APPEND=totals is not None, PAIR=PAIR)
    if q.device.type == "cpu":
        from . import gluon_attention, gluon_eager

        gluon_eager.run(decode_attention_kernel, (B * H, splits), *args, module=gluon_attention, **meta)
    else:
        decode_attention_kernel[(B * H, splits)](*args, **meta, num_warps=4,
                                                 **({"maxnreg": maxnreg(D)} if MAXNREG else {}))  # fmt: skip
    return acc, m, l


# An opaque op: Inductor cannot inline a Gluon kernel as it does ``wrap_triton`` launches, and a custom op keeps the
# compiled step whole (one extern call, captured by CUDA graphs).
decode_partials = torch.library.custom_op("packkv::_gluon_decode_partials", mutates_args=())(partials)


@decode_partials.register_fake
def _(q, pool, k_offsets, v_offsets, k_meta, v_meta, k_scale, k_zero, v_scale, v_zero, ring_k, ring_v, n_blocks,
      n_win, perm, mask, out_len, splits, scale, rotate, k_qbits, v_qbits):  # fmt: skip
    B, HQ, _, D = q.shape
    m = q.new_empty(B, HQ, 1, splits, dtype=torch.float32)
    return q.new_empty(B, HQ, 1, splits, D, dtype=torch.float32), m, torch.empty_like(m)
