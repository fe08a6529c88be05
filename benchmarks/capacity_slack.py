"""What the fused attention pays for capacity past the sequence's end (one GPU).

    python benchmarks/capacity_slack.py

A compiled decode step attends over the storage's token capacity (``out_len``), which grows by doubling: up to 2x
the length, with transformers' padding mask. Positions past the end are zero keys; the kernel does softmax
bookkeeping there (mask loads, no K/V loads or products). Times (CUDA-graph medians) of out_len = length vs
2 x length without a mask and with a bool or float padding mask; checks the masked result equals the exact one.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import kernels as kb  # noqa: E402
from packkv.ops import PackKVConfig  # noqa: E402
from packkv.ops.kernels.attention import attention  # noqa: E402

cfg = PackKVConfig(k_rel=0.1, v_rel=0.2, rotation="none")
print("| size | out_len=len | out_len=2len, no mask | out_len=2len, padding mask (bool) | (float) |")
for b, L in ((8, 32768), (1, 131072)):
    k, v = kb.make_kv(b, L, 8, 128, "real", "cuda")
    st, _ = kb.compress(cfg, k, v)
    del k, v
    q = torch.randn(b, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    mb = torch.zeros(b, 1, 1, 2 * L, dtype=torch.bool, device="cuda")
    mb[..., :L] = True
    mf = torch.zeros(b, 1, 1, 2 * L, dtype=torch.bfloat16, device="cuda")
    mf[..., L:] = float("-inf")
    a = attention(q, st, L, None, False, None).float()
    c = attention(q, st, 2 * L, mb, False, None).float()
    assert (a - c).abs().max() < 2e-2, (a - c).abs().max()
    t = [kb.bench_ms(lambda: attention(q, st, L, None, False, None)),
         kb.bench_ms(lambda: attention(q, st, 2 * L, None, False, None)),
         kb.bench_ms(lambda: attention(q, st, 2 * L, mb, False, None)),
         kb.bench_ms(lambda: attention(q, st, 2 * L, mf, False, None))]
    print(f"| B{b}/{L // 1024}K | " + " | ".join(f"{x:.3f}" for x in t) + " |", flush=True)
    del st
    torch.cuda.empty_cache()
