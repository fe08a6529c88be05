"""Decompress + mat-vec on packed blocks, the PackKV paper's kernel pair (benchmark protocol, §5 of the spec).

``k_matvec``: scores ``q . k_hat`` of one query per KV head against every compressed token (in storage order);
``v_matvec``: ``sum_n w_n v_hat_n`` for weights given in storage order. Twins: ``reference_k_matvec`` and
``reference_v_matvec`` below. The fused attention kernel is what the cache uses; these exist to compare with
the paper's ``torch.matmul`` GEMV protocol.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..codec import dequantize_blocks, unpack_chunks
from ..storage import PackedLayer
from ._launch import launch
from .tiles import decode_chunk


@triton.jit
def _k_matvec_kernel(
    q_ptr, out_ptr, pool_ptr, meta_ptr, off_ptr, scale_ptr, zero_ptr, NB, H,
    T: tl.constexpr, D: tl.constexpr, P: tl.constexpr, QBITS: tl.constexpr, MBITS: tl.constexpr,
    MW: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n = tl.program_id(1)
    b = pid // H
    kvh = pid % H
    k = decode_chunk(pool_ptr, meta_ptr, off_ptr, scale_ptr, zero_ptr, b, n, kvh, NB, H,
                     T, D, P, QBITS, MBITS, MW, GROUP)  # fmt: skip
    q = tl.load(q_ptr + pid * D + tl.arange(0, D)).to(tl.float32)
    tl.store(out_ptr + (pid * NB + n) * T + tl.arange(0, T), tl.sum(k * q[None, :], 1))


@triton.jit
def _v_matvec_kernel(
    w_ptr, out_ptr, pool_ptr, meta_ptr, off_ptr, scale_ptr, zero_ptr, NB, H,
    T: tl.constexpr, D: tl.constexpr, P: tl.constexpr, QBITS: tl.constexpr, MBITS: tl.constexpr,
    MW: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n = tl.program_id(1)
    b = pid // H
    kvh = pid % H
    v = decode_chunk(pool_ptr, meta_ptr, off_ptr, scale_ptr, zero_ptr, b, n, kvh, NB, H,
                     T, D, P, QBITS, MBITS, MW, GROUP)  # fmt: skip
    w = tl.load(w_ptr + (pid * NB + n) * T + tl.arange(0, T)).to(tl.float32)
    tl.store(out_ptr + (pid * NB + n) * D + tl.arange(0, D), tl.sum(v * w[:, None], 0))


def _args(st: PackedLayer, stream: str):
    lay = st.layout
    s = getattr(lay, stream)
    tensors = [getattr(st, f"{stream}_{f}") for f in ("meta", "offsets", "scale", "zero")]
    consts = dict(T=lay.block_size, D=lay.head_dim, P=lay.pack_size, QBITS=s.qbits, MBITS=s.mbits,
                  MW=lay.meta_words(s), GROUP=s.grouping)  # fmt: skip
    return tensors, consts


def k_matvec(q: torch.Tensor, st: PackedLayer, n_blocks: int) -> torch.Tensor:
    """Scores ``[B, H, n_blocks * T]`` of queries ``q[B, H, D]`` against the first ``n_blocks`` blocks."""
    B, H = st.batch, st.layout.num_heads
    out = torch.empty(B, H, st.block_capacity * st.layout.block_size, dtype=torch.float32, device=q.device)
    tensors, consts = _args(st, "k")
    launch(_k_matvec_kernel)[(B * H, n_blocks)](q.contiguous(), out, st.pool, *tensors, st.block_capacity, H, **consts)
    return out[:, :, : n_blocks * st.layout.block_size]


def v_matvec(w: torch.Tensor, st: PackedLayer, n_blocks: int) -> torch.Tensor:
    """``sum_n w[b, h, n] * v_hat[b, h, n]`` over the first ``n_blocks`` blocks: ``[B, H, D]`` (fp32)."""
    B, H, D, T = st.batch, st.layout.num_heads, st.layout.head_dim, st.layout.block_size
    wpad = torch.zeros(B, H, st.block_capacity * T, dtype=torch.float32, device=w.device)
    wpad[:, :, : w.shape[-1]] = w
    part = torch.empty(B, H, st.block_capacity, D, dtype=torch.float32, device=w.device)
    tensors, consts = _args(st, "v")
    launch(_v_matvec_kernel)[(B * H, n_blocks)](wpad, part, st.pool, *tensors, st.block_capacity, H, **consts)
    return part[:, :, :n_blocks].sum(2)


def dequantized_blocks(st: PackedLayer, stream: str, n_blocks: int) -> torch.Tensor:
    """fp32 ``[B, H, n_blocks * T, D]`` of the compressed tokens in storage (repacked) order."""
    lay = st.layout
    s = getattr(lay, stream)
    meta, off, scale, zero = (getattr(st, f"{stream}_{f}")[:, :n_blocks] for f in ("meta", "offsets", "scale", "zero"))
    q = unpack_chunks(meta, st.pool, off, s, lay)  # [B, NB, H, T, D]
    x = dequantize_blocks(q, scale, zero)
    B, nb, H, T, D = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(B, H, nb * T, D)


def reference_k_matvec(q: torch.Tensor, st: PackedLayer, n_blocks: int) -> torch.Tensor:
    return (dequantized_blocks(st, "k", n_blocks) @ q.float()[..., None]).squeeze(-1)


def reference_v_matvec(w: torch.Tensor, st: PackedLayer, n_blocks: int) -> torch.Tensor:
    return (w.float()[:, :, None, :] @ dequantized_blocks(st, "v", n_blocks)).squeeze(2)
