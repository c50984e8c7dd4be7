"""Units that repeat within and across weights: rows, filters and head slices (`tie(rows=true)`).

A weight is seen as a stack of units along axis 0 (embedding rows, Conv filters, the head
slices of an attention output projection) and along axis 1 (a MatMul weight's columns, so
the head slices of Q/K/V projections). Units of one dtype and length, from every weight of
one root scope, form a pool:

- equal units (by their bytes, like exact tie) share an id; a 64-bit key computed from the
  bytes alone finds them, and every match is confirmed byte for byte;
- with tol > 0 a unit also joins the closest earlier kept unit within relative error tol.
  Candidates come from a k-d tree over a few orthonormal projections (a projection never
  lengthens a difference, so no true neighbour is missed), or, for small pools, from every
  pair's distance by matrix products; only candidates are compared in full.

A view joins a table only while it pays: its index bytes, the units no other view shares and
the lookup's own nodes must cost less than the weight itself. Views that share units form one
table, and a weight is rebuilt from at most one of its views.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from graphpass.analysis import RELATED_MIN_SIZE
from graphpass.lowering.lookup import choose_packing, is_lookup_table
from graphpass.manager import PassContext
from graphpass.weights import WeightReader, WeightRef

# Dimensions of the k-d tree: more make its queries slower than the candidates they save.
PROJECTIONS = 8
# Dimensions of the second filter on the tree's candidates: at a large tol (0.05) the tree's
# 8 leave tens of candidates per unit, and 32 drop nearly all of them for 32 flops a pair,
# before full-length distances (hundreds of flops) are computed for the few left.
FILTER_PROJECTIONS = 32
# Units queried at a time in the near search: bounds the memory of candidate pairs.
QUERY_BATCH = 4096
# Candidate pairs held at a time: bounds memory when a large tol makes most pairs candidates.
PAIR_BATCH = 1 << 20
# Below this many multiply-adds, every pair's distance by matrix products costs less than the
# k-d tree, whose projections stop filtering on wide units at a large tol: 384 embedding
# columns of 30,522 values at tol 0.05 left 55,694 candidate pairs, none of them close.
ALL_PAIRS_FLOPS = 2e10
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}

# How many bytes `count` indices into a table of `k` units take once packed.
IndexBytes = Callable[[int, int], int]


@dataclass(frozen=True)
class RowView:
    """A weight seen as `count` units of `unit_size` values along `axis`."""

    weight: WeightRef
    axis: int

    @property
    def count(self) -> int:
        return self.weight.shape[self.axis]

    @property
    def unit_size(self) -> int:
        return self.weight.size // self.count

    def units(self, value: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.moveaxis(value, self.axis, 0)).reshape(self.count, -1)


@dataclass
class RowMember:
    view: RowView
    ids: np.ndarray  # each unit's row in the table
    error: float  # ||W - rebuilt W|| / ||W||, the measure near ties report too
    unit_error: float  # the worst single unit's relative error


@dataclass
class SharedRows:
    table: np.ndarray  # [distinct units, unit_size]
    members: list[RowMember]
    bytes_after: int  # the table plus every member's packed indices

    @property
    def bytes_before(self) -> int:
        return sum(m.view.weight.nbytes for m in self.members)


def row_views(weight: WeightRef) -> list[RowView]:
    return [RowView(weight, axis) for axis in (0, 1) if len(weight.shape) >= 2 and weight.shape[axis] > 1]


def shared_row_tables(ctx: PassContext, tol: float) -> list[SharedRows]:
    """What `tie(rows=true)` shares in the model: tables that shrink it, with their members."""
    model = ctx.model
    opset, ir_version = model.opset, model.proto.ir_version
    candidates = [w for w in model.weights() if _may_repeat(w)]
    with ctx.progress("finding shared rows", sum(len(row_views(w)) for w in candidates)) as advance:
        return find_shared_rows(candidates, tol,
                                lambda k, count: choose_packing(k, opset, ir_version, count=count).stored_bytes(count), advance)


def _may_repeat(weight: WeightRef) -> bool:
    # Our own codebooks and indices are tables already: sharing their rows would only add nodes.
    # A weight a target runtime needs constant cannot become a row lookup.
    return (weight.is_float and len(weight.shape) >= 2 and weight.size >= RELATED_MIN_SIZE
            and not weight.overridable and not weight.pinned and not is_lookup_table(weight))


def find_shared_rows(weights: list[WeightRef], tol: float, index_bytes: IndexBytes,
                     advance: Callable[[int], None] = lambda n: None) -> list[SharedRows]:
    """Tables of shared units, in model order; each weight appears in at most one.
    `advance(n)` is called as the views of each pool are done."""
    pools: dict[tuple, list[RowView]] = {}
    for weight in weights:
        root = list(weight.scope.ancestors())[-1]  # function bodies see neither the graph nor each other
        for view in row_views(weight):
            pools.setdefault((id(root), weight.dtype, view.unit_size), []).append(view)
    reader = WeightReader(weights)
    found: list[SharedRows] = []
    used: set[WeightRef] = set()
    for pool in pools.values():
        views = [v for v in pool if v.weight not in used]
        if len(views) > 1 or (views and views[0].count > 1):
            for shared in _share_pool(views, reader, tol, index_bytes):
                found.append(shared)
                used.update(m.view.weight for m in shared.members)
        advance(len(pool))
    return found


def _share_pool(views: list[RowView], reader: WeightReader, tol: float, index_bytes: IndexBytes) -> list[SharedRows]:
    # Each weight read once, though both of its views may be in the pool.
    values = {v.weight: reader.read(v.weight) for v in views}
    units = np.concatenate([v.units(values[v.weight]) for v in views])
    ids, errors = distinct_units(units, tol)
    if len(np.unique(ids)) == len(ids):
        return []
    starts = np.cumsum([0] + [v.count for v in views])
    view_ids = [ids[starts[i] : starts[i + 1]] for i in range(len(views))]
    kept = _views_that_pay(views, view_ids, len(units), units.itemsize * units.shape[1], index_bytes)
    # A unit's error is relative to its own norm, so the squared error it adds is (e * |u|)^2.
    squared_norms = _squared_norms(units) if errors.any() else np.ones(len(units))
    tables = []
    for component in _components([i for i in range(len(views)) if kept[i]], view_ids):
        table_units = _first_seen(np.concatenate([view_ids[i] for i in component]))
        row_of = np.full(len(units), -1, dtype=np.int64)
        row_of[table_units] = np.arange(len(table_units))
        members = [_member(views[i], row_of[view_ids[i]], errors[starts[i] : starts[i + 1]],
                           squared_norms[starts[i] : starts[i + 1]]) for i in component]
        after = units[table_units].nbytes + sum(index_bytes(len(table_units), m.view.count) for m in members)
        shared = SharedRows(units[table_units], members, after)
        if after + sum(lookup_overhead(m.view.weight) for m in members) < shared.bytes_before:
            tables.append(shared)
    return tables


def lookup_overhead(weight: WeightRef) -> int:
    """File bytes a row lookup adds besides its indices: Gather, Reshape (and Transpose) nodes,
    a shape tensor, and value names that each repeat the weight's name. Measured on silero's
    If branches (names of 55 characters): about 1.3 KB a weight, which a saving of 0.6 KB in
    weight bytes did not pay for."""
    return 256 + 20 * len(weight.name)


def _member(view: RowView, ids: np.ndarray, unit_errors: np.ndarray, squared_norms: np.ndarray) -> RowMember:
    total = squared_norms.sum()
    error = float(np.sqrt((unit_errors**2 * squared_norms).sum() / total)) if total > 0 else 0.0
    return RowMember(view, ids, error, float(unit_errors.max()))


def _views_that_pay(views: list[RowView], view_ids: list[np.ndarray], pool_size: int, unit_bytes: int,
                    index_bytes: IndexBytes) -> list[bool]:
    """Drop views whose indices plus unshared units cost more than the weight, until none does.

    Dropping a view only makes the others' units less shared, so every view that fails once
    would fail again: all failing views go at once, and the loop ends within a few rounds.
    (A weight's second view, set aside for its better one, does not come back if the better
    one fails later: rare, and it only leaves that weight dense.)
    """
    distinct = [np.unique(ids) for ids in view_ids]
    kept = [True] * len(views)
    while True:
        owners = np.bincount(np.concatenate([d for d, k in zip(distinct, kept) if k] or [np.zeros(0, np.int64)]),
                             minlength=pool_size)
        table_size = int(np.count_nonzero(owners))
        saving = {}
        for i, view in enumerate(views):
            if kept[i]:
                private = int(np.count_nonzero(owners[distinct[i]] == 1))
                saving[i] = (view.weight.nbytes - index_bytes(table_size, view.count) - private * unit_bytes
                             - lookup_overhead(view.weight))
        losing = {i for i, s in saving.items() if s <= 0}
        best_view: dict[WeightRef, int] = {}
        for i in sorted(set(saving) - losing, key=lambda i: -saving[i]):
            if views[i].weight in best_view:
                losing.add(i)  # a weight is rebuilt from one view only: the one that saves most
            else:
                best_view[views[i].weight] = i
        if not losing:
            return kept
        for i in losing:
            kept[i] = False


def _components(kept: list[int], view_ids: list[np.ndarray]) -> list[list[int]]:
    """Kept views grouped so that views sharing any unit share one table, in model order."""
    parent = {i: i for i in kept}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_owner: dict[int, int] = {}
    for i in kept:
        for unit in np.unique(view_ids[i]).tolist():
            other = first_owner.setdefault(unit, i)
            if other != i:
                parent[find(i)] = find(other)
    groups: dict[int, list[int]] = {}
    for i in kept:
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def _first_seen(ids: np.ndarray) -> np.ndarray:
    _, first = np.unique(ids, return_index=True)
    return ids[np.sort(first)]


# ---------------------------------------------------------------------------------------------
# Distinct units
# ---------------------------------------------------------------------------------------------


def distinct_units(units: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """For each unit, the position of the unit it is stored as, and its relative error.

    The position is of the first copy, so a table in first-seen order keeps model order.
    """
    exact = _exact_ids(units)
    if tol == 0:
        return exact, np.zeros(len(units))
    distinct = np.flatnonzero(exact == np.arange(len(exact)))
    parent, distinct_errors = near_parents(units[distinct].astype(np.float64), tol)
    rank = np.empty(len(units), dtype=np.int64)
    rank[distinct] = np.arange(len(distinct))
    return distinct[parent[rank[exact]]], distinct_errors[rank[exact]]


def _exact_ids(units: np.ndarray) -> np.ndarray:
    bits = units.view(_UNSIGNED[units.itemsize])
    _, first, inverse = np.unique(unit_keys(units), return_index=True, return_inverse=True)
    ids = first[inverse.ravel()]
    copies = np.flatnonzero(ids != np.arange(len(ids)))  # confirm only these: no copy of the whole pool
    if np.array_equal(bits[copies], bits[ids[copies]]):
        return ids
    # Two different units met on one key: fall back to sorting the bytes themselves.
    rows = np.ascontiguousarray(units).view(np.dtype((np.void, units.itemsize * units.shape[1]))).ravel()
    _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
    return first[inverse.ravel()]


def unit_keys(units: np.ndarray) -> np.ndarray:
    """A 64-bit key per unit from its bytes alone: equal units always get equal keys.

    Integer arithmetic on the raw words, because float arithmetic may round the same row
    differently at two offsets (vectorised code paths), which would split equal units.
    """
    raw = np.ascontiguousarray(units).view(np.uint8).reshape(len(units), -1)
    pad = -raw.shape[1] % 8
    if pad:
        raw = np.concatenate([raw, np.zeros((len(raw), pad), np.uint8)], axis=1)
    words = raw.view(np.uint64)
    multipliers = np.random.default_rng(0x5EED).integers(1, 2**63, size=words.shape[1], dtype=np.uint64) | np.uint64(1)
    keys = np.zeros(len(words), dtype=np.uint64)
    for start in range(0, len(words), QUERY_BATCH):
        keys[start : start + QUERY_BATCH] = (words[start : start + QUERY_BATCH] * multipliers).sum(axis=1)
    return keys


def near_parents(units: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy in order: each unit joins the closest earlier kept unit with
    ||unit - kept|| <= tol * ||unit||, or is kept itself. Returns each unit's kept unit and error."""
    count, width = units.shape
    norms = np.linalg.norm(units, axis=1)
    # Float slack on the radius only widens the candidates; the full comparison decides.
    radius = tol * norms * (1 + 1e-9)
    search = _all_pairs if count * count * width <= ALL_PAIRS_FLOPS else _projected_pairs
    parent = np.arange(count)
    errors = np.zeros(count)
    joined = np.zeros(count, dtype=bool)
    for later, earlier in search(units, norms, radius):
        error = _relative_distances(units, norms, later, earlier)
        close = error <= tol
        later, earlier, error = later[close], earlier[close], error[close]
        for i in np.lexsort((error, later)):  # by unit, closest candidate first
            unit, candidate = later[i], earlier[i]
            if not joined[unit] and not joined[candidate]:
                parent[unit], errors[unit], joined[unit] = candidate, error[i], True
    return parent, errors


# Candidate pairs (later, earlier < later) that may lie within the radius of the later unit,
# in batches of increasing later units, so that every earlier unit is settled when a later
# one looks at it. A search may return too many pairs, never too few.
PairBatches = Iterator[tuple[np.ndarray, np.ndarray]]


def _projected_pairs(units: np.ndarray, norms: np.ndarray, radius: np.ndarray) -> PairBatches:
    from sklearn.neighbors import KDTree  # a second to import; only near row search needs it

    width = units.shape[1]
    basis, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((width, min(FILTER_PROJECTIONS, width))))
    projected = units @ basis  # any subset of orthonormal columns never lengthens a difference either
    indexed = np.ascontiguousarray(projected[:, :PROJECTIONS])
    tree = KDTree(indexed)
    for start in range(0, len(units), QUERY_BATCH):
        stop = min(start + QUERY_BATCH, len(units))
        # Counted first: at a large tol one batch's neighbour lists alone could fill memory.
        counts = tree.query_radius(indexed[start:stop], r=radius[start:stop], count_only=True)
        for low, high in _spans(counts, PAIR_BATCH, start):
            found = tree.query_radius(indexed[low:high], r=radius[low:high])
            later = np.repeat(np.arange(low, high), [len(f) for f in found])
            earlier = np.concatenate(found).astype(np.int64)
            earlier_only = earlier < later
            later, earlier = later[earlier_only], earlier[earlier_only]
            near = np.linalg.norm(projected[later] - projected[earlier], axis=1) <= radius[later]
            yield later[near], earlier[near]


def _spans(counts: np.ndarray, budget: int, offset: int) -> Iterator[tuple[int, int]]:
    """Consecutive ranges of query units whose counts add up to at most `budget` (or one unit)."""
    ends = np.cumsum(counts)
    low = 0
    while low < len(counts):
        before = ends[low - 1] if low else 0
        high = max(low + 1, int(np.searchsorted(ends, before + budget, side="right")))
        yield offset + low, offset + high
        low = high


def _all_pairs(units: np.ndarray, norms: np.ndarray, radius: np.ndarray) -> PairBatches:
    """Squared distances as |a|^2 + |b|^2 - 2 a.b, a block of units against all earlier ones."""
    count, width = units.shape
    squared = norms**2
    # A dot product of `width` terms is off by at most about width * eps * |a| |b|.
    rounding = 4 * width * np.finfo(np.float64).eps
    step = max(1, PAIR_BATCH // count)
    for start in range(0, count, step):
        stop = min(start + step, count)
        block = units[start:stop] @ units[:stop].T
        distance = squared[start:stop, None] + squared[None, :stop] - 2 * block
        slack = rounding * (norms[start:stop, None] + norms[None, :stop]) ** 2
        within = (distance <= radius[start:stop, None] ** 2 + slack) & (np.arange(stop)[None, :] < np.arange(start, stop)[:, None])
        later, earlier = np.nonzero(within)
        yield later + start, earlier


def _squared_norms(units: np.ndarray) -> np.ndarray:
    out = np.empty(len(units))
    for start in range(0, len(units), QUERY_BATCH):  # float64 a batch at a time, not a copy of the pool
        batch = units[start : start + QUERY_BATCH].astype(np.float64)
        out[start : start + QUERY_BATCH] = np.einsum("ij,ij->i", batch, batch)
    return out


def _relative_distances(units: np.ndarray, norms: np.ndarray, later: np.ndarray, earlier: np.ndarray) -> np.ndarray:
    out = np.empty(len(later))
    step = max(1, (1 << 22) // max(1, units.shape[1]))  # about 32 MB of differences at a time
    for start in range(0, len(later), step):
        a, b = later[start : start + step], earlier[start : start + step]
        distance = np.linalg.norm(units[a] - units[b], axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[start : start + step] = np.where(norms[a] > 0, distance / norms[a], np.inf)
    return out
