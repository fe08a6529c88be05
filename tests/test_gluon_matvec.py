"""The paper's kernel pair as Gluon kernels (``packkv_ops/kernels/gluon_matvec.py``): one query per KV head against
the compressed blocks of K (scores), weights per token against those of V (a weighted sum), each as accurate as
fp32 products on the dequantized cache, over any number of blocks and splits; and a clear refusal of what they do
not decode.

On the CPU the kernels' bodies run eagerly (``gluon_eager``: their reading of the format, the lane order shared by
the decoded tiles, the scales and the outputs, the operands' fp16 halves and normalizers, the stages' mbarrier
protocol); on a GPU (``DEV``) the same tests run the compiled kernels, and the ``cuda`` test adds real sizes."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA
from helpers import MATVEC_ROUNDINGS, fill, int_and_zero_terms

from packkv.ops import Layout, PackKVConfig
from packkv.ops.kernels import gluon_matvec
from packkv.ops.kernels.matvec import dequantized_blocks, reference_k_matvec, reference_v_matvec

DEV = "cuda" if HAS_CUDA else "cpu"
PAPER = PackKVConfig(k_rel=0.1, v_rel=0.2, rotation="none")


def _layer(cfg: PackKVConfig, dim: int, tokens: int, batch: int = 2, heads: int = 2):
    g = torch.Generator().manual_seed(0)
    k = torch.randn(batch, heads, tokens, dim, generator=g)
    v = torch.randn(batch, heads, tokens, dim, generator=g)
    k[..., 3] += 4.0  # an outlier channel, as real keys have
    return fill(cfg, k.to(DEV), v.to(DEV))


def _error(got: torch.Tensor, exact: torch.Tensor, folded: torch.Tensor, fp32: torch.Tensor, what: str,
           steps: int) -> list[str]:  # fmt: skip
    """Within a few fp32 roundings of the magnitude of the terms the kernels sum apart (as the Triton pair), or as
    close as fp32 products on the dequantized cache (``fp32``) come where they need more (one dominant element):
    ``[]``, or what is off and by how much. On a GPU the products are wgmma's, whose fp32 sums truncate once per
    k-step of 16 (``steps`` of them for one output): up to 2 roundings each of the running sum, which one dominant
    term keeps near the terms' magnitude (with terms of mixed signs it stays far below, hence the 8 elsewhere)."""
    exact, folded, fp32 = exact.reshape(got.shape), folded.reshape(got.shape), fp32.reshape(got.shape).double().cpu()
    allowed = max(MATVEC_ROUNDINGS * 2**-24, float(((fp32 - exact).abs() / folded).max()))
    if DEV == "cuda":
        allowed = max(allowed, (MATVEC_ROUNDINGS + 2 * steps) * 2**-24)
    err = float(((got.double().cpu() - exact).abs() / folded).max())
    return [] if err <= allowed else [f"{what}: {err * 2**24:.1f} fp32 roundings, {allowed * 2**24:.1f} allowed"]


# cfg: the library's default (4-bit K, 3-bit V) and the paper's setting (k_rel 0.1 / v_rel 0.2: 3-bit K, 2-bit V);
# dim: 128 (Llama-3.1-8B) and 64 (a decoding partition of two warps per pack row); splits: one program per
# (sequence, head), or runs of blocks shared by 3 programs (one of them with a single block); blocks: all of them or
# the first ones only; options (PREFETCH, PIPE, BLOCK_SUMS): the producers' software pipeline over the blocks and
# the consumers' products one block deep (the default), or neither (each block's loads in its own turn, each product
# waited for at once); either with V's products summed per block in registers, or per group of 2 blocks (each group's
# products chained on the accumulator: 5 blocks in one program end a group mid-run and leave one of a single block).
@pytest.mark.parametrize("cfg", [PackKVConfig(), PAPER], ids=["defaults", "paper"])
@pytest.mark.parametrize("dim", [128, 64])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("first", [None, 3])
@pytest.mark.parametrize("options", [(1, 1, 0), (0, 0, 0), (1, 1, 1), (0, 0, 1), (1, 1, 2), (0, 0, 2)],
                         ids=["pipelined", "plain", "pipelined-block-sums", "plain-block-sums", "pipelined-pair-sums",
                              "plain-pair-sums"])  # fmt: skip
def test_gluon_matvec_matches_the_dequantized_cache(cfg, dim, splits, first, options, monkeypatch):
    for name, value in zip(("PREFETCH", "PIPE", "BLOCK_SUMS"), options):
        monkeypatch.setattr(gluon_matvec, name, value)
    st = _layer(cfg, dim, 5 * 64 + 30)
    nb = first or int(st.n_blocks[0])
    assert nb <= int(st.n_blocks[0])
    for stream in "kv":
        assert gluon_matvec.supported(st.layout, stream, torch.device(DEV)) is None
    g = torch.Generator().manual_seed(1)
    dk, dv = (dequantized_blocks(st, s, nb).double().cpu() for s in "kv")
    (ak, zk), (av, zv) = (tuple(t.cpu() for t in int_and_zero_terms(st, s, nb)) for s in "kv")
    q = torch.randn(2, 2, dim, generator=g) * 3
    wide_q = q * 2**-16  # one element 2^16 times the others: theirs below fp16's normal range once normalized
    wide_q[..., 5] = 3.0
    bad = []
    queries = dict(fp32=q, bf16=q.bfloat16(), tiny=q * 1e-6, wide=wide_q)
    for name, qq in queries.items():  # fp32: both fp16 halves; tiny: the normalizer; wide: the low half
        got = gluon_matvec.k_matvec(qq.to(DEV), st, nb, splits)
        qd = qq.double()[..., None]
        bad += _error(got, dk @ qd, ak @ qd.abs() + (zk @ qd).abs(), reference_k_matvec(qq.to(DEV), st, nb),
                      f"K, {name} query", dim // 16)  # fmt: skip
    w = torch.softmax(torch.randn(2, 2, nb * 64, generator=g), -1)
    w[0, 1, 70:] *= 1e-30  # weights of very different sizes across the blocks: the running normalizer rescales
    wide = 2**-16 * (1 + torch.rand(w.shape, generator=g))  # beside a weight 2^16 times larger: the low half
    wide[..., 7] = 1.0
    weights = {"softmax": w, "5 missing": w[..., :-5], "wide": wide}  # missing weights at the end count as zeros
    for name, ww in weights.items():
        full = torch.nn.functional.pad(ww, (0, w.shape[-1] - ww.shape[-1]))
        got = gluon_matvec.v_matvec(ww.to(DEV), st, nb, splits)
        wd = full.double()[..., None, :]
        bad += _error(got, wd @ dv, wd.abs() @ av + (wd @ zv).abs(), reference_v_matvec(full.to(DEV), st, nb),
                      f"V, {name} weights", 4 * -(-nb // splits))  # fmt: skip
    assert not bad, bad


def test_gluon_matvec_over_no_blocks_returns_empty_scores_and_a_zero_sum():
    st = _layer(PackKVConfig(), 128, 30)
    assert int(st.n_blocks[0]) == 0
    assert gluon_matvec.k_matvec(torch.randn(2, 2, 128, device=DEV), st, 0).shape == (2, 2, 0)
    assert not gluon_matvec.v_matvec(torch.randn(2, 2, 0, device=DEV), st, 0).any()


@pytest.mark.parametrize("pair", ["gluon", "triton"])
def test_both_pairs_refuse_what_they_would_read_out_of_bounds(pair):
    """Before any launch, with the problem named: no kernel reads past a tensor (host checks only, so a benchmark
    can still capture the calls in a CUDA graph)."""
    from packkv.ops.kernels import matvec

    mod = gluon_matvec if pair == "gluon" else matvec
    st = _layer(PackKVConfig(), 64, 3 * 64 + 130)  # 2 sequences, 2 KV heads, 3 blocks
    nb = int(st.n_blocks[0])
    q, w = torch.randn(2, 2, 64, device=DEV), torch.rand(2, 2, nb * 64, device=DEV)
    cases = [
        (mod.k_matvec, q[:, :1], nb, r"queries must be shaped \[2, 2, 64\] for this layer, got \[2, 1, 64\]"),
        (mod.k_matvec, q[..., :32], nb, r"queries must be shaped \[2, 2, 64\].*got \[2, 2, 32\]"),
        (mod.k_matvec, q[0], nb, r"queries must be shaped"),
        (mod.k_matvec, q.int(), nb, "queries must be floating point"),
        (mod.k_matvec, q, st.block_capacity + 1, f"n_blocks={st.block_capacity + 1} is outside"),
        (mod.v_matvec, w[:1], nb, r"weights must be shaped \[2, 2, tokens\] for this layer, got \[1, 2, "),
        (mod.v_matvec, w, -1, "n_blocks=-1 is outside"),
    ]  # fmt: skip
    for fn, x, n, message in cases:
        with pytest.raises(ValueError, match=message):
            fn(x, st, n)
    if DEV == "cuda":
        with pytest.raises(ValueError, match="queries are on cpu"):
            mod.k_matvec(q.cpu(), st, nb)
    assert mod.k_matvec(q, st, nb).shape == (2, 2, nb * 64)  # and the same call with good inputs goes through


@pytest.mark.parametrize("change, reason", [
    (dict(pack_size=32), "packs of 16"),
    (dict(block_size=32, window=32), "64-token blocks"),
    (dict(k_rel=0.01), "2- to 4-bit ints"),
    (dict(k_grouping="channel"), "token-grouped"),
])  # fmt: skip
def test_gluon_matvec_names_what_it_does_not_decode(change, reason):
    lay = Layout.from_config(PackKVConfig(**change), num_heads=2, head_dim=128)
    assert reason in gluon_matvec.supported(lay, "k", torch.device("cpu"))


@pytest.mark.cuda
@pytest.mark.parametrize("dim", [128, 64, 256])
@pytest.mark.parametrize("options", [1, 0], ids=["pipelined", "plain"])
def test_real_size_gluon_matvec_matches_the_dequantized_cache(dim, options, monkeypatch):
    """Llama-3.1-8B-like sizes (8 KV heads, 8K tokens, batch 2) at the paper's setting, the split count the launch
    picks, against fp64 products on the dequantized cache."""
    monkeypatch.setattr(gluon_matvec, "PREFETCH", options)
    monkeypatch.setattr(gluon_matvec, "PIPE", options)
    st = _layer(PAPER, dim, 8192 + 100, batch=2, heads=8)
    nb = int(st.n_blocks[0])
    q = torch.randn(2, 8, dim, device="cuda").bfloat16()
    w = torch.softmax(torch.randn(2, 8, nb * 64, device="cuda"), -1)
    dk, dv = (dequantized_blocks(st, s, nb).double() for s in "kv")
    (ak, zk), (av, zv) = (int_and_zero_terms(st, s, nb) for s in "kv")
    qd, wd = q.double()[..., None], w.double()[..., None, :]
    bad = _error(gluon_matvec.k_matvec(q, st, nb), (dk @ qd).cpu(), (ak @ qd.abs() + (zk @ qd).abs()).cpu(),
                 reference_k_matvec(q, st, nb), "K", dim // 16)
    bad += _error(gluon_matvec.v_matvec(w, st, nb), (wd @ dv).cpu(), (wd.abs() @ av + (wd @ zv).abs()).cpu(),
                  reference_v_matvec(w, st, nb), "V", 4 * -(-nb // gluon_matvec._splits(2, 8, nb, dim, q.device)))
    assert not bad, bad


@pytest.mark.cuda
@pytest.mark.parametrize("sums", [0, 1, 16], ids=["one-chain", "per-block", "per-16-blocks"])
def test_v_matvec_over_one_long_split_stays_within_its_truncated_adds(sums, monkeypatch):
    """One program over 158 blocks (paper setting, head_dim 128): wgmma's truncating fp32 adds cost up to 2
    roundings per k-step of the chain the sum runs on, 4 per block; summed in registers every ``sums`` blocks the
    chain is that group (plus one rounding per group's add), so its bound is ~10x tighter at 16."""
    monkeypatch.setattr(gluon_matvec, "BLOCK_SUMS", sums)
    st = _layer(PAPER, 128, 160 * 64 + 10, batch=1, heads=2)
    nb = int(st.n_blocks[0])
    w = torch.softmax(torch.randn(1, 2, nb * 64, device="cuda"), -1)
    dv = dequantized_blocks(st, "v", nb).double()
    av, zv = int_and_zero_terms(st, "v", nb)
    wd = w.double()[..., None, :]
    steps = 4 * nb if sums == 0 else 4 * sums + -(-nb // sums)
    bad = _error(gluon_matvec.v_matvec(w, st, nb, 1), (wd @ dv).cpu(), (wd.abs() @ av + (wd @ zv).abs()).cpu(),
                 reference_v_matvec(w, st, nb), "V", steps)
    assert not bad, bad
