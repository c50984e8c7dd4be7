"""What stays outside the loop: how one run is split between the main graph and the body."""

from __future__ import annotations

from dataclasses import dataclass, replace

import onnx

from graphpass.batched_lookup import ELEMENTWISE_OPS
from graphpass.blocks import BlockRun, Port, WeightSlot, node_reads
from graphpass.passes.fold.loop_body import GEMM_TYPES
from graphpass.weights import stored_bytes


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
