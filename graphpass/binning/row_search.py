"""Row-wise binary search over sorted rows, and each weight's nearest codebook entry."""

from __future__ import annotations

import numpy as np

from graphpass.binning.result import _label_dtype


def _searchsorted_rows(rows: np.ndarray, targets: np.ndarray, side: str = "left", row_index=None) -> np.ndarray:
    """Row-wise ``np.searchsorted``: ``rows`` [R, n] sorted per row, ``targets``
    [G, m] searched in ``rows[row_index]`` (default: row g for target row g).

    One row goes straight to numpy.  Many rows run one branchless binary
    search over all (row, target) pairs at once -- a python loop of numpy
    calls per row is slower.  Both give the exact insertion index, so batched
    and one-by-one runs agree bit for bit.
    """
    n = rows.shape[1]
    if row_index is None:
        row_index = np.arange(targets.shape[0])
    if targets.shape[0] == 1:
        return np.searchsorted(rows[row_index[0]], targets[0], side=side)[None, :]
    flat = rows.ravel()
    base = (row_index * n)[:, None] - 1
    count = np.zeros(targets.shape, dtype=np.intp)  # values known to precede target
    step = 1 << (n.bit_length() - 1)
    while step:
        candidate = count + step
        probe = flat[base + np.minimum(candidate, n)]
        precedes = (probe < targets) if side == "left" else (probe <= targets)
        count += step * (precedes & (candidate <= n))
        step >>= 1
    return count


def _assign_nearest(x: np.ndarray, codebook: np.ndarray, center: np.ndarray) -> np.ndarray:
    """Index of the nearest codebook entry per weight (ties go to the lower
    entry).  ``center`` (a value near each group's median) only sharpens the
    lookup table of :func:`_count_below`; it does not change the answer."""
    midpoints = 0.5 * (codebook[:, 1:] + codebook[:, :-1])
    labels = np.empty(x.shape, dtype=_label_dtype(codebook.shape[1]))
    for g in range(x.shape[0]):
        labels[g] = _count_below(x[g], midpoints[g], center[g])
    return labels


# float32 bit pattern -> 16-bit bucket: sign, exponent and 7 mantissa bits
_BUCKET_BITS = 16
_TABLE_MIN_SIZE = 1 << 16  # below this many values plain searchsorted is as fast
_TABLE_MAX_ROUNDS = 4


def _count_below(values: np.ndarray, thresholds: np.ndarray, center: float) -> np.ndarray:
    """For every value, how many of the ascending thresholds are strictly
    below it: ``np.searchsorted(thresholds, values)``, only faster.

    searchsorted makes log2(k) random passes over a large array.  Instead a
    65536-entry table, indexed by the top 16 bits of float32(value - center),
    gives the count of thresholds in lower buckets; the few thresholds that
    share a value's bucket are settled by exact comparison.  The bucket map
    is monotone, so the answer is exactly searchsorted's.  Centring puts the
    finest buckets (floats are densest near 0) where the weights are.
    """
    if values.size < _TABLE_MIN_SIZE or thresholds.size == 0:
        return np.searchsorted(thresholds, values, side="left")
    threshold_buckets = _float_bucket(thresholds, center)
    sharing = np.unique(threshold_buckets, return_counts=True)[1].max()
    if sharing > _TABLE_MAX_ROUNDS:  # thresholds too crowded for the table
        return np.searchsorted(thresholds, values, side="left")
    count_type = np.uint8 if thresholds.size < 256 else np.uint16
    table = np.searchsorted(threshold_buckets, np.arange(1 << _BUCKET_BITS)).astype(count_type)
    count = table.take(_float_bucket(values, center))
    padded = np.append(thresholds, np.inf)
    for _ in range(sharing):
        count += values > padded.take(count)
    return count


def _float_bucket(values: np.ndarray, center: float) -> np.ndarray:
    """Monotone non-decreasing map of floats to [0, 65536): float32
    rounding, subtraction and the bit trick below all preserve order."""
    shift = np.float32(center) if abs(center) < 1e38 else np.float32(0.0)  # keep it finite
    bits = (values.astype(np.float32, copy=False) - shift).view(np.int32)
    # negative floats sort backwards as integers: flip their magnitude bits
    flip = bits >> 31
    flip &= 0x7FFFFFFF
    bits ^= flip
    bits >>= 32 - _BUCKET_BITS
    bits += 1 << (_BUCKET_BITS - 1)
    return bits
