"""torch.compile: the FX rewrite fuses attention over the packed cache, and packkv.compile drives generate."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from helpers import fill, n_tokens, spec
from test_cache import EXACT, prompts, tiny

import packkv
from packkv.inductor import rewrite_attention, stats, with_inner
from packkv.models.cache import MIN_BLOCKS
from packkv.ops import PackKVConfig
from transformers.integrations.sdpa_attention import repeat_kv

NEW = 220  # decode steps: several block compressions (and one growth of the storage where nothing was reserved)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: shapes seen by an earlier test would otherwise make Dynamo mark them
    dynamic (and torch 2.11's CPU Inductor miscompiles one such dynamic-shape mask kernel; fixed in 2.13)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def capture(graphs: list):
    def inner(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return with_inner(inner)


def targets(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def test_packkv_compile_fuses_attention_and_matches_eager():
    ids, mask = prompts(2)
    kw = dict(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW)
    eager = tiny("llama").generate(**kw, past_key_values=packkv.PackKVCache(EXACT))
    graphs: list = []
    model = packkv.compile(tiny("llama"), config=EXACT, backend=capture(graphs))
    before = dict(stats)
    cache = packkv.PackKVCache(EXACT)
    out = model.generate(**kw, past_key_values=cache)
    assert torch.equal(out, eager)
    assert cache.layers[0].n_blocks * EXACT.block_size >= ids.shape[1] + NEW - EXACT.window - EXACT.block_size
    # One graph, though the decode compressed several blocks (each flushed ahead of its step, eagerly), plus one
    # where the storage grows: no recompilation per token (fullgraph=True: a graph break would have raised).
    assert 1 <= len(graphs) <= 2
    for gm in graphs:
        t = targets(gm)
        # One attention per layer, with its step's append (rewrite.fuse_decode_appends): no step compresses.
        assert t.count("packkv.append_attention_.default") == 2
        assert not any("scaled_dot_product_attention" in x or "decompress" in x or x in ("packkv.append_", "packkv.append_.default") for x in t)
    assert stats["fused_attention"] - before.get("fused_attention", 0) == 2 * len(graphs)
    assert stats["fused_append"] - before.get("fused_append", 0) == 2 * len(graphs)
    # A second generation reuses the graphs.
    assert torch.equal(model.generate(**kw), eager) and len(graphs) <= 2


def test_generate_attends_to_its_final_length_not_to_the_prefills_geometric_capacity():
    """A compiled step attends to the storage's whole capacity, and the prefill grows it geometrically. generate
    knows its final length (prompt + max_new_tokens): the first compiled step trims the capacity to it, so no step
    attends to more, and the decode needs no growth (one graph, no second one for a larger storage)."""
    ids, mask = prompts(2)
    kw = dict(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW)
    eager = tiny("llama").generate(**kw, past_key_values=packkv.PackKVCache(EXACT))
    graphs: list = []
    model = packkv.compile(tiny("llama"), config=EXACT, backend=capture(graphs))
    cache = packkv.PackKVCache(EXACT)
    assert torch.equal(model.generate(**kw, past_key_values=cache), eager)
    final = ids.shape[1] + NEW
    block = EXACT.block_size
    assert all(final <= layer.token_capacity < final + block for layer in cache.layers), (
        final, [layer.token_capacity for layer in cache.layers])
    assert len(graphs) == 1


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("new_tokens", [2, 5])
def test_generate_reports_keys_a_compiled_step_refused(new_tokens, device):
    """A compiled step whose new keys are NaN stores nothing, and generate raises an error that says so; the cache
    keeps the prompt (its host counts follow the device's). On the CPU the op raises inside the step. On the GPU
    the kernels cannot raise: they store nothing and go on (the attention sees the stored tokens, so the logits stay
    finite), and the step does not wait for the GPU to find out: its counters are checked at the next step, or at
    the end of generate when it was the last (``new_tokens=2``: the prefill's token, then one compiled step)."""
    ids, mask = prompts(2)
    model = packkv.compile(tiny("llama").to(device), config=EXACT, backend=capture([]))

    def nan_at_decode(module, inputs, out):
        return out * float("nan") if out.shape[1] == 1 else out

    for layer in model.model.layers:
        layer.self_attn.k_proj.register_forward_hook(nan_at_decode)
    cache = packkv.PackKVCache(EXACT)
    refused = r"new keys contains .* NaN/Inf" if device == "cpu" else r"non-finite .* PackKV layers \[0, 1\]"
    with pytest.raises(ValueError, match=refused):
        model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                       max_new_tokens=new_tokens, min_new_tokens=new_tokens, past_key_values=cache)  # fmt: skip
    assert cache.get_seq_length() == ids.shape[1]  # the prompt, and no token of the refused step
    assert all(layer.storage.n_win[0].item() + layer.storage.n_blocks[0].item() * EXACT.block_size == ids.shape[1]
               for layer in cache.layers)  # fmt: skip


def test_a_guard_filter_on_module_attributes_keeps_the_cache_guards():
    """Dropping Dynamo's guards on nn.Module attributes (``skip_guard_on_all_nn_modules_unsafe``, for host time per
    step) keeps those on the cache's storage, which is not a module attribute: its growth still compiles a new
    graph, and generation matches eager."""
    ids, mask = prompts(1)
    kw = dict(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW)
    eager = tiny("llama").generate(**kw, past_key_values=packkv.PackKVCache(EXACT))
    graphs: list = []
    options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    model = packkv.compile(tiny("llama"), config=EXACT, backend=capture(graphs), options=options)
    cache = packkv.PackKVCache(EXACT)
    cache.reserve_before_decode = lambda tokens: None  # no reservation: the storage grows while decoding
    assert torch.equal(model.generate(**kw, past_key_values=cache), eager)
    assert cache.layers[0].storage.block_capacity > MIN_BLOCKS
    assert len(graphs) == 2  # one, and once more after the growth


def test_compiled_step_reads_the_storage_of_all_layers_as_one_tensor_per_field():
    """Graph inputs, not layers x fields: the layers' storages are stacked (one tensor per field, views taken in
    the graph) and only the payload pools stay per layer. Each input costs host time on every step (guards, the
    compiled frame gathering it); 15 per layer were 480 for a 32-layer model."""
    from packkv.models.layer_stack import STACKED_FIELDS

    ids, mask = prompts(1)
    graphs: list = []
    model = packkv.compile(tiny("llama"), config=EXACT, backend=capture(graphs))
    model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=4, min_new_tokens=4)
    layers = model.config.num_hidden_layers
    inputs = [n.name for n in graphs[0].graph.nodes if n.op == "placeholder"]  # named after their source
    storage = [s for s in inputs if "past_key_values" in s]
    assert len(storage) == len(STACKED_FIELDS) + layers
    assert sum("_plan_pools_" in s for s in storage) == layers  # read through the step plan


def test_compiled_step_guards_read_the_step_plan_not_the_layers():
    """Dynamo guards what a step reads once per access path: read through every layer object (properties, storage,
    flush count, capacity, slot) it was ~22 guard nodes per layer and step (``benchmarks/guard_overhead.py``). The
    step reads one shared plan instead; of the layers only transformers' ``is_compileable`` check of layer 0 is
    left. Without the plan (layers on several devices) the layers' own path runs, and generation is the same."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    ids, mask = prompts(1)
    kw = dict(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8, min_new_tokens=8)
    outs, guards = [], []
    for plan in (True, False):
        torch._dynamo.reset()
        model = packkv.compile(tiny("llama"), config=EXACT, backend=capture([]))
        cache = packkv.PackKVCache(EXACT)
        if not plan:
            cache._step_plan = lambda token_capacity: None
        outs.append(model.generate(**kw, past_key_values=cache))
        entries = _debug_get_cache_entry_list(type(model).forward.__code__)
        guards.append("\n".join(str(e.guard_manager) for e in entries))
    assert model.config.num_hidden_layers >= 2 and len(entries) >= 1
    with_plan, without = guards
    assert "._plan" in with_plan and ".layers[1]" not in with_plan
    assert "._plan is None" in without and ".layers[1]" in without
    visits = [g.count("['past_key_values'].layers[") for g in guards]
    assert visits[0] * 4 < visits[1]
    assert torch.equal(outs[0], outs[1])


def test_packkv_compile_with_inductor_matches_eager():
    """Through Inductor, across block compressions and a growth of the storage (after which the block capacity is
    a dynamic dimension of the stacked storage: Inductor once handed every layer's append layer 0's slot there)."""
    ids, mask = prompts(1)
    kw = dict(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW)
    eager_cache, compiled_cache = packkv.PackKVCache(), packkv.PackKVCache()  # defaults: Hadamard rotation
    eager = tiny("qwen3").generate(**kw, past_key_values=eager_cache)
    assert torch.equal(packkv.compile(tiny("qwen3")).generate(**kw, past_key_values=compiled_cache), eager)
    assert compiled_cache.layers[0].storage.block_capacity > MIN_BLOCKS  # it grew while compiled
    # The compiled steps stored the same K/V (up to fp32 rounding: the graph rotates the new tokens itself).
    for a, b in zip(eager_cache.layers, compiled_cache.layers):
        assert (a.n_blocks, a.n_win) == (b.n_blocks, b.n_win)
        ka, va = torch.ops.packkv.decompress(*a.storage.tensors(), a.tokens, *spec(a.storage.layout))
        kb, vb = torch.ops.packkv.decompress(*b.storage.tensors(), b.tokens, *spec(b.storage.layout))
        torch.testing.assert_close(kb, ka, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(vb, va, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fuse", [True, False])
def test_a_step_without_cache_position_reads_its_positions_before_the_append(fuse, monkeypatch):
    """A decode step called without ``cache_position`` (a hand-written loop; generate passes it) takes its positions
    and mask offset from the device counters, which the step's appends advance in place. Through Inductor each layer
    must see the counters as they were at the step's start: the backend snapshots them for those reads
    (``rewrite.snapshot_foreign_reads``; without it the second layer ran one position ahead, 3.6e-3 off here)."""
    from packkv.inductor import backend

    monkeypatch.setattr(backend, "FUSE_APPENDS", fuse)
    ids, mask = prompts(1)
    cfg = PackKVConfig(rotation="none")

    def step(model):
        cache = packkv.PackKVCache(cfg)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            cache.compiled = True
            out = model.__call__(input_ids=ids[:, -1:], attention_mask=F.pad(mask, (0, 1), value=1),
                                 past_key_values=cache, use_cache=True)  # fmt: skip
        return out.logits

    want = step(tiny("llama"))
    before = dict(stats)
    got = step(packkv.compile(tiny("llama"), config=cfg))
    assert stats["graphs"] > before.get("graphs", 0)
    assert (stats["fused_append"] > before.get("fused_append", 0)) == fuse
    assert stats["snapshots"] - before.get("snapshots", 0) == 2  # the block and window counters
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_compiled_decode_step_with_gradients_on_keeps_sdpa_and_backpropagates_to_the_queries():
    """PackKV's ops have no backward: a step compiled with gradients on (a forward outside ``torch.no_grad``) keeps
    SDPA over the decompressed cache (the backend leaves it unfused) instead of failing in AOTAutograd, and gives
    eager mode's logits and query-side gradients; the same step under ``no_grad`` is fused."""
    ids, mask = prompts(1)
    cfg = PackKVConfig(rotation="none")

    def step(model, cache):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        cache.compiled = True  # as generate sets it for a compiled model (packkv.compile)
        # model.__call__: what generate calls, and what packkv.compile replaces (calling the model goes through
        # its type's __call__)
        out = model.__call__(input_ids=ids[:, -1:], attention_mask=F.pad(mask, (0, 1), value=1),
                             past_key_values=cache, use_cache=True)  # fmt: skip
        out.logits.float().sum().backward()
        return out.logits.detach(), model.model.layers[0].self_attn.q_proj.weight.grad

    eager_model = tiny("llama")
    want, want_grad = step(eager_model, packkv.PackKVCache(cfg))
    model = packkv.compile(tiny("llama"), config=cfg)
    before = stats["fused_attention"]
    got, grad = step(model, packkv.PackKVCache(cfg))
    assert stats["fused_attention"] == before  # compiled (a graph was built), attention left as written
    assert stats["graphs"] > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert grad is not None and grad.abs().sum() > 0
    torch.testing.assert_close(grad, want_grad, rtol=1e-3, atol=1e-4)
    with torch.no_grad():  # the same step without gradients: fused
        cache = packkv.PackKVCache(cfg)
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        cache.compiled = True
        model.__call__(input_ids=ids[:, -1:], attention_mask=F.pad(mask, (0, 1), value=1), past_key_values=cache,
                       use_cache=True)  # fmt: skip
    assert stats["fused_attention"] > before


class TinyAttention(torch.nn.Module):
    """A plain module: SDPA over K/V handed back by the PackKV ops (the README's minimal example)."""

    def __init__(self, layer, gqa: str):
        super().__init__()
        self.layer, self.gqa = layer, gqa
        self.length = n_tokens(layer)  # a Python int read once: lengths inside the graph stay static

    def forward(self, q):
        st = self.layer
        k, v = torch.ops.packkv.decompress(*st.tensors(), self.length, *spec(st.layout))
        if self.gqa == "repeat_kv":
            n_rep = q.shape[1] // k.shape[1]
            return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep))
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, scale=0.2)


@pytest.mark.parametrize("rotation", ["none", "hadamard"])
@pytest.mark.parametrize("gqa", ["repeat_kv", "enable_gqa"])
def test_rewrite_on_a_plain_module(gqa, rotation):
    k = torch.randn(1, 2, 300, 64)
    layer = fill(PackKVConfig(rotation=rotation), k, torch.randn_like(k))
    mod = TinyAttention(layer, gqa)
    q = torch.randn(1, 8, 1, 64)
    graphs: list = []
    out = packkv.compile(mod, backend=capture(graphs))(q)
    torch.testing.assert_close(out, mod(q), rtol=1e-5, atol=1e-5)
    assert "packkv.attention.default" in targets(graphs[0]) and "decompress" not in str(targets(graphs[0]))


def test_inductor_compiles_the_rotated_attention():
    """With rotation the fused op rotates q and its output inside its body, which Inductor traces and compiles."""
    k = torch.randn(1, 2, 300, 64)
    mod = TinyAttention(fill(PackKVConfig(rotation="hadamard"), k, torch.randn_like(k)), "enable_gqa")
    q = torch.randn(1, 8, 1, 64)
    before = stats["fused_attention"]
    torch.testing.assert_close(packkv.compile(mod)(q), mod(q), rtol=1e-5, atol=1e-5)
    assert stats["fused_attention"] == before + 1


def test_storage_readers_outside_packkv_ops_read_a_snapshot_taken_before_the_appends():
    """``rewrite.snapshot_foreign_reads`` on a hand-built graph: a node computing from a storage tensor of an append
    (through views) reads a ``packkv.snapshot`` of it taken right after the graph's inputs; PackKV's own ops keep
    reading the tensor itself, and tensors nobody else reads get no snapshot."""
    from packkv.inductor.rewrite import N_STORAGE, snapshot_foreign_reads

    g = torch.fx.Graph()
    storage = [g.placeholder(f"s{i}") for i in range(N_STORAGE)]
    k, v = g.placeholder("k"), g.placeholder("v")
    counters = storage[-1]  # n_win
    row = g.call_function(operator.getitem, (counters, 0))
    offset = g.call_function(operator.add, (g.call_function(operator.getitem, (row, 0)), 1))  # a position
    g.call_function(torch.ops.packkv.append_.default, (*storage, k, v, 0, 0.1, 0, 0.2, 0, 16, 1, 0, 0))
    own_view = g.call_function(operator.getitem, (counters, 0))  # what a PackKV op reads after the append
    g.call_function(torch.ops.packkv.attention.default, (k, *storage[:-1], own_view, 8, None, False, None))
    g.output(offset)
    gm = torch.fx.GraphModule(torch.nn.Module(), g)

    assert snapshot_foreign_reads(gm) == 1
    snaps = [n for n in gm.graph.nodes if n.target == torch.ops.packkv.snapshot.default]
    assert len(snaps) == 1 and snaps[0].args == (counters,) and snaps[0].prev is v  # right after the inputs
    src = offset.args[0].args[0]  # offset <- getitem(row', 0) <- getitem(snapshot, 0)
    assert src.target is operator.getitem and src.args[0] is snaps[0]
    assert own_view.args[0] is counters  # PackKV's reads are untouched
    assert snapshot_foreign_reads(torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())) == 0


def test_rewrite_leaves_other_attention_alone():
    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    gm = torch.fx.symbolic_trace(f)
    assert rewrite_attention(gm) == 0

    layer = fill(PackKVConfig(), torch.randn(1, 2, 300, 64), torch.randn(1, 2, 300, 64))

    class Dropout(TinyAttention):
        def forward(self, q):
            st = self.layer
            k, v = torch.ops.packkv.decompress(*st.tensors(), self.length, *spec(st.layout))
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5, enable_gqa=True)

    graphs: list = []
    torch.compile(Dropout(layer, ""), backend=capture(graphs), fullgraph=True)(torch.randn(1, 2, 1, 64))
    assert "packkv.attention.default" not in targets(graphs[0])


@pytest.mark.cuda
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_compiled_decode_on_cuda(mode, monkeypatch):
    from packkv.ops.kernels import attention as attention_kernel

    monkeypatch.setattr(attention_kernel, "GLUON", False)  # the Triton kernel's register cap is checked below
    ids, mask = prompts(2)
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW)
    eager = tiny("llama").cuda().generate(**kw, past_key_values=packkv.PackKVCache(EXACT))
    before = stats["graphs"]
    model = packkv.compile(tiny("llama").cuda(), config=EXACT, mode=mode)
    assert torch.equal(model.generate(**kw), eager)
    assert stats["graphs"] - before <= 3
    # The attention inlined by Inductor keeps its register cap (Inductor dropped maxnreg: ~230 registers, half the
    # programs per SM its split count assumes, ~1.4x slower; packkv_ops/kernels/inductor_compat.py).
    short = {**kw, "max_new_tokens": 2, "min_new_tokens": 2}
    regs = kernel_registers(lambda: model.generate(**short), "_attention_kernel")
    assert regs and max(regs) <= attention_kernel.MAXNREG, regs


@pytest.mark.cuda
def test_attention_built_by_parallel_compile_workers_keeps_its_register_cap(monkeypatch):
    """With Inductor's compile workers (``compile_threads`` > 1, as a plain ``torch.compile`` has), the capped
    attention is still built in this process (``inductor_compat``), so it keeps its cap."""
    from packkv.ops.kernels import attention as attention_kernel

    monkeypatch.setattr(attention_kernel, "GLUON", False)  # the Triton kernel (on sm_90 decode would take Gluon)

    from torch._inductor import config as inductor_config
    from torch._inductor.async_compile import AsyncCompile, CompiledTritonKernels

    # Compiled afresh, with the worker pool up (Inductor compiles in process until it is): no kernel of an earlier
    # test from this process's kernel cache or from the FX graph cache's bundled binaries.
    with inductor_config.patch(compile_threads=4):
        AsyncCompile.wait_pool_ready()
    CompiledTritonKernels.cache_clear()
    ids, mask = prompts(2)
    kw = dict(input_ids=ids.cuda(), attention_mask=mask.cuda(), do_sample=False, max_new_tokens=2, min_new_tokens=2)
    model = packkv.compile(tiny("llama").cuda(), config=EXACT, options={"compile_threads": 4, "fx_graph_cache": False})
    model.generate(**kw)
    regs = kernel_registers(lambda: model.generate(**kw), "_attention_kernel")
    assert regs and max(regs) <= attention_kernel.MAXNREG, regs


def kernel_registers(fn, name: str) -> list[int]:
    """Registers per thread of each launch of the CUDA kernels named ``name`` while ``fn`` runs (profiler trace)."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as p:
        fn()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        p.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    return [e["args"]["registers per thread"] for e in events if e.get("cat") == "kernel" and name in e.get("name", "")]
