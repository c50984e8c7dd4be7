"""Codebooks that need no search: uniform grid, equal-mass bins, ternary, binary."""

from __future__ import annotations

import numpy as np

from graphpass.binning.lloyd import _run_means
from graphpass.binning.result import Binning, _as_groups, _label_dtype
from graphpass.binning.row_search import _searchsorted_rows
from graphpass.binning.sorted_groups import _SortedGroups, _row_column, _sort_groups


def uniform(x: np.ndarray, k: int, *, symmetric: bool = False) -> Binning:
    """k evenly spaced levels from the group's min to max (``symmetric``:
    from -max|x| to +max|x|, so 0 is a level when k is odd); every weight
    takes the nearest level.  k == 1 uses the middle of the range."""
    data = _as_groups(x).astype(np.float64)
    label_dtype = _label_dtype(k)
    if symmetric:
        hi = np.abs(data).max(axis=1)
        lo = -hi
    else:
        lo, hi = data.min(axis=1), data.max(axis=1)
    if k == 1:
        codebook = (0.5 * (lo + hi))[:, None]
        return Binning(codebook, np.zeros(data.shape, dtype=label_dtype))
    codebook = lo[:, None] + (hi - lo)[:, None] * (np.arange(k) / (k - 1))
    step = np.where(hi > lo, (hi - lo) / (k - 1), 1.0)[:, None]
    labels = np.clip(np.rint((data - lo[:, None]) / step), 0, k - 1)
    return Binning(codebook, labels.astype(label_dtype))


def adaptive(x: np.ndarray, k: int) -> Binning:
    """Equal-mass (quantile) bins: each of the k bins holds about n/k weights
    and is represented by the mean of its members.  Equal values never
    straddle a bin edge; a long run of one value fills its bin and the bins
    after it share out the remaining weights evenly.  Bins left over (fewer
    distinct values than k) are empty and hold the largest value."""
    data = _as_groups(x)
    label_dtype = _label_dtype(k)
    sg = _sort_groups(data)
    cuts = _equal_mass_cuts(sg, k)
    codebook = _run_means(sg, cuts) + sg.center[:, None]
    # a weight's bin is the number of interior edges at or below its value
    inner = cuts[:, 1:-1]
    edges = np.where(inner < sg.n, sg.raw[_row_column(None, np.minimum(inner, sg.n - 1))], np.inf)
    labels = np.empty(data.shape, dtype=label_dtype)
    for g in range(data.shape[0]):
        labels[g] = np.searchsorted(edges[g], data[g], side="right")
    return Binning(codebook, labels)


def _equal_mass_cuts(sg: _SortedGroups, k: int) -> np.ndarray:
    """Cut i aims at an equal share of the weight left after cut i-1, then
    moves to the nearer end of the run of equal values it falls in."""
    groups, n = sg.values.shape
    cuts = np.zeros((groups, k + 1), dtype=np.intp)
    cuts[:, k] = n
    total = sg.weight_at(np.full((groups, 1), n))
    for i in range(1, k):
        done = sg.weight_at(cuts[:, i - 1 : i])
        target = done + (total - done) / (k - i + 1)
        if sg.cum_weight is None:  # unit weights: prefix weight == position
            at = np.ceil(target).astype(np.intp)
        else:
            at = np.minimum(_searchsorted_rows(sg.cum_weight, target, side="left"), n)
        value = sg.value_at(np.maximum(at - 1, 0))
        run_start = _searchsorted_rows(sg.values, value, side="left")
        run_end = _searchsorted_rows(sg.values, value, side="right")
        start_closer = target - sg.weight_at(run_start) <= sg.weight_at(run_end) - target
        cut = np.where(start_closer & (run_start > cuts[:, i - 1 : i]), run_start, run_end)
        cuts[:, i] = np.where(at > 0, cut, 0)[:, 0]
    return cuts


def ternary(x: np.ndarray, *, delta_factor: float = 0.7) -> Binning:
    """Ternary weight networks (Li & Liu 2016), per group: threshold
    delta = delta_factor * mean|W|; weights above it in magnitude become
    +-alpha with alpha their mean magnitude, the rest become 0."""
    data = _as_groups(x).astype(np.float64)
    magnitude = np.abs(data)
    delta = delta_factor * magnitude.mean(axis=1, keepdims=True)
    large = magnitude > delta
    count = large.sum(axis=1)
    alpha = np.divide((magnitude * large).sum(axis=1), count, out=np.zeros(data.shape[0]), where=count > 0)
    codebook = np.stack([-alpha, np.zeros_like(alpha), alpha], axis=1)
    labels = 1 + np.sign(data).astype(np.int8) * large  # 0: -alpha, 1: 0, 2: +alpha
    return Binning(codebook, labels.astype(np.uint8))


def binary(x: np.ndarray) -> Binning:
    """Binary weights (XNOR-Net style), per group: sign(W) * mean|W|, with
    zero weights mapped to +mean|W|."""
    data = _as_groups(x).astype(np.float64)
    alpha = np.abs(data).mean(axis=1)
    codebook = np.stack([-alpha, alpha], axis=1)
    return Binning(codebook, (data >= 0).astype(np.uint8))
