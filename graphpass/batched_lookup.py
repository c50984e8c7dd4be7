"""One lookup over stacked inputs: the weight-only nodes of a run of repeated blocks,
written once over [N, ...] stacks of their per-block inputs instead of once per block.

`fold` runs the lookups of a run (a codebook pass's GatherElements of a codebook by unpacked
indices, say) before its loop rather than in the body; written once over the stacked packed
indices they keep the file as small as one lookup per block would, and runtimes fold one
lookup per weight to a constant at load.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphpass.blocks import BlockRun, Dims, Port, WeightSlot
from graphpass.edit import Model

# Unsqueeze takes its axes as an input from opset 13, as an attribute before.
UNSQUEEZE_AXES_INPUT_OPSET = 13
# GatherND's batch_dims is opset 12.
GATHER_ND_BATCH_OPSET = 12

# Ops that act element by element: with a leading block axis on some inputs, each block still
# gets what it got alone, as long as the other inputs broadcast from the right as before.
ELEMENTWISE_OPS = frozenset({
    "Cast", "Identity", "Add", "Sub", "Mul", "Div", "Mod", "Neg", "Abs", "Sqrt", "Exp", "Log", "Pow",
    "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Relu", "Clip", "Min", "Max", "Where", "Equal", "Less",
    "Greater", "Not", "And", "Or", "BitShift", "BitwiseAnd", "BitwiseOr",
})  # fmt: skip


class BatchedLookup:
    """The outside nodes of a run written once, over [N, ...] stacks of their per-block
    inputs, instead of once per block: the file keeps one copy of the lookup nodes and the
    stacked indices, as it did with the lookup in the body, and runtimes fold one lookup per
    weight at load. Each op gets a leading block axis: element-wise ops as they are, Reshape
    a leading N in its shape, Slice and GatherElements their axes moved by one, Transpose its
    perm shifted, Gather on axis 0 its indices stacked (and GatherND over the block axis when
    each block has its own table). Any other op (or a shape that is not a stored constant)
    makes `emit` return None, and the caller stacks the blocks' own outputs instead."""

    def __init__(self, model: Model, run: BlockRun, varies: frozenset[int], value_types: dict[str, tuple[int, Dims | None]],
                 stacked_weight: Callable[[WeightSlot], str], read_weight: Callable[[str], np.ndarray]):
        self.model, self.run, self.varies, self.value_types = model, run, varies, value_types
        self.stacked_weight, self.read_weight = stacked_weight, read_weight
        self.nodes = run.nodes(0)
        self.slot_at = {p: slot for slot in run.slots for p in slot.ports}
        self.weight_shapes = {name: slot.shape for slot in run.slots for name in slot.names}  # name -> shape
        self.producer = {name: k for k, node in enumerate(self.nodes) for name in node.output if name}
        self.batched: dict[str, str] = {}  # block-0 value -> its [N, ...] stack
        self.emitted: list[onnx.NodeProto] = []
        self.tensors: list[TensorProto] = []

    def emit(self) -> dict[str, str] | None:
        """Block-0 names of the outside values -> their stacks, or None if an op cannot batch."""
        for k in self._order():
            if not self._emit(k, self.nodes[k]):
                return None
        return self.batched

    def _order(self) -> list[int]:
        done: list[int] = []
        pending = sorted(self.varies)
        while pending:
            ready = [k for k in pending if all(self.producer.get(n) not in pending or self.producer[n] == k
                                               for n in self.nodes[k].input)]
            if not ready:
                raise RuntimeError("fold: the lookup nodes of a block form a cycle")
            done += ready
            pending = [k for k in pending if k not in ready]
        return done

    def _source(self, k: int, i: int, name: str) -> tuple[str, bool]:
        """What the batched node reads at input i, and whether it carries the block axis."""
        slot = self.slot_at.get(Port(k, i))
        if slot is not None:
            if slot.equal:
                return slot.names[0], False
            return self.stacked_weight(slot), True
        if name in self.batched:
            return self.batched[name], True
        return name, False  # made by a weight-only node every block shares (block 0's copy)

    def _rank(self, name: str) -> int | None:
        if name in self.weight_shapes:
            return len(self.weight_shapes[name])
        dims = self.value_types.get(name, (None, None))[1]
        return None if dims is None else len(dims)

    def _constant(self, k: int, i: int) -> np.ndarray | None:
        slot = self.slot_at.get(Port(k, i))
        if slot is None or not slot.equal:
            return None
        return self.read_weight(slot.names[0])

    def _int64s(self, base: str, values) -> str:
        name = self.model.names.fresh(base)
        self.tensors.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
        return name

    def _offset_gather(self, node: onnx.NodeProto, inputs: list[str]) -> list[str] | None:
        """Inputs for one Gather over the N tables laid end to end, each block's indices shifted
        by its table's offset, or None where the table's shape or the indices' type is unknown.
        GatherND would need the indices as int64 with a trailing axis: two more copies of them,
        twice as wide, while the runtime rebuilds the weights at load."""
        table_dims = self._dims(node.input[0])
        index_rank, index_type = self._rank(node.input[1]), self._elem_type(node.input[1])
        if not table_dims or None in table_dims or index_rank is None or index_type not in (TensorProto.INT32,
                                                                                              TensorProto.INT64):
            return None
        names, rows = self.model.names, table_dims[0]
        flat = names.fresh(f"{node.input[0]}.end_to_end")
        shape = self._int64s(f"{node.input[0]}.end_to_end_shape", [self.run.length * rows, *table_dims[1:]])
        self.emitted.append(helper.make_node("Reshape", [inputs[0], shape], [flat], name=flat))
        offsets = (np.arange(self.run.length) * rows).reshape([self.run.length] + [1] * index_rank)
        offset_name = names.fresh(f"{node.input[1]}.table_offsets")
        self.tensors.append(numpy_helper.from_array(offsets.astype(helper.tensor_dtype_to_np_dtype(index_type)),
                                                    offset_name))
        shifted = names.fresh(f"{node.input[1]}.shifted")
        self.emitted.append(helper.make_node("Add", [inputs[1], offset_name], [shifted], name=shifted))
        return [flat, shifted]

    def _dims(self, name: str) -> tuple | None:
        if name in self.weight_shapes:
            return tuple(self.weight_shapes[name])
        return self.value_types.get(name, (None, None))[1]

    def _elem_type(self, name: str) -> int | None:
        return self.value_types.get(name, (None, None))[0]

    def _as_nd_indices(self, indices: str, node: onnx.NodeProto) -> str:
        """Gather's indices [N, ...] as GatherND's: int64, with a trailing axis of 1."""
        names = self.model.names
        wide, nd = names.fresh(f"{indices}.int64"), names.fresh(f"{indices}.nd")
        self.emitted.append(helper.make_node("Cast", [indices], [wide], name=wide, to=TensorProto.INT64))
        if self.model.opset >= UNSQUEEZE_AXES_INPUT_OPSET:
            axes = self._int64s(f"{node.name or 'gather'}.last_axis", [-1])
            self.emitted.append(helper.make_node("Unsqueeze", [wide, axes], [nd], name=nd))
        else:
            self.emitted.append(helper.make_node("Unsqueeze", [wide], [nd], name=nd, axes=[-1]))
        return nd

    def _emit(self, k: int, node: onnx.NodeProto) -> bool:
        sources = [self._source(k, i, n) if n else ("", False) for i, n in enumerate(node.input)]
        inputs = [name for name, _ in sources]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        op = node.op_type
        stacked_rank = max((self._rank(n) or 0) for n, (_, b) in zip(node.input, sources) if b)
        if op in ELEMENTWISE_OPS:
            if len({self._rank(n) for n, (_, b) in zip(node.input, sources) if b}) != 1:
                return False  # stacks of different ranks would broadcast block against block
            for name, (_, batched) in zip(node.input, sources):
                if name and not batched and (self._rank(name) is None or self._rank(name) > stacked_rank):
                    return False  # would broadcast against the block axis
        elif op == "Reshape":
            shape = self._constant(k, 1)
            if shape is None or sources[1][1] or not sources[0][1]:
                return False
            inputs[1] = self._int64s(f"{node.input[1]}.stacked", [self.run.length, *shape.tolist()])
        elif op == "Slice":
            if self.model.opset < 10 or not sources[0][1] or any(b for _, b in sources[1:]):
                return False
            axes = self._constant(k, 3) if len(node.input) > 3 and node.input[3] else None
            starts = self._constant(k, 1)
            if starts is None or (axes is None and len(node.input) > 3 and node.input[3]):
                return False
            axes = np.arange(len(starts)) if axes is None else axes
            moved = [a + 1 if a >= 0 else a for a in axes.tolist()]
            inputs = inputs[:3] + [self._int64s(f"{node.name or op}.axes", moved)] + inputs[4:]
        elif op == "GatherElements":
            if not (sources[0][1] and sources[1][1]):
                return False
            attrs["axis"] = _shifted(attrs.get("axis", 0))
        elif op == "Gather":
            rank = self._rank(node.input[0])
            if not sources[1][1] or rank is None or attrs.get("axis", 0) % rank != 0:
                return False
            if sources[0][1]:  # each block its own table
                offset = self._offset_gather(node, inputs)
                if offset is not None:
                    inputs = offset
                elif self.model.opset < GATHER_ND_BATCH_OPSET:
                    return False
                else:
                    inputs[1] = self._as_nd_indices(inputs[1], node)
                    op, attrs = "GatherND", {"batch_dims": 1}
        elif op == "Transpose":
            rank = self._rank(node.input[0])
            if rank is None:
                return False
            perm = attrs.get("perm", list(reversed(range(rank))))
            attrs["perm"] = [0] + [p % rank + 1 for p in perm]
        else:
            return False
        outputs = []
        for out in node.output:
            outputs.append(self.model.names.fresh(f"{out}.stacked") if out else "")
            if out:
                self.batched[out] = outputs[-1]
        name = self.model.names.fresh(f"{node.name or op}.stacked")
        self.emitted.append(helper.make_node(op, inputs, outputs, name=name, domain=node.domain, **attrs))
        return True


def _shifted(axis: int) -> int:
    """An axis of a value that gained a leading block axis (negative axes count from the end)."""
    return axis + 1 if axis >= 0 else axis


__all__ = ["BatchedLookup", "ELEMENTWISE_OPS", "UNSQUEEZE_AXES_INPUT_OPSET"]
