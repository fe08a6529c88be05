"""The packed cache on the real model (SmolLM2-135M) and real text."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import packkv
from packkv import PackKVCache, PackKVConfig, real_model
from packkv.evaluate import teacher_forced_logits

pytestmark = pytest.mark.slow
CONTEXT, FOLLOW = 1000, 256


@pytest.fixture(scope="module")
def book_ids(smollm):
    _, tok = smollm
    return tok(real_model.text("sensesensibility.txt"), return_tensors="pt").input_ids[:, : CONTEXT + FOLLOW + 1]


def next_token_predictions(model, ids, cache):
    """Top-1 predictions of the FOLLOW tokens after CONTEXT, teacher-forced as decoding would see them."""
    return teacher_forced_logits(model, ids, CONTEXT, cache)[0].argmax(-1)


def test_teacher_forced_top1_agrees_with_the_exact_cache(smollm, book_ids):
    model, _ = smollm
    exact = next_token_predictions(model, book_ids, DynamicCache(config=model.config))
    cache = PackKVCache(PackKVConfig(k_rel=0.02, v_rel=0.02))
    packed = next_token_predictions(model, book_ids, cache)
    agreement = (exact == packed).float().mean().item()
    assert cache.layers[0].n_blocks >= (CONTEXT - 128) // 64  # the context really is compressed
    assert agreement >= 0.95, agreement


def test_default_bounds_shrink_the_cache_and_generate_to_the_end(smollm, book_ids):
    model, tok = smollm
    cache = PackKVCache()
    out = model.generate(
        book_ids[:, :CONTEXT], past_key_values=cache, max_new_tokens=64, min_new_tokens=64, do_sample=False,
        pad_token_id=tok.eos_token_id,
    )  # fmt: skip
    assert out.shape[1] == CONTEXT + 64
    n = cache.nbytes()
    assert n["fp16_compressed"] / n["compressed"] >= 3.0


def test_compiled_generation_fuses_every_layer_and_matches_eager(book_ids):
    """``packkv.compile`` on the real model (30 layers, 9 query / 3 KV heads, head_dim 64): every layer's attention
    and its step's append fused, the counters snapshotted for the step's mask, and greedy decoding token for token
    as eager PackKV's. A model of its own: ``packkv.compile`` replaces the methods of the model it is given."""
    from packkv.inductor import stats

    torch._dynamo.reset()
    eager_model, _ = real_model.load()
    ids = book_ids[:, :400]
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=40,
              min_new_tokens=40)  # fmt: skip
    want = eager_model.generate(**kw, past_key_values=PackKVCache())
    model, _ = real_model.load()
    before = dict(stats)
    got = packkv.compile(model).generate(**kw)
    layers = model.config.num_hidden_layers
    grown = {k: stats[k] - before.get(k, 0) for k in ("graphs", "fused_attention", "fused_append", "snapshots")}
    assert grown["graphs"] >= 1 and grown["fused_attention"] == grown["fused_append"] == layers * grown["graphs"]
    assert grown["snapshots"] == 2 * grown["graphs"]
    assert torch.equal(got, want)
    torch._dynamo.reset()
