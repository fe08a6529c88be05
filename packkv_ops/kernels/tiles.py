"""Triton tile loaders shared by the decompress and attention kernels.

A *virtual block* ``v`` of a sequence covers positions ``[v*T, (v+1)*T)``. Below ``n_blocks`` it is a compressed
chunk (decoded here, twin of ``codec.unpack_chunks`` + ``dequantize``); above, its positions are exact ring tokens
up to the sequence's length and zero keys/values after it (what ``decompress`` returns there).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .bits import read_bits


@triton.jit
def decode_chunk(
    pool_ptr, meta_ptr, off_ptr, scale_ptr, zero_ptr, b, n, kvh, NB, H,
    T: tl.constexpr, D: tl.constexpr, P: tl.constexpr, QBITS: tl.constexpr, MBITS: tl.constexpr,
    MW: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    """fp32 values ``[T, D]`` of chunk (b, n, kvh), in repacked token order."""
    R: tl.constexpr = T // P
    chunk = (b * NB + n) * H + kvh
    rr = tl.arange(0, R)
    cc = tl.arange(0, D)
    # Pack metadata: field r*D + c holds the pack's minimum (low QBITS bits) and width.
    f = read_bits(meta_ptr + chunk * MW, (rr[:, None] * D + cc[None, :]) * MBITS, MBITS)
    mu = f & ((1 << QBITS) - 1)
    w = f >> QBITS
    # Packs lie back to back in (row, channel) order: a prefix sum of their sizes gives each start.
    bits = tl.reshape(w * P, (R * D,))
    pbase = tl.reshape(tl.cumsum(bits, 0) - bits, (R, D))
    mu_t = tl.reshape(tl.broadcast_to(mu[:, None, :], (R, P, D)), (T, D))
    w_t = tl.reshape(tl.broadcast_to(w[:, None, :], (R, P, D)), (T, D))
    pb_t = tl.reshape(tl.broadcast_to(pbase[:, None, :], (R, P, D)), (T, D))
    tt = tl.arange(0, T)
    off = tl.load(off_ptr + chunk)
    delta = read_bits(pool_ptr + off, pb_t + (tt % P)[:, None] * w_t, w_t)
    q = (mu_t + delta).to(tl.float32)
    if GROUP == 2:  # per (head, channel) over the block
        g = (b * NB + n) * H * D + kvh * D + cc
        s = tl.load(scale_ptr + g).to(tl.float32)[None, :]
        z = tl.load(zero_ptr + g).to(tl.float32)[None, :]
    else:
        if GROUP == 1:  # per (token, head)
            g = (b * NB + n) * H * T + kvh * T + tt
        else:  # per token over all heads
            g = (b * NB + n) * T + tt
        s = tl.load(scale_ptr + g).to(tl.float32)[:, None]
        z = tl.load(zero_ptr + g).to(tl.float32)[:, None]
    return (q + z) * s


@triton.jit
def chunk_positions(perm_ptr, b, n, NB, T: tl.constexpr):
    """Original position of each repacked slot of block n."""
    tt = tl.arange(0, T)
    return n * T + tl.load(perm_ptr + (b * NB + n) * T + tt).to(tl.int32)


@triton.jit
def exact_tile(ring_ptr, b, kvh, v, total, H, S, T: tl.constexpr, D: tl.constexpr):
    """Positions ``[v*T, (v+1)*T)``: ring tokens below ``total``, zeros after (fp32 ``[T, D]``)."""
    pos = v * T + tl.arange(0, T)
    cc = tl.arange(0, D)
    live = pos < total
    slot = pos % S
    x = tl.load(ring_ptr + ((b * H + kvh) * S + slot)[:, None] * D + cc[None, :], mask=live[:, None], other=0.0)
    return x.to(tl.float32), pos


@triton.jit
def funnel_shift(lo, hi, sh, USE_ASM: tl.constexpr):
    """Low 32 bits of (hi:lo) >> sh (sh < 32): one SHF instruction on the GPU."""
    if USE_ASM:
        return tl.inline_asm_elementwise(
            "shf.r.wrap.b32 $0, $1, $2, $3;", "=r,r,r,r", [lo, hi, sh], dtype=tl.uint32, is_pure=True, pack=1
        )
    else:
        return (lo >> sh) | ((hi << 1) << (31 - sh))


@triton.jit
def funnel_clamp(lo, hi, sh, USE_ASM: tl.constexpr):
    """Low 32 bits of (hi:lo) >> sh for sh <= 32 (sh = 32 gives hi): one clamped SHF on the GPU."""
    if USE_ASM:
        return tl.inline_asm_elementwise(
            "shf.r.clamp.b32 $0, $1, $2, $3;", "=r,r,r,r", [lo, hi, sh], dtype=tl.uint32, is_pure=True, pack=1
        )
    else:
        s = sh & 31
        return tl.where(sh >= 32, hi, (lo >> s) | ((hi << 1) << (31 - s)))


@triton.jit
def decode_ints(
    pool_ptr, meta_ptr, off_ptr, b, n, kvh, NB, H,
    T: tl.constexpr, D: tl.constexpr, P: tl.constexpr, QBITS: tl.constexpr, MBITS: tl.constexpr,
    MW: tl.constexpr, USE_ASM: tl.constexpr,
):  # fmt: skip
    """Quantized ints ``[T, D]`` (int32) of chunk (b, n, kvh), repacked order: the fast path of ``decode_chunk``
    (payload words read unconditionally: the pool keeps a spare word after the last chunk)."""
    R: tl.constexpr = T // P
    chunk = (b * NB + n) * H + kvh
    rr = tl.arange(0, R)
    cc = tl.arange(0, D)
    f = read_bits(meta_ptr + chunk * MW, (rr[:, None] * D + cc[None, :]) * MBITS, MBITS)
    w = f >> QBITS
    bits = tl.reshape(w * P, (R * D,))
    pbase = tl.reshape(tl.cumsum(bits, 0) - bits, (R, D))
    mu_t = tl.reshape(tl.broadcast_to((f & ((1 << QBITS) - 1))[:, None, :], (R, P, D)), (T, D))
    w_t = tl.reshape(tl.broadcast_to(w[:, None, :], (R, P, D)), (T, D))
    pb_t = tl.reshape(tl.broadcast_to(pbase[:, None, :], (R, P, D)), (T, D))
    bitpos = pb_t + (tl.arange(0, T) % P)[:, None] * w_t
    base = pool_ptr + tl.load(off_ptr + chunk)
    widx = bitpos >> 5
    lo = tl.load(base + widx).to(tl.uint32, bitcast=True)
    hi = tl.load(base + widx + 1).to(tl.uint32, bitcast=True)
    v = funnel_shift(lo, hi, (bitpos & 31).to(tl.uint32), USE_ASM)
    return (v.to(tl.int32, bitcast=True) & ((1 << w_t) - 1)) + mu_t


@triton.jit
def ints_to_f16(q):
    """Exact fp16 of ints in [0, 1024): 0x6400 | q is the half 1024 + q (no int->float conversion unit)."""
    return (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0


@triton.jit
def group_scale(scale_ptr, zero_ptr, b, n, kvh, NB, H, T: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr):
    """(scale, zero) of a block as fp32: ``[T]`` for token groupings, ``[D]`` for channel grouping."""
    if GROUP == 2:
        g = (b * NB + n) * H * D + kvh * D + tl.arange(0, D)
    elif GROUP == 1:
        g = (b * NB + n) * H * T + kvh * T + tl.arange(0, T)
    else:
        g = (b * NB + n) * T + tl.arange(0, T)
    return tl.load(scale_ptr + g).to(tl.float32), tl.load(zero_ptr + g).to(tl.float32)


@triton.jit
def decode_rows(
    base_ptr, meta_ptr, r0, bit0,
    TS: tl.constexpr, D: tl.constexpr, P: tl.constexpr, QBITS: tl.constexpr, MBITS: tl.constexpr,
    USE_ASM: tl.constexpr,
):  # fmt: skip
    """Ints ``[TS, D]`` of the ``TS // P`` pack rows starting at row ``r0`` of one chunk (meta at ``meta_ptr``,
    payload at ``base_ptr``), whose payload starts ``bit0`` bits into the chunk. Returns the ints and the bit
    offset of the next row. Small tiles keep the decode in registers."""
    RS: tl.constexpr = TS // P
    cc = tl.arange(0, D)
    tt = tl.arange(0, TS)
    if RS == 1:
        f = read_bits(meta_ptr, (r0 * D + cc) * MBITS, MBITS)
        w = f >> QBITS
        size = w * P
        start = bit0 + tl.cumsum(size, 0) - size
        bitpos = start[None, :] + tt[:, None] * w[None, :]
        w_t = tl.broadcast_to(w[None, :], (TS, D))
        mu_t = tl.broadcast_to((f & ((1 << QBITS) - 1))[None, :], (TS, D))
        nxt = bit0 + tl.sum(size, 0)
    else:  # pack_size 8: two rows per tile of 16 tokens
        rr = tl.arange(0, RS)
        f = read_bits(meta_ptr, ((r0 + rr)[:, None] * D + cc[None, :]) * MBITS, MBITS)
        w = f >> QBITS
        size = tl.reshape(w * P, (RS * D,))
        start = tl.reshape(bit0 + tl.cumsum(size, 0) - size, (RS, D))
        w_t = tl.reshape(tl.broadcast_to(w[:, None, :], (RS, P, D)), (TS, D))
        mu_t = tl.reshape(tl.broadcast_to((f & ((1 << QBITS) - 1))[:, None, :], (RS, P, D)), (TS, D))
        st_t = tl.reshape(tl.broadcast_to(start[:, None, :], (RS, P, D)), (TS, D))
        bitpos = st_t + (tt % P)[:, None] * w_t
        nxt = bit0 + tl.sum(size, 0)
    widx = bitpos >> 5
    lo = tl.load(base_ptr + widx).to(tl.uint32, bitcast=True)
    hi = tl.load(base_ptr + widx + 1).to(tl.uint32, bitcast=True)  # the pool keeps a spare word at its end
    v = funnel_shift(lo, hi, (bitpos & 31).to(tl.uint32), USE_ASM)
    return (v.to(tl.int32, bitcast=True) & ((1 << w_t) - 1)) + mu_t, nxt


@triton.jit
def group_scale_rows(
    scale_ptr, zero_ptr, b, n, kvh, NB, H, t0, T: tl.constexpr, TS: tl.constexpr, D: tl.constexpr,
    GROUP: tl.constexpr, LANE_ORDER: tl.constexpr = False,
):  # fmt: skip
    """(scale, zero) as fp32 for tokens ``t0 .. t0+TS`` of a block: ``[TS]`` (in lane order with ``LANE_ORDER``,
    ``lane_order_tokens``), or ``[D]`` for channel grouping."""
    if GROUP == 2:
        g = (b * NB + n) * H * D + kvh * D + tl.arange(0, D)
    elif GROUP == 1:
        g = (b * NB + n) * H * T + kvh * T + t0 + lane_order_tokens(TS, LANE_ORDER)
    else:
        g = (b * NB + n) * T + t0 + lane_order_tokens(TS, LANE_ORDER)
    return tl.load(scale_ptr + g).to(tl.float32), tl.load(zero_ptr + g).to(tl.float32)


@triton.jit
def exact_rows(ring_ptr, b, kvh, p0, total, H, S, TS: tl.constexpr, D: tl.constexpr):
    """Positions ``p0 .. p0+TS``: ring tokens below ``total``, zeros after (fp32 ``[TS, D]``)."""
    pos = p0 + tl.arange(0, TS)
    live = pos < total
    x = tl.load(ring_ptr + ((b * H + kvh) * S + pos % S)[:, None] * D + tl.arange(0, D)[None, :],
                mask=live[:, None], other=0.0)  # fmt: skip
    return x.to(tl.float32), pos


@triton.jit
def decode_rows_packwise(
    base_ptr, meta_ptr, r0, bit0,
    TS: tl.constexpr, D: tl.constexpr, P: tl.constexpr, QBITS: tl.constexpr, MBITS: tl.constexpr,
    USE_ASM: tl.constexpr,
):  # fmt: skip
    """``decode_rows`` for packs of at most 64 bits (``P * QBITS <= 64``): the words of each pack are loaded once
    and funnel-shifted into a 64-bit aligned pack (lo, hi); each value is then a shift of it. Per value this is a
    handful of ALU instructions and no memory access, against two gathered loads in ``decode_rows``."""
    RS: tl.constexpr = TS // P
    rr = tl.arange(0, RS)
    cc = tl.arange(0, D)
    f = read_bits(meta_ptr, ((r0 + rr)[:, None] * D + cc[None, :]) * MBITS, MBITS)  # [RS, D]
    w = f >> QBITS
    size = tl.reshape(w * P, (RS * D,))
    start = tl.reshape(bit0 + tl.cumsum(size, 0) - size, (RS, D))
    nxt = bit0 + tl.sum(size, 0)
    # The pack's bits [start, start + P*w) lie in words wi .. wi+2 (sh + 64 <= 95 bits); empty packs read nothing.
    wi = start >> 5
    sh = (start & 31).to(tl.uint32)
    used = sh.to(tl.int32) + w * P
    w0 = tl.load(base_ptr + wi, mask=used > 0, other=0).to(tl.uint32, bitcast=True)
    w1 = tl.load(base_ptr + wi + 1, mask=used > 32, other=0).to(tl.uint32, bitcast=True)
    w2 = tl.load(base_ptr + wi + 2, mask=used > 64, other=0).to(tl.uint32, bitcast=True)
    lo = funnel_shift(w0, w1, sh, USE_ASM)  # bits [0, 32) of the pack
    hi = funnel_shift(w1, w2, sh, USE_ASM)  # bits [32, 64)
    j = tl.arange(0, P)
    o = (j[None, :, None] * w[:, None, :]).to(tl.uint32)  # [RS, P, D]: the value's bit in the pack, < 64
    lo3 = lo[:, None, :]
    hi3 = hi[:, None, :]
    in_lo = o < 32
    # Below bit 32 a value may straddle into hi: funnel (hi:lo); above, it lies in hi alone.
    val = tl.where(in_lo, funnel_shift(lo3, hi3, o & 31, USE_ASM), hi3 >> (o & 31))
    q = (val.to(tl.int32, bitcast=True) & ((1 << w) - 1)[:, None, :]) + (f & ((1 << QBITS) - 1))[:, None, :]
    return tl.reshape(q, (TS, D)), nxt


@triton.jit
def decode_tile(
    base_ptr, meta_ptr, r0, bit0,
    TS: tl.constexpr, D: tl.constexpr, P: tl.constexpr, QBITS: tl.constexpr, MBITS: tl.constexpr,
    USE_ASM: tl.constexpr, PACKWISE: tl.constexpr,
):  # fmt: skip
    """Ints of ``TS // P`` pack rows: pack-wise when packs fit 64 bits (and ``PACKWISE``), else per value."""
    if PACKWISE and P * QBITS <= 64:
        q, nxt = decode_rows_packwise(base_ptr, meta_ptr, r0, bit0, TS, D, P, QBITS, MBITS, USE_ASM)
    else:
        q, nxt = decode_rows(base_ptr, meta_ptr, r0, bit0, TS, D, P, QBITS, MBITS, USE_ASM)
    return q, nxt


@triton.jit
def pack_words(base_ptr, f, bit0, RS: tl.constexpr, D: tl.constexpr, P: tl.constexpr, QBITS: tl.constexpr):
    """The <= 3 payload words under each pack of fields ``f`` (payload at ``base_ptr``, its first pack ``bit0``
    bits in), the pack's bit offset in its first word, and the bit offset after the last pack."""
    w = f >> QBITS
    size = tl.reshape(w * P, (RS * D,))
    start = tl.reshape(bit0 + tl.cumsum(size, 0) - size, (RS, D))
    nxt = bit0 + tl.sum(size, 0)
    wi = start >> 5
    sh = start & 31
    used = sh + w * P  # empty packs read nothing
    w0 = tl.load(base_ptr + wi, mask=used > 0, other=0)
    w1 = tl.load(base_ptr + wi + 1, mask=used > 32, other=0)
    w2 = tl.load(base_ptr + wi + 2, mask=used > 64, other=0)
    return w0, w1, w2, sh, nxt


@triton.jit
def windows_operand(
    f, w0, w1, w2, sh, TS: tl.constexpr, D: tl.constexpr, P: tl.constexpr, QBITS: tl.constexpr,
    USE_ASM: tl.constexpr,
):  # fmt: skip
    """Exact fp16 ints ``[TS, D]`` from packs of at most 64 bits and ints below 1024 (fields ``f`` and words from
    ``pack_words``). Each pack's 64 bits are cut into two 32-bit windows of ``P/2`` values (the second starts at
    bit ``w*P/2 <= 32``), so every value is one funnel shift of its window (shift <= 31: no select between
    halves) and one LOP3 ``(v & mask) | 0x6400`` (the half ``1024 + delta``); the pack minimum minus 1024 is
    added in fp16 (exact), two values per instruction."""
    RS: tl.constexpr = TS // P
    VW: tl.constexpr = P // 2
    w = f >> QBITS
    shu = sh.to(tl.uint32)
    lo = funnel_shift(w0.to(tl.uint32, bitcast=True), w1.to(tl.uint32, bitcast=True), shu, USE_ASM)  # bits 0-31
    hi = funnel_shift(w1.to(tl.uint32, bitcast=True), w2.to(tl.uint32, bitcast=True), shu, USE_ASM)  # 32-63
    s1 = (w * VW).to(tl.uint32)  # the second window's first bit, <= 32
    lo1 = funnel_clamp(lo, hi, s1, USE_ASM)
    hi1 = funnel_clamp(hi, tl.zeros_like(hi), s1, USE_ASM)
    half = tl.arange(0, 2)[None, :, None]
    win_lo = tl.where(half == 0, lo[:, None, :], lo1[:, None, :])[:, :, None, :]  # [RS, 2, 1, D]
    win_hi = tl.where(half == 0, hi[:, None, :], hi1[:, None, :])[:, :, None, :]
    o = (tl.arange(0, VW)[None, None, :, None] * w[:, None, None, :]).to(tl.uint32)  # [RS, 1, VW, D], <= 31
    val = funnel_shift(win_lo, win_hi, o, USE_ASM).to(tl.int32, bitcast=True)  # [RS, 2, VW, D]
    mask = ((1 << w) - 1)[:, None, None, :]
    x = ((val & mask) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)  # 1024 + delta
    mu = ((f & ((1 << QBITS) - 1)) - 1024).to(tl.float16)[:, None, None, :]
    return tl.reshape(x + mu, (TS, D))


@triton.jit
def decode_rows_windows(
    base_ptr, meta_ptr, r0, bit0,
    TS: tl.constexpr, D: tl.constexpr, P: tl.constexpr, QBITS: tl.constexpr, MBITS: tl.constexpr,
    USE_ASM: tl.constexpr,
):  # fmt: skip
    """``decode_rows_packwise`` straight to the fp16 operand of the products (``windows_operand``)."""
    RS: tl.constexpr = TS // P
    f = read_bits(meta_ptr, ((r0 + tl.arange(0, RS))[:, None] * D + tl.arange(0, D)[None, :]) * MBITS, MBITS)
    w0, w1, w2, sh, nxt = pack_words(base_ptr, f, bit0, RS, D, P, QBITS)
    return windows_operand(f, w0, w1, w2, sh, TS, D, P, QBITS, USE_ASM), nxt


@triton.jit
def decode_operand(
    base_ptr, meta_ptr, r0, bit0,
    TS: tl.constexpr, D: tl.constexpr, P: tl.constexpr, QBITS: tl.constexpr, MBITS: tl.constexpr,
    USE_ASM: tl.constexpr, PACKWISE: tl.constexpr, WINDOWS: tl.constexpr,
):  # fmt: skip
    """The tile's ints as the products' operand: exact fp16 for ints below 1024, else fp32."""
    FITS: tl.constexpr = P * QBITS <= 64 and QBITS <= 10
    if WINDOWS and PACKWISE and FITS:
        x, nxt = decode_rows_windows(base_ptr, meta_ptr, r0, bit0, TS, D, P, QBITS, MBITS, USE_ASM)
    else:
        q, nxt = decode_tile(base_ptr, meta_ptr, r0, bit0, TS, D, P, QBITS, MBITS, USE_ASM, PACKWISE)
        if QBITS <= 10:
            x = ints_to_f16(q)
        else:
            x = q.to(tl.float32)
    return x, nxt


@triton.jit
def _pack_bits(base_ptr, start, size, USE_ASM: tl.constexpr, valid=None, CHECK: tl.constexpr = False):
    """The 64 bits (lo, hi) of packs of ``size`` bits starting ``start`` bits into the payload at ``base_ptr``:
    bits [sh, sh + size) lie in words wi .. wi+2; the second and third words are read only when the pack reaches
    them, and nothing is read when ``CHECK`` and not ``valid`` (a prefetch past the split's last block, whose base
    and fields may be unwritten)."""
    wi = start >> 5
    sh = start & 31
    used = sh + size
    if CHECK:
        used = tl.where(valid, used, 0)
        w0 = tl.load(base_ptr + wi, mask=used > 0, other=0).to(tl.uint32, bitcast=True)
    else:  # the word of a pack's start is in bounds even for an empty pack at the payload's end (spare word)
        w0 = tl.load(base_ptr + wi).to(tl.uint32, bitcast=True)
    w1 = tl.load(base_ptr + wi + 1, mask=used > 32, other=0).to(tl.uint32, bitcast=True)
    w2 = tl.load(base_ptr + wi + 2, mask=used > 64, other=0).to(tl.uint32, bitcast=True)
    shu = sh.to(tl.uint32)
    return funnel_shift(w0, w1, shu, USE_ASM), funnel_shift(w1, w2, shu, USE_ASM)


@triton.jit
def _halves_1024(win, o, m):
    """fp16 ``1024 + ((win >> o) & m)`` two values per asm block: both shifted words are merged by one PRMT and
    masked with one LOP3 (``(r & (m0 | m1 << 16)) | 0x64006400``), instead of a LOP3 per value and a PRMT per pair
    (the fields span <= 32 bits of their window, so a plain shift suffices). Correct for any two elements; when the
    two share a pack (the tile's layout keeps a pack's values in one thread), the PRMT of their masks is common to
    all pairs of the pack. GPU only: the interpreter takes the per-value form."""
    return tl.inline_asm_elementwise(
        "{ .reg .b32 t0, t1, r, mm; shr.b32 t0, $1, $3; shr.b32 t1, $2, $4; prmt.b32 r, t0, t1, 0x5410; "
        "prmt.b32 mm, $5, $6, 0x5410; lop3.b32 $0, r, mm, 0x64006400, 0xea; }",
        "=r,r,r,r,r,r,r", [win, o, m], dtype=tl.float16, is_pure=True, pack=2)  # fmt: skip


@triton.jit
def _lanes_1024(win, o, m2, mu2, USE_ASM: tl.constexpr):
    """Two values of one pack from a lane-paired window (``_lane_values``), as fp16 ``min + delta``: the window
    shifted once (both lanes), masked into the halves ``1024 + delta`` (``(r & (m | m << 16)) | 0x64006400``) and
    the pack minimum minus 1024 added to both (``mu2``: that half twice; exact, all terms are ints below 2048). On
    the GPU one SHR, one LOP3 and one HADD2 per two values; returns the low lane's values and the high lane's."""
    if USE_ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 r; shr.b32 r, $2, $3; lop3.b32 r, r, $4, 0x64006400, 0xea; add.rn.f16x2 r, r, $5; "
            "mov.b32 {$0, $1}, r; }",
            "=h,=h,r,r,r,r", [win, o, m2, mu2], dtype=(tl.float16, tl.float16), is_pure=True, pack=1)  # fmt: skip
    else:
        r = ((win >> o) & m2) | 0x64006400
        mu = (mu2 & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
        x0 = (r & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True) + mu
        x1 = (r >> 16).to(tl.uint16).to(tl.float16, bitcast=True) + mu
        return x0, x1


@triton.jit
def _lane_join(win, sh, USE_ASM: tl.constexpr):
    """``win``'s low 16 bits, and those of ``win >> sh`` as the high half: one SHR and one PRMT on the GPU."""
    if USE_ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; shr.b32 t, $1, $2; prmt.b32 $0, $1, t, 0x5410; }", "=r,r,r", [win, sh], dtype=tl.uint32,
            is_pure=True, pack=1)  # fmt: skip
    else:
        return (win & 0xFFFF) | ((win >> sh) << 16)


@triton.jit
def _lane_values(
    f, lo, hi, TS: tl.constexpr, D: tl.constexpr, P: tl.constexpr, QBITS: tl.constexpr, USE_ASM: tl.constexpr,
    CHANNEL_ROWS: tl.constexpr = True, LW: tl.constexpr = 4, LANE_ORDER: tl.constexpr = False,
):  # fmt: skip
    """``_window_values`` for packs of 8 or 16 values whose ``LW`` consecutive values span at most 16 bits (``LW``
    4: ints of <= 4 bits; 2: <= 8 bits). Each window of ``2 LW`` values of a pack (bits ``2 LW k w ..``, ``k < P /
    (2 LW)``) is rearranged once into two 16-bit lanes, values ``0 .. LW-1`` in the low lane and the next ``LW`` in
    the high lane (``(x & 0xFFFF) | (x >> LW w) << 16``); then one shift by ``j * w`` aligns value ``j`` in the low
    lane and value ``LW + j`` in the high one, and a mask makes both fp16 halves at once (``_lanes_1024``): per two
    values one shift, one LOP3 and one HADD2 with the minimum, against two shifts, two PRMTs, one LOP3 and one HADD2
    in ``_halves_1024``."""
    RS: tl.constexpr = TS // P
    NP: tl.constexpr = P // (2 * LW)  # windows per pack: 1, 2 or 4
    f = tl.reshape(f, (RS, D))
    lo = tl.reshape(lo, (RS, D))
    w = f >> QBITS
    wl = (w * LW).to(tl.uint32)  # a lane's bits; a window's are 2 wl <= 32
    if NP == 1:
        win = lo[:, None, :]  # [RS, 1, D]
    elif NP == 2:
        hi = tl.reshape(hi, (RS, D))
        lo1 = funnel_clamp(lo, hi, wl * 2, USE_ASM)  # the second window, from bit 2 LW w <= 32
        win = tl.permute(tl.join(lo, lo1), (0, 2, 1))  # [RS, 2, D]
    else:  # packs of 16 with LW 2 (ints of <= 4 bits, lanes of 2 for the other stream's sake): windows of 16 bits
        hi = tl.reshape(hi, (RS, D))
        b3 = wl * 6  # the fourth window's first bit, <= 48
        w3 = tl.where(b3 <= 32, funnel_clamp(lo, hi, b3, USE_ASM), funnel_clamp(hi, tl.zeros_like(hi), b3 - 32, USE_ASM))
        four = tl.join(tl.join(lo, funnel_clamp(lo, hi, wl * 2, USE_ASM)),
                       tl.join(funnel_clamp(lo, hi, wl * 4, USE_ASM), w3))  # [RS, D, 2, 2]: window 2j + i at [i, j]
        win = tl.permute(tl.reshape(tl.permute(four, (0, 1, 3, 2)), (RS, D, 4)), (0, 2, 1))  # [RS, 4, D]
    win = _lane_join(win, wl[:, None, :], USE_ASM)[:, :, None, :]  # [RS, NP, 1, D], lanes of LW values
    o = (tl.arange(0, LW)[None, None, :, None] * w[:, None, None, :]).to(tl.uint32)  # [RS, 1, LW, D], < 16
    m = (1 << w) - 1
    m2 = (m | (m << 16)).to(tl.uint32)[:, None, None, :]
    # The pack minimum minus 1024 in both halves: the fp16 bits of min - 1024 are 0xE400 - 2 min for min <= 512.
    mu2 = (0xE400E400 - (f & ((1 << QBITS) - 1)).to(tl.uint32) * 0x20002)[:, None, None, :]
    x0, x1 = _lanes_1024(win, o, m2, mu2, USE_ASM)  # [RS, NP, LW, D]: values 2 LW k + j and 2 LW k + LW + j
    x = tl.join(x0, x1)  # [RS, NP, LW, D, 2]
    if LANE_ORDER:  # row 2 LW k + 2j + lane: a lane pair stays one register (``lane_order_tokens``)
        if CHANNEL_ROWS:
            return tl.trans(tl.reshape(tl.permute(x, (3, 0, 1, 2, 4)), (D, TS)))
        return tl.reshape(tl.permute(x, (0, 1, 2, 4, 3)), (TS, D))
    if CHANNEL_ROWS:  # row 2 LW k + LW lane + j
        return tl.trans(tl.reshape(tl.permute(x, (3, 0, 1, 4, 2)), (D, TS)))
    return tl.reshape(tl.permute(x, (0, 1, 4, 2, 3)), (TS, D))


@triton.jit
def lane_order_tokens(TS: tl.constexpr, LANE_ORDER: tl.constexpr):
    """Token of each row of a tile decoded by ``_lane_values``, relative to the tile's first token: with
    ``LANE_ORDER`` (the lane width ``LW``: 4 or 2; 0: none) rows ``2 LW k + 2j + lane`` hold tokens ``2 LW k + LW
    lane + j``, else row i is token i. The attention loads the tile's scales, zeros and permutation in this order
    (the products and the softmax do not care)."""
    i = tl.arange(0, TS)
    if LANE_ORDER:
        k = i % (2 * LANE_ORDER)
        return i - k + (k & 1) * LANE_ORDER + (k >> 1)
    return i


@triton.jit
def _window_values(
    f, lo, hi, TS: tl.constexpr, D: tl.constexpr, P: tl.constexpr, QBITS: tl.constexpr, USE_ASM: tl.constexpr,
    CHANNEL_ROWS: tl.constexpr = True, PAIRS: tl.constexpr = True, LANES: tl.constexpr = 1,
):  # fmt: skip
    """``windows_operand`` from flat ``[RS * D]`` fields and pack bits (lo, hi already aligned). ``CHANNEL_ROWS``
    (the default): the tile is built as ``[D, TS]`` and transposed, so each thread's consecutive tokens lie along
    the fastest dimension and reach the products' layout in 16-byte stores (16 STS.128 instead of 128 STS.U16 per
    thread and block, 1,510 instead of 1,652 instructions) through a layout conversion with 34 instead of 16
    barriers per block (``scripts/kernel_sass.py``): 0.393 vs 0.442 ms at B8/32K on the H200, so instructions
    outweigh barriers here."""
    # LANES: 0 none; 1 lanes of 4 (ints of <= 4 bits) or 2 (<= 8 bits), rows in token order; 2 or 4: lanes of that
    # width, rows in lane order (the caller's choice for both streams: ``lane_order_fits``).
    LW: tl.constexpr = (4 if QBITS <= 4 else 2) if LANES == 1 else LANES
    FITS: tl.constexpr = QBITS <= 8 and LW * QBITS <= 16 and (P == 8 or P == 16)
    tl.static_assert(LANES < 2 or FITS, "lane order needs both streams in lanes: a stream here would not be")
    if LANES > 0 and FITS:
        return _lane_values(f, lo, hi, TS, D, P, QBITS, USE_ASM, CHANNEL_ROWS, LW, LANES > 1)
    RS: tl.constexpr = TS // P
    VW: tl.constexpr = P // 2
    f = tl.reshape(f, (RS, D))
    lo = tl.reshape(lo, (RS, D))
    hi = tl.reshape(hi, (RS, D))
    w = f >> QBITS
    s1 = (w * VW).to(tl.uint32)  # the second window's first bit, <= 32
    lo1 = funnel_clamp(lo, hi, s1, USE_ASM)
    hi1 = funnel_clamp(hi, tl.zeros_like(hi), s1, USE_ASM)
    half = tl.arange(0, 2)[None, :, None]
    win_lo = tl.where(half == 0, lo[:, None, :], lo1[:, None, :])[:, :, None, :]  # [RS, 2, 1, D]
    o = (tl.arange(0, VW)[None, None, :, None] * w[:, None, None, :]).to(tl.uint32)  # [RS, 1, VW, D], <= 28
    if USE_ASM and PAIRS:
        x = _halves_1024(win_lo, o, ((1 << w) - 1)[:, None, None, :].to(tl.uint32))
    else:
        win_hi = tl.where(half == 0, hi[:, None, :], hi1[:, None, :])[:, :, None, :]
        val = funnel_shift(win_lo, win_hi, o, USE_ASM).to(tl.int32, bitcast=True)  # [RS, 2, VW, D]
        x = ((val & ((1 << w) - 1)[:, None, None, :]) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    mu = ((f & ((1 << QBITS) - 1)) - 1024).to(tl.float16)[:, None, None, :]
    if CHANNEL_ROWS:
        return tl.trans(tl.reshape(tl.permute(x + mu, (3, 0, 1, 2)), (D, TS)))
    return tl.reshape(x + mu, (TS, D))


@triton.jit
def field_rows(meta_ptr, r0, N: tl.constexpr, D: tl.constexpr, MBITS: tl.constexpr, USE_ASM: tl.constexpr):
    """Metadata fields ``r0 * D .. r0 * D + N`` (whole pack rows, flat): ``read_bits`` with the funnel shift as one
    instruction on the GPU. A row of fields is a whole number of words (``Layout.meta_words``: 32 divides
    ``D * MBITS``), so the word index and shift are written per channel and row: a thread's fields of one channel
    then share one shift and their words differ by constants the compiler folds into the loads' addresses."""
    tl.static_assert((D * MBITS) % 32 == 0, "a row of metadata fields must fill whole words")
    RW: tl.constexpr = D * MBITS // 32
    i = tl.arange(0, N)
    cb = (i % D) * MBITS
    widx = (r0 + i // D) * RW + (cb >> 5)
    sh = cb & 31
    lo = tl.load(meta_ptr + widx).to(tl.uint32, bitcast=True)
    hi = tl.load(meta_ptr + widx + 1, mask=sh + MBITS > 32, other=0).to(tl.uint32, bitcast=True)  # not past a row
    return funnel_shift(lo, hi, sh.to(tl.uint32), USE_ASM).to(tl.int32, bitcast=True) & ((1 << MBITS) - 1)


@triton.jit
def pair_fields(k_meta, v_meta, r0, TS: tl.constexpr, D: tl.constexpr, P: tl.constexpr, K_MBITS: tl.constexpr,
                V_MBITS: tl.constexpr, USE_ASM: tl.constexpr = False):  # fmt: skip
    """The K and V metadata fields of pack rows ``r0 ..`` of a tile, flat (``[RS * D]``, pack order): the first
    stage of ``decode_pair_windows``."""
    N: tl.constexpr = (TS // P) * D
    return field_rows(k_meta, r0, N, D, K_MBITS, USE_ASM), field_rows(v_meta, r0, N, D, V_MBITS, USE_ASM)


@triton.jit
def pair_bits(
    fk, fv, k_base, v_base, k_bit0, v_bit0, valid, P: tl.constexpr, K_QBITS: tl.constexpr, V_QBITS: tl.constexpr,
    USE_ASM: tl.constexpr, NEXT: tl.constexpr = True, CHECK: tl.constexpr = False,
):  # fmt: skip
    """The second stage of ``decode_pair_windows``: the pack starts (one prefix scan for both streams: each pack's
    K size in the low 16 bits of a word, its V size in the high 16, ``paired_scan_fits``) and each pack's 64 bits,
    aligned. Returns them and the bit offsets after the tile's packs (0 unless ``NEXT``)."""
    sk = (fk >> K_QBITS) * P
    sv = (fv >> V_QBITS) * P
    both = (sk | (sv << 16)).to(tl.uint32, bitcast=True)
    incl = tl.cumsum(both, 0)
    excl = incl - both  # exact mod 2^32: each exclusive prefix stays below 2^16 per stream (paired_scan_fits)
    N: tl.constexpr = fk.shape[0]
    if NEXT and (N * P * K_QBITS >= 65536 or N * P * V_QBITS >= 65536):  # a full tile may carry: a sum per stream
        k_tot = tl.sum(sk, 0)
        v_tot = tl.sum(sv, 0)
    elif NEXT:  # the next tile's offsets (a reduction: skipped when the tile is the whole block)
        tot = tl.sum(both, 0)
        k_tot = (tot & 0xFFFF).to(tl.int32)
        v_tot = (tot >> 16).to(tl.int32)
    else:
        k_tot = tl.zeros((), tl.int32)
        v_tot = tl.zeros((), tl.int32)
    k_start = k_bit0 + (excl & 0xFFFF).to(tl.int32)
    v_start = v_bit0 + (excl >> 16).to(tl.int32)
    k_lo, k_hi = _stream_bits(k_base, k_start, sk, P, K_QBITS, USE_ASM, valid, CHECK)
    v_lo, v_hi = _stream_bits(v_base, v_start, sv, P, V_QBITS, USE_ASM, valid, CHECK)
    return k_lo, k_hi, v_lo, v_hi, k_bit0 + k_tot, v_bit0 + v_tot


@triton.jit
def _stream_bits(base_ptr, start, size, P: tl.constexpr, QBITS: tl.constexpr, USE_ASM: tl.constexpr, valid=None,
                 CHECK: tl.constexpr = False):  # fmt: skip
    """One stream's pack bits for ``pair_bits``: ``[N]`` (lo, hi) for packs of <= 64 bits; for wider packs that
    ``split_packs`` halves, ``[N, 2]``: each half's 64 bits (the second half starts ``size / 2`` bits in)."""
    SPLIT: tl.constexpr = P * QBITS > 64 and P >= 16 and (P // 2) * QBITS <= 64 and QBITS <= 10  # split_packs
    if SPLIT:  # one return below: Triton checks the types of every return, constexpr branches included
        half = size // 2
        lo, hi = _pack_bits(base_ptr, tl.join(start, start + half), tl.join(half, half), USE_ASM, valid, CHECK)
    else:
        lo, hi = _pack_bits(base_ptr, start, size, USE_ASM, valid, CHECK)
    return lo, hi


@triton.jit
def _split_rows(f, lo, hi, RS: tl.constexpr, D: tl.constexpr):
    """Fields and half-pack bits of split packs as the flat tensors of twice the pack rows (row ``2r + h`` is half
    ``h`` of pack row ``r``), for ``_window_values`` at ``P / 2``."""
    f2 = tl.reshape(tl.permute(tl.reshape(tl.join(f, f), (RS, D, 2)), (0, 2, 1)), (2 * RS * D,))
    lo2 = tl.reshape(tl.permute(tl.reshape(lo, (RS, D, 2)), (0, 2, 1)), (2 * RS * D,))
    hi2 = tl.reshape(tl.permute(tl.reshape(hi, (RS, D, 2)), (0, 2, 1)), (2 * RS * D,))
    return f2, lo2, hi2


@triton.jit
def pair_values(
    fk, fv, k_lo, k_hi, v_lo, v_hi, TS: tl.constexpr, D: tl.constexpr, P: tl.constexpr, K_QBITS: tl.constexpr,
    V_QBITS: tl.constexpr, USE_ASM: tl.constexpr, CHANNEL_ROWS: tl.constexpr = True, PAIRS: tl.constexpr = True,
    LANES: tl.constexpr = 1,
):  # fmt: skip
    """The last stage of ``decode_pair_windows``: the K and V fp16 operands from the fields and the pack bits.
    ``LANES`` 2 or 4 (both streams must fit ``lane_order_fits``) returns both tiles' rows in lane order, lanes of
    that width."""
    kx = _stream_values(fk, k_lo, k_hi, TS, D, P, K_QBITS, USE_ASM, CHANNEL_ROWS, PAIRS, LANES)
    vt = _stream_values(fv, v_lo, v_hi, TS, D, P, V_QBITS, USE_ASM, CHANNEL_ROWS, PAIRS, LANES)
    return kx, vt


@triton.jit
def _stream_values(
    f, lo, hi, TS: tl.constexpr, D: tl.constexpr, P: tl.constexpr, QBITS: tl.constexpr, USE_ASM: tl.constexpr,
    CHANNEL_ROWS: tl.constexpr, PAIRS: tl.constexpr, LANES: tl.constexpr,
):  # fmt: skip
    """One stream's operand for ``pair_values`` (split packs as twice the rows of half packs)."""
    SPLIT: tl.constexpr = P * QBITS > 64 and P >= 16 and (P // 2) * QBITS <= 64 and QBITS <= 10  # split_packs
    if SPLIT:  # if / else: Triton also compiles the code after a constexpr branch that returns
        f2, lo2, hi2 = _split_rows(f, lo, hi, TS // P, D)
        x = _window_values(f2, lo2, hi2, TS, D, P // 2, QBITS, USE_ASM, CHANNEL_ROWS, PAIRS, LANES)
    else:
        x = _window_values(f, lo, hi, TS, D, P, QBITS, USE_ASM, CHANNEL_ROWS, PAIRS, LANES)
    return x


@triton.jit
def decode_pair_windows(
    k_base, k_meta, v_base, v_meta, r0, k_bit0, v_bit0,
    TS: tl.constexpr, D: tl.constexpr, P: tl.constexpr, K_QBITS: tl.constexpr, K_MBITS: tl.constexpr,
    V_QBITS: tl.constexpr, V_MBITS: tl.constexpr, USE_ASM: tl.constexpr, CHANNEL_ROWS: tl.constexpr = True,
    NEXT: tl.constexpr = True, PAIRS: tl.constexpr = True, LANES: tl.constexpr = 1,
):  # fmt: skip
    """K and V operands of one tile (``decode_rows_windows`` for both streams) with one prefix scan for both, in
    three stages that a pipelined caller may spread over iterations: fields (``pair_fields``), pack bits
    (``pair_bits``), values (``pair_values``). The metadata fields are read flat (``[RS * D]``, pack order) so the
    scan needs no reshape. Returns the two fp16 operands and the bit offsets of the next rows."""
    fk, fv = pair_fields(k_meta, v_meta, r0, TS, D, P, K_MBITS, V_MBITS, USE_ASM)
    k_lo, k_hi, v_lo, v_hi, k_next, v_next = pair_bits(fk, fv, k_base, v_base, k_bit0, v_bit0, None, P, K_QBITS,
                                                       V_QBITS, USE_ASM, NEXT)  # fmt: skip
    kx, vt = pair_values(fk, fv, k_lo, k_hi, v_lo, v_hi, TS, D, P, K_QBITS, V_QBITS, USE_ASM, CHANNEL_ROWS, PAIRS,
                         LANES)  # fmt: skip
    return kx, vt, k_next, v_next


@triton.jit
def decode_block_windows(
    base_ptr, meta_ptr, T: tl.constexpr, D: tl.constexpr, P: tl.constexpr, QBITS: tl.constexpr,
    MBITS: tl.constexpr, USE_ASM: tl.constexpr, LANE_ORDER: tl.constexpr = False,
):  # fmt: skip
    """One stream's exact fp16 ints ``[T, D]`` of a whole block, decoded as the attention decodes a tile (fields
    read flat, one prefix scan for the pack starts, two 32-bit windows per pack, values two per asm block): for
    kernels that read one stream (the paper's mat-vec pair). Packs of <= 64 bits, ints below 1024. Rows in lane
    order with ``LANE_ORDER`` (the lane width, 4 or 2; 0: token order)."""
    f = field_rows(meta_ptr, 0, (T // P) * D, D, MBITS, USE_ASM)
    size = (f >> QBITS) * P
    lo, hi = _pack_bits(base_ptr, tl.cumsum(size, 0) - size, size, USE_ASM)
    return _window_values(f, lo, hi, T, D, P, QBITS, USE_ASM, LANES=LANE_ORDER if LANE_ORDER else 1)


def split_packs(p: int, qbits: int) -> bool:
    """Whether packs are wider than 64 bits but their halves are not (``p`` 16 or 32, ints below 1024): the paired
    decode then reads each as two packs of ``p / 2`` values sharing one field (``_stream_bits``, ``_split_rows``)."""
    return p * qbits > 64 and p >= 16 and p // 2 * qbits <= 64 and qbits <= 10


def decode_paths(p: int, d: int, ts: int, k_qbits: int, v_qbits: int) -> tuple[str, str]:
    """How the attention decodes the K and V packs on the GPU (packs of ``p`` values, head_dim ``d``, tiles of
    ``ts`` tokens; token groupings): ``"lanes"`` (both streams' ints of <= 8 bits in packs, or split halves, of 8
    or 16 values: two values per shift, ``lane_order_fits``), ``"windows"`` (packs of <= 64 bits, ints below 1024:
    two 32-bit windows per pack), ``"split"`` (wider packs read as two halves of <= 64 bits), else ``"per-value"``
    (two gathered loads and a funnel shift per value: the attention was 2.6x slower that way, H200 2026-12-03). The
    first three need both streams in one prefix scan (``paired_scan_fits``); without it a stream of <= 64-bit packs
    still takes windows."""
    paired = paired_scan_fits(ts, d, p, k_qbits, v_qbits)
    lanes = paired and lane_order_fits(p, k_qbits, v_qbits)  # the attention takes lanes for both or neither
    paths = []
    for q in (k_qbits, v_qbits):
        fits = p * q <= 64 and q <= 10
        if paired and fits:
            paths.append("lanes" if lanes else "windows")
        elif paired and split_packs(p, q):
            paths.append("split")
        else:
            paths.append("windows" if fits else "per-value")
    return paths[0], paths[1]


def lane_order_fits(p: int, k_qbits: int, v_qbits: int) -> bool:
    """Whether both streams' tiles take ``_lane_values`` (ints of <= 8 bits in packs, or split halves of packs, of
    8 or 16 values), so the attention can decode them in lane order (the attention kernel's ``LANE_ORDER``: lanes
    of 4 values when both streams' ints have <= 4 bits, else of 2)."""
    return all((p // 2 if split_packs(p, q) else p) in (8, 16) and q <= 8 for q in (k_qbits, v_qbits))


def paired_scan_fits(ts: int, d: int, p: int, k_qbits: int, v_qbits: int) -> bool:
    """Whether ``decode_pair_windows`` applies: both streams take the window extraction (packs of <= 64 bits, or
    split into two halves of <= 64 bits: ``split_packs``; ints below 1024) and every pack but a tile's last starts
    below bit 2^16 of the tile in both streams (the scan's 16-bit lanes: an exclusive prefix cannot carry; the
    tile's total, which may, is summed per stream). 64-token tiles of head_dim 256 take 4-bit ints, of 128 8-bit."""
    return all((p * q <= 64 or split_packs(p, q)) and q <= 10 and (ts * d - p) * q < (1 << 16)
               for q in (k_qbits, v_qbits))  # fmt: skip
