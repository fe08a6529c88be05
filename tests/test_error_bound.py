"""Every compressed element is reconstructed within rel/2 of its quantization group's range."""

from __future__ import annotations

import torch
from helpers import fill, n_tokens
from hypothesis import given
from hypothesis import strategies as st

from packkv.ops import PackKVConfig
from packkv.ops.reference import decompress_fp32

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def group_stats(x: torch.Tensor, grouping: str, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Range and max|x| of each element's group, broadcast to x's shape [B, H, L, D] (L = whole blocks)."""
    B, H, L, D = x.shape
    xb = x.reshape(B, H, L // block, block, D)
    dims = {"token": (1, 4), "token_head": (4,), "channel": (3,)}[grouping]
    mn, mx = xb.amin(dims, keepdim=True), xb.amax(dims, keepdim=True)
    rng = (mx - mn).expand_as(xb).reshape(B, H, L, D)
    amax = torch.maximum(mn.abs(), mx.abs()).expand_as(xb).reshape(B, H, L, D)
    return rng, amax


def allowed_error(x: torch.Tensor, rel: float, grouping: str, block: int) -> torch.Tensor:
    """The documented bound (FORMAT.md): rel/2 * range (scale rounded up to bf16) + max|x| * 2**-15 + fp32 ulps."""
    rng, amax = group_stats(x, grouping, block)
    return rel / 2 * rng * (1 + 2**-7) + amax * 2**-15 + x.abs() * 2**-21


@st.composite
def kv_case(draw):
    dtype = draw(st.sampled_from(DTYPES))
    head_dim = draw(st.sampled_from((64, 128, 256)))
    heads = draw(st.sampled_from((1, 2, 3)))
    batch = draw(st.integers(1, 2))
    block = draw(st.sampled_from((16, 32, 64)))
    n_blocks = draw(st.integers(1, 2))
    magnitude = 10.0 ** draw(st.floats(-4, 4))
    structure = draw(st.sampled_from(("gauss", "constant_block", "outlier_channels", "offset")))
    cfg = PackKVConfig(
        k_rel=draw(st.sampled_from((0.02, 0.1, 0.3))),
        v_rel=draw(st.sampled_from((0.05, 0.2, 0.5))),
        k_grouping=draw(st.sampled_from(("token", "token_head", "channel"))),
        v_grouping=draw(st.sampled_from(("token", "token_head", "channel"))),
        block_size=block,
        window=block,
        pack_size=draw(st.sampled_from((8, 16))),
        repack=draw(st.sampled_from(("none", "median"))),
        rotation="none",  # the bound in original coordinates (test_rotation: in rotated ones)
    )
    seed = draw(st.integers(0, 2**16))
    return cfg, (batch, heads, n_blocks * block + block, head_dim), dtype, magnitude, structure, seed


def make(shape, dtype, magnitude, structure, gen):
    x = torch.randn(shape, generator=gen) * magnitude
    if structure == "constant_block":
        x[:, :, : shape[2] // 2] = magnitude * 0.37
    elif structure == "outlier_channels":
        x[..., :: max(1, shape[-1] // 8)] *= 30.0
    elif structure == "offset":
        x += magnitude * 5.0
    lim = torch.finfo(dtype).max / 4  # fp16 overflows at 65504: inputs are finite (non-finite ones are refused)
    return x.clamp(-lim, lim).to(dtype)


@given(kv_case())
def test_every_compressed_element_is_within_the_bound(case):
    cfg, shape, dtype, magnitude, structure, seed = case
    gen = torch.Generator().manual_seed(seed)
    k = make(shape, dtype, magnitude, structure, gen)
    v = make(shape, dtype, magnitude, structure, gen)
    layer = fill(cfg, k, v, steps=[shape[2] - 3, 1, 2])
    n = n_tokens(layer)
    assert n == shape[2]
    kd, vd = decompress_fp32(layer, n)
    ncomp = int(layer.n_blocks[0]) * cfg.block_size
    assert ncomp > 0
    for x, xd, rel, grouping in ((k, kd, cfg.k_rel, cfg.k_grouping), (v, vd, cfg.v_rel, cfg.v_grouping)):
        xc = x[:, :, :ncomp].float()
        err = (xd[:, :, :ncomp] - xc).abs()
        bound = allowed_error(xc, rel, grouping, cfg.block_size)
        assert torch.all(err <= bound), f"max excess {(err - bound).max().item()}"
        # The exact window is exact.
        assert torch.equal(xd[:, :, ncomp:n], x[:, :, ncomp:].float())


def test_bound_is_tight_enough_to_matter():
    """The codec is lossy in the amount promised: errors reach a good fraction of the bound, not zero."""
    k = torch.randn(1, 2, 128 + 64, 64)
    layer = fill(PackKVConfig(k_rel=0.2, v_rel=0.2, rotation="none"), k, k.clone())
    kd, _ = decompress_fp32(layer, k.shape[2])
    err = (kd[:, :, :64] - k[:, :, :64]).abs()
    bound = allowed_error(k[:, :, :64], 0.2, "token", 64)
    assert (err / bound).max() > 0.8
