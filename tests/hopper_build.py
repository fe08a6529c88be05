"""Compile the compression kernels for the H100/H200 (sm_90) without a GPU (run by test_kernel_build.py in a
process without ``TRITON_INTERPRET``: interpreted kernels cannot be compiled)."""

from __future__ import annotations

import inspect
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource

from packkv.ops import Layout, PackKVConfig
from packkv.ops.kernels import fused_append, matvec, pack, quantize, token
from packkv.ops.kernels._launch import next_pow2

HOPPER = GPUTarget("cuda", 90, 32)


def compile_for_hopper(kernel, consts: dict, types: dict) -> str:
    """PTX of ``kernel`` with these constexprs (and its constexpr defaults, as a launch applies them); pointers
    default to int32, scalars to i32."""
    defaults = {p.name: p.default for p in kernel.params if p.is_constexpr and p.default is not inspect.Parameter.empty}
    consts = defaults | consts
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        else:
            sig[name] = types.get(name, "*i32" if name.endswith("_ptr") else "i32")
    return triton.compile(ASTSource(kernel, sig, constexprs=consts), target=HOPPER, options={"num_warps": 4}).asm["ptx"]


CONFIGS = {
    "defaults": PackKVConfig(),
    "channel_keys_token_head_values": PackKVConfig(k_grouping="channel", v_grouping="token_head", block_size=32),
    "wide_ints_p32": PackKVConfig(k_rel=1e-4, v_rel=0.02, pack_size=32, repack="none"),
}


def compression_kernels(name: str) -> None:
    cfg = CONFIGS[name]
    lay = Layout.from_config(cfg, num_heads=8, head_dim=128)
    qdt = "*u8" if max(lay.k.qbits, lay.v.qbits) <= 8 else "*i32"
    floats = {n: "*bf16" for n in ("new_k_ptr", "new_v_ptr", "ring_k_ptr", "ring_v_ptr", "k_scale_ptr", "v_scale_ptr")}
    ints = {"kq_ptr": qdt, "vq_ptr": qdt, "q_ptr": qdt, "perm_ptr": "*u8", "k_zero_ptr": "*i16", "v_zero_ptr": "*i16"}
    T, D, P = lay.block_size, lay.head_dim, lay.pack_size
    ptx = compile_for_hopper(quantize._quantize_kernel, dict(
        T=T, D=D, K_REL=lay.k.rel, K_QMAX=lay.k.qmax, K_GROUP=lay.k.grouping,
        V_REL=lay.v.rel, V_QMAX=lay.v.qmax, V_GROUP=lay.v.grouping,
        MEDIAN=cfg.repack == "median", LVP=next_pow2(lay.v.qmax + 1), FB=quantize._histogram_bits(8, lay.v.qmax)),
        floats | ints)  # fmt: skip
    assert "div.rn.f32" in ptx  # IEEE division, as torch divides: the integers match the reference
    assert "0f4B400000" in ptx and "0fCB400000" in ptx  # round-half-even by +-1.5 * 2**23, not folded away
    for s in (lay.k, lay.v):  # wide_ints_p32 takes the multi-lane packing path
        mw = lay.meta_words(s)
        compile_for_hopper(pack._pack_chunk_kernel, dict(T=T, D=D, P=P, R=lay.rows, QBITS=s.qbits, MBITS=s.mbits,
                           MW=mw, MWP=next_pow2(mw), J=next_pow2(32 // s.mbits + 2), NL=pack._payload_lanes(s, lay),
                           NLP=next_pow2(pack._payload_lanes(s, lay))),
                           ints)  # fmt: skip
    compile_for_hopper(pack._compact_kernel, dict(BLOCK=256), {})
    rings = {n: "*bf16" for n in ("k_ptr", "v_ptr", "ring_k_ptr", "ring_v_ptr")}
    for rotate in (False, True):  # the decode-token kernel with and without its Hadamard product
        compile_for_hopper(token._append_token_kernel, dict(T=T, D=D, HP=next_pow2(lay.num_heads), ROTATE=rotate),
                           rings | {"inv_sqrt": "fp32"})  # fmt: skip
    for rotate in (False, True):  # the merge that takes the decode step's token (fused_append, an experiment)
        compile_for_hopper(fused_append._merge_append_kernel, dict(D=D, BS=64, HP=next_pow2(lay.num_heads),
                           ROTATE=rotate, HAS_MASK=True), rings | {"acc_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32",
                           "out_ptr": "*bf16", "q_ptr": "*bf16", "mask_ptr": "*i1", "qk_scale": "fp32",
                           "inv_sqrt": "fp32"})  # fmt: skip
    for stream, s in (("k", lay.k), ("v", lay.v)):  # the paper's mat-vec pair decoded as the attention decodes
        if matvec.windows_fit(lay, stream):
            kernel = matvec._k_matvec_windows_kernel if stream == "k" else matvec._v_matvec_windows_kernel
            compile_for_hopper(kernel, dict(T=T, D=D, P=P, QBITS=s.qbits, MBITS=s.mbits, MW=lay.meta_words(s),
                               GROUP=s.grouping, USE_ASM=True), {"q_ptr": "*bf16", "w_ptr": "*fp32",
                               "out_ptr": "*fp32", "scale_ptr": "*bf16", "zero_ptr": "*i16"})  # fmt: skip

if __name__ == "__main__":
    for name in sys.argv[1:] or sorted(CONFIGS):
        compression_kernels(name)
        print(name, "ok")
