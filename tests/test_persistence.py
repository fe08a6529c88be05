"""save_cache / load_cache: a compressed cache in one safetensors file, read back bit-exact, or refused clearly."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import pytest
import torch
from helpers import spec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from test_cache import SMALL, prompts, tiny
from transformers import AutoModelForCausalLM, LlamaConfig

from packkv import PackKVCache, PackKVConfig, load_cache, save_cache
from packkv.ops import STORAGE_FIELDS
from packkv.persistence import CacheFileError

PROMPT = 250  # > window + block: the prefill compresses a block; the ring holds 186 tokens


# ---- helpers ------------------------------------------------------------------------------------------------
def greedy(model, ids, mask, cache, new: int) -> torch.Tensor:
    return model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, do_sample=False,
                          max_new_tokens=new, min_new_tokens=new)  # fmt: skip


@torch.no_grad()
def prefilled(model, cfg: PackKVConfig | None = None, batch: int = 1, tokens: int = PROMPT, identity: bool = False):
    """A cache after a prefill of ``tokens`` tokens; ``identity``: it records the model that filled it."""
    ids, mask = prompts(batch)
    cache = PackKVCache(cfg, model=model if identity else None)
    model(ids[:, :tokens], attention_mask=mask[:, :tokens], past_key_values=cache)
    return cache


def decompressed(layer) -> tuple[torch.Tensor, torch.Tensor]:
    st = layer.storage
    return torch.ops.packkv.decompress(*st.tensors(), layer.tokens, *spec(st.layout))


def tensor_span(data: bytes, name: str) -> tuple[int, int]:
    """Byte range of tensor ``name`` inside the safetensors file ``data``."""
    n = struct.unpack("<Q", data[:8])[0]
    start, end = json.loads(data[8 : 8 + n])[name]["data_offsets"]
    return 8 + n + start, 8 + n + end


def rewrite(src: Path, dst: Path, header=None, tensors=None) -> Path:
    """A copy of a cache file with its JSON metadata and/or tensor dict changed by the given functions."""
    with safe_open(src, framework="pt") as f:
        meta = json.loads(f.metadata()["packkv"])
        ts = {k: f.get_tensor(k) for k in f.keys()}
    meta = header(meta) if header else meta
    ts = tensors(ts) if tensors else ts
    save_file(ts, dst, metadata={"packkv": meta if isinstance(meta, str) else json.dumps(meta)})
    return dst


def assert_refused(path: Path, problem: str, **kw) -> None:
    """Loading ``path`` raises CacheFileError (a ValueError) whose message names the file and matches ``problem``."""
    with pytest.raises(CacheFileError) as e:
        load_cache(path, **kw)
    assert str(path) in str(e.value), str(e.value)
    assert re.search(problem, str(e.value)), str(e.value)


# ---- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return tiny("llama")


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory) -> tuple[PackKVCache, Path]:
    """A prefilled batch-2 cache of the tiny model (its identity recorded) and its file."""
    # Bounds whose qmax (11, 6) is below 2**qbits - 1, so that a corrupt "minimum above qmax" is representable.
    cache = prefilled(model, PackKVConfig(k_rel=0.1, v_rel=0.2), batch=2, identity=True)
    path = tmp_path_factory.mktemp("saved") / "cache.safetensors"
    save_cache(cache, path)
    return cache, path


# ---- round trip ---------------------------------------------------------------------------------------------
def beams(cache: PackKVCache) -> PackKVCache:
    cache.batch_select_indices(torch.tensor([1, 1, 0]))  # sequence 1 twice: its chunks are shared in the pool
    return cache


def stacked(cache: PackKVCache) -> PackKVCache:
    cache.stack_layers()
    assert all(layer._stack is not None for layer in cache.layers)
    return cache


ROUND_TRIPS = {
    "default": lambda m: prefilled(m, batch=2),
    "groupings": lambda m: prefilled(m, PackKVConfig(k_grouping="channel", v_grouping="token_head", repack="greedy",
                                                     pack_size=8, k_rel=0.05), batch=2),  # fmt: skip
    "bf16, short (no block compressed yet)": lambda m: prefilled(m.to(torch.bfloat16), tokens=100),
    "beams share chunks": lambda m: beams(prefilled(m, batch=2)),
    "stacked for a compiled step (fields are views of one tensor per field)": lambda m: stacked(prefilled(m, batch=2)),
}


@pytest.mark.parametrize("case", sorted(ROUND_TRIPS))
def test_round_trip_is_bit_exact(case, tmp_path):
    model = tiny("llama")
    cache = ROUND_TRIPS[case](model)
    save_cache(cache, tmp_path / "c.safetensors")
    loaded = load_cache(tmp_path / "c.safetensors")
    assert len(loaded.layers) == len(cache.layers) and loaded.config == cache.config
    for old, new in zip(cache.layers, loaded.layers):
        a, b, nb = old.storage.compacted(), new.storage, old.n_blocks
        assert new.is_initialized and (new.n_blocks, new.n_win, new.tokens) == (old.n_blocks, old.n_win, old.tokens)
        assert (new.dtype, new.device, new._pool_bound) == (old.dtype, old.device, int(a.cursor))
        assert torch.equal(b.pool[: int(b.cursor)], a.pool[: int(a.cursor)])
        for f in STORAGE_FIELDS[1:]:
            x, y = getattr(a, f), getattr(b, f)
            if f in ("ring_k", "ring_v"):  # only the live slots are stored
                live = (nb * a.layout.block_size + torch.arange(old.n_win)) % a.layout.ring_size
                x, y = x[:, :, live], y[:, :, live]
            elif x.dim() >= 2:
                x, y = x[:, :nb], y[:, :nb]
            assert x.dtype == y.dtype and torch.equal(x, y), f
        for x, y in zip(decompressed(old), decompressed(new)):
            assert torch.equal(x, y)


def test_saving_a_loaded_cache_gives_the_same_file(saved, tmp_path):
    _, path = saved
    save_cache(load_cache(path), tmp_path / "again.safetensors")
    assert (tmp_path / "again.safetensors").read_bytes() == path.read_bytes()


def test_file_size_is_the_packed_bytes_plus_the_live_window(saved):
    cache, path = saved
    n = cache.nbytes()
    packed = n["compressed"] + n["window"]
    overhead = (path.stat().st_size - packed) / packed
    assert 0 <= overhead < 0.02, overhead  # the safetensors header and metadata: 0.4% here


# ---- continuing generation ----------------------------------------------------------------------------------
def test_generation_continues_from_a_loaded_cache_exactly_as_without_the_interruption(model, tmp_path):
    """Default bounds, batch 2 with left padding; the resumed part compresses a block and grows the pool."""
    ids, mask = prompts(2)
    uninterrupted = greedy(model, ids, mask, PackKVCache(), 8)
    cache = PackKVCache(model=model)
    first = greedy(model, ids, mask, cache, 3)  # the cache holds PROMPT + 2 tokens: 1 block + 188 exact
    save_cache(cache, tmp_path / "c.safetensors")
    loaded = load_cache(tmp_path / "c.safetensors", model=model)
    resumed = greedy(model, first, torch.cat([mask, torch.ones_like(first[:, PROMPT:])], 1), loaded, 5)
    assert torch.equal(resumed, uninterrupted)
    assert loaded.layers[0].n_blocks == cache.layers[0].n_blocks + 1


def test_identity_is_kept_and_nonsense_is_not_saved(model, saved, tmp_path):
    cache, path = saved
    assert load_cache(path).model_identity == cache.model_identity is not None
    with pytest.raises(ValueError, match="empty"):
        save_cache(PackKVCache(), tmp_path / "empty.safetensors")
    with pytest.raises(ValueError, match="the cache was filled by"):
        save_cache(cache, tmp_path / "other.safetensors", model=other(rope_theta=500.0))
    with pytest.raises(FileNotFoundError):
        load_cache(tmp_path / "missing.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # a refused save leaves nothing behind


# ---- bad files ----------------------------------------------------------------------------------------------
def flip(data: bytearray, pos: int, mask: int) -> bytearray:
    data[pos] ^= mask
    return data


def poke(name: str, offset: int, value: bytes):
    """A corruption that writes ``value`` at byte ``offset`` of tensor ``name``'s data."""

    def corrupt(data: bytearray) -> bytearray:
        start, _ = tensor_span(data, name)
        data[start + offset : start + offset + len(value)] = value
        return data

    return corrupt


def set_bits(name: str, offset: int, mask: int):
    """A corruption that sets the bits ``mask`` of byte ``offset`` of tensor ``name``'s data."""

    def corrupt(data: bytearray) -> bytearray:
        data[tensor_span(data, name)[0] + offset] |= mask
        return data

    return corrupt


BYTE_CORRUPTIONS = {
    "truncated": (lambda d: d[:-100], "not a valid safetensors"),
    "header length bit flipped": (lambda d: flip(d, 6, 0x10), "not a valid safetensors"),
    "header JSON bit flipped": (lambda d: flip(d, 8, 0x01), "not a valid safetensors"),
    "offset bit flipped": (set_bits("layers.0.k_offsets", 3, 0x40), "k_offsets: a chunk's payload lies outside"),
    "width above qbits": (set_bits("layers.1.k_meta", 0, 0x70), "k_meta: a pack width exceeds qbits=4"),
    "minimum above qmax": (set_bits("layers.0.v_meta", 0, 0x07), "v_meta: a pack minimum exceeds qmax=6"),
    "perm not a permutation": (poke("layers.0.perm", 0, b"\x05\x05"), "perm is not a permutation"),
    "infinite scale": (poke("layers.0.v_scale", 0, b"\x80\x7f"), "v_scale: scales must be finite and positive"),
    "zero scale": (poke("layers.0.k_scale", 2, b"\x00\x00"), "k_scale: scales must be finite and positive"),
    "zero out of range": (poke("layers.0.k_zero", 0, struct.pack("<h", -32768)), "k_zero: zeros must lie within"),
    "scale that overflows": (poke("layers.0.k_scale", 0, b"\x00\x7f"), "k: dequantized values would overflow"),
    "counter differs across the batch": (poke("layers.1.n_win", 4, struct.pack("<i", 3)), "device counters"),
    "cursor past the pool": (poke("layers.0.cursor", 0, struct.pack("<q", 1 << 40)), "cursor 1099511627776 is outside"),
    "NaN in the window": (poke("layers.0.window_v", 0, struct.pack("<f", float("nan"))), "window_v.*NaN"),
}


@pytest.mark.parametrize("case", sorted(BYTE_CORRUPTIONS))
def test_corrupted_bytes_are_refused(saved, tmp_path, case):
    corrupt, problem = BYTE_CORRUPTIONS[case]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(corrupt(bytearray(saved[1].read_bytes()))))
    assert_refused(bad, problem)


def drop(name):
    return lambda ts: {k: v for k, v in ts.items() if k != name}


def edit(**changes):
    return lambda h: {**h, **changes}


REWRITES = {
    "wrong version": (dict(header=edit(version=2)), "unsupported format version 2"),
    "wrong format name": (dict(header=edit(format="kvpress")), "not a PackKV cache"),
    "metadata is not JSON": (dict(header=lambda h: "{not json"), "not valid JSON"),
    "metadata key missing": (dict(header=lambda h: {k: v for k, v in h.items() if k != "tokens"}), "missing.*tokens"),
    "invalid config": (dict(header=lambda h: {**h, "config": {**h["config"], "k_rel": 2.0}}), "invalid PackKV config"),
    "token count disagrees": (dict(header=edit(tokens=PROMPT + 1)), "tokens"),
    "layer count disagrees": (dict(header=edit(num_layers=10**9)), "1000000000 layers"),
    "missing tensor": (dict(tensors=drop("layers.1.v_zero")), r"missing \['layers.1.v_zero'\]"),
    "extra tensor": (dict(tensors=lambda ts: {**ts, "layers.0.extra": torch.zeros(1)}), "unexpected.*layers.0.extra"),
    "altered shape": (
        dict(tensors=lambda ts: {**ts, "layers.0.perm": ts["layers.0.perm"].reshape(1, 2, -1).contiguous()}),
        r"'perm' is U8\[1, 2, 64\], the metadata's layout requires U8\[2, 1, 64\]",
    ),
    "altered dtype": (dict(tensors=lambda ts: {**ts, "layers.1.pool": ts["layers.1.pool"].long()}), "'pool' is I64"),
    "window one token short": (
        dict(tensors=lambda ts: {**ts, "layers.0.window_k": ts["layers.0.window_k"][:, :, 1:].contiguous()}),
        "window_k",
    ),
}


@pytest.mark.parametrize("case", sorted(REWRITES))
def test_inconsistent_files_are_refused(saved, tmp_path, case):
    kw, problem = REWRITES[case]
    assert_refused(rewrite(saved[1], tmp_path / "bad.safetensors", **kw), problem)


def other(**change):
    return AutoModelForCausalLM.from_config(LlamaConfig(**{**SMALL, **change})).eval()


@pytest.mark.parametrize(
    "change, problem",
    [
        (dict(num_key_value_heads=4), "num_kv_heads per rank: file 2, model 4"),
        (dict(num_hidden_layers=3), "layers: file 2, model 3"),
        (dict(head_dim=128), "head_dim: file 64, model 128"),
        (dict(rope_theta=500.0), "identity: file LlamaForCausalLM"),  # same shapes, another model
    ],
)
def test_a_cache_of_another_model_is_refused(saved, change, problem):
    assert_refused(saved[1], "a cache of another model: .*" + problem, model=other(**change))


def test_without_identity_only_shapes_are_compared(model, tmp_path):
    path = tmp_path / "anonymous.safetensors"
    save_cache(prefilled(model), path)  # neither model= nor PackKVCache(model=...): no identity
    assert load_cache(path, model=other(rope_theta=500.0)).model_identity is not None
    assert_refused(path, "num_kv_heads per rank: file 2, model 4", model=other(num_key_value_heads=4))
    assert_refused(path, "dtype: file torch.float32, model torch.bfloat16", model=tiny("llama").to(torch.bfloat16))


# ---- property: any mutation of a valid file is refused cleanly or loads a consistent cache ----------------------
FUZZ_CONFIG = PackKVConfig(block_size=16, window=16, pack_size=8, k_grouping="channel", v_grouping="token_head")


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory) -> tuple[bytes, dict[str, list[tuple[int, int]]], Path]:
    """A small valid file (fp16, 2 layers, batch 2, 2 blocks) and the byte regions mutations aim at."""
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**SMALL, "hidden_size": 64, "intermediate_size": 64, "num_attention_heads": 1,
                         "num_key_value_heads": 1, "head_dim": 64})  # fmt: skip
    small = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval().to(torch.float16)
    cache = PackKVCache(FUZZ_CONFIG, model=small)
    with torch.no_grad():
        small(torch.randint(3, 256, (2, 60)), past_key_values=cache)
    folder = tmp_path_factory.mktemp("fuzz")
    save_cache(cache, folder / "valid.safetensors")
    data = (folder / "valid.safetensors").read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    meta = json.dumps(header["__metadata__"]["packkv"]).encode()  # the PackKV JSON as the header spells it
    m0 = data.index(meta)
    spans = [tensor_span(data, k) for k in header if k != "__metadata__"]
    regions = {
        "prefix": [(0, 8)],
        "header": [(8, 8 + n)],
        "metadata": [(m0, m0 + len(meta))],
        "metadata digits": [(m0 + i, m0 + i + 1) for i, c in enumerate(meta) if chr(c).isdigit()],
        "tensor": [(a, b) for a, b in spans if b > a],
    }
    return data, regions, folder


# Where mutations land: mostly where they survive safetensors' own checks and reach PackKV's validation.
TARGETS = ["tensor"] * 6 + ["metadata digits"] * 2 + ["metadata", "header", "prefix"]
KINDS = ["flip"] * 4 + ["overwrite"] * 2 + ["insert", "delete", "truncate"]


@st.composite
def mutations(draw, data: bytes, regions: dict[str, list[tuple[int, int]]]) -> bytes:
    """1 to 3 byte flips, overwrites, insertions, deletions or a truncation, each aimed at a random region."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from(TARGETS))
        start, end = draw(st.sampled_from(regions[target]))
        pos = draw(st.integers(start, min(end, len(out)) - 1)) if start < len(out) else len(out) - 1
        kind = "digit" if target == "metadata digits" else draw(st.sampled_from(KINDS))
        if kind == "digit":
            out[pos] = ord(draw(st.sampled_from("0123456789")))
        elif kind == "flip":
            out[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            value = draw(st.binary(min_size=1, max_size=8))
            out[pos : pos + len(value)] = value
        elif kind == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del out[pos : pos + draw(st.integers(1, 16))]
        else:
            del out[pos:]
        if len(out) < 2:
            break
    return bytes(out)


def test_mutated_files_are_refused_or_load_a_consistent_cache(fuzz_file):
    data, regions, folder = fuzz_file
    counter = iter(range(10**9))

    @settings(max_examples=1000, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
    @given(mutations(data, regions))
    def check(mutated: bytes) -> None:
        path = folder / f"mutated-{next(counter)}.safetensors"  # a fresh file: no mapping of an older one is reused
        path.write_bytes(mutated)
        try:
            cache = load_cache(path)
        except CacheFileError as e:  # the only exception allowed: a ValueError naming the file
            assert str(path) in str(e)
            return
        finally:
            os.unlink(path)
        assert len({layer.tokens for layer in cache.layers}) == 1
        for layer in cache.layers:
            s = layer.storage
            assert s.n_blocks.tolist() == [layer.n_blocks] * s.batch and s.n_win.tolist() == [layer.n_win] * s.batch
            for x in decompressed(layer):
                assert x.shape == (s.batch, s.layout.num_heads, layer.tokens, s.layout.head_dim)
                assert bool(torch.isfinite(x).all())

    check()


# ---- the real model -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_model_continues_exactly_after_save_and_load(smollm, tmp_path):
    from packkv import real_model

    model, tok = smollm
    ids = tok(real_model.text(), return_tensors="pt").input_ids[:, :300]
    mask = torch.ones_like(ids)
    uninterrupted = greedy(model, ids, mask, PackKVCache(), 21)
    cache = PackKVCache(model=model)
    first = greedy(model, ids, mask, cache, 1)  # prefill only: the cache holds the 300 prompt tokens
    save_cache(cache, tmp_path / "smollm.safetensors")
    loaded = load_cache(tmp_path / "smollm.safetensors", model=model)
    resumed = greedy(model, first, torch.ones_like(first), loaded, 20)
    assert torch.equal(resumed, uninterrupted)


# ---- GPU ----------------------------------------------------------------------------------------------------
@pytest.mark.cuda
def test_a_cache_saved_from_the_gpu_continues_on_the_cpu_and_on_the_gpu(tmp_path):
    """The file is device-neutral: a CUDA-built cache resumes on both devices, and a CPU-built one on CUDA."""
    cpu_model, gpu_model = tiny("llama"), tiny("llama").cuda()
    ids, mask = prompts(2)
    cfg = PackKVConfig(k_rel=1e-4, v_rel=1e-4)  # quantization changes no token: the two devices agree
    reference = greedy(cpu_model, ids, mask, PackKVCache(cfg), 12)

    def resumed(cache_model, device, fill_model):
        cache = PackKVCache(cfg, model=fill_model)
        first = greedy(fill_model, ids.to(fill_model.device), mask.to(fill_model.device), cache, 3)
        save_cache(cache, tmp_path / "c.safetensors")
        loaded = load_cache(tmp_path / "c.safetensors", model=cache_model, device=device)
        assert loaded.layers[0].storage.device.type == torch.device(device).type
        m = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], 1).to(device)
        return greedy(cache_model, first.to(device), m, loaded, 9).cpu()

    assert torch.equal(resumed(gpu_model, "cuda", gpu_model), greedy(gpu_model, ids.cuda(), mask.cuda(),
                                                                     PackKVCache(cfg), 12).cpu())  # fmt: skip
    assert torch.equal(resumed(cpu_model, "cpu", gpu_model), reference)
    assert torch.equal(resumed(gpu_model, "cuda", cpu_model), reference)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_a_loaded_cache_continues_under_packkv_compile(device, tmp_path):
    """Save after a few eager tokens, load, and let the compiled decode step (fused attention) continue: the tokens
    are those of the uninterrupted eager run, across further block compressions."""
    import packkv

    ids, mask = (t.to(device) for t in prompts(2))
    cfg = PackKVConfig(k_rel=1e-4, v_rel=1e-4)  # quantization changes no token: eager and compiled agree exactly
    eager = tiny("llama").to(device)
    uninterrupted = greedy(eager, ids, mask, PackKVCache(cfg), 75)
    cache = PackKVCache(cfg, model=eager)
    first = greedy(eager, ids, mask, cache, 5)
    save_cache(cache, tmp_path / "c.safetensors")
    compiled = packkv.compile(tiny("llama").to(device), config=cfg)
    loaded = load_cache(tmp_path / "c.safetensors", model=compiled, device=device)
    m = torch.cat([mask, mask.new_ones(2, 5)], 1)
    assert torch.equal(greedy(compiled, first, m, loaded, 70), uninterrupted)
    assert loaded.layers[0].n_blocks > cache.layers[0].n_blocks  # blocks were compressed inside compiled steps
