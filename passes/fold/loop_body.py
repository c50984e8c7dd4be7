"""The Loop/Scan body, and how it reads a stacked weight: Gemm(transB) for MatMul, sub-byte types widened."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from graphpass.blocks import BlockRun, CarriedValue, Dims, PerBlockValue, WeightSlot
from graphpass.passes.fold.graph_helpers import _copy
from graphpass.weights import element_bits

# Gemm without a C input is opset 11.
GEMM_MIN_OPSET = 11
# Below this many elements the per-call packing that Gemm's transB saves costs less than the
# five small nodes (Reshape, Shape, Slice, Concat, Reshape) it takes to express it.
GEMM_MIN_ELEMENTS = 1 << 16
GEMM_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE})


def feeds_matmul_b_only(run: BlockRun, slot: WeightSlot, opset: int) -> bool:
    """Whether a stacked weight is only ever MatMul's right operand (B), as a 2-D matrix.

    Such a weight is stored transposed and read by Gemm(transB=1) instead: a weight that
    changes per iteration is packed by MLAS on every call, which measured 13-19% slower
    than a prepacked constant at BERT's shapes for MatMul, but only 2-11% for Gemm's
    transposed B; on BERT at batch 1, sequence 128 the folded model went from 1.16x the
    unrolled latency to 1.10x. The results are the same bits in onnxruntime.
    """
    if len(slot.shape) != 2 or slot.dtype not in GEMM_TYPES or opset < GEMM_MIN_OPSET:
        return False
    if slot.shape[0] * slot.shape[1] < GEMM_MIN_ELEMENTS:
        return False
    nodes = run.nodes(0)
    return all(
        nodes[p.node].op_type == "MatMul" and nodes[p.node].domain in ("", "ai.onnx") and p.index == 1
        for p in slot.ports
    )


def widened_dtype(dtype: int) -> int | None:
    """The byte type a sub-byte integer type is carried in through Scan or Gather; None if whole."""
    if element_bits(dtype) >= 8:
        return None
    signed = dtype in (TensorProto.INT4, getattr(TensorProto, "INT2", -1))
    return TensorProto.INT8 if signed else TensorProto.UINT8


class _BodyBuilder:
    """The Loop/Scan body: the first block's nodes, rewired to read the carried values,
    the per-iteration slices of stacked weights, and everything else from the outer scope."""

    def __init__(self, run: BlockRun, sliced: list[WeightSlot], types, names, mode: str, stacked: dict[int, str],
                 transposed: set[int], opsets,
                 own: set[str], renamed: dict[str, str], outer_types: dict[str, tuple[int, Dims | None]]):
        self.run, self.types, self.names, self.mode, self.stacked = run, types, names, mode, stacked
        self.sliced = sliced  # what each iteration reads of the stacks, in Scan input order
        self.transposed = transposed
        self.opsets = list(opsets)
        self.own = own  # names that become the body's own initializers
        self.renamed = renamed  # outer names the body reads from its own copy instead
        self.outer_types = outer_types  # dtype and dims of every outer-scope value the body may read

    def build(self) -> tuple[onnx.GraphProto, list[str]]:
        """The body, and the outer-scope values it reads as Scan state variables (in order)."""
        draft = helper.make_graph([_copy(n) for n in self.run.nodes(0)], "fold_body", [], [])
        graph = gs.import_onnx(helper.make_model(draft, opset_imports=self.opsets))
        tensors = graph.tensors()
        for outer, own in self.renamed.items():
            if outer in tensors:
                tensors[outer].name = own
        inputs, outputs, iteration = [], [], None
        if self.mode == "loop":
            # Loop's body signature: (iteration number, condition, carried...) -> (condition, carried...)
            iteration = gs.Variable(self.names.fresh("fold.iteration"), TensorProto.INT64, ())
            cond_in = gs.Variable(self.names.fresh("fold.cond_in"), TensorProto.BOOL, ())
            cond_out = gs.Variable(self.names.fresh("fold.cond_out"), TensorProto.BOOL, ())
            graph.nodes.append(self._node("Identity", "fold.cond", [cond_in], [cond_out]))
            inputs, outputs = [iteration, cond_in], [cond_out]
        for carried in self.run.carried:
            dims = self._dims(carried)
            state = gs.Variable(self.names.fresh("fold.carried"), carried.dtype, dims)
            self._rewire(graph, carried.ports, state)
            inputs.append(state)
            produced = tensors[self._value_in_first_block(carried)]
            produced.dtype, produced.shape = carried.dtype, dims
            outputs.append(produced)
        scanned = []
        for slot in self.sliced:
            scanned += self._slice(graph, slot, iteration)
        scanned += [self._activation_slice(graph, value) for value in self.run.inputs]
        made = [self._activation_made(graph, tensors, value) for value in self.run.outputs]
        graph.inputs, graph.outputs = inputs + scanned, outputs + made
        graph.cleanup(remove_unused_graph_inputs=False)
        captured = []
        if self.mode == "scan":
            captured = self._capture_as_state(graph)
            graph.inputs = inputs + [state for _, state, _ in captured] + scanned
            graph.outputs = outputs + [same for _, _, same in captured] + made
        graph.toposort()
        return gs.export_onnx(graph, do_type_check=False).graph, [name for name, _, _ in captured]

    def _activation_slice(self, graph: gs.Graph, value: PerBlockValue) -> gs.Variable:
        """This iteration's graph input, a slice of the stacked inputs: a scan input."""
        piece = gs.Variable(self.names.fresh(f"{value.names[0]}.slice"), value.dtype, _static(value.dims))
        self._rewire(graph, value.ports, piece)
        return piece

    def _activation_made(self, graph: gs.Graph, tensors: dict[str, gs.Tensor], value: PerBlockValue) -> gs.Variable:
        """This iteration's graph output, as a scan output. The body's value is renamed (the
        main graph makes the original name again when it splits the stack) and leaves
        through an Identity: tract (0.23) fails to analyse a Scan whose scan output is also
        read in the body ("Impossible to unify")."""
        produced = tensors[self.run.nodes(0)[value.source[0]].output[value.source[1]]]
        produced.name = self.names.fresh(f"{value.names[0]}.in_body")
        made = gs.Variable(self.names.fresh(f"{value.names[0]}.made"), value.dtype, _static(value.dims))
        graph.nodes.append(self._node("Identity", made.name, [produced], [made]))
        return made

    def _capture_as_state(self, graph: gs.Graph) -> list[tuple[str, gs.Variable, gs.Variable]]:
        """Every outer-scope value the body reads, as a state variable returned unchanged:
        (outer name, body input, body output).

        OpenVINO's ONNX frontend (2026.4) miscounts a Scan body that reads the outer scope
        ("body outputs (1) is less than num_initial_values (2)"); passed in explicitly, the
        same values work in onnxruntime, OpenVINO and tract. The value is returned through an
        Identity: a body output that is its own input made onnxruntime read stale memory and
        tract panic."""
        defined = {t.name for t in graph.inputs} | self.own
        outer: dict[str, gs.Variable] = {}
        for node in graph.nodes:
            for tensor in node.inputs:
                free = isinstance(tensor, gs.Variable) and not tensor.inputs and tensor.name
                if free and tensor.name not in defined:
                    outer.setdefault(tensor.name, tensor)
        captured = []
        for name, tensor in outer.items():
            dtype, dims = self.outer_types[name]
            state = gs.Variable(self.names.fresh(f"{name}.state"), dtype, _static(dims))
            for node in list(tensor.outputs):
                for i, read in enumerate(node.inputs):
                    if read is tensor:
                        node.inputs[i] = state
            same = gs.Variable(self.names.fresh(f"{name}.same"), dtype, _static(dims))
            graph.nodes.append(self._node("Identity", f"{name}.same", [state], [same]))
            captured.append((name, state, same))
        return captured

    def _slice(self, graph: gs.Graph, slot: WeightSlot, iteration: gs.Variable | None) -> list[gs.Variable]:
        """This iteration's weight: a Scan input, or Gather(stacked, iteration) in a Loop."""
        transposed = id(slot) in self.transposed
        shape = tuple(reversed(slot.shape)) if transposed else slot.shape
        piece = gs.Variable(self.names.fresh(f"{slot.names[0]}.slice"), slot.dtype, shape)
        self._rewire(graph, slot.ports, piece)
        if transposed:
            for port in slot.ports:
                self._matmul_as_gemm(graph, graph.nodes[port.node], slot.shape)
        wide = widened_dtype(slot.dtype)
        if wide is not None:  # the stacked indices arrive as bytes: narrow this slice back
            narrow, piece = piece, gs.Variable(self.names.fresh(f"{slot.names[0]}.slice_bytes"), wide, shape)
            graph.nodes.append(self._node("Cast", f"{slot.names[0]}.narrow", [piece], [narrow], to=slot.dtype))
        if iteration is None:
            return [piece]
        stacked = gs.Variable(self.stacked[id(slot)])  # an outer-scope value
        graph.nodes.append(self._node("Gather", f"{slot.names[0]}.slice", [stacked, iteration], [piece], axis=0))
        return []

    def _matmul_as_gemm(self, graph: gs.Graph, matmul: gs.Node, shape: tuple[int, ...]) -> None:
        """MatMul(a, w) -> Reshape(Gemm(Reshape(a, [-1, K]), w^T, transB=1), a's dims[:-1] + [N]).

        Any rank of `a` works: MatMul broadcasts a matrix B over a's leading dims, which is
        the same as one GEMM over the flattened rows."""
        k, n = shape
        a, w = matmul.inputs
        (y,) = matmul.outputs
        matmul.inputs.clear()
        matmul.outputs.clear()  # the Gemm chain now produces y; cleanup() drops the MatMul

        def fresh(role: str, dtype=None) -> gs.Variable:
            return gs.Variable(self.names.fresh(f"{y.name}.{role}"), dtype)

        def const(role: str, values: list[int]) -> gs.Constant:
            return gs.Constant(self.names.fresh(f"{y.name}.{role}"), np.array(values, dtype=np.int64))

        rows, product = fresh("rows", a.dtype), fresh("gemm", a.dtype)
        dims, lead, target = fresh("dims"), fresh("lead"), fresh("target")
        graph.nodes += [
            self._node("Reshape", f"{y.name}.rows", [a, const("rows_shape", [-1, k])], [rows]),
            self._node("Gemm", f"{y.name}.gemm", [rows, w], [product], transB=1),
            self._node("Shape", f"{y.name}.dims", [a], [dims]),
            self._node("Slice", f"{y.name}.lead", [dims, const("start", [0]), const("end", [-1])], [lead]),
            self._node("Concat", f"{y.name}.target", [lead, const("columns", [n])], [target], axis=0),
            self._node("Reshape", y.name, [product, target], [y]),
        ]

    def _node(self, op: str, base: str, inputs: list, outputs: list, **attrs) -> gs.Node:
        return gs.Node(op, self.names.fresh(f"{base}.node"), attrs, inputs, outputs)

    def _rewire(self, graph: gs.Graph, ports, tensor: gs.Variable) -> None:
        for port in ports:
            graph.nodes[port.node].inputs[port.index] = tensor

    def _value_in_first_block(self, carried: CarriedValue) -> str:
        k, slot = carried.source
        return self.run.nodes(0)[k].output[slot]

    def _dims(self, carried: CarriedValue) -> tuple | None:
        """The body's carried shape must hold for every iteration: the rank, and each dim that
        inference found static and equal in the first block's input and output. Symbolic dims
        are left undeclared: tract (0.23) cannot unify a body's symbols with the outer
        graph's values ("Impossible to unify Sym(unk__2) with Val(24)")."""
        first = carried.dims
        produced = self.types.get(self._value_in_first_block(carried), (None, None))[1]
        if first is None:
            return None
        if produced is None or len(produced) != len(first):
            return tuple(None for _ in first)
        return tuple(a if a == b and isinstance(a, int) else None for a, b in zip(first, produced))


def _static(dims: Dims | None) -> tuple | None:
    """Dims as a body may declare them: the rank, with only the static dims filled in."""
    return None if dims is None else tuple(d if isinstance(d, int) else None for d in dims)
