"""A warp-specialized pipeline in Gluon, compiled for sm_90 without a GPU: producer warps fill a ring of
shared-memory stages, a consumer warpgroup runs wgmma from them, mbarriers hand the stages over. It is the shape of
the decode-attention kernel the goals need (``packkv_ops/kernels/NOTES.md``, "What a ~5x faster kernel would
take"): there the producer would decode packed K/V into the stages instead of copying them.

    python scripts/gluon_sm90/warp_specialize.py

``gl.warp_specialize([(consumer, args), (producer, args)], worker_num_warps, worker_num_regs)``: the first entry
runs on the kernel's ``num_warps``; workers round up to whole warpgroups (a 1-warp worker launches 8 warps in all)
and ``setmaxnreg`` moves registers between them (ptxas then reports 255 registers: the cap, not the use). Inside a
worker, ``gl.num_warps()`` is the worker's count and ``gl.thread_barrier()`` a named barrier of its warps.
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
from wgmma import descriptor_type

KEYS = ("HGMMA", "SYNCS", "BAR", "UTMALDG", "USETMAXREG", "LDG", "STS")


@gluon.jit
def consumer(a_bufs, b_bufs, ready, empty, c_ptr, K, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
             STAGES: gl.constexpr):  # fmt: skip
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                    instr_shape=[16, BN, 16])  # fmt: skip
    acc = gl.zeros([BM, BN], gl.float32, acc_l)
    for i in range(gl.cdiv(K, BK)):
        s = i % STAGES
        mbarrier.wait(ready.index(s), phase=(i // STAGES) & 1)
        acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index(s), count=1)  # the stage goes back to the producer
    offs = gl.arange(0, BM, gl.SliceLayout(1, acc_l))[:, None] * BN + gl.arange(0, BN, gl.SliceLayout(0, acc_l))[None, :]
    gl.store(c_ptr + offs, acc)


@gluon.jit
def tma_producer(a_desc, b_desc, a_bufs, b_bufs, ready, empty, K, BK: gl.constexpr, STAGES: gl.constexpr):
    for i in range(gl.cdiv(K, BK)):
        s = i % STAGES
        mbarrier.wait(empty.index(s), phase=((i // STAGES) & 1) ^ 1)  # the first pass over the ring does not wait
        mbarrier.expect(ready.index(s), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(a_desc, [0, i * BK], ready.index(s), a_bufs.index(s))
        tma.async_copy_global_to_shared(b_desc, [i * BK, 0], ready.index(s), b_bufs.index(s))


@gluon.jit
def load_producer(a_ptr, b_ptr, a_bufs, b_bufs, ready, empty, K, BM: gl.constexpr, BN: gl.constexpr,
                  BK: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    """Registers -> shared stages: where a decoding producer would turn packed words into fp16 tiles."""
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [gl.num_warps(), 1], [1, 0])
    am = gl.arange(0, BM, gl.SliceLayout(1, ld))[:, None]
    ak = gl.arange(0, BK, gl.SliceLayout(0, ld))[None, :]
    bk = gl.arange(0, BK, gl.SliceLayout(1, ld))[:, None]
    bn = gl.arange(0, BN, gl.SliceLayout(0, ld))[None, :]
    for i in range(gl.cdiv(K, BK)):
        s = i % STAGES
        a = gl.load(a_ptr + am * K + (i * BK + ak))
        b = gl.load(b_ptr + (i * BK + bk) * BN + bn)
        mbarrier.wait(empty.index(s), phase=((i // STAGES) & 1) ^ 1)
        a_bufs.index(s).store(a)
        b_bufs.index(s).store(b)
        fence_async_shared()
        gl.thread_barrier()  # every producer thread's stores before the one arrive
        mbarrier.arrive(ready.index(s), count=1)


@gluon.jit
def _barriers(STAGES: gl.constexpr):
    """A ready and an empty mbarrier per stage (layouts cannot be passed to a jit function: the buffers are
    allocated by the kernels)."""
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    return ready, empty


@gluon.jit
def ws_gemm_tma(a_desc, b_desc, c_ptr, K, STAGES: gl.constexpr):
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = b_desc.block_type.shape[1]
    a_bufs = gl.allocate_shared_memory(gl.float16, [STAGES, BM, BK], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(gl.float16, [STAGES, BK, BN], b_desc.layout)
    ready, empty = _barriers(STAGES)
    gl.warp_specialize([
        (consumer, (a_bufs, b_bufs, ready, empty, c_ptr, K, BM, BN, BK, STAGES)),
        (tma_producer, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, K, BK, STAGES)),
    ], [1], [24])  # fmt: skip


@gluon.jit
def ws_gemm_loads(a_ptr, b_ptr, c_ptr, K, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                  STAGES: gl.constexpr):  # fmt: skip
    a_bufs = gl.allocate_shared_memory(gl.float16, [STAGES, BM, BK],
                                       gl.NVMMASharedLayout.get_default_for([BM, BK], gl.float16))  # fmt: skip
    b_bufs = gl.allocate_shared_memory(gl.float16, [STAGES, BK, BN],
                                       gl.NVMMASharedLayout.get_default_for([BK, BN], gl.float16))  # fmt: skip
    ready, empty = _barriers(STAGES)
    gl.warp_specialize([
        (consumer, (a_bufs, b_bufs, ready, empty, c_ptr, K, BM, BN, BK, STAGES)),
        (load_producer, (a_ptr, b_ptr, a_bufs, b_bufs, ready, empty, K, BM, BN, BK, STAGES)),
    ], [4], [96])  # fmt: skip


def main() -> None:
    bm, bn, bk, stages = 64, 64, 64, 3
    sig = {"a_desc": descriptor_type("fp16", [bm, bk], gl.float16), "b_desc": descriptor_type("fp16", [bk, bn], gl.float16),
           "c_ptr": "*fp32", "K": "i32", "STAGES": "constexpr"}  # fmt: skip
    report("TMA producer (1 warp) + wgmma consumer (4 warps)", compile_gluon(ws_gemm_tma, sig, dict(STAGES=stages)),
           KEYS)  # fmt: skip
    sig = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "K": "i32", "BM": "constexpr", "BN": "constexpr",
           "BK": "constexpr", "STAGES": "constexpr"}  # fmt: skip
    ck = compile_gluon(ws_gemm_loads, sig, dict(BM=bm, BN=bn, BK=bk, STAGES=stages),
                       {(i,): [["tt.divisibility", 16]] for i in range(3)})  # fmt: skip
    report("load producer (4 warps) + wgmma consumer (4 warps)", ck, KEYS)


if __name__ == "__main__":
    main()
