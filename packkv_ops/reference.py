"""Reference implementation of the three cache ops, in plain PyTorch: the executable specification.

These are the CPU kernels of the ``packkv`` ops and the oracle every Triton kernel is tested against.
They favour clarity over speed (host syncs and Python loops over sequences are fine here).

* ``append_``: add new tokens to a layer; when the exact ring holds ``window + block_size`` tokens, compress
  its oldest ``block_size`` tokens into a packed block. ``n_flush`` (how many blocks this call compresses)
  is decided by the caller, which knows the token counts; the op checks it against the device counters. A
  caller may compress more than it must (``flush_ahead_count``: a call with no new tokens that compresses the
  block the next one-token append would, so that a compiled decode step never compresses).
* ``decompress``: K/V of every stored token in original order, ``out_len`` long (zeros past the end).
* ``attention``: ``scaled_dot_product_attention(q, *decompress(...))`` with the dequantized values kept in
  fp32 (the fused kernel never rounds them to the model dtype).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .codec import dequantize_blocks, pack_chunks, quantize_blocks, unpack_chunks, unpermute
from .layout import Layout
from .quantize import check_finite
from .storage import PackedLayer


def flush_count(n_win: int, new_tokens: int, layout: Layout) -> int:
    """Blocks to compress when ``new_tokens`` join a ring holding ``n_win`` tokens."""
    return max(0, (n_win + new_tokens - layout.window) // layout.block_size)


def max_flush_count(n_win: int, new_tokens: int, layout: Layout) -> int:
    """Most blocks one append may compress: whole blocks of the ring's and the new tokens."""
    return (n_win + new_tokens) // layout.block_size


def flush_ahead_count(n_win: int, new_tokens: int, layout: Layout) -> int:
    """Blocks a call with no new tokens can compress before an append of ``new_tokens``, so that that append
    compresses none: the blocks it would compress that hold ring tokens only (all of them for one token, unless
    the window is 0)."""
    return min(flush_count(n_win, new_tokens, layout), n_win // layout.block_size)


def append_(st: PackedLayer, new_k: torch.Tensor, new_v: torch.Tensor, n_flush: int) -> None:
    lay = st.layout
    B, H, P, D = new_k.shape
    T, S = lay.block_size, lay.ring_size
    check_finite("new keys", new_k)
    check_finite("new values", new_v)
    n_blocks = st.n_blocks.tolist()
    n_win = st.n_win.tolist()
    for b in range(B):
        # At least what keeps the ring from overflowing, at most the whole blocks there are.
        if not flush_count(n_win[b], P, lay) <= n_flush <= max_flush_count(n_win[b], P, lay):
            raise ValueError(
                f"append_: n_flush={n_flush} does not fit sequence {b} (n_win={n_win[b]}, {P} new tokens: "
                f"{flush_count(n_win[b], P, lay)} to {max_flush_count(n_win[b], P, lay)} blocks)"
            )
        if n_blocks[b] + n_flush > st.block_capacity:
            raise ValueError(f"append_: block capacity {st.block_capacity} exceeded")

    # Gather the tokens of the blocks to compress, sequence-major then block: chunk order is (b, k, h).
    blocks_k, blocks_v = [], []
    for b in range(B):
        start = n_blocks[b] * T
        slots = (start + torch.arange(n_win[b], device=st.device)) % S
        ck = torch.cat([st.ring_k[b][:, slots], new_k[b]], dim=1)  # [H, n_win + P, D]
        cv = torch.cat([st.ring_v[b][:, slots], new_v[b]], dim=1)
        for k in range(n_flush):
            blocks_k.append(ck[:, k * T : (k + 1) * T])
            blocks_v.append(cv[:, k * T : (k + 1) * T])

    if n_flush:
        qb = quantize_blocks(torch.stack(blocks_k), torch.stack(blocks_v), lay)
        k_meta, k_words, k_pay = pack_chunks(qb.kq, lay.k, lay)
        v_meta, v_words, v_pay = pack_chunks(qb.vq, lay.v, lay)
        # Pool layout of one call: all K chunks (b, k, h) then all V chunks.
        cursor = int(st.cursor.item())
        total = k_pay.numel() + v_pay.numel()
        if cursor + total > st.pool_capacity:
            raise ValueError(f"append_: pool capacity {st.pool_capacity} words exceeded (need {cursor + total})")
        k_off = cursor + k_words.flatten().cumsum(0) - k_words.flatten()
        v_off = cursor + k_pay.numel() + v_words.flatten().cumsum(0) - v_words.flatten()
        st.pool[cursor : cursor + k_pay.numel()] = k_pay
        st.pool[cursor + k_pay.numel() : cursor + total] = v_pay
        st.cursor.fill_(cursor + total)
        k_off, v_off = k_off.reshape(B, n_flush, H), v_off.reshape(B, n_flush, H)
        shp = (B, n_flush)
        for b in range(B):
            sl = slice(n_blocks[b], n_blocks[b] + n_flush)
            st.k_meta[b, sl] = k_meta.reshape(*shp, *k_meta.shape[1:])[b]
            st.v_meta[b, sl] = v_meta.reshape(*shp, *v_meta.shape[1:])[b]
            st.k_offsets[b, sl] = k_off[b].to(torch.int32)
            st.v_offsets[b, sl] = v_off[b].to(torch.int32)
            st.k_scale[b, sl] = qb.k_scale.reshape(*shp, *qb.k_scale.shape[1:])[b]
            st.k_zero[b, sl] = qb.k_zero.reshape(*shp, *qb.k_zero.shape[1:])[b]
            st.v_scale[b, sl] = qb.v_scale.reshape(*shp, *qb.v_scale.shape[1:])[b]
            st.v_zero[b, sl] = qb.v_zero.reshape(*shp, *qb.v_zero.shape[1:])[b]
            st.perm[b, sl] = qb.perm.reshape(*shp, T)[b].to(torch.uint8)

    # The tokens that stay exact go to their ring slots (ring tokens that stay are already in place).
    for b in range(B):
        nw_after = n_win[b] + P - n_flush * T
        first_new = max(0, n_flush * T - n_win[b])  # first new token that is not compressed
        pos = n_blocks[b] * T + n_win[b] + torch.arange(first_new, P, device=st.device)
        st.ring_k[b][:, pos % S] = new_k[b, :, first_new:]
        st.ring_v[b][:, pos % S] = new_v[b, :, first_new:]
        st.n_blocks[b] = n_blocks[b] + n_flush
        st.n_win[b] = nw_after


def decompress_fp32(st: PackedLayer, out_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V ``[B, H, out_len, D]`` in fp32: dequantized blocks and exact ring tokens, original order."""
    lay = st.layout
    B, H, D, T, S = st.batch, lay.num_heads, lay.head_dim, lay.block_size, lay.ring_size
    outs = []
    for s, meta, offs, scale, zero, ring in (
        (lay.k, st.k_meta, st.k_offsets, st.k_scale, st.k_zero, st.ring_k),
        (lay.v, st.v_meta, st.v_offsets, st.v_scale, st.v_zero, st.ring_v),
    ):
        out = torch.zeros(B, H, out_len, D, dtype=torch.float32, device=st.device)
        for b in range(B):
            nb, nw = int(st.n_blocks[b]), int(st.n_win[b])
            if nb * T + nw > out_len:
                raise ValueError(f"decompress: out_len={out_len} is shorter than the {nb * T + nw} stored tokens")
            if nb:
                q = unpack_chunks(meta[b, :nb], st.pool, offs[b, :nb], s, lay)  # [nb, H, T, D]
                x = dequantize_blocks(q, scale[b, :nb], zero[b, :nb])
                x = unpermute(x, st.perm[b, :nb].long(), 2)
                out[b, :, : nb * T] = x.permute(1, 0, 2, 3).reshape(H, nb * T, D)
            pos = nb * T + torch.arange(nw, device=st.device)
            out[b, :, nb * T : nb * T + nw] = ring[b][:, pos % S].float()
        outs.append(out)
    return outs[0], outs[1]


def decompress(st: PackedLayer, out_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    k, v = decompress_fp32(st, out_len)
    return k.to(st.dtype), v.to(st.dtype)


def attention(
    q: torch.Tensor,
    st: PackedLayer,
    out_len: int,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
) -> torch.Tensor:
    """SDPA semantics (mask broadcast as SDPA does, top-left ``is_causal``, GQA) over the stored tokens."""
    k, v = decompress_fp32(st, out_len)
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} are not a multiple of KV heads {k.shape[1]}")
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    m = mask if mask is None or mask.dtype == torch.bool else mask.float()
    out = F.scaled_dot_product_attention(q.float(), k, v, attn_mask=m, is_causal=is_causal, scale=sc, enable_gqa=True)
    return out.to(q.dtype)
