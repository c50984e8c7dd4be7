"""Analyses that several passes and `inspect` share, computed once per model state.

Each is an `Analysis` subclass; `ctx.analysis(Kind)` returns the cached result until a pass
edits the model.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from graphpass.manager import Analysis, PassContext
from graphpass.scopes import Scope
from graphpass.weights import WeightReader, WeightRef

_Result = TypeVar("_Result")


def _per_weight(ctx: PassContext, label: str, weights: Sequence[WeightRef],
                summarise: Callable[[np.ndarray], _Result]) -> list[_Result]:
    """`summarise(value)` for every weight, in order, on the run's workers.

    numpy releases the GIL in its calls over a whole tensor or chunk (protobuf's copy of each
    tensor holds it), so threads share the cores."""
    reader = WeightReader(weights)
    results = []
    with ctx.progress(label, len(weights)) as advance:
        for result in ctx.workers.map(lambda weight: summarise(reader.read(weight)), weights):
            results.append(result)
            advance(1)
    return results


def value_bytes(values: np.ndarray) -> np.ndarray:
    """The values as a flat uint8 array, however the file stored them (a view when it can be).

    Viewed as uint8 rather than cast: the buffer protocol has no code for ml_dtypes' bfloat16,
    int4 or float8, and memoryview.cast refuses them.
    """
    if values.dtype == object:  # string tensors (class labels) hold references, not bytes
        return _string_bytes(values.reshape(-1))
    return np.ascontiguousarray(values).reshape(-1).view(np.uint8)


def _string_bytes(strings: np.ndarray) -> np.ndarray:
    # Each string length-prefixed, so ["ab", "c"] and ["a", "bc"] stay different.
    encoded = [s if isinstance(s, bytes) else str(s).encode() for s in strings]
    return np.frombuffer(b"".join(len(e).to_bytes(8, "little") + e for e in encoded), np.uint8)


# The bucket key sums a weight's bytes as 64-bit words, wrapping around, in this many
# contiguous runs. It runs at memory speed (blake2b managed 0.6 GB/s per core), and since every
# bucket is compared byte for byte, a collision costs only a comparison. Integer sums are exact,
# so equal bytes get equal keys at any buffer alignment (float sums would not: numpy's SIMD
# paths round differently by alignment). The runs make the key depend on where the values
# sit, so a transposed or shuffled copy of a weight rarely shares its bucket.
KEY_RUNS = 64


def content_key(data: np.ndarray) -> bytes:
    """A key of a flat uint8 array's contents: equal contents, equal keys."""
    whole = data.size // 8 * 8
    words = data[:whole].view(np.uint64)
    runs = min(KEY_RUNS, words.size)
    sums = np.add.reduceat(words, np.arange(runs, dtype=np.int64) * words.size // runs) if runs else words
    return sums.tobytes() + data[whole:].tobytes()


@dataclass(frozen=True)
class Fingerprint:
    """Weights with different fingerprints differ; equal ones usually match, but only a byte
    comparison (ExactDuplicates) says they do."""

    dtype: int
    shape: tuple[int, ...]
    key: bytes


class WeightFingerprints(Analysis):
    """A content key per weight, bucketing candidates for exact duplicates."""

    @classmethod
    def compute(cls, ctx: PassContext) -> dict[WeightRef, Fingerprint]:
        weights = ctx.model.weights()
        # A weight alone with its dtype and shape has no duplicate: it is not read, and its
        # empty key leaves its fingerprint unique all the same.
        counts = Counter((w.dtype, w.shape) for w in weights)
        readable = [w for w in weights if counts[(w.dtype, w.shape)] > 1]
        keys = _per_weight(ctx, "fingerprinting weights", readable, lambda value: content_key(value_bytes(value)))
        key_of = dict(zip(readable, keys))
        return {w: Fingerprint(w.dtype, w.shape, key_of.get(w, b"")) for w in weights}


@dataclass
class DuplicateGroup:
    """Weights with identical bytes, dtype and shape."""

    members: list[WeightRef]

    @property
    def saved_bytes(self) -> int:
        return self.members[0].nbytes * (len(self.members) - 1)


class ExactDuplicates(Analysis):
    """Groups of byte-identical weights, bucketed by fingerprint and then compared byte for byte."""

    @classmethod
    def compute(cls, ctx: PassContext) -> list[DuplicateGroup]:
        prints = ctx.analysis(WeightFingerprints)
        buckets: dict[Fingerprint, list[WeightRef]] = defaultdict(list)
        for weight in ctx.model.weights():
            buckets[prints[weight]].append(weight)
        shared = [members for members in buckets.values() if len(members) > 1]
        reader = WeightReader([w for members in shared for w in members])
        groups = []
        for members in shared:
            groups.extend(_confirm_identical(members, reader))
        return groups


def _confirm_identical(members: list[WeightRef], reader: WeightReader) -> list[DuplicateGroup]:
    """Split a bucket into groups whose bytes really match (a collision stays apart)."""
    groups: list[tuple[np.ndarray, list[WeightRef]]] = []
    for weight in members:
        data = value_bytes(reader.read(weight))
        for reference, group in groups:
            if same_bytes(reference, data):
                group.append(weight)
                break
        else:
            groups.append((data, [weight]))
    return [DuplicateGroup(group) for _, group in groups if len(group) > 1]


# Bytes are compared this many at a time: a collision, which usually differs early, stops
# after the first slice, and each slice's comparison result stays in cache.
_COMPARE_SLICE = 1 << 20


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two flat uint8 arrays hold the same bytes."""
    if a.size != b.size:
        return False
    return all(np.array_equal(a[i:i + _COMPARE_SLICE], b[i:i + _COMPARE_SLICE]) for i in range(0, a.size, _COMPARE_SLICE))


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


# Fingerprints and sketches each read the weights themselves. One read for both (one worker
# computing key and sketch) saved ~0.2 s of `inspect` on the 2 GB bench model, the copy protobuf
# makes of each tensor, but cost `tie` ~1.2 s: tie edits the model between the two analyses,
# so sketches taken along with the fingerprints are stale by the time it asks for them.
class WeightSketches(Analysis):
    """A Sketch for every float weight large enough to relate to others."""

    @classmethod
    def compute(cls, ctx: PassContext) -> dict[WeightRef, Sketch]:
        weights = [w for w in ctx.model.weights() if w.is_float and w.size >= RELATED_MIN_SIZE]
        sketches = _per_weight(ctx, "sketching weights", weights, sketch_of)
        return {w: s for w, s in zip(weights, sketches) if s.norm > 0 and np.isfinite(s.norm)}


# A sketch reads its tensor in chunks of this many elements, each converted to float64 once
# into a per-thread buffer (2 MB) that stays in cache while every statistic is taken from it:
# the tensor leaves memory once, where whole-array calls read it once per statistic and cast
# it to float64 in four of them. On the 2 GB bench model (2 threads) this stage took 2.0 s
# with whole arrays and 0.95 s in 256K chunks; 64K chunks took 1.07 s (more calls, each
# holding the GIL between numpy calls), 1M 1.06 s and 4M 1.47 s (past the caches).
SKETCH_CHUNK = 1 << 18
_scratch = threading.local()


def _chunk_buffer() -> np.ndarray:
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.size < SKETCH_CHUNK:
        buffer = _scratch.buffer = np.empty(SKETCH_CHUNK, np.float64)
    return buffer


def sketch_of(values: np.ndarray) -> Sketch:
    """The Sketch of a float tensor of any float dtype; sums accumulate in float64.

    Chunking changes only the order of the float64 additions, which moves the sums by far less
    than ROUNDING_SLACK (high and low are exact: the float64 copy is exact)."""
    flat = values.reshape(-1)
    size = flat.size
    count = min(LAYOUT_BLOCKS, size)
    starts = np.arange(count + 1, dtype=np.int64) * size // count  # block b is starts[b]:starts[b + 1]
    block_sums = np.zeros(count)
    squares = absolutes = 0.0
    highs, lows = [], []
    buffer = _chunk_buffer()
    for begin, end, block, cuts in _chunks(starts):
        chunk = buffer[:end - begin]
        np.copyto(chunk, flat[begin:end])
        if cuts is None:
            block_sums[block] += chunk.sum()
        else:
            block_sums[block:block + cuts.size] = np.add.reduceat(chunk, cuts)
        highs.append(chunk.max())
        lows.append(chunk.min())
        np.abs(chunk, out=chunk)
        absolutes += chunk.sum()
        np.square(chunk, out=chunk)
        squares += chunk.sum()
    return Sketch(
        size=size,
        norm=float(np.sqrt(squares)),
        total=float(block_sums.sum()),
        abs_total=float(absolutes),
        high=float(np.max(highs)),
        low=float(np.min(lows)),
        blocks=block_sums / np.sqrt(np.diff(starts)),
    )


def _chunks(starts: np.ndarray) -> Iterator[tuple[int, int, int, np.ndarray | None]]:
    """(begin, end, block, cuts) covering the tensor in order, at most SKETCH_CHUNK long each.

    Layout blocks that fit go whole into a chunk, the first being `block` and `cuts` their
    offsets in it; a longer block is cut into pieces, each a chunk with `cuts` None.
    """
    lengths = np.diff(starts)
    count = lengths.size
    if lengths.max() <= SKETCH_CHUNK:
        per_chunk = SKETCH_CHUNK // int(lengths.max())
        for first in range(0, count, per_chunk):
            last = min(first + per_chunk, count)
            yield int(starts[first]), int(starts[last]), first, starts[first:last] - starts[first]
        return
    for block in range(count):
        begin, end = int(starts[block]), int(starts[block + 1])
        pieces = -(-(end - begin) // SKETCH_CHUNK)
        cuts = [begin + (end - begin) * i // pieces for i in range(pieces + 1)]
        for piece in range(pieces):
            yield cuts[piece], cuts[piece + 1], block, None


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
    # Comparing every pair is quadratic (0.2 s for the 900 bias vectors of the bench model), so
    # pairs are first drawn from a sorted 1-D coordinate: |x_k - y_k| <= ||x - y||, so a pair
    # farther apart there than a test's limit cannot pass it. The full tests then run on those.
    spread = np.argsort(np.ptp(layout, axis=0))[::-1]
    transposed = _passing(_pairs_near(invariant[:, 0], exact_limits[0]),
                          lambda a, b: np.all(np.abs(invariant[b] - invariant[a]) <= exact_limits, axis=1))
    same = _passing(_pairs_near(layout[:, spread[0]], bound), _layout_test(layout, spread, np.subtract, bound))
    flipped = _passing(_pairs_near(layout[:, spread[0]], bound, mirrored=True), _layout_test(layout, spread, np.add, bound))
    found = {(int(a), int(b), False) for a, b in np.concatenate([transposed, same])}
    found |= {(int(a), int(b), True) for a, b in flipped}
    return [(members[a], members[b], mirrored) for a, b, mirrored in sorted(found)]


# Coordinates of the layout tested before all of them: the norm over a few is at most the full
# norm, and on clustered sketches (the bench model's LayerNorm gammas) most candidate pairs
# from the window already fail there.
_COARSE_COORDINATES = 16


def _layout_test(layout: np.ndarray, spread: np.ndarray, combine: np.ufunc, bound: float):
    """||combine(layout[b], layout[a])|| <= bound, for np.subtract (same) or np.add (flipped)."""
    coarse = layout[:, spread[:_COARSE_COORDINATES]]

    def test(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        close = np.linalg.norm(combine(coarse[b], coarse[a]), axis=1) <= bound * (1 + 1e-6)
        close[close] = np.linalg.norm(combine(layout[b[close]], layout[a[close]]), axis=1) <= bound
        return close

    return test


def _pairs_near(keys: np.ndarray, limit: float, mirrored: bool = False) -> Iterator[np.ndarray]:
    """Index pairs (a, b), a < b, with |keys[b] - keys[a]| <= limit (|keys[b] + keys[a]| when
    mirrored), and perhaps a few more: the limit is widened so that rounding never drops one.

    They come in batches of about _PAIR_BATCH, so that a cluster of near-identical sketches,
    where every pair is a candidate, never holds them all at once.
    """
    limit = limit * (1 + 1e-6)
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    centres = -ordered if mirrored else ordered
    low = np.searchsorted(ordered, centres - limit, side="left")
    high = np.searchsorted(ordered, centres + limit, side="right")
    if not mirrored:
        low = np.maximum(low, np.arange(len(keys)) + 1)  # each unordered pair once, none with itself
    counts = np.maximum(high - low, 0)
    ends = np.cumsum(counts)
    cuts = np.unique(np.searchsorted(ends, np.arange(_PAIR_BATCH, ends[-1], _PAIR_BATCH), side="right"))
    for begin, end in zip([0, *cuts], [*cuts, len(keys)]):
        yield _window_pairs(order, begin, low[begin:end], counts[begin:end])


def _window_pairs(order: np.ndarray, begin: int, low: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The pairs of sorted positions begin, begin+1, ... with positions low[i] to low[i]+counts[i]-1."""
    first = np.repeat(np.arange(begin, begin + counts.size), counts)
    second = np.repeat(low, counts) + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    a, b = order[first], order[second]
    pairs = np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1)
    return pairs[pairs[:, 0] != pairs[:, 1]]  # a mirrored window may hold the key itself


# Candidate pairs are tested about this many at a time (~8 MB of layout rows gathered).
_PAIR_BATCH = 4096


def _passing(batches: Iterator[np.ndarray], test: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    kept = [batch[test(batch[:, 0], batch[:, 1])] for batch in batches]
    return np.concatenate(kept)
