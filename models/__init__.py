"""packkv.models: the transformers integration (the packed Cache and per-architecture glue)."""

from .cache import PackKVCache, PackKVLayer

__all__ = ["PackKVCache", "PackKVLayer"]
