"""The Gluon prototype of the warp-specialized attention (``scripts/gluon_sm90/packed_decode_attention.py``)
computes attention over a real ``PackedLayer``'s compressed blocks.

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
import torch.nn.functional as F
from helpers import fill

from packkv.ops import PackKVConfig, reference

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts" / "gluon_sm90"))
import eager  # noqa: E402
import packed_decode_attention as pda  # noqa: E402

LOG2E = 1.4426950408889634


@pytest.mark.parametrize("splits", [1, 4])  # 4 splits of 3 blocks: one split is empty
def test_eager_gluon_prototype_matches_attention_over_the_decompressed_blocks(splits):
    torch.manual_seed(0)
    cfg = PackKVConfig(k_rel=0.1, v_rel=0.2, rotation="none")  # the one layout the prototype decodes
    B, H, D, n_rep, R = 2, 2, 128, 4, 8
    L = 3 * 64 + 150
    k, v = torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    st = fill(cfg, k, v)
    T, nb = st.layout.block_size, int(st.n_blocks[0])
    assert nb == 3
    q = torch.randn(B, H * n_rep, 1, D).half().float()
    rows = torch.zeros(B * H, R, D, dtype=torch.float16)
    rows[:, :n_rep] = q.view(B * H, n_rep, D).half()
    per = -(-nb // splits)
    n = B * H * splits
    o, m, l = torch.zeros(n, R, D), torch.zeros(n, R), torch.zeros(n, R)
    eager.run(pda.packed_decode_attention, (B * H, splits), rows, st.pool, st.k_offsets, st.v_offsets, st.k_meta,
              st.v_meta, st.k_scale, st.k_zero, st.v_scale, st.v_zero, st.n_blocks, o, m, l, st.block_capacity, H,
              per, LOG2E / math.sqrt(D), module=pda, T=T, D=D, R=R, STAGES=2)  # fmt: skip
    mm = m.view(B * H, splits, R)
    w = torch.exp2(mm - mm.amax(1, keepdim=True))
    got = (o.view(B * H, splits, R, D) * w[..., None]).sum(1) / (l.view(B * H, splits, R) * w).sum(1)[..., None]
    got = got[:, :n_rep].reshape(B, H * n_rep, 1, D)
    kk, vv = reference.decompress_fp32(st, L)
    kk, vv = kk[:, :, : nb * T], vv[:, :, : nb * T]  # the compressed blocks: the prototype has no exact window
    want = F.scaled_dot_product_attention(q, kk.repeat_interleave(n_rep, 1), vv.repeat_interleave(n_rep, 1))
    # fp16 products and weights (V's scale folded into P): ~4e-4 of the largest output; a wrong lane order or
    # window order is off by ~0.7 (mutation-checked)
    assert ((got - want).abs().max() / want.abs().max()).item() < 2e-3
