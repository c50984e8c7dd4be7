"""Where the output will run and what it should save there: the run's deployment choice.

Two questions a user answers once per run, and every pass and lowering reads through
`PassContext.deployment` rather than through flags of its own:

- the objective: `file` (the smallest file; weights may be rebuilt dense when the runtime
  loads the model) or `memory` (weights stay compressed in the runtime's memory, lowered to
  what each target runtime has a compressed kernel for);
- the targets: the runtimes the output must load and stay within budget in (`any` is all).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from graphpass.errors import UsageError
from graphpass.runtimes import adapter, registry, required_constants

OBJECTIVES = ("file", "memory")
RUNTIMES = tuple(registry())  # in the order verification runs them
ANY_TARGET = "any"


@dataclass(frozen=True)
class Deployment:
    objective: str = "file"
    targets: tuple[str, ...] = ("onnxruntime",)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise UsageError(f"unknown objective '{self.objective}'; choose one of {', '.join(OBJECTIVES)}")
        unknown = [t for t in self.targets if t not in RUNTIMES]
        if unknown or not self.targets:
            raise UsageError(f"unknown target '{','.join(unknown)}'; choose from {', '.join(RUNTIMES)} or {ANY_TARGET}")

    @classmethod
    def parse(cls, objective: str = "file", targets: str | Iterable[str] = "onnxruntime") -> Deployment:
        """`targets` as the CLI spells it: comma separated runtimes, or `any` for all of them."""
        names = targets.split(",") if isinstance(targets, str) else list(targets)
        names = [n.strip().lower() for n in names if n.strip()]
        if ANY_TARGET in names:
            names = list(RUNTIMES)
        ordered = tuple(r for r in RUNTIMES if r in names) + tuple(n for n in names if n not in RUNTIMES)
        return cls(objective.strip().lower(), ordered)

    def targets_runtime(self, name: str) -> bool:
        return name in self.targets

    @property
    def runs_loop(self) -> bool:
        """Whether every target runs the ONNX Loop op."""
        return not self.without_loop

    @property
    def without_loop(self) -> list[str]:
        """The targets that do not run the ONNX Loop op."""
        return [adapter.name for adapter in self.adapters() if not adapter.runs_loop]

    @property
    def needs_constant_quantize_params(self) -> bool:
        """Whether some target needs DequantizeLinear's scales and zero points as constants."""
        return any(adapter.needs_constant_quantize_params for adapter in self.adapters())

    @property
    def without_symbolic_value_info(self) -> list[str]:
        """The targets that cannot load a model declaring symbolic shapes on intermediate values."""
        return [adapter.name for adapter in self.adapters() if not adapter.takes_symbolic_value_info]

    @property
    def constant_in_loops(self) -> dict:
        """Op type -> the inputs some target needs constant inside a Loop or Scan body, and why
        (graphpass.runtimes.ConstantInputs)."""
        return required_constants(self.targets, in_loops=True)

    def adapters(self):
        """The targets' runtime adapters (graphpass.runtimes), which say what each runs."""
        return [adapter(name) for name in self.targets]

    def to_dict(self) -> dict:
        return {"objective": self.objective, "targets": list(self.targets)}
