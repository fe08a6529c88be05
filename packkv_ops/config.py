"""PackKVConfig: the user's knobs, validated once, and the integer widths they imply."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

GROUPINGS = ("token", "token_head", "channel")
"""How quantization groups are formed (one scale and zero per group).

* ``token``: per token, over all KV heads and channels (the paper's default, TokenQuant).
* ``token_head``: per token and KV head.
* ``channel``: per KV head and channel, over the tokens of one compressed block (KIVI-style keys).
"""

REPACKS = ("none", "median", "greedy")
ROTATIONS = ("none", "hadamard")
"""``hadamard``: each head's K and V are rotated by an orthonormal Hadamard matrix before quantization (the query
and the attention output are rotated to match; see ``rotation.py``)."""
PACK_SIZES = (8, 16, 32)
MAX_QBITS = 16


def qmax_for(rel: float) -> int:
    """Largest quantized integer for error bound ``rel``.

    With ``s >= (max - min) * rel``: ``round(max/s) - round(min/s) <= floor(1/rel) + 1``.
    """
    return math.floor(1.0 / rel + 1e-9) + 1


def qbits_for(rel: float) -> int:
    """Bits of the raw (un-packed) integers for error bound ``rel``."""
    return qmax_for(rel).bit_length()


@dataclass(frozen=True)
class PackKVConfig:
    """Configuration of a PackKV cache.

    ``k_rel`` / ``v_rel`` are the error bounds: every element of a compressed token is reconstructed within
    ``rel / 2`` of its quantization group's range (max - min). Smaller is more accurate and larger.
    """

    k_rel: float = 0.07
    v_rel: float = 0.15
    k_grouping: str = "token"
    v_grouping: str = "token"
    block_size: int = 64
    window: int = 128
    pack_size: int = 16
    repack: str = "median"
    rotation: str = "hadamard"

    def __post_init__(self) -> None:
        for name in ("k_rel", "v_rel"):
            rel = getattr(self, name)
            if isinstance(rel, bool) or not isinstance(rel, (int, float)) or not math.isfinite(rel):
                raise ValueError(f"PackKVConfig.{name} must be a finite number, got {rel!r}")
            if not (2.0**-MAX_QBITS < rel <= 1.0):
                raise ValueError(
                    f"PackKVConfig.{name}={rel!r} is out of range: it must lie in (2**-{MAX_QBITS}, 1] "
                    f"(integers are limited to {MAX_QBITS} bits)"
                )
            if qbits_for(float(rel)) > MAX_QBITS:
                raise ValueError(f"PackKVConfig.{name}={rel!r} needs more than {MAX_QBITS}-bit integers")
        for name in ("k_grouping", "v_grouping"):
            if getattr(self, name) not in GROUPINGS:
                raise ValueError(f"PackKVConfig.{name}={getattr(self, name)!r}; expected one of {GROUPINGS}")
        if self.repack not in REPACKS:
            raise ValueError(f"PackKVConfig.repack={self.repack!r}; expected one of {REPACKS}")
        if self.rotation not in ROTATIONS:
            raise ValueError(f"PackKVConfig.rotation={self.rotation!r}; expected one of {ROTATIONS}")
        if self.pack_size not in PACK_SIZES:
            raise ValueError(f"PackKVConfig.pack_size={self.pack_size!r}; expected one of {PACK_SIZES}")
        bs = self.block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or not (self.pack_size <= bs <= 256):
            raise ValueError(f"PackKVConfig.block_size={bs!r} must be an int in [pack_size, 256]")
        if bs & (bs - 1):  # the kernels tile a block with power-of-two shapes (tl.arange)
            raise ValueError(f"PackKVConfig.block_size={bs} must be a power of two")
        w = self.window
        if isinstance(w, bool) or not isinstance(w, int) or w < bs or w % bs:
            raise ValueError(
                f"PackKVConfig.window={w!r} must be a positive multiple of block_size={bs} "
                "(the exact window is a ring of whole blocks)"
            )

    # Derived integer widths -------------------------------------------------------------------------------
    @property
    def k_qbits(self) -> int:
        return qbits_for(self.k_rel)

    @property
    def v_qbits(self) -> int:
        return qbits_for(self.v_rel)

    @property
    def ring_size(self) -> int:
        """Slots of the exact ring: the window plus the block waiting to be compressed."""
        return self.window + self.block_size

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PackKVConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown PackKVConfig fields: {sorted(unknown)}")
        return cls(**d)
