"""What a decode step's flush ahead costs (``PackKVLayer.flush_ahead``: once per ``block_size`` compiled steps the
cache compresses every layer's oldest ring block before the step's graph), eager and replayed from a CUDA graph;
plus the static baseline's attention variants at one layer (``--sdpa``).

    python scripts/flush_ahead_cost.py [--layers 32] [--batches 1 8] [--sdpa] [--profile]

Llama-3.1-8B cache shapes (8 KV heads, head_dim 128, bf16), the default config. Each round refills the rings with
``block_size`` tokens (untimed), then times the 32 layers' flushes (``PackKVCache._flush_ahead``): ``eager`` (each
layer's append launched from Python) and ``CUDA graph`` (``FlushGraph``: the same launches replayed): wall time with
the GPU waited for, and the host's time until the call returned. Medians over ``--rounds``. ``--profile`` then
profiles one eager flush per batch (``torch.profiler``): the GPU's busy time against the wall, and the ops and kernels
that take it, which tells a host-bound flush (a CUDA graph removes the gap) from a GPU-bound one (its kernels must
get faster, e.g. one launch over all layers). ``--device cpu`` is a
dry run (small sizes; no CUDA graph there, so both rows flush eagerly) that the CPU tests run, so a GPU session does
not spend its minutes on a script that broke.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from packkv.models.cache import PackKVCache
from packkv.ops import PackKVConfig, ops

DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


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
        sync()
        t0 = time.perf_counter()
        cache._flush_ahead(1)
        t1 = time.perf_counter()
        sync()
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
    p.add_argument("--sdpa-context", type=int, default=131072)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--profile", action="store_true")
    a = p.parse_args()
    global DEVICE
    DEVICE = a.device
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
            assert not (graphs and DEVICE == "cuda") or cache._flush_graph.graph is not None
            if a.profile and not graphs:
                profile_flush(cache, batch)
    if a.sdpa:
        sdpa_variants(a.sdpa_context)


def profile_flush(cache: PackKVCache, batch: int) -> None:
    """One eager flush of every layer under ``torch.profiler``: wall, GPU busy time (the kernels' own time), and
    the top ops by host and by GPU time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = DEVICE == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        cache._flush_ahead(1)
        sync()
        wall = (time.perf_counter() - t0) * 1e3
    refill(cache, cache.packkv_config.block_size)
    avg = prof.key_averages()
    busy = sum(e.self_device_time_total for e in avg) / 1e3 if cuda else 0.0
    print(f"\nbatch {batch}, one eager flush of {len(cache.layers)} layers under the profiler: wall {wall:.2f} ms, "
          f"GPU busy {busy:.2f} ms")
    for key in ("self_cpu_time_total",) + (("self_device_time_total",) if cuda else ()):
        print(avg.table(sort_by=key, row_limit=10, max_name_column_width=48))


def sdpa_variants(context: int) -> None:
    """One layer's decode attention at batch 1 over a static cache of ``context`` slots (all filled but the last
    64): transformers' path (K/V repeated per query head, bool mask), the attention alone over K/V repeated
    beforehand, query heads folded into rows (``static_gqa``), and ``enable_gqa`` without a mask over the filled
    length (what a cache without a static shape could call). Medians of ``triton.testing.do_bench`` on the GPU."""
    import torch.nn.functional as F

    q = torch.randn(1, 32, 1, 128, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(1, 8, context, 128, device=DEVICE, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    mask = torch.ones(1, 1, 1, context, device=DEVICE, dtype=torch.bool)
    mask[..., -64:] = False
    n = context - 64
    kr, vr = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
    sdpa = F.scaled_dot_product_attention
    variants = {
        "repeat_kv + mask (transformers)": lambda: sdpa(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                                        attn_mask=mask),
        "attention only, K/V repeated before + mask": lambda: sdpa(q, kr, vr, attn_mask=mask),
        "rows folded + mask (static_gqa)": lambda: sdpa(q.reshape(1, 8, 4, 128), k, v, attn_mask=mask),
        "enable_gqa, no mask, filled length": lambda: sdpa(q, k[:, :, :n], v[:, :, :n], enable_gqa=True),
    }
    want = variants["enable_gqa, no mask, filled length"]().float()
    print(f"\n| one layer, batch 1, {context} slots | ms | largest difference |\n|---|---|---|")
    for name, fn in variants.items():
        err = (fn().reshape(want.shape).float() - want).abs().max().item()
        print(f"| {name} | {bench(fn):.3f} | {err:.1e} |", flush=True)


def bench(fn) -> float:
    if DEVICE == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=200, return_mode="median")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


if __name__ == "__main__":
    main()
