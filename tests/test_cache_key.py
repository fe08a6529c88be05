"""Inductor's graph caches key on PackKV's op sources and kernel switches (``packkv.inductor.cache_key``): a graph
compiled with one attention kernel is not replayed after the choice changed, or after PackKV's code changed; and
a replayed graph keeps the attention's register cap (the backend installs ``keep_maxnreg`` before Inductor loads it)."""

from __future__ import annotations

import subprocess
import sys

import torch
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config

from packkv.inductor import cache_key, packkv_backend
from packkv.ops.kernels import attention as attention_kernel


def test_the_key_changes_with_a_kernel_switch(monkeypatch):
    key = cache_key.OpsCacheKey()
    before = key.uuid()
    assert key.uuid() == before  # deterministic
    monkeypatch.setattr(attention_kernel, "GLUON", not attention_kernel.GLUON)
    assert key.uuid() != before
    monkeypatch.setattr(attention_kernel, "ROTATE_IN_KERNEL", not attention_kernel.ROTATE_IN_KERNEL)
    assert "attention.ROTATE_IN_KERNEL=" in cache_key.switches()


def test_the_key_changes_with_the_ops_source(monkeypatch, tmp_path):
    """An edited op body, seen by the next process (Inductor's hash helper keeps one result per process)."""
    from torch._inductor.custom_graph_pass import get_hash_for_files

    body = tmp_path / "attention.py"
    body.write_text("def attention(): return 1\n")
    monkeypatch.setattr(cache_key, "_sources", lambda: (str(body),))
    key = cache_key.OpsCacheKey()
    before = key.uuid()
    body.write_text("def attention(): return 2\n")
    get_hash_for_files.cache_clear()  # a new process
    assert key.uuid() != before


def test_a_compiled_graph_is_not_replayed_after_the_attention_kernel_choice_changed(monkeypatch, tmp_path):
    """Through the PackKV backend with Inductor's FX graph cache on (a fresh cache folder): the same graph and
    switches hit the cache, a flipped ``attention.GLUON`` misses it, and flipping back hits the first entry."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(attention_kernel, "GLUON", None)
    x = torch.randn(8)

    def compile_once() -> tuple[int, int]:
        torch._dynamo.reset()
        counters["inductor"].clear()
        torch.compile(lambda t: torch.sin(t) * 2 + 1, backend=packkv_backend)(x)
        return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]

    with inductor_config.patch(fx_graph_cache=True, fx_graph_remote_cache=False, force_disable_caches=False):
        assert compile_once() == (0, 1)
        assert compile_once() == (1, 0)
        monkeypatch.setattr(attention_kernel, "GLUON", False)
        assert compile_once() == (0, 1)
        monkeypatch.setattr(attention_kernel, "GLUON", None)
        assert compile_once() == (1, 0)
    torch._dynamo.reset()


def test_the_backend_keeps_register_caps_before_inductor_loads_a_cached_graph():
    """A graph replayed from Inductor's caches in a new process is not traced again, so the attention's first launch
    (which installs ``keep_maxnreg`` otherwise) comes after Inductor has rebuilt its kernels: the backend installs
    it first. In a fresh process, as a second process on a warm cache starts."""
    code = """
import torch, triton
from torch._inductor.runtime import triton_heuristics as th
probe = triton.Config({}, num_warps=4, maxnreg=128)
assert "maxnreg" not in th.config_to_dict(probe), "this torch keeps maxnreg itself: inductor_compat can go"
from packkv.inductor import packkv_backend
gm = torch.fx.symbolic_trace(torch.nn.Identity())
packkv_backend(gm, [torch.zeros(1)], inner=lambda g, example_inputs: g)
assert th.config_to_dict(probe)["maxnreg"] == 128
"""
    # Mutation-checked: without the backend's keep_maxnreg() call the last assertion fails.
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
