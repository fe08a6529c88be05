"""LayerStack: the per-sequence storage tensors of a model's PackKV layers, stacked along a leading layer dimension.

A compiled decode step reads every layer's storage. With one tensor per field and layer, Dynamo guards and the
compiled frame gathers 15 x layers graph inputs (480 for 32 layers): milliseconds of host time per step (see
``packkv_ops/kernels/NOTES.md``, "Host cost of a compiled step"). Stacked, the step has 14 inputs for all layers
plus one payload pool per layer: reads take the views ``stacked[i]`` inside the graph; ``append_`` gets the whole
stacks and its layer's ``slot`` and writes through its own views (a mutated view argument with a symbolic offset
is miscompiled by Inductor: see ``ops._stacked_slot``). Pools stay per layer: they grow with the data, and
regrowing one stacked pool would hold an old and a new copy of every layer's payload at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from packkv.ops import PackedLayer
from packkv.ops.storage import STORAGE_FIELDS

STACKED_FIELDS = tuple(f for f in STORAGE_FIELDS if f != "pool")


class LayerStack:
    """The non-pool fields of several layers' storages (same layout, dtype, device and batch), one tensor each."""

    def __init__(self, storages: Sequence[PackedLayer]):
        first = storages[0]
        for s in storages[1:]:
            if (s.layout, s.dtype, s.device, s.batch) != (first.layout, first.dtype, first.device, first.batch):
                raise ValueError("only layers of one layout, dtype, device and batch size stack together")
        nb = max(s.block_capacity for s in storages)
        # Layers grow alike, so capacities agree; a restored or restructured layer may lag (copied up here).
        storages = [s if s.block_capacity == nb else s.with_capacity(block_capacity=nb) for s in storages]
        self.layout = first.layout
        self.tensors = tuple(torch.stack([getattr(s, f) for s in storages]) for f in STACKED_FIELDS)

    def __len__(self) -> int:
        return self.tensors[0].shape[0]

    @property
    def block_capacity(self) -> int:
        return self.tensors[STACKED_FIELDS.index("k_meta")].shape[2]

    def layer_tensors(self, i: int, pool: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Layer ``i``'s storage tensors in ``STORAGE_FIELDS`` order: its own pool, views of the stack for the rest."""
        return (pool,) + tuple(t[i] for t in self.tensors)

    def layer(self, i: int, pool: torch.Tensor) -> PackedLayer:
        return PackedLayer(self.layout, *self.layer_tensors(i, pool))

    def mark_static(self) -> None:
        # Compiled steps mutate these in place: static addresses let CUDA graphs capture them.
        for t in self.tensors:
            torch._dynamo.mark_static_address(t)
