"""What compressing one weight does to a model's outputs, measured in onnxruntime.

`auto` asks this module, for many (weight, setting) pairs, how much of the error budget the
model's outputs use when that one weight alone is replaced by its reconstruction. Building a
model per pair would cost a serialisation and a session each, so there is one *probe* model
instead: the weights under study are its graph inputs (their initializer or Constant removed,
an input of the same name and type added), one session per worker thread is created once, and
each measurement feeds the original values for every weight but the one under test.

Which weights a probe can take: initializers and Constant nodes of the main graph, and those
of If/Loop/Scan bodies when their name is defined once in the model (a subgraph reads outer
values, so the weight becomes a main-graph input that the body reads). Weights in model-local
functions cannot be fed from outside a function call: `hoist_reason` says so and auto leaves
them alone.

Error units. `error_units` says how much of a `verify.Budget` an output's deviation uses, on a
scale where independent weight errors add: (1 - cosine) / (1 - min_cosine), since 1 - cosine
grows with the squared error, and (|d| / (atol + rtol |ref|))**2 for the elementwise check.
1.0 is the budget's edge; the model's predicted error is the sum over compressed weights.
The cosine is verify's (compare_arrays): the worst sample's along the batch axis, the one
the run's --min-cosine holds, so auto's choice and verification measure the same thing.
Summing each weight's worst-sample gap bounds the worst sample of the sum from above.

What the calibration inputs show about each weight's inputs (activation energy, second
moments, the rows a table's lookups read) is graphpass.activations, which runs its captures
through a probe.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from graphpass.budget import Budget
from graphpass.edit import Model
from graphpass.errors import UsageError
from graphpass.metrics import LevelMetrics, OutputMetrics, compare_arrays
from graphpass.model import serialized_bytes
from graphpass.scopes import build_scope_tree
from graphpass.verify import VerifyResult
from graphpass.weights import WeightRef

# Below this, 1 - cosine is float64 rounding of a dot product over normalised vectors.
_COSINE_NOISE = 1e-12


# ---------------------------------------------------------------------------------------------
# Error units
# ---------------------------------------------------------------------------------------------


def error_units(name: str, reference: np.ndarray, candidate: np.ndarray, budget: Budget,
                batch_axis: int = 0) -> tuple[float, LevelMetrics]:
    """The share of `budget` that one output's deviation uses (see the module docstring), with
    verify's own figures for it. Structural failures (shape, dtype, non-finite values, a changed
    integer output) use more than any budget: infinity."""
    metrics = compare_arrays(name, reference, candidate, Budget(), batch_axis)
    if not metrics.passed:
        return math.inf, metrics
    if metrics.cosine is None:  # an integer or bool output, and it matched exactly
        return 0.0, metrics
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    finite = np.isfinite(ref)
    units = max(_cosine_units(metrics.cosine, budget.min_cosine), _elementwise_units(ref[finite], cand[finite], budget))
    return units, metrics


def _cosine_units(cosine: float, min_cosine: float | None) -> float:
    if min_cosine is None:
        return 0.0
    gap = max(0.0, 1.0 - cosine)
    return _ratio(gap if gap > _COSINE_NOISE else 0.0, 1.0 - min_cosine)


def _elementwise_units(ref: np.ndarray, cand: np.ndarray, budget: Budget) -> float:
    if not budget.has_elementwise or ref.size == 0:
        return 0.0
    allowed = (budget.atol or 0.0) + (budget.rtol or 0.0) * np.abs(ref)
    diff = np.abs(cand - ref)
    over_zero = diff[allowed == 0]
    if over_zero.size and over_zero.max() > 0:
        return math.inf
    worst = float(np.max(diff[allowed > 0] / allowed[allowed > 0], initial=0.0))
    return worst**2


def _ratio(used: float, allowed: float) -> float:
    if used == 0.0:
        return 0.0
    return used / allowed if allowed > 0 else math.inf


def verified_units(result: VerifyResult, budget: Budget,
                   outputs: Sequence[str] | None = None) -> float:
    """Error units of a verification result, from its figures (worst output, worst level).

    The elementwise part is read off max_abs_error against atol (or max_rel_error against
    rtol), a close estimate used only to steer auto's search: pass or fail is verify's.
    """
    worst = 0.0
    for name, metrics in result.outputs.items():
        if outputs and name not in outputs:
            continue
        if not metrics.passed and metrics.cosine is None:
            return math.inf  # missing, misshapen or mismatched: no figures to weigh
        if metrics.cosine is not None:
            worst = max(worst, _cosine_units(metrics.cosine, budget.min_cosine))
        worst = max(worst, _elementwise_units_of(metrics, budget))
    return worst


def _elementwise_units_of(metrics: OutputMetrics, budget: Budget) -> float:
    if budget.atol:
        return (metrics.max_abs_error or 0.0) ** 2 / budget.atol**2
    if budget.rtol:
        return (metrics.max_rel_error or 0.0) ** 2 / budget.rtol**2
    if budget.has_elementwise:  # atol=0 (and no rtol): exact equality
        return 0.0 if not metrics.max_abs_error else math.inf
    return 0.0


@dataclass(frozen=True)
class Measurement:
    """One probe run against the reference: error units per output and overall (the worst)."""

    units: float
    per_output: dict[str, float]
    cosine: dict[str, float]
    max_abs_error: dict[str, float]

    def scaled(self, ratio: float) -> Measurement:
        """The measurement of an error `ratio` times as large in squared terms (a prediction,
        graphpass.sampling): units and 1 - cosine scale by it, max abs errors by its root."""
        root = math.sqrt(ratio)
        return Measurement(self.units * ratio, {k: v * ratio for k, v in self.per_output.items()},
                           {k: 1.0 - (1.0 - v) * ratio for k, v in self.cosine.items()},
                           {k: v * root for k, v in self.max_abs_error.items()})

    def plus(self, other: Measurement) -> Measurement:
        """Two independent errors together, as auto adds weights' errors: units and 1 - cosine
        add, max abs errors add in quadrature."""
        def total(a: dict, b: dict, add) -> dict:
            return {k: add(a[k], b[k]) if k in a and k in b else a.get(k, b.get(k)) for k in {**a, **b}}

        return Measurement(self.units + other.units, total(self.per_output, other.per_output, float.__add__),
                           total(self.cosine, other.cosine, lambda x, y: x + y - 1.0),
                           total(self.max_abs_error, other.max_abs_error, math.hypot))

    def to_dict(self) -> dict:
        return {
            "units": _finite(self.units),
            "cosine": {name: _finite(v) for name, v in self.cosine.items()},
            "max_abs_error": {name: _finite(v) for name, v in self.max_abs_error.items()},
        }


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


class ErrorMeter:
    """Compares probe outputs with the reference outputs, in error units of a budget."""

    def __init__(self, reference: Mapping[str, np.ndarray], budget: Budget,
                 batch_axes: Mapping[str, int] | None = None):
        self.reference = dict(reference)
        self.budget = budget
        # Where each output's samples lie, as verification reads them (declared_batch_axes).
        self.batch_axes = dict(batch_axes or {})

    def measure(self, outputs: Mapping[str, np.ndarray]) -> Measurement:
        per_output, cosine, max_abs = {}, {}, {}
        for name, ref in self.reference.items():
            per_output[name], metrics = error_units(name, ref, np.asarray(outputs[name]), self.budget,
                                                    self.batch_axes.get(name, 0))
            if metrics.cosine is not None:
                cosine[name], max_abs[name] = metrics.cosine, metrics.max_abs_error
        return Measurement(max(per_output.values(), default=0.0), per_output, cosine, max_abs)


# ---------------------------------------------------------------------------------------------
# The probe
# ---------------------------------------------------------------------------------------------


def hoist_reason(model: Model, weight: WeightRef) -> str | None:
    """Why this weight cannot become an input of the probe, or None when it can."""
    if any(scope.is_function for scope in weight.scope.ancestors()):
        return "lives in a model-local function, which reads nothing from outside: auto cannot feed it"
    if weight.scope.parent is not None and _definitions(model).get(weight.name, 0) != 1:
        return "lives in a subgraph under a name defined more than once: auto cannot feed it"
    if weight.name in {v.name for v in model.proto.graph.input}:
        return "is also a graph input"
    return None


def _definitions(model: Model) -> dict[str, int]:
    """How many scopes define each name."""
    counts: dict[str, int] = {}
    for scope in model.scopes:
        for name in scope.local_names():
            counts[name] = counts.get(name, 0) + 1
    return counts


class Probe:
    """One onnxruntime model in which `weights` are graph inputs, and one session per thread.

    `run` is safe to call from several threads at once: each gets its own single-threaded
    session (onnxruntime releases the GIL while it runs), so the run's worker threads share the cores.
    `release` lets the sessions and the weights' values go until the probe is used again.
    """

    def __init__(self, model: Model, weights: Sequence[WeightRef], inputs: Mapping[str, np.ndarray],
                 outputs: Sequence[str], extra_outputs: Sequence[tuple[str, int]] = ()):
        self.outputs = list(outputs) + [name for name, _ in extra_outputs]
        self._bytes = serialized_bytes(_probe_model(model.proto, weights, list(outputs), extra_outputs))
        self._weights = list(weights)
        self._inputs = {name: np.asarray(value) for name, value in inputs.items()}
        self._lock = threading.Lock()
        self._local = threading.local()
        self._originals: dict[str, np.ndarray] = {}
        self._feed: dict[str, ort.OrtValue] | None = None  # None: released
        self._open()

    @property
    def originals(self) -> dict[str, np.ndarray]:
        """The weights' original values, by name."""
        return self._opened()[0]

    def run(self, overrides: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Outputs with the given weights replaced (every other weight at its original value)."""
        feed = dict(self._opened()[1])
        for name, value in (overrides or {}).items():
            feed[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
        values = self._session().run_with_ort_values(self.outputs, feed)
        return {name: value.numpy() for name, value in zip(self.outputs, values)}

    def release(self) -> None:
        """Let the sessions and the weights' values go (every thread's) until the next use, which
        reads them again. On the 1.1 B decoder the values alone are the model's size, mapped in
        while it ran. Call it while no thread runs the probe."""
        with self._lock:
            self._local = threading.local()
            self._feed, self._originals = None, {}

    @property
    def released(self) -> bool:
        """Whether the sessions and values are let go (the next use reads them again)."""
        return self._feed is None

    def _opened(self) -> tuple[dict[str, np.ndarray], dict[str, ort.OrtValue]]:
        with self._lock:
            if self._feed is None:
                self._open()
            return self._originals, self._feed

    def _open(self) -> None:
        originals = {w.name: np.ascontiguousarray(w.read()) for w in self._weights}
        feeds = {**self._inputs, **originals}
        wanted = self._session().get_inputs()
        missing = [i.name for i in wanted if i.name not in feeds]
        if missing:
            raise UsageError(f"no value for model input(s) {', '.join(missing)} "
                             f"(provided: {', '.join(sorted(self._inputs)) or 'none'})")
        # OrtValues made once: each run hands onnxruntime the same buffers, without copies.
        self._feed = {i.name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(feeds[i.name])) for i in wanted}
        self._originals = originals

    def _session(self) -> ort.InferenceSession:
        session = getattr(self._local, "session", None)
        if session is None:
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            options.log_severity_level = 4
            # The arena keeps each run's largest buffers for good: on the 1.1 B float16 decoder
            # (weights fed as inputs, cast to float32 inside) a session held 1.6 GB after its
            # first run and 3.1 GB after one that replaced a weight, against 0.08 GB without
            # it; runs on the BERT took the same time either way.
            options.enable_cpu_mem_arena = False
            session = ort.InferenceSession(self._bytes, sess_options=options, providers=["CPUExecutionProvider"])
            self._local.session = session
        return session


def _probe_model(proto: onnx.ModelProto, weights: Sequence[WeightRef], outputs: list[str],
                 extra_outputs: Sequence[tuple[str, int]]) -> onnx.ModelProto:
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    scopes = {scope.path: scope for scope in build_scope_tree(probe)}
    for weight in weights:
        _remove_definition(scopes[weight.scope.path].body, weight)
        probe.graph.input.append(helper.make_tensor_value_info(weight.name, weight.dtype, weight.shape))
    kept = [value for value in probe.graph.output if value.name in outputs]
    del probe.graph.output[:]
    probe.graph.output.extend(kept)
    for name, dtype in extra_outputs:
        probe.graph.output.append(helper.make_tensor_value_info(name, dtype, None))
    return probe


def _remove_definition(body, weight: WeightRef) -> None:
    if weight.source == "initializer":
        index = next(i for i, t in enumerate(body.initializer) if t.name == weight.name)
        del body.initializer[index]
        return
    index = next(i for i, node in enumerate(body.node)
                 if node.op_type == "Constant" and node.output and node.output[0] == weight.name)
    del body.node[index]


# ---------------------------------------------------------------------------------------------
# Models that compute chosen outputs only
# ---------------------------------------------------------------------------------------------


def with_outputs(proto: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of the model that computes only the named outputs."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    kept = [value for value in copy.graph.output if value.name in set(names)]
    del copy.graph.output[:]
    copy.graph.output.extend(kept)
    return copy
