"""Flush-aligned chunked teacher forcing equals token-by-token decoding through the packed cache."""

from __future__ import annotations

import torch
from test_cache import tiny

from packkv import PackKVCache, PackKVConfig
from packkv.evaluate import decode_chunks, teacher_forced_logits


def test_chunks_start_at_flushes():
    assert decode_chunks(n_win=172, window=128, block_size=64, count=200) == [19, 64, 64, 53]
    assert decode_chunks(n_win=191, window=128, block_size=64, count=70) == [64, 6]
    assert decode_chunks(n_win=10, window=128, block_size=64, count=5) == [5]


@torch.no_grad()
def test_chunked_teacher_forcing_equals_token_by_token_decoding():
    model = tiny("llama")
    ids = torch.randint(3, 256, (2, 300 + 150))
    cfg = PackKVConfig(k_rel=0.3, v_rel=0.4)  # coarse: a block compressed at the wrong time would show
    chunked = teacher_forced_logits(model, ids, 300, PackKVCache(cfg))
    cache = PackKVCache(cfg)
    steps = [model(ids[:, :300], past_key_values=cache).logits[:, -1:]]
    steps += [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(300, ids.shape[1] - 1)]
    stepwise = torch.cat(steps, 1)
    assert chunked.shape == stepwise.shape == (2, 150, 256)
    torch.testing.assert_close(chunked, stepwise, rtol=1e-4, atol=1e-4)
