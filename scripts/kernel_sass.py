"""Compile a PackKV Triton kernel for sm_90 on a machine without a GPU and summarise its SASS.

    python scripts/kernel_sass.py [NAME=value ...] [--maxnreg 128] [--aligned] [--dump out.sass]

NAME=value overrides a constexpr of the attention kernel (the launcher's defaults otherwise, e.g. M_PAD=16
ROWS_AS_N=False for the rows as before 2026-12-04i). SASS_LINES=1 keeps the source lines in the dump.
``--aligned`` compiles as a real launch does (pointers known 16-byte aligned): vector loads of contiguous data
(the ring tiles, scales) and far fewer spills; the compressed-block loop's count barely moves (it gathers). Counts
in the NOTES before 2026-12-05 are without it.

Developer tool: instruction counts are the cheap proxy for the per-element cost that bounds these kernels
(``packkv_ops/kernels/NOTES.md``); times only come from the GPU. Uses the ptxas/nvdisasm that ship with Triton.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource


def attention_source(overrides: dict, d: int = 128, k_rel: float = 0.1, v_rel: float = 0.2,
                     aligned: bool = False) -> tuple[ASTSource, dict]:
    from packkv.ops import Layout, PackKVConfig
    from packkv.ops.kernels import attention as A

    cfg = PackKVConfig(k_rel=k_rel, v_rel=v_rel, rotation="none", pack_size=overrides.get("P", 16))
    d = overrides.get("D", d)  # the layout's metadata words follow the head_dim and the pack size
    lay = Layout.from_config(cfg, num_heads=8, head_dim=d)
    kernel = A._attention_kernel
    consts = dict(
        # The launcher's defaults for Llama-3.1-8B's decode (4 query rows per KV head).
        T=lay.block_size, D=d, P=lay.pack_size, TILE=A.TILE, M_PAD=max(A.MIN_ROWS, 4), ROWS_AS_N=A.ROWS_AS_N,
        K_QBITS=lay.k.qbits, K_MBITS=lay.k.mbits, K_MW=lay.meta_words(lay.k), K_GROUP=lay.k.grouping,
        V_QBITS=lay.v.qbits, V_MBITS=lay.v.mbits, V_MW=lay.meta_words(lay.v), V_GROUP=lay.v.grouping,
        HAS_MASK=False, MASK_BOOL=True, IS_CAUSAL=False, DOT=A.DOT_PRECISION, USE_ASM=True, PACKWISE=True, EXACT=False,
    )
    # Constexpr parameters with defaults (benchmark switches) must be constants too, or they compile as runtime
    # arguments and both branches stay in the code.
    consts.update({p.name: p.default for p in kernel.params if p.is_constexpr and p.name not in consts
                   and p.has_default})
    consts.update(overrides)
    if "ROWS_AS_N" not in overrides:  # as the launcher decides it
        consts["ROWS_AS_N"] = A.ROWS_AS_N and consts["M_PAD"] <= A.ROWS_AS_N_MAX
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in ("acc_ptr", "m_ptr", "l_ptr") else "*i32"
        elif name == "qk_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    for name in ("q_ptr", "ring_k_ptr", "ring_v_ptr", "k_scale_ptr", "v_scale_ptr"):
        sig[name] = "*bf16"
    for name in ("k_zero_ptr", "v_zero_ptr"):
        sig[name] = "*i16"
    sig["perm_ptr"] = "*u8"
    attrs = {}
    if aligned:  # as a launch specializes 16-byte aligned tensors (torch's allocations) and the ring's slot count
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
                 if sig.get(name, "").startswith("*") or name == "S"}  # fmt: skip
    return ASTSource(kernel, sig, constexprs=consts, attrs=attrs), {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("overrides", nargs="*", help="constexpr overrides, NAME=int or NAME=True/False")
    ap.add_argument("--dump")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--maxnreg", type=int)
    ap.add_argument("--k-rel", type=float, default=0.1, help="error bounds of the layout (integer widths)")
    ap.add_argument("--v-rel", type=float, default=0.2)
    ap.add_argument("--aligned", action="store_true",
                    help="pointers 16-byte aligned, as launches on torch tensors specialize them (vector loads)")
    args = ap.parse_args()
    # True/False stay bools: a flag used in `or` (HAS_MASK) must not turn a mask into an int tensor.
    overrides = {k: {"True": True, "False": False}.get(v, None) if v in ("True", "False") else int(v)
                 for k, v in (o.split("=") for o in args.overrides)}
    src, _ = attention_source(overrides, k_rel=args.k_rel, v_rel=args.v_rel, aligned=args.aligned)
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": args.warps, "num_stages": 1, **({"maxnreg": args.maxnreg} if args.maxnreg else {})})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        open(cubin, "wb").write(ck.asm["cubin"])
        nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
        sass = subprocess.run([nvdisasm, "-c", *(["-g"] if os.environ.get("SASS_LINES") else []), cubin], capture_output=True, text=True, check=True).stdout
        ptx = os.path.join(tmp, "k.ptx")
        open(ptx, "w").write(ck.asm["ptx"])
        ptxas = os.path.join(os.path.dirname(nvdisasm), "ptxas")
        info = subprocess.run([ptxas, "-v", "-arch=sm_90a", ptx, "-o", os.path.join(tmp, "x.cubin")],
                              capture_output=True, text=True).stderr
        regs = " ".join(re.findall(r"Used \d+ registers|\d+ bytes spill stores", info))
    if args.dump:
        open(args.dump, "w").write(sass)
        open(args.dump + ".ttgir", "w").write(ck.asm["ttgir"])
    lines = sass.splitlines()
    ops = opcodes(lines)
    print(f"{overrides or 'default'}: {sum(ops.values())} SASS instructions, {regs}")
    print("  " + ", ".join(f"{k} {v}" for k, v in ops.most_common(24)))
    # Loops are the backward branches; the innermost one over compressed tiles is the cost per element.
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and labels[m.group(1)] < i:
            body = opcodes(lines[labels[m.group(1)] : i + 1])
            # Barriers are the cost instruction counts hide: each layout conversion or cross-warp reduction
            # through shared memory waits for all warps (the paired pack-start scan removed 33 of 49 per block
            # and 6% of the instructions, and the kernel got 16-18% faster).
            print(f"loop {m.group(1)}: {sum(body.values())} instructions, {body['BAR']} barriers")
            print("  " + ", ".join(f"{k} {v}" for k, v in body.most_common(16)))


def opcodes(lines: list[str]) -> collections.Counter:
    ops = collections.Counter()
    for line in lines:
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            ops[m.group(1).split(".")[0]] += 1
    return ops


if __name__ == "__main__":
    main()
