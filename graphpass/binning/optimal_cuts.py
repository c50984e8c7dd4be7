"""The exact dynamic programme that cuts the bins into k runs of least squared error."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from graphpass.binning.sorted_groups import _TINY

# Minimising the squared error is maximising sum_c S_c^2 / W_c (S: weighted
# value sum, W: weight of cluster c), because sum w v^2 is fixed.  So a run of
# bins (j, m] costs -(S_m - S_j)^2 / (W_m - W_j) and no sum of squares is
# needed.  Layer l of the DP, D_l[m] = min_j D_{l-1}[j] + cost(j, m), is a
# Monge row-minima problem: the leftmost argmin is non-decreasing in m.  So
# divide and conquer: scan the middle row of every open interval of rows over
# the columns its solved neighbours allow; all intervals of one recursion
# level, and all groups, go through numpy as one flat ragged batch.
#
# Layer l only needs rows m in [l, B-k+l] (every segment holds a bin) and
# columns j in [l-1, m-1].  In coordinates relative to l, r = m - l and
# c = j - l + 1, that is always rows [0, B-k] and columns [0, r], so one
# recursion schedule serves every layer.


@lru_cache(maxsize=64)
def _dc_schedule(rows: int) -> tuple:
    """Recursion levels for rows 0..rows-1: per level the middle rows and the
    slots (row + 1, in an argmin array with sentinels at 0 and rows + 1) of
    the already-solved rows bounding each interval."""
    levels = []
    lo, hi = np.array([0]), np.array([rows - 1])
    while lo.size:
        mid = (lo + hi) >> 1
        levels.append((mid, lo, hi + 2))  # slots of rows lo - 1 and hi + 1
        left, right = lo < mid, mid < hi
        lo, hi = np.concatenate([lo[left], mid[right] + 1]), np.concatenate([mid[left] - 1, hi[right]])
    return tuple(levels)


def _optimal_cuts(cum_w: np.ndarray, cum_s: np.ndarray, k: int) -> np.ndarray:
    """[G, k+1] bin indices cutting the bins optimally into k runs.

    ``cum_w``, ``cum_s``: [G, B+1] prefix weight and value at the bin edges.
    """
    groups, width = cum_w.shape
    bins = width - 1
    rows = bins - k + 1
    best = -_run_energy(cum_w, cum_s)  # layer 1: one run (0, m]
    floor = np.zeros((groups, rows), dtype=np.intp)  # layer 1 runs start at 0
    choices = []  # per layer, the relative argmin column of every relative row
    for layer in range(2, k):
        best, choice = _dp_layer(best, cum_w, cum_s, layer, floor)
        choices.append(choice)
        floor = _next_floor(choice)
    cuts = np.empty((groups, k + 1), dtype=np.intp)
    cuts[:, 0], cuts[:, k] = 0, bins
    if k > 1:  # the last layer needs row m = B only
        scores = best[:, k - 1 : bins] + _run_cost(cum_w, cum_s, np.arange(k - 1, bins), bins)
        cuts[:, k - 1] = k - 1 + np.argmin(scores, axis=1)
    all_groups = np.arange(groups)
    for layer in range(k - 1, 1, -1):
        row = cuts[:, layer] - layer
        cuts[:, layer - 1] = choices[layer - 2][all_groups, row + 1] + layer - 1
    return cuts


def _next_floor(choice: np.ndarray) -> np.ndarray:
    """Lower column bounds for the next layer.

    The start of the last run never moves left when a run is added:
    J_{l+1}(m) >= J_l(m) (optimal partitions interleave; the tests compare
    the DP with brute force and with a plain O(k n^2) DP).  Row r of layer l+1 is absolute row
    r + l + 1, i.e. row r + 1 of layer l, whose column shifts by one.  The
    last row has no counterpart and borrows its left neighbour's bound.
    """
    rows = choice.shape[1] - 2
    floor = np.empty((choice.shape[0], rows), dtype=np.intp)
    floor[:, : rows - 1] = choice[:, 2 : rows + 1] - 1
    floor[:, rows - 1] = floor[:, rows - 2] if rows > 1 else 0
    return np.maximum(floor, 0)


def _run_cost(cum_w, cum_s, starts, end):
    """Cost of the runs (start, end] for a vector of starts and one end."""
    return -_run_energy(cum_w[:, end : end + 1] - cum_w[:, starts], cum_s[:, end : end + 1] - cum_s[:, starts])


def _run_energy(weight, total):
    """S^2 / W of runs; an empty run has total == 0 exactly and scores 0."""
    return total * total / (weight + _TINY)


def _dp_layer(prev, cum_w, cum_s, layer, floor):
    """One DP layer.  Returns the new D (absolute rows) and the relative
    argmin columns, stored at slot r + 1 of a [G, rows + 2] array."""
    groups, width = prev.shape
    rows = floor.shape[1]
    best = np.full_like(prev, np.inf)
    choice = np.empty((groups, rows + 2), dtype=np.intp)
    choice[:, 0], choice[:, rows + 1] = 0, rows  # sentinels: no bound
    # flat index of (group, absolute column layer-1): relative column 0
    column_base = (np.arange(groups) * width + layer - 1)[:, None]
    flat = (prev.ravel(), cum_w.ravel(), cum_s.ravel())
    for middle, left_slot, right_slot in _dc_schedule(rows):
        hi = np.minimum(choice[:, right_slot], middle)  # column j < row m
        lo = np.minimum(np.maximum(choice[:, left_slot], floor[:, middle]), hi)
        value, argmin = _ragged_min(flat, column_base, middle, lo, hi)
        best[:, middle + layer] = value
        choice[:, middle + 1] = argmin
    return best, choice


def _ragged_min(flat, column_base, middle, lo, hi):
    """For every (group, row): min and leftmost argmin over relative columns
    lo..hi of D_prev[col] + cost(col, row), as one flat vectorised pass."""
    prev, cum_w, cum_s = flat
    lengths = (hi - lo + 1).ravel()
    ends = np.cumsum(lengths)
    starts = ends - lengths
    cell = np.arange(ends[-1]) + np.repeat((column_base + lo).ravel() - starts, lengths)
    row = (column_base + middle + 1).ravel()  # absolute row m is relative column m - l + 1
    weight = np.repeat(cum_w.take(row), lengths) - cum_w.take(cell)
    total = np.repeat(cum_s.take(row), lengths) - cum_s.take(cell)
    scores = prev.take(cell) - _run_energy(weight, total)
    minima = np.minimum.reduceat(scores, starts)
    hits = np.flatnonzero(scores == np.repeat(minima, lengths))
    first_hit = hits.take(np.searchsorted(hits, starts))
    return minima.reshape(lo.shape), (first_hit - starts).reshape(lo.shape) + lo
