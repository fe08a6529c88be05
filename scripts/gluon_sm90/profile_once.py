"""One decode-attention call of each kernel (Gluon, Triton) at B8/32K, for ``ncu`` to profile:

    ncu --clock-control none --kernel-name regex:"decode_attention_kernel|_attention_kernel" \
        --section SpeedOfLight --section WarpStateStats ... python3 scripts/gluon_sm90/profile_once.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from kernels import compress, make_kv  # noqa: E402

from packkv.ops import PackKVConfig  # noqa: E402
from packkv.ops.kernels import attention as kernel  # noqa: E402

batch, context, heads, n_rep, d = 8, 32768, 8, 4, 128
k, v = make_kv(batch, context, heads, d, "random", "cuda")
st, _ = compress(PackKVConfig(), k, v)
q = torch.randn(batch, heads * n_rep, 1, d, device="cuda", dtype=torch.bfloat16)
for gluon in (True, False):
    for _ in range(3):  # the last one is what a warm decode step sees
        kernel.attention(q, st, context, None, False, None, rotate=True, gluon=gluon)
torch.cuda.synchronize()
