"""Bit-pack quantized blocks into chunks (twin of ``codec.pack_chunks``), in two kernels per stream.

``_pack_chunk_kernel`` (one program per chunk) reads the chunk's integers (already in repacked order) row by row,
so that each thread owns whole packs: it finds their minima and widths, assembles each pack in 64-bit registers
and stores it in units of P/8 bytes (a pack is P * width bits, so packs start on P/8-byte boundaries and no two
share a unit) into a fixed-size staging slot of the chunk; then it writes the metadata words into the storage. The chunks' pool offsets are a prefix sum over all
chunks of the call (torch, a few hundred elements); ``_compact_kernel`` then copies each payload, whole words,
to its offset in the pool and records the offset.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import Layout, StreamLayout
from ..storage import PackedLayer
from ._launch import launch, next_pow2


WARPS = 4  # launch width of the per-chunk kernel; benchmarks/kernels.py --compress-variants times others


@triton.jit
def _chunk_place(chunk, n_blocks_ptr, NF, H):
    """(sequence, storage block, head) of chunk ``chunk`` = (block n of this call) * H + head."""
    n = chunk // H
    b = n // NF
    blk = tl.load(n_blocks_ptr + b) + n % NF
    return b, blk, chunk % H


@triton.jit
def _pack_chunk_kernel(
    q_ptr, n_blocks_ptr, fields_ptr, words_ptr, meta_ptr, stage_ptr, NF, NB, H, STAGE_WORDS,
    T: tl.constexpr, D: tl.constexpr, P: tl.constexpr, R: tl.constexpr,
    QBITS: tl.constexpr, MBITS: tl.constexpr, MW: tl.constexpr, MWP: tl.constexpr, J: tl.constexpr,
    NL: tl.constexpr, NLP: tl.constexpr,
):  # fmt: skip
    chunk = tl.program_id(0)
    b, blk, h = _chunk_place(chunk, n_blocks_ptr, NF, H)
    # Thread-local packing: the [R, D] tile of packs is spread over the threads and every loop below runs over
    # the P tokens of a pack, so a thread assembles its packs alone (no cross-thread reductions). Row r*P + p of
    # the chunk is one coalesced load; the second pass reads it again from L1.
    src = q_ptr + chunk.to(tl.int64) * (T * D) + (tl.arange(0, R) * (P * D))[:, None] + tl.arange(0, D)[None, :]
    mn = tl.load(src).to(tl.int32)
    mx = mn
    for p in tl.static_range(1, P):
        x = tl.load(src + p * D).to(tl.int32)
        mn = tl.minimum(mn, x)
        mx = tl.maximum(mx, x)
    span = mx - mn
    w = tl.zeros((R, D), tl.int32)
    for bit in tl.static_range(QBITS):  # bit length
        w += (span >= (1 << bit)).to(tl.int32)

    # Payload: pack (r, c) is the P deltas of w bits, LSB first, at byte `start` of the chunk (packs in row-major
    # (r, c) order, back to back), assembled in NL 64-bit lanes.
    nbytes = w * (P // 8)
    flat = tl.reshape(nbytes, (R * D,))
    ends = tl.cumsum(flat, 0)
    start = tl.reshape(ends - flat, (R, D))
    total = tl.sum(flat, 0)
    w64 = w.to(tl.uint64)
    if NL == 1:
        acc = tl.zeros((R, D), tl.uint64)
        for p in tl.static_range(P):
            d = (tl.load(src + p * D).to(tl.int32) - mn).to(tl.uint64)
            acc |= d << (w64 * p)
        acc = acc[:, :, None]
    else:
        lane = tl.arange(0, NLP)[None, None, :]
        acc = tl.zeros((R, D, NLP), tl.uint64)
        for p in tl.static_range(P):
            d = (tl.load(src + p * D).to(tl.int32) - mn).to(tl.uint64)
            bp = w * p
            sh = (bp & 63).to(tl.uint64)
            at = (bp >> 6)[:, :, None]
            lo = (d << sh)[:, :, None]
            hi = ((d >> 1) >> (63 - sh))[:, :, None]  # d >> (64 - sh), zero when sh == 0
            acc |= tl.where(lane == at, lo, 0) | tl.where(lane == at + 1, hi, 0)
    # Packs start on P/8-byte boundaries (P * w bits): store units of P/8 bytes, E of them per lane.
    UNIT: tl.constexpr = P // 8
    E: tl.constexpr = 8 // UNIT
    if UNIT == 1:
        ety: tl.constexpr = tl.uint8
    elif UNIT == 2:
        ety: tl.constexpr = tl.uint16
    else:
        ety: tl.constexpr = tl.uint32
    stage = stage_ptr + chunk.to(tl.int64) * STAGE_WORDS
    e = tl.arange(0, E)[None, None, None, :]
    piece = (acc[:, :, :, None] >> (8 * UNIT * e).to(tl.uint64)).to(ety)
    ui = tl.arange(0, NLP)[None, None, :, None] * E + e  # unit index inside the pack
    dst = stage.to(tl.pointer_type(ety)) + (start // UNIT)[:, :, None, None] + ui
    tl.store(dst, piece, mask=ui < (nbytes // UNIT)[:, :, None, None])
    pad = total + tl.arange(0, 4)  # the last word's bytes past the payload are zero
    tl.store(stage.to(tl.pointer_type(tl.uint8)) + pad, tl.zeros((4,), tl.uint8), mask=pad < (total + 3) // 4 * 4)
    tl.store(words_ptr + chunk, (total + 3) // 4)

    # Metadata: field r*D + c = min | width << QBITS at bit (r*D + c) * MBITS. Word kk ORs the (at most J)
    # fixed-width fields overlapping its 32 bits; they are read back from scratch (a register gather otherwise).
    i = tl.arange(0, R * D)
    base = chunk.to(tl.int64) * (R * D)
    tl.store(fields_ptr + base + i, tl.reshape(mn | (w << QBITS), (R * D,)))
    tl.debug_barrier()  # the fields just stored are read by other threads of this program
    kk = tl.arange(0, MWP)
    fi = (32 * kk)[:, None] // MBITS + tl.arange(0, J)[None, :]
    shift = fi * MBITS - 32 * kk[:, None]
    use = (fi < R * D) & (shift < 32) & (kk[:, None] < MW)
    f = tl.load(fields_ptr + base + fi, mask=use, other=0).to(tl.uint32, bitcast=True)
    left = tl.minimum(tl.maximum(shift, 0), 31).to(tl.uint32)
    right = tl.minimum(tl.maximum(-shift, 0), 31).to(tl.uint32)
    part = tl.where(use, tl.where(shift >= 0, f << left, f >> right), 0).to(tl.int32, bitcast=True)
    tl.store(meta_ptr + ((b * NB + blk) * H + h).to(tl.int64) * MW + kk, tl.sum(part, 1), mask=kk < MW)


@triton.jit
def _compact_kernel(
    stage_ptr, words_ptr, chunk_off_ptr, n_blocks_ptr, offsets_ptr, pool_ptr, NF, NB, H, STAGE_WORDS,
    BLOCK: tl.constexpr,
):  # fmt: skip
    chunk = tl.program_id(0)
    b, blk, h = _chunk_place(chunk, n_blocks_ptr, NF, H)
    n = tl.load(words_ptr + chunk)
    off = tl.load(chunk_off_ptr + chunk)
    tl.store(offsets_ptr + (b * NB + blk) * H + h, off)
    i = tl.arange(0, BLOCK)
    src = stage_ptr + chunk.to(tl.int64) * STAGE_WORDS
    for s in range(0, n, BLOCK):
        m = s + i < n
        tl.store(pool_ptr + off.to(tl.int64) + s + i, tl.load(src + s + i, mask=m), mask=m)


def pack_flushed(st: PackedLayer, kq: torch.Tensor, vq: torch.Tensor, n_flush: int) -> torch.Tensor:
    """Pack this call's blocks (integers ``[B * n_flush, H, T, D]`` in repacked order) into storage blocks
    ``n_blocks[b] + k``: metadata, offsets and
    payload at the pool's cursor (K chunks, then V chunks). Returns the payload words written (a device int64)."""
    lay: Layout = st.layout
    n, H, T, D = kq.shape
    R, P, NB = lay.rows, lay.pack_size, st.block_capacity
    streams = ((kq, lay.k, st.k_meta, st.k_offsets), (vq, lay.v, st.v_meta, st.v_offsets))
    words = torch.empty(2, n * H, dtype=torch.int32, device=kq.device)
    fields = torch.empty(n * H, R * D, dtype=torch.int32, device=kq.device)  # scratch, reused by both streams
    stages = []
    for i, (q, s, meta, _) in enumerate(streams):
        mw, sw = lay.meta_words(s), lay.max_chunk_words(s)
        stage = torch.empty(n * H, sw, dtype=torch.int32, device=kq.device)
        launch(_pack_chunk_kernel)[(n * H,)](
            q, st.n_blocks, fields, words[i], meta, stage, n_flush, NB, H, sw,
            T=T, D=D, P=P, R=R, QBITS=s.qbits, MBITS=s.mbits, MW=mw, MWP=next_pow2(mw), J=next_pow2(32 // s.mbits + 2),
            NL=_payload_lanes(s, lay), NLP=next_pow2(_payload_lanes(s, lay)), num_warps=WARPS,
        )  # fmt: skip
        stages.append((stage, sw))
    flat = words.flatten().long()
    ends = flat.cumsum(0)
    chunk_off = (st.cursor + ends - flat).to(torch.int32)
    for i, ((_, _, _, offsets), (stage, sw)) in enumerate(zip(streams, stages)):
        launch(_compact_kernel)[(n * H,)](
            stage, words[i], chunk_off[i * n * H :], st.n_blocks, offsets, st.pool, n_flush, NB, H, sw, BLOCK=256,
        )  # fmt: skip
    return ends[-1]


def _payload_lanes(s: StreamLayout, lay: Layout) -> int:
    """64-bit lanes of the widest pack."""
    return -(-lay.pack_size * s.qbits // 64)
