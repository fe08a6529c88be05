"""Static description of one layer's packed storage: shapes, dtypes and the exact size formula.

FORMAT.md beside this file explains the layout; this module is its executable form. Everything here is
plain integer arithmetic on the configuration, so the cache, the kernels, the file format and the size
accounting all agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import PackKVConfig, qmax_for
from .rotation import ROTATION_CODES

GROUP_TOKEN, GROUP_TOKEN_HEAD, GROUP_CHANNEL = 0, 1, 2
GROUP_CODES = {"token": GROUP_TOKEN, "token_head": GROUP_TOKEN_HEAD, "channel": GROUP_CHANNEL}
REPACK_CODES = {"none": 0, "median": 1, "greedy": 2}

SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

ZERO_LIMIT = 32000
"""|zero| is kept below this so it fits int16: the scale is raised to max|x| / ZERO_LIMIT when needed."""

SCALE_DTYPE = torch.bfloat16  # rounded up, so the error bound is never loosened by storing it
ZERO_DTYPE = torch.int16


@dataclass(frozen=True)
class StreamLayout:
    """Integer widths of one stream (K or V)."""

    rel: float
    grouping: int

    @property
    def qmax(self) -> int:
        return qmax_for(self.rel)

    @property
    def qbits(self) -> int:
        return self.qmax.bit_length()

    @property
    def wbits(self) -> int:
        """Bits of a pack's width field (widths are 0..qbits)."""
        return self.qbits.bit_length()

    @property
    def mbits(self) -> int:
        """Bits of one pack's metadata field: the pack minimum (qbits) then its width (wbits)."""
        return self.qbits + self.wbits


@dataclass(frozen=True)
class Layout:
    """Everything static about one layer's packed K/V storage."""

    num_heads: int
    head_dim: int
    block_size: int
    pack_size: int
    window: int
    repack: int
    k: StreamLayout
    v: StreamLayout
    rotation: int = 0  # ROTATION_CODES: K/V stored as rotated by a Hadamard matrix (rotation.py)

    @classmethod
    def from_config(cls, cfg: PackKVConfig, num_heads: int, head_dim: int) -> Layout:
        check_head_dim(head_dim)
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        return cls(
            num_heads=num_heads,
            head_dim=head_dim,
            block_size=cfg.block_size,
            pack_size=cfg.pack_size,
            window=cfg.window,
            repack=REPACK_CODES[cfg.repack],
            k=StreamLayout(float(cfg.k_rel), GROUP_CODES[cfg.k_grouping]),
            v=StreamLayout(float(cfg.v_rel), GROUP_CODES[cfg.v_grouping]),
            rotation=ROTATION_CODES[cfg.rotation],
        )

    def spec(self) -> tuple:
        """The static parameters every ``torch.ops.packkv`` op takes after the storage tensors."""
        return (self.k.rel, self.k.grouping, self.v.rel, self.v.grouping, self.pack_size, self.repack, self.rotation)

    # ---- geometry ----------------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        """Pack rows per block: a pack row is ``pack_size`` consecutive tokens of a block."""
        return self.block_size // self.pack_size

    @property
    def ring_size(self) -> int:
        return self.window + self.block_size

    def meta_words(self, s: StreamLayout) -> int:
        """int32 words of metadata per chunk (one block of one KV head): rows*D fields of mbits bits."""
        return self.rows * self.head_dim * s.mbits // 32

    def max_chunk_words(self, s: StreamLayout) -> int:
        """Payload words of a chunk whose every pack has the full width ``qbits``."""
        return -(-self.block_size * self.head_dim * s.qbits // 32)

    def group_shape(self, s: StreamLayout) -> tuple[int, int, int]:
        """(heads, tokens, channels) extent of the scale/zero of one block."""
        H, T, D = self.num_heads, self.block_size, self.head_dim
        return {GROUP_TOKEN: (1, T, 1), GROUP_TOKEN_HEAD: (H, T, 1), GROUP_CHANNEL: (H, 1, D)}[s.grouping]

    def chunk_elements(self) -> int:
        return self.block_size * self.head_dim

    # ---- exact size formula ---------------------------------------------------------------------------------
    def fixed_bytes_per_block(self) -> int:
        """Bytes held per compressed block of one sequence, other than the variable payload.

        Metadata words (K and V), scale and zero (K and V), the payload offsets (K and V) and the block's
        token permutation (one byte per token, shared by K and V).
        """
        H = self.num_heads
        n = 0
        for s in (self.k, self.v):
            gh, gt, gc = self.group_shape(s)
            n += 4 * H * self.meta_words(s)  # meta, int32
            n += gh * gt * gc * (SCALE_DTYPE.itemsize + ZERO_DTYPE.itemsize)
            n += 4 * H  # offsets, int32
        n += self.block_size  # permutation, uint8
        return n


def check_head_dim(head_dim: int) -> None:
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"unsupported head_dim {head_dim}: PackKV supports head_dim in {SUPPORTED_HEAD_DIMS}")


def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {dtype}: PackKV supports {SUPPORTED_DTYPES}")
