"""The main graph's edits: each folded run's stacks, lookups and Loop/Scan node, applied at once."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphpass.batched_lookup import UNSQUEEZE_AXES_INPUT_OPSET, BatchedLookup
from graphpass.blocks import BlockAnalysis, BlockRun, Dims, WeightSlot, node_reads
from graphpass.edit import Model
from graphpass.passes.fold.graph_helpers import _always_defined, _copy, _prune_value_info, topological_order
from graphpass.passes.fold.loop_body import _BodyBuilder, feeds_matmul_b_only, widened_dtype
from graphpass.passes.fold.plan import _Plan

# A shared weight the body reads that is also read outside the run is copied into the body
# up to this size (shape constants, scalars): there it is a constant, as runtimes need.
COPY_INTO_BODY_BYTES = 1024


@dataclass
class _Rewrite:
    """Collects the edits of every folded run, then applies them to the graph at once."""

    model: Model
    found: BlockAnalysis
    removed: set[int] = field(default_factory=set)  # node positions in the scope
    added: list[tuple[int, onnx.NodeProto]] = field(default_factory=list)  # (position hint, node)
    tensors: list[TensorProto] = field(default_factory=list)
    retired: set[str] = field(default_factory=set)  # weights to delete once nothing reads them
    stacked_originals: set[str] = field(default_factory=set)
    also_outside: set[str] = field(default_factory=set)  # stacked, yet still read elsewhere
    _weights: dict = field(default_factory=dict)  # main-graph weights by name, read before any edit
    _readers: dict = field(default_factory=dict)  # name -> positions of the nodes that read it
    _moved: set = field(default_factory=set)  # weights already moved into a body
    renamed_inputs: dict = field(default_factory=dict)  # kept node position -> {old input: new}
    _stacks: dict = field(default_factory=dict)  # id(slot) -> stacked weight, within one run
    _axes: str | None = None  # the shared [0] axes of the Unsqueezes that stack values

    @property
    def body(self) -> onnx.GraphProto:
        return self.model.scopes[0].body

    def fold(self, run: BlockRun, mode: str, plan: _Plan) -> dict:
        first = min(run.all_positions())
        transposed = {id(s) for s in plan.sliced if feeds_matmul_b_only(run, s, self.model.opset)}
        self._stacks = {}
        batched = self._batched_lookup(run, plan, first) if plan.computed else None
        stacked = self._stacked_slots(plan, batched, transposed, first)
        for slot in run.slots:
            self.retired.update(slot.names)  # each dropped only once nothing reads it
        if batched is not None:  # the weight-only nodes the batched lookup reads: block 0's copy
            outside = {run.blocks[0][k] for k in plan.outside - plan.varies}
        else:
            outside = {run.blocks[j][k] for j in range(run.length) for k in plan.outside}
            self._read_shared_copy(run, plan)
        # Weights the outside nodes read stay in the main graph (the batched lookup reads the
        # same names), so only what the body alone reads may move into it.
        in_body = run.all_positions() - {run.blocks[j][k] for j in range(run.length) for k in plan.outside}
        moved, renamed = self._move_into_body(run, plan, in_body)
        activations = [self._stack_values(value.names, False, first) for value in run.inputs]
        builder = _BodyBuilder(run, plan.sliced, self.found.value_types, self.model.names, mode, stacked, transposed,
                               self.model.proto.opset_import, {t.name for t in moved}, renamed,
                               self._outer_types(run, plan))
        body, captured = builder.build()
        body.initializer.extend(moved)
        scanned = [stacked[id(s)] for s in plan.sliced] + activations
        node, made = self._loop_node(run, mode, body, captured, scanned)
        positions = run.all_positions()
        self.removed |= positions - outside
        self.added.append((max(positions), node))
        for value, stack in zip(run.outputs, made):
            self._unstack(stack, value.names, max(positions))
        return {
            "op": node.op_type,
            "blocks": run.length,
            "nodes_per_block": run.nodes_per_block,
            "shared_weights": len(run.shared_slots),
            "stacked_weights": len(plan.sliced),
            "gemm_weights": len(transposed),
            "precomputed_nodes_per_block": len(plan.outside),
            "precomputed_values": plan.hoisted_values,
            "precomputed_once": batched is not None,
            "carried": [c.initial for c in run.carried],
            "per_block_inputs": len(run.inputs),
            "per_block_outputs": len(run.outputs),
        }

    def _stacked_slots(self, plan: _Plan, batched: dict[str, str] | None, transposed: set[int],
                       first: int) -> dict[int, str]:
        """Each sliced weight slot's values for all blocks, stacked on a new axis 0: the batched
        lookup's output, the per-block computed values, or the stored weights themselves."""
        stacked = {}
        for slot in plan.sliced:
            if batched is not None and id(slot) in plan.computed:
                stacked[id(slot)] = self._transposed(batched[slot.names[0]], id(slot) in transposed, first)
            elif id(slot) in plan.computed:
                stacked[id(slot)] = self._stack_values(slot.names, id(slot) in transposed, first)
            else:
                stacked[id(slot)] = self._widen(slot, self._stack(slot, id(slot) in transposed), first)
                self.stacked_originals.update(slot.names)
        return stacked

    def _loop_node(self, run: BlockRun, mode: str, body: onnx.GraphProto, captured: list[str],
                   scanned: list[str]) -> tuple[onnx.NodeProto, list[str]]:
        """The Loop or Scan node running `body` once per block, and (Scan) the names of its
        stacked per-block outputs; a Loop reads its stacks inside the body and has none."""
        names = self.model.names
        initial = [c.initial for c in run.carried]
        final = [c.final for c in run.carried]
        node_name = names.fresh("fold/Loop" if mode == "loop" else "fold/Scan")
        if mode == "loop":
            trip_count = names.fresh("fold.trip_count")
            self.tensors.append(numpy_helper.from_array(np.array(run.length, dtype=np.int64), trip_count))
            return helper.make_node("Loop", [trip_count, "", *initial], final, name=node_name, body=body), []
        returned = [names.fresh(f"{name}.returned") for name in captured]  # unchanged, unread
        made = [names.fresh(f"{value.names[0]}.stacked") for value in run.outputs]
        node = helper.make_node("Scan", [*initial, *captured, *scanned], [*final, *returned, *made], name=node_name,
                                body=body, num_scan_inputs=len(scanned))
        return node, made

    def _batched_lookup(self, run: BlockRun, plan: _Plan, position: int) -> dict[str, str] | None:
        """The outside nodes once over stacked inputs (see BatchedLookup), or None."""
        lookup = BatchedLookup(self.model, run, plan.varies, self.found.value_types, self.stacked_weight,
                               lambda name: np.asarray(self._weight(name).read()))
        mark = (len(self.tensors), dict(self._stacks))
        found = lookup.emit()
        if found is None:  # drop the stacks made for it
            del self.tensors[mark[0]:]
            self._stacks = mark[1]
            return None
        self.tensors += lookup.tensors
        self.added += [(position, node) for node in lookup.emitted]
        return found

    def stacked_weight(self, slot: WeightSlot) -> str:
        """The [N, ...] stack of a per-block weight as stored (one per slot and run)."""
        if id(slot) not in self._stacks:
            self._stacks[id(slot)] = self._stack(slot, False)
        return self._stacks[id(slot)]

    def _transposed(self, stacked: str, transposed: bool, position: int) -> str:
        if not transposed:
            return stacked
        name = self.model.names.fresh(f"{stacked}.transposed")
        self.added.append((position, helper.make_node("Transpose", [stacked], [name], name=name, perm=[0, 2, 1])))
        return name

    def _stack_values(self, values: tuple[str, ...], transposed: bool, position: int) -> str:
        """Concat of the blocks' values, each Unsqueezed to [1, ...] (and the stack transposed
        to [N, cols, rows] for Gemm). For computed weights, all constants once the values are,
        so runtimes fold it at load and the body slices a dense tensor; for graph inputs, the
        scan input."""
        names = self.model.names
        pieces = []
        for value in values:
            piece = names.fresh(f"{value}.unsqueezed")
            if self.model.opset >= UNSQUEEZE_AXES_INPUT_OPSET:
                node = helper.make_node("Unsqueeze", [value, self._axes_zero()], [piece], name=piece)
            else:
                node = helper.make_node("Unsqueeze", [value], [piece], name=piece, axes=[0])
            self.added.append((position, node))
            pieces.append(piece)
        stacked = names.fresh(f"{values[0]}.stacked")
        concat = names.fresh(f"{stacked}.concat") if transposed else stacked
        self.added.append((position, helper.make_node("Concat", pieces, [concat], name=concat, axis=0)))
        if transposed:
            self.added.append((position, helper.make_node("Transpose", [concat], [stacked], name=stacked,
                                                          perm=[0, 2, 1])))
        return stacked

    def _unstack(self, stacked: str, values: tuple[str, ...], position: int) -> None:
        """The blocks' values back from a scan output [N, ...]: Split on the block axis, then
        Squeeze each piece to the value's own name."""
        names = self.model.names
        pieces = [names.fresh(f"{value}.piece") for value in values]
        split = names.fresh(f"{stacked}.split")
        self.added.append((position, helper.make_node("Split", [stacked], pieces, name=split, axis=0)))
        for piece, value in zip(pieces, values):
            if self.model.opset >= UNSQUEEZE_AXES_INPUT_OPSET:  # Squeeze took axes as an input from 13 too
                node = helper.make_node("Squeeze", [piece, self._axes_zero()], [value], name=names.fresh(value))
            else:
                node = helper.make_node("Squeeze", [piece], [value], name=names.fresh(value), axes=[0])
            self.added.append((position, node))

    def _axes_zero(self) -> str:
        if self._axes is None:
            self._axes = self.model.names.fresh("fold.axes0")
            self.tensors.append(numpy_helper.from_array(np.array([0], dtype=np.int64), self._axes))
        return self._axes

    def _read_shared_copy(self, run: BlockRun, plan: _Plan) -> None:
        """Nodes kept outside read the first block's copy of a weight equal in every block, so
        the other copies can go."""
        for slot in run.shared_slots:
            for port in slot.ports:
                if port.node not in plan.outside:
                    continue
                for j in range(1, run.length):
                    position = run.blocks[j][port.node]
                    self.renamed_inputs.setdefault(position, {})[slot.names[j]] = slot.names[0]

    def _widen(self, slot: WeightSlot, stacked: str, position: int) -> str:
        """onnxruntime can neither slice (Scan) nor Gather (Loop) a sub-byte tensor, so 4-bit
        and 2-bit indices stay packed in the file and are widened to bytes by a Cast before
        the loop; the body casts each slice back, so its readers see the type they expect."""
        wide = widened_dtype(slot.dtype)
        if wide is None:
            return stacked
        name = self.model.names.fresh(f"{stacked}.bytes")
        self.added.append((position, helper.make_node("Cast", [stacked], [name], name=name, to=wide)))
        return name

    def _move_into_body(self, run: BlockRun, plan: _Plan, inside: set[int]) -> tuple[list[TensorProto], dict[str, str]]:
        """The body's own initializers, and the outer names the body reads them by -> theirs.

        Shared weights that only the body's nodes read move into the body: still one copy,
        but onnxruntime treats only a subgraph's own initializers as constants there
        (outer-scope ones get no MLAS prepacking and block the fusions, Reshape, Gelu, ...,
        that need constant operands). Small ones that are also read outside (shape constants
        `tie` shared, say) are copied in under a fresh name: tract needs Unsqueeze axes and
        the like to be constants of the body, and a state variable is not."""
        moved, renamed = [], {}
        for slot in plan.shared:
            keep = slot.names[0]
            if keep not in self._moved and all(self._read_only_by(name, inside) for name in slot.names):
                self._moved.add(keep)
                self.retired.add(keep)
                moved.append(numpy_helper.from_array(np.asarray(self._weight(keep).read()), keep))
            elif slot.nbytes <= COPY_INTO_BODY_BYTES:
                renamed[keep] = self.model.names.fresh(f"{keep}.body")
                moved.append(numpy_helper.from_array(np.asarray(self._weight(keep).read()), renamed[keep]))
        return moved, renamed

    def _outer_types(self, run: BlockRun, plan: _Plan) -> dict[str, tuple[int, Dims | None]]:
        """dtype and dims of what a body may read from the outer scope: the run's invariants
        and its shared weights (a state variable must declare its element type)."""
        found = {s.names[0]: (s.dtype, tuple(s.shape)) for s in plan.shared}
        for invariant in run.invariants:
            found[invariant.name] = self.found.value_types[invariant.name]
        return found

    def _read_only_by(self, name: str, positions: set[int]) -> bool:
        if not self._readers:
            for position, node in enumerate(self.body.node):
                for read in node_reads(node):
                    self._readers.setdefault(read, set()).add(position)
        outputs = {v.name for v in self.body.output}
        return name not in outputs and self._readers.get(name, set()) <= positions

    def _weight(self, name: str):
        if not self._weights:
            self._weights.update((w.name, w) for w in self.model.weights() if w.scope is self.model.scopes[0])
        return self._weights[name]

    def _stack(self, slot: WeightSlot, transposed: bool) -> str:
        """One [N, ...] tensor holding the slot's weight of every block, in block order
        (each matrix transposed when Gemm will read it as transB)."""
        arrays = [np.asarray(self._weight(name).read()) for name in slot.names]
        if transposed:
            arrays = [a.T for a in arrays]
        name = self.model.names.fresh(f"{slot.names[0]}.stacked")
        # from_array packs ml_dtypes' sub-byte arrays (UINT4 indices) into raw_data; make_tensor
        # would spend a varint per element in int32_data and grow the file.
        self.tensors.append(numpy_helper.from_array(np.ascontiguousarray(np.stack(arrays)), name))
        return name

    def commit(self) -> int:
        """Apply the edits; return how many stored weights were removed or restacked."""
        body = self.body
        kept = [(p, self._renamed(p, n)) for p, n in enumerate(body.node) if p not in self.removed]
        nodes = topological_order(kept + self.added, available=_always_defined(body) | {t.name for t in self.tensors})
        del body.node[:]
        body.node.extend(nodes)
        body.initializer.extend(self.tensors)
        removed = self._drop_unread(self.retired)
        _prune_value_info(body)
        self.model.structure_edited()  # the new body is a scope of its own
        return removed

    def _renamed(self, position: int, node: onnx.NodeProto) -> onnx.NodeProto:
        clone = _copy(node)
        for i, name in enumerate(clone.input):
            clone.input[i] = self.renamed_inputs.get(position, {}).get(name, name)
        return clone

    def _drop_unread(self, candidates: set[str]) -> int:
        body = self.body
        read = {name for node in body.node for name in node_reads(node)} | {v.name for v in body.output}
        graph_inputs = {v.name for v in body.input}
        dropped = {n for n in candidates if n not in read and n not in graph_inputs}
        self.also_outside = self.stacked_originals - dropped
        kept_init = [t for t in body.initializer if t.name not in dropped]
        kept_nodes = [n for n in body.node if not (n.op_type == "Constant" and n.output and n.output[0] in dropped)]
        removed = len(body.initializer) - len(kept_init) + len(body.node) - len(kept_nodes)
        if removed:
            kept_init, kept_nodes = [_copy(t) for t in kept_init], [_copy(n) for n in kept_nodes]
            del body.initializer[:]
            body.initializer.extend(kept_init)
            del body.node[:]
            body.node.extend(kept_nodes)
        return removed
