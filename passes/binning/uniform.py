"""uniform: an evenly spaced codebook per group, and the lowerings only an even grid allows.

As a lookup it is one more binning pass. Evenly spaced levels with zero on one of them are also
what DequantizeLinear computes (`lower=dequantize`), and what the compressed kernels read
(`lower=kernel`, or `lower=auto` under --objective memory: MatMulNBits and GatherBlockQuantized
through `graphpass.lowering.choose`), so this pass plans those too and falls back to the lookup,
with the reason, where no kernel reads a weight.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from onnx import TensorProto

from graphpass import binning
from graphpass.activations import input_channel_energy
from graphpass.codec import Plan, WeightFilter
from graphpass.feedback import InputHessians, relative_energy
from graphpass.lowering import lookup
from graphpass.lowering.choose import compressed_plan
from graphpass.manager import Option, PassContext, PassResult, register
from graphpass.passes.binning.engine import BITS_OPTION, BinningPass, Job
from graphpass.weights import WeightRef


@register
class UniformPass(BinningPass):
    name = "uniform"
    summary = "evenly spaced codebook per tensor, channel or group; may lower to DequantizeLinear"
    method_options = (
        BITS_OPTION,
        Option("symmetric", bool, False, "a grid symmetric around zero (lookups; kernels fit a zero point per block)"),
        Option("lower", str, "auto", "lookup: GatherElements table; dequantize: DequantizeLinear (UINT4 blocked "
               "at opset >= 21, which onnxruntime fuses into MatMulNBits; its default accuracy level moves outputs "
               "by about 1e-2); kernel: what the targets keep compressed in memory (MatMulNBits, "
               "GatherBlockQuantized; granularity=group, group_size the block, ranges fitted for the least "
               "activation-weighted error), a weight no kernel reads left as is with the reason; auto: lookup, "
               "or under --objective memory kernel with a lookup (and the reason) where no kernel reads the weight",
               choices=("auto", "lookup", "dequantize", "kernel")),
    )

    # Kernel plans weight each value's error by its activation energy, and with feedback use the
    # input second moment, when auto gives them.
    supports_value_weight = True
    options_after = (
        Option("gptq", bool, False, "the same as feedback=true (its earlier name)"),
    )

    def uses_feedback(self) -> bool:
        return self.config["feedback"] or self.config["gptq"]

    def call(self, ctx: PassContext) -> PassResult:
        if not self._lowers_to_kernel(ctx):
            return super().call(ctx)
        result = PassResult()
        weight_filter = WeightFilter.from_config(self.config)
        keys = []
        for weight in ctx.model.weights():
            reason = weight_filter.reason_to_skip(weight)
            if reason:
                result.skip(weight.name, reason)
            else:
                keys.append((weight.scope.path, weight.name))
        energy = self._activation_energy(ctx, keys)
        hessians = self._input_covariance(ctx, keys)
        tensors, deferred = [], []
        with ctx.progress(f"{self.name}: block-quantizing weights", len(keys)) as advance:
            # Kernels first: a bias they fold in must still be a plain initializer then; the
            # fallbacks after (a folded bias is read by MatMulNBits by then, and stays).
            for key in keys:
                plan = self._fresh_plan(ctx, weight_filter, key, energy, hessians)
                if isinstance(plan, Plan) and "lowering" in plan.details:
                    plan.apply()
                    tensors.append(plan.details)
                    advance(1)
                else:
                    deferred.append(key)
            for key in deferred:
                plan = self._fresh_plan(ctx, weight_filter, key, energy, hessians)
                if isinstance(plan, str):
                    result.skip(key[1], plan)
                else:
                    plan.apply()
                    tensors.append(plan.details)
                advance(1)
        result.tensors_changed = len(tensors)
        result.changed = bool(tensors)
        result.details = {"method": self.name, "tensors": tensors,
                          "bytes_before": sum(t["bytes_before"] for t in tensors),
                          "bytes_after": sum(t["bytes_after"] for t in tensors)}
        result.notes.extend(_kernel_notes(self.name, tensors))
        return result

    def _fresh_plan(self, ctx: PassContext, weight_filter: WeightFilter, key, energy, hessians) -> Plan | str:
        """The plan for a weight found afresh: taking over readers makes earlier handles stale."""
        weight = {(w.scope.path, w.name): w for w in ctx.model.weights()}.get(key)
        if weight is None:
            return "replaced by an earlier kernel"
        return weight_filter.reason_to_skip(weight) or self.plan(ctx, weight, value_weight=energy.get(key[1]),
                                                                 hessian=hessians.get(key[1]))

    def plan(self, ctx: PassContext, weight: WeightRef, *, value_weight: np.ndarray | None = None,
             hessian: np.ndarray | None = None) -> Plan | str:
        """Under the kernel lowering, the chooser's plan; a weight no kernel of the run's targets
        can read falls back to the lookup, and its plan says why (details.memory)."""
        if not self._lowers_to_kernel(ctx):
            return super().plan(ctx, weight, value_weight=value_weight, hessian=hessian)
        reason = self._kernel_reason(weight)
        if reason is None:
            found = compressed_plan(weight, ctx.deployment, self.config["bits"], self.config["group_size"], value_weight,
                                    hessian=hessian)
            if not isinstance(found, str):
                return found
            reason = found
        if self.config["lower"] == "kernel":
            return reason  # asked for a kernel: no lookup in its place
        # The lookup fit ignores activation energy; the Hessian, with feedback, still counts.
        fallback = self._lookup_plan(ctx, weight, None, hessian)
        if isinstance(fallback, str):
            return f"{reason}; and as a lookup: {fallback}"
        fallback.details["memory"] = f"rebuilt dense at load: {reason}"
        return fallback

    def memory_note(self) -> str:
        if self.config["lower"] == "dequantize":
            return ("lower=dequantize stays compressed in onnxruntime only as blocked UINT4 DequantizeLinear + MatMul "
                    "(opset >= 21, fused into MatMulNBits) and is rebuilt dense at load otherwise; lower=kernel keeps "
                    "weights compressed at any opset")
        return f"lower={self.config['lower']} is rebuilt dense at load by onnxruntime; lower=kernel keeps weights compressed"

    def _lowers_to_kernel(self, ctx: PassContext) -> bool:
        lower = self.config["lower"]
        return lower == "kernel" or (lower == "auto" and ctx.deployment.objective == "memory")

    def _kernel_reason(self, weight: WeightRef) -> str | None:
        if self.config["granularity"] != "group":
            return "compressed kernels quantize per block: granularity=group sets it"
        if self.config["outliers"] > 0:
            return "compressed kernels keep no exact outliers"
        return None

    def _activation_energy(self, ctx: PassContext, keys) -> dict[str, np.ndarray]:
        """Activation energy of MatMul weights' input channels on the run's calibration inputs
        (none given: every value's error counts the same)."""
        if not ctx.calibration_inputs:
            return {}
        names = {name for _, name in keys}
        weights = [w for w in ctx.model.weights() if w.name in names]
        energy = input_channel_energy(ctx.model, weights, ctx.calibration_inputs)
        return {name: relative_energy(e) for name, e in energy.items()}

    def _input_covariance(self, ctx: PassContext, keys) -> dict[str, np.ndarray]:
        """With feedback: the second moment of each MatMul weight's inputs on the calibration inputs."""
        return ctx.analysis(InputHessians).hessians if self.uses_feedback() else {}

    def fit_weighted(self, values, sample_weight):
        return self.fit_groups(values)  # the lookup's even grid ignores weights; kernel plans use them

    def fit_groups(self, values):
        found = binning.uniform(values, 2 ** self.config["bits"], symmetric=self.config["symmetric"])
        if self.config["lower"] == "dequantize":
            found = integer_zero_point(found, values)
        return found, {}

    def predicted_bytes(self, weight, layout, opset, ir_version):
        if self.config["lower"] == "kernel":
            bits, block = self.config["bits"], self.config["group_size"]
            blocks = -(-weight.size // block)
            return (weight.size * bits + 7) // 8 + blocks * lookup.np_dtype(weight.dtype).itemsize + (blocks * bits + 7) // 8
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
        affine = self._lowered_affine(job, fit.codebook, fit.labels)
        if affine is None:
            return super().emit(r, job, fit, opset, ir_version)  # e.g. blocked scales before opset 21
        quantized, scale, zero_point = affine
        out = lookup.emit_dequantize(r, quantized, scale, zero_point, job.layout, opset=opset, ir_version=ir_version)
        return out, "dequantize/" + lookup.dequantize_packing(quantized, opset, ir_version)

    def rebuilt_groups(self, job, codebook, labels):
        affine = self._lowered_affine(job, codebook, labels)
        if affine is None:
            return super().rebuilt_groups(job, codebook, labels)
        return dequantized(*affine, job.weight.dtype, job.opset).astype(np.float64)

    def _lowered_affine(self, job: Job, codebook: np.ndarray, labels: np.ndarray):
        """(quantized, scale, zero_point) when this weight lowers to DequantizeLinear, else None."""
        if self.config["lower"] != "dequantize" or not lookup.dequantize_supported(job.layout, job.opset):
            return None
        return affine_form(codebook, labels)

    def _notes(self, tensors):
        notes = super()._notes(tensors)
        lookups = [t["name"] for t in tensors if not t["packing"].startswith("dequantize")]
        if self.config["lower"] == "dequantize" and lookups:
            notes.append(f"{len(lookups)} tensors stay lookups: DequantizeLinear needs opset 13 for "
                         "per-channel and opset 21 for per-group scales")
        return notes


def _kernel_notes(name: str, tensors: list[dict[str, Any]]) -> list[str]:
    kernels = Counter(t["lowering"] for t in tensors if "lowering" in t)
    notes = [f"{name}: {count} weights kept compressed in memory by {op}" for op, count in sorted(kernels.items())]
    dense = [t for t in tensors if "memory" in t]
    for reason, count in Counter(t["memory"] for t in dense).most_common():
        names = [t["name"] for t in dense if t["memory"] == reason]
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        notes.append(f"{name}: {count} weights stay lookups, {reason} ({shown})")
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


def dequantized(quantized: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, weight_dtype: int,
                opset: int) -> np.ndarray:
    """What onnxruntime's DequantizeLinear (as `lookup.emit_dequantize` lays it out) computes, per
    group row: float32 (q - zero_point) times the stored scale, cast to the weight's type."""
    half = weight_dtype in (TensorProto.FLOAT16, TensorProto.BFLOAT16) and opset >= lookup.HALF_SCALE_DQ_MIN_OPSET
    stored_scale = np.asarray(scale).astype(lookup.np_dtype(weight_dtype) if half else np.float32)
    steps = (np.asarray(quantized, dtype=np.int32) - np.asarray(zero_point, dtype=np.int32)[:, None]).astype(np.float32)
    return (steps * stored_scale.astype(np.float32)[:, None]).astype(lookup.np_dtype(weight_dtype))


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
    if not _float32_holds(step):  # DequantizeLinear's scale: a float64 weight's may not fit
        return None
    return labels, step, zero_point.astype(np.int64)


def _float32_holds(values: np.ndarray) -> bool:
    """Whether float32 keeps these nonzero values to its usual precision (normal, finite)."""
    magnitudes = np.abs(np.asarray(values, dtype=np.float64))
    return bool(np.all((magnitudes >= np.finfo(np.float32).tiny) & (magnitudes <= np.finfo(np.float32).max)))
