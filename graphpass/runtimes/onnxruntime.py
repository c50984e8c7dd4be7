"""onnxruntime (CPU): the runtime every output is verified in, at two optimization levels.

"default" (ORT_ENABLE_ALL) is what a deployment sees: fused kernels, lookups constant-folded
at session creation. "disable_all" runs what the graph literally says. "unfolded" is
ORT_ENABLE_ALL without constant folding: every fusion, but each lookup runs when the model
runs instead of being expanded to a dense weight when the session opens. It computes the
same values with the same kernels, and it is what verification uses on large models, where
that expansion holds a dense copy of every lookup-compressed weight beside its intermediates
(on the 4-bit k-means output of a 1.07 GB model: 2.8 GB and 8 s to open, against 0.3 GB).
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from graphpass.runtimes import Runtime, RuntimeFailure, Session, one_line

OPTIMIZATION_LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    "default": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "enable_all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "unfolded": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# Optimizers a level turns off on top of its GraphOptimizationLevel.
DISABLED_OPTIMIZERS: dict[str, list[str]] = {"unfolded": ["ConstantFolding"]}

_BFLOAT16 = np.dtype(helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16))


class OnnxRuntime(Runtime):
    name = "onnxruntime"
    module = "onnxruntime"
    extra = ""  # a dependency of graphpass itself
    levels = ("default", "disable_all")
    # Its CPU MatMulNBits at accuracy_level 0 is fast at 4 bits only: on the 3-layer BERT
    # (batch 1 x 128, one thread) 4-bit ran at 1.1x the dense latency, 8-bit at 6x and 2-bit at
    # 13x (bench/bench_deploy.py). A weight kept compressed but six times slower is no deployment.
    kernels = {"MatMulNBits": (4,), "GatherBlockQuantized": (4, 8)}

    def kernel_problem(self, op: str, bits: int, blocks_per_row: int) -> str | None:
        problem = super().kernel_problem(op, bits, blocks_per_row)
        if problem and op == "MatMulNBits" and op in self.kernels:
            return (f"onnxruntime's CPU MatMulNBits is fast at 4 bits only ({bits} bits measured several times "
                    "the dense latency)")
        return problem

    def open(self, model_path: str | bytes, feeds: Mapping[str, np.ndarray] | None = None,
             level: str | None = None) -> OrtSession:
        """`model_path` may also be the serialized model (bytes)."""
        level = level or self.levels[0]
        if isinstance(model_path, str) and not Path(model_path).is_file():
            raise RuntimeFailure(self.name, "load", f"model not found: {model_path}")
        options = ort.SessionOptions()
        options.graph_optimization_level = OPTIMIZATION_LEVELS[level]
        # A session here runs a few times and goes: the arena would only keep each run's
        # intermediates for a next run (the 1.1 B decoder's output, unfolded, peaks at 4.55 GB
        # with it and 3.32 GB without).
        options.enable_cpu_mem_arena = False
        # Fatal only: ORT's own error lines would duplicate the one-line error we raise.
        options.log_severity_level = 4
        try:
            session = ort.InferenceSession(model_path, sess_options=options, providers=["CPUExecutionProvider"],
                                           disabled_optimizers=DISABLED_OPTIMIZERS.get(level))
        except Exception as exc:  # onnxruntime raises several unrelated exception types
            raise RuntimeFailure(self.name, "load", one_line(exc)) from exc
        return OrtSession(session)


class OrtSession(Session):
    def __init__(self, session: ort.InferenceSession):
        self.session = session

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self.session
        feed = self._feed(feeds)
        output_names = [o.name for o in session.get_outputs()]
        try:
            if any(o.type == "tensor(bfloat16)" for o in session.get_outputs()):
                values = _run_with_ort_values(session, output_names, feed)
            else:
                values = session.run(output_names, feed)
        except Exception as exc:
            raise RuntimeFailure("onnxruntime", "run", one_line(exc)) from exc
        return {name: np.asarray(value) for name, value in zip(output_names, values)}

    def _feed(self, inputs: Mapping[str, np.ndarray]) -> dict:
        required = [i.name for i in self.session.get_inputs()]
        missing = [name for name in required if name not in inputs]
        if missing:
            raise RuntimeFailure("onnxruntime", "inputs",
                                 f"no value for model input(s) {', '.join(missing)} "
                                 f"(provided: {', '.join(sorted(inputs)) or 'none'})")
        # Initializers listed as graph inputs may be overridden, but only when asked to.
        overridable = [i.name for i in self.session.get_overridable_initializers() if i.name in inputs]
        return {name: _to_ort_input(np.asarray(inputs[name])) for name in required + overridable}


def _to_ort_input(array: np.ndarray):
    # onnxruntime's numpy bridge has no bfloat16; hand it the raw bits with the ONNX type.
    if array.dtype == _BFLOAT16:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
            np.ascontiguousarray(array).view(np.uint16), TensorProto.BFLOAT16)
    return array


def _run_with_ort_values(session, output_names, feed) -> list[np.ndarray]:
    ort_feed = {name: value if isinstance(value, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(value)
                for name, value in feed.items()}
    return [_ort_value_to_numpy(value) for value in session.run_with_ort_values(output_names, ort_feed)]


def _ort_value_to_numpy(value: ort.OrtValue) -> np.ndarray:
    if value.data_type() != "tensor(bfloat16)":
        return value.numpy()
    # OrtValue.numpy() refuses bfloat16: copy the CPU buffer and reinterpret it.
    size = value.tensor_size_in_bytes()
    raw = ctypes.string_at(value.data_ptr(), size) if size else b""
    return np.frombuffer(raw, dtype=np.uint16).view(_BFLOAT16).reshape(value.shape()).copy()
