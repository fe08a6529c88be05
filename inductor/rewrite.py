"""FX rewrite: ``scaled_dot_product_attention`` over K/V from ``packkv.decompress`` becomes ``packkv.attention``.

Works on Dynamo (torch-level) graphs. A match is an SDPA call whose key and value are the two outputs of one
``decompress`` node, either directly (``enable_gqa=True`` or no GQA) or through transformers' ``repeat_kv``
(``x[:, :, None, :, :].expand(b, h, n_rep, l, d).reshape(b, h * n_rep, l, d)``). The fused op computes exactly
what the SDPA computed (same mask, ``is_causal``, scale; the decompressed tensors' zero tail included), so the
rewrite never changes results beyond float rounding. Anything else is left untouched and logged at debug level.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.nn.functional as F
from torch import fx

log = logging.getLogger(__name__)

SDPA_TARGETS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
N_STORAGE = 15  # storage tensors at the head of decompress/attention (packkv.ops.STORAGE_FIELDS)


def _is_decompress(node) -> bool:
    # Dynamo records the op packet (torch.ops.packkv.decompress), later stages the overload (.default).
    op = torch.ops.packkv.decompress
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in (op, op.default)


def _is_method(node: fx.Node, *names: str) -> bool:
    return node.op == "call_method" and node.target in names


def _repeat_kv_source(node: fx.Node) -> tuple[fx.Node, int] | None:
    """If ``node`` is transformers' repeat_kv of some x, return (x, n_rep)."""
    if not (_is_method(node, "reshape", "view") and isinstance(node.args[0], fx.Node)):
        return None
    expand = node.args[0]
    if not (_is_method(expand, "expand") and isinstance(expand.args[0], fx.Node)):
        return None
    index = expand.args[0]
    if not (index.op == "call_function" and index.target is operator.getitem):
        return None
    src, idx = index.args
    full = slice(None, None, None)
    if not (isinstance(idx, tuple) and len(idx) == 5 and idx[2] is None and all(i == full for i in idx[:2] + idx[3:])):
        return None
    x = src.meta.get("example_value")
    y = node.meta.get("example_value")
    sizes = expand.args[1:] if len(expand.args) > 2 else expand.args[1]
    if x is None or y is None or x.dim() != 4 or len(sizes) != 5:
        return None
    b, h, length, d = x.shape
    n_rep = sizes[2]
    if not isinstance(n_rep, int) or tuple(y.shape) != (b, h * n_rep, length, d):
        return None
    return src, n_rep


def _decompress_output(node: fx.Node) -> tuple[fx.Node, int, int] | None:
    """(decompress node, output index 0/1, n_rep) that ``node`` is, possibly through repeat_kv / contiguous."""
    n_rep = 1
    while _is_method(node, "contiguous") and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    rep = _repeat_kv_source(node)
    if rep is not None:
        node, n_rep = rep
    if node.op == "call_function" and node.target is operator.getitem:
        src, i = node.args
        if _is_decompress(src) and i in (0, 1):
            return src, i, n_rep
    return None


def rewrite_attention(gm: fx.GraphModule) -> int:
    """Replace every matching SDPA in ``gm`` by ``packkv.attention``; returns how many were replaced."""
    replaced = 0
    orphans: list[fx.Node] = []
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target in SDPA_TARGETS):
            continue
        a = dict(zip(SDPA_ARGS, node.args))
        a.update(node.kwargs)
        k = _decompress_output(a["key"]) if isinstance(a.get("key"), fx.Node) else None
        v = _decompress_output(a["value"]) if isinstance(a.get("value"), fx.Node) else None
        why = None
        if k is None or v is None:
            why = "key/value are not outputs of packkv.decompress"
        elif k[0] is not v[0] or (k[1], v[1]) != (0, 1) or k[2] != v[2]:
            why = "key and value come from different decompress calls or repeat differently"
        elif a.get("dropout_p", 0.0) not in (0, 0.0):
            why = "dropout"
        elif not isinstance(a.get("is_causal", False), bool) or not isinstance(a.get("scale"), (float, int, type(None))):
            why = "non-constant is_causal/scale"
        if why is not None:
            log.debug("packkv rewrite: leaving %s alone (%s)", node.format_node(), why)
            continue
        dec = k[0]
        q = a["query"]
        qv, kv = q.meta.get("example_value"), dec.meta.get("example_value")
        if qv is None or kv is None or qv.shape[1] % kv[0].shape[1]:
            log.debug("packkv rewrite: leaving %s alone (head counts)", node.format_node())
            continue
        storage, out_len, spec = dec.args[:N_STORAGE], dec.args[N_STORAGE], dec.args[N_STORAGE + 1 :]
        scale = a.get("scale")
        args = (q, *storage, out_len, a.get("attn_mask"), a.get("is_causal", False),
                float(scale) if scale is not None else None, *spec)  # fmt: skip
        with gm.graph.inserting_before(node):
            fused = gm.graph.call_function(torch.ops.packkv.attention.default, args)
        fused.meta.update(node.meta)
        node.replace_all_uses_with(fused)
        orphans += [a["key"], a["value"]]
        gm.graph.erase_node(node)
        replaced += 1
    if replaced:
        _erase_unused(gm.graph, orphans)
        gm.graph.lint()
        gm.recompile()
    return replaced


def _is_op(node, packet) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in (packet, packet.default)


def snapshot_foreign_reads(gm: fx.GraphModule) -> int:
    """Give every node that reads a storage tensor of a PackKV append (directly or through ``getitem`` views) and is
    not itself a PackKV op a ``packkv.snapshot`` of that tensor, taken where the tensor enters the graph; returns
    how many tensors were snapshotted.

    Why: the append updates the storage in place (Inductor reinplaces it into the graph input), and Inductor
    inlines such reads (a step's positions and mask from the device counters, ``get_seq_length``) into whichever
    later kernel uses them, after the update: seen on the CPU with torch 2.13, the second layer's positions one
    token ahead, with the append fused (``append_attention_``) and with it alone in a graph traced for autograd;
    the inference graph with ``append_`` alone happened to copy the counters. A snapshot is an opaque op, so it
    runs where it stands and later kernels read its copy. A step called the way ``generate`` calls it (with
    ``cache_position``) still reads the counters for its mask's offset."""
    packkv_ops = (torch.ops.packkv.append_, torch.ops.packkv.attention, torch.ops.packkv.append_attention_,
                  torch.ops.packkv.decompress, torch.ops.packkv.snapshot)  # fmt: skip
    storage: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if _is_op(n, torch.ops.packkv.append_):
            storage.update(a for a in n.args[:N_STORAGE] if isinstance(a, fx.Node))
        elif _is_op(n, torch.ops.packkv.append_attention_):
            storage.update(a for a in n.args[1 : 1 + N_STORAGE] if isinstance(a, fx.Node))
    if not storage:
        return 0
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]

    def is_view(n: fx.Node) -> bool:
        return n.op == "call_function" and n.target is operator.getitem

    def foreign_under(node: fx.Node) -> bool:
        return any(foreign_under(u) if is_view(u) else not any(_is_op(u, op) for op in packkv_ops) for u in node.users)

    def redirect(node: fx.Node, mirror: fx.Node) -> None:
        """Point the foreign readers under ``node`` at ``mirror``, the same view of the snapshot."""
        for user in list(node.users):
            if is_view(user):
                if foreign_under(user):
                    with gm.graph.inserting_after(mirror):
                        view = gm.graph.call_function(operator.getitem, (mirror, user.args[1]))
                    redirect(user, view)
            elif not any(_is_op(user, op) for op in packkv_ops):
                user.replace_input_with(node, mirror)

    done = 0
    for t in sorted(storage, key=lambda n: n.name):
        if foreign_under(t):
            with gm.graph.inserting_after(inputs[-1] if t.op == "placeholder" else t):  # before any reader
                snap = gm.graph.call_function(torch.ops.packkv.snapshot.default, (t,))
            redirect(t, snap)
            done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


def fuse_decode_appends(gm: fx.GraphModule) -> int:
    """Fuse each decode step's ``append_`` (one token, no block to compress) with the ``attention`` over the same
    layer that follows it into ``append_attention_``; returns how many were fused.

    The pattern is the step plan's (``models/step_plan.py``): ``append_(pool, *stacks, k, v, 0, *spec, slot)``, then
    ``attention(q, pool, stacks[0][slot], ..., stacks[13][slot], ...)``. The append moves to the attention's place:
    only the attention read the storage in between (its decompress, which the SDPA rewrite removed), which is
    checked: any other user of the pool or the stacks between the two leaves the pair alone.

    Where the graph reads the storage outside PackKV's ops (a step's positions and mask from the device counters),
    the backend gives those reads a snapshot (``snapshot_foreign_reads``), so the in-place update cannot reach
    them."""
    appends = {}
    fused = 0
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        if _is_op(node, torch.ops.packkv.append_):
            a = node.args
            if len(a) >= N_STORAGE + 3 + 7 + 1 and a[N_STORAGE + 2] == 0 and isinstance(a[-1], int) and a[-1] >= 0:
                appends[(a[0], a[-1])] = node
            continue
        if not _is_op(node, torch.ops.packkv.attention):
            continue
        q, pool, views = node.args[0], node.args[1], node.args[2 : 1 + N_STORAGE]
        if not all(isinstance(v, fx.Node) and v.op == "call_function" and v.target is operator.getitem for v in views):
            continue
        slots = {v.args[1] for v in views}
        if len(slots) != 1:
            continue
        slot = slots.pop()
        app = appends.get((pool, slot))
        if app is None:
            continue
        stacks = app.args[1:N_STORAGE]
        new_k, new_v = app.args[N_STORAGE], app.args[N_STORAGE + 1]
        spec = app.args[N_STORAGE + 3 : -1]
        kv = new_k.meta.get("example_value") if isinstance(new_k, fx.Node) else None
        why = None
        if tuple(v.args[0] for v in views) != tuple(stacks):
            why = "the attention reads other storage than the append wrote"
        elif kv is None or kv.dim() != 4 or kv.shape[2] != 1:
            why = "not a one-token append"
        elif tuple(spec) != tuple(node.args[N_STORAGE + 5 :]):
            why = "the two layouts differ"
        else:
            between = [n for n in gm.graph.nodes if order[app] < order.get(n, -1) < order[node]]
            touched = {pool, *stacks}
            if any(set(n.all_input_nodes) & touched and n not in views for n in between):
                why = "something else reads or writes the storage in between"
        if why is not None:
            log.debug("packkv rewrite: append %s and attention %s not fused (%s)", app.name, node.name, why)
            continue
        out_len, mask, is_causal, scale = node.args[1 + N_STORAGE : 5 + N_STORAGE]
        args = (q, pool, *stacks, new_k, new_v, out_len, mask, is_causal, scale, *spec, slot)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.packkv.append_attention_.default, args)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        gm.graph.erase_node(app)
        del appends[(pool, slot)]
        for v in views:
            if not v.users:
                gm.graph.erase_node(v)
        fused += 1
    if fused:
        gm.graph.lint()
        gm.recompile()
    return fused


def _erase_unused(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erase the now unused views of the decompressed K/V and the decompress calls themselves.

    Only these: ``graph.eliminate_dead_code`` would also drop ``packkv.append_`` (it mutates the cache and
    returns nothing), which torch 2.11 does not recognise as side-effecting when it is recorded as an op packet.
    """
    todo, gone = list(nodes), set()
    while todo:
        n = todo.pop()
        if n in gone or n.users:
            continue
        view = n.op == "call_function" and n.target is operator.getitem
        if not (view or _is_decompress(n) or _is_method(n, "expand", "reshape", "view", "contiguous")):
            continue
        parents = list(n.all_input_nodes)
        graph.erase_node(n)
        gone.add(n)
        todo += parents
