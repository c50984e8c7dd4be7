"""auto: the smallest model that meets an error budget, measured in onnxruntime.

    graphpass run model.onnx --passes tie,auto,fold --min-cosine 0.999 --inputs calib.npz

auto needs the run's budget (--min-cosine, --atol, --rtol; a usage error without one: the
budget is the whole point, and a silent default would hide the most important choice) and
calibration inputs (--inputs, else the generated verification inputs). It spends the whole
budget against the model it receives, so it goes before any other lossy pass.

0. Held-out share (graphpass.holdout). A quarter of the calibration samples, picked by position
   along the batch axis, is held out: steps 2 and 3 fit on the rest, and a model passes only
   when the held-out samples meet the budget too, so that a choice tuned to the fitting samples
   does not pass unseen. A batch of one sample holds nothing out (the report says so).
1. Settings (graphpass.grid). A grid over codecs (passes implementing
   graphpass.codec.WeightCodec: kmeans and codebook by default), index bits and granularity.
   Per-channel and per-group codebooks, whose tables are a real share of the bytes there, are
   stored as bytes on a grid spanning each row (graphpass.lowering.tables), and from 6 bits also
   as float16, where 64 entries crowd that grid; a per-tensor table stays float32 and takes the
   densest k its index packing allows. With feedback=true every setting of a codec that has
   error feedback comes again with it, tried on MatMul, Gemm and Conv (group 1) weights with
   their inputs' second moment on the fitting share (for a Conv, of its unfolded inputs, as
   graphpass.feedback takes it). Codebook settings come again with hot_rows (an embedding's rows
   the fitting share reads twice corrected to exact), and embedding tables get two more rates
   (grid.TABLE_RUNGS). On an embedding table of at least 16 rows per column (and at most 1024
   columns), those table settings assign with error feedback through the outputs' sensitivity to
   the table's columns, measured on the fitting share (graphpass.table_sensitivity), whether or
   not feedback=true: on the BERT's word embedding it cut the error at the same bytes by a third
   or more.
2. Sensitivity (graphpass.sensitivity). Each candidate weight's settings are tried in order of
   expected bytes: planned (the codec's exact reconstruction and real bytes) and measured alone
   in the probe model on the calibration inputs. A weight stops at the first setting whose
   error is below a floor, 1/(4N) of the budget for N weights: more bytes could buy almost
   nothing there. Weights are measured on the run's workers (`--jobs`; one session each). A
   setting that learns from the fitting share (error feedback) is measured on the held-out share
   too and counts the worse: on its own samples its error looks smaller than it is.
   With aware=true, k-means weights each value's squared error by the energy of the
   activation channel it multiplies (MatMul and Gemm weights of the main graph;
   graphpass.activations).
   Above PREDICT_ABOVE_BYTES of weights (predict=auto), where a model run takes seconds and a
   fit over millions of values as long, a large weight's settings are fitted on a sample of its
   output channels instead; the one of median proxy error is measured with those channels in
   place, scaled to the whole weight, and the others' errors are predicted from it
   (graphpass.sampling; the report marks them). The whole weight is fitted for a setting only
   when an allocation chooses it, and then measured: a prediction only guides the choice, and
   when the chosen errors, measured, no longer fit the target, the allocation is made again.
3. Allocation. Each weight's measured settings and "kept as is" (bytes, error) are reduced to
   their Pareto front; one point per weight is chosen for the fewest bytes whose predicted error
   (the sum over weights: errors of independent weights add in these units) fits a target, by
   an exact knapsack over error steps (no greedy overshoot when one weight's steps are coarse).
4. Check. The model with the chosen plans is built and verified with graphpass.verify at both
   optimisation levels (above 256 MiB without constant folding, as the run verifies), against
   the budget less HEADROOM (later passes may reorder float operations), on the fitting share
   and on the held-out share of the calibration inputs. A failure shrinks the target by the
   measured/predicted ratio (always by at least one upgrade); a pass with room to spare grows
   it, to find a smaller model. The smallest model that passed is kept. When none passes within
   MAX_ROUNDS builds, or when no weight can be compressed within the budget at all, auto stops
   with BudgetError (exit 1).

Weights in model-local functions, and in subgraphs under names defined more than once, are
left alone (the probe cannot feed them; see graphpass.sensitivity).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx

from graphpass import verify as verification
from graphpass.activations import (
    conv_input_covariance, gathered_row_counts, input_channel_energy, input_covariance, row_subset,
)
from graphpass.codec import WEIGHT_FILTER_OPTIONS, Plan, WeightFilter
from graphpass.edit import Model
from graphpass.errors import BudgetError, UsageError
from graphpass.feedback import (
    FeedbackStatistics, InputHessians, RowCounts, input_axis, input_energy_weight, relative_energy,
)
from graphpass.grid import Setting, candidate_settings, uses_feedback
from graphpass.holdout import Split, split_inputs
from graphpass.inputs import synthesize_inputs
from graphpass.lowering.choose import NON_AFFINE_NOTE
from graphpass.manager import Option, Pass, PassContext, PassResult, register
from graphpass.parallel import stop_point
from graphpass.passes.auto.builds import (
    HEADROOM, Builder, Check, Round, keep_only_the_smallest_model, next_target, smallest,
)
from graphpass.passes.auto.fronts import (
    ALLOCATION_STEPS, EXACT, KEPT, Point, Study, allocate, pareto_front, predicted_units,
)
from graphpass.passes.auto.messages import details, impossible, not_converged, why_kept
from graphpass.sampling import ChannelSample, channel_sample, proxy_error
from graphpass.scopes import all_value_and_node_names
from graphpass.sensitivity import ErrorMeter, Measurement, Probe, hoist_reason
from graphpass.table_sensitivity import table_sensitivity, wants_sensitivity
from graphpass.weights import WeightRef

# A weight whose error alone is below this share of the budget, divided by the number of
# weights, needs no more bytes: together such weights use at most a quarter of the budget.
FLOOR_SHARE = 0.25
MAX_ROUNDS = 6  # models built and verified
MAX_STEPS = 4 * MAX_ROUNDS  # targets tried, counting allocations recalled from an earlier build
# Above this many bytes of candidate weights, large weights' settings are predicted, not each
# measured (graphpass.sampling): on the 1.1 B decoder one model run takes 2 s, and ~3,000 of them
# after fits of up to 18 s each took hours. On a 78 M-parameter decoder (118 MiB of candidate
# weights) measuring each took auto 2,078 s and predicting 438 s, for an output 6 KB (0.01%)
# larger; the 3-layer BERT (65 MiB) measures each setting in about two minutes.
PREDICT_ABOVE_BYTES = 96 << 20


@dataclass
class Trial:
    """A setting tried on one weight: the values to measure and what storing them costs."""

    reconstruction: np.ndarray
    bytes: int
    plan: Plan | None  # None: planned on the rows calibration reads; the whole weight is planned if chosen


class SampleFit(NamedTuple):
    """A setting fitted on a weight's sample (graphpass.sampling)."""

    setting: Setting
    rebuilt: np.ndarray  # the sample's reconstruction
    proxy: float  # its proxy error
    seconds: float


@dataclass
class Calibration:
    """What every measurement shares: the probe, the reference outputs, and per-weight facts
    from the calibration inputs."""

    probe: Probe
    meter: ErrorMeter
    value_weights: dict[str, np.ndarray]  # activation energy per value, for aware k-means
    row_counts: dict[str, np.ndarray]  # how often the fitting inputs read each row of each embedding table
    floor: float  # error units below which a weight needs no more bytes
    # Second moments of MatMul, Gemm and (unfolded) Conv inputs, for feedback.
    hessians: dict[str, np.ndarray] = field(default_factory=dict)
    # The probe and meter on the held-out share, for settings that learn from the fitting one.
    unseen: tuple[Probe, ErrorMeter] | None = None
    # Embedding tables whose entry in `hessians` is their outputs' sensitivity (table_sensitivity):
    # their table settings take error feedback through it.
    sensed_tables: set[str] = field(default_factory=set)
    # Large weights' settings fitted on a sample and predicted from one measured (graphpass.sampling),
    # with the rows of every Gather-read table the fitting inputs read (tied ones included).
    predicting: bool = False
    read_rows: dict[str, np.ndarray] = field(default_factory=dict)
    # Where the whole weights' settings are planned: the run's model with the figures above as its
    # feedback statistics, so that a codec never captures the whole model's activations itself
    # (on the 1.1 B decoder two workers doing that at once for a table's feedback setting went
    # past 20 GB), and a plan learns from the fitting share only.
    planning: PassContext | None = None

    def measure(self, weight: WeightRef, values: np.ndarray, learnt: bool) -> Measurement:
        """The error of `weight` alone replaced by `values`, on the fitting share. A setting that
        `learnt` from that share (error feedback) is also measured on the held-out share and
        counts the worse: on the samples it fitted, its error looks smaller than it is (on the
        BERT, 24 sentences let feedback hide error in directions other sentences use)."""
        found = self.meter.measure(self.probe.run({weight.name: values}))
        if learnt and self.unseen is not None:
            probe, meter = self.unseen
            other = meter.measure(probe.run({weight.name: values}))
            found = other if other.units > found.units else found
        return found

    def release_probes(self) -> None:
        """Let the probes' sessions and weights go until the next measurement: a build, and what
        follows the search (fold, the run's verification), need the memory more. On the 1.1 B
        float32 decoder RSS was 6.4 GB before the build with them held, about 1 GB once they were
        let go after the search; on the float16 one, releasing them for the build took the run's
        peak from 10.99 to 8.69 GB."""
        self.probe.release()
        if self.unseen is not None:
            self.unseen[0].release()

    def rows(self, weight: WeightRef) -> np.ndarray | None:
        """The rows of an embedding table that the fitting inputs read (None: not a table)."""
        counts = self.row_counts.get(weight.name)
        return None if counts is None else np.flatnonzero(counts)

    def fit_inputs(self, setting: Setting, weight: WeightRef,
                   ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """(value weight, Hessian, row counts) a setting's plan gets, all from the fitting share: a
        feedback setting weighs its fit by the Hessian's diagonal, as the codec would on its own
        inputs."""
        value_weight, hessian = self.value_weights.get(weight.name), self.hessians.get(weight.name)
        if value_weight is None and hessian is not None and uses_feedback(setting):
            value_weight = input_energy_weight(hessian, weight)
        return value_weight, hessian, self.row_counts.get(weight.name)


@register
class AutoPass(Pass):
    name = "auto"
    summary = "the smallest codec setting per weight that keeps the outputs within the run's budget (needs a budget)"
    lossless = False
    options = (
        Option("methods", str, "", "|-separated codecs to choose from (kmeans, codebook, uniform, ...); "
               "empty: kmeans|codebook (under --objective memory: uniform on the kernels' bits and blocks)"),
        Option("bits", str, "2|3|4|5|6|8", "|-separated index bits per weight to try"),
        Option("granularities", str, "tensor|channel|group", "|-separated granularities to try (scalar codecs)"),
        Option("group_size", int, 128, "values per codebook with granularity group", low=2),
        Option("aware", bool, True, "weight k-means by the activation energy of each input channel "
               "(MatMul and Gemm weights, measured on the calibration inputs)"),
        Option("feedback", bool, False, "also try every setting of codecs that have it with error feedback "
               "(GPTQ/GPTVQ, graphpass.feedback; GPTQ on the kernels' blocks under --objective memory) on MatMul, "
               "Gemm and Conv (group 1) weights, the inputs' second moment taken on "
               "the fitting share of the calibration inputs; on the BERT (24 fitting sentences) it took 3 times "
               "as long for 0.4% fewer bytes and a worse test sentence, so it is off by default; on magika "
               "(its Conv at 6 bits) it kept 99.5% top-1 agreement at 24.0% of the file, against 98.8% at 25.0% "
               "without (docs/measurements.md)"),
        Option("predict", str, "auto", "fit a large weight's settings on a sample of its channels, measure one "
               "with those channels in place and predict the others from it (graphpass.sampling); auto: when "
               "the weights pass 96 MiB, where measuring each setting takes half an hour and more",
               choices=("auto", "always", "never")),
        Option("gptq", bool, False, "the same as feedback=true (its earlier name, for the memory objective's kernels)"),
        *WEIGHT_FILTER_OPTIONS,
    )

    def requires(self, ctx: PassContext) -> None:
        budget = ctx.budget
        if budget is None or (budget.min_cosine is None and not budget.has_elementwise):
            raise UsageError("auto needs an error budget: give --min-cosine (e.g. 0.999) and/or --atol/--rtol")
        # A bad `methods` is a usage error before any work.
        if not candidate_settings(self.config, ctx.model, ctx.deployment):
            raise UsageError("auto: no setting to try; check methods, bits and granularities")

    def call(self, ctx: PassContext) -> PassResult:
        started = time.perf_counter()
        result = PassResult()
        inputs = ctx.calibration_inputs or synthesize_inputs(ctx.model.proto)
        split = split_inputs(ctx.model.proto, inputs)
        outputs = verification.budget_output_names(ctx.model.proto, ctx.budget_outputs)
        weights = self._candidates(ctx, result)
        calibration = self._calibrate(ctx, weights, split, outputs) if weights else None
        studies = self._measure(ctx, weights, calibration) if weights else []
        if not any(not p.kept for s in studies for p in s.points):
            reasons = Counter(reason for s in studies for _, reason in s.unplanned)
            why = f" (most often: {reasons.most_common(1)[0][0]})" if reasons else ""
            result.notes.append(f"no weight could be compressed{why}: nothing changed")
            return result
        measured_at = time.perf_counter()
        best, rounds = self._search(ctx, studies, split, outputs, calibration)
        calibration.release_probes()
        self._commit(ctx, best.proto)
        picks = [s.front[i] for s, i in zip(studies, best.chosen)]
        result.changed = True
        result.tensors_changed = sum(1 for point in picks if not point.kept)
        for study, point in zip(studies, picks):
            if point.kept:
                result.skip(study.weight.name, why_kept(study))
        lookups = [s.weight.name for s, p in zip(studies, picks) if not p.kept and "lowering" not in p.plan.details]
        if ctx.deployment.objective == "memory" and lookups:
            shown = ", ".join(lookups[:3]) + (", ..." if len(lookups) > 3 else "")
            result.notes.append(f"auto: {len(lookups)} weights stay lookups: {NON_AFFINE_NOTE} ({shown})")
        if split.note:
            result.notes.append(f"auto: {split.note}")
        result.details = details(ctx.budget, outputs, split, studies, best, rounds,
                                  {"measure": measured_at - started, "search": time.perf_counter() - measured_at})
        return result

    # -- candidates and measurements ----------------------------------------------------------

    def _candidates(self, ctx: PassContext, result: PassResult) -> list[WeightRef]:
        weight_filter = WeightFilter.from_config(self.config)
        chosen = []
        for weight in ctx.model.weights():
            reason = weight_filter.reason_to_skip(weight) or hoist_reason(ctx.model, weight)
            if reason:
                result.skip(weight.name, reason)
            else:
                chosen.append(weight)
        return chosen

    def _calibrate(self, ctx: PassContext, weights: list[WeightRef], split: Split, outputs: list[str]) -> Calibration:
        inputs = split.fitting
        probe = Probe(ctx.model, weights, inputs, outputs)
        needs_hessians = self.config["gptq"] or self.config["feedback"]
        hessians = {}
        if needs_hessians:
            hessians = {**input_covariance(ctx.model, weights, inputs),
                        **conv_input_covariance(ctx.model, weights, inputs)}
        meter = self._meter(ctx, probe)
        row_counts = gathered_row_counts(ctx.model, weights, inputs)
        tables = self._table_hessians(ctx, weights, probe, meter, row_counts)
        hessians.update(tables)
        unseen = None
        if (needs_hessians or tables) and split.held_out is not None:
            held_out_probe = Probe(ctx.model, weights, split.held_out, outputs)
            unseen = held_out_probe, self._meter(ctx, held_out_probe)
        return Calibration(probe, meter, self._value_weights(ctx, weights, inputs), row_counts,
                           FLOOR_SHARE / len(weights), hessians, unseen, set(tables),
                           *self._sampling(ctx, weights, inputs),
                           planning=_planning_context(ctx, ctx.model, hessians, row_counts))

    def _sampling(self, ctx: PassContext, weights: list[WeightRef], inputs) -> tuple[bool, dict[str, np.ndarray]]:
        """(predicting, the rows of each Gather-read table the fitting inputs read)."""
        if not self._predicts(weights):
            return False, {}
        counts = gathered_row_counts(ctx.model, weights, inputs, also_read_otherwise=True)
        return True, {name: np.flatnonzero(c) for name, c in counts.items()}

    def _predicts(self, weights: list[WeightRef]) -> bool:
        if self.config["predict"] == "auto":
            return sum(w.nbytes for w in weights) > PREDICT_ABOVE_BYTES
        return self.config["predict"] == "always"

    def _table_hessians(self, ctx: PassContext, weights: list[WeightRef], probe: Probe, meter: ErrorMeter,
                        row_counts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """G (graphpass.table_sensitivity) of each embedding table worth measuring, when the grid
        has table settings that can use it: those settings then feed back through it."""
        settings = candidate_settings(self.config, ctx.model, ctx.deployment)
        if not any(s.for_tables and s.with_feedback() for s in settings):
            return {}
        tables = [w for w in weights if w.name in row_counts and row_counts[w.name].any() and wants_sensitivity(w)]
        found = {}
        with ctx.progress("auto: measuring embedding tables' sensitivity", len(tables)) as advance:
            for table in tables:
                found[table.name] = table_sensitivity(probe, table, np.flatnonzero(row_counts[table.name]),
                                                      ctx.budget.min_cosine is not None, meter.batch_axes,
                                                      ctx.workers)
                advance(1)
        return found

    @staticmethod
    def _meter(ctx: PassContext, probe: Probe) -> ErrorMeter:
        """Errors against the probe's outputs with the original weights."""
        return ErrorMeter(probe.run(), ctx.budget, verification.declared_batch_axes(ctx.model.proto))

    def _value_weights(self, ctx: PassContext, weights: list[WeightRef], inputs) -> dict[str, np.ndarray]:
        if not self.config["aware"]:
            return {}
        energy = input_channel_energy(ctx.model, weights, inputs)
        return {name: relative_energy(e) for name, e in energy.items()}

    def _measure(self, ctx: PassContext, weights: list[WeightRef], calibration: Calibration) -> list[Study]:
        settings = candidate_settings(self.config, ctx.model, ctx.deployment)
        studies = [Study(w) for w in weights]
        lock = threading.Lock()
        with ctx.progress("auto: measuring each weight's settings", len(weights) * len(settings)) as advance:
            def locked_advance(n: int) -> None:  # the workers report progress
                with lock:
                    advance(n)

            # Largest first, so that the workers finish together. Each study fills in its own
            # points, whichever worker runs it: the result does not depend on their number. All
            # are submitted at once (they return nothing to hold): with the map's usual window,
            # one long study (the decoder's embedding) left the other worker idle behind it.
            order = sorted(studies, key=lambda s: -s.weight.nbytes)
            for _ in ctx.workers.map(lambda study: self._study(ctx, study, settings, calibration, locked_advance),
                                     order, ahead=len(order)):
                pass
        return studies

    def _study(self, ctx, study: Study, settings: list[Setting], calibration: Calibration, advance) -> None:
        weight = study.weight
        study.points.append(Point(KEPT, weight.nbytes, None))
        if weight.name in calibration.sensed_tables:  # table settings feed back through its G instead
            settings = [(s.with_feedback() or s) if s.for_tables else s for s in settings]
        # At equal bytes feedback first: where it applies it is the likelier to reach the floor.
        ordered = sorted(settings, key=lambda s: (s.expected_bytes(weight, ctx.model), not uses_feedback(s), s.label))
        sample = None
        if calibration.predicting:
            sample = channel_sample(ctx.model, weight, calibration.read_rows.get(weight.name))
        if sample is None:
            self._measure_each(ctx, study, ordered, calibration, advance)
        else:
            self._predict_from_sample(ctx, study, ordered, calibration, sample, advance)
        _refresh_front(study)  # plans off the front are never chosen: their labels go now

    def _measure_each(self, ctx, study: Study, ordered: list[Setting], calibration: Calibration, advance) -> None:
        """Settings from cheapest to dearest, each measured alone, until one is below the floor."""
        seen = set()
        for done, setting in enumerate(ordered, 1):
            stop_point()
            advance(1)
            if setting.effective(study.weight) in seen:
                continue
            seen.add(setting.effective(study.weight))
            point = self._measured_point(ctx, study, setting, calibration)
            if point is not None and point.units <= calibration.floor:
                advance(len(ordered) - done)
                break

    def _measured_point(self, ctx, study: Study, setting: Setting, calibration: Calibration) -> Point | None:
        """`setting` planned and measured alone on the weight, added to the study (None: it does
        not apply, and the study says why)."""
        started = time.perf_counter()
        trial = self._trial(ctx, setting, study.weight, calibration)
        if isinstance(trial, str):
            study.unplanned.append((setting.label, trial))
            return None
        measured = calibration.measure(study.weight, trial.reconstruction, uses_feedback(setting))
        # Measured: from here on a plan only needs its emitter, not a weight-sized copy.
        plan = None if trial.plan is None else dataclasses.replace(trial.plan, reconstruction=_MEASURED)
        point = Point(setting.label, trial.bytes, measured, plan, time.perf_counter() - started, setting)
        study.points.append(point)
        return point

    def _predict_from_sample(self, ctx, study: Study, ordered: list[Setting], calibration: Calibration,
                             sample: ChannelSample, advance) -> None:
        """Every setting fitted on a sample of the weight's channels (graphpass.sampling). The one
        of median proxy error is measured with its sampled channels in place, scaled to the whole
        weight; the others' errors are predicted from it by their proxy errors. The whole weight
        is fitted for a setting only when an allocation chooses it (_fit_whole)."""
        weight, seen = study.weight, set()
        fits: list[SampleFit] = []
        for setting in ordered:
            stop_point()
            advance(1)
            if setting.effective(weight) in seen:
                continue
            seen.add(setting.effective(weight))
            started = time.perf_counter()
            fit = self._fit_sample(ctx, setting, weight, sample, calibration)
            if isinstance(fit, str):
                study.unplanned.append((setting.label, fit))
            else:
                fits.append(SampleFit(setting, *fit, time.perf_counter() - started))
        if not fits:  # none planned on the sample (one below a codec's min_size, say)
            study.unplanned.clear()
            self._measure_each(ctx, study, ordered, calibration, lambda n: None)
            return
        lossy = sorted((f for f in fits if f.proxy > 0), key=lambda f: f.proxy)
        anchor, anchor_proxy = EXACT, 1.0
        # The median first; one too faint to measure gives way to the lossiest.
        for index in sorted({len(lossy) // 2, len(lossy) - 1}) if lossy else ():
            fit = lossy[index]
            anchor = self._measure_sample(weight, sample, fit.rebuilt, uses_feedback(fit.setting), calibration)
            anchor_proxy = fit.proxy
            if anchor.units > 0:
                break
        for fit in fits:
            study.points.append(Point(fit.setting.label, fit.setting.expected_bytes(weight, ctx.model),
                                      anchor.scaled(fit.proxy / anchor_proxy), None, fit.seconds, fit.setting,
                                      predicted=True))

    @staticmethod
    def _measure_sample(weight: WeightRef, sample: ChannelSample, rebuilt: np.ndarray, learnt: bool,
                        calibration: Calibration) -> Measurement:
        """The whole weight's error, from each part of the sample measured in place and scaled."""
        whole, total = calibration.probe.originals[weight.name], None
        for part in sample.parts:
            found = calibration.measure(weight, sample.patched(whole, rebuilt, part), learnt).scaled(part.error_scale)
            total = found if total is None else total.plus(found)
        return total

    def _fit_sample(self, ctx, setting: Setting, weight: WeightRef, sample: ChannelSample,
                    calibration: Calibration) -> tuple[np.ndarray, float] | str:
        """The setting's reconstruction of the sample and its proxy error, or why it does not apply."""
        if uses_feedback(setting) and weight.name not in calibration.hessians:
            return "error feedback is tried on MatMul, Gemm and Conv (group 1) weights only"
        value_weight, hessian, row_counts = calibration.fit_inputs(setting, weight)
        row_counts = sample.row_counts(row_counts)
        name = sample.weight.name
        context = _planning_context(ctx, sample.model, {} if hessian is None else {name: hessian},
                                    {} if row_counts is None else {name: row_counts})
        plan = setting.plan(context, sample.weight, value_weight, hessian, row_counts)
        if isinstance(plan, str):
            return plan
        # A table's G (table_sensitivity) is not over a reader's inputs: its proxy is unweighted.
        hessian = None if weight.name in calibration.sensed_tables else calibration.hessians.get(weight.name)
        return plan.reconstruction, proxy_error(sample.original, plan.reconstruction, input_axis(sample.weight),
                                                calibration.value_weights.get(weight.name), hessian)

    def _trial(self, ctx, setting: Setting, weight: WeightRef, calibration: Calibration) -> Trial | str:
        if uses_feedback(setting) and weight.name not in calibration.hessians:
            # Elsewhere feedback would weight embedding rows by the calibration's own tokens.
            return "error feedback is tried on MatMul, Gemm and Conv (group 1) weights only"
        rows = calibration.rows(weight)
        if rows is not None and setting.row_local(weight):
            subset, rows_weight = row_subset(ctx.model, weight, rows)
            plan = setting.plan(PassContext(subset, deployment=ctx.deployment, workers=ctx.workers), rows_weight, None)
            if not isinstance(plan, str):  # else the whole weight decides (min_size, say)
                values = calibration.probe.originals[weight.name].copy()
                values[rows] = plan.reconstruction
                return Trial(values, setting.expected_bytes(weight, ctx.model), None)
        plan = setting.plan(calibration.planning, weight, *calibration.fit_inputs(setting, weight))
        if isinstance(plan, str):
            return plan
        return Trial(plan.reconstruction, plan.stored_bytes, plan)

    # -- allocation, builds and checks ----------------------------------------------------------

    def _search(self, ctx: PassContext, studies: list[Study], split: Split, outputs: list[str],
                calibration: Calibration) -> tuple[Round, list[Round]]:
        """Allocate, build, verify; move the target until the budget's edge is found. An
        allocation already built is not built again: its verdict only narrows the bracket."""
        fronts = [s.front for s in studies]
        rounds: list[Round] = []
        verdicts: dict[tuple[int, ...], Round] = {}
        passed_target, failed_target, target = 0.0, math.inf, HEADROOM
        with tempfile.TemporaryDirectory(prefix=".graphpass-auto-") as folder, \
                ctx.progress("auto: building and verifying", MAX_ROUNDS) as advance:
            builder = Builder(ctx.model.proto, outputs, split, ctx.budget, Path(folder))
            for _ in range(MAX_STEPS):
                chosen = self._allocate_fitted(ctx, studies, target, calibration)
                fronts = [s.front for s in studies]
                if all(s.front[i].kept for s, i in zip(studies, chosen)):
                    raise BudgetError(impossible(ctx.budget, studies))
                if tuple(chosen) not in verdicts:
                    if len(rounds) == MAX_ROUNDS:
                        break
                    calibration.release_probes()  # measured again only if the target moves
                    verdicts[tuple(chosen)] = self._try(builder, studies, chosen, target)
                    rounds.append(verdicts[tuple(chosen)])
                    keep_only_the_smallest_model(rounds)
                    advance(1)
                last = verdicts[tuple(chosen)]
                if last.passed:
                    passed_target = max(passed_target, target)
                else:
                    failed_target = min(failed_target, target)
                target = next_target(last, target, passed_target, failed_target, fronts)
                if target is None:
                    break
        passing = [r for r in rounds if r.passed]
        if not passing:
            raise BudgetError(not_converged(ctx.budget, rounds))
        return smallest(passing, rounds), rounds

    def _allocate_fitted(self, ctx, studies: list[Study], target: float, calibration: Calibration) -> list[int]:
        """The allocation for `target` once every chosen setting is planned whole and, where its
        error was predicted, measured whole. The loop ends: each setting is fitted and measured
        at most once."""
        while True:
            chosen = allocate([s.front for s in studies], target)
            if self._fit_whole(ctx, studies, chosen, calibration, target):
                return chosen

    def _fit_whole(self, ctx, studies: list[Study], chosen: list[int], calibration: Calibration,
                   target: float) -> bool:
        """Plan the whole weight, on the run's workers, for every chosen setting fitted on part of
        it (rows calibration reads, or a sample of channels), and measure the ones whose error was
        predicted (graphpass.sampling): a prediction only guides the choice. On the 1.1 B decoder
        a codebook shared by the rows of the rotary sine table, fitted on the 16 rows the inputs
        read, was predicted at 0.00003 of the budget; on a 22-layer config, fitted whole, it took
        0.6 of it.

        False when the allocation must be made again: a chosen setting cannot be planned whole
        (it leaves its weight's front), a front changed, or the chosen errors, measured, no
        longer fit `target`."""
        picks = [(study, study.front[index]) for study, index in zip(studies, chosen)]
        waiting = [(study, point) for study, point in picks if not point.kept and point.plan is None]

        def fit(item: tuple[Study, Point]) -> tuple[Plan | str, Measurement | None]:
            study, point = item
            plan = point.setting.plan(calibration.planning, study.weight,
                                      *calibration.fit_inputs(point.setting, study.weight))
            if isinstance(plan, str) or not point.predicted:
                return plan, None
            return plan, calibration.measure(study.weight, plan.reconstruction, uses_feedback(point.setting))

        fitted = True
        # On the 1.1 B decoder this took 17 minutes: it says how far it is.
        with ctx.progress("auto: fitting the chosen settings on whole weights", len(waiting)) as advance:
            for (study, point), (plan, measured) in zip(waiting, ctx.workers.map(fit, waiting)):
                advance(1)
                if isinstance(plan, str):
                    study.unplanned.append((point.label, plan))
                    study.points.remove(point)
                    fitted = False
                else:
                    point.plan, point.bytes = dataclasses.replace(plan, reconstruction=_MEASURED), plan.stored_bytes
                    if measured is not None:
                        point.measured, point.predicted = measured, False
                _refresh_front(study)
        # A front that changed moves the indices in `chosen`: allocate again (nothing is refitted).
        unmoved = all(index < len(study.front) and study.front[index] is point
                      for (study, point), index in zip(picks, chosen))
        return fitted and unmoved and sum(point.units for _, point in picks) <= target

    def _try(self, builder: Builder, studies: list[Study], chosen: list[int], target: float) -> Round:
        picks = [(s, s.front[i]) for s, i in zip(studies, chosen) if not s.front[i].kept]
        proto = builder.build(picks)
        fitting, held_out, file_bytes = builder.check(proto)
        predicted = predicted_units([s.front for s in studies], chosen)
        # Steered by the worse share: a model the held-out samples reject needs a tighter target.
        passed = fitting.passed and (held_out is None or held_out.passed)
        measured = max(fitting.units, held_out.units if held_out else 0.0)
        return Round(target, chosen, predicted, measured, passed, file_bytes, proto if passed else None,
                     fitting.figures, held_out)

    def _commit(self, ctx: PassContext, proto: onnx.ModelProto) -> None:
        """Make the verified model the context's model: the very bytes that were checked."""
        model = ctx.model
        model.proto.CopyFrom(proto)
        for name in all_value_and_node_names(model.proto):
            model.names.reserve(name)
        model.structure_edited()


def _refresh_front(study: Study) -> None:
    """The study's front after a point changed; a plan off it is released (never chosen now)."""
    study.front = pareto_front(study.points)
    on_front = {id(point) for point in study.front}
    for point in study.points:
        if id(point) not in on_front:
            point.plan = None


def _planning_context(ctx: PassContext, model: Model, hessians: dict[str, np.ndarray],
                      row_counts: dict[str, np.ndarray]) -> PassContext:
    """A context to plan weights of `model` in, whose feedback statistics and row counts are the
    ones given (auto's, from the fitting share). `model` is the run's, or a sample's one-node
    model that could not run the calibration inputs at all."""
    context = PassContext(model, deployment=ctx.deployment, workers=ctx.workers)
    context.provide(InputHessians, FeedbackStatistics(hessians, row_counts))
    context.provide(RowCounts, row_counts)
    return context


# Stands in for a reconstruction once measured, so that waiting plans hold no weight-sized copy.
_MEASURED = np.empty(0, dtype=np.float32)


# What tests and callers reach through the pass's module.
__all__ = [
    "ALLOCATION_STEPS", "AutoPass", "Builder", "Calibration", "Check", "HEADROOM", "KEPT", "MAX_ROUNDS", "Point",
    "Round", "Study", "allocate", "next_target", "pareto_front", "predicted_units", "why_kept",
]
