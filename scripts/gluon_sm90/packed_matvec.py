"""The paper's kernel pair as Gluon kernels (``packkv_ops/kernels/gluon_matvec.py``): the sm_90 builds counted
without a GPU, and a check and timing on one.

    python scripts/gluon_sm90/packed_matvec.py          # SASS per loop, K and V, head_dim 128 / 64 / 256 (CPU)
    python scripts/gluon_sm90/packed_matvec.py --gpu    # on the GPU machine: checked and timed beside the others

Compiled here (2026-12-07i, 3-bit ints): the producer loop 292 sm_90 instructions per 64-token block and warp at
head_dim 128 (the attention's producer decodes both streams in 530), the consumer loop ~95 (K) / ~150 (V).
``--gpu`` times the Gluon pair against the Triton windows pair and ``torch.matmul``'s GEMV on the dequantized bf16
cache (the paper's protocol, ``benchmarks/kernels.py`` runs it for the README table) at the paper's setting.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from decode_attention_pipeline import innermost_loops
from sass import compile_gluon, report, sass_of

from packkv.ops.kernels import gluon_matvec  # noqa: E402


def build(dim: int, is_k: bool, qbits: int = 3) -> None:
    sig = {"x_ptr": "*bf16" if is_k else "*fp32", "out_ptr": "*fp32", "pool_ptr": "*i32", "meta_ptr": "*i32",
           "off_ptr": "*i32", "scale_ptr": "*bf16", "zero_ptr": "*i16", "NB": "i32", "H": "i32", "n_blocks": "i32"}  # fmt: skip
    consts = dict(T=64, D=dim, R=gluon_matvec.COLS, STAGES=gluon_matvec.STAGES, QBITS=qbits, PREFETCH=gluon_matvec.PREFETCH,
                  PRODUCER_REGS=gluon_matvec._regs(dim)[1], IS_K=is_k, PIPE=gluon_matvec.PIPE, BLOCK_SUMS=gluon_matvec.BLOCK_SUMS)  # fmt: skip
    ck = compile_gluon(gluon_matvec.matvec_kernel, sig | dict.fromkeys(consts, "constexpr"), consts,
                       maxnreg=gluon_matvec._regs(dim)[0])  # fmt: skip
    report(f"{'K' if is_k else 'V'}, head_dim {dim}, {qbits}-bit ints", ck, ("HGMMA", "HADD2", "LDL", "STL"))
    sass = sass_of(ck)
    # The producer's loop decodes (32 HADD2 per thread: 4 packs of 16 values, two a time) and stores its tile; the
    # consumer's multiplies (each partition's loop appears once per producer count the compiler specializes).
    n, ops = min(x for x in innermost_loops(sass, "STS") if "HADD2 32" in x[1])
    print(f"producer loop: {n} instructions per 64-token block and warp: {ops}")
    n, ops = innermost_loops(sass, "HGMMA")[0]
    print(f"consumer loop: {n} instructions per 64-token block and warp: {ops}")


# Module settings timed side by side (gluon_matvec's PREFETCH, PIPE, MAXNREG / PRODUCER_REGS_MV); the first is the
# default (H100, 2026-12-07i: gluon_matvec's comment has the table).
SETTINGS = {
    "default (prefetch, pipe, 56 / 64 registers)": {},
    "first build (neither, the attention's registers)": dict(PREFETCH=0, PIPE=0, MAXNREG=0),
    "prefetch": dict(PREFETCH=1, PIPE=0, MAXNREG=0),
    "prefetch+pipe": dict(PREFETCH=1, PIPE=1, MAXNREG=0),
    "pipe, 56/64 regs": dict(PREFETCH=0, PIPE=1),
    "default + V's products summed per block (BLOCK_SUMS=1)": dict(BLOCK_SUMS=1),
    "default + V's products summed per 16 blocks (BLOCK_SUMS=16)": dict(BLOCK_SUMS=16),
}


def run_on_gpu(dims: list[int], cases: list[tuple[int, int]]) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from kernels import bench_ms, compress, make_kv

    from packkv.ops import PackKVConfig
    from packkv.ops.kernels import matvec

    cfg = PackKVConfig(k_rel=0.1, v_rel=0.2, rotation="none")

    def setting(values: dict, fn):  # fn run with these module settings
        before = {k: getattr(gluon_matvec, k) for k in values}
        for k, v in values.items():
            setattr(gluon_matvec, k, v)
        try:
            return fn()
        finally:
            for k, v in before.items():
                setattr(gluon_matvec, k, v)

    for dim in dims:
        for batch, context in cases:
            k, v = make_kv(batch, context, 8, dim, "real", "cuda")
            st, _ = compress(cfg, k, v)
            nb = int(st.n_blocks[0])
            q = torch.randn(batch, 8, dim, device="cuda", dtype=torch.bfloat16)
            w = torch.softmax(torch.randn(batch, 8, nb * 64, device="cuda"), -1)
            kdq = matvec.dequantized_blocks(st, "k", nb).to(torch.bfloat16)
            vdq = matvec.dequantized_blocks(st, "v", nb).to(torch.bfloat16)
            wb = w.to(torch.bfloat16)
            ref_k, ref_v = matvec.k_matvec(q, st, nb, False), matvec.v_matvec(w, st, nb, False)
            gemv_k = bench_ms(lambda: torch.matmul(kdq, q[..., None]))
            gemv_v = bench_ms(lambda: torch.matmul(wb[:, :, None, :], vdq))
            tri_k = bench_ms(lambda: matvec.k_matvec(q, st, nb, True))
            tri_v = bench_ms(lambda: matvec.v_matvec(w, st, nb, True))
            print(f"head_dim {dim} B{batch}/{context // 1024}K: GEMV K {gemv_k:.4f} ms, V {gemv_v:.4f} | Triton windows "
                  f"pair K {tri_k:.4f} ({gemv_k / tri_k:.2f}x), V {tri_v:.4f} ({gemv_v / tri_v:.2f}x)", flush=True)  # fmt: skip
            for name, values in SETTINGS.items():
                gk = setting(values, lambda: gluon_matvec.k_matvec(q, st, nb))
                gv = setting(values, lambda: gluon_matvec.v_matvec(w, st, nb))
                err_k = float((gk - ref_k).abs().max() / ref_k.abs().max())
                err_v = float((gv - ref_v).abs().max() / ref_v.abs().max())
                tk = setting(values, lambda: bench_ms(lambda: gluon_matvec.k_matvec(q, st, nb)))
                tv = setting(values, lambda: bench_ms(lambda: gluon_matvec.v_matvec(w, st, nb)))
                print(f"   Gluon {name}: K {tk:.4f} ms ({gemv_k / tk:.2f}x GEMV), V {tv:.4f} ({gemv_v / tv:.2f}x) | errors "
                      f"vs the per-value pair K {err_k:.1e}, V {err_v:.1e}", flush=True)  # fmt: skip
            del k, v, st, kdq, vdq
            torch.cuda.empty_cache()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--dims", type=int, nargs="+", default=[128, 64, 256])
    p.add_argument("--cases", nargs="+", default=["8x32768", "1x131072"],
                   help="batch x context (--gpu); 8x131072 shows V's error over long splits")
    args = p.parse_args()
    if args.gpu:
        run_on_gpu(args.dims, [tuple(int(x) for x in c.split("x")) for c in args.cases])
    else:
        for d in args.dims:
            for is_k in (True, False):
                build(d, is_k)
