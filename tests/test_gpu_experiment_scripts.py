"""The GPU machine's experiment scripts (``scripts/gluon_sm90``, ``scripts/flush_ahead_cost.py``) run end to end on the
CPU in their dry-run mode (the Gluon kernel's body eagerly, tiny contexts), so a GPU session does not spend its
minutes on a script that broke: the settings they compare give the default's partials."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parents[1] / "scripts" / "gluon_sm90"


def _rows(*argv: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("PACKKV_GLUON_")}
    done = subprocess.run([sys.executable, *argv, "--device", "cpu"], cwd=SCRIPTS, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


# (script and settings, rows printed, largest error against the first setting): the L2 look-ahead (a hint) gives the
# same values; pair steps and stage counts change the order of the sums (bf16 weights against a maximum over 128
# tokens instead of 64).
# The register path's floor (its own synthetic format) against its torch reference: fp16 queries and fp32 sums.
@pytest.mark.parametrize(("argv", "rows", "tol"), [(("ab_settings.py", "L2_AHEAD=0", "L2_AHEAD=1"), 4, 0.0),
                                                   (("pair_step.py",), 9, 1e-3),
                                                   (("register_path.py",), 9, 1e-3)])  # fmt: skip
def test_experiment_scripts_dry_run_on_the_cpu(argv, rows, tol):
    got = _rows(*argv)
    assert len(got) == rows
    assert all(r["err"] <= tol for r in got), [r["err"] for r in got]


def test_ab_settings_refuses_a_setting_the_kernel_does_not_have():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "ab_settings.py", "NO_SUCH=1", "--device", "cpu"], cwd=SCRIPTS, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode != 0 and "no setting 'NO_SUCH'" in done.stderr


def test_flush_ahead_cost_dry_run_on_the_cpu():
    """Both flush rows per batch, and the static baseline's attention variants agreeing with each other."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    argv = ["--device", "cpu", "--layers", "2", "--batches", "1", "2", "--rounds", "2", "--sdpa", "--sdpa-context", "512",
            "--profile"]
    done = subprocess.run([sys.executable, "flush_ahead_cost.py", *argv], cwd=SCRIPTS.parent, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    flushes = [r for r in rows if r[1].strip() in ("eager", "CUDA graph")]
    assert [(r[0].strip(), r[1].strip()) for r in flushes] == [("1", "eager"), ("1", "CUDA graph"), ("2", "eager"),
                                                               ("2", "CUDA graph")]  # fmt: skip
    errors = [float(r[2]) for r in rows if len(r) == 3 and r[0].strip() and r[2].strip()[0].isdigit()]
    assert len(errors) == 4 and max(errors) < 1e-2, errors
    assert done.stdout.count("under the profiler") == 2
