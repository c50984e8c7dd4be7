"""Each group sorted once, centred on its median, with prefix sums of weight and value."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_TINY = np.finfo(np.float64).tiny


@dataclass
class _SortedGroups:
    """Per group: sorted values centred on the median, prefix sums of weight
    and weighted value.  Centring keeps the prefix sums (and the S^2/W
    objective built from them) from cancelling on near-constant groups."""

    raw: np.ndarray  # [G, n] ascending, original dtype and values
    values: np.ndarray  # [G, n] float64, raw - center
    center: np.ndarray  # [G] float64
    cum_weight: np.ndarray | None  # [G, n+1]; None means unit weights
    cum_value: np.ndarray  # [G, n+1]

    @property
    def n(self) -> int:
        return self.values.shape[1]

    def weight_at(self, positions: np.ndarray, rows=None) -> np.ndarray:
        """Prefix weight at [G, m] positions (of groups ``rows``, default all)."""
        if self.cum_weight is None:
            return positions.astype(np.float64)
        return self.cum_weight[_row_column(rows, positions)]

    def sum_at(self, positions: np.ndarray, rows=None) -> np.ndarray:
        return self.cum_value[_row_column(rows, positions)]

    def value_at(self, positions: np.ndarray, rows=None) -> np.ndarray:
        return self.values[_row_column(rows, np.minimum(positions, self.n - 1))]

    def subset(self, mask: np.ndarray) -> _SortedGroups:
        if mask.all():
            return self
        cum_weight = None if self.cum_weight is None else self.cum_weight[mask]
        return _SortedGroups(self.raw[mask], self.values[mask], self.center[mask], cum_weight, self.cum_value[mask])


def _row_column(rows, positions):
    """Index pair selecting positions [G, m] from groups ``rows`` (default all)."""
    if rows is None:
        rows = np.arange(positions.shape[0])
    return rows[:, None], positions


def _sort_groups(x: np.ndarray, sample_weight=None) -> _SortedGroups:
    if sample_weight is None:
        raw, weights = np.sort(x, axis=1), None
    else:
        w = np.broadcast_to(np.asarray(sample_weight, dtype=np.float64), x.shape)
        if not np.isfinite(w).all() or (w < 0).any():
            raise ValueError("sample_weight must be finite and non-negative")
        order = np.argsort(x, axis=1, kind="stable")
        raw = np.take_along_axis(x, order, axis=1)
        weights = np.take_along_axis(w, order, axis=1)
    center = raw[:, raw.shape[1] // 2].astype(np.float64)
    values = raw - center[:, None]  # float64 from here on
    cum_value = _prefix_sum(values if weights is None else values * weights)
    cum_weight = None if weights is None else _prefix_sum(weights)
    return _SortedGroups(raw, values, center, cum_weight, cum_value)


def _prefix_sum(a: np.ndarray) -> np.ndarray:
    out = np.zeros((a.shape[0], a.shape[1] + 1))
    np.cumsum(a, axis=1, out=out[:, 1:])
    return out


def _distinct_counts(raw: np.ndarray) -> np.ndarray:
    return 1 + np.count_nonzero(raw[:, 1:] != raw[:, :-1], axis=1)
