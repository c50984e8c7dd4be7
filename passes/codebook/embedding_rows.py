"""hot_rows: which weights are embedding tables it applies to, and which of their rows it brings
back to exact (the most read, up to HOT_ROWS_MAX_SHARE of the table)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from graphpass.weights import WeightRef

# hot_rows corrects at most this share of a table's rows: with many calibration inputs, rows read
# twice would otherwise grow into a second table (1% of the BERT's: 305 rows, 0.23 MB).
HOT_ROWS_MAX_SHARE = 0.01


def corrects_rows(weight: WeightRef) -> bool:
    """Whether hot_rows applies: a 2-D float table that only row Gathers read (an embedding)."""
    if len(weight.shape) != 2 or weight.dtype not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
        return False
    return weight.read_by_row_gathers()


def hot_rows(counts: np.ndarray, min_count: int) -> np.ndarray:
    """The rows read at least `min_count` times, at most HOT_ROWS_MAX_SHARE of them (the most
    read first), sorted."""
    cap = max(1, int(len(counts) * HOT_ROWS_MAX_SHARE))
    eligible = np.flatnonzero(counts >= min_count)
    most_read = eligible[np.argsort(-counts[eligible], kind="stable")][:cap]
    return np.sort(most_read)
