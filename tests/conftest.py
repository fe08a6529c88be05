"""Test setup shared by every test module.

Triton kernels run under the CPU interpreter on machines without a GPU. The variable must be set before any
kernel is decorated, i.e. before ``packkv`` is imported, so it is set here at collection time.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", deadline=None, print_blob=True)
settings.load_profile("ci")


@pytest.hookimpl(trylast=True)  # after `-m` has deselected: only tests that will run count
def pytest_collection_modifyitems(config, items):
    # `cuda` tests are deselected by default (pyproject: -m "not cuda"); asking for them without a GPU is an
    # error of the command line, reported as such rather than skipped.
    if not HAS_CUDA and any("cuda" in item.keywords for item in items):
        raise pytest.UsageError("cuda tests were selected but no GPU is visible; run them on the GPU machine")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm():
    """The default real model (SmolLM2-135M-Instruct) and its tokenizer, on the CPU in fp32."""
    from packkv import real_model

    return real_model.load()


@pytest.fixture(scope="session")
def real_kv(smollm):
    """Post-RoPE K/V of every layer of SmolLM2 after 1,024 tokens of Pride and Prejudice."""
    from packkv import real_model

    model, tok = smollm
    return real_model.capture_kv(model, tok, real_model.text(), 1024)
