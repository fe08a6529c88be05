"""packkv.inductor: the torch.compile backend and the FX rewrite (attention over decompressed K/V -> fused op)."""

from .backend import packkv_backend, stats, with_inner
from .rewrite import rewrite_attention

__all__ = ["packkv_backend", "rewrite_attention", "stats", "with_inner"]
