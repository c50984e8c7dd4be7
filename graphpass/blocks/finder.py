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

from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

from graphpass.analysis import ExactDuplicates
from graphpass.blocks.graph_index import GraphIndex, _node_label, infer_value_types
from graphpass.blocks.hashing import value_hashes
from graphpass.blocks.matching import _Match, _Matcher, _Template, _entry_to_exit_path, template_between
from graphpass.blocks.runs import (
    BlockAnalysis, BlockRun, CarriedValue, Invariant, PerBlockValue, Port, UnsafeBlocks, WeightSlot,
)
from graphpass.manager import Analysis, PassContext

# Candidate cut classes examined, largest classes first; real models need a few hundred.
MAX_CANDIDATE_CLASSES = 400
# Candidate next-block exits kept at each step of a forward walk.
MAX_PATH_BRANCHES = 8
# Blocks between cut points compared when choosing the template (evenly spaced).
TEMPLATE_SAMPLES = 5


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
        made_inside = {name for name in blocks[-1].reads.values() if self.index.is_computed(name)}
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
        carried_in = {name for name in block.reads.values() if index.is_computed(name)}
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
