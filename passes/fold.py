"""fold: run repeated blocks as one Loop (or Scan) instead of N unrolled copies.

The runs come from `graphpass.blocks.RepeatedBlocks`. A run whose weights are equal in every
block (after `tie`, or already) becomes a Loop with trip count N whose body is the first
block, holding the one remaining copy of each weight as its own initializer: weight bytes
drop to one block's worth. A run whose weights differ keeps one [N, ...] stack per weight,
fed as Scan inputs or sliced by Gather on the iteration number inside a Loop; the bytes
stay, the nodes drop to one block.

Lookup weights (a codebook pass's GatherElements of a codebook by unpacked indices, and any
other node computed from weights alone that depends on a per-block weight) are not run in
the body, where nothing is constant and every iteration would rebuild them (4-5x the
latency on BERT). They run once before the loop, over the stacked packed indices (see
`graphpass.batched_lookup`), or once per block with the results stacked when an op has no batched
form; runtimes fold either to a constant at load and the body slices dense weights. The
file keeps the packed indices. With the `memory` objective they stay in the body, where
the weights stay compressed in memory.

Blocks that read a graph input each (a decoder layer's past keys and values) and make a
graph output each (its present keys and values) fold into a Scan too: the inputs are stacked
[N, ...] before it (Unsqueeze, Concat) and enter as scan inputs, the body's outputs leave as
scan outputs and are split back into the graph outputs after it (Split, Squeeze).

The Scan runs in onnxruntime, OpenVINO and tract: the body reads nothing from the outer
scope (what it needs enters as a state variable returned unchanged, or as its own copy of a
small constant) and declares no symbolic dims. tract has no Loop, so with tract as a target
every fold is a Scan (mode=loop leaves the run unfolded, with a note).

The body computes what each block computed, so the pass is lossless up to float rounding:
a MatMul whose weight changes per iteration runs without MLAS prepacking, which sums in
another order (about 1e-6 absolute on BERT, as much as onnxruntime's own optimisation
levels differ on the unrolled model).

The body is built with onnx-graphsurgeon (import of the block, typed signature, port
rewiring, cleanup, ordering, export). The main graph is edited in place instead: a
graphsurgeon round trip would rewrite every unrelated node and tensor (dropping doc strings,
re-encoding attributes) and its cleanup() would also drop dead weights other passes own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from heapq import heapify, heappop, heappush

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

from graphpass.batched_lookup import ELEMENTWISE_OPS, UNSQUEEZE_AXES_INPUT_OPSET, BatchedLookup
from graphpass.blocks import (
    BlockAnalysis, BlockRun, CarriedValue, Dims, PerBlockValue, Port, RepeatedBlocks, WeightSlot, node_reads,
)
from graphpass.edit import Model
from graphpass.manager import Option, Pass, PassContext, PassResult, register
from graphpass.weights import element_bits, stored_bytes

# Stacking per-block weights saves no bytes and costs a slice per iteration: worth it only
# when the run is long enough for the node count to matter.
MIN_STACKED_BLOCKS = 3
# Scan needs opset 9 (its current signature); Loop works from opset 1.
SCAN_MIN_OPSET = 9
# Gemm without a C input is opset 11.
GEMM_MIN_OPSET = 11
# Below this many elements the per-call packing that Gemm's transB saves costs less than the
# five small nodes (Reshape, Shape, Slice, Concat, Reshape) it takes to express it.
GEMM_MIN_ELEMENTS = 1 << 16
# A shared weight the body reads that is also read outside the run is copied into the body
# up to this size (shape constants, scalars): there it is a constant, as runtimes need.
COPY_INTO_BODY_BYTES = 1024
# Never computed before the loop (see _may_precompute): random ops differ per call...
RANDOM_OPS = frozenset({
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
})  # fmt: skip
# ... and onnxruntime does not fold these (it keeps QDQ pairs for its fusions, MatMulNBits
# among them): outside the loop they would run at every call, once per block and then
# stacked. They stay in the body unless tract is a target, which needs their scales constant.
QUANTIZE_OPS = frozenset({"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear"})
GEMM_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE})


@register
class FoldPass(Pass):
    name = "fold"
    summary = "run repeated blocks as one Loop over shared weights, or over per-block weights stacked [N, ...]"
    lossless = True
    options = (
        Option(
            "stack", bool, True,
            f"also fold runs of {MIN_STACKED_BLOCKS}+ blocks whose weights differ, stacked [N, ...]",
        ),
        Option(
            "mode", str, "auto",
            "how stacked weights are sliced: scan (Scan inputs), loop (Gather on the iteration number), "
            "auto (scan: measured faster in onnxruntime, see bench/bench_fold.py)",
            choices=("auto", "loop", "scan"),
        ),
        Option("min_blocks", int, 2, "fold runs of at least this many blocks", low=2),
    )  # fmt: skip

    def call(self, ctx: PassContext) -> PassResult:
        result = PassResult()
        found: BlockAnalysis = ctx.analysis(RepeatedBlocks)
        for unsafe in found.unsafe:
            result.notes.append(f"fold: left the block starting at '{unsafe.first_node}' unfolded: {unsafe.reason}")
        if not found.runs:
            result.notes.append("fold: no repeated blocks found; the model is unchanged")
            return result
        self._types = found.value_types
        modes = {id(run): self._mode(run, ctx) for run in found.runs}
        chosen = [run for run in found.runs if self._foldable(run, modes[id(run)], ctx, result)]
        if not chosen:
            return result
        hoist = ctx.deployment.objective != "memory"
        keep_in_body = RANDOM_OPS | (frozenset() if ctx.deployment.needs_constant_quantize_params else QUANTIZE_OPS)
        plans = {}
        for run in list(chosen):
            plans[id(run)], why_not = plan_run(run, found.value_types, hoist, keep_in_body)
            if why_not:
                result.notes.append(f"fold: the lookups of the run at '{run.nodes(0)[0].name}' stay in the loop body, "
                                    f"rebuilt at every iteration: {why_not}")
            steps = plans[id(run)].sliced or run.inputs
            if modes[id(run)] == "scan" and not steps and not _scan_over_copies(run, plans[id(run)]):
                result.notes.append(f"fold: left the run at '{run.nodes(0)[0].name}' unfolded: a target "
                                    "runtime has no Loop, and no small float weight could give a Scan its steps")
                chosen.remove(run)
        if not chosen:
            return result
        with quiet_graphsurgeon():
            rewrite = _Rewrite(ctx.model, found)
            folded = [rewrite.fold(run, modes[id(run)], plans[id(run)]) for run in chosen]
            result.tensors_changed = rewrite.commit()
        if rewrite.also_outside:
            result.notes.append(
                f"fold: {len(rewrite.also_outside)} per-block weights are also read outside their run, "
                f"so they stay stored besides their stack (e.g. {sorted(rewrite.also_outside)[0]})"
            )
        result.changed = True
        result.details["runs"] = folded
        for info in folded:
            result.notes.append(
                f"fold: {info['blocks']} blocks of {info['nodes_per_block']} nodes -> one {info['op']} "
                f"({info['shared_weights']} shared weights, {info['stacked_weights']} stacked"
                + (f", {info['gemm_weights']} of them read by Gemm(transB=1))" if info["gemm_weights"] else ")")
            )
            if info["per_block_inputs"] or info["per_block_outputs"]:
                result.notes.append(
                    f"fold: each block's own graph inputs ({info['per_block_inputs']} per block) are stacked into "
                    f"scan inputs, its graph outputs ({info['per_block_outputs']} per block) split from scan outputs"
                )
            if info["precomputed_values"]:
                how = (
                    "rebuilt once, over the stacked stored inputs," if info["precomputed_once"]
                    else f"rebuilt per block ({info['precomputed_nodes_per_block']} nodes each) and stacked"
                )
                result.notes.append(
                    f"fold: {info['precomputed_values']} per-block weights are lookups: {how} before the "
                    f"{info['op']}, so runtimes fold them to constants at load and the body does no lookup"
                )
        return result

    def _foldable(self, run: BlockRun, mode: str, ctx: PassContext, result: PassResult) -> bool:
        where = f"run of {run.length} blocks at '{run.nodes(0)[0].name or run.nodes(0)[0].op_type}'"
        reason = None
        if mode == "loop" and not ctx.deployment.runs_loop:
            why = "mode=loop" if self.config["mode"] == "loop" else f"Scan needs opset {SCAN_MIN_OPSET}"
            reason = f"a target runtime does not run Loop ({', '.join(ctx.deployment.without_loop)}), and {why}"
        elif run.length < self.config["min_blocks"]:
            reason = f"shorter than min_blocks={self.config['min_blocks']}"
        elif run.per_block_slots and not self.config["stack"]:
            reason = f"{len(run.per_block_slots)} weights differ between blocks and stack=false"
        elif run.per_block_slots and run.length < MIN_STACKED_BLOCKS:
            reason = f"weights differ between blocks; stacking pays only for {MIN_STACKED_BLOCKS}+ blocks"
        elif mode == "loop" and (run.inputs or run.outputs):
            reason = "its blocks read or make graph inputs or outputs of their own, which only a Scan slices and stacks"
        elif any(c.dtype is None for c in run.carried):
            reason = "the type of a carried value is unknown (shape inference could not tell)"
        elif any(v.dtype is None or v.dims is None for v in run.inputs + run.outputs):
            reason = "the type of a graph input or output of a block is unknown (shape inference could not tell)"
        elif mode == "scan" and any(i.name not in self._types for i in run.invariants):
            # a Scan takes it as a state variable, which must declare its element type
            reason = "the type of a value every block reads is unknown (shape inference could not tell)"
        if reason:
            result.notes.append(f"fold: left the {where} unfolded: {reason}")
        return reason is None

    def _mode(self, run: BlockRun, ctx: PassContext) -> str:
        """Scan unless told otherwise (or the opset predates it).

        Both slice a stacked weight per iteration; Scan hands out views of the stack where
        Gather copies, and it measured faster on BERT. A run of shared weights only is a Loop
        (a Scan takes its trip count from a scan input, see _scan_over_copies), except when a
        target runtime has no Loop (tract). The choice is fixed rather than timed per model, so a run always writes
        the same bytes."""
        if self.config["mode"] == "loop" or ctx.model.opset < SCAN_MIN_OPSET:
            return "loop"
        if not run.per_block_slots and not run.inputs and ctx.deployment.runs_loop:
            return "loop"
        return "scan"


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


@contextmanager
def quiet_graphsurgeon() -> Iterator[None]:
    """graphsurgeon warns about things that are fine here (outer-scope names, say)."""
    with gs.logger.G_LOGGER.suppress(gs.logger.G_LOGGER.ERROR):
        yield


# -- what stays outside the loop ------------------------------------------------------------


@dataclass
class _Plan:
    """How one run is split between the main graph and the body.

    `outside` are the template nodes (aligned indices) that every block keeps in the main
    graph: the nodes computed from weights alone that depend on a per-block weight (a
    codebook lookup, say), with the weight-only nodes they read. `body` are the nodes the
    body runs. `sliced` are what the body reads per iteration: per-block weights that body
    nodes read, then the values the outside nodes compute for them (`computed`).
    """

    outside: frozenset[int]
    body: frozenset[int]
    sliced: list[WeightSlot]
    computed: set[int]  # ids of the sliced entries that are computed values, not stored weights
    shared: list[WeightSlot]  # shared weights the body reads (ports in body nodes only)
    varies: frozenset[int] = frozenset()  # the outside nodes that depend on a per-block weight
    hoisted_values: int = 0


def plan_run(run: BlockRun, types: dict, hoist: bool, keep_in_body: frozenset[str]) -> tuple[_Plan, str | None]:
    """The split of a run, and why its lookups stay in the body when it has some.

    With `hoist`, the lookups (nodes computed from weights alone that depend on a per-block
    weight) run before the loop and the body slices their dense results, which runtimes
    fold to constants at load. Without, or when a looked-up value's type or shape is
    unknown, the lookup nodes are part of the body and their packed inputs are stacked:
    weights stay compressed in memory, and every iteration rebuilds them."""
    varies = _weight_computed(run, keep_in_body)
    reason = None
    computed: list[WeightSlot] = []
    if varies and not hoist:
        reason = "the objective is memory, and there they stay compressed"
    elif varies:
        computed, reason = _computed_values(run, varies, types)
    if reason:
        varies, computed = set(), []
    body = _live_nodes(run, varies)
    outside = _with_weight_inputs(run, varies)
    sliced = []
    for slot in run.per_block_slots:
        ports = tuple(p for p in slot.ports if p.node in body)
        if ports:
            sliced.append(slot if ports == slot.ports else replace(slot, ports=ports))
    shared = []
    for slot in run.shared_slots:
        ports = tuple(p for p in slot.ports if p.node in body)
        if ports:
            shared.append(slot if ports == slot.ports else replace(slot, ports=ports))
    plan = _Plan(frozenset(outside), frozenset(body), sliced + computed, {id(c) for c in computed}, shared,
                 frozenset(varies), len(computed))
    return plan, reason


def _scan_over_copies(run: BlockRun, plan: _Plan) -> bool:
    """Give a run of shared weights only a scan input: N copies of its smallest float weight
    read element-wise (a bias, a LayerNorm scale). Scan takes its trip count from its scan
    inputs, and tract drops one the body does not read ("No scan input"); a few hundred
    bytes buy a Scan where tract has no Loop."""
    readers_ok = {"LayerNormalization", "MatMul", "Gemm"} | ELEMENTWISE_OPS
    nodes = run.nodes(0)
    candidates = [
        slot for slot in plan.shared
        if slot.dtype in GEMM_TYPES and slot.shape and all(nodes[p.node].op_type in readers_ok for p in slot.ports)
    ]
    if not candidates:
        return False
    chosen = min(candidates, key=lambda slot: slot.nbytes)
    plan.shared.remove(chosen)
    plan.sliced.append(replace(chosen, names=(chosen.names[0],) * run.length, equal=False))
    return True


def _node_inputs(run: BlockRun):
    """(aligned index, node, [(input index, name, weight slot or None, in-block producer or None)])."""
    nodes = run.nodes(0)
    slot_at = {p: slot for slot in run.slots for p in slot.ports}
    producer = {name: k for k, node in enumerate(nodes) for name in node.output if name}
    for k, node in enumerate(nodes):
        reads = [(i, name, slot_at.get(Port(k, i)), producer.get(name)) for i, name in enumerate(node.input) if name]
        yield k, node, reads


def _weight_computed(run: BlockRun, keep_in_body: frozenset[str]) -> set[int]:
    """Template nodes computed from weights alone that depend on a per-block weight."""
    per_block = {id(s) for s in run.per_block_slots}
    inputs = list(_node_inputs(run))
    constant: set[int] = set()
    varies: set[int] = set()
    changed = True
    while changed:  # the aligned order need not be topological; a few sweeps settle it
        changed = False
        for k, node, reads in inputs:
            if k in constant or not _may_precompute(node, keep_in_body):
                continue
            if all(slot is not None or source in constant for _, _, slot, source in reads):
                constant.add(k)
                if any((slot is not None and id(slot) in per_block) or source in varies
                       for _, _, slot, source in reads):
                    varies.add(k)
                changed = True
    return varies


def _may_precompute(node: onnx.NodeProto, keep_in_body: frozenset[str]) -> bool:
    """Whether a node computed from weights alone may run before the loop (see RANDOM_OPS)."""
    if node.domain not in ("", "ai.onnx") or node.op_type in keep_in_body:
        return False
    return not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _computed_values(run: BlockRun, varies: set[int], types: dict) -> tuple[list[WeightSlot], str | None]:
    """The outputs of `varies` nodes that other block nodes read, as slots of per-block values."""
    nodes = run.nodes(0)
    carried = {c.source for c in run.carried}
    readers: dict[tuple[int, int], list[Port]] = {}
    made_by = {name: (k, slot) for k in varies for slot, name in enumerate(nodes[k].output) if name}
    for k, _, reads in _node_inputs(run):
        if k in varies:
            continue
        for i, name, _, _ in reads:
            if name in made_by:
                readers.setdefault(made_by[name], []).append(Port(k, i))
    values = []
    for (k, slot), ports in sorted(readers.items()):
        if (k, slot) in carried:
            return [], f"'{nodes[k].output[slot]}' is computed from weights and carried"
        names = tuple(run.nodes(j)[k].output[slot] for j in range(run.length))
        dtype, dims = types.get(names[0], (None, None))
        if dtype is None or dims is None or not all(isinstance(d, int) for d in dims):
            return [], f"the type or shape of '{names[0]}' is unknown"
        values.append(WeightSlot(tuple(ports), names, dtype, tuple(dims), False, stored_bytes(dtype, dims)))
    return values, None


def _live_nodes(run: BlockRun, precomputed: set[int]) -> set[int]:
    """Template nodes the body needs for the carried values and per-block outputs, given what
    comes precomputed."""
    nodes = run.nodes(0)
    producer = {name: k for k, node in enumerate(nodes) for name in node.output if name}
    stack = [c.source[0] for c in run.carried] + [v.source[0] for v in run.outputs]
    live: set[int] = set()
    while stack:
        k = stack.pop()
        if k in live or k in precomputed:
            continue
        live.add(k)
        stack.extend(producer[n] for n in node_reads(nodes[k]) if n in producer)
    return live


def _with_weight_inputs(run: BlockRun, varies: set[int]) -> set[int]:
    """`varies` and the in-block nodes they read from (weight-only ones, by construction)."""
    nodes = run.nodes(0)
    producer = {name: k for k, node in enumerate(nodes) for name in node.output if name}
    found, stack = set(), list(varies)
    while stack:
        k = stack.pop()
        if k not in found:
            found.add(k)
            stack.extend(producer[n] for n in nodes[k].input if n in producer)
    return found


# -- the rewrite --------------------------------------------------------------------------


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
        names = self.model.names
        opset = self.model.opset
        first = min(run.all_positions())
        transposed = {id(s) for s in plan.sliced if feeds_matmul_b_only(run, s, opset)}
        self._stacks = {}
        batched = self._batched_lookup(run, plan, first) if plan.computed else None
        stacked = {}
        for slot in plan.sliced:
            if batched is not None and id(slot) in plan.computed:
                stacked[id(slot)] = self._transposed(batched[slot.names[0]], id(slot) in transposed, first)
            elif id(slot) in plan.computed:
                stacked[id(slot)] = self._stack_values(slot.names, id(slot) in transposed, first)
            else:
                stacked[id(slot)] = self._widen(slot, self._stack(slot, id(slot) in transposed), first)
                self.stacked_originals.update(slot.names)
        for slot in run.slots:
            self.retired.update(slot.names)  # each dropped only once nothing reads it
        if batched is not None:  # the weight-only nodes the batched lookup reads: block 0's copy
            outside = {run.blocks[0][k] for k in plan.outside - plan.varies}
        else:
            outside = {run.blocks[j][k] for j in range(run.length) for k in plan.outside}
            self._read_shared_copy(run, plan)
        opsets = self.model.proto.opset_import
        # Weights the outside nodes read stay in the main graph (the batched lookup reads the
        # same names), so only what the body alone reads may move into it.
        in_body = run.all_positions() - {run.blocks[j][k] for j in range(run.length) for k in plan.outside}
        moved, renamed = self._move_into_body(run, plan, in_body)
        activations = [self._stack_values(value.names, False, first) for value in run.inputs]
        builder = _BodyBuilder(run, plan.sliced, self.found.value_types, names, mode, stacked, transposed, opsets,
                               {t.name for t in moved}, renamed, self._outer_types(run, plan))
        body, captured = builder.build()
        body.initializer.extend(moved)
        initial = [c.initial for c in run.carried]
        final = [c.final for c in run.carried]
        node_name = names.fresh("fold/Loop" if mode == "loop" else "fold/Scan")
        if mode == "loop":
            trip_count = names.fresh("fold.trip_count")
            self.tensors.append(numpy_helper.from_array(np.array(run.length, dtype=np.int64), trip_count))
            node = helper.make_node("Loop", [trip_count, "", *initial], final, name=node_name, body=body)
        else:
            scanned = [stacked[id(s)] for s in plan.sliced] + activations
            returned = [names.fresh(f"{name}.returned") for name in captured]  # unchanged, unread
            made = [names.fresh(f"{value.names[0]}.stacked") for value in run.outputs]
            node = helper.make_node(
                "Scan", [*initial, *captured, *scanned], [*final, *returned, *made], name=node_name, body=body,
                num_scan_inputs=len(scanned),
            )
        positions = run.all_positions()
        self.removed |= positions - outside
        self.added.append((max(positions), node))
        if mode == "scan":
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
            "carried": initial,
            "per_block_inputs": len(run.inputs),
            "per_block_outputs": len(run.outputs),
        }

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


# -- graph helpers ------------------------------------------------------------------------


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


__all__ = ["FoldPass", "topological_order", "quiet_graphsurgeon", "Dims"]
