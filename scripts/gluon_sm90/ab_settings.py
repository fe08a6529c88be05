"""Module settings of the Gluon attention (``gluon_attention``'s constants: ``PAIR``, ``STAGES``, ``L2_AHEAD``...)
timed side by side on the GPU machine: the partials kernel alone (medians of CUDA-graph replays, L2 flushed) at
Llama-3.1-8B-like shapes with random K/V and the default config, each setting's largest error against the first's,
in ``--rounds`` interleaved rounds (A B A B ...) so a drift of the machine shows instead of reading as a gain.

    python scripts/gluon_sm90/ab_settings.py "PAIR=0" "PAIR=1" [--rounds 2] [--out DIR]
    python scripts/gluon_sm90/ab_settings.py "L2_AHEAD=0" "L2_AHEAD=1" --device cpu    # a dry run (the eager body)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from kernels import bench_ms, compress, make_kv  # noqa: E402

from packkv.ops import PackKVConfig  # noqa: E402
from packkv.ops.kernels import gluon_attention as ga  # noqa: E402

# (batch, context, head_dim, query heads per KV head); the most telling first
CASES = ((8, 32768, 128, 4), (1, 131072, 128, 4), (8, 32768, 64, 4), (8, 32768, 256, 2), (1, 65536, 128, 4))


def merged(acc: torch.Tensor, m: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741
    """The attention from the splits' partials (acc ``[..., NS, D]``, max and sum ``[..., NS]`` in log2 units), as
    the merge computes it: settings that change the split count compare here."""
    w = torch.exp2(m - m.amax(-1, keepdim=True))
    return (acc * w[..., None]).sum(-2) / (l * w).sum(-1)[..., None]


def parse(setting: str) -> dict:
    """``"PAIR=0,STAGES=3"`` -> the module constants it sets (ints; ``True``/``False`` for 1/0 of a bool)."""
    out = {}
    for item in filter(None, setting.split(",")):
        name, value = item.split("=")
        if not hasattr(ga, name):
            raise SystemExit(f"gluon_attention has no setting {name!r}")
        v = int(value)
        out[name] = bool(v) if isinstance(getattr(ga, name), bool) else v
    return out


def case_partials(batch: int, ctx: int, d: int, n_rep: int, dev: str, sms: int, heads: int = 8):
    """The partials op of one case, as a function of no arguments (its split count read at each call: a setting
    may change it), over a layer compressed from random K/V with the default config."""
    k, v = make_kv(batch, ctx, heads, d, "random", dev)
    st, _ = compress(PackKVConfig(), k, v)
    del k, v
    q = torch.randn(batch, heads * n_rep, 1, d, device=dev, dtype=torch.bfloat16)

    def partials():
        return ga.partials(q, st.pool, st.k_offsets, st.v_offsets, st.k_meta, st.v_meta, st.k_scale, st.k_zero,
                           st.v_scale, st.v_zero, st.ring_k, st.ring_v, st.n_blocks, st.n_win, st.perm, None, ctx,
                           ga.splits_for(q, heads, ctx, sms), 1 / math.sqrt(d), True, st.layout.k.qbits,
                           st.layout.v.qbits)  # fmt: skip

    partials.splits = lambda: ga.splits_for(q, heads, ctx, sms)
    return partials


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("settings", nargs="+", help='e.g. "PAIR=0" "PAIR=1"')
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--device", default="cuda", help="cpu: a dry run (the eager body, tiny contexts)")
    args = p.parse_args()
    settings = [parse(s) for s in args.settings]
    names = sorted({k for s in settings for k in s})
    base = {k: getattr(ga, k) for k in names}
    dev = args.device
    sms = torch.cuda.get_device_properties(0).multi_processor_count if dev == "cuda" else 1
    print(torch.cuda.get_device_name(0) if dev == "cuda" else dev, f"{sms} SMs", flush=True)
    cases = CASES if dev == "cuda" else ((1, 300, 128, 4), (2, 200, 64, 4))
    rows = []
    for batch, ctx, d, n_rep in cases:
        partials = case_partials(batch, ctx, d, n_rep, dev, sms)
        times: list[list[float]] = [[] for _ in settings]
        errs = []
        ref = None
        for rnd in range(args.rounds if dev == "cuda" else 1):
            for i, setting in enumerate(settings):
                for name in names:
                    setattr(ga, name, setting.get(name, base[name]))
                got = partials()
                if ref is None:
                    ref = got
                if rnd == 0 and got[0].shape != ref[0].shape:  # another split count: the merged outputs
                    a, b = merged(*got), merged(*ref)
                    errs.append(((a - b).abs().max() / b.abs().max()).item())
                elif rnd == 0:  # acc and l relative to the largest; m (row maxima, log2 units) absolute
                    errs.append(max(((got[0] - ref[0]).abs().max() / ref[0].abs().max()).item(),
                                    (got[1] - ref[1]).abs().max().item(),
                                    ((got[2] - ref[2]).abs().max() / ref[2].abs().max()).item()))  # fmt: skip
                if dev == "cuda":
                    times[i].append(bench_ms(partials))
        for name in names:
            setattr(ga, name, base[name])
        for i, s in enumerate(args.settings):
            row = dict(batch=batch, context=ctx, head_dim=d, setting=s, err=errs[i], ms_rounds=times[i],
                       ms=statistics.median(times[i]) if times[i] else None)  # fmt: skip
            rows.append(row)
            print(json.dumps({k_: round(v_, 5) if isinstance(v_, float) else v_ for k_, v_ in row.items()}), flush=True)
        del partials
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ab_settings.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
