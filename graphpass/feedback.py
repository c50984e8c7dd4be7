"""Error feedback: quantize a layer's weight column by column, pushing each column's rounding
error onto the columns not yet quantized, so that the layer's output error rather than the
weight's stays small (OBQ/GPTQ, Frantar et al. 2022, arXiv 2210.17323; vector form GPTVQ,
van Baalen et al. 2024, arXiv 2402.15319).

A MatMul's output error for a weight error D is X D; its squared norm is trace(D^T H D) with
H = X^T X the second moment of the inputs on calibration data. Taking the weight as rows
W [N, K] (the MatMul weight transposed, one row per output) and quantizing columns in order,
the best correction of the columns not yet quantized for column j's error e is OBQ's
    W[:, j+1:] -= e / U[j, j] * U[j, j+1:]
with U the upper Cholesky factor of H^-1 (H^-1 = U^T U): its row j is the inverse Hessian of the
columns left, eliminated up to j, which spares re-inverting H at every step. A group of `width`
columns quantized together (a d-dimensional sub-vector, GPTVQ) takes the same update with the
group's block: E = (W_g - Q_g) U_gg^-1, W[:, rest] -= E U[g, rest]; and the error that counts
for choosing Q_g is |E|^2, so `metric` = U_gg^-1 is handed to the quantizer. Updates are
applied lazily per `block` of columns (GPTQ's lazy batch): inside the block at once, beyond it
when the block is done.

Few calibration inputs. 32 sentences of the 3-layer BERT give ~500 token rows for inputs up to
K = 1536 wide: X^T X is rank-deficient, and feedback then moves error into directions the
calibration never saw. On that BERT at 3 bits (kmeans per channel, MatMul weights) it raised the
worst calibration sentence's cosine from 0.922 to 0.988 but lowered the worst test sentence's
from 0.942 to 0.933. So H is first shrunk halfway toward its diagonal, (H + diag H) / 2, the
shrinkage estimate of a covariance from few samples (Ledoit and Wolf's, with the diagonal as
target): correlations the data shows only weakly count half. There the worst test sentence went
to 0.950 (calibration 0.973); shrinking by 0.25 or 0.7 gave 0.951 and 0.950, damping by 10%
or 100% of the mean diagonal instead 0.941 and 0.948 (`bench/bench_feedback.py --shrink-study`).

As the papers do, H is then damped by 1% of its mean diagonal (ten times more on each Cholesky
failure, up to 4 tries); inputs silent on the calibration data (H_ii = 0) get H_ii = 1 and their
weight column is zeroed, since nothing they multiply reaches the output. When H stays
singular (or holds no signal at all) every column is rounded on its own and the result says why.

How to call it (see `quantize_with_feedback`):

    result = quantize_with_feedback(rows, hessian, quantize, width=1)
    # quantize(start, values [N, width], metric [width, width]) -> quantized values [N, width]
    result.rows   # [N, K] float64: the quantized rows, each column what `quantize` returned
    result.note   # None, or why plain rounding was used

Conv filters [C_out, C_in, *kernel] are rows too, W.reshape(C_out, -1), with H taken over the
unfolded inputs (im2col, `activations.conv_input_covariance`); grouped and depthwise Convs and
auto_pad SAME are left without feedback (their unfolding differs, and depthwise filters are
too short for feedback to move error anywhere).

Codecs get H from the `InputHessians` analysis (one onnxruntime run on the calibration inputs
per model state) and lay a weight out as rows with `as_rows` / `from_rows`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.linalg
from scipy.spatial import cKDTree
from onnx import helper
from threadpoolctl import ThreadpoolController

from graphpass.activations import conv_input_covariance, gathered_row_counts, input_covariance
from graphpass.errors import UsageError
from graphpass.manager import Analysis, PassContext
from graphpass.parallel import stop_point
from graphpass.weights import WeightRef

# GPTQ's damping: this share of the mean diagonal keeps the inverse Hessian well conditioned.
DAMPING = 0.01
# H is shrunk this far toward its diagonal before damping (see the module docstring).
SHRINK = 0.5
# An embedding table's H is its outputs' sensitivity (graphpass.table_sensitivity): summed over
# every row read and every output feature, it is well measured, not a few samples' second
# moment, and shrinking it drops the coupling feedback uses. On the BERT's word embedding
# (codebook dim=2,k=73,hot_rows=2) the worst unseen sentence's 1 - cosine was 0.00682 shrunk by
# 0.5, 0.00631 by 0.2 and 0.00612 unshrunk.
TABLE_SHRINK = 0.0
# On a failed Cholesky the damping grows tenfold, this many times in all.
DAMPING_TRIES = 4
# Calibration energy below this fraction of the mean still counts a little in a fit.
ENERGY_FLOOR = 1e-2
# Columns whose updates are applied together (GPTQ's lazy batch); a multiple of `width`.
LAZY_BLOCK = 128
# Above this many entries a sub-vector's nearest entry is found with a k-d tree: the BERT's
# 30522 word embedding rows against 1290 entries of 3 took 1.4 s a column group by distance
# matrix, 0.03 s by tree (same choices).
KDTREE_MIN_ENTRIES = 256

# quantize(start column, current values [N, width], metric [width, width]) -> quantized [N, width]
ColumnQuantizer = Callable[[int, np.ndarray, np.ndarray], np.ndarray]
# begin_block(start, stop, current values [N, stop - start]): e.g. fit an affine block's grid.
BlockHook = Callable[[int, int, np.ndarray], None]


@dataclass
class FeedbackResult:
    rows: np.ndarray  # [N, K] float64, each column as `quantize` returned it
    note: str | None  # why plain rounding was used instead, if it was


def inverse_factor(hessian: np.ndarray, shrink: float = SHRINK) -> tuple[np.ndarray | None, np.ndarray, str | None]:
    """(U, dead, note): U the upper Cholesky factor of the damped H^-1 (None when H stays
    singular, with `note` saying so), `dead` the inputs with H_ii = 0. H is first shrunk by
    `shrink` toward its diagonal."""
    h = np.array(hessian, dtype=np.float64)
    if h.size == 0 or not np.isfinite(h).all():
        return None, np.zeros(len(h), dtype=bool), "the input second moment is not finite: plain rounding"
    dead = np.diag(h) <= 0
    if dead.all():
        return None, dead, "no input was ever non-zero on the calibration inputs: plain rounding"
    h[dead, dead] = 1.0
    h = (1.0 - shrink) * h + shrink * np.diag(np.diag(h))
    damping = DAMPING * float(np.mean(np.diag(h)))
    for _ in range(DAMPING_TRIES):
        try:
            lower = scipy.linalg.cholesky(h + damping * np.eye(len(h)), lower=True)
            inverse = scipy.linalg.cho_solve((lower, True), np.eye(len(h)))
            return scipy.linalg.cholesky(inverse, lower=False), dead, None
        except np.linalg.LinAlgError:
            damping *= 10.0
    return None, dead, (f"the input second moment stays singular damped by {damping / 10:.3g}: plain rounding")


def quantize_with_feedback(rows: np.ndarray, hessian: np.ndarray, quantize: ColumnQuantizer, *, width: int = 1,
                           block: int = LAZY_BLOCK, begin_block: BlockHook | None = None,
                           shrink: float = SHRINK) -> FeedbackResult:
    """Quantize `rows` [N, K] in groups of `width` columns (K a multiple of width), in order, with
    error feedback through `hessian` [K, K] (see the module docstring). `begin_block` is called
    with the current values of each lazy block before its first column is quantized; `block`
    must then be a multiple of the grid's block (and of `width`)."""
    work = np.array(rows, dtype=np.float64)
    count, length = work.shape
    if length % width or block % width:
        raise ValueError(f"{length} columns and lazy blocks of {block} must be multiples of width {width}")
    # Callers fit one weight per thread: two BLAS threads each would only fight over the cores
    # (a Cholesky of 1536 x 1536 took 13x longer on the busy 2-core machine).
    with _blas().limit(limits=1, user_api="blas"):
        return _fed_back(work, hessian, quantize, width, block, begin_block, shrink)


@functools.cache
def _blas() -> ThreadpoolController:
    """Found once: looking up the loaded BLAS libraries reads /proc and takes ~2 ms."""
    return ThreadpoolController()


def _fed_back(work: np.ndarray, hessian: np.ndarray, quantize: ColumnQuantizer, width: int, block: int,
              begin_block: BlockHook | None, shrink: float) -> FeedbackResult:
    count, length = work.shape
    factor, dead, note = inverse_factor(hessian, shrink)
    if factor is None:
        return FeedbackResult(_plain(work, quantize, width, block, begin_block), note)
    work[:, dead] = 0.0
    out = np.empty_like(work)
    for start in range(0, length, block):
        stop_point()  # between blocks: feedback over the BERT's table runs for over ten seconds
        stop = min(start + block, length)
        if begin_block is not None:
            begin_block(start, stop, work[:, start:stop])
        errors = np.empty((count, stop - start))
        for g in range(start, stop, width):
            end = g + width
            corner = factor[g:end, g:end]
            metric = scipy.linalg.solve_triangular(corner, np.eye(width), lower=False)
            out[:, g:end] = quantize(g, work[:, g:end], metric)
            error = (work[:, g:end] - out[:, g:end]) @ metric  # E = (W_g - Q_g) U_gg^-1
            work[:, end:stop] -= error @ factor[g:end, end:stop]
            errors[:, g - start:end - start] = error
        work[:, stop:] -= errors @ factor[start:stop, stop:]
    return FeedbackResult(out, None)


def _plain(work: np.ndarray, quantize: ColumnQuantizer, width: int, block: int,
           begin_block: BlockHook | None) -> np.ndarray:
    """Every group rounded on its own values: the fallback when H gives no usable inverse."""
    out = np.empty_like(work)
    identity = np.eye(width)
    for start in range(0, work.shape[1], block):
        stop = min(start + block, work.shape[1])
        if begin_block is not None:
            begin_block(start, stop, work[:, start:stop])
        for g in range(start, stop, width):
            out[:, g:g + width] = quantize(g, work[:, g:g + width], identity)
    return out


def vector_labels(rows: np.ndarray, scales: np.ndarray, tables: list[np.ndarray], hessian: np.ndarray,
                  shrink: float = SHRINK) -> tuple[list[np.ndarray], str | None]:
    """Vector codebooks with error feedback (GPTVQ): the sub-vectors of `rows` [N, K] (d = the
    tables' width consecutive columns, the last zero-padded) take entries of `tables` (one per
    stage, each coding the previous stages' residual) in order along K, each group of d columns'
    error fed forward. A row's entries are multiplied by its `scales` [N] (1: unscaled).

    The entry chosen is the nearest in the metric of the error that feedback leaves,
    |(v - c) U_gg^-1|, not plain distance. Returns each stage's labels [N, blocks] and the
    fallback note of `quantize_with_feedback`."""
    count, length = rows.shape
    dim = tables[0].shape[1]
    blocks = -(-length // dim)
    padded = np.zeros((count, blocks * dim))
    padded[:, :length] = rows
    h = np.zeros((blocks * dim,) * 2)
    h[:length, :length] = hessian
    # Padding is sliced off after the lookup: its error is all but free (damping still weighs it).
    padding = np.arange(length, blocks * dim)
    h[padding, padding] = 1e-9 * max(float(np.mean(np.diag(hessian))), 0.0)
    labels = [np.zeros((count, blocks), dtype=np.int64) for _ in tables]
    scales = np.asarray(scales, dtype=np.float64)[:, None]

    def quantize(start: int, values: np.ndarray, metric: np.ndarray) -> np.ndarray:
        residual = values / scales
        chosen = np.zeros_like(residual)
        for stage, table in enumerate(tables):
            picked = _nearest(residual @ metric, table @ metric)
            labels[stage][:, start // dim] = picked
            chosen += table[picked]
            residual = residual - table[picked]
        return chosen * scales

    result = quantize_with_feedback(padded, h, quantize, width=dim, block=dim * max(1, LAZY_BLOCK // dim), shrink=shrink)
    return labels, result.note


def _nearest(points: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Index of each point's nearest table row (the first of ties, below KDTREE_MIN_ENTRIES)."""
    if len(table) > KDTREE_MIN_ENTRIES:
        return cKDTree(table).query(points)[1]
    # |p - c|^2 = |p|^2 - 2 p.c + |c|^2: |p|^2 does not change the argmin.
    return np.argmin(np.einsum("ij,ij->i", table, table) - 2.0 * points @ table.T, axis=1)


# ---------------------------------------------------------------------------------------------
# Weights as rows
# ---------------------------------------------------------------------------------------------


def input_axis(weight: WeightRef) -> int:
    """Where a weight's inputs run: 0 for MatMul's B [K, N] and Gemm's B, 1 (every axis after the
    first) for Gemm's B with transB=1 ([N, K]) and Conv's filters [C_out, C_in, *kernel]. An
    embedding table [rows, K] that only Gathers read on axis 0 takes 1: its rows are the rows,
    and its Hessian is over the row's columns (graphpass.table_sensitivity)."""
    for node, index in weight.reader_nodes():
        if node.op_type == "Conv" and index == 1:
            return 1
        if node.op_type == "Gemm" and index == 1:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            return 1 if attrs.get("transB", 0) else 0
    if weight.read_by_row_gathers():
        return 1
    return 0


def shrink_for(weight: WeightRef) -> float:
    """How far a weight's H is shrunk: TABLE_SHRINK for an embedding table read by Gathers
    alone (its H is its outputs' sensitivity), SHRINK for the inputs' second moment."""
    return TABLE_SHRINK if weight.read_by_row_gathers() else SHRINK


def as_rows(array: np.ndarray, axis: int) -> np.ndarray:
    """The weight as rows [N, K] (one per output), K along the inputs."""
    return array.T if axis == 0 else array.reshape(array.shape[0], -1)


def from_rows(rows: np.ndarray, axis: int, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `as_rows` for a weight of `shape`."""
    return rows.T if axis == 0 else rows.reshape(shape)


def scalar_labels(original: np.ndarray, groups: np.ndarray, tables: np.ndarray, hessian: np.ndarray, axis: int,
                  exact: np.ndarray | None = None, shrink: float = SHRINK) -> tuple[np.ndarray, str | None]:
    """Scalar codebooks with error feedback (OBQ's assignment for a fitted codebook): each value
    of the 2-D weight `original` takes an entry of its group's row of `tables` [groups, k],
    column by column of the rows view, each choice's error fed forward.

    `groups` (weight-shaped ints) says which table row each value uses; `exact` (weight-shaped
    bool) marks values kept exactly (outliers), whose error is then 0. Returns the chosen entry
    per value (weight-shaped) and the fallback note of `quantize_with_feedback`."""
    group_rows = as_rows(groups, axis)
    exact_rows = None if exact is None else as_rows(exact, axis)
    values = as_rows(np.asarray(original, dtype=np.float64), axis)
    labels = np.zeros(values.shape, dtype=np.int32)
    every = np.arange(values.shape[0])

    def nearest(start: int, column: np.ndarray, metric: np.ndarray) -> np.ndarray:
        candidates = tables[group_rows[:, start]]  # [N, k]
        chosen = np.argmin(np.abs(candidates - column), axis=1)
        labels[:, start] = chosen
        rounded = candidates[every, chosen]
        if exact_rows is not None:
            rounded = np.where(exact_rows[:, start], values[:, start], rounded)
        return rounded[:, None]

    result = quantize_with_feedback(values, hessian, nearest, shrink=shrink)
    return from_rows(labels, axis, groups.shape), result.note


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------

# What a report says of a weight feedback cannot reach.
NO_INPUTS = ("no MatMul, Gemm or Conv (group 1) reads it, so no error feedback; an embedding table's fit weighs "
             "rows by calibration use")


def feedback_note(method: str, tensors: list[dict]) -> list[str]:
    """The pass's note: on how many weights feedback ran, and why not on the others."""
    outcomes = [t["feedback"] for t in tensors if "feedback" in t]
    if not outcomes:
        return []
    applied = outcomes.count("applied")
    others = sorted({o for o in outcomes if o != "applied"})
    why = f"; {len(outcomes) - applied} without ({'; '.join(others)})" if others else ""
    return [f"{method}: error feedback on {applied} weights{why}"]


# ---------------------------------------------------------------------------------------------
# The statistics codecs feed back through, computed once per model state
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeedbackStatistics:
    """`hessians`: weight name -> H [K, K] = X^T X / rows of the inputs of the MatMul/Gemm reading
    it (for Conv filters, of its unfolded inputs: K = C_in * prod(kernel)); `row_counts`: embedding
    table name -> how often calibration reads each row."""

    hessians: dict[str, np.ndarray]
    row_counts: dict[str, np.ndarray]

    def value_weight(self, weight: WeightRef) -> np.ndarray | None:
        """How much each value's squared error counts in a codebook's fit, broadcastable to the
        weight: for MatMul/Gemm/Conv weights the energy of the input each multiplies (diag H, as
        auto's `aware`), for embedding tables how often calibration reads each row; relative to
        the mean and at least ENERGY_FLOOR, so inputs and rows unused here still count a
        little (other inputs use them). None for other weights."""
        hessian = self.hessians.get(weight.name)
        if hessian is not None:
            return input_energy_weight(hessian, weight)
        counts = self.row_counts.get(weight.name)
        if counts is None or counts.sum() == 0:
            return None
        return relative_energy(counts.astype(np.float64))[:, None]


def input_energy_weight(hessian: np.ndarray, weight: WeightRef) -> np.ndarray:
    """diag(H) relative to its mean (at least ENERGY_FLOOR), shaped to broadcast against the
    weight: [K, 1] for MatMul's B, [1, K] for Gemm's transposed B, [1, C_in, *kernel] for Conv
    filters. What each value's squared error counts in a codebook's fit."""
    energy = relative_energy(np.diag(hessian))
    return energy[:, None] if input_axis(weight) == 0 else energy.reshape((1, *weight.shape[1:]))


def relative_energy(values: np.ndarray) -> np.ndarray:
    """`values` relative to their mean, at least ENERGY_FLOOR: a channel or row silent on the
    calibration inputs may not be silent on others, so it still counts a little."""
    return np.maximum(values / max(float(values.mean()), 1e-30), ENERGY_FLOOR)


class InputHessians(Analysis):
    """`FeedbackStatistics` on the run's calibration inputs, for every weight of the model."""

    @classmethod
    def compute(cls, ctx: PassContext) -> FeedbackStatistics:
        if not ctx.calibration_inputs:
            raise UsageError("feedback=true needs calibration inputs: give --inputs (or leave verification on)")
        model, weights, inputs = ctx.model, ctx.model.weights(), ctx.calibration_inputs
        hessians = {**input_covariance(model, weights, inputs), **conv_input_covariance(model, weights, inputs)}
        return FeedbackStatistics(hessians, gathered_row_counts(model, weights, inputs))


class RowCounts(Analysis):
    """Embedding table name -> how often the run's calibration inputs read each row (empty
    without calibration inputs): for codecs that treat often-read rows apart (codebook's
    hot_rows), without InputHessians' second moments."""

    @classmethod
    def compute(cls, ctx: PassContext) -> dict[str, np.ndarray]:
        if not ctx.calibration_inputs:
            return {}
        return gathered_row_counts(ctx.model, ctx.model.weights(), ctx.calibration_inputs)
