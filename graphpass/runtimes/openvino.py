"""OpenVINO (CPU plugin), read straight from the ONNX file by its ONNX frontend."""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from graphpass.runtimes import ConstantInputs, Runtime, RuntimeFailure, Session, model_output_names, one_line

# The CPU plugin runs LSTM/GRU/RNN sequences only when W, R and B (ONNX inputs 1, 2, 3) are
# Constant nodes once the model is converted ("LSTMSequence expects Constant for port 4"; ports
# 4-6 of LSTMSequence, 3-5 of GRUSequence and RNNSequence). Measured with OpenVINO 2026.4 on
# each of the nine (op, input) pairs: a lookup that rebuilds one of them at load time (Gather of
# a codebook) is not folded into a constant first, and the model does not compile. onnxruntime's
# quantized LSTM (com.microsoft.DynamicQuantizeLSTM) becomes the same LSTMSequence, its int8 W and
# R dequantized by their scales and zero points (inputs 8-11) into ports 4 and 5: on ddddocr's
# common_old.onnx a lookup for its B failed at port 6, and per-channel scales as lookups at port 4.
_RECURRENT_WEIGHTS = {
    "LSTM": (1, 2, 3), "GRU": (1, 2, 3), "RNN": (1, 2, 3), "DynamicQuantizeLSTM": (1, 2, 3, 8, 9, 10, 11),
}
# Where in OpenVINO's sources an error was raised: says nothing to a user, and is long.
_SOURCE_PREFIX = re.compile(r"^(Exception from \S+: )?(Check 'false' failed at \S+: )?")


class OpenVino(Runtime):
    name = "openvino"
    module = "openvino"
    extra = "openvino"
    levels = ("openvino",)
    kernels = {"MatMulNBits": (2, 4, 8), "GatherBlockQuantized": (4, 8)}

    def kernel_problem(self, op: str, bits: int, blocks_per_row: int) -> str | None:
        if op == "GatherBlockQuantized" and blocks_per_row * bits % 8:
            # OpenVINO 2026.4 fails to compile it when a row's packed zero points end in padding.
            return f"OpenVINO cannot read {blocks_per_row} packed {bits}-bit zero points per row (not whole bytes)"
        return super().kernel_problem(op, bits, blocks_per_row)

    def open(self, model_path: str, feeds: Mapping[str, np.ndarray] | None = None,
             level: str | None = None) -> OpenVinoSession:
        import openvino as ov

        core = ov.Core()
        try:
            model = core.read_model(model_path)
        except Exception as exc:  # the frontend raises RuntimeError/OpConversionFailure/...
            raise RuntimeFailure(self.name, "load", _message(exc)) from exc
        try:
            # f32 everywhere: on CPUs with bf16 units the plugin would otherwise run in bf16, and
            # the comparison would measure that instead of what the rewrite changed.
            compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        except Exception as exc:
            raise RuntimeFailure(self.name, "load", _message(exc)) from exc
        return OpenVinoSession(compiled, model_output_names(model_path))

    def required_constant_inputs(self) -> tuple[ConstantInputs, ...]:
        return tuple(ConstantInputs(op, indices, f"openvino needs {op} weights as constants")
                     for op, indices in _RECURRENT_WEIGHTS.items())


class OpenVinoSession(Session):
    def __init__(self, compiled, output_names: list[str]):
        self.compiled = compiled
        self.output_names = output_names

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        wanted = [port.get_any_name() for port in self.compiled.inputs]
        missing = [name for name in wanted if name not in feeds]
        if missing:
            raise RuntimeFailure("openvino", "inputs", f"no value for model input(s) {', '.join(missing)}")
        try:
            results = self.compiled({name: np.asarray(feeds[name]) for name in wanted})
        except Exception as exc:
            raise RuntimeFailure("openvino", "run", _message(exc)) from exc
        return {name: np.asarray(results[self._port(index, name)]) for index, name in enumerate(self.output_names)}

    def _port(self, index: int, name: str):
        """The compiled output carrying this ONNX output: by name, else by position."""
        for port in self.compiled.outputs:
            if name in port.get_names():
                return port
        return self.compiled.outputs[index]


def _message(exc: BaseException) -> str:
    return _SOURCE_PREFIX.sub("", one_line(exc))
