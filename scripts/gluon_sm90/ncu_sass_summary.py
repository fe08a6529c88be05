"""Summary of ``ncu --section SourceCounters --page source --print-source sass --csv`` output (profile.sh's
``ncu_gluon_sass.csv``): stall reasons over all samples, the most sampled instructions, and per memory instruction
the L1 work (global tag lookups and sectors per warp instruction, shared wavefronts) against ncu's ideal.

    python scripts/gluon_sm90/ncu_sass_summary.py ncu_gluon_sass.csv
"""

from __future__ import annotations

import csv
import sys


def num(x: str) -> float:
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return 0.0


def main(path: str) -> None:
    lines = open(path).read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('"Address"'))
    rows = list(csv.reader(lines[start:]))
    head, rows = rows[0], [r for r in rows[1:] if len(r) == len(rows[0])]
    ix = {k: i for i, k in enumerate(head)}
    stalls = [k for k in head if k.startswith("stall_") and "Not Issued" not in k]
    total = {k: sum(num(r[ix[k]]) for r in rows) for k in stalls}
    n = sum(total.values())
    print(f"{n:.0f} stall samples")
    for k, v in sorted(total.items(), key=lambda x: -x[1])[:8]:
        print(f"  {k:22s} {100 * v / n:5.1f}%")
    print("most sampled instructions (samples, executions, top stall):")
    for r in sorted(rows, key=lambda r: -num(r[ix["# Samples"]]))[:20]:
        top = max(stalls, key=lambda k: num(r[ix[k]]))
        print(f"  {r[0][-5:]} {num(r[ix['# Samples']]):6.0f} {num(r[ix['Instructions Executed']]):8.0f}  "
              f"{r[1].strip()[:58]:58s} {top}")  # fmt: skip
    print("memory instructions (per warp instruction: tag lookups, sectors (ideal), shared wavefronts (ideal)):")
    for r in rows:
        e = num(r[ix["Instructions Executed"]])
        src = r[1].strip()
        if e > 0 and any(op in src for op in ("LDG", "STG", "LDS", "STS", "LDSM", "STSM")):
            print(f"  {r[0][-5:]} {src[:52]:52s} x{e:8.0f}  tags {num(r[ix['L1 Tag Requests Global']]) / e:4.1f}  "
                  f"sectors {num(r[ix['L2 Theoretical Sectors Global']]) / e:5.1f} "
                  f"({num(r[ix['L2 Theoretical Sectors Global Ideal']]) / e:4.1f})  "
                  f"shared {num(r[ix['L1 Wavefronts Shared']]) / e:5.1f} ({num(r[ix['L1 Wavefronts Shared Ideal']]) / e:4.1f})")  # fmt: skip
    for key in ("L1 Wavefronts Shared", "L1 Wavefronts Shared Ideal", "L1 Tag Requests Global",
                "L2 Theoretical Sectors Global", "L2 Theoretical Sectors Global Ideal"):  # fmt: skip
        print(f"total {key}: {sum(num(r[ix[key]]) for r in rows):.0f}")


if __name__ == "__main__":
    main(sys.argv[1])
