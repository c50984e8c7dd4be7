"""One output of a candidate compared with the reference's: the figures, the checks, the worst of levels.

Metric definitions. Float outputs are compared in float64, over the positions
where both reference and candidate are finite. d = candidate - reference.

Samples. A user who budgets an embedding or a classifier means every sample: a batch whose
whole cosine looks high can hide one sentence far below it. So the figures below are
computed per sample, a sample being one slice along the batch axis of an output of rank >= 2
(an output of rank 0 or 1 is one sample). The batch axis is the one the model declares with
a symbol naming a batch (recurrent state such as [2, batch, 128] holds h and c on axis 0),
else axis 0, and each figure reported is the worst sample's (largest error, smallest cosine and
SNR). `whole_tensor` keeps the same figures over the whole output, `samples` says how many
there were. The elementwise atol/rtol check is per element, so it covers every sample as is.

* max_abs_error   max |d|
* max_rel_error   max |d| / max(|ref|, floor), where floor = REL_ERROR_FLOOR_FRACTION *
                  max|ref| of that output (at least TINY). Without a floor, an element
                  where ref is exactly 0 gives an infinite or meaningless value. With
                  it, elements below 0.1% of the output's scale are measured against
                  that 0.1%.
* mean_abs_error  mean |d|
* cosine          cos(ref, cand) of one flattened sample; 1.0 when both are all-zero,
                  0.0 when exactly one is.
* snr_db          10*log10(sum(ref^2) / sum(d^2)) over one sample. +inf when d == 0
                  everywhere, -inf when the reference is all-zero and d is not. to_dict() writes both
                  infinities as null so the JSON stays valid (tell them apart by
                  max_abs_error == 0).
* argmax_agreement  Only for outputs that look like class scores (see
                  looks_like_class_scores). It is the fraction of rows (all axes but
                  the last) whose argmax along the last axis agrees. It is reported,
                  not checked: Budget has no threshold for it.
* mismatch_fraction  The fraction of elements that fail the elementwise check: exact
                  inequality for integer, bool and string outputs; outside atol/rtol
                  (or a non-finite mismatch) for float outputs. None for float outputs
                  when the budget has neither atol nor rtol.

Checks: missing output, shape mismatch and dtype mismatch stop the comparison. Float
outputs then get the non-finite check (NaN/Inf in one model where the other is
finite or differs; it applies whatever the budget), the elementwise
|d| <= atol + rtol*|ref| check, and cosine >= min_cosine. Each failing check adds a
clause to `failure`, separated by "; ". An output's `failure` is the first failing
level's message followed by "[failed at: <levels>]". Integer, bool and string outputs
must match exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from graphpass.budget import Budget

# Floor for the max_rel_error denominator, as a fraction of the output's max |ref|.
REL_ERROR_FLOOR_FRACTION = 1e-3
TINY = float(np.finfo(np.float32).tiny)

# Substrings of output names that mark hidden states, embeddings or recurrent and
# KV-cache state. Their last axis is features, not classes, so argmax means nothing.
NON_CLASS_NAME_HINTS = ("embed", "hidden", "pool", "feature", "state", "present", "past", "cache")


# ---------------------------------------------------------------------------
# Result types
# ---------------------------------------------------------------------------


@dataclass
class Figures:
    """The figures measured for one output (see the module docstring)."""

    max_abs_error: float | None = None
    max_rel_error: float | None = None
    mean_abs_error: float | None = None
    cosine: float | None = None
    snr_db: float | None = None
    argmax_agreement: float | None = None
    mismatch_fraction: float | None = None
    samples: int | None = None
    # The same figures over the whole output (flattened), next to the worst sample's.
    whole_tensor: dict[str, float] | None = None

    def figures_dict(self) -> dict:
        figures = {name: json_float(getattr(self, name)) for name in _WORST_OF}
        whole = None if self.whole_tensor is None else {k: json_float(v) for k, v in self.whole_tensor.items()}
        return {**figures, "samples": self.samples, "whole_tensor": whole}


# For each figure, the function that picks the worst value across levels.
_WORST_OF = {
    "max_abs_error": max, "max_rel_error": max, "mean_abs_error": max,
    "mismatch_fraction": max, "cosine": min, "snr_db": min, "argmax_agreement": min,
}


@dataclass
class LevelMetrics(Figures):
    """One output compared at one optimisation level."""

    passed: bool = True
    failure: str | None = None

    def to_dict(self) -> dict:
        return {**self.figures_dict(), "passed": self.passed, "failure": self.failure}


@dataclass
class OutputMetrics(Figures):
    """One output: the worst figures across levels (and runtimes), each level's figures, and
    each runtime's worst (onnxruntime: the worse of its levels)."""

    passed: bool = True
    failure: str | None = None
    per_level: dict[str, LevelMetrics] = field(default_factory=dict)
    per_runtime: dict[str, OutputMetrics] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            **self.figures_dict(),
            "passed": self.passed,
            "failure": self.failure,
            "per_level": {level: m.to_dict() for level, m in self.per_level.items()},
            "per_runtime": {name: {**m.figures_dict(), "passed": m.passed, "failure": m.failure}
                            for name, m in self.per_runtime.items()},
        }


def json_float(value):
    """`value` for strict JSON: a non-finite float becomes None (null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def is_float_dtype(dtype: np.dtype) -> bool:
    """Float outputs are compared within a budget, float inputs synthesized from N(0, 1)."""
    # ml_dtypes floats (bfloat16, float8*) have kind "V", so match them by name.
    return dtype.kind == "f" or dtype.name.startswith(("bfloat16", "float8", "float4"))


# ---------------------------------------------------------------------------
# Comparing outputs
# ---------------------------------------------------------------------------


def compare_arrays(name: str, reference: np.ndarray, candidate: np.ndarray | None,
                   budget: Budget, batch_axis: int = 0) -> LevelMetrics:
    """Compare one output at one level (public so other passes can reuse the metrics);
    `batch_axis` is where its samples lie (see declared_batch_axes)."""
    if candidate is None:
        return LevelMetrics(passed=False, failure="output missing from candidate")
    if reference.shape != candidate.shape:
        return LevelMetrics(passed=False, failure=(
            f"shape mismatch: reference {tuple(reference.shape)} vs candidate {tuple(candidate.shape)}"))
    if reference.dtype != candidate.dtype:
        return LevelMetrics(passed=False, failure=(
            f"dtype mismatch: reference {reference.dtype} vs candidate {candidate.dtype}"))
    if is_float_dtype(reference.dtype):
        return _compare_float(name, reference, candidate, budget, batch_axis)
    return _compare_exact(reference, candidate)


def _compare_exact(reference: np.ndarray, candidate: np.ndarray) -> LevelMetrics:
    differs = np.asarray(reference != candidate)
    count, size = int(differs.sum()), reference.size
    metrics = LevelMetrics(mismatch_fraction=count / size if size else 0.0)
    if reference.dtype.kind in "iub":
        gap = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
        metrics.max_abs_error = float(gap.max()) if size else 0.0
    if count:
        metrics.passed = False
        metrics.failure = f"exact match required for {reference.dtype} output: {count}/{size} elements differ"
    return metrics


def _compare_float(name: str, reference: np.ndarray, candidate: np.ndarray, budget: Budget,
                   batch_axis: int = 0) -> LevelMetrics:
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    both_finite = np.isfinite(ref) & np.isfinite(cand)
    nonfinite_mismatches = int((~both_finite & ~_same_nonfinite(ref, cand)).sum())
    ref_f, diff = ref[both_finite], np.abs(cand[both_finite] - ref[both_finite])
    metrics = LevelMetrics(**worst_sample_figures(ref, cand, both_finite, batch_axis),
                           whole_tensor=_float_figures(ref_f, cand[both_finite], diff),
                           argmax_agreement=_argmax_agreement(name, ref, cand))
    lost = int((np.isfinite(ref) & ~np.isfinite(cand)).sum())  # finite values the candidate lost
    if lost:
        # Figures over the finite positions alone would hide the error, which is unbounded
        # where the candidate lost a finite value: no cosine, and infinite distances.
        metrics.max_abs_error = metrics.max_rel_error = metrics.mean_abs_error = math.inf
        metrics.cosine, metrics.snr_db = None, -math.inf
    failures = [_nonfinite_failure(nonfinite_mismatches, lost)]
    if budget.has_elementwise:
        over = int((diff > (budget.atol or 0.0) + (budget.rtol or 0.0) * np.abs(ref_f)).sum())
        metrics.mismatch_fraction = (over + nonfinite_mismatches) / ref.size if ref.size else 0.0
        if over:
            failures.append(f"elementwise: {over}/{ref.size} elements exceed {budget.describe_elementwise()} "
                            f"(max abs error {metrics.max_abs_error:.3e})")
    if budget.min_cosine is not None and metrics.cosine is not None and metrics.cosine < budget.min_cosine:
        failures.append(f"{_worst_cosine_words(metrics)} {metrics.cosine:.6f} < min_cosine {budget.min_cosine:g}")
    metrics.failure = "; ".join(f for f in failures if f) or None
    metrics.passed = metrics.failure is None
    return metrics


def _worst_cosine_words(metrics: LevelMetrics) -> str:
    return "cosine" if metrics.samples == 1 else "worst-sample cosine"


def sample_rows(ref: np.ndarray, cand: np.ndarray, batch_axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays as (samples, values): `batch_axis` holds the samples of an output of rank
    >= 2 when both have the same shape; anything else is one sample."""
    if ref.ndim >= 2 and ref.shape == cand.shape:
        if not 0 <= batch_axis < ref.ndim:
            batch_axis = 0
        ref, cand = np.moveaxis(ref, batch_axis, 0), np.moveaxis(cand, batch_axis, 0)
        rows = (ref.shape[0], math.prod(ref.shape[1:]))  # explicit: reshape(0, -1) is ambiguous
        return ref.reshape(rows), cand.reshape(rows)
    return ref.reshape(1, ref.size), cand.reshape(1, cand.size)


def worst_sample_figures(ref: np.ndarray, cand: np.ndarray, finite: np.ndarray | None = None,
                         batch_axis: int = 0) -> dict:
    """The figures of the worst sample (see the module docstring), over the positions where
    `finite` holds (all when None), and how many samples there were. The one definition of
    the cosine a budget holds: verification and auto's measurements both come through here."""
    ref, cand = np.asarray(ref, dtype=np.float64), np.asarray(cand, dtype=np.float64)
    if finite is None:
        finite = np.ones(ref.shape, dtype=bool)
    ref_rows, cand_rows = sample_rows(np.where(finite, ref, 0.0), np.where(finite, cand, 0.0), batch_axis)
    counted = sample_rows(finite, finite, batch_axis)[0]
    samples = ref_rows.shape[0]
    if not counted.any():
        return dict(max_abs_error=0.0, max_rel_error=0.0, mean_abs_error=0.0, cosine=1.0, snr_db=math.inf,
                    samples=samples)
    diff = np.abs(cand_rows - ref_rows)  # 0 where not finite, since both were zeroed there
    # The floor is the whole output's, as in the module docstring: a sample of small values
    # is measured against the output's scale, not its own.
    floor = max(REL_ERROR_FLOOR_FRACTION * float(np.abs(ref_rows).max()), TINY)
    per_sample_mean = diff.sum(axis=1) / np.maximum(counted.sum(axis=1), 1)
    return dict(
        max_abs_error=float(diff.max()),
        max_rel_error=float((diff / np.maximum(np.abs(ref_rows), floor)).max()),
        mean_abs_error=float(per_sample_mean.max()),
        cosine=float(_row_cosines(ref_rows, cand_rows).min()),
        snr_db=float(_row_snr_db(ref_rows, cand_rows - ref_rows).min()),
        samples=samples,
    )


def _row_cosines(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """cos(ref[i], cand[i]) per row: 1.0 where both rows are all-zero, 0.0 where one is."""
    # Scale each row by its common max first so the norms cannot overflow.
    scale = np.maximum(np.abs(ref).max(axis=1, initial=0.0), np.abs(cand).max(axis=1, initial=0.0))
    safe = np.where(scale == 0.0, 1.0, scale)[:, None]
    a, b = ref / safe, cand / safe
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        cosines = np.clip(np.einsum("ij,ij->i", a, b) / norms, -1.0, 1.0)
    return np.where(scale == 0.0, 1.0, np.where(norms == 0.0, 0.0, cosines))


def _row_snr_db(ref: np.ndarray, diff: np.ndarray) -> np.ndarray:
    """10*log10(signal / noise) per row: +inf where the row has no error, -inf where its
    reference is all-zero and it has some."""
    scale = np.maximum(np.abs(ref).max(axis=1, initial=0.0), np.abs(diff).max(axis=1, initial=0.0))
    safe = np.where(scale == 0.0, 1.0, scale)[:, None]
    signal = np.square(ref / safe).sum(axis=1)
    noise = np.square(diff / safe).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = 10.0 * np.log10(signal / noise)
    return np.where(noise == 0.0, np.inf, np.where(signal == 0.0, -np.inf, snr))


def _same_nonfinite(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Where both are NaN, or both the same infinity: these positions agree."""
    return (np.isnan(ref) & np.isnan(cand)) | (np.isinf(ref) & (ref == cand))


def _nonfinite_failure(mismatches: int, lost: int) -> str | None:
    if not mismatches:
        return None
    if lost:
        return f"non-finite: candidate has NaN/Inf at {lost} position(s) where the reference is finite"
    return f"non-finite: {mismatches} position(s) where the reference is NaN/Inf and the candidate differs"


def _float_figures(ref: np.ndarray, cand: np.ndarray, abs_diff: np.ndarray) -> dict:
    if ref.size == 0:
        return dict(max_abs_error=0.0, max_rel_error=0.0, mean_abs_error=0.0, cosine=1.0, snr_db=math.inf)
    ref_scale = float(np.abs(ref).max())
    floor = max(REL_ERROR_FLOOR_FRACTION * ref_scale, TINY)
    return dict(
        max_abs_error=float(abs_diff.max()),
        max_rel_error=float((abs_diff / np.maximum(np.abs(ref), floor)).max()),
        mean_abs_error=float(abs_diff.mean()),
        cosine=_cosine(ref, cand),
        snr_db=_snr_db(ref, cand - ref),
    )


def _cosine(ref: np.ndarray, cand: np.ndarray) -> float:
    # Scale by the common max first so the norms cannot overflow.
    scale = max(float(np.abs(ref).max()), float(np.abs(cand).max()))
    if scale == 0.0:
        return 1.0
    a, b = ref.ravel() / scale, cand.ravel() / scale
    norms = float(np.linalg.norm(a)) * float(np.linalg.norm(b))
    if norms == 0.0:
        return 0.0
    return float(np.clip(np.dot(a, b) / norms, -1.0, 1.0))


def _snr_db(ref: np.ndarray, diff: np.ndarray) -> float:
    scale = max(float(np.abs(ref).max()), float(np.abs(diff).max()))
    if scale == 0.0 or not np.any(diff):
        return math.inf
    signal = float(np.sum(np.square(ref / scale)))
    noise = float(np.sum(np.square(diff / scale)))
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def looks_like_class_scores(name: str, array: np.ndarray) -> bool:
    """Float, rank >= 2, last axis >= 2, and not named like an embedding or state."""
    return (is_float_dtype(array.dtype) and array.ndim >= 2 and array.shape[-1] >= 2
            and not any(hint in name.lower() for hint in NON_CLASS_NAME_HINTS))


def _argmax_agreement(name: str, ref: np.ndarray, cand: np.ndarray) -> float | None:
    if not looks_like_class_scores(name, ref):
        return None
    rows = ref.size // ref.shape[-1]
    if rows == 0:
        return None
    ref_top = ref.reshape(rows, -1).argmax(axis=1)
    cand_top = cand.reshape(rows, -1).argmax(axis=1)
    return float(np.mean(ref_top == cand_top))


def summarise_levels(per_level: dict[str, LevelMetrics]) -> OutputMetrics:
    worst = {}
    for figure, pick in _WORST_OF.items():
        values = [getattr(m, figure) for m in per_level.values() if getattr(m, figure) is not None]
        worst[figure] = pick(values) if values else None
    worst["samples"] = next((m.samples for m in per_level.values() if m.samples is not None), None)
    worst["whole_tensor"] = _worst_whole_tensor([m.whole_tensor for m in per_level.values() if m.whole_tensor])
    failing = [level for level, m in per_level.items() if not m.passed]
    failure = None
    if failing:
        failure = f"{per_level[failing[0]].failure} [failed at: {', '.join(failing)}]"
    return OutputMetrics(**worst, passed=not failing, failure=failure, per_level=dict(per_level))


def _worst_whole_tensor(figures: list[dict]) -> dict | None:
    if not figures:
        return None
    return {name: _WORST_OF[name](f[name] for f in figures) for name in figures[0]}
