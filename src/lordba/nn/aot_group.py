"""One call for the q4 layers that read the same input, in an exported decode step.

A transformer block's q/k/v projections read one input, and so do its gate/up projections. Exported,
each is its own ``lordba::q4_linear`` (or ``lordba::q4_branch``, with its LoRDBA adapter) call: seven a
block on Llama-shaped models, 210 a token on SmolLM2-135M, each with its own parallel loop, input
preparation and call. :func:`group_siblings` rewrites the exported graph so that the layers sharing an
input and their settings become one ``lordba::q4_group`` call (their rows in one parallel loop, the
input prepared once, every adapter's branch added to its own rows), whose output is sliced back into
the layers' outputs: four calls a block instead of seven. The values are the same, bit for bit (the op
computes each row as the separate call does: ``tests/kernels/cpu/test_q4_group.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

# arguments that keep a layer's call on its own where set (a bias inside the op, kept prefill factors)
_UNGROUPED_IF_SET = ("bias", "folded_A", "folded_B", "tile_A")
_SETTINGS = ("in_features", "gemm_min_tokens", "bits", "bf16", "int8_dot")
_ADAPTER = ("sign_A", "sign_B", "b", "m", "a", "scaling")


def _arguments(node: fx.Node) -> dict[str, Any]:
    """The call's arguments by name, defaults filled in (the op's schema)."""
    schema = node.target._schema  # type: ignore[union-attr]
    named = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            named[arg.name] = node.args[i]
        else:
            named[arg.name] = node.kwargs.get(arg.name, arg.default_value if arg.has_default_value() else None)
    return named


def _group_key(node: fx.Node, ops: dict) -> tuple | None:
    """What a layer's call must share with another to join its group (its input, kind and settings, the
    weight's number of groups), or None where it stays alone."""
    if node.op != "call_function" or node.target not in ops:
        return None
    args = _arguments(node)
    if any(args.get(name) is not None for name in _UNGROUPED_IF_SET):
        return None
    scale = args["scale"]
    if not isinstance(scale, fx.Node) or "val" not in scale.meta:
        return None
    settings = tuple(args[name] for name in _SETTINGS)
    return (ops[node.target], args["x"], tuple(scale.meta["val"].shape[1:]), settings, args.get("sign_max_tokens"))


def _replace(graph: fx.Graph, members: list[fx.Node]) -> None:
    """``members`` (one key's calls, in graph order) as one ``q4_group`` call and a slice per member."""
    args = [_arguments(n) for n in members]
    adapted = members[0].target == torch.ops.lordba.q4_branch.default
    first = args[0]
    lists = [[a[name] for a in args] for name in ("qweight", "scale", "minus")]
    adapter = [[a[name] for a in args] if adapted else [] for name in _ADAPTER]
    smt = first["sign_max_tokens"] if adapted else 0
    x = first["x"]
    x_val = x.meta["val"]
    outs = [int(n.meta["val"].shape[-1]) for n in members]
    with graph.inserting_before(members[0]):
        group = graph.call_function(
            torch.ops.lordba.q4_group.default, (x, *lists, *(first[n] for n in _SETTINGS), *adapter, smt)
        )
        group.meta.update({k: v for k, v in members[0].meta.items() if k != "val"})
        group.meta["val"] = x_val.new_empty((*x_val.shape[:-1], sum(outs)))
        dim, start = x_val.dim() - 1, 0
        for node, out in zip(members, outs):
            part = graph.call_function(torch.ops.aten.slice.Tensor, (group, dim, start, start + out))
            part.meta.update({k: v for k, v in node.meta.items() if k != "val"})
            part.meta["val"] = group.meta["val"].narrow(dim, start, out)
            node.replace_all_uses_with(part)
            start += out
    for node in members:
        graph.erase_node(node)


def _defined_before(members: list[fx.Node], order: dict[fx.Node, int]) -> bool:
    """Whether every member's arguments exist before the first member (where the group's call goes)."""
    first = order[members[0]]
    found: list[fx.Node] = []
    for node in members:
        fx.node.map_arg((node.args, node.kwargs), found.append)
    return all(order[n] < first for n in found)


def group_siblings(program: Any) -> int:
    """Rewrite ``program`` (a ``torch.export.ExportedProgram``) in place: every two or more q4 layer calls
    that read the same input with the same settings (all plain, or all with an adapter; no bias) become
    one ``lordba::q4_group`` call. Returns the number of grouped calls made (0 where the kernels' library
    has no ``q4_group``: an older build)."""
    lordba = torch.ops.lordba
    if not hasattr(lordba, "q4_group"):
        return 0
    ops = {lordba.q4_linear.default: "plain", lordba.q4_branch.default: "adapted"}
    graph = program.graph_module.graph
    groups: dict[tuple, list[fx.Node]] = {}
    for node in graph.nodes:
        key = _group_key(node, ops)
        if key is not None:
            groups.setdefault(key, []).append(node)
    order = {node: i for i, node in enumerate(graph.nodes)}
    made = 0
    for members in groups.values():
        if len(members) > 1 and _defined_before(members, order):
            _replace(graph, members)
            made += 1
    if made:
        graph.lint()
        program.graph_module.recompile()
    return made
