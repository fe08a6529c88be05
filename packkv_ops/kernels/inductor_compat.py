"""Keep a user kernel's register cap (``triton.Config.maxnreg``) in Inductor's compiled launchers.

Inductor (torch 2.11 and 2.13 checked) drops ``maxnreg`` twice on the way from a user kernel's one-config autotuner
to the compiled binary: ``config_to_dict`` writes the configs into the generated code without it, and
``CachingAutotuner._create_compile_options`` does not pass it to ``triton.compile``. So the attention inlined into
a compiled model ran uncapped: 233 registers, 2 programs per SM instead of the 4 its whole-wave split count
assumes, 148-158 us per layer at batch 1 x 64K in the compiled step vs 112 us in the kernel benchmark (H200,
``decode_e2e.py --profile`` prints each kernel's registers). ``keep_maxnreg`` patches both, only for configs that
set a cap (Inductor's own kernels set none: their dicts, cache keys and options are unchanged). Inductor's compile
workers are fresh processes without the patch, so ``AsyncCompile.triton`` is wrapped to build kernels whose source
sets a cap in this process, the rest in the workers as before; the PackKV backend also still compiles graphs holding
the attention wholly in process (``compile_threads=1``, the path verified on the GPU) until the routing has run there.
"""

from __future__ import annotations

import functools


@functools.cache
def keep_maxnreg() -> bool:
    """Install the fix in this process if its torch needs it; True when compiled launchers keep ``maxnreg``."""
    try:
        import triton
        from torch._inductor.runtime import triton_heuristics as th
    except ImportError:  # no Inductor runtime or no Triton: nothing is compiled with configs
        return False
    probe = triton.Config({}, num_warps=4, maxnreg=128)
    if th.config_to_dict(probe).get("maxnreg") != 128:
        to_dict = th.config_to_dict

        @functools.wraps(to_dict)
        def config_to_dict(config):
            d = to_dict(config)
            if getattr(config, "maxnreg", None) is not None:
                d["maxnreg"] = config.maxnreg
            return d

        th.config_to_dict = config_to_dict
    options = getattr(th.CachingAutotuner, "_create_compile_options", None)
    if options is not None and not getattr(options, "_packkv_keeps_maxnreg", False):

        @functools.wraps(options)
        def _create_compile_options(self, cfg, compile_meta):
            out = options(self, cfg, compile_meta)
            if getattr(cfg, "maxnreg", None) is not None:
                out.setdefault("maxnreg", cfg.maxnreg)
            return out

        _create_compile_options._packkv_keeps_maxnreg = True
        th.CachingAutotuner._create_compile_options = _create_compile_options
    routed = _capped_kernels_compile_in_process()
    return th.config_from_dict(th.config_to_dict(probe)).maxnreg == 128 and options is not None and routed


def _capped_kernels_compile_in_process() -> bool:
    """Wrap ``AsyncCompile.triton`` so a kernel whose generated source sets ``maxnreg`` (only configs that set a cap
    write it, with ``keep_maxnreg``) skips the compile workers, which would build it without the patch above; any
    other kernel compiles as before. True when installed."""
    try:
        from torch._inductor.async_compile import AsyncCompile
    except ImportError:
        return False
    compile_triton = AsyncCompile.triton
    if getattr(compile_triton, "_packkv_routes_maxnreg", False):
        return True
    if not callable(getattr(AsyncCompile, "use_process_pool", None)):
        return False

    @functools.wraps(compile_triton)
    def triton(self, kernel_name, source_code, *args, **kwargs):
        inner = triton.__wrapped__  # Inductor's compile (looked up per call: tests substitute it)
        if "maxnreg" not in source_code:
            return inner(self, kernel_name, source_code, *args, **kwargs)
        pool = AsyncCompile.__dict__["use_process_pool"]
        AsyncCompile.use_process_pool = classmethod(lambda cls: False)  # Inductor compiles from one thread
        try:
            return inner(self, kernel_name, source_code, *args, **kwargs)
        finally:
            AsyncCompile.use_process_pool = pool

    triton._packkv_routes_maxnreg = True
    AsyncCompile.triton = triton
    return True
