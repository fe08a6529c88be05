"""Hopper wgmma in Gluon, compiled for sm_90 without a GPU: ``warpgroup_mma`` with the A operand in registers or
in shared memory (B is always in shared memory), operands brought by loads or by TMA.

    python scripts/gluon_sm90/wgmma.py

Facts checked with Triton 3.6 (``packkv_ops/kernels/NOTES.md``, 2026-12-05c): a wgmma's M is a multiple of 64 per
warpgroup (16 or 32 fail to compile) and ``num_warps`` a multiple of 4; N can be 8 (the decode's query rows); the
accumulator's ``instr_shape`` N must divide the tile's N (larger crashes the compiler with an assertion); shared
operands need a swizzled ``NVMMASharedLayout`` (32/64/128 bytes; unswizzled fails to find a layout); plain shared
stores before a wgmma need ``fence_async_shared()``.
"""

from __future__ import annotations

from sass import compile_gluon, report
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

KEYS = ("HGMMA", "WARPGROUP", "BAR", "SYNCS", "UTMALDG", "UTMASTG", "LDSM", "STS")


@gluon.jit
def wgmma_from_loads(a_ptr, b_ptr, c_ptr, M: gl.constexpr, N: gl.constexpr, K: gl.constexpr,
                     A_IN_REGISTERS: gl.constexpr):  # fmt: skip
    W: gl.constexpr = gl.num_warps()
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [W, 1], [1, 0])
    a = gl.load(a_ptr + gl.arange(0, M, gl.SliceLayout(1, ld))[:, None] * K + gl.arange(0, K, gl.SliceLayout(0, ld))[None, :])
    b = gl.load(b_ptr + gl.arange(0, K, gl.SliceLayout(1, ld))[:, None] * N + gl.arange(0, N, gl.SliceLayout(0, ld))[None, :])
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[W, 1], instr_shape=[16, N, 16])
    b_s = gl.allocate_shared_memory(gl.float16, [K, N], gl.NVMMASharedLayout.get_default_for([K, N], gl.float16), value=b)
    if A_IN_REGISTERS:
        a_op = gl.convert_layout(a, gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2))
    else:
        a_op = gl.allocate_shared_memory(gl.float16, [M, K], gl.NVMMASharedLayout.get_default_for([M, K], gl.float16),
                                         value=a)  # fmt: skip
    fence_async_shared()  # the generic proxy's shared stores become visible to the async proxy (wgmma)
    tok = warpgroup_mma(a_op, b_s, gl.zeros([M, N], gl.float32, acc_l), is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(tok,))
    gl.store(c_ptr + gl.arange(0, M, gl.SliceLayout(1, acc_l))[:, None] * N + gl.arange(0, N, gl.SliceLayout(0, acc_l))[None, :], acc)


@gluon.jit
def wgmma_from_tma(a_desc, b_desc, c_desc):
    W: gl.constexpr = gl.num_warps()
    M: gl.constexpr = a_desc.block_type.shape[0]
    N: gl.constexpr = b_desc.block_type.shape[1]
    bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(bar, count=1)
    a_s = gl.allocate_shared_memory(a_desc.dtype, a_desc.block_type.shape, a_desc.layout)
    b_s = gl.allocate_shared_memory(b_desc.dtype, b_desc.block_type.shape, b_desc.layout)
    mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(a_desc, [0, 0], bar, a_s)
    tma.async_copy_global_to_shared(b_desc, [0, 0], bar, b_s)
    mbarrier.wait(bar, phase=0)
    mbarrier.invalidate(bar)
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[W, 1], instr_shape=[16, N, 16])
    tok = warpgroup_mma(a_s, b_s, gl.zeros([M, N], gl.float32, acc_l), use_acc=False, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(tok,))
    c_s = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout, value=acc)
    fence_async_shared()
    tma.async_copy_shared_to_global(c_desc, [0, 0], c_s)
    tma.store_wait(pendings=0)


def descriptor_type(dtype: str, shape: list[int], gl_dtype) -> str:
    """A tensor descriptor's signature type: the block shape and its shared layout's repr."""
    layout = gl.NVMMASharedLayout.get_default_for(shape, gl_dtype)
    return f"tensordesc<{dtype}[{','.join(map(str, shape))}],{layout!r}>"


def main() -> None:
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(3)}
    for m, n, k in ((64, 64, 64), (64, 8, 128)):  # a square tile; a decode-shaped one (64 tokens x 8 query rows)
        for a_in_registers in (False, True):
            sig = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "M": "constexpr", "N": "constexpr",
                   "K": "constexpr", "A_IN_REGISTERS": "constexpr"}  # fmt: skip
            ck = compile_gluon(wgmma_from_loads, sig, dict(M=m, N=n, K=k, A_IN_REGISTERS=a_in_registers), aligned)
            report(f"wgmma {m}x{n}x{k}, A in {'registers' if a_in_registers else 'shared memory'}", ck, KEYS)
    sig = {"a_desc": descriptor_type("fp16", [64, 64], gl.float16), "b_desc": descriptor_type("fp16", [64, 64], gl.float16),
           "c_desc": descriptor_type("fp32", [64, 64], gl.float32)}  # fmt: skip
    report("wgmma 64x64x64 from TMA", compile_gluon(wgmma_from_tma, sig), KEYS)


if __name__ == "__main__":
    main()
