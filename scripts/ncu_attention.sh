#!/usr/bin/env bash
# On the GPU machine: Nsight Compute on the fused attention kernel (B8/32K, real K/V), default and no-extraction
# variants; prints the details page and writes the per-instruction source page (SASS, stall samples) as CSV.
# Usage: OUT=dir bash scripts/ncu_attention.sh [extra ncu_attention.py args]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/packkv-out}"; mkdir -p "$OUT"
rep="$OUT/attn_ncu"
timeout 300 ncu --clock-control none -k regex:_attention_kernel --set full --import-source yes -f -o "$rep" \
  python3 scripts/ncu_attention.py --variants default skip_decode "$@" 2>&1 | tail -5
ncu -i "$rep.ncu-rep" --page details > "$OUT/attn_ncu_details.txt" 2>&1
ncu -i "$rep.ncu-rep" --page raw --csv > "$OUT/attn_ncu_raw.csv" 2>&1
for id in 1 3; do  # the second launch of each variant
  ncu -i "$rep.ncu-rep" --page source --csv --print-source sass --launch-skip "$id" --launch-count 1 \
    > "$OUT/attn_ncu_source_$id.csv" 2>&1 || ncu -i "$rep.ncu-rep" --page source --csv --print-source sass > "$OUT/attn_ncu_source_all.csv" 2>&1
done
grep -E "Duration|Warp Cycles Per Issued|Issued Ipc|Achieved Occupancy|Registers Per|Stall|Executed Instructions  " "$OUT/attn_ncu_details.txt" | head -40
ls -la "$OUT"
