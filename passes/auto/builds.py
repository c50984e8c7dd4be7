"""auto's builds: candidate models built from chosen plans and verified in onnxruntime, and the
next error target after each."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from graphpass import verify as verification
from graphpass.budget import Budget
from graphpass.edit import Model
from graphpass.holdout import Split
from graphpass.model import save_model
from graphpass.passes.auto.fronts import Point, Study, allocate, finite
from graphpass.sensitivity import verified_units, with_outputs

# auto accepts a model using at most this share of the budget: passes after it (fold) may
# reorder float operations, and the run's final verification must still pass.
HEADROOM = 0.98
# A passing model using less than this share of the budget is worth a bolder try. On the BERT at
# --min-cosine 0.99 the first build used 0.83 of it: at 0.7 auto stopped there (9.06 MB); at 0.9
# three more builds (seconds each) reached 0.95 and 8.89 MB, the worst test sentence at 0.9908.
LOOSEN_BELOW = 0.9


@dataclass
class Round:
    """One built and verified model."""

    target: float
    chosen: list[int]
    predicted: float
    measured: float
    passed: bool
    file_bytes: int
    proto: onnx.ModelProto | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    held_out: Check | None = None  # None: nothing was held out

    def to_dict(self, compressed: int) -> dict[str, Any]:
        held_out = {} if self.held_out is None else {"held_out_units": finite(self.held_out.units)}
        return {"target_units": round(self.target, 6), "predicted_units": round(self.predicted, 6),
                "measured_units": finite(self.measured), **held_out, "passed": self.passed,
                "file_bytes": self.file_bytes, "tensors_compressed": compressed}


@dataclass
class Check:
    """One candidate verified on one share of the calibration inputs."""

    passed: bool
    units: float  # of the real budget
    figures: dict[str, Any]  # per output: the worst sample's cosine and max abs error


class Builder:
    """Builds candidate models from chosen plans on copies of the base model, and verifies them
    against the reference in onnxruntime (both optimisation levels), on the fitting share of the
    calibration inputs and on the held-out share (graphpass.holdout)."""

    def __init__(self, base: onnx.ModelProto, outputs: list[str], split: Split, budget: Budget,
                 folder: Path):
        self.base = base
        self.split = split
        self.budget = budget
        self.outputs = outputs
        self.folder = folder
        self.reference = folder / "reference.onnx"
        # A large model is verified without constant folding, as the run verifies it: folded, each
        # candidate's session would hold its lookups expanded to dense weights.
        self.levels = verification.levels_for(save_model(with_outputs(base, outputs), self.reference))
        self.accept = with_headroom(budget, HEADROOM)
        # The reference's outputs per share of the inputs and level: it is run once, not per build.
        self._reference_runs: dict[str, dict] = {"fitting": {}, "held_out": {}}

    def build(self, picks: Sequence[tuple[Study, Point]]) -> onnx.ModelProto:
        copy = onnx.ModelProto()
        copy.CopyFrom(self.base)
        trial = Model(copy)
        weights = {(w.scope.path, w.name): w for w in trial.weights()}
        for study, point in picks:
            # A plan may be applied to a copy: its emitter reads the weight from the replacement.
            dataclasses.replace(point.plan, weight=weights[study.key]).apply()
        return trial.proto

    def check(self, proto: onnx.ModelProto) -> tuple[Check, Check | None, int]:
        """(the check on the fitting share, on the held-out share or None, file bytes)."""
        path = self.folder / "candidate.onnx"
        file_bytes = save_model(proto, path)
        fitting = self._check_on(path, self.split.fitting, "fitting")
        held_out = None if self.split.held_out is None else self._check_on(path, self.split.held_out, "held_out")
        return fitting, held_out, file_bytes

    def _check_on(self, path: Path, inputs, share: str) -> Check:
        result = verification.verify(self.reference, path, inputs, self.accept, levels=self.levels,
                                     reference_runs=self._reference_runs[share])
        figures = {name: {"cosine": m.cosine, "max_abs_error": m.max_abs_error} for name, m in result.outputs.items()}
        return Check(result.passed, verified_units(result, self.budget), figures)


def with_headroom(budget: Budget, share: float) -> Budget:
    """The budget shrunk to `share` of its error: atol and rtol scale by sqrt(share) (error units
    are squared there), 1 - min_cosine by share."""
    scale = math.sqrt(share)
    return Budget(
        atol=None if budget.atol is None else budget.atol * scale,
        rtol=None if budget.rtol is None else budget.rtol * scale,
        min_cosine=None if budget.min_cosine is None else 1.0 - (1.0 - budget.min_cosine) * share)


def smallest(passing: list[Round], rounds: list[Round]) -> Round:
    """The passing round of the fewest bytes, the earliest of equals."""
    return min(passing, key=lambda r: (r.file_bytes, rounds.index(r)))


def keep_only_the_smallest_model(rounds: list[Round]) -> None:
    """Only the model auto may return stays in memory: each holds the bytes of every weight it compressed."""
    kept = [r for r in rounds if r.passed and r.proto is not None]
    if kept:
        returned = smallest(kept, rounds)
        for r in kept:
            if r is not returned:
                r.proto = None


def next_target(last: Round, target: float, passed_target: float, failed_target: float,
                 fronts) -> float | None:
    """The target after `last` was built (or recalled) for `target`, or None when done.

    Errors do not add exactly: the measured/predicted ratio of the build says what predicted
    error lands at the edge of the budget (less 5%). The next target stays between the largest
    target that passed and the smallest that failed; after a failure it is below the failed
    prediction, so at least one weight gets a less lossy setting."""
    if last.passed and last.measured >= LOOSEN_BELOW * HEADROOM:
        return None  # close enough to the edge
    if last.predicted > 0 and last.measured > 0:
        proposal = 0.95 * HEADROOM * last.predicted / last.measured
    else:
        proposal = 4.0 * target  # nothing measurable yet: be bolder
    if not last.passed:
        proposal = min(proposal, last.predicted * (1.0 - 1e-9))
    if not passed_target < proposal < failed_target:
        if not math.isfinite(failed_target) or passed_target <= 0:
            return None if last.passed else proposal
        if failed_target / passed_target < 1.05:
            return None
        proposal = math.sqrt(passed_target * failed_target)
    if last.passed and allocate(fronts, proposal) == last.chosen:
        return None  # a larger target would change nothing
    return proposal
