"""GPU tests (H100): the packkv ops through their CUDA paths at real sizes and on real K/V.

Run on the GPU machine with ``python -m pytest -m cuda``; CPU machines deselect them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import spec

from packkv.ops import Layout, PackedLayer, PackKVConfig, reference
from packkv.ops.reference import decompress_fp32, flush_count

pytestmark = pytest.mark.cuda
REAL_KV = Path(__file__).parent / "data" / "smollm2_kv.safetensors"
PLAIN = PackKVConfig(k_rel=0.1, v_rel=0.2, rotation="none")  # checked in stored = original coordinates


def to(st: PackedLayer, device) -> PackedLayer:
    import dataclasses

    from packkv.ops.storage import STORAGE_FIELDS

    return dataclasses.replace(st, **{f: getattr(st, f).to(device) for f in STORAGE_FIELDS})


def fill_cuda(cfg, k, v, steps):
    """Append k/v [B, H, L, D] (on CUDA) through torch.ops.packkv.append_ in `steps`."""
    B, H, L, D = k.shape
    lay = Layout.from_config(cfg, H, D)
    nb = L // cfg.block_size + 2
    st = PackedLayer.empty(lay, B, k.dtype, k.device, nb, B * nb * H * (lay.max_chunk_words(lay.k) + lay.max_chunk_words(lay.v)))
    pos = 0
    for p in steps:
        nf = flush_count(int(st.n_win[0]), p, lay)
        torch.ops.packkv.append_(*st.tensors(), k[:, :, pos : pos + p], v[:, :, pos : pos + p], nf, *spec(lay))
        pos += p
    return st


@pytest.mark.parametrize("grouping", ["token", "channel"])
def test_real_size_append_equals_the_cpu_reference(grouping):
    cfg = PackKVConfig(k_grouping=grouping, rotation="none")
    B, H, L, D = 3, 8, 4096 + 37, 128
    k = (torch.randn(B, H, L, D) * 3).bfloat16()
    v = torch.randn(B, H, L, D).bfloat16()
    gpu = fill_cuda(cfg, k.cuda(), v.cuda(), [L - 40, 1, 1, 38])
    torch.cuda.synchronize()
    cpu = PackedLayer.empty(gpu.layout, B, k.dtype, "cpu", gpu.block_capacity, gpu.pool_capacity)
    pos = 0
    for p in [L - 40, 1, 1, 38]:
        reference.append_(cpu, k[:, :, pos : pos + p], v[:, :, pos : pos + p], flush_count(int(cpu.n_win[0]), p, cpu.layout))
        pos += p
    back = to(gpu, "cpu")
    assert torch.equal(back.n_blocks, cpu.n_blocks) and torch.equal(back.n_win, cpu.n_win)
    # Quantization runs the same torch ops on both devices (IEEE division, exact rounding): bit-exact.
    cur = int(cpu.cursor)
    same = (back.pool[:cur] == cpu.pool[:cur]).float().mean().item()
    assert int(back.cursor) == cur and same == 1.0, same
    for a, b in zip(decompress_fp32(back, L), decompress_fp32(cpu, L)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("n_rep", [1, 4])
@pytest.mark.parametrize("mask_kind", [None, "padding", "causal"])
def test_real_size_attention_matches_the_reference(n_rep, mask_kind):
    B, H, L, D = 3, 8, 8192 + 11, 128
    k = (torch.randn(B, H, L, D) * 3).bfloat16().cuda()
    v = torch.randn(B, H, L, D).bfloat16().cuda()
    st = fill_cuda(PLAIN, k, v, [L - 1, 1])
    st.n_blocks[2] -= 5  # ragged batch
    st.n_win[2] -= 3
    out_len = L + 70  # zero keys past each sequence's end, as decompress returns them
    tq = 1 if mask_kind != "causal" else 4
    q = torch.randn(B, H * n_rep, tq, D, device="cuda")
    mask = None
    if mask_kind == "padding":
        mask = torch.ones(B, 1, tq, out_len, dtype=torch.bool, device="cuda")
        mask[1, :, :, :300] = False  # left padding of a shorter sequence
        mask[:, :, :, L:] = False
    got = torch.ops.packkv.attention(q, *st.tensors(), out_len, mask, mask_kind == "causal", None, *spec(st.layout))
    want = reference.attention(q, st, out_len, mask, mask_kind == "causal", None)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # bf16 queries: the model dtype's rounding only.
    got16 = torch.ops.packkv.attention(q.bfloat16(), *st.tensors(), out_len, mask, mask_kind == "causal", None, *spec(st.layout))
    torch.testing.assert_close(got16.float(), want, rtol=2e-2, atol=2e-2)
    # Variants: the query rows padded to 4 (min_rows=1), and as the products' N dimension (rows_as_n); without
    # lane extraction (lanes=0: the former asm), and lanes with the tiles' rows in token order (lanes=1); the
    # softmax sums kept per token and summed once per split (defer_sums); all on the Triton kernel (gluon=False: on
    # sm_90 the op takes the Gluon kernel for the bf16 decode steps, tests/test_gluon_attention.py)
    from packkv.ops.kernels import attention as kernel

    for kw in (dict(min_rows=1), dict(rows_as_n=True), dict(rows_as_n=True, min_rows=1), dict(lanes=0),
               dict(lanes=1), dict(lanes=0, pairs=False), dict(defer_sums=True)):  # fmt: skip
        kw["gluon"] = False
        got = kernel.attention(q, st, out_len, mask, mask_kind == "causal", None, **kw)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        got = kernel.attention(q.bfloat16(), st, out_len, mask, mask_kind == "causal", None, **kw)
        torch.testing.assert_close(got.float(), got16.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("cfg", [PackKVConfig(k_rel=0.05, v_rel=0.15, rotation="none"),
                                 PackKVConfig(k_rel=0.1, v_rel=0.2, pack_size=32, rotation="none")],
                         ids=["5_bit_keys_split", "pack_32_split_lanes"])  # fmt: skip
def test_real_size_attention_on_packs_wider_than_64_bits(cfg):
    """Packs of up to 128 bits are read as two halves (tiles.split_packs) and match the reference."""
    from packkv.ops.kernels import attention as kernel
    from packkv.ops.kernels.tiles import decode_paths

    B, H, L, D = 2, 8, 4096 + 11, 128
    k = (torch.randn(B, H, L, D) * 3).bfloat16().cuda()
    v = torch.randn(B, H, L, D).bfloat16().cuda()
    st = fill_cuda(cfg, k, v, [L - 1, 1])
    lay = st.layout
    assert "split" in decode_paths(lay.pack_size, D, lay.block_size, lay.k.qbits, lay.v.qbits)
    q = torch.randn(B, H * 4, 1, D, device="cuda")
    want = reference.attention(q, st, L, None, False, None)
    torch.testing.assert_close(kernel.attention(q, st, L, None, False, None), want, rtol=1e-4, atol=1e-4)
    per_value = kernel.attention(q, st, L, None, False, None, paired=False)  # the path they took before
    torch.testing.assert_close(per_value, want, rtol=1e-4, atol=1e-4)


def test_real_size_head_dim_256_attention_shares_one_pack_start_scan():
    """head_dim 256 with 4-bit keys: 64-token tiles of up to 2^16 bits per stream, on the paired scan and lanes."""
    from packkv.ops.kernels import attention as kernel
    from packkv.ops.kernels.tiles import decode_paths

    B, H, L, D = 2, 4, 4096 + 11, 256
    k = (torch.randn(B, H, L, D) * 3).bfloat16().cuda()
    v = torch.randn(B, H, L, D).bfloat16().cuda()
    st = fill_cuda(PLAIN, k, v, [L - 1, 1])
    lay = st.layout
    assert decode_paths(lay.pack_size, D, lay.block_size, lay.k.qbits, lay.v.qbits) == ("lanes", "lanes")
    q = torch.randn(B, H * 2, 1, D, device="cuda")
    want = reference.attention(q, st, L, None, False, None)
    torch.testing.assert_close(kernel.attention(q, st, L, None, False, None), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kernel.attention(q, st, L, None, False, None, paired=False), want, rtol=1e-4, atol=1e-4)


def test_real_kv_error_bound_and_attention():
    from safetensors.torch import load_file

    t = load_file(REAL_KV)
    for layer in ("layer0", "layer14", "layer29"):
        k, v = t[f"{layer}.k"][None].cuda(), t[f"{layer}.v"][None].cuda()  # [1, 3, 1024, 64]
        st = fill_cuda(PLAIN, k, v, [1000, 1, 23])
        kd, vd = decompress_fp32(st, 1024)
        ncomp = int(st.n_blocks[0]) * 64
        for x, xd, rel in ((k, kd, 0.1), (v, vd, 0.2)):
            xc = x[:, :, :ncomp].float()
            rng = (xc.amax((1, 3), keepdim=True) - xc.amin((1, 3), keepdim=True))
            amax = xc.abs().amax((1, 3), keepdim=True)
            assert torch.all((xd[:, :, :ncomp] - xc).abs() <= rel / 2 * rng * (1 + 2**-7) + amax * 2**-15 + 1e-6)
        q = torch.randn(1, 9, 1, 64, device="cuda")
        got = torch.ops.packkv.attention(q, *st.tensors(), 1024, None, False, None, *spec(st.layout))
        want = F.scaled_dot_product_attention(q, kd, vd, enable_gqa=True)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_opcheck_on_cuda():
    k = torch.randn(2, 2, 300, 64, device="cuda").bfloat16()
    st = fill_cuda(PLAIN, k, k.clone(), [300])
    new = torch.randn(2, 2, 1, 64, device="cuda").bfloat16()
    state = [t.clone() for t in st.tensors()]
    for test in ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"):
        args = (*[t.clone() for t in state], new, new.clone(), 0, *spec(st.layout))
        torch.library.opcheck(torch.ops.packkv.append_, args, test_utils=test)
    torch.library.opcheck(torch.ops.packkv.decompress, (*st.tensors(), 310, *spec(st.layout)))
    q = torch.randn(2, 8, 1, 64, device="cuda").bfloat16()
    torch.library.opcheck(torch.ops.packkv.attention, (q, *st.tensors(), 310, None, False, None, *spec(st.layout)))


def test_generate_on_cuda_equals_dynamic_cache():
    from test_cache import EXACT, generate, prompts, tiny
    from transformers import DynamicCache

    from packkv import PackKVCache

    model = tiny("llama").cuda()
    ids, mask = prompts(3)
    ids, mask = ids.cuda(), mask.cuda()
    ref = generate(model, ids, mask, DynamicCache(config=model.config))
    assert torch.equal(generate(model, ids, mask, PackKVCache(EXACT)), ref)


def test_rotation_on_cuda_matches_the_cpu_ops():
    from helpers import fill

    k, v = torch.randn(2, 8, 1000, 128), torch.randn(2, 8, 1000, 128)
    k[..., 5] *= 20  # an outlier channel
    k, v = k.bfloat16(), v.bfloat16()
    cfg = PackKVConfig(rotation="hadamard")
    gpu = fill_cuda(cfg, k.cuda(), v.cuda(), [999, 1])
    cpu = fill(cfg, k, v, steps=[999, 1])
    for a, b in zip(torch.ops.packkv.decompress(*gpu.tensors(), 1000, *spec(gpu.layout)),
                    torch.ops.packkv.decompress(*cpu.tensors(), 1000, *spec(cpu.layout))):  # fmt: skip
        # The rotation's matmul may round differently on the GPU, moving a rare value by one quantization step.
        a, b = a.cpu().float(), b.float()
        assert ((a - b).abs() <= 1e-2 + 1e-2 * b.abs()).float().mean() > 0.99
    q = torch.randn(2, 32, 1, 128)
    got = torch.ops.packkv.attention(q.cuda(), *gpu.tensors(), 1000, None, False, None, *spec(gpu.layout))
    want = torch.ops.packkv.attention(q, *cpu.tensors(), 1000, None, False, None, *spec(cpu.layout))
    torch.testing.assert_close(got.cpu(), want, rtol=2e-2, atol=2e-2)


def test_rotation_inside_the_attention_kernels_matches_rotation_around_them(monkeypatch):
    """``ROTATE_IN_KERNEL``: the op's query and output rotations move into the attention and merge kernels."""
    from packkv.ops.kernels import attention as kernel

    monkeypatch.setattr(kernel, "GLUON", False)  # the Triton kernel's switch (the Gluon kernel always rotates inside)

    k = torch.randn(2, 8, 3000, 128).bfloat16().cuda()
    v = torch.randn(2, 8, 3000, 128).bfloat16().cuda()
    st = fill_cuda(PackKVConfig(rotation="hadamard"), k, v, [2999, 1])
    q = torch.randn(2, 32, 1, 128).bfloat16().cuda()
    mask = torch.ones(2, 1, 1, 3100, dtype=torch.bool, device="cuda")
    mask[1, ..., :200] = False
    monkeypatch.setattr(kernel, "ROTATE_IN_KERNEL", False)
    around = torch.ops.packkv.attention(q, *st.tensors(), 3100, mask, False, None, *spec(st.layout))
    monkeypatch.setattr(kernel, "ROTATE_IN_KERNEL", True)
    inside = torch.ops.packkv.attention(q, *st.tensors(), 3100, mask, False, None, *spec(st.layout))
    torch.testing.assert_close(inside.float(), around.float(), rtol=2e-2, atol=2e-2)


def test_flushes_ahead_replayed_from_a_cuda_graph_store_what_eager_flushes_store():
    """``packkv.compile``'s cache compresses each layer's oldest ring block before a compiled step; on CUDA all layers'
    flushes replay one CUDA graph (``FlushGraph``: eager once per storage, then captured). Across flushes, refills
    and a storage growth (a new graph), every layer holds what eager flushes leave, bit for bit."""
    from packkv.models.cache import PackKVCache

    cfg = PackKVConfig()
    g = torch.Generator(device="cuda").manual_seed(0)
    caches = {mode: PackKVCache(cfg) for mode in ("graph", "eager")}
    caches["graph"].graph_flushes, caches["eager"].graph_flushes = True, False

    def add(tokens):
        kv = [torch.randn(2, 8, tokens, 128, device="cuda", generator=g).bfloat16() for _ in range(6)]
        for cache in caches.values():
            for i in range(3):
                cache.update(kv[2 * i], kv[2 * i + 1], i)

    add(cfg.window + cfg.block_size - 1)  # one token short of a flush
    graphs = []
    for _ in range(6):  # the fifth flush outgrows the first storage (4 blocks)
        for cache in caches.values():
            cache._flush_ahead(1)
        fg = caches["graph"]._flush_graph
        graphs.append((fg, fg.graph is not None))
        for a, b in zip(caches["graph"].layers, caches["eager"].layers):
            assert (a.n_blocks, a.n_win) == (b.n_blocks, b.n_win) == (int(a.storage.n_blocks[0]), int(a.storage.n_win[0]))
            assert torch.equal(a.storage.pool[: int(a.storage.cursor)], b.storage.pool[: int(b.storage.cursor)])
            n = a.tokens
            for x, y in zip(torch.ops.packkv.decompress(*a.storage.tensors(), n, *spec(a.storage.layout)),
                            torch.ops.packkv.decompress(*b.storage.tensors(), n, *spec(b.storage.layout))):  # fmt: skip
                assert torch.equal(x, y)
        add(cfg.block_size)
    # Eager, captured, replayed...; the storage grew at the fifth: a new graph, eager once, then captured.
    assert [captured for _, captured in graphs] == [False, True, True, True, False, True], graphs
    assert len({id(fg) for fg, _ in graphs}) == 2  # (all held here: no id is reused)
