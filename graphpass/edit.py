"""The model a pass edits: its scopes, its weights, and the few edits passes are allowed to make.

Passes never touch protobuf themselves. They list weights, read them, and replace them through
this class, which keeps names unique, keeps every scope topologically sorted and keeps
subgraphs' outer-scope references intact.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import NodeProto, TensorProto, helper, numpy_helper

from graphpass.pinned import pinned_values
from graphpass.scopes import NameAllocator, Scope, all_value_and_node_names, build_scope_tree, iter_nodes, subgraphs_of
from graphpass.weights import Replacement, WeightRef, constant_type_and_shape


class Model:
    def __init__(self, proto: onnx.ModelProto):
        self.proto = proto
        self.names = NameAllocator(all_value_and_node_names(proto))
        self._scopes: list[Scope] | None = None
        self._weights: list[WeightRef] | None = None
        self.generation = 0  # bumped on every edit, so cached analyses know they are stale
        self._value_types: tuple[int, dict[str, onnx.TypeProto]] | None = None
        self.shape_inference_error: str | None = None
        # The weight a pass last read or replaced: named when the pass fails (a bug report's lead).
        self.last_weight: str | None = None
        self._constant_needs: dict = {}
        self._pinned: dict[str, str] = {}

    # -- reading -------------------------------------------------------------------------

    @property
    def scopes(self) -> list[Scope]:
        if self._scopes is None:
            self._scopes = build_scope_tree(self.proto)
        return self._scopes

    @property
    def opset(self) -> int:
        """The default-domain opset, which decides which ops and types a rewrite may use."""
        for entry in self.proto.opset_import:
            if entry.domain in ("", "ai.onnx"):
                return entry.version
        return 1

    def weights(self) -> list[WeightRef]:
        """Every stored weight, in a deterministic order: by scope, then by position."""
        if self._weights is None:
            self._pinned = pinned_values(self.proto, self._constant_needs)
            self._weights = [w for scope in self.scopes for w in self._scope_weights(scope)]
        return self._weights

    def keep_constant(self, needs: dict) -> None:
        """What the target runtimes need kept constant (op type -> rules, from
        graphpass.runtimes.required_constants); weights that feed those inputs get `pinned`."""
        if dict(needs) != self._constant_needs:  # every PassContext says it; most say the same
            self._constant_needs = dict(needs)
            self._weights = None

    def value_types(self) -> dict[str, onnx.TypeProto]:
        """Types and shapes of the top graph's values from onnx shape inference.

        Inference fails on some real exports (custom domains, odd opsets); then this is just
        what the model declares, and `shape_inference_error` says why.
        """
        if self._value_types is None or self._value_types[0] != self.generation:
            self._value_types = (self.generation, self._infer_value_types())
        return self._value_types[1]

    def _infer_value_types(self) -> dict[str, onnx.TypeProto]:
        declared = list(self.proto.graph.input) + list(self.proto.graph.output) + list(self.proto.graph.value_info)
        try:
            inferred = onnx.shape_inference.infer_shapes(_typed_skeleton(self.proto), strict_mode=False,
                                                         data_prop=True).graph
            declared += list(inferred.value_info) + list(inferred.input) + list(inferred.output)
            self.shape_inference_error = None
        except Exception as exc:  # onnx raises several types; any of them means "no inference"
            self.shape_inference_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return {v.name: v.type for v in declared}

    def node_count(self) -> int:
        return sum(1 for _ in iter_nodes(self.proto.graph)) + sum(
            sum(1 for _ in iter_nodes(f)) for f in self.proto.functions
        )

    def weight_bytes(self) -> int:
        return sum(w.nbytes for w in self.weights())

    def find_initializer(self, scope: Scope, name: str) -> TensorProto:
        for tensor in scope.body.initializer:
            if tensor.name == name:
                return tensor
        raise KeyError(f"no initializer '{name}' in {scope.path}")

    def find_constant_node(self, scope: Scope, name: str) -> NodeProto:
        return scope.body.node[self._constant_index(scope, name)]

    def _constant_index(self, scope: Scope, name: str) -> int:
        for index, node in enumerate(scope.body.node):
            if node.op_type == "Constant" and node.output and node.output[0] == name:
                return index
        raise KeyError(f"no Constant node producing '{name}' in {scope.path}")

    def _scope_weights(self, scope: Scope) -> list[WeightRef]:
        readers = _readers_by_name(scope)
        found = []
        if not scope.is_function:
            graph_inputs = {v.name for v in scope.body.input}
            for tensor in scope.body.initializer:
                found.append(WeightRef(
                    self, scope, tensor.name, "initializer", tensor.data_type, tuple(tensor.dims),
                    overridable=tensor.name in graph_inputs, consumers=readers.get(tensor.name, []),
                    pinned=self._pinned.get(tensor.name),
                ))
        for node in scope.body.node:
            typed = constant_type_and_shape(node)
            if typed is not None:
                name = node.output[0]
                found.append(WeightRef(self, scope, name, "constant", *typed, consumers=readers.get(name, []),
                                       pinned=self._pinned.get(name)))
        return found

    # -- editing -------------------------------------------------------------------------

    def apply_replacement(self, weight: WeightRef, replacement: Replacement, result: str) -> None:
        """Swap a weight's definition for the replacement's nodes and tensors.

        New nodes go where the Constant node was, or first in the scope for an initializer, so
        the scope stays topologically sorted. The final value takes over the weight's own name
        when the replacement computed it, so no reader needs to change.
        """
        self.last_weight = weight.name
        if replacement.takes_over_readers:
            self._apply_kernel(weight, replacement)
            return
        if replacement.row_gather is not None and self._apply_row_gather(weight, replacement):
            return
        scope = weight.scope
        position = self._take_definition(weight)
        nodes = list(replacement.nodes)
        if result in {o for node in nodes for o in node.output}:
            _rename_output(nodes, result, weight.name)
        else:
            self._alias(scope, weight.name, result, nodes)
        nodes = self._store(scope, replacement.tensors) + nodes
        for offset, node in enumerate(nodes):
            scope.body.node.insert(position + offset, node)
        self._edited()

    def _take_definition(self, weight: WeightRef) -> int:
        """Delete the weight's definition; return where nodes computing it may go: the
        Constant's place, or for an initializer after the Constant nodes shared tensors may
        have become."""
        position = self._remove_definition(weight)
        return _leading_constants(weight.scope.body) if position is None else position

    def _store(self, scope: Scope, tensors: list[TensorProto]) -> list[NodeProto]:
        """Store new tensors in `scope`: as initializers, or where the scope holds none, as the
        Constant nodes returned (to be inserted before their readers)."""
        if self.holds_no_initializers(scope):
            return [self._constant_node(t) for t in tensors]
        scope.body.initializer.extend(tensors)
        return []

    def _apply_row_gather(self, weight: WeightRef, replacement: Replacement) -> bool:
        """Where every reader of the weight is a row Gather in the weight's own body (an
        embedding table), let each reader decode only the rows it picks, so the runtime holds
        the packed rows rather than a rebuilt table. False (nothing changed) otherwise."""
        scope, rank = weight.scope, len(weight.shape)
        readers = list(weight.reader_nodes())
        direct = {id(node) for node in scope.body.node}
        if scope.is_function or weight.name in scope.output_names() or not readers or any(
                id(node) not in direct or not _gathers_rows(node, index, rank) for node, index in readers):
            return False
        position = self._take_definition(weight)
        first_decode = len(replacement.nodes)
        decoders = []
        for node, _ in readers:
            start = len(replacement.nodes)
            rows = replacement.row_gather.decode(replacement, node.input[1])
            decoded = replacement.nodes[start:]
            _rename_output(decoded, rows, node.output[0])
            decoders.append((node, decoded))
        shared = _ancestors(replacement.nodes[:first_decode], replacement.nodes[first_decode:])
        used = {name for n in shared + replacement.nodes[first_decode:] for name in n.input}
        shared = self._store(scope, [t for t in replacement.tensors if t.name in used]) + shared
        for node, decoded in decoders:
            index = next(i for i, n in enumerate(scope.body.node) if n is node)
            del scope.body.node[index]
            for offset, new_node in enumerate(decoded):
                scope.body.node.insert(index + offset, new_node)
        for offset, node in enumerate(shared):
            scope.body.node.insert(position + offset, node)
        self._edited()
        return True

    def _apply_kernel(self, weight: WeightRef, replacement: Replacement) -> None:
        """A replacement that took over the weight's readers: they and the weight's definition
        leave the scope; its nodes go where the first of them was (their inputs, activations and
        stored tensors, are all defined before it), and its domains are imported."""
        scope = weight.scope
        if scope.parent is not None or scope.is_function:
            raise ValueError("kernel replacements apply to main-graph weights only")
        self._remove_definition(weight)
        body = scope.body
        removed = set(replacement.taken_over)
        positions = [i for i, node in enumerate(body.node) if node.output and node.output[0] in removed]
        if len(positions) != len(removed):
            raise ValueError(f"nodes to take over not found in {scope.path}: {sorted(removed)}")
        still_read = [n.op_type for n in iter_nodes(body)
                      if weight.name in n.input and not (n.output and n.output[0] in removed)]
        if still_read:
            raise ValueError(f"'{weight.name}' is still read by {', '.join(still_read)} after taking over its readers")
        for index in reversed(positions):
            del body.node[index]
        body.initializer.extend(replacement.tensors)
        for offset, node in enumerate(replacement.nodes):
            body.node.insert(positions[0] + offset, node)
        for domain, version in replacement.domains.items():
            self._import_domain(domain, version)
        self._edited()

    def _import_domain(self, domain: str, version: int) -> None:
        """Add an operator domain to the model's imports (the default domain's version never changes)."""
        if not any(entry.domain == domain for entry in self.proto.opset_import):
            self.proto.opset_import.append(helper.make_opsetid(domain, version))

    def add_shared_tensor(self, scope: Scope, base_name: str, array: np.ndarray) -> str:
        """Store a tensor that several replacements in `scope` and below will reference."""
        tensor = numpy_helper.from_array(np.asarray(array, order="C"), self.names.fresh(base_name))
        if self.holds_no_initializers(scope):
            scope.body.node.insert(0, self._constant_node(tensor))
        else:
            scope.body.initializer.append(tensor)
        self._edited()
        return tensor.name

    def holds_no_initializers(self, scope: Scope) -> bool:
        """Where new stored tensors must be Constant nodes: function bodies have no
        initializers, and before IR version 4 every initializer must also be a graph input,
        which If, Loop and Scan bodies cannot grow and which would let a caller override a
        codebook (onnxruntime refuses a subgraph initializer that is not an input, and a
        top-level one that only a subgraph reads)."""
        return scope.is_function or self.proto.ir_version < 4

    def settle_undeclared_initializers(self) -> int:
        """Turn initializers a pass stored directly at IR < 4 without declaring them as graph
        inputs into Constant nodes (see holds_no_initializers); return how many."""
        moved = 0
        for scope in self.scopes:
            if scope.is_function or not self.holds_no_initializers(scope):
                continue
            declared = {v.name for v in scope.body.input}
            loose = [t for t in scope.body.initializer if t.name not in declared]
            if not loose:
                continue
            kept = [t for t in scope.body.initializer if t.name in declared]
            constants = [self._constant_node(t) for t in loose]
            del scope.body.initializer[:]
            scope.body.initializer.extend(kept)
            for offset, node in enumerate(constants):
                scope.body.node.insert(offset, node)
            moved += len(loose)
        if moved:
            self._edited()
        return moved

    def remove_unused_weights(self) -> int:
        """Drop stored weights nothing reads (for example after a tie); return how many."""
        removed = 0
        for weight in list(self.weights()):
            if weight.consumers or weight.overridable or weight.name in weight.scope.output_names():
                continue
            self._remove_definition(weight)
            removed += 1
            self._edited()
        return removed

    def _remove_definition(self, weight: WeightRef) -> int | None:
        """Delete the weight's initializer or Constant node; return the Constant's position."""
        body = weight.scope.body
        if weight.source == "initializer":
            index = next(i for i, t in enumerate(body.initializer) if t.name == weight.name)
            del body.initializer[index]
            return None
        index = self._constant_index(weight.scope, weight.name)
        del body.node[index]
        return index

    def _constant_node(self, tensor: TensorProto) -> NodeProto:
        return helper.make_node("Constant", [], [tensor.name], name=self.names.fresh(f"{tensor.name}.node"), value=tensor)

    def _alias(self, scope: Scope, old: str, new: str, nodes: list[NodeProto]) -> None:
        """Let readers of `old` read `new` instead; an output name must survive, via Identity."""
        if old in scope.output_names():
            node_name = self.names.fresh(f"{old}.alias")
            nodes.append(helper.make_node("Identity", [new], [old], name=node_name))
            return
        _redirect_readers(scope.body, old, new)

    def structure_edited(self) -> None:
        """Call after adding or removing nodes that hold subgraphs (a pass that builds a Loop,
        say): the scope tree is rebuilt, so weights in the new bodies are seen."""
        self._scopes = None
        self._edited()

    def _edited(self) -> None:
        self._weights = None
        self.generation += 1


def _leading_constants(body) -> int:
    """How many argument-less Constant nodes open a body (where add_shared_tensor puts its
    tensors when the body holds no initializers)."""
    count = 0
    for node in body.node:
        if node.op_type != "Constant" or node.input:
            break
        count += 1
    return count


def _gathers_rows(node: NodeProto, index: int, rank: int) -> bool:
    """Whether `node` reads its input `index` as the table of a Gather along axis 0."""
    if node.op_type != "Gather" or index != 0 or node.domain not in ("", "ai.onnx"):
        return False
    axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
    return axis % max(rank, 1) == 0


def _ancestors(candidates: list[NodeProto], consumers: list[NodeProto]) -> list[NodeProto]:
    """The candidates (in their order) that some consumer needs, directly or through others."""
    wanted = {name for node in consumers for name in node.input}
    kept = []
    for node in reversed(candidates):
        if wanted.intersection(node.output):
            kept.append(node)
            wanted.update(node.input)
    return kept[::-1]


def _rename_output(nodes: list[NodeProto], old: str, new: str) -> None:
    for node in nodes:
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new


def _redirect_readers(body, old: str, new: str) -> None:
    """Rewrite reads of `old` in a body and its subgraphs, stopping where a subgraph redefines it."""
    for node in body.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for _, graph in subgraphs_of(node):
            if old not in _defined_in(graph):
                _redirect_readers(graph, old, new)


def _defined_in(graph) -> set[str]:
    names = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.output)
    return names


def _readers_by_name(scope: Scope) -> dict[str, list[tuple[str, int]]]:
    """Who reads each name visible in a scope: its own nodes and nodes of nested subgraphs."""
    readers: dict[str, list[tuple[str, int]]] = defaultdict(list)
    _collect_readers(scope.body, readers, set())
    return readers


def _collect_readers(body, readers, shadowed: set[str]) -> None:
    for node in body.node:
        for index, name in enumerate(node.input):
            if name and name not in shadowed:
                readers[name].append((node.op_type, index))
        for _, graph in subgraphs_of(node):
            _collect_readers(graph, readers, shadowed | _defined_in(graph))
    # Graph outputs are read by whoever runs the graph: count them so an output weight stays.
    outputs = body.output if hasattr(body, "output") else []
    for value in outputs:
        name = value if isinstance(value, str) else value.name
        if name not in shadowed:
            readers[name].append(("<output>", 0))


# Weights larger than this reach shape inference as typed inputs: it needs their types only.
_INFERENCE_INLINE_LIMIT = 64


def _typed_skeleton(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its large weights reduced to typed graph inputs: inference needs their
    types only, and a second copy of them would double the memory of a large model. Small
    ones stay, since Reshape and friends need their values."""
    graph = proto.graph
    skeleton = onnx.GraphProto(name=graph.name)
    skeleton.input.extend(graph.input)
    _forget_huge_dims(skeleton.input)
    skeleton.output.extend(graph.output)
    skeleton.value_info.extend(graph.value_info)
    declared = {v.name for v in graph.input}
    for tensor in graph.initializer:
        if _count(tensor.dims) <= _INFERENCE_INLINE_LIMIT:
            skeleton.initializer.append(tensor)
        elif tensor.name not in declared:
            skeleton.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    for node in graph.node:
        typed = constant_type_and_shape(node)
        if typed is not None and _count(typed[1]) > _INFERENCE_INLINE_LIMIT:
            skeleton.input.append(helper.make_tensor_value_info(node.output[0], typed[0], list(typed[1])))
        else:
            skeleton.node.append(node)
    return helper.make_model(
        skeleton, ir_version=proto.ir_version, opset_imports=proto.opset_import, functions=proto.functions
    )


# onnx's data propagation materialises values derived from input sizes (a Range over a batch
# dim, say): a declared size this large would have it allocate without bound.
_INFERENCE_DIM_LIMIT = 2**24


def _forget_huge_dims(values) -> None:
    for value in values:
        for dim in value.type.tensor_type.shape.dim:
            if dim.WhichOneof("value") == "dim_value" and dim.dim_value > _INFERENCE_DIM_LIMIT:
                dim.Clear()


def _count(dims) -> int:
    count = 1
    for dim in dims:
        count *= dim
    return count
