"""The decode step's append folded into the attention's merge (``kernels/fused_append.py``) does what
``append_token`` followed by the Gluon attention does: the same output (within the new token's rounding), the same
ring slot and count written, and nothing stored for a batch with a NaN/Inf anywhere in its new K/V. On the CPU the
Gluon kernel's body runs eagerly and the merge in the Triton interpreter (``tests/test_gluon_attention.py``)."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA
from test_gluon_attention import _layer, _padding_mask, every_built_head_dim  # noqa: F401 (a fixture)

from packkv.ops import PackKVConfig
from packkv.ops.kernels import gpu
from packkv.ops.kernels.fused_append import append_and_attend
from packkv.ops.kernels.token import append_token
from packkv.ops.layout import ROTATION_CODES

DEV = "cuda" if HAS_CUDA else "cpu"
B, H, D, L = 2, 2, 128, 3 * 64 + 150


def _both(rotation, n_rep, splits, extra, masked, ragged, dtype, poison=False, dim=D):
    st = _layer(PackKVConfig(k_rel=0.1, v_rel=0.2, rotation=rotation), dtype, ragged, dim=dim)
    code = ROTATION_CODES[rotation]
    out_len = L + 1 + extra
    mask = _padding_mask(out_len) if masked else None
    if mask is not None:  # the new tokens' positions visible (a decode step's mask shows its own token)
        for b in range(B):
            mask[b, ..., int(st.n_blocks[b]) * 64 + int(st.n_win[b])] = True
    q = torch.randn(B, H * n_rep, 1, dim, device=DEV).to(dtype)
    k = torch.randn(B, H, 1, dim, device=DEV).to(dtype)
    v = torch.randn(B, H, 1, dim, device=DEV).to(dtype)
    if poison:
        v[1, 0, 0, 7] = float("nan")
    a, f = st.clone(), st.clone()
    append_token(a, k, v, rotation=code)
    want = gpu.attention(q, a, out_len, mask, False, None, splits=splits, rotate=rotation == "hadamard", gluon=True)
    got = append_and_attend(q, f, k, v, out_len, mask, rotation=code, splits=splits)
    return st, a, f, want, got, q, mask, out_len


@pytest.mark.parametrize(
    "rotation, n_rep, splits, extra, masked, ragged, dtype, dim",
    [
        ("none", 4, 1, 0, False, False, torch.float16, 128),
        ("none", 4, 4, 37, True, True, torch.float16, 128),
        ("hadamard", 8, 3, 5, False, True, torch.bfloat16, 128),
        ("hadamard", 2, 16, 100, True, True, torch.bfloat16, 128),
        ("hadamard", 3, 4, 9, True, True, torch.bfloat16, 64),
        ("hadamard", 2, 3, 0, False, True, torch.float16, 256),
    ],
)  # fmt: skip
def test_append_folded_into_the_merge_matches_append_then_attention(rotation, n_rep, splits, extra, masked, ragged,
                                                                    dtype, dim, every_built_head_dim):  # fmt: skip
    _, a, f, want, got, *_ = _both(rotation, n_rep, splits, extra, masked, ragged, dtype, dim=dim)
    for name in ("ring_k", "ring_v", "n_win", "n_blocks"):  # the same token in the same slot, the same count
        assert torch.equal(getattr(f, name), getattr(a, name)), name
    # The new token scored in the model's coordinates instead of rotated and rounded: a few of the dtype's ulps.
    err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
    assert err < (2e-3 if dtype == torch.float16 else 1e-2), err


def test_a_batch_with_a_nan_in_its_new_values_stores_nothing_and_attends_the_stored_tokens():
    """As ``append_token``: one NaN in one sequence's new values and no sequence stores its token, no count
    advances; the output is the attention over the stored tokens alone (the new positions not attended)."""
    st, _, f, _, got, q, mask, out_len = _both("hadamard", 4, 4, 0, True, True, torch.bfloat16, poison=True)
    for name in ("ring_k", "ring_v", "n_win", "n_blocks"):
        assert torch.equal(getattr(f, name), getattr(st, name)), name
    hidden = mask.clone()
    for b in range(B):
        hidden[b, ..., int(st.n_blocks[b]) * 64 + int(st.n_win[b])] = False
    want = gpu.attention(q, st, out_len, hidden, False, None, splits=4, rotate=True, gluon=True)
    err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
    assert err < 1e-2, err


def test_the_append_attention_op_is_append_then_attention_and_passes_opcheck():
    """``packkv::append_attention_`` (what ``inductor.rewrite.fuse_decode_appends`` puts in a compiled step): the
    same storage and output as ``append_`` then ``attention``, for a layer of stacked fields (``slot``) as a
    compiled step passes them; schema, fake tensor and mutations declared (opcheck)."""
    from helpers import spec

    from packkv.ops.storage import STORAGE_FIELDS

    layers = [_layer(PackKVConfig(k_rel=0.1, v_rel=0.2), torch.bfloat16) for _ in range(2)]
    stacked = [torch.stack([getattr(x, f) for x in layers]) for f in STORAGE_FIELDS[1:]]
    sp = spec(layers[0].layout)
    q = torch.randn(B, H * 4, 1, D, device=DEV).bfloat16()
    k = torch.randn(B, H, 1, D, device=DEV).bfloat16()
    v = torch.randn(B, H, 1, D, device=DEV).bfloat16()
    mask = _padding_mask(L + 9)
    want_st = [t.clone() for t in layers[1].tensors()]
    torch.ops.packkv.append_(*want_st, k, v, 0, *sp)
    want = torch.ops.packkv.attention(q, *want_st, L + 9, mask, False, None, *sp)
    got_st = [t.clone() for t in stacked]
    got = torch.ops.packkv.append_attention_(q, layers[1].pool, *got_st, k, v, L + 9, mask, False, None, *sp, 1)
    for f, t, w, before in zip(STORAGE_FIELDS[1:], got_st, want_st[1:], stacked):
        assert torch.equal(t[1], w) and torch.equal(t[0], before[0]), f  # layer 1 written, layer 0 untouched
    assert ((got.float() - want.float()).abs().max() / want.float().abs().max()).item() < 1e-2
    for test in ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"):
        args = (q, layers[1].pool.clone(), *[t.clone() for t in stacked], k, v, L + 9, mask, False, None, *sp, 1)
        torch.library.opcheck(torch.ops.packkv.append_attention_, args, test_utils=test)
