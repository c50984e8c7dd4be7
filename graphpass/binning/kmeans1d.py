"""Near-exact 1-D k-means: candidate cuts, the exact DP over them, Lloyd, nearest labels.

The steps, and what they cost, are told in the package docstring (graphpass/binning/__init__.py).
"""

from __future__ import annotations

import numpy as np

from graphpass.binning.candidate_cuts import _bin_count, _bin_positions
from graphpass.binning.lloyd import _lloyd, _run_means
from graphpass.binning.optimal_cuts import _optimal_cuts
from graphpass.binning.result import Binning, _as_groups, _label_dtype, _pad_row
from graphpass.binning.row_search import _assign_nearest
from graphpass.binning.sorted_groups import _SortedGroups, _distinct_counts, _row_column, _sort_groups


def kmeans(x: np.ndarray, k: int, *, sample_weight=None) -> Binning:
    """Near-exact 1-D k-means per group (see the module docstring).

    Globally optimal when a group has at most 256 values or at most
    ``_bin_count(n, k)`` distinct values; otherwise exact on a fine binning,
    then polished by Lloyd.  On tensors of 10k+ weights that beats
    scikit-learn's KMeans(n_init=1) squared error (by 0.3-10%).  Groups of
    a few hundred to a few thousand weights get coarser bins (to keep many
    channels fast) and Lloyd can then stop in a different local optimum
    than scikit-learn's: in sweeps ~2% of such groups ended up to 0.5%
    worse, while the total over groups was 2-8% better.

    A group with at most ``k`` distinct values gets exactly those values
    (padded, see :class:`Binning`), so its reconstruction is exact.
    ``sample_weight`` (shape of ``x``) weights each value's squared error.
    """
    data = _as_groups(x)
    rows = max(1, _CHUNK_VALUES // data.shape[1])
    if data.shape[0] <= rows:
        return _kmeans_groups(data, k, sample_weight)
    # Every step is per group, so a slice of groups at a time gives the same answer with the
    # working set (sorted copies, prefix sums: ~45 bytes a value) of one slice.
    weights = None if sample_weight is None else np.broadcast_to(sample_weight, data.shape)
    parts = [_kmeans_groups(data[start:start + rows], k, None if weights is None else weights[start:start + rows])
             for start in range(0, data.shape[0], rows)]
    return Binning(np.concatenate([p.codebook for p in parts]), np.concatenate([p.labels for p in parts]))


# Values per slice of groups that kmeans fits at once.
_CHUNK_VALUES = 1 << 22


def _kmeans_groups(data: np.ndarray, k: int, sample_weight) -> Binning:
    """`kmeans` on `data` [groups, n] at once."""
    label_dtype = _label_dtype(k)
    sg = _sort_groups(data, sample_weight)
    codebook = np.empty((data.shape[0], k))
    labels = np.empty(data.shape, dtype=label_dtype)
    distinct = _distinct_counts(sg.raw)
    few = distinct <= k
    for g in np.flatnonzero(few):  # no more values than clusters: keep them all
        values = np.unique(sg.raw[g])
        codebook[g] = _pad_row(values.astype(np.float64), k)
        labels[g] = np.searchsorted(values, data[g])  # exact match, no rounding
    if few.all():
        return Binning(codebook, labels)
    if not few.any():  # the common case: no copies of the data
        codebook[:] = _kmeans_codebook(sg, k, distinct)
        return Binning(codebook, _assign_nearest(data, codebook, sg.center))
    many = ~few
    codebook[many] = _kmeans_codebook(sg.subset(many), k, distinct[many])
    labels[many] = _assign_nearest(data[many], codebook[many], sg.center[many])
    return Binning(codebook, labels)


# Groups per DP batch ~ this / bins. Smaller batches keep temporaries in cache but spend their
# time in numpy's per-call work, holding the GIL: at 8192, two threads fitting four weights of
# groups of 128 at k=16 took 4.28 s, more than one thread's 3.53; at 65536, 2.58 s (channels of
# 2048: 0.66 s to 0.45 s), with the same answer (bench/bench_kmeans_threads.py).
_DP_CHUNK_CELLS = 65536


def _kmeans_codebook(sg: _SortedGroups, k: int, distinct: np.ndarray) -> np.ndarray:
    """Codebook [G, k] for groups with more than k distinct values."""
    bins = _bin_count(sg.n, k)
    positions = _bin_positions(sg, bins, distinct)
    cum_w, cum_s = sg.weight_at(positions), sg.sum_at(positions)
    bin_cuts = np.empty((positions.shape[0], k + 1), dtype=np.intp)
    chunk = max(1, _DP_CHUNK_CELLS // bins)  # groups are independent: same answer
    for start in range(0, positions.shape[0], chunk):
        part = slice(start, start + chunk)
        bin_cuts[part] = _optimal_cuts(cum_w[part], cum_s[part], k)
    cuts = _lloyd(sg, np.take_along_axis(positions, bin_cuts, axis=1))
    codebook = _run_means(sg, cuts) + sg.center[:, None]
    # a run of one repeated value reproduces that value bit-exactly
    first = sg.raw[_row_column(None, np.minimum(cuts[:, :-1], sg.n - 1))]
    last = sg.raw[_row_column(None, np.maximum(cuts[:, 1:] - 1, 0))]
    single = (first == last) & (cuts[:, 1:] > cuts[:, :-1])
    return np.sort(np.where(single, first, codebook), axis=1)
