"""benchmarks/accuracy.py end to end on a tiny random Llama (with a tokenizer built here), and the pieces it
relies on: its shortcuts give bitwise what the slow paths give."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, PreTrainedTokenizerFast

from packkv import PackKVCache, PackKVConfig, real_model
from packkv.evaluate import teacher_forced_logits
from packkv.ops.rotation import hadamard
from packkv.ops.accounting import exact_bytes, fixed_width_bytes, fixed_width_stream_bytes, stream_bytes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import accuracy  # noqa: E402
from benchmarks.kivi_cache import KIVICache, KIVIConfig, kivi_bytes  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONTEXT, FOLLOW = 320, 80


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama (4 heads, 2 KV heads, head_dim 64) and a BPE tokenizer trained on a novel's start."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("tiny_llama")
    text = real_model.text()[:40_000]
    (folder / "book.txt").write_text(text, encoding="utf-8")
    specials = ["<|pad|>", "<|im_end|>", "<|im_start|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tk.train_from_iterator([text[i : i + 2000] for i in range(0, len(text), 2000)], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|pad|>", eos_token="<|im_end|>",
                                  bos_token="<|im_start|>")  # fmt: skip
    tok.chat_template = CHAT_TEMPLATE
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    model, tok = real_model.load(tiny_dir / "model")
    ids = tok((tiny_dir / "book.txt").read_text(), return_tensors="pt").input_ids[:, 1000 : 1000 + CONTEXT + FOLLOW]
    assert ids.shape[1] == CONTEXT + FOLLOW
    return model, tok, ids


def test_benchmark_end_to_end_quick(tiny_dir, tmp_path):
    out_dir = tmp_path / "out"
    out = accuracy.main([
        "--model", str(tiny_dir / "model"), "--text", str(tiny_dir / "book.txt"), "--quick",
        "--context", str(CONTEXT), "--follow", str(FOLLOW), "--out", str(out_dir), "--device", "cpu",
        "--hadamard", "--gen-prompt-tokens", "200", "--gen-new-tokens", "12",
    ])  # fmt: skip
    data = json.loads((out_dir / "accuracy.json").read_text())
    for section in ("meta", "settings", "points", "frontier", "matched_fidelity", "default_config", "goals",
                    "generation"):  # fmt: skip
        assert section in data, section
    assert data == json.loads(json.dumps(out, default=str))  # what main() returns is what it wrote
    for name in ("frontier.png", "stages.png", "generation.png"):
        assert (out_dir / name).stat().st_size > 10_000, name

    methods = Counter(r["method"] for r in data["settings"])
    assert methods["packkv"] >= 4 and methods["kivi"] >= 2
    assert any(r.get("rotate") for r in data["settings"])
    for r in data["settings"]:
        fid = r["fidelity"]
        assert fid["kl"]["min"] >= 0 and math.isfinite(fid["kl"]["max"]), r["id"]
        assert fid["kl"]["min"] <= fid["kl"]["mean"] <= fid["kl"]["max"]
        assert 0 <= fid["top1"]["mean"] <= 1 and fid["ppl_rise"]["mean"] > -1
        stages = ("kivi",) if r["method"] == "kivi" else accuracy.STAGES
        assert set(r["ratios"]) == set(stages), r["id"]
        for st in stages:
            rat = r["ratios"][st]
            assert rat["k"] > 1 and rat["v"] > 1 and rat["kv"] > 1, (r["id"], st, rat)
            assert 1 < rat["kv_incl_window"] < rat["kv"]
        assert r["after_prefill"]["compressed_tokens"]["mean"] == (CONTEXT - 128) // 64 * 64
        assert 128 <= r["after_prefill"]["exact_tokens"]["mean"] < 192
        if r["method"] == "packkv":
            rats = r["ratios"]
            assert rats["packed"]["paper"]["kv"] > 1 and rats["median"]["paper"]["kv"] > 1
            assert rats["median"]["windows"] == rats["packed"]["windows"] == 1
            if r["family"] == "token" and not r["rotate"]:  # each lossless stage gains (exact accounting)
                assert rats["quant_only"]["kv"] <= rats["packed"]["kv"], r["id"]
    kivi4 = next(r for r in data["settings"] if r["id"] == "kivi/K4V4")
    assert kivi4["ratios"]["kivi"]["kv"] == pytest.approx(16 / 5)  # 4 bits + 32 bits per 32 elements
    pts = data["points"]
    assert all(p["kl"] >= 0 for p in pts)
    for thr in ("0.01", "0.05"):
        row = data["matched_fidelity"][thr]
        for key in ("packkv", "packkv_no_rotation", "packkv_hadamard", "kivi"):
            assert row[key] is None or row[key]["kl"] <= float(thr)
        # PackKV's best is the best over its configurations, rotated or not.
        got = [row[k]["kv_ratio"] for k in ("packkv_no_rotation", "packkv_hadamard") if row[k]]
        assert (row["packkv"] or {}).get("kv_ratio") == (max(got) if got else None)
    assert data["frontier"]["packkv"] and data["frontier"]["kivi"]
    gen = data["generation"]
    assert gen["prompts"] == 2 and "packkv default" in gen["configs"] and "kivi K4V4" in gen["configs"]
    for c in gen["configs"].values():
        for p in c["per_sample"]:
            assert 0 <= p["identical_fraction"] <= 1 and 1 <= p["len"] <= 12
    assert set(data["goals"]) >= {"kl<=0.01: kv_ratio>=6", "kl<=0.05: kv_ratio>=8"}


@pytest.mark.parametrize(
    "setting",
    [
        accuracy.Setting("packkv", "token", 0.1, 0.2),
        accuracy.Setting("packkv", "channel", 0.2, 0.3),
        accuracy.Setting("packkv", "token_head", 0.1, 0.2, rotate=True),
        accuracy.Setting("kivi", k_bits=2, v_bits=2),
    ],
    ids=lambda s: s.id,
)
def test_shared_prefill_gives_the_logits_of_teacher_forcing(tiny, setting):
    """Filling the cache with the exact run's prefill K/V, then continuing, is bitwise teacher_forced_logits."""
    model, _, ids = tiny
    ref = accuracy.exact_reference(model, accuracy.Window("t", 0, ids), CONTEXT)
    direct = teacher_forced_logits(model, ids, CONTEXT, setting.make_cache())
    shared = accuracy.continue_logits(model, ids, CONTEXT, accuracy.prefill_from(setting.make_cache(), ref.kv),
                                      ref.logits[:, :1])  # fmt: skip
    assert torch.equal(shared, direct)
    assert accuracy.fidelity(ref, direct, ids[:, CONTEXT:])["kl"] > 0


def test_fidelity_does_not_depend_on_the_lossless_stages(tiny):
    model, _, ids = tiny
    s = accuracy.Setting("packkv", "token", 0.1, 0.2)
    outs = [teacher_forced_logits(model, ids, CONTEXT, s.make_cache(repack=r)) for r in ("none", "median", "greedy")]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@torch.no_grad()
def test_kivi_chunked_teacher_forcing_is_decode_exact(tiny):
    model, _, ids = tiny
    ids = ids[:, : CONTEXT + 40]
    chunked = teacher_forced_logits(model, ids, CONTEXT, KIVICache(KIVIConfig(2, 2)))
    cache = KIVICache(KIVIConfig(2, 2))
    steps = [model(ids[:, :CONTEXT], past_key_values=cache).logits[:, -1:]]
    steps += [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(CONTEXT, ids.shape[1] - 1)]
    torch.testing.assert_close(chunked, torch.cat(steps, 1), rtol=1e-4, atol=1e-4)
    exact = teacher_forced_logits(model, ids, CONTEXT, DynamicCache(config=model.config))
    assert (chunked - exact).abs().max() > 1e-3  # it really quantizes


def test_kivi_quantization_and_bytes():
    x = torch.randn(1, 2, 64, 64)
    from benchmarks.kivi_cache import quantize_keys, quantize_values

    for bits in (2, 3, 4):
        for fn, dim in ((quantize_keys, 2), (quantize_values, 3)):
            y = fn(x, bits, 32)
            g = x.reshape(1, 2, 2, 32, 64) if dim == 2 else x.reshape(1, 2, 64, 2, 32)
            rng = (g.amax(dim + 1, keepdim=True) - g.amin(dim + 1, keepdim=True)).expand_as(g).reshape(x.shape)
            assert ((y - x).abs() <= rng / (2**bits - 1) / 2 * 1.01 + 1e-3).all()
            levels = (y.reshape(g.shape).unsqueeze(-1) if dim == 3 else y.reshape(g.shape))
            assert torch.unique(levels[0, 0, 0, :, 0] if dim == 2 else levels[0, 0, 0, 0]).numel() <= 2**bits
    b = kivi_bytes(KIVIConfig(2, 4), head_tokens=100, head_dim=64)
    assert b["k_compressed"] == 100 * 64 * (2 / 8 + 4 / 32) and b["v_compressed"] == 100 * 64 * (4 / 8 + 4 / 32)


@torch.no_grad()
def test_memo_layer_generates_exactly_what_packkv_generates(tiny):
    model, tok, ids = tiny
    prompts = torch.cat([ids[:, :250], ids[:, 60:310]])
    settings = [accuracy.Setting("packkv", "token", 0.1, 0.2), accuracy.Setting("packkv", "token", 0.1, 0.2, rotate=True)]
    for s in settings:
        kw = dict(attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=90, min_new_tokens=90,
                  pad_token_id=0)  # fmt: skip
        slow = model.generate(prompts, past_key_values=s.make_cache(), **kw)
        fast_cache = s.make_cache(memo=True)
        fast = model.generate(prompts, past_key_values=fast_cache, **kw)
        assert isinstance(fast_cache.layers[0], accuracy.MemoPackKVLayer)
        assert torch.equal(slow, fast)


def test_stream_accounting_splits_exact_and_fixed_width_bytes(tiny):
    model, _, ids = tiny
    ref = accuracy.exact_reference(model, accuracy.Window("t", 0, ids), CONTEXT)
    for fam in accuracy.FAMILIES:
        s = accuracy.Setting("packkv", fam, 0.1, 0.2)
        cache = accuracy.prefill_from(s.make_cache(), ref.kv)
        for layer in cache.layers:
            st = layer.storage
            e, sb, fw = exact_bytes(st), stream_bytes(st), fixed_width_stream_bytes(st)
            assert sb["k_compressed"] + sb["v_compressed"] == e["compressed"]
            assert sb["k_fp16"] + sb["v_fp16"] == e["fp16_compressed"]
            assert sb["k_payload"] + sb["v_payload"] == e["payload"]
            assert math.ceil(fw["k"] + fw["v"]) == fixed_width_bytes(st)


class RotateOutsideCache(PackKVCache):
    """The specification of ``rotation="hadamard"``: a plain PackKVCache fed ``K H`` / ``V H``, its K/V rotated back."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        h = hadamard(key_states.shape[-1])
        dt = key_states.dtype
        keys, values = super().update((key_states.float() @ h).to(dt), (value_states.float() @ h).to(dt), layer_idx,
                                      *args, **kwargs)  # fmt: skip
        keys, values = (keys.float() @ h).to(dt), (values.float() @ h).to(dt)
        new = key_states.shape[-2]
        if new > self.packkv_config.window:  # the prefill attends to its own tokens exact
            keys[:, :, -new:], values[:, :, -new:] = key_states, value_states
        return keys, values


def test_rotation_option_is_rotating_outside_the_cache(tiny):
    """The benchmark's Hadamard settings use the codec's option; it equals rotating K/V around a plain cache."""
    model, _, ids = tiny
    s = accuracy.Setting("packkv", "token", 0.1, 0.2, rotate=True)
    assert s.packkv_config().rotation == "hadamard"
    outside = teacher_forced_logits(model, ids, CONTEXT, RotateOutsideCache(dataclasses.replace(s.packkv_config(),
                                                                                                rotation="none")))
    inside = teacher_forced_logits(model, ids, CONTEXT, s.make_cache())
    torch.testing.assert_close(inside, outside, rtol=0, atol=1e-5)
