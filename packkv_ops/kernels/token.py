"""A decode step's append in one kernel (twin of ``gpu.append_`` when one token arrives and no block is full).

Per layer and step the general path launches ~20 tiny kernels (finiteness reductions, slot arithmetic, an indexed
ring write, counter updates); under CUDA graphs each still costs a few microseconds. Here one program per sequence
rotates (``rotation="hadamard"``) and checks every sequence's new K/V for NaN/Inf (the whole batch is refused
together: the host mirrors one count for all sequences), then writes its own token into its ring slot and
advances its window counter. Rotating here replaces the six eager kernels per layer and step of ``rotate`` (a
product, a sum and a cast for K and for V) by one tensor-core product per head group.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..rotation import is_hadamard
from ..storage import PackedLayer
from ._launch import launch, next_pow2
from .hadamard import fwht_rows


@triton.jit
def _non_finite(x):
    """1 where x is NaN or +-Inf: all exponent bits set (a bit test, the same on the GPU and in the interpreter)."""
    bits = x.to(tl.float32).to(tl.int32, bitcast=True)
    return ((bits & 0x7F800000) == 0x7F800000).to(tl.int32)


@triton.jit
def _token(ptr, sb, sh, i, h, c, m, inv_sqrt, HP: tl.constexpr, D: tl.constexpr, ROTATE: tl.constexpr):
    """Sequence ``i``'s new token ``[HP, D]`` in the ring's dtype, rotated if ``ROTATE`` (as ``rotation.rotate``:
    fp32 sums of the exact terms, one rounding to the dtype)."""
    x = tl.load(ptr + i * sb + h * sh + c, mask=m, other=0.0)
    if ROTATE:
        x = (fwht_rows(x.to(tl.float32), HP, D) * inv_sqrt).to(ptr.dtype.element_ty)
    return x


@triton.jit
def _append_token_kernel(
    k_ptr, v_ptr, ring_k_ptr, ring_v_ptr, n_blocks_ptr, n_win_ptr,
    B, H, S, skb, skh, svb, svh, inv_sqrt,
    T: tl.constexpr, D: tl.constexpr, HP: tl.constexpr, ROTATE: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.arange(0, HP)[:, None]
    c = tl.arange(0, D)[None, :]
    m = h < H
    inv_sqrt = tl.cast(inv_sqrt, tl.float32)
    # One round trip: the counters load with the tokens (not after the check), the own token is rotated once and
    # the loop gathers the others only (the own loads predicated off): at batch 1 the kernel waited on two.
    nw = tl.load(n_win_ptr + b)
    nb = tl.load(n_blocks_ptr + b)
    xk = _token(k_ptr, skb, skh, b, h, c, m, inv_sqrt, HP, D, ROTATE)
    xv = _token(v_ptr, svb, svh, b, h, c, m, inv_sqrt, HP, D, ROTATE)
    bad = _non_finite(xk) | _non_finite(xv)
    for i in range(B):  # every program checks the whole batch (a few KB per sequence, from L2)
        o = m & (i != b)
        bad |= _non_finite(_token(k_ptr, skb, skh, i, h, c, o, inv_sqrt, HP, D, ROTATE))
        bad |= _non_finite(_token(v_ptr, svb, svh, i, h, c, o, inv_sqrt, HP, D, ROTATE))
    if tl.max(tl.max(bad, 1), 0) == 0:
        slot = (nb * T + nw) % S
        dst = ((b * H + h).to(tl.int64) * S + slot) * D + c
        tl.store(ring_k_ptr + dst, xk, mask=m)
        tl.store(ring_v_ptr + dst, xv, mask=m)
        tl.store(n_win_ptr + b, nw + 1)


def append_token(st: PackedLayer, new_k: torch.Tensor, new_v: torch.Tensor, rotation: int = 0) -> None:
    """Append one token per sequence (``[B, H, 1, D]``, in the model's coordinates: ``rotation`` is applied here)
    to a layer whose ring has room (no block to flush)."""
    B, H, _, D = new_k.shape
    rotate = is_hadamard(rotation, D)
    if new_k.stride(-1) != 1:
        new_k = new_k.contiguous()
    if new_v.stride(-1) != 1:
        new_v = new_v.contiguous()
    hp = next_pow2(H)
    launch(_append_token_kernel)[(B,)](
        new_k, new_v, st.ring_k, st.ring_v, st.n_blocks, st.n_win,
        B, H, st.layout.ring_size, new_k.stride(0), new_k.stride(1), new_v.stride(0), new_v.stride(1),
        1.0 / math.sqrt(D), T=st.layout.block_size, D=D, HP=hp, ROTATE=rotate,
    )  # fmt: skip
