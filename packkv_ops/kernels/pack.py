"""Bit-pack quantized blocks into chunks (twin of ``codec.pack_chunks``), in two kernels per stream.

``_pack_stats_kernel`` (one program per chunk) reads the chunk's integers through the block's permutation,
finds each pack's minimum and width, writes the metadata words into the storage, each pack's byte offset inside
the chunk and the chunk's payload size. The chunks' pool offsets are a prefix sum over all chunks of the call
(torch, a few hundred elements); ``_pack_payload_kernel`` (one program per pack row of a chunk) then writes the
payload bytes and the chunk offsets. Packs are byte-aligned (P * width bits with P a multiple of 8), so each
program assembles its packs in registers and writes their bytes with plain stores: no two packs share a byte.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import Layout, StreamLayout
from ..storage import PackedLayer
from ._launch import launch, next_pow2


@triton.jit
def _chunk_place(chunk, n_blocks_ptr, NF, H):
    """(sequence, storage block, head) of chunk ``chunk`` = (block n of this call) * H + head."""
    n = chunk // H
    b = n // NF
    blk = tl.load(n_blocks_ptr + b) + n % NF
    return b, blk, chunk % H


@triton.jit
def _pack_stats_kernel(
    q_ptr, perm_ptr, n_blocks_ptr, fields_ptr, starts_ptr, words_ptr, meta_ptr, NF, NB, H,
    T: tl.constexpr, D: tl.constexpr, P: tl.constexpr, R: tl.constexpr,
    QBITS: tl.constexpr, MBITS: tl.constexpr, MW: tl.constexpr, MWP: tl.constexpr, J: tl.constexpr,
):  # fmt: skip
    chunk = tl.program_id(0)
    b, blk, h = _chunk_place(chunk, n_blocks_ptr, NF, H)
    t = tl.arange(0, T)
    c = tl.arange(0, D)
    src = tl.load(perm_ptr + (b * NB + blk).to(tl.int64) * T + t).to(tl.int32)  # token at each repacked slot
    q = tl.load(q_ptr + (chunk.to(tl.int64) * T + src)[:, None] * D + c[None, :]).to(tl.int32)
    q3 = tl.reshape(q, (R, P, D))
    mn = tl.min(q3, 1)
    span = tl.max(q3, 1) - mn
    w = tl.zeros((R, D), tl.int32)
    for bit in tl.static_range(QBITS):  # bit length
        w += (span >= (1 << bit)).to(tl.int32)
    # Pack (r, c) is field r*D + c: min in the low QBITS, width above; payload packs in the same order.
    i = tl.arange(0, R * D)
    base = chunk.to(tl.int64) * (R * D)
    tl.store(fields_ptr + base + i, tl.reshape(mn | (w << QBITS), (R * D,)))
    nbytes = tl.reshape(w * (P // 8), (R * D,))
    ends = tl.cumsum(nbytes, 0)
    tl.store(starts_ptr + base + i, ends - nbytes)
    tl.store(words_ptr + chunk, (tl.sum(nbytes, 0) + 3) // 4)
    tl.debug_barrier()  # the fields just stored are read back by other threads of this program
    # Metadata word kk ORs the (at most J) fixed-width fields overlapping its 32 bits.
    kk = tl.arange(0, MWP)
    fi = (32 * kk)[:, None] // MBITS + tl.arange(0, J)[None, :]
    shift = fi * MBITS - 32 * kk[:, None]
    use = (fi < R * D) & (shift < 32) & (kk[:, None] < MW)
    f = tl.load(fields_ptr + base + fi, mask=use, other=0).to(tl.uint32, bitcast=True)
    left = tl.minimum(tl.maximum(shift, 0), 31).to(tl.uint32)
    right = tl.minimum(tl.maximum(-shift, 0), 31).to(tl.uint32)
    part = tl.where(use, tl.where(shift >= 0, f << left, f >> right), 0).to(tl.int32, bitcast=True)
    word = tl.sum(part, 1)  # disjoint bits: the sum is their OR
    tl.store(meta_ptr + ((b * NB + blk) * H + h).to(tl.int64) * MW + kk, word, mask=kk < MW)


@triton.jit
def _pack_payload_kernel(
    q_ptr, perm_ptr, n_blocks_ptr, fields_ptr, starts_ptr, chunk_off_ptr, offsets_ptr, pool_ptr, NF, NB, H,
    T: tl.constexpr, D: tl.constexpr, P: tl.constexpr, R: tl.constexpr, QBITS: tl.constexpr, NW: tl.constexpr,
):  # fmt: skip
    chunk = tl.program_id(0)
    r = tl.program_id(1)
    b, blk, h = _chunk_place(chunk, n_blocks_ptr, NF, H)
    cc = tl.arange(0, D)
    meta = chunk.to(tl.int64) * (R * D) + r * D + cc
    f = tl.load(fields_ptr + meta)
    mu = f & ((1 << QBITS) - 1)
    w = f >> QBITS
    start = tl.load(starts_ptr + meta)  # byte offset of the pack inside its chunk
    off = tl.load(chunk_off_ptr + chunk)
    if r == 0:
        tl.store(offsets_ptr + (b * NB + blk) * H + h, off)
    slot = (b * NB + blk).to(tl.int64) * T + r * P
    kk = tl.arange(0, NW)
    words = tl.zeros((D, NW), tl.uint32)  # the pack's bits, LSB first, as NW little-endian words
    for j in tl.static_range(P):
        src = tl.load(perm_ptr + slot + j).to(tl.int64)
        d = (tl.load(q_ptr + (chunk.to(tl.int64) * T + src) * D + cc).to(tl.int32) - mu).to(tl.uint32)
        bp = j * w
        wi = bp >> 5
        sh = (bp & 31).to(tl.uint32)
        lo = d << sh
        hi = (d >> 1) >> (31 - sh)  # the part spilling into the next word (d >> (32 - sh), defined at sh = 0)
        words = words | tl.where(kk[None, :] == wi[:, None], lo[:, None], 0)
        words = words | tl.where(kk[None, :] == wi[:, None] + 1, hi[:, None], 0)
    # Bytes of each pack: (P / 8) * width of them, from its words.
    nbytes = (P // 8) * w
    byte_idx = tl.arange(0, 4 * NW)
    wb = tl.reshape(tl.broadcast_to(words[:, :, None], (D, NW, 4)), (D, 4 * NW))
    byte = (wb >> ((byte_idx % 4) * 8).to(tl.uint32)[None, :]) & 0xFF
    dst = pool_ptr.to(tl.pointer_type(tl.uint8)) + off.to(tl.int64) * 4 + start
    tl.store(dst[:, None] + byte_idx[None, :], byte.to(tl.uint8), mask=byte_idx[None, :] < nbytes[:, None])


def pack_flushed(st: PackedLayer, kq: torch.Tensor, vq: torch.Tensor, n_flush: int) -> torch.Tensor:
    """Pack this call's blocks (integers ``[B * n_flush, H, T, D]`` in original token order, moved by the
    block permutations already in the storage) into storage blocks ``n_blocks[b] + k``: metadata, offsets and
    payload at the pool's cursor (K chunks, then V chunks). Returns the payload words written (a device int64)."""
    lay: Layout = st.layout
    n, H, T, D = kq.shape
    R, P, NB = lay.rows, lay.pack_size, st.block_capacity
    streams = ((kq, lay.k, st.k_meta, st.k_offsets), (vq, lay.v, st.v_meta, st.v_offsets))
    words = torch.empty(2, n * H, dtype=torch.int32, device=kq.device)
    scratch = []
    for i, (q, s, meta, _) in enumerate(streams):
        fields = torch.empty(n * H, R * D, dtype=torch.int32, device=kq.device)
        starts = torch.empty_like(fields)
        mw = lay.meta_words(s)
        launch(_pack_stats_kernel)[(n * H,)](
            q, st.perm, st.n_blocks, fields, starts, words[i], meta, n_flush, NB, H,
            T=T, D=D, P=P, R=R, QBITS=s.qbits, MBITS=s.mbits, MW=mw, MWP=next_pow2(mw), J=next_pow2(32 // s.mbits + 2),
        )  # fmt: skip
        scratch.append((fields, starts))
    flat = words.flatten().long()
    ends = flat.cumsum(0)
    chunk_off = (st.cursor + ends - flat).to(torch.int32)
    for i, ((q, s, _, offsets), (fields, starts)) in enumerate(zip(streams, scratch)):
        launch(_pack_payload_kernel)[(n * H, R)](
            q, st.perm, st.n_blocks, fields, starts, chunk_off[i * n * H :], offsets, st.pool, n_flush, NB, H,
            T=T, D=D, P=P, R=R, QBITS=s.qbits, NW=_payload_words(s, lay),
        )  # fmt: skip
    return ends[-1]


def _payload_words(s: StreamLayout, lay: Layout) -> int:
    """int32 words of the widest pack (packs are byte-aligned), as a power of two."""
    return next_pow2(-(-lay.pack_size * s.qbits // 32))
