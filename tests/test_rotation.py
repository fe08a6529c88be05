"""PackKVConfig(rotation="hadamard"): K/V are stored rotated by an orthonormal Hadamard matrix; every op hands back
the original coordinates, so a model cannot tell, except through the (smaller) quantization error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import fill, n_tokens, spec

from packkv import PackKVCache, load_cache, save_cache
from packkv.ops import Layout, PackKVConfig
from packkv.ops.reference import decompress_fp32
from packkv.ops.rotation import hadamard, rotate

ROT = PackKVConfig(block_size=32, window=64, rotation="hadamard")


def outlier_kv(batch=2, heads=2, tokens=200, dim=64):
    """Keys with two outlier channels, as real keys have: the case rotation is for."""
    k = torch.randn(batch, heads, tokens, dim)
    k[..., 3] *= 20
    k[..., 17] += 15
    return k, torch.randn(batch, heads, tokens, dim)


@pytest.mark.parametrize("n", [64, 128, 256])
def test_the_rotation_is_orthonormal_and_its_own_inverse(n):
    h = hadamard(n)
    torch.testing.assert_close(h @ h, torch.eye(n), rtol=0, atol=1e-6)
    assert torch.equal(h, h.T)
    x = torch.randn(3, n)
    torch.testing.assert_close(rotate(rotate(x, 1), 1), x, rtol=0, atol=1e-5)
    assert rotate(x, 0) is x


def test_the_matrix_is_built_once_in_eager_mode_and_traced_under_fake_tensors():
    """Eager calls reuse one matrix per (size, device) (a compiled step's opaque append would otherwise replay
    its build every call); under tracing the build itself is traced, never a cached real tensor."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    assert hadamard(64) is hadamard(64, "cpu")
    with FakeTensorMode():
        h = hadamard(64)
    assert isinstance(h, FakeTensor)
    assert not isinstance(hadamard(64), FakeTensor)


def test_traced_rotation_of_decode_sized_tensors_is_a_fused_product_sum_and_large_ones_a_matmul():
    """In a traced graph a tiny fp32 GEMM (queries, attention outputs) became a slow one-CTA cuBLAS kernel; a
    broadcast product-sum fuses instead. Large tensors (a decompressed cache) keep the GEMM: run eagerly (aot_eager),
    the product would materialise x times head_dim. Both equal the eager rotation up to fp32 summation order."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from packkv.ops.rotation import FUSED_ROTATION_MAX

    def ops(x):
        g = make_fx(lambda t: rotate(t, 1))(x)
        return {str(n.target) for n in g.graph.nodes if n.op == "call_function"}

    small = torch.randn(2, 32, 1, 128)
    large = torch.randn(FUSED_ROTATION_MAX // 128 + 1, 128)
    assert "aten.mm.default" not in ops(small) and "aten.sum.dim_IntList" in ops(small)
    assert "aten.mm.default" in ops(large)
    traced = make_fx(lambda t: rotate(t, 1))(small)
    torch.testing.assert_close(traced(small), rotate(small, 1), rtol=0, atol=1e-5)
    torch.testing.assert_close(rotate(large, 1), large @ hadamard(128), rtol=0, atol=1e-5)


def test_eager_rotation_of_a_decode_step_avoids_the_small_gemm():
    """The opaque append_ rotates a decode step's new K/V eagerly: below EAGER_PRODUCT_MAX a product-sum (no mm,
    whose tiny fp32 cuBLAS kernel cost ~53 us per layer and step on the H200), above it the GEMM."""
    from torch.profiler import profile

    from packkv.ops.rotation import EAGER_PRODUCT_MAX

    def ran_mm(x):
        with profile() as p:
            y = rotate(x, 1)
        torch.testing.assert_close(y, x @ hadamard(x.shape[-1]), rtol=0, atol=1e-5)
        return any(e.name == "aten::mm" for e in p.events())

    assert not ran_mm(torch.randn(4, 8, 1, 128))
    assert ran_mm(torch.randn(EAGER_PRODUCT_MAX // 128 + 1, 128))


def test_bad_rotations_are_named():
    with pytest.raises(ValueError, match="rotation"):
        PackKVConfig(rotation="random")
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(96)
    assert Layout.from_config(ROT, 2, 64).spec()[-1] == 1 and Layout.from_config(PackKVConfig(rotation="none"), 2, 64).spec()[-1] == 0


def test_the_error_bound_holds_in_the_stored_coordinates():
    k, v = outlier_kv()
    st = fill(ROT, k, v)
    n = n_tokens(st)
    dk, dv = torch.ops.packkv.decompress(*st.tensors(), n, *spec(st.layout))
    nc = int(st.n_blocks[0]) * ROT.block_size
    for x, xd, rel in ((k, dk, ROT.k_rel), (v, dv, ROT.v_rel)):
        xr, xdr = rotate(x[:, :, :nc], 1), rotate(xd[:, :, :nc], 1)  # stored coordinates
        rng = xr.amax((1, 3), keepdim=True) - xr.amin((1, 3), keepdim=True)
        assert torch.all((xdr - xr).abs() <= rel / 2 * rng * (1 + 2**-7) + 1e-4)
        # ... and the window comes back as it went in, up to the rotation's fp32 rounding.
        torch.testing.assert_close(xd[:, :, nc:n], x[:, :, nc:], rtol=1e-6, atol=1e-5)


def test_rotation_shrinks_the_key_error_on_outlier_channels():
    k, v = outlier_kv()
    errs = {}
    for rot in ("none", "hadamard"):
        cfg = PackKVConfig(block_size=32, window=64, rotation=rot)
        st = fill(cfg, k, v)
        dk, _ = torch.ops.packkv.decompress(*st.tensors(), n_tokens(st), *spec(st.layout))
        nc = int(st.n_blocks[0]) * cfg.block_size
        errs[rot] = (dk[:, :, :nc] - k[:, :, :nc]).norm() / k[:, :, :nc].norm()
    assert errs["hadamard"] < 0.7 * errs["none"], errs


@pytest.mark.parametrize("n_rep", [1, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_is_sdpa_over_what_decompress_returns(n_rep, masked):
    k, v = outlier_kv()
    st = fill(ROT, k.half(), v.half())
    n = n_tokens(st)
    q = torch.randn(2, 2 * n_rep, 1, 64, dtype=torch.float16)
    mask = (torch.rand(2, 1, 1, n) > 0.3) if masked else None
    out = torch.ops.packkv.attention(q, *st.tensors(), n, mask, False, None, *spec(st.layout))
    dk, dv = torch.ops.packkv.decompress(*st.tensors(), n, *spec(st.layout))
    ref = F.scaled_dot_product_attention(q.float(), dk.float(), dv.float(), attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out.float(), ref, rtol=3e-3, atol=3e-3)
    # The reference kernel itself sees the rotated coordinates only.
    sk, _ = decompress_fp32(st, n)
    torch.testing.assert_close(rotate(sk, 1), dk.float(), rtol=1e-3, atol=1e-3)  # fp16 rounding


def test_opcheck_with_rotation():
    k, v = outlier_kv(tokens=150)
    st = fill(ROT, k.bfloat16(), v.bfloat16())
    n = n_tokens(st)
    torch.library.opcheck(torch.ops.packkv.decompress, (*st.tensors(), n, *spec(st.layout)))
    q = torch.randn(2, 4, 1, 64).bfloat16()
    torch.library.opcheck(torch.ops.packkv.attention, (q, *st.tensors(), n, None, False, None, *spec(st.layout)))
    new = torch.randn(2, 2, 1, 64).bfloat16()
    torch.library.opcheck(torch.ops.packkv.append_, (*st.tensors(), new, new.clone(), 0, *spec(st.layout)),
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip


def test_a_rotated_cache_saves_loads_and_crops(tmp_path):
    cfg = PackKVConfig(rotation="hadamard")
    cache = PackKVCache(cfg)
    k, v = outlier_kv(batch=1, tokens=300)
    cache.update(k, v, 0)
    save_cache(cache, tmp_path / "c.safetensors")
    loaded = load_cache(tmp_path / "c.safetensors")
    assert loaded.config.rotation == "hadamard"
    a = cache.layers[0].update(k[:, :, :1], v[:, :, :1])
    b = loaded.layers[0].update(k[:, :, :1], v[:, :, :1])
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # Cropping into a compressed block returns its tokens to the ring, in the stored (rotated) coordinates.
    before = a[0][:, :, :250]
    cache.crop(250)
    st = cache.layers[0].storage
    after, _ = torch.ops.packkv.decompress(*st.tensors(), 250, *spec(st.layout))
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-5)  # fp32 summation order of the two rotations


def test_files_written_before_the_rotation_option_load_unrotated(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    cache = PackKVCache(PackKVConfig(rotation="none"))
    k, v = outlier_kv(batch=1, tokens=300)
    cache.update(k, v, 0)
    save_cache(cache, tmp_path / "new.safetensors")
    with safe_open(tmp_path / "new.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["packkv"])
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    del meta["config"]["rotation"]  # as the files of earlier versions were written
    save_file(tensors, tmp_path / "old.safetensors", metadata={"packkv": json.dumps(meta)})
    old = load_cache(tmp_path / "old.safetensors")
    assert old.config.rotation == "none"
    a = cache.layers[0].update(k[:, :, :1], v[:, :, :1])
    b = old.layers[0].update(k[:, :, :1], v[:, :, :1])
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    del meta["config"]["k_rel"]  # any other field must be there: its default may have changed
    save_file(tensors, tmp_path / "bad.safetensors", metadata={"packkv": json.dumps(meta)})
    with pytest.raises(ValueError, match=r"\['k_rel'\] are missing"):
        load_cache(tmp_path / "bad.safetensors")
