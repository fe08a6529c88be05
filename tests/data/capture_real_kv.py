"""Capture real post-RoPE K/V of SmolLM2-135M on Pride and Prejudice for tests and benchmarks on the GPU machine
(which has no network and no model): `python tests/data/capture_real_kv.py` writes smollm2_kv.safetensors."""

from pathlib import Path

import torch
from safetensors.torch import save_file

from packkv import real_model

LAYERS = (0, 14, 29)
TOKENS = 1024

if __name__ == "__main__":
    model, tok = real_model.load()
    kv = real_model.capture_kv(model, tok, real_model.text(), TOKENS)
    tensors = {}
    for i in LAYERS:
        tensors[f"layer{i}.k"] = kv[i][0][0].to(torch.bfloat16).contiguous()  # [3 heads, 1024, 64]
        tensors[f"layer{i}.v"] = kv[i][1][0].to(torch.bfloat16).contiguous()
    out = Path(__file__).with_name("smollm2_kv.safetensors")
    save_file(tensors, out, metadata={"model": "SmolLM2-135M-Instruct", "text": "prideprejudice.txt",
                                      "tokens": str(TOKENS), "layers": ",".join(map(str, LAYERS))})
    print(out, out.stat().st_size)
