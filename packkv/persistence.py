"""Saving and loading a ``PackKVCache`` as one ``.safetensors`` file (format "packkv", version 1).

A file holds, for every layer ``i``, the tensors ``layers.{i}.{name}`` of its compacted ``PackedLayer``
(``packkv_ops/FORMAT.md``) with two changes that keep the file at the cache's packed size:

* per-sequence tensors keep only the ``n_blocks`` blocks in use (the block dimension is exactly ``n_blocks``),
  and the pool holds only the live chunks plus its spare word (``PackedLayer.compacted``);
* the exact ring ``[B, H, S, D]`` is stored as its ``n_win`` live tokens in position order,
  ``window_k`` / ``window_v`` ``[B, H, n_win, D]``; loading puts them back in their slots (``p % S``).

The safetensors metadata has a single key, ``"packkv"``, whose value is a JSON object: format name and version,
the ``PackKVConfig``, the geometry (layers, KV heads, head_dim, dtype, batch, tokens), each layer's counters
and, when known, the identity of the model that filled the cache (``models.cache.model_identity``).

``load_cache`` checks everything (header, names, dtypes, shapes, then the FORMAT.md invariants on the values)
before any kernel reads the data: a bad file raises ``CacheFileError`` (a ``ValueError``) naming the file and
the problem, and nothing partially loaded is returned.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from packkv.models.cache import MIN_BLOCKS, PackKVCache, PackKVLayer, model_identity
from packkv.ops import STORAGE_FIELDS, Layout, PackedLayer, PackKVConfig
from packkv.ops.codec import payload_bit_offsets, unpack_meta
from packkv.ops.layout import (
    GROUP_CHANNEL,
    GROUP_TOKEN,
    SUPPORTED_DTYPES,
    SUPPORTED_HEAD_DIMS,
    ZERO_LIMIT,
    StreamLayout,
)
from packkv.ops.storage import MAX_POOL_WORDS

FORMAT_NAME = "packkv"
FORMAT_VERSION = 1
METADATA_KEY = "packkv"

RING_TO_FILE = {"ring_k": "window_k", "ring_v": "window_v"}
FILE_FIELDS = tuple(RING_TO_FILE.get(f, f) for f in STORAGE_FIELDS)
BLOCK_FIELDS = tuple(f for f in STORAGE_FIELDS[2:] if f not in RING_TO_FILE and f not in ("n_blocks", "n_win"))

DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in SUPPORTED_DTYPES}
SAFETENSORS_DTYPES = {
    torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.uint8: "U8",
    torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32",
}  # fmt: skip
HEADER_KEYS = frozenset(
    {"format", "version", "config", "num_layers", "num_kv_heads", "head_dim", "dtype", "batch", "tokens",
     "layers", "model_identity"}
)  # fmt: skip
LAYER_KEYS = frozenset({"n_blocks", "n_win"})
MAX_DIM = 2**31 - 1  # any declared size above this is garbage (tensor dims and offsets are int32 here)


class CacheFileError(ValueError):
    """A file that is not a loadable PackKV cache (or not one of the given model); the message names the file."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


@dataclass(frozen=True)
class CacheHeader:
    """The validated JSON metadata of a cache file."""

    config: PackKVConfig
    layout: Layout
    num_layers: int
    dtype: torch.dtype
    batch: int
    tokens: int
    layers: tuple[tuple[int, int], ...]  # (n_blocks, n_win) of every layer
    model_identity: dict | None


# =============================================================================================================
# save
# =============================================================================================================
def save_cache(cache: PackKVCache, path: str | os.PathLike, model=None) -> None:
    """Write ``cache`` to ``path`` (one safetensors file): compacted packed tensors, live window, metadata.

    ``model`` (optional) records which model filled the cache; otherwise ``cache.model_identity`` is used
    (set by ``PackKVCache(cfg, model=...)``); with neither, the file has no identity and ``load_cache`` can
    only compare shapes with a model.
    """
    path = os.fspath(path)
    layers = _saveable_layers(cache)
    identity = _identity_for_save(cache, model)
    tensors: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        for name, t in _file_tensors(layer).items():
            tensors[f"layers.{i}.{name}"] = t
    header = _header_json(cache.packkv_config, layers, identity)
    _atomic_save_file(tensors, {METADATA_KEY: header}, path)


def _saveable_layers(cache: PackKVCache) -> list[PackKVLayer]:
    if not isinstance(cache, PackKVCache):
        raise TypeError(f"save_cache takes a PackKVCache, got {type(cache).__name__}")
    cache.synchronize()  # a compiled step still in flight: its counters checked before they are written
    layers = list(cache.layers)
    if not layers or not all(isinstance(x, PackKVLayer) and x.is_initialized for x in layers):
        raise ValueError("save_cache: the cache is empty or some layer was never filled; run a prefill first")
    counts = {layer.tokens for layer in layers}
    if len(counts) > 1:
        raise ValueError(f"save_cache: layers hold different token counts {sorted(counts)} (a forward in progress?)")
    for i, layer in enumerate(layers):
        st = layer.storage
        # The host mirrors are what the file declares: they must agree with the device counters (one sync).
        if not (bool((st.n_blocks == layer.n_blocks).all()) and bool((st.n_win == layer.n_win).all())):
            raise ValueError(f"save_cache: layer {i}'s device counters disagree with its host mirrors")
    return layers


def _identity_for_save(cache: PackKVCache, model) -> dict | None:
    if model is None:
        return cache.model_identity
    identity = model_identity(model)
    if cache.model_identity is not None and cache.model_identity != identity:
        raise ValueError(
            f"save_cache: the cache was filled by {cache.model_identity} but model={identity} was given"
        )
    return identity


def _file_tensors(layer: PackKVLayer) -> dict[str, torch.Tensor]:
    """One layer's tensors as stored: compacted pool, blocks in use, live window tokens; on the CPU."""
    st = layer.storage.compacted()
    nb, nw = layer.n_blocks, layer.n_win
    out = {"pool": st.pool, "cursor": st.cursor, "n_blocks": st.n_blocks, "n_win": st.n_win}
    for f in BLOCK_FIELDS:
        out[f] = getattr(st, f)[:, :nb]
    slots = _window_slots(st.layout, nb, nw, st.device)
    out["window_k"] = st.ring_k.index_select(2, slots)
    out["window_v"] = st.ring_v.index_select(2, slots)
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def _window_slots(lay: Layout, n_blocks: int, n_win: int, device) -> torch.Tensor:
    """Ring slots of the live exact tokens, in position order."""
    return (n_blocks * lay.block_size + torch.arange(n_win, device=device)) % lay.ring_size


def _header_json(cfg: PackKVConfig, layers: list[PackKVLayer], identity: dict | None) -> str:
    lay = layers[0].storage.layout
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "config": json.loads(cfg.to_json()),
        "num_layers": len(layers),
        "num_kv_heads": lay.num_heads,
        "head_dim": lay.head_dim,
        "dtype": str(layers[0].storage.dtype).removeprefix("torch."),
        "batch": layers[0].storage.batch,
        "tokens": layers[0].tokens,
        "layers": [{"n_blocks": x.n_blocks, "n_win": x.n_win} for x in layers],
        "model_identity": identity,
    }
    return json.dumps(header, sort_keys=True, separators=(",", ":"))


def _atomic_save_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str) -> None:
    # Write beside the target, then rename: a crash never leaves half a file, and a cache loaded from the old
    # file (whose pages may still be mapped) is not truncated under it.
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# =============================================================================================================
# load
# =============================================================================================================
def load_cache(path: str | os.PathLike, model=None, device: str | torch.device = "cpu") -> PackKVCache:
    """A ``PackKVCache`` read from ``path`` onto ``device``, ready to continue generation.

    With ``model``, a cache of another model (identity hash, layers, KV heads, head_dim or dtype) is refused.
    Every problem with the file raises ``CacheFileError`` (a ``ValueError``) naming the file.
    """
    path = os.fspath(path)
    dev = _resolve_device(device)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with _open(path, dev) as f:
        header = _parse_header(path, f)
        if model is not None:
            _check_model(path, header, model)
        _check_names(path, header, f)
        for i in range(header.num_layers):
            _check_shapes(path, header, f, i)
        _check_room(path, header, dev)
        storages = [_load_layer(path, header, f, i, dev) for i in range(header.num_layers)]
    return _assemble(header, storages, model)


def _resolve_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"load_cache: device={device!r} but no CUDA device is available")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ValueError(f"load_cache: device must be 'cpu' or 'cuda', got {device!r}")
    return dev


@contextmanager
def _open(path: str, dev: torch.device) -> Iterator[Any]:
    try:
        handle = safe_open(path, framework="pt", device=str(dev))
    except (SafetensorError, OSError, ValueError, RuntimeError, UnicodeDecodeError) as e:
        raise CacheFileError(path, f"not a valid safetensors file ({type(e).__name__}: {e})") from None
    with handle as f:
        yield f


# ---- header -----------------------------------------------------------------------------------------------
def _parse_header(path: str, f) -> CacheHeader:
    try:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as e:  # noqa: BLE001 - garbage of any kind is a bad file, never a crash
        raise CacheFileError(path, f"unreadable safetensors metadata ({type(e).__name__}: {e})") from None
    if not isinstance(raw, str):
        raise CacheFileError(path, f"no '{METADATA_KEY}' metadata: not a PackKV cache file")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise CacheFileError(path, f"the PackKV metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CacheFileError(path, f"metadata format is not '{FORMAT_NAME}': not a PackKV cache file")
    version = meta.get("version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise CacheFileError(
            path, f"unsupported format version {version!r} (this PackKV reads version {FORMAT_VERSION})"
        )
    return _header_fields(path, meta)


def _header_fields(path: str, meta: dict) -> CacheHeader:
    missing, unknown = sorted(HEADER_KEYS - set(meta)), sorted(set(meta) - HEADER_KEYS)
    if missing or unknown:
        raise CacheFileError(path, f"metadata keys: missing {missing}, unknown {unknown}")
    cfg = _config(path, meta["config"])
    num_layers = _int(path, meta, "num_layers", 1)
    heads = _int(path, meta, "num_kv_heads", 1)
    head_dim = _int(path, meta, "head_dim", 1)
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise CacheFileError(path, f"head_dim={head_dim} is not one of {SUPPORTED_HEAD_DIMS}")
    dtype = DTYPE_NAMES.get(meta["dtype"]) if isinstance(meta["dtype"], str) else None
    if dtype is None:
        raise CacheFileError(path, f"dtype={meta['dtype']!r} is not one of {sorted(DTYPE_NAMES)}")
    batch, tokens = _int(path, meta, "batch", 1), _int(path, meta, "tokens", 0, MAX_DIM * 256)
    layout = Layout.from_config(cfg, heads, head_dim)
    layers = _layer_counters(path, meta["layers"], num_layers, layout, tokens)
    return CacheHeader(cfg, layout, num_layers, dtype, batch, tokens, layers, _identity(path, meta["model_identity"]))


def _config(path: str, d: Any) -> PackKVConfig:
    if not isinstance(d, dict):
        raise CacheFileError(path, "metadata 'config' is not an object")
    # Defaults may change between releases, so a file must spell out its whole config; the one exception is
    # `rotation`, added later: files without it were written before it existed and hold unrotated K/V.
    d = {"rotation": "none", **d}
    missing = sorted({f.name for f in dataclasses.fields(PackKVConfig)} - set(d))
    if missing:
        raise CacheFileError(path, f"invalid PackKV config: fields {missing} are missing")
    try:
        return PackKVConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise CacheFileError(path, f"invalid PackKV config: {e}") from None


def _int(path: str, d: dict, key: str, lo: int, hi: int = MAX_DIM) -> int:
    v = d.get(key)
    if type(v) is not int or not lo <= v <= hi:
        raise CacheFileError(path, f"metadata '{key}' must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _layer_counters(path: str, entries: Any, num_layers: int, lay: Layout, tokens: int) -> tuple:
    if not isinstance(entries, list) or len(entries) != num_layers:
        raise CacheFileError(path, f"metadata 'layers' must list the counters of {num_layers} layers")
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or set(e) != LAYER_KEYS:
            raise CacheFileError(path, f"layer {i}: metadata counters must be exactly {sorted(LAYER_KEYS)}")
        nb, nw = _int(path, e, "n_blocks", 0), _int(path, e, "n_win", 0)
        if nw >= lay.ring_size:
            raise CacheFileError(path, f"layer {i}: n_win={nw} does not fit the ring of {lay.ring_size} slots")
        if nb * lay.block_size + nw != tokens:
            raise CacheFileError(
                path, f"layer {i}: n_blocks={nb}, n_win={nw} hold {nb * lay.block_size + nw} tokens, not {tokens}"
            )
        out.append((nb, nw))
    return tuple(out)


def _identity(path: str, ident: Any) -> dict | None:
    if ident is None:
        return None
    if not isinstance(ident, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in ident.items()
    ):
        raise CacheFileError(path, "metadata 'model_identity' must be null or an object of strings")
    return ident


# ---- the model ----------------------------------------------------------------------------------------------
def _check_model(path: str, header: CacheHeader, model) -> None:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    tp = getattr(model, "tp_size", None) or 1  # a tensor-parallel rank holds heads / tp of them
    heads = (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads) // tp
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    lay = header.layout
    pairs = {
        "layers": (header.num_layers, cfg.num_hidden_layers),
        "num_kv_heads per rank": (lay.num_heads, heads),
        "head_dim": (lay.head_dim, head_dim),
        "dtype": (header.dtype, getattr(model, "dtype", header.dtype)),
    }
    problems = [f"{k}: file {a}, model {b}" for k, (a, b) in pairs.items() if a != b]
    if header.model_identity is not None:
        mine = model_identity(model)
        saved_tp = header.model_identity.get("tensor_parallel") or "none"
        if saved_tp.split("/")[-1] != mine["tensor_parallel"].split("/")[-1]:
            problems.append(
                f"sharding: saved under tensor parallelism {saved_tp} (rank/size), the model runs with "
                f"{mine['tensor_parallel']}; a cache loads only under the sharding it was saved with"
            )
        if any(header.model_identity.get(k) != mine[k] for k in ("architecture", "config_sha256")):
            problems.append(
                f"identity: file {header.model_identity.get('architecture')} "
                f"(config sha256 {str(header.model_identity.get('config_sha256'))[:12]}), "
                f"model {mine['architecture']} (config sha256 {mine['config_sha256'][:12]})"
            )
    if problems:
        raise CacheFileError(path, "a cache of another model: " + "; ".join(problems))


# ---- names, dtypes and shapes (header only: no tensor data is read) ------------------------------------------
def _check_names(path: str, header: CacheHeader, f) -> None:
    keys = set(f.keys())
    if header.num_layers > len(keys):  # a forged layer count: never build a huge set of names from it
        raise CacheFileError(path, f"metadata declares {header.num_layers} layers, the file has {len(keys)} tensors")
    expected = {f"layers.{i}.{n}" for i in range(header.num_layers) for n in FILE_FIELDS}
    missing, extra = sorted(expected - keys), sorted(keys - expected)
    if missing or extra:
        raise CacheFileError(path, f"tensor names: missing {_few(missing)}, unexpected {_few(extra)}")


def _few(names: list[str], n: int = 5) -> str:
    return str(names[:n])[:-1] + (f", ... ({len(names)} in all)]" if len(names) > n else "]")


def _check_shapes(path: str, header: CacheHeader, f, i: int) -> None:
    """Check every tensor of layer ``i`` against ``PackedLayer.empty`` on the meta device (no data is read)."""
    sl = f.get_slice(f"layers.{i}.pool")
    pool_shape = list(sl.get_shape())
    if len(pool_shape) != 1 or not 1 <= pool_shape[0] <= MAX_POOL_WORDS + 1:
        raise CacheFileError(path, f"layer {i}: pool has shape {pool_shape}, not [1 .. {MAX_POOL_WORDS + 1}]")
    nb, nw = header.layers[i]
    try:
        oracle = PackedLayer.empty(header.layout, header.batch, header.dtype, "meta", nb, pool_shape[0] - 1)
    except Exception as e:  # noqa: BLE001 - e.g. sizes whose product overflows
        raise CacheFileError(path, f"layer {i}: the declared geometry is not constructible ({e})") from None
    lay = header.layout
    expected = {f: (getattr(oracle, f).dtype, list(getattr(oracle, f).shape)) for f in STORAGE_FIELDS}
    for ring, window in RING_TO_FILE.items():
        expected[window] = (header.dtype, [header.batch, lay.num_heads, nw, lay.head_dim])
        del expected[ring]
    for name, (dtype, shape) in expected.items():
        sl = f.get_slice(f"layers.{i}.{name}")
        got_dtype, got_shape = sl.get_dtype(), list(sl.get_shape())
        if got_dtype != SAFETENSORS_DTYPES[dtype] or got_shape != shape:
            raise CacheFileError(
                path,
                f"layer {i}: tensor '{name}' is {got_dtype}{got_shape}, "
                f"the metadata's layout requires {SAFETENSORS_DTYPES[dtype]}{shape}",
            )


def _check_room(path: str, header: CacheHeader, dev: torch.device) -> None:
    """Refuse before allocating a ring that cannot fit (the ring is the one size not bounded by the file)."""
    lay = header.layout
    ring = 2 * header.batch * lay.num_heads * lay.ring_size * lay.head_dim * header.dtype.itemsize
    need = header.num_layers * ring
    free = _free_bytes(dev)
    if free is not None and need > free:
        raise CacheFileError(
            path, f"its exact rings need {need} bytes on {dev}, only {free} are free (batch/heads/window implausible?)"
        )


def _free_bytes(dev: torch.device) -> int | None:
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ---- values: the FORMAT.md invariants, before any kernel reads the data ---------------------------------------
def _load_layer(path: str, header: CacheHeader, f, i: int, dev: torch.device) -> PackedLayer:
    try:
        t = {name: _get(f, f"layers.{i}.{name}", dev) for name in FILE_FIELDS}
        problem = _invariant_violation(header, i, t)
    except CacheFileError:
        raise
    except Exception as e:  # noqa: BLE001 - validation of garbage must end in a clear error, never a crash
        raise CacheFileError(path, f"layer {i}: unreadable ({type(e).__name__}: {e})") from None
    if problem:
        raise CacheFileError(path, f"layer {i}: {problem}")
    return _storage(header, i, t)


def _get(f, name: str, dev: torch.device) -> torch.Tensor:
    x = f.get_tensor(name)
    # On the CPU safetensors maps the file: own the memory, so the cache never depends on the file staying put.
    return x.clone() if dev.type == "cpu" else x


def _invariant_violation(header: CacheHeader, i: int, t: dict[str, torch.Tensor]) -> str | None:
    """The first broken invariant of layer ``i``'s tensors, or None. Only range-checked indexing is done."""
    lay = header.layout
    nb, nw = header.layers[i]
    if not (bool((t["n_blocks"] == nb).all()) and bool((t["n_win"] == nw).all())):
        return f"device counters n_blocks/n_win differ from the metadata's ({nb}, {nw}) or across the batch"
    cursor = int(t["cursor"].item())
    if not 0 <= cursor <= t["pool"].numel() - 1:
        return f"cursor {cursor} is outside the pool of {t['pool'].numel() - 1} words"
    for name, s in (("k", lay.k), ("v", lay.v)):
        problem = _stream_violation(name, s, lay, header.dtype, cursor, t)
        if problem:
            return problem
    if nb and not bool((t["perm"].sort(dim=-1).values == torch.arange(lay.block_size, device=t["perm"].device)).all()):
        return "a block's perm is not a permutation of 0..block_size-1"
    for name in RING_TO_FILE.values():
        if not bool(torch.isfinite(t[name]).all()):
            return f"{name} holds NaN/Inf values"
    return None


def _stream_violation(
    name: str, s: StreamLayout, lay: Layout, dtype: torch.dtype, cursor: int, t: dict[str, torch.Tensor]
) -> str | None:
    meta, offsets, scale, zero = (t[f"{name}_{x}"] for x in ("meta", "offsets", "scale", "zero"))
    if meta.shape[1] == 0:
        return None
    mins, widths = unpack_meta(meta, s, lay)
    if bool((widths > s.qbits).any()):
        return f"{name}_meta: a pack width exceeds qbits={s.qbits}"
    if bool((mins > s.qmax).any()):
        return f"{name}_meta: a pack minimum exceeds qmax={s.qmax}"
    _, words = payload_bit_offsets(widths, lay.pack_size)
    offs = offsets.to(torch.int64)
    if bool((offs < 0).any()) or bool((offs + words > cursor).any()):
        return f"{name}_offsets: a chunk's payload lies outside the pool words in use [0, {cursor})"
    if not (bool(torch.isfinite(scale).all()) and bool((scale > 0).all())):
        return f"{name}_scale: scales must be finite and positive"
    if bool((zero.to(torch.int32).abs() > ZERO_LIMIT + 1).any()):
        return f"{name}_zero: zeros must lie within +-{ZERO_LIMIT + 1}"
    if not _dequantized_fit(mins, widths, scale, zero, s, lay, dtype):
        return f"{name}: dequantized values would overflow {dtype} (corrupt scales or zeros)"
    return None


def _dequantized_fit(mins, widths, scale, zero, s: StreamLayout, lay: Layout, dtype: torch.dtype) -> bool:
    """Whether every ``(q + zero) * scale`` is finite in ``dtype``, for any payload the metadata allows.

    A pack's ints lie in ``[min, min + 2**width - 1]``; reduce those bounds to each quantization group.
    """
    lo = mins.to(torch.int64)
    hi = lo + (torch.ones_like(lo) << widths.to(torch.int64)) - 1
    lo_g, hi_g = _group_bounds(lo, s, lay, torch.amin), _group_bounds(hi, s, lay, torch.amax)
    z, sc = zero.to(torch.float64), scale.to(torch.float64)
    worst = torch.maximum((lo_g + z).abs(), (hi_g + z).abs()) * sc
    return bool((worst <= torch.finfo(dtype).max).all())


def _group_bounds(x: torch.Tensor, s: StreamLayout, lay: Layout, reduce) -> torch.Tensor:
    """Per-pack values ``[B, NB, H, R, D]`` reduced to the group shape ``[B, NB, Gh, Gt, Gc]``."""
    P = lay.pack_size
    if s.grouping == GROUP_CHANNEL:
        return reduce(x, dim=3)[:, :, :, None, :]
    if s.grouping == GROUP_TOKEN:
        return reduce(x, dim=(2, 4)).repeat_interleave(P, dim=2)[:, :, None, :, None]
    return reduce(x, dim=4).repeat_interleave(P, dim=3)[..., None]  # token_head


def _storage(header: CacheHeader, i: int, t: dict[str, torch.Tensor]) -> PackedLayer:
    """The validated tensors as a ``PackedLayer``: the window goes back into its ring slots."""
    lay = header.layout
    nb, nw = header.layers[i]
    dev = t["pool"].device
    rings = {}
    for ring, window in RING_TO_FILE.items():
        r = torch.zeros(header.batch, lay.num_heads, lay.ring_size, lay.head_dim, dtype=header.dtype, device=dev)
        r.index_copy_(2, _window_slots(lay, nb, nw, dev), t[window])
        rings[ring] = r
    fields = {f: t[f] for f in STORAGE_FIELDS if f not in RING_TO_FILE}
    st = PackedLayer(layout=lay, **fields, **rings)
    # Start with the capacity a fresh layer gets, so no kernel sees zero-sized block tensors.
    return st.with_capacity(MIN_BLOCKS) if st.block_capacity < MIN_BLOCKS else st


def _assemble(header: CacheHeader, storages: list[PackedLayer], model) -> PackKVCache:
    cache = PackKVCache(header.config, model=model)
    if model is None:
        cache.model_identity = header.model_identity
    for st, (nb, nw) in zip(storages, header.layers):
        layer = PackKVLayer(header.config)
        layer.storage, layer.n_blocks, layer.n_win = st, nb, nw
        layer.dtype, layer.device = st.dtype, st.device
        layer._pool_bound = int(st.cursor.item())  # exact: the cursor is where the next chunks go
        layer.is_initialized = True
        layer._mark_static()
        cache.layers.append(layer)
    return cache


__all__ = ["CacheFileError", "load_cache", "save_cache"]
