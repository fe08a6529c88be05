"""PackKVCache: a transformers ``Cache`` whose layers hold a packed K/V store.

Each ``PackKVLayer`` owns one ``PackedLayer`` (``packkv.ops.storage``): the exact ring of recent tokens and the
compressed blocks. ``update`` appends through ``torch.ops.packkv.append_`` (``ops.append``) and hands K/V back through
``torch.ops.packkv.decompress``, so every attention implementation is correct in eager mode; under
``packkv.compile`` the FX rewrite turns attention over those outputs into ``torch.ops.packkv.attention``.

Host bookkeeping: every sequence of a batch holds the same number of tokens (left padding is masked by
position, like any cache), so the layer mirrors its token counts as Python ints. That tells it, without
reading the GPU, how many blocks each call compresses and how much storage may be needed. Storage grows
geometrically, outside compiled steps; the host reads the GPU only for the pool cursor when its worst-case
bound would overflow, and for the counters of compiled steps, asynchronously (``PackKVCache.verify_step``:
checked at the cache's next use, so the host can queue steps while the GPU runs).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from collections import deque
from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from packkv.ops import Layout, PackedLayer, PackKVConfig, ops
from packkv.ops.accounting import exact_bytes
from packkv.ops.quantize import check_finite
from packkv.ops.reference import flush_ahead_count, flush_count
from packkv.ops.rotation import rotate

from .flush_graph import FlushGraph
from .layer_stack import LayerStack
from .step_plan import _N_BLOCKS, _N_WIN, StepPlan

log = logging.getLogger(__name__)

BLOCK_GROWTH = 2.0  # block capacity doubles: few reallocations, and few recompiles of a compiled step
POOL_GROWTH = 1.5
MIN_BLOCKS = 4


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


class PackKVLayer(CacheLayerMixin):
    """One layer: exact ring + packed blocks, grown on demand."""

    is_sliding = False
    is_croppable = True
    is_compileable = False  # set by packkv.compile, which also drives `prepare_step` around compiled steps

    def __init__(self, config: PackKVConfig | None = None, **kwargs):
        super().__init__()
        self.config = config or PackKVConfig()
        self._storage: PackedLayer | None = None
        self._stack: LayerStack | None = None  # set by PackKVCache.stack_layers: storage = views of its slot
        self._slot = 0
        self._block_capacity = 0  # host mirror: compiled steps must not touch the storage views for a shape
        self.n_blocks = 0  # host mirrors of the storage's per-sequence counters (equal for every sequence)
        self.n_win = 0
        self.n_flush = 0  # blocks the next append compresses (set by plan_step)
        self._pool_bound = 0  # an upper bound of the pool words in use, without reading the GPU

    # ---- Cache layer contract ---------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        layout = Layout.from_config(self.config, H, D)
        self.dtype, self.device = key_states.dtype, key_states.device
        self.storage = PackedLayer.empty(
            layout, B, key_states.dtype, key_states.device, MIN_BLOCKS, self._worst_words(layout, B, MIN_BLOCKS)
        )
        self.is_initialized = True
        self._mark_static()

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            if _is_compiling():
                raise RuntimeError("a PackKV layer must be initialized (by an eager prefill) before a compiled step")
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        compiling = _is_compiling()
        if compiling:
            # prepare_step ran outside the graph: n_flush and the capacity are constants of this graph.
            out_len = self.token_capacity
        else:
            check_finite("new keys", key_states)
            check_finite("new values", value_states)
            self.plan_step(new, key_states.shape[0])
            out_len = self.tokens + new
        st = self.storage  # after plan_step, which may have grown it
        lay = st.layout
        spec = _spec(lay)
        # The op rotates the new tokens itself: eagerly, as ~8 small kernels per layer and step in a compiled step.
        # Rotating them here instead (in the graph, fused by Inductor; append_ with rotation 0) removes those but
        # cost ~16% more compile time on CPU (kernels/NOTES.md): not done until the GPU says which matters more.
        if compiling and self._stack is not None:
            # The op writes into whole stacks and selects its slot itself (a mutated view argument of a dynamic
            # stack reaches it at the wrong offset: see ops._stacked_slot); reads take views in the graph.
            ops.append(st.pool, *self._stack.tensors, key_states, value_states, self.n_flush, *spec, self._slot)
            tensors = self._stack.layer_tensors(self._slot, st.pool)
        else:
            tensors = st.tensors()
            ops.append(*tensors, key_states, value_states, self.n_flush, *spec)
        if not compiling:
            self.commit_step(new)
        keys, values = torch.ops.packkv.decompress(*tensors, out_len, *spec)
        if new > lay.window:  # a prefill whose own tokens were compressed: its attention sees them exact
            keys[:, :, out_len - new : out_len] = key_states
            values[:, :, out_len - new : out_len] = value_states
        return keys, values

    @property
    def tokens(self) -> int:
        """Tokens per sequence."""
        return self.n_blocks * self.config.block_size + self.n_win

    def plan_step(self, new_tokens: int, batch: int | None = None) -> None:
        """Before an update of ``new_tokens`` tokens: how many blocks it compresses, and room for them."""
        st = self.storage
        if batch is not None and batch != st.batch:
            raise ValueError(f"this cache holds {st.batch} sequences but {batch} were passed")
        self.n_flush = flush_count(self.n_win, new_tokens, st.layout)
        self._ensure_capacity(self.n_blocks + self.n_flush, self.n_flush)

    def commit_step(self, new_tokens: int) -> None:
        """After the update: advance the host mirrors as the op advanced the device counters."""
        self.n_blocks += self.n_flush
        self.n_win += new_tokens - self.n_flush * self.config.block_size

    def prepare_step(self, new_tokens: int) -> None:
        """Host bookkeeping for a compiled step (which cannot do it itself): plan and commit."""
        self.plan_step(new_tokens)
        self.commit_step(new_tokens)

    def plan_flush_ahead(self, new_tokens: int) -> int:
        """Before a compiled step of ``new_tokens`` tokens: the blocks to compress ahead of it, eagerly, so that the
        step itself compresses none (``reference.flush_ahead_count``: for a decode token, the block its ring
        overflows with), and room for them. Every decode step then runs the one plain graph: no second graph to
        compile, record and keep. Run by ``flush_ahead``, or for all layers at once by ``PackKVCache``."""
        n = flush_ahead_count(self.n_win, new_tokens, self.storage.layout)
        if n:
            self._ensure_capacity(self.n_blocks + n, n)
        return n

    def commit_flush(self, blocks: int) -> None:
        """After a flush ahead of ``blocks`` blocks: the host mirrors follow the device counters."""
        self.n_blocks += blocks
        self.n_win -= blocks * self.storage.layout.block_size

    def flush_ahead(self, new_tokens: int) -> None:
        """``plan_flush_ahead`` and run it eagerly."""
        self.run_flush(self.plan_flush_ahead(new_tokens))

    def run_flush(self, blocks: int) -> None:
        """Compress ``blocks`` planned blocks of the ring now (the append reads the device counters: no host sync)."""
        if blocks:
            st = self.storage
            none = st.ring_k[:, :, :0]  # no new tokens
            ops.append(*st.tensors(), none, none, blocks, *_spec(st.layout))
            self.commit_flush(blocks)

    def get_seq_length(self) -> int | torch.Tensor:
        if not self.is_initialized:
            return 0
        if _is_compiling():  # a device value: a Python int here would recompile the graph every step
            st = self.storage
            if self._stack is not None:
                st = self._stack.layer(self._slot, st.pool)
            return st.n_blocks[0] * st.layout.block_size + st.n_win[0]
        return self.tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if _is_compiling():
            return self.token_capacity, 0
        return self.tokens + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def reset(self) -> None:
        if self.is_initialized:
            self.storage.n_blocks.zero_()
            self.storage.n_win.zero_()
            self.storage.cursor.zero_()
        self.n_blocks = self.n_win = self.n_flush = self._pool_bound = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select(torch.arange(self.storage.batch, device=self.device).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest tokens: ``-n`` removes n tokens; a positive value is the length to keep (legacy)."""
        if not self.is_initialized:
            return
        tokens_to_remove = int(tokens_to_remove)  # assisted decoding passes a 0-d tensor
        keep = tokens_to_remove if tokens_to_remove > 0 else self.tokens + tokens_to_remove
        keep = max(0, min(keep, self.tokens))
        if keep == self.tokens:
            return
        st = self.storage
        T, S = st.layout.block_size, st.layout.ring_size
        if keep >= self.n_blocks * T:
            st.n_win.fill_(keep - self.n_blocks * T)
            self.n_win = keep - self.n_blocks * T
        else:
            # Blocks past `keep` are dropped; the kept part of the last one returns to the ring (its values
            # are the decompressed ones: they were already quantized).
            kb = keep // T
            if keep > kb * T:
                k, v = torch.ops.packkv.decompress(*st.tensors(), self.tokens, *_spec(st.layout))
                pos = torch.arange(kb * T, keep, device=self.device)
                # The ring holds stored coordinates (rotated, if the layout rotates).
                st.ring_k[:, :, pos % S] = rotate(k[:, :, kb * T : keep], st.layout.rotation)
                st.ring_v[:, :, pos % S] = rotate(v[:, :, kb * T : keep], st.layout.rotation)
            st.n_blocks.fill_(kb)
            st.n_win.fill_(keep - kb * T)
            self.n_blocks, self.n_win = kb, keep - kb * T

    @property
    def keys(self) -> torch.Tensor | None:  # transformers helpers read .keys for device/dtype/batch
        return self.storage.ring_k if self.storage is not None else None

    @keys.setter
    def keys(self, value) -> None:
        pass

    @property
    def values(self) -> torch.Tensor | None:
        return self.storage.ring_v if self.storage is not None else None

    @values.setter
    def values(self, value) -> None:
        pass

    # ---- capacity -------------------------------------------------------------------------------------------
    @property
    def token_capacity(self) -> int:
        """Length of the K/V handed back in compiled steps: every position the storage can hold."""
        return self._block_capacity * self.storage.layout.block_size + self.storage.layout.ring_size

    @property
    def storage(self) -> PackedLayer | None:
        return self._storage

    @storage.setter
    def storage(self, st: PackedLayer | None) -> None:
        """A new storage (growth, batch selection, a loaded cache) leaves the stack; the next step restacks."""
        self._storage, self._stack = st, None
        self._block_capacity = st.block_capacity if st is not None else 0

    def join_stack(self, stack: LayerStack, slot: int) -> None:
        """Hold views of ``stack``'s slot (same contents) instead of tensors of its own."""
        self._storage = stack.layer(slot, self._storage.pool)
        self._stack, self._slot, self._block_capacity = stack, slot, stack.block_capacity

    @staticmethod
    def _worst_words(layout: Layout, batch: int, blocks: int) -> int:
        per_block = layout.num_heads * (layout.max_chunk_words(layout.k) + layout.max_chunk_words(layout.v))
        return batch * blocks * per_block

    def _ensure_capacity(self, blocks_needed: int, new_blocks: int, exact: bool = False) -> None:
        if new_blocks == 0 and blocks_needed <= self._block_capacity:  # most decode steps: nothing to plan
            return
        st = self.storage
        grow_blocks = blocks_needed > st.block_capacity
        step_worst = self._worst_words(st.layout, st.batch, new_blocks)
        if self._pool_bound + step_worst > st.pool_capacity:
            self._pool_bound = int(st.cursor.item())  # the only host sync: a bound is about to overflow
        grow_pool = self._pool_bound + step_worst > st.pool_capacity
        if not (grow_blocks or grow_pool):
            self._pool_bound += step_worst
            return
        if _is_compiling():
            raise RuntimeError("PackKV storage must grow outside compiled steps (call prepare_step first)")
        nb = st.block_capacity
        if grow_blocks:  # geometric growth, or exactly what a reservation asked for
            nb = max(blocks_needed, MIN_BLOCKS) if exact else max(blocks_needed, math.ceil(nb * BLOCK_GROWTH), MIN_BLOCKS)
        pw = st.pool_capacity
        if grow_pool:
            pw = max(self._pool_bound + step_worst, math.ceil(pw * POOL_GROWTH))
        self.storage = st.with_capacity(nb, pw)
        self._pool_bound += step_worst
        self._mark_static()

    def reserve(self, tokens: int) -> None:
        """Block capacity for ``tokens`` tokens per sequence, exactly (no geometric headroom): a compiled step
        attends to the whole capacity (``token_capacity``), so a capacity doubled by growth would make every step
        of a known-length generation attend to twice its length (zero keys past the end). A capacity larger than
        that (a prefill's geometric growth) is trimmed to it, never below the blocks already stored."""
        lay = self.storage.layout
        blocks = max(0, (tokens - lay.window) // lay.block_size, self.n_blocks)
        if blocks < self._block_capacity:
            self.storage = self.storage.with_capacity(blocks, trim_blocks=True)
            self._mark_static()
            return
        self._ensure_capacity(blocks, 0, exact=True)

    def _mark_static(self) -> None:
        # Compiled steps mutate these tensors in place: static addresses let CUDA graphs capture them. The
        # pool's length changes as it grows with the data: a dynamic dimension, so growth does not recompile.
        if not _is_compiling():
            for t in self.storage.tensors():
                torch._dynamo.mark_static_address(t)
            torch._dynamo.mark_dynamic(self.storage.pool, 0)

    def _select(self, index: torch.Tensor) -> None:
        if self.is_initialized:
            self.storage = self.storage.select(index)
            self._mark_static()

    # ---- accounting -----------------------------------------------------------------------------------------
    def nbytes(self) -> dict[str, int]:
        return dict(exact_bytes(self.storage)) if self.is_initialized else {}


def _on_cuda(stack: LayerStack) -> bool:
    return stack.tensors[0].is_cuda


def _spec(lay: Layout) -> tuple:
    return lay.spec()


class _PendingCheck(NamedTuple):
    """A compiled step's device counters on their way to the host (``PackKVCache.verify_step``)."""

    counts: torch.Tensor  # [layers, 2] (n_blocks, n_win) of sequence 0: pinned host memory, or the CPU tensor
    done: torch.cuda.Event | None  # recorded after the copy (None on the CPU: nothing in flight)
    expected: list[tuple[int, int]]  # what the host planned


class PackKVCache(Cache):
    """A transformers ``Cache`` storing K/V compressed and bit-packed by PackKV.

    ``model.generate(ids, past_key_values=PackKVCache(PackKVConfig(k_rel=0.1, v_rel=0.2)))``
    """

    # On CUDA, the flush ahead of compiled steps replays a CUDA graph (FlushGraph): eagerly it is host-bound (32
    # layers, an H100: 30.4 ms of launches for 2.2 ms of kernels; replayed 2.4 ms; kernels/NOTES.md, 2026-12-07h).
    graph_flushes = True

    def __init__(self, config: PackKVConfig | None = None, model=None):
        self.packkv_config = config or PackKVConfig()
        # Identity of the model that fills the cache (architecture + a hash of its attention-relevant
        # config), recorded when known so a saved cache can refuse another model.
        self.model_identity: dict | None = model_identity(model) if model is not None else None
        super().__init__(layer_class_to_replicate=functools.partial(PackKVLayer, self.packkv_config))
        self._plan: StepPlan | None = None  # set by prepare_step for the next compiled step
        self._reserve_tokens: int | None = None  # applied by the first compiled step (reserve_before_decode)
        self._pending: deque[_PendingCheck] = deque()  # compiled steps' counters in flight (verify_step)
        self._flush_graph: FlushGraph | None = None  # the layers' flush ahead of a step, on CUDA (_flush_ahead)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if not _is_compiling():
            self.synchronize()
            self._check_layers(layer_idx)
        elif self._plan is not None:  # a compiled step reads the shared plan, not 32 layer objects (step_plan.py)
            return self._plan.update(layer_idx, key_states, value_states)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @property
    def is_sliding(self) -> list[bool]:
        """PackKV layers never slide. Answered without visiting the layers: the masks read this inside compiled
        steps, and every layer object read there costs guard checks on each step."""
        return [False] * len(self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int | torch.Tensor:
        if _is_compiling():
            if self._plan is not None:
                return self._plan.seq_length(layer_idx)
        else:
            self.synchronize()
        return super().get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        if _is_compiling():
            if self._plan is not None:
                return self._plan.token_capacity, 0
        else:
            self.synchronize()
        return super().get_mask_sizes(query_length, layer_idx)

    # Methods that read or change the layers' counts check the last compiled step first (``synchronize``).
    def reset(self) -> None:
        self._pending.clear()  # (whatever the last steps stored is dropped)
        self._flush_graph = None
        super().reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.synchronize()
        super().reorder_cache(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        if int(tokens_to_remove) == 0:  # a no-op (generate's deferred stop check calls it every step): no wait
            return
        self.synchronize()
        super().crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.synchronize()
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.synchronize()
        super().batch_select_indices(indices)

    def _check_layers(self, layer_idx: int) -> None:
        """Refuse a cache filled by a model with another number of layers."""
        if layer_idx == 0:
            held = [layer.tokens for layer in self.layers if layer.is_initialized]
            if len(set(held)) > 1:
                raise ValueError(
                    f"the last forward updated only some of this PackKV cache's {len(held)} layers (token "
                    f"counts {sorted(set(held))}): it was filled by a model with more layers than this one"
                )
            self._tokens_before = held[0] if held else 0
        elif layer_idx >= len(self.layers) and getattr(self, "_tokens_before", 0) > 0:
            raise ValueError(
                f"this PackKV cache holds {len(self.layers)} layers of {self._tokens_before} tokens, but the model "
                f"updates layer {layer_idx}: it was filled by a model with fewer layers"
            )

    def prepare_step(self, new_tokens: int) -> int:
        """Host bookkeeping before a compiled step that adds ``new_tokens`` tokens per sequence (flush counts,
        growth); returns the length of the K/V the compiled step hands to attention (the token capacity). Checks the
        compiled steps before it first (``synchronize``), except that a plain step (one compressing no block, in the
        same storage) may be planned while earlier steps still run on the GPU: it reads no count from the host, so
        the host can queue it ahead (a refusal in an earlier step is then reported one step later)."""
        self.synchronize(wait=False)
        if self._reserve_tokens is None:  # (also when nothing is pending: a waited loop's plain steps then skip
            # planning every layer's flush: 3 instead of 16-29 us per step at 32 layers on a CPU, 2026-12-07k)
            cap = self._prepare_plain_step(new_tokens)
            if cap is not None:
                return cap
        self.synchronize()
        if self._reserve_tokens is not None and self.is_initialized:
            self.reserve(max(self._reserve_tokens, self.get_seq_length() + new_tokens))
            self._reserve_tokens = None
        self._flush_ahead(new_tokens)
        cap = self._prepare_plain_step(new_tokens)
        if cap is not None:
            return cap
        for layer in self.layers:
            layer.prepare_step(new_tokens)
        self.stack_layers()
        caps = {layer.token_capacity for layer in self.layers}
        if len(caps) != 1:  # every layer grows the same way, so this is a bug, not a user error
            raise RuntimeError(f"PackKV layers disagree on their token capacity: {sorted(caps)}")
        cap = caps.pop()
        self._plan = self._step_plan(cap)
        return cap

    def _flush_ahead(self, new_tokens: int) -> None:
        """Every layer's flush ahead of the step (``PackKVLayer.plan_flush_ahead``). On CUDA, layers in one stack
        flush from a CUDA graph (``FlushGraph``: eagerly they are host-bound); elsewhere each layer runs its own."""
        layers = [layer for layer in self.layers if layer.is_initialized]
        blocks = [layer.plan_flush_ahead(new_tokens) for layer in layers]
        if not any(blocks):
            return
        self.stack_layers()  # (planning may have grown storages, which leave their stack)
        stack = layers[0]._stack
        if (
            self.graph_flushes and stack is not None and _on_cuda(stack) and len(set(blocks)) == 1
            and all(layer._stack is stack and layer._slot == i for i, layer in enumerate(layers))
            and len(layers) == len(self.layers)
        ):  # fmt: skip
            pools = [layer.storage.pool for layer in layers]
            if self._flush_graph is None or not self._flush_graph.serves(stack, pools, blocks[0]):
                self._flush_graph = FlushGraph(stack, pools, blocks[0])
            self._flush_graph.run()
            for layer in layers:
                layer.commit_flush(blocks[0])
            return
        for layer, n in zip(layers, blocks):
            layer.run_flush(n)

    def _prepare_plain_step(self, new_tokens: int) -> int | None:
        """Most decode steps compress no block and grow nothing: when the last plan compressed none either and
        every layer still sits in its stack holding the same counts, that plan serves again and only the host's
        token counts advance (one pass over the layers: this runs before every step's graph, while the GPU
        waits). None: plan the step in full."""
        plan = self._plan
        if plan is None or plan.n_flush != 0:
            return None
        layers, stack = self.layers, plan.stack
        n_blocks, n_win = layers[0].n_blocks, layers[0].n_win
        if flush_count(n_win, new_tokens, stack.layout) != 0:
            return None
        for layer in layers:
            if layer._stack is not stack or layer.n_blocks != n_blocks or layer.n_win != n_win:
                return None
        for layer in layers:
            layer.n_win, layer.n_flush = n_win + new_tokens, 0
        return plan.token_capacity

    def _step_plan(self, token_capacity: int) -> StepPlan | None:
        """The shared plan of the next compiled step, when every layer sits in one stack at its own index and all
        compress alike (always, on one device); else None (layers on several devices take their own path)."""
        layers = self.layers
        stack = layers[0]._stack if layers else None
        if stack is None or len({layer.n_flush for layer in layers}) != 1:
            return None
        if any(layer._stack is not stack or layer._slot != i for i, layer in enumerate(layers)):
            return None
        return StepPlan(stack, [layer.storage.pool for layer in layers], layers[0].n_flush, token_capacity)

    def stack_layers(self) -> None:
        """Stack the layers' storages (``LayerStack``: a compiled step then has 14 storage inputs for all layers
        plus a pool per layer, instead of 15 per layer). Layers that left their stack since (growth, batch
        selection, a load) are restacked with the others of their kind; a no-op when all are stacked."""
        layers = [layer for layer in self.layers if layer.is_initialized]
        if all(layer._stack is not None for layer in layers):
            return
        self._flush_graph = None  # its launches hold the old storages (their memory too): let them go
        groups: dict[tuple, list[PackKVLayer]] = {}
        for layer in layers:  # pipeline-parallel models hold layers on several devices
            st = layer.storage
            groups.setdefault((st.layout, st.dtype, st.device, st.batch), []).append(layer)
        for group in groups.values():
            stack = LayerStack([layer.storage for layer in group])
            stack.mark_static()
            for slot, layer in enumerate(group):
                layer.join_stack(stack, slot)

    def __deepcopy__(self, memo: dict) -> PackKVCache:
        """A copy of checked counts: the compiled steps' read-backs in flight are waited for first (a CUDA event
        cannot be copied)."""
        self.synchronize()
        twin = type(self).__new__(type(self))
        memo[id(self)] = twin
        for name, value in self.__dict__.items():
            # (a CUDA graph cannot be copied either, and its launches write the original's tensors)
            setattr(twin, name, None if name == "_flush_graph" else copy.deepcopy(value, memo))
        return twin

    def abandon_step(self) -> None:
        """After a compiled step that raised (the CPU ops refuse NaN/Inf by raising, where the GPU kernels store
        nothing and go on): the host's counts, advanced by ``prepare_step``, are set back to what the device holds
        (layers before the failure may have stored their token, the others did not)."""
        self._pending.clear()
        self._take_device_counts()

    def verify_step(self, new_tokens: int) -> None:
        """After a compiled step: start reading back the device counters, which must have advanced as the host
        planned. They do not when a layer received NaN/Inf keys or values (the op then stores nothing). The read is
        asynchronous and checked later (``synchronize``: at the next step that is not plain, or once it has
        arrived, and at any other use of the cache): a blocking read here made every step's call wait for the GPU,
        so the host could not queue the work after it (generate's sampling, the next step's guards and launch)
        while the GPU ran, as it can with the static cache."""
        counts = self._device_counts()
        if counts.is_cuda:  # (pinned memory from torch's caching host allocator, which reuses it once copied)
            host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
            host.copy_(counts, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host, done = counts, None
        self._pending.append(_PendingCheck(host, done, [(layer.n_blocks, layer.n_win) for layer in self.layers]))

    def synchronize(self, wait: bool = True) -> None:
        """Wait for the compiled steps' counters (``verify_step``) and check them (``wait=False``: only those
        already on the host). Layers that stored nothing (non-finite keys or values reached them) are named in a
        ValueError, after the host's counts are set back to what the device holds, so the cache stays usable and
        nothing stored before is lost. The cache's methods call this before reading or changing it; call it after
        a hand-written loop of compiled steps to learn of a refusal in its last step (``generate`` on a
        ``packkv.compile``d model does)."""
        while self._pending:
            check = self._pending[0]
            if check.done is not None:
                if not wait and not check.done.query():
                    return
                check.done.synchronize()
            self._pending.popleft()
            counts = [tuple(c) for c in check.counts.tolist()]
            bad = [i for i, (c, want) in enumerate(zip(counts, check.expected)) if c != want]
            if bad:
                # Steps planned after it counted on its tokens: wait for them, then take what the device holds.
                self._pending.clear()
                self._take_device_counts()
                raise ValueError(
                    f"non-finite (NaN/Inf) keys or values reached PackKV layers {bad} in a compiled step; those "
                    f"tokens were not stored (device counters (blocks, window) {[counts[i] for i in bad[:3]]}, "
                    f"expected {[check.expected[i] for i in bad[:3]]})"
                )

    def _take_device_counts(self) -> None:
        """The host's counts set to the device's (a blocking read)."""
        for layer, (nb, nw) in zip(self.layers, self._device_counts().tolist()):
            layer.n_blocks, layer.n_win = nb, nw

    def _device_counts(self) -> torch.Tensor:
        """Each layer's device counters ``[n_blocks, n_win]`` of sequence 0, as one ``[layers, 2]`` tensor on the
        device (one small kernel and one copy back; per layer, 32 copies each synchronised the GPU): with the step
        plan, two strided views of the shared stack."""
        if self._plan is not None:
            t = self._plan.stack.tensors
            return torch.stack((t[_N_BLOCKS][:, 0], t[_N_WIN][:, 0]), 1)
        both = torch.cat([t for layer in self.layers for t in (layer.storage.n_blocks, layer.storage.n_win)])
        return both.view(len(self.layers), 2, -1)[:, :, 0].contiguous()

    def reserve(self, tokens: int) -> None:
        """Make room for exactly ``tokens`` tokens per sequence in every initialized layer (avoids growth later,
        and a compiled step attends to no more than that): after a prefill, whose growth is geometric, this also
        trims the capacity down to ``tokens`` (not below what is stored)."""
        self.synchronize()
        for layer in self.layers:
            if layer.is_initialized:
                layer.reserve(tokens)

    def reserve_before_decode(self, tokens: int | None) -> None:
        """Reserve ``tokens`` tokens per sequence at the first compiled step (``reserve``, once the prefill has
        filled the cache): ``generate`` on a ``packkv.compile``d model passes its final length here. None: no
        reservation (the capacity then grows geometrically, and steps may attend to up to twice the length)."""
        self._reserve_tokens = tokens

    def nbytes(self) -> dict[str, int]:
        """Bytes held, summed over layers: ``compressed`` (every byte of the packed blocks), ``window`` (the exact
        ring's live tokens), their fp16 equivalents, components and token counts (see accounting.exact_bytes)."""
        self.synchronize()
        total: dict[str, int] = {}
        for layer in self.layers:
            for k, v in layer.nbytes().items():
                total[k] = total.get(k, 0) + v
        return total

    @property
    def config(self) -> PackKVConfig:
        return self.packkv_config

    def __repr__(self) -> str:
        return f"PackKVCache({self.packkv_config}, layers={len(self.layers)})"


ATTENTION_CONFIG_KEYS = (
    "model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size",
    "rope_parameters", "rope_theta", "rope_scaling", "partial_rotary_factor", "sliding_window", "vocab_size",
)  # fmt: skip


def model_identity(model) -> dict:
    """Architecture and a hash of the config fields that shape K/V (so a cache can refuse another model)."""
    import hashlib
    import json

    cfg = model.config.to_dict()
    relevant = {k: cfg.get(k) for k in ATTENTION_CONFIG_KEYS}
    blob = json.dumps(relevant, sort_keys=True, default=str).encode()
    return {
        "architecture": (cfg.get("architectures") or [type(model).__name__])[0],
        "model_type": cfg.get("model_type"),
        "config_sha256": hashlib.sha256(blob).hexdigest(),
        # Under tensor parallelism each rank's cache holds only its KV heads: "rank/size", or "none".
        "tensor_parallel": _tensor_parallel(model),
    }


def _tensor_parallel(model) -> str:
    size = getattr(model, "tp_size", None)
    if not size or size == 1:
        return "none"
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return f"{rank}/{size}"


def cache_storages(cache: PackKVCache) -> list[PackedLayer]:
    return [layer.storage for layer in cache.layers]


__all__ = ["PackKVCache", "PackKVLayer", "cache_storages", "model_identity"]
