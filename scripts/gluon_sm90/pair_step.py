"""The consumer's pair step (``gluon_attention.PAIR``: two compressed blocks per turn of its chain) against the
default one-block step, on the GPU machine, side by side in one run:

* the partials at batch 8 / 32K and batch 1 / 64K, 128K (Llama-3.1-8B shapes, random K/V, the default config),
  each setting with the real producers and with zero tiles (``SKIP = 3``: no loads, no decode, i.e. the consumer
  and the handshake alone: the bar the 2026-12-07b notes set, 0.158 ms at B8/32K);
* per setting its largest error against the default's partials (pair steps change only the order of the sums);
* settings: ``PAIR`` x ``PRODUCER_REGS`` (88: the consumer keeps 64 registers and the pair step spills; 80: it
  gets 80) x ``STAGES`` (3: a stage free for the decoders while a pair step holds two), and head_dim 64 (32 / 8
  heads) and 256 (16 / 8).

    python scripts/gluon_sm90/pair_step.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ab_settings import case_partials  # noqa: E402  (this folder; it puts benchmarks/ on the path)
from kernels import bench_ms  # noqa: E402

from packkv.ops.kernels import gluon_attention as ga  # noqa: E402

# (PAIR, PRODUCER_REGS, STAGES) per head_dim, the default first. 3 stages let the decoders store a block while the
# consumer's pair step holds two; 2 programs per SM still fit at 128 (4 at 64: 3 programs).
SETTINGS = {128: ((False, 88, 2), (False, 80, 2), (True, 88, 2), (True, 80, 2), (True, 80, 3)),
            64: ((False, 88, 2), (True, 88, 2), (True, 80, 2), (True, 80, 4)),
            256: ((False, 88, 2), (True, 88, 2))}
# Most telling first: a call cut short by its time limit keeps the rows printed so far.
CASES = ((8, 32768, 128, 4), (1, 131072, 128, 4), (8, 32768, 64, 4), (8, 32768, 256, 2), (1, 65536, 128, 4))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--device", default="cuda", help="cpu: a dry run (the eager body, tiny contexts)")
    args = p.parse_args()
    dev = args.device
    sms = torch.cuda.get_device_properties(0).multi_processor_count if dev == "cuda" else 1  # (CPU: few splits, pairs)
    print(torch.cuda.get_device_name(0) if dev == "cuda" else dev, f"{sms} SMs", flush=True)
    cases = CASES if dev == "cuda" else ((1, 300, 128, 4), (2, 200, 64, 4))
    rows = []
    for batch, ctx, d, n_rep in cases:
        partials = case_partials(batch, ctx, d, n_rep, dev, sms)  # the split count of each setting

        ref = None
        for pair, regs, stages in SETTINGS[d]:
            ga.PAIR, ga.PRODUCER_REGS, ga.STAGES = pair, regs, stages
            got = partials()
            if ref is None:
                ref = got
            # acc and l relative to the largest; m (row maxima, log2 units) absolute
            err = max(((got[0] - ref[0]).abs().max() / ref[0].abs().max()).item(),
                      (got[1] - ref[1]).abs().max().item(),
                      ((got[2] - ref[2]).abs().max() / ref[2].abs().max()).item())  # fmt: skip
            row = dict(batch=batch, context=ctx, head_dim=d, splits=partials.splits(), pair=pair,
                       producer_regs=regs, stages=stages, err=err)
            if dev == "cuda":
                row["ms"] = bench_ms(partials)
                ga.SKIP = 3
                row["zero_tiles_ms"] = bench_ms(partials)
                ga.SKIP = 0
            rows.append(row)
            print(json.dumps({k_: round(v_, 5) if isinstance(v_, float) else v_ for k_, v_ in row.items()}), flush=True)
        ga.PAIR, ga.PRODUCER_REGS, ga.STAGES = SETTINGS[d][0]
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "pair_step.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
