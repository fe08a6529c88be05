"""``packkv.compile(model)``: the packed cache for generation, and the fused attention in the compiled decode step.

For a transformers model: ``generate`` gets a ``PackKVCache`` when none is passed; the prefill runs eagerly (exact
attention over the prompt, blocks compressed as they fill); each decode step runs a ``torch.compile``d forward
(``fullgraph=True``) whose attention over the decompressed cache the PackKV backend rewrites into the fused op.
Around each compiled step, host bookkeeping that must not be in the graph happens here: the cache plans the
step (storage growth; once every ``block_size`` steps it compresses the ring's oldest block eagerly first,
``PackKVLayer.flush_ahead``, so no compiled step compresses) and the 2-D attention mask is padded to the storage's
fixed length, so the graph sees the same shapes every step (one graph; growth of the storage adds one more). After the step the cache starts reading back its counters, without waiting for
the GPU: the next step (or any use of the cache, and the end of ``generate``) checks that every layer stored its
token (``PackKVCache.synchronize``).

For any other ``nn.Module``: ``torch.compile(module, backend=packkv.inductor.packkv_backend, ...)``.
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F

from packkv.inductor import packkv_backend
from packkv.models.cache import PackKVCache
from packkv.ops.config import PackKVConfig


def compile(model: torch.nn.Module, config: PackKVConfig | None = None, **torch_compile_kwargs) -> torch.nn.Module:
    """Install PackKV on ``model`` and return it. ``torch_compile_kwargs`` go to ``torch.compile`` (``mode=``,
    ``options=``, ``dynamic=``...); ``fullgraph`` defaults to True."""
    torch_compile_kwargs.setdefault("fullgraph", True)
    torch_compile_kwargs.setdefault("backend", packkv_backend)
    if not (hasattr(model, "generate") and hasattr(model, "config")):
        return torch.compile(model, **torch_compile_kwargs)
    # One graph per storage size: the default limit of 8 is plenty, but a long generation may grow the storage a
    # few times.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    cfg = config or PackKVConfig()
    compiled = torch.compile(model, **torch_compile_kwargs)
    model.__call__ = _DecodeStep(model, compiled)  # generate's decode loop calls `self.__call__`
    model.generate = types.MethodType(_generate_with_packkv(type(model).generate, cfg), model)
    model.packkv_config = cfg
    return model


def _generate_with_packkv(generate, cfg: PackKVConfig):
    @functools.wraps(generate)
    def wrapped(self, *args, past_key_values=None, **kwargs):
        if past_key_values is None:
            past_key_values = PackKVCache(cfg, model=self)
        if isinstance(past_key_values, PackKVCache):
            past_key_values.compiled = True
            # Compiled steps attend to the storage's whole capacity, and the prefill grows it geometrically (up to
            # twice the prompt): the first compiled step trims it to the generation's final length instead.
            past_key_values.reserve_before_decode(_final_length(self, args, kwargs))
        out = generate(self, *args, past_key_values=past_key_values, **kwargs)
        if isinstance(past_key_values, PackKVCache):
            past_key_values.synchronize()  # a refusal in the last step is reported here, not at the cache's next use
        return out

    return wrapped


def _final_length(model, args: tuple, kwargs: dict) -> int | None:
    """Tokens per sequence at the end of this ``generate`` call (prompt + new tokens), or None when unknown."""
    ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    if not isinstance(ids, torch.Tensor) or ids.dim() < 2:
        return None
    config = kwargs.get("generation_config") or model.generation_config
    new = kwargs.get("max_new_tokens", config.max_new_tokens)
    if new is not None:
        return ids.shape[1] + new
    return kwargs.get("max_length", config.max_length)


class _DecodeStep:
    """``model.__call__`` for generate: single-token steps over a compiled PackKV cache run compiled."""

    def __init__(self, model: torch.nn.Module, compiled: torch.nn.Module):
        self.model = model
        self.compiled = compiled

    def __call__(self, *args, **kwargs):
        cache = kwargs.get("past_key_values")
        ids = kwargs.get("input_ids")
        if not (
            isinstance(cache, PackKVCache) and getattr(cache, "compiled", False) and cache.is_initialized
            and not args and ids is not None and ids.shape[1] == 1 and kwargs.get("inputs_embeds") is None
        ):  # fmt: skip
            return type(self.model).__call__(self.model, *args, **kwargs)
        length = cache.prepare_step(1)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:  # pad to the storage's length: the same shape every step
            kwargs["attention_mask"] = F.pad(mask, (0, length - mask.shape[-1]))
        try:
            out = self.compiled(**kwargs)
        except BaseException:
            cache.abandon_step()
            raise
        cache.verify_step(1)
        return out
