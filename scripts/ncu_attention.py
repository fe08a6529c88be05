"""Launch the fused attention kernel a few times at one size, for Nsight Compute (on the GPU machine).

    ncu --clock-control none -k regex:_attention_kernel --set full --import-source yes -o attn \\
        python3 scripts/ncu_attention.py --batch 8 --context 32768 --variants default skip_decode

Developer tool: ncu's stall reasons and per-instruction samples say where the kernel's time goes, which timing
variants (``benchmarks/kernels.py --variants-only``) can only bracket. Each named variant runs twice (the first
launch compiles), in the order given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from kernels import compress, make_kv  # noqa: E402

from packkv.ops import PackKVConfig  # noqa: E402
from packkv.ops.kernels.attention import attention  # noqa: E402

VARIANTS = {"default": {}, "skip_decode": dict(skip_decode=True), "token_major": dict(channel_rows=False)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--data", choices=("real", "random"), default="real")
    ap.add_argument("--variants", nargs="+", default=["default"], choices=sorted(VARIANTS))
    a = ap.parse_args()
    cfg = PackKVConfig(k_rel=0.1, v_rel=0.2, rotation="none")  # as benchmarks/kernels.py
    k, v = make_kv(a.batch, a.context, 8, 128, a.data, "cuda")
    st, _ = compress(cfg, k, v)
    q = torch.randn(a.batch, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    for name in a.variants:
        for _ in range(2):
            attention(q, st, a.context, None, False, None, **VARIANTS[name])
        torch.cuda.synchronize()
        print(name, "done", flush=True)


if __name__ == "__main__":
    main()
