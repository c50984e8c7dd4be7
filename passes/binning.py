"""kmeans, uniform, adaptive, gmm, ternary, binary: weights share a few values per group.

One engine (`BinningPass`) does everything but the fit: it selects weights (include/exclude,
min_size, and the skips every lossy pass needs), lays each one out per tensor, per output
channel or per block of an output channel (`graphpass.lookup.Layout`), fits a codebook for
every group with the numeric engine `graphpass.binning`, and replaces the weight by a lookup
(`graphpass.lookup`): packed indices plus a small table, rebuilt in the graph. The classes at
the end only say how they fit and which options they add.

Spec syntax: `include=` and `exclude=` take `|`-separated tokens (commas separate options); a
token matches a weight when one of its readers has that op type (MatMul, Gemm, Conv, Gather,
...) or when the weight's name matches it as an fnmatch pattern (`*.attn.*`).

Costs to keep in mind: a codebook row costs k entries, so per-channel and per-group codebooks
pay k * 16 or 32 bits per row (codebook_dtype=float16 halves it); a weight whose predicted
lookup is not smaller is left alone. `uniform(lower=dequantize)` stores a scale and zero point
per group instead; onnxruntime fuses a blocked UINT4 DequantizeLinear + MatMul (opset >= 21)
into MatMulNBits, whose default accuracy_level 4 quantizes activations to int8: expect output
drift of ~1e-2 relative at ORT_ENABLE_ALL that ORT_DISABLE_ALL does not show.
"""

from __future__ import annotations

import fnmatch
import math
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from onnx import NodeProto, TensorProto, helper

from graphpass import binning, lookup
from graphpass.lookup import Layout, Outliers
from graphpass.manager import Option, Pass, PassContext, PassResult, register
from graphpass.weights import Replacement, WeightRef

# Fitting is numpy work that releases the GIL for long stretches: two threads use both cores.
# A few tensors in flight keep both busy without holding every weight in memory at once.
_WORKERS = 2
_IN_FLIGHT = 4

COMMON_OPTIONS = (
    Option("granularity", str, "tensor", "one codebook per tensor, per output channel, or per block "
           "of group_size values of an output channel; each codebook costs k entries, so channel and "
           "group only pay on large channels", choices=("tensor", "channel", "group")),
    Option("group_size", int, 128, "values per codebook with granularity=group", low=2),
    Option("min_size", int, 1024, "leave weights with fewer values as they are", low=1),
    Option("include", str, "", "only these weights: |-separated reader op types and name patterns"),
    Option("exclude", str, "", "not these weights: |-separated reader op types and name patterns"),
    Option("codebook_dtype", str, "float32", "how codebook entries are stored (never wider than the weight)",
           choices=("float32", "float16")),
    Option("outliers", float, 0.0, "percent of each tensor's largest magnitudes kept exactly", low=0.0, high=10.0),
)

_CODEBOOK_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}

# Ops whose float inputs are quantization parameters or already-quantized data.
_QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "MatMulInteger", "ConvInteger", "MatMulNBits", "GatherBlockQuantized", "DynamicQuantizeMatMul",
})
# (op type, input index) of inputs that are shapes, sizes, axes or index ranges, not data.
_SHAPE_LIKE_INPUTS = frozenset({
    ("Reshape", 1), ("Expand", 1), ("Tile", 1), ("ConstantOfShape", 0), ("Range", 0), ("Range", 1),
    ("Range", 2), ("Slice", 1), ("Slice", 2), ("Slice", 3), ("Slice", 4), ("Pad", 1), ("Pad", 3),
    ("Resize", 1), ("Resize", 2), ("Resize", 3), ("Upsample", 1), ("TopK", 1), ("Squeeze", 1),
    ("Unsqueeze", 1), ("Split", 1), ("OneHot", 1), ("CumSum", 1), ("Gather", 1), ("GatherElements", 1),
    ("GatherND", 1), ("ScatterND", 1), ("ScatterElements", 1), ("NonMaxSuppression", 2),
})


# ---------------------------------------------------------------------------------------------
# Which weights
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightFilter:
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    min_size: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> WeightFilter:
        return cls(_tokens(config["include"]), _tokens(config["exclude"]), config["min_size"])

    def reason_to_skip(self, weight: WeightRef) -> str | None:
        """Why this weight stays as it is, or None when it is shared."""
        if lookup.is_lookup_table(weight):
            return "a lookup table stored by an earlier run (codebook or indices)"
        if not weight.is_float:
            kind = helper.tensor_dtype_to_string(weight.dtype).removeprefix("TensorProto.").lower()
            return f"not a float tensor ({kind}): integer, quantized or index data"
        if weight.overridable:
            return "initializer is also a graph input, so a caller may override it"
        if weight.consumer_ops & _QUANTIZED_OPS:
            return "read by a quantized op (" + ", ".join(sorted(weight.consumer_ops & _QUANTIZED_OPS)) + ")"
        if any(reader in _SHAPE_LIKE_INPUTS for reader in weight.consumers):
            return "read as a shape, size or index input"
        if not weight.consumers:
            return "nothing reads it"
        if weight.size < self.min_size:
            return f"{weight.size} value{'s' if weight.size != 1 else ''}, below min_size={self.min_size}"
        if self.include and not _matches(weight, self.include):
            return f"not selected by include={'|'.join(self.include)}"
        if _matches(weight, self.exclude):
            return f"excluded by exclude={'|'.join(self.exclude)}"
        return None


def _tokens(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split("|") if t.strip())


def _matches(weight: WeightRef, tokens: tuple[str, ...]) -> bool:
    return any(t in weight.consumer_ops or fnmatch.fnmatchcase(weight.name, t) for t in tokens)


# ---------------------------------------------------------------------------------------------
# Layout: the output channel of each weight
# ---------------------------------------------------------------------------------------------


def output_channel_axis(weight: WeightRef) -> int | None:
    """The axis that indexes output channels, from the first reader that tells; else axis 0."""
    rank = len(weight.shape)
    if rank < 2:
        return None
    for node, index in weight.reader_nodes():
        axis = _reader_channel_axis(node, index, rank)
        if axis is not None:
            return axis
    return 0


def _reader_channel_axis(node: NodeProto, index: int, rank: int) -> int | None:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMul":  # [.., in, out] on the right, [.., out, in] on the left
        return rank - 1 if index == 1 else rank - 2
    if node.op_type == "Gemm" and index in (0, 1):
        transposed = attrs.get("transB" if index == 1 else "transA", 0)
        return (1 - transposed) if index == 1 else transposed
    if node.op_type in ("Conv", "ConvTranspose") and index == 1:
        return 0  # Conv: [out, in, kh, kw]; ConvTranspose: input channels, the end axis nearest
    if node.op_type == "Gather" and index == 0:
        return attrs.get("axis", 0) % rank  # one row per token
    return None


def scope_opset(weight: WeightRef, model) -> int:
    """The default-domain opset the weight's nodes run at: a model-local function's own import,
    else the model's (subgraphs share it)."""
    root = list(weight.scope.ancestors())[-1]
    if root.is_function:
        for entry in root.body.opset_import:
            if entry.domain in ("", "ai.onnx"):
                return entry.version
    return model.opset


def layout_for(weight: WeightRef, granularity: str, group_size: int) -> Layout:
    if granularity == "tensor":
        return Layout.per_tensor(weight.shape)
    axis = output_channel_axis(weight)
    if granularity == "channel":
        return Layout.per_channel(weight.shape, axis)
    return Layout.per_group(weight.shape, axis, group_size)


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One weight, read and laid out, ready to fit (fits run on worker threads)."""

    weight: WeightRef
    layout: Layout
    values: np.ndarray  # [groups, group_size], float32 or float64, outliers clipped
    original: np.ndarray  # the same before clipping, for the error figure
    outliers: Outliers | None
    outlier_mask: np.ndarray | None  # [groups, group_size]


@dataclass
class Fit:
    codebook: np.ndarray  # [groups, k] float64
    labels: np.ndarray  # [groups, group_size]
    sqnr_db: float
    extra: dict[str, Any] = field(default_factory=dict)


class BinningPass(Pass):
    """Shared engine; subclasses implement `fit_groups` and may add options."""

    lossless = False
    method_options: ClassVar[tuple[Option, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.options = tuple(cls.method_options) + COMMON_OPTIONS

    def fit_groups(self, values: np.ndarray) -> tuple[binning.Binning, dict[str, Any]]:
        """Codebook per row of `values` [groups, n]; extra figures for the report."""
        raise NotImplementedError

    def call(self, ctx: PassContext) -> PassResult:
        result = PassResult()
        model = ctx.model
        if model.opset < lookup.MIN_OPSET:
            result.notes.append(f"opset {model.opset} has no GatherElements (opset {lookup.MIN_OPSET}): "
                                "nothing changed")
            return result
        chosen = self._select(model, result)
        tensors = []
        with ctx.progress(f"{self.name}: sharing weight values", len(chosen)) as advance:
            for job, fit in self._fitted(chosen):
                tensors.append(self._replace(ctx, job, fit))
                advance(1)
        result.tensors_changed = len(tensors)
        result.changed = bool(tensors)
        result.details = self._details(tensors)
        result.notes.extend(self._notes(tensors))
        return result

    def _notes(self, tensors: list[dict[str, Any]]) -> list[str]:
        if any(t["table_bytes"] > t["index_bytes"] for t in tensors):
            return ["some codebooks outweigh their indices (see details.tensors): a larger group_size, "
                    "granularity=tensor or codebook_dtype=float16 would shrink them"]
        return []

    def codebook_entries(self) -> int:
        """Entries per codebook row before fitting, to predict what a lookup costs."""
        return _entries(self.config)

    def _select(self, model, result: PassResult) -> list[tuple[WeightRef, Layout]]:
        weight_filter = WeightFilter.from_config(self.config)
        chosen = []
        for weight in model.weights():
            reason = weight_filter.reason_to_skip(weight)
            layout = None
            if reason is None:
                layout = layout_for(weight, self.config["granularity"], self.config["group_size"])
                reason = self._unfit(weight, layout, model)
            if reason:
                result.skip(weight.name, reason)
            else:
                chosen.append((weight, layout))
        return chosen

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
        packing = lookup.choose_packing(k, opset, ir_version)
        table = lookup.np_dtype(self._table_type(weight)).itemsize * layout.groups * k
        return packing.stored_bytes(weight.size) + table

    def _table_type(self, weight: WeightRef) -> int:
        return lookup.table_dtype(weight.dtype, _CODEBOOK_TYPES[self.config["codebook_dtype"]])

    # -- fitting ---------------------------------------------------------------------------

    def _fitted(self, chosen: list[tuple[WeightRef, Layout]]) -> Iterator[tuple[Job, Fit]]:
        """Fits in order, two at a time. Weights are read here, on the calling thread, because
        replacing a weight edits the protobuf lists that reading walks."""
        pending: deque[tuple[Job, Future]] = deque()
        with ThreadPoolExecutor(_WORKERS) as pool:
            for weight, layout in chosen:
                job = self._job(weight, layout)
                pending.append((job, pool.submit(self._fit, job)))
                if len(pending) >= _IN_FLIGHT:
                    done, future = pending.popleft()
                    yield done, future.result()
            while pending:
                done, future = pending.popleft()
                yield done, future.result()

    def _job(self, weight: WeightRef, layout: Layout) -> Job:
        array = np.asarray(weight.read())
        work_type = np.float64 if array.dtype == np.float64 else np.float32
        array = array.astype(work_type)
        outliers = _largest(array, self.config["outliers"])
        clipped = array if outliers is None else _clip_to_bulk(array, outliers)
        mask = None
        if outliers is not None:
            flat_mask = np.zeros(array.size, dtype=bool)
            flat_mask[outliers.positions] = True
            mask = layout.split(flat_mask)
        return Job(weight, layout, layout.split(clipped), layout.split(array), outliers, mask)

    def _fit(self, job: Job) -> Fit:
        found, extra = self.fit_groups(job.values)
        codebook, labels = self.final_codebook(found)
        rebuilt = np.take_along_axis(self._stored_values(job.weight, codebook), labels.astype(np.intp), axis=1)
        if job.outlier_mask is not None:
            rebuilt = np.where(job.outlier_mask, job.original, rebuilt)
        return Fit(codebook, labels, _sqnr_db(job.original, rebuilt), extra)

    def final_codebook(self, found: binning.Binning) -> tuple[np.ndarray, np.ndarray]:
        """The codebook to store: unused entries dropped, so indices pack into fewer bits."""
        return lookup.compact(found.codebook, found.labels)

    def _stored_values(self, weight: WeightRef, codebook: np.ndarray) -> np.ndarray:
        return lookup.stored_table(codebook, weight.dtype, self._table_type(weight)).astype(np.float64)

    # -- rewriting -------------------------------------------------------------------------

    def _replace(self, ctx: PassContext, job: Job, fit: Fit) -> dict[str, Any]:
        weight, model = job.weight, ctx.model
        r = Replacement(weight)
        out, how = self.emit(r, job, fit, scope_opset(weight, model), model.proto.ir_version)
        if job.outliers is not None:
            out = lookup.emit_outliers(r, out, job.outliers, weight.shape)
        weight.replace_with(r, result=out)
        cost = lookup.cost_of(r, how)
        return {
            "name": weight.name,
            "shape": list(weight.shape),
            "granularity": job.layout.granularity,
            "group_size": job.layout.group_size,
            "groups": job.layout.groups,
            "k": int(fit.codebook.shape[1]),
            "sqnr_db": _finite_or_none(fit.sqnr_db),
            "outliers": 0 if job.outliers is None else int(job.outliers.positions.size),
            **cost.to_dict(),
            **fit.extra,
        }

    def emit(self, r: Replacement, job: Job, fit: Fit, opset: int, ir_version: int) -> tuple[str, str]:
        """Nodes rebuilding the weight; returns (output name, how the indices are stored)."""
        out = lookup.emit_lookup(r, fit.codebook, fit.labels, job.layout, stored_dtype=self._table_type(job.weight),
                                 opset=opset, ir_version=ir_version)
        return out, lookup.choose_packing(fit.codebook.shape[1], opset, ir_version).name

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


def _finite_or_none(value: float) -> float | None:
    """Report figures stay strict JSON: an exact reconstruction (infinite SQNR) reads null."""
    return round(value, 2) if math.isfinite(value) else None


def _sqnr_db(reference: np.ndarray, rebuilt: np.ndarray) -> float:
    reference = reference.astype(np.float64)
    noise = float(np.sum((reference - rebuilt) ** 2))
    signal = float(np.sum(reference**2))
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


# ---------------------------------------------------------------------------------------------
# The passes
# ---------------------------------------------------------------------------------------------

_BITS = Option("bits", int, 4, "index bits: 2**bits codebook entries per group", low=1, high=8)


def _entries(config: dict[str, Any]) -> int:
    return config.get("k") or 2 ** config["bits"]


@register
class KMeansPass(BinningPass):
    name = "kmeans"
    summary = "k-means codebook per tensor, channel or group (near-exact 1-D k-means)"
    method_options = (
        _BITS,
        Option("k", int, 0, "codebook entries per group (overrides bits; 0: 2**bits)", low=0, high=65536),
    )

    def fit_groups(self, values):
        return binning.kmeans(values, _entries(self.config)), {}


@register
class UniformPass(BinningPass):
    name = "uniform"
    summary = "evenly spaced codebook per tensor, channel or group; may lower to DequantizeLinear"
    method_options = (
        _BITS,
        Option("symmetric", bool, False, "a grid symmetric around zero"),
        Option("lower", str, "lookup", "lookup: GatherElements table; dequantize: DequantizeLinear "
               "(UINT4 blocked at opset >= 21, which onnxruntime fuses into MatMulNBits)",
               choices=("lookup", "dequantize")),
    )

    def fit_groups(self, values):
        found = binning.uniform(values, 2 ** self.config["bits"], symmetric=self.config["symmetric"])
        if self.config["lower"] == "dequantize":
            found = integer_zero_point(found, values)
        return found, {}

    def predicted_bytes(self, weight, layout, opset, ir_version):
        if self.config["lower"] == "dequantize" and lookup.dequantize_supported(layout, opset):
            top_level = np.array([2 ** self.config["bits"] - 1])
            bits = 4 if lookup.dequantize_packing(top_level, opset, ir_version) == "uint4" else 8
            return (weight.size * bits + 7) // 8 + layout.groups * (4 + 1)  # q, scale, zero point
        return super().predicted_bytes(weight, layout, opset, ir_version)

    def final_codebook(self, found):
        if self.config["lower"] == "dequantize":
            return found.codebook, found.labels  # evenly spaced levels are what DequantizeLinear needs
        return super().final_codebook(found)

    def emit(self, r, job, fit, opset, ir_version):
        affine = affine_form(fit.codebook, fit.labels) if self.config["lower"] == "dequantize" else None
        if affine is None or not lookup.dequantize_supported(job.layout, opset):
            return super().emit(r, job, fit, opset, ir_version)  # e.g. blocked scales before opset 21
        quantized, scale, zero_point = affine
        out = lookup.emit_dequantize(r, quantized, scale, zero_point, job.layout, opset=opset, ir_version=ir_version)
        return out, "dequantize/" + lookup.dequantize_packing(quantized, opset, ir_version)

    def _notes(self, tensors):
        notes = super()._notes(tensors)
        lookups = [t["name"] for t in tensors if not t["packing"].startswith("dequantize")]
        if self.config["lower"] == "dequantize" and lookups:
            notes.append(f"{len(lookups)} tensors stay lookups: DequantizeLinear needs opset 13 for "
                         "per-channel and opset 21 for per-group scales")
        return notes


def integer_zero_point(found: binning.Binning, values: np.ndarray) -> binning.Binning:
    """The uniform grid moved so that zero is one of its levels, as DequantizeLinear's integer
    zero point requires: the range is widened to include 0 and the levels shift by less than
    half a step (standard asymmetric quantization; symmetric grids get zero_point = k/2)."""
    k = found.codebook.shape[1]
    low = np.minimum(found.codebook[:, 0], 0.0)
    high = np.maximum(found.codebook[:, -1], 0.0)
    scale = np.where(high > low, (high - low) / max(k - 1, 1), 1.0)
    zero_point = np.clip(np.rint(-low / scale), 0, k - 1)
    codebook = (np.arange(k) - zero_point[:, None]) * scale[:, None]
    labels = np.clip(np.rint(values / scale[:, None]) + zero_point[:, None], 0, k - 1)
    return binning.Binning(codebook, labels.astype(found.labels.dtype))


def affine_form(codebook: np.ndarray, labels: np.ndarray):
    """(quantized, scale, zero_point) with codebook[g, j] == scale[g] * (j - zero_point[g]) when
    each row is evenly spaced and zero sits on one of its levels; else None (stays a lookup)."""
    k = codebook.shape[1]
    if k < 2:
        return None
    step = (codebook[:, -1] - codebook[:, 0]) / (k - 1)
    step = np.where(step > 0, step, 1.0)
    even = np.allclose(codebook, codebook[:, :1] + step[:, None] * np.arange(k), rtol=1e-6, atol=1e-12)
    zero = -codebook[:, 0] / step
    levels = 16 if k <= 16 else 256
    zero_point = np.rint(zero)
    if not even or not np.allclose(zero, zero_point, atol=1e-4) or zero_point.min() < 0 or zero_point.max() >= levels:
        return None
    return labels, step, zero_point.astype(np.int64)


@register
class AdaptivePass(BinningPass):
    name = "adaptive"
    summary = "codebook placed where the weights are dense (quantile-based) per tensor, channel or group"
    method_options = (_BITS,)

    def fit_groups(self, values):
        return binning.adaptive(values, 2 ** self.config["bits"]), {}


@register
class GMMPass(BinningPass):
    name = "gmm"
    summary = "Gaussian-mixture codebook whose overlapping components merge; reports those remaining"
    method_options = (
        Option("components", int, 16, "mixture components per group before merging", low=2, high=256),
        Option("merge_kl", float, 0.1, "merge components whose symmetric KL divergence is below this", low=0.0),
    )

    def codebook_entries(self):
        return self.config["components"]

    def fit_groups(self, values):
        found, remaining = binning.gmm(values, self.config["components"], merge_kl=self.config["merge_kl"])
        return found, {"components_remaining": int(remaining)}

    def _details(self, tensors):
        details = super()._details(tensors)
        details["components_remaining"] = max((t["components_remaining"] for t in tensors), default=None)
        return details


@register
class TernaryPass(BinningPass):
    name = "ternary"
    summary = "three values per group (-a, 0, +a), 1.6 bits per index"

    def codebook_entries(self):
        return 3

    def fit_groups(self, values):
        return binning.ternary(values), {}


@register
class BinaryPass(BinningPass):
    name = "binary"
    summary = "two values per group, 1 bit per index"

    def codebook_entries(self):
        return 2

    def fit_groups(self, values):
        return binning.binary(values), {}
