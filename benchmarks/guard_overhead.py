"""Host time of Dynamo's guard check per compiled PackKV decode step, with and without a guard filter and the cache's
step plan (``models/step_plan.py``), side by side.

    python benchmarks/guard_overhead.py [--layers 32] [--steps 40]

A Llama-architecture model with 32 layers and tiny dimensions on the CPU: the guard check scales with the graph's
inputs (parameters, the cache's storage), not with the model's width, so this measures what a 32-layer model pays
per step before its compiled graph runs. The graph itself runs uncompiled (the PackKV rewrite, then the FX graph
as is): no Inductor compile time. Prints a table and writes ``guard_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import packkv  # noqa: E402
from decode_e2e import build_model, decode, prefill  # noqa: E402
from packkv.inductor import with_inner  # noqa: E402

FILTERS = {"none": None, "skip_guard_on_all_nn_modules_unsafe": torch.compiler.skip_guard_on_all_nn_modules_unsafe}


def measure(layers: int, steps: int, guard_filter, step_plan: bool = True) -> dict:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(layers, True, "cpu")
    options = {"guard_filter_fn": guard_filter} if guard_filter else None
    packkv.compile(model, backend=with_inner(lambda gm, example_inputs: gm.forward), options=options)
    cache = packkv.PackKVCache(model.packkv_config, model=model)
    cache.compiled = True
    if not step_plan:  # the layers' own path: a compiled step reads each layer object (as before the plan)
        cache._step_plan = lambda token_capacity: None
    prefill(model, torch.randint(0, model.config.vocab_size, (1, 300)), cache, 256)
    cache.reserve(300 + 2 * steps + 32)  # no storage growth while timing
    times = decode(model.__call__, model, cache, 1, 300, steps, 10, "cpu")
    with torch.profiler.profile() as p:
        decode(model.__call__, model, cache, 1, 300 + steps + 10, 5, 0, "cpu")
    lookup = [e for e in p.key_averages() if "Cache Lookup" in e.key]
    return dict(layers=layers, step_ms=statistics.median(times),
                guard_check_us=lookup[0].cpu_time_total / lookup[0].count if lookup else float("nan"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "guards")
    args = ap.parse_args(argv)
    rows = [dict(measure(args.layers, args.steps, f, plan), guard_filter=name, step_plan=plan)
            for plan in (False, True) for name, f in FILTERS.items()]
    print("| step plan | guard filter | guard check per step (us) | step (ms, uncompiled graph) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['step_plan']} | {r['guard_filter']} | {r['guard_check_us']:.0f} | {r['step_ms']:.1f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "guard_overhead.json").write_text(json.dumps(dict(torch=torch.__version__, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
