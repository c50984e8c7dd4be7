"""One scope indexed for the search: producers, readers, weights and value types by node position."""

from __future__ import annotations

from collections import defaultdict

import onnx
from onnx import TensorProto

from graphpass.blocks.hashing import _node_signature
from graphpass.blocks.runs import Dims
from graphpass.edit import Model
from graphpass.scopes import Scope, subgraphs_of
from graphpass.weights import WeightRef


class GraphIndex:
    """Producers, readers, weights and value types of one scope, by node position."""

    def __init__(self, scope: Scope, weights: list[WeightRef], types: dict[str, tuple[int, Dims | None]]):
        self.scope = scope
        self.nodes = list(scope.body.node)
        self.types = types
        # Overridable initializers are values a caller may feed: never treated as weights.
        self.weights = {w.name: w for w in weights if not w.overridable}
        self.weight_nodes = {
            i for i, n in enumerate(self.nodes) if n.op_type == "Constant" and n.output and n.output[0] in self.weights
        }
        self.graph_inputs = set(scope.input_names())
        self.graph_outputs = set(scope.output_names())
        self._signatures: dict[int, bytes] = {}
        self.producer: dict[str, tuple[int, int]] = {}
        self.readers: dict[str, list[int]] = defaultdict(list)
        self.reads: list[list[str]] = []
        for position, node in enumerate(self.nodes):
            for slot, name in enumerate(node.output):
                if name:
                    self.producer[name] = (position, slot)
            reads = node_reads(node)
            self.reads.append(reads)
            for name in reads:
                self.readers[name].append(position)

    def signature(self, position: int) -> bytes:
        if position not in self._signatures:
            self._signatures[position] = _node_signature(self, position)
        return self._signatures[position]

    def is_computed(self, name: str) -> bool:
        """Made by a node other than a weight's Constant: a weight read from a Constant node
        crosses no cut, as it would not from an initializer."""
        return name in self.producer and name not in self.weights

    def produced_by(self, name: str) -> int | None:
        found = self.producer.get(name)
        return found[0] if found else None

    def ancestors(self, name: str, floor: int = -1) -> set[int]:
        """Positions of the nodes `name` depends on (its producer included), above `floor`."""
        start = self.produced_by(name)
        if start is None or start <= floor:
            return set()
        seen, stack = {start}, [start]
        while stack:
            for read in self.reads[stack.pop()]:
                position = self.produced_by(read)
                if position is not None and position > floor and position not in seen:
                    seen.add(position)
                    stack.append(position)
        return seen

    def descendants(self, name: str) -> set[int]:
        """Positions of the nodes that depend on `name`."""
        seen: set[int] = set()
        stack = list(self.readers.get(name, []))
        while stack:
            position = stack.pop()
            if position in seen:
                continue
            seen.add(position)
            for out in self.nodes[position].output:
                stack.extend(self.readers.get(out, []))
        return seen

    def depends_on(self, later: str, earlier: str) -> bool:
        start = self.produced_by(earlier)
        return start is not None and start in self.ancestors(later, floor=start - 1)

    def escapes(self, name: str, inside: set[int]) -> list[str]:
        """Who reads `name` outside the given nodes: node names, or '<graph output>'."""
        found = [_node_label(self.nodes[r], r) for r in self.readers.get(name, []) if r not in inside]
        if name in self.graph_outputs:
            found.append("<graph output>")
        return found

    def value_kind(self, name: str) -> tuple:
        """Hash seed of a value that no block node produces."""
        if name in self.weights:
            weight = self.weights[name]
            return ("weight", weight.dtype, weight.shape)
        return ("value", name)


def node_reads(node: onnx.NodeProto) -> list[str]:
    """The names a node reads: its inputs, then the outer-scope names its subgraphs read."""
    reads = [name for name in node.input if name]
    free: set[str] = set()
    for _, graph in subgraphs_of(node):
        free |= _free_names(graph)
    return reads + sorted(free - set(reads))


def _free_names(graph: onnx.GraphProto) -> set[str]:
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    free: set[str] = set()
    for node in graph.node:
        free.update(name for name in node_reads(node) if name not in defined)
        defined.update(node.output)
    return free


def _node_label(node: onnx.NodeProto, position: int) -> str:
    return node.name or f"{node.op_type}#{position}"


def infer_value_types(model: Model) -> dict[str, tuple[int, Dims | None]]:
    """Element type and dims (int, symbol name or None) of every value onnx can infer."""
    found = {}
    for name, value_type in model.value_types().items():
        tensor_type = value_type.tensor_type
        if not value_type.HasField("tensor_type") or tensor_type.elem_type == TensorProto.UNDEFINED:
            continue
        dims = tuple(_dim(d) for d in tensor_type.shape.dim) if tensor_type.HasField("shape") else None
        found[name] = (tensor_type.elem_type, dims)
    return found


def _dim(dim: onnx.TensorShapeProto.Dimension) -> int | str | None:
    if dim.HasField("dim_value"):
        return dim.dim_value
    return dim.dim_param or None
