"""CUDA paths of the packkv ops: Triton kernels plus device-side torch glue (twin of ``reference.py``).

Everything here is free of host synchronisation and has static shapes for given (batch, new tokens,
``n_flush``, capacity), so it traces into a compiled decode step and replays under CUDA graphs. Positions come
from the device counters ``n_blocks``/``n_win``. Non-finite new K/V are not stored: the counters (and so the
cache's contents) do not advance, and the caller, which mirrors the counters on the host, sees the mismatch.

The code is device-agnostic: under ``TRITON_INTERPRET=1`` the CPU tests run it on CPU tensors.
"""

from __future__ import annotations

import torch

from ..codec import quantize_blocks
from ..storage import PackedLayer
from . import attention as _attention
from . import decompress as _decompress
from .pack import meta_words, pack_stats, payload_layout, write_payload

decompress = _decompress.decompress
attention = _attention.attention


def _gather_blocks(st: PackedLayer, ring: torch.Tensor, new: torch.Tensor, n_flush: int) -> torch.Tensor:
    """Tokens of the ``n_flush`` blocks to compress: ``[B * n_flush, H, T, D]`` (the oldest ring tokens, then
    new tokens)."""
    B, H, P, D = new.shape
    T, S = st.layout.block_size, st.layout.ring_size
    nb, nw = st.n_blocks.long(), st.n_win.long()
    logical = torch.arange(n_flush * T, device=new.device)[None, :]  # index into (ring window ++ new tokens)
    from_ring = logical < nw[:, None]
    slot = (nb[:, None] * T + logical) % S
    new_idx = (logical - nw[:, None]).clamp(0, P - 1)
    idx = lambda i: i[:, None, :, None].expand(B, H, n_flush * T, D)  # noqa: E731
    tokens = torch.where(from_ring[:, None, :, None], ring.gather(2, idx(slot)), new.gather(2, idx(new_idx)))
    return tokens.reshape(B, H, n_flush, T, D).transpose(1, 2).reshape(B * n_flush, H, T, D)


def _write_ring(st: PackedLayer, ring: torch.Tensor, new: torch.Tensor, n_flush: int, ok: torch.Tensor) -> None:
    """Put the new tokens that stay exact into their ring slots (position p lives in slot p % S)."""
    B, H, P, D = new.shape
    T, S = st.layout.block_size, st.layout.ring_size
    nb, nw = st.n_blocks.long(), st.n_win.long()
    if P == 1:  # decoding: the token always stays exact and its slot is free
        slot = (nb * T + nw) % S
        ring[torch.arange(B, device=new.device), :, slot] = new[:, :, 0]
        return
    # Several tokens: for every slot, the position it holds once this call is done.
    first = (nb + n_flush) * T
    end = nb * T + nw + P
    s = torch.arange(S, device=new.device)[None, :]
    pos = first[:, None] + (s - first[:, None]) % S
    i = pos - (nb * T + nw)[:, None]  # index among the new tokens
    take = (i >= 0) & (pos < end[:, None]) & ok
    src = new.gather(2, i.clamp(0, P - 1)[:, None, :, None].expand(B, H, S, D))
    ring.copy_(torch.where(take[:, None, :, None], src, ring))


def append_(st: PackedLayer, new_k: torch.Tensor, new_v: torch.Tensor, n_flush: int) -> None:
    lay = st.layout
    B, H, P, D = new_k.shape
    ok = torch.isfinite(new_k).all() & torch.isfinite(new_v).all()
    if n_flush:
        qb = quantize_blocks(_gather_blocks(st, st.ring_k, new_k, n_flush),
                             _gather_blocks(st, st.ring_v, new_v, n_flush), lay)  # fmt: skip
        n = B * n_flush
        streams = []
        for q, s in ((qb.kq, lay.k), (qb.vq, lay.v)):
            mins, widths = pack_stats(q, lay)
            starts, words = payload_layout(widths, lay.pack_size)
            streams.append((q, s, mins, widths, starts, words, meta_words(mins, widths, s, lay.meta_words(s))))
        # This call's chunks go at the cursor: all K chunks (b, k, h), then all V chunks.
        words = torch.cat([streams[0][5].flatten(), streams[1][5].flatten()]).long()
        ends = words.cumsum(0)
        offsets = (st.cursor + ends - words).to(torch.int32)
        k_off, v_off = offsets[: n * H], offsets[n * H :]
        for (q, s, mins, widths, starts, _, _), off in zip(streams, (k_off, v_off)):
            write_payload(q, mins, widths, starts, off, st.pool, s, lay)
        # Per-block data lands at block index n_blocks[b] + k.
        b_idx = torch.arange(B, device=new_k.device).repeat_interleave(n_flush)
        blk = st.n_blocks.long().repeat_interleave(n_flush) + torch.arange(n_flush, device=new_k.device).repeat(B)
        st.k_meta[b_idx, blk] = streams[0][6]
        st.v_meta[b_idx, blk] = streams[1][6]
        st.k_offsets[b_idx, blk] = k_off.reshape(n, H)
        st.v_offsets[b_idx, blk] = v_off.reshape(n, H)
        st.k_scale[b_idx, blk] = qb.k_scale
        st.k_zero[b_idx, blk] = qb.k_zero
        st.v_scale[b_idx, blk] = qb.v_scale
        st.v_zero[b_idx, blk] = qb.v_zero
        st.perm[b_idx, blk] = qb.perm.to(torch.uint8)
        st.cursor.add_(torch.where(ok, ends[-1], 0))
    _write_ring(st, st.ring_k, new_k, n_flush, ok)
    _write_ring(st, st.ring_v, new_v, n_flush, ok)
    step = ok.to(torch.int32)
    st.n_win.add_(step * (P - n_flush * lay.block_size))
    st.n_blocks.add_(step * n_flush)
