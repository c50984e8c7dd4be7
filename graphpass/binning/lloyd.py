"""Lloyd refinement of the cuts on the full-precision sorted values."""

from __future__ import annotations

import numpy as np

from graphpass.binning.optimal_cuts import _run_energy
from graphpass.binning.row_search import _searchsorted_rows
from graphpass.binning.sorted_groups import _SortedGroups

_LLOYD_MAX_ITER = 200


def _run_sums(sg: _SortedGroups, cuts: np.ndarray, rows=None):
    """Weight and weighted value sum of every run between consecutive cuts."""
    return np.diff(sg.weight_at(cuts, rows), axis=1), np.diff(sg.sum_at(cuts, rows), axis=1)


def _objective(weight, total) -> np.ndarray:
    """Per group sum S^2/W: larger is better (squared error = const - this)."""
    return _run_energy(weight, total).sum(axis=1)


def _run_means(sg: _SortedGroups, cuts: np.ndarray, rows=None) -> np.ndarray:
    """Mean of every run; an empty run takes the value at its cut, which
    keeps the row sorted."""
    weight, total = _run_sums(sg, cuts, rows)
    at_cut = sg.value_at(cuts[:, :-1], rows)
    return np.divide(total, weight, out=at_cut, where=weight > 0)


def _lloyd(sg: _SortedGroups, cuts: np.ndarray, max_iter: int = _LLOYD_MAX_ITER) -> np.ndarray:
    """Lloyd iterations as moves of the cuts: each cut jumps to the midpoint
    of its two neighbouring means.  A group stops when a step no longer
    lowers its error, so the result is never worse than the start."""
    cuts = cuts.copy()
    objective = _objective(*_run_sums(sg, cuts))
    active = np.arange(cuts.shape[0])
    for _ in range(max_iter):
        if active.size == 0:
            break
        means = _run_means(sg, cuts[active], active)
        moved = cuts[active]
        midpoints = 0.5 * (means[:, 1:] + means[:, :-1])
        moved[:, 1:-1] = _searchsorted_rows(sg.values, midpoints, side="right", row_index=active)
        gain = _objective(*_run_sums(sg, moved, active))
        better = gain > objective[active]
        cuts[active[better]] = moved[better]
        objective[active[better]] = gain[better]
        active = active[better]
    return cuts
