"""Verification engine: run a reference and a candidate ONNX model in onnxruntime (and in
the other target runtimes) on the same inputs and check that every output stays within a
numeric budget.

Each model runs once per onnxruntime optimisation level (by default ORT_ENABLE_ALL, called
"default", and ORT_DISABLE_ALL). At each level the candidate is compared with the
reference at that same level, so the check sees what a deployment sees (fused
kernels) and what the graph literally says (no fusion). Each other target runtime
(graphpass.runtimes: openvino, tract) is one more level, named after it, where the
candidate is compared with the reference run in that runtime. A reference that does not run
in a runtime leaves that runtime out with a note; a candidate that does not run where its
reference does fails. Each output reports the worst figure across levels, each level's
figures, and each runtime's worst.

What one output's figures mean and how it is checked is graphpass.metrics; the inputs both
models run on, graphpass.inputs; the budget, graphpass.budget.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np
import onnx

from graphpass.budget import HALF_TYPES, LOSSLESS_BUDGET, LOSSLESS_HALF_BUDGET, Budget, lossless_budget
from graphpass.errors import ModelLoadError, VerifyInputError
from graphpass.inputs import (
    BATCH_DIM, DEFAULT_DYNAMIC_DIM, FALLBACK_TABLE_ROWS, INDEX_PASSTHROUGH_OPS, MAX_INPUT_DIM,
    MAX_SYNTHESIZED_ELEMENTS, SAMPLE_RATE, SAMPLE_RATE_NAMES, SHAPE_PRESERVING_OPS, SMALL_INT_HIGH,
    load_inputs, parse_shapes, synthesize_inputs,
)
from graphpass.metrics import (
    NON_CLASS_NAME_HINTS, REL_ERROR_FLOOR_FRACTION, TINY, Figures, LevelMetrics, OutputMetrics,
    compare_arrays, json_float, looks_like_class_scores, sample_rows, summarise_levels,
    worst_sample_figures,
)
from graphpass.memory import release_freed_memory
from graphpass.runtimes import Runtime, RuntimeFailure, usable_adapters
from graphpass.runtimes.onnxruntime import OPTIMIZATION_LEVELS, OnnxRuntime

# The names callers have imported from here since before budget, inputs and metrics were split
# out (other branches still do). To patch a constant in a test, patch the module that reads it.
__all__ = [
    # graphpass.budget
    "Budget", "HALF_TYPES", "LOSSLESS_BUDGET", "LOSSLESS_HALF_BUDGET", "lossless_budget",
    # graphpass.errors
    "ModelLoadError", "VerifyInputError",
    # graphpass.inputs
    "BATCH_DIM", "DEFAULT_DYNAMIC_DIM", "FALLBACK_TABLE_ROWS", "INDEX_PASSTHROUGH_OPS", "MAX_INPUT_DIM",
    "MAX_SYNTHESIZED_ELEMENTS", "SAMPLE_RATE", "SAMPLE_RATE_NAMES", "SHAPE_PRESERVING_OPS", "SMALL_INT_HIGH",
    "load_inputs", "parse_shapes", "synthesize_inputs",
    # graphpass.metrics
    "NON_CLASS_NAME_HINTS", "REL_ERROR_FLOOR_FRACTION", "TINY", "Figures", "LevelMetrics", "OutputMetrics",
    "compare_arrays", "looks_like_class_scores", "sample_rows", "worst_sample_figures",
    # this module
    "COMPARED", "DEFAULT_LEVELS", "FOLDED_VERIFICATION_MAX_BYTES", "INPUT_DOES_NOT_RUN", "LARGE_MODEL_LEVELS",
    "ONNXRUNTIME", "OUTPUT_DOES_NOT_RUN", "ModelSource", "RuntimeOutcome", "VerifyResult", "budget_output_names",
    "declared_batch_axes", "levels_for", "render_table", "verify",
]

ModelSource = Union[str, os.PathLike, bytes, onnx.ModelProto]


# ---------------------------------------------------------------------------
# Constants (documented choices)
# ---------------------------------------------------------------------------

ONNXRUNTIME = "onnxruntime"
DEFAULT_LEVELS: tuple[str, ...] = ("default", "disable_all")
# Models above this many bytes verify at "unfolded" instead of "default": opening them folded
# would cost verification more memory than the whole compile (graphpass.runtimes.onnxruntime).
FOLDED_VERIFICATION_MAX_BYTES = 256 * 2**20
LARGE_MODEL_LEVELS: tuple[str, ...] = ("unfolded", "disable_all")


# ---------------------------------------------------------------------------
# Result types
# ---------------------------------------------------------------------------


COMPARED = "compared"
INPUT_DOES_NOT_RUN = "input does not run"
OUTPUT_DOES_NOT_RUN = "output does not run"
# The input does not run there but the output does: compared with the input's onnxruntime outputs.
ONLY_OUTPUT_RUNS = "only the output runs"


@dataclass
class RuntimeOutcome:
    """What verification did in one runtime: compared at `levels`, or why it could not.

    `stage` and `reason` say where the runtime failed (load, inputs, run) and its own words.
    An input that does not run there is a note, not a failure. An output that runs where its
    input does not is compared with the input's onnxruntime outputs, and noted. An output that
    does not run where its input does is a failure."""

    levels: list[str]
    status: str = COMPARED
    stage: str | None = None
    reason: str | None = None

    @property
    def failed(self) -> bool:
        return self.status == OUTPUT_DOES_NOT_RUN

    def message(self, runtime: str) -> str | None:
        if self.status == ONLY_OUTPUT_RUNS:
            return (f"input does not run in {runtime}: {(self.reason or '').rstrip('.')}; the output does, compared "
                    "there with the input's onnxruntime outputs")
        return None if self.status == COMPARED else f"{self.status} in {runtime}: {self.reason}"

    def to_dict(self) -> dict:
        return {"status": self.status, "levels": list(self.levels), "stage": self.stage, "reason": self.reason}


@dataclass
class VerifyResult:
    passed: bool
    budget: dict
    levels: list[str]
    outputs: dict[str, OutputMetrics]
    runtimes: dict[str, RuntimeOutcome] = field(default_factory=dict)
    # False when a lossy run got no accuracy budget: `passed` then means the structural
    # checks only, and the verdict line says so instead of PASSED.
    budget_given: bool = True

    @property
    def failures(self) -> dict[str, str]:
        """Output name -> failure message, for the outputs that failed."""
        return {name: m.failure or "failed" for name, m in self.outputs.items() if not m.passed}

    @property
    def runtime_notes(self) -> list[str]:
        """One line per runtime that was not compared: a note for the input, a failure for the output."""
        return [message for name, outcome in self.runtimes.items() if (message := outcome.message(name))]

    def to_dict(self) -> dict:
        """Strict-JSON-safe dict (non-finite floats become None)."""
        return {
            "passed": self.passed,
            "budget": {k: json_float(v) for k, v in self.budget.items()},
            "budget_given": self.budget_given,
            "levels": list(self.levels),
            "outputs": {name: m.to_dict() for name, m in self.outputs.items()},
            "runtimes": {name: outcome.to_dict() for name, outcome in self.runtimes.items()},
        }


# ---------------------------------------------------------------------------
# Running models
# ---------------------------------------------------------------------------


def verify(
    reference: ModelSource,
    candidate: ModelSource,
    inputs: Mapping[str, np.ndarray],
    budget: Budget,
    *,
    levels: Sequence[str] = DEFAULT_LEVELS,
    budget_outputs: Sequence[str] | None = None,
    runtimes: Sequence[str] = (ONNXRUNTIME,),
    budget_given: bool = True,
    reference_runs: dict[str, dict[str, np.ndarray]] | None = None,
) -> VerifyResult:
    """Run both models at each onnxruntime level, and in each other runtime of `runtimes`, on
    `inputs` and compare each reference output with the candidate output of the same name
    (run in the same runtime). Inputs the models do not take are ignored. Extra candidate
    outputs are ignored. With `budget_outputs`, only those outputs are held to `budget`; the
    others get the structural checks (missing, misshapen, non-finite).

    onnxruntime always runs: a model it cannot load or run raises VerifyInputError. In another
    runtime, a reference that does not run there is a note, and a candidate that does is
    compared there with the reference's outputs in onnxruntime (at the first level), unless its
    outputs there already differ from its own in onnxruntime beyond the budget (the runtimes
    then disagree, and the comparison would measure that, not the rewrite); a candidate that
    does not run where the reference does fails verification.
    A runtime that is not installed raises RuntimeUnavailable. `budget_given=False` says the
    caller chose no accuracy budget: the verdict line then does not claim a PASS.

    `reference_runs` holds the reference's onnxruntime outputs per level, from earlier calls
    with the same reference and inputs; levels not in it are run and added. A caller verifying
    many candidates (auto) opens the reference once: on the 1.1 B float16 decoder its session
    (weights cast to float32) was the run's peak, at every build."""
    levels = _checked_levels(levels)
    others = [r for r in usable_adapters(list(dict.fromkeys(runtimes))) if r.name != ONNXRUNTIME]
    reference, candidate = _as_source(reference), _as_source(candidate)
    same_model = _source_key(reference) == _source_key(candidate)
    per_output: dict[str, dict[str, LevelMetrics]] = defaultdict(dict)
    comparison = _Comparison(per_output, budget, budget_outputs, declared_batch_axes(reference))
    outcomes = {ONNXRUNTIME: RuntimeOutcome(list(levels))}
    first_run = None  # both models' outputs at the first level, for runtimes only the candidate runs in
    for level in levels:
        if reference_runs is not None and level in reference_runs:
            ref_outputs = reference_runs[level]
        else:
            ref_outputs = _run_in_onnxruntime(reference, "reference", level, inputs)
            if reference_runs is not None:
                reference_runs[level] = ref_outputs
        # One session per (model, level): an identical candidate reuses the reference run.
        cand_outputs = ref_outputs if same_model else _run_in_onnxruntime(candidate, "candidate", level, inputs)
        comparison.add(level, ref_outputs, cand_outputs)
        first_run = first_run or (ref_outputs, cand_outputs)
    if others:
        with _as_files(reference, candidate) as (reference_path, candidate_path):
            for runtime in others:
                outcomes[runtime.name] = _verify_in(runtime, reference_path, candidate_path, same_model,
                                                    inputs, comparison, first_run)
                release_freed_memory()
    compared = [level for outcome in outcomes.values() for level in outcome.levels]
    outputs = {name: _summarise_output(per_level, outcomes) for name, per_level in per_output.items()}
    return VerifyResult(
        passed=all(m.passed for m in outputs.values()) and not any(o.failed for o in outcomes.values()),
        budget=budget.to_dict(),
        levels=compared,
        outputs=outputs,
        runtimes=outcomes,
        budget_given=budget_given,
    )


@dataclass
class _Comparison:
    """Collects each output's figures at each level (an onnxruntime level or another runtime)."""

    per_output: dict[str, dict[str, LevelMetrics]]
    budget: Budget
    budget_outputs: Sequence[str] | None
    batch_axes: Mapping[str, int] = field(default_factory=dict)

    def add(self, level: str, ref_outputs: Mapping[str, np.ndarray], cand_outputs: Mapping[str, np.ndarray]) -> None:
        for name, ref_value in ref_outputs.items():
            self.per_output[name][level] = self._compared(name, ref_value, cand_outputs.get(name))

    def disagreement(self, ref_outputs: Mapping[str, np.ndarray], cand_outputs: Mapping[str, np.ndarray]) -> str | None:
        """The first output whose candidate misses the budget against `ref_outputs`, described,
        or None; nothing is recorded."""
        for name, ref_value in ref_outputs.items():
            figures = self._compared(name, ref_value, cand_outputs.get(name))
            if not figures.passed:
                return f"{name} ({figures.failure})" if figures.failure else name
        return None

    def _compared(self, name: str, ref_value: np.ndarray, cand_value: np.ndarray | None) -> LevelMetrics:
        held = self.budget if self.budget_outputs is None or name in self.budget_outputs else Budget()
        return compare_arrays(name, ref_value, cand_value, held, self.batch_axes.get(name, 0))


def _verify_in(runtime: Runtime, reference: str, candidate: str, same_model: bool,
               inputs: Mapping[str, np.ndarray], comparison: _Comparison,
               in_onnxruntime: tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]) -> RuntimeOutcome:
    """Compare in one runtime other than onnxruntime, at its one level. Where the reference does
    not run, the candidate (if it runs) is compared with the reference's onnxruntime outputs
    (`in_onnxruntime`: the reference's and the candidate's), when it agrees with its own there."""
    level = runtime.levels[0]
    try:
        ref_outputs = runtime.open(reference, inputs).run(inputs)
    except RuntimeFailure as failure:
        if same_model:
            return RuntimeOutcome([], INPUT_DOES_NOT_RUN, failure.stage, failure.detail)
        return _verify_candidate_only(runtime, candidate, inputs, comparison, in_onnxruntime, failure)
    try:
        cand_outputs = ref_outputs if same_model else runtime.open(candidate, inputs).run(inputs)
    except RuntimeFailure as failure:
        return RuntimeOutcome([], OUTPUT_DOES_NOT_RUN, failure.stage, failure.detail)
    # Outputs onnxruntime gave define what is compared; a runtime that drops one fails on it.
    named = {name: ref_outputs.get(name) for name in comparison.per_output}
    if any(value is None for value in named.values()):
        lost = ", ".join(name for name, value in named.items() if value is None)
        return RuntimeOutcome([], INPUT_DOES_NOT_RUN, "run", f"gives no output {lost}")
    comparison.add(level, named, cand_outputs)
    return RuntimeOutcome([level])


def _verify_candidate_only(runtime: Runtime, candidate: str, inputs: Mapping[str, np.ndarray],
                           comparison: _Comparison,
                           in_onnxruntime: tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]],
                           reference_failure: RuntimeFailure) -> RuntimeOutcome:
    """Where the reference does not run: the candidate against the reference's onnxruntime
    outputs, if it runs and agrees with its own onnxruntime outputs; else a note."""
    stage, reason = reference_failure.stage, reference_failure.detail
    try:
        cand_outputs = runtime.open(candidate, inputs).run(inputs)
    except RuntimeFailure:
        return RuntimeOutcome([], INPUT_DOES_NOT_RUN, stage, reason)
    reference_there, candidate_there = in_onnxruntime
    if (differs := comparison.disagreement(candidate_there, cand_outputs)) is not None:
        # On outputs near zero (a detector's probabilities on generated inputs) runtimes round
        # differently: seen as cosine 0.62 between tract and onnxruntime on the same model.
        return RuntimeOutcome([], INPUT_DOES_NOT_RUN, stage,
                              f"{reason.rstrip('.')}; the output runs there, but its {differs} already misses the "
                              "budget against its own onnxruntime outputs, so it was not compared")
    comparison.add(runtime.levels[0], reference_there, cand_outputs)
    return RuntimeOutcome([runtime.levels[0]], ONLY_OUTPUT_RUNS, stage, reason)


def _summarise_output(per_level: dict[str, LevelMetrics], outcomes: Mapping[str, RuntimeOutcome]) -> OutputMetrics:
    """The worst figures over every level of every runtime, and each runtime's own worst."""
    summary = summarise_levels(per_level)
    for name, outcome in outcomes.items():
        own = {level: per_level[level] for level in outcome.levels if level in per_level}
        if own:
            summary.per_runtime[name] = summarise_levels(own)
    return summary


def declared_batch_axes(model: ModelSource | onnx.ModelProto) -> dict[str, int]:
    """Output name -> the axis its declared shape names as a batch (a symbol containing
    "batch"), for the outputs that declare one; the others use axis 0."""
    proto = model if isinstance(model, onnx.ModelProto) else _graph_outputs_of(_as_source(model))
    axes = {}
    for value in proto.graph.output:
        dims = value.type.tensor_type.shape.dim
        named = [axis for axis, dim in enumerate(dims) if "batch" in dim.dim_param.lower()]
        if named:
            axes[value.name] = named[0]
    return axes


def _graph_outputs_of(source: str | bytes) -> onnx.ModelProto:
    """The model without its external data: only its declared outputs are read."""
    try:
        if isinstance(source, bytes):
            return onnx.load_from_string(source)
        return onnx.load(source, load_external_data=False)
    except Exception:  # an unreadable model fails with onnxruntime's own words below
        return onnx.ModelProto()


def budget_output_names(proto: onnx.ModelProto, names: Sequence[str] | None) -> list[str]:
    """The outputs a budget applies to: `names` (each must exist), or all outputs. For a
    --budget-output the user got wrong, one line that lists the real ones."""
    available = [value.name for value in proto.graph.output]
    if not names:
        return available
    unknown = [name for name in names if name not in available]
    if unknown:
        raise VerifyInputError(f"unknown budget output(s) {', '.join(unknown)}; the model's outputs: {', '.join(available)}")
    return list(dict.fromkeys(names))


def levels_for(model_bytes: int | None) -> tuple[str, ...]:
    """The onnxruntime levels to verify a model of `model_bytes` (file and external data) at."""
    if model_bytes is not None and model_bytes > FOLDED_VERIFICATION_MAX_BYTES:
        return LARGE_MODEL_LEVELS
    return DEFAULT_LEVELS


def _checked_levels(levels: Sequence[str]) -> tuple[str, ...]:
    if isinstance(levels, str):
        levels = (levels,)
    unknown = [level for level in levels if level not in OPTIMIZATION_LEVELS]
    if unknown or not levels:
        raise VerifyInputError(f"unknown optimisation level(s) {', '.join(unknown) or '(none given)'}; "
                               f"choose from {', '.join(OPTIMIZATION_LEVELS)}")
    return tuple(dict.fromkeys(levels))


def _as_source(model: ModelSource) -> str | bytes:
    """Paths stay paths so onnxruntime resolves external data next to the file."""
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    return os.fspath(model)


def _source_key(source: str | bytes) -> tuple[str, str]:
    if isinstance(source, bytes):
        return ("bytes", hashlib.sha256(source).hexdigest())
    return ("path", os.path.realpath(source))


@contextmanager
def _as_files(*sources: str | bytes):
    """Paths for runtimes that read models only from files: serialized models go to a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="graphpass-verify-") as folder:
        paths = []
        for index, source in enumerate(sources):
            if isinstance(source, bytes):
                path = Path(folder) / f"model{index}.onnx"
                path.write_bytes(source)
                source = str(path)
            paths.append(source)
        yield paths


def _run_in_onnxruntime(source: str | bytes, role: str, level: str,
                        inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One model at one onnxruntime level, its failures worded as verification input errors."""
    if isinstance(source, str) and not Path(source).is_file():
        raise VerifyInputError(f"{role} model not found: {source}")
    try:
        return OnnxRuntime().open(source, inputs, level).run(inputs)
    except RuntimeFailure as failure:
        message = _onnxruntime_message(failure, role, level)
        if failure.stage == "load":
            raise ModelLoadError(message, role) from failure
        raise VerifyInputError(message) from failure
    finally:
        release_freed_memory()  # the session is gone: its pages go back before the next one opens


def _onnxruntime_message(failure: RuntimeFailure, role: str, level: str) -> str:
    if failure.stage == "load":
        return f"onnxruntime cannot load the {role} model (level {level}): {failure.detail}"
    if failure.stage == "inputs":
        return failure.detail.replace("no value for model", f"no value for {role} model", 1)
    return (f"onnxruntime failed to run the {role} model at level {level}: {failure.detail} "
            "(give real inputs with --inputs, or sizes of dynamic dims with --shape)")



# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------

_COLUMNS = ("output", "max abs", "max rel", "mean abs", "cosine", "SNR dB", "argmax", "result")


def render_table(result: VerifyResult) -> str:
    """Plain-text comparison summary: one row per output (per output and runtime when more
    than onnxruntime ran), failure reasons, runtime notes, verdict."""
    by_runtime = set(result.runtimes) - {ONNXRUNTIME}
    columns = _COLUMNS[:1] + ("runtime",) + _COLUMNS[1:] if by_runtime else _COLUMNS
    rows = [columns]
    for name, m in result.outputs.items():
        if by_runtime:
            rows += [(name, runtime, *_figure_cells(own, result.budget_given))
                     for runtime, own in m.per_runtime.items()]
        else:
            rows.append((name, *_figure_cells(m, result.budget_given)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(width) if i < len(columns) - len(_COLUMNS) + 1 else cell.rjust(width)
                       for i, (cell, width) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines += [f"  {name}: {message}" for name, message in result.failures.items()]
    for name, outcome in result.runtimes.items():
        message = outcome.message(name)
        if message:
            lines.append(f"  {'FAIL' if outcome.failed else 'note'}: {message}")
    lines.append(_verdict_line(result))
    return "\n".join(lines)


def _verdict_line(result: VerifyResult) -> str:
    """PASSED or FAILED against the budget; without an accuracy budget a run that passed the
    structural checks has passed nothing a user chose, so it shows what to hold instead."""
    levels = ", ".join(result.levels)
    if result.passed and not result.budget_given:
        cosines = ", ".join(f"{name}={m.cosine:.6f}" for name, m in result.outputs.items() if m.cosine is not None)
        figures = f"worst-sample cosine {cosines}; " if cosines else ""
        return (f"no accuracy budget given: {figures}hold it with --min-cosine "
                f"(structural checks passed; levels: {levels})")
    verdict = "PASSED" if result.passed else "FAILED"
    budget = Budget(**result.budget).describe()
    return f"verification {verdict} (budget: {budget}; levels: {levels})"


def _figure_cells(m: OutputMetrics, budget_given: bool = True) -> tuple[str, ...]:
    return (
        _format_number(m.max_abs_error, "{:.3e}"),
        _format_number(m.max_rel_error, "{:.3e}"),
        _format_number(m.mean_abs_error, "{:.3e}"),
        _format_number(m.cosine, "{:.6f}"),
        _format_number(m.snr_db, "{:.1f}"),
        "-" if m.argmax_agreement is None else f"{100 * m.argmax_agreement:.1f}%",
        _result_cell(m.passed, budget_given),
    )


def _result_cell(passed: bool, budget_given: bool) -> str:
    # Passing the structural checks alone is no PASS: the user held the figures to nothing.
    if not passed:
        return "FAIL"
    return "PASS" if budget_given else "no budget"


def _format_number(value: float | None, pattern: str) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return pattern.format(value)
