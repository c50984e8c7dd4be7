"""Repeated blocks: maximal runs of consecutive subgraphs that match by structure, not by name.

Exporters give nodes and weights meaningless names (`onnx::MatMul_1234`, `val_56`), so runs
are found from the graph alone:

1. Seeds. Every value gets a hash of the computation above it: a few rounds of
   Weisfeiler-Lehman refinement over op type, attributes, dtype and rank of each node, with
   its inputs in port order. Values that play the same role in identical blocks hash alike,
   and a hash class whose members lie on one dependency chain gives candidate cut points.
2. Template. The nodes between two consecutive cut points (those that depend on the first
   and feed the second, plus feeders only they read, such as a per-block weight lookup) are
   the template block; a middle one, as first and last blocks are where exporters differ.
3. Matching. From the last cut point backwards, the template is matched against the graph
   port by port (wiring, not node order), each match giving the value the block carries in,
   where the previous block ends. Forwards, the template's path from its entry to its exit,
   walked from the last block's exit, predicts the next exit and a match confirms it. A run
   stops where a match fails (a first block that shares a Shape chain with the embedding),
   so what remains is the largest clean run.
4. Phase. Values next to a skip connection see earlier blocks within a few hash rounds, so
   the residual stream, the natural cut, is rarely a seed. The best seed is therefore re-cut
   at every narrow place of its block (few values crossing) and matched again; the phase
   that covers most nodes, shares most weights and carries fewest values wins.
5. Loop check. Every value a block reads from outside is carried (the previous block makes
   it, at the same place each time), loop-invariant (one value for every block, made before
   the run: masks, position tables, shared Shape chains), a weight (one per block, same
   dtype and shape; equal across blocks or not) or a graph input of its own (one per block:
   a decoder layer's past keys and values). A block value that is a graph output at the same
   place in every block (a decoder layer's present keys and values) is a per-block output;
   any other block value read outside the run (a side output) keeps that block out, and it
   is reported.

Only the top-level graph is searched; a block holding a subgraph node (If, Loop) never matches.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import onnx
from onnx import TensorProto, helper

from graphpass.analysis import ExactDuplicates
from graphpass.edit import Model
from graphpass.manager import Analysis, PassContext
from graphpass.report import human_bytes
from graphpass.scopes import Scope, subgraphs_of
from graphpass.weights import WeightRef

# Refinement rounds: enough to tell apart the values of one block (q, k and v projections
# differ two levels up), few enough that the hash of a block output stays within its block.
WL_ROUNDS = 6
# Candidate cut classes examined, largest classes first; real models need a few hundred.
MAX_CANDIDATE_CLASSES = 400
# Candidate next-block exits kept at each step of a forward walk.
MAX_PATH_BRANCHES = 8
# Blocks between cut points compared when choosing the template (evenly spaced).
TEMPLATE_SAMPLES = 5

# Name suffixes of the tensors a codebook pass stores (graphpass.lowering.lookup), shown by inspect.
LOOKUP_ROLES = ("codebook", "indices", "quantized", "scale", "zero_point")

# Dims of a value: an int where static, a symbol name where symbolic, None where unknown.
Dims = tuple[int | str | None, ...]


# -- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Port:
    """An input of a block node: `node` indexes the block's aligned node list."""

    node: int
    index: int


@dataclass
class WeightSlot:
    """One weight the block reads, and which tensor each block of the run reads there."""

    ports: tuple[Port, ...]
    names: tuple[str, ...]  # first block first
    dtype: int
    shape: tuple[int, ...]
    equal: bool  # the same values in every block (one shared tensor, or byte-equal copies)
    nbytes: int  # of one copy

    @property
    def shared(self) -> bool:
        return len(set(self.names)) == 1

    @property
    def role(self) -> str | None:
        """The role of a lookup weight (`.codebook`, `.lut_indices`, ...), if it has one."""
        tail = self.names[0].rsplit(".", 1)[-1].removeprefix("lut_")
        return tail if tail in LOOKUP_ROLES else None


@dataclass
class CarriedValue:
    """A value each block hands to the next: the loop-carried state of a folded run."""

    ports: tuple[Port, ...]
    source: tuple[int, int]  # (aligned node, output index) that produces it in every block
    initial: str  # what the first block reads
    final: str  # what the last block produces; the run's result
    dtype: int | None
    dims: Dims | None  # None when the rank is unknown


@dataclass
class Invariant:
    """A value every block reads unchanged (a mask, a position table, a shared shape)."""

    name: str
    ports: tuple[Port, ...]


@dataclass
class PerBlockValue:
    """A graph input each block reads (`ports`) or a graph output each block makes (`source`):
    one value per block, `names` first block first, stacked along a new leading axis when the
    run is folded."""

    names: tuple[str, ...]
    dtype: int | None
    dims: Dims | None
    ports: tuple[Port, ...] = ()
    source: tuple[int, int] | None = None  # (aligned node, output index), for an output


@dataclass
class BlockRun:
    """Consecutive blocks with one structure. `blocks[j][k]` is the scope position of the
    k-th node of block j; the k-th node plays the same role in every block."""

    scope: Scope
    blocks: list[list[int]]
    carried: list[CarriedValue]
    invariants: list[Invariant]
    slots: list[WeightSlot]
    inputs: list[PerBlockValue] = field(default_factory=list)  # graph inputs, one per block
    outputs: list[PerBlockValue] = field(default_factory=list)  # graph outputs, one per block

    @property
    def length(self) -> int:
        return len(self.blocks)

    @property
    def nodes_per_block(self) -> int:
        return len(self.blocks[0])

    def nodes(self, block: int) -> list[onnx.NodeProto]:
        return [self.scope.body.node[i] for i in self.blocks[block]]

    def all_positions(self) -> set[int]:
        return {i for block in self.blocks for i in block}

    @property
    def shared_slots(self) -> list[WeightSlot]:
        return [s for s in self.slots if s.equal]

    @property
    def per_block_slots(self) -> list[WeightSlot]:
        return [s for s in self.slots if not s.equal]


@dataclass
class UnsafeBlocks:
    """Blocks that match the run's structure but cannot be folded, and why."""

    first_node: str
    nodes_per_block: int
    reason: str


@dataclass
class BlockAnalysis:
    runs: list[BlockRun]
    unsafe: list[UnsafeBlocks] = field(default_factory=list)
    value_types: dict[str, tuple[int, Dims | None]] = field(default_factory=dict)


class RepeatedBlocks(Analysis):
    """Runs of repeated blocks in the top-level graph (see the module docstring)."""

    @classmethod
    def compute(cls, ctx: PassContext) -> BlockAnalysis:
        scope = ctx.model.scopes[0]
        types = infer_value_types(ctx.model)
        index = GraphIndex(scope, [w for w in ctx.model.weights() if w.scope is scope], types)
        groups = ctx.analysis(ExactDuplicates)
        same_bytes = {w.name: i for i, g in enumerate(groups) for w in g.members if w.scope is scope}
        finder = _RunFinder(index, same_bytes)
        runs, unsafe = finder.find()
        return BlockAnalysis(runs, unsafe, types)


# -- graph index --------------------------------------------------------------------------


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


# -- structural hashing -------------------------------------------------------------------


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


# -- blocks -------------------------------------------------------------------------------


@dataclass
class _Template:
    nodes: list[int]  # scope positions, in topological order
    node_set: set[int]
    entry: str  # the carried value it starts from
    exit: str  # the value it ends at


@dataclass
class _Match:
    nodes: list[int]  # aligned with the template's nodes
    reads: dict[Port, str]  # values read from outside the block, by port
    entry: str | None  # what the block reads where the template reads its entry
    exit: str  # the value it ends at

    @property
    def node_set(self) -> set[int]:
        return set(self.nodes)


def template_between(index: GraphIndex, entry: str, exit_: str) -> _Template | None:
    """The nodes that depend on `entry` and feed `exit_`, plus feeders only they read."""
    upstream = index.ancestors(exit_)
    region = upstream & index.descendants(entry)
    if not region or index.produced_by(exit_) not in region:
        return None
    before_entry = index.ancestors(entry)
    # Reverse topological order: a feeder's readers are decided before the feeder itself.
    for position in sorted(upstream - region - before_entry - index.weight_nodes, reverse=True):
        outputs = [name for name in index.nodes[position].output if name]
        readers = [r for name in outputs for r in index.readers.get(name, [])]
        if readers and all(r in region for r in readers) and not any(n in index.graph_outputs for n in outputs):
            region.add(position)
    nodes = sorted(region)
    return _Template(nodes, set(nodes), entry, exit_)


class _Matcher:
    """Matches the template against the graph backwards from a candidate exit value."""

    def __init__(self, index: GraphIndex, template: _Template):
        self.index = index
        self.template = template
        self.aligned = {position: k for k, position in enumerate(template.nodes)}

    def match(self, exit_: str) -> _Match | None:
        index, template = self.index, self.template
        start = index.producer.get(exit_)
        if start is None or start[1] != index.producer[template.exit][1]:
            return None
        node_map: dict[int, int] = {}
        claimed: set[int] = set()
        values: dict[str, str] = {}
        sources: dict[str, str] = {}  # the inverse of values, so two template values never meet
        reads: dict[Port, str] = {}
        pending = [(index.producer[template.exit][0], start[0])]
        while pending:
            mine, theirs = pending.pop()
            if mine in node_map:
                if node_map[mine] != theirs:
                    return None
                continue
            if theirs in claimed or theirs in index.weight_nodes or not self._same_node(mine, theirs):
                return None
            node_map[mine] = theirs
            claimed.add(theirs)
            k = self.aligned[mine]
            ours, other = index.nodes[mine], index.nodes[theirs]
            for port, (a, b) in enumerate(zip(ours.input, other.input)):
                step = self._match_input(a, b, Port(k, port), values, sources, reads)
                if step is False:
                    return None
                if step is not True:
                    pending.append(step)
        if len(node_map) != len(template.nodes):
            return None
        nodes = [node_map[p] for p in template.nodes]
        own = {name for p in nodes for name in index.nodes[p].output}
        if any(value in own for value in reads.values()):
            return None  # the candidate reads its own value where the template reads an outside one
        return _Match(nodes, reads, values.get(template.entry), exit_)

    def _same_node(self, mine: int, theirs: int) -> bool:
        if self.index.signature(mine) != self.index.signature(theirs):
            return False
        ours, other = self.index.nodes[mine], self.index.nodes[theirs]
        return all(
            _dims_agree(self.index.types.get(a), self.index.types.get(b)) for a, b in zip(ours.output, other.output)
        )

    def _match_input(
        self, a: str, b: str, port: Port, values: dict[str, str], sources: dict[str, str], reads: dict[Port, str]
    ):
        """True if fine and done, False on mismatch, or a node pair still to match."""
        index, template = self.index, self.template
        if not a or not b:
            return not a and not b
        if a in index.weights:
            if b not in index.weights:
                return False
            ours, other = index.weights[a], index.weights[b]
            reads[port] = b
            return ours.dtype == other.dtype and ours.shape == other.shape
        if values.setdefault(a, b) != b or sources.setdefault(b, a) != a:
            return False
        producer = index.producer.get(a)
        if producer is None or producer[0] not in template.node_set:
            reads[port] = b
            return True
        found = index.producer.get(b)
        if found is None or found[1] != producer[1] or b in index.weights:
            return False
        return (producer[0], found[0])


def _dims_agree(a: tuple[int, Dims | None] | None, b: tuple[int, Dims | None] | None) -> bool:
    """Static dims must agree where both are known; symbolic and unknown ones match anything
    (inference names symbols per block, so they never agree across blocks)."""
    if a is None or b is None or a[1] is None or b[1] is None:
        return True
    static = [(x, y) for x, y in zip(a[1], b[1]) if isinstance(x, int) and isinstance(y, int)]
    return len(a[1]) == len(b[1]) and all(x == y for x, y in static)


def _entry_to_exit_path(index: GraphIndex, template: _Template) -> list[tuple[int, int, int]]:
    """Shortest chain of (node, input port, output slot) steps from the template's entry to
    its exit, by breadth-first search over the template's nodes."""
    previous: dict[str, tuple[str, tuple[int, int, int]]] = {}
    frontier, seen = [template.entry], {template.entry}
    while frontier and template.exit not in seen:
        following = []
        for value in frontier:
            for reader in index.readers.get(value, []):
                if reader not in template.node_set:
                    continue
                node = index.nodes[reader]
                for port, name in enumerate(node.input):
                    if name != value:
                        continue
                    for slot, out in enumerate(node.output):
                        if out and out not in seen:
                            seen.add(out)
                            previous[out] = (value, (reader, port, slot))
                            following.append(out)
        frontier = following
    if template.exit not in seen:
        return []
    path, value = [], template.exit
    while value != template.entry:
        value, step = previous[value]
        path.append(step)
    return path[::-1]


# -- runs ---------------------------------------------------------------------------------


@dataclass
class _Roles:
    carried: list[CarriedValue]
    invariants: list[Invariant]
    slots: list[WeightSlot]
    inputs: list[PerBlockValue]


@dataclass
class _Candidate:
    matches: list[_Match]  # the whole matched sequence, first block first
    runs: list[BlockRun]  # the parts of it that can be folded
    unsafe: list[UnsafeBlocks]
    node_set: set[int]

    def score(self) -> tuple:
        """Higher is better. Phases of one periodic structure often cover as many nodes;
        then the phase that shares more weights wins, then the one carrying fewer values,
        then the one starting later: an exporter's first block tends to begin with a piece
        of the embedding (its LayerNorm, say), which is not part of the layer."""
        folded = sum(r.length * r.nodes_per_block for r in self.runs)
        matched = len(self.matches) * len(self.matches[0].nodes)
        per_block_bytes = sum(s.nbytes * r.length for r in self.runs for s in r.per_block_slots)
        carried = sum(len(r.carried) for r in self.runs)
        start = min(self.node_set)
        return (folded, matched, -len(self.matches[0].nodes), -per_block_bytes, -carried, start)


class _RunFinder:
    def __init__(self, index: GraphIndex, same_bytes: dict[str, int]):
        self.index = index
        self.same_bytes = same_bytes

    def find(self) -> tuple[list[BlockRun], list[UnsafeBlocks]]:
        """Best candidate first, re-cut at its best phase; then the best of what is left."""
        seeds: list[_Candidate] = []
        matched: set[int] = set()
        for chain in self._candidate_chains(skip=matched):
            for candidate in self._candidates_along(chain):
                seeds.append(candidate)
                matched |= candidate.node_set
        chosen: list[_Candidate] = []
        taken: set[int] = set()
        while seeds:
            seed = max(seeds, key=lambda c: c.score())
            best = max(self._phases_of(seed, taken), key=lambda c: c.score())
            chosen.append(best)
            taken |= best.node_set | seed.node_set
            seeds = [c for c in seeds if not c.node_set & taken]
        runs = sorted((r for c in chosen for r in c.runs), key=lambda r: r.blocks[0][0])
        unsafe = [u for c in chosen for u in c.unsafe]
        return runs, unsafe

    # candidate cut points

    def _candidate_chains(self, skip: set[int]) -> Iterator[list[str]]:
        """Hash classes whose members lie on one dependency chain, largest first.

        A class with fewer than two members outside the blocks already matched (`skip`,
        which grows as the caller goes) is another phase of a known structure, which
        `_phases_of` explores.
        Values next to a skip connection see earlier blocks within a few rounds, so the
        natural cut (the residual stream) is rarely a class of its own.
        """
        index = self.index
        classes: dict[bytes, list[str]] = defaultdict(list)
        for name, digest in value_hashes(index).items():
            classes[digest].append(name)
        seen, yielded = set(), 0
        for members in sorted(classes.values(), key=lambda m: (-len(m), min(index.producer[n][0] for n in m))):
            if len(members) < 2 or yielded >= MAX_CANDIDATE_CLASSES:
                return
            members.sort(key=lambda n: index.producer[n][0])
            producers = tuple(index.producer[n][0] for n in members)
            if producers in seen or len(set(producers)) != len(producers) or len(set(producers) - skip) < 2:
                continue
            seen.add(producers)
            if self._is_chain(members):
                yielded += 1
                yield members

    def _is_chain(self, values: list[str]) -> bool:
        return all(self.index.depends_on(b, a) for a, b in zip(values, values[1:]))

    def _phases_of(self, candidate: _Candidate, taken: set[int]) -> list[_Candidate]:
        """The candidate re-cut at each narrow place of its block where the blocks form a chain.

        A cut is narrow when no more values cross it than cross the candidate's own cuts;
        wider cuts would carry more state through the loop and are not worth matching.
        """
        found = [candidate]
        blocks = candidate.matches
        made_inside = {name for name in blocks[-1].reads.values() if name in self.index.producer}
        widest = max(1, len(made_inside - self._invariant_names(blocks)))
        for k, slot in self._narrow_cuts(blocks[-1], widest):
            chain = [self.index.nodes[b.nodes[k]].output[slot] for b in blocks]
            if self._is_chain(chain):
                # The blocks already match, so one template from the middle is typical.
                found += [c for c in self._candidates_along(chain, samples=1) if not c.node_set & taken]
        return found

    def _invariant_names(self, blocks: list[_Match]) -> set[str]:
        return {blocks[0].reads[p] for p in blocks[0].reads if len({b.reads[p] for b in blocks}) == 1}

    def _narrow_cuts(self, block: _Match, widest: int) -> list[tuple[int, int]]:
        """(aligned node, output) cuts of a block that at most `widest` values cross.

        Cutting after node c splits the block into c's ancestors (before) and the rest
        (after); crossing are the values made before and read after, plus the block's own
        carried inputs read after (the next phase would have to carry them on)."""
        index = self.index
        aligned = {p: k for k, p in enumerate(block.nodes)}  # aligned order is topological
        carried_in = {name for name in block.reads.values() if index.produced_by(name) is not None}
        inputs = [[aligned.get(index.produced_by(name), -1) for name in index.reads[p]] for p in block.nodes]
        before = []  # bitset of each node's ancestors within the block, itself included
        for k, sources in enumerate(inputs):
            mask = 1 << k
            for source in sources:
                if source >= 0:
                    mask |= before[source]
            before.append(mask)
        cuts = []
        for k, position in enumerate(block.nodes):
            crossing = set()
            for j, p in enumerate(block.nodes):
                if before[k] >> j & 1:
                    continue  # j is before the cut
                for name, source in zip(index.reads[p], inputs[j]):
                    if (source >= 0 and before[k] >> source & 1) or name in carried_in:
                        crossing.add(name)
            if len(crossing) <= widest:
                outputs = index.nodes[position].output
                last = k == len(block.nodes) - 1  # the block's own cut
                cuts += [(k, slot) for slot, name in enumerate(outputs) if name in crossing or last]
        return cuts

    def _pick_template(self, chain: list[str], samples: int) -> _Template | None:
        """The most common block between consecutive cut points: middle blocks are clean."""
        pairs = list(zip(chain, chain[1:]))
        middle = len(pairs) // 2
        pairs = pairs[middle : middle + 1] if samples == 1 else pairs[:: max(1, len(pairs) // samples)]
        templates = [t for t in (template_between(self.index, a, b) for a, b in pairs) if t]
        if not templates:
            return None
        shapes = Counter(self._shape_of(t) for t in templates)
        best = shapes.most_common(1)[0][0]
        return [t for t in templates if self._shape_of(t) == best][-1]

    def _shape_of(self, template: _Template) -> tuple:
        return tuple(sorted(Counter(self.index.nodes[p].op_type for p in template.nodes).items()))

    # matching along a chain

    def _candidates_along(self, chain: list[str], samples: int = TEMPLATE_SAMPLES) -> list[_Candidate]:
        template = self._pick_template(chain, samples)
        if template is None or len(template.nodes) < 2:
            return []
        matcher = _Matcher(self.index, template)
        covered: set[int] = set()
        found = []
        for exit_ in reversed(chain):
            if self.index.produced_by(exit_) in covered:
                continue
            sequence = self._follow_back(matcher, exit_, covered)
            if sequence:
                sequence += self._follow_forward(matcher, sequence[-1].exit, covered)
            if len(sequence) >= 2:
                found.append(self._assess(sequence))
        return found

    def _follow_back(self, matcher: _Matcher, exit_: str, covered: set[int]) -> list[_Match]:
        """Blocks ending at `exit_` and before it, as long as each matches the template."""
        sequence: list[_Match] = []
        current: str | None = exit_
        while current is not None and current in self.index.producer:
            match = matcher.match(current)
            if match is None or match.node_set & covered:
                break
            sequence.append(match)
            covered |= match.node_set
            current = match.entry
        sequence.reverse()
        return sequence

    def _follow_forward(self, matcher: _Matcher, entry: str, covered: set[int]) -> list[_Match]:
        """Blocks after the one ending at `entry`: the template's path from its entry to its
        exit, walked from `entry`, predicts where the next block ends; a match confirms it."""
        path = _entry_to_exit_path(self.index, matcher.template)
        sequence: list[_Match] = []
        while path:
            match = None
            for exit_ in self._walk_path(path, entry):
                found = matcher.match(exit_)
                if found is not None and found.entry == entry and not found.node_set & covered:
                    match = found
                    break
            if match is None:
                break
            sequence.append(match)
            covered |= match.node_set
            entry = match.exit
        return sequence

    def _walk_path(self, path: list[tuple[int, int, int]], start: str) -> list[str]:
        index = self.index
        frontier = [start]
        for position, port, slot in path:
            signature = index.signature(position)
            following = []
            for value in frontier:
                for reader in index.readers.get(value, []):
                    node = index.nodes[reader]
                    if port < len(node.input) and node.input[port] == value and index.signature(reader) == signature:
                        following.append(node.output[slot])
            frontier = list(dict.fromkeys(following))[:MAX_PATH_BRANCHES]
        return frontier

    # checking a sequence as a loop

    def _assess(self, sequence: list[_Match]) -> _Candidate:
        runs, unsafe = [], []
        for start, end in self._consistent_spans(sequence):
            for piece, problem in self._safe_pieces(sequence, start, end):
                if problem:
                    unsafe.append(problem)
                if piece is not None:
                    runs.append(piece)
        node_set = set().union(*(m.node_set for m in sequence))
        return _Candidate(sequence, runs, unsafe, node_set)

    def _consistent_spans(self, sequence: list[_Match]) -> list[tuple[int, int]]:
        """Greedy maximal spans [start, end] whose outside reads classify as a loop."""
        spans, start = [], 0
        while start < len(sequence) - 1:
            if not self._classify(sequence[start : start + 2]):
                start += 1
                continue
            end = start + 1
            while end + 1 < len(sequence) and self._classify(sequence[start : end + 2]):
                end += 1
            spans.append((start, end))
            start = end + 1
        return spans

    def _roles(self, blocks: list[_Match]) -> _Roles | None:
        """Classify each outside read as carried, invariant or weight; None if one is none."""
        index = self.index
        roles = _Roles([], [], [], [])
        found = self._classify(blocks)
        if not found:
            return None
        for kind, names, ports, source in found:
            if kind == "weight":
                roles.slots.append(self._slot(names, ports))
            elif kind == "invariant":
                roles.invariants.append(Invariant(names[0], tuple(ports)))
            elif kind == "input":
                dtype, dims = index.types.get(names[0], (None, None))
                roles.inputs.append(PerBlockValue(names, dtype, dims, ports=tuple(ports)))
            else:
                final = index.nodes[blocks[-1].nodes[source[0]]].output[source[1]]
                dtype, dims = index.types.get(names[0]) or index.types.get(final) or (None, None)
                roles.carried.append(CarriedValue(tuple(ports), source, names[0], final, dtype, dims))
        return roles

    def _classify(self, blocks: list[_Match]) -> list[tuple] | None:
        """(kind, names per block, ports, carried source) per group of outside reads, or None
        when a read is neither weight, carried, invariant nor a graph input of each block's
        own, or nothing is carried."""
        index = self.index
        groups: dict[tuple[str, ...], list[Port]] = defaultdict(list)
        for port in sorted(blocks[0].reads, key=lambda p: (p.node, p.index)):
            groups[tuple(b.reads[port] for b in blocks)].append(port)
        found, sources = [], set()
        for names, ports in groups.items():
            source = None
            if all(n in index.weights for n in names):
                kind = "weight"
            elif (source := self._carried_source(blocks, names)) is not None:
                if source in sources:
                    return None  # two inputs carried from one value: not a plain loop
                sources.add(source)
                kind = "carried"
            elif len(set(names)) == 1 and not any(index.produced_by(names[0]) in b.node_set for b in blocks):
                kind = "invariant"
            elif len(set(names)) == len(names) and all(n in index.graph_inputs for n in names):
                kind = "input"
            else:
                return None
            found.append((kind, names, ports, source))
        return found if sources else None

    def _carried_source(self, blocks: list[_Match], names: tuple[str, ...]) -> tuple[int, int] | None:
        """Where each block's previous block produces what it reads here, if always the same."""
        source = None
        for previous, name in zip(blocks, names[1:]):
            produced = self.index.producer.get(name)
            if produced is None or produced[0] not in previous.node_set:
                return None
            here = (previous.nodes.index(produced[0]), produced[1])
            if source not in (None, here):
                return None
            source = here
        return source

    def _slot(self, names: tuple[str, ...], ports: list[Port]) -> WeightSlot:
        weights = [self.index.weights[n] for n in names]
        groups = {self.same_bytes.get(n, n) for n in names}
        equal = len(set(names)) == 1 or len(groups) == 1
        first = weights[0]
        return WeightSlot(tuple(ports), names, first.dtype, first.shape, equal, first.nbytes)

    def _safe_pieces(self, sequence: list[_Match], start: int, end: int):
        """Split [start, end] where a block's values are read outside the run.

        A carried value read outside may only come from the last block, so the run ends
        there; any other value read outside (a side output) keeps its block out entirely.
        """
        roles = self._roles(sequence[start : end + 1])
        sources = {c.source for c in roles.carried}
        inside = set().union(*(m.node_set for m in sequence[start : end + 1]))
        outputs = self._output_sources(sequence[start : end + 1], inside) - sources
        piece_start = start
        for j in range(start, end + 1):
            side, carried_out = self._escapes(sequence[j], sources, outputs, inside)
            if side:
                yield self._piece(sequence, piece_start, j - 1), self._unsafe(sequence[j], side)
                piece_start = j + 1
            elif carried_out and j < end:
                yield self._piece(sequence, piece_start, j), None
                piece_start = j + 1
        yield self._piece(sequence, piece_start, end), None

    def _output_sources(self, blocks: list[_Match], inside: set[int]) -> set[tuple[int, int]]:
        """(aligned node, output) places where every block makes a graph output that nothing
        outside the run reads: per-block outputs of the run."""
        found = None
        for block in blocks:
            here = set()
            for k, position in enumerate(block.nodes):
                for slot, name in enumerate(self.index.nodes[position].output):
                    if name and self.index.escapes(name, inside) == ["<graph output>"]:
                        here.add((k, slot))
            found = here if found is None else found & here
        return found or set()

    def _escapes(self, block: _Match, sources: set[tuple[int, int]], outputs: set[tuple[int, int]],
                 inside: set[int]) -> tuple[str, bool]:
        """A side output of the block (or ''), and whether its carried value is read outside
        the run. Per-block graph outputs (`outputs`) are neither."""
        side, carried_out = "", False
        for k, position in enumerate(block.nodes):
            for slot, name in enumerate(self.index.nodes[position].output):
                readers = self.index.escapes(name, inside) if name else []
                if not readers or (k, slot) in outputs:
                    continue
                if (k, slot) in sources:
                    carried_out = True
                elif not side:
                    side = f"'{name}' is read outside the run (by {readers[0]})"
        return side, carried_out

    def _piece(self, sequence: list[_Match], start: int, end: int) -> BlockRun | None:
        if end - start + 1 < 2:
            return None
        blocks = sequence[start : end + 1]
        roles = self._roles(blocks)
        if roles is None:
            return None
        inside = set().union(*(b.node_set for b in blocks))
        outputs = []
        for k, slot in sorted(self._output_sources(blocks, inside) - {c.source for c in roles.carried}):
            names = tuple(self.index.nodes[b.nodes[k]].output[slot] for b in blocks)
            dtype, dims = self.index.types.get(names[0], (None, None))
            outputs.append(PerBlockValue(names, dtype, dims, source=(k, slot)))
        return BlockRun(self.index.scope, [b.nodes for b in blocks], roles.carried, roles.invariants, roles.slots,
                        roles.inputs, outputs)

    def _unsafe(self, block: _Match, reason: str) -> UnsafeBlocks:
        first = block.nodes[0]
        return UnsafeBlocks(_node_label(self.index.nodes[first], first), len(block.nodes), reason)


# -- description for inspect --------------------------------------------------------------


def describe_runs(found: BlockAnalysis) -> dict[str, Any]:
    """JSON-able summary of the runs and of the blocks left out of them."""
    return {
        "runs": [_describe_run(run) for run in found.runs],
        "unsafe": [
            {"first_node": u.first_node, "nodes_per_block": u.nodes_per_block, "reason": u.reason}
            for u in found.unsafe
        ],
    }


def _describe_run(run: BlockRun) -> dict[str, Any]:
    first = run.blocks[0][0]
    shared, per_block = run.shared_slots, run.per_block_slots
    return {
        "start_node": _node_label(run.scope.body.node[first], first),
        "start_index": first,
        "blocks": run.length,
        "nodes_per_block": run.nodes_per_block,
        "carried": [{"initial": c.initial, "final": c.final} for c in run.carried],
        "invariants": [i.name for i in run.invariants],
        "per_block_inputs": [list(v.names) for v in run.inputs],
        "per_block_outputs": [list(v.names) for v in run.outputs],
        "shared_weights": len(shared),
        "shared_weight_bytes": sum(s.nbytes for s in shared),
        "per_block_weights": len(per_block),
        "per_block_weight_bytes": sum(s.nbytes for s in per_block) * run.length,
        "bytes_saved_if_shared": sum(s.nbytes for s in shared if not s.shared) * (run.length - 1),
        "slots": [
            {
                "names": list(s.names),
                "shape": list(s.shape),
                "dtype": helper.tensor_dtype_to_string(s.dtype),
                "equal": s.equal,
                **({"role": s.role} if s.role else {}),
            }
            for s in run.slots
        ],
    }


def render_runs(found: dict[str, Any]) -> str:
    """Text for `graphpass inspect`, from `describe_runs`."""
    runs = found["runs"]
    if not runs and not found["unsafe"]:
        return "repeated blocks: none"
    lines = [f"repeated blocks: {len(runs)} run(s)"]
    for run in runs:
        carried = ", ".join(c["initial"] for c in run["carried"])
        lines.append(
            f"  {run['blocks']} blocks x {run['nodes_per_block']} nodes from '{run['start_node']}' "
            f"(node {run['start_index']}), carrying {carried}"
        )
        lines.append(
            f"    weights: {run['shared_weights']} equal in every block ({human_bytes(run['shared_weight_bytes'])} "
            f"for one copy), {run['per_block_weights']} differ ({human_bytes(run['per_block_weight_bytes'])} in all)"
        )
        if run["invariants"]:
            lines.append(f"    loop-invariant inputs: {', '.join(run['invariants'])}")
        if run["per_block_inputs"] or run["per_block_outputs"]:
            lines.append(f"    graph inputs and outputs of each block: {len(run['per_block_inputs'])} in "
                         f"(e.g. {', '.join(run['per_block_inputs'][0][:2]) if run['per_block_inputs'] else '-'}), "
                         f"{len(run['per_block_outputs'])} out")
    for unsafe in found["unsafe"]:
        lines.append(f"  left out: the block starting at '{unsafe['first_node']}': {unsafe['reason']}")
    return "\n".join(lines)
