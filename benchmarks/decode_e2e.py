"""End-to-end decode benchmark: ``packkv.compile(model)`` vs transformers' compiled static cache.

    python benchmarks/decode_e2e.py                # Llama-3.1-8B shapes, random bf16 weights, one GPU
    python benchmarks/decode_e2e.py --shape llama-3.2-1b   # head_dim 64 (Llama-3.2-1B: 16 layers, 32 / 8 heads)

A Llama-architecture model with random weights (32 layers, 32 query / 8 KV heads, head_dim 128, hidden 4096;
``--shape llama-3.2-1b``: 16 layers, 32 / 8 heads, head_dim 64, hidden 2048)
decodes after a prompt of each context length, side by side in one run:

* ``static``: transformers ``StaticCache`` (bf16), forward compiled with ``mode="reduce-overhead"`` (CUDA
  graphs), SDPA attention: the path users have;
* ``packkv``: ``packkv.compile(model)`` (packed cache, fused attention in the compiled step, CUDA graphs; the
  decode steps' attention on the warp-specialized Gluon kernel on sm_90, on the Triton kernel elsewhere);
* ``weights``: the static cache at a 1K context: the cost of reading the weights alone;
* ``static_gqa`` (with ``--paths ... static_gqa``): the static cache again, its decode steps' attention reading each KV
  head once (``static_gqa.py``: query heads folded into rows) instead of transformers' SDPA path, which copies K and
  V per query head under a mask: the static cache with the best attention PyTorch's SDPA gives it;
* ``packkv_triton`` (with ``--paths ... packkv_triton``): ``packkv`` again, retraced with the decode steps' attention
  on the Triton kernel (``attention.GLUON = False``), so both kernels' rows come from one run;
* ``packkv_unfused`` (with ``--paths ... packkv_unfused``): ``packkv`` again, retraced with each decode step's append a
  kernel of its own (``inductor.backend.FUSE_APPENDS = False``; on: the append runs in the attention's merge);
* ``quantized`` (with ``--paths ... quantized``): transformers' ``QuantizedCache`` (``optimum-quanto`` backend,
  ``--quantized-nbits``, residual window 128), eager: it re-quantizes and dequantizes in Python every step and is
  not compilable with ``fullgraph``. Needs ``pip install optimum-quanto`` (not a project dependency; on a machine
  without network, carry its wheel and ninja's).

With ``--budget-gib G`` each path also runs at the largest batch whose cache (allocated capacity, scaled from its
batch-1 row, or from a batch-1 prefill when ``--contexts`` has no such row) fits G GiB beside the weights and
``--budget-headroom-gib`` of activations, at ``--budget-contexts``: context x batch and total tokens/s at a fixed
memory budget. The budget rows alone (one compile fewer per path):
``python benchmarks/decode_e2e.py --contexts --budget-gib 40 --budget-contexts 32768``.

Prompts are filled by chunked prefill; decode steps are timed with CUDA events after warm-up (medians over
steps). One PackKV step in ``block_size`` compresses a block in every layer (eagerly, before its graph:
``PackKVLayer.flush_ahead``; until 2026-12-07g a graph of its own, whose first plain step after it took 1.2 s at
128K): PackKV's warm-up runs through two of them, its timed steps are plain ones, and the next compressing step and
the plain step after it are timed after them (``compress_step_ms``, ``after_compress_step_ms``), with
``amortized_step_ms`` the mean step over a block of tokens. Peak memory is ``torch.cuda.max_memory_allocated`` during decode. Writes ``decode_e2e.json`` and
``decode_e2e.png``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch

import packkv
from packkv.inductor import stats

if __package__:  # imported as benchmarks.decode_e2e (the tests)
    from . import static_gqa
else:  # run as a script, benchmarks/ on the path
    import static_gqa

LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                max_position_embeddings=262144)  # fmt: skip
# head_dim 64, as Llama-3.2-1B / SmolLM2 / Qwen2.5-0.5B have (the Gluon kernel's 2-warp decoding partitions)
LLAMA_1B = dict(LLAMA_8B, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, head_dim=64,
                tie_word_embeddings=True)  # fmt: skip
SHAPES = {"llama-3.1-8b": LLAMA_8B, "llama-3.2-1b": LLAMA_1B}
TITLES = {"llama-3.1-8b": "Llama-3.1-8B", "llama-3.2-1b": "Llama-3.2-1B"}


def build_model(layers: int | None, small: bool, device: str, shape_name: str = "llama-3.1-8b"):
    """A Llama-architecture model with random weights of the named shapes (``layers``: fewer layers, or ``None``
    for the shape's own count)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(SHAPES[shape_name])
    if layers is not None:
        shape["num_hidden_layers"] = layers
    if small:  # CPU smoke test
        shape.update(vocab_size=512, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=64)  # fmt: skip
    cfg = LlamaConfig(**shape)
    cfg._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def compile_kwargs(mode: str | None, guard_filter: bool) -> dict:
    """``torch.compile`` arguments for both paths. A guard filter travels in ``options``, which excludes ``mode``:
    the mode's options are spelled out instead."""
    if not guard_filter:
        return dict(mode=mode)
    from torch._inductor import list_mode_options

    opts = dict(list_mode_options(mode)) if mode else {}
    return dict(options=dict(opts, guard_filter_fn=torch.compiler.skip_guard_on_all_nn_modules_unsafe))


# After the timed steps, PIPELINED_ROUNDS rounds of PIPELINED_STEPS steps with no wait between them (``decode``).
PIPELINED_ROUNDS, PIPELINED_STEPS = 5, 8
PIPELINED_TOKENS = PIPELINED_ROUNDS * PIPELINED_STEPS
# Positions each cache holds past its timed steps: the pipelined ones, the profiled ones (3 + 10 with --profile)
# and a margin.
SLACK = PIPELINED_TOKENS + 24
# PackKV's further positions, in blocks: the warm-up's two compressing steps, the timed one and the step after it.
PACKKV_EXTRA_BLOCKS = 4

# --gc-freeze: after each path's warm-up, every object alive is moved out of the garbage collector's generations
# (as serving stacks do after capturing CUDA graphs), for both paths alike.
GC_FREEZE = False


def timer(device: str):
    if device == "cuda":
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        return lambda: (e.record(), torch.cuda.synchronize(), s.elapsed_time(e))[-1]
    t0 = time.perf_counter()
    return lambda: (time.perf_counter() - t0) * 1e3


@torch.no_grad()
def prefill(model, ids: torch.Tensor, cache, chunk: int) -> None:
    for i in range(0, ids.shape[1], chunk):
        model(ids[:, i : i + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)


class StepTimes(list):
    """Per-step times (ms, CUDA events around the call and its GPU work, waited for after each step) and ``host``:
    the host's time (ms) from the call until its graph is launched. After the previous step's wait the GPU is idle,
    so a compiled step's host prelude (guards, the graph's Python, the CUDA graph launch) is in its step time as
    well. The static cache's call returns once its graph is launched; PackKV's goes on to ``verify_step`` (which
    queues the read-back of the step's counters): its launch is the moment ``verify_step`` starts
    (``LaunchMarks``), and ``after`` is what the call spends from there until it returns. ``pipelined``: ms per
    step of rounds of steps with no wait between them (the host queues each step while the GPU runs the one
    before, as a serving loop does, so the host prelude overlaps the GPU's work)."""

    host: list[float]
    after: list[float]
    pipelined: list[float]


class LaunchMarks(list):
    """Host clock readings taken as a PackKV cache's ``verify_step`` starts, i.e. once the step's graph is launched."""

    def watch(self, cache) -> None:
        verify = cache.verify_step

        def marked(new_tokens: int) -> None:
            self.append(time.perf_counter())
            verify(new_tokens)

        cache.verify_step = marked


@torch.no_grad()
def decode(step, model, cache, batch: int, start: int, steps: int, warmup: int, device: str,
           pad_to: int = 0, marks: LaunchMarks | None = None, pipelined: bool = False) -> StepTimes:  # fmt: skip
    """Per-step times (ms) of `steps` decode steps (random next tokens) after `warmup` steps, each waited for,
    then (``pipelined``) ``PIPELINED_ROUNDS`` rounds of ``PIPELINED_STEPS`` steps not waited for one by one.
    ``pad_to`` pads the 2-D mask to the static cache's length, as generate does for static caches (same shapes every
    step). ``marks``: the launch marks of a PackKV cache (``StepTimes``)."""
    times, t0, frozen = StepTimes(), time.perf_counter(), False
    times.host, times.after, times.pipelined = [], [], []
    mask = torch.ones(batch, start, dtype=torch.long, device=device)

    def inputs(t: int) -> dict:  # the step after ``t`` earlier ones (its inputs queued on the device)
        nonlocal mask
        tok = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
        mask = torch.cat([mask, mask.new_ones(batch, 1)], 1)
        pos = torch.full((batch, 1), start + t, device=device, dtype=torch.long)
        m = torch.nn.functional.pad(mask, (0, pad_to - mask.shape[1])) if pad_to else mask
        return dict(input_ids=tok, attention_mask=m, position_ids=pos, past_key_values=cache, use_cache=True,
                    logits_to_keep=1)  # fmt: skip

    for t in range(warmup + steps):
        kw = inputs(t)
        stop = timer(device)
        if marks is not None:
            marks.clear()
        h0 = time.perf_counter()
        step(**kw)
        h1 = time.perf_counter()
        launched = marks[-1] if marks else h1
        ms = stop()
        if t >= warmup:
            times.append(ms)
            times.host.append((launched - h0) * 1e3)
            times.after.append((h1 - launched) * 1e3)
        elif t == warmup - 1:
            print(f"  warm-up (compile, CUDA graphs) {time.perf_counter() - t0:.1f} s", flush=True)
        if t == warmup - 1 and GC_FREEZE:  # the compiles' objects out of the collector's way while timing
            gc.collect()
            gc.freeze()
            frozen = True
    for r in range(PIPELINED_ROUNDS if pipelined else 0):
        stop = timer(device)
        for t in range(warmup + steps + r * PIPELINED_STEPS, warmup + steps + (r + 1) * PIPELINED_STEPS):
            step(**inputs(t))
        times.pipelined.append(stop() / PIPELINED_STEPS)
    if frozen:
        gc.unfreeze()
    return times


def run_static(model, batch, context, steps, warmup, device, chunk, compiled, profile: bool = False) -> dict:
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=context + warmup + steps + SLACK)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
    t0 = time.perf_counter()
    prefill(model, ids, cache, chunk)
    print(f"static {context}: prefill {time.perf_counter() - t0:.1f} s", flush=True)
    reset_peak(device)
    times = decode(compiled, model, cache, batch, context, steps, warmup, device, pad_to=cache.get_max_length(),
                   pipelined=True)
    row = dict(result("static", batch, context, times, device), cache_alloc_bytes=allocated_bytes(cache))
    if profile and device == "cuda":  # kernels and host per step (the 64K step's target: 1.15x the 1K row's)
        row.update(profile_steps(compiled, model, cache, batch, context + warmup + steps + PIPELINED_TOKENS, device,
                                 cache.get_max_length()))
    return row


def run_quantized(model, batch, context, steps, warmup, device, chunk, nbits) -> dict:
    from transformers import QuantizedCache

    cache = QuantizedCache(backend="quanto", config=model.config, nbits=nbits, residual_length=128)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
    t0 = time.perf_counter()
    prefill(model, ids, cache, chunk)
    print(f"quantized {context}: prefill {time.perf_counter() - t0:.1f} s", flush=True)
    reset_peak(device)
    times = decode(model.__call__, model, cache, batch, context, steps, warmup, device, pipelined=True)
    return dict(result("quantized", batch, context, times, device), nbits=nbits)


def run_packkv(model, batch, context, steps, warmup, device, chunk, cfg, profile: bool = False,
               step_plan: bool = True, capacity_x: float = 1.0) -> dict:
    cache = packkv.PackKVCache(cfg, model=model)
    cache.compiled = True
    if not step_plan:  # the layers' own path: each compiled step reads (and guards) 32 layer objects
        cache._step_plan = lambda token_capacity: None
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
    t0 = time.perf_counter()
    prefill(model, ids, cache, chunk)
    print(f"packkv {context}: prefill {time.perf_counter() - t0:.1f} s", flush=True)
    # No storage growth (and no recompile) while timing. capacity_x 2: the capacity right after a growth (attention
    # then runs over out_len = the capacity, twice the length).
    block = cfg.block_size
    cache.reserve(int(capacity_x * context) + warmup + steps + SLACK + PACKKV_EXTRA_BLOCKS * block)
    reset_peak(device)
    graphs = stats["graphs"]
    marks = LaunchMarks()
    marks.watch(cache)
    # A step that compresses a block (one in `block_size`) first compresses it eagerly (its kernels' first launch
    # compiles them; until the flush moved out of the graph it was a second graph, and the first plain step after
    # it took 1.2 s at 128K on the H100): warm up through two of them and the steps after each, so the timed steps
    # replay, and compress nothing.
    warm = max(warmup, steps_to_compress(cache) + block + 2)
    times = decode(model.__call__, model, cache, batch, context, steps, warm, device, marks=marks, pipelined=True)
    row = result("packkv", batch, context, times, device)
    # Then the next compressing step and the plain step after it, waited for like the timed ones (the plain steps
    # before them untimed): a generation pays the pair once per `block_size` tokens.
    pos = context + warm + steps + PIPELINED_ROUNDS * PIPELINED_STEPS
    n = steps_to_compress(cache) + 1
    comp, after = decode(model.__call__, model, cache, batch, pos, n, 0, device)[-2:]
    pos += n
    row.update(compress_step_ms=comp, after_compress_step_ms=after,
               amortized_step_ms=((block - 2) * row["step_ms"] + comp + after) / block)  # fmt: skip
    if profile and device == "cuda":
        row.update(profile_steps(model.__call__, model, cache, batch, pos, device))
    n = cache.nbytes()
    row.update(cache_bytes=n["compressed"] + n["window"], cache_alloc_bytes=allocated_bytes(cache), cache_fp16_bytes=n["fp16_compressed"] + n["fp16_window"],
               graphs_compiled=stats["graphs"] - graphs, graph_flushes=bool(cache.graph_flushes))  # fmt: skip
    return row


def steps_to_compress(cache) -> int:
    """Decode steps (of one token, every sequence the same length) until and including the next one that
    compresses a block in every layer: the step whose token overflows the ring (``reference.flush_count``)."""
    cfg = cache.config
    return cfg.window + cfg.block_size - cache.layers[0].n_win


def profile_steps(step, model, cache, batch: int, start: int, device: str, pad_to: int = 0) -> dict:
    """Where three more compiled steps spend GPU time, by kernel, and the host meanwhile (printed). Returns the
    kernels' time per step (``kernel_ms``): the step's time minus it is what no kernel covers (host work between
    the step's start and its graph, and the profiler's own cost)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile as prof

    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        t = decode(step, model, cache, batch, start, 3, 0, device, pad_to=pad_to)
    ka = p.key_averages()
    print(ka.table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=70), flush=True)
    print(ka.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70), flush=True)
    busy = sum(e.self_device_time_total for e in ka if e.device_type == DeviceType.CUDA) / 1e3 / 3  # kernels only
    launches = sum(e.count for e in ka if e.device_type == DeviceType.CUDA) / 3  # CUDA-graph nodes, ~
    print(f"per step: {statistics.median(t):.2f} ms measured, {busy:.2f} ms of kernels ({launches:.0f} kernels): "
          f"{statistics.median(t) - busy:.2f} ms with no kernel running", flush=True)
    launch_details(p)
    host_functions(step, model, cache, batch, start + 3, device, pad_to)
    return dict(kernel_ms=busy, profiled_step_ms=statistics.median(t))


def host_functions(step, model, cache, batch: int, start: int, device: str, pad_to: int = 0, steps: int = 10) -> None:
    """The host's Python per step, by function (cProfile over ``steps`` more steps, its own cost included): where a
    path's host time before its graph launch goes (guards and the launch itself are C++ inside the callers)."""
    import cProfile
    import pstats

    with cProfile.Profile() as pr:
        decode(step, model, cache, batch, start, steps, 0, device, pad_to=pad_to)
    stats = pstats.Stats(pr).stats
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:25]
    print(f"host functions per step (cProfile over {steps} steps; us per step): self | with callees | calls | function")
    for (file, line, name), (_, calls, self_s, cum_s, _) in top:
        where = f"{'/'.join(Path(file).parts[-2:])}:{line}" if line else file
        print(f"  {self_s / steps * 1e6:8.1f} | {cum_s / steps * 1e6:9.1f} | {calls / steps:6.1f} | {name} ({where})")
    print(flush=True)


def launch_details(p) -> None:
    """Grid, block and registers of the PackKV kernels in a profile (from its trace): a compiled launch that differs
    from the kernel benchmark's (another register count, so another number of programs per SM) shows here."""
    import json
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        p.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    seen: dict = {}
    for e in events:
        if e.get("cat") == "kernel" and any(k in e.get("name", "") for k in ("attention", "merge", "append", "token")):
            a = e.get("args", {})
            key = (e["name"][:60], str(a.get("grid")), str(a.get("block")), a.get("registers per thread"))
            seen.setdefault(key, []).append(e.get("dur", 0))
    for (name, grid, block, regs), durs in seen.items():
        print(f"  {name}: grid {grid}, block {block}, {regs} registers, {len(durs)} launches, median "
              f"{statistics.median(durs):.1f} us", flush=True)


def allocated_bytes(cache) -> int:
    """Bytes of the tensors a cache holds (its capacity, not only what is filled): what a memory budget pays."""
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "storage"):  # PackKV: the packed storage at its current capacity
            ts = layer.storage.tensors() if layer.is_initialized else ()
        else:  # StaticCache: the preallocated K/V buffers
            ts = [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if torch.is_tensor(t)]
        total += sum(t.numel() * t.element_size() for t in ts)
    return total


@torch.no_grad()
def sized_alloc_bytes(name: str, model, context: int, args, device: str) -> int:
    """A batch-1 cache's allocated bytes at ``context`` (as the timed row would hold them), without decoding:
    a budget run then needs no compile of its batch-1 step. Static: the preallocated buffers (one token
    allocates them); PackKV: a full prefill (the packed size depends on the data) and the same reservation."""
    from transformers import StaticCache

    extra = args.warmup + args.steps + SLACK
    if name == "static":
        cache = StaticCache(config=model.config, max_cache_len=context + extra)
        model(torch.zeros(1, 1, dtype=torch.long, device=device), past_key_values=cache, use_cache=True, logits_to_keep=1)
    else:
        cache = packkv.PackKVCache(model.packkv_config, model=model)
        prefill(model, torch.randint(0, model.config.vocab_size, (1, context), device=device), cache, args.chunk)
        cache.reserve(context + extra + PACKKV_EXTRA_BLOCKS * model.packkv_config.block_size)
    return allocated_bytes(cache)


def budget_batch(row: dict, budget_gib: float, headroom_gib: float, weights_bytes: int) -> int:
    """The largest batch whose caches fit ``budget_gib`` beside the weights and ``headroom_gib`` of activations,
    scaling the batch-1 run's allocated cache bytes (capacity included) linearly."""
    room = (budget_gib - headroom_gib) * 2**30 - weights_bytes
    return max(1, int(room // row["cache_alloc_bytes"]))


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def result(name, batch, context, times: StepTimes, device) -> dict:
    # Every step's time too: whether a slow median is every step or some of them (GC, a host hiccup).
    med = statistics.median(times)
    pipe = statistics.median(times.pipelined) if times.pipelined else float("nan")
    return dict(path=name, batch=batch, context=context, step_ms=med, tokens_per_s=batch * 1e3 / med,
                pipelined_step_ms=pipe, pipelined_tokens_per_s=batch * 1e3 / pipe,
                host_ms=statistics.median(times.host), after_launch_ms=statistics.median(times.after),
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan"),
                step_times_ms=[round(t, 3) for t in times], pipelined_times_ms=[round(t, 3) for t in times.pipelined])  # fmt: skip


def kilo(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens >= 1024 else str(tokens)


def plot(rows: list[dict], path: Path, title: str = "Llama-3.1-8B") -> None:
    """Batch-1 tokens/s against context (left) and, with a budget, total tokens/s at each path's batch (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = [r for r in rows if r["path"].endswith("_budget")]
    fig, axes = plt.subplots(1, 2 if budget else 1, figsize=(11 if budget else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    for name in ("static", "static_gqa", "packkv", "packkv_triton", "packkv_unfused", "quantized"):
        rs = [r for r in rows if r["path"] == name and r["batch"] == 1]
        if rs:
            ax.plot([r["context"] / 1024 for r in rs], [r["tokens_per_s"] for r in rs], "o-", label=name)
    w = [r for r in rows if r["path"] == "weights"]
    if w:
        ax.axhline(w[0]["tokens_per_s"], ls=":", color="gray", label="1K context (weights only)")
    if any(r["path"] != "weights" and not r["path"].endswith("_budget") for r in rows):
        ax.set_xscale("log", base=2)
    ax.set_xlabel("context (K tokens)")
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{title} shapes, random bf16 weights, compiled decode")
    if budget:
        bx = axes[0][1]
        labels = [f"{r['path'].removesuffix('_budget')}\n{kilo(r['context'])} x {r['batch']}" for r in budget]
        bx.bar(labels, [r["tokens_per_s"] for r in budget], color=["C0" if "static" in r["path"] else "C1" for r in budget])
        bx.set_ylabel("total decode tokens/s")
        bx.set_title(f"at a {budget[0]['budget_gib']:g} GiB memory budget")
        bx.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# A retraced PackKV variant: the same compiled model traced again with one switch flipped, so that its rows and the
# ``packkv`` rows come from one run.
RETRACE_SWITCHES = {
    "packkv_triton": ("packkv.ops.kernels.attention", "GLUON", False),  # the decode steps' attention on Triton
    "packkv_unfused": ("packkv.inductor.backend", "FUSE_APPENDS", False),  # each step's append a kernel of its own
}


def retraced_packkv_rows(model, args, variant: str) -> list[dict]:
    import importlib

    from torch._inductor import config as inductor_config

    module, name, value = RETRACE_SWITCHES[variant]
    mod = importlib.import_module(module)
    # The switch is read when the step is traced. Before the PackKV backend keyed Inductor's caches on the switches
    # (inductor/cache_key.py) a retrace replayed the first kernel's code (2026-12-06: 64 Triton launches logged, none
    # on Gluon); caches stay off here so that the retrace is a fresh compile (a cache-replayed graph ran the Triton
    # kernel slower, NOTES 2026-12-06).
    was, caches_were = getattr(mod, name), inductor_config.force_disable_caches
    setattr(mod, name, value)
    inductor_config.force_disable_caches = True
    torch._dynamo.reset()
    rows = []
    try:
        for ctx in args.contexts:
            row = run_packkv(model, args.batch, ctx, args.steps, args.warmup, model.device.type, args.chunk,
                             model.packkv_config, args.profile, args.step_plan, args.capacity_x)  # fmt: skip
            rows.append(dict(row, path=variant))
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    finally:
        setattr(mod, name, was)
        inductor_config.force_disable_caches = caches_were
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="*", default=[8192, 32768, 65536, 131072],
                   help="batch-1 rows; none (a bare --contexts) with --budget-gib runs the budget rows alone")
    p.add_argument("--static-contexts", type=int, nargs="*", default=None,
                   help="the static cache's rows (default: --contexts); none (a bare flag): only its 1K weights row, "
                        "for a short run that compares PackKV's steps with the weights-only step")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b",
                   help="the model's shapes (random weights): llama-3.2-1b has head_dim 64")
    p.add_argument("--layers", type=int, default=None, help="layers (default: the shape's, 32 / 16)")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--chunk", type=int, default=8192, help="prefill chunk (tokens)")
    p.add_argument("--small", action="store_true", help="tiny model (CPU smoke test)")
    p.add_argument("--paths", nargs="+",
                   choices=["static", "static_gqa", "packkv", "packkv_triton", "packkv_unfused", "quantized"],
                   default=["static", "packkv"],
                   help="packkv_triton: PackKV again, its decode steps' attention on the Triton kernel (as --triton), "
                        "recompiled, after the packkv rows: both kernels side by side in one run; packkv_unfused: the "
                        "same with each step's append a kernel of its own (as --no-fuse-append); static_gqa: the "
                        "static cache with decode attention that reads each KV head once (benchmarks/static_gqa.py)")
    p.add_argument("--quantized-nbits", type=int, choices=[2, 4], default=4, help="QuantizedCache bits (quanto)")
    p.add_argument("--budget-gib", type=float, default=0,
                   help="also run each path at the largest batch this GPU-memory budget fits (e.g. 80)")
    p.add_argument("--budget-contexts", type=int, nargs="+", default=[32768],
                   help="contexts of the budget rows (a batch-1 row at the same context sizes the batch; without one, "
                        "a batch-1 prefill does)")
    p.add_argument("--budget-headroom-gib", type=float, default=6, help="activations and workspace inside the budget")
    p.add_argument("--profile", action="store_true",
                   help="print the GPU kernels of three more decode steps of each PackKV row and of the static path's "
                        "1K (weights) row, and record their kernel time per step (kernel_ms)")
    p.add_argument("--guard-filter", action="store_true",
                   help="both paths: skip Dynamo's guards on nn.Module attributes (sound only if the model's modules "
                        "are not mutated between steps); benchmarks/guard_overhead.py measures the guard check it saves")
    p.add_argument("--no-step-plan", dest="step_plan", action="store_false",
                   help="PackKV: compiled steps read each layer object, not the shared step plan (models/step_plan.py)")
    p.add_argument("--capacity-x", type=float, default=1.0,
                   help="PackKV: reserve this many times the context (2: as right after a storage growth)")
    p.add_argument("--rotate-around-kernel", action="store_true",
                   help="PackKV: the query/output rotations as Inductor kernels around the attention op, not inside "
                        "its kernels (attention.ROTATE_IN_KERNEL=False; before 2026-12-04h)")
    p.add_argument("--rows-as-16", action="store_true",
                   help="PackKV: the attention's query rows padded to 16 and as the products' M dimension "
                        "(attention.MIN_ROWS=16, ROWS_AS_N=False; before 2026-12-04i)")
    p.add_argument("--triton", action="store_true",
                   help="PackKV: the decode steps' attention on the Triton kernel even where the warp-specialized "
                        "Gluon kernel applies (attention.GLUON = False; it applies on sm_90, default layout, head_dim 128)")
    p.add_argument("--no-fuse-append", action="store_true",
                   help="PackKV: keep each decode step's append a kernel of its own (inductor.backend.FUSE_APPENDS "
                        "off; on: the append runs in the attention's merge on sm_90, kernels/fused_append.py)")
    p.add_argument("--eager-flushes", action="store_true",
                   help="PackKV: the flushes ahead of compressing steps launched eagerly from Python, 32 layers' worth "
                        "of host launches once per block_size steps (PackKVCache.graph_flushes off; on, the default: "
                        "replayed from one CUDA graph)")
    p.add_argument("--watchdog", type=float, default=0, help="dump Python stacks every N s (diagnosing stalls)")
    p.add_argument("--gc-freeze", action="store_true",
                   help="every path: gc.freeze() after its warm-up (a run's later paths then pay no collector passes over "
                        "the earlier paths' compiled objects)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode_e2e")
    args = p.parse_args(argv)
    global GC_FREEZE
    GC_FREEZE = args.gc_freeze
    if args.profile or args.triton or "packkv_triton" in args.paths:  # the attention launches as traced (kernel, grid, query, mask): packkv_ops' debug log
        import logging

        logging.basicConfig(format="%(name)s: %(message)s")
        logging.getLogger("packkv.ops.kernels.attention").setLevel(logging.DEBUG)
    if args.rows_as_16:
        from packkv.ops.kernels import attention as attention_kernel

        attention_kernel.MIN_ROWS, attention_kernel.ROWS_AS_N = 16, False
    if args.triton:
        from packkv.ops.kernels import attention as attention_kernel

        attention_kernel.GLUON = False
    if args.rotate_around_kernel:
        from packkv.ops.kernels import attention as attention_kernel

        attention_kernel.ROTATE_IN_KERNEL = False
    if args.eager_flushes:
        packkv.PackKVCache.graph_flushes = False
    if args.no_fuse_append:
        from packkv.inductor import backend as packkv_backend_module

        packkv_backend_module.FUSE_APPENDS = False
    if args.watchdog:
        import faulthandler

        faulthandler.dump_traceback_later(args.watchdog, repeat=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    model = build_model(args.layers, args.small, device, args.shape)
    compile_kw = compile_kwargs("reduce-overhead" if device == "cuda" else None, args.guard_filter)
    static_step = torch.compile(model, fullgraph=True, **compile_kw)
    rows = []

    def record(row):
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        run = dict(device=str(device), args={k: str(v) for k, v in vars(args).items()}, rows=rows)
        (args.out / "decode_e2e.json").write_text(json.dumps(run, indent=1))

    if "static" in args.paths:
        record(dict(run_static(model, args.batch, 1024, args.steps, args.warmup, device, args.chunk, static_step,
                               args.profile), path="weights"))  # fmt: skip
    static_contexts = args.contexts if args.static_contexts is None else args.static_contexts
    for ctx in static_contexts if "static" in args.paths else []:
        record(run_static(model, args.batch, ctx, args.steps, args.warmup, device, args.chunk, static_step, args.profile))
        torch.cuda.empty_cache() if device == "cuda" else None
    if "static_gqa" in args.paths:  # the same static cache, its decode attention reading each KV head once
        torch._dynamo.reset()
        model.set_attn_implementation(static_gqa.register())
        gqa_step = torch.compile(model, fullgraph=True, **compile_kw)
        try:
            for ctx in static_contexts:
                record(dict(run_static(model, args.batch, ctx, args.steps, args.warmup, device, args.chunk, gqa_step,
                                       args.profile), path="static_gqa"))  # fmt: skip
                torch.cuda.empty_cache() if device == "cuda" else None
        finally:
            model.set_attn_implementation("sdpa")
            torch._dynamo.reset()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())

    def budget_rows(name: str, run) -> None:  # same budget, each path at the batch that fits it
        for ctx in args.budget_contexts if args.budget_gib else []:
            one = next((r for r in rows if r["path"] == name and r["context"] == ctx and r["batch"] == args.batch), None)
            if one is None:  # no timed batch-1 row at this context: size the batch from a prefill alone
                one = dict(cache_alloc_bytes=sized_alloc_bytes(name, model, ctx, args, device))
                print(f"{name} at {ctx} (batch 1, prefill only): {one['cache_alloc_bytes'] / 2**30:.2f} GiB of cache", flush=True)
            b = budget_batch(one, args.budget_gib, args.budget_headroom_gib, weights)
            print(f"{name} budget {args.budget_gib} GiB at {ctx}: batch {b}", flush=True)
            row = run(b, ctx, max(256, args.chunk // b))
            record(dict(row, path=f"{name}_budget", budget_gib=args.budget_gib))
            torch.cuda.empty_cache() if device == "cuda" else None

    if "static" in args.paths:
        budget_rows("static", lambda b, ctx, chunk: run_static(model, b, ctx, args.steps, args.warmup, device, chunk,
                                                               static_step))  # fmt: skip
    for ctx in args.contexts if "quantized" in args.paths else []:  # eager model: before packkv.compile
        record(run_quantized(model, args.batch, ctx, args.steps, args.warmup, device, args.chunk, args.quantized_nbits))
        torch.cuda.empty_cache() if device == "cuda" else None
    torch._dynamo.reset()  # the static path's compiled frames and shape history must not shape PackKV's graph
    packkv.compile(model, **compile_kw)  # from here on, generate-style steps on a PackKV cache run compiled
    for ctx in args.contexts if "packkv" in args.paths else []:
        record(run_packkv(model, args.batch, ctx, args.steps, args.warmup, device, args.chunk, model.packkv_config,
                          args.profile, args.step_plan, args.capacity_x))
        torch.cuda.empty_cache() if device == "cuda" else None
    if "packkv" in args.paths:
        budget_rows("packkv", lambda b, ctx, chunk: run_packkv(model, b, ctx, args.steps, args.warmup, device, chunk,
                                                               model.packkv_config))  # fmt: skip
    for variant in ("packkv_triton", "packkv_unfused"):
        if variant in args.paths:
            for row in retraced_packkv_rows(model, args, variant):
                record(row)
    plot(rows, args.out / "decode_e2e.png", TITLES[args.shape])
    if not {"static", "packkv"} <= set(args.paths):
        return 0
    by = {(r["path"], r["context"]): r for r in rows}
    quant = "quantized" in args.paths
    variants = [v for v in ("packkv_triton", "packkv_unfused") if v in args.paths]
    print("| context | static tok/s | PackKV tok/s | ratio | PackKV step / 1K step | static peak GiB | PackKV peak GiB |"
          + "".join(f" {v} tok/s | ratio | step / 1K step |" for v in variants)
          + (" QuantizedCache tok/s | its peak GiB |" if quant else ""))  # fmt: skip
    print("|---|---|---|---|---|---|---|" + "---|---|---|" * len(variants) + ("---|---|" if quant else ""))
    w = rows[0]["step_ms"]
    for ctx in [c for c in args.contexts if ("static", c) in by]:
        s, k = by[("static", ctx)], by[("packkv", ctx)]
        q = f" {by[('quantized', ctx)]['tokens_per_s']:.1f} | {by[('quantized', ctx)]['peak_gib']:.1f} |" if quant else ""
        g = "".join(f" {by[(v, ctx)]['tokens_per_s']:.1f} | {by[(v, ctx)]['tokens_per_s'] / s['tokens_per_s']:.2f}x | "
                    f"{by[(v, ctx)]['step_ms'] / w:.2f} |" for v in variants)  # fmt: skip
        print(f"| {ctx // 1024}K | {s['tokens_per_s']:.1f} | {k['tokens_per_s']:.1f} | {k['tokens_per_s'] / s['tokens_per_s']:.2f}x | "
              f"{k['step_ms'] / w:.2f} | {s['peak_gib']:.1f} | {k['peak_gib']:.1f} |{g}{q}")  # fmt: skip
    # Pipelined: the same steps with no wait between them, so each step's host prelude overlaps the GPU's work
    # on the one before (as a serving loop runs; generate on CUDA waits once per step, after sampling).
    print("\n| context | pipelined: static tok/s | PackKV tok/s | ratio | PackKV step / 1K step |\n|---|---|---|---|---|")
    wp = rows[0]["pipelined_step_ms"]
    for ctx in [c for c in args.contexts if ("static", c) in by]:
        s, k = by[("static", ctx)], by[("packkv", ctx)]
        print(f"| {kilo(ctx)} | {s['pipelined_tokens_per_s']:.1f} | {k['pipelined_tokens_per_s']:.1f} | "
              f"{k['pipelined_tokens_per_s'] / s['pipelined_tokens_per_s']:.2f}x | {k['pipelined_step_ms'] / wp:.2f} |")
    # The host's share: a step's time from the call until its graph is launched (the GPU idle meanwhile, see
    # StepTimes), and what the call spends after the launch (PackKV's verify_step queues the counters' read-back;
    # the static cache's: ~0).
    print("\n| row | step, ms | / 1K step | pipelined step, ms | / 1K step | host until the graph is launched, ms | "
          "the call after the launch, ms |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} {kilo(r['context'])} x {r['batch']} | {r['step_ms']:.2f} | {r['step_ms'] / w:.3f} | "
              f"{r['pipelined_step_ms']:.2f} | {r['pipelined_step_ms'] / wp:.3f} | {r['host_ms']:.2f} | "
              f"{r['after_launch_ms']:.2f} |")
    gqa = [c for c in args.contexts if ("static_gqa", c) in by and ("packkv", c) in by]
    if gqa:  # against the static cache whose attention reads K/V once (no repeat_kv copy)
        print("\n| context | static, K/V read once: step ms (tok/s) | PackKV step ms (tok/s) | ratio | pipelined ratio |\n"
              "|---|---|---|---|---|")
        for ctx in gqa:
            g, k = by[("static_gqa", ctx)], by[("packkv", ctx)]
            print(f"| {kilo(ctx)} | {g['step_ms']:.2f} ({g['tokens_per_s']:.1f}) | {k['step_ms']:.2f} ({k['tokens_per_s']:.1f}) | "
                  f"{k['tokens_per_s'] / g['tokens_per_s']:.2f}x | {k['pipelined_tokens_per_s'] / g['pipelined_tokens_per_s']:.2f}x |")
    comp = [r for r in rows if "compress_step_ms" in r]
    if comp:  # the timed steps compress nothing; a generation also pays one compressing step per block of tokens
        block = model.packkv_config.block_size
        print(f"\n| row | plain step, ms | compressing step, ms | the step after it, ms | per step over {block} tokens, "
              "ms |\n|---|---|---|---|---|")
        for r in comp:
            print(f"| {r['path']} {kilo(r['context'])} x {r['batch']} | {r['step_ms']:.2f} | {r['compress_step_ms']:.2f} | "
                  f"{r['after_compress_step_ms']:.2f} | {r['amortized_step_ms']:.2f} |")
    profiled = [r for r in rows if "kernel_ms" in r]
    if profiled:  # step = kernels + what no kernel covers: which of the two puts the 64K step above the 1K step
        print("\n| profiled row | step, ms | kernels, ms | no kernel, ms (profiler included) |\n|---|---|---|---|")
        for r in profiled:
            print(f"| {r['path']} {kilo(r['context'])} | {r['step_ms']:.2f} | {r['kernel_ms']:.2f} | "
                  f"{r['profiled_step_ms'] - r['kernel_ms']:.2f} |")
    if args.budget_gib:
        print(f"\n| {args.budget_gib:g} GiB budget | static batch | PackKV batch | context x batch ratio | static tok/s | "
              "PackKV tok/s | ratio | static peak GiB | PackKV peak GiB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for ctx in args.budget_contexts:
            s, k = by[("static_budget", ctx)], by[("packkv_budget", ctx)]
            print(f"| {kilo(ctx)} | {s['batch']} | {k['batch']} | {k['batch'] / s['batch']:.2f}x | {s['tokens_per_s']:.1f} | "
                  f"{k['tokens_per_s']:.1f} | {k['tokens_per_s'] / s['tokens_per_s']:.2f}x | {s['peak_gib']:.1f} | "
                  f"{k['peak_gib']:.1f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
