"""Candidate cut positions ("bins") into each sorted group, for the DP to choose from."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from graphpass.binning.row_search import _searchsorted_rows
from graphpass.binning.sorted_groups import _SortedGroups

_EXACT_N = 256  # groups this small get the exact DP over every value
_MAX_BINS = 2048  # DP time grows ~ k * bins * log2(bins)
_DP_CELLS = 12_000  # per-group DP effort always allowed: k * bins * log2(bins)


def _bin_count(n: int, k: int) -> int:
    """Number of bins for the DP.  A function of (n, k) only, so a group is
    binned identically alone or in a batch.

    Two rules, whichever asks for more: sqrt(points per cluster) bins per
    cluster (up to 64), which keeps large tensors near the optimum, and a
    fixed effort per group, which makes small groups with few clusters
    exact or nearly so while 768 channels of 768 weights stay fast.
    """
    if n <= _EXACT_N:
        return n
    per_cluster = float(np.clip(np.sqrt(n / k), 2, 64))
    wanted = max(round(per_cluster * k), _affordable_bins(k))
    return int(min(n, max(2 * k, min(_MAX_BINS, wanted))))


@lru_cache(maxsize=None)
def _affordable_bins(k: int) -> int:
    """Most bins whose DP effort k * bins * log2(bins) fits in _DP_CELLS."""
    bins = 2
    while k * (bins + 1) * np.log2(bins + 1) <= _DP_CELLS:
        bins += 1
    return bins


def _bin_positions(sg: _SortedGroups, bins: int, distinct: np.ndarray) -> np.ndarray:
    """[G, bins+1] non-decreasing cut positions into the sorted values, 0 to n.
    Repeated positions are empty bins: they cost nothing in the DP and keep
    every group the same width."""
    exact = distinct <= bins  # every value change fits: the DP is exact
    positions = np.empty((sg.values.shape[0], bins + 1), dtype=np.intp)
    if exact.any():
        positions[exact] = _value_change_positions(sg.raw[exact], bins)
    if not exact.all():
        positions[~exact] = _grid_positions(sg.subset(~exact), bins, distinct[~exact] < sg.n)
    return positions


def _value_change_positions(raw: np.ndarray, bins: int) -> np.ndarray:
    """Every position where the value changes, padded with n."""
    groups, n = raw.shape
    change = np.ones(raw.shape, dtype=bool)
    change[:, 1:] = raw[:, 1:] != raw[:, :-1]
    positions = np.full((groups, bins + 1), n, dtype=np.intp)
    g, col = np.nonzero(change)
    positions[g, (np.cumsum(change, axis=1) - 1)[g, col]] = col
    return positions


def _grid_positions(sg: _SortedGroups, bins: int, has_ties: np.ndarray) -> np.ndarray:
    """Cuts from three grids, so that no part of the data is starved:
    half follow the k-means point density (dense where optimal clusters are
    narrow), a quarter split the mass evenly, a quarter lie on an asinh value
    grid (linear near the median, geometric in the tails) that still reaches
    isolated outliers when the density estimate is swamped by them."""
    by_mass_count = bins // 4 + 1
    by_value_count = bins // 4
    by_density_count = bins + 1 - by_mass_count - by_value_count
    groups, n = sg.values.shape
    by_mass = np.broadcast_to(np.rint(np.linspace(0, n, by_mass_count)).astype(np.intp), (groups, by_mass_count))
    targets = np.concatenate([_asinh_grid(sg.values, by_value_count), _density_grid(sg, by_density_count)], axis=1)
    by_value = _searchsorted_rows(sg.values, targets, side="left")
    positions = np.sort(np.concatenate([by_mass, by_value], axis=1), axis=1)
    if has_ties.any():  # searchsorted cuts are value starts already; mass cuts may not be
        positions[has_ties] = _snap_to_value_start(sg.values[has_ties], positions[has_ties])
    return positions


def _asinh_grid(values: np.ndarray, count: int) -> np.ndarray:
    """``count`` interior values per group, evenly spaced in asinh(v / s)."""
    n = values.shape[1]
    spread = values[:, (3 * n) // 4] - values[:, n // 4]  # interquartile range
    spread = np.where(spread > 0, spread, values[:, -1] - values[:, 0])
    scale = np.where(spread > 0, spread / 4, 1.0)[:, None]
    lo = np.arcsinh(values[:, :1] / scale)
    hi = np.arcsinh(values[:, -1:] / scale)
    steps = np.arange(1, count + 1) / (count + 1)
    return scale * np.sinh(lo + (hi - lo) * steps)


def _density_grid(sg: _SortedGroups, count: int) -> np.ndarray:
    """``count`` interior values per group, evenly spaced in the Panter-Dite
    companding function G(v) = integral of p^(1/3): the asymptotic density
    of optimal k-means centroids.  p is estimated from a fine quantile
    sample; within a sample interval G is taken as linear."""
    groups, n = sg.values.shape
    samples = min(n - 1, 8 * count)
    at = np.rint(np.linspace(0, n - 1, samples + 1)).astype(np.intp)[None, :].repeat(groups, axis=0)
    edge_values = np.take_along_axis(sg.values, at, axis=1)
    mass = np.diff(sg.weight_at(at), axis=1)
    width = np.diff(edge_values, axis=1)
    # integral of p^(1/3) over an interval of mass m and width w: m^(1/3) w^(2/3)
    companded = np.zeros((groups, samples + 1))
    np.cumsum(np.cbrt(mass * width * width), axis=1, out=companded[:, 1:])
    levels = companded[:, -1:] * (np.arange(1, count + 1) / (count + 1))
    return _interp_rows(levels, companded, edge_values)


def _interp_rows(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Row-wise ``np.interp`` for non-decreasing ``xp``."""
    right = np.clip(_searchsorted_rows(xp, x, side="right"), 1, xp.shape[1] - 1)
    x0, x1 = np.take_along_axis(xp, right - 1, axis=1), np.take_along_axis(xp, right, axis=1)
    f0, f1 = np.take_along_axis(fp, right - 1, axis=1), np.take_along_axis(fp, right, axis=1)
    fraction = np.divide(x - x0, x1 - x0, out=np.zeros_like(x), where=x1 > x0)
    return f0 + np.clip(fraction, 0.0, 1.0) * (f1 - f0)


def _snap_to_value_start(values: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Move each cut to the first copy of its value so equal values never split."""
    n = values.shape[1]
    probe = np.take_along_axis(values, np.minimum(positions, n - 1), axis=1)
    return np.where(positions >= n, n, _searchsorted_rows(values, probe, side="left"))
