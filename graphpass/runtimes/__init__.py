"""Runtime adapters: load and run a model in each runtime graphpass targets, and what each requires of a model.

One small class per runtime (onnxruntime, openvino, tract) with the same few methods, so that
verification runs a reference and a candidate the same way in every target, and so that the
core can ask what a target needs without knowing which runtime it is:

- `available()`: None when the runtime's package imports, else the one-line reason (with the
  pip extra to install);
- `open(model_path, feeds, level)`: a Session whose `run(feeds)` returns output name -> numpy
  array; every failure to load or run raises RuntimeFailure with one line;
- `levels`: the settings a model is run at (onnxruntime: with and without graph optimizations);
- `required_constant_inputs()`: {op type: input indices} whose values the runtime needs as
  plain stored constants (not computed at load time by a lookup), and why;
- `constant_inputs_in_loops()`: the same inside a Loop or Scan body, where `fold` hands the
  body its weights as slices and state, never as constants.

The runtime packages are imported only when a model is opened or `available()` is asked, so the
core can read the requirements of a runtime that is not installed.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from graphpass.errors import UsageError


class RuntimeFailure(Exception):
    """A runtime cannot load or run a model. `stage` says where it failed ("load": the model
    does not load; "inputs": a model input has no value; "run": it loads but fails to run),
    `detail` the runtime's own reason in one line."""

    STAGES = {"load": "cannot load it", "inputs": "has no value for an input", "run": "fails to run it"}

    def __init__(self, runtime: str, stage: str, detail: str):
        super().__init__(f"{runtime} {self.STAGES[stage]}: {detail}")
        self.runtime, self.stage, self.detail = runtime, stage, detail


class RuntimeUnavailable(UsageError):
    """A target runtime's package is not installed (exit 2)."""


class Session(ABC):
    """A model loaded in one runtime at one level."""

    @abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Output name -> array, in the model's output order; RuntimeFailure when it cannot."""


@dataclass(frozen=True)
class ConstantInputs:
    """Inputs of an op type that a runtime needs as plain constants, and the reason it gives."""

    op_type: str
    indices: tuple[int, ...]
    reason: str


class Runtime(ABC):
    name: str
    module: str  # the package `available()` imports
    extra: str  # pip extra of graphpass that installs it
    levels: tuple[str, ...] = ("default",)
    # What the runtime runs, for passes to ask through the run's Deployment (never by name).
    runs_loop: bool = True  # the ONNX Loop op
    # DequantizeLinear's scales and zero points must be plain constants (not Scan slices).
    needs_constant_quantize_params: bool = False
    # Symbolic shapes declared on intermediate values (value_info) are taken as hints, not as
    # facts that must agree with the inputs' concrete sizes.
    takes_symbolic_value_info: bool = True
    # The compressed kernels (com.microsoft ops) it runs and keeps packed: op -> the bit widths
    # it runs well. An op not listed is one it cannot run.
    kernels: dict[str, tuple[int, ...]] = {}

    def available(self) -> str | None:
        """None when the runtime can be used here, else why not (one line)."""
        try:
            importlib.import_module(self.module)
        except ImportError as exc:
            package = f"'graphpass[{self.extra}]'" if self.extra else self.module
            return f"runtime '{self.name}' is not installed ({exc}); install it with: pip install {package}"
        return None

    def require(self) -> None:
        reason = self.available()
        if reason:
            raise RuntimeUnavailable(reason)

    @abstractmethod
    def open(self, model_path: str, feeds: Mapping[str, np.ndarray], level: str | None = None) -> Session:
        """Load the model at `level` (default: the first of `levels`), ready for inputs shaped like `feeds`."""

    def required_constant_inputs(self) -> tuple[ConstantInputs, ...]:
        return ()

    def constant_inputs_in_loops(self) -> tuple[ConstantInputs, ...]:
        """Inputs the runtime needs constant inside a Loop or Scan body: by default, those it
        needs constant anywhere (a runtime folds a lookup outside a body, never a slice inside)."""
        return self.required_constant_inputs()

    def kernel_problem(self, op: str, bits: int, blocks_per_row: int) -> str | None:
        """Why this runtime cannot run (or run well) `op` at `bits` with this many blocks per
        row, or None. The default reads `kernels`; adapters add what they measured."""
        if op not in self.kernels:
            return f"{self.name} cannot run {op}"
        if bits not in self.kernels[op]:
            widths = ", ".join(map(str, self.kernels[op]))
            return f"{self.name} runs {op} at {widths} bits only, not {bits}"
        return None


def one_line(exc: BaseException) -> str:
    """An exception as one line: runtimes' messages span many lines (tract appends a backtrace)."""
    text = str(exc).split("Stack backtrace:")[0]
    return " ".join(text.split()) or type(exc).__name__


def model_output_names(model_path) -> list[str]:
    """The ONNX graph's output names in order (runtimes other than onnxruntime may name outputs
    after the nodes that compute them)."""
    import onnx

    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:
        raise RuntimeFailure("onnx", "load", one_line(exc)) from exc
    return [value.name for value in proto.graph.output]


def registry() -> dict[str, Runtime]:
    """Every runtime graphpass knows, by name, in the order verification runs them."""
    from graphpass.runtimes.onnxruntime import OnnxRuntime
    from graphpass.runtimes.openvino import OpenVino
    from graphpass.runtimes.tract import Tract

    return {runtime.name: runtime for runtime in (OnnxRuntime(), OpenVino(), Tract())}


def adapter(name: str) -> Runtime:
    """The adapter of a runtime by name; an unknown name is a usage error that lists the valid ones."""
    known = registry()
    if name not in known:
        raise UsageError(f"unknown runtime '{name}'; choose from {', '.join(known)}")
    return known[name]


def usable_adapters(names: Iterable[str]) -> list[Runtime]:
    """The adapters of these runtimes, each checked to be installed (RuntimeUnavailable if not)."""
    adapters = [adapter(name) for name in names]
    for runtime in adapters:
        runtime.require()
    return adapters


def required_constants(targets: Iterable[str], in_loops: bool = False) -> dict[str, list[ConstantInputs]]:
    """For the runtimes in `targets`: op type -> what each of them needs kept constant there
    (`in_loops`: inside a Loop or Scan body)."""
    needs: dict[str, list[ConstantInputs]] = {}
    for name in targets:
        runtime = adapter(name)
        for rule in runtime.constant_inputs_in_loops() if in_loops else runtime.required_constant_inputs():
            needs.setdefault(rule.op_type, []).append(rule)
    return needs
