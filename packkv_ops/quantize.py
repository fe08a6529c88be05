"""Reference error-bounded quantization (the method's lossy stage).

Per group: ``s = (max - min) * rel`` (rounded up to bfloat16, raised to ``max|x| / ZERO_LIMIT`` if needed so
the zero fits int16), ``z = round(min / s)``, ``q = round(x / s) - z``, ``x_hat = (q + z) * s``. All arithmetic is
fp32 whatever the input dtype. Every element satisfies ``|x - x_hat| <= s / 2``.
"""

from __future__ import annotations

import torch

from .layout import GROUP_CHANNEL, GROUP_TOKEN, GROUP_TOKEN_HEAD, SCALE_DTYPE, ZERO_DTYPE, ZERO_LIMIT, StreamLayout


def round_up_bf16(s: torch.Tensor) -> torch.Tensor:
    """Smallest bfloat16 value >= s (s > 0, finite), returned as bfloat16."""
    b = s.to(torch.bfloat16)
    below = b.float() < s
    nxt = (b.view(torch.int16) + 1).view(torch.bfloat16)  # next representable value (positive numbers)
    return torch.where(below, nxt, b)


def group_dims(grouping: int) -> tuple[int, ...]:
    """Dimensions of a block ``[N, H, T, D]`` reduced into one group."""
    return {GROUP_TOKEN: (1, 3), GROUP_TOKEN_HEAD: (3,), GROUP_CHANNEL: (2,)}[grouping]


def quantize(x: torch.Tensor, s: StreamLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize blocks ``x[N, H, T, D]``.

    Returns ``q`` (int32, in ``[0, qmax]``), ``scale`` (bfloat16) and ``zero`` (int16); scale and zero have the
    block shape reduced over the group's dimensions (size 1 there).
    """
    xf = x.float()
    dims = group_dims(s.grouping)
    mn = xf.amin(dim=dims, keepdim=True)
    mx = xf.amax(dim=dims, keepdim=True)
    amax = torch.maximum(mn.abs(), mx.abs())
    # Times the fp32 reciprocal, not a division: torch's CUDA division by a scalar is a reciprocal product and
    # its CPU one is not; a product is the same on both devices and in the Triton kernel.
    step = torch.maximum((mx - mn) * s.rel, amax * (1.0 / ZERO_LIMIT))
    step = torch.where(step > 0, step, torch.ones_like(step))  # all-zero group: any scale is exact
    scale = round_up_bf16(step)
    sf = scale.float()
    zero = torch.round(mn / sf)
    q = (torch.round(xf / sf) - zero).clamp_(0, s.qmax).to(torch.int32)
    return q, scale.to(SCALE_DTYPE), zero.to(ZERO_DTYPE)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(q + zero) * scale`` in fp32 (broadcasting scale/zero over their group)."""
    return (q.float() + zero.float()) * scale.float()


def check_finite(name: str, x: torch.Tensor) -> None:
    """Raise a ValueError naming ``name`` if ``x`` holds NaN or Inf (a host sync on GPU tensors)."""
    if not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"{name} contains {bad} NaN/Inf values; nothing was stored")
