"""PackKV: a lossy, error-bounded, bit-packed KV cache with fused decode attention on the packed bytes."""

from packkv.ops.config import PackKVConfig

__all__ = ["PackKVConfig"]
