"""What every method takes, ``[groups, n]`` weights, and returns: a :class:`Binning`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Binning:
    """Codebook per group and, for every weight, its codebook index.

    ``codebook`` is float64 ``[groups, k]``, ascending per row.  A group with
    fewer than ``k`` distinct values (or, for :func:`gmm`, fewer surviving
    components) pads its row by repeating its largest entry; labels never
    point at the padding.  ``labels`` is uint8 (k <= 256) or uint16,
    ``[groups, n_per_group]``.
    """

    codebook: np.ndarray
    labels: np.ndarray

    def reconstruct(self) -> np.ndarray:
        """The shared weights, ``[groups, n_per_group]`` float64."""
        return np.take_along_axis(self.codebook, self.labels.astype(np.intp), axis=1)


def _as_groups(x) -> np.ndarray:
    """``x`` as a C-contiguous ``[groups, n]`` float array.  float32 stays
    float32: it sorts twice as fast and converts to float64 exactly later."""
    arr = np.asarray(x)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"expected a non-empty [groups, n] array, got shape {arr.shape}")
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError("weights must be finite")
    return np.ascontiguousarray(arr)


def _label_dtype(k: int) -> type:
    if not 1 <= k <= 65536:
        raise ValueError(f"k must be in [1, 65536], got {k}")
    return np.uint8 if k <= 256 else np.uint16


def _pad_row(values: np.ndarray, k: int) -> np.ndarray:
    """An ascending row padded to length k by repeating its last value."""
    return np.concatenate([values, np.full(k - values.size, values[-1])])
