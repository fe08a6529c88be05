"""The decode step's append folded into the attention's merge (``packkv_ops/kernels/fused_append.py``) against
``append_token`` + the Gluon attention, on the GPU machine: checked (the same ring, count and output), then timed
side by side as a CUDA graph of ``--layers`` layers (each: the window counters reset, the step's token appended,
the attention), medians of graph replays with L2 flushed (``benchmarks/kernels.py``'s ``bench_ms``).

    python scripts/gluon_sm90/fused_append_cost.py [--layers 8] [--cases 1x65536 1x131072 8x32768] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from kernels import bench_ms, compress, make_kv  # noqa: E402

from packkv.ops import PackKVConfig  # noqa: E402
from packkv.ops.kernels import attention as A  # noqa: E402
from packkv.ops.kernels.fused_append import append_and_attend  # noqa: E402
from packkv.ops.kernels.token import append_token  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--cases", nargs="+", default=["1x65536", "1x131072", "8x32768", "1x8192"], help="BATCHxCONTEXT")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    heads, n_rep, d = 8, 4, 128
    rows = []
    print(torch.cuda.get_device_name(0), flush=True)
    for case in args.cases:
        batch, ctx = map(int, case.split("x"))
        k, v = make_kv(batch, ctx, heads, d, "random", "cuda")
        st, _ = compress(PackKVConfig(), k, v)
        del k, v
        rot = st.layout.rotation
        cap = ctx + 32  # a compiled step's out_len; the mask shows the stored tokens and the new one
        mask = torch.zeros(batch, 1, 1, cap, dtype=torch.bool, device="cuda")
        mask[..., : ctx + 1] = True
        q = torch.randn(batch, heads * n_rep, 1, d, device="cuda", dtype=torch.bfloat16)
        nk = torch.randn(batch, heads, 1, d, device="cuda", dtype=torch.bfloat16)
        nv = torch.randn_like(nk)
        n_win0 = st.n_win.clone()
        a, f = st.clone(), st.clone()
        append_token(a, nk, nv, rotation=rot)
        want = A.attention(q, a, cap, mask, False, None, rotate=True, gluon=True)
        got = append_and_attend(q, f, nk, nv, cap, mask, rotation=rot)
        row = dict(batch=batch, context=ctx, layers=args.layers,
                   same_ring=all(torch.equal(getattr(f, n), getattr(a, n)) for n in ("ring_k", "ring_v", "n_win")),
                   out_err=((got.float() - want.float()).abs().max() / want.float().abs().max()).item())  # fmt: skip

        def unfused():
            for _ in range(args.layers):
                st.n_win.copy_(n_win0)
                append_token(st, nk, nv, rotation=rot)
                A.attention(q, st, cap, mask, False, None, rotate=True, gluon=True)

        def fused():
            for _ in range(args.layers):
                st.n_win.copy_(n_win0)
                append_and_attend(q, st, nk, nv, cap, mask, rotation=rot)

        for name, fn in (("unfused", unfused), ("fused", fused), ("unfused", unfused), ("fused", fused)):
            row.setdefault(f"{name}_us_per_layer", []).append(bench_ms(fn) * 1e3 / args.layers)
        rows.append(row)
        print(json.dumps({k_: [round(x, 2) for x in v_] if isinstance(v_, list) else v_ for k_, v_ in row.items()}),
              flush=True)  # fmt: skip
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fused_append_cost.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(0),
                                                                          rows=rows), indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
