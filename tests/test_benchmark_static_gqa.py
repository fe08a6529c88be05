"""benchmarks/static_gqa.py: the static-cache baseline whose decode attention reads each KV head once gives
transformers' SDPA attention's results."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import StaticCache

sys.path.insert(0, str(Path(__file__).parents[1]))
from benchmarks import decode_e2e, static_gqa  # noqa: E402


def _steps(model, ids, mask, n: int) -> list[torch.Tensor]:
    """Logits of a prefill on a static cache, then of ``n`` one-token steps (the greedy tokens of the first run)."""
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + n + 5)
    out = [model(ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1]]
    for i in range(n):
        tok = out[-1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        pos = torch.full((ids.shape[0], 1), ids.shape[1] + i)
        out.append(model(tok, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True).logits[:, -1])
    return out


def test_one_token_steps_fold_query_heads_into_rows_and_match_transformers_sdpa():
    """GQA 2 with a left-padded sequence (the static cache's mask hides its unfilled slots and the padding): each
    step's logits match those of transformers' SDPA, which repeats K and V per query head."""
    torch.manual_seed(0)
    model = decode_e2e.build_model(2, True, "cpu")
    assert model.config.num_attention_heads == 2 * model.config.num_key_value_heads
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0  # the second sequence left-padded
    with torch.no_grad():
        want = _steps(model, ids, mask, 4)
        calls = []
        real = static_gqa.F.scaled_dot_product_attention

        def spy(q, k, v, **kw):
            calls.append((tuple(q.shape), tuple(k.shape)))
            return real(q, k, v, **kw)

        static_gqa.F.scaled_dot_product_attention = spy
        try:
            model.set_attn_implementation(static_gqa.register())
            got = _steps(model, ids, mask, 4)
        finally:
            static_gqa.F.scaled_dot_product_attention = real
            model.set_attn_implementation("sdpa")
    # The prefill went to transformers' SDPA (K and V repeated per query head); the decode steps ran the folded
    # product: 2 layers x 4 steps, [B, H, n_rep, D] against [B, H, S, D].
    h, d = model.config.num_key_value_heads, model.config.head_dim
    assert calls == [((2, 2 * h, 12, d), (2, 2 * h, 21, d))] * 2 + [((2, h, 2, d), (2, h, 21, d))] * 8
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_the_e2e_benchmark_times_it_as_a_static_row_of_its_own(tmp_path, monkeypatch):
    """``decode_e2e.py --paths static static_gqa``: the static rows, then the same static cache with this attention
    (compiled afresh), each in its own row; the model goes back to SDPA afterwards."""
    import json

    used = []  # (the row's model's attention implementation, context) per static row
    run_static = decode_e2e.run_static

    def spy(model, batch, context, *args, **kwargs):
        used.append((model.config._attn_implementation, context))
        return run_static(model, batch, context, *args, **kwargs)

    monkeypatch.setattr(decode_e2e, "run_static", spy)
    built, build = [], decode_e2e.build_model
    monkeypatch.setattr(decode_e2e, "build_model", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    torch._dynamo.reset()
    argv = ["--small", "--layers", "2", "--contexts", "256", "--steps", "2", "--warmup", "1", "--chunk", "256",
            "--paths", "static", "static_gqa", "--out", str(tmp_path)]  # fmt: skip
    assert decode_e2e.main(argv) == 0
    rows = json.loads((tmp_path / "decode_e2e.json").read_text())["rows"]
    assert [(r["path"], r["context"]) for r in rows] == [("weights", 1024), ("static", 256), ("static_gqa", 256)]
    assert used == [("sdpa", 1024), ("sdpa", 256), (static_gqa.NAME, 256)]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert built[0].config._attn_implementation == "sdpa"
    torch._dynamo.reset()
