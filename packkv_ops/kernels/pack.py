"""Bit-pack quantized blocks into chunks (twin of ``codec.pack_chunks``).

Pack statistics and metadata words come from a few vectorized torch ops (no atomics, no host syncs);
the variable-width payload is written by a Triton kernel. Packs are byte-aligned (P * width bits with P a
multiple of 8), so each program assembles its packs in registers and writes their bytes with plain stores:
no two packs share a byte.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..bitstream import MASK32, bit_length, to_int32
from ..layout import Layout, StreamLayout
from ._launch import launch, next_pow2


@triton.jit
def _pack_payload_kernel(
    q_ptr, mins_ptr, widths_ptr, pbase_ptr, chunk_off_ptr, pool_ptr,
    T: tl.constexpr, D: tl.constexpr, P: tl.constexpr, R: tl.constexpr, NW: tl.constexpr,
):  # fmt: skip
    chunk = tl.program_id(0)
    r = tl.program_id(1)
    cc = tl.arange(0, D)
    meta = (chunk * R + r) * D + cc
    mu = tl.load(mins_ptr + meta)
    w = tl.load(widths_ptr + meta)
    start = tl.load(pbase_ptr + meta)  # byte offset of the pack inside its chunk
    kk = tl.arange(0, NW)
    words = tl.zeros((D, NW), tl.uint32)  # the pack's bits, LSB first, as NW little-endian words
    for j in tl.static_range(P):
        d = (tl.load(q_ptr + (chunk * T + r * P + j) * D + cc) - mu).to(tl.uint32)
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
    dst = pool_ptr.to(tl.pointer_type(tl.uint8)) + tl.load(chunk_off_ptr + chunk).to(tl.int64) * 4 + start
    tl.store(dst[:, None] + byte_idx[None, :], byte.to(tl.uint8), mask=byte_idx[None, :] < nbytes[:, None])


def pack_stats(q: torch.Tensor, lay: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pack minimum and width ``[N, H, R, D]`` (int32) of ints ``q[N, H, T, D]``."""
    n, h, t, d = q.shape
    qr = q.reshape(n, h, lay.rows, lay.pack_size, d)
    mins = qr.amin(3)
    return mins.to(torch.int32), bit_length(qr.amax(3) - mins).to(torch.int32)


def meta_words(mins: torch.Tensor, widths: torch.Tensor, s: StreamLayout, mw: int) -> torch.Tensor:
    """Metadata words ``[N, H, MW]``: field ``r*D + c`` = min | width << qbits at bit ``(r*D + c) * mbits``.

    Gather formulation: word k ORs the few fields overlapping its 32 bits (fixed width, so which ones is static).
    """
    lead = mins.shape[:-2]
    fields = (mins.to(torch.int64) | (widths.to(torch.int64) << s.qbits)).reshape(*lead, -1)
    nf = fields.shape[-1]
    k = torch.arange(mw, device=fields.device)[:, None]
    i = (32 * k) // s.mbits + torch.arange(32 // s.mbits + 2, device=fields.device)[None, :]  # [MW, J]
    shift = i * s.mbits - 32 * k
    use = (i < nf) & (shift < 32)
    f = fields[..., i.clamp(max=nf - 1)]
    part = torch.where(shift >= 0, f << shift.clamp(min=0), f >> (-shift).clamp(min=0)) & MASK32
    return to_int32((part * use).sum(-1))


def payload_layout(widths: torch.Tensor, pack_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte offset of each pack inside its chunk ``[N, H, R, D]`` and payload words per chunk ``[N, H]``."""
    nbytes = (widths * (pack_size // 8)).flatten(-2).to(torch.int32)
    ends = nbytes.cumsum(-1, dtype=torch.int32)
    return (ends - nbytes).reshape(widths.shape), (ends[..., -1] + 3) // 4


def write_payload(
    q: torch.Tensor, mins: torch.Tensor, widths: torch.Tensor, starts: torch.Tensor, chunk_off: torch.Tensor,
    pool: torch.Tensor, s: StreamLayout, lay: Layout,
) -> None:  # fmt: skip
    """Write the payload of chunks ``q[N, H, T, D]`` into ``pool`` at word offsets ``chunk_off[N*H]``."""
    n, h, t, d = q.shape
    nw = next_pow2(-(-lay.pack_size * s.qbits // 32))  # words of the widest pack (packs are byte-aligned)
    launch(_pack_payload_kernel)[(n * h, lay.rows)](
        q.contiguous(), mins.contiguous(), widths.contiguous(), starts.contiguous(), chunk_off.contiguous(), pool,
        T=t, D=d, P=lay.pack_size, R=lay.rows, NW=nw,
    )  # fmt: skip
