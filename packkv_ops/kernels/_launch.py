"""How the CUDA paths launch Triton kernels.

Inside ``torch.library.triton_op`` bodies a kernel must be launched through ``wrap_triton`` so Inductor sees
(and inlines) it. Under ``TRITON_INTERPRET=1`` (CPU tests) kernels are interpreted Python functions that
``wrap_triton`` rejects on torch 2.11, so they are launched directly; the CPU tests call the launchers on CPU
tensors outside any compiled graph.
"""

from __future__ import annotations

import os

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class _Launcher:
    """``kernel[grid](...)`` that goes through ``wrap_triton`` only while something traces the call.

    In plain eager mode ``wrap_triton``'s higher-order op (dispatch, side-table registration) costs more host time
    than a decode kernel runs; there the raw kernel is launched. Under Dynamo, a dispatch mode (FakeTensor,
    functionalization, proxy tracing: how AOT and opcheck see a ``triton_op`` body) or tensor subclasses, the
    wrapped launch is what Inductor must see."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.wrapped = torch.library.wrap_triton(kernel)

    def __getitem__(self, grid):
        direct, wrapped = self.kernel[grid], self.wrapped[grid]

        def run(*args, **kwargs):
            return (direct if plain_eager(args) else wrapped)(*args, **kwargs)

        return run


def plain_eager(args) -> bool:
    """Nothing traces this call: no Dynamo, no dispatch mode (FakeTensor, functionalization, proxy tracing), plain
    tensors only."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    return all(type(a) is torch.Tensor for a in args if isinstance(a, torch.Tensor))


def launch(kernel):
    return kernel if INTERPRET else _Launcher(kernel)


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: few programs keep CPU tests fast


def resident_programs(device: torch.device, num_warps: int, regs_per_thread: int | None) -> int:
    """Programs of ``num_warps`` warps that one SM holds at once when each thread uses ``regs_per_thread``
    registers (the attention's cap; uncapped kernels are assumed to use the cap's 128). Registers bind before
    shared memory for the attention kernel (ncu: 4 programs per SM by registers, 6 by shared memory)."""
    regs = 65536
    if device.type == "cuda":
        regs = getattr(torch.cuda.get_device_properties(device), "regs_per_multiprocessor", regs)
    return max(1, regs // (32 * num_warps * (regs_per_thread or 128)))


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
