"""The packkv ops: registered schemas that pass opcheck, SDPA semantics, and clear errors on bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import fill, n_tokens, spec

from packkv.ops import Layout, PackedLayer, PackKVConfig
from packkv.ops.storage import STORAGE_FIELDS
from packkv.ops.reference import decompress_fp32

CFG = PackKVConfig(block_size=32, window=64, rotation="none")  # rotation: test_rotation.py


def layer_with(tokens: int, batch: int = 2, heads: int = 2, dim: int = 64, dtype=torch.bfloat16, cfg=CFG):
    k = torch.randn(batch, heads, tokens, dim).to(dtype)
    v = torch.randn(batch, heads, tokens, dim).to(dtype)
    return fill(cfg, k, v, block_capacity=tokens // cfg.block_size + 2), k, v


# ---- opcheck ---------------------------------------------------------------------------------------------------
def test_the_snapshot_op_copies_and_passes_opcheck():
    """``packkv.snapshot`` (what the compile backend gives storage readers outside PackKV's ops): an equal tensor
    that shares no memory with its input."""
    t = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    got = torch.ops.packkv.snapshot(t)
    assert torch.equal(got, t) and got.data_ptr() != t.data_ptr()
    torch.library.opcheck(torch.ops.packkv.snapshot, (t,))


def test_opcheck_append_without_and_with_a_flush_and_a_flush_ahead():
    layer, _, _ = layer_with(40, cfg=CFG)  # 40 exact tokens: room for more before a flush
    new = torch.randn(2, 2, 1, 64).bfloat16()
    torch.library.opcheck(torch.ops.packkv.append_, (*layer.tensors(), new, new.clone(), 0, *spec(layer.layout)))
    # A full ring: each opcheck sub-test must run on its own fresh copy, since the op checks n_flush.
    layer, _, _ = layer_with(CFG.window + CFG.block_size - 1)
    state = [t.clone() for t in layer.tensors()]
    none = torch.randn(2, 2, 0, 64).bfloat16()  # a flush ahead of the next token: no new tokens
    for t_new in (new, none):
        for test in ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic", "test_autograd_registration"):
            args = (*[t.clone() for t in state], t_new, t_new.clone(), 1, *spec(layer.layout))
            torch.library.opcheck(torch.ops.packkv.append_, args, test_utils=test)


def test_append_with_a_slot_writes_that_layer_of_stacked_fields():
    """``slot=i``: every field but the pool is stacked along a leading layer dimension (what a compiled step of a
    multi-layer model passes) and the op writes layer i's slice only, as it writes an unstacked layer."""
    layers = [layer_with(CFG.window + CFG.block_size - 1)[0] for _ in range(3)]
    stacked = [torch.stack([getattr(x, f) for x in layers]) for f in STORAGE_FIELDS[1:]]
    new = torch.randn(2, 2, 1, 64).bfloat16()
    want = [t.clone() for t in layers[1].tensors()]
    torch.ops.packkv.append_(*want, new, new.clone(), 1, *spec(layers[0].layout))
    before = [t.clone() for t in stacked]
    pool = layers[1].pool.clone()
    torch.ops.packkv.append_(pool, *stacked, new, new.clone(), 1, *spec(layers[0].layout), 1)
    assert torch.equal(pool, want[0])
    for t, b, w in zip(stacked, before, want[1:]):
        assert torch.equal(t[1], w) and torch.equal(t[0], b[0]) and torch.equal(t[2], b[2])
    for test in ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"):
        args = (layers[2].pool.clone(), *[t.clone() for t in before], new, new.clone(), 1, *spec(layers[0].layout), 2)
        torch.library.opcheck(torch.ops.packkv.append_, args, test_utils=test)
    with pytest.raises(ValueError, match="stacked along a leading layer dimension"):
        torch.ops.packkv.append_(*layers[0].tensors(), new, new.clone(), 1, *spec(layers[0].layout), 5)


def test_eager_appends_skip_the_dispatcher_and_traced_ones_record_the_op():
    """ops.append runs append_'s body directly in plain eager mode (the dispatcher's bookkeeping for 15 mutated
    tensors cost ~0.6 ms per call; it bumps every mutated tensor's version, the body only those it writes), and is
    the registered op whenever something traces."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from packkv.ops import ops

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    layer, _, _ = layer_with(40)
    new = torch.randn(2, 2, 1, 64).bfloat16()
    twin = layer.clone()
    v, v_twin = layer.pool._version, twin.pool._version
    ops.append(*layer.tensors(), new, new.clone(), 0, *spec(layer.layout))
    torch.ops.packkv.append_(*twin.tensors(), new, new.clone(), 0, *spec(twin.layout))
    assert layer.pool._version == v and twin.pool._version > v_twin  # only the op bumped the untouched pool
    assert all(torch.equal(a, b) for a, b in zip(layer.tensors(), twin.tensors()))
    with Record() as rec:
        ops.append(*layer.tensors(), new, new.clone(), 0, *spec(layer.layout))
    assert "packkv.append_.default" in rec.seen
    assert int(layer.n_win[0]) == int(twin.n_win[0]) + 1
    # Like the op (whose body runs below autograd), the direct call records no graph into the storage.
    grad = torch.randn(2, 2, 1, 64, requires_grad=True)
    ops.append(*layer.tensors(), grad.bfloat16(), grad.bfloat16(), 0, *spec(layer.layout))
    assert not layer.ring_k.requires_grad and layer.ring_k.grad_fn is None


def test_opcheck_decompress_and_attention():
    layer, _, _ = layer_with(150)
    n = n_tokens(layer)
    torch.library.opcheck(torch.ops.packkv.decompress, (*layer.tensors(), n + 5, *spec(layer.layout)))
    q = torch.randn(2, 4, 1, 64).bfloat16()
    mask = torch.rand(2, 1, 1, n) > 0.2
    for m in (None, mask):
        args = (q, *layer.tensors(), n, m, False, None, *spec(layer.layout))
        torch.library.opcheck(torch.ops.packkv.attention, args)


# ---- semantics -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_rep", [1, 4, 8])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_equals_sdpa_over_the_dequantized_cache(n_rep, masked):
    layer, _, _ = layer_with(200, heads=2, dtype=torch.float16)
    # Ragged batch: the second sequence is one block and a few tokens shorter.
    layer.n_blocks[1] -= 1
    layer.n_win[1] -= 5
    out_len = n_tokens(layer) + 7  # positions past a sequence's end are zero keys, as decompress returns them
    q = torch.randn(2, 2 * n_rep, 3, 64, dtype=torch.float16)
    mask = (torch.rand(2, 1, 3, out_len) > 0.3) if masked else None
    out = torch.ops.packkv.attention(q, *layer.tensors(), out_len, mask, False, 0.3, *spec(layer.layout))
    k, v = decompress_fp32(layer, out_len)
    ref = F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out.float(), ref, rtol=2e-3, atol=2e-3)
    assert out.dtype == q.dtype and out.shape == q.shape


def test_attention_is_causal_follows_sdpa_top_left_alignment():
    layer, _, _ = layer_with(100, heads=1)
    n = n_tokens(layer)
    q = torch.randn(2, 1, 5, 64).bfloat16()
    out = torch.ops.packkv.attention(q, *layer.tensors(), n, None, True, None, *spec(layer.layout))
    k, v = decompress_fp32(layer, n)
    ref = F.scaled_dot_product_attention(q.float(), k, v, is_causal=True)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


def test_decompress_returns_the_window_exactly_and_zeros_past_the_end():
    layer, k, v = layer_with(130)
    n = n_tokens(layer)
    dk, dv = torch.ops.packkv.decompress(*layer.tensors(), n + 4, *spec(layer.layout))
    ncomp = int(layer.n_blocks[0]) * CFG.block_size
    assert torch.equal(dk[:, :, ncomp:n], k[:, :, ncomp:]) and torch.equal(dv[:, :, ncomp:n], v[:, :, ncomp:])
    assert torch.all(dk[:, :, n:] == 0) and dk.dtype == k.dtype
    with pytest.raises(ValueError, match="shorter"):
        torch.ops.packkv.decompress(*layer.tensors(), n - 1, *spec(layer.layout))


# ---- bad input -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("which", ["k", "v"])
def test_non_finite_input_is_rejected_before_anything_is_stored(bad, which):
    layer, _, _ = layer_with(CFG.window + CFG.block_size - 1)  # the next token triggers a compression
    before = [t.clone() for t in layer.tensors()]
    new_k, new_v = torch.randn(2, 2, 1, 64).bfloat16(), torch.randn(2, 2, 1, 64).bfloat16()
    (new_k if which == "k" else new_v)[1, 0, 0, 3] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        torch.ops.packkv.append_(*layer.tensors(), new_k, new_v, 1, *spec(layer.layout))
    for a, b in zip(before, layer.tensors()):
        assert torch.equal(a, b)


def test_unsupported_head_dim_and_dtype_are_named():
    with pytest.raises(ValueError, match="head_dim 96"):
        Layout.from_config(CFG, 2, 96)
    lay = Layout.from_config(CFG, 2, 64)
    with pytest.raises(ValueError, match="dtype torch.int8"):
        PackedLayer.empty(lay, 1, torch.int8, "cpu", 2, 100)


def test_mismatched_shapes_are_named():
    layer, _, _ = layer_with(10)
    sp = spec(layer.layout)
    good = torch.randn(2, 2, 1, 64).bfloat16()
    for bad, what in (
        (torch.randn(2, 3, 1, 64).bfloat16(), "shape"),
        (torch.randn(2, 2, 1, 128).bfloat16(), "shape"),
        (torch.randn(2, 2, 1, 64).half(), "dtype"),
    ):
        with pytest.raises(ValueError, match=what):
            torch.ops.packkv.append_(*layer.tensors(), bad, good, 0, *sp)
    with pytest.raises(ValueError, match="differ in shape"):
        torch.ops.packkv.append_(*layer.tensors(), good, torch.randn(2, 2, 2, 64).bfloat16(), 0, *sp)
    with pytest.raises(ValueError, match="query"):
        torch.ops.packkv.attention(torch.randn(2, 3, 1, 64).bfloat16(), *layer.tensors(), 10, None, False, None, *sp)


def test_wrong_flush_count_is_refused_and_stores_nothing():
    """n_flush must keep the ring from overflowing and compress only whole blocks of stored tokens."""
    new = torch.randn(2, 2, 1, 64).bfloat16()
    none = torch.randn(2, 2, 0, 64).bfloat16()
    for tokens, t_new, n_flush in (
        (10, new, 1),  # 11 tokens: no whole block
        (CFG.window + CFG.block_size - 1, new, 0),  # the token would overflow the ring
        (CFG.window + CFG.block_size - 1, none, 3),  # a flush ahead of more blocks than the ring holds (2)
    ):
        layer, _, _ = layer_with(tokens)
        before = [t.clone() for t in layer.tensors()]
        with pytest.raises(ValueError, match=f"n_flush={n_flush} does not fit"):
            torch.ops.packkv.append_(*layer.tensors(), t_new, t_new, n_flush, *spec(layer.layout))
        assert all(torch.equal(a, b) for a, b in zip(before, layer.tensors()))
