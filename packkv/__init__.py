"""PackKV: a lossy, error-bounded, bit-packed KV cache with fused decode attention on the packed bytes.

    import packkv
    cfg = packkv.PackKVConfig(k_rel=0.1, v_rel=0.2)
    out = model.generate(ids, past_key_values=packkv.PackKVCache(cfg))
"""

from packkv.compile import compile
from packkv.models import PackKVCache
from packkv.ops.config import PackKVConfig
from packkv.persistence import load_cache, save_cache

__all__ = ["PackKVConfig", "PackKVCache", "compile", "load_cache", "save_cache"]
