"""The ``torch.compile`` backend: the PackKV FX rewrite, then Inductor.

    compiled = torch.compile(module, backend=packkv.inductor.packkv_backend, fullgraph=True, mode="reduce-overhead")
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Callable

import torch
from torch import fx

from .rewrite import rewrite_attention

log = logging.getLogger(__name__)

stats: Counter = Counter()
"""Graphs compiled and attentions rewritten since import (``graphs``, ``fused_attention``): tests and benchmarks
read it to count recompilations."""


def packkv_backend(
    gm: fx.GraphModule,
    example_inputs: list[torch.Tensor],
    mode: str | None = None,
    options: dict | None = None,
    inner: Callable | None = None,
) -> Callable:
    """Rewrite attention over decompressed K/V into the fused op, then compile with ``inner`` (Inductor's
    ``compile_fx`` by default, honouring ``mode`` and ``options`` as ``torch.compile`` would)."""
    n = rewrite_attention(gm)
    stats["graphs"] += 1
    stats["fused_attention"] += n
    log.info("packkv backend: graph %d, %d attention(s) fused", stats["graphs"], n)
    if inner is not None:
        return inner(gm, example_inputs)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = dict(list_mode_options(mode)) if mode else {}
    patches.update(options or {})
    on_gpu = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
    if on_gpu and holds_attention(gm) and "compile_threads" not in patches:
        # The attention's register cap survives Inductor only in this process (packkv_ops/kernels/
        # inductor_compat.py): its compile workers would build it uncapped, at half the programs per SM.
        from packkv.ops.kernels.inductor_compat import keep_maxnreg

        if keep_maxnreg():
            patches["compile_threads"] = 1
    return compile_fx(gm, example_inputs, config_patches=patches)


def holds_attention(gm: fx.GraphModule) -> bool:
    """Whether the graph calls the fused PackKV attention (rewritten here or called by the model itself)."""
    target = torch.ops.packkv.attention.default
    return any(n.op == "call_function" and n.target in (target, torch.ops.packkv.attention) for n in gm.graph.nodes)


def with_inner(inner: Callable) -> Callable:
    """A backend that rewrites, then hands the graph to ``inner`` (e.g. a graph-capturing test backend)."""

    def _backend(gm, example_inputs, **kwargs):
        return packkv_backend(gm, example_inputs, inner=inner, **kwargs)

    return _backend
