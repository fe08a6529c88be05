"""A decode step's append in one kernel (twin of ``gpu.append_`` when one token arrives and no block is full).

Per layer and step the general path launches ~20 tiny kernels (finiteness reductions, slot arithmetic, an indexed
ring write, counter updates); under CUDA graphs each still costs a few microseconds. Here one program per sequence
checks every sequence's new K/V for NaN/Inf (the whole batch is refused together: the host mirrors one count for
all sequences), then writes its own token into its ring slot and advances its window counter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..storage import PackedLayer
from ._launch import launch, next_pow2


@triton.jit
def _non_finite(x):
    """1 where x is NaN or +-Inf: all exponent bits set (a bit test, the same on the GPU and in the interpreter)."""
    bits = x.to(tl.float32).to(tl.int32, bitcast=True)
    return ((bits & 0x7F800000) == 0x7F800000).to(tl.int32)


@triton.jit
def _append_token_kernel(
    k_ptr, v_ptr, ring_k_ptr, ring_v_ptr, n_blocks_ptr, n_win_ptr,
    B, H, S, skb, skh, svb, svh,
    T: tl.constexpr, D: tl.constexpr, HP: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.arange(0, HP)[:, None]
    c = tl.arange(0, D)[None, :]
    m = h < H
    bad = tl.zeros((HP, D), tl.int32)
    for i in range(B):  # every program checks the whole batch (a few KB per sequence, from L2)
        bad |= _non_finite(tl.load(k_ptr + i * skb + h * skh + c, mask=m, other=0.0))
        bad |= _non_finite(tl.load(v_ptr + i * svb + h * svh + c, mask=m, other=0.0))
    if tl.max(tl.max(bad, 1), 0) == 0:
        nw = tl.load(n_win_ptr + b)
        slot = (tl.load(n_blocks_ptr + b) * T + nw) % S
        dst = ((b * H + h).to(tl.int64) * S + slot) * D + c
        tl.store(ring_k_ptr + dst, tl.load(k_ptr + b * skb + h * skh + c, mask=m), mask=m)
        tl.store(ring_v_ptr + dst, tl.load(v_ptr + b * svb + h * svh + c, mask=m), mask=m)
        tl.store(n_win_ptr + b, nw + 1)


def append_token(st: PackedLayer, new_k: torch.Tensor, new_v: torch.Tensor) -> None:
    """Append one token per sequence (``[B, H, 1, D]``) to a layer whose ring has room (no block to flush)."""
    B, H, _, D = new_k.shape
    if new_k.stride(-1) != 1:
        new_k = new_k.contiguous()
    if new_v.stride(-1) != 1:
        new_v = new_v.contiguous()
    launch(_append_token_kernel)[(B,)](
        new_k, new_v, st.ring_k, st.ring_v, st.n_blocks, st.n_win,
        B, H, st.layout.ring_size, new_k.stride(0), new_k.stride(1), new_v.stride(0), new_v.stride(1),
        T=st.layout.block_size, D=D, HP=next_pow2(H),
    )  # fmt: skip
