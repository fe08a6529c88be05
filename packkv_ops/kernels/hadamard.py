"""The Sylvester Hadamard matrix built inside Triton kernels (twin of ``rotation.hadamard``)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def hadamard_signs(D: tl.constexpr):
    """The ``D x D`` Sylvester matrix without its ``1/sqrt(D)``: ``(-1)**popcount(i & j)``, exact in every float
    dtype. The parity of ``i & j < 512`` by folding its bits."""
    x = tl.arange(0, D)[:, None] & tl.arange(0, D)[None, :]
    x = x ^ (x >> 8)
    x = x ^ (x >> 4)
    x = x ^ (x >> 2)
    x = x ^ (x >> 1)
    return (1 - 2 * (x & 1)).to(tl.float32)
