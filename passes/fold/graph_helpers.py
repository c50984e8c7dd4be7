"""Graph helpers for the rewrite: topological order with position hints, value_info pruning, copies."""

from __future__ import annotations

from heapq import heapify, heappop, heappush

import onnx

from graphpass.blocks import node_reads


def topological_order(nodes: list[tuple[int, onnx.NodeProto]], available: set[str]) -> list[onnx.NodeProto]:
    """Nodes in an order where each comes after what it reads; ties keep the position hint,
    so an already sorted graph comes out unchanged apart from the new nodes."""
    producer = {name: i for i, (_, node) in enumerate(nodes) for name in node.output if name}
    waiting = [0] * len(nodes)
    readers: list[list[int]] = [[] for _ in nodes]
    for i, (_, node) in enumerate(nodes):
        for name in set(node_reads(node)) - available:
            if name in producer and producer[name] != i:
                waiting[i] += 1
                readers[producer[name]].append(i)
    ready = [(hint, i) for i, (hint, _) in enumerate(nodes) if waiting[i] == 0]
    heapify(ready)
    ordered = []
    while ready:
        _, i = heappop(ready)
        ordered.append(nodes[i][1])
        for reader in readers[i]:
            waiting[reader] -= 1
            if waiting[reader] == 0:
                heappush(ready, (nodes[reader][0], reader))
    if len(ordered) != len(nodes):
        raise RuntimeError("fold: the rewritten graph has a cycle")
    return ordered


def _always_defined(body: onnx.GraphProto) -> set[str]:
    return {v.name for v in body.input} | {t.name for t in body.initializer}


def _prune_value_info(body: onnx.GraphProto) -> None:
    """Drop value_info of values that moved into a body: the graph no longer defines them."""
    defined = _always_defined(body) | {name for node in body.node for name in node.output}
    kept = [_copy(v) for v in body.value_info if v.name in defined]
    if len(kept) != len(body.value_info):
        del body.value_info[:]
        body.value_info.extend(kept)


def _copy(message):
    clone = type(message)()
    clone.CopyFrom(message)
    return clone
