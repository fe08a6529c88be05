"""How the CUDA paths launch Triton kernels.

Inside ``torch.library.triton_op`` bodies a kernel must be launched through ``wrap_triton`` so Inductor sees
(and inlines) it. Under ``TRITON_INTERPRET=1`` (CPU tests) kernels are interpreted Python functions that
``wrap_triton`` rejects on torch 2.11, so they are launched directly; the CPU tests call the launchers on CPU
tensors outside any compiled graph.
"""

from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def launch(kernel):
    return kernel if INTERPRET else torch.library.wrap_triton(kernel)


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: few programs keep CPU tests fast


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
