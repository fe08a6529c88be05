"""The ``packkv`` torch.library ops: schemas, fake implementations and device dispatch, in one place.

Public ops (``torch.ops.packkv.*``):

* ``append_``    add tokens to a layer's storage, compressing ``n_flush`` blocks (mutates the storage; an opaque
                 ``custom_op``, so compiled graphs call it in place); with no new tokens it compresses ahead
                 (``reference.flush_ahead_count``);
* ``decompress`` K/V of the stored tokens in original order, ``out_len`` long;
* ``attention``  ``scaled_dot_product_attention`` of queries over the stored tokens, never materialising K/V.

Each is a ``triton_op``: on CUDA tensors the body launches Triton kernels through ``wrap_triton`` (so Inductor
sees and inlines them); on CPU tensors it calls an opaque reference op (``packkv::_*_reference``) whose body is
``reference.py``. Storage tensors come first, in ``storage.STORAGE_FIELDS`` order, then the static layout
parameters ``Layout.spec()`` = ``(k_rel, k_grouping, v_rel, v_grouping, pack_size, repack, rotation)``; block size,
window, heads and head_dim are read off the tensor shapes. A rotation (``rotation.py``) is applied here, around
the reference and the kernels, which only ever see the stored (rotated) coordinates.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op, triton_op

from . import reference
# Registers packkv::_gluon_decode_partials at import: compiled code (a cached graph too) may call it without
# tracing the attention op's body, which is where it is used.
from .kernels import gluon_attention  # noqa: F401
from .kernels._launch import plain_eager
from .rotation import is_hadamard, rotate
from .layout import Layout, StreamLayout
from .storage import STORAGE_FIELDS, PackedLayer

MUTATED_BY_APPEND = tuple(f for f in STORAGE_FIELDS)


def layout_of(ring_k: Tensor, perm: Tensor, k_rel: float, k_grouping: int, v_rel: float, v_grouping: int,
              pack_size: int, repack: int, rotation: int = 0) -> Layout:  # fmt: skip
    block = perm.shape[-1]
    return Layout(
        num_heads=ring_k.shape[1],
        head_dim=ring_k.shape[3],
        block_size=block,
        pack_size=pack_size,
        window=ring_k.shape[2] - block,
        repack=repack,
        k=StreamLayout(k_rel, k_grouping),
        v=StreamLayout(v_rel, v_grouping),
        rotation=rotation,
    )


def _storage(args: tuple[Tensor, ...], spec: tuple) -> PackedLayer:
    d = dict(zip(STORAGE_FIELDS, args))
    return PackedLayer(layout=layout_of(d["ring_k"], d["perm"], *spec), **d)


def _is_cuda(t: Tensor) -> bool:
    return t.device.type == "cuda"


# ---------------------------------------------------------------------------------------------------------------
# append_
# ---------------------------------------------------------------------------------------------------------------
def _append(
    pool: Tensor, cursor: Tensor,
    k_meta: Tensor, k_offsets: Tensor, k_scale: Tensor, k_zero: Tensor,
    v_meta: Tensor, v_offsets: Tensor, v_scale: Tensor, v_zero: Tensor,
    perm: Tensor, ring_k: Tensor, ring_v: Tensor, n_blocks: Tensor, n_win: Tensor,
    new_k: Tensor, new_v: Tensor, n_flush: int,
    k_rel: float, k_grouping: int, v_rel: float, v_grouping: int, pack_size: int, repack: int,
    rotation: int = 0, slot: int = -1,
) -> None:  # fmt: skip
    # An opaque op: compiled graphs call it in place on the storage (no functionalized copies of the pool),
    # and on CUDA it launches its kernels directly.
    args = (pool, cursor, k_meta, k_offsets, k_scale, k_zero, v_meta, v_offsets, v_scale, v_zero, perm,
            ring_k, ring_v, n_blocks, n_win)  # fmt: skip
    if slot >= 0:
        args = (pool,) + _stacked_slot(args[1:], slot)
        ring_k = args[STORAGE_FIELDS.index("ring_k")]
    spec = (k_rel, k_grouping, v_rel, v_grouping, pack_size, repack, rotation)
    _check_new(ring_k, new_k, new_v)
    if _is_cuda(pool):
        from .kernels import gpu

        gpu.append_(_storage(args, spec), new_k, new_v, n_flush, rotation)  # rotates (a decode token: in its kernel)
    else:
        reference.append_(_storage(args, spec), rotate(new_k, rotation), rotate(new_v, rotation), n_flush)


append_ = custom_op("packkv::append_", mutates_args=MUTATED_BY_APPEND)(_append)


def _stacked_slot(fields: tuple[Tensor, ...], slot: int) -> tuple[Tensor, ...]:
    """Layer ``slot``'s views of stacked storage fields (``models.layer_stack``: every field but the pool has a
    leading layer dimension). The op takes whole stacks and selects here, inside its body: Inductor (torch
    2.11-2.13) passes a mutated *view* argument whose storage offset is symbolic (``stack[i]`` once the block
    capacity is a dynamic dimension) at offset 0, so every layer's append wrote into layer 0's slot (pytorch/pytorch
    #198068: ``aten.sym_storage_offset`` has no Inductor lowering; open, fix proposed in #198069)."""
    if any(t.dim() < 2 or t.shape[0] <= slot for t in fields):
        raise ValueError(f"append_ with slot={slot} takes storage fields stacked along a leading layer dimension")
    return tuple(t[slot] for t in fields)


def append(*args) -> None:
    """``torch.ops.packkv.append_(*args)``, whose body runs directly in plain eager mode (nothing traces, no
    dispatch mode, plain tensors): the dispatcher's in-place bookkeeping for an op mutating 15 tensors costs more
    host time than a decode step's work (~0.6 ms per call on CPU, torch 2.13: ADInplaceOrView's ``fill_defaults``
    re-reads the 25-argument schema for every argument). Traced, it is the opaque op that compiled graphs call."""
    if plain_eager(args):
        with torch.no_grad():  # as below the op's autograd key: the storage never records a graph
            return _append(*args)
    return torch.ops.packkv.append_(*args)


@append_.register_fake
def _(*args, **kwargs) -> None:
    return None


# ---------------------------------------------------------------------------------------------------------------
# decompress
# ---------------------------------------------------------------------------------------------------------------
@custom_op("packkv::_decompress_reference", mutates_args=(), device_types="cpu")
def _decompress_reference(
    pool: Tensor, cursor: Tensor,
    k_meta: Tensor, k_offsets: Tensor, k_scale: Tensor, k_zero: Tensor,
    v_meta: Tensor, v_offsets: Tensor, v_scale: Tensor, v_zero: Tensor,
    perm: Tensor, ring_k: Tensor, ring_v: Tensor, n_blocks: Tensor, n_win: Tensor,
    out_len: int,
    k_rel: float, k_grouping: int, v_rel: float, v_grouping: int, pack_size: int, repack: int,
    rotation: int = 0,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    args = (pool, cursor, k_meta, k_offsets, k_scale, k_zero, v_meta, v_offsets, v_scale, v_zero, perm,
            ring_k, ring_v, n_blocks, n_win)  # fmt: skip
    spec = (k_rel, k_grouping, v_rel, v_grouping, pack_size, repack, rotation)
    return reference.decompress(_storage(args, spec), out_len)


@_decompress_reference.register_fake
def _(pool, cursor, k_meta, k_offsets, k_scale, k_zero, v_meta, v_offsets, v_scale, v_zero, perm, ring_k, ring_v,
      n_blocks, n_win, out_len, *spec):  # fmt: skip
    B, H, _, D = ring_k.shape
    return ring_k.new_empty(B, H, out_len, D), ring_v.new_empty(B, H, out_len, D)


@triton_op("packkv::decompress", mutates_args=())
def decompress(
    pool: Tensor, cursor: Tensor,
    k_meta: Tensor, k_offsets: Tensor, k_scale: Tensor, k_zero: Tensor,
    v_meta: Tensor, v_offsets: Tensor, v_scale: Tensor, v_zero: Tensor,
    perm: Tensor, ring_k: Tensor, ring_v: Tensor, n_blocks: Tensor, n_win: Tensor,
    out_len: int,
    k_rel: float, k_grouping: int, v_rel: float, v_grouping: int, pack_size: int, repack: int,
    rotation: int = 0,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    args = (pool, cursor, k_meta, k_offsets, k_scale, k_zero, v_meta, v_offsets, v_scale, v_zero, perm,
            ring_k, ring_v, n_blocks, n_win)  # fmt: skip
    spec = (k_rel, k_grouping, v_rel, v_grouping, pack_size, repack, rotation)
    if _is_cuda(pool):
        from .kernels import gpu

        k, v = gpu.decompress(_storage(args, spec), out_len)
    else:
        k, v = torch.ops.packkv._decompress_reference(*args, out_len, *spec)
    return rotate(k, rotation), rotate(v, rotation)


# ---------------------------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------------------------
@custom_op("packkv::_attention_reference", mutates_args=(), device_types="cpu")
def _attention_reference(
    q: Tensor,
    pool: Tensor, cursor: Tensor,
    k_meta: Tensor, k_offsets: Tensor, k_scale: Tensor, k_zero: Tensor,
    v_meta: Tensor, v_offsets: Tensor, v_scale: Tensor, v_zero: Tensor,
    perm: Tensor, ring_k: Tensor, ring_v: Tensor, n_blocks: Tensor, n_win: Tensor,
    out_len: int, mask: Tensor | None, is_causal: bool, scale: float | None,
    k_rel: float, k_grouping: int, v_rel: float, v_grouping: int, pack_size: int, repack: int,
    rotation: int = 0,
) -> Tensor:  # fmt: skip
    args = (pool, cursor, k_meta, k_offsets, k_scale, k_zero, v_meta, v_offsets, v_scale, v_zero, perm,
            ring_k, ring_v, n_blocks, n_win)  # fmt: skip
    spec = (k_rel, k_grouping, v_rel, v_grouping, pack_size, repack, rotation)
    return reference.attention(q, _storage(args, spec), out_len, mask, is_causal, scale).contiguous()


@_attention_reference.register_fake
def _(q, *args, **kwargs):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@triton_op("packkv::attention", mutates_args=())
def attention(
    q: Tensor,
    pool: Tensor, cursor: Tensor,
    k_meta: Tensor, k_offsets: Tensor, k_scale: Tensor, k_zero: Tensor,
    v_meta: Tensor, v_offsets: Tensor, v_scale: Tensor, v_zero: Tensor,
    perm: Tensor, ring_k: Tensor, ring_v: Tensor, n_blocks: Tensor, n_win: Tensor,
    out_len: int, mask: Tensor | None, is_causal: bool, scale: float | None,
    k_rel: float, k_grouping: int, v_rel: float, v_grouping: int, pack_size: int, repack: int,
    rotation: int = 0,
) -> Tensor:  # fmt: skip
    args = (pool, cursor, k_meta, k_offsets, k_scale, k_zero, v_meta, v_offsets, v_scale, v_zero, perm,
            ring_k, ring_v, n_blocks, n_win)  # fmt: skip
    spec = (k_rel, k_grouping, v_rel, v_grouping, pack_size, repack, rotation)
    _check_query(q, ring_k)
    if _is_cuda(pool):
        from .kernels import attention as kernel, gpu

        D = q.shape[-1]
        inside = kernel.ROTATE_IN_KERNEL and is_hadamard(rotation, D) and D <= kernel.ROTATE_MAX_DIM
        out = gpu.attention(q if inside else rotate(q, rotation), _storage(args, spec), out_len, mask, is_causal,
                            scale, rotate=inside)  # fmt: skip
        return out if inside else rotate(out, rotation)
    q = rotate(q, rotation)
    out = torch.ops.packkv._attention_reference(q, *args, out_len, mask, is_causal, scale, *spec)
    return rotate(out, rotation)


# ---------------------------------------------------------------------------------------------------------------
# append_attention_ (a decode step's append and attention in one op: the FX rewrite fuses them, inductor/rewrite.py)
# ---------------------------------------------------------------------------------------------------------------
def _append_attention(
    q: Tensor,
    pool: Tensor, cursor: Tensor,
    k_meta: Tensor, k_offsets: Tensor, k_scale: Tensor, k_zero: Tensor,
    v_meta: Tensor, v_offsets: Tensor, v_scale: Tensor, v_zero: Tensor,
    perm: Tensor, ring_k: Tensor, ring_v: Tensor, n_blocks: Tensor, n_win: Tensor,
    new_k: Tensor, new_v: Tensor,
    out_len: int, mask: Tensor | None, is_causal: bool, scale: float | None,
    k_rel: float, k_grouping: int, v_rel: float, v_grouping: int, pack_size: int, repack: int,
    rotation: int = 0, slot: int = -1,
) -> Tensor:  # fmt: skip
    """``append_(storage, new_k, new_v, n_flush=0)`` then ``attention(q, storage, ...)``: one op, so that on an sm_90
    GPU the append runs inside the attention's merge (``kernels/fused_append.py``: one launch fewer per layer and
    step); elsewhere the two ops' bodies run in turn. ``slot``: the storage fields (all but the pool) are stacks
    along a leading layer dimension and the layer is this one (as ``append_``)."""
    args = (pool, cursor, k_meta, k_offsets, k_scale, k_zero, v_meta, v_offsets, v_scale, v_zero, perm,
            ring_k, ring_v, n_blocks, n_win)  # fmt: skip
    if slot >= 0:
        args = (pool,) + _stacked_slot(args[1:], slot)
    spec = (k_rel, k_grouping, v_rel, v_grouping, pack_size, repack, rotation)
    st = _storage(args, spec)
    _check_new(st.ring_k, new_k, new_v)
    _check_query(q, st.ring_k)
    if _is_cuda(pool) and new_k.shape[2] == 1:
        from .kernels import fused_append

        if fused_append.covers(q, st, mask, is_causal, scale, out_len):
            return fused_append.append_and_attend(q, st, new_k, new_v, out_len, mask, rotation)
    with torch.no_grad():
        _append(*args, new_k, new_v, 0, *spec)
    return attention(q, *args, out_len, mask, is_causal, scale, *spec)


append_attention_ = custom_op("packkv::append_attention_", mutates_args=MUTATED_BY_APPEND)(_append_attention)


@append_attention_.register_fake
def _(q, *args, **kwargs):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@custom_op("packkv::snapshot", mutates_args=())
def snapshot(t: Tensor) -> Tensor:
    """A copy of ``t`` that Inductor cannot inline: the FX rewrite gives it to the parts of a compiled step that read
    the storage outside PackKV's ops (positions and masks from the device counters) before a fused append changes
    the storage in place (``inductor.rewrite.fuse_decode_appends``)."""
    return t.clone()


@snapshot.register_fake
def _(t):
    return torch.empty_like(t)


# ---------------------------------------------------------------------------------------------------------------
# argument checks (shapes only: they cost nothing inside a compiled graph)
# ---------------------------------------------------------------------------------------------------------------
def _check_new(ring_k: Tensor, new_k: Tensor, new_v: Tensor) -> None:
    B, H, _, D = ring_k.shape
    for name, t in (("new keys", new_k), ("new values", new_v)):
        if t.dim() != 4 or t.shape[0] != B or t.shape[1] != H or t.shape[3] != D:
            raise ValueError(f"{name} have shape {tuple(t.shape)}; this layer stores [batch={B}, heads={H}, *, head_dim={D}]")
        if t.dtype != ring_k.dtype:
            raise ValueError(f"{name} have dtype {t.dtype}; this layer stores {ring_k.dtype}")
        if t.device != ring_k.device:
            raise ValueError(f"{name} are on {t.device}; this layer lives on {ring_k.device}")
    if new_k.shape != new_v.shape:
        raise ValueError(f"new keys {tuple(new_k.shape)} and values {tuple(new_v.shape)} differ in shape")


def _check_query(q: Tensor, ring_k: Tensor) -> None:
    B, H, _, D = ring_k.shape
    if q.dim() != 4 or q.shape[0] != B or q.shape[3] != D or q.shape[1] % H:
        raise ValueError(
            f"query of shape {tuple(q.shape)} does not fit a layer of batch {B}, {H} KV heads, head_dim {D}"
        )
