"""Bit-packing is lossless, and the chunk format is exactly what FORMAT.md says."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from packkv.ops import Layout, PackKVConfig
from packkv.ops.bitstream import read_fields, write_fields
from packkv.ops.codec import pack_chunks, pack_stats, unpack_chunks, unpack_meta


def layout_for(pack_size: int, qbits: int, head_dim: int = 64, block: int = 64) -> Layout:
    rel = 1.0 / (2**qbits - 2)  # qmax = 2**qbits - 1 (qbits >= 2)
    cfg = PackKVConfig(k_rel=rel, v_rel=rel, block_size=block, window=block, pack_size=pack_size)
    lay = Layout.from_config(cfg, 2, head_dim)
    assert lay.k.qbits == qbits
    return lay


@pytest.mark.parametrize("pack_size", [8, 16, 32])
@pytest.mark.parametrize("width", range(0, 9))
def test_unpack_of_pack_is_exact_for_every_width(pack_size, width):
    lay = layout_for(pack_size, max(width, 2))
    n, h, t, d = 3, 2, lay.block_size, lay.head_dim
    # Every pack spans exactly `width` bits: its min and max are forced, the rest is random in between.
    q = torch.randint(0, 2**width, (n, h, t, d))
    base = torch.randint(0, 2**lay.k.qbits - 2**width + 1, (n, h, lay.rows, 1, d))
    q = q.reshape(n, h, lay.rows, pack_size, d)
    q[:, :, :, 0] = 0
    q[:, :, :, 1] = 2**width - 1
    q = (q + base).reshape(n, h, t, d)
    meta, words, payload = pack_chunks(q, lay.k, lay)
    mins, widths = unpack_meta(meta, lay.k, lay)
    assert torch.all(widths == width)
    assert words.tolist() == [[-(-pack_size * width * lay.rows * d // 32) // 1] * h] * n
    offsets = (words.flatten().cumsum(0) - words.flatten()).reshape(n, h)
    back = unpack_chunks(meta, payload, offsets, lay.k, lay)
    assert torch.equal(back, q)


@given(
    pack_size=st.sampled_from((8, 16, 32)),
    qbits=st.integers(2, 16),
    head_dim=st.sampled_from((64, 128)),
    seed=st.integers(0, 2**16),
)
def test_unpack_of_pack_is_exact_for_any_ints(pack_size, qbits, head_dim, seed):
    lay = layout_for(pack_size, qbits, head_dim)
    g = torch.Generator().manual_seed(seed)
    hi = torch.randint(1, 2**qbits + 1, (1,), generator=g).item()
    q = torch.randint(0, hi, (2, 2, lay.block_size, head_dim), generator=g)
    meta, words, payload = pack_chunks(q, lay.k, lay)
    offsets = (words.flatten().cumsum(0) - words.flatten()).reshape(2, 2)
    assert torch.equal(unpack_chunks(meta, payload, offsets, lay.k, lay), q)


def test_chunk_layout_matches_the_documented_bit_positions():
    """Pack (r, c) starts at the prefix sum of P*width over earlier packs; deltas are LSB first."""
    lay = layout_for(16, 4)
    q = torch.randint(0, 16, (1, 1, 64, 64))
    meta, words, payload = pack_chunks(q, lay.k, lay)
    mins, widths = pack_stats(q, lay)
    fields = read_fields(meta.flatten(), torch.arange(4 * 64) * lay.k.mbits, torch.full((256,), lay.k.mbits))
    assert torch.equal(fields, (mins | widths << 4).flatten())
    start = 0
    for r in range(lay.rows):
        for c in range(64):
            w = int(widths[0, 0, r, c])
            for j in range(16):
                got = read_fields(payload, torch.tensor([start + j * w]), torch.tensor([w]))
                assert got.item() == q[0, 0, r * 16 + j, c] - mins[0, 0, r, c]
            start += 16 * w
    assert words.item() == -(-start // 32)


def test_bit_stream_fields_straddle_words():
    pos = torch.tensor([0, 5, 30, 45, 63])
    width = torch.tensor([5, 16, 15, 16, 1])
    val = torch.tensor([17, 40000, 12345, 65535, 1])
    words = write_fields(3, pos, val, width)
    assert torch.equal(read_fields(words, pos, width), val)
    with pytest.raises(ValueError, match="past the end"):
        write_fields(2, torch.tensor([60]), torch.tensor([255]), torch.tensor([8]))
