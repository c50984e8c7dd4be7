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
from graphpass.weights import WeightRef

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
    roots = _RootCache()
    for root, member, mirrored in pairs:
        if root in joined or member in joined or member in groups or not _same_family(root, member):
            continue
        relation = relate(roots.value(root), member.read(), mirrored, tol, kinds)
        if relation is not None:
            groups.setdefault(root, RelatedGroup(root)).members.append((member, relation))
            joined.add(member)
    return list(groups.values())


def relate(root: np.ndarray, member: np.ndarray, mirrored: bool, tol: float,
           kinds: set[RelationKind]) -> Relation | None:
    """How `member` derives from `root`, trying the cheapest exact forms first."""
    if "transposed" in kinds and not mirrored:
        for perm in COMMON_PERMUTATIONS.get(root.ndim, []):
            if root.transpose(perm).shape == member.shape and np.array_equal(root.transpose(perm), member):
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
        if factor != 1 and np.isfinite(factor) and np.array_equal(root * factor, member):
            return Relation("scaled", scale=float(factor))
    rebuilt = root * scale
    error = relative_error(member, rebuilt)
    return Relation("scaled", scale=float(scale), error=error) if 0 < tol and error <= tol else None


def _neighbours(value: np.generic) -> tuple[np.generic, ...]:
    try:
        return tuple(np.nextafter(value, value.dtype.type(direction)) for direction in (np.inf, -np.inf))
    except TypeError:  # a dtype numpy has no nextafter for (bfloat16 from ml_dtypes)
        return ()


def relative_error(member: np.ndarray, approximation: np.ndarray) -> float:
    member64 = member.astype(np.float64)
    norm = float(np.linalg.norm(member64))
    return float(np.linalg.norm(member64 - approximation.astype(np.float64)) / norm) if norm else float("inf")


def _same_family(a: WeightRef, b: WeightRef) -> bool:
    """Function bodies see neither the graph nor each other."""
    return list(a.scope.ancestors())[-1] is list(b.scope.ancestors())[-1]


class _RootCache:
    """Pairs arrive sorted by root, so keeping the last root's value in memory is enough."""

    def __init__(self):
        self._root: tuple[WeightRef, np.ndarray] | None = None

    def value(self, weight: WeightRef) -> np.ndarray:
        if self._root is not None and self._root[0] is weight:
            return self._root[1]
        value = weight.read()
        self._root = (weight, value)
        return value
