"""The packed cache on the real model (SmolLM2-135M) and real text."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

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
