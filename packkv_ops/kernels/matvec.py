"""Decompress + mat-vec on packed blocks, the PackKV paper's kernel pair (benchmark protocol, §5 of the spec).

``k_matvec``: scores ``q . k_hat`` of one query per KV head against every compressed token (in storage order);
``v_matvec``: ``sum_n w_n v_hat_n`` for weights given in storage order. Twins: ``reference_k_matvec`` and
``reference_v_matvec`` below. The fused attention kernel is what the cache uses; these exist to compare with
the paper's ``torch.matmul`` GEMV protocol.

Two kernel pairs: one program per block decoding value by value (``decode_chunk``, the first GPU decode), and
(``windows=True``) programs that each take a run of blocks and decode them as the attention does
(``tiles.decode_block_windows``), with the products on tensor cores: the exact fp16 ints times the fp16 halves
(hi + lo) of the pow2-normalized query or weights, fp32 accumulation: within a few fp32 roundings of the terms
summed (2.5 measured on the H200; the ints' and zeros' sums cancel, and tensor-core sums truncate).
The windows pair needs what the attention's fast path needs (packs of <= 64 bits, ints below 1024) and token
groups; other layouts take the first pair. On sm_90 the same pair also exists as warp-specialized Gluon kernels
(``gluon_matvec``, decoded as the Gluon attention decodes), which ``benchmarks/kernels.py`` times beside these.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..codec import dequantize_blocks, unpack_chunks
from ..layout import Layout
from ..storage import PackedLayer
from ._launch import INTERPRET, launch, num_sms, resident_programs
from .attention import _pow2_normalizer, _split
from .tiles import decode_block_windows, decode_chunk, group_scale_rows, lane_order_tokens

# The default since it was timed (H200 2026-12-05b, kernels_h200_2026-12-05b.json): 3.5x the first pair's speed for K,
# 3.4x for V at every size (B8/32K K 0.157 vs 0.547 ms, V 0.210 vs 0.730).
WINDOWS = True
LANES = True  # the windows pair decodes ints in lane order (tiles._lane_values) where they fit


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


@triton.jit
def _block_range(split, n_blocks, NS):
    per = tl.cdiv(n_blocks, NS)
    lo = tl.minimum(split * per, n_blocks)
    return lo, tl.minimum(lo + per, n_blocks)


@triton.jit
def _k_matvec_windows_kernel(
    q_ptr, out_ptr, pool_ptr, meta_ptr, off_ptr, scale_ptr, zero_ptr, NB, H, n_blocks, NS,
    T: tl.constexpr, D: tl.constexpr, P: tl.constexpr, QBITS: tl.constexpr, MBITS: tl.constexpr,
    MW: tl.constexpr, GROUP: tl.constexpr, USE_ASM: tl.constexpr, EXACT: tl.constexpr = True,
    LANES: tl.constexpr = True,
):  # fmt: skip
    pid = tl.program_id(0)
    b = pid // H
    kvh = pid % H
    # q . (Q + z) s = s (q . Q + z sum(q)): the ints times the normalized query, scale and zero on the scores.
    q = tl.load(q_ptr + pid * D + tl.arange(0, D))[None, :].to(tl.float32)
    inv = tl.sum(_pow2_normalizer(q), 0)  # exact scaling: the fp16 halves keep ~22 bits of each element
    qn = q * inv
    qsum = tl.sum(tl.sum(qn, 1), 0)
    q_hi, q_lo = _split(qn)
    q_hi_t = tl.trans(q_hi)
    q_lo_t = tl.trans(q_lo)
    lo, hi = _block_range(tl.program_id(1), n_blocks, NS)
    # rows in lane order (tiles._lane_values), lanes of 4 values for ints of <= 4 bits, else of 2; 0: none
    LANE_ORDER: tl.constexpr = (4 if QBITS <= 4 else 2) if LANES and QBITS <= 8 and (P == 8 or P == 16) else 0
    for n in range(lo, hi):
        chunk = (b * NB + n) * H + kvh
        base = pool_ptr + tl.load(off_ptr + chunk)
        x = decode_block_windows(base, meta_ptr + chunk * MW, T, D, P, QBITS, MBITS, USE_ASM, LANE_ORDER)
        raw = tl.dot(x, q_hi_t)
        if EXACT:  # a bf16 / fp16 query is exact in its fp16 high half (pow2-normalized): no second product
            raw += tl.dot(x, q_lo_t)
        raw = tl.sum(raw, 1)
        s, z = group_scale_rows(scale_ptr, zero_ptr, b, n, kvh, NB, H, 0, T, T, D, GROUP, LANE_ORDER)
        tl.store(out_ptr + (pid * NB + n) * T + lane_order_tokens(T, LANE_ORDER), (raw + z * qsum) * s / inv)


@triton.jit
def _v_matvec_windows_kernel(
    w_ptr, out_ptr, pool_ptr, meta_ptr, off_ptr, scale_ptr, zero_ptr, NB, H, n_blocks, NS,
    T: tl.constexpr, D: tl.constexpr, P: tl.constexpr, QBITS: tl.constexpr, MBITS: tl.constexpr,
    MW: tl.constexpr, GROUP: tl.constexpr, USE_ASM: tl.constexpr, LANES: tl.constexpr = True,
):  # fmt: skip
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // H
    kvh = pid % H
    # sum_t w_t (Q_t + z_t) s_t = Q^T u + sum_t u_t z_t with u = w s: the ints times the block's normalized u.
    acc = tl.zeros((D, 1), tl.float32)
    lo, hi = _block_range(split, n_blocks, NS)
    # rows in lane order (tiles._lane_values), lanes of 4 values for ints of <= 4 bits, else of 2; 0: none
    LANE_ORDER: tl.constexpr = (4 if QBITS <= 4 else 2) if LANES and QBITS <= 8 and (P == 8 or P == 16) else 0
    for n in range(lo, hi):
        chunk = (b * NB + n) * H + kvh
        base = pool_ptr + tl.load(off_ptr + chunk)
        x = decode_block_windows(base, meta_ptr + chunk * MW, T, D, P, QBITS, MBITS, USE_ASM, LANE_ORDER)
        s, z = group_scale_rows(scale_ptr, zero_ptr, b, n, kvh, NB, H, 0, T, T, D, GROUP, LANE_ORDER)
        u = tl.load(w_ptr + (pid * n_blocks + n) * T + lane_order_tokens(T, LANE_ORDER)).to(tl.float32) * s
        inv = tl.sum(_pow2_normalizer(u[None, :]), 0)
        u_hi, u_lo = _split((u * inv)[:, None])
        xt = tl.trans(x)
        acc += (tl.dot(xt, u_hi) + tl.dot(xt, u_lo)) / inv + tl.sum(u * z, 0)
    tl.store(out_ptr + (pid * NS + split) * D + tl.arange(0, D), tl.sum(acc, 1))


def windows_fit(lay: Layout, stream: str) -> bool:
    """Whether the windows pair decodes this stream: token groups, packs of <= 64 bits, ints below 1024."""
    s = getattr(lay, stream)
    return s.grouping != 2 and lay.pack_size * s.qbits <= 64 and s.qbits <= 10


def _splits(st: PackedLayer, device: torch.device, n_blocks: int) -> int:
    """Runs of blocks per (sequence, head): one wave of resident 4-warp programs. The kernels run with
    ``num_stages=1``: Triton's pipelining of the block loop (cp.async copies through shared memory) takes their sm_90
    loops from 616 / 656 to 999 / 869 instructions per block (K with an fp32 query / V; a bf16 query: 565)."""
    slots = resident_programs(device, 4, None) * num_sms(device)
    return max(1, min(n_blocks, slots // (st.batch * st.layout.num_heads)))


def _args(st: PackedLayer, stream: str):
    lay = st.layout
    s = getattr(lay, stream)
    tensors = [getattr(st, f"{stream}_{f}") for f in ("meta", "offsets", "scale", "zero")]
    consts = dict(T=lay.block_size, D=lay.head_dim, P=lay.pack_size, QBITS=s.qbits, MBITS=s.mbits,
                  MW=lay.meta_words(s), GROUP=s.grouping)  # fmt: skip
    return tensors, consts


def check_matvec_input(x: torch.Tensor, st: PackedLayer, n_blocks: int, stream: str) -> None:
    """Refuse what the pairs' kernels would read out of bounds, naming it (host checks only: no device sync, so a
    benchmark can still capture the call in a CUDA graph). Blocks below the capacity that were never written read
    as the storage's zeros."""
    B, H, D = st.batch, st.layout.num_heads, st.layout.head_dim
    what = "queries" if stream == "k" else "weights"
    if not x.is_floating_point():
        raise ValueError(f"{what} must be floating point, got {x.dtype}")
    if x.device != st.pool.device:
        raise ValueError(f"{what} are on {x.device}, the packed layer on {st.pool.device}")
    want = f"[{B}, {H}, {D if stream == 'k' else 'tokens'}]"
    if x.dim() != 3 or tuple(x.shape[:2]) != (B, H) or (stream == "k" and x.shape[2] != D):
        raise ValueError(f"{what} must be shaped {want} for this layer, got {list(x.shape)}")
    if not 0 <= n_blocks <= st.block_capacity:
        raise ValueError(f"n_blocks={n_blocks} is outside the layer's block capacity 0..{st.block_capacity}")


def k_matvec(q: torch.Tensor, st: PackedLayer, n_blocks: int, windows: bool | None = None) -> torch.Tensor:
    """Scores ``[B, H, n_blocks * T]`` of queries ``q[B, H, D]`` against the first ``n_blocks`` blocks."""
    check_matvec_input(q, st, n_blocks, "k")
    B, H = st.batch, st.layout.num_heads
    out = torch.empty(B, H, st.block_capacity * st.layout.block_size, dtype=torch.float32, device=q.device)
    tensors, consts = _args(st, "k")
    if (WINDOWS if windows is None else windows) and windows_fit(st.layout, "k") and n_blocks > 0:
        ns = _splits(st, q.device, n_blocks)
        launch(_k_matvec_windows_kernel)[(B * H, ns)](
            q.contiguous(), out, st.pool, *tensors, st.block_capacity, H, n_blocks, ns, USE_ASM=not INTERPRET,
            EXACT=q.dtype == torch.float32, LANES=LANES, num_warps=4, num_stages=1, **consts,
        )  # fmt: skip
    else:
        launch(_k_matvec_kernel)[(B * H, n_blocks)](q.contiguous(), out, st.pool, *tensors, st.block_capacity, H, **consts)
    return out[:, :, : n_blocks * st.layout.block_size]


def v_matvec(w: torch.Tensor, st: PackedLayer, n_blocks: int, windows: bool | None = None) -> torch.Tensor:
    """``sum_n w[b, h, n] * v_hat[b, h, n]`` over the first ``n_blocks`` blocks: ``[B, H, D]`` (fp32)."""
    check_matvec_input(w, st, n_blocks, "v")
    B, H, D, T = st.batch, st.layout.num_heads, st.layout.head_dim, st.layout.block_size
    if (WINDOWS if windows is None else windows) and windows_fit(st.layout, "v") and n_blocks > 0:
        tensors, consts = _args(st, "v")
        ns = _splits(st, w.device, n_blocks)
        part = torch.empty(B, H, ns, D, dtype=torch.float32, device=w.device)
        if w.shape[-1] != n_blocks * T:  # as the per-value pair reads it: missing weights are zeros
            w = torch.nn.functional.pad(w[..., : n_blocks * T], (0, max(0, n_blocks * T - w.shape[-1])))
        launch(_v_matvec_windows_kernel)[(B * H, ns)](
            w.contiguous(), part, st.pool, *tensors, st.block_capacity, H, n_blocks, ns,
            USE_ASM=not INTERPRET, LANES=LANES, num_warps=4, num_stages=1, **consts,
        )  # fmt: skip
        return part.sum(2)
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
