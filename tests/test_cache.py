"""PackKVCache in transformers generate(): the whole Cache contract on five architectures."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from helpers import spec

from packkv import PackKVCache, PackKVConfig, save_cache
from packkv.ops.reference import flush_count

EXACT = PackKVConfig(k_rel=1e-4, v_rel=1e-4)  # fine enough that quantization changes no greedy token here
SMALL = dict(vocab_size=256, hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=0, eos_token_id=1, bos_token_id=2)  # fmt: skip
CONFIGS = {
    "llama": lambda: LlamaConfig(**SMALL),
    "mistral": lambda: MistralConfig(**SMALL, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**SMALL),
    "qwen3": lambda: Qwen3Config(**SMALL, head_dim=64),
    "phi3": lambda: Phi3Config(**SMALL),
}
PROMPT = 250  # more than window + block: the prefill compresses, and decoding compresses again


def tiny(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIGS[arch](), attn_implementation="sdpa").eval()


def prompts(batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts, left-padded to a common length (lengths PROMPT, PROMPT-37, PROMPT-90)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (batch, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    for b, pad in enumerate([0, 37, 90][:batch]):
        ids[b, :pad], mask[b, :pad] = 0, 0
    return ids, mask


def generate(model, ids, mask, cache, **kw):
    return model.generate(
        input_ids=ids, attention_mask=mask, past_key_values=cache, do_sample=False, max_new_tokens=70,
        min_new_tokens=70, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_tokens_equal_dynamic_cache_when_quantization_is_exact(arch, batch):
    model = tiny(arch)
    ids, mask = prompts(batch)
    ref = generate(model, ids, mask, DynamicCache(config=model.config))
    cache = PackKVCache(EXACT)
    out = generate(model, ids, mask, cache)
    assert torch.equal(out, ref)
    layer = cache.layers[0]
    assert layer.n_blocks > 0 and cache.get_seq_length() == PROMPT + 70 - 1


@torch.no_grad()
def teacher_forced_logits(model, ids, cache, prompt):
    """Logits of every position after `prompt`, decoding one token at a time through `cache`."""
    model(ids[:, :prompt], past_key_values=cache)
    out = [model(ids[:, t : t + 1], past_key_values=cache).logits[:, -1] for t in range(prompt, ids.shape[1])]
    return torch.stack(out, 1)


def test_logit_error_is_controlled_by_the_bound():
    """At the default bounds logits stay close, and the error shrinks in proportion to the bound."""
    model = tiny("llama")
    ids = torch.randint(3, 256, (1, PROMPT + 60))
    exact = teacher_forced_logits(model, ids, DynamicCache(config=model.config), PROMPT)
    errs = {}
    for scale in (1.0, 0.25):
        cfg = PackKVConfig(k_rel=0.1 * scale, v_rel=0.2 * scale)
        errs[scale] = (teacher_forced_logits(model, ids, PackKVCache(cfg), PROMPT) - exact).abs().max().item()
    spread = exact.std().item()
    assert errs[1.0] < 0.25 * spread
    assert errs[0.25] < 0.5 * errs[1.0]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_beam_search_matches_dynamic_cache(arch):
    model = tiny(arch)
    ids, mask = prompts(2)
    kw = dict(num_beams=3, num_return_sequences=2)
    ref = generate(model, ids, mask, DynamicCache(config=model.config), **kw)
    assert torch.equal(generate(model, ids, mask, PackKVCache(EXACT), **kw), ref)


def test_assisted_decoding_crops_and_matches_dynamic_cache():
    model, assistant = tiny("llama"), tiny("llama", seed=7)
    ids, mask = prompts(1)
    ref = generate(model, ids, mask, DynamicCache(config=model.config), assistant_model=assistant)
    out = generate(model, ids, mask, PackKVCache(EXACT), assistant_model=assistant)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("remove", [-3, -70, -150])
def test_crop_then_decode_matches_dynamic_cache(remove):
    """Cropping inside the window, and back into compressed blocks (their tokens return to the ring)."""
    model = tiny("llama")
    ids = torch.randint(3, 256, (1, PROMPT + 40))
    caches = [DynamicCache(config=model.config), PackKVCache(EXACT)]
    for c in caches:
        model(ids, past_key_values=c)
        c.crop(remove)
    assert caches[1].get_seq_length() == ids.shape[1] + remove
    nxt = ids[:, remove : remove + 5] if remove + 5 < 0 else ids[:, remove:]
    logits = [model(nxt, past_key_values=c).logits for c in caches]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("rotation", ["none", "hadamard"])
def test_crop_into_the_middle_of_a_compressed_block_keeps_its_decompressed_tokens(rotation):
    """The kept part of a cut block returns to the exact ring as decompressed (in stored coordinates); the
    tokens before the cut read back as before."""
    cache = PackKVCache(PackKVConfig(block_size=16, window=16, rotation=rotation))
    k, v = torch.randn(2, 1, 2, 100, 64).unbind(0)
    cache.update(k, v, 0)
    layer = cache.layers[0]
    assert layer.n_blocks * 16 > 70 > (layer.n_blocks - 1) * 16  # the cut falls inside the last block
    st = layer.storage
    before = torch.ops.packkv.decompress(*st.tensors(), 100, *spec(st.layout))
    cache.crop(-30)
    assert (layer.n_blocks, layer.n_win, cache.get_seq_length()) == (4, 6, 70)
    st = layer.storage
    after = torch.ops.packkv.decompress(*st.tensors(), 70, *spec(st.layout))
    for x, y in zip(before, after):
        torch.testing.assert_close(y, x[:, :, :70], rtol=1e-6, atol=1e-5)  # fp32 order of the two rotations


def test_batch_select_and_repeat_interleave_match_dynamic_cache():
    model = tiny("llama")
    ids, mask = prompts(3)
    caches = [DynamicCache(config=model.config), PackKVCache(EXACT)]
    for c in caches:
        model(ids, attention_mask=mask, past_key_values=c)
        c.batch_select_indices(torch.tensor([2, 0]))
        c.batch_repeat_interleave(2)
    nxt = torch.randint(3, 256, (4, 1))
    m = torch.cat([mask[[2, 2, 0, 0]], torch.ones(4, 1, dtype=mask.dtype)], 1)
    logits = [model(nxt, attention_mask=m, past_key_values=c).logits for c in caches]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-3, atol=1e-3)


def test_reset_and_deepcopy():
    model = tiny("llama")
    ids = torch.randint(3, 256, (1, PROMPT))
    cache = PackKVCache(EXACT)
    model(ids, past_key_values=cache)
    twin = copy.deepcopy(cache)
    nxt = torch.randint(3, 256, (1, 1))
    a = model(nxt, past_key_values=cache).logits
    b = model(nxt, past_key_values=twin).logits
    assert torch.equal(a, b) and cache.get_seq_length() == twin.get_seq_length() == PROMPT + 1
    cache.reset()
    assert cache.get_seq_length() == 0
    fresh = model(ids, past_key_values=cache).logits
    torch.testing.assert_close(fresh, model(ids, past_key_values=DynamicCache(config=model.config)).logits,
                               rtol=1e-4, atol=1e-4)  # fmt: skip


def test_memory_is_the_packed_bytes_plus_bounded_headroom():
    model = tiny("llama")
    cache = PackKVCache()
    model(torch.randint(3, 256, (1, 64 * 40 + 100)), past_key_values=cache)
    n = cache.nbytes()
    assert n["compressed_tokens"] == 2 * 64 * 39 and n["window_tokens"] == 2 * (64 * 40 + 100 - 64 * 39)
    assert n["fp16_compressed"] / n["compressed"] > 3.0
    # Allocated: packed bytes + the exact ring + growth headroom, far below the fp16 size of the cache.
    assert n["allocated"] < 0.6 * (n["fp16_compressed"] + n["fp16_window"])


def test_reserve_makes_room_for_exactly_the_tokens_asked_for():
    """A reservation is not grown geometrically: a compiled step attends to the whole capacity, so a doubled one
    would make each step attend to up to twice the sequence's length (the e2e benchmark did: out_len 130240 at
    64K)."""
    model = tiny("llama")
    cache = PackKVCache()
    model(torch.randint(3, 256, (1, 64 * 40 + 100)), past_key_values=cache)
    layer = cache.layers[0]
    want = layer.token_capacity + 2 * 64  # a little more than there is: growth would double the blocks
    cache.reserve(want)
    caps = [layer.token_capacity for layer in cache.layers]
    assert all(want <= c <= want + 64 for c in caps), (want, caps)  # whole blocks: at most one block more
    cache.reserve(want - 300)  # fewer than are stored: trimmed to the stored blocks, not below
    for layer in cache.layers:
        assert layer.token_capacity == layer.n_blocks * 64 + layer.storage.layout.ring_size >= layer.tokens


def _host_plan(cache) -> list:
    plan = cache._plan
    return [(layer.n_blocks, layer.n_win, layer.n_flush, layer.token_capacity, layer._stack is plan.stack)
            for layer in cache.layers] + [(plan.n_flush, plan.token_capacity,
                                           all(p is layer.storage.pool for p, layer in zip(plan.pools, cache.layers)))]  # fmt: skip


def _step_appended(cache) -> None:
    """What a compiled step's appends do to the device counters (each layer stores its token), for tests that
    plan steps without running them."""
    for layer in cache.layers:
        layer.storage.n_win.add_(1)


def test_a_step_that_compresses_nothing_reuses_the_last_plan_and_plans_what_full_planning_plans():
    """Before each compiled step the host plans it (flush count, growth, the step plan): most steps compress no
    block, and then the last plan serves again. Over steps that compress blocks, grow the storage, follow a crop
    and a batch selection (new storages, out of the stack), the reused plans leave every layer and the plan as
    planning each step in full does."""
    model = tiny("llama")
    ids = torch.randint(3, 256, (1, 64 * 3 + 40))
    fast, full = PackKVCache(), PackKVCache()
    model(ids, past_key_values=fast)
    model(ids, past_key_values=full)
    full._prepare_plain_step = lambda new_tokens: None  # always the full planning
    reused = 0
    for step in range(300):
        if step == 150:
            for cache in (fast, full):
                cache.crop(-5)  # the counts move back (the layers stay stacked)
        if step == 200:
            for cache in (fast, full):
                cache.batch_select_indices(torch.tensor([0]))  # new storages: the layers leave their stack
        before = fast._plan
        assert fast.prepare_step(1) == full.prepare_step(1)
        reused += fast._plan is before
        assert _host_plan(fast) == _host_plan(full), step
        _step_appended(fast)
        _step_appended(full)
    assert reused > 250  # most steps compress nothing
    assert full.layers[0].storage.block_capacity > 4  # the storage grew on the way


def _stored(cache):
    return [torch.ops.packkv.decompress(*layer.storage.tensors(), layer.tokens, *spec(layer.storage.layout))
            for layer in cache.layers]  # fmt: skip


def test_flushes_ahead_of_compiled_steps_share_one_flush_graph_per_storage(monkeypatch):
    """Before a compiled step whose token would overflow the ring, every layer compresses its oldest block
    (``flush_ahead``); on CUDA all layers' flushes run as one ``FlushGraph`` (captured once, replayed). Here on the
    CPU, with a stand-in that launches eagerly and counts its runs: one graph serves every flush of a storage, a
    growth (new storages) gets a new one, ``reset`` and copies drop it, and the storages end as the layers' own
    eager flushes leave them."""
    from packkv.models import cache as cache_module

    runs = []

    class CountingGraph(cache_module.FlushGraph):
        def run(self):
            runs.append(self)
            self._launch()

    monkeypatch.setattr(cache_module, "FlushGraph", CountingGraph)
    monkeypatch.setattr(cache_module, "_on_cuda", lambda stack: True)
    cfg = PackKVConfig(block_size=16, window=16)
    caches = {graphs: PackKVCache(cfg) for graphs in (True, False)}
    for graphs, cache in caches.items():
        cache.graph_flushes = graphs
    g = torch.Generator().manual_seed(0)

    def add(tokens):
        kv = [torch.randn(1, 2, tokens, 64, generator=g) for _ in range(4)]
        for cache in caches.values():
            for i in range(2):
                cache.update(kv[2 * i], kv[2 * i + 1], i)

    add(31)  # one token short of a flush
    for step in range(6):  # the storages start with room for 4 blocks: the fifth flush grows them
        for cache in caches.values():
            assert cache.prepare_step(1) > 0
            _step_appended(cache)  # (the step's token, as the compiled step's append stores it)
        assert len(runs) == step + 1
        for a, b in zip(*(cache.layers for cache in caches.values())):
            assert (a.n_blocks, a.n_win) == (b.n_blocks, b.n_win) == (step + 1, 16)
        add(15)
    assert runs[0] is runs[3] and runs[4] is runs[5] and runs[3] is not runs[4]
    assert {layer.storage.block_capacity for layer in caches[True].layers} == {8}
    for a, b in zip(_stored(caches[True]), _stored(caches[False])):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    graphs = caches[True]
    assert copy.deepcopy(graphs)._flush_graph is None and graphs._flush_graph is runs[-1]
    graphs.reset()
    assert graphs._flush_graph is None


def test_reserve_trims_a_prefills_geometric_growth_to_the_tokens_asked_for():
    """A prefill grows the storage geometrically (it cannot know the final length), so its capacity can end at
    up to twice the length: a later reservation trims it to exactly the tokens asked for (the e2e benchmark's 64K
    steps attended over 130,240 positions before this), keeps every stored value, never goes below what is
    stored, and leaves room for exactly those tokens: the steps up to them grow nothing."""
    model = tiny("llama")
    cache = PackKVCache(PackKVConfig(block_size=16, window=16))
    n = 16 * 40 + 5
    for i in range(0, n, 100):  # a chunked prefill: geometric growth
        model(torch.randint(3, 256, (1, min(100, n - i))), past_key_values=cache)
    layer = cache.layers[0]
    assert layer.token_capacity > n + 16 * 4, layer.token_capacity  # the growth overshot
    before = _stored(cache)
    want = n + 20
    cache.reserve(want)
    assert all(want <= lay.token_capacity <= want + 16 for lay in cache.layers), [l.token_capacity for l in cache.layers]
    for (k0, v0), (k1, v1) in zip(before, _stored(cache)):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
    caps = [lay._block_capacity for lay in cache.layers]
    for _ in range(want - n):  # the host's plan of each step up to the reservation: no growth
        cache.prepare_step(1)
        _step_appended(cache)
    assert [lay._block_capacity for lay in cache.layers] == caps
    before = _stored(cache)
    cache.reserve(10)  # below what is stored: the stored blocks stay
    assert all(lay.token_capacity >= lay.tokens for lay in cache.layers)
    for (k0, v0), (k1, v1) in zip(before, _stored(cache)):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)


def test_a_storage_is_not_trimmed_below_the_blocks_it_holds():
    cache = PackKVCache(PackKVConfig(block_size=16, window=16))
    cache.update(torch.randn(1, 2, 100, 64), torch.randn(1, 2, 100, 64), 0)
    st = cache.layers[0].storage
    with pytest.raises(ValueError, match="cannot trim to 2 blocks per sequence: a sequence holds 5"):
        st.with_capacity(2, trim_blocks=True)
    assert st.with_capacity(5, trim_blocks=True).block_capacity == 5


def test_cache_of_another_model_is_refused():
    model = tiny("llama")
    ids = torch.randint(3, 256, (1, 20))

    def filled():
        cache = PackKVCache()
        model(ids, past_key_values=cache)
        return cache

    def other(**change):
        return AutoModelForCausalLM.from_config(LlamaConfig(**{**SMALL, **change})).eval()

    with pytest.raises(ValueError, match="heads=2"):
        other(num_key_value_heads=4)(ids[:, :1], past_key_values=filled())
    with pytest.raises(ValueError, match="head_dim=64"):
        other(head_dim=128)(ids[:, :1], past_key_values=filled())
    with pytest.raises(ValueError, match="fewer layers"):
        other(num_hidden_layers=3)(ids[:, :1], past_key_values=filled())
    cache, shallower = filled(), other(num_hidden_layers=1)
    shallower(ids[:, :1], past_key_values=cache)
    with pytest.raises(ValueError, match="more layers"):
        shallower(ids[:, :1], past_key_values=cache)


def test_sliding_window_models_work_with_the_full_packed_cache():
    """Sliding-window layers keep every token in the packed cache; the model's mask limits attention, so the
    tokens equal DynamicCache's (which drops the old ones)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MistralConfig(**SMALL, sliding_window=100), attn_implementation="sdpa").eval()
    ids, mask = prompts(3)
    ref = generate(model, ids, mask, DynamicCache(config=model.config))
    assert torch.equal(generate(model, ids, mask, PackKVCache(EXACT)), ref)


def _planned_step(step_plan: bool = True, stored: tuple[int, ...] = (1,)) -> tuple[PackKVCache, list[tuple[int, int]]]:
    """Three layers of 40 tokens, a compiled step of one token planned, and only the ``stored`` layers' device
    counters advanced by it (as the op does when the others receive NaN/Inf), then ``verify_step``."""
    cache = PackKVCache(PackKVConfig(block_size=16, window=16))
    if not step_plan:
        cache._step_plan = lambda token_capacity: None
    k = torch.randn(1, 2, 40, 64)
    for i in range(3):
        cache.update(k, k, i)
    before = [(layer.n_blocks, layer.n_win) for layer in cache.layers]
    cache.prepare_step(1)  # plans one token per layer
    assert (cache._plan is not None) == step_plan
    for i in stored:
        cache.layers[i].storage.n_win.add_(1)
    cache.verify_step(1)
    return cache, before


@pytest.mark.parametrize("step_plan", [True, False])
def test_a_compiled_step_whose_counters_did_not_advance_is_reported_at_the_next_use_and_undone(step_plan):
    """verify_step after a compiled step starts reading the device counters back and returns without waiting for
    them (the host can queue the next work while the GPU runs); the next use of the cache checks them: layers
    whose counters did not move (the op refused NaN/Inf) are named, and the host mirrors fall back to what the
    device holds; layers that advanced pass. The counters are read from the layers' shared stack (step plan) or
    from each layer's storage (without one)."""
    cache, before = _planned_step(step_plan)
    assert [(layer.n_blocks, layer.n_win) for layer in cache.layers] == [(nb, nw + 1) for nb, nw in before]
    with pytest.raises(ValueError, match=r"non-finite.*layers \[0, 2\]"):
        cache.prepare_step(1)
    after = [(layer.n_blocks, layer.n_win) for layer in cache.layers]
    assert after == [before[0], (before[1][0], before[1][1] + 1), before[2]]
    cache.prepare_step(1)  # the cache is usable again
    for layer in cache.layers:
        layer.storage.n_win.add_(1)
    cache.verify_step(1)
    cache.synchronize()  # all advanced: nothing to report
    assert [layer.n_win for layer in cache.layers] == [before[0][1] + 1, before[1][1] + 2, before[2][1] + 1]


USES = {
    "synchronize": lambda cache, path: cache.synchronize(),
    "prepare_step": lambda cache, path: cache.prepare_step(1),
    "update": lambda cache, path: cache.update(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64), 0),
    "get_seq_length": lambda cache, path: cache.get_seq_length(),
    "get_mask_sizes": lambda cache, path: cache.get_mask_sizes(1, 0),
    "crop": lambda cache, path: cache.crop(-1),
    "reorder_cache": lambda cache, path: cache.reorder_cache(torch.tensor([0])),
    "batch_select_indices": lambda cache, path: cache.batch_select_indices(torch.tensor([0])),
    "batch_repeat_interleave": lambda cache, path: cache.batch_repeat_interleave(2),
    "reserve": lambda cache, path: cache.reserve(200),
    "nbytes": lambda cache, path: cache.nbytes(),
    "save_cache": lambda cache, path: save_cache(cache, path),
}


@pytest.mark.parametrize("use", USES)
def test_every_use_of_the_cache_checks_the_last_compiled_step_first(use, tmp_path):
    """Whatever reads or changes the cache after a compiled step reports a refusal of that step before it acts,
    so it never acts on counts the device does not hold: the tokens stored before stay, and nothing is written."""
    cache, before = _planned_step(stored=())  # NaN in the hidden states: every layer refuses
    path = tmp_path / "cache.safetensors"
    with pytest.raises(ValueError, match=r"non-finite.*layers \[0, 1, 2\]"):
        USES[use](cache, path)
    assert [(layer.n_blocks, layer.n_win) for layer in cache.layers] == before
    assert cache.layers[0].storage.batch == 1 and not path.exists()
    USES[use](cache, path)  # checked once: the use goes ahead


class InFlight:
    """A CUDA event's stand-in for a step whose counters are still on their way: they arrive when waited for."""

    def __init__(self) -> None:
        self.waited = False

    def query(self) -> bool:
        return self.waited

    def synchronize(self) -> None:
        self.waited = True


def _in_flight(cache: PackKVCache) -> InFlight:
    event = InFlight()
    cache._pending[-1] = cache._pending[-1]._replace(done=event)
    return event


def test_plain_steps_are_planned_while_earlier_steps_run_and_a_compressing_step_waits_for_them():
    """The host plans a step that compresses no block without waiting for the earlier steps' counters (it reads
    no count from the host, so a pipelined loop keeps the GPU busy); a step that compresses a block is planned
    from counts the device confirmed."""
    cache, _ = _planned_step(stored=(0, 1, 2))
    events = [_in_flight(cache)]
    layout = cache.layers[0].storage.layout
    while flush_count(cache.layers[0].n_win, 1, layout) == 0:
        cache.prepare_step(1)
        assert not any(e.waited for e in events)
        for layer in cache.layers:
            layer.storage.n_win.add_(1)
        cache.verify_step(1)
        events.append(_in_flight(cache))
    assert len(events) >= 4
    cache.prepare_step(1)
    assert all(e.waited for e in events) and not cache._pending


def test_a_refusal_found_after_a_step_planned_ahead_restores_the_devices_counts():
    cache, before = _planned_step(stored=())  # every layer refused this step...
    _in_flight(cache)
    cache.prepare_step(1)  # ...the next was planned before that was known, and stored its token
    for layer in cache.layers:
        layer.storage.n_win.add_(1)
    cache.verify_step(1)
    with pytest.raises(ValueError, match=r"non-finite.*layers \[0, 1, 2\]"):
        cache.synchronize()
    assert [(layer.n_blocks, layer.n_win) for layer in cache.layers] == [(nb, nw + 1) for nb, nw in before]
    cache.synchronize()  # reported once


def test_a_copy_waits_for_the_steps_in_flight_and_holds_checked_counts():
    cache, _ = _planned_step(stored=(0, 1, 2))
    event = _in_flight(cache)
    twin = copy.deepcopy(cache)
    assert event.waited and not twin._pending and not cache._pending
    assert [layer.n_win for layer in twin.layers] == [layer.n_win for layer in cache.layers]


def test_crop_of_nothing_does_not_wait_for_the_steps_in_flight():
    cache, _ = _planned_step(stored=(0, 1, 2))
    event = _in_flight(cache)
    cache.crop(0)
    assert not event.waited and len(cache._pending) == 1


def test_reset_drops_a_pending_check_with_everything_else():
    """``reset`` empties the cache: the last step's check has nothing left to check."""
    cache, _ = _planned_step()
    cache.reset()
    cache.synchronize()
    assert cache.get_seq_length() == 0
