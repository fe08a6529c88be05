"""How many instructions a warp-specialized decode-attention loop costs outside the decode: a Gluon prototype,
compiled for sm_90 without a GPU (never run; Gluon has no interpreter).

    python scripts/gluon_sm90/decode_attention_pipeline.py

One program attends the query rows of one KV head (8 rows: Llama-3.1-8B's 4 padded to the wgmma's N) to a run of
64-token tiles of fp16 K and V. A 1-warp producer brings each tile into a ring of shared stages with TMA; the
consumer warpgroup computes ``S = K q^T`` (wgmma, M = 64 tokens, N = 8 rows), the online softmax, writes ``P`` to
shared memory and accumulates ``O^T += V^T P`` (M = 128 channels). PackKV's kernel would replace the TMA producer
by warps that decode packed bytes into the same stages (today's ``tiles.py`` decode, ~500 of its 1,069 loop
instructions per warp and tile); the consumer's loop is the rest, which the Triton kernel spends ~570 on. This
script prints the consumer loop's count, the number to compare (``packkv_ops/kernels/NOTES.md``, 2026-12-05c).

Per-token scales and zeros, masks, the exact window and the split merge are left out: they add loads per tile, not
structure. On a GPU, ``--gpu`` checks it against ``F.scaled_dot_product_attention`` and times both (untried: no
GPU was lent when it was written).
"""

from __future__ import annotations

import re

from sass import compile_gluon, opcodes, report, sass_of
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

LOG2E = 1.4426950408889634


@gluon.jit
def _consumer(q_s, k_bufs, v_bufs, p_s, ready, empty, o_ptr, m_ptr, l_ptr, n_tiles, qk_scale,
              T: gl.constexpr, D: gl.constexpr, R: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                  instr_shape=[16, R, 16])  # fmt: skip
    rows: gl.constexpr = gl.SliceLayout(0, mma)
    m_i = gl.full([R], float("-inf"), gl.float32, rows)
    l_t = gl.zeros([T, R], gl.float32, mma)  # softmax sums kept per token: no cross-warp sum per tile
    o_t = gl.zeros([D, R], gl.float32, mma)
    for i in range(n_tiles):
        s = i % STAGES
        mbarrier.wait(ready.index(s), phase=(i // STAGES) & 1)
        tok = warpgroup_mma(k_bufs.index(s), q_s.permute([1, 0]), gl.zeros([T, R], gl.float32, mma), use_acc=False,
                            is_async=True)  # fmt: skip
        sc = warpgroup_mma_wait(num_outstanding=0, deps=(tok,)) * qk_scale
        m_new = gl.maximum(m_i, gl.max(sc, axis=0))  # the token max: across the warpgroup's 4 warps
        p = gl.exp2(sc - m_new[None, :])
        alpha = gl.exp2(m_i - m_new)
        l_t = l_t * alpha[None, :] + p
        o_t = o_t * alpha[None, :]
        m_i = m_new
        p_s.store(p.to(gl.float16))
        fence_async_shared()
        gl.thread_barrier()  # every consumer warp's part of P before the wgmma reads it
        tok = warpgroup_mma(v_bufs.index(s).permute([1, 0]), p_s, o_t, is_async=True)
        o_t = warpgroup_mma_wait(num_outstanding=0, deps=(tok,))
        mbarrier.arrive(empty.index(s), count=1)
    cd = gl.arange(0, D, gl.SliceLayout(1, mma))
    cr = gl.arange(0, R, rows)
    gl.store(o_ptr + cr[None, :] * D + cd[:, None], o_t)
    gl.store(m_ptr + cr, m_i)
    gl.store(l_ptr + cr, gl.sum(l_t, axis=0))


@gluon.jit
def _tma_producer(k_desc, v_desc, k_bufs, v_bufs, ready, empty, row0, n_tiles, T: gl.constexpr,
                  STAGES: gl.constexpr):  # fmt: skip
    for i in range(n_tiles):
        s = i % STAGES
        mbarrier.wait(empty.index(s), phase=((i // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(s), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [row0 + i * T, 0], ready.index(s), k_bufs.index(s))
        tma.async_copy_global_to_shared(v_desc, [row0 + i * T, 0], ready.index(s), v_bufs.index(s))


@gluon.jit
def decode_attention(q_ptr, k_desc, v_desc, o_ptr, m_ptr, l_ptr, n_tiles, qk_scale, R: gl.constexpr,
                     STAGES: gl.constexpr):  # fmt: skip
    """Program (head, split): the ``R`` query rows of KV head ``head`` (a row of K/V per token, ``L`` tokens per
    head, ``n_tiles`` 64-token tiles per split) against its split's tiles; writes the split's unnormalized ``O``,
    row maxima (log2 units) and sums for a merge."""
    T: gl.constexpr = k_desc.block_type.shape[0]
    D: gl.constexpr = k_desc.block_type.shape[1]
    head = gl.program_id(0)
    split = gl.program_id(1)
    part = head * gl.num_programs(1) + split
    # The query rows, K-major as the wgmma's B operand wants them ([R, D], read as [D, R] through permute).
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [gl.num_warps(), 1], [1, 0])
    q = gl.load(q_ptr + (head * R + gl.arange(0, R, gl.SliceLayout(1, ld)))[:, None] * D
                + gl.arange(0, D, gl.SliceLayout(0, ld))[None, :])  # fmt: skip
    q_s = gl.allocate_shared_memory(gl.float16, [R, D], gl.NVMMASharedLayout.get_default_for([R, D], gl.float16),
                                    value=q)  # fmt: skip
    p_s = gl.allocate_shared_memory(gl.float16, [T, R], gl.NVMMASharedLayout.get_default_for([T, R], gl.float16))
    k_bufs = gl.allocate_shared_memory(gl.float16, [STAGES, T, D], k_desc.layout)
    v_bufs = gl.allocate_shared_memory(gl.float16, [STAGES, T, D], v_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    fence_async_shared()
    gl.warp_specialize([
        (_consumer, (q_s, k_bufs, v_bufs, p_s, ready, empty, o_ptr + part * R * D, m_ptr + part * R,
                     l_ptr + part * R, n_tiles, qk_scale, T, D, R, STAGES)),
        (_tma_producer, (k_desc, v_desc, k_bufs, v_bufs, ready, empty, part * n_tiles * T, n_tiles, T, STAGES)),
    ], [1], [24])  # fmt: skip


def innermost_loops(sass: str, opcode: str) -> list[tuple[int, str]]:
    """Every innermost loop (label .. backward branch, holding no other such loop) with ``opcode`` in it, in code
    order: its instruction count and top opcodes. The mbarrier waits are loops of their own (a try-wait and a
    branch), placed out of line."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    spans = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and labels[m.group(1)] < i:
            ops = opcodes("\n".join(lines[labels[m.group(1)] : i + 1]))
            if ops[opcode]:
                spans.append((labels[m.group(1)], i, ops))
    inner = [(a, b, ops) for a, b, ops in spans if not any(a <= c and d <= b and (c, d) != (a, b) for c, d, _ in spans)]
    return [(sum(ops.values()), ", ".join(f"{k} {v}" for k, v in ops.most_common(14))) for _, _, ops in sorted(inner)]


def innermost_loop(sass: str, opcode: str) -> tuple[int, str]:
    """The smallest loop holding ``opcode`` (``innermost_loops``)."""
    return min(innermost_loops(sass, opcode))


def run_on_gpu(batch: int, context: int, heads: int = 8, n_rep: int = 4, d: int = 128, splits: int = 16) -> None:
    """Check against SDPA and time both (medians of ``triton.testing.do_bench``). fp16 K/V: this measures the
    pipeline's structure without the decode, so it bounds what a decoding producer could reach."""
    import torch
    import torch.nn.functional as F
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.testing import do_bench

    t, r = 64, 8
    assert context % (t * splits) == 0 and n_rep <= r
    dev = "cuda"
    q = torch.randn(batch, heads * n_rep, 1, d, device=dev, dtype=torch.float16)
    k = torch.randn(batch, heads, context, d, device=dev, dtype=torch.float16)
    v = torch.randn(batch, heads, context, d, device=dev, dtype=torch.float16)
    rows = torch.zeros(batch * heads, r, d, device=dev, dtype=torch.float16)  # n_rep real rows, the rest zero
    rows[:, :n_rep] = q.view(batch * heads, n_rep, d)
    layout = gl.NVMMASharedLayout.get_default_for([t, d], gl.float16)
    k_desc = TensorDescriptor.from_tensor(k.view(-1, d), [t, d], layout)
    v_desc = TensorDescriptor.from_tensor(v.view(-1, d), [t, d], layout)
    n = batch * heads * splits
    o = torch.empty(n, r, d, device=dev, dtype=torch.float32)
    m = torch.empty(n, r, device=dev, dtype=torch.float32)
    l = torch.empty(n, r, device=dev, dtype=torch.float32)
    n_tiles = context // (t * splits)

    def kernel():
        decode_attention[(batch * heads, splits)](rows, k_desc, v_desc, o, m, l, n_tiles, LOG2E / d**0.5, R=r,
                                                  STAGES=3, num_warps=4)  # fmt: skip

    def fused():
        kernel()
        w = torch.exp2(m - m.view(batch * heads, splits, r).amax(1).repeat_interleave(splits, 0))
        w = w.view(batch * heads, splits, r)
        out = (o.view(batch * heads, splits, r, d) * w[..., None]).sum(1) / (l.view(batch * heads, splits, r) * w).sum(1)[..., None]
        return out[:, :n_rep].reshape(batch, heads * n_rep, 1, d)

    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
    got = fused()
    err = ((got - want).abs().max() / want.abs().max()).item()
    sdpa = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), return_mode="median")
    alone = do_bench(kernel, return_mode="median")
    ours = do_bench(fused, return_mode="median")
    print(f"B{batch} / {context}: max error {err:.2e} of the largest output; pipeline kernel {alone:.3f} ms, "
          f"{ours:.3f} ms with a torch merge; SDPA {sdpa:.3f} ms")  # fmt: skip


def main() -> None:
    t, d, r, stages = 64, 128, 8, 3
    sig = {"q_ptr": "*fp16", "k_desc": descriptor_type("fp16", [t, d], gl.float16),
           "v_desc": descriptor_type("fp16", [t, d], gl.float16), "o_ptr": "*fp32", "m_ptr": "*fp32",
           "l_ptr": "*fp32", "n_tiles": "i32", "qk_scale": "fp32", "R": "constexpr", "STAGES": "constexpr"}  # fmt: skip
    ck = compile_gluon(decode_attention, sig, dict(R=r, STAGES=stages), {(0,): [["tt.divisibility", 16]]})
    report("warp-specialized decode attention (TMA producer, wgmma consumer)", ck,
           ("HGMMA", "SYNCS", "BAR", "UTMALDG", "MUFU", "SHFL", "STS", "LDS"))  # fmt: skip
    sass = sass_of(ck)
    for part, opcode in (("consumer", "HGMMA"), ("producer", "UTMALDG")):
        n, top = innermost_loop(sass, opcode)
        print(f"{part} loop: {n} instructions per 64-token tile and warp ({top})")


if __name__ == "__main__":
    import sys

    if "--gpu" in sys.argv:  # on the GPU machine: correctness against SDPA, then times side by side
        for b, ctx in ((8, 32768), (1, 131072)):
            run_on_gpu(b, ctx, splits=16 if b == 8 else 64)
    else:
        main()
