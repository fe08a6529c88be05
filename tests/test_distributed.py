"""Beyond one device: the packed cache under transformers' tensor parallelism (two CPU processes over gloo) and
with layers placed on different devices."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from test_cache import EXACT, PROMPT, prompts, tiny

NEW = 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tp_worker(rank: int, world: int, port: int, folder: str, out: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from transformers import AutoModelForCausalLM

        import packkv

        model = AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto", dtype=torch.float32).eval()
        ids, mask = prompts(1)
        cache = packkv.PackKVCache(EXACT, model=model)
        res = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, do_sample=False,
                             max_new_tokens=NEW, min_new_tokens=NEW, return_dict_in_generate=True)  # fmt: skip
        path = os.path.join(out, f"rank{rank}.safetensors")
        packkv.save_cache(res.past_key_values, path)
        # The same sharding loads back and continues as the uninterrupted run would.
        loaded = packkv.load_cache(path, model=model)
        more = model.generate(res.sequences, attention_mask=torch.ones_like(res.sequences), past_key_values=loaded,
                              do_sample=False, max_new_tokens=8, min_new_tokens=8)  # fmt: skip
        queue.put((rank, res.sequences.tolist(), more.tolist(), cache.layers[0].storage.layout.num_heads, None))
    except Exception as e:  # report instead of hanging the other rank
        queue.put((rank, None, None, None, repr(e)))
    finally:
        torch.distributed.destroy_process_group()


def test_tensor_parallel_generation_equals_one_process_and_refuses_another_sharding(tmp_path):
    import packkv

    model = tiny("llama")
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    ids, mask = prompts(1)
    ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW + 8, min_new_tokens=NEW + 8)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_tp_worker, args=(r, 2, port, str(folder), str(tmp_path), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for rank, seqs, more, heads, err in results:
        assert err is None, f"rank {rank}: {err}"
        assert heads == 1  # each rank's cache holds only its own KV head (of 2)
        assert torch.equal(torch.tensor(seqs), ref[:, : PROMPT + NEW])
        assert torch.equal(torch.tensor(more), ref)
    # A rank's file in a process without tensor parallelism: refused, naming the sharding.
    with pytest.raises(ValueError, match="sharding"):
        packkv.load_cache(tmp_path / "rank0.safetensors", model=model)


@pytest.mark.cuda
def test_layers_on_different_devices_keep_their_storage_on_their_device():
    """device_map: the first layer on the GPU, the second on the CPU (accelerate moves activations)."""
    import packkv

    model = tiny("llama")
    from accelerate import dispatch_model

    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": "cpu",
                  "model.norm": "cpu", "lm_head": "cpu"}  # fmt: skip
    model = dispatch_model(model, device_map=device_map)
    ids, mask = prompts(1)
    cache = packkv.PackKVCache(EXACT)
    out = model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), past_key_values=cache, do_sample=False,
                         max_new_tokens=NEW, min_new_tokens=NEW)  # fmt: skip
    assert cache.layers[0].storage.device.type == "cuda" and cache.layers[1].storage.device.type == "cpu"
    ref = tiny("llama").generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW)
    assert torch.equal(out.cpu(), ref)
