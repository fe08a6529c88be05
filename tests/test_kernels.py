"""The CUDA paths (Triton kernels + device-side glue) against the reference, under the Triton interpreter on
CPU (and natively on a GPU: the same tests run there with -m cuda)."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import triton
import triton.language as tl

from packkv.ops import Layout, PackedLayer, PackKVConfig, reference
from packkv.ops.kernels import gpu
from packkv.ops.kernels.hadamard import fwht_rows
from packkv.ops.reference import flush_ahead_count, flush_count, max_flush_count
from packkv.ops.rotation import rotate

from conftest import HAS_CUDA
from helpers import MATVEC_ROUNDINGS, int_and_zero_terms

DEV = "cuda" if HAS_CUDA else "cpu"
LIVE_FIELDS = ("k_meta", "k_offsets", "k_scale", "k_zero", "v_meta", "v_offsets", "v_scale", "v_zero", "perm")


@pytest.fixture(autouse=True)
def _triton_kernel(monkeypatch):
    """These tests specify the Triton kernels: on an sm_90 GPU the attention op would take the Gluon kernel for the
    decode steps it covers (``tests/test_gluon_attention.py`` specifies that one)."""
    from packkv.ops.kernels import attention as attention_kernel

    monkeypatch.setattr(attention_kernel, "GLUON", False)


def build(cfg: PackKVConfig, steps: list, heads=2, dim=64, batch=2, dtype=torch.bfloat16, seed=0):
    """The same tokens appended through the reference and through the CUDA path: (reference, kernel, k, v).
    A step is a token count (compressing what it must), 0 (a flush ahead of a one-token step: no tokens,
    ``flush_ahead_count`` blocks), or ``(tokens, "max")`` (compressing every whole block it can)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(p[0] if isinstance(p, tuple) else p for p in steps)
    k = (torch.randn(batch, heads, n, dim, generator=g) * 2).to(dtype).to(DEV)
    v = torch.randn(batch, heads, n, dim, generator=g).to(dtype).to(DEV)
    lay = Layout.from_config(cfg, heads, dim)
    nb = n // cfg.block_size + 1
    pw = batch * nb * heads * (lay.max_chunk_words(lay.k) + lay.max_chunk_words(lay.v))
    out = []
    for append in (reference.append_, gpu.append_):
        st = PackedLayer.empty(lay, batch, dtype, DEV, nb, pw)
        pos = 0
        for p in steps:
            nw = int(st.n_win[0])
            if isinstance(p, tuple):
                p, n_flush = p[0], max_flush_count(nw, p[0], lay)
            else:
                n_flush = flush_count(nw, p, lay) if p else flush_ahead_count(nw, 1, lay)
            append(st, k[:, :, pos : pos + p], v[:, :, pos : pos + p], n_flush)
            pos += p
        out.append(st)
    return out[0], out[1], k, v


def assert_same_storage(ref: PackedLayer, ker: PackedLayer) -> None:
    assert torch.equal(ref.n_blocks, ker.n_blocks) and torch.equal(ref.n_win, ker.n_win)
    assert torch.equal(ref.cursor, ker.cursor)
    cur, nb = int(ref.cursor), int(ref.n_blocks[0])
    assert torch.equal(ref.pool[:cur], ker.pool[:cur])
    for f in LIVE_FIELDS:
        assert torch.equal(getattr(ref, f)[:, :nb], getattr(ker, f)[:, :nb]), f
    T, S = ref.layout.block_size, ref.layout.ring_size
    live = (nb * T + torch.arange(int(ref.n_win[0]), device=ref.device)) % S
    assert torch.equal(ref.ring_k[:, :, live], ker.ring_k[:, :, live])
    assert torch.equal(ref.ring_v[:, :, live], ker.ring_v[:, :, live])


CASES = {
    "default": (PackKVConfig(block_size=32, window=64), [150, 1, 1, 30]),
    "token_head_greedy": (PackKVConfig(block_size=32, window=64, k_grouping="token_head", repack="greedy"), [97, 40]),
    "channel_keys_p8": (PackKVConfig(block_size=32, window=32, k_grouping="channel", pack_size=8), [70, 1, 5]),
    "p32_fine_bounds": (PackKVConfig(block_size=64, window=64, k_rel=0.003, v_rel=0.02, pack_size=32), [200, 1]),
    "sixteen_bits_no_repack": (PackKVConfig(block_size=32, window=32, k_rel=1e-4, v_rel=1.0, repack="none"), [80]),
    # Flushes ahead of decode steps (as packkv.compile's steps are planned), one that has nothing to compress,
    # and appends compressing every whole block they can.
    "flush_ahead": (PackKVConfig(block_size=32, window=64), [95, 0, 1, 31, 0, 1, 0, 1, (40, "max"), (1, "max")]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_append_matches_the_reference_bit_for_bit(case):
    cfg, steps = CASES[case]
    ref, ker, _, _ = build(cfg, steps)
    assert int(ref.n_blocks[0]) > 0
    assert_same_storage(ref, ker)


@pytest.mark.parametrize("window", [64, 32])
def test_a_flush_ahead_then_a_plain_step_stores_what_a_compressing_step_stores(window):
    """packkv.compile compresses the block a decode token would overflow the ring with before the step (no new
    tokens), so that the compiled step never compresses: the result must be the same storage, on both paths."""
    cfg = PackKVConfig(block_size=32, window=window)
    prompt = window + 31  # the ring is one token short of overflowing
    direct = build(cfg, [prompt, 1, 1])
    ahead = build(cfg, [prompt, 0, 1, 1])
    for a, b in zip(direct[:2], ahead[:2]):
        assert (int(a.n_blocks[0]), int(a.n_win[0])) == (1, window + 1)
        assert_same_storage(a, b)
    for flushed in build(cfg, [prompt, 0])[:2]:  # in between, the ring holds one token less than the window
        assert (int(flushed.n_blocks[0]), int(flushed.n_win[0])) == (1, window - 1)


def test_median_over_many_heads_counts_per_head_and_matches_the_reference():
    """16 heads x 14 levels do not fit the in-register histogram of the median (5-bit fields): the per-head
    counting path must give the same permutation."""
    from packkv.ops.kernels.quantize import _histogram_bits

    cfg = PackKVConfig(block_size=32, window=32, v_rel=0.08)
    lay = Layout.from_config(cfg, 16, 64)
    assert _histogram_bits(16, lay.v.qmax) == 0 and _histogram_bits(2, lay.v.qmax) > 0
    ref, ker, _, _ = build(cfg, [70], heads=16, batch=1)
    assert_same_storage(ref, ker)


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_append_and_decompress_across_head_dims_and_dtypes(dim, dtype):
    ref, ker, _, _ = build(PackKVConfig(block_size=32, window=32), [70, 1], dim=dim, dtype=dtype, heads=1)
    assert_same_storage(ref, ker)
    n = int(ref.n_blocks[0]) * 32 + int(ref.n_win[0]) + 5
    kr, vr = reference.decompress_fp32(ref, n)
    kk, vk = gpu.decompress(ker, n)
    # The kernel rounds to the model dtype once (the interpreter may round bf16 towards zero: one ulp).
    ulp = {torch.float32: 0.0, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    for ref_x, x in ((kr, kk), (vr, vk)):
        assert x.dtype == dtype
        torch.testing.assert_close(x.float(), ref_x, rtol=ulp, atol=1e-30)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("steps,flushes", [([63], True), ([40], False)])
@pytest.mark.parametrize("where", ["keys of sequence 0", "values of sequence 1"])
def test_non_finite_tokens_leave_the_cache_unchanged(value, steps, flushes, where):
    """NaN/Inf in any sequence's new keys or values: no sequence's counters move (a decode token that compresses a
    block, or one that only enters the ring: the one-kernel path)."""
    cfg = PackKVConfig(block_size=32, window=32)
    _, ker, _, _ = build(cfg, steps)
    n = sum(steps)
    n_flush = flush_count(int(ker.n_win[0]), 1, ker.layout)
    assert (n_flush > 0) == flushes
    before = ker.clone()
    k = torch.randn(2, 2, 1, 64, device=DEV).bfloat16()
    v = torch.randn(2, 2, 1, 64, device=DEV).bfloat16()
    (k[0, 1, 0, 5:6] if where.startswith("keys") else v[1, 0, 0, 7:8]).fill_(value)
    gpu.append_(ker, k, v, n_flush)
    assert torch.equal(ker.n_blocks, before.n_blocks) and torch.equal(ker.n_win, before.n_win)
    assert torch.equal(ker.cursor, before.cursor)
    for a, b in zip(reference.decompress(before, n), reference.decompress(ker, n)):
        assert torch.equal(a, b)


def test_a_decode_token_between_flushes_takes_the_one_kernel_path_and_matches_the_reference():
    """Non-contiguous [B, H, 1, D] views (as a model's projections give) land in the ring as the reference puts them."""
    cfg = PackKVConfig(block_size=32, window=32)
    ref, ker, _, _ = build(cfg, [45], heads=3)
    for _ in range(5):
        x = torch.randn(2, 1, 3, 2, 64, device=DEV).bfloat16()
        k, v = x[..., 0, :].transpose(1, 2), x[..., 1, :].transpose(1, 2)  # strides of a fused KV projection
        assert k.shape == (2, 3, 1, 64) and not k.is_contiguous()
        assert flush_count(int(ker.n_win[0]), 1, ker.layout) == 0
        reference.append_(ref, k, v, 0)
        gpu.append_(ker, k, v, 0)
    assert_same_storage(ref, ker)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_one_kernel_path_rotates_a_decode_token_as_rotate_does(dtype):
    """rotation="hadamard": the decode-token kernel rotates the new K/V itself (model coordinates in, rotated
    tokens in the ring). The ring holds what ``rotate`` + the reference store, up to the order of the fp32 sums
    before the one rounding to the dtype (one ulp, or ~1e-5 absolute where sums of |x| ~ 3 cancel); all else is
    bit-exact."""
    cfg = PackKVConfig(block_size=32, window=32, rotation="hadamard")
    lay = Layout.from_config(cfg, 3, 64)
    assert lay.rotation == 1
    pw = 2 * 4 * 3 * (lay.max_chunk_words(lay.k) + lay.max_chunk_words(lay.v))
    ref, ker = (PackedLayer.empty(lay, 2, dtype, DEV, 4, pw) for _ in range(2))
    g = torch.Generator().manual_seed(3)
    for p in [70] + [1] * 6:  # a prefill (flushes a block: rotated eagerly on both sides), then decode tokens
        k = (torch.randn(2, 3, p, 64, generator=g) * 3).to(dtype).to(DEV)
        v = torch.randn(2, 3, p, 64, generator=g).to(dtype).to(DEV)
        n_flush = flush_count(int(ref.n_win[0]), p, lay)
        reference.append_(ref, rotate(k, 1), rotate(v, 1), n_flush)
        gpu.append_(ker, k, v, n_flush, 1)
    assert n_flush == 0 and int(ker.n_blocks[0]) == 1 and int(ker.n_win[0]) == 70 - 32 + 6
    ulp = {torch.float32: 2**-22, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    for f in ("ring_k", "ring_v"):
        a, b = getattr(ref, f), getattr(ker, f)
        torch.testing.assert_close(b.float(), a.float(), rtol=ulp, atol=2e-5)
        assert (a == b).float().mean() > 0.9  # most roundings agree
    assert_same_storage(dataclasses.replace(ref, ring_k=ker.ring_k, ring_v=ker.ring_v), ker)


def test_the_one_kernel_path_refuses_a_token_whose_rotation_overflows():
    """A finite fp16 token can rotate to +-Inf (|x H| <= sqrt(D) max|x|): refused as rotate + the reference refuse
    it, for every sequence of the batch."""
    cfg = PackKVConfig(block_size=32, window=32, rotation="hadamard")
    _, ker, _, _ = build(cfg, [40], dtype=torch.float16)
    before = ker.clone()
    k = torch.randn(2, 2, 1, 64, device=DEV).half()
    v = torch.randn(2, 2, 1, 64, device=DEV).half()
    k[1, 0, 0] = 60000.0  # its first rotated channel is 8 * 60000
    assert torch.isfinite(k).all() and not torch.isfinite(rotate(k, 1)).all()
    gpu.append_(ker, k, v, 0, 1)
    assert torch.equal(ker.n_win, before.n_win) and torch.equal(ker.ring_k, before.ring_k)
    with pytest.raises(ValueError, match="new keys"):
        reference.append_(before, rotate(k, 1), rotate(v, 1), 0)


@pytest.mark.parametrize("n_rep", [1, 4, 8])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float", "causal", "bool_row", "float_row"])
def test_attention_matches_the_reference(n_rep, mask_kind):
    ref, ker, _, _ = build(PackKVConfig(block_size=32, window=32, k_grouping="channel"), [110, 1, 1], heads=2)
    ker.n_blocks[1] -= 1  # ragged: the second sequence is shorter
    ker.n_win[1] -= 7
    ref.n_blocks[1] -= 1
    ref.n_win[1] -= 7
    tq = 1 if mask_kind is None else 3
    out_len = 112 + 20  # positions past each sequence's end are zero keys, as in decompress
    q = torch.randn(2, 2 * n_rep, tq, 64, device=DEV)
    mask, causal = None, mask_kind == "causal"
    if mask_kind == "bool":
        mask = torch.rand(2, 1, tq, out_len, device=DEV) > 0.3
    elif mask_kind == "float":
        mask = torch.randn(1, 2 * n_rep, tq, out_len, device=DEV)
    elif mask_kind == "bool_row":  # one row for all heads and queries (decode's padding mask): read per tile
        mask = torch.rand(2, 1, 1, out_len, device=DEV) > 0.3
    elif mask_kind == "float_row":
        mask = torch.randn(2, 1, 1, out_len, device=DEV)
    want = reference.attention(q, ref, out_len, mask, causal, 0.17)
    # 16 splits: more than blocks, some with nothing to do; balanced=False: splits cut out_len evenly (a variant);
    # zero_count=False: zero keys past the length as softmax tiles rather than counted (no mask, bool row mask);
    # prefetch: the next block's fields (1, the default) and also its pack bits (2) loaded an iteration ahead, or
    # nothing (0), with splits of several blocks (1), of one (3) and of none (16)
    for splits, balanced, mask_row, zero_count, prefetch in (
        (1, True, True, True, 1), (3, True, True, True, 1), (16, True, True, True, 1), (3, False, False, True, 1),
        (3, True, True, False, 1), (1, True, True, True, 0), (3, True, True, True, 0), (3, True, True, True, 2),
        (1, True, True, True, 2), (16, True, True, True, 2),
    ):  # fmt: skip
        got = gpu.attention(q, ker, out_len, mask, causal, 0.17, splits=splits, balanced=balanced, mask_row=mask_row,
                            zero_count=zero_count, prefetch=prefetch)  # fmt: skip
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    for splits in (1, 3, 16):  # zero keys per tile, not per split (zero_span=False), and spans in small chunks
        got = gpu.attention(q, ker, out_len, mask, causal, 0.17, splits=splits, zero_span=False)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
        got = gpu.attention(q, ker, out_len, mask, causal, 0.17, splits=splits, zero_chunk=16)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    # the query rows padded only to a power of two (1, 4 or 8 here), not to the MMA's 16
    got = gpu.attention(q, ker, out_len, mask, causal, 0.17, splits=3, min_rows=1)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("n_rep", [1, 4])
@pytest.mark.parametrize("mask_kind", [None, "bool_row", "float", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_query_rows_as_the_products_n_dimension_match_the_reference(mask_kind, dtype, n_rep, monkeypatch):
    """``rows_as_n``: on token-grouped K and V the compressed tiles compute ``K @ q^T`` and ``V^T @ P^T``, the few
    query rows of a KV group being the MMAs' N dimension; same results (fp32 queries within fp32 rounding, bf16
    queries within their fp16 products' rounding, as the default)."""
    ref, ker, _, _ = build(PackKVConfig(block_size=32, window=32, rotation="none"), [110, 1, 1], heads=2)
    tq = 1 if mask_kind in (None, "bool_row") else 2
    out_len = 112 + 20
    q = torch.randn(2, 2 * n_rep, tq, 64, device=DEV)
    mask = None
    if mask_kind == "bool_row":
        mask = torch.rand(2, 1, 1, out_len, device=DEV) > 0.3
    elif mask_kind == "float":
        mask = torch.randn(1, 2 * n_rep, tq, out_len, device=DEV)
    causal = mask_kind == "causal"
    want = gpu.attention(q.to(dtype), ker, out_len, mask, causal, 0.17, splits=3)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    if dtype == torch.float32:
        torch.testing.assert_close(want, reference.attention(q, ref, out_len, mask, causal, 0.17), **tol)
    for min_rows in (16, 1):
        got = gpu.attention(q.to(dtype), ker, out_len, mask, causal, 0.17, splits=3, min_rows=min_rows, rows_as_n=True)
        torch.testing.assert_close(got.float(), want.float(), **tol)
    # the module's switches (a benchmark's, for a whole compiled model) give the same launch
    from packkv.ops.kernels import attention as kernel

    monkeypatch.setattr(kernel, "MIN_ROWS", 1)
    monkeypatch.setattr(kernel, "ROWS_AS_N", True)
    assert torch.equal(gpu.attention(q.to(dtype), ker, out_len, mask, causal, 0.17, splits=3), got)


@pytest.mark.parametrize("mask_kind", [None, "padding", "all_true"])
def test_zero_keys_past_the_length_enter_the_softmax_as_a_count(mask_kind):
    """A compiled step attends up to the storage's capacity (out_len up to 2x the length after a growth): the zero
    keys past the length score exactly 0, so each zero tile enters the online softmax as one count of its visible
    keys. With a decode padding mask (True up to the length) they weigh nothing; without one, or with a mask that
    keeps them, they dilute the softmax exactly as in decompress + SDPA."""
    ref, ker, _, _ = build(PackKVConfig(block_size=16, window=16), [150], heads=2)
    out_len = 300
    q = torch.randn(2, 4, 1, 64, device=DEV)
    mask = None
    if mask_kind is not None:
        mask = torch.ones(2, 1, 1, out_len, dtype=torch.bool, device=DEV)
        if mask_kind == "padding":
            mask[..., 150:] = False
    want = reference.attention(q, ref, out_len, mask, False, None)
    for splits in (1, 4):
        counted = gpu.attention(q, ker, out_len, mask, False, None, splits=splits, zero_span=False)
        tiled = gpu.attention(q, ker, out_len, mask, False, None, splits=splits, zero_count=False)
        torch.testing.assert_close(counted, want, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(counted, tiled, rtol=2e-6, atol=2e-6)
        # zero_span (the default): each split's zero keys counted in one pass (the mask in chunks: 32 tokens here,
        # so several chunks and a partial last one)
        for chunk in (32, 1024):
            spanned = gpu.attention(q, ker, out_len, mask, False, None, splits=splits, zero_chunk=chunk)
            torch.testing.assert_close(spanned, counted, rtol=2e-6, atol=2e-6)
    if mask_kind == "padding":  # the zero keys are invisible: the same as attending up to the length
        torch.testing.assert_close(want, reference.attention(q, ref, 150, None, False, None), rtol=2e-5, atol=2e-5)


def test_attention_in_the_model_dtype_is_within_its_rounding():
    ref, ker, _, _ = build(PackKVConfig(block_size=32, window=32), [100], heads=2, dtype=torch.float16)
    q = torch.randn(2, 8, 1, 64, device=DEV, dtype=torch.float16)
    want = reference.attention(q.float(), ref, 100, None, False, None)
    got = gpu.attention(q, ker, 100, None, False, None)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("mask_kind", [None, "causal", "bool", "float"])
def test_a_long_query_block_runs_in_chunks_of_rows_and_matches_the_reference(mask_kind, monkeypatch):
    """More query rows (query heads per KV head x queries) than ``MAX_ROWS`` are attended in chunks of queries, each
    launch knowing where its chunk starts (causality and mask rows index the whole block)."""
    from packkv.ops.kernels import attention as attention_kernel

    ref, ker, _, _ = build(PackKVConfig(block_size=32, window=32), [110, 1], heads=2)
    tq, out_len = 10, 111
    q = torch.randn(2, 4, tq, 64, device=DEV)
    mask = {"bool": torch.rand(2, 1, tq, out_len, device=DEV) > 0.3,
            "float": torch.randn(1, 4, tq, out_len, device=DEV)}.get(mask_kind)  # fmt: skip
    want = reference.attention(q, ref, out_len, mask, mask_kind == "causal", None)
    starts = []
    launch_rows = attention_kernel._launch_rows
    monkeypatch.setattr(attention_kernel, "_launch_rows", lambda k, m, q, o, q0, *a: starts.append(q0) or
                        launch_rows(k, m, q, o, q0, *a))  # fmt: skip
    monkeypatch.setattr(attention_kernel, "MAX_ROWS", 8)  # 2 query heads per KV head: 4 queries per chunk
    got = gpu.attention(q, ker, out_len, mask, mask_kind == "causal", None, splits=3)
    assert starts == [0, 4, 8]
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)

# fp32 roundings (2^-24) of the summed terms' magnitude the mat-vec pairs may lose: at most 1 in the interpreter, up
# to 2.5 for the windows pair on the H200 (2026-12-05b, scripts/matvec_accuracy.py: its fp16 halves keep 22 bits of
# the operand and the tensor cores' fp32 sums truncate), where it missed the old bound (1e-6 of the largest result).
@pytest.mark.parametrize("windows", [False, True], ids=["per_value", "windows"])
@pytest.mark.parametrize("cfg", [PackKVConfig(block_size=32, window=32),
                                 PackKVConfig(window=64, pack_size=8, k_grouping="token_head", v_grouping="token_head"),
                                 PackKVConfig(block_size=32, window=32, k_grouping="channel"),
                                 PackKVConfig(block_size=32, window=32, pack_size=8, k_rel=0.05, v_rel=0.02)],
                         ids=["token_groups", "head_groups_64_token_blocks_p8", "channel_keys",
                              "p8_5_and_6_bit_ints"])  # fmt: skip
def test_paper_matvec_kernels_match_the_dequantized_cache(cfg, windows):
    """The paper's kernel pair is as accurate as fp32 products on the dequantized cache: one program per block
    decoding value by value, or runs of blocks per program decoded as the attention decodes them, products on
    tensor cores (fp16 halves of the normalized operand; channel-grouped keys take the first pair)."""
    from packkv.ops.kernels.matvec import dequantized_blocks, k_matvec, reference_k_matvec, reference_v_matvec, v_matvec

    _, ker, _, _ = build(cfg, [400], heads=2)
    nb = int(ker.n_blocks[0])
    assert nb >= 4  # more blocks than some programs' runs
    g = torch.Generator().manual_seed(1)
    q = (torch.randn(2, 2, 64, generator=g) * 3).to(DEV)
    w = torch.softmax(torch.randn(2, 2, nb * cfg.block_size, generator=g), -1).to(DEV)
    dk, dv = (dequantized_blocks(ker, s, nb).double() for s in "kv")
    (ak, zk), (av, zv) = int_and_zero_terms(ker, "k", nb), int_and_zero_terms(ker, "v", nb)
    cases = []
    for qq in (q, q.bfloat16()):  # a bf16 query takes one fp16 product on the windows pair
        qd = qq.double()[..., None]
        cases.append((k_matvec(qq, ker, nb, windows), reference_k_matvec(qq, ker, nb), dk @ qd, ak @ qd.abs() + (zk @ qd).abs()))
    for ww in (w, w[..., :-5]):  # weights missing at the end count as zeros
        full = torch.nn.functional.pad(ww, (0, w.shape[-1] - ww.shape[-1]))
        wd = full.double()[..., None, :]
        cases.append((v_matvec(ww, ker, nb, windows), reference_v_matvec(full, ker, nb), wd @ dv,
                      wd.abs() @ av + (wd @ zv).abs()))  # fmt: skip
    for got, ref, exact, folded in cases:
        exact, folded = exact.reshape(got.shape), folded.reshape(got.shape)
        # fp32 rounding of a 64-term product: within 1e-6 of the largest result (the fp32 reference: ~1e-7).
        assert (ref.double() - exact).abs().max() <= 1e-6 * exact.abs().max()
        # The kernels sum the ints' and the zeros' terms apart (s (q . Q + z sum q)), which cancel: each result
        # is within a few fp32 roundings of those terms' magnitude (tensor cores: fp32 sums that truncate).
        assert ((got.double() - exact).abs() / folded).max() <= MATVEC_ROUNDINGS * 2**-24


@pytest.mark.parametrize("k_rel,v_rel,slow", [(0.0005, 0.3, "K"), (0.3, 0.0005, "V")])
def test_attention_with_wide_integers_matches_the_reference(k_rel, v_rel, slow, caplog, monkeypatch):
    """More than 10-bit integers do not fit the fp16 fast path: the kernel switches to fp32 products, decodes
    their packs value by value, and says so once (with the way back to the fast path, if any)."""
    from packkv.ops.kernels import attention as kernel

    monkeypatch.setattr(kernel, "_warned_slow", set())
    cfg = PackKVConfig(block_size=32, window=32, k_rel=k_rel, v_rel=v_rel)
    ref, ker, _, _ = build(cfg, [100], heads=2)
    q = torch.randn(2, 4, 1, 64, device=DEV)
    with caplog.at_level(logging.WARNING):
        got = gpu.attention(q, ker, 100, None, False, None)
        gpu.attention(q, ker, 100, None, False, None)
    torch.testing.assert_close(got, reference.attention(q, ref, 100, None, False, None), rtol=2e-5, atol=2e-5)
    said = [r.getMessage() for r in caplog.records if "value by value" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"PackKV attention: {slow} packs of 16 x 11-bit ints"), said
    assert "no pack size does at 11-bit ints" in said[0]


def test_decode_paths_follow_the_pack_width():
    """Packs of <= 64 bits are decoded from two 32-bit windows (lanes for ints of <= 8 bits in packs of 8 or 16),
    wider ones as two halves of <= 64 bits where halves fit, else value by value; all but the last need both
    streams in one prefix scan, whose 16-bit lanes bound a tile's bits per stream."""
    from packkv.ops.kernels.tiles import decode_paths

    assert decode_paths(16, 128, 64, 4, 3) == ("lanes", "lanes")  # the defaults
    assert decode_paths(32, 128, 64, 4, 3) == ("split", "split")  # halves of 16 values, both in lanes
    assert decode_paths(16, 128, 64, 5, 3) == ("split", "lanes")  # k_rel 0.05: V in lanes of 2, as K's halves
    assert decode_paths(8, 128, 64, 5, 3) == ("lanes", "lanes")
    assert decode_paths(32, 128, 64, 2, 2) == ("windows", "windows")  # lanes: packs (or halves) of 8 or 16
    assert decode_paths(32, 128, 64, 4, 2) == ("split", "windows")
    assert decode_paths(32, 128, 64, 5, 3) == ("per-value", "per-value")  # halves of 80 bits: no paired scan
    assert decode_paths(16, 128, 64, 8, 3) == ("split", "lanes")  # packs start below bit 65,408 of a tile
    assert decode_paths(16, 256, 64, 4, 3) == ("lanes", "lanes")  # 65,472: the last pack may end at bit 2^16
    assert decode_paths(16, 256, 64, 5, 3) == ("per-value", "windows")  # 81,840 overflows the scan's 16-bit lanes
    assert decode_paths(16, 128, 64, 11, 3) == ("per-value", "windows")


def test_a_tighter_bound_names_the_pack_size_that_keeps_the_fast_decode(caplog, monkeypatch):
    """5-bit keys (k_rel 0.05) in packs of 32 reach 160 bits (halves of 80): decoded value by value, and the values
    with them; packs of 16 would be split into halves of 40 bits. Said once per stream."""
    from packkv.ops.kernels import attention as kernel

    monkeypatch.setattr(kernel, "_warned_slow", set())
    cfg = PackKVConfig(block_size=32, window=32, k_rel=0.05, pack_size=32)
    ref, ker, _, _ = build(cfg, [70], heads=2)
    q = torch.randn(2, 4, 1, 64, device=DEV)
    with caplog.at_level(logging.WARNING):
        got = gpu.attention(q, ker, 70, None, False, None)
    torch.testing.assert_close(got, reference.attention(q, ref, 70, None, False, None), rtol=2e-5, atol=2e-5)
    said = sorted(r.getMessage() for r in caplog.records if "value by value" in r.getMessage())
    # V's 96-bit packs would split, but only in the prefix scan shared with K: both are read value by value
    assert len(said) == 2 and all("pack_size=16 keeps the fast path" in m for m in said), said
    assert "K packs of 32 x 5-bit ints" in said[0] and "V packs of 32 x 3-bit ints" in said[1], said


# Packs of 8 and 16 with 3-4 bit ints (lanes of 4, in lane order); of 32: 2-bit V (windows) with 3-bit K (split into
# halves of 16 values, lanes in token order), 3-4 bit K and V (both split, lanes of 4 in lane order); of 16: 5-bit
# and 8-bit K (split into halves of 8 values) with 3-bit V (four windows per pack), lanes of 2 in lane order.
@pytest.mark.parametrize("pack_size,k_rel,v_rel", [(8, 0.1, 0.2), (16, 0.07, 0.15), (32, 0.3, 0.5), (32, 0.1, 0.2),
                                                   (16, 0.05, 0.15), (16, 0.005, 0.3)])  # fmt: skip
def test_packwise_and_per_value_extraction_agree(pack_size, k_rel, v_rel):
    """Packs of at most 64 bits are decoded from their words at once (as two 32-bit windows built channel-major
    or token-major, or with a select per value; K and V pack starts from one scan or one each; scales loaded
    before or after the decode; on the GPU, two values per asm block or one per LOP3; narrow ints two per shift
    from lane-paired windows; the softmax sums per tile or per split); wider packs are split into halves of at most
    64 bits, or read value by value. All give the same attention, for every pack size."""
    cfg = PackKVConfig(block_size=32, window=32, pack_size=pack_size, k_rel=k_rel, v_rel=v_rel)
    ref, ker, _, _ = build(cfg, [100], heads=2)
    q = torch.randn(2, 4, 1, 64, device=DEV)
    want = reference.attention(q, ref, 100, None, False, None)
    fast = gpu.attention(q, ker, 100, None, False, None)
    slow = gpu.attention(q, ker, 100, None, False, None, packwise=False)
    select = gpu.attention(q, ker, 100, None, False, None, windows=False)
    one_scan_per_stream = gpu.attention(q, ker, 100, None, False, None, paired=False)
    token_major = gpu.attention(q, ker, 100, None, False, None, channel_rows=False)
    fused = gpu.attention(q, ker, 100, None, False, None, fused_reductions=True)
    late_loads = gpu.attention(q, ker, 100, None, False, None, early_loads=False)
    one_per_value = gpu.attention(q, ker, 100, None, False, None, pairs=False, lanes=0)  # on the GPU: no asm
    # packs (or halves) of 8 or 16 values: two values per shift from lane-paired windows, the tiles' rows (and their
    # scales) in lane order or in token order, or no lane extraction: the same sums
    no_lanes = gpu.attention(q, ker, 100, None, False, None, lanes=0)
    lanes_in_token_order = gpu.attention(q, ker, 100, None, False, None, lanes=1)
    # the softmax sums and the V zeros' terms kept per token and summed once per split (one split: rescaled over
    # several blocks)
    deferred_sums = gpu.attention(q, ker, 100, None, False, None, defer_sums=True, splits=1)
    torch.testing.assert_close(fast, late_loads, rtol=0, atol=0)
    torch.testing.assert_close(no_lanes, one_per_value, rtol=0, atol=0)
    # The same values summed in another order within a tile: fp32 rounding (a few ulps of the largest terms, which
    # grow with the ints: 8-bit keys reach 2e-6); a wrong value is off by orders of magnitude more.
    tol = dict(rtol=1e-6, atol=4e-6)
    torch.testing.assert_close(fast, no_lanes, **tol)
    torch.testing.assert_close(fast, lanes_in_token_order, **tol)
    torch.testing.assert_close(fast, slow, **tol)
    torch.testing.assert_close(fast, select, **tol)
    torch.testing.assert_close(fast, one_scan_per_stream, **tol)
    torch.testing.assert_close(fast, token_major, **tol)
    torch.testing.assert_close(fast, fused, **tol)
    torch.testing.assert_close(fast, deferred_sums, **tol)
    torch.testing.assert_close(fast, want, rtol=2e-5, atol=2e-5)


def test_head_dim_256_tiles_of_full_width_packs_share_one_pack_start_scan():
    """A 64-token tile of head_dim 256 with 4-bit ints holds up to 2^16 bits per stream: every pack but the last
    starts below bit 2^16, so K and V still share one prefix scan in 16-bit lanes; the tile's total, which reaches
    2^16 when every pack has the full width (as here), is summed per stream for the next tile of the block."""
    from packkv.ops.codec import unpack_meta
    from packkv.ops.kernels.tiles import paired_scan_fits

    cfg = PackKVConfig(block_size=128, window=128, rotation="none")  # k_rel 0.07: 4-bit keys
    t, c = torch.arange(300)[:, None], torch.arange(256)[None, :]
    # Every pack (16 tokens of one channel) holds both extremes of its tokens' range: the full width, 4 bits.
    k = (((t + c) % 2) * 2 - 1).to(torch.bfloat16)[None, None].to(DEV)
    v = torch.randn(1, 1, 300, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).to(DEV)
    lay = Layout.from_config(cfg, 1, 256)
    assert paired_scan_fits(64, 256, 16, lay.k.qbits, lay.v.qbits) and lay.k.qbits == 4
    stores = []
    for append in (reference.append_, gpu.append_):
        st = PackedLayer.empty(lay, 1, torch.bfloat16, DEV, 4, 4 * (lay.max_chunk_words(lay.k) + lay.max_chunk_words(lay.v)))
        append(st, k, v, flush_count(0, 300, lay))
        stores.append(st)
    ref, ker = stores
    _, widths = unpack_meta(ker.k_meta[:, : int(ker.n_blocks[0])], lay.k, lay)
    assert bool((widths == 4).all())  # so each 64-token tile's K packs total exactly 2^16 bits
    q = torch.randn(1, 4, 1, 256, device=DEV)
    want = reference.attention(q, ref, 300, None, False, None)
    for sub_tile in (64, 128):  # two tiles per block (one scan per tile), or the whole block (a scan per stream)
        got = gpu.attention(q, ker, 300, None, False, None, sub_tile=sub_tile, splits=2)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_bf16_queries_use_single_fp16_operands_within_bf16_rounding():
    """Model-dtype queries take the fast path (one fp16 product per tile, ring in the cache dtype); the error
    stays below the bf16 rounding of the output."""
    ref, ker, _, _ = build(PackKVConfig(block_size=32, window=32), [100], heads=2)
    q = torch.randn(2, 8, 1, 64, device=DEV).to(torch.bfloat16)
    want = reference.attention(q.float(), ref, 100, None, False, None)
    got = gpu.attention(q, ker, 100, None, False, None)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=8e-3, atol=8e-3)
    exact = gpu.attention(q, ker, 100, None, False, None, exact=True)
    assert (got.float() - want).abs().max() <= 2 * (exact.float() - want).abs().max() + 4e-3


def test_split_count_fills_whole_waves_of_resident_programs():
    """Every split does the same work, so the split count is chosen for whole waves: programs of 4 warps with a
    128-register cap fit 4 to an SM (64K registers), and the grid is at most `waves` times the SMs' slots. The
    former rule (programs per SM, `split_factor`) ignored what fits at once: 2.06 waves at B8 on the H200."""
    from packkv.ops.kernels._launch import num_sms, resident_programs

    cpu = torch.device("cpu")
    assert resident_programs(cpu, 4, 128) == 4
    assert resident_programs(cpu, 8, 128) == 2
    assert resident_programs(cpu, 4, 96) == 5
    assert resident_programs(cpu, 8, 64) == 4
    ref, ker, _, _ = build(PackKVConfig(block_size=16, window=16), [600], heads=2)
    q = torch.randn(2, 4, 1, 64, device=DEV)
    want = reference.attention(q, ref, 600, None, False, None)
    slots = resident_programs(torch.device(DEV), 4, 128) * num_sms(torch.device(DEV))
    for waves in (1, 2, 3):
        got, grid = _attention_and_grid(q, ker, 600, waves=waves)
        # as many splits as fill the waves, but no more than the 38 blocks to split (a GPU's 132 SMs hold more)
        assert grid[0] == 4 and grid[1] == min(-(-600 // 16), waves * slots // grid[0])
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def _attention_and_grid(q, ker, out_len, **kw):
    """The attention output and the grid its kernel was launched with."""
    from packkv.ops.kernels import attention as A

    grids = []
    real = A.launch

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            if self.kernel is A._attention_kernel or getattr(self.kernel, "fn", None) is A._attention_kernel:
                grids.append(grid)
            return real(self.kernel)[grid]

    A.launch = Spy
    try:
        out = gpu.attention(q, ker, out_len, None, False, None, **kw)
    finally:
        A.launch = real
    return out, grids[0]


def test_split_merge_kernel_matches_its_reference():
    """Partial softmax results merge by log-sum-exp in one launch; splits that saw no visible token (max -inf,
    sum 0) weigh nothing, and more splits than one chunk fold in one pass, the running sums rescaled whenever a
    later chunk raises the max (including after whole chunks of empty splits)."""
    from packkv.ops.kernels.attention import _merge_kernel, merge_chunk, merge_splits
    from packkv.ops.kernels._launch import launch

    g = torch.Generator().manual_seed(0)
    ns, d = 70, 64
    acc = torch.randn(2, 3, 1, ns, d, generator=g).to(DEV)
    m = (torch.randn(2, 3, 1, ns, generator=g) * 4).to(DEV)
    m[1, 2, 0] = torch.linspace(-8, 8, ns)  # the max grows in every chunk
    l = (torch.rand(2, 3, 1, ns, generator=g) + 0.5).to(DEV)
    empty = torch.zeros(2, 3, 1, ns, dtype=torch.bool, device=DEV)
    empty[..., 5:40] = True  # splits without visible tokens
    empty[0, 1, 0, :40] = True  # whole chunks of them first
    m[empty] = float("-inf")
    l[empty] = 0.0
    acc[empty] = 0.0
    want = merge_splits(acc, m, l)
    assert want.isfinite().all()
    for bs in (8, 32, merge_chunk(d)):
        for dtype in (torch.float32, torch.bfloat16):
            out = torch.empty(2, 3, 1, d, dtype=dtype, device=DEV)
            launch(_merge_kernel)[(6,)](acc, m, l, out, ns, D=d, BS=bs)
            tol = 1e-5 if dtype == torch.float32 else 8e-3
            torch.testing.assert_close(out.float(), want, rtol=tol, atol=tol)
    assert merge_chunk(128) >= 33  # a batch-1 decode step's splits (132 SMs, 8 KV heads) in one chunk


def test_eager_launches_bypass_wrap_triton_only_when_nothing_traces():
    """On the GPU, plain eager calls launch the raw kernel (wrap_triton's op costs ~1 ms of host time per call);
    under a dispatch mode (FakeTensor, functionalization, proxy tracing) or with tensor subclasses, the launch
    goes through wrap_triton so Inductor sees it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from packkv.ops.kernels._launch import plain_eager

    x = torch.zeros(2)
    assert plain_eager((x, 3, None))
    with FakeTensorMode() as mode:
        assert not plain_eager((mode.from_tensor(x),))
    assert not plain_eager((torch.nn.Parameter(x),))  # a subclass: not a plain tensor


def test_compiled_launchers_keep_a_kernels_register_cap():
    """Inductor writes a user kernel's configs into compiled code as dicts: with ``keep_maxnreg`` the attention's
    register cap survives the round trip (it was dropped: the compiled kernel ran uncapped), and configs without
    a cap (Inductor's own kernels) are written as before."""
    import triton
    from torch._inductor.runtime import triton_heuristics as th

    from packkv.ops.kernels.inductor_compat import keep_maxnreg

    assert keep_maxnreg()
    capped = th.config_from_dict(th.config_to_dict(triton.Config({"TILE": 64}, num_warps=4, maxnreg=128)))
    assert (capped.maxnreg, capped.num_warps, capped.kwargs) == (128, 4, {"TILE": 64})
    assert "maxnreg" not in th.config_to_dict(triton.Config({"X": 1}, num_warps=8))
    assert keep_maxnreg()  # installing twice wraps nothing twice
    assert th.config_to_dict(triton.Config({}, maxnreg=96))["maxnreg"] == 96


def test_kernels_with_a_register_cap_compile_in_process_the_rest_in_the_workers(monkeypatch):
    """Inductor's compile workers are fresh processes without ``keep_maxnreg``: a kernel whose generated source sets
    ``maxnreg`` is built in this process, any other one where Inductor chose (the process pool here)."""
    from torch._inductor.async_compile import AsyncCompile

    from packkv.ops.kernels.inductor_compat import keep_maxnreg

    assert keep_maxnreg()
    pools = []

    def record(self, kernel_name, source_code, device_str="cuda"):
        pools.append((kernel_name, type(self).use_process_pool()))
        return kernel_name

    monkeypatch.setattr(AsyncCompile, "use_process_pool", classmethod(lambda cls: True))
    monkeypatch.setattr(AsyncCompile.triton, "__wrapped__", record)  # the wrapped compile, as Inductor's
    wrapped = AsyncCompile.triton
    compile_capped = "configs=[{'TILE': 64, 'num_warps': 4, 'num_stages': 1, 'maxnreg': 128}]"
    assert wrapped(AsyncCompile(), "capped", compile_capped) == "capped"
    assert wrapped(AsyncCompile(), "plain", "configs=[{'XBLOCK': 128, 'num_warps': 4}]") == "plain"
    assert pools == [("capped", False), ("plain", True)]
    assert AsyncCompile.use_process_pool()  # restored after the capped kernel


@pytest.mark.parametrize("dtype, dim", [(torch.float32, 64), (torch.bfloat16, 64), (torch.bfloat16, 256)])
def test_attention_can_rotate_its_query_and_output_in_the_kernels(dtype, dim):
    """On a Hadamard-rotated cache, ``rotate=True`` takes the query and returns the output in the model's
    coordinates: the same as rotating around the kernels, ``rotate(attention(rotate(q)))``, for every head_dim."""
    from packkv.ops.layout import ROTATION_CODES

    had = ROTATION_CODES["hadamard"]
    _, ker, _, _ = build(PackKVConfig(block_size=32, window=32), [100, 77], heads=2, dim=dim, dtype=dtype)
    q = torch.randn(2, 8, 1, dim, device=DEV).to(dtype)
    around = rotate(gpu.attention(rotate(q, had), ker, 190, None, False, None), had)
    inside = gpu.attention(q, ker, 190, None, False, None, rotate=True)
    tol = {torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype]  # bf16: the output is rounded once, not twice
    torch.testing.assert_close(inside.float(), around.float(), rtol=tol, atol=tol)
    assert not torch.allclose(inside.float(), gpu.attention(q, ker, 190, None, False, None).float(), atol=tol)


@triton.jit
def _hadamard_rows(x_ptr, y_ptr, M: tl.constexpr, D: tl.constexpr):
    i = tl.arange(0, M)[:, None] * D + tl.arange(0, D)[None, :]
    tl.store(y_ptr + i, fwht_rows(tl.load(x_ptr + i), M, D))


@pytest.mark.parametrize("rows, dim", [(1, 16), (4, 64), (16, 128), (2, 256)])
def test_the_kernels_hadamard_transform_is_the_product_with_the_sylvester_matrix(rows, dim):
    """``hadamard.fwht_rows`` (the kernels' query, output and new-token rotations) is ``x @ S``, ``S`` the Sylvester
    matrix without its ``1/sqrt(D)``: fp32 sums of the exact terms, as an fp64 product gives them to rounding."""
    from packkv.ops.rotation import hadamard

    x = torch.randn(rows, dim, device=DEV)
    y = torch.empty_like(x)
    _hadamard_rows[(1,)](x, y, M=rows, D=dim)
    want = x.double() @ (hadamard(dim).to(DEV).double() * dim**0.5)
    torch.testing.assert_close(y.double(), want, rtol=0, atol=1e-5 * want.abs().max().item())
    assert not torch.allclose(y, x)  # it did transform
