"""Every Triton kernel compiles for the H100/H200 (sm_90) on this CPU-only machine.

The interpreter runs kernels as Python and accepts code the GPU compiler rejects (globals that are not
``tl.constexpr``, mixed integer widths); compiling to PTX here (``hopper_build.py``, in a process without
``TRITON_INTERPRET``) catches that before a GPU sees it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hopper_build import CONFIGS


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compression_kernels_compile_for_sm90(name):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("hopper_build.py")
    done = subprocess.run([sys.executable, str(script), name], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{name} ok" in done.stdout


# The attention kernel's switches as the GPU compiles them: the launcher's defaults (the query rows as the
# products' N dimension, padded to 4), the decode step's padding mask with in-kernel rotations, fp32-exact products,
# the causal path without prefetch or spans, 8 rows (GQA 8), the rows as the M dimension (16 rows and more), the
# largest chunk of a long query block, head_dim 256 with the decode step's mask and rotations, packs of 8, the
# extraction without lanes, the softmax sums deferred to the end of a split, and packs wider than 64 bits split
# into halves.
ATTENTION_BUILDS = {
    "defaults": [],
    "row_mask_rotate": ["HAS_MASK=True", "MASK_ROW=True", "ROTATE=True"],
    "exact": ["EXACT=True"],
    "causal_no_prefetch": ["IS_CAUSAL=True", "PREFETCH=0", "ZERO_SPAN=False"],
    "rows_as_n_8_rows": ["M_PAD=8"],
    "rows_as_m_row_mask_rotate": ["ROWS_AS_N=False", "HAS_MASK=True", "MASK_ROW=True", "ROTATE=True"],
    "rows_as_m_16_rows_exact": ["ROWS_AS_N=False", "M_PAD=16", "EXACT=True"],
    "causal_chunk_of_64_rows": ["ROWS_AS_N=False", "M_PAD=64", "IS_CAUSAL=True"],  # attention.MAX_ROWS
    "head_dim_256_row_mask_rotate": ["D=256", "HAS_MASK=True", "MASK_ROW=True", "ROTATE=True"],
    "pack_8_lanes": ["P=8"],  # lane extraction from one window per pack (16: two)
    "no_lanes": ["LANES=0"],
    "deferred_sums": ["DEFER_SUMS=True"],
    "pack_32_split_lanes": ["P=32"],  # 4- and 3-bit packs of 32 read as halves of 16, in lanes
    "split_5_bit_keys": ["--k-rel", "0.05", "--v-rel", "0.15"],  # 80-bit key packs as halves; V in 4 windows
    "pack_8_lanes_of_2": ["P=8", "--k-rel", "0.05", "--v-rel", "0.02"],  # 5- and 6-bit ints, lanes of 2 values
}


@pytest.mark.parametrize("name", sorted(ATTENTION_BUILDS))
def test_attention_kernel_compiles_for_sm90_within_its_register_cap(name):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).parents[1] / "scripts" / "kernel_sass.py"
    args = [sys.executable, str(script), "TILE=64", *ATTENTION_BUILDS[name], "--maxnreg", "128"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    registers = int(re.search(r"Used (\d+) registers", done.stdout).group(1))
    assert registers <= 128


# The Gluon examples (scripts/gluon_sm90): the pieces a warp-specialized decode would be built from still compile
# with the pinned Triton (Gluon has no interpreter, so a build is all the CPU can check of it).
GLUON_BUILDS = {
    "wgmma.py": [r"64x8x128, A in shared memory: .*\n   HGMMA 8,", r"from TMA: .*\n   HGMMA 4, .*UTMALDG 2"],
    "warp_specialize.py": [r"TMA producer .*8 warps.*\n   HGMMA 4, SYNCS \d+", r"load producer .*\n   HGMMA 4,"],
    # S = K q^T as 8 HGMMA.64x8x16 and O^T += V^T P as 8 more, per 64-token tile
    "decode_attention_pipeline.py": [r"\n   HGMMA 16,", r"consumer loop: \d+ instructions .*HGMMA 16"],
    # and with PackKV's decode as the producer: 64 HADD2 per thread and block (two values each, K and V)
    # (and with two decoding warpgroups, PRODUCERS = 2: 12 warps)
    "packed_decode_attention.py": [r"consumer loop: \d+ .*HGMMA 16", r"producer loop: \d+ .*HADD2 64",
                                   r"8 decode warps.*12 warps(.|\n)*consumer loop: \d+ .*HGMMA 16.*\n"
                                   r"producer loop: \d+ .*HADD2 64",
                                   # head_dim 64: two 2-warp decoding partitions (8 warps), half the products (the
                                   # default pair step: two blocks' worth per turn of the consumer's loop)
                                   r"head_dim 64, .*4 decode warps.*8 warps(.|\n)*?consumer loop: \d+ instructions per "
                                   r"128-token step .*HGMMA 16,(.|\n)*?producer loop: \d+ .*HADD2 64",
                                   # head_dim 256: two 8-warp decoding partitions (20 warps); 8 bytes spilled at
                                   # most (the pair step's build; the one-block step's spills nothing)
                                   r"head_dim 256, .*16 decode warps.*20 warps, [08] bytes spill(.|\n)*?consumer loop: "
                                   r"\d+ instructions per 128-token step .*HGMMA 64,(.|\n)*?producer loop: \d+ .*HADD2 64",
                                   # the consumer's pair step (PAIR, the default): both blocks' products in one turn
                                   r"head_dim 128, .*pair steps\).*\n.*\nconsumer loop: \d+ instructions per 128-token "
                                   r"step .*HGMMA 32,",
                                   # and the one-block step (PACKKV_GLUON_PAIR=0)
                                   r"head_dim 128, .*L2 look-ahead 0\).*\n.*\nconsumer loop: \d+ instructions per "
                                   r"64-token step .*HGMMA 16,"],
    # the paper's pair (gluon_matvec): one stream decoded (32 HADD2 per thread and block), S = K q^T or O^T += V^T U
    # as 8 HGMMA.64x8x16 per block at head_dim 128, no spill at any head_dim
    "packed_matvec.py": [r"K, head_dim 128, .*12 warps, 0 bytes spill.*\n.*\nproducer loop: \d+ .*HADD2 32"
                         r"(.|\n)*?consumer loop: \d+ .*HGMMA 8,",
                         r"V, head_dim 128, .*12 warps, 0 bytes spill.*\n.*\nproducer loop: \d+ .*HADD2 32"
                         r"(.|\n)*?consumer loop: \d+ .*HGMMA 8,",
                         r"K, head_dim 64, .*8 warps, 0 bytes spill", r"V, head_dim 256, .*20 warps, 0 bytes spill"],
    # the register path's floor (NOTES 2026-12-08): one warp, no shared memory, no spill; per 32-token turn 32
    # mma.sync for S and 32 for P V (36 for S with K's minima folded into a product), every value pair decoded by
    # one shift and one LOP3 straight into operand registers
    "register_path.py": [r"32-token turns: .*shared 0 B, 1 warps, 0 bytes spill.*\n   HMMA 64, .*STS 0, LDS 0,"
                         r"(.|\n)*?loop: \d+ instructions per turn .*LOP3 132",
                         r"32-token turns, K minima folded: .*shared 0 B, 1 warps, 0 bytes spill.*\n   HMMA 68,"],
}


@pytest.mark.parametrize("script", sorted(GLUON_BUILDS))
def test_gluon_examples_compile_for_sm90_with_hopper_instructions(script):
    # the module defaults, whatever this shell sets
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("PACKKV_GLUON_")}
    path = Path(__file__).parents[1] / "scripts" / "gluon_sm90" / script
    done = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for pattern in GLUON_BUILDS[script]:
        assert re.search(pattern, done.stdout), (pattern, done.stdout)


def test_v_sums_in_groups_of_16_blocks_build_without_spilling():
    """``gluon_matvec.BLOCK_SUMS = 16`` keeps V's consumer in its registers at head_dim 128 (per block, 1, spills
    52 bytes there): one accumulator more than the chain, and the producer loop the chain's."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("PACKKV_GLUON_")}
    path = Path(__file__).parents[1] / "scripts" / "gluon_sm90" / "packed_matvec.py"
    out = {}
    for sums in ("0", "16"):
        done = subprocess.run([sys.executable, str(path), "--dims", "128"], capture_output=True, text=True,
                              env=env | {"PACKKV_GLUON_MATVEC_BLOCK_SUMS": sums}, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        m = re.search(r"V, head_dim 128, .*12 warps, (\d+) bytes spill.*\n.*\nproducer loop: (\d+) ", done.stdout)
        assert m, done.stdout
        out[sums] = int(m[1]), int(m[2])
    assert out["16"] == (0, out["0"][1]), out
