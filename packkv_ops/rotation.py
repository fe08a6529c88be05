"""Optional orthogonal rotation of each head's K and V before quantization (``PackKVConfig(rotation="hadamard")``).

Keys carry a few outlier channels and per-token ranges over all heads are wide; multiplying each head vector by
the orthonormal, symmetric Sylvester Hadamard matrix ``H`` (``H @ H = I``) spreads the outliers over all
channels, so the same error bound costs less fidelity (benchmarks/results/accuracy). Because
``q . k = (q H) . (k H)`` and ``sum_j p_j v_j = (sum_j p_j v_j H) H``, attention over rotated K/V only needs the
query rotated and the output rotated back; the packed bytes and the kernels are unchanged.

Where it happens (``ops.py``): ``append_`` stores ``K H`` / ``V H`` (compressed blocks *and* the exact ring, so
one kernel sees one coordinate system), ``decompress`` returns ``K_hat H``, ``attention`` runs on ``q H`` and
returns ``out H``. The exact window is then exact up to one rounding of the rotated values to the cache dtype.
"""

from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

ROTATION_CODES = {"none": 0, "hadamard": 1}


def hadamard(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The ``n x n`` orthonormal Sylvester Hadamard matrix (fp32): entry ``(i, j)`` is
    ``(-1)**popcount(i & j) / sqrt(n)``.

    Built once per (n, device) and reused, except while tracing (graphs build it from a few pointwise ops, which
    Inductor fuses into one kernel) or while a CUDA graph captures and it is not cached yet (a tensor made then
    would live in the graph's pool). In the opaque ``append_`` of a captured step the cached matrix is read."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two head_dim, got {n}")
    key = (n, torch.device(device) if device is not None else torch.device("cpu"))
    if _tracing():
        return _build(n, device)
    if key not in _MATRICES:
        if _capturing(key[1]):
            return _build(n, device)
        _MATRICES[key] = _build(n, device)
    return _MATRICES[key]


_MATRICES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _build(n: int, device: torch.device | str | None) -> torch.Tensor:
    i = torch.arange(n, device=device)
    both = i[:, None] & i[None, :]
    parity = torch.zeros_like(both)
    for b in range(max(1, (n - 1).bit_length())):
        parity = parity ^ ((both >> b) & 1)
    return (1 - 2 * parity).to(torch.float32) * (1.0 / math.sqrt(n))


def _tracing() -> bool:
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def is_hadamard(rotation: int, n: int) -> bool:
    """Whether ``rotation`` (a ``ROTATION_CODES`` value) rotates vectors of length ``n``; unknown codes and a
    Hadamard rotation of a length that is not a power of two are errors."""
    if rotation == ROTATION_CODES["none"]:
        return False
    if rotation != ROTATION_CODES["hadamard"]:
        raise ValueError(f"unknown rotation code {rotation}; expected one of {sorted(ROTATION_CODES.values())}")
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two head_dim, got {n}")
    return True


def rotate(x: torch.Tensor, rotation: int) -> torch.Tensor:
    """``x H`` over the last dimension (fp32 arithmetic, result in ``x``'s dtype); the identity for ``none``.

    ``H`` is its own inverse, so the same call rotates and rotates back.
    """
    if not is_hadamard(rotation, x.shape[-1]):
        return x
    h = hadamard(x.shape[-1], x.device)
    n = x.numel()
    if isinstance(n, int) and n <= (FUSED_ROTATION_MAX if _tracing() else EAGER_PRODUCT_MAX):
        # Decode-sized x (queries, attention outputs, a decode step's new K/V): a broadcast product and a sum (the
        # same fp32 products) where the tiny fp32 GEMM went to a one-CTA cuBLAS kernel taking ~53 us on the H200,
        # per layer per decode step. Traced, Inductor fuses it with the matrix's build into one kernel; eager (the
        # opaque append_), two small kernels. Bounded: run eagerly, the product materialises x x head_dim.
        # No x.float(): the product promotes bf16/fp16 to fp32 exactly, in the same kernel (one launch less).
        return (x[..., :, None] * h).sum(-2).to(x.dtype)
    return (x.float() @ h).to(x.dtype)


FUSED_ROTATION_MAX = 1 << 20
EAGER_PRODUCT_MAX = 1 << 15  # a 16 MB product at most
