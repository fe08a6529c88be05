"""What a decode step's flush ahead costs (``PackKVLayer.flush_ahead``: once per ``block_size`` compiled steps the
cache compresses every layer's oldest ring block before the step's graph), eager and replayed from a CUDA graph;
plus the static baseline's attention variants at one layer (``--sdpa``).

    python scripts/flush_ahead_cost.py [--layers 32] [--batches 1 8] [--sdpa]

Llama-3.1-8B cache shapes (8 KV heads, head_dim 128, bf16), the default config. Each round refills the rings with
``block_size`` tokens (untimed), then times the 32 layers' flushes (``PackKVCache._flush_ahead``): ``eager`` (each
layer's append launched from Python) and ``CUDA graph`` (``FlushGraph``: the same launches replayed): wall time with
the GPU waited for, and the host's time until the call returned. Medians over ``--rounds``. GPU only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from packkv.models.cache import PackKVCache
from packkv.ops import PackKVConfig, ops

DEVICE = "cuda"


def build(layers: int, batch: int, tokens: int, cfg: PackKVConfig) -> PackKVCache:
    """A cache of ``layers`` layers holding ``tokens`` tokens each, stacked as a compiled step finds them."""
    cache = PackKVCache(cfg)
    for i in range(layers):
        k = torch.randn(batch, 8, tokens, 128, device=DEVICE, dtype=torch.bfloat16)
        cache.update(k, k.clone(), i)
    return cache


def room_for(cache: PackKVCache, blocks: int) -> None:
    """Storage for ``blocks`` more blocks per layer, planned now (a replayed graph plans nothing), then stacked."""
    for layer in cache.layers:
        layer._ensure_capacity(layer.n_blocks + blocks, blocks)
    cache.stack_layers()


def refill(cache: PackKVCache, tokens: int) -> None:
    for layer in cache.layers:
        st = layer.storage
        k = torch.randn(st.batch, 8, tokens, 128, device=DEVICE, dtype=torch.bfloat16)
        ops.append(*st.tensors(), k, k, 0, *st.layout.spec())
        layer.n_win += tokens


def flush_all(cache: PackKVCache) -> None:
    for layer in cache.layers:
        layer.flush_ahead(1)


def time_flushes(cache: PackKVCache, rounds: int) -> tuple[list[float], list[float]]:
    """Wall (GPU waited for) and host (until the last launch returned) ms of ``rounds`` flushes of every layer,
    the rings refilled between them (untimed)."""
    wall, host = [], []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        cache._flush_ahead(1)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        wall.append((time.perf_counter() - t0) * 1e3)
        host.append((t1 - t0) * 1e3)
        refill(cache, cache.packkv_config.block_size)
    return wall, host


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--sdpa", action="store_true")
    a = p.parse_args()
    cfg = PackKVConfig()
    T, W = cfg.block_size, cfg.window
    print("| batch | flushes | wall ms (median) | host ms | per layer, us |")
    print("|---|---|---|---|---|")
    for batch in a.batches:
        for graphs in (False, True):
            cache = build(a.layers, batch, W + T - 1, cfg)  # one token short of a flush
            cache.graph_flushes = graphs
            room_for(cache, a.rounds + 3)
            time_flushes(cache, 2)  # compiles the kernels; the graph's first run is eager, the second captures
            wall, host = time_flushes(cache, a.rounds)
            w, h = statistics.median(wall), statistics.median(host)
            kind = "CUDA graph" if graphs else "eager"
            print(f"| {batch} | {kind} | {w:.2f} | {h:.2f} | {w / a.layers * 1e3:.0f} |", flush=True)
            nb = torch.stack([layer.storage.n_blocks for layer in cache.layers]).unique().tolist()
            assert nb == [cache.layers[0].n_blocks], (nb, cache.layers[0].n_blocks)  # the device did them all
            assert not graphs or cache._flush_graph.graph is not None
    if a.sdpa:
        sdpa_variants()


def sdpa_variants(context: int = 131072) -> None:
    """One layer's decode attention at batch 1 over a static cache of ``context`` slots (all filled but the last
    64): transformers' path (K/V repeated per query head, bool mask), query heads folded into rows (mask), and
    ``enable_gqa`` without a mask over the filled length (no static shape)."""
    import torch.nn.functional as F
    from triton.testing import do_bench

    q = torch.randn(1, 32, 1, 128, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(1, 8, context, 128, device=DEVICE, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    mask = torch.ones(1, 1, 1, context, device="cuda", dtype=torch.bool)
    mask[..., -64:] = False
    n = context - 64
    variants = {
        "repeat_kv + mask (transformers)": lambda: F.scaled_dot_product_attention(
            q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=mask),
        "attention only, K/V pre-repeated + mask": None,
        "rows folded + mask (static_gqa)": lambda: F.scaled_dot_product_attention(
            q.reshape(1, 8, 4, 128), k, v, attn_mask=mask),
        "enable_gqa, no mask, filled length": lambda: F.scaled_dot_product_attention(
            q, k[:, :, :n], v[:, :, :n], enable_gqa=True),
    }
    kr, vr = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
    variants["attention only, K/V pre-repeated + mask"] = lambda: F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)
    print("\n| one layer, batch 1, 128K | ms |\n|---|---|")
    for name, fn in variants.items():
        print(f"| {name} | {do_bench(fn, warmup=25, rep=200, return_mode='median'):.3f} |", flush=True)


if __name__ == "__main__":
    main()
