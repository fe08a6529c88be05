"""Where a batch-1 decode step's attention time goes, on the GPU machine (one run, side by side):

* the Gluon kernel's partials over contexts 1K..128K (a line fitted over 8K..128K: its intercept is the cost per
  launch that no context amortizes: prologue, pipeline fill, tail, launch), with and without the decode step's
  mask, beside the Triton kernel and SDPA;
* the producers' L2 look-ahead (``gluon_attention.L2_AHEAD`` 0-3) at each context and at batch 8 / 32K;
* at 64K: split counts, the query rotation off, no mask, and the producers without a part of their work
  (``gluon_attention.SKIP`` 1-3: no pack-bit gathers, no loads, no decode; wrong results), also at batch 8 / 32K;
* the merge and the one-token append before (copies of the 2026-12-06c kernels, here) and after this change;
* with ``--consumer-ablation`` only: the consumer without a part of its chain per tile (``gluon_attention.CSKIP``),
  beside the producers' zero tiles, and 3 stages.

    python scripts/gluon_sm90/launch_cost.py [--out DIR]
    python scripts/gluon_sm90/launch_cost.py --consumer-ablation --contexts 65536
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from kernels import bench_ms, compress, make_kv  # noqa: E402

from packkv.ops import PackKVConfig  # noqa: E402
from packkv.ops.kernels import attention as A  # noqa: E402
from packkv.ops.kernels import gluon_attention as ga  # noqa: E402
from packkv.ops.kernels import token  # noqa: E402
from packkv.ops.kernels._launch import launch, next_pow2  # noqa: E402
from packkv.ops.kernels.hadamard import fwht_rows  # noqa: E402


@triton.jit
def _merge_two_pass(acc_ptr, m_ptr, l_ptr, out_ptr, NS, D: tl.constexpr, BS: tl.constexpr, ROTATE: tl.constexpr,
                    ROT_SCALE: tl.constexpr):  # fmt: skip
    """``attention._merge_kernel`` until 2026-12-06c: a pass for the max, then one for the sums, chunks of 32."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BS)
    cc = tl.arange(0, D)
    top = tl.full((BS,), float("-inf"), tl.float32)
    for s0 in range(0, NS, BS):
        top = tl.maximum(top, tl.load(m_ptr + row * NS + s0 + s, mask=s0 + s < NS, other=float("-inf")))
    top_all = tl.max(top, 0)
    top_all = tl.where(top_all == float("-inf"), 0.0, top_all)
    num = tl.zeros((D,), tl.float32)
    den = tl.zeros((BS,), tl.float32)
    for s0 in range(0, NS, BS):
        ok = s0 + s < NS
        w = tl.exp2(tl.load(m_ptr + row * NS + s0 + s, mask=ok, other=float("-inf")) - top_all)
        den += w * tl.load(l_ptr + row * NS + s0 + s, mask=ok, other=0.0)
        a = tl.load(acc_ptr + (row * NS + s0 + s)[:, None] * D + cc[None, :], mask=ok[:, None], other=0.0)
        num += tl.sum(a * w[:, None], 0)
    o = num / tl.sum(den, 0)
    if ROTATE:
        o = tl.reshape(fwht_rows(tl.reshape(o, (1, D)), 1, D), (D,)) * ROT_SCALE
    tl.store(out_ptr + row * D + cc, o.to(out_ptr.dtype.element_ty))


@triton.jit
def _append_two_trips(k_ptr, v_ptr, ring_k_ptr, ring_v_ptr, n_blocks_ptr, n_win_ptr, B, H, S, skb, skh, svb, svh,
                      inv_sqrt, T: tl.constexpr, D: tl.constexpr, HP: tl.constexpr, ROTATE: tl.constexpr):  # fmt: skip
    """``token._append_token_kernel`` until 2026-12-06c: the counters loaded after the check, the own token twice."""
    b = tl.program_id(0)
    h = tl.arange(0, HP)[:, None]
    c = tl.arange(0, D)[None, :]
    m = h < H
    inv_sqrt = tl.cast(inv_sqrt, tl.float32)
    bad = tl.zeros((HP, D), tl.int32)
    for i in range(B):
        bad |= token._non_finite(token._token(k_ptr, skb, skh, i, h, c, m, inv_sqrt, HP, D, ROTATE))
        bad |= token._non_finite(token._token(v_ptr, svb, svh, i, h, c, m, inv_sqrt, HP, D, ROTATE))
    if tl.max(tl.max(bad, 1), 0) == 0:
        nw = tl.load(n_win_ptr + b)
        slot = (tl.load(n_blocks_ptr + b) * T + nw) % S
        dst = ((b * H + h).to(tl.int64) * S + slot) * D + c
        tl.store(ring_k_ptr + dst, token._token(k_ptr, skb, skh, b, h, c, m, inv_sqrt, HP, D, ROTATE), mask=m)
        tl.store(ring_v_ptr + dst, token._token(v_ptr, svb, svh, b, h, c, m, inv_sqrt, HP, D, ROTATE), mask=m)
        tl.store(n_win_ptr + b, nw + 1)


L2_AHEADS = (0, 1, 2, 3)
CSKIPS = (0, 1, 2, 4, 8, 2 | 4, 1 | 2 | 4 | 8 | 16)  # gluon_attention.CSKIP: 31 leaves the handshake alone


def consumer_ablation(dev: str, sms: int, heads: int, n_rep: int, d: int, contexts: list[int],
                      cskips: list[int]) -> list[dict]:  # fmt: skip
    """The partials at batch 1 (each context) and batch 8 / 32K with parts of the consumer's chain per tile left
    out (``CSKIP``), with the real producers and with zero tiles (``SKIP = 3``); then real settings beside the
    default (its error against it printed): 3 stages instead of 2. (The lazy maximum's rows, 2026-12-06e, timed the
    option removed since: ``benchmarks/results/kernels/lazy_max_h100_2026-12-06e.json``.)"""
    rows = []
    for batch, ctx in [(1, c) for c in contexts] + ([(8, 32768)] if dev == "cuda" else []):
        k, v = make_kv(batch, ctx, heads, d, "random", dev)
        st, _ = compress(PackKVConfig(), k, v)
        del k, v
        q = torch.randn(batch, heads * n_rep, 1, d, device=dev, dtype=torch.bfloat16)
        ns = ga.splits_for(q, heads, ctx, sms)

        def partials():
            return ga.partials(q, st.pool, st.k_offsets, st.v_offsets, st.k_meta, st.v_meta, st.k_scale, st.k_zero,
                               st.v_scale, st.v_zero, st.ring_k, st.ring_v, st.n_blocks, st.n_win, st.perm, None, ctx,
                               ns, 1 / math.sqrt(d), True, st.layout.k.qbits, st.layout.v.qbits)  # fmt: skip

        row = dict(batch=batch, context=ctx, splits=ns)
        for skip in (0, 3):
            for cskip in cskips:
                ga.SKIP, ga.CSKIP = skip, cskip
                row[f"skip_{skip}_cskip_{cskip}"] = bench_ms(partials)
        ga.SKIP = ga.CSKIP = 0
        ref = partials()
        stages = ga.STAGES
        ga.STAGES = 3
        got = partials()
        row["stages_3"] = bench_ms(partials)
        ga.STAGES = stages
        row["stages_3_err"] = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                                  for a, b in zip(got, ref))  # fmt: skip
        row["stages_default"] = bench_ms(partials)
        rows.append(row)
        print(json.dumps({k_: round(v_, 4) if isinstance(v_, float) else v_ for k_, v_ in row.items()}), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[1 << i for i in range(10, 18)])
    p.add_argument("--l2-aheads", type=int, nargs="*", default=list(L2_AHEADS))
    p.add_argument("--batch8-context", type=int, default=32768)
    p.add_argument("--consumer-ablation", action="store_true",
                   help="only the consumer's chain taken apart (gluon_attention.CSKIP x SKIP) and 3 stages")
    p.add_argument("--cskips", type=int, nargs="*", default=list(CSKIPS), help="with --consumer-ablation")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--device", default="cuda", help="cpu: a dry run of this script (TRITON_INTERPRET=1, small contexts)")
    args = p.parse_args()
    dev = args.device
    heads, n_rep, d = 8, 4, 128
    sms = torch.cuda.get_device_properties(0).multi_processor_count if dev == "cuda" else 132
    name = torch.cuda.get_device_name(0) if dev == "cuda" else dev
    print(name, f"{sms} SMs, Gluon WAVES {ga.WAVES}", flush=True)
    if args.consumer_ablation:
        rows = consumer_ablation(dev, sms, heads, n_rep, d, args.contexts, args.cskips)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "consumer_ablation.json").write_text(json.dumps(rows, indent=1))
        return
    rows, big = [], None
    default_ahead = ga.L2_AHEAD
    for ctx in args.contexts:
        k, v = make_kv(1, ctx, heads, d, "random", dev)
        st, _ = compress(PackKVConfig(), k, v)
        q = torch.randn(1, heads * n_rep, 1, d, device=dev, dtype=torch.bfloat16)
        cap = ctx + 32  # a compiled step's out_len: the reserved capacity; its mask hides the keys past the length
        mask = torch.ones(1, 1, 1, cap, dtype=torch.bool, device=dev)
        mask[..., ctx:] = False
        ns = ga.splits_for(q, heads, cap, sms)
        ns = max(1, min(ns, -(-cap // st.layout.block_size)))

        def partials(splits=ns, rotate=True, msk=mask):
            return ga.partials(q, st.pool, st.k_offsets, st.v_offsets, st.k_meta, st.v_meta, st.k_scale, st.k_zero,
                               st.v_scale, st.v_zero, st.ring_k, st.ring_v, st.n_blocks, st.n_win, st.perm, msk, cap,
                               splits, 1 / math.sqrt(d), rotate, st.layout.k.qbits, st.layout.v.qbits)  # fmt: skip

        acc, m, l = partials()
        out = torch.empty(1, heads * n_rep, 1, d, dtype=torch.bfloat16, device=dev)

        def merge(kernel, bs):
            return launch(kernel)[(heads * n_rep,)](acc, m, l, out, ns, D=d, BS=bs, ROTATE=True, ROT_SCALE=d**-0.5)

        merge(A._merge_kernel, A.merge_chunk(d))
        new = out.clone()
        merge(_merge_two_pass, 32)
        err = ((new.float() - out.float()).abs().max() / out.float().abs().max()).item()
        row = dict(
            context=ctx, splits=ns, merge_new_vs_old_err=err,
            gluon_step_mask=bench_ms(lambda: A.attention(q, st, cap, mask, False, None, rotate=True, gluon=True)),
            gluon_no_mask=bench_ms(lambda: A.attention(q, st, ctx, None, False, None, rotate=True, gluon=True)),
            partials=bench_ms(partials),
            merge_one_pass=bench_ms(lambda: merge(A._merge_kernel, A.merge_chunk(d))),
            merge_two_pass=bench_ms(lambda: merge(_merge_two_pass, 32)),
            triton_step_mask=bench_ms(lambda: A.attention(q, st, cap, mask, False, None, rotate=True, gluon=False)),
            sdpa=bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)),
        )  # fmt: skip
        for ahead in args.l2_aheads:  # the producers' L2 look-ahead (gluon_attention.L2_AHEAD), same run
            ga.L2_AHEAD = ahead
            row[f"partials_l2_ahead_{ahead}"] = bench_ms(partials)
        ga.L2_AHEAD = default_ahead
        if ctx == 65536:
            for s in (16, ns // 2 + ns // 4, 2 * ns, 4 * ns):
                row[f"partials_{s}_splits"] = bench_ms(lambda: partials(s))
            for skip in (1, 2, 3):  # what the rest costs (wrong results): gluon_attention.SKIP
                ga.SKIP = skip
                row[f"partials_skip_{skip}"] = bench_ms(partials)
            ga.SKIP = 0
            row["partials_no_rotate"] = bench_ms(lambda: partials(rotate=False))
            row["partials_no_mask"] = bench_ms(lambda: partials(msk=None))
            big = st
        rows.append(row)
        print(json.dumps({k_: round(v_, 4) if isinstance(v_, float) else v_ for k_, v_ in row.items()}), flush=True)
        del k, v
    fit = [r for r in rows if r["context"] >= 8192]
    if len(fit) >= 2:
        x = torch.tensor([r["context"] / 1024 for r in fit], dtype=torch.float64)
        for key in ("partials", "gluon_step_mask", "triton_step_mask", "sdpa"):
            y = torch.tensor([r[key] for r in fit], dtype=torch.float64)
            slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
            icpt = y.mean() - slope * x.mean()
            print(f"{key}: {1e3 * icpt.item():.1f} us + {1e3 * slope.item():.3f} us per 1K tokens (fit over 8K..)")
    # Batch 8 at 32K (the kernel table's first column): the L2 look-ahead there too.
    c8 = args.batch8_context
    k, v = make_kv(8, c8, heads, d, "random", dev)
    st8, _ = compress(PackKVConfig(), k, v)
    q8 = torch.randn(8, heads * n_rep, 1, d, device=dev, dtype=torch.bfloat16)
    row = dict(batch=8, context=c8)
    for ahead in args.l2_aheads:
        ga.L2_AHEAD = ahead
        row[f"gluon_l2_ahead_{ahead}"] = bench_ms(lambda: A.attention(q8, st8, c8, None, False, None, rotate=True,
                                                                       gluon=True))  # fmt: skip
    ga.L2_AHEAD = default_ahead
    for skip in (1, 2, 3):
        ga.SKIP = skip
        row[f"gluon_skip_{skip}"] = bench_ms(lambda: A.attention(q8, st8, c8, None, False, None, rotate=True, gluon=True))
    ga.SKIP = 0
    row["sdpa"] = bench_ms(lambda: F.scaled_dot_product_attention(q8, k, v, enable_gqa=True))
    rows.append(row)
    print(json.dumps({k_: round(v_, 4) if isinstance(v_, float) else v_ for k_, v_ in row.items()}), flush=True)
    del k, v, st8
    # The one-token append at batch 1 and 8 (a ring with room; each replay advances the window counter, harmless).
    for batch in (1, 8):
        lay = (big or st).layout
        from packkv.ops.storage import PackedLayer

        s2 = PackedLayer.empty(lay, batch, torch.bfloat16, dev, 4, 1024)
        nk = torch.randn(batch, heads, 1, d, device=dev, dtype=torch.bfloat16)
        nv = torch.randn_like(nk)
        hp = next_pow2(heads)

        def old():
            launch(_append_two_trips)[(batch,)](nk, nv, s2.ring_k, s2.ring_v, s2.n_blocks, s2.n_win, batch, heads,
                                                lay.ring_size, nk.stride(0), nk.stride(1), nv.stride(0), nv.stride(1),
                                                d**-0.5, T=lay.block_size, D=d, HP=hp, ROTATE=True)  # fmt: skip

        t_new = bench_ms(lambda: token.append_token(s2, nk, nv, rotation=1))
        t_old = bench_ms(old)
        print(f"append_token batch {batch}: {1e3 * t_new:.2f} us (one trip) vs {1e3 * t_old:.2f} us (before)", flush=True)
        rows.append(dict(append_batch=batch, append_new=t_new, append_old=t_old))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "launch_cost.json").write_text(json.dumps(dict(device=name, rows=rows), indent=1))


if __name__ == "__main__":
    main()
