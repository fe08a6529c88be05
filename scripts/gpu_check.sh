#!/usr/bin/env bash
# On the GPU machine (no network): install PackKV against the machine's torch/triton/transformers, run the
# cuda tests (and the kernel tests natively), compute-sanitizer on a subset, then the kernel benchmark.
# Usage: bash scripts/gpu_check.sh [tests|sanitize|bench|gluon|pair|all] (gluon, pair: not in all); logs and results go to
# ${OUT:-/tmp/packkv-out}.
# The sanitizer runs tests/test_kernels.py (103 tests, ~3.5 min under memcheck on the H200, 2026-12-05c) and
# tests/test_gluon_attention.py (PACKKV_SANITIZE_FILES selects files) once the Triton cache is warm: run `tests`
# first in the same machine session (cold, compiling under the tool took ~16 min for 73). PACKKV_SANITIZE_K (a
# pytest -k expression) runs a part, e.g. "attention_matches_the_reference", "rows_as_the_products or
# long_query_block", "append_matches or one_kernel or non_finite or matvec or rotate or hadamard" and the
# complement of those three. Its default deselects the compiled CUDA-graph step of test_gluon_attention.py: under
# memcheck the Gluon launch's Python frames (partials, Triton's launcher) stay referenced, so cudagraph trees'
# pool check counts the partials as live and raises; without the tool the same step passes
# (scripts/cudagraph_pool_check.py prints the referrers; H100, 2026-12-07e).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/packkv-out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PACKKV_HOME=/tmp/packkv-home
what="${1:-all}"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
# pytest-xdist is not on the GPU machine (no network there): carry its wheels in .gpuwheels/ (git-excluded;
# `pip download --no-deps pytest-xdist execnet -d .gpuwheels` here) and the tests take ~90 s instead of ~8 min.
ls .gpuwheels/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-deps .gpuwheels/*.whl >>"$OUT/install.log" 2>&1
par=(); python3 -c "import xdist" 2>/dev/null && par=(-n 8)
if [[ $what == gluon ]]; then  # the Gluon kernel's first runs: checked and timed per register setting, then its tests
  python3 scripts/gluon_sm90/packed_decode_attention.py --gpu 2>&1 | tee "$OUT/gluon.log"
  timeout 200 python3 -m pytest -q -x -p no:cacheprovider -m "cuda or not cuda" tests/test_gluon_attention.py 2>&1 \
    | tee -a "$OUT/gluon.log" | tail -15
fi
if [[ $what == pair ]]; then  # the paper's Gluon pair in one call (136 s on an H100, 2026-12-07k): its tests, its settings timed, memcheck
  timeout 150 python3 -m pytest -q -p no:cacheprovider "${par[@]}" -m "cuda or not cuda" tests/test_gluon_matvec.py \
    2>&1 | tee "$OUT/pair_tests.log" | tail -6
  timeout 200 python3 scripts/gluon_sm90/packed_matvec.py --gpu --dims 128 --cases 8x32768 8x131072 1x131072 2>&1 \
    | tee "$OUT/pair_settings.log"
  timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -x -p no:cacheprovider \
    -m "cuda or not cuda" tests/test_gluon_matvec.py -k "real_size or long_split or no_blocks" 2>&1 \
    | tee "$OUT/pair_sanitizer.log" | tail -6
fi
if [[ $what == tests || $what == all ]]; then
  timeout 480 python3 -m pytest -q -p no:cacheprovider "${par[@]}" -m "cuda or not cuda" tests/test_cuda.py tests/test_kernels.py tests/test_gluon_attention.py tests/test_gluon_matvec.py tests/test_rotation.py \
    tests/test_compile.py::test_compiled_decode_on_cuda \
    tests/test_compile.py::test_attention_built_by_parallel_compile_workers_keeps_its_register_cap ${PACKKV_EXTRA_TESTS:-} 2>&1 | tee "$OUT/tests.log" | tail -25
fi
if [[ $what == sanitize || $what == all ]]; then
  timeout 560 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -x -p no:cacheprovider \
    -m "cuda or not cuda" ${PACKKV_SANITIZE_FILES:-tests/test_kernels.py tests/test_gluon_attention.py} -k "${PACKKV_SANITIZE_K:-not under_cuda_graphs}" \
    2>&1 | tee "$OUT/sanitizer.log" | tail -8
fi
if [[ $what == bench || $what == all ]]; then
  timeout 540 python3 benchmarks/kernels.py --variants --out "$OUT" ${PACKKV_BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -30
fi
