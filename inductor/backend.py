"""The ``torch.compile`` backend: the PackKV FX rewrite, then Inductor.

    compiled = torch.compile(module, backend=packkv.inductor.packkv_backend, fullgraph=True, mode="reduce-overhead")
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Callable

import torch
from torch import fx

from .rewrite import fuse_decode_appends, rewrite_attention, snapshot_foreign_reads

log = logging.getLogger(__name__)

# A decode step's one-token append fused with the attention that follows it (``rewrite.fuse_decode_appends``; on an
# sm_90 GPU the append then runs in the attention's merge, kernels/fused_append.py). H100, 2026-12-06g: per layer in
# a CUDA graph the same at B1/64K, 1-3% faster at B1/128K and B8/32K, 13% at B1/8K; the 64K e2e step's kernels 7.88
# vs 7.92 ms (the e2e step itself moves more between processes than that).
FUSE_APPENDS = True

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
    from packkv.ops.kernels.inductor_compat import keep_maxnreg

    # Before anything is compiled or loaded: a graph replayed from Inductor's caches in a new process never traces
    # the attention (whose first launch installs this otherwise), and its launchers would rebuild the kernel without
    # its register cap (the suspected cause of the cache-replayed Triton attention's 6-15% slower e2e, 2026-12-06).
    keep_maxnreg()
    if needs_autograd(example_inputs):
        # PackKV's ops have no backward: a graph traced with gradients on keeps its attention as written (SDPA over
        # decompressed K/V, differentiable in the queries as in eager mode) instead of failing in AOTAutograd.
        n = appends = 0
        log.debug("packkv backend: gradients on, attention left unfused (PackKV's ops have no backward)")
    else:
        n = rewrite_attention(gm)
        appends = fuse_decode_appends(gm) if FUSE_APPENDS else 0
    snapshots = snapshot_foreign_reads(gm)  # what reads the storage outside PackKV's ops reads it before any append
    stats["graphs"] += 1
    stats["fused_attention"] += n
    stats["fused_append"] += appends
    stats["snapshots"] += snapshots
    log.info("packkv backend: graph %d, %d attention(s) fused, %d with their step's append, %d storage tensor(s) "
             "snapshotted", stats["graphs"], n, appends, snapshots)  # fmt: skip
    if inner is not None:
        return inner(gm, example_inputs)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    from torch._inductor import config as inductor_config

    from .cache_key import OpsCacheKey

    patches = dict(list_mode_options(mode)) if mode else {}
    patches.update(options or {})
    # Inductor's graph caches key on the graph, where PackKV's ops are single nodes: this no-op pass adds their
    # sources and the kernels' switches (attention.GLUON...) to the key (cache_key.py).
    if patches.get("post_grad_custom_post_pass") is None and inductor_config.post_grad_custom_post_pass is None:
        patches["post_grad_custom_post_pass"] = OpsCacheKey()
    else:
        log.info("packkv backend: a post-grad pass is set; Inductor's caches will not see PackKV's kernel switches")
    # No compile_threads patch: the attention's register cap survives Inductor's compile workers (packkv_ops/
    # kernels/inductor_compat.py builds kernels that set one in this process; verified on the H200, 2026-12-04i).
    return compile_fx(gm, example_inputs, config_patches=patches)


def needs_autograd(example_inputs: list) -> bool:
    """Whether the graph is compiled for autograd: gradients on and an input (parameters are inputs) requiring them,
    as AOTAutograd decides between its training and inference graphs."""
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)


def holds_attention(gm: fx.GraphModule) -> bool:
    """Whether the graph calls the fused PackKV attention (rewritten here or called by the model itself)."""
    targets = (torch.ops.packkv.attention.default, torch.ops.packkv.attention, torch.ops.packkv.append_attention_.default)
    return any(n.op == "call_function" and n.target in targets for n in gm.graph.nodes)


def with_inner(inner: Callable) -> Callable:
    """A backend that rewrites, then hands the graph to ``inner`` (e.g. a graph-capturing test backend)."""

    def _backend(gm, example_inputs, **kwargs):
        return packkv_backend(gm, example_inputs, inner=inner, **kwargs)

    return _backend
