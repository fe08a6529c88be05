"""Kernel benchmark: PackKV decode attention on packed bytes vs the baselines, on one GPU.

    python benchmarks/kernels.py                      # Llama-3.1-8B attention shapes, 4K..128K, batch 1 and 8

Side by side in one run, medians over CUDA-graph replays with the L2 flushed before each (``bench_ms``): kernel
time without host launch overhead, as a compiled decode step under CUDA graphs runs it. The eager time of the
fused op (launch overhead included) is reported beside it.

1. fused PackKV decode attention (``torch.ops.packkv.attention``) vs ``F.scaled_dot_product_attention`` on the
   uncompressed bf16 cache (what users have), with achieved bandwidth over the bytes the kernel reads;
2. the paper's protocol: decompress+mat-vec on packed K (and V) vs ``torch.matmul`` GEMV on the dequantized
   cache, one query per KV head;
3. compression throughput (GB/s of bf16 K+V input) of ``torch.ops.packkv.append_`` on a prefill (eager: ``ops.append``).

Data: ``--data real`` (default) tiles real SmolLM2 K/V (tests/data/smollm2_kv.safetensors: 3 layers x 3 heads x
1024 tokens x 64 channels) into the benchmark's shape, so packs see real structure; ``--data random`` is
Gaussian. Writes ``kernels.json`` and ``kernels.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from packkv.ops import Layout, PackedLayer, PackKVConfig, ops
from packkv.ops.accounting import exact_bytes
from packkv.ops.kernels import attention as attention_module
from packkv.ops.kernels import gluon_matvec, matvec
from packkv.ops.kernels.attention import TILE
from packkv.ops.kernels.attention import attention as attention_kernel
from packkv.ops.kernels.tiles import decode_paths
from packkv.ops.reference import flush_count

REAL_KV = Path(__file__).resolve().parents[1] / "tests" / "data" / "smollm2_kv.safetensors"


def bench_ms(fn, graph: bool = True, reps: int = 100) -> float:
    """Median GPU time of ``fn`` in ms, L2 flushed before each run.

    ``graph``: ``fn`` is captured once in a CUDA graph and replayed, so host launch overhead (either side's) is not
    timed: what a compiled decode step under ``mode="reduce-overhead"`` pays. Otherwise eager launches
    (``triton.testing.do_bench``), which include whatever host time exceeds the GPU time."""
    if torch.cuda.is_available():
        import triton.testing

        if not graph:
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        for _ in range(3):  # compile outside the capture
            fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")  # larger than any L2
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        g.replay()
        for start, end in ev:
            flush.zero_()
            start.record()
            g.replay()
            end.record()
        torch.cuda.synchronize()
        del g
        return sorted(s.elapsed_time(e) for s, e in ev)[reps // 2]
    import torch.utils.benchmark as tb

    return tb.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.2).median * 1e3


def real_source() -> tuple[torch.Tensor, torch.Tensor]:
    """Real K/V as [heads, tokens, 64] (layers stacked as heads), bf16."""
    from safetensors.torch import load_file

    t = load_file(REAL_KV)
    layers = sorted({k.split(".")[0] for k in t})
    return torch.cat([t[f"{name}.k"] for name in layers]), torch.cat([t[f"{name}.v"] for name in layers])


def make_kv(batch: int, length: int, heads: int, dim: int, data: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    if data == "random":
        g = torch.Generator(device="cpu").manual_seed(0)
        k = torch.randn(batch, heads, length, dim, generator=g)
        v = torch.randn(batch, heads, length, dim, generator=g)
        return k.to(device, torch.bfloat16), v.to(device, torch.bfloat16)
    sk, sv = real_source()  # [hs, ls, 64]
    hs, ls, ds = sk.shape
    out = []
    for src in (sk, sv):
        src = src.to(device)
        # Head h, channel group c takes source head (h * (dim // ds) + c) % hs; tokens repeat with an offset per
        # batch row so rows differ. Real channel statistics (outliers, smoothness) are kept.
        parts = [src[(h * (dim // ds) + c) % hs] for h in range(heads) for c in range(dim // ds)]
        x = torch.stack(parts).reshape(heads, dim // ds, ls, ds).permute(0, 2, 1, 3).reshape(heads, ls, dim)
        rows = []
        for b in range(batch):
            idx = (torch.arange(length, device=device) + 97 * b) % ls
            rows.append(x[:, idx])
        out.append(torch.stack(rows).contiguous())
    return out[0], out[1]


def compress(cfg: PackKVConfig, k: torch.Tensor, v: torch.Tensor) -> tuple[PackedLayer, float]:
    """Storage holding k/v (one prefill append), and the time of that append in ms (median of 3)."""
    B, H, L, D = k.shape
    lay = Layout.from_config(cfg, H, D)
    nb = L // cfg.block_size + 1
    pw = B * nb * H * (lay.max_chunk_words(lay.k) + lay.max_chunk_words(lay.v))
    spec = lay.spec()
    times = []
    for _ in range(3):
        st = PackedLayer.empty(lay, B, k.dtype, k.device, nb, pw)
        sync()
        t0 = time.perf_counter()
        ops.append(*st.tensors(), k, v, flush_count(0, L, lay), *spec)  # as the cache calls it
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return st, sorted(times)[1]


def compress_gpu_ms(cfg: PackKVConfig, k: torch.Tensor, v: torch.Tensor) -> float:
    """GPU time of the same prefill append in ms: median over CUDA-graph replays, each from an emptied storage
    (three counter resets, a few us). ``compress``'s eager wall time also counts the host's launch overhead."""
    B, H, L, D = k.shape
    lay = Layout.from_config(cfg, H, D)
    nb = L // cfg.block_size + 1
    st = PackedLayer.empty(lay, B, k.dtype, k.device, nb, B * nb * H * (lay.max_chunk_words(lay.k) + lay.max_chunk_words(lay.v)))
    spec, n_flush = lay.spec(), flush_count(0, L, lay)

    def run() -> None:
        for counter in (st.n_blocks, st.n_win, st.cursor):
            counter.zero_()
        torch.ops.packkv.append_(*st.tensors(), k, v, n_flush, *spec)

    return bench_ms(run, reps=20)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_case(cfg, batch, length, heads, q_heads, dim, data, device, paper: bool) -> dict:
    k, v = make_kv(batch, length, heads, dim, data, device)
    st, t_compress = compress(cfg, k, v)
    lay = st.layout
    spec = lay.spec()
    q = torch.randn(batch, q_heads, 1, dim, device=device, dtype=torch.bfloat16)
    nbytes = exact_bytes(st)
    fp16 = batch * heads * length * dim * 2 * 2
    read = nbytes["compressed"] + nbytes["window"]
    elems = 2 * nbytes["compressed_tokens"] * heads * dim
    row = dict(batch=batch, context=length, heads=heads, q_heads=q_heads, head_dim=dim, data=data,
               bits_per_value=8 * nbytes["compressed"] / max(1, elems),
               payload_bits_per_value=8 * nbytes["payload"] / max(1, elems),
               ratio_compressed=nbytes["fp16_compressed"] / max(1, nbytes["compressed"]),
               ratio_read=fp16 / read, bytes_fp16=fp16, bytes_read=read)  # fmt: skip

    # Which kernel the op runs here (attention.GLUON: by default Gluon where it covers the step, on sm_90).
    use = attention_module.GLUON if attention_module.GLUON is not None else device == "cuda"
    row["attention_kernel"] = "triton"
    if use:
        from packkv.ops.kernels import gluon_attention

        if gluon_attention.supported(q, lay, st.ring_k.dtype, None, False, length) is None:
            row["attention_kernel"] = "gluon"
    # Correctness on this data before timing: the fused op vs SDPA over the decompressed cache.
    out = torch.ops.packkv.attention(q, *st.tensors(), length, None, False, None, *spec)
    kd, vd = torch.ops.packkv.decompress(*st.tensors(), length, *spec)
    ref = F.scaled_dot_product_attention(q.float(), kd.float(), vd.float(), enable_gqa=True)
    row["rel_err_vs_decompressed"] = ((out.float() - ref).norm() / ref.norm()).item()
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
    row["rel_err_vs_exact_cache"] = ((out.float() - exact).norm() / exact.norm()).item()
    del kd, vd

    row["t_sdpa_ms"] = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    row["t_packkv_ms"] = bench_ms(lambda: torch.ops.packkv.attention(q, *st.tensors(), length, None, False, None, *spec))
    row["t_packkv_eager_ms"] = bench_ms(
        lambda: torch.ops.packkv.attention(q, *st.tensors(), length, None, False, None, *spec), graph=False)
    row["speedup_vs_sdpa"] = row["t_sdpa_ms"] / row["t_packkv_ms"]
    row["goal_speedup"] = 0.85 * row["ratio_read"]
    row["packkv_gbps"] = read / row["t_packkv_ms"] / 1e6
    row["sdpa_gbps"] = fp16 / row["t_sdpa_ms"] / 1e6
    row["t_compress_eager_ms"] = t_compress
    row["t_compress_ms"] = compress_gpu_ms(cfg, k, v)
    row["compress_gbps"] = 2 * k.numel() * 2 / row["t_compress_ms"] / 1e6
    row["compress_eager_gbps"] = 2 * k.numel() * 2 / t_compress / 1e6

    if paper:  # one query per KV head, compressed blocks only, as the paper's benchmark
        nb = int(st.n_blocks[0])
        qk = torch.randn(batch, heads, dim, device=device, dtype=torch.bfloat16)
        kdq = matvec.dequantized_blocks(st, "k", nb).to(torch.bfloat16)
        vdq = matvec.dequantized_blocks(st, "v", nb).to(torch.bfloat16)
        w = torch.softmax(torch.randn(batch, heads, nb * lay.block_size, device=device), -1)
        wb = w.to(torch.bfloat16)
        row["t_gemv_k_ms"] = bench_ms(lambda: torch.matmul(kdq, qk[..., None]))
        row["t_matvec_k_ms"] = bench_ms(lambda: matvec.k_matvec(qk, st, nb, False))  # the first (per-value) pair
        row["t_gemv_v_ms"] = bench_ms(lambda: torch.matmul(wb[:, :, None, :], vdq))
        row["t_matvec_v_ms"] = bench_ms(lambda: matvec.v_matvec(w, st, nb, False))
        row["paper_speedup_k"] = row["t_gemv_k_ms"] / row["t_matvec_k_ms"]
        row["paper_speedup_v"] = row["t_gemv_v_ms"] / row["t_matvec_v_ms"]
        # The pair decoded as the attention decodes (matvec.WINDOWS; runs of blocks per program), side by side.
        if matvec.windows_fit(lay, "k") and matvec.windows_fit(lay, "v"):
            ref_k, ref_v = matvec.k_matvec(qk, st, nb, False), matvec.v_matvec(w, st, nb, False)
            got_k, got_v = matvec.k_matvec(qk, st, nb, True), matvec.v_matvec(w, st, nb, True)
            row["matvec_windows_err"] = max(float((got_k - ref_k).abs().max() / ref_k.abs().max()),
                                            float((got_v - ref_v).abs().max() / ref_v.abs().max()))  # fmt: skip
            row["t_matvec_k_windows_ms"] = bench_ms(lambda: matvec.k_matvec(qk, st, nb, True))
            row["t_matvec_v_windows_ms"] = bench_ms(lambda: matvec.v_matvec(w, st, nb, True))
            row["paper_speedup_k_windows"] = row["t_gemv_k_ms"] / row["t_matvec_k_windows_ms"]
            row["paper_speedup_v_windows"] = row["t_gemv_v_ms"] / row["t_matvec_v_windows_ms"]
        # The pair as warp-specialized Gluon kernels (sm_90, ``gluon_matvec``), side by side; its error against the
        # per-value pair, as the windows pair's.
        if device == "cuda" and all(gluon_matvec.supported(lay, s, q.device) is None for s in "kv"):
            got_k, got_v = gluon_matvec.k_matvec(qk, st, nb), gluon_matvec.v_matvec(w, st, nb)
            ref_k, ref_v = matvec.k_matvec(qk, st, nb, False), matvec.v_matvec(w, st, nb, False)
            row["matvec_gluon_err"] = max(float((got_k - ref_k).abs().max() / ref_k.abs().max()),
                                          float((got_v - ref_v).abs().max() / ref_v.abs().max()))  # fmt: skip
            row["t_matvec_k_gluon_ms"] = bench_ms(lambda: gluon_matvec.k_matvec(qk, st, nb))
            row["t_matvec_v_gluon_ms"] = bench_ms(lambda: gluon_matvec.v_matvec(w, st, nb))
            row["paper_speedup_k_gluon"] = row["t_gemv_k_ms"] / row["t_matvec_k_gluon_ms"]
            row["paper_speedup_v_gluon"] = row["t_gemv_v_ms"] / row["t_matvec_v_gluon_ms"]
        del kdq, vdq
    return row


VARIANTS = {  # name -> attention() keyword arguments, each a change from the default ({})
    "v3 (per-value reads, fp32-exact products, tile 32, 2/SM)": dict(
        packwise=False, exact=True, sub_tile=32, maxnreg=None, split_factor=2),
    "default (32-bit windows, paired scan, lane extraction, channel-major tiles, early side loads, next block's fields prefetched, tile 64, maxnreg 128, 1 wave)": {},
    "  splits: the former rule, 8 programs per SM (before 2026-12-04f)": dict(split_factor=8),
    "  2 waves": dict(waves=2),
    "  3 waves": dict(waves=3),
    "  scales, zeros, permutation loaded after the decode (before 2026-12-04f)": dict(early_loads=False),
    # Lane extraction (2026-12-05, untimed): ints of <= 4 bits two per shift from lane-paired windows, tiles and
    # scales in lane order; sm_90 loop 1,053 instructions vs 1,150 in token order and 1,181 without.
    "  no lane extraction: two values per 4-instruction asm block (before 2026-12-05)": dict(lanes=0),
    "  lane extraction with the tiles' rows in token order": dict(lanes=1),
    "  one LOP3 per value instead of two values per asm block (before 2026-12-04f)": dict(pairs=False, lanes=0),
    # 2026-12-05c, untimed: sm_90 loop 1,042 vs 1,069 instructions, 13 spill loads/stores in it (76 vs 44 bytes).
    "  softmax sums and V zeros' terms per token, summed once per split (defer_sums)": dict(defer_sums=True),
    "  token-major tiles (2026-12-04c default)": dict(channel_rows=False),
    "  one pack-start scan per stream (2026-12-04 default)": dict(paired=False, channel_rows=False),
    "  pack-wise extraction with a select per value (2026-12-03)": dict(windows=False, paired=False),
    "  per-value reads": dict(packwise=False),
    "  fp32-exact products": dict(exact=True),
    "  tile 32": dict(sub_tile=32),
    # The register cap sets how many programs an SM holds (64K registers): 128 -> 4 of 4 warps, 96 -> 5, 80 -> 6.
    "  maxnreg 96": dict(maxnreg=96),
    "  maxnreg 80": dict(maxnreg=80),
    "  maxnreg 168": dict(maxnreg=168),
    # The query rows: since 2026-12-04i padded to 4 (Llama's GQA group) and the MMAs' N dimension (K @ q^T,
    # V^T @ P^T; loop 1,319 instructions); before, padded to 16 as the M dimension (1,479), and padded to 4 as the M
    # dimension (1,443; the MMAs pad to 16 anyway). 0.338 / 0.173 vs 0.394 / 0.201 and 0.379 / 0.192 (H200).
    "  query rows as the M dimension, padded to 16 (before 2026-12-04i)": dict(rows_as_n=False, min_rows=16),
    "  query rows as the M dimension, padded to 4": dict(rows_as_n=False, min_rows=1),
    "  query rows as the M dimension, padded to 4, maxnreg 96": dict(rows_as_n=False, min_rows=1, maxnreg=96),
    "  8 warps": dict(num_warps=8),
    "  8 warps, maxnreg 96": dict(num_warps=8, maxnreg=96),
    "  8 warps, maxnreg 64": dict(num_warps=8, maxnreg=64),
    "  num_stages 2 (Triton's software pipelining)": dict(num_stages=2),
    # Paired reductions exist on the rows-as-M path only (on rows_as_n they cost instructions: 1,374 vs 1,319).
    "  rows as M, paired softmax/scale reductions (4 fewer barriers per block)": dict(
        fused_reductions=True, rows_as_n=False, min_rows=16),
    "  no value extraction (wrong results: what the rest costs)": dict(skip_decode=True),
    # What the in-kernel rotations (ops ROTATE_IN_KERNEL) add to the attention; they replace two Inductor kernels
    # of ~4.2 + 2.4 us per layer at batch 1 (04g profile). The cache here is not rotated: the error column is large.
    "  query and output rotated inside the kernels (timing only)": dict(rotate=True),
    "  no prefetch: each block's offsets and fields loaded in its own iteration (before 2026-12-04g)": dict(prefetch=0),
    "  prefetch also the next block's pack bits": dict(prefetch=2),
    "  prefetch also the next block's pack bits, maxnreg 168": dict(prefetch=2, maxnreg=168),
    # A compiled step passes the storage's capacity as out_len: up to 2x the length right after a growth.
    "out_len 2x the length (a compiled step after a growth)": dict(out_len_x=2),
    "  zero keys as softmax tiles, not counted (before 2026-12-04f)": dict(out_len_x=2, zero_count=False, zero_span=False),
    "  splits cut out_len evenly (before 2026-12-04e)": dict(out_len_x=2, balanced=False),
    "  zero keys counted per tile, not in one pass per split (before 2026-12-04h)": dict(out_len_x=2, zero_span=False),
    # The e2e step's case (decode_e2e --profile: out_len 130240 at 64K, a bool row mask).
    "out_len 2x with a decode mask": dict(out_len_x=2, with_mask=True),
    "  zero keys counted per tile, the mask loaded per tile (before 2026-12-04h)": dict(out_len_x=2, with_mask=True, zero_span=False),
    # A compiled decode step passes a bool padding mask [B, 1, 1, out_len] (all True here: same results).
    "with a decode mask, read as one row per tile": dict(with_mask=True),
    "  with a decode mask, read as a [rows, tokens] tile (before 2026-12-04e)": dict(with_mask=True, mask_row=False),
    # The warp-specialized Gluon kernel (gluon_attention.py, sm_90; the op's default there since 2026-12-06): its own
    # launch settings (gluon_attention.MAXNREG, PRODUCER_REGS, PROGRAMS_PER_SM, PRODUCERS); a ValueError row where it
    # does not cover the layout. Every other row is the Triton kernel (gluon=False unless a row says otherwise).
    "Gluon kernel (2 decoding warpgroups + 1 wgmma warpgroup)": dict(gluon=True),
    "  Gluon kernel, out_len 2x with a decode mask": dict(gluon=True, out_len_x=2, with_mask=True),
    # Its split count: by default gluon_attention.WAVES = 2 waves of its 2 programs per SM (the count every timing
    # until 2026-12-06b used); split_factor: that many programs per SM in all.
    "  Gluon kernel, one wave (split_factor=2)": dict(gluon=True, split_factor=2),
    "  Gluon kernel, four waves (split_factor=8)": dict(gluon=True, split_factor=8),
}


SWEEP = {  # launch parameters: tile height x warps x register cap x waves
    f"tile {ts}, {nw} warps, maxnreg {r}, {w} waves": dict(sub_tile=ts, num_warps=nw, maxnreg=r, waves=w)
    for ts in (32, 64) for nw in (4, 8) for r in (64, 96, 128) for w in (1, 2, 4)
}


def variants(cfg, batch, length, heads, q_heads, dim, data, device, table: dict | None = None) -> list[dict]:
    """Kernel variants at one size (value extraction, operand precision, tile, warps, register cap, splits),
    side by side in one run, to pick defaults and show what each change buys."""
    k, v = make_kv(batch, length, heads, dim, data, device)
    st, _ = compress(cfg, k, v)
    q = torch.randn(batch, q_heads, 1, dim, device=device, dtype=torch.bfloat16)
    want = F.scaled_dot_product_attention(q.float(), *[x.float() for x in torch.ops.packkv.decompress(
        *st.tensors(), length, *st.layout.spec())], enable_gqa=True)  # fmt: skip
    rows = [dict(batch=batch, context=length, variant="SDPA bf16 (uncompressed)",
                 t_ms=bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)))]  # fmt: skip
    wants = {1: want}
    for name, kw in (table or VARIANTS).items():
        kw = {"gluon": False, **kw}
        x = kw.pop("out_len_x", 1)
        mask = torch.ones(batch, 1, 1, x * length, dtype=torch.bool, device=device) if kw.pop("with_mask", False) else None
        if x not in wants:  # zero keys past the length count (no mask), as in decompress
            wants[x] = F.scaled_dot_product_attention(q.float(), *[t.float() for t in torch.ops.packkv.decompress(
                *st.tensors(), x * length, *st.layout.spec())], enable_gqa=True)  # fmt: skip
        fn = lambda kw=kw, n=x * length, m=mask: attention_kernel(q, st, n, m, False, None, **kw)  # noqa: E731
        try:
            err = ((fn().float() - wants[x]).norm() / wants[x].norm()).item()
            t = bench_ms(fn)
        except Exception as e:  # a variant that does not compile is reported, not fatal
            t = err = float("nan")
            print(f"variant {name}: {type(e).__name__}: {e}")
        rows.append(dict(batch=batch, context=length, variant=name, t_ms=t, rel_err=err))
        if kw == {"gluon": False} and x == 1 and mask is None:  # eager launches too: the host overhead an uncompiled caller pays
            rows[-1]["t_eager_ms"] = bench_ms(fn, graph=False)
    return rows


COMPRESS_VARIANTS = ((16, 4), (16, 8), (16, 16), (8, 4), (4, 4))  # (quantize, packing) warps per program


def compress_variants(cfg, batch, length, heads, dim, data, device) -> list[dict]:
    """Compression time with other launch widths of the quantize and per-chunk packing kernels (same bytes out)."""
    from packkv.ops.kernels import pack, quantize

    k, v = make_kv(batch, length, heads, dim, data, device)
    want, _ = compress(cfg, k, v)
    saved = quantize.WARPS, pack.WARPS
    rows = []
    try:
        for qw, pw in COMPRESS_VARIANTS:
            quantize.WARPS, pack.WARPS = qw, pw
            st, _ = compress(cfg, k, v)
            t = compress_gpu_ms(cfg, k, v)
            same = torch.equal(st.pool, want.pool) and torch.equal(st.k_meta, want.k_meta)
            rows.append(dict(batch=batch, context=length, quantize_warps=qw, pack_warps=pw, t_compress_ms=t,
                             compress_gbps=2 * k.numel() * 2 / t / 1e6, same_bytes=same))  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    finally:
        quantize.WARPS, pack.WARPS = saved
    return rows


def profile(cfg, batch, length, heads, q_heads, dim, data) -> None:
    """torch.profiler tables of one compression (prefill append) and one fused attention call."""
    from torch.profiler import ProfilerActivity, profile as prof

    k, v = make_kv(batch, length, heads, dim, data, "cuda")
    compress(cfg, k, v)  # warm up kernels
    st, _ = compress(cfg, k, v)
    lay = st.layout
    spec = lay.spec()
    q = torch.randn(batch, q_heads, 1, dim, device="cuda", dtype=torch.bfloat16)
    with prof(activities=[ProfilerActivity.CUDA]) as p1:
        compress(cfg, k, v)
    print(p1.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    with prof(activities=[ProfilerActivity.CUDA]) as p2:
        for _ in range(10):
            torch.ops.packkv.attention(q, *st.tensors(), length, None, False, None, *spec)
        sync()
    print(p2.key_averages().table(sort_by="cuda_time_total", row_limit=6, max_name_column_width=60))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for b in sorted({r["batch"] for r in rows}):
        rs = [r for r in rows if r["batch"] == b]
        ctx = [r["context"] // 1024 for r in rs]
        axes[0].plot(ctx, [r["t_sdpa_ms"] for r in rs], "o--", label=f"SDPA bf16, batch {b}")
        axes[0].plot(ctx, [r["t_packkv_ms"] for r in rs], "o-", label=f"PackKV fused, batch {b}")
        axes[1].plot(ctx, [r["speedup_vs_sdpa"] for r in rs], "o-", label=f"speedup, batch {b}")
        axes[1].plot(ctx, [r["goal_speedup"] for r in rs], ":", label=f"goal 0.85 x ratio, batch {b}")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (K tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("decode attention time per layer (ms)")
    axes[1].set_ylabel("speedup over SDPA")
    fig.suptitle("PackKV fused decode attention vs SDPA (Llama-3.1-8B attention shapes, bf16)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--heads", type=int, default=8, help="KV heads (Llama-3.1-8B: 8)")
    p.add_argument("--q-heads", type=int, default=32, help="query heads (Llama-3.1-8B: 32)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--k-rel", type=float, default=0.1)
    p.add_argument("--v-rel", type=float, default=0.2)
    p.add_argument("--pack-size", type=int, default=16, choices=(8, 16, 32),
                   help="e.g. 32, or --k-rel 0.05: packs wider than 64 bits, decoded as halves")
    p.add_argument("--rotation", choices=("none", "hadamard"), default="none",
                   help="the paper's setting has none; the library default is hadamard (two small matmuls per call)")
    p.add_argument("--data", choices=("real", "random"), default="real")
    p.add_argument("--variants", action="store_true", help="also compare kernel variants (B8/32K, B1/128K)")
    p.add_argument("--variants-only", action="store_true", help="only the variant comparison")
    p.add_argument("--sweep", action="store_true", help="variants: add the launch-parameter grid")
    p.add_argument("--variant-filter", help="only the variants whose name matches this regex (and the default)")
    p.add_argument("--variant-sizes", default="8x32768,1x131072", help="batch x context list for variants")
    p.add_argument("--profile", action="store_true", help="print where compression and attention spend GPU time")
    p.add_argument("--compress-variants", action="store_true",
                   help="also time compression at other kernel launch widths (at --variant-sizes)")
    p.add_argument("--triton", action="store_true",
                   help="the main table's PackKV column on the Triton kernel even where the Gluon kernel applies "
                        "(attention.GLUON = False; by default the op takes Gluon on sm_90)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kernels")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = PackKVConfig(k_rel=args.k_rel, v_rel=args.v_rel, rotation=args.rotation, pack_size=args.pack_size)
    lay = Layout.from_config(cfg, args.heads, args.head_dim)
    paths = decode_paths(cfg.pack_size, args.head_dim, min(max(TILE, cfg.pack_size), cfg.block_size), lay.k.qbits,
                         lay.v.qbits)  # fmt: skip
    print(f"{lay.k.qbits}-bit K / {lay.v.qbits}-bit V ints in packs of {cfg.pack_size}: decoded as {paths[0]} / "
          f"{paths[1]} (tiles.decode_paths)", flush=True)
    if args.triton:
        attention_module.GLUON = False
        print("PackKV column: the Triton kernel (attention.GLUON = False)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.variants_only:
        args.batches, args.variants = [], True
    for b in args.batches:
        for L in args.contexts:
            row = run_case(cfg, b, L, args.heads, args.q_heads, args.head_dim, args.data, device, paper=True)
            rows.append(row)
            print(json.dumps({k: (round(x, 4) if isinstance(x, float) else x) for k, x in row.items()}), flush=True)
            torch.cuda.empty_cache() if device == "cuda" else None

    def save(var: list[dict]) -> None:  # after the main rows and again after the variants: a partial run keeps data
        result = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                      config=json.loads(cfg.to_json()), decode_paths=paths, torch=torch.__version__, rows=rows,
                      variants=var)  # fmt: skip
        (args.out / ("kernels.json" if rows else "variants.json")).write_text(json.dumps(result, indent=1))

    if rows:
        save([])
        plot(rows, args.out / "kernels.png")
        print(table(rows), flush=True)
    if args.profile and device == "cuda":
        profile(cfg, 8, 32768, args.heads, args.q_heads, args.head_dim, args.data)
    if args.compress_variants:
        cvar = []
        for size in args.variant_sizes.split(","):
            b, c = (int(x) for x in size.split("x"))
            cvar += compress_variants(cfg, b, c, args.heads, args.head_dim, args.data, device)
        (args.out / "compress_variants.json").write_text(json.dumps(cvar, indent=1))
        print("\n| batch x context | quantize warps | packing warps | compress ms (GPU) | GB/s | same bytes |")
        print("|---|---|---|---|---|---|")
        for r in cvar:
            print(f"| {r['batch']} x {r['context'] // 1024}K | {r['quantize_warps']} | {r['pack_warps']} | "
                  f"{r['t_compress_ms']:.2f} | {r['compress_gbps']:.0f} | {r['same_bytes']} |")  # fmt: skip
    var = []
    if args.variants:
        for size in args.variant_sizes.split(","):
            b, c = (int(x) for x in size.split("x"))
            chosen = VARIANTS | (SWEEP if args.sweep else {})
            if args.variant_filter:  # the default row always stays: the others are read against it
                chosen = {k: v for k, v in chosen.items() if not v or re.search(args.variant_filter, k)}
            var += variants(cfg, b, c, args.heads, args.q_heads, args.head_dim, args.data, device, chosen)
            torch.cuda.empty_cache() if device == "cuda" else None
        save(var)
    if var:
        print("\n| variant | " + " | ".join(f"B{b}/{c // 1024}K ms (err)" for b, c in dict.fromkeys((r["batch"], r["context"]) for r in var)) + " |")
        for name in dict.fromkeys(r["variant"] for r in var):
            cells = [f"{r['t_ms']:.3f} ({r.get('rel_err', 0):.0e})" for r in var if r["variant"] == name]
            print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


def table(rows: list[dict]) -> str:
    head = ("| batch | context | bits/value | ratio read | SDPA ms | PackKV kernel | PackKV ms | speedup | goal | PackKV GB/s | PackKV eager ms | "
            "GEMV K / ours | GEMV V / ours | same, windows pair | same, Gluon pair | compress GB/s (GPU / eager) | rel. err |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['context'] // 1024}K | {r['bits_per_value']:.2f} | {r['ratio_read']:.2f}x | "
            f"{r['t_sdpa_ms']:.3f} | {r.get('attention_kernel', '?')} | {r['t_packkv_ms']:.3f} | {r['speedup_vs_sdpa']:.2f}x | {r['goal_speedup']:.2f}x | "
            f"{r['packkv_gbps']:.0f} | {r.get('t_packkv_eager_ms', math.nan):.3f} | {r.get('paper_speedup_k', math.nan):.2f}x | {r.get('paper_speedup_v', math.nan):.2f}x | "
            f"{r.get('paper_speedup_k_windows', math.nan):.2f}x / {r.get('paper_speedup_v_windows', math.nan):.2f}x | "
            f"{r.get('paper_speedup_k_gluon', math.nan):.2f}x / {r.get('paper_speedup_v_gluon', math.nan):.2f}x | "
            f"{r['compress_gbps']:.0f} / {r.get('compress_eager_gbps', math.nan):.0f} | {r['rel_err_vs_decompressed']:.1e} |"
        )  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
