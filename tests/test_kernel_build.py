"""Every Triton kernel compiles for the H100/H200 (sm_90) on this CPU-only machine.

The interpreter runs kernels as Python and accepts code the GPU compiler rejects (globals that are not
``tl.constexpr``, mixed integer widths); compiling to PTX here (``hopper_build.py``, in a process without
``TRITON_INTERPRET``) catches that before a GPU sees it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hopper_build import CONFIGS


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compression_kernels_compile_for_sm90(name):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("hopper_build.py")
    done = subprocess.run([sys.executable, str(script), name], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{name} ok" in done.stdout
