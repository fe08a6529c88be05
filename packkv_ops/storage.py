"""PackedLayer: the tensors that hold one layer's compressed K/V cache (see FORMAT.md).

Every op takes these tensors in the order of ``STORAGE_FIELDS``. Per-sequence tensors have the batch as their
first dimension; the payload pool is shared by the whole batch (beams may share chunks).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .codec import payload_bit_offsets, unpack_meta
from .layout import SCALE_DTYPE, ZERO_DTYPE, Layout, check_dtype

STORAGE_FIELDS = (
    "pool", "cursor",
    "k_meta", "k_offsets", "k_scale", "k_zero",
    "v_meta", "v_offsets", "v_scale", "v_zero",
    "perm", "ring_k", "ring_v", "n_blocks", "n_win",
)  # fmt: skip
PER_SEQUENCE_FIELDS = STORAGE_FIELDS[2:]
MAX_POOL_WORDS = 2**31 - 2  # offsets are int32 word indices


@dataclass
class PackedLayer:
    layout: Layout
    pool: torch.Tensor  # int32 [capacity + 1]: chunk payloads; one spare word so 2-word reads stay in bounds
    cursor: torch.Tensor  # int64 [1]: words of the pool in use
    k_meta: torch.Tensor  # int32 [B, NB, H, MW_k]
    k_offsets: torch.Tensor  # int32 [B, NB, H]: first pool word of each K chunk
    k_scale: torch.Tensor  # bf16 [B, NB, Gh, Gt, Gc]
    k_zero: torch.Tensor  # int16 [B, NB, Gh, Gt, Gc]
    v_meta: torch.Tensor
    v_offsets: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    perm: torch.Tensor  # uint8 [B, NB, T]: slot i of block n holds token n*T + perm[i]
    ring_k: torch.Tensor  # [B, H, S, D] model dtype: token at position p sits in slot p % S
    ring_v: torch.Tensor
    n_blocks: torch.Tensor  # int32 [B]: compressed blocks
    n_win: torch.Tensor  # int32 [B]: exact tokens in the ring

    @classmethod
    def empty(
        cls,
        layout: Layout,
        batch: int,
        dtype: torch.dtype,
        device: torch.device | str,
        block_capacity: int,
        pool_words: int,
    ) -> PackedLayer:
        check_dtype(dtype)
        H, D, T, S = layout.num_heads, layout.head_dim, layout.block_size, layout.ring_size
        if pool_words > MAX_POOL_WORDS:
            raise ValueError(f"pool of {pool_words} words exceeds the int32 offset range")
        i32 = dict(dtype=torch.int32, device=device)

        def stream(s):
            gh, gt, gc = layout.group_shape(s)
            return (
                torch.zeros(batch, block_capacity, H, layout.meta_words(s), **i32),
                torch.zeros(batch, block_capacity, H, **i32),
                torch.ones(batch, block_capacity, gh, gt, gc, dtype=SCALE_DTYPE, device=device),
                torch.zeros(batch, block_capacity, gh, gt, gc, dtype=ZERO_DTYPE, device=device),
            )

        km, ko, ks, kz = stream(layout.k)
        vm, vo, vs, vz = stream(layout.v)
        return cls(
            layout=layout,
            pool=torch.zeros(pool_words + 1, **i32),
            cursor=torch.zeros(1, dtype=torch.int64, device=device),
            k_meta=km, k_offsets=ko, k_scale=ks, k_zero=kz,
            v_meta=vm, v_offsets=vo, v_scale=vs, v_zero=vz,
            perm=torch.zeros(batch, block_capacity, T, dtype=torch.uint8, device=device),
            ring_k=torch.zeros(batch, H, S, D, dtype=dtype, device=device),
            ring_v=torch.zeros(batch, H, S, D, dtype=dtype, device=device),
            n_blocks=torch.zeros(batch, **i32),
            n_win=torch.zeros(batch, **i32),
        )  # fmt: skip

    # ---- views ----------------------------------------------------------------------------------------------
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f) for f in STORAGE_FIELDS)

    @property
    def batch(self) -> int:
        return self.n_blocks.shape[0]

    @property
    def block_capacity(self) -> int:
        return self.k_meta.shape[1]

    @property
    def pool_capacity(self) -> int:
        return self.pool.shape[0] - 1

    @property
    def dtype(self) -> torch.dtype:
        return self.ring_k.dtype

    @property
    def device(self) -> torch.device:
        return self.pool.device

    # ---- restructuring (outside compiled steps) ------------------------------------------------------------
    def with_capacity(self, block_capacity: int | None = None, pool_words: int | None = None,
                      trim_blocks: bool = False) -> PackedLayer:  # fmt: skip
        """A copy with room for ``block_capacity`` blocks per sequence and ``pool_words`` payload words (at least
        the current capacities; ``trim_blocks``: exactly ``block_capacity`` blocks, fewer than now if no sequence
        uses the blocks past it)."""
        nb = max(block_capacity or 0, self.block_capacity)
        if trim_blocks and block_capacity is not None and block_capacity < self.block_capacity:
            used = int(self.n_blocks.max()) if self.batch else 0
            if block_capacity < used:
                raise ValueError(f"cannot trim to {block_capacity} blocks per sequence: a sequence holds {used}")
            nb = block_capacity
        pw = max(pool_words or 0, self.pool_capacity)
        out = PackedLayer.empty(self.layout, self.batch, self.dtype, self.device, nb, pw)
        for f in STORAGE_FIELDS:
            src, dst = getattr(self, f), getattr(out, f)
            if f == "pool":
                dst[: src.shape[0] - 1].copy_(src[:-1])
            elif src.dim() >= 2 and f not in ("ring_k", "ring_v"):
                n = min(src.shape[1], dst.shape[1])  # the per-block fields: the blocks both hold
                dst[:, :n].copy_(src[:, :n])
            else:
                dst.copy_(src)
        return out

    def select(self, index: torch.Tensor) -> PackedLayer:
        """Sequences ``index`` (may repeat: beams share their chunks in the pool)."""
        index = index.to(self.device)
        fields = {f: getattr(self, f).index_select(0, index) for f in PER_SEQUENCE_FIELDS}
        return dataclasses.replace(self, **fields)

    def clone(self) -> PackedLayer:
        return dataclasses.replace(self, **{f: getattr(self, f).clone() for f in STORAGE_FIELDS})

    # ---- accounting -----------------------------------------------------------------------------------------
    def chunk_words(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Payload words of every K and V chunk ``[B, NB, H]`` (0 for blocks not in use)."""
        out = []
        live = torch.arange(self.block_capacity, device=self.device)[None, :] < self.n_blocks[:, None].long()
        for s, meta in ((self.layout.k, self.k_meta), (self.layout.v, self.v_meta)):
            _, widths = unpack_meta(meta, s, self.layout)
            _, words = payload_bit_offsets(widths, self.layout.pack_size)
            out.append(words * live[..., None])
        return out[0], out[1]

    def compacted(self) -> PackedLayer:
        """A copy whose pool holds exactly the live chunks (shared chunks once), in (b, n, h) order, K then V."""
        kw, vw = self.chunk_words()
        live = torch.arange(self.block_capacity, device=self.device)[None, :] < self.n_blocks[:, None].long()
        live = live[..., None].expand_as(kw)
        offs = torch.cat([self.k_offsets[live], self.v_offsets[live]]).long()
        words = torch.cat([kw[live], vw[live]])
        uniq, first = _unique_first(offs)
        sizes = words[first]
        new_start = sizes.cumsum(0) - sizes
        total = int(sizes.sum().item())
        src = torch.repeat_interleave(uniq, sizes) + (torch.arange(total, device=self.device) - torch.repeat_interleave(new_start, sizes))
        out = dataclasses.replace(self, pool=torch.zeros(total + 1, dtype=torch.int32, device=self.device))
        out.pool[:total] = self.pool[src]
        out.cursor = torch.tensor([total], dtype=torch.int64, device=self.device)
        remap = dict(zip(uniq.tolist(), new_start.tolist()))
        for name in ("k_offsets", "v_offsets"):
            t = getattr(self, name).clone()
            vals = t[live].tolist()
            t[live] = torch.tensor([remap[v] for v in vals], dtype=torch.int32, device=self.device)
            t[~live] = 0
            setattr(out, name, t)
        return out


def _unique_first(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique values of a 1-D tensor and the index of one occurrence of each."""
    uniq, inv = torch.unique(x, sorted=True, return_inverse=True)
    first = torch.full((uniq.numel(),), x.numel(), dtype=torch.long, device=x.device)
    first.scatter_reduce_(0, inv, torch.arange(x.numel(), device=x.device), reduce="amin")
    return uniq, first
