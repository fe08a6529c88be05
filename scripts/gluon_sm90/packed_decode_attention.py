"""PackKV's decode attention as a warp-specialized Gluon kernel: a prototype compiled for sm_90 without a GPU,
never run (Gluon has no interpreter). It measures what the structure would cost per tile, the number the
Triton kernel cannot get below (``packkv_ops/kernels/NOTES.md``, 2026-12-05c).

    python scripts/gluon_sm90/packed_decode_attention.py

One program attends one KV head's query rows (8: Llama-3.1-8B's 4 padded to the wgmma's N) to a run of compressed
64-token blocks in PackKV's format, for one layout: packs of 16 tokens, 4-bit K ints with 7-bit fields, 3-bit V
ints with 5-bit fields (``k_rel`` 0.1 / ``v_rel`` 0.2 and the defaults 0.07 / 0.15), token-grouped scales and
zeros, the exact window (the ring's bf16 tokens, as fp16 tiles), zero keys up to ``out_len`` and a decode step's
bool padding mask (``HAS_MASK``: one row per sequence); no rotation (the caller rotates the query and the output),
no split merge (the caller merges). Four producer warps decode a block as the Triton
kernel does (``tiles.py``: fields per channel and row, one prefix scan for both streams' pack starts, each pack's 64
bits, lane extraction), but each thread owns 4 consecutive packs in stream order (one warp scan instead of four)
and stores its channels' 16 tokens as 32-byte runs into a shared stage ``[D, T]``; the consumer warpgroup runs
``S = K q^T`` and ``O^T += V^T P`` as wgmma from the stages, with the softmax and the scales in between.

Compiled here: producer loop 542 sm_90 instructions per block and warp (176 of them the lane extraction, as in the
Triton kernel; the scan 33 instead of ~127), consumer loop 201 (234 with the mask); 4 + 4 warps, 68 KB of shared memory with 2 stages.
Its body runs eagerly on the CPU (``eager.py``; ``tests/test_gluon_prototype.py``: 4e-4 of the largest output
against the reference attention, with zero keys past the length and a padding mask), which checks its logic, not
its compilation. Never run on a GPU:
``--gpu`` (on the GPU machine) compares it with the Triton kernel on a real ``PackedLayer`` and times both beside
SDPA.
"""

from __future__ import annotations

from decode_attention_pipeline import innermost_loop
from sass import compile_gluon, report, sass_of
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)


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
    j = gl.arange(0, 4, gl.SliceLayout(0, gl.SliceLayout(2, L3))).to(gl.uint32)
    w = gl.convert_layout(w, PK)
    f = gl.convert_layout(f, PK)
    m = (gl.full(w.shape, 1, gl.uint32, PK) << w) - 1

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
    LR: gl.constexpr = gl.BlockedLayout([8, 1], [16, 2], [1, gl.num_warps()], [0, 1])  # 16-byte loads along D
    cc = gl.arange(0, D, gl.SliceLayout(1, LR))
    pos = p0 + gl.arange(0, T, gl.SliceLayout(0, LR))
    live = gl.expand_dims(pos < total, 0)
    slot = gl.expand_dims((b * H + kvh) * S + pos % S, 0)
    x = gl.load(ring_ptr + slot * D + gl.expand_dims(cc, 1), mask=live, other=0.0)
    return x.to(gl.float16)


@gluon.jit
def _decode_producer(pool_ptr, k_off_ptr, v_off_ptr, k_meta_ptr, v_meta_ptr, ring_k_ptr, ring_v_ptr, k_bufs, v_bufs,
                     ready, empty, b, kvh, lo, hi, r_lo, r_hi, nb, total, NB, H, S, T: gl.constexpr,
                     D: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    P: gl.constexpr = 16
    N: gl.constexpr = (T // P) * D  # packs per block and stream, in stream order (row-major: row, channel)
    K_QBITS: gl.constexpr = 4
    K_MBITS: gl.constexpr = 7
    V_QBITS: gl.constexpr = 3
    V_MBITS: gl.constexpr = 5
    # Each thread: 4 consecutive packs of one row (channels 4l .. 4l+3), warp w = pack row w.
    L2: gl.constexpr = gl.BlockedLayout([4, 4], [32, 1], [gl.num_warps(), 1], [1, 0])
    # The same packs per thread as a 1-D layout: the scan does not take a slice layout; the conversions to
    # SliceLayout(1, L2) below move nothing (same threads, same registers).
    LB: gl.constexpr = gl.BlockedLayout([4], [32], [gl.num_warps()], [0])
    LP: gl.constexpr = gl.SliceLayout(1, L2)
    for i in range(hi - lo):
        s = i % STAGES
        chunk = (b * NB + lo + i) * H + kvh  # PackedLayer's [B, NB, H] chunks
        fk = _fields_by_4(k_meta_ptr + chunk * (N * K_MBITS // 32), N, D, K_MBITS, LB)
        fv = _fields_by_4(v_meta_ptr + chunk * (N * V_MBITS // 32), N, D, V_MBITS, LB)
        sk = (fk >> K_QBITS) * P
        sv = (fv >> V_QBITS) * P
        both = sk | (sv << 16)
        excl = gl.associative_scan(both, 0, _add) - both  # both streams' pack starts, 16 bits each
        k_lo, k_hi = _pack_bits(pool_ptr + gl.load(k_off_ptr + chunk), (excl & 0xFFFF).to(gl.int32), sk.to(gl.int32))
        v_lo, v_hi = _pack_bits(pool_ptr + gl.load(v_off_ptr + chunk), (excl >> 16).to(gl.int32), sv.to(gl.int32))
        kx = _pack_values(gl.convert_layout(fk, LP), gl.convert_layout(k_lo, LP), gl.convert_layout(k_hi, LP),
                          K_QBITS, L2)  # [N, 16]: pack (row r, channel c), its 16 tokens  # fmt: skip
        vx = _pack_values(gl.convert_layout(fv, LP), gl.convert_layout(v_lo, LP), gl.convert_layout(v_hi, LP),
                          V_QBITS, L2)  # fmt: skip
        # [D, T]: channel c, token 16 r + t (lane order within each pack)
        kt = gl.reshape(gl.permute(gl.reshape(kx, (T // P, D, P)), (1, 0, 2)), (D, T))
        vt = gl.reshape(gl.permute(gl.reshape(vx, (T // P, D, P)), (1, 0, 2)), (D, T))
        mbarrier.wait(empty.index(s), phase=((i // STAGES) & 1) ^ 1)
        k_bufs.index(s).store(kt)
        v_bufs.index(s).store(vt)
        fence_async_shared()
        gl.thread_barrier()  # every producer thread's stores before the one arrive
        mbarrier.arrive(ready.index(s), count=1)
    # Then the split's tiles of the exact window (the ring), in token order.
    n_c = hi - lo
    for j in range(r_hi - r_lo):
        i = n_c + j
        s = i % STAGES
        p0 = (nb + r_lo + j) * T
        kt = _ring_tile(ring_k_ptr, b, kvh, p0, total, H, S, T, D)
        vt = _ring_tile(ring_v_ptr, b, kvh, p0, total, H, S, T, D)
        mbarrier.wait(empty.index(s), phase=((i // STAGES) & 1) ^ 1)
        k_bufs.index(s).store(kt)
        v_bufs.index(s).store(vt)
        fence_async_shared()
        gl.thread_barrier()
        mbarrier.arrive(ready.index(s), count=1)


@gluon.jit
def _consumer(q_s, qsum, k_bufs, v_bufs, p_s, ready, empty, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr,
              perm_ptr, mask_ptr, smb, o_ptr, m_ptr, l_ptr, b, lo, hi, r_lo, r_hi, nb, total, zhi, NB, qk_scale,
              T: gl.constexpr, D: gl.constexpr, R: gl.constexpr, STAGES: gl.constexpr,
              HAS_MASK: gl.constexpr):  # fmt: skip
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                  instr_shape=[16, R, 16])  # fmt: skip
    rows: gl.constexpr = gl.SliceLayout(0, mma)
    toks: gl.constexpr = gl.SliceLayout(1, mma)
    qs = gl.convert_layout(qsum, rows)
    i_t = gl.arange(0, T, toks)
    k8 = i_t % 8
    lane_tok = i_t - k8 + (k8 & 1) * 4 + (k8 >> 1)  # the stage's rows are in lane order
    m_i = gl.full([R], float("-inf"), gl.float32, rows)
    l_t = gl.zeros([T, R], gl.float32, mma)
    z_t = gl.zeros([T, R], gl.float32, mma)
    o_t = gl.zeros([D, R], gl.float32, mma)
    n_c = hi - lo
    for i in range(n_c + r_hi - r_lo):
        s = i % STAGES
        # Compressed blocks first (rows in lane order, token-grouped scales and zeros: [B, NB, 1, T, 1]), then the
        # ring's exact tiles (rows in token order, scale 1, zero 0, positions past the length masked).
        packed = i < n_c
        tok = (b * NB + lo + i) * T + lane_tok
        ks = gl.load(k_scale_ptr + tok, mask=packed & (i_t >= 0), other=1.0).to(gl.float32)
        kz = gl.load(k_zero_ptr + tok, mask=packed & (i_t >= 0), other=0).to(gl.float32)
        vs = gl.load(v_scale_ptr + tok, mask=packed & (i_t >= 0), other=1.0).to(gl.float32)
        vz = gl.load(v_zero_ptr + tok, mask=packed & (i_t >= 0), other=0).to(gl.float32)
        live = packed | ((nb + r_lo + i - n_c) * T + i_t < total)
        if HAS_MASK:  # a decode step's padding mask, one row per sequence ([B, 1, 1, L] bool)
            perm = gl.load(perm_ptr + tok, mask=packed & (i_t >= 0), other=0).to(gl.int32)
            pos = gl.where(packed, (lo + i) * T + perm, (nb + r_lo + i - n_c) * T + i_t).to(gl.int32)
            live = live & (gl.load(mask_ptr + b * smb + pos, mask=live, other=0) != 0)
        mbarrier.wait(ready.index(s), phase=(i // STAGES) & 1)
        acc = warpgroup_mma(k_bufs.index(s).permute([1, 0]), q_s.permute([1, 0]), gl.zeros([T, R], gl.float32, mma),
                            use_acc=False, is_async=True)  # fmt: skip
        raw = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        sc = (raw + gl.expand_dims(kz, 1) * gl.expand_dims(qs, 0)) * gl.expand_dims(ks * qk_scale, 1)
        sc = gl.where(gl.expand_dims(live, 1), sc, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(sc, axis=0))
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
        p = gl.exp2(sc - gl.expand_dims(m_safe, 0))
        alpha = gl.expand_dims(gl.exp2(m_i - m_safe), 0)
        pvs = p * gl.expand_dims(vs, 1)
        l_t = l_t * alpha + p
        z_t = z_t * alpha + pvs * gl.expand_dims(vz, 1)
        o_t = o_t * alpha
        m_i = m_new
        p_s.store(pvs.to(gl.float16))  # V's scale folded into the weights (no per-tile normalization)
        fence_async_shared()
        gl.thread_barrier()
        acc = warpgroup_mma(v_bufs.index(s), p_s, o_t, is_async=True)
        o_t = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index(s), count=1)
    o_t = o_t + gl.expand_dims(gl.sum(z_t, axis=0), 0)
    l_i = gl.sum(l_t, axis=0)
    # Zero keys from the length up to out_len (a compiled step passes the storage's capacity), counted once (split
    # 0: zhi > total): each scores exactly 0 and adds nothing to O, so only the count enters the softmax.
    zl: gl.constexpr = gl.BlockedLayout([8], [32], [gl.num_warps()], [0])
    cnt = gl.zeros([1024], gl.float32, zl)
    for z0 in range(total, zhi, 1024):
        zpos = z0 + gl.arange(0, 1024, zl)
        vis = zpos < zhi
        if HAS_MASK:
            vis = vis & (gl.load(mask_ptr + b * smb + zpos, mask=vis, other=0) != 0)
        cnt = cnt + gl.where(vis, 1.0, 0.0)
    n = gl.sum(cnt, axis=0)
    m_new = gl.where(n > 0, gl.maximum(m_i, 0.0), m_i)
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_safe)
    l_i = l_i * alpha + n * gl.exp2(-m_safe)
    o_t = o_t * gl.expand_dims(alpha, 0)
    m_i = m_new
    cd = gl.arange(0, D, gl.SliceLayout(1, mma))
    cr = gl.arange(0, R, rows)
    gl.store(o_ptr + gl.expand_dims(cr, 0) * D + gl.expand_dims(cd, 1), o_t)
    gl.store(m_ptr + cr, m_i)
    gl.store(l_ptr + cr, l_i)


@gluon.jit
def packed_decode_attention(q_ptr, pool_ptr, k_off_ptr, v_off_ptr, k_meta_ptr, v_meta_ptr, k_scale_ptr, k_zero_ptr,
                            v_scale_ptr, v_zero_ptr, ring_k_ptr, ring_v_ptr, n_blocks_ptr, n_win_ptr, perm_ptr,
                            mask_ptr, smb, out_len, o_ptr, m_ptr, l_ptr, NB, H, S, per_split, qk_scale,
                            T: gl.constexpr, D: gl.constexpr, R: gl.constexpr, STAGES: gl.constexpr,
                            PRODUCER_REGS: gl.constexpr = 160, HAS_MASK: gl.constexpr = False):  # fmt: skip
    """Program (batch x KV head, split): the KV head's ``R`` query rows (``q_ptr``: ``[B * H, R, D]`` fp16) against
    the split's ``per_split`` compressed blocks of a ``PackedLayer`` (its pool, offsets, metadata, scales and
    zeros as they are stored); writes the split's unnormalized ``O``, row maxima (log2 units) and sums."""
    head = gl.program_id(0)
    split = gl.program_id(1)
    part = head * gl.num_programs(1) + split
    b = head // H
    kvh = head % H
    nb = gl.load(n_blocks_ptr + b)
    total = nb * T + gl.load(n_win_ptr + b)
    lo = gl.minimum(split * per_split, nb)
    hi = gl.minimum(lo + per_split, nb)
    # The window's tiles go to the last splits (as in the Triton kernel: the last splits hold the remainder of the
    # compressed blocks, often none).
    n_ring = gl.cdiv(total - nb * T, T)
    r_per = gl.cdiv(n_ring, gl.num_programs(1))
    r_lo = gl.minimum((gl.num_programs(1) - 1 - split) * r_per, n_ring)
    r_hi = gl.minimum(r_lo + r_per, n_ring)
    zhi = gl.where(split == 0, gl.maximum(out_len, total), total)  # split 0 counts the zero keys past the length
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [gl.num_warps(), 1], [1, 0])
    q = gl.load(q_ptr + gl.expand_dims(head * R + gl.arange(0, R, gl.SliceLayout(1, ld)), 1) * D
                + gl.expand_dims(gl.arange(0, D, gl.SliceLayout(0, ld)), 0))  # fmt: skip
    qsum = gl.sum(q.to(gl.float32), axis=1)
    q_s = gl.allocate_shared_memory(gl.float16, [R, D], gl.NVMMASharedLayout.get_default_for([R, D], gl.float16),
                                    value=q)  # fmt: skip
    p_s = gl.allocate_shared_memory(gl.float16, [T, R], gl.NVMMASharedLayout.get_default_for([T, R], gl.float16))
    stage: gl.constexpr = gl.NVMMASharedLayout.get_default_for([D, T], gl.float16)
    k_bufs = gl.allocate_shared_memory(gl.float16, [STAGES, D, T], stage)
    v_bufs = gl.allocate_shared_memory(gl.float16, [STAGES, D, T], stage)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    fence_async_shared()
    gl.warp_specialize([
        (_consumer, (q_s, qsum, k_bufs, v_bufs, p_s, ready, empty, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr,
                     perm_ptr, mask_ptr, smb, o_ptr + part * R * D, m_ptr + part * R, l_ptr + part * R, b, lo, hi,
                     r_lo, r_hi, nb, total, zhi, NB, qk_scale, T, D, R, STAGES, HAS_MASK)),
        (_decode_producer, (pool_ptr, k_off_ptr, v_off_ptr, k_meta_ptr, v_meta_ptr, ring_k_ptr, ring_v_ptr, k_bufs,
                            v_bufs, ready, empty, b, kvh, lo, hi, r_lo, r_hi, nb, total, NB, H, S, T, D, STAGES)),
    ], [4], [PRODUCER_REGS])  # fmt: skip


ORDER = ["q_ptr", "pool_ptr", "k_off_ptr", "v_off_ptr", "k_meta_ptr", "v_meta_ptr", "k_scale_ptr", "k_zero_ptr",
         "v_scale_ptr", "v_zero_ptr", "ring_k_ptr", "ring_v_ptr", "n_blocks_ptr", "n_win_ptr", "perm_ptr", "mask_ptr",
         "smb", "out_len", "o_ptr", "m_ptr", "l_ptr", "NB", "H", "S", "per_split", "qk_scale", "T", "D", "R", "STAGES",
         "PRODUCER_REGS", "HAS_MASK"]  # fmt: skip


def run_on_gpu(batch: int, context: int, maxnreg: int | None = None, producer_regs: int = 160) -> None:
    """On a GPU: a real ``PackedLayer`` (random bf16 K/V compressed by ``append_``, ``k_rel`` 0.1 / ``v_rel`` 0.2,
    no rotation), this kernel against the Triton kernel over the whole cache (blocks and window), then both timed (medians
    of CUDA-graph replays, L2 flushed: ``benchmarks/kernels.py``'s ``bench_ms``) beside SDPA on the bf16 cache.
    ``maxnreg`` caps the registers a launch reserves per thread (uncapped, ptxas reports 255: one program per SM);
    ``producer_regs`` is what ``setmaxnreg`` gives the decoding warps out of that pool."""
    import math
    import sys
    from pathlib import Path

    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from kernels import bench_ms, compress, make_kv

    from packkv.ops import PackKVConfig
    from packkv.ops.kernels import attention as triton_attention
    from packkv.ops.kernels._launch import num_sms

    cfg = PackKVConfig(k_rel=0.1, v_rel=0.2, rotation="none")
    heads, n_rep, d, r = 8, 4, 128, 8
    k, v = make_kv(batch, context, heads, d, "random", "cuda")
    st, _ = compress(cfg, k, v)
    lay = st.layout
    assert (lay.pack_size, lay.block_size, lay.k.qbits, lay.k.mbits, lay.v.qbits, lay.v.mbits) == (16, 64, 4, 7, 3, 5)
    assert lay.k.grouping == lay.v.grouping == 0, "token-grouped scales and zeros"
    t = lay.block_size
    out_len = int(st.n_blocks[0]) * t + int(st.n_win[0])  # every stored token: compressed blocks and window
    q = torch.randn(batch, heads * n_rep, 1, d, device="cuda", dtype=torch.bfloat16)
    rows = torch.zeros(batch * heads, r, d, device="cuda", dtype=torch.float16)
    rows[:, :n_rep] = q.view(batch * heads, n_rep, d).half()
    splits = max(1, 3 * num_sms(q.device) // (batch * heads))  # 68 KB of shared memory: 3 programs per SM
    per = -(-int(st.n_blocks[0]) // splits)
    n = batch * heads * splits
    o = torch.empty(n, r, d, device="cuda", dtype=torch.float32)
    m = torch.empty(n, r, device="cuda", dtype=torch.float32)
    l = torch.empty(n, r, device="cuda", dtype=torch.float32)
    scale = 1.4426950408889634 / math.sqrt(d)

    def kernel(mask=None, length=out_len):
        packed_decode_attention[(batch * heads, splits)](
            rows, st.pool, st.k_offsets, st.v_offsets, st.k_meta, st.v_meta, st.k_scale, st.k_zero, st.v_scale,
            st.v_zero, st.ring_k, st.ring_v, st.n_blocks, st.n_win, st.perm, st.n_win if mask is None else mask,
            0 if mask is None else length, length, o, m, l, st.block_capacity, heads, lay.ring_size, per, scale, T=t,
            D=d, R=r, STAGES=2, PRODUCER_REGS=producer_regs, HAS_MASK=mask is not None, num_warps=4,
            **({"maxnreg": maxnreg} if maxnreg else {}))  # fmt: skip

    def merged(mask=None, length=out_len):
        kernel(mask, length)
        mm = m.view(batch * heads, splits, r)
        w = torch.exp2(mm - mm.amax(1, keepdim=True))
        out = (o.view(batch * heads, splits, r, d) * w[..., None]).sum(1) / (l.view(batch * heads, splits, r) * w).sum(1)[..., None]
        return out[:, :n_rep].reshape(batch, heads * n_rep, 1, d)

    want = triton_attention.attention(q, st, out_len, None, False, None).float()
    got = merged()
    err = ((got - want).abs().max() / want.abs().max()).item()
    # A decode step's case too: left padding, holes, and zero keys up to a larger out_len.
    longer = out_len + 100
    mask = torch.rand(batch, 1, 1, longer, device="cuda") > 0.1
    mask[..., :37] = False
    want_m = triton_attention.attention(q, st, longer, mask, False, None).float()
    got_m = merged(mask, longer)
    err_m = ((got_m - want_m).abs().max() / want_m.abs().max()).item()
    t_proto = bench_ms(kernel)
    t_triton = bench_ms(lambda: triton_attention.attention(q, st, out_len, None, False, None))
    t_sdpa = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    print(f"maxnreg {maxnreg}, producer registers {producer_regs}: B{batch} / {out_len} tokens: max error {err:.2e} "
          f"of the largest output vs the Triton kernel ({err_m:.2e} with a padding mask and zero keys); "
          f"Gluon kernel {t_proto:.3f} ms (without its merge), Triton kernel {t_triton:.3f} ms (with its merge), "
          f"SDPA on bf16 {t_sdpa:.3f} ms", flush=True)  # fmt: skip


def main() -> None:
    sig = {name: "*i32" for name in ("pool_ptr", "k_off_ptr", "v_off_ptr", "k_meta_ptr", "v_meta_ptr", "n_blocks_ptr",
                                     "n_win_ptr")}  # fmt: skip
    sig |= {"q_ptr": "*fp16", "k_scale_ptr": "*bf16", "v_scale_ptr": "*bf16", "k_zero_ptr": "*i16",
            "v_zero_ptr": "*i16", "ring_k_ptr": "*bf16", "ring_v_ptr": "*bf16", "o_ptr": "*fp32", "m_ptr": "*fp32",
            "l_ptr": "*fp32", "NB": "i32", "H": "i32", "S": "i32", "perm_ptr": "*u8", "mask_ptr": "*i1", "smb": "i32",
            "out_len": "i32",
            "per_split": "i32", "qk_scale": "fp32", "T": "constexpr", "D": "constexpr", "R": "constexpr",
            "STAGES": "constexpr", "PRODUCER_REGS": "constexpr", "HAS_MASK": "constexpr"}  # fmt: skip
    sig = {k: sig[k] for k in ORDER}
    aligned = {(i,): [["tt.divisibility", 16]] for i, k in enumerate(ORDER) if k.endswith("_ptr")}
    ck = compile_gluon(packed_decode_attention, sig, dict(T=64, D=128, R=8, STAGES=2, PRODUCER_REGS=160,
                                                          HAS_MASK=True), aligned)  # the decode step's variant
    report("PackKV decode attention, warp-specialized (4 decode warps, 4 wgmma warps)", ck,
           ("HGMMA", "SYNCS", "BAR", "SHFL", "LDG", "STS", "HADD2", "LOP3", "PRMT"))  # fmt: skip
    sass = sass_of(ck)
    for part, opcode in (("consumer", "HGMMA"), ("producer", "HADD2")):
        n, top = innermost_loop(sass, opcode)
        print(f"{part} loop: {n} instructions per 64-token block and warp ({top})")


if __name__ == "__main__":
    import sys

    if "--gpu" in sys.argv:  # on the GPU machine; a variant that hangs (setmaxnreg) leaves the lines before it
        for maxnreg, producer_regs in ((None, 160), (128, 160), (128, 128)):
            for batch, context in ((8, 32768), (1, 131072)):
                run_on_gpu(batch, context, maxnreg, producer_regs)
    else:
        main()
