"""What Inductor's graph caches must key on besides the graph: PackKV's op bodies and its kernels' switches.

A compiled step holds ``packkv.attention`` as one node; Inductor lowers it by running the op's Python body, which
picks the kernel (``attention.GLUON``: Gluon or Triton) and its launch settings from module-level switches. The FX
and AOTAutograd caches key on the graph, not on that body, so without this a second process (or a retrace after
``torch._dynamo.reset()``) replays whatever kernel the first compile chose, even after ``PACKKV_GLUON_ATTENTION``
or PackKV's own source changed (seen on the H100, 2026-12-06: a Gluon retrace replayed the Triton kernel).
``OpsCacheKey`` is a post-grad pass that changes nothing; its ``uuid`` (part of both caches' keys, as Inductor's
custom-pass interface specifies) hashes PackKV's op sources and the kernels' switches.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files


@functools.cache
def _sources() -> tuple[str, ...]:
    """PackKV's op and kernel sources (read once per process: they do not change under a running model)."""
    from packkv import ops

    return tuple(str(p) for p in sorted(Path(ops.__file__).parent.rglob("*.py")))


def switches() -> str:
    """The kernels' module-level settings (upper-case names holding plain values), read at each compile: benchmarks
    and users change them between compiles (``attention.GLUON``, ``ROTATE_IN_KERNEL``, ``MIN_ROWS``...)."""
    from packkv.ops import kernels

    parts = []
    for info in sorted(pkgutil.iter_modules(kernels.__path__), key=lambda m: m.name):
        try:
            mod = importlib.import_module(f"{kernels.__name__}.{info.name}")
        except Exception:  # a kernel module this machine cannot load (no Triton, no Gluon) takes no part in a compile
            continue
        for name, value in sorted(vars(mod).items()):
            if name.isupper() and (value is None or isinstance(value, (bool, int, float, str))):
                parts.append(f"{info.name}.{name}={value!r}")
    return ";".join(parts)


class OpsCacheKey(CustomGraphPass):
    """A no-op post-grad pass whose ``uuid`` keys Inductor's caches on PackKV's sources and switches."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        return None

    def uuid(self) -> bytes:
        return get_hash_for_files(_sources(), extra=switches())
