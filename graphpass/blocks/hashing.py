"""Structural hashing: Weisfeiler-Lehman refinement of each value over the computation above it."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import onnx

if TYPE_CHECKING:
    from graphpass.blocks.graph_index import GraphIndex

# Refinement rounds: enough to tell apart the values of one block (q, k and v projections
# differ two levels up), few enough that the hash of a block output stays within its block.
WL_ROUNDS = 6


def _digest(*parts: Any) -> bytes:
    return hashlib.blake2b(repr(parts).encode(), digest_size=12).digest()


def _node_signature(index: GraphIndex, position: int) -> bytes:
    """What a node is, apart from its inputs: op, attributes, and dtype and rank of outputs.

    Nodes with subgraphs get a signature of their own: a block holding one is never folded,
    because the body's outer-scope references would need renaming too.
    """
    node = index.nodes[position]
    attrs = []
    for attr in sorted(node.attribute, key=lambda a: a.name):
        if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            return _digest("unique", position)
        attrs.append((attr.name, attr.SerializeToString(deterministic=True)))
    outputs = []
    for name in node.output:
        typed = index.types.get(name)
        outputs.append((typed[0], None if typed[1] is None else len(typed[1])) if typed else None)
    return _digest(node.domain or "", node.op_type, tuple(attrs), len(node.input), tuple(outputs))


def value_hashes(index: GraphIndex, rounds: int = WL_ROUNDS) -> dict[str, bytes]:
    """Hash of each node output after `rounds` of refinement over the values it is made from."""
    signatures = {p: index.signature(p) for p in range(len(index.nodes)) if p not in index.weight_nodes}
    seeds: dict[str, bytes] = {}
    for position, signature in signatures.items():
        for slot, name in enumerate(index.nodes[position].output):
            if name:
                seeds[name] = _digest(signature, slot)
    current = dict(seeds)

    def lookup(name: str, table: dict[str, bytes]) -> bytes:
        return table.get(name) or _digest(index.value_kind(name))

    for _ in range(rounds):
        following = {}
        for position in signatures:
            node = index.nodes[position]
            inputs = tuple(lookup(name, current) if name else b"" for name in node.input)
            for slot, name in enumerate(node.output):
                if name:
                    following[name] = _digest(seeds[name], inputs)
        current = following
    return current
