"""Weights a target runtime needs as plain stored constants, and why.

Some runtimes compile an op only when certain inputs are constants once the model is loaded:
OpenVINO's CPU plugin runs LSTM/GRU/RNN only with W, R and B constant (graphpass.runtimes
declares each runtime's needs). A lookup that rebuilds such a weight at load time, or a
Transpose/Mul a tie inserts, breaks that, so every pass that replaces a weight by computed
values asks `WeightRef.pinned` first; a plain stored tensor (an exact tie) is still fine.

A needed input is followed back through the ops every runtime folds when their inputs are
constants (Unsqueeze, Reshape, Concat...), since exporters often reshape weights on the way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx

from graphpass.scopes import iter_nodes

# Ops between a stored weight and the op that needs it that leave a constant constant.
FOLDED_OPS = frozenset({"Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Transpose", "Cast",
                        "Concat", "Split", "Slice", "Expand"})


def pinned_values(proto: onnx.ModelProto, needs: Mapping[str, Sequence]) -> dict[str, str]:
    """Value name -> reason, for every value (weights among them) that `needs` (op type ->
    rules with `indices` and `reason`, from graphpass.runtimes.required_constants) asks to
    stay a constant, directly or through FOLDED_OPS."""
    if not needs:
        return {}
    producers = {}
    wanted: list[tuple[str, str]] = []
    for body in [proto.graph, *proto.functions]:
        for node in iter_nodes(body):
            for output in node.output:
                producers[output] = node
            for rule in needs.get(node.op_type, ()):
                wanted += [(node.input[i], rule.reason) for i in rule.indices if i < len(node.input) and node.input[i]]
    pinned: dict[str, str] = {}
    for start, reason in wanted:
        frontier = [start]
        while frontier:
            name = frontier.pop()
            if name in pinned:
                continue
            pinned[name] = reason
            producer = producers.get(name)
            if producer is not None and producer.op_type in FOLDED_OPS:
                frontier += [value for value in producer.input if value]
    return pinned
