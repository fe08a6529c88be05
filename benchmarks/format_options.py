"""What decode-friendlier pack formats would cost in compression, measured on real K/V (CPU; no GPU needed).

    python benchmarks/format_options.py [--tokens 8192] [--k-rel 0.1 --v-rel 0.2] [--rotation none|hadamard]

The attention kernel's time follows the values it decodes, not the bytes it reads (packkv_ops/kernels/NOTES.md),
and a large part of its per-tile work exists because every pack of 16 values has its own width: the pack starts
need a prefix scan over the tile's widths, each pack's bits are gathered from up to three words, and each value's
shift is a multiply by its pack's width. This compresses the kernel benchmark's real K/V (SmolLM2 K/V tiled to
Llama-3.1-8B shapes) with the current format, then recomputes the payload and pack metadata of the same ints under
formats that remove some of that work:

* ``row width``: one width per pack row (the ``D`` packs of 16 tokens that share rows) — pack starts are affine in
  the channel (``row_start + d * 16 * w_row``): no scan;
* ``channel width``: one width per channel per block — starts affine in the row, one small scan over channels;
* ``block width``: one width per block and stream — every start is affine: no scan, no gathers of varying length;
* ``even widths``: widths rounded up to even (2-bit-aligned fields; pairs of values never straddle odd offsets);
* ``pow2 widths``: widths rounded up to 0, 1, 2, 4, 8 (fields never straddle 32-bit words within a pack);
* ``16-bit lane pairs``: a pack's two halves of 8 values side by side in the two 16-bit halves of its 32-bit words,
  ``16 // w`` values per lane, none straddling a lane: one shift by ``i * w`` and one LOP3 (``mask | 0x6400`` per
  half, the int4-to-fp16 trick) decode two values, with no funnel shifts, joins or window selection.

Also prints how the packs' widths are distributed (what each option rounds).

Scales, zeros, offsets and the permutation are the same in every option; totals add them from the storage.
Prints a table (bits per compressed value) and writes JSON next to the other results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import kernels as kb  # noqa: E402  (the kernel benchmark's real K/V and prefill append)
from packkv.ops import Layout, PackKVConfig  # noqa: E402
from packkv.ops.accounting import exact_bytes  # noqa: E402
from packkv.ops.codec import pack_stats, unpack_chunks  # noqa: E402

OPTIONS = ("current", "row width", "channel width", "block width", "even widths", "pow2 widths", "16-bit lane pairs")


def _words(bits: torch.Tensor) -> torch.Tensor:
    """Bits per chunk rounded up to whole 32-bit words (as chunks are stored)."""
    return (bits + 31) // 32 * 32


def option_bits(q: torch.Tensor, qbits: int, wbits: int, lay: Layout) -> dict[str, int]:
    """Payload + pack-metadata bits of ints ``q[N, H, T, D]`` (one stream, repacked order) under each option."""
    mins, w = pack_stats(q, lay)  # [N, H, R, D]
    w = w.long()
    P, (n, h, r, d) = lay.pack_size, w.shape
    chunks = n * h
    per_pack_min = r * d * qbits  # every option keeps one minimum per pack

    def total(payload: torch.Tensor, meta_bits_per_chunk: int) -> int:
        return int(_words(payload).sum()) + chunks * int(_words(torch.tensor(meta_bits_per_chunk)))

    even = w + (w & 1)
    pow2 = torch.where(w <= 2, w, torch.where(w <= 4, 4, torch.where(w <= 8, 8, 16)))
    per_lane = 16 // w.clamp(min=1)  # 16-bit lane pairs: words per pack = lanes per half of 8 values
    lanes = torch.where(w == 0, 0, 32 * ((P // 2 + per_lane - 1) // per_lane))
    return {
        "current": total((w * P).sum((-2, -1)), per_pack_min + r * d * wbits),
        "row width": total((w.amax(-1) * P * d).sum(-1), per_pack_min + r * wbits),
        "channel width": total((w.amax(-2) * P * r).sum(-1), per_pack_min + d * wbits),
        "block width": total(w.amax((-2, -1)) * P * r * d, per_pack_min + wbits),
        "even widths": total((even * P).sum((-2, -1)), per_pack_min + r * d * wbits),
        "pow2 widths": total((pow2 * P).sum((-2, -1)), per_pack_min + r * d * wbits),
        "16-bit lane pairs": total(lanes.sum((-2, -1)), per_pack_min + r * d * wbits),
    }


def width_shares(q: torch.Tensor, lay: Layout) -> dict[int, float]:
    """Fraction of packs at each width."""
    w = pack_stats(q, lay)[1].long().flatten()
    counts = torch.bincount(w)
    return {i: round(float(c) / w.numel(), 4) for i, c in enumerate(counts.tolist()) if c}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--k-rel", type=float, default=0.1)
    p.add_argument("--v-rel", type=float, default=0.2)
    p.add_argument("--rotation", choices=("none", "hadamard"), default="none")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "format_options.json")
    args = p.parse_args(argv)

    cfg = PackKVConfig(k_rel=args.k_rel, v_rel=args.v_rel, rotation=args.rotation)
    k, v = kb.make_kv(1, args.tokens, args.heads, args.head_dim, "real", "cpu")
    st, _ = kb.compress(cfg, k, v)
    lay: Layout = st.layout
    nbytes = exact_bytes(st)
    values = 2 * nbytes["compressed_tokens"] * args.heads * args.head_dim
    rest_bits = 8 * (nbytes["scale_zero"] + nbytes["offsets"] + nbytes["perm"])
    live = torch.arange(st.block_capacity)[None, :] < st.n_blocks[:, None].long()
    streams, widths = {}, {}
    for name, meta, offsets, s in (("K", st.k_meta, st.k_offsets, lay.k), ("V", st.v_meta, st.v_offsets, lay.v)):
        q = unpack_chunks(meta[live], st.pool, offsets[live], s, lay)
        streams[name] = option_bits(q, s.qbits, s.wbits, lay)
        widths[name] = width_shares(q, lay)
    current = streams["K"]["current"] + streams["V"]["current"]
    assert current == 8 * (nbytes["payload"] + nbytes["meta"]), "the current option must equal the stored bytes"
    rows = []
    for opt in OPTIONS:
        kv = streams["K"][opt] + streams["V"][opt]
        rows.append(dict(option=opt, k_bits_per_value=2 * streams["K"][opt] / values,
                         v_bits_per_value=2 * streams["V"][opt] / values,
                         total_bits_per_value=(kv + rest_bits) / values, vs_current=(kv + rest_bits) / (current + rest_bits)))  # fmt: skip
    print(f"{args.tokens} tokens x {args.heads} heads x {args.head_dim}, k_rel {args.k_rel}, v_rel {args.v_rel}, "
          f"rotation {args.rotation}; K {lay.k.qbits}-bit ints, V {lay.v.qbits}-bit, packs of {lay.pack_size}")  # fmt: skip
    print("| format | K payload+meta bits/value | V payload+meta bits/value | total bits/value | size vs current |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['option']} | {r['k_bits_per_value']:.3f} | {r['v_bits_per_value']:.3f} | "
              f"{r['total_bits_per_value']:.3f} | {r['vs_current']:.3f}x |")  # fmt: skip
    for name, shares in widths.items():
        print(f"{name} pack widths: " + ", ".join(f"{w}: {100 * f:.1f}%" for w, f in shares.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, rows=rows,
                                        pack_widths=widths), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
