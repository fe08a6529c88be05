"""Products with the Sylvester Hadamard matrix inside Triton kernels (twin of ``rotation.hadamard``), by the fast
Walsh-Hadamard transform: the matrix is never built."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def fwht_rows(x, M: tl.constexpr, D: tl.constexpr):
    """``x @ S`` for the rows of ``x`` ``[M, D]`` (fp32), ``S`` the ``D x D`` Sylvester matrix without its
    ``1/sqrt(D)`` (entry ``(i, j)`` is ``(-1)**popcount(i & j)``): log2(D) butterfly stages ``(a, b) -> (a + b, a -
    b)`` over the index bits. Each output is the fp32 sum of the same exact terms ``+-x`` as a product with ``S``
    sums, in another order. Until 2026-12-04j the kernels built ``S`` in registers and multiplied on the tensor
    cores: ~1,000 sm_90 instructions per attention program for the query, against ~160 now, and it needed
    head_dim <= 128."""
    for s in tl.static_range(D.bit_length() - 1):
        x = _butterfly(x, M, D, 1 << s)
    return x


@triton.jit
def _butterfly(x, M: tl.constexpr, D: tl.constexpr, H: tl.constexpr):
    """One stage of ``fwht_rows``: ``(a, b) -> (a + b, a - b)`` for the index pairs that differ in bit ``H``."""
    a, b = tl.split(tl.permute(tl.reshape(x, (M, D // (2 * H), 2, H)), (0, 1, 3, 2)))  # bit H's pair last
    return tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (M, D))
