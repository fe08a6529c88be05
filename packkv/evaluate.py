"""Teacher-forced evaluation over a cache, exactly as token-by-token decoding would see it, in few forwards.

Decoding one token at a time through a ``PackKVCache`` compresses a block whenever the exact ring reaches
``window + block_size`` tokens; every later token attends to that block compressed. Feeding tokens in chunks
that *start at such a flush* and are ``block_size`` long reproduces that exactly: the chunk's update compresses
the same block the first token would have, no other, and the chunk's own tokens stay exact (a chunk is no
longer than the window), attended causally. So ``teacher_forced_logits`` costs one forward per block instead of
one per token, with the semantics of decoding.
"""

from __future__ import annotations

import torch


def decode_chunks(n_win: int, window: int, block_size: int, count: int) -> list[int]:
    """Chunk sizes covering ``count`` tokens fed after a ring holding ``n_win`` tokens, each chunk starting
    at a token that triggers a flush (except possibly the first) and no chunk containing a second flush."""
    sizes = []
    first = window + block_size - 1 - n_win  # tokens that fit before the next flush
    if first > 0:
        sizes.append(min(first, count))
    while sum(sizes) < count:
        sizes.append(min(block_size, count - sum(sizes)))
    return [s for s in sizes if s > 0]


@torch.no_grad()
def teacher_forced_logits(model, ids: torch.Tensor, context: int, cache) -> torch.Tensor:
    """Logits predicting tokens ``context .. L-1`` of ``ids[B, L]`` after a prefill of ``context`` tokens.

    With a ``PackKVCache`` the tokens after the prefill are fed in flush-aligned chunks (module docstring), so
    the result equals token-by-token decoding; any other cache sees the same chunks.
    """
    out = [model(ids[:, :context], past_key_values=cache).logits[:, -1:].float()]
    count = ids.shape[1] - context - 1
    layer = cache.layers[0]
    if hasattr(layer, "n_win"):
        cfg = layer.config
        sizes = decode_chunks(layer.n_win, cfg.window, cfg.block_size, count)
    else:
        sizes = [count]
    pos = context
    for size in sizes:
        out.append(model(ids[:, pos : pos + size], past_key_values=cache).logits.float())
        pos += size
    return torch.cat(out, dim=1)


def kl_divergence(logits_ref: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_ref || p) per position, in nats."""
    lp_ref = torch.log_softmax(logits_ref.float(), -1)
    lp = torch.log_softmax(logits.float(), -1)
    return (lp_ref.exp() * (lp_ref - lp)).sum(-1)
