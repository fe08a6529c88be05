"""FlushGraph: every layer's flush ahead of a compiled decode step, replayed from one CUDA graph.

Once per ``block_size`` decode steps ``packkv.compile``'s cache compresses each layer's oldest ring block before the
step's graph (``PackKVLayer.flush_ahead``), so that no compiled step compresses. Run eagerly that is 5 Triton
launches and a dozen small torch ops per layer from Python: at Llama-3.1-8B shapes (32 layers, 128K, an H100) the
step with the flush took 50 ms against 12.4 ms for a plain one (the flushes: 2.2 ms of kernels). Replayed, the 32 flushes take
2.4 ms and that step 13.3 ms (2026-12-07h). The launches' arguments are the same at
every flush of a storage (the op reads the counters on the device), so they are captured once and replayed: the
first flush of a storage runs eagerly (its kernels compile), the second is captured and replayed, later ones replay.
A new storage (growth, a batch selection, a load) is a new key, and the old graph is let go.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from packkv.ops import ops
from packkv.ops.storage import STORAGE_FIELDS

from .layer_stack import LayerStack

_RING_K = STORAGE_FIELDS.index("ring_k")


class FlushGraph:
    """The flush ahead of ``blocks`` blocks in every layer of ``stack`` (each with its pool), eager once, then from
    a CUDA graph."""

    def __init__(self, stack: LayerStack, pools: Sequence[torch.Tensor], blocks: int):
        self.stack, self.pools, self.blocks = stack, tuple(pools), blocks
        self.graph: torch.cuda.CUDAGraph | None = None
        self.ran = False

    def serves(self, stack: LayerStack, pools: Sequence[torch.Tensor], blocks: int) -> bool:
        """Same tensors, same count: the captured launches are this flush's. (Holding the tensors keeps their
        addresses from being reused by others.)"""
        return (stack is self.stack and blocks == self.blocks and len(pools) == len(self.pools)
                and all(a is b for a, b in zip(pools, self.pools)))  # fmt: skip

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        if not self.ran:  # the first time eagerly: Triton compiles its kernels outside any capture
            self._launch()
            self.ran = True
            return
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records, runs nothing
            self._launch()
        graph.replay()
        self.graph = graph

    def _launch(self) -> None:
        spec = self.stack.layout.spec()
        for i, pool in enumerate(self.pools):
            tensors = self.stack.layer_tensors(i, pool)
            none = tensors[_RING_K][:, :, :0]  # [B, H, 0, D]: no new tokens
            ops.append(*tensors, none, none, self.blocks, *spec)
