"""Where values live in an ONNX model: the top graph, nested subgraphs and function bodies.

Everything that walks a model goes through these helpers, so that weights hidden in
`If`/`Loop`/`Scan` bodies or in model-local functions are never missed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import onnx
from onnx import AttributeProto, FunctionProto, GraphProto, NodeProto, TensorProto

Body = GraphProto | FunctionProto


@dataclass(eq=False)
class Scope:
    """A graph or function body, and the chain of bodies that encloses it.

    A subgraph can read every value of its enclosing scopes; a function body reads nothing
    from outside, so it starts a chain of its own.
    """

    body: Body
    path: str
    parent: Scope | None = None
    children: list[Scope] = field(default_factory=list)

    @property
    def is_function(self) -> bool:
        return isinstance(self.body, FunctionProto)

    @property
    def depth(self) -> int:
        return 0 if self.parent is None else self.parent.depth + 1

    def ancestors(self) -> Iterator[Scope]:
        """This scope, then each enclosing one outwards."""
        scope: Scope | None = self
        while scope is not None:
            yield scope
            scope = scope.parent

    def encloses(self, other: Scope) -> bool:
        return any(s is self for s in other.ancestors())

    def local_names(self) -> set[str]:
        """Names defined in this body itself: inputs, initializers and node outputs."""
        body = self.body
        if self.is_function:
            names = set(body.input)
        else:
            names = {v.name for v in body.input}
            names.update(t.name for t in body.initializer)
            names.update(t.values.name for t in body.sparse_initializer)
        for node in body.node:
            names.update(o for o in node.output if o)
        return names

    def input_names(self) -> list[str]:
        if self.is_function:
            return list(self.body.input)
        return [v.name for v in self.body.input]

    def output_names(self) -> list[str]:
        if self.is_function:
            return list(self.body.output)
        return [v.name for v in self.body.output]


def subgraphs_of(node: NodeProto) -> Iterator[tuple[str, GraphProto]]:
    """The graph-valued attributes of a node (If branches, Loop/Scan bodies)."""
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == AttributeProto.GRAPHS:
            for i, graph in enumerate(attr.graphs):
                yield f"{attr.name}[{i}]", graph


def build_scope_tree(model: onnx.ModelProto) -> list[Scope]:
    """Every scope of the model, parents before children, in a deterministic order."""
    roots = [Scope(model.graph, "main")]
    roots += [Scope(f, f"function {f.domain}::{f.name}") for f in model.functions]
    ordered: list[Scope] = []
    for root in roots:
        _collect(root, ordered)
    return ordered


def _collect(scope: Scope, ordered: list[Scope]) -> None:
    ordered.append(scope)
    for index, node in enumerate(scope.body.node):
        label = node.name or f"{node.op_type}#{index}"
        for attr_name, graph in subgraphs_of(node):
            child = Scope(graph, f"{scope.path}/{label}.{attr_name}", parent=scope)
            scope.children.append(child)
            _collect(child, ordered)


def iter_nodes(body: Body) -> Iterator[NodeProto]:
    """All nodes of a body and of the subgraphs nested in it, outer ones first."""
    for node in body.node:
        yield node
        for _, graph in subgraphs_of(node):
            yield from iter_nodes(graph)


def iter_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every TensorProto that may carry weight data, wherever it is stored."""
    for scope in build_scope_tree(model):
        if not scope.is_function:
            yield from scope.body.initializer
            for sparse in scope.body.sparse_initializer:
                yield sparse.values
                yield sparse.indices
        for node in scope.body.node:
            for attr in node.attribute:
                if attr.type == AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == AttributeProto.TENSORS:
                    yield from attr.tensors
                elif attr.type == AttributeProto.SPARSE_TENSOR:
                    yield attr.sparse_tensor.values
                    yield attr.sparse_tensor.indices


def all_value_and_node_names(model: onnx.ModelProto) -> set[str]:
    """Every name in use, so that new names never collide or shadow one another."""
    names: set[str] = set()
    for scope in build_scope_tree(model):
        names |= scope.local_names()
        names.update(scope.output_names())
        for node in scope.body.node:
            if node.name:
                names.add(node.name)
    return names


class NameAllocator:
    """Hands out names unused anywhere in the model; the same requests give the same names."""

    def __init__(self, taken: set[str]):
        self._taken = set(taken)

    def fresh(self, base: str) -> str:
        candidate, suffix = base, 0
        while candidate in self._taken:
            suffix += 1
            candidate = f"{base}_{suffix}"
        self._taken.add(candidate)
        return candidate

    def reserve(self, name: str) -> None:
        self._taken.add(name)
