"""Accuracy / compression benchmark: what PackKV trades for its ratio, against a KIVI-style baseline.

    python benchmarks/accuracy.py                 # default real model (SmolLM2-135M-Instruct), the two novels
    python benchmarks/accuracy.py --quick         # tiny grid (CI / smoke test)
    python benchmarks/accuracy.py --hadamard      # also PackKVConfig(rotation="hadamard") settings
    python benchmarks/accuracy.py --model DIR --text a.txt b.txt --context 2048 --out results/

Writes ``accuracy.json`` and PNG plots (``frontier.png``, ``stages.png``, ``generation.png``) into ``--out``
(default ``benchmarks/results/accuracy/``) and prints the tables.

**Fidelity, as decoding uses the cache.** Each evaluation window is ``context + follow`` tokens of a text. The
``context`` tokens are prefilled into the cache (PackKVCache compresses 64-token blocks, keeping its exact
window), then the ``follow`` tokens are predicted teacher-forced in flush-aligned chunks, which is exactly what
token-by-token decoding computes (``packkv.evaluate``). The reference is the same with transformers'
``DynamicCache``. Per setting and window: the KL divergence of the next-token distribution from the exact
cache's (nats/token, the primary measure), the perplexity rise (ppl / ppl_exact - 1) and top-1 agreement;
reported as mean, std, min and max over windows.

The prefill's attention runs on exact K/V in every cache (the cache only compresses the prefill's tokens for
*later* queries), so its K/V and its last logits are those of the exact run. Each setting's cache is therefore
filled by handing it the exact run's prefill K/V through ``cache.update`` (precisely the calls the model's
prefill makes), and then continued exactly as ``teacher_forced_logits`` continues; the test checks this gives
bitwise the logits of ``teacher_forced_logits`` itself. This saves one 1K-token forward per setting and window.

**Compression, every byte counted.** Read from the cache's layers (``layer.storage``) after the prefill:
K and V separately, payload + pack metadata + scales/zeros + payload offsets + (half each) the permutation, as
``fp16 bytes / bytes held``; the exact window is excluded and reported separately; also the paper's
accounting (``paper_bytes``). Stages (the lossless stages do not change fidelity, so fidelity is measured
once per (grouping, bounds) and the stages by re-compressing the same prefill K/V):

* ``quant_only``: the same integers at the fixed width ``qbits`` plus scales/zeros (``fixed_width_bytes``);
* ``packed``: + bit-packing (``repack="none"``);
* ``median`` / ``greedy``: + repacking (greedy is slow on the CPU reference: ``--greedy-windows`` limits it).

**Baseline.** A KIVI-style cache (``benchmarks/kivi_cache.py``): keys per channel over groups of 32 tokens,
values per token over groups of 32 channels, fixed 2/3/4 bits, fp16 scale and zero per group, 128 exact tokens.

**Frontier.** KL vs K+V ratio for every PackKV setting/stage and KIVI point; at matched fidelity
(KL <= 0.01 and <= 0.05 nats/token) the best K+V ratio of each method.

**Generation.** Prompts made of text excerpts and a question in the chat template, greedy, eos allowed:
output-length change and per-sample agreement (identical-token fraction, first divergence) against the exact
cache, for the default config, the best PackKV settings at KL <= 0.01 / 0.05 and KIVI-4.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import platform
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm.auto import tqdm  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from benchmarks.kivi_cache import KIVICache, KIVIConfig  # noqa: E402
from packkv import PackKVCache, PackKVConfig, real_model  # noqa: E402
from packkv.evaluate import decode_chunks, kl_divergence, teacher_forced_logits  # noqa: E402
from packkv.models.cache import PackKVLayer  # noqa: E402
from packkv.ops import ops  # noqa: E402
from packkv.ops.rotation import rotate  # noqa: E402
from packkv.ops.accounting import fixed_width_stream_bytes, paper_bytes, stream_bytes  # noqa: E402
from packkv.ops.reference import flush_count  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "accuracy"

# A grouping family sets the K and V groupings; "channel" is the paper's KIVI-like baseline (K per channel,
# V per token).
FAMILIES = {"token": ("token", "token"), "token_head": ("token_head", "token_head"), "channel": ("channel", "token")}

# (k_rel, v_rel) pairs: K and V tuned jointly, from near-lossless to lossy, per family. Each pair spends
# its KL budget about evenly on K and V (K-only and V-only sweeps on SmolLM2: the KL of the two adds up), so the
# pairs trace each family's frontier from KL ~0.004 to ~0.08 nats/token.
GRID = {
    "token": [(0.03, 0.05), (0.04, 0.065), (0.05, 0.075), (0.06, 0.1), (0.07, 0.15), (0.1, 0.2), (0.1, 0.3)],
    "token_head": [(0.05, 0.1), (0.07, 0.15), (0.1, 0.2), (0.12, 0.3), (0.15, 0.3), (0.15, 0.45)],
    "channel": [(0.07, 0.05), (0.1, 0.075), (0.15, 0.1), (0.2, 0.2)],
}
# With the Hadamard rotation the same bounds cost less KL (less so for channel keys), so the grid moves up.
HADAMARD_GRID = {
    "token": [(0.05, 0.1), (0.07, 0.15), (0.1, 0.15), (0.1, 0.2), (0.12, 0.25), (0.15, 0.3)],
    "token_head": [(0.07, 0.15), (0.1, 0.2), (0.12, 0.3), (0.15, 0.3), (0.2, 0.45)],
    "channel": [(0.07, 0.1), (0.1, 0.15), (0.15, 0.2)],
}
QUICK_GRID = {"token": [(0.05, 0.1), (0.1, 0.2)], "token_head": [(0.1, 0.2)], "channel": [(0.2, 0.3)]}
KIVI_BITS = [(4, 4), (4, 3), (4, 2), (3, 3), (2, 2)]
QUICK_KIVI_BITS = [(4, 4), (2, 2)]
THRESHOLDS = (0.01, 0.05)
STAGES = ("quant_only", "packed", "median", "greedy")
STAGE_REPACK = {"packed": "none", "median": "median", "greedy": "greedy"}
QUESTIONS = (
    "Summarize the passage above in two or three sentences.",
    "Which characters appear in the passage above, and what does each of them want?",
    "What happens in the passage above? Answer briefly.",
    "Describe the mood of the passage above and quote one sentence that shows it.",
)


# ---------------------------------------------------------------------------------------------------------------
# Caches
# ---------------------------------------------------------------------------------------------------------------
def _spec(lay) -> tuple:
    return lay.spec()


class MemoPackKVLayer(PackKVLayer):
    """A PackKVLayer that keeps its decompressed blocks between flushes (fast CPU generation; same K/V).

    Compressed blocks never change, so between flushes ``decompress`` returns the same block values plus the exact
    ring; this layer returns the memo and the ring instead of decompressing every block at every step. The K/V
    handed to attention are bitwise those of ``PackKVLayer`` (checked by the test). Used for generation only.
    """

    def __init__(self, config: PackKVConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        self._memo: tuple[torch.Tensor, torch.Tensor] | None = None
        self._memo_blocks = -1

    def update(self, key_states, value_states, *args, **kwargs):
        new = key_states.shape[-2]
        fast = (
            self.is_initialized
            and self._memo_blocks == self.n_blocks
            and flush_count(self.n_win, new, self.storage.layout) == 0
        )
        if not fast:
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            st = self.storage
            k_all, v_all = keys, values
            if new > self.config.window:  # the returned prefill tokens are exact: take the blocks' own values
                k_all, v_all = torch.ops.packkv.decompress(*st.tensors(), self.tokens, *_spec(st.layout))
            nbt = self.n_blocks * st.layout.block_size
            self._memo = (k_all[:, :, :nbt].clone(), v_all[:, :, :nbt].clone())
            self._memo_blocks = self.n_blocks
            return keys, values
        self.plan_step(new, key_states.shape[0])
        st = self.storage
        ops.append(*st.tensors(), key_states, value_states, self.n_flush, *_spec(st.layout))
        self.commit_step(new)
        nbt = self.n_blocks * st.layout.block_size
        slots = torch.arange(nbt, self.tokens, device=st.device) % st.layout.ring_size
        keys = torch.cat([self._memo[0], rotate(st.ring_k[:, :, slots], st.layout.rotation)], dim=2)
        values = torch.cat([self._memo[1], rotate(st.ring_v[:, :, slots], st.layout.rotation)], dim=2)
        return keys, values

    def reset(self) -> None:
        super().reset()
        self._memo, self._memo_blocks = None, -1

    def _select(self, index):
        super()._select(index)
        self._memo, self._memo_blocks = None, -1

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._memo, self._memo_blocks = None, -1


@dataclass(frozen=True)
class Setting:
    """One cache configuration of the benchmark."""

    method: str  # "packkv" | "kivi"
    family: str = ""  # packkv: a key of FAMILIES
    k_rel: float = 0.0
    v_rel: float = 0.0
    rotate: bool = False  # packkv: Hadamard-rotated K/V
    k_bits: int = 0  # kivi
    v_bits: int = 0

    @property
    def id(self) -> str:
        if self.method == "kivi":
            return f"kivi/K{self.k_bits}V{self.v_bits}"
        return f"packkv{'+hadamard' if self.rotate else ''}/{self.family}/k{self.k_rel:g}_v{self.v_rel:g}"

    @property
    def label(self) -> str:
        """The family a point belongs to in plots and tables."""
        if self.method == "kivi":
            return "KIVI-style"
        return f"PackKV {self.family}{' +Hadamard' if self.rotate else ''}"

    def packkv_config(self, repack: str = "median") -> PackKVConfig:
        kg, vg = FAMILIES[self.family]
        return PackKVConfig(k_rel=self.k_rel, v_rel=self.v_rel, k_grouping=kg, v_grouping=vg, repack=repack,
                            rotation="hadamard" if self.rotate else "none")  # fmt: skip

    def kivi_config(self) -> KIVIConfig:
        return KIVIConfig(k_bits=self.k_bits, v_bits=self.v_bits)

    def make_cache(self, repack: str = "median", memo: bool = False):
        if self.method == "kivi":
            return KIVICache(self.kivi_config())
        cfg = self.packkv_config(repack)
        cache = PackKVCache(cfg)
        if memo:
            cache.layer_class_to_replicate = functools.partial(MemoPackKVLayer, cfg)
        return cache

    def describe(self) -> dict:
        d = {"id": self.id, "method": self.method, "label": self.label}
        if self.method == "kivi":
            d.update(k_bits=self.k_bits, v_bits=self.v_bits, group_size=32, residual=128)
        else:
            kg, vg = FAMILIES[self.family]
            d.update(family=self.family, k_grouping=kg, v_grouping=vg, k_rel=self.k_rel, v_rel=self.v_rel,
                     rotate=self.rotate)  # fmt: skip
        return d


_D = PackKVConfig()
assert (_D.k_grouping, _D.v_grouping) == FAMILIES["token"], "the default grouping is the 'token' family"
DEFAULT_SETTING = Setting("packkv", "token", _D.k_rel, _D.v_rel, rotate=_D.rotation == "hadamard")
assert PackKVConfig().k_grouping == "token" and PackKVConfig().repack == "median"


# ---------------------------------------------------------------------------------------------------------------
# Fidelity
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def prefill_from(cache, kv: list[tuple[torch.Tensor, torch.Tensor]]):
    """Hand ``cache`` the prefill K/V of every layer through ``cache.update``, as the model's prefill does."""
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


@torch.no_grad()
def continue_logits(model, ids: torch.Tensor, context: int, cache, first: torch.Tensor) -> torch.Tensor:
    """``teacher_forced_logits`` for a cache that already holds the prefill (``first``: the prefill's last logits).

    The continuation is ``teacher_forced_logits``' own: flush-aligned chunks for a cache whose layers expose
    ``n_win`` and ``config.window``/``config.block_size``, else one chunk.
    """
    count = ids.shape[1] - context - 1
    layer = cache.layers[0]
    if hasattr(layer, "n_win"):
        sizes = decode_chunks(layer.n_win, layer.config.window, layer.config.block_size, count)
    else:
        sizes = [count]
    out, pos = [first.float()], context
    for size in sizes:
        out.append(model(ids[:, pos : pos + size], past_key_values=cache).logits.float())
        pos += size
    return torch.cat(out, dim=1)


@dataclass
class Window:
    text: str
    start: int
    ids: torch.Tensor  # [1, context + follow]


@dataclass
class Reference:
    """The exact run of one window."""

    logits: torch.Tensor  # [1, follow, V] fp32
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer prefill K/V [1, H, context, D]
    nll: float  # mean NLL of the follow tokens


@torch.no_grad()
def exact_reference(model, w: Window, context: int) -> Reference:
    cache = DynamicCache(config=model.config)
    logits = teacher_forced_logits(model, w.ids, context, cache)
    kv = [(layer.keys[:, :, :context].clone(), layer.values[:, :, :context].clone()) for layer in cache.layers]
    return Reference(logits, kv, _nll(logits, w.ids[:, context:]))


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    lp = torch.log_softmax(logits[0].float(), -1)
    return float(-lp.gather(-1, targets[0, : lp.shape[0], None].to(lp.device)).mean())


def fidelity(ref: Reference, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    kl = kl_divergence(ref.logits[0], logits[0])
    nll = _nll(logits, targets)
    return {
        "kl": float(kl.mean()),
        "kl_max_token": float(kl.max()),
        "ppl_rise": math.exp(nll - ref.nll) - 1.0,
        "top1": float((ref.logits[0].argmax(-1) == logits[0].argmax(-1)).float().mean()),
    }


# ---------------------------------------------------------------------------------------------------------------
# Compression accounting
# ---------------------------------------------------------------------------------------------------------------
def packkv_bytes(cache: PackKVCache, paper: bool = True) -> Counter:
    """Per-stream bytes of every layer's storage (exact, fixed width, paper), summed over layers."""
    c = Counter()
    for layer in cache.layers:
        st = layer.storage
        c.update({k: float(v) for k, v in stream_bytes(st).items()})
        c.update({f"{k}_fixed": float(v) for k, v in fixed_width_stream_bytes(st).items()})
        if paper:
            c.update({f"paper_{k}": float(v) for k, v in paper_bytes(st).items()})
        lay = st.layout
        c["window_tokens"] += float(st.n_win.sum())
        c["fp16_window"] += float(st.n_win.sum()) * lay.num_heads * lay.head_dim * 2 * 2
        c["compressed_tokens"] += float(st.n_blocks.sum()) * lay.block_size
    return c


def kivi_bytes_of(cache: KIVICache) -> Counter:
    n = Counter({k: float(v) for k, v in cache.nbytes().items() if k not in ("window", "window_tokens")})
    n["fp16_window"] = sum(layer.nbytes()["window"] for layer in cache.layers)
    n["window_tokens"] = sum(layer.n_win for layer in cache.layers)
    n["compressed_tokens"] = sum(layer.n_quant for layer in cache.layers)
    return n


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


def ratios_from(b: Counter, stage: str) -> dict:
    """K, V and K+V ratios (every byte counted) of one stage from summed byte counters."""
    if stage == "quant_only":
        k, v = b["k_fixed"], b["v_fixed"]
    else:
        k, v = b["k_compressed"], b["v_compressed"]
    out = {
        "k": _ratio(b["k_fp16"], k),
        "v": _ratio(b["v_fp16"], v),
        "kv": _ratio(b["k_fp16"] + b["v_fp16"], k + v),
        # the exact window counted at fp16, as it would be held next to an fp16 model
        "kv_incl_window": _ratio(b["k_fp16"] + b["v_fp16"] + b["fp16_window"], k + v + b["fp16_window"]),
        "bits_per_element": {"k": 16 / _ratio(b["k_fp16"], k), "v": 16 / _ratio(b["v_fp16"], v)},
    }
    if stage != "quant_only" and "k_payload" in b:
        elems = {s: b[f"{s}_fp16"] / 2 for s in "kv"}
        parts = ("payload", "meta", "scale_zero", "offsets", "perm")
        out["bits_per_element_by_part"] = {
            s: {p: 8 * b[f"{s}_{p}"] / elems[s] for p in parts if f"{s}_{p}" in b} for s in "kv"
        }
    if "paper_k_fp16" in b:
        key = "quant_only" if stage == "quant_only" else "packed"
        pk, pv = b[f"paper_k_{key}"], b[f"paper_v_{key}"]
        out["paper"] = {
            "k": _ratio(b["paper_k_fp16"], pk),
            "v": _ratio(b["paper_v_fp16"], pv),
            "kv": _ratio(b["paper_k_fp16"] + b["paper_v_fp16"], pk + pv),
        }
    return out


# ---------------------------------------------------------------------------------------------------------------
# Statistics, frontier
# ---------------------------------------------------------------------------------------------------------------
def spread(xs: list[float]) -> dict:
    return {
        "mean": statistics.fmean(xs),
        "std": statistics.pstdev(xs) if len(xs) > 1 else 0.0,
        "min": min(xs),
        "max": max(xs),
        "per_window": xs,
    }


def points_of(results: list[dict]) -> list[dict]:
    """Every (setting, stage) as a point (K+V ratio every byte counted, mean KL over windows)."""
    pts = []
    for r in results:
        stages = ["kivi"] if r["method"] == "kivi" else [s for s in STAGES if s in r["ratios"]]
        for stage in stages:
            rat = r["ratios"][stage]
            pts.append({
                "id": r["id"], "label": r["label"], "method": r["method"], "stage": stage,
                "kv_ratio": rat["kv"], "k_ratio": rat["k"], "v_ratio": rat["v"], "windows": rat["windows"],
                "kl": r["fidelity"]["kl"]["mean"], "kl_max_window": r["fidelity"]["kl"]["max"],
                "ppl_rise": r["fidelity"]["ppl_rise"]["mean"], "top1": r["fidelity"]["top1"]["mean"],
            })  # fmt: skip
    return pts


def pareto(points: list[dict]) -> list[dict]:
    """Points not dominated (higher-or-equal ratio and lower-or-equal KL, one strictly), by increasing ratio."""
    front = [
        p for p in points
        if not any(q["kv_ratio"] >= p["kv_ratio"] and q["kl"] <= p["kl"]
                   and (q["kv_ratio"] > p["kv_ratio"] or q["kl"] < p["kl"]) for q in points)
    ]  # fmt: skip
    return sorted(front, key=lambda p: p["kv_ratio"])


def best_at(points: list[dict], kl_max: float) -> dict | None:
    ok = [p for p in points if p["kl"] <= kl_max]
    return max(ok, key=lambda p: p["kv_ratio"]) if ok else None


def frontier_ratio_at(front: list[dict], kl_max: float) -> float | None:
    """The frontier's K+V ratio at KL = ``kl_max``, interpolated linearly in (ratio, log KL) between the two
    frontier points that bracket it (None when the frontier does not reach below ``kl_max``)."""
    pts = sorted(front, key=lambda p: p["kv_ratio"])
    below = [p for p in pts if p["kl"] <= kl_max]
    if not below:
        return None
    lo = max(below, key=lambda p: p["kv_ratio"])
    above = [p for p in pts if p["kv_ratio"] > lo["kv_ratio"] and p["kl"] > kl_max]
    if not above or lo["kl"] <= 0:
        return lo["kv_ratio"]
    hi = min(above, key=lambda p: p["kv_ratio"])
    t = (math.log(kl_max) - math.log(lo["kl"])) / (math.log(hi["kl"]) - math.log(lo["kl"]))
    return lo["kv_ratio"] + t * (hi["kv_ratio"] - lo["kv_ratio"])


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------
def chat_parts(tok, question: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the passage of a prompt ``<passage>\\n\\n<question>`` in the chat template."""
    mark = "\u2063PASSAGE\u2063"
    content = f"Read the following passage.\n\n{mark}\n\n{question}"
    if getattr(tok, "chat_template", None):
        s = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    else:
        s = content + "\nAnswer:"
    pre, post = s.split(mark)
    enc = functools.partial(tok, add_special_tokens=False)
    return enc(pre).input_ids, enc(post).input_ids


def make_prompts(tok, text_ids: list[tuple[str, torch.Tensor]], n: int, passage_tokens: int) -> torch.Tensor:
    """``n`` prompts of one common length (no padding): excerpts spread over the texts, a question each."""
    parts = [chat_parts(tok, QUESTIONS[i % len(QUESTIONS)]) for i in range(n)]
    overhead = max(len(a) + len(b) for a, b in parts)
    total = passage_tokens + overhead
    rows = []
    for i, (pre, post) in enumerate(parts):
        _, ids = text_ids[i % len(text_ids)]
        m = total - len(pre) - len(post)
        slot = i // len(text_ids)
        per_text = math.ceil(n / len(text_ids))
        hi = ids.shape[1] - m
        if hi < 0:
            raise ValueError(f"a text has {ids.shape[1]} tokens, fewer than a {m}-token passage")
        start = int(hi * (0.07 + 0.86 * (slot + 0.5) / per_text))
        rows.append(pre + ids[0, start : start + m].tolist() + post)
    return torch.tensor(rows, dtype=torch.long)


def eos_ids(model, tok) -> set[int]:
    e = model.generation_config.eos_token_id
    e = e if e is not None else tok.eos_token_id
    return set(e if isinstance(e, (list, tuple)) else [e]) - {None}


def output_tokens(seq: torch.Tensor, eos: set[int]) -> list[int]:
    """Generated tokens up to and including the first eos."""
    out = []
    for t in seq.tolist():
        out.append(t)
        if t in eos:
            break
    return out


def compare_outputs(ref: list[int], out: list[int]) -> dict:
    n = max(len(ref), len(out))
    same = sum(a == b for a, b in zip(ref, out))
    div = next((i for i, (a, b) in enumerate(zip(ref, out)) if a != b), None)
    if div is None and len(ref) != len(out):
        div = min(len(ref), len(out))
    return {
        "len_exact": len(ref), "len": len(out), "len_change": len(out) - len(ref),
        "identical_fraction": same / n if n else 1.0, "first_divergence": div, "identical": ref == out,
    }  # fmt: skip


@torch.no_grad()
def generate(model, prompts: torch.Tensor, cache, new_tokens: int, eos: set[int], pad: int) -> list[list[int]]:
    out = model.generate(
        input_ids=prompts, attention_mask=torch.ones_like(prompts), past_key_values=cache, do_sample=False,
        max_new_tokens=new_tokens, eos_token_id=sorted(eos), pad_token_id=pad, top_p=None, top_k=None,
        temperature=None,
    )  # fmt: skip
    return [output_tokens(row, eos) for row in out[:, prompts.shape[1] :]]


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------
def parse_pairs(s: str) -> list[tuple[float, float]]:
    return [tuple(float(x) for x in p.split(":")) for p in s.split(",") if p]


def parse_bits(s: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in p.split(":")) for p in s.split(",") if p]


def build_settings(args) -> list[Setting]:
    settings = []
    rot_families = args.hadamard_families if args.hadamard else []
    for rotate, families in ((False, args.families), (True, rot_families)):
        grid = QUICK_GRID if args.quick else (HADAMARD_GRID if rotate else GRID)
        for fam in families:
            pairs = parse_pairs(args.pairs) if args.pairs else grid[fam]
            settings += [Setting("packkv", fam, k, v, rotate=rotate) for k, v in pairs]
    if not args.quick and not args.pairs and "token" in args.families and DEFAULT_SETTING not in settings:
        settings.append(DEFAULT_SETTING)
    bits = parse_bits(args.kivi) if args.kivi else (QUICK_KIVI_BITS if args.quick else KIVI_BITS)
    settings += [Setting("kivi", k_bits=k, v_bits=v) for k, v in bits]
    return list(dict.fromkeys(settings))


def windows_of(tok, texts: list[Path], n: int, length: int) -> tuple[list[Window], list[tuple[str, torch.Tensor]]]:
    wins, all_ids = [], []
    for path in texts:
        ids = tok(Path(path).read_text(encoding="utf-8"), return_tensors="pt").input_ids
        all_ids.append((Path(path).name, ids))
        hi = ids.shape[1] - length
        if hi < 0:
            raise ValueError(f"{path} has {ids.shape[1]} tokens; a window needs {length} (context + follow)")
        fracs = [0.5] if n == 1 else [0.05 + 0.9 * i / (n - 1) for i in range(n)]
        for f in fracs:
            s = int(hi * f)
            wins.append(Window(Path(path).name, s, ids[:, s : s + length]))
    return wins, all_ids


def run(args) -> dict:
    t0 = time.time()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    model, tok = real_model.load(args.model, device=device, dtype=dtype)
    texts = args.text or [real_model.DATA_DIR / t for t in real_model.TEXTS]
    if args.quick:
        args.windows = min(args.windows, 1)
        args.gen_prompts = min(args.gen_prompts, 2)
        args.gen_new_tokens = min(args.gen_new_tokens, 24)
    windows, text_ids = windows_of(tok, texts, args.windows, args.context + args.follow)
    for w in windows:
        w.ids = w.ids.to(device)
    settings = build_settings(args)
    greedy_windows = set(range(min(args.greedy_windows, len(windows))))
    if args.context <= PackKVConfig().window + PackKVConfig().block_size:
        raise ValueError("--context must exceed window + block_size (192) so that the prefill compresses blocks")

    per = {s: {"fid": [], "bytes": {}, "seconds": 0.0, "greedy_seconds": 0.0} for s in settings}
    exact_nll, t_exact = [], 0.0
    bar = tqdm(total=len(windows) * (len(settings) + 1), desc="fidelity + ratios", unit="run", dynamic_ncols=True)
    for wi, w in enumerate(windows):
        bar.set_postfix_str(f"{w.text}@{w.start} exact")
        t_ref = time.time()
        ref = exact_reference(model, w, args.context)
        t_exact += time.time() - t_ref
        exact_nll.append(ref.nll)
        bar.update(1)
        targets = w.ids[:, args.context :]
        for s in settings:
            bar.set_postfix_str(f"{w.text}@{w.start} {s.id}")
            t_set = time.time()
            if s.method == "kivi":
                cache = prefill_from(s.make_cache(), ref.kv)
                stage_bytes = {"kivi": kivi_bytes_of(cache)}
            else:
                cache = prefill_from(s.make_cache(repack="none"), ref.kv)
                b = packkv_bytes(cache)
                stage_bytes = {"quant_only": b, "packed": b}
                for stage in ("median", "greedy"):
                    if stage == "greedy" and wi not in greedy_windows:
                        continue
                    t_stage = time.time()
                    stage_bytes[stage] = packkv_bytes(prefill_from(s.make_cache(repack=STAGE_REPACK[stage]), ref.kv))
                    if stage == "greedy":
                        per[s]["greedy_seconds"] += time.time() - t_stage
            for stage, b in stage_bytes.items():
                per[s]["bytes"].setdefault(stage, []).append(b)
            logits = continue_logits(model, w.ids, args.context, cache, ref.logits[:, :1])
            per[s]["fid"].append(fidelity(ref, logits, targets))
            per[s]["seconds"] += time.time() - t_set
            del cache
            bar.update(1)
    bar.close()

    results = []
    for s in settings:
        fid = {k: spread([f[k] for f in per[s]["fid"]]) for k in per[s]["fid"][0]}
        ratios = {}
        for stage, blist in per[s]["bytes"].items():
            total = sum(blist, Counter())
            r = ratios_from(total, "packed" if stage == "kivi" else stage)
            r["windows"] = len(blist)
            r["kv_per_window"] = [ratios_from(b, "packed" if stage == "kivi" else stage)["kv"] for b in blist]
            ratios[stage] = r
        first = per[s]["bytes"][next(iter(per[s]["bytes"]))]
        layers = model.config.num_hidden_layers
        results.append({
            **s.describe(), "fidelity": fid, "ratios": ratios,
            "seconds": per[s]["seconds"], "greedy_seconds": per[s]["greedy_seconds"],
            "after_prefill": {  # per window, after the prefill of `context` tokens
                "exact_tokens": spread([b["window_tokens"] / layers for b in first]),
                "compressed_tokens": spread([b["compressed_tokens"] / layers for b in first]),
                "exact_window_fp16_bytes": spread([b["fp16_window"] for b in first]),
            },
        })  # fmt: skip

    out = summarize(results, args)
    out["meta"] = {
        "model": str(args.model or real_model.MODEL_NAME), "texts": [str(t) for t in texts],
        "context": args.context, "follow": args.follow,
        "windows": [{"text": w.text, "start": w.start} for w in windows], "greedy_windows": len(greedy_windows),
        "device": str(device), "dtype": args.dtype, "quick": args.quick, "hadamard": args.hadamard,
        "torch": torch.__version__, "python": platform.python_version(),
        "exact_ppl": spread([math.exp(x) for x in exact_nll]), "exact_seconds": t_exact,
        "kv_heads": model.config.num_key_value_heads, "layers": model.config.num_hidden_layers,
        "head_dim": _head_dim(model.config),
    }  # fmt: skip
    out["settings"] = results
    if args.gen_prompts > 0:
        t_gen = time.time()
        out["generation"] = run_generation(model, tok, text_ids, out, args, device)
        out["generation"]["seconds"] = time.time() - t_gen
    out["meta"]["runtime_s"] = time.time() - t0
    return out


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def summarize(results: list[dict], args) -> dict:
    pts = points_of(results)
    pk = [p for p in pts if p["method"] == "packkv"]
    pk_plain = [p for p in pk if "+hadamard" not in p["id"]]
    pk_rot = [p for p in pk if "+hadamard" in p["id"]]
    kv = [p for p in pts if p["method"] == "kivi"]
    # Stages whose ratio is measured on every window (greedy may be measured on fewer).
    n_win = max(p["windows"] for p in pts)
    full = [p for p in pk_plain if p["windows"] == n_win and p["stage"] != "quant_only"]
    full_rot = [p for p in pk_rot if p["windows"] == n_win and p["stage"] != "quant_only"]
    # "packkv": any configuration of the codec (rotation is a PackKVConfig option); the rest break it down.
    full_all = full + full_rot
    matched = {}
    for thr in THRESHOLDS:
        row = {
            "packkv": best_at(full_all, thr),
            "packkv_incl_greedy": best_at([p for p in pk if p["stage"] != "quant_only"], thr),
            "packkv_no_rotation": best_at(full, thr),
            "kivi": best_at(kv, thr),
            "packkv_frontier_interpolated": frontier_ratio_at(pareto(full_all), thr),
            "packkv_no_rotation_frontier_interpolated": frontier_ratio_at(pareto(full), thr),
            "kivi_frontier_interpolated": frontier_ratio_at(pareto(kv), thr),
        }
        if full_rot:
            row["packkv_hadamard"] = best_at(full_rot, thr)
            row["packkv_hadamard_frontier_interpolated"] = frontier_ratio_at(pareto(full_rot), thr)
        p, k = row["packkv"], row["kivi"]
        row["packkv_over_kivi"] = p["kv_ratio"] / k["kv_ratio"] if p and k else None
        pi, ki = row["packkv_frontier_interpolated"], row["kivi_frontier_interpolated"]
        row["packkv_over_kivi_interpolated"] = pi / ki if pi and ki else None
        matched[str(thr)] = row

    default = [p for p in full_all if p["id"] == DEFAULT_SETTING.id and p["stage"] == "median"]
    # The default's (grouping, bounds, rotation) against every other setting at the same repacking (median).
    front = pareto([p for p in full_all if p["stage"] == "median"])
    default_info = None
    if default:
        d = default[0]
        default_info = {
            "point": d,
            "kl_le_0.01": d["kl"] <= 0.01,
            "on_frontier": any(p["id"] == d["id"] for p in front),
            "frontier_at_median": front,
            "dominated_by": [f"{p['id']} ({p['stage']})" for p in full_all
                             if p["kv_ratio"] >= d["kv_ratio"] and p["kl"] <= d["kl"] and p is not d
                             and (p["kv_ratio"] > d["kv_ratio"] or p["kl"] < d["kl"])],
        }  # fmt: skip
    m1, m5 = matched["0.01"], matched["0.05"]
    goals = {
        "kl<=0.01: kv_ratio>=6": bool(m1["packkv"] and m1["packkv"]["kv_ratio"] >= 6),
        "kl<=0.01: >=1.5x KIVI-style": bool(m1["packkv_over_kivi"] and m1["packkv_over_kivi"] >= 1.5),
        "kl<=0.05: kv_ratio>=8": bool(m5["packkv"] and m5["packkv"]["kv_ratio"] >= 8),
        "default on the frontier at kl<=0.01": bool(default_info and default_info["kl_le_0.01"]
                                                   and default_info["on_frontier"]),
    }  # fmt: skip
    return {
        "frontier": {
            "packkv": pareto(full), "packkv_all_stages": pareto([p for p in pk_plain if p["stage"] != "quant_only"]),
            "packkv_hadamard": pareto(full_rot) if full_rot else [], "kivi": pareto(kv),
            "all_packkv": pareto(full_all),
        },
        "points": pts,
        "matched_fidelity": matched,
        "default_config": default_info,
        "goals": goals,
    }


def run_generation(model, tok, text_ids, out: dict, args, device) -> dict:
    """Greedy generation on chat prompts: exact cache vs the default, best-at-KL PackKV settings and KIVI-4."""
    prompts = make_prompts(tok, text_ids, args.gen_prompts, args.gen_prompt_tokens).to(device)
    eos = eos_ids(model, tok)
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else next(iter(eos))
    configs: dict[str, Setting] = {}
    if "token" in args.families:
        configs["packkv default"] = DEFAULT_SETTING
    by_id = {s.id: s for s in build_settings(args)}
    for thr in THRESHOLDS:
        for key, name in (("packkv", "packkv best"), ("packkv_hadamard", "packkv+hadamard best")):
            p = out["matched_fidelity"][str(thr)].get(key)
            if p and p["id"] in by_id and by_id[p["id"]] not in configs.values():
                configs[f"{name} kl<={thr}"] = by_id[p["id"]]
    kivi4 = Setting("kivi", k_bits=4, v_bits=4)
    if kivi4 in by_id.values():
        configs["kivi K4V4"] = kivi4
    bar = tqdm(total=len(configs) + 1, desc="generation", unit="config", dynamic_ncols=True)
    ref = generate(model, prompts, DynamicCache(config=model.config), args.gen_new_tokens, eos, pad)
    bar.update(1)
    res = {
        "prompts": args.gen_prompts, "prompt_tokens": prompts.shape[1], "max_new_tokens": args.gen_new_tokens,
        "exact_lengths": [len(r) for r in ref],
        "exact_ended_with_eos": [bool(r and r[-1] in eos) for r in ref],
        "exact_samples": [tok.decode(r, skip_special_tokens=True) for r in ref[:2]], "configs": {},
    }  # fmt: skip
    for name, s in configs.items():
        bar.set_postfix_str(name)
        outs = generate(model, prompts, s.make_cache(memo=True), args.gen_new_tokens, eos, pad)
        per = [compare_outputs(a, b) for a, b in zip(ref, outs)]
        changes = [p["len_change"] for p in per]
        res["configs"][name] = {
            "setting": s.id,
            "per_sample": per,
            "len_change": spread([float(c) for c in changes]),
            "len_change_abs_mean": statistics.fmean(abs(c) for c in changes),
            "identical_fraction": spread([p["identical_fraction"] for p in per]),
            "identical_samples": sum(p["identical"] for p in per),
            "first_divergence": [p["first_divergence"] for p in per],
            "samples": [tok.decode(r, skip_special_tokens=True) for r in outs[:2]],
        }
        bar.update(1)
    bar.close()
    return res


# ---------------------------------------------------------------------------------------------------------------
# Output: tables and plots
# ---------------------------------------------------------------------------------------------------------------
def fmt_point(p: dict | None) -> str:
    if not p:
        return "none"
    return f"{p['kv_ratio']:.2f}x (KL {p['kl']:.4f}; {p['id']} [{p['stage']}])"


def print_tables(out: dict) -> None:
    print("\n== Fidelity and K+V ratio (every byte counted, exact window excluded) per setting ==")
    hdr = f"{'setting':44s} {'KL mean':>8s} {'[min,max]':>17s} {'ppl+%':>7s} {'top1':>6s} | " + " ".join(
        f"{s:>10s}" for s in (*STAGES, "paper(med)")
    )
    print(hdr)
    for r in out["settings"]:
        f = r["fidelity"]
        rats = r["ratios"]
        cells = []
        for st in STAGES:
            cells.append(f"{rats[st]['kv']:10.2f}" if st in rats else f"{'':10s}")
        if r["method"] == "kivi":
            cells = [f"{'':10s}", f"{rats['kivi']['kv']:10.2f}", f"{'':10s}", f"{'':10s}"]
        pap = rats.get("median", {}).get("paper", {}).get("kv")
        cells.append(f"{pap:10.2f}" if pap else f"{'':10s}")
        print(
            f"{r['id']:44s} {f['kl']['mean']:8.4f} [{f['kl']['min']:.4f},{f['kl']['max']:.4f}] "
            f"{100 * f['ppl_rise']['mean']:7.2f} {f['top1']['mean']:6.3f} | " + " ".join(cells)
        )
    print("\n== K and V separately (median stage; KIVI: its fixed bits) ==")
    for r in out["settings"]:
        st = "kivi" if r["method"] == "kivi" else "median"
        rr = r["ratios"][st]
        bits = rr["bits_per_element"]
        print(f"{r['id']:44s} K {rr['k']:6.2f}x ({bits['k']:.2f} b/elem)   V {rr['v']:6.2f}x ({bits['v']:.2f} b/elem)"
              f"   incl. window {rr['kv_incl_window']:.2f}x")  # fmt: skip
    print("\n== Best K+V ratio at matched fidelity (mean KL over windows) ==")
    for thr, row in out["matched_fidelity"].items():
        print(f"KL <= {thr}:")
        print(f"   PackKV      {fmt_point(row['packkv'])}  frontier-interpolated "
              f"{_f(row['packkv_frontier_interpolated'])}")  # fmt: skip
        print(f"   (+greedy)   {fmt_point(row['packkv_incl_greedy'])}")
        if "packkv_no_rotation" in row:
            print(f"   no rotation {fmt_point(row['packkv_no_rotation'])}  frontier-interpolated "
                  f"{_f(row['packkv_no_rotation_frontier_interpolated'])}")  # fmt: skip
        if "packkv_hadamard" in row:
            print(f"   Hadamard    {fmt_point(row['packkv_hadamard'])}  frontier-interpolated "
                  f"{_f(row['packkv_hadamard_frontier_interpolated'])}")  # fmt: skip
        print(f"   KIVI-style  {fmt_point(row['kivi'])}  frontier-interpolated {_f(row['kivi_frontier_interpolated'])}")
        print(f"   PackKV / KIVI-style: {_f(row['packkv_over_kivi'])} (grid points), "
              f"{_f(row['packkv_over_kivi_interpolated'])} (interpolated frontiers)")  # fmt: skip
    print("\n== PackKV frontier, no rotation ==")
    for p in out["frontier"]["packkv"]:
        print(f"   {p['kv_ratio']:6.2f}x  KL {p['kl']:.4f}  {p['id']} [{p['stage']}]")
    if out["frontier"]["packkv_hadamard"]:
        print("== PackKV + Hadamard frontier ==")
        for p in out["frontier"]["packkv_hadamard"]:
            print(f"   {p['kv_ratio']:6.2f}x  KL {p['kl']:.4f}  {p['id']} [{p['stage']}]")
    print("== KIVI-style frontier ==")
    for p in out["frontier"]["kivi"]:
        print(f"   {p['kv_ratio']:6.2f}x  KL {p['kl']:.4f}  {p['id']}")
    d = out.get("default_config")
    if d:
        print(f"\nDefault PackKVConfig(): {fmt_point(d['point'])}; KL<=0.01: {d['kl_le_0.01']}; "
              f"on frontier: {d['on_frontier']}; dominated by: {d['dominated_by'][:4]}")  # fmt: skip
    print("\n== Goals ==")
    for k, v in out["goals"].items():
        print(f"   {'MET ' if v else 'MISS'}  {k}")
    g = out.get("generation")
    if g:
        print(f"\n== Generation ({g['prompts']} prompts of {g['prompt_tokens']} tokens, greedy, <= "
              f"{g['max_new_tokens']} new tokens; exact lengths {g['exact_lengths']}) ==")  # fmt: skip
        for name, c in g["configs"].items():
            print(f"   {name:34s} {c['setting']:40s} identical samples {c['identical_samples']}/{g['prompts']}  "
                  f"identical-token fraction {c['identical_fraction']['mean']:.2f} "
                  f"[{c['identical_fraction']['min']:.2f},{c['identical_fraction']['max']:.2f}]  "
                  f"length change {[p['len_change'] for p in c['per_sample']]}  "
                  f"first divergence {c['first_divergence']}")  # fmt: skip
    print(f"\nruntime {out['meta']['runtime_s']:.0f} s")


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def plot(out: dict, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    pts = out["points"]
    m_greedy = out["meta"].get("greedy_windows", "?")
    fig, ax = plt.subplots(figsize=(9, 6))
    labels = sorted({p["label"] for p in pts}, key=lambda s: (s.startswith("KIVI"), s))
    colors = dict(zip(labels, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    markers = {"quant_only": "x", "packed": "s", "median": "o", "greedy": "^", "kivi": "D"}
    for label in labels:
        for stage, mk in markers.items():
            sel = [p for p in pts if p["label"] == label and p["stage"] == stage]
            if not sel:
                continue
            ax.scatter([p["kv_ratio"] for p in sel], [max(p["kl"], 1e-6) for p in sel], marker=mk,
                       color=colors[label], alpha=0.45 if stage in ("quant_only", "packed") else 0.9,
                       facecolors="none" if stage == "greedy" else None, s=36,
                       label=f"{label} [{stage}]" if stage in ("median", "kivi") else None)  # fmt: skip
        med = sorted((p for p in pts if p["label"] == label and p["stage"] in ("median", "kivi")),
                     key=lambda p: p["kv_ratio"])  # fmt: skip
        ax.plot([p["kv_ratio"] for p in med], [max(p["kl"], 1e-6) for p in med], color=colors[label], lw=0.8)
    names = {"packkv": "PackKV (no rotation)", "packkv_hadamard": "PackKV +Hadamard", "kivi": "KIVI-style"}
    for key, style in (("packkv", "k--"), ("packkv_hadamard", "g--"), ("kivi", "k:")):
        f = out["frontier"].get(key)
        if f:
            ax.plot([p["kv_ratio"] for p in f], [max(p["kl"], 1e-6) for p in f], style, lw=1.2,
                    label=f"frontier {names[key]} (all windows)")  # fmt: skip
    for stage, mk in markers.items():  # marker legend for the stages
        if stage != "kivi":
            ax.scatter([], [], marker=mk, color="gray", facecolors="none" if stage == "greedy" else None,
                       label=f"stage: {stage}" + (f" ({m_greedy} window)" if stage == "greedy" else ""))  # fmt: skip
    d = out.get("default_config")
    if d:
        ax.scatter([d["point"]["kv_ratio"]], [d["point"]["kl"]], s=160, facecolors="none", edgecolors="red",
                   lw=1.5, label="PackKVConfig() default")  # fmt: skip
    for thr in THRESHOLDS:
        ax.axhline(thr, color="gray", lw=0.6, ls="-.")
    ax.set_yscale("log")
    ax.set_xlabel("K+V compression ratio, every byte counted (fp16 bytes / bytes held; exact window excluded)")
    ax.set_ylabel("KL(exact || cache) of the next token, nats/token (mean over windows)")
    m = out["meta"]
    ax.set_title(f"{Path(m['model']).name}: context {m['context']}, follow {m['follow']}, {len(m['windows'])} windows")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(folder / "frontier.png", dpi=130)
    plt.close(fig)
    written.append("frontier.png")

    # Stages: K and V ratio per stage at each family's bounds nearest the default, exact and paper accounting.
    rows = [r for r in out["settings"] if r["method"] == "packkv"]
    chosen = {}
    for r in rows:
        key = r["label"]
        dist = abs(math.log(r["k_rel"] / 0.1)) + abs(math.log(r["v_rel"] / 0.2))
        if key not in chosen or dist < chosen[key][0]:
            chosen[key] = (dist, r)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    width = 0.8 / len(STAGES)
    for ax, stream in zip(axes, "kv"):
        names = list(chosen)
        for j, stage in enumerate(STAGES):
            vals = [chosen[n][1]["ratios"].get(stage, {}).get(stream, float("nan")) for n in names]
            ax.bar([i + j * width for i in range(len(names))], vals, width, label=stage)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
        ax.set_xticklabels([f"{n.replace('PackKV ', '').replace(' +', chr(10) + '+')}\nk{chosen[n][1]['k_rel']:g} "
                            f"v{chosen[n][1]['v_rel']:g}" for n in names], fontsize=7)  # fmt: skip
        ax.set_title(f"{stream.upper()} ratio by stage, every byte counted (greedy: {m_greedy} window)", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("fp16 bytes / bytes held")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "stages.png", dpi=130)
    plt.close(fig)
    written.append("stages.png")

    g = out.get("generation")
    if g and g["configs"]:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        names = list(g["configs"])
        for ax, key, title in ((axes[0], "len_change", "output length change vs exact cache (tokens)"),
                               (axes[1], "first_divergence", "first divergent token (None: identical = max)")):
            vals = [[(p[key] if p[key] is not None else g["max_new_tokens"]) for p in g["configs"][n]["per_sample"]]
                    for n in names]  # fmt: skip
            ax.boxplot(vals)
            for i, v in enumerate(vals):
                jitter = [i + 1 + 0.08 * ((j % 5) - 2) for j in range(len(v))]
                ax.scatter(jitter, v, s=12, alpha=0.6, color="C0")
            ax.set_title(title, fontsize=10)
        for ax in axes:
            ax.set_xticks(range(1, len(names) + 1))
            ax.set_xticklabels([n.replace(" kl", "\nkl") for n in names], fontsize=7)
            ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / "generation.png", dpi=130)
        plt.close(fig)
        written.append("generation.png")
    return written


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="local Hugging Face folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--text", nargs="+", type=Path, default=None, help="plain-text files (default: the two novels)")
    p.add_argument("--context", type=int, default=1024, help="prefill tokens per window (default 1024)")
    p.add_argument("--follow", type=int, default=256, help="teacher-forced tokens after the prefill (default 256)")
    p.add_argument("--windows", type=int, default=3, help="evaluation windows per text, spread over it (default 3)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--quick", action="store_true", help="tiny grid, one window per text, short generation (CI)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--pairs", default=None, help="k_rel:v_rel pairs for every family, e.g. 0.05:0.1,0.1:0.2")
    p.add_argument("--kivi", default=None, help="KIVI-style k_bits:v_bits, e.g. 4:4,2:2 (default 4:4,4:3,4:2,3:3,2:2)")
    p.add_argument("--hadamard", action="store_true", help="also evaluate PackKV on Hadamard-rotated K/V")
    p.add_argument("--hadamard-families", nargs="+", default=["token", "token_head"], choices=list(FAMILIES))
    p.add_argument("--greedy-windows", type=int, default=1,
                   help="windows on which the greedy repacking stage (slow on the CPU reference) is measured "
                        "(default 1)")  # fmt: skip
    p.add_argument("--gen-prompts", type=int, default=8, help="generation prompts (0: skip generation; default 8)")
    p.add_argument("--gen-prompt-tokens", type=int, default=500, help="passage tokens per prompt (default 500)")
    p.add_argument("--gen-new-tokens", type=int, default=96, help="max new tokens, greedy (default 96)")
    p.add_argument("--from-json", type=Path, default=None, help="re-render the tables and plots of an accuracy.json")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    if args.from_json:  # re-render tables and plots of a finished run
        out = json.loads(args.from_json.read_text())
        out.update(summarize(out["settings"], args))
    else:
        out = run(args)
        out["meta"]["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        out["meta"]["args"]["text"] = [str(t) for t in (args.text or [])]
    args.out.mkdir(parents=True, exist_ok=True)
    out["meta"]["plots"] = plot(out, args.out)
    (args.out / "accuracy.json").write_text(json.dumps(out, indent=1, default=_json_default))
    print_tables(out)
    print(f"wrote {args.out / 'accuracy.json'} and {', '.join(out['meta']['plots'])}")
    return out


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    raise TypeError(type(o))


if __name__ == "__main__":
    main()
