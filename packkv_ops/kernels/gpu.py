"""CUDA paths of the packkv ops: Triton kernels plus device-side torch glue (twin of ``reference.py``).

Everything here is free of host synchronisation and has static shapes for given (batch, new tokens,
``n_flush``, capacity), so it traces into a compiled decode step and replays under CUDA graphs. Positions come
from the device counters ``n_blocks``/``n_win``. Non-finite new K/V are not stored: the counters (and so the
cache's contents) do not advance, and the caller, which mirrors the counters on the host, sees the mismatch.

The code is device-agnostic: under ``TRITON_INTERPRET=1`` the CPU tests run it on CPU tensors.
"""

from __future__ import annotations

import torch

from ..layout import REPACK_CODES
from ..repack import COUNT_LEVELS, apply_perm, repack_perm
from ..rotation import rotate
from ..storage import PackedLayer
from . import attention as _attention
from . import decompress as _decompress
from .pack import pack_flushed
from .quantize import quantize_flushed
from .token import append_token

decompress = _decompress.decompress
attention = _attention.attention


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


def append_(st: PackedLayer, new_k: torch.Tensor, new_v: torch.Tensor, n_flush: int, rotation: int = 0) -> None:
    """``reference.append_(st, rotate(new_k, rotation), rotate(new_v, rotation), n_flush)``: the new K/V come in the
    model's coordinates and are stored rotated (``rotation.py``)."""
    lay = st.layout
    B, H, P, D = new_k.shape
    if P == 1 and n_flush == 0:  # a decode step between flushes: one kernel, rotation included
        append_token(st, new_k, new_v, rotation)
        return
    if P == 0:  # a flush ahead of the next step: nothing to rotate, check or place (host launches: it runs eagerly)
        if n_flush:
            st.cursor.add_(_compress(st, new_k, new_v, n_flush))
            st.n_win.sub_(n_flush * lay.block_size)
            st.n_blocks.add_(n_flush)
        return
    new_k, new_v = rotate(new_k, rotation), rotate(new_v, rotation)
    ok = _all_finite(new_k) & _all_finite(new_v)
    if n_flush:
        st.cursor.add_(torch.where(ok, _compress(st, new_k, new_v, n_flush), 0))
    _write_ring(st, st.ring_k, new_k, n_flush, ok)
    _write_ring(st, st.ring_v, new_v, n_flush, ok)
    step = ok.to(torch.int32)
    st.n_win.add_(step * (P - n_flush * lay.block_size))
    st.n_blocks.add_(step * n_flush)


def _compress(st: PackedLayer, new_k: torch.Tensor, new_v: torch.Tensor, n_flush: int) -> torch.Tensor:
    """Quantize, repack and pack the ``n_flush`` oldest blocks (ring window ++ new tokens) into the storage at its
    cursor; returns the payload words written (a device int64; the caller advances the cursor)."""
    lay = st.layout
    # Counting medians need few levels; other permutations are found by torch on the quantized ints.
    in_kernel = lay.repack == REPACK_CODES["none"] or (
        lay.repack == REPACK_CODES["median"] and lay.v.qmax + 1 <= COUNT_LEVELS
    )
    kq, vq = quantize_flushed(st, new_k, new_v, n_flush, median=lay.repack == REPACK_CODES["median"] and in_kernel)
    if not in_kernel:
        kq, vq = _repack_in_storage(st, kq, vq, n_flush)
    return pack_flushed(st, kq, vq, n_flush)


def _all_finite(x: torch.Tensor) -> torch.Tensor:
    """Device bool: no NaN/Inf in ``x``. min/max propagate NaN and expose +-Inf: one reduction pass, without the
    bool tensor of ``isfinite`` (a prefill's size in memory)."""
    if x.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=x.device)
    return torch.isfinite(torch.stack(torch.aminmax(x))).all()


def _repack_in_storage(
    st: PackedLayer, kq: torch.Tensor, vq: torch.Tensor, n_flush: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Permute the just-quantized blocks (in token order) by ``repack_perm``: greedy, or a median over too many
    levels to count in the kernel. Writes perm and moves scales/zeros in the storage; returns the permuted ints."""
    lay = st.layout
    B = st.batch
    perm = repack_perm(lay.repack, kq.int(), vq.int(), lay.pack_size, lay.v.qmax + 1)
    b_idx = torch.arange(B, device=kq.device).repeat_interleave(n_flush)
    blk = st.n_blocks.long().repeat_interleave(n_flush) + torch.arange(n_flush, device=kq.device).repeat(B)
    st.perm[b_idx, blk] = perm.to(torch.uint8)
    for name in ("k_scale", "k_zero", "v_scale", "v_zero"):
        x = getattr(st, name)
        x[b_idx, blk] = apply_perm(x[b_idx, blk], perm, 2)
    return apply_perm(kq, perm, 2), apply_perm(vq, perm, 2)
