"""Reference bit streams: fields of up to 16 bits at arbitrary bit positions of little-endian int32 words.

Bit ``p`` of a stream is bit ``p % 32`` of word ``p // 32`` (LSB first), so a field of width ``w`` at
position ``p`` is ``(word[p//32] | word[p//32 + 1] << 32) >> (p % 32) & (2**w - 1)``: at most two words,
which is how every kernel reads it.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF


def write_fields(n_words: int, pos: torch.Tensor, val: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """Words (int32, length ``n_words``) holding ``val`` (< 2**width) at bit positions ``pos``.

    Fields must not overlap; fields of width 0 write nothing.
    """
    pos = pos.reshape(-1).to(torch.int64)
    val = val.reshape(-1).to(torch.int64)
    width = width.reshape(-1).to(torch.int64)
    keep = width > 0
    pos, val, width = pos[keep], val[keep], width[keep]
    words = torch.zeros(n_words + 1, dtype=torch.int64, device=pos.device)
    widx = pos >> 5
    sh = pos & 31
    shifted = val << sh  # < 2**47
    # Disjoint fields: adding is OR. The low part lands in word widx, the spill in widx + 1.
    words.index_add_(0, widx, shifted & MASK32)
    words.index_add_(0, widx + 1, shifted >> 32)
    if words[-1].item() != 0:
        raise ValueError("bit stream field extends past the end of the stream")
    return to_int32(words[:-1])


def read_fields(words: torch.Tensor, pos: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """Fields of ``width`` bits at bit positions ``pos`` of int32 ``words`` (int64 result, same shape as pos).

    Positions are indices into the flat ``words``; a field may end in the last word (the word after it is
    read as zero). Zero-width fields read as 0 wherever they point inside the stream.
    """
    w = words.reshape(-1).to(torch.int64) & MASK32
    w = torch.cat([w, w.new_zeros(2)])
    pairs = w[:-1] | (w[1:] << 32)  # pairs[i]: words i and i+1, so any field is one shift away
    pos = pos.to(torch.int64)
    return (pairs[pos >> 5] >> (pos & 31)) & _MASKS.to(pos.device)[width.to(torch.int64)]


_MASKS = torch.tensor([(1 << b) - 1 for b in range(33)], dtype=torch.int64)


def to_int32(words64: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    w = words64 & MASK32
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def bit_length(x: torch.Tensor) -> torch.Tensor:
    """Number of bits of non-negative integers (0 for 0), elementwise, for values < 2**17."""
    x = x.to(torch.int64)
    n = torch.zeros_like(x)
    for b in range(17):
        n = torch.where(x >= (1 << b), b + 1, n)
    return n
