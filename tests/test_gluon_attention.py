"""The warp-specialized Gluon attention kernel (``packkv_ops/kernels/gluon_attention.py``) computes a decode step's
attention over a ``PackedLayer`` as the reference does: compressed blocks, the exact window, zero keys up to
``out_len``, a padding mask, ragged batches, GQA groups of 1 to 8 query heads, a Hadamard-rotated cache; and it
refuses, with the reason, what it does not decode.

Gluon has no interpreter, so the kernel's body runs eagerly on torch tensors (``gluon_eager``: the same Python,
``gl`` replaced by torch, each inline asm by its torch twin) as the CPU implementation of its op; the merge runs
in the Triton interpreter. That checks the kernel's reading of the format (fields, the pack-start scan, pack bits,
lane extraction), the lane order shared by the decoded tiles and the scales, the MMA operands' orientation, the
softmax and the partials' layout; its compilation is checked by ``test_kernel_build.py``, its synchronization and
speed only on a GPU: there the same tests run the compiled kernel (``DEV``), and the ``cuda`` tests below add real
sizes and a compiled step under CUDA graphs (``scripts/gluon_sm90/packed_decode_attention.py --gpu`` times it)."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA
from helpers import fill, spec

from packkv.ops import PackKVConfig, reference
from packkv.ops.kernels import attention as attention_kernel
from packkv.ops.kernels import gpu
from packkv.ops.layout import ROTATION_CODES
from packkv.ops.rotation import rotate

DEV = "cuda" if HAS_CUDA else "cpu"
B, H, D = 2, 2, 128
L = 3 * 64 + 150  # 3 compressed blocks, 150 exact tokens in the window (3 tiles, the last one partial)


def _layer(cfg: PackKVConfig, dtype: torch.dtype = torch.float32, ragged: bool = False, dim: int = D):
    k, v = torch.randn(B, H, L, dim, device=DEV).to(dtype), torch.randn(B, H, L, dim, device=DEV).to(dtype)
    st = fill(cfg, k, v)
    assert int(st.n_blocks[0]) == 3 and int(st.n_win[0]) == 150
    if ragged:  # the second sequence is a block and 7 tokens shorter
        st.n_blocks[1] -= 1
        st.n_win[1] -= 7
    return st


@pytest.fixture
def every_built_head_dim(monkeypatch):
    """The op takes the Gluon kernel at every head_dim it is built for (the default; ``PACKKV_GLUON_HEAD_DIMS`` may
    narrow it in the environment the tests run in)."""
    from packkv.ops.kernels import gluon_attention

    monkeypatch.setattr(gluon_attention, "HEAD_DIMS", gluon_attention.BUILT_HEAD_DIMS)


def _padding_mask(out_len: int) -> torch.Tensor:
    """Left padding of 20 and 40 tokens, random holes (some among the zero keys past the length)."""
    mask = torch.rand(B, 1, 1, out_len, device=DEV) > 0.2
    mask[0, ..., :20] = False
    mask[1, ..., :40] = False
    return mask


def _want(q, st, out_len, mask, rotation):
    """The reference in the model's coordinates, fp32 (``ops.attention``: rotate, attend, rotate back)."""
    code = ROTATION_CODES[rotation]
    return rotate(reference.attention(rotate(q.float(), code), st, out_len, mask, False, None), code)


# splits: 1, or 4 over 3 blocks (the last one takes the window's tiles alone); extra: zero keys past the length (a
# compiled step's out_len is the storage's capacity); masked: a decode step's bool padding mask, one row per
# sequence; ragged: the second sequence shorter; rotation: the query rotated before the kernel, the output in the
# merge; dtype: the query's and the cache's (bf16 is rounded to fp16 in the kernel); dim: head_dim 64 (Llama-3.2-1B,
# Qwen2.5-0.5B, SmolLM2) and 256 (Gemma) have decoding partitions of D / 32 warps (each thread still 4 packs of a
# pack row: a warp holds two rows of 64 channels, or half a row of 256), the stage and products half or twice as deep.
@pytest.mark.parametrize(
    "n_rep, splits, extra, masked, ragged, rotation, dtype, dim",
    [
        (4, 1, 0, False, False, "none", torch.float16, 128),
        (4, 4, 37, False, True, "none", torch.float16, 128),
        (4, 4, 37, True, True, "none", torch.float16, 128),
        (1, 1, 0, True, False, "none", torch.float16, 128),
        (8, 3, 5, False, True, "hadamard", torch.bfloat16, 128),
        (2, 16, 100, True, True, "hadamard", torch.bfloat16, 128),
        (4, 4, 37, True, True, "none", torch.float16, 64),
        (3, 3, 5, False, True, "hadamard", torch.bfloat16, 64),
        (8, 16, 100, True, False, "hadamard", torch.bfloat16, 64),
        (4, 4, 37, True, True, "none", torch.float16, 256),
        (3, 3, 5, False, True, "hadamard", torch.bfloat16, 256),
        (8, 16, 100, True, False, "hadamard", torch.bfloat16, 256),
    ],
)  # fmt: skip
def test_gluon_attention_matches_the_reference(n_rep, splits, extra, masked, ragged, rotation, dtype, dim,
                                               every_built_head_dim):  # fmt: skip
    st = _layer(PackKVConfig(k_rel=0.1, v_rel=0.2, rotation=rotation), dtype, ragged, dim=dim)
    out_len = L + extra
    mask = _padding_mask(out_len) if masked else None
    q = torch.randn(B, H * n_rep, 1, dim, device=DEV).to(dtype)
    got = gpu.attention(q, st, out_len, mask, False, None, splits=splits, rotate=rotation == "hadamard", gluon=True)
    want = _want(q, st, out_len, mask, rotation)
    assert got.dtype == dtype and got.shape == q.shape
    # fp16 products and weights (V's scale folded into P), the output rounded to the query's dtype: 2e-3 of the
    # largest output in fp16; in bf16 1e-2, a few of the output's half-ulps (the Triton kernel: 9.5e-3 on the same
    # cases, this one 6.7e-3). Mutation-checked: a wrong lane order, window order, ring offset, mask
    # position, split share or partial's row; unmasked keys past the length; an ignored mask; uncounted zero keys;
    # (head_dim 64) the fields' row and channel read with 128's D // 4.
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert ((got.float() - want).abs().max() / want.abs().max()).item() < tol


# A padded batch's decode-step mask: the first sequence left-padded into its first block, the second's compressed
# blocks all visible but one key of its window hidden, zero keys past the length partly visible. With MASK_SCAN a
# split first scans its compressed positions and skips the per-tile mask gathers where none is hidden (here split 0
# of the first sequence gathers, the others do not; MASK_BRANCH: branched around, or predicated off); off, every
# tile gathers.
@pytest.mark.parametrize("mask_scan, mask_branch", [(True, True), (True, False), (False, True)])
def test_a_split_whose_blocks_are_all_visible_skips_the_mask_gathers_with_the_same_result(mask_scan, mask_branch,
                                                                                          monkeypatch):  # fmt: skip
    from packkv.ops.kernels import gluon_attention

    monkeypatch.setattr(gluon_attention, "MASK_SCAN", mask_scan)
    monkeypatch.setattr(gluon_attention, "MASK_BRANCH", mask_branch)
    st = _layer(PackKVConfig(k_rel=0.1, v_rel=0.2), torch.float16)
    out_len = L + 50
    mask = torch.ones(B, 1, 1, out_len, dtype=torch.bool, device=DEV)
    mask[0, ..., :20] = False
    mask[1, ..., L - 5] = False
    mask[:, ..., L + 10 :] = False
    q = torch.randn(B, H * 4, 1, D, device=DEV).to(torch.float16)
    got = gpu.attention(q, st, out_len, mask, False, None, splits=4, gluon=True)
    want = _want(q, st, out_len, mask, "none")
    # Mutation-checked: scanning another range than the split's blocks (the left padding ignored), or skipping the
    # window's gather too (its hidden key seen).
    assert ((got.float() - want).abs().max() / want.abs().max()).item() < 2e-3


# The mask scans read SCAN chunks of 1,024 positions per round trip: a long split's compressed positions (70 blocks,
# 4,480 tokens, the window holding 168: two rounds of 4 chunks, five of 1) with 64 hidden keys in a later chunk of
# the first round, in the second round, at the start (left padding), or none; and 5,000 zero keys past the length, a
# hidden stretch among them, counted over rounds. Only the tiles from the first to the last block holding a hidden
# key gather the mask (mutation-checked: that range one block short at either end; the backward scan for the last
# one starting a chunk short of the split's end).
@pytest.mark.parametrize("scan", [1, 4])
@pytest.mark.parametrize("hidden", [None, 0, 3000, 4300])
def test_the_mask_scans_cover_a_long_split_in_rounds_of_chunks(scan, hidden, monkeypatch):
    from packkv.ops.kernels import gluon_attention

    monkeypatch.setattr(gluon_attention, "SCAN", scan)
    n = 72 * 64 + 40
    k, v = torch.randn(1, 1, n, D, device=DEV), torch.randn(1, 1, n, D, device=DEV)
    st = fill(PackKVConfig(k_rel=0.1, v_rel=0.2, rotation="none"), k.half(), v.half())
    assert int(st.n_blocks[0]) == 70
    out_len = n + 5000
    mask = torch.ones(1, 1, 1, out_len, dtype=torch.bool, device=DEV)
    mask[..., n + 1500 : n + 4700] = False
    if hidden is not None:
        mask[..., hidden : hidden + 64] = False
    q = torch.randn(1, 4, 1, D, device=DEV).half()
    got = gpu.attention(q, st, out_len, mask, False, None, splits=1, gluon=True)
    want = _want(q, st, out_len, mask, "none")
    # Mutation-checked: every chunk of a round reading the first chunk's positions; the scan's loop ending after
    # one round.
    assert ((got.float() - want).abs().max() / want.abs().max()).item() < 2e-3


def _under_settings(monkeypatch, splits: int, base: dict, variant: dict, q_scale: float = 1.0):
    """The Gluon attention over a ragged fp16 layer with a padding mask under ``base``, then ``variant`` settings of
    ``gluon_attention``; and the reference."""
    from packkv.ops.kernels import gluon_attention

    st = _layer(PackKVConfig(k_rel=0.1, v_rel=0.2, rotation="none"), torch.float16, ragged=True)
    mask = _padding_mask(L + 20)
    q = (torch.randn(B, H * 4, 1, D, device=DEV) * q_scale).to(torch.float16)
    out = []
    for settings in (base, variant):
        for name, value in settings.items():
            monkeypatch.setattr(gluon_attention, name, value)
        out.append(gpu.attention(q, st, L + 20, mask, False, None, splits=splits, gluon=True))
    return out[0], out[1], _want(q, st, L + 20, mask, "none")


# (PREFETCH, PRODUCERS): each block's fields, offsets and pack bits loaded in its own iteration (0), not one and two
# blocks ahead (1; its last blocks' look-ahead clamped to a block that exists); one decoding warpgroup, or two taking
# turns over the blocks and the window's tiles (with splits=1 one takes blocks 0, 2 and tiles 4, the other block 1
# and tiles 3, 5).
@pytest.mark.parametrize("prefetch, producers", [(0, 1), (1, 2), (0, 2)])
@pytest.mark.parametrize("splits", [1, 4])
def test_the_producers_launch_options_give_the_same_attention(prefetch, producers, splits, monkeypatch):
    default, got, want = _under_settings(monkeypatch, splits, dict(PREFETCH=1, PRODUCERS=1),
                                         dict(PREFETCH=prefetch, PRODUCERS=producers))  # fmt: skip
    torch.testing.assert_close(got, default, rtol=0, atol=0)
    assert ((got.float() - want).abs().max() / want.abs().max()).item() < 2e-3


# PAIR: the consumer takes two compressed blocks per turn of its chain (one maximum for both, both P V products on
# the accumulator), an odd block left alone, then the window's tiles one by one. With splits=1 the first sequence's
# 3 blocks are a pair and a single, the second's 2 a pair; with splits=2 each split's share is a pair or a single.
# With 3 stages a pair's blocks take turns over the stages (block i in stage i % 3). The same attention up to the
# order of fp32 sums. A query 30x larger spreads the scores over ~40 powers of two, so
# weights relative to a wrong maximum overflow fp16. Mutation-checked: the second block's V scales taken from the
# first; the pair's maximum over the first block only.
@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("q_scale", [1.0, 30.0])
@pytest.mark.parametrize("splits", [1, 2])
def test_the_consumers_pair_steps_give_the_same_attention(splits, q_scale, stages, monkeypatch):
    default, got, want = _under_settings(monkeypatch, splits, dict(PAIR=False, STAGES=2),
                                         dict(PAIR=True, STAGES=stages), q_scale)  # fmt: skip
    assert ((got.float() - default.float()).abs().max() / default.float().abs().max()).item() < 1e-3
    assert ((got.float() - want).abs().max() / want.abs().max()).item() < 2e-3


# L2_AHEAD: each decoding warpgroup asks L2 for the block it will decode L2_AHEAD turns later (its fields exactly,
# the most its payloads can span from their offsets). A hint: the attention is the same bit for bit. On the CPU the
# eager run records every prefetch and checks what the hardware requires (16-byte aligned, inside the tensor); here
# on a compacted pool (the last chunk's largest span clipped at the pool's end) and a ragged batch, every block but
# the first L2_AHEAD of each warpgroup's turns in a split is asked for once, and each request covers what the
# decode then reads. Mutation-checked: the look-ahead's offsets of the current block; the clip dropped; K's span
# halved; the start rounded up, not down; prefetches for blocks past the split's end.
@pytest.mark.parametrize("ahead", [1, 2])
@pytest.mark.parametrize("splits", [1, 2])
def test_the_producers_ask_l2_for_the_blocks_they_decode_next(ahead, splits, monkeypatch):
    from packkv.ops.kernels import gluon_attention, gluon_eager

    n = 11 * 64 + 30
    k = torch.randn(2, 2, n, D, device=DEV)
    v = torch.randn(2, 2, 1, D, device=DEV) + 1e-3 * torch.randn(2, 2, n, D, device=DEV)  # narrow packs: V's
    st = fill(PackKVConfig(k_rel=0.1, v_rel=0.2, rotation="none"), k.half(), v.half())  # spans pass the pool's end
    st.n_blocks[1] -= 2  # ragged
    st = st.compacted()
    q = torch.randn(2, 8, 1, D, device=DEV).half()
    monkeypatch.setattr(gluon_attention, "L2_AHEAD", 0)
    plain = gpu.attention(q, st, n + 7, None, False, None, splits=splits, gluon=True)
    monkeypatch.setattr(gluon_attention, "L2_AHEAD", ahead)
    gluon_eager.PREFETCHES.clear()
    got = gpu.attention(q, st, n + 7, None, False, None, splits=splits, gluon=True)
    torch.testing.assert_close(got, plain, rtol=0, atol=0)
    if DEV == "cuda":
        return
    asked = {}
    for base, first, size in gluon_eager.PREFETCHES:
        asked.setdefault(base.data_ptr(), []).append((first, size))
    lay, npar = st.layout, gluon_attention.PRODUCERS
    kw, vw = st.chunk_words()
    want_meta = {"k": [], "v": []}
    want_payload = []
    for b in range(2):
        nb = int(st.n_blocks[b])
        per = -(-nb // splits)
        for sp in range(splits):
            lo, hi = min(sp * per, nb), min(sp * per + per, nb)
            for j in range(lo + ahead * npar, hi):
                for h in range(2):
                    for name, meta in (("k", st.k_meta), ("v", st.v_meta)):
                        row = meta[b, j, h]
                        want_meta[name].append((row.data_ptr() - meta.data_ptr(), row.numel() * 4))
                    want_payload.append((int(st.k_offsets[b, j, h]) * 4, int(kw[b, j, h]) * 4))
                    want_payload.append((int(st.v_offsets[b, j, h]) * 4, int(vw[b, j, h]) * 4))
    assert want_payload, "the case must have blocks to look ahead to"
    assert sorted(asked[st.k_meta.data_ptr()]) == sorted(want_meta["k"])
    assert sorted(asked[st.v_meta.data_ptr()]) == sorted(want_meta["v"])
    spans = asked[st.pool.data_ptr()]
    assert len(spans) <= len(want_payload)  # a payload in the pool's last 16 bytes cannot be asked for
    last16 = st.pool.numel() * 4 // 16 * 16
    assert any(start + size > last16 for start, size in want_payload), "the clip at the pool's end is exercised"
    for start, size in want_payload:  # some request covers each payload (up to the pool's last 16 bytes)
        end = min(start + size, last16)
        assert end <= start or any(f <= start and end <= f + s for f, s in spans), (start, size)


@pytest.mark.parametrize("k_rel, v_rel", [(0.4, 0.1), (0.2, 0.5), (0.07, 0.07)])  # K/V: 2/4, 3/2, 4/4-bit ints
def test_gluon_attention_decodes_2_to_4_bit_ints_in_either_stream(k_rel, v_rel):
    st = _layer(PackKVConfig(k_rel=k_rel, v_rel=v_rel, rotation="none"), torch.float16, ragged=True)
    mask = _padding_mask(L + 9)
    q = torch.randn(B, H * 4, 1, D, device=DEV, dtype=torch.float16)
    got = gpu.attention(q, st, L + 9, mask, False, None, splits=3, gluon=True)
    want = _want(q, st, L + 9, mask, "none")
    assert ((got.float() - want).abs().max() / want.abs().max()).item() < 2e-3


def test_gluon_attention_with_the_default_config():
    """The defaults (``k_rel`` 0.07, ``v_rel`` 0.15, Hadamard rotation) give the layout the kernel decodes."""
    st = _layer(PackKVConfig(), torch.bfloat16)
    q = torch.randn(B, H * 4, 1, D, device=DEV, dtype=torch.bfloat16)
    got = gpu.attention(q, st, L + 64, None, False, None, splits=2, rotate=True, gluon=True)
    want = _want(q, st, L + 64, None, "hadamard")
    assert ((got.float() - want).abs().max() / want.abs().max()).item() < 1e-2


@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(dim=64, head_dims=(128,)), "head_dim 128"),  # PACKKV_GLUON_HEAD_DIMS=128
        (dict(cfg=dict(pack_size=8)), "packs of 16"),
        (dict(cfg=dict(k_rel=0.05)), "2- to 4-bit ints"),
        (dict(cfg=dict(k_grouping="channel")), "token-grouped"),
        (dict(tq=2), "one query per sequence"),
        (dict(n_rep=16), "at most 8 query heads"),
        (dict(q_dtype=torch.float32), "bf16/fp16"),
        (dict(causal=True), "causal"),
        (dict(mask="float"), "bool padding mask"),
        (dict(mask="per_head"), "bool padding mask"),
    ],
)  # fmt: skip
def test_gluon_attention_names_what_it_does_not_decode(change, reason, caplog, monkeypatch):
    """Asked for explicitly, an uncovered call is a ``ValueError`` with the reason; switched on for a whole model
    (``attention.GLUON``), the same call runs on the Triton kernel, with the reason in the debug log."""
    from packkv.ops.kernels import gluon_attention

    if "head_dims" in change:
        monkeypatch.setattr(gluon_attention, "HEAD_DIMS", change["head_dims"])
    dim = change.get("dim", D)
    cfg = PackKVConfig(**{"k_rel": 0.1, "v_rel": 0.2, "rotation": "none", **change.get("cfg", {})})
    k, v = (torch.randn(B, H, 100, dim, device=DEV, dtype=torch.float16) for _ in range(2))
    st = fill(cfg, k, v)
    n_rep, tq = change.get("n_rep", 2), change.get("tq", 1)
    q = torch.randn(B, H * n_rep, tq, dim, device=DEV).to(change.get("q_dtype", torch.float16))
    mask = {None: None, "float": torch.randn(B, 1, 1, 100, device=DEV),
            "per_head": torch.rand(B, H * n_rep, 1, 100, device=DEV) > 0.2}[change.get("mask")]  # fmt: skip
    causal = change.get("causal", False)
    with pytest.raises(ValueError, match=reason):
        gpu.attention(q, st, 100, mask, causal, None, gluon=True)
    monkeypatch.setattr(attention_kernel, "GLUON", True)
    with caplog.at_level("DEBUG", logger="packkv.ops.kernels.attention"):
        got = gpu.attention(q, st, 100, mask, causal, None)
    assert reason in caplog.text
    want = reference.attention(q.float(), st, 100, mask, causal, None)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_the_gluon_kernel_takes_its_own_split_count_unless_the_caller_sets_one(monkeypatch):
    """Its programs per SM differ from the Triton kernel's (2 at its register cap, not 4): without a caller's
    ``splits`` it launches ``gluon_attention.WAVES`` waves of them (``splits_for``), with one it takes that."""
    from packkv.ops.kernels import gluon_attention
    from packkv.ops.kernels._launch import num_sms

    seen = []
    partials = gluon_attention.partials
    monkeypatch.setattr(gluon_attention, "partials", lambda *a: seen.append(a[17]) or partials(*a))
    st = _layer(PackKVConfig(k_rel=0.1, v_rel=0.2), torch.float16)
    q = torch.randn(B, H * 4, 1, D, device=DEV).to(torch.float16)
    out_len = L + 64 * 400  # zero keys past the length: enough blocks that no count is capped at one per block
    want = _want(q, st, out_len, None, "none")
    for waves, splits in ((2, None), (1, None), (1, 3)):
        monkeypatch.setattr(gluon_attention, "WAVES", waves)
        got = gpu.attention(q, st, out_len, None, False, None, splits=splits, gluon=True)
        assert ((got.float() - want).abs().max() / want.abs().max()).item() < 2e-3
    own = []
    for waves in (2, 1):
        monkeypatch.setattr(gluon_attention, "WAVES", waves)
        own.append(gluon_attention.splits_for(q, H, out_len, num_sms(q.device)))
    # Mutation-checked: handing the kernel the Triton kernel's count (4 here whatever WAVES is) fails.
    assert own[0] == 2 * own[1] and seen == [*own, 3]


def test_programs_per_sm_follow_the_registers_and_the_shared_memory_a_head_dim_needs(monkeypatch):
    """The split count fills whole waves of the programs an SM holds: at the 80-register cap 2 of 12 warps (head_dim
    128) or 3 of 8 (64); at 256, 20 warps at 96 registers and 130 KB of stages: 1. A number set by hand wins."""
    from packkv.ops.kernels import gluon_attention as ga

    assert [ga.programs_per_sm(d) for d in (64, 128, 256)] == [3, 2, 1]
    q = torch.zeros(1, 32, 1, 64)
    assert ga.splits_for(q, 8, 1 << 20, 132) == ga.WAVES * 3 * 132 // 8
    monkeypatch.setattr(ga, "PROGRAMS_PER_SM", 2)
    assert ga.splits_for(q, 8, 1 << 20, 132) == ga.WAVES * 2 * 132 // 8


def test_by_default_the_gluon_kernel_takes_the_decode_steps_it_covers_on_an_sm90_gpu_only(monkeypatch):
    """``attention.GLUON`` None (the default): a decode step on CUDA tensors of an sm_90 GPU runs on it, one on CPU
    tensors does not (there its body runs eagerly: a check, not a fast path); False: never; True: also on the CPU."""
    calls = []
    real = attention_kernel._gluon_attention
    monkeypatch.setattr(attention_kernel, "_gluon_attention", lambda *a: calls.append(1) or real(*a))
    st = _layer(PackKVConfig(k_rel=0.1, v_rel=0.2, rotation="none"), torch.float16)
    q = torch.randn(B, H * 4, 1, D, device=DEV, dtype=torch.float16)
    monkeypatch.setattr(attention_kernel, "GLUON", None)
    gpu.attention(q, st, L, None, False, None, splits=2)
    hopper = DEV == "cuda" and torch.cuda.get_device_capability() == (9, 0)
    assert calls == ([1] if hopper else [])
    calls.clear()
    monkeypatch.setattr(attention_kernel, "GLUON", False)
    gpu.attention(q, st, L, None, False, None, splits=2)
    assert calls == []
    monkeypatch.setattr(attention_kernel, "GLUON", True)
    got = gpu.attention(q, st, L, None, False, None, splits=2)
    assert calls == [1]
    want = _want(q, st, L, None, "none")
    assert ((got.float() - want).abs().max() / want.abs().max()).item() < 2e-3


# The CPU run orders the kernel's partitions (threads) by its mbarriers alone, with the hardware's phase rule, so a
# wrong phase or a missing arrival shows on the CPU as a wait that times out (on the GPU: a hang).
def test_the_eager_runs_mbarriers_complete_phases_as_the_hardware_does(monkeypatch):
    import threading

    from packkv.ops.kernels import gluon_eager

    monkeypatch.setattr(gluon_eager, "WAIT_S", 0.2)
    run = {"cv": threading.Condition(), "failed": False}
    bar = gluon_eager._Barriers(1, run).index(0)
    gluon_eager._MBarrier.init(bar, count=2)
    bar.wait(1)  # a fresh barrier: the phase before the first counts as complete
    with pytest.raises(RuntimeError, match="timed out"):
        bar.wait(0)
    gluon_eager._MBarrier.arrive(bar)
    with pytest.raises(RuntimeError, match="1/2 arrivals"):
        bar.wait(0)  # one of the two arrivals
    gluon_eager._MBarrier.arrive(bar)
    bar.wait(0)
    with pytest.raises(RuntimeError, match="timed out"):
        bar.wait(1)
    monkeypatch.setattr(gluon_eager, "WAIT_S", 5.0)
    released = []
    waiter = threading.Thread(target=lambda: released.append(bar.wait(1) is None))
    waiter.start()  # a partition waiting for the next phase, released by the other's arrivals
    gluon_eager._MBarrier.arrive(bar, count=2)
    waiter.join(timeout=10)
    assert released == [True]


def test_the_partials_op_passes_opcheck():
    """Schema, fake tensor (the compiled step's shapes) and dispatch of the opaque op that launches the kernel."""
    st = _layer(PackKVConfig(k_rel=0.1, v_rel=0.2, rotation="none"), torch.float16)
    q = torch.randn(B, H * 4, 1, D, device=DEV, dtype=torch.float16)
    mask = _padding_mask(L + 10)
    args = (q, st.pool, st.k_offsets, st.v_offsets, st.k_meta, st.v_meta, st.k_scale, st.k_zero, st.v_scale,
            st.v_zero, st.ring_k, st.ring_v, st.n_blocks, st.n_win, st.perm, mask, L + 10, 2, 0.088, True, 4, 3)  # fmt: skip
    torch.library.opcheck(torch.ops.packkv._gluon_decode_partials.default, args)


# --- on the GPU -------------------------------------------------------------------------------------------------
def _hopper():
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip(f"the Gluon kernel is built for sm_90; this GPU is {torch.cuda.get_device_name()}")


@pytest.mark.cuda
@pytest.mark.parametrize("n_rep", [1, 4, 8])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dim", [128, 64, 256])
def test_real_size_gluon_attention_matches_the_reference(n_rep, masked, dim, every_built_head_dim):
    """8K tokens per sequence, ragged, the default config (Hadamard rotation), bf16: within the model dtype's
    rounding of the reference, and of the Triton kernel."""
    from test_cuda import fill_cuda

    _hopper()
    Bc, Hc, Lc = 3, 8, 8192 + 11
    k = (torch.randn(Bc, Hc, Lc, dim) * 3).bfloat16().cuda()
    v = torch.randn(Bc, Hc, Lc, dim).bfloat16().cuda()
    st = fill_cuda(PackKVConfig(), k, v, [Lc - 1, 1])
    st.n_blocks[2] -= 5
    st.n_win[2] -= 3
    out_len = Lc + 70  # zero keys past each sequence's end
    mask = None
    if masked:
        mask = torch.ones(Bc, 1, 1, out_len, dtype=torch.bool, device="cuda")
        mask[1, ..., :300] = False
        mask[:, ..., Lc:] = False
    q = torch.randn(Bc, Hc * n_rep, 1, dim, device="cuda").bfloat16()
    got = gpu.attention(q, st, out_len, mask, False, None, rotate=True, gluon=True)
    want = _want(q, st, out_len, mask, "hadamard")
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    triton_out = gpu.attention(q, st, out_len, mask, False, None, rotate=True, gluon=False)
    torch.testing.assert_close(got.float(), triton_out.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("dim", [128, 64, 256])
def test_compiled_decode_step_runs_the_gluon_kernel_under_cuda_graphs(monkeypatch, dim, every_built_head_dim):
    """Switched on (``attention.GLUON``), a compiled ``packkv.attention`` step calls the Gluon op (one extern
    kernel in Inductor's code) and replays under CUDA graphs with the eager result."""
    from test_cuda import fill_cuda
    from torch._inductor.utils import run_and_get_code

    _hopper()
    monkeypatch.setattr(attention_kernel, "GLUON", True)
    k = torch.randn(2, 8, 3000, dim).bfloat16().cuda()
    st = fill_cuda(PackKVConfig(), k, k.clone(), [2999, 1])
    mask = torch.ones(2, 1, 1, 3100, dtype=torch.bool, device="cuda")
    mask[1, ..., :200] = False

    def step(q):
        return torch.ops.packkv.attention(q, *st.tensors(), 3100, mask, False, None, *spec(st.layout))

    q = torch.randn(2, 32, 1, dim, device="cuda").bfloat16()
    want = step(q)
    compiled = torch.compile(step, fullgraph=True, mode="reduce-overhead")
    got, code = run_and_get_code(compiled, q)
    assert "_gluon_decode_partials" in "\n".join(code)
    for _ in range(3):  # CUDA-graph replays
        got = compiled(q)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


def test_the_partials_op_compiles_whole_into_a_graph():
    """``torch.compile(fullgraph=True)`` of a step around the op: Dynamo and Inductor take it as one opaque call
    (its fake impl gives the shapes), as a compiled decode step on the GPU does; same results as the direct call."""
    st = _layer(PackKVConfig(k_rel=0.1, v_rel=0.2), torch.bfloat16, ragged=True)
    q = torch.randn(B, H * 4, 1, D, device=DEV, dtype=torch.bfloat16)
    mask = _padding_mask(L + 30)
    args = (st.pool, st.k_offsets, st.v_offsets, st.k_meta, st.v_meta, st.k_scale, st.k_zero, st.v_scale, st.v_zero,
            st.ring_k, st.ring_v, st.n_blocks, st.n_win, st.perm)  # fmt: skip

    def step(q):
        acc, m, l = torch.ops.packkv._gluon_decode_partials(q, *args, mask, L + 30, 3, 0.088, True, 4, 3)
        return acc.sum(-2), m.amax(-1), l.sum(-1)  # some work after the op, fused by Inductor

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(q)
    for a, b in zip(got, step(q)):
        torch.testing.assert_close(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_compiled_generate_decodes_on_the_gluon_kernel_as_eager_packkv_does(mode, every_built_head_dim):
    """``packkv.compile`` with the default config on an sm_90 GPU, end to end: a bf16 Llama (head_dim 64, 2 query
    heads per KV head) generates for three left-padded prompts long enough to compress, its decode steps' attention
    runs on the Gluon kernel, and each step's logits are eager PackKV's on the same tokens (teacher-forced through
    ``generate``) up to the attention's rounding: far closer than eager PackKV is to the uncompressed cache (H100,
    2026-12-07e: 0.0078 vs 0.0713 in both modes; with the decode broken, ``gluon_attention.SKIP = 1``: 0.90)."""
    from test_cache import tiny
    from test_compile import kernel_registers
    from transformers import DynamicCache, LogitsProcessorList

    import packkv
    from packkv import PackKVCache

    _hopper()
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 256, (3, 600), generator=g)
    mask = torch.ones_like(ids)
    for b, pad in enumerate([0, 37, 190]):
        ids[b, :pad], mask[b, :pad] = 0, 0
    ids, mask = ids.cuda(), mask.cuda()
    new = 40
    kw = dict(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new,
              return_dict_in_generate=True, output_logits=True)  # fmt: skip

    model = packkv.compile(tiny("llama").cuda().to(torch.bfloat16), mode=mode)
    out = model.generate(**kw)
    short = {**kw, "max_new_tokens": 3, "min_new_tokens": 3}
    assert kernel_registers(lambda: model.generate(**short), "decode_attention_kernel"), "no Gluon launch"

    def forced(cache):
        """Eager logits with the compiled run's tokens forced at every step."""

        def force(input_ids, scores):
            t = out.sequences[:, input_ids.shape[1]]
            return torch.full_like(scores, float("-inf")).scatter_(1, t[:, None], 0.0)

        eager = tiny("llama").cuda().to(torch.bfloat16)
        run = eager.generate(**kw, past_key_values=cache(eager), logits_processor=LogitsProcessorList([force]))
        assert torch.equal(run.sequences, out.sequences)
        return torch.stack(run.logits).float()

    got = torch.stack(out.logits).float()
    packed = forced(lambda m: PackKVCache())
    exact = forced(lambda m: DynamicCache(config=m.config))
    vs_eager = (got - packed).abs().amax().item()
    compression = (exact - packed).abs().amax().item()
    print(f"largest logit difference: compiled vs eager PackKV {vs_eager:.4f}, eager PackKV vs exact {compression:.4f}")
    assert vs_eager < 0.25 * compression, (vs_eager, compression)
    torch._dynamo.reset()
