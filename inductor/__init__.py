"""packkv.inductor: the torch.compile backend and the FX rewrite (attention over decompressed K/V -> fused op)."""
