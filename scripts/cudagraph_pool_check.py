"""Why does a compiled ``reduce-overhead`` step keep tensors alive in the CUDA-graph pool? Runs the Gluon test's
step (``test_compiled_decode_step_runs_the_gluon_kernel_under_cuda_graphs``) with cudagraph-tree allocation history
on; on the pool check's error, prints what refers to each stray tensor (three levels of referrers). Under
compute-sanitizer memcheck this failed on the H100 (2026-12-07e) and passed without it.
Usage: [compute-sanitizer --tool memcheck] python3 scripts/cudagraph_pool_check.py"""

import gc
import re
import sys
import types

sys.path.insert(0, "tests")
import torch
import torch._inductor.config as inductor_config
from test_cuda import fill_cuda

from packkv.ops import PackKVConfig
from packkv.ops.kernels import attention as attention_kernel

inductor_config.triton.cudagraph_trees_history_recording = True
attention_kernel.GLUON = True
dim = 128
k = torch.randn(2, 8, 3000, dim).bfloat16().cuda()
st = fill_cuda(PackKVConfig(), k, k.clone(), [2999, 1])
mask = torch.ones(2, 1, 1, 3100, dtype=torch.bool, device="cuda")
mask[1, ..., :200] = False


def step(q):
    return torch.ops.packkv.attention(q, *st.tensors(), 3100, mask, False, None, *st.layout.spec())


def describe(o) -> str:
    if isinstance(o, types.FrameType):
        return f"frame {o.f_code.co_name} {o.f_code.co_filename}:{o.f_lineno}"
    if isinstance(o, dict):
        return f"dict keys {list(o)[:8]}"
    if isinstance(o, (list, tuple)):
        return f"{type(o).__name__} len {len(o)}"
    return type(o).__name__


q = torch.randn(2, 32, 1, dim, device="cuda").bfloat16()
want = step(q)
compiled = torch.compile(step, fullgraph=True, mode="reduce-overhead")
try:
    for _ in range(4):
        got = compiled(q)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    print("no stray tensors: the compiled step warmed up, recorded and replayed")
except RuntimeError as e:
    ptrs = {int(p) for p in re.findall(r"OrderedSet\(\[([0-9, ]+)\]\)", str(e))[0].split(",")}
    print(str(e).split("Allocations")[0])
    gc.collect()
    seen = 0
    for t in gc.get_objects():
        if isinstance(t, torch.Tensor) and t.is_cuda and t.untyped_storage().data_ptr() in ptrs:
            seen += 1
            print("stray", tuple(t.shape), t.dtype)
            for r1 in gc.get_referrers(t):
                print("  <-", describe(r1))
                for r2 in gc.get_referrers(r1)[:6]:
                    if r2 is not None and not isinstance(r2, list) or len(r2) < 50:
                        print("      <-", describe(r2))
                        for r3 in gc.get_referrers(r2)[:4]:
                            print("          <-", describe(r3))
    print("tensors found:", seen)
