"""A template block between two cut points, matched port by port against the graph."""

from __future__ import annotations

from dataclasses import dataclass

from graphpass.blocks.graph_index import GraphIndex
from graphpass.blocks.runs import Dims, Port


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
