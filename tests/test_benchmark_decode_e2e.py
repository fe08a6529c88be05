"""benchmarks/decode_e2e.py on CPU with a tiny model: the budget rows size their batches and run side by side."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from benchmarks import decode_e2e  # noqa: E402


def test_budget_rows_alone_size_each_path_from_a_batch_1_prefill(tmp_path):
    torch._dynamo.reset()
    argv = ["--small", "--layers", "2", "--contexts", "--budget-gib", "0.02", "--budget-headroom-gib", "0",
            "--budget-contexts", "512", "--steps", "2", "--warmup", "1", "--chunk", "256", "--out", str(tmp_path)]  # fmt: skip
    assert decode_e2e.main(argv) == 0
    rows = {r["path"]: r for r in json.loads((tmp_path / "decode_e2e.json").read_text())["rows"]}
    assert set(rows) == {"weights", "static_budget", "packkv_budget"}
    static, packed = rows["static_budget"], rows["packkv_budget"]
    # The packed cache is smaller than bf16 at the same capacity, so the same budget fits more sequences.
    assert packed["batch"] > static["batch"] > 1 and packed["context"] == static["context"] == 512
    assert all(r["tokens_per_s"] > 0 for r in rows.values())
    # Each stays within the budget it was sized for (caches only: weights and headroom are outside them).
    for r in (static, packed):
        assert r["cache_alloc_bytes"] <= 0.02 * 2**30
    assert (tmp_path / "decode_e2e.png").stat().st_size > 0
    torch._dynamo.reset()


def test_a_guard_filter_replaces_the_mode_by_its_options():
    """torch.compile takes ``mode`` or ``options``, not both: with a guard filter the mode's options are spelled out."""
    assert decode_e2e.compile_kwargs("reduce-overhead", False) == dict(mode="reduce-overhead")
    kw = decode_e2e.compile_kwargs("reduce-overhead", True)
    assert set(kw) == {"options"} and kw["options"]["triton.cudagraphs"] is True
    assert kw["options"]["guard_filter_fn"] is torch.compiler.skip_guard_on_all_nn_modules_unsafe
    assert decode_e2e.compile_kwargs(None, True)["options"].keys() == {"guard_filter_fn"}


@pytest.mark.parametrize("variant, module, switch", [
    ("packkv_triton", "packkv.ops.kernels.attention", "GLUON"),
    ("packkv_unfused", "packkv.inductor.backend", "FUSE_APPENDS"),
])  # fmt: skip
def test_a_retraced_variant_runs_beside_packkv_and_leaves_its_switch_as_it_was(tmp_path, variant, module, switch):
    """``--paths ... packkv_triton`` / ``packkv_unfused``: PackKV's rows again, retraced with ``attention.GLUON`` /
    ``backend.FUSE_APPENDS`` off, in the same run and table. On the CPU the Gluon switch changes no kernel (the Gluon
    kernel runs on sm_90 only) but the append fusion changes the graph: the unfused retrace fuses no append."""
    import importlib

    from packkv.inductor import stats

    mod = importlib.import_module(module)
    torch._dynamo.reset()
    before = getattr(mod, switch)
    fused = {}

    def run_packkv(*a, **kw):  # the fused-append count each path's compiles added
        n = stats["fused_append"]
        row = real_run_packkv(*a, **kw)
        fused[len(fused)] = stats["fused_append"] - n
        return row

    real_run_packkv = decode_e2e.run_packkv
    decode_e2e.run_packkv = run_packkv
    argv = ["--small", "--layers", "2", "--contexts", "512", "--paths", "static", "packkv", variant,
            "--steps", "2", "--warmup", "1", "--chunk", "256", "--out", str(tmp_path)]  # fmt: skip
    try:
        assert decode_e2e.main(argv) == 0
    finally:
        decode_e2e.run_packkv = real_run_packkv
    rows = json.loads((tmp_path / "decode_e2e.json").read_text())["rows"]
    assert [r["path"] for r in rows] == ["weights", "static", "packkv", variant]
    assert rows[3]["context"] == 512 and rows[3]["tokens_per_s"] > 0
    half_us = 5e-4  # the per-step times are kept rounded to the microsecond, the median is not
    for r in rows:  # every timed step is kept beside the median, and the host's part of it
        times = r["step_times_ms"]
        assert len(times) == 2 and min(times) - half_us <= r["step_ms"] <= max(times) + half_us
        assert 0 < r["host_ms"] <= max(times) + half_us
        # and the pipelined rounds' ms per step beside their median
        assert len(r["pipelined_times_ms"]) == decode_e2e.PIPELINED_ROUNDS
        assert r["pipelined_step_ms"] == pytest.approx(statistics.median(r["pipelined_times_ms"]), abs=1e-3)
        # The host's part ends at the graph's launch: the static cache's call returns then; PackKV's goes on to
        # verify_step (the counters), which the launch marks set apart.
        assert (r["after_launch_ms"] > 0) == r["path"].startswith("packkv"), r
    assert fused[0] > 0  # PackKV's own rows fuse their appends
    assert (fused[1] == 0) == (variant == "packkv_unfused")
    assert getattr(mod, switch) is before
    from torch._inductor import config as inductor_config

    assert not inductor_config.force_disable_caches  # the retrace's cache switch is put back too
    torch._dynamo.reset()


def test_gc_freeze_freezes_after_each_paths_warm_up_and_thaws_after_its_timing(tmp_path, monkeypatch):
    """``--gc-freeze``: each timed path (the weights row, static, PackKV) freezes the collector once its warm-up is
    done and unfreezes it after its steps, so no path inherits another's frozen objects."""
    events = []
    monkeypatch.setattr(decode_e2e.gc, "freeze", lambda: events.append("freeze"))
    monkeypatch.setattr(decode_e2e.gc, "unfreeze", lambda: events.append("unfreeze"))
    torch._dynamo.reset()
    argv = ["--small", "--layers", "2", "--contexts", "512", "--steps", "2", "--warmup", "1", "--chunk", "256",
            "--gc-freeze", "--out", str(tmp_path)]  # fmt: skip
    assert decode_e2e.main(argv) == 0
    assert events == ["freeze", "unfreeze"] * 3
    assert decode_e2e.main(argv[:-3] + ["--out", str(tmp_path)]) == 0  # without the flag: untouched
    assert events == ["freeze", "unfreeze"] * 3
    torch._dynamo.reset()


def test_profiled_steps_report_their_kernel_time_beside_the_step_time(capsys):
    """``--profile`` (GPU only in ``main``): three more steps under the profiler, printed by kernel, returning the
    kernels' time per step beside the profiled step's. On the CPU no CUDA kernel runs: 0 ms of kernels."""
    from transformers import StaticCache

    torch.manual_seed(0)
    model = decode_e2e.build_model(2, True, "cpu")
    cache = StaticCache(config=model.config, max_cache_len=64)
    decode_e2e.prefill(model, torch.randint(0, model.config.vocab_size, (1, 16)), cache, 16)
    got = decode_e2e.profile_steps(model.__call__, model, cache, 1, 16, "cpu", cache.get_max_length())
    assert set(got) == {"kernel_ms", "profiled_step_ms"}
    assert got["kernel_ms"] == 0 and got["profiled_step_ms"] > 0
    assert "per step:" in capsys.readouterr().out


def test_a_step_time_holds_its_host_time_from_the_call_to_its_return(monkeypatch):
    """``decode`` times each step from before the call to the end of its GPU work, and separately the host's time
    until the call returns: a step whose call takes 20 ms of host time measures at least that, in both."""
    import time as _time

    calls = []

    def step(**kw):
        calls.append(kw["position_ids"].item())
        _time.sleep(0.02)

    model = type("M", (), {"config": type("C", (), {"vocab_size": 10})()})()
    times = decode_e2e.decode(step, model, None, 1, 5, steps=2, warmup=1, device="cpu")
    assert calls == [5, 6, 7]  # one warm-up step, then the timed ones at the next positions
    assert len(times) == len(times.host) == 2
    for total, host in zip(times, times.host):
        assert 20 <= host <= total


def test_pipelined_rounds_wait_once_per_round_not_once_per_step(monkeypatch):
    """After the timed steps, each waited for, ``pipelined`` runs rounds of steps at the following positions with
    one wait per round (the host queues each step while the GPU runs the one before), timing ms per step."""
    import time as _time

    calls, waits = [], []

    def step(**kw):
        calls.append(kw["position_ids"].item())
        _time.sleep(0.02)

    def timer(device):
        t0 = _time.perf_counter()
        return lambda: (waits.append(len(calls)), (_time.perf_counter() - t0) * 1e3)[-1]

    monkeypatch.setattr(decode_e2e, "timer", timer)
    monkeypatch.setattr(decode_e2e, "PIPELINED_ROUNDS", 2)
    monkeypatch.setattr(decode_e2e, "PIPELINED_STEPS", 3)
    model = type("M", (), {"config": type("C", (), {"vocab_size": 10})()})()
    times = decode_e2e.decode(step, model, None, 1, 5, steps=2, warmup=1, device="cpu", pipelined=True)
    assert calls == list(range(5, 5 + 3 + 2 * 3))
    assert waits == [1, 2, 3, 6, 9]
    assert len(times) == 2 and len(times.pipelined) == 2 and all(20 <= ms < 40 for ms in times.pipelined)


@pytest.mark.parametrize(("shape", "head_dim", "hidden", "layers"), [("llama-3.1-8b", 128, 4096, 32), ("llama-3.2-1b", 64, 2048, 16)])
def test_the_benchmark_builds_each_named_shape(shape, head_dim, hidden, layers):
    """``--shape`` picks the model's attention shapes (random weights; built on the meta device here): Llama-3.2-1B
    decodes at head_dim 64, as SmolLM2 and Qwen2.5-0.5B do, with Llama-3.1-8B's 32 query / 8 KV heads."""
    cfg = decode_e2e.build_model(None, False, "meta", shape).config
    assert (cfg.head_dim, cfg.hidden_size, cfg.num_hidden_layers) == (head_dim, hidden, layers)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (32, 8)
    assert decode_e2e.build_model(2, False, "meta", shape).config.num_hidden_layers == 2


def test_packkv_rows_time_plain_steps_and_one_compressing_step_each_after_its_graph_is_compiled(monkeypatch):
    """A step whose token overflows the exact ring first compresses a block in every layer (one step in
    ``block_size``; on CUDA a storage's first flush runs eagerly and its second captures the flushes' CUDA graph).
    The PackKV row warms up through two of them and the steps after each, so the timed steps (waited and pipelined)
    replay plain ones; then it
    times the next compressing step and the plain step after it, with the plain steps before them untimed, and
    reports them beside the plain step and the mean step over a block of tokens."""
    import packkv

    monkeypatch.setattr(decode_e2e, "PIPELINED_ROUNDS", 1)
    monkeypatch.setattr(decode_e2e, "PIPELINED_STEPS", 2)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = decode_e2e.build_model(2, True, "cpu")
    packkv.compile(model)
    cfg = model.packkv_config
    compressed, timed = {}, set()  # position -> blocks the step compressed; positions of timed steps
    real = decode_e2e.decode

    def spy(step, model, cache, batch, start, steps, warmup, device, **kw):
        def watched(**inputs):
            before = cache.layers[0].n_blocks
            out = step(**inputs)
            compressed[inputs["position_ids"].item()] = cache.layers[0].n_blocks - before
            return out

        first = start + warmup
        timed.update(range(first, first + steps + (2 if kw.get("pipelined") else 0)))
        if not kw.get("pipelined"):  # the compressing step's call: only its last two steps are timed
            timed.difference_update(range(start, start + steps - 2))
        return real(watched, model, cache, batch, start, steps, warmup, device, **kw)

    monkeypatch.setattr(decode_e2e, "decode", spy)
    context = 4 * cfg.block_size + 5  # the prefill leaves the ring neither empty nor one token from compressing
    row = decode_e2e.run_packkv(model, 1, context, 3, 1, "cpu", 64, cfg)
    steps = sorted(compressed)
    assert steps == list(range(context, context + len(steps)))  # every step ran once, in order
    comp = [p for p in steps if compressed[p]]
    assert len(comp) == 3 and all(compressed[p] == 1 for p in comp)
    assert comp[1] - comp[0] == comp[2] - comp[1] == cfg.block_size
    assert comp[1] + 2 < min(timed)  # two in the warm-up, and two plain steps after the second
    assert [p for p in comp if p in timed] == [steps[-2]]  # the one timed compressing step, then the step after it
    assert steps[-1] in timed and not compressed[steps[-1]]
    assert row["compress_step_ms"] > 0 and row["after_compress_step_ms"] > 0
    assert row["graph_flushes"] is True  # the default: recorded, since it changes what the compressing step costs
    two = row["compress_step_ms"] + row["after_compress_step_ms"]
    assert row["amortized_step_ms"] == pytest.approx(((cfg.block_size - 2) * row["step_ms"] + two) / cfg.block_size)
    torch._dynamo.reset()
