"""Analyses that several passes and `inspect` share, computed once per model state.

Each is an `Analysis` subclass; `ctx.analysis(Kind)` returns the cached result until a pass
edits the model.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from graphpass.manager import Analysis, PassContext
from graphpass.scopes import Scope
from graphpass.weights import WeightRef

# hashlib and numpy release the GIL on large buffers, so two threads use both cores.
_WORKERS = 2


def weight_bytes_view(weight: WeightRef) -> memoryview:
    """The weight's values as raw bytes, however the file stored them.

    Viewed as uint8 rather than cast: the buffer protocol has no code for ml_dtypes' bfloat16,
    int4 or float8, and memoryview.cast refuses them.
    """
    return memoryview(np.ascontiguousarray(weight.read()).reshape(-1).view(np.uint8))


@dataclass(frozen=True)
class Fingerprint:
    dtype: int
    shape: tuple[int, ...]
    digest: bytes


class WeightFingerprints(Analysis):
    """A content hash per weight; equal fingerprints mean equal bytes, shape and dtype."""

    @classmethod
    def compute(cls, ctx: PassContext) -> dict[WeightRef, Fingerprint]:
        weights = ctx.model.weights()
        with ctx.progress("fingerprinting weights", len(weights)) as advance, ThreadPoolExecutor(_WORKERS) as pool:
            digests = []
            for digest in pool.map(_digest, weights):
                digests.append(digest)
                advance(1)
        return {w: Fingerprint(w.dtype, w.shape, d) for w, d in zip(weights, digests)}


def _digest(weight: WeightRef) -> bytes:
    return hashlib.blake2b(weight_bytes_view(weight), digest_size=16).digest()


@dataclass
class DuplicateGroup:
    """Weights with identical bytes, dtype and shape."""

    members: list[WeightRef]

    @property
    def saved_bytes(self) -> int:
        return self.members[0].nbytes * (len(self.members) - 1)


class ExactDuplicates(Analysis):
    """Groups of byte-identical weights, hashed first and then confirmed byte for byte."""

    @classmethod
    def compute(cls, ctx: PassContext) -> list[DuplicateGroup]:
        prints = ctx.analysis(WeightFingerprints)
        buckets: dict[Fingerprint, list[WeightRef]] = defaultdict(list)
        for weight in ctx.model.weights():
            buckets[prints[weight]].append(weight)
        groups = []
        for members in buckets.values():
            if len(members) > 1:
                groups.extend(_confirm_identical(members))
        return groups


def _confirm_identical(members: list[WeightRef]) -> list[DuplicateGroup]:
    """Split a hash bucket into groups whose bytes really match (a collision stays apart)."""
    groups: list[tuple[bytes, list[WeightRef]]] = []
    for weight in members:
        data = bytes(weight_bytes_view(weight))
        for reference, group in groups:
            if reference == data:
                group.append(weight)
                break
        else:
            groups.append((data, [weight]))
    return [DuplicateGroup(group) for _, group in groups if len(group) > 1]


def common_scope(scopes: list[Scope]) -> Scope | None:
    """The innermost scope that encloses all of them, or None when they share no root."""
    candidates = list(scopes[0].ancestors())
    for scope in candidates:
        if all(scope.encloses(other) for other in scopes):
            return scope
    return None


# -- related weights: transposed, scaled and near copies ---------------------------------

# Float weights smaller than this are not worth a Transpose or Mul node of their own.
RELATED_MIN_SIZE = 64
# Slack for float rounding: a scaled copy is rounded once per element, a transposed one is
# summed in another order.
ROUNDING_SLACK = 1e-6
# Permutations exporters actually produce: matrix transposes, head-major swaps, ConvTranspose.
COMMON_PERMUTATIONS = {2: [(1, 0)], 3: [(0, 2, 1), (1, 0, 2)], 4: [(1, 0, 2, 3), (0, 1, 3, 2)]}
# Same-layout sketch: sums over this many contiguous blocks of the tensor, each divided by the
# square root of its length. The blocks are disjoint, so this is an orthogonal projection and
# moves no pair closer than it is: ||P(a) - P(b)|| <= ||a - b||. Unrelated tensors of n
# elements land about sqrt(2 * LAYOUT_BLOCKS / n) apart (normalised), far above 2*tol for
# n up to ~LAYOUT_BLOCKS / (2 tol^2): 128 M elements at tol 1e-3.
LAYOUT_BLOCKS = 256


@dataclass(frozen=True)
class Sketch:
    """A summary of a float weight, computed in one pass.

    The scalar features are order-invariant: equal for a tensor and any transposition of it
    (which must be bit-exact). `blocks` depends on the layout and is tight: a near, scaled or
    negated copy lies within 2*tol of its root there (mirrored for a negative factor), an
    unrelated tensor far outside.
    """

    size: int
    norm: float
    total: float
    abs_total: float
    high: float
    low: float
    blocks: np.ndarray = field(compare=False, repr=False)  # the same-layout projection, unnormalised

    def features(self, mirrored: bool = False) -> np.ndarray:
        """Normalised by the norm, so a scaled copy has the same (or mirrored) features."""
        total, high, low = (-self.total, -self.low, -self.high) if mirrored else (self.total, self.high, self.low)
        return np.array([total, self.abs_total, high, low]) / self.norm


class WeightSketches(Analysis):
    """A Sketch for every float weight large enough to relate to others."""

    @classmethod
    def compute(cls, ctx: PassContext) -> dict[WeightRef, Sketch]:
        weights = [w for w in ctx.model.weights() if w.is_float and w.size >= RELATED_MIN_SIZE]
        with ctx.progress("sketching weights", len(weights)) as advance, ThreadPoolExecutor(_WORKERS) as pool:
            sketches = {}
            for weight, sketch in zip(weights, pool.map(_sketch, weights)):
                if sketch.norm > 0 and np.isfinite(sketch.norm):
                    sketches[weight] = sketch
                advance(1)
        return sketches


def _sketch(weight: WeightRef) -> Sketch:
    # Sums accumulate in float64 without a float64 copy of the tensor, and without BLAS
    # (np.dot starts BLAS threads, which stall for milliseconds when the cores are busy).
    values = weight.read().ravel()
    count = min(LAYOUT_BLOCKS, values.size)
    starts = np.arange(count, dtype=np.int64) * values.size // count
    lengths = np.diff(np.append(starts, values.size))
    return Sketch(
        size=values.size,
        norm=float(np.sqrt(np.einsum("i,i->", values, values, dtype=np.float64))),
        total=float(values.sum(dtype=np.float64)),
        abs_total=float(np.abs(values).sum(dtype=np.float64)),
        high=float(values.max()),
        low=float(values.min()),
        blocks=np.add.reduceat(values, starts, dtype=np.float64) / np.sqrt(lengths),
    )


def candidate_pairs(sketches: dict[WeightRef, Sketch], tol: float) -> list[tuple[WeightRef, WeightRef, bool]]:
    """Pairs (a, b, mirrored) whose sketches allow b = op(a) within `tol`; nothing is missed.

    If ||a-b|| <= tol*||a||, the normalised tensors differ by at most 2*tol in the 2-norm, and
    so do their block projections. A transposed copy is bit-exact, so only rounding separates
    its order-invariant features from its root's: at most that in max and min, and at most
    sqrt(n) times that in the sums.
    """
    buckets: dict[tuple[int, int], list[WeightRef]] = defaultdict(list)
    for weight, sketch in sketches.items():
        buckets[(weight.dtype, sketch.size)].append(weight)
    pairs = []
    for (_, size), members in buckets.items():
        if len(members) > 1:
            pairs += _close_pairs(members, sketches, size, tol)
    return pairs


def _close_pairs(members, sketches, size, tol) -> list[tuple[WeightRef, WeightRef, bool]]:
    invariant = np.stack([sketches[w].features() for w in members])
    exact_limits = np.array([np.sqrt(size), np.sqrt(size), 1.0, 1.0]) * 2 * ROUNDING_SLACK
    layout = np.stack([sketches[w].blocks / sketches[w].norm for w in members])
    bound = 2 * (tol + ROUNDING_SLACK)
    pairs = []
    for i in range(len(members) - 1):
        transposed = np.all(np.abs(invariant[i + 1:] - invariant[i]) <= exact_limits, axis=1)
        same = np.linalg.norm(layout[i + 1:] - layout[i], axis=1) <= bound
        flipped = np.linalg.norm(layout[i + 1:] + layout[i], axis=1) <= bound
        pairs += [(members[i], members[i + 1 + j], False) for j in np.flatnonzero(transposed | same)]
        pairs += [(members[i], members[i + 1 + j], True) for j in np.flatnonzero(flipped)]
    return pairs
