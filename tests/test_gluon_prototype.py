"""The Gluon prototype of the warp-specialized attention (``scripts/gluon_sm90/packed_decode_attention.py``)
computes a decode step's attention over a real ``PackedLayer``: its compressed blocks, its exact window, zero keys up
to ``out_len`` and a padding mask.

Gluon has no interpreter, so its body runs eagerly on torch tensors (``scripts/gluon_sm90/eager.py``: the same
Python, ``gl`` replaced by torch, each inline asm by its torch twin). That checks the kernel's reading of the format
(fields, the pack-start scan, pack bits, lane extraction), the lane order shared by the decoded tiles and the
scales, the MMA operands' orientation and the softmax; the compiled kernel itself only runs on a GPU
(``--gpu``)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import fill

from packkv.ops import PackKVConfig, reference

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts" / "gluon_sm90"))
import eager  # noqa: E402
import packed_decode_attention as pda  # noqa: E402

LOG2E = 1.4426950408889634


# 4 splits of 3 blocks: the last one takes the window's tiles alone; extra: zero keys past the length (a compiled
# step's out_len is the storage's capacity); masked: a decode step's bool padding mask, one row per sequence.
@pytest.mark.parametrize("splits,extra,masked", [(1, 0, False), (4, 37, False), (4, 37, True), (1, 0, True)])
def test_eager_gluon_prototype_matches_the_reference_attention(splits, extra, masked):
    torch.manual_seed(0)
    cfg = PackKVConfig(k_rel=0.1, v_rel=0.2, rotation="none")  # the one layout the prototype decodes
    B, H, D, n_rep, R = 2, 2, 128, 4, 8
    L = 3 * 64 + 150  # 3 compressed blocks, 150 exact tokens in the window (3 tiles, the last one partial)
    k, v = torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    st = fill(cfg, k, v)
    T, nb = st.layout.block_size, int(st.n_blocks[0])
    assert nb == 3 and int(st.n_win[0]) == 150
    out_len = L + extra
    mask = None
    if masked:  # left padding of 20 and 40 tokens, random holes, some zero keys hidden
        mask = torch.rand(B, 1, 1, out_len) > 0.2
        mask[0, ..., :20] = False
        mask[1, ..., :40] = False
    q = torch.randn(B, H * n_rep, 1, D).half().float()
    rows = torch.zeros(B * H, R, D, dtype=torch.float16)
    rows[:, :n_rep] = q.view(B * H, n_rep, D).half()
    per = -(-nb // splits)
    n = B * H * splits
    o, m, l = torch.zeros(n, R, D), torch.zeros(n, R), torch.zeros(n, R)
    mask_arg = mask.reshape(-1) if masked else st.n_win  # any tensor when there is no mask
    eager.run(pda.packed_decode_attention, (B * H, splits), rows, st.pool, st.k_offsets, st.v_offsets, st.k_meta,
              st.v_meta, st.k_scale, st.k_zero, st.v_scale, st.v_zero, st.ring_k, st.ring_v, st.n_blocks, st.n_win,
              st.perm, mask_arg, out_len if masked else 0, out_len, o, m, l, st.block_capacity, H, st.layout.ring_size,
              per, LOG2E / math.sqrt(D), module=pda, T=T, D=D, R=R, STAGES=2, HAS_MASK=masked)  # fmt: skip
    mm = m.view(B * H, splits, R)
    w = torch.exp2(mm - mm.amax(1, keepdim=True))
    got = (o.view(B * H, splits, R, D) * w[..., None]).sum(1) / (l.view(B * H, splits, R) * w).sum(1)[..., None]
    got = got[:, :n_rep].reshape(B, H * n_rep, 1, D)
    want = reference.attention(q, st, out_len, mask, False, None)
    # fp16 products and weights (V's scale folded into P): 4e-4 of the largest output. Mutation-checked: a wrong
    # lane order, window order or ring offset, unmasked keys past the length, an ignored mask, or zero keys
    # uncounted all fail it.
    assert ((got - want).abs().max() / want.abs().max()).item() < 2e-3
