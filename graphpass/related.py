"""Weights that are one weight stored several times: transposed, scaled or near copies.

Candidates come from order-invariant sketches (graphpass.analysis), bucketed by dtype and
size, so no two tensors are compared in full unless their sketches say they may be related.
Each group has a root; every member is `transform(root)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from graphpass.analysis import COMMON_PERMUTATIONS, WeightSketches, candidate_pairs
from graphpass.manager import PassContext
from graphpass.weights import WeightReader, WeightRef

RelationKind = Literal["transposed", "scaled", "near"]


@dataclass(frozen=True)
class Relation:
    """member == transform(root), up to `error` = ||member - transform(root)|| / ||member||."""

    kind: RelationKind
    perm: tuple[int, ...] | None = None
    scale: float | None = None
    error: float = 0.0


@dataclass
class RelatedGroup:
    root: WeightRef
    members: list[tuple[WeightRef, Relation]] = field(default_factory=list)

    @property
    def saved_bytes(self) -> int:
        return sum(member.nbytes for member, _ in self.members)

    @property
    def pure_near(self) -> bool:
        return all(rel.kind == "near" for _, rel in self.members)


def find_related(ctx: PassContext, tol: float, kinds: set[RelationKind],
                 exclude: frozenset[WeightRef] = frozenset()) -> list[RelatedGroup]:
    """Greedy groups in model order: each weight joins the first earlier root it relates to.

    `exclude`: weights to leave out, such as exact duplicates reported elsewhere.
    """
    order = {w: i for i, w in enumerate(ctx.model.weights())}
    sketches = {w: s for w, s in ctx.analysis(WeightSketches).items() if not w.overridable and w not in exclude}
    pairs = sorted(candidate_pairs(sketches, tol), key=lambda p: (order[p[0]], order[p[1]]))
    groups: dict[WeightRef, RelatedGroup] = {}
    joined: set[WeightRef] = set()
    reader = WeightReader(list(sketches))
    roots = _RootCache(reader)
    for root, member, mirrored in pairs:
        if root in joined or member in joined or member in groups or not _same_family(root, member):
            continue
        relation = relate(roots.value(root), reader.read(member), mirrored, tol, kinds)
        if relation is not None:
            groups.setdefault(root, RelatedGroup(root)).members.append((member, relation))
            joined.add(member)
    return list(groups.values())


def relate(root: np.ndarray, member: np.ndarray, mirrored: bool, tol: float,
           kinds: set[RelationKind]) -> Relation | None:
    """How `member` derives from `root`, trying the cheapest exact forms first."""
    if "transposed" in kinds and not mirrored:
        for perm in COMMON_PERMUTATIONS.get(root.ndim, []):
            if _equal(root.transpose(perm), member):
                return Relation("transposed", perm=perm)
    if root.shape != member.shape:
        return None
    if "near" in kinds and not mirrored and tol > 0:
        error = relative_error(member, root)
        if 0 < error <= tol:  # an exact copy is ExactDuplicates' to report and tie
            return Relation("near", error=error)
    if "scaled" in kinds:
        return _scaled(root, member, tol)
    return None


def _scaled(root: np.ndarray, member: np.ndarray, tol: float) -> Relation | None:
    pivot = np.unravel_index(np.argmax(np.abs(root)), root.shape)
    if root[pivot] == 0:
        return None
    # The factor in the weights' own dtype, so the Mul in the graph rounds exactly as we check.
    scale = (member[pivot] / root[pivot]).astype(root.dtype)
    if scale == 1 or not np.isfinite(scale):
        return None
    # member = round(root * c) puts the rounded ratio at c or at a neighbour of c (for c = 1.5,
    # (x * 1.5) / x can round to 1.5000001), so try those before calling it inexact.
    for factor in (scale, *_neighbours(scale)):
        if factor != 1 and np.isfinite(factor) and _equal_scaled(root, factor, member):
            return Relation("scaled", scale=float(factor))
    rebuilt = root * scale
    error = relative_error(member, rebuilt)
    return Relation("scaled", scale=float(scale), error=error) if 0 < tol and error <= tol else None


# Most candidate pairs fail the bit-exact tests, and usually on their first elements, so a
# test compares one line of elements before the whole tensor.
def _first_line(array: np.ndarray) -> np.ndarray:
    return array[(0,) * (array.ndim - 1)] if array.ndim else array


# A transposed view compares elements that lie a row apart in memory, ~10x slower than a plain
# comparison; tiles of this many rows and columns keep the rows they touch in cache, and
# halved the time of the transposed checks on the bench model.
_TILE = 256


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape or not np.array_equal(_first_line(a), _first_line(b)):
        return False
    if a.ndim < 2:
        return np.array_equal(a, b)
    return all(np.array_equal(a[i:i + _TILE, j:j + _TILE], b[i:i + _TILE, j:j + _TILE])
               for i in range(0, a.shape[0], _TILE) for j in range(0, a.shape[1], _TILE))


def _equal_scaled(root: np.ndarray, factor: np.generic, member: np.ndarray) -> bool:
    return np.array_equal(_first_line(root) * factor, _first_line(member)) and np.array_equal(root * factor, member)


def _neighbours(value: np.generic) -> tuple[np.generic, ...]:
    try:
        return tuple(np.nextafter(value, value.dtype.type(direction)) for direction in (np.inf, -np.inf))
    except TypeError:  # a dtype numpy has no nextafter for (bfloat16 from ml_dtypes)
        return ()


_ERROR_CHUNK = 1 << 16  # elements: 512 KB of float64, which stay in cache


def relative_error(member: np.ndarray, approximation: np.ndarray) -> float:
    """||member - approximation|| / ||member||, summed in float64 chunk by chunk: no float64
    copies of whole tensors, and no BLAS (np.linalg.norm of a vector is a BLAS dot)."""
    member, approximation = member.reshape(-1), np.broadcast_to(approximation, member.shape).reshape(-1)
    squares = errors = 0.0
    for begin in range(0, member.size, _ERROR_CHUNK):
        values = member[begin:begin + _ERROR_CHUNK].astype(np.float64)
        squares += np.einsum("i,i->", values, values)
        values -= approximation[begin:begin + _ERROR_CHUNK].astype(np.float64)
        errors += np.einsum("i,i->", values, values)
    return float(np.sqrt(errors) / np.sqrt(squares)) if squares else float("inf")


def _same_family(a: WeightRef, b: WeightRef) -> bool:
    """Function bodies see neither the graph nor each other."""
    return list(a.scope.ancestors())[-1] is list(b.scope.ancestors())[-1]


class _RootCache:
    """Pairs arrive sorted by root, so keeping the last root's value in memory is enough."""

    def __init__(self, reader: WeightReader):
        self._reader = reader
        self._root: tuple[WeightRef, np.ndarray] | None = None

    def value(self, weight: WeightRef) -> np.ndarray:
        if self._root is not None and self._root[0] is weight:
            return self._root[1]
        value = self._reader.read(weight)
        self._root = (weight, value)
        return value
