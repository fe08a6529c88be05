"""Repacking reorders tokens inside a block: it shrinks structured data and changes nothing else."""

from __future__ import annotations

import pytest
import torch
from helpers import fill, n_tokens, spec

from packkv.ops import Layout, PackKVConfig
from packkv.ops.accounting import exact_bytes
from packkv.ops.codec import pack_chunks, quantize_blocks
from packkv.ops.reference import decompress_fp32
from packkv.ops.repack import counting_median, median_perm


def clustered(n_seq: int, heads: int, length: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Tokens drawn from four templates at different levels, interleaved at random, with two outlier channels
    that fix every token's range: the structure repacking exploits (similar tokens far apart)."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(4, heads, dim, generator=g) + torch.tensor([-2.0, -0.7, 0.7, 2.0])[:, None, None]
    which = torch.randint(0, 4, (n_seq, length), generator=g)
    x = templates[which].permute(0, 2, 1, 3) + 0.05 * torch.randn(n_seq, heads, length, dim, generator=g)
    x[..., 0], x[..., 1] = 8.0, -8.0
    return x


def payload_words(x: torch.Tensor, repack: str) -> int:
    lay = Layout.from_config(PackKVConfig(repack=repack), x.shape[1], x.shape[3])
    qb = quantize_blocks(x, x, lay)
    return sum(int(pack_chunks(q, s, lay)[1].sum()) for q, s in ((qb.kq, lay.k), (qb.vq, lay.v)))


@pytest.mark.parametrize("repack", ["median", "greedy"])
def test_repacking_makes_structured_data_smaller(repack):
    x = clustered(4, 2, 64, 64)
    assert payload_words(x, repack) < 0.6 * payload_words(x, "none")


@pytest.mark.parametrize("grouping", ["token", "token_head", "channel"])
def test_repacking_changes_neither_decompressed_tokens_nor_attention(grouping):
    k, v = clustered(2, 2, 64 * 3 + 150, 64, seed=1), clustered(2, 2, 64 * 3 + 150, 64, seed=2)
    layers = {
        r: fill(PackKVConfig(repack=r, k_grouping=grouping), k, v, steps=[100, 1, 64 * 3 + 49])
        for r in ("none", "median", "greedy")
    }
    n = n_tokens(layers["none"])
    outs = {r: decompress_fp32(layer, n) for r, layer in layers.items()}
    q = torch.randn(2, 4, 1, 64)
    attn = {
        r: torch.ops.packkv.attention(q, *layer.tensors(), n, None, False, None, *spec(layer.layout))
        for r, layer in layers.items()
    }
    for r in ("median", "greedy"):
        perm = layers[r].perm[:, : int(layers[r].n_blocks[0])].long()
        assert torch.equal(perm.sort(-1).values, torch.arange(64).expand_as(perm))  # a permutation...
        assert not torch.equal(perm, torch.arange(64).expand_as(perm))  # ...that moved tokens
        assert torch.equal(outs[r][0], outs["none"][0]) and torch.equal(outs[r][1], outs["none"][1])
        torch.testing.assert_close(attn[r], attn["none"], rtol=1e-6, atol=1e-6)
    assert exact_bytes(layers["median"])["payload"] < exact_bytes(layers["none"])["payload"]


@pytest.mark.parametrize("levels", [2, 3, 8, 16])
@pytest.mark.parametrize("heads,dim", [(1, 1), (3, 2), (1, 7), (3, 64)])
def test_median_by_counting_equals_the_sorted_median(levels, heads, dim):
    """Small integer ranges take the counting median on the GPU; it gives torch.median's lower median exactly
    (even and odd counts, heavy ties)."""
    g = torch.Generator().manual_seed(levels * 1000 + heads * dim)
    vq = torch.randint(0, levels, (5, heads, 32, dim), generator=g, dtype=torch.int32)
    vq[1] = vq[1] // 2  # ties
    x = vq.permute(0, 2, 1, 3).reshape(5, 32, heads * dim)
    assert torch.equal(counting_median(x, levels), x.median(dim=-1).values.to(torch.int32))
    assert torch.equal(median_perm(vq, levels), median_perm(vq))
