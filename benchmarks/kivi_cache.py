"""A KIVI-style quantized KV cache for transformers, the baseline of ``benchmarks/accuracy.py``.

KIVI (Liu et al., 2024; jy-yuan/KIVI) quantizes keys **per channel** (one scale/zero per KV head and channel over
a group of ``group_size`` tokens) and values **per token** (one scale/zero per token over ``group_size``
consecutive channels), asymmetric min-max at a fixed 2/3/4 bits, fp16 scale and zero per group, and keeps the
newest ``residual`` tokens exact.

This is a fake-quant simulation: the cache stores the dequantized values (so fidelity is exactly what KIVI's
integers would give) and computes its memory analytically: ``bits * numel / 8`` bytes of integers plus 2 bytes of
scale and 2 of zero per group.

Timing of quantization follows PackKV's ring so that both are compared on the same footing and both evaluate
decode-exactly in few forwards (``packkv.evaluate.teacher_forced_logits``): whenever the exact tail holds
``residual + group_size`` tokens, its oldest ``group_size`` tokens are quantized as one group of tokens (keys:
one group per channel; values: per token, as KIVI does one token at a time). The tail thus holds
``residual .. residual + group_size - 1`` exact tokens (KIVI's own code keeps 0..R-1 exact keys and exactly R
exact values). The layer exposes ``n_win`` and ``config.window`` / ``config.block_size`` with those meanings,
which is what ``teacher_forced_logits`` reads to feed tokens in flush-aligned chunks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

FP16_BYTES = 2
GROUP_BYTES = 4  # fp16 scale + fp16 zero


@dataclass(frozen=True)
class KIVIConfig:
    k_bits: int = 4
    v_bits: int = 4
    group_size: int = 32
    residual: int = 128

    def __post_init__(self) -> None:
        for b in (self.k_bits, self.v_bits):
            if not 1 <= b <= 8:
                raise ValueError(f"KIVI bits must be in 1..8, got {b}")
        if self.residual % self.group_size:
            raise ValueError("the residual window must be a multiple of the group size")

    # The names teacher_forced_logits / decode_chunks read (see the module docstring).
    @property
    def window(self) -> int:
        return self.residual

    @property
    def block_size(self) -> int:
        return self.group_size

    @property
    def name(self) -> str:
        return f"KIVI-K{self.k_bits}V{self.v_bits}"


def fake_quant(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Asymmetric min-max quantization over ``dim`` (one group per slice), fp16 scale and zero, dequantized.

    ``scale = (max - min) / (2**bits - 1)`` and ``zero = min``, both rounded to fp16 as KIVI stores them;
    ``q = clamp(round((x - zero) / scale), 0, 2**bits - 1)``; returns ``q * scale + zero`` in ``x``'s dtype.
    """
    xf = x.float()
    mn = xf.amin(dim, keepdim=True)
    mx = xf.amax(dim, keepdim=True)
    levels = 2**bits - 1
    scale = ((mx - mn) / levels).to(torch.float16).float()
    zero = mn.to(torch.float16).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round((xf - zero) / scale), 0, levels)
    return (q * scale + zero).to(x.dtype)


def quantize_keys(k: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Keys ``[B, H, n*group, D]``: per (head, channel) over each group of ``group`` tokens."""
    B, H, L, D = k.shape
    g = k.reshape(B, H, L // group, group, D)
    return fake_quant(g, bits, dim=3).reshape(B, H, L, D)


def quantize_values(v: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Values ``[B, H, L, D]``: per token, over each group of ``group`` consecutive channels."""
    B, H, L, D = v.shape
    if D % group:
        raise ValueError(f"head_dim {D} is not a multiple of the KIVI group size {group}")
    g = v.reshape(B, H, L, D // group, group)
    return fake_quant(g, bits, dim=4).reshape(B, H, L, D)


class KIVILayer(DynamicLayer):
    """A ``DynamicLayer`` whose tokens older than the exact tail are replaced by their KIVI reconstruction."""

    def __init__(self, config: KIVIConfig | None = None, **kwargs):
        super().__init__(**kwargs)
        self.config = config or KIVIConfig()
        self.n_quant = 0  # tokens (per sequence) already quantized

    @property
    def n_win(self) -> int:
        """Exact tokens in the tail."""
        return self.get_seq_length() - self.n_quant

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        cfg = self.config
        new = key_states.shape[-2]
        n_win = self.n_win if self.is_initialized else 0
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        n_flush = max(0, (n_win + new - cfg.residual) // cfg.group_size)
        if n_flush:
            a, b = self.n_quant, self.n_quant + n_flush * cfg.group_size
            keys, values = keys.clone(), values.clone()
            keys[:, :, a:b] = quantize_keys(keys[:, :, a:b], cfg.k_bits, cfg.group_size)
            values[:, :, a:b] = quantize_values(values[:, :, a:b], cfg.v_bits, cfg.group_size)
            self.keys, self.values = keys, values
            self.n_quant = b
            if new > cfg.residual:  # a prefill whose own tokens were quantized: its attention sees them exact
                keys, values = keys.clone(), values.clone()
                keys[:, :, -new:] = key_states
                values[:, :, -new:] = value_states
        return keys, values

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.n_quant = min(self.n_quant, self.get_seq_length())

    def reset(self) -> None:
        super().reset()
        self.n_quant = 0

    def nbytes(self) -> dict[str, float]:
        """Analytic memory of this layer (see ``kivi_bytes``)."""
        if not self.is_initialized or self.keys.numel() == 0:
            return {}
        B, H, L, D = self.keys.shape
        return kivi_bytes(self.config, B * H * self.n_quant, D, B * H * (L - self.n_quant))


def kivi_bytes(cfg: KIVIConfig, head_tokens: int, head_dim: int, exact_head_tokens: int = 0) -> dict[str, float]:
    """Bytes KIVI holds for ``head_tokens`` quantized (token, KV head) rows of ``head_dim`` channels.

    Integers ``bits * numel / 8``; one fp16 scale + one fp16 zero per group of ``group_size`` elements (keys:
    ``group_size`` tokens of one channel; values: ``group_size`` channels of one token). The exact tail is
    reported separately (``window``, fp16).
    """
    numel = head_tokens * head_dim
    groups = numel / cfg.group_size
    out = {
        "k_payload": numel * cfg.k_bits / 8,
        "k_scale_zero": groups * GROUP_BYTES,
        "v_payload": numel * cfg.v_bits / 8,
        "v_scale_zero": groups * GROUP_BYTES,
        "k_fp16": numel * FP16_BYTES,
        "v_fp16": numel * FP16_BYTES,
        "window": 2 * exact_head_tokens * head_dim * FP16_BYTES,
        "window_tokens": exact_head_tokens,
    }
    out["k_compressed"] = out["k_payload"] + out["k_scale_zero"]
    out["v_compressed"] = out["v_payload"] + out["v_scale_zero"]
    return out


class KIVICache(Cache):
    """``model.generate(ids, past_key_values=KIVICache(KIVIConfig(k_bits=2, v_bits=2)))``"""

    def __init__(self, config: KIVIConfig | None = None):
        self.kivi_config = config or KIVIConfig()
        super().__init__(layer_class_to_replicate=functools.partial(KIVILayer, self.kivi_config))

    def nbytes(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for layer in self.layers:
            for k, v in layer.nbytes().items():
                total[k] = total.get(k, 0) + v
        return total

    def __repr__(self) -> str:
        return f"KIVICache({self.kivi_config}, layers={len(self.layers)})"


__all__ = ["KIVICache", "KIVIConfig", "KIVILayer", "fake_quant", "kivi_bytes", "quantize_keys", "quantize_values"]
