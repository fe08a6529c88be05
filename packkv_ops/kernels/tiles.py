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
