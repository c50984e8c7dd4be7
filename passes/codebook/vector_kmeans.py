"""k-means in `dim` dimensions: seeding, Lloyd iterations on a sample, and the assignment of
every sub-vector to its nearest centroid (a chunked distance matrix, or a k-d tree for large k)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree
from threadpoolctl import ThreadpoolController

from graphpass.parallel import Workers, stop_point

# One fit at a time: chunks of its assignment run on the run's workers (matmul and argmin
# release the GIL, so threads share the cores). Without workers given, the calling thread alone.
ONE_THREAD = Workers(1)
# Distance-matrix entries per chunk: 1 MB of float32 stays in cache between the matmul and the
# argmin (measured 2-3x faster than 16 MB chunks), with BLAS itself held to one thread per chunk.
_DISTANCE_CELLS = 1 << 18
_KDTREE_MIN_K = 4096  # above this a k-d tree is faster than the distance matrix
_KMEANS_PP_MAX_K = 1024  # init=auto seeds with k-means++ up to here, random rows beyond
_MIN_SAMPLE, _SAMPLE_PER_CENTROID = 65536, 16
_SEED_PER_CENTROID = 32  # k-means++ draws from at most this many sample points per centroid
_CONVERGED = 1e-4  # relative drop in the sample's error below which Lloyd stops early
# Beyond these magnitudes a sub-vector's squared norm (dim of them summed) may overflow
# float32, or its squared distances fall below float32's smallest normal (2^-126).
_LARGEST_UNSCALED, _SMALLEST_UNSCALED = 2.0**60, 2.0**-50


@dataclass(frozen=True)
class KMeansSettings:
    k: int
    iterations: int
    init: str  # auto | kmeans++ | random
    sample: int  # 0: auto
    seed: int


def nearest(vectors: np.ndarray, centroids: np.ndarray,
            workers: Workers = ONE_THREAD) -> tuple[np.ndarray, np.ndarray]:
    """Index of each vector's nearest centroid and the squared distance to it."""
    if len(centroids) > _KDTREE_MIN_K:
        distance, labels = cKDTree(centroids).query(vectors, workers=workers.free)
        return labels.astype(np.int64), distance**2
    points = np.asarray(vectors, dtype=np.float32)
    table = np.asarray(centroids, dtype=np.float32)
    # |x - c|^2 = |x|^2 + 2 (|c|^2 / 2 - x.c): only the bracket decides the argmin.
    half_norms = 0.5 * np.einsum("ij,ij->i", table, table)
    labels = np.empty(len(points), dtype=np.int64)
    distances = np.empty(len(points), dtype=np.float64)
    rows = max(256, _DISTANCE_CELLS // len(table))

    def chunk(begin: int) -> None:
        block = points[begin : begin + rows]
        scores = half_norms - block @ table.T
        best = np.argmin(scores, axis=1)
        labels[begin : begin + rows] = best
        lowest = np.take_along_axis(scores, best[:, None], axis=1)[:, 0]
        distances[begin : begin + rows] = np.maximum(np.einsum("ij,ij->i", block, block) + 2.0 * lowest, 0.0)

    starts = range(0, len(points), rows)
    with _blas_controller().limit(limits=1, user_api="blas"):
        # Each chunk writes its own rows; a single chunk is not worth starting threads for.
        for _ in (workers if len(starts) > 1 else ONE_THREAD).map(chunk, starts):
            pass
    return labels, distances


@functools.cache
def _blas_controller() -> ThreadpoolController:
    """Found once: looking up the loaded BLAS libraries reads /proc and takes ~2 ms."""
    return ThreadpoolController()


def kmeans_vectors(vectors: np.ndarray, importance: np.ndarray | None, settings: KMeansSettings,
                   workers: Workers = ONE_THREAD) -> tuple[np.ndarray, np.ndarray]:
    """Centroids [k', dim] (float64, k' <= k: unused ones dropped) and each vector's label.

    Lloyd runs on a sample; then every vector is assigned once and the centroids move to the
    means of their members, which can only lower the error for those labels.
    """
    if len(vectors) <= settings.k:  # an entry for every vector: exact
        centroids, labels = np.unique(vectors, axis=0, return_inverse=True)
        return centroids.astype(np.float64), labels.ravel()
    exponent = _rescaling_exponent(vectors)
    if exponent:
        centroids, labels = kmeans_vectors(np.ldexp(vectors, -exponent), importance, settings, workers)
        return np.ldexp(centroids, exponent), labels
    rng = np.random.default_rng(settings.seed)
    picked = _sample(len(vectors), settings, rng)
    sample = vectors[picked]
    sample_importance = None if importance is None else importance[picked]
    centroids = _seed(sample, sample_importance, settings, rng)
    centroids = _lloyd(sample, sample_importance, centroids, settings.iterations, workers)
    labels, _ = nearest(vectors, centroids, workers)
    centroids = _means(vectors, importance, labels, centroids)
    return _drop_unused(centroids, labels)


def _rescaling_exponent(vectors: np.ndarray) -> int:
    """0, or the power of two that brings values whose squared distances would overflow
    float32 (a causal mask's -3.4e38) or underflow it (weights of 1e-30) to at most 1: scaling
    by it is exact, so the fit is the one the values would have at that scale."""
    largest = float(np.abs(vectors).max()) if vectors.size else 0.0
    if not np.isfinite(largest) or largest == 0.0 or _SMALLEST_UNSCALED <= largest <= _LARGEST_UNSCALED:
        return 0
    return math.ceil(math.log2(largest))


def _sample(count: int, settings: KMeansSettings, rng: np.random.Generator) -> np.ndarray:
    size = settings.sample or max(_MIN_SAMPLE, _SAMPLE_PER_CENTROID * settings.k)
    size = max(size, settings.k)
    if size >= count:
        return np.arange(count)
    return np.sort(rng.choice(count, size, replace=False))


def _seed(points: np.ndarray, importance: np.ndarray | None, settings: KMeansSettings,
          rng: np.random.Generator) -> np.ndarray:
    plus_plus = settings.init == "kmeans++" or (settings.init == "auto" and settings.k <= _KMEANS_PP_MAX_K)
    if not plus_plus:
        return points[np.sort(rng.choice(len(points), settings.k, replace=False))].astype(np.float64)
    if len(points) > _SEED_PER_CENTROID * settings.k:  # each draw costs a pass: seed from fewer
        picked = np.sort(rng.choice(len(points), _SEED_PER_CENTROID * settings.k, replace=False))
        points, importance = points[picked], None if importance is None else importance[picked]
    return _kmeans_plus_plus(points, importance, settings.k, rng)


def _kmeans_plus_plus(points: np.ndarray, importance: np.ndarray | None, k: int,
                      rng: np.random.Generator) -> np.ndarray:
    """Each next centroid is a point drawn with probability ~ importance x squared distance
    to the centroids so far: spread out, and drawn to the tails that carry the error."""
    weight = np.ones(len(points)) if importance is None else importance
    chosen = [int(rng.choice(len(points), p=weight / weight.sum()))]
    closest = weight * _squared_distances(points, points[chosen[0]])
    for _ in range(1, k):
        cumulative = np.cumsum(closest)
        if cumulative[-1] <= 0:  # every point sits on a centroid: the rest go unused
            chosen += [chosen[0]] * (k - len(chosen))
            break
        pick = min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), len(points) - 1)
        chosen.append(pick)
        np.minimum(closest, weight * _squared_distances(points, points[pick]), out=closest)
    return points[chosen].astype(np.float64)


def _squared_distances(points: np.ndarray, centre: np.ndarray) -> np.ndarray:
    difference = points - centre
    return np.einsum("ij,ij->i", difference, difference).astype(np.float64)


def _lloyd(points: np.ndarray, importance: np.ndarray | None, centroids: np.ndarray, iterations: int,
           workers: Workers) -> np.ndarray:
    previous = math.inf
    for _ in range(iterations):
        stop_point()  # between iterations: a fit over a large table runs for seconds
        labels, distances = nearest(points, centroids, workers)
        error = float(np.dot(distances, importance) if importance is not None else distances.sum())
        if error >= previous * (1.0 - _CONVERGED):
            break
        previous = error
        centroids = _means(points, importance, labels, centroids)
        centroids = _reseed_empty(points, importance, labels, distances, centroids)
    return centroids


def _means(points, importance, labels, centroids) -> np.ndarray:
    """Each centroid moved to the (importance-weighted) mean of its points; empty ones stay."""
    k = len(centroids)
    mass = np.bincount(labels, weights=importance, minlength=k)
    weighted = points if importance is None else points * importance[:, None]
    sums = np.stack([np.bincount(labels, weights=weighted[:, j], minlength=k) for j in range(points.shape[1])], axis=1)
    filled = mass > 0
    moved = centroids.copy()
    moved[filled] = sums[filled] / mass[filled, None]
    return moved


def _reseed_empty(points, importance, labels, distances, centroids) -> np.ndarray:
    """Centroids nobody chose restart at the points that are worst served."""
    empty = np.flatnonzero(np.bincount(labels, minlength=len(centroids)) == 0)
    if empty.size == 0:
        return centroids
    cost = distances if importance is None else distances * importance
    worst = np.argsort(-cost, kind="stable")[: empty.size]
    centroids = centroids.copy()
    centroids[empty[: worst.size]] = points[worst]
    return centroids


def _drop_unused(centroids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Only centroids some vector uses, in their order, so indices pack into fewer bits."""
    used, labels = np.unique(labels, return_inverse=True)
    return centroids[used], labels.ravel()
