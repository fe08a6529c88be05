"""StepPlan: everything a compiled decode step reads of a PackKV cache, in one object shared by all layers.

Dynamo guards every attribute a traced step reads, once per *source* (the access path), not per object. Read
through 32 layer objects (their properties, storages, flush counts, capacities, slots), that was ~22 guard nodes
per layer: ~800 nodes checked on the host before every step (``benchmarks/guard_overhead.py``). Read from one plan
(``L['past_key_values']._plan.n_flush``, ``.stack``, ``.pools[i]``), each value is guarded once, plus one tensor
guard per layer for its pool. Built by ``PackKVCache.prepare_step`` before each compiled step when every layer
sits in one ``LayerStack`` at the slot of its index (one device); otherwise the layers' own path runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from packkv.ops import ops

from .layer_stack import STACKED_FIELDS, LayerStack

_N_BLOCKS, _N_WIN = STACKED_FIELDS.index("n_blocks"), STACKED_FIELDS.index("n_win")


class StepPlan:
    """The shared stack, each layer's pool, and the step's host constants (blocks to compress, K/V length)."""

    def __init__(self, stack: LayerStack, pools: Sequence[torch.Tensor], n_flush: int, token_capacity: int):
        self.stack = stack
        self.pools = tuple(pools)
        self.n_flush = n_flush
        self.token_capacity = token_capacity
        self.spec = stack.layout.spec()
        self.window = stack.layout.window
        self.block_size = stack.layout.block_size

    def update(self, i: int, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``PackKVLayer.update`` of layer ``i`` inside a compiled step: append (the op writes into the whole stacks
        at slot ``i``: see ``ops._stacked_slot``), then K/V over the storage's capacity from views of slot ``i``."""
        pool = self.pools[i]
        ops.append(pool, *self.stack.tensors, key_states, value_states, self.n_flush, *self.spec, i)
        tensors = self.stack.layer_tensors(i, pool)
        keys, values = torch.ops.packkv.decompress(*tensors, self.token_capacity, *self.spec)
        new = key_states.shape[-2]
        if new > self.window:  # a step whose own tokens were compressed: its attention sees them exact
            keys[:, :, self.token_capacity - new :] = key_states
            values[:, :, self.token_capacity - new :] = value_states
        return keys, values

    def seq_length(self, i: int) -> torch.Tensor:
        """Tokens of layer ``i`` (sequence 0) as a device value: a Python int would recompile every step."""
        t = self.stack.tensors
        return t[_N_BLOCKS][i][0] * self.block_size + t[_N_WIN][i][0]
