"""How errors in an embedding table's columns reach the outputs: a Hessian for error feedback.

A MatMul weight's error D moves its outputs by X D, so feedback (graphpass.feedback) weighs
errors with H = X^T X over the weight's inputs. A table read by Gathers has no such input: each
output row is one table row. What couples its columns is what comes after the lookup (a
LayerNorm, attention, the layers): a row error e moves the outputs by J e, and the error the
budget counts grows as e^T G e with

    G = sum over rows r of J_r^T P J_r

where J_r is the outputs' Jacobian to row r (every place the row is read together: those places
share its quantization error) and P keeps the part of an output change the budget counts (for a
cosine budget, the change across the sample's output, over its squared norm). G plays H's role:
feedback along a row then leaves each sub-vector's error in directions the outputs hardly see.

G is measured in onnxruntime by the probe (graphpass.sensitivity.Probe), one run per column i:
every row the fitting inputs read gets eps * s_r added in column i, s_r a random sign, and the
outputs' change over eps, per sample, is column i of V. Samples are the budget's
(graphpass.metrics.sample_rows): an output of rank 1 is one sample, not one per element, whose
change across the sample would vanish under a cosine budget. Random signs make the cross terms
between rows vanish on average, E[V^T V] = G; one draw is used. Outputs wider than
PROJECTED_WIDTH per sample (an LM's logits) are seen through a count sketch: each feature added
with a random sign into one of PROJECTED_WIDTH buckets, which keeps inner products on average
and costs one index per feature.

On paraphrase-MiniLM-L3-v2's word embedding [30522, 384] (32 sentences), G's eigenvalues run
from 6.3 times their mean down to 0.18 times at the tenth percentile (its diagonal only from
1.6 times down to 0.16): most of the
coupling is off the diagonal, which per-column weighting cannot use. With codebook
dim=2,k=73,hot_rows=2 on that table alone, feedback through G took the worst of 32 unseen
sentences from cosine 0.99162 to 0.99388 at the same bytes (bench/bench_embedding.py).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np
import scipy.sparse

from graphpass.metrics import sample_rows
from graphpass.parallel import Workers
from graphpass.sensitivity import Probe
from graphpass.weights import WeightRef

# One probe run per column: wider tables (an LLM's 4096) get no G, and no feedback.
MAX_COLUMNS = 1024
# A table needs this many rows per column to be worth its runs: the runs cost about what
# measuring a setting costs, and the bytes feedback saves grow with the rows (a position table
# of 512 x 384 is not worth 384 runs; a vocabulary of 30522 x 384 is).
MIN_ROWS_PER_COLUMN = 16
# Outputs wider than this per sample are sketched into this many buckets.
PROJECTED_WIDTH = 1024
# The perturbation, relative to the table's RMS: small enough to stay linear, large enough to
# stand clear of float32 rounding in the outputs.
RELATIVE_STEP = 0.05


def wants_sensitivity(weight: WeightRef) -> bool:
    """Whether a table is narrow enough to measure and long enough to be worth it."""
    if len(weight.shape) != 2:
        return False
    rows, columns = weight.shape
    return columns <= MAX_COLUMNS and rows >= MIN_ROWS_PER_COLUMN * columns


def table_sensitivity(probe: Probe, table: WeightRef, rows: np.ndarray, cosine: bool,
                      batch_axes: Mapping[str, int], workers: Workers, seed: int = 0) -> np.ndarray:
    """G [columns, columns] of one table (see the module docstring), on the probe's inputs.

    `rows`: the rows the probe's inputs read (the others move nothing); `cosine`: the budget
    counts cosine (else the outputs' plain change); `batch_axes`: where each output's samples
    lie, read as the budget reads them (see the module docstring). The scale of G is arbitrary:
    feedback and the fit's weights use it relative to itself."""
    original = probe.originals[table.name]
    columns = original.shape[1]
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0], dtype=original.dtype), size=len(rows))
    step = RELATIVE_STEP * float(np.sqrt(np.mean(np.square(original[rows], dtype=np.float64)))) or 1.0
    base = probe.run()
    projections = _projections(base, batch_axes, rng)
    local = _PerThreadCopy(original)

    def column(i: int) -> dict[str, np.ndarray]:
        values = local.get()
        saved = values[rows, i].copy()
        values[rows, i] = saved + step * signs
        try:
            moved = probe.run({table.name: values})
        finally:
            values[rows, i] = saved
        return _counted_change(base, moved, step, cosine, batch_axes, projections)

    changes = list(workers.map(column, range(columns)))  # per column: output -> [samples, features]
    sensitivity = np.zeros((columns, columns))
    for name in changes[0]:
        v = np.stack([change[name] for change in changes], axis=-1)  # [samples, features, columns]
        sensitivity += np.einsum("sfi,sfj->ij", v, v)
    return sensitivity


class _PerThreadCopy:
    """A writable copy of the table per worker thread, so that each perturbs its own."""

    def __init__(self, original: np.ndarray):
        self._original = original
        self._local = threading.local()

    def get(self) -> np.ndarray:
        copy = getattr(self._local, "copy", None)
        if copy is None:
            copy = self._local.copy = np.array(self._original)
        return copy


def _projections(base: Mapping[str, np.ndarray], batch_axes: Mapping[str, int],
                 rng: np.random.Generator) -> dict[str, scipy.sparse.csr_matrix | None]:
    """Per output wider than PROJECTED_WIDTH, its count sketch [features, PROJECTED_WIDTH]: one
    random sign per feature, in a random bucket."""
    found = {}
    for name, value in base.items():
        features = sample_rows(value, value, batch_axes.get(name, 0))[0].shape[1]
        if features <= PROJECTED_WIDTH:
            found[name] = None
            continue
        buckets = rng.integers(0, PROJECTED_WIDTH, features)
        signs = rng.choice(np.array([-1.0, 1.0]), size=features)
        found[name] = scipy.sparse.csr_matrix((signs, (np.arange(features), buckets)),
                                              shape=(features, PROJECTED_WIDTH))
    return found


def _counted_change(base: Mapping[str, np.ndarray], moved: Mapping[str, np.ndarray], step: float, cosine: bool,
                    batch_axes: Mapping[str, int], projections: Mapping[str, scipy.sparse.csr_matrix | None],
                    ) -> dict[str, np.ndarray]:
    """Per float output, the change per unit step that the budget counts: [samples, features]."""
    found = {}
    for name, value in base.items():
        if not np.issubdtype(np.asarray(value).dtype, np.floating):
            continue  # integer outputs do not move with a small step
        reference, candidate = sample_rows(np.asarray(value, dtype=np.float64),
                                           np.asarray(moved[name], dtype=np.float64), batch_axes.get(name, 0))
        change = (candidate - reference) / step
        if cosine:  # the change across each sample's output, relative to its norm
            norms = np.linalg.norm(reference, axis=1, keepdims=True)
            norms[norms == 0] = 1.0
            unit = reference / norms
            change = (change - np.sum(change * unit, axis=1, keepdims=True) * unit) / norms
        if projections[name] is not None:
            change = np.asarray(change @ projections[name])
        found[name] = change
    return found
