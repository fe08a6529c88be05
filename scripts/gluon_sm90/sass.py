"""Compile a Gluon kernel for sm_90 on a machine without a GPU and count its SASS (the Gluon twin of
``scripts/kernel_sass.py``: ``GluonASTSource`` instead of ``ASTSource``).

Gluon (``triton.experimental.gluon``, Triton 3.6) states every layout, shared-memory buffer, wgmma and warp
partition explicitly: what the Triton kernels in ``packkv_ops/kernels`` cannot express (their scan and MMA operand
moves are layout-bound; a warp-specialized decode needs partitions). It has no interpreter: a Gluon kernel is only
checked on a GPU, so keep a ``tl`` twin for the CPU tests. See ``packkv_ops/kernels/NOTES.md`` (2026-12-05c).
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
OPCODE = re.compile(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def compile_gluon(kernel, signature: dict, constexprs: dict | None = None, attrs: dict | None = None,
                  num_warps: int = 4, maxnreg: int | None = None):  # fmt: skip
    """The compiled kernel (``.asm`` has ttgir, ptx and cubin) for sm_90; ``num_warps`` must match the kernel's;
    ``maxnreg`` caps the registers a launch reserves per thread (with warp specialization, ``setmaxnreg`` then moves
    them between the partitions within that pool)."""
    src = GluonASTSource(kernel, signature, constexprs=constexprs or {}, attrs=attrs or {})
    options = {"num_warps": num_warps, **({"maxnreg": maxnreg} if maxnreg else {})}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def sass_of(ck) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(ck.asm["cubin"])
        return subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", cubin], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip


def opcodes(sass: str, full: bool = False) -> collections.Counter:
    """Instruction counts by opcode (``full``: with modifiers, e.g. ``HGMMA.64x64x16.F32``)."""
    ops = collections.Counter()
    for line in sass.splitlines():
        if m := OPCODE.match(line):
            ops[m.group(1) if full else m.group(1).split(".")[0]] += 1
    return ops


def ptxas_info(ck) -> str:
    """Registers and spills as ptxas reports them (``CompiledKernel.n_regs`` needs a driver)."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(ck.asm["ptx"])
        info = subprocess.run([os.path.join(BIN, "ptxas"), "-v", "-arch=sm_90a", ptx, "-o", os.path.join(tmp, "x")],
                              capture_output=True, text=True).stderr  # fmt: skip
    return " ".join(re.findall(r"Used \d+ registers|\d+ bytes spill stores", info))


def report(name: str, ck, keys: tuple[str, ...] = ()) -> collections.Counter:
    """Print one line per kernel: instructions, shared memory, warps launched, registers; then ``keys``' counts."""
    sass = sass_of(ck)
    ops = opcodes(sass)
    print(f"== {name}: {sum(ops.values())} SASS instructions, shared {ck.metadata.shared} B, "
          f"{ck.metadata.num_warps} warps, {ptxas_info(ck)}")  # fmt: skip
    print("   " + ", ".join(f"{k} {ops.get(k, 0)}" for k in keys))
    return ops
