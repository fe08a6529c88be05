#!/usr/bin/env bash
# On the GPU machine: Nsight Compute's view of the Gluon and the Triton decode attention at B8/32K (profile_once.py),
# written to $OUT/ncu_{gluon,triton}.txt and the Gluon kernel's per-instruction stall samples to $OUT/ncu_gluon_sass.csv.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/packkv-out}"; mkdir -p "$OUT"
export PACKKV_HOME=/tmp/packkv-home
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
sections=(--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats
          --section SchedulerStats --section MemoryWorkloadAnalysis)
kernels=("gluon decode_attention_kernel"); [[ ${PROFILE_TRITON:-1} == 1 ]] && kernels+=("triton regex:^_attention_kernel")
for which in "${kernels[@]}"; do
  set -- $which
  timeout 240 ncu --clock-control none -k "$2" --launch-skip 2 -c 1 "${sections[@]}" \
    python3 scripts/gluon_sm90/profile_once.py >"$OUT/ncu_$1.txt" 2>&1
  echo "== $1 (rc $?)"; grep -E "Duration|Throughput|Registers|Achieved Occupancy|Theoretical Occupancy|Warp Cycles Per Issued|Issued Warp|No Eligible|Active Warps Per|Eligible Warps|Block Limit|Shared Memory Config|Dynamic Shared" "$OUT/ncu_$1.txt" | head -40
done
timeout 240 ncu --clock-control none -k decode_attention_kernel --launch-skip 2 -c 1 --section SourceCounters \
  --page source --print-source sass --csv python3 scripts/gluon_sm90/profile_once.py >"$OUT/ncu_gluon_sass.csv" 2>&1
echo "sass csv rc $? lines $(wc -l <"$OUT/ncu_gluon_sass.csv")"
python3 scripts/gluon_sm90/ncu_sass_summary.py "$OUT/ncu_gluon_sass.csv" >"$OUT/ncu_gluon_sass.txt" 2>&1
grep -E "^total|stall_" "$OUT/ncu_gluon_sass.txt" | head -10
