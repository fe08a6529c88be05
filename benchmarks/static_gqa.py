"""A stronger static-cache baseline for ``decode_e2e.py --paths static_gqa``: decode attention that reads each KV
head once.

transformers' SDPA path repeats K and V per query head (``repeat_kv``) whenever it is given a mask
(``use_gqa_in_sdpa``: SDPA's ``enable_gqa`` has no fused kernel with a mask), and a static cache always gives one
(its unfilled slots). At 128K (Llama-3.1-8B shapes, an H100, 2026-12-07f) that copy took ~45 of the static step's
74.5 ms. Here a one-token step instead folds each KV head's query heads into query rows, ``[B, Hq, 1, D] ->
[B, H, Hq / H, D]``, and runs one SDPA per KV head with the same mask broadcast over the rows: the same attention,
K and V read once, no copy. Prefill and MHA layers go to transformers' own SDPA function unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_gqa_decode"


def sdpa_gqa_decode(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    **kwargs) -> tuple[torch.Tensor, None]:  # fmt: skip
    """transformers' attention-function signature: ``query`` ``[B, Hq, Tq, D]``, ``key`` / ``value`` ``[B, H, Tk,
    D]``, a bool or additive ``attention_mask`` broadcastable to ``[B, 1, Tq, Tk]``; returns ``[B, Tq, Hq, D]``."""
    b, hq, tq, d = query.shape
    h = key.shape[1]
    if tq != 1 or hq == h or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)  # fmt: skip
    # Query head kv * n_rep + r attends with KV head kv (repeat_kv's order): row r of KV head kv here.
    rows = query.reshape(b, h, hq // h, d)
    out = F.scaled_dot_product_attention(rows, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, 1, hq, d), None


def register() -> str:
    """Make ``NAME`` an attention implementation (with SDPA's masks); returns it for ``set_attn_implementation``."""
    AttentionInterface.register(NAME, sdpa_gqa_decode)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
