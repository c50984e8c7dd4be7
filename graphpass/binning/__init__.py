"""Scalar weight sharing ("binning"): the numeric engine, pure numpy.

Every function takes ``x`` shaped ``[groups, n]`` (a 1-D array is one group)
and returns a :class:`Binning`: one ascending codebook row per group plus,
for every weight, the index of its codebook entry.  Everything here is
deterministic: the same input gives the same bytes, and a group gets the
same answer whether it is binned alone or together with others.

The centrepiece is :func:`kmeans`, a near-exact 1-D k-means:

1. Sort each group once and keep prefix sums of weight and value.  In 1-D
   every optimal cluster is a contiguous run of sorted values, and with the
   prefix sums the cost of any run is O(1).
2. Choose ``_bin_count(n, k)`` candidate cut positions ("bins").  Groups of
   at most 256 values, and groups with no more distinct values than bins,
   use every value change, which makes the next step the exact optimum.
   Larger groups mix cuts spread by the density of optimal k-means centroids
   (Panter-Dite, ~p^(1/3)), equal-mass cuts, and an asinh value grid that
   reaches sparse tails and outliers.  Equal values are never split.
3. Exact dynamic programme over the bins (Ckmeans.1d.dp style) with the
   divide-and-conquer row-minima optimisation, vectorised over all rows of a
   recursion level and over all groups at once.
4. Lloyd iterations on the full-precision sorted values; with prefix sums an
   iteration costs O(k log n).  A step is kept only if it lowers the error.
5. Label every weight with its nearest centroid.

Typical cost on a 2-core box: 1 M weights in ~0.05 s at k=16 and ~0.3 s at
k=256; 768 channels of 768 weights in ~0.3 s at k=16.
"""

from graphpass.binning.kmeans1d import kmeans
from graphpass.binning.mixture import gmm
from graphpass.binning.result import Binning
from graphpass.binning.simple_codebooks import adaptive, binary, ternary, uniform

__all__ = ["Binning", "kmeans", "uniform", "adaptive", "gmm", "ternary", "binary"]
