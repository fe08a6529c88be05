"""The Gluon decode attention (``packkv_ops/kernels/gluon_attention.py``): its sm_90 build counted without a GPU,
and its check and timing on one.

    python scripts/gluon_sm90/packed_decode_attention.py         # SASS per loop (CPU)
    python scripts/gluon_sm90/packed_decode_attention.py --gpu   # on the GPU machine
    PACKKV_GLUON_HEAD_DIMS=64,128,256 python scripts/gluon_sm90/packed_decode_attention.py --dims 64 256 128

Compiled here (2026-12-05e): producer loop 569 sm_90 instructions per 64-token block and warp, consumer loop 238
(with the mask); 4 + 4 warps, 68 KB of shared memory with 2 stages. With two decoding warpgroups (``PRODUCERS = 2``,
80 / 88 registers, no prefetch; 2026-12-05f, the default since 2026-12-06): 530 and 239, 4 + 8 warps. ``--gpu`` compares it, through
``attention(..., gluon=True)``, with the Triton kernel on a real ``PackedLayer`` (without and with a padding mask
and zero keys, with the Hadamard rotation) and times both beside SDPA, per launch setting (``SETTINGS`` or
``GLUON_SETTINGS``). On the H100 (2026-12-06): two decoding warpgroups 0.207 ms at B8/32K (one: 0.238; Triton 0.292, SDPA 0.365),
0.116 at B1/128K (0.132; 0.154, 0.193); ``benchmarks/results/kernels/gluon_producers_h100_2026-12-06.log``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from decode_attention_pipeline import innermost_loops
from sass import compile_gluon, report, sass_of

# As installed (packkv.ops), not as the source folder packkv_ops: one module object, one registration of its op.
from packkv.ops.kernels import gluon_attention  # noqa: E402
from packkv.ops.kernels.gluon_attention import decode_attention_kernel  # noqa: E402


ORDER = ["q_ptr", "pool_ptr", "k_off_ptr", "v_off_ptr", "k_meta_ptr", "v_meta_ptr", "k_scale_ptr", "k_zero_ptr",
         "v_scale_ptr", "v_zero_ptr", "ring_k_ptr", "ring_v_ptr", "n_blocks_ptr", "n_win_ptr", "perm_ptr", "mask_ptr",
         "smb", "out_len", "acc_ptr", "m_ptr", "l_ptr", "NB", "H", "S", "n_rep", "qk_scale", "pool_words", "tot_ptr", "T", "D", "R", "STAGES",
         "PRODUCER_REGS", "HAS_MASK", "PREFETCH", "ROTATE", "PRODUCERS", "ROT_SCALE", "LOG2_D", "K_QBITS", "V_QBITS",
         "MASK_SCAN", "MASK_BRANCH", "SCAN", "L2_AHEAD", "SKIP", "CSKIP", "APPEND", "PAIR"]  # fmt: skip
# (MAXNREG, PRODUCER_REGS, PROGRAMS_PER_SM, PREFETCH, STAGES, PRODUCERS); GLUON_SETTINGS="128,128,2,1,3,1;..."
# (PROGRAMS_PER_SM sets the split count with gluon_attention.WAVES since 2026-12-06b; before, the Triton kernel's
# count applied whatever it was: runs until then all had 2 waves of 2 programs per SM)
# replaces them (a missing PRODUCERS is 1)
SETTINGS = ((80, 88, 2, 0, 2, 2), (128, 128, 2, 1, 2, 1))


CLOCK_GHZ = 1.755  # the H100 SXM's clock under this kernel's load (assumed; nvidia-smi reports 1.98 boost)


def issue_floor_us(per_tile: int, context: int = 65536, kv_heads: int = 8, sms: int = 132) -> float:
    """The kernel is bound by instruction issue (2026-12-06e: neither the producers nor the consumer alone sets
    its time): the time to issue ``per_tile`` warp instructions for each 64-token tile of one KV head at batch 1,
    at one instruction per cycle on each of an H100's 4 x ``sms`` schedulers. A build's loop counts turn into
    this lower bound without a GPU; the fixed cost per launch (~5 us) comes on top."""
    tiles = context // 64 * kv_heads
    return per_tile * tiles / (4 * sms * CLOCK_GHZ * 1e3)


def run_on_gpu(maxnreg: int | None, producer_regs: int, per_sm: int, prefetch: int, stages: int,
               producers: int = 1) -> None:
    """On a GPU, for one register setting: a real ``PackedLayer`` per size (random bf16 K/V compressed by
    ``append_`` with the default config: Hadamard rotation, ``k_rel`` 0.07 / ``v_rel`` 0.15), the Gluon kernel
    (``attention(..., gluon=True)``, merge included) against the Triton kernel, without and with a decode step's
    padding mask and zero keys past the length, then both timed (medians of CUDA-graph replays, L2 flushed:
    ``benchmarks/kernels.py``'s ``bench_ms``) beside SDPA on the bf16 cache."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from kernels import bench_ms, compress, make_kv

    from packkv.ops import PackKVConfig
    from packkv.ops.kernels import attention as kernel

    ga = gluon_attention
    ga.MAXNREG, ga.PRODUCER_REGS, ga.PROGRAMS_PER_SM, ga.PREFETCH = maxnreg, producer_regs, per_sm, prefetch
    ga.STAGES, ga.PRODUCERS = stages, producers
    for batch, context in ((8, 32768), (1, 131072)):
        heads, n_rep, d = 8, 4, 128
        k, v = make_kv(batch, context, heads, d, "random", "cuda")
        st, _ = compress(PackKVConfig(), k, v)
        out_len = context
        q = torch.randn(batch, heads * n_rep, 1, d, device="cuda", dtype=torch.bfloat16)

        def run(gluon, length=out_len, mask=None):
            return kernel.attention(q, st, length, mask, False, None, rotate=True, gluon=gluon)

        def err(a, b):
            return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()

        e = err(run(True), run(False))
        longer = out_len + 100  # a decode step: left padding, holes, zero keys past the length
        mask = torch.rand(batch, 1, 1, longer, device="cuda") > 0.1
        mask[..., :37] = False
        e_m = err(run(True, longer, mask), run(False, longer, mask))
        # A compiled decode step's mask: out_len the storage's capacity (2x the length after a growth), every key
        # up to the length visible; one sequence with left padding (a padded batch's usual mask).
        step = torch.ones(batch, 1, 1, 2 * out_len, dtype=torch.bool, device="cuda")
        step[..., out_len:] = False
        step[0, ..., :300] = False
        e_s = err(run(True, 2 * out_len, step), run(False, 2 * out_len, step))
        torch.cuda.synchronize()
        t_g, t_t = bench_ms(lambda: run(True)), bench_ms(lambda: run(False))
        t_gm, t_tm = bench_ms(lambda: run(True, longer, mask)), bench_ms(lambda: run(False, longer, mask))
        t_gs, t_gh = {}, {}  # (MASK_SCAN, MASK_BRANCH, SCAN): the step mask, the mask with holes
        defaults = ga.MASK_SCAN, ga.MASK_BRANCH, ga.SCAN
        for scan, branch, unroll in ((True, True, 4), (True, True, 1), (True, False, 4), (False, False, 4)):
            ga.MASK_SCAN, ga.MASK_BRANCH, ga.SCAN = scan, branch, unroll
            t_gs[scan, branch, unroll] = bench_ms(lambda: run(True, 2 * out_len, step))
            t_gh[scan, branch, unroll] = bench_ms(lambda: run(True, longer, mask))
        ga.MASK_SCAN, ga.MASK_BRANCH, ga.SCAN = defaults
        t_sdpa = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        print(f"maxnreg {maxnreg}, producer regs {producer_regs}, {per_sm}/SM, prefetch {prefetch}, {stages} stages, "
              f"{producers} producer warpgroups | B{batch}/{context}: error vs Triton "
              f"{e:.1e} (masked {e_m:.1e}, step mask {e_s:.1e}) | Gluon {t_g:.3f} ms, Triton {t_t:.3f}, SDPA "
              f"{t_sdpa:.3f} | Gluon {t_sdpa / t_g:.2f}x SDPA, {t_t / t_g:.2f}x Triton | masked (10% holes): Gluon "
              f"{t_gm:.3f}, Triton {t_tm:.3f} | step mask / holes by (MASK_SCAN, MASK_BRANCH, SCAN): "
              + ", ".join(f"{k}: {t_gs[k]:.3f} / {t_gh[k]:.3f}" for k in t_gs),
              flush=True)  # fmt: skip


def head_dims_on_gpu(dims: list[int]) -> None:
    """On a GPU: the Gluon kernel at other head_dims (``PACKKV_GLUON_HEAD_DIMS``) against the Triton kernel on real
    K/V structure (``benchmarks/kernels.py``'s ``make_kv``, ``k_rel=0.1, v_rel=0.2``), both timed beside SDPA on the
    bf16 cache (medians of CUDA-graph replays, L2 flushed). Shapes: Llama-3.2-1B (32 / 8 heads) at 64, Gemma-2-9B
    (16 / 8) at 256, Llama-3.1-8B (32 / 8) at 128."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from kernels import bench_ms, compress, make_kv

    from packkv.ops import PackKVConfig
    from packkv.ops.kernels import attention as kernel

    for d in dims:
        q_heads = 16 if d == 256 else 32
        for batch, context in ((8, 32768), (1, 131072)):
            k, v = make_kv(batch, context, 8, d, "real", "cuda")
            st, _ = compress(PackKVConfig(k_rel=0.1, v_rel=0.2), k, v)
            q = torch.randn(batch, q_heads, 1, d, device="cuda", dtype=torch.bfloat16)

            def run(gluon):
                return kernel.attention(q, st, context, None, False, None, gluon=gluon)

            g, t = run(True), run(False)
            e = ((g.float() - t.float()).abs().max() / t.float().abs().max()).item()
            t_g, t_t = bench_ms(lambda: run(True)), bench_ms(lambda: run(False))
            t_s = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
            print(f"head_dim {d}, {q_heads}/8 heads, B{batch}/{context}: error vs Triton {e:.1e} | Gluon {t_g:.4f} ms, "
                  f"Triton {t_t:.4f}, SDPA {t_s:.4f} | Gluon {t_s / t_g:.2f}x SDPA, {t_t / t_g:.2f}x Triton; "
                  f"Triton {t_s / t_t:.2f}x SDPA", flush=True)  # fmt: skip
            del k, v, st
            torch.cuda.empty_cache()


def signature() -> tuple[dict, dict]:
    """The kernel's argument types for an offline build, and the pointers' 16-byte alignment."""
    sig = {name: "*i32" for name in ("pool_ptr", "k_off_ptr", "v_off_ptr", "k_meta_ptr", "v_meta_ptr", "n_blocks_ptr",
                                     "n_win_ptr")}  # fmt: skip
    sig |= {"q_ptr": "*bf16", "k_scale_ptr": "*bf16", "v_scale_ptr": "*bf16", "k_zero_ptr": "*i16",
            "v_zero_ptr": "*i16", "ring_k_ptr": "*bf16", "ring_v_ptr": "*bf16", "acc_ptr": "*fp32", "m_ptr": "*fp32",
            "l_ptr": "*fp32", "NB": "i32", "H": "i32", "S": "i32", "perm_ptr": "*u8", "mask_ptr": "*i1", "smb": "i32",
            "out_len": "i32", "n_rep": "i32", "qk_scale": "fp32", "pool_words": "i32", "tot_ptr": "*i32", "T": "constexpr", "D": "constexpr", "R": "constexpr",
            "STAGES": "constexpr", "PRODUCER_REGS": "constexpr", "HAS_MASK": "constexpr", "PREFETCH": "constexpr", "ROTATE": "constexpr", "PRODUCERS": "constexpr", "ROT_SCALE": "constexpr",
            "LOG2_D": "constexpr", "K_QBITS": "constexpr", "V_QBITS": "constexpr", "MASK_SCAN": "constexpr", "MASK_BRANCH": "constexpr", "SCAN": "constexpr", "L2_AHEAD": "constexpr", "SKIP": "constexpr", "CSKIP": "constexpr", "APPEND": "constexpr", "PAIR": "constexpr"}  # fmt: skip
    sig = {k: sig[k] for k in ORDER}
    return sig, {(i,): [["tt.divisibility", 16]] for i, k in enumerate(ORDER) if k.endswith("_ptr")}


def build(d: int, maxnreg: int | None, producer_regs: int, prefetch: int, producers: int, l2_ahead: int,
          pair: bool, stages: int | None = None):  # fmt: skip
    """The sm_90 build of the e2e decode step's case (padding mask, rotation, 4-bit K / 3-bit V) with these
    launch options."""
    ga = gluon_attention
    sig, aligned = signature()
    consts = dict(T=ga.T_BLOCK, D=d, R=ga.ROWS, STAGES=stages or ga.STAGES, PRODUCER_REGS=producer_regs,
                  HAS_MASK=True, PREFETCH=prefetch, ROTATE=True, PRODUCERS=producers,
                  ROT_SCALE=d**-0.5, LOG2_D=d.bit_length() - 1, K_QBITS=4, V_QBITS=3, MASK_SCAN=ga.MASK_SCAN,
                  MASK_BRANCH=ga.MASK_BRANCH, SCAN=ga.SCAN, L2_AHEAD=l2_ahead, SKIP=0, CSKIP=0, APPEND=False,
                  PAIR=pair)  # fmt: skip
    return compile_gluon(decode_attention_kernel, sig, consts, aligned, maxnreg=maxnreg)


def main() -> None:
    ga = gluon_attention
    # The launch options (module defaults), then two decoding warpgroups per program (PRODUCERS = 2: 12 warps, so
    # 80 registers per thread for 2 programs per SM; the decoding warps get 88, the wgmma warps the 64 left).
    builds = [(128, ga.MAXNREG, ga.PRODUCER_REGS, ga.PREFETCH, ga.PRODUCERS, ga.L2_AHEAD, ga.PAIR),
              (64, ga.MAXNREG, ga.PRODUCER_REGS, ga.PREFETCH, ga.PRODUCERS, ga.L2_AHEAD, ga.PAIR),  # 2-warp decoders
              (256, ga.maxnreg(256), ga.PRODUCER_REGS, ga.PREFETCH, ga.PRODUCERS, ga.L2_AHEAD, ga.PAIR),  # 8-warp
              (128, ga.MAXNREG, ga.PRODUCER_REGS, ga.PREFETCH, ga.PRODUCERS, ga.L2_AHEAD, not ga.PAIR),  # pair step or not
              (128, ga.MAXNREG, ga.PRODUCER_REGS, ga.PREFETCH, ga.PRODUCERS, 1, ga.PAIR),  # L2 look-ahead (599 / 530)
              (128, 128, 128, 1, 1, 0, False)]  # and the one-warpgroup build
    if "--pair" in sys.argv:  # the pair step only, at each head_dim
        builds = [(d, ga.maxnreg(d), ga.PRODUCER_REGS, ga.PREFETCH, ga.PRODUCERS, ga.L2_AHEAD, True) for d in (128, 64, 256)]
    for d, maxnreg, producer_regs, prefetch, producers, l2_ahead, pair in builds:
        ck = build(d, maxnreg, producer_regs, prefetch, producers, l2_ahead, pair)
        report(f"PackKV decode attention, head_dim {d}, warp-specialized ({d // 32 * producers} decode warps, 4 wgmma warps; maxnreg "
               f"{maxnreg}, producer {producer_regs}, prefetch {prefetch}, L2 look-ahead {l2_ahead}"
               f"{', pair steps' if pair else ''})", ck,
               ("HGMMA", "SYNCS", "BAR", "SHFL", "LDG", "STS", "HADD2", "LOP3", "PRMT"))  # fmt: skip
        sass = sass_of(ck)
        per_tile = 0
        for part, opcode in (("consumer", "HGMMA"), ("producer", "HADD2")):
            # The consumer's loops in code order: the compressed tiles', the window's (then, as a backward branch,
            # code ptxas placed out of line: not a loop of tiles). The first is the one a 64K context runs.
            loops = innermost_loops(sass, opcode)
            for k, (n, top) in enumerate(loops[:2]):
                step = 2 if pair and part == "consumer" and k == 0 else 1  # the pair step's loop: two blocks a turn
                print(f"{part} loop: {n} instructions per {64 * step}-token step and warp ({top})")
            first = loops[0][0] // (2 if pair and part == "consumer" else 1)
            per_tile += (4 if part == "consumer" else d // 32) * first  # each tile: the consumer's 4 warps, one decoding partition's
        print(f"per tile: {per_tile} warp instructions; {issue_floor_us(per_tile):.1f} us of issue at B1/64K "
              f"(one instruction per cycle on every scheduler of an H100 at {CLOCK_GHZ} GHz; measured ~48 us "
              f"beyond the fixed cost with 3,116 per tile, 2026-12-06e)")

if __name__ == "__main__":
    if "--dims" in sys.argv:  # PACKKV_GLUON_HEAD_DIMS=64,128,256 python ... --dims 64 256 128
        head_dims_on_gpu([int(x) for x in sys.argv[sys.argv.index("--dims") + 1 :]])
    elif "--gpu" in sys.argv:
        # One process per setting, with a timeout: a wrong mbarrier phase hangs the GPU, not just this setting.
        import subprocess

        import os

        env = os.environ.get("GLUON_SETTINGS")
        settings = [tuple(x.split(",")) for x in env.split(";")] if env else SETTINGS
        for setting in settings:
            if "--one" in sys.argv:
                break
            cmd = [sys.executable, __file__, "--gpu", "--one", *map(str, setting)]
            try:
                subprocess.run(cmd, timeout=150, check=False)
            except subprocess.TimeoutExpired:  # a synchronization bug hangs every setting: stop here
                print(f"setting {setting}: no result in 150 s (a hang?); the other settings are not run", flush=True)
                break
        if "--one" in sys.argv:
            a = sys.argv[sys.argv.index("--one") + 1 :]
            run_on_gpu(None if a[0] == "None" else int(a[0]), *map(int, a[1:6]))
    else:
        main()
