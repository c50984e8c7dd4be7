"""The engine every binning pass shares: everything but the fit.

`BinningPass` selects weights (include/exclude, min_size, and the skips every lossy pass needs),
lays each one out per tensor, per output channel or per block of an output channel
(`graphpass.lowering.lookup.Layout`), fits a codebook for every group with the subclass's
`fit_groups`, optionally assigns it with error feedback, and replaces the weight by a lookup
(`graphpass.lowering.lookup`). Fits run on the run's workers, or as `fit_weight` tasks on a
Dask cluster.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from onnx import TensorProto

from graphpass import binning
from graphpass.codec import (
    CODEBOOK_DTYPE_OPTION, WEIGHT_FILTER_OPTIONS, Plan, WeightFilter, layout_for, scope_opset, sqnr_db, sqnr_figure,
)
from graphpass.errors import UsageError
from graphpass.feedback import (
    NO_INPUTS, FeedbackStatistics, InputHessians, feedback_note, input_axis, scalar_labels, shrink_for,
)
from graphpass.lowering import lookup
from graphpass.lowering.choose import NON_AFFINE_NOTE
from graphpass.lowering.lookup import Layout, Outliers
from graphpass.manager import Option, Pass, PassContext, PassResult, registered_passes
from graphpass.scopes import NameAllocator
from graphpass.streamed import WeightSource
from graphpass.weights import Replacement, WeightRef

COMMON_OPTIONS = (
    Option("granularity", str, "tensor", "one codebook per tensor, per output channel, or per block "
           "of group_size values of an output channel; each codebook costs k entries, so channel and "
           "group only pay on large channels", choices=("tensor", "channel", "group")),
    Option("group_size", int, 128, "values per codebook with granularity=group", low=2),
    *WEIGHT_FILTER_OPTIONS,
    # Scalar codebooks may also be stored as bytes (graphpass.lowering.tables).
    dataclasses.replace(CODEBOOK_DTYPE_OPTION, choices=(*CODEBOOK_DTYPE_OPTION.choices, "uint8"),
                        help=CODEBOOK_DTYPE_OPTION.help + "; uint8: a byte per entry on a 256-level grid spanning "
                        "each codebook, with a float16 scale and offset (per channel or group; a tensor's one "
                        "codebook stays float16)"),
    Option("outliers", float, 0.0, "percent of each tensor's largest magnitudes kept exactly", low=0.0, high=10.0),
    Option("feedback", bool, False, "error feedback (GPTQ/OBQ): MatMul, Gemm and Conv weights take their codebook "
           "entries column by column, each column's error pushed onto the next through the second moment of "
           "their inputs on the calibration inputs; embedding tables weight each row by how often those read "
           "it; other weights as without"),
)

# Options whose effect a weight's layout and codebook size say in full (see effect_key).
_SHAPING_OPTIONS = frozenset({"bits", "k", "granularity", "group_size"})

_CODEBOOK_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "uint8": lookup.BYTE_TABLE}


# The index width most methods take; `entries` reads it (or an explicit k) from a config.
BITS_OPTION = Option("bits", int, 4, "index bits: 2**bits codebook entries per group", low=1, high=8)


def entries(config: dict[str, Any]) -> int:
    return config.get("k") or 2 ** config["bits"]



@dataclass
class Job:
    """One weight, read and laid out, ready to fit (fits run on the run's workers)."""

    weight: WeightRef
    layout: Layout
    values: np.ndarray | None  # [groups, group_size], float32 or float64, outliers clipped
    original: np.ndarray | None  # the same before clipping, for the error figure
    outliers: Outliers | None
    outlier_mask: np.ndarray | None  # [groups, group_size]
    opset: int  # of the weight's scope: decides packings and lowerings
    ir_version: int
    sample_weight: np.ndarray | None = None  # [groups, group_size]: how much each value's error counts
    hessian: np.ndarray | None = None  # [K, K] the second moment of the inputs, for error feedback

    def for_emit(self) -> Job:
        """The job without its weight-sized arrays: all that emitting needs, so a plan stays small."""
        return dataclasses.replace(self, values=None, original=None, outlier_mask=None, sample_weight=None,
                                   hessian=None)


@dataclass
class Fit:
    codebook: np.ndarray  # [groups, k] float64
    labels: np.ndarray  # [groups, group_size]
    sqnr_db: float
    extra: dict[str, Any] = field(default_factory=dict)
    rebuilt: np.ndarray | None = None  # [groups, group_size] float64: exactly what the emitted nodes compute


class BinningPass(Pass):
    """Shared engine; subclasses implement `fit_groups` and may add options."""

    lossless = False
    method_options: ClassVar[tuple[Option, ...]] = ()
    # Methods whose fit can weight each value's error (binning.kmeans's sample_weight).
    supports_value_weight: ClassVar[bool] = False
    # Every method's codebook can be assigned with error feedback (feedback=true).
    supports_hessian: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.options = tuple(cls.method_options) + COMMON_OPTIONS + tuple(getattr(cls, "options_after", ()))

    def fit_groups(self, values: np.ndarray) -> tuple[binning.Binning, dict[str, Any]]:
        """Codebook per row of `values` [groups, n]; extra figures for the report."""
        raise NotImplementedError

    def fit_weighted(self, values: np.ndarray, sample_weight: np.ndarray) -> tuple[binning.Binning, dict[str, Any]]:
        """`fit_groups` with each value's squared error weighted (when supports_value_weight)."""
        raise NotImplementedError

    def call(self, ctx: PassContext) -> PassResult:
        result = PassResult()
        model = ctx.model
        if model.opset < lookup.MIN_OPSET:
            result.notes.append(f"{_no_lookup(model.opset)}: nothing changed")
            return result
        chosen = self._select(model, result)
        statistics = ctx.analysis(InputHessians) if self.uses_feedback() else None
        tensors = []
        with ctx.progress(f"{self.name}: sharing weight values", len(chosen)) as advance:
            for plan in self._planned(ctx, chosen, statistics):
                plan.apply()
                tensors.append(plan.details)
                advance(1)
        result.tensors_changed = len(tensors)
        result.changed = bool(tensors)
        result.details = self._details(tensors)
        result.notes.extend(self._notes(tensors))
        if ctx.deployment.objective == "memory" and tensors:
            for tensor in tensors:
                tensor["memory"] = self.memory_note()
            result.notes.append(f"{self.name}: {len(tensors)} weights: {self.memory_note()} (--objective memory)")
        return result

    def memory_note(self) -> str:
        """What runtimes do with this pass's lookups, said under --objective memory."""
        return NON_AFFINE_NOTE

    def plan(self, ctx: PassContext, weight: WeightRef, *, value_weight: np.ndarray | None = None,
             hessian: np.ndarray | None = None) -> Plan | str:
        """This pass's plan for one weight (graphpass.codec.WeightCodec), or why it stays as it is.

        `value_weight` (broadcastable to the weight) says how much each value's squared error
        counts, e.g. the energy of the activations it multiplies; methods that cannot weight
        their fit (`supports_value_weight` False) ignore it. With feedback=true, `hessian` (the
        second moment of a MatMul weight's inputs) drives the error feedback; not given, both come
        from the run's calibration inputs (`graphpass.feedback.InputHessians`).
        """
        if self.uses_feedback():
            own_weight, own_hessian = self._calibration(ctx.analysis(InputHessians), weight)
            value_weight = own_weight if value_weight is None else value_weight
            hessian = own_hessian if hessian is None else hessian
        return self._lookup_plan(ctx, weight, value_weight, hessian)

    def _lookup_plan(self, ctx: PassContext, weight: WeightRef, value_weight: np.ndarray | None,
                     hessian: np.ndarray | None) -> Plan | str:
        """`plan` with the calibration figures given (None: without them)."""
        if ctx.model.opset < lookup.MIN_OPSET:
            return _no_lookup(ctx.model.opset)
        found = self._layout_or_reason(weight, ctx.model)
        if isinstance(found, str):
            return found
        return self._plan_job(self._job(weight, found, value_weight, hessian if self.uses_feedback() else None))

    def uses_feedback(self) -> bool:
        """Whether this instance assigns codebook entries with error feedback."""
        return self.config["feedback"]

    def _calibration(self, statistics: FeedbackStatistics | None, weight: WeightRef):
        """(value weight, hessian) error feedback uses for this weight (FeedbackStatistics):
        the Hessian for MatMul/Gemm/Conv weights, and the fit's weights."""
        if statistics is None:
            return None, None
        return statistics.value_weight(weight), statistics.hessians.get(weight.name)

    def _notes(self, tensors: list[dict[str, Any]]) -> list[str]:
        notes = feedback_note(self.name, tensors)
        if any(t["table_bytes"] > t["index_bytes"] for t in tensors):
            notes.append("some codebooks outweigh their indices (see details.tensors): a larger group_size, "
                         "granularity=tensor or codebook_dtype=uint8 would shrink them")
        return notes

    def codebook_entries(self) -> int:
        """Entries per codebook row before fitting, to predict what a lookup costs."""
        return entries(self.config)

    def expected_bytes(self, weight: WeightRef, model) -> int:
        return self.predicted_bytes(weight, self._layout(weight), scope_opset(weight, model), model.proto.ir_version)

    def effect_key(self, weight: WeightRef) -> tuple:
        layout = self._layout(weight)
        others = tuple(sorted((k, v) for k, v in self.config.items() if k not in _SHAPING_OPTIONS))
        return (self.name, self.codebook_entries(), layout.granularity, layout.group_size, others)

    def row_local(self, weight: WeightRef) -> bool:
        layout = self._layout(weight)
        return layout.granularity != "tensor" and layout.channel_axis == 0

    def _layout(self, weight: WeightRef) -> Layout:
        return layout_for(weight, self.config["granularity"], self.config["group_size"])

    def _select(self, model, result: PassResult) -> list[tuple[WeightRef, Layout]]:
        chosen = []
        for weight in model.weights():
            found = self._layout_or_reason(weight, model)
            if isinstance(found, str):
                result.skip(weight.name, found)
            else:
                chosen.append((weight, found))
        return chosen

    def _layout_or_reason(self, weight: WeightRef, model) -> Layout | str:
        reason = WeightFilter.from_config(self.config).reason_to_skip(weight)
        if reason:
            return reason
        layout = self._layout(weight)
        return self._unfit(weight, layout, model) or layout

    def _unfit(self, weight: WeightRef, layout: Layout, model) -> str | None:
        """Reasons found by looking closer: the scope's opset, the values, the predicted size."""
        opset = scope_opset(weight, model)
        if opset < lookup.MIN_OPSET:
            return f"its function imports opset {opset}, which has no GatherElements"
        predicted = self.predicted_bytes(weight, layout, opset, model.proto.ir_version)
        if predicted >= weight.nbytes:
            return f"a lookup would not be smaller ({predicted} bytes for {weight.nbytes}; {layout.groups} codebooks)"
        if not np.isfinite(weight.read()).all():
            return "holds NaN or infinite values"
        return None

    def predicted_bytes(self, weight: WeightRef, layout: Layout, opset: int, ir_version: int) -> int:
        k = min(self.codebook_entries(), layout.group_size)  # a group of n values uses <= n entries
        stored = self._table_type(weight, layout)
        tuples = lookup.row_storage_bytes(k, layout, lookup.np_dtype(stored).itemsize, opset, ir_version)
        if tuples is not None:
            return tuples
        table = lookup.table_bytes(stored, layout.groups, k)
        if lookup.per_row_codebooks(layout):
            return lookup.row_digits_bytes(k, layout, opset, ir_version) + table
        packing = lookup.choose_packing(k, opset, ir_version, count=weight.size)
        return packing.stored_bytes(weight.size) + table

    def _table_type(self, weight: WeightRef, layout: Layout, codebook: np.ndarray | None = None) -> int:
        """The codebook's stored type (for `codebook`'s entries; predicted when None)."""
        return lookup.table_dtype(weight.dtype, self._requested_table(layout), codebook)

    def _requested_table(self, layout: Layout) -> int:
        """The stored type asked for. A tensor's one codebook asked for as bytes stays float16:
        its one row costs nothing, and it may be stored as a table of tuples of entries."""
        requested = _CODEBOOK_TYPES[self.config["codebook_dtype"]]
        if requested == lookup.BYTE_TABLE and layout.granularity == "tensor":
            return TensorProto.FLOAT16
        return requested

    # -- fitting ---------------------------------------------------------------------------

    def _planned(self, ctx: PassContext, chosen: list[tuple[WeightRef, Layout]],
                 statistics: FeedbackStatistics | None) -> Iterator[Plan]:
        """Plans in order, fitted on the run's workers (numpy work that releases the GIL for long
        stretches), or on a Dask cluster when the run has one. Weights are read here, on the
        calling thread, because applying a plan edits the protobuf lists that reading walks."""
        if ctx.workers.scheduler is not None:
            if statistics is not None:
                # The second moments live in this process; the cluster's tasks carry only where weights are.
                raise UsageError(f"{self.name}(feedback=true) fits on this machine's workers: drop --scheduler")
            return self._planned_remotely(ctx, chosen)
        # Only the read happens here: converting and laying out the values is the worker's.
        reads = ((weight, layout, np.asarray(weight.read()), *_versions(weight), *self._calibration(statistics, weight))
                 for weight, layout in chosen)
        return ctx.workers.map(lambda read: self._plan_job(self.job_of(*read)), reads)

    def _planned_remotely(self, ctx: PassContext, chosen: list[tuple[WeightRef, Layout]]) -> Iterator[Plan]:
        """The fits as `fit_weight` tasks, each reading its weight where the cluster's worker runs;
        the plans (scratch emits, reconstructions) are made here from the small results."""
        tasks = (FitTask(self.name, dict(self.config), _detached(weight), ctx.workers.source_of(weight), layout,
                         *_versions(weight))
                 for weight, layout in chosen)
        for (weight, layout), (fit, outliers) in zip(chosen, ctx.workers.map_remote(fit_weight, tasks)):
            job = Job(weight, layout, None, None, outliers, None, *_versions(weight))
            rebuilt = self.rebuilt_groups(job, fit.codebook, fit.labels)
            yield self._plan_from_fit(job, dataclasses.replace(fit, rebuilt=rebuilt))

    def _job(self, weight: WeightRef, layout: Layout, value_weight: np.ndarray | None = None,
             hessian: np.ndarray | None = None) -> Job:
        return self.job_of(weight, layout, np.asarray(weight.read()), *_versions(weight), value_weight, hessian)

    def job_of(self, weight: WeightRef, layout: Layout, array: np.ndarray, opset: int, ir_version: int,
               value_weight: np.ndarray | None = None, hessian: np.ndarray | None = None) -> Job:
        """The job for a weight whose values are `array` (which may have been read elsewhere)."""
        work_type = np.float64 if array.dtype == np.float64 else np.float32
        array = array.astype(work_type)
        outliers = _largest(array, self.config["outliers"])
        clipped = array if outliers is None else _clip_to_bulk(array, outliers)
        mask = None
        if outliers is not None:
            flat_mask = np.zeros(array.size, dtype=bool)
            flat_mask[outliers.positions] = True
            mask = layout.split(flat_mask)
        sample_weight = None
        if value_weight is not None and self.supports_value_weight:
            sample_weight = layout.split(np.broadcast_to(np.asarray(value_weight, dtype=np.float64), array.shape))
        return Job(weight, layout, layout.split(clipped), layout.split(array), outliers, mask, opset, ir_version,
                   sample_weight, hessian)

    def _fit(self, job: Job) -> Fit:
        if job.sample_weight is None:
            found, extra = self.fit_groups(job.values)
        else:
            found, extra = self.fit_weighted(job.values, job.sample_weight)
        if job.hessian is not None:
            found, extra["feedback"] = self._fed_back(job, found)
        elif self.uses_feedback():
            extra["feedback"] = NO_INPUTS
        codebook, labels = self.final_codebook(found)
        rebuilt = self.rebuilt_groups(job, codebook, labels)
        if job.outlier_mask is not None:
            rebuilt = np.where(job.outlier_mask, job.original, rebuilt)
        return Fit(codebook, labels, sqnr_db(job.original, rebuilt), extra, rebuilt)

    def _fed_back(self, job: Job, found: binning.Binning) -> tuple[binning.Binning, str]:
        """The fitted codebook's entries assigned with error feedback (graphpass.feedback), and
        what the report says: "applied", or why each value was rounded on its own instead."""
        layout, shape = job.layout, job.weight.shape
        group_of_value = np.repeat(np.arange(layout.groups, dtype=np.int32)[:, None], layout.group_size, axis=1)
        groups = layout.merge(group_of_value).reshape(shape)
        exact = None if job.outlier_mask is None else layout.merge(job.outlier_mask).reshape(shape)
        original = layout.merge(job.original).reshape(shape)
        labels, note = scalar_labels(original, groups, self._stored_values(job, found.codebook), job.hessian,
                                     input_axis(job.weight), exact, shrink_for(job.weight))
        labels = layout.split(labels).astype(found.labels.dtype)
        return binning.Binning(found.codebook, labels), note or "applied"

    def rebuilt_groups(self, job: Job, codebook: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """[groups, group_size] float64: the values the emitted lookup produces, before outliers."""
        return np.take_along_axis(self._stored_values(job, codebook), labels.astype(np.intp), axis=1)

    def final_codebook(self, found: binning.Binning) -> tuple[np.ndarray, np.ndarray]:
        """The codebook to store: unused entries dropped, so indices pack into fewer bits."""
        return lookup.compact(found.codebook, found.labels)

    def _stored_values(self, job: Job, codebook: np.ndarray) -> np.ndarray:
        return lookup.held_table(job.weight.dtype, self._requested_table(job.layout), codebook)[1].astype(np.float64)

    # -- rewriting -------------------------------------------------------------------------

    def _plan_job(self, job: Job) -> Plan:
        return self._plan_from_fit(job, self._fit(job))

    def _plan_from_fit(self, job: Job, fit: Fit) -> Plan:
        """Everything the plan promises: the exact reconstruction and the real stored bytes,
        measured by emitting once into a scratch replacement (same nodes, private names).
        `fit.rebuilt` may leave the outliers out: they are put back from `job.outliers`."""
        weight = job.weight
        reconstruction = job.layout.merge(fit.rebuilt).reshape(weight.shape).astype(lookup.np_dtype(weight.dtype))
        if job.outliers is not None:
            np.put(reconstruction, job.outliers.positions, job.outliers.values)
        # The emitter keeps codebook, labels and layout only: a plan waiting to be applied stays small.
        slim_job, slim_fit = job.for_emit(), dataclasses.replace(fit, rebuilt=None)

        def emit(r: Replacement) -> str:
            return self._emit_all(r, slim_job, slim_fit)[0]

        scratch = Replacement(dataclasses.replace(weight, model=_ScratchNames()))
        cost = lookup.cost_of(scratch, self._emit_all(scratch, slim_job, slim_fit)[1])
        details = {
            "name": weight.name,
            "shape": list(weight.shape),
            "granularity": job.layout.granularity,
            "group_size": job.layout.group_size,
            "groups": job.layout.groups,
            "k": int(fit.codebook.shape[1]),
            "sqnr_db": sqnr_figure(fit.sqnr_db),
            "outliers": 0 if job.outliers is None else int(job.outliers.positions.size),
            **cost.to_dict(),
            **fit.extra,
        }
        return Plan(weight, reconstruction, cost.total_bytes, emit, details)

    def _emit_all(self, r: Replacement, job: Job, fit: Fit) -> tuple[str, str]:
        """The lookup (or lowering) and its outlier patch; returns (output, how indices are stored).
        Reads the weight's shape and type from `r`, so a plan may be applied to a copy of the model."""
        out, how = self.emit(r, job, fit, job.opset, job.ir_version)
        if job.outliers is not None:
            out = lookup.emit_outliers(r, out, job.outliers, r.weight.shape)
        return out, how

    def emit(self, r: Replacement, job: Job, fit: Fit, opset: int, ir_version: int) -> tuple[str, str]:
        """Nodes rebuilding the weight; returns (output name, how the indices are stored)."""
        stored = self._table_type(job.weight, job.layout, fit.codebook)
        out = lookup.emit_lookup(r, fit.codebook, fit.labels, job.layout, stored_dtype=stored, opset=opset,
                                 ir_version=ir_version)
        return out, lookup.storage_name(fit.codebook.shape[1], job.layout, stored, opset, ir_version)

    def _details(self, tensors: list[dict[str, Any]]) -> dict[str, Any]:
        before = sum(t["bytes_before"] for t in tensors)
        after = sum(t["bytes_after"] for t in tensors)
        values = sum(t["weights"] for t in tensors)
        return {
            "method": self.name,
            "bytes_before": before,
            "bytes_after": after,
            "bits_per_weight": round(8.0 * after / values, 3) if values else None,
            "packings": dict(Counter(t["packing"] for t in tensors)),
            "granularities": dict(Counter(t["granularity"] for t in tensors)),
            "min_sqnr_db": min((t["sqnr_db"] for t in tensors if t["sqnr_db"] is not None), default=None),
            "tensors": tensors,
        }


def _largest(array: np.ndarray, percent: float) -> Outliers | None:
    """The `percent` % largest magnitudes (at least one when asked for any)."""
    if percent <= 0:
        return None
    count = min(array.size, max(1, int(round(array.size * percent / 100.0))))
    flat = array.ravel()
    positions = np.sort(np.argpartition(np.abs(flat), flat.size - count)[flat.size - count:])
    return Outliers(positions, flat[positions])


def _clip_to_bulk(array: np.ndarray, outliers: Outliers) -> np.ndarray:
    """Clip the kept values to the largest magnitude left, so they do not stretch the codebook
    (their reconstruction is overwritten anyway)."""
    bulk = np.delete(np.abs(array.ravel()), outliers.positions)
    limit = bulk.max(initial=0.0)
    return np.clip(array, -limit, limit)


class _ScratchNames:
    """Stands in for the model in a scratch replacement: fresh names that touch no real allocator."""

    def __init__(self):
        self.names = NameAllocator(set())


@dataclass(frozen=True)
class FitTask:
    """One weight's fit as any worker can run it, on this machine or another: the codec by
    registered name and options, the weight by where its values are (graphpass.streamed)."""

    codec: str
    config: dict[str, Any]
    weight: WeightRef  # detached from its model: type, shape and name only
    source: WeightSource
    layout: Layout
    opset: int
    ir_version: int


def fit_weight(task: FitTask) -> tuple[Fit, Outliers | None]:
    """The fit of one weight, read from its source where this runs; without the weight-sized
    reconstruction, which the client rebuilds from codebook and labels."""
    codec = registered_passes()[task.codec](**task.config)
    job = codec.job_of(task.weight, task.layout, task.source.read(), task.opset, task.ir_version)
    return dataclasses.replace(codec._fit(job), rebuilt=None), job.outliers


def _versions(weight: WeightRef) -> tuple[int, int]:
    """The opset of the weight's scope and the model's IR version: what packings and lowerings use."""
    return scope_opset(weight, weight.model), weight.model.proto.ir_version


def _detached(weight: WeightRef) -> WeightRef:
    return dataclasses.replace(weight, model=None, scope=None, consumers=[])


def _no_lookup(opset: int) -> str:
    return f"opset {opset} has no GatherElements (opset {lookup.MIN_OPSET})"

