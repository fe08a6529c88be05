"""How far the paper's mat-vec pairs are from fp64 products on the dequantized cache (GPU; the layouts and operands of
``test_paper_matvec_kernels_match_the_dequantized_cache``): per-value pair, windows pair with and without lane
order, and the fp32 reference. Two ratios per case: ``max err / (1e-6 max|exact|)`` (the per-value pair's bound) and
``max(err / folded terms)`` in fp32 roundings (2^-24; the test's ``MATVEC_ROUNDINGS``).

    python3 scripts/matvec_accuracy.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_kernels import build
from packkv.ops import PackKVConfig
from packkv.ops.kernels import matvec as mv
from packkv.ops.codec import unpack_chunks
cfgs = {"token_groups": PackKVConfig(block_size=32, window=32),
        "p8_head": PackKVConfig(window=64, pack_size=8, k_grouping="token_head", v_grouping="token_head"),
        "channel_keys": PackKVConfig(block_size=32, window=32, k_grouping="channel"),
        "p8_5_6bit": PackKVConfig(block_size=32, window=32, pack_size=8, k_rel=0.05, v_rel=0.02)}

def parts(st, s, nb):  # |Q| |s| and z s, [B, H, nb T, D] fp64 (the test's _int_and_zero_terms)
    lay = st.layout; ss = getattr(lay, s)
    meta, off, scale, zero = (getattr(st, f"{s}_{f}")[:, :nb] for f in ("meta", "offsets", "scale", "zero"))
    q = unpack_chunks(meta, st.pool, off, ss, lay).double()
    a = q.abs() * scale.double().abs(); zs = (zero.double() * scale.double()).expand_as(a)
    f = lambda x: x.permute(0, 2, 1, 3, 4).reshape(x.shape[0], x.shape[2], -1, x.shape[4])
    return f(a), f(zs)

print("ratios: old = err / (1e-6 max|exact|); fold = max(err / folded terms) / 2^-24")
for name, cfg in cfgs.items():
    _, ker, _, _ = build(cfg, [400], heads=2)
    nb = int(ker.n_blocks[0])
    g = torch.Generator().manual_seed(1)
    q = (torch.randn(2, 2, 64, generator=g) * 3).cuda()
    w = torch.softmax(torch.randn(2, 2, nb * cfg.block_size, generator=g), -1).cuda()
    dk, dv = (mv.dequantized_blocks(ker, s, nb).double() for s in "kv")
    (ak, zk), (av, zv) = parts(ker, "k", nb), parts(ker, "v", nb)
    for path, win, lanes in (("per-value", False, True), ("win-lanes", True, True), ("win-nolane", True, False), ("reference", None, True)):
        mv.LANES = lanes
        r = []
        for qq in (q, q.bfloat16()):
            qd = qq.double()[..., None]
            got = mv.reference_k_matvec(qq, ker, nb) if win is None else mv.k_matvec(qq, ker, nb, win)
            ex = (dk @ qd).reshape(got.shape); fold = (ak @ qd.abs() + (zk @ qd).abs()).reshape(got.shape)
            err = (got.double() - ex).abs()
            r += [(err.max() / (1e-6 * ex.abs().max())).item(), (err / fold).max().item() * 2**24]
        for ww in (w, w[..., :-5]):
            full = torch.nn.functional.pad(ww, (0, w.shape[-1] - ww.shape[-1]))
            got = mv.reference_v_matvec(full, ker, nb) if win is None else mv.v_matvec(ww, ker, nb, win)
            wd = full.double()[..., None, :]
            ex = (wd @ dv).reshape(got.shape); fold = (wd.abs() @ av + (wd @ zv).abs()).reshape(got.shape)
            err = (got.double() - ex).abs()
            r += [(err.max() / (1e-6 * ex.abs().max())).item(), (err / fold).max().item() * 2**24]
        print(f"{name:13s} {path:10s} " + "  ".join(f"{r[i]:5.2f}/{r[i+1]:6.1f}" for i in range(0, 8, 2)))
