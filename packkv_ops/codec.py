"""Reference codec for blocks: quantize + repack, then bit-pack into chunks (and back).

A *chunk* is one block (``block_size`` tokens) of one KV head of K or of V. Its metadata (pack minima and
widths) has a fixed size; its payload (the pack deltas) has a variable size. See FORMAT.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .bitstream import bit_length, read_fields, write_fields
from .layout import Layout, StreamLayout
from .quantize import dequantize, quantize
from .repack import apply_perm, repack_perm


@dataclass
class QuantizedBlocks:
    """Blocks ``[N, H, T, D]`` quantized and repacked: everything is in repacked token order."""

    kq: torch.Tensor  # int32 [N, H, T, D]
    vq: torch.Tensor
    k_scale: torch.Tensor  # bf16 [N, Gh, Gt, Gc]
    k_zero: torch.Tensor  # int16
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    perm: torch.Tensor  # int64 [N, T]: slot i holds original token perm[i]


def quantize_blocks(k: torch.Tensor, v: torch.Tensor, layout: Layout) -> QuantizedBlocks:
    """Quantize K and V blocks ``[N, H, T, D]``, then repack tokens (K, V, scales, zeros together)."""
    kq, ks, kz = quantize(k, layout.k)
    vq, vs, vz = quantize(v, layout.v)
    perm = repack_perm(layout.repack, kq, vq, layout.pack_size, layout.v.qmax + 1)
    return QuantizedBlocks(
        kq=apply_perm(kq, perm, 2),
        vq=apply_perm(vq, perm, 2),
        k_scale=apply_perm(ks, perm, 2),
        k_zero=apply_perm(kz, perm, 2),
        v_scale=apply_perm(vs, perm, 2),
        v_zero=apply_perm(vz, perm, 2),
        perm=perm,
    )


def pack_stats(q: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pack minimum and width of ints ``q[N, H, T, D]``: both ``[N, H, R, D]`` (R = T / pack_size)."""
    n, h, t, d = q.shape
    qr = q.reshape(n, h, layout.rows, layout.pack_size, d)
    mins = qr.amin(dim=3)
    widths = bit_length(qr.amax(dim=3) - mins)
    return mins, widths


def payload_bit_offsets(widths: torch.Tensor, pack_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bit offset of every pack inside its chunk (packs in row-major (row, channel) order) and chunk words.

    ``widths[..., R, D]`` -> offsets ``[..., R, D]`` (int64) and payload words per chunk ``[...]`` (int64).
    """
    bits = (widths.to(torch.int64) * pack_size).flatten(-2)
    ends = bits.cumsum(-1)
    starts = (ends - bits).reshape(widths.shape)
    words = (ends[..., -1] + 31) // 32
    return starts, words


def pack_chunks(q: torch.Tensor, s: StreamLayout, layout: Layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bit-pack ints ``q[N, H, T, D]`` (repacked order).

    Returns ``meta[N, H, MW]`` (int32), payload words per chunk ``[N, H]`` (int64) and the payloads of all
    chunks concatenated in (N, H) order (int32).
    """
    n, h, t, d = q.shape
    P, R = layout.pack_size, layout.rows
    mins, widths = pack_stats(q, layout)

    # Metadata: one field of mbits per (row, channel): min in the low qbits, width above it.
    mw = layout.meta_words(s)
    fields = mins.to(torch.int64) | (widths.to(torch.int64) << s.qbits)
    chunk = torch.arange(n * h, device=q.device).reshape(n, h, 1)
    fpos = chunk * (32 * mw) + torch.arange(R * d, device=q.device) * s.mbits
    meta = write_fields(n * h * mw, fpos, fields.reshape(n, h, R * d), torch.full_like(fpos, s.mbits))

    # Payload: pack (row, channel) holds its P deltas of `width` bits, LSB first, packs back to back.
    starts, words = payload_bit_offsets(widths, P)
    flat_words = words.flatten()
    chunk_off = (flat_words.cumsum(0) - flat_words).reshape(n, h)
    deltas = (q.reshape(n, h, R, P, d) - mins[:, :, :, None, :]).to(torch.int64)
    j = torch.arange(P, device=q.device).reshape(1, 1, 1, P, 1)
    w = widths[:, :, :, None, :].to(torch.int64)
    pos = (chunk_off[:, :, None, None, None] * 32) + starts[:, :, :, None, :] + j * w
    payload = write_fields(int(words.sum().item()), pos, deltas, w.expand_as(pos))
    return meta.reshape(n, h, mw), words, payload


def unpack_meta(meta: torch.Tensor, s: StreamLayout, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack minima and widths ``[..., R, D]`` from metadata words ``[..., MW]``."""
    R, d = layout.rows, layout.head_dim
    lead = meta.shape[:-1]
    flat = meta.reshape(-1, meta.shape[-1])
    pos = torch.arange(flat.shape[0], device=meta.device)[:, None] * (32 * flat.shape[1])
    pos = pos + torch.arange(R * d, device=meta.device) * s.mbits
    f = read_fields(flat, pos, torch.full_like(pos, s.mbits))
    mins = (f & ((1 << s.qbits) - 1)).reshape(*lead, R, d)
    widths = (f >> s.qbits).reshape(*lead, R, d)
    return mins, widths


def unpack_chunks(
    meta: torch.Tensor, pool: torch.Tensor, offsets: torch.Tensor, s: StreamLayout, layout: Layout
) -> torch.Tensor:
    """Ints ``[..., T, D]`` (repacked order) of the chunks with metadata ``meta[..., MW]`` whose payloads
    start at word ``offsets[...]`` of ``pool``."""
    P, R, d = layout.pack_size, layout.rows, layout.head_dim
    mins, widths = unpack_meta(meta, s, layout)
    starts, _ = payload_bit_offsets(widths, P)
    j = torch.arange(P, device=meta.device).reshape(P, 1)
    w = widths[..., :, None, :]
    pos = offsets.to(torch.int64)[..., None, None, None] * 32 + starts[..., :, None, :] + j * w
    deltas = read_fields(pool, pos, w.expand_as(pos))
    q = mins[..., :, None, :] + deltas
    return q.reshape(*meta.shape[:-1], layout.block_size, d)


def unpermute(x: torch.Tensor, perm: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of ``apply_perm``: put the token at slot i back at its original index perm[i]."""
    inv = torch.argsort(perm, dim=-1)
    return apply_perm(x, inv, dim)


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """fp32 values of ints ``q[N, H, T, D]`` with their block scales/zeros ``[N, Gh, Gt, Gc]``."""
    return dequantize(q, scale, zero)
