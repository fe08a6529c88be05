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
    """The ``n x n`` orthonormal Sylvester Hadamard matrix (fp32), built from torch ops so graphs can trace it.

    Outside tracing and CUDA-graph capture the matrix is built once per (n, device) and reused: in the opaque
    ``append_`` op of a compiled step the build would otherwise replay ~28 tiny kernels per call. Never cached
    while tracing (graphs trace the build) or while a CUDA graph captures (the tensor would live in its pool)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two head_dim, got {n}")
    if _tracing_or_capturing(device):
        return _build(n, device)
    key = (n, torch.device(device) if device is not None else torch.device("cpu"))
    if key not in _MATRICES:
        _MATRICES[key] = _build(n, device)
    return _MATRICES[key]


_MATRICES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _build(n: int, device: torch.device | str | None) -> torch.Tensor:
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h * (1.0 / math.sqrt(n))


def _tracing_or_capturing(device: torch.device | str | None) -> bool:
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return True
    return torch.device(device or "cpu").type == "cuda" and torch.cuda.is_current_stream_capturing()


def rotate(x: torch.Tensor, rotation: int) -> torch.Tensor:
    """``x H`` over the last dimension (fp32 arithmetic, result in ``x``'s dtype); the identity for ``none``.

    ``H`` is its own inverse, so the same call rotates and rotates back.
    """
    if rotation == ROTATION_CODES["none"]:
        return x
    if rotation != ROTATION_CODES["hadamard"]:
        raise ValueError(f"unknown rotation code {rotation}; expected one of {sorted(ROTATION_CODES.values())}")
    return (x.float() @ hadamard(x.shape[-1], x.device)).to(x.dtype)
