"""codebook: vector quantization. Sub-vectors of `dim` weights share a codebook of k vectors.

Where scalar binning (`kmeans` and friends) gives each weight an index into a list of values,
`codebook` cuts a weight into sub-vectors of `dim` consecutive weights and gives each sub-vector
an index into a table of k vectors [k, dim], learnt by k-means in `dim` dimensions. Indices cost
log2(k)/dim bits per weight (k=256, dim=4: 2 bits), and because k-means places the vectors where
the weights' joint distribution is dense, the error at a given rate is lower than scalar k-means.

Which weights form a sub-vector. Sub-vectors run along the axes the reader sums over (its fan-in),
so that one sub-vector belongs to one output channel:

    MatMul B [.., in, out]        along `in`            (axis -2; strided in memory)
    MatMul A [.., out, in]        along `in`            (axis -1)
    Gemm B   [in, out] / transB   along `in`            (axis 0 / axis 1)
    Conv W   [out, in, kh, kw]    along in*kh*kw        (axes 1.. flattened, consecutive in memory)
    Gather   [vocab, d]           along `d`             (one embedding row is read as a whole)
    anything else                 along the last axis

Conv flattens [in, kh, kw] rather than taking `in` alone: depthwise [C, 1, k, k] and RGB stems
[C, 3, k, k] would otherwise be mostly padding, and the vectors are consecutive in memory.
When `dim` does not divide that length, each line is zero-padded to a multiple of `dim`, the
padded vectors are clustered like the others, and the lookup slices the padding off again (a
Slice). Leaving such weights untouched would skip every 3x3 stem and odd vocabulary row.

Options beyond the shape of the codebook:

- `share=shape|all`: one codebook for every selected tensor of the same shape, or for all of
  them (per dtype and per model-local function, which cannot see the graph). It is fitted once
  over all members' sub-vectors, stored once in the innermost scope enclosing them, and every
  member's Gather reads it: on deep models the table's cost per weight all but vanishes.
- `feedback=true`: MatMul, Gemm and Conv weights take their sub-vectors' entries in order along
  the inputs with GPTVQ's error feedback (`graphpass.feedback`), each stage greedily on the
  residual; the codebooks are fitted as without (weighted by the inputs' energy too), so the
  size does not change.
- `stages=2`: a second codebook over the residual (additive quantization, as in AQLM): the
  weight is the sum of two lookups, at twice the index rate.
- `hot_rows=n`: an embedding table's rows that the calibration inputs read at least n times (at
  most HOT_ROWS_MAX_SHARE of the table, most read first) are brought back to their exact values
  after the lookup, by a float16 difference per row (`lookup.emit_row_corrections`). A few tokens
  are in nearly every input; the rest of the table is coded as before. n=2 leaves out the rows
  read once, which stand for the many rows calibration never reads: on the 3-layer BERT's word
  embedding alone with 32 calibration sentences (bench/bench_embedding.py), 2 corrects 32 rows
  for 0.5% more bytes and takes the worst of 32 other sentences from cosine 0.9919 to 0.9973 at
  dim=2,k=256,scale=channel (0.9833 to 0.9902 at dim=2,k=64), and the calibration sentences' own
  figure stays as close to the unseen ones' as without it (n=1 corrects all 241 rows read and
  measures the calibration sentences at 1.0000, hiding the unseen rows' error).
- `scale=channel`: each output channel is divided by its RMS before clustering, so channels of
  different magnitude share codebook entries well, and multiplied back after the lookup (a Mul).
  A tensor whose sub-vectors cross its channel axis (or a 1-D one) gets one scale for the whole
  tensor, as every tensor does with `scale=tensor`, which costs one value per tensor and is what
  lets tensors of different magnitude share one codebook. The k-means is weighted by the squared
  scales, normalised to mean 1 per tensor: within a tensor it minimises the weights' own error,
  across a shared codebook every tensor counts by its size and relative error.

Which setting (bench/bench_codebook.py, 3-layer BERT, 17 M weights): at 2 bits per weight
dim=4,k=256 with share=shape,scale=channel; at 1 bit dim=4,k=16 with share=all,scale=channel,
codebook_dtype=float16; at 3.2 bits dim=2,k=64,scale=channel. Each beats kmeans at the same
rate on output cosine, largest output error and weight error. On small models, whose tensors
cannot carry a table each, share=all is what makes the rate.

Lowering, for a weight W with sub-vectors along axis a:

    Gather(codebook [k, dim], indices [outer, blocks, inner]) -> [outer, blocks, inner, dim]
    (+ Gather(second codebook, second indices))             stages=2
    Transpose to [outer, blocks, dim, inner]                  only when `inner` > 1
    Reshape -> (Slice off the padding ->) Reshape to W's shape
    Mul(scale [1.., C, ..1] or [1, .., 1])                    scale=channel or tensor

Indices are packed by `graphpass.lowering.lookup.emit_indices` (uint8/uint16, UINT4/UINT2 where the opset
has them, or several base-k digits per word), tables are stored in `codebook_dtype` and Cast to
the weight's type. Every stored name carries `lookup.LUT_ROLE_PREFIX`, so later runs leave them.

k-means: k-means++ seeding (or random rows, `init`) and Lloyd iterations on a sample of the
sub-vectors (`sample`), then one assignment of every sub-vector and a final centroid update over
all of them; deterministic for a given `seed`. Assignment is a brute-force distance matrix in
chunks on the run's workers (`--jobs`), or a k-d tree when k > 4096, where the matrix would be
too large.

This module holds the pass: which weights share a codebook, planning, applying and reporting.
The package's other modules hold the sub-vector geometry (`geometry`), k-means in `dim`
dimensions (`vector_kmeans`), prepared members and fitted stages (`stages`), the lowering to
lookups (`vector_lookup`) and the rows hot_rows corrects (`embedding_rows`).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Any

import numpy as np
from onnx import TensorProto, helper

from graphpass.lowering import lookup
from graphpass.lowering.choose import NON_AFFINE_NOTE
from graphpass.analysis import common_scope
from graphpass.codec import (
    CODEBOOK_DTYPE_OPTION, WEIGHT_FILTER_OPTIONS, Plan, WeightFilter, scope_opset, sqnr_db, sqnr_figure,
)
from graphpass.feedback import (
    NO_INPUTS, FeedbackStatistics, InputHessians, RowCounts, as_rows, feedback_note, from_rows, input_axis,
    shrink_for, vector_labels,
)
from graphpass.lowering.lookup import LUT_ROLE_PREFIX
from graphpass.manager import Option, Pass, PassContext, PassResult, register
from graphpass.parallel import Workers
from graphpass.passes.codebook.embedding_rows import HOT_ROWS_MAX_SHARE, corrects_rows, hot_rows
from graphpass.passes.codebook.geometry import VectorLayout, channel_scale_axis, fan_in_axes, vector_layout
from graphpass.passes.codebook.stages import Member, Stage, fit_stages, rebuild
from graphpass.passes.codebook.vector_kmeans import ONE_THREAD, KMeansSettings, kmeans_vectors, nearest
from graphpass.passes.codebook.vector_lookup import dry_run, emit_vector_lookup
from graphpass.weights import Replacement, WeightRef, stored_bytes


@register
class CodebookPass(Pass):
    name = "codebook"
    summary = "vector quantization: sub-vectors of dim weights share a k-vector codebook (Gather lookups)"
    lossless = False
    options = (
        Option("dim", int, 4, "weights per sub-vector, along the reader's input axis (2, 4 or 8 usual)",
               low=2, high=8),
        Option("k", int, 256, "codebook vectors: log2(k)/dim index bits per weight", low=2, high=65536),
        Option("share", str, "none", "one codebook per tensor, per shape, or for all selected tensors "
               "(stored once; its cost per weight vanishes on deep models)", choices=("none", "shape", "all")),
        Option("stages", int, 1, "2: a second codebook codes the first one's residual (twice the index bits)",
               low=1, high=2),
        Option("scale", str, "none", "channel: divide each output channel (tensor: each tensor) by its RMS "
               "before clustering, multiply it back after the lookup", choices=("none", "tensor", "channel")),
        Option("hot_rows", int, 0, "embedding tables: rows the calibration inputs read at least this many times "
               "(at most 1% of the table) are corrected to their exact values after the lookup; 0: off", low=0),
        Option("iterations", int, 20, "Lloyd iterations on the sample (stops early once converged)", low=1),
        Option("init", str, "auto", "seeding: k-means++, random rows, or auto (k-means++ up to k=1024)",
               choices=("auto", "kmeans++", "random")),
        Option("sample", int, 0, "sub-vectors Lloyd runs on before every one is assigned "
               "(0: max(65536, 16k))", low=0),
        Option("seed", int, 0, "seed for sampling and seeding: the same seed gives the same bytes", low=0),
        Option("feedback", bool, False, "error feedback (GPTVQ): sub-vectors of MatMul, Gemm and Conv weights take "
               "their entries in order along the inputs, each one's error pushed onto the next through the second moment "
               "of those inputs on the calibration inputs (the fit weighted by its diagonal); embedding tables "
               "weight each row by how often those read it"),
        *WEIGHT_FILTER_OPTIONS,
        CODEBOOK_DTYPE_OPTION,
    )

    # Sub-vectors can be assigned with error feedback (feedback=true).
    supports_hessian = True
    # hot_rows reads how often calibration reads each row of an embedding table.
    supports_row_counts = True

    # -- the WeightCodec protocol ------------------------------------------------------------

    def plan(self, ctx: PassContext, weight: WeightRef, hessian: np.ndarray | None = None,
             row_counts: np.ndarray | None = None) -> Plan | str:
        """This weight alone with its own codebook, whatever `share` says, or the reason it stays.
        With feedback=true, `hessian` (its inputs' second moment) replaces the run's own; with
        hot_rows, `row_counts` (how often calibration reads each row) do."""
        reason = self.reason_to_skip(ctx.model, weight)
        if reason is not None:
            return reason
        (plan,), _ = self.plan_group(ctx, [weight], {} if hessian is None else {weight.name: hessian},
                                     None if row_counts is None else {weight.name: row_counts})
        return plan

    def uses_feedback(self) -> bool:
        return self.config["feedback"]

    def expected_bytes(self, weight: WeightRef, model) -> int:
        return int(weight.size * math.log2(self.config["k"]) / self.config["dim"] / 8)

    def effect_key(self, weight: WeightRef) -> tuple:
        config = self.config if corrects_rows(weight) else {**self.config, "hot_rows": 0}
        return (self.name, tuple(sorted(config.items())))

    def row_local(self, weight: WeightRef) -> bool:
        return False  # one codebook serves every row

    def plan_group(self, ctx: PassContext, weights: list[WeightRef], hessians: dict[str, np.ndarray] | None = None,
                   row_counts: dict[str, np.ndarray] | None = None) -> tuple[list[Plan], dict[str, Any] | None]:
        """One codebook fitted over all `weights` and a plan per weight that reads it.

        With several weights the tables are stored here, once, in the innermost scope that
        encloses them all (returned: names, scope, bytes); a caller that drops the plans should
        then call `ctx.model.remove_unused_weights()`. A single weight's plan stores its own.
        With feedback=true, `hessians` (name -> second moment) add to the run's own; with hot_rows,
        `row_counts` (name -> reads per row) replace the run's own.
        """
        statistics = None
        if self.uses_feedback():
            found = ctx.analysis(InputHessians)
            statistics = FeedbackStatistics({**found.hessians, **(hessians or {})}, found.row_counts)
        if row_counts is None:
            row_counts = self._row_counts(ctx, weights)
        return self._plan_members(ctx, [self.prepare(w) for w in weights], statistics, row_counts)

    def _row_counts(self, ctx: PassContext, weights: list[WeightRef]) -> dict[str, np.ndarray]:
        """The run's own reads per row, measured only when hot_rows has a table to correct."""
        return ctx.analysis(RowCounts) if self.config["hot_rows"] and any(map(corrects_rows, weights)) else {}

    def _plan_members(self, ctx: PassContext, members: list[Member], statistics: FeedbackStatistics | None,
                      row_counts: dict[str, np.ndarray]) -> tuple[list[Plan], dict[str, Any] | None]:
        members = [self._calibrated(m, statistics) for m in members]
        stages = self.fit(members, ctx.workers)
        shared = self._store_shared(ctx, members, stages) if len(members) > 1 else None
        group_weights = sum(m.weight.size for m in members)
        plans, begin = [], 0
        for member in members:
            end = begin + member.layout.count
            labels = [s.labels[begin:end] for s in stages]
            hessian = None if statistics is None else statistics.hessians.get(member.weight.name)
            note = None
            if hessian is not None:
                labels, note = self._fed_back(member, stages, hessian)
            plans.append(self._plan(ctx, member, stages, labels, group_weights, row_counts.get(member.weight.name)))
            if statistics is not None:
                plans[-1].details["feedback"] = NO_INPUTS if hessian is None else note or "applied"
            begin = end
        return plans, shared

    def fit(self, members: list[Member], workers: Workers = ONE_THREAD) -> list[Stage]:
        return fit_stages(members, self._settings(), self.config["stages"], self._table_type(members[0].weight),
                          workers)

    # -- call ----------------------------------------------------------------------------

    def call(self, ctx: PassContext) -> PassResult:
        result = PassResult()
        model = ctx.model
        if model.opset < lookup.MIN_OPSET:
            result.notes.append(f"opset {model.opset} is below {lookup.MIN_OPSET}, which packed indices "
                                "need: nothing changed")
            return result
        groups = self._select(model, result)
        # Measured once, on the model as it comes: applying each plan would make it stale.
        statistics = ctx.analysis(InputHessians) if self.uses_feedback() else None
        tensors, tables = [], []
        with ctx.progress(f"{self.name}: fitting codebooks", sum(map(len, groups))) as advance:
            for group, (plans, shared) in zip(groups, self._planned_groups(ctx, groups, statistics)):
                for plan in plans:
                    plan.apply()
                    tensors.append(plan.details)
                tables += [shared] if shared else []
                advance(len(group))
        result.tensors_changed = len(tensors)
        result.changed = bool(tensors)
        result.details = self._details(tensors, tables)
        result.notes.extend(self._notes(tensors))
        if ctx.deployment.objective == "memory" and tensors:
            result.notes.append(f"{self.name}: {len(tensors)} weights: {NON_AFFINE_NOTE} (--objective memory)")
        return result

    def _planned_groups(self, ctx: PassContext, groups: list[list[WeightRef]], statistics: FeedbackStatistics | None):
        """Each group's plans and shared table, in order. Weights with codebooks of their own are
        fitted on the run's workers, one a task (read here, on the calling thread, as applying a
        plan edits the lists reading walks). A shared table is stored as soon as it is fitted, so
        shared groups go one at a time, each fit's assignment in chunks on the workers."""
        row_counts = self._row_counts(ctx, [w for group in groups for w in group])
        if self.config["share"] != "none":
            return (self._plan_members(ctx, [self.prepare(w) for w in group], statistics, row_counts)
                    for group in groups)
        members = ([self.prepare(weight)] for (weight,) in groups)
        return ctx.workers.map(lambda own: self._plan_members(ctx, own, statistics, row_counts), members)

    # -- selection -------------------------------------------------------------------------

    def reason_to_skip(self, model, weight: WeightRef, own_table: bool = True) -> str | None:
        """Why the weight stays; `own_table=False` leaves a shared table's cost to the group."""
        reason = WeightFilter.from_config(self.config).reason_to_skip(weight)
        if reason is not None:
            return reason
        opset = scope_opset(weight, model)
        if opset < lookup.MIN_OPSET:
            return f"its function imports opset {opset}, below the {lookup.MIN_OPSET} packed indices need"
        if weight.dtype == TensorProto.BFLOAT16 and self._needs_arithmetic():
            return "bfloat16 has no Add or Mul in onnxruntime's CPU kernels (use stages=1, scale=none)"
        layout = vector_layout(weight, self.config["dim"])
        predicted = self.predicted_bytes(weight, layout, opset, model.proto.ir_version, own_table)
        if predicted >= weight.nbytes:
            return f"a codebook lookup would not be smaller ({predicted} bytes for {weight.nbytes})"
        values = np.asarray(weight.read())
        if not np.isfinite(values).all():
            return "holds NaN or infinite values"
        if values.dtype == np.float64 and not _fits_float32(values):
            return "float64 values beyond float32's range, in which codebook's k-means computes"
        return None

    def predicted_bytes(self, weight: WeightRef, layout: VectorLayout, opset: int, ir_version: int,
                        own_table: bool) -> int:
        """Indices, scales and (unless shared) tables, before fitting: k as asked, or fewer
        when the weight has fewer sub-vectors."""
        k = min(self.config["k"], layout.count)
        index_bytes = lookup.choose_packing(k, opset, ir_version, count=layout.count).stored_bytes(layout.count)
        table_bytes = stored_bytes(self._table_type(weight), (k, layout.dim)) if own_table else 0
        scale_bytes = 0
        if self.config["scale"] != "none":
            axis = channel_scale_axis(weight, layout) if self.config["scale"] == "channel" else None
            scale_bytes = stored_bytes(self._table_type(weight), (1 if axis is None else weight.shape[axis],))
        return self.config["stages"] * (index_bytes + table_bytes) + scale_bytes

    def _select(self, model, result: PassResult) -> list[list[WeightRef]]:
        """The groups of weights that will share a codebook (one weight each with share=none)."""
        own_table = self.config["share"] == "none"
        chosen = []
        for weight in model.weights():
            reason = self.reason_to_skip(model, weight, own_table)
            if reason:
                result.skip(weight.name, reason)
            else:
                chosen.append(weight)
        groups = []
        for group in self._groups(chosen):
            reason = self._group_reason_to_skip(model, group)
            for weight in group if reason else []:
                result.skip(weight.name, reason)
            if not reason:
                groups.append(group)
        return groups

    def _groups(self, chosen: list[WeightRef]) -> list[list[WeightRef]]:
        """Weights that share one codebook: per share scope, dtype and root scope (a function
        body cannot read a table stored outside it)."""
        if self.config["share"] == "none":
            return [[w] for w in chosen]
        groups: dict[tuple, list[WeightRef]] = defaultdict(list)
        for weight in chosen:
            root = list(weight.scope.ancestors())[-1]
            shape = weight.shape if self.config["share"] == "shape" else None
            groups[(id(root), weight.dtype, shape)].append(weight)
        return list(groups.values())

    def _group_reason_to_skip(self, model, group: list[WeightRef]) -> str | None:
        """Whether the group's lookups, with its table stored once, are smaller than its weights."""
        if self.config["share"] == "none":
            return None  # checked per weight, table included
        layouts = [vector_layout(w, self.config["dim"]) for w in group]
        alone = len(group) == 1
        predicted = sum(self.predicted_bytes(w, layout, scope_opset(w, model), model.proto.ir_version, alone)
                        for w, layout in zip(group, layouts))
        if not alone:
            k = min(self.config["k"], sum(layout.count for layout in layouts))
            predicted += self.config["stages"] * stored_bytes(self._table_type(group[0]), (k, self.config["dim"]))
        before = sum(w.nbytes for w in group)
        if predicted < before:
            return None
        return f"a codebook shared by {len(group)} tensor(s) would not be smaller ({predicted} bytes for {before})"

    # -- preparing and planning --------------------------------------------------------------

    def prepare(self, weight: WeightRef) -> Member:
        layout = vector_layout(weight, self.config["dim"])
        original = np.asarray(weight.read())
        values = original.astype(np.float64)
        if self.config["scale"] == "none":
            return Member(weight, layout, original, None, None, None, layout.split(values).astype(np.float32), None)
        axis = channel_scale_axis(weight, layout) if self.config["scale"] == "channel" else None
        rms = _rms(values, axis)
        entries = _storable(rms, lookup.np_dtype(self._table_type(weight, rms)))
        scale = entries.astype(original.dtype)
        normalised = values / scale.astype(np.float64)
        # Squared scales weight the k-means by each sub-vector's error in the weight itself;
        # their mean is 1 per tensor, so in a shared codebook every tensor counts by its size
        # and its relative error, however small its values.
        squares = scale.astype(np.float64) ** 2
        importance = layout.split(np.broadcast_to(squares / squares.mean(), values.shape))[:, 0]
        return Member(weight, layout, original, axis, entries, scale,
                      layout.split(normalised).astype(np.float32), importance)

    def _calibrated(self, member: Member, statistics: FeedbackStatistics | None) -> Member:
        """The member with each sub-vector's k-means weight times its calibration importance: the
        mean energy of the inputs it multiplies (MatMul/Gemm/Conv), or its row's use (embeddings)."""
        if statistics is None:
            return member
        per_value = statistics.value_weight(member.weight)
        if per_value is None:
            return member
        calibration = member.layout.split(np.broadcast_to(per_value, member.weight.shape)).mean(axis=1)
        importance = calibration if member.importance is None else member.importance * calibration
        return dataclasses.replace(member, importance=importance)

    def _fed_back(self, member: Member, stages: list[Stage], hessian: np.ndarray,
                  ) -> tuple[list[np.ndarray], str | None]:
        """Each stage's labels for the member chosen with error feedback (graphpass.feedback)."""
        weight, layout = member.weight, member.layout
        axis = input_axis(weight)
        scale = np.ones(weight.shape) if member.scale is None else np.broadcast_to(member.scale, weight.shape)
        per_row, note = vector_labels(as_rows(np.asarray(member.original, np.float64), axis),
                                      as_rows(scale.astype(np.float64), axis)[:, 0],
                                      [s.values.astype(np.float64) for s in stages], hessian,
                                      shrink_for(weight))
        labels = []
        for rows in per_row:  # [N, blocks] -> one label per value -> per sub-vector, in index order
            values = np.repeat(rows, layout.dim, axis=1)[:, : layout.length]
            labels.append(layout.split(from_rows(values, axis, weight.shape))[:, 0].astype(stages[0].labels.dtype))
        return labels, note

    def _plan(self, ctx: PassContext, member: Member, stages: list[Stage], labels: list[np.ndarray],
              group_weights: int, row_counts: np.ndarray | None) -> Plan:
        weight, model = member.weight, ctx.model
        opset, ir_version = scope_opset(weight, model), model.proto.ir_version
        reconstruction = rebuild(member, labels, stages)
        corrections = self._corrections(member, reconstruction, row_counts)
        # The emitter keeps tables, scales and labels in their narrowest type only: on an LLM,
        # auto holds a plan per weight and setting until it chooses.
        slim_member, slim_stages = member.for_emit(), [stage.for_emit() for stage in stages]
        slim_labels = [np.asarray(found, dtype=np.min_scalar_type(stage.k - 1)) for found, stage in zip(labels, stages)]

        def emit(r: Replacement) -> str:
            out = emit_vector_lookup(r, slim_member, slim_stages, slim_labels, opset, ir_version)
            return out if corrections is None else lookup.emit_row_corrections(r, out, corrections)

        if corrections is not None:
            reconstruction = corrections.corrected(reconstruction)
        cost = dry_run(weight, emit)
        packing = "+".join(lookup.choose_packing(s.k, opset, ir_version, count=member.layout.count).name
                           for s in stages)
        details = self._tensor_details(member, stages, labels, reconstruction, cost, packing)
        if corrections is not None:
            details["corrected_rows"] = len(corrections.ids)
        shared_bytes = sum(s.entries.nbytes for s in stages if s.shared_name)
        details["shared_codebook_bits_per_weight"] = round(8.0 * shared_bytes / group_weights, 3)
        return Plan(weight, reconstruction, cost.total_bytes, emit, details)

    def _corrections(self, member: Member, rebuilt: np.ndarray, row_counts: np.ndarray | None,
                     ) -> lookup.RowCorrections | None:
        """hot_rows' corrections for an embedding table: its most read rows back to exact."""
        if not self.config["hot_rows"] or row_counts is None or not corrects_rows(member.weight):
            return None
        ids = hot_rows(row_counts, self.config["hot_rows"])
        if ids.size == 0:
            return None
        stored = lookup.table_dtype(member.weight.dtype, TensorProto.FLOAT16)
        return lookup.RowCorrections.fitted(member.original, rebuilt, ids, stored)

    def _store_shared(self, ctx: PassContext, members: list[Member], stages: list[Stage]) -> dict[str, Any]:
        """Each stage's table stored once where every member can read it."""
        home = common_scope([m.weight.scope for m in members])
        shape = members[0].weight.shape
        base = "codebook.shared" + ("" if self.config["share"] == "all" else "." + "x".join(map(str, shape)))
        for number, stage in enumerate(stages, start=1):
            role = f"{LUT_ROLE_PREFIX}codebook" + ("" if number == 1 else f"_stage{number}")
            stage.shared_name = ctx.model.add_shared_tensor(home, f"{base}.{role}", stage.entries)
        return {
            "names": [s.shared_name for s in stages],
            "scope": home.path,
            "members": len(members),
            "k": [s.k for s in stages],
            "bytes": sum(s.entries.nbytes for s in stages),
            "weights": sum(m.weight.size for m in members),
        }

    # -- reporting ---------------------------------------------------------------------------

    def _tensor_details(self, member: Member, stages: list[Stage], labels: list[np.ndarray],
                        reconstruction: np.ndarray, cost: lookup.LookupCost, packing: str) -> dict[str, Any]:
        weight, layout = member.weight, member.layout
        scale_bytes = 0 if member.scale_entries is None else member.scale_entries.nbytes
        shared_bytes = sum(s.entries.nbytes for s in stages if s.shared_name)
        details = {
            "name": weight.name,
            "shape": list(weight.shape),
            "vector_axes": layout.axes,
            "padded_values": layout.padding * layout.outer * layout.inner,
            "dim": layout.dim,
            "k": [s.k for s in stages],
            "shared_codebooks": [s.shared_name for s in stages if s.shared_name],
            "scale": _scale_label(member),
            "weights": weight.size,
            "bytes_before": weight.nbytes,
            "bytes_after": cost.total_bytes,
            "index_bytes": cost.index_bytes,
            "codebook_bytes": cost.table_bytes - scale_bytes,  # this tensor's own tables
            "shared_codebook_bytes": shared_bytes,  # stored once for the group, not in bytes_after
            # (shared_codebook_bits_per_weight spreads it over the group's weights)
            "scale_bytes": scale_bytes,
            "other_bytes": cost.other_bytes,
            "packing": packing,
            "nominal_bits_per_weight": round(sum(math.log2(max(s.k, 2)) for s in stages) / layout.dim, 3),
            "index_bits_per_weight": round(8.0 * cost.index_bytes / weight.size, 3),
            "bits_per_weight": round(8.0 * cost.total_bytes / weight.size, 3),
            "sqnr_db": sqnr_figure(sqnr_db(member.original, reconstruction.astype(np.float64))),
        }
        if len(stages) > 1:
            first = rebuild(member, labels, stages, upto=1)
            details["sqnr_db_stage1"] = sqnr_figure(sqnr_db(member.original, first.astype(np.float64)))
        return details

    def _details(self, tensors: list[dict[str, Any]], tables: list[dict[str, Any]]) -> dict[str, Any]:
        """Overall figures: shared tables counted once, rates over every compressed weight."""
        c = self.config
        values = sum(t["weights"] for t in tensors)
        shared = sum(t["bytes"] for t in tables)
        after = shared + sum(t["bytes_after"] for t in tensors)

        def bits(nbytes: int) -> float | None:
            return round(8.0 * nbytes / values, 3) if values else None

        return {
            "method": self.name,
            **{key: c[key] for key in ("share", "dim", "k", "stages", "scale")},
            "bytes_before": sum(t["bytes_before"] for t in tensors),
            "bytes_after": after,
            "nominal_bits_per_weight": round(c["stages"] * math.log2(c["k"]) / c["dim"], 3),
            "bits_per_weight": bits(after),
            "index_bits_per_weight": bits(sum(t["index_bytes"] for t in tensors)),
            "codebook_bits_per_weight": bits(shared + sum(t["codebook_bytes"] for t in tensors)),
            "scale_bits_per_weight": bits(sum(t["scale_bytes"] for t in tensors)),
            "codebooks_stored": sum(len(t["names"]) for t in tables)
            + sum(len(t["k"]) - len(t["shared_codebooks"]) for t in tensors),
            "shared_codebooks": tables,
            "min_sqnr_db": min((t["sqnr_db"] for t in tensors if t["sqnr_db"] is not None), default=None),
            "tensors": tensors,
        }

    def _notes(self, tensors: list[dict[str, Any]]) -> list[str]:
        notes = feedback_note(self.name, tensors)
        if any(t["codebook_bytes"] > t["index_bytes"] for t in tensors):
            notes.append("some codebooks outweigh their indices (see details.tensors): share=shape or "
                         "share=all stores one codebook for many tensors")
        if self.config["scale"] == "channel" and any(t["scale"] == "tensor" for t in tensors):
            notes.append("some tensors have no output-channel axis the sub-vectors leave whole "
                         "(1-D, or the vectors cross it): they get one scale for the tensor")
        return notes

    # -- small helpers -------------------------------------------------------------------------

    def _settings(self) -> KMeansSettings:
        c = self.config
        return KMeansSettings(c["k"], c["iterations"], c["init"], c["sample"], c["seed"])

    def _table_type(self, weight: WeightRef, entries: np.ndarray | None = None) -> int:
        requested = helper.np_dtype_to_tensor_dtype(np.dtype(self.config["codebook_dtype"]))
        return lookup.table_dtype(weight.dtype, requested, entries)

    def _needs_arithmetic(self) -> bool:
        return self.config["stages"] > 1 or self.config["scale"] == "channel"


def _scale_label(member: Member) -> str | None:
    if member.scale is None:
        return None
    return "tensor" if member.scale_axis is None else f"channel axis {member.scale_axis}"


def _fits_float32(values: np.ndarray) -> bool:
    """The largest magnitude within float32's normal range, with room below it for the rest."""
    largest = float(np.abs(values).max(initial=0.0))
    return largest == 0.0 or 2.0**-100 <= largest <= float(np.finfo(np.float32).max)


def _storable(scale: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The scales in their stored type; one that type cannot hold (float16 overflows past 65504
    and flushes tiny values to 0) becomes 1, which leaves that channel unscaled but exact."""
    with np.errstate(over="ignore"):
        stored = scale.astype(dtype)
    return np.where(np.isfinite(stored) & (stored > 0), stored, np.ones((), dtype))


def _rms(values: np.ndarray, axis: int | None) -> np.ndarray:
    """Each output channel's RMS (the tensor's, without an axis), shaped to broadcast against
    the weight; 1 where all values are zero."""
    others = tuple(a for a in range(values.ndim) if a != axis)
    rms = np.sqrt(np.mean(values**2, axis=others, keepdims=True))
    return np.where(rms > 0, rms, 1.0)


__all__ = [
    "CodebookPass", "HOT_ROWS_MAX_SHARE", "KMeansSettings", "Member", "Stage", "VectorLayout", "channel_scale_axis",
    "corrects_rows", "dry_run", "emit_vector_lookup", "fan_in_axes", "fit_stages", "hot_rows", "kmeans_vectors",
    "nearest", "rebuild", "vector_layout",
]
