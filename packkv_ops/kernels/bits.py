"""Triton helpers for the bit streams of FORMAT.md (twin of ``packkv.ops.bitstream``)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def read_bits(words_ptr, bitpos, width):
    """Fields of ``width`` (<= 16) bits at bit positions ``bitpos`` of the int32 stream at ``words_ptr``.

    Two aligned word loads and a funnel shift: bits [sh, sh + 32) of (word[i+1] : word[i]). The second word
    is read only when the field spills into it, so no read passes the end of the stream.
    """
    widx = bitpos >> 5
    sh = (bitpos & 31).to(tl.uint32)
    lo = tl.load(words_ptr + widx).to(tl.uint32, bitcast=True)
    spill = (bitpos & 31) + width > 32
    hi = tl.load(words_ptr + widx + 1, mask=spill, other=0).to(tl.uint32, bitcast=True)
    both = (lo >> sh) | ((hi << 1) << (31 - sh))  # `hi << (32 - sh)` without the undefined shift by 32
    return both.to(tl.int32, bitcast=True) & ((1 << width) - 1)  # width is a tensor or a constexpr
