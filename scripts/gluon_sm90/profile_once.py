"""One decode-attention call of each kernel (Gluon, Triton) at B8/32K, for ``ncu`` to profile (``PROFILE_BATCH``,
``PROFILE_CONTEXT`` change the size; ``PROFILE_SKIP`` sets ``gluon_attention.SKIP``, ``PROFILE_TRITON=0`` leaves the
Triton kernel out):

    ncu --clock-control none --kernel-name regex:"decode_attention_kernel|_attention_kernel" \
        --section SpeedOfLight --section WarpStateStats ... python3 scripts/gluon_sm90/profile_once.py
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from kernels import compress, make_kv  # noqa: E402

from packkv.ops import PackKVConfig  # noqa: E402
from packkv.ops.kernels import attention as kernel  # noqa: E402
from packkv.ops.kernels import gluon_attention  # noqa: E402

batch, context = int(os.environ.get("PROFILE_BATCH", 8)), int(os.environ.get("PROFILE_CONTEXT", 32768))
heads, n_rep, d = 8, 4, 128
gluon_attention.SKIP = int(os.environ.get("PROFILE_SKIP", 0))
k, v = make_kv(batch, context, heads, d, "random", "cuda")
st, _ = compress(PackKVConfig(), k, v)
q = torch.randn(batch, heads * n_rep, 1, d, device="cuda", dtype=torch.bfloat16)
for gluon in (True, False) if os.environ.get("PROFILE_TRITON", "1") == "1" else (True,):
    for _ in range(3):  # the last one is what a warm decode step sees
        kernel.attention(q, st, context, None, False, None, rotate=True, gluon=gluon)
torch.cuda.synchronize()
