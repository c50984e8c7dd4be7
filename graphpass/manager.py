"""Passes, their registry, spec strings and the manager that runs them in sequence.

A pass is a small class: a name, typed options, a `lossless` flag and one `call(ctx)` method
that returns a `PassResult`. The manager checks the model's structure after every pass (the
shared post-condition), records per-pass statistics, and names the pass when anything fails.
"""

from __future__ import annotations

import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from graphpass.deployment import Deployment
from graphpass.edit import Model
from graphpass.errors import ConditionError, GraphpassError, PassFailed, UsageError
from graphpass.structure import find_structure_problem
from graphpass.parallel import Workers
from graphpass.runtimes import required_constants


@dataclass(frozen=True)
class Option:
    """One typed pass option. `choices` restricts strings; `low`/`high` bound numbers."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None

    def parse(self, text: str) -> Any:
        if self.type is bool:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError("expected true or false")
            return lowered in ("true", "1", "yes")
        value = self.type(text)
        self.check(value)
        return value

    def check(self, value: Any) -> None:
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"expected one of {', '.join(self.choices)}")
        if self.low is not None and value < self.low:
            raise ValueError(f"must be at least {self.low:g}")
        if self.high is not None and value > self.high:
            raise ValueError(f"must be at most {self.high:g}")

    def describe(self) -> str:
        kind = "|".join(self.choices) if self.choices else self.type.__name__
        return f"{self.name}={self.default!r} ({kind}): {self.help}"


@dataclass
class PassResult:
    """What a pass did. Tensors it could not handle are listed with the reason, never dropped."""

    changed: bool = False
    tensors_changed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (weight name, reason)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # pass-specific figures for the report

    def skip(self, name: str, reason: str) -> None:
        self.skipped.append((name, reason))


@dataclass
class PassStats:
    name: str
    spec: str  # the pass as written in a spec string, with its non-default options
    options: dict[str, Any]
    lossless: bool
    seconds: float
    weight_bytes_before: int
    weight_bytes_after: int
    nodes_before: int
    nodes_after: int
    weights_before: int
    tensors_changed: int
    tensors_skipped: int
    tensors_untouched: int
    skipped: list[dict[str, str]]
    notes: list[str]
    details: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PassContext:
    """What a pass sees: the model, shared analyses (computed once), and a progress hook.

    `budget` (a graphpass.budget.Budget), `budget_outputs` (the outputs it applies to; None: all)
    and `calibration_inputs` (name -> array) are what the run will be verified against; passes
    that search for the smallest model within a budget (auto) read them. None when not known.
    `deployment` says which runtimes the output is for and what it should save there.
    `workers` (graphpass.parallel) runs the passes' per-tensor tasks; default: one thread per core.
    """

    def __init__(self, model: Model, progress: ProgressFactory | None = None, *, budget: Any = None,
                 budget_outputs: Sequence[str] | None = None, calibration_inputs: dict[str, Any] | None = None,
                 deployment: Deployment | None = None, workers: Workers | None = None):
        self.model = model
        self.deployment = deployment or Deployment()
        self.workers = workers or Workers()
        # Weights a target runtime needs as constants stay as they are (WeightRef.pinned).
        model.keep_constant(required_constants(self.deployment.targets))
        self._progress = progress
        self.budget = budget
        self.budget_outputs = budget_outputs
        self.calibration_inputs = calibration_inputs
        self._analyses: dict[type, tuple[int, Any]] = {}
        # Workers planning weights at once may ask for the same analysis: it is computed once,
        # the others wait (one analysis may ask for another, on the same thread). So an analysis
        # that maps tasks over the workers (fingerprints, sketches) must be asked for first
        # outside a worker task, or its tasks could wait behind the workers waiting for it.
        self._computing = threading.RLock()

    def analysis(self, kind: type[Analysis]) -> Any:
        """The result of an analysis, recomputed only when the model changed since."""
        with self._computing:
            cached = self._analyses.get(kind)
            if cached is not None and cached[0] == self.model.generation:
                return cached[1]
            value = kind.compute(self)
            self._analyses[kind] = (self.model.generation, value)
            return value

    def provide(self, kind: type[Analysis], value: Any) -> None:
        """Give an analysis its result, computed elsewhere: auto plans a sample of a weight in a
        one-node model that cannot run the calibration inputs, with the whole model's figures."""
        self._analyses[kind] = (self.model.generation, value)

    def progress(self, label: str, total: int):
        """A context yielding `advance(n)`; the CLI shows a bar on stderr, the API stays silent."""
        return progress_of(self._progress, label, total)


ProgressFactory = Callable[[str, int], Any]


@contextmanager
def progress_of(factory: ProgressFactory | None, label: str, total: int) -> Iterator[Callable[[int], None]]:
    """Yields `advance(n)` from `factory`'s bar, or a no-op without one."""
    if factory is None:
        yield lambda n=1: None
        return
    with factory(label, total) as advance:
        yield advance


class Analysis(ABC):
    """A fact about the model that several passes share, cached on the context."""

    @classmethod
    @abstractmethod
    def compute(cls, ctx: PassContext) -> Any: ...


class Pass(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    lossless: ClassVar[bool]
    options: ClassVar[tuple[Option, ...]] = ()

    def __init__(self, **values: Any):
        known = {o.name: o for o in self.options}
        for key, value in values.items():
            if key not in known:
                raise UsageError(_unknown(f"option '{key}' for pass '{self.name}'", known))
            try:
                known[key].check(value)
            except ValueError as exc:
                raise UsageError(f"pass '{self.name}': option {key}={value!r}: {exc}") from None
        self.config = {o.name: values.get(o.name, o.default) for o in self.options}

    def is_lossless(self) -> bool:
        """Whether this instance, with its options, is exact up to float rounding."""
        return self.lossless

    def requires(self, ctx: PassContext) -> None:
        """Pre-condition; raise ConditionError when the model is not fit for this pass."""

    @abstractmethod
    def call(self, ctx: PassContext) -> PassResult: ...

    def ensures(self, ctx: PassContext) -> None:
        """Post-condition; every pass must leave each scope defined-before-use."""
        problem = find_structure_problem(ctx.model.proto)
        if problem:
            raise ConditionError(f"left the model broken: {problem}")

    def describe(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.config.items() if v != self._default(k))
        return f"{self.name}({args})" if args else self.name

    def _default(self, key: str) -> Any:
        return next(o.default for o in self.options if o.name == key)


REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    if cls.name in REGISTRY:
        raise RuntimeError(f"pass '{cls.name}' registered twice")
    REGISTRY[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    import graphpass.passes  # noqa: F401  (registers the built-in passes)

    return dict(sorted(REGISTRY.items()))


_SPEC_ITEM = re.compile(r"\s*([A-Za-z_][\w-]*)\s*(?:\(([^()]*)\))?\s*(?:,|$)")


def parse_spec(spec: str) -> list[Pass]:
    """`"tie,kmeans(bits=4,granularity=channel),fold"` -> pass instances, or a UsageError."""
    passes = registered_passes()
    result, position = [], 0
    spec = spec.strip()
    if not spec:
        raise UsageError("no passes given; choose from: " + ", ".join(passes))
    while position < len(spec):
        match = _SPEC_ITEM.match(spec, position)
        if not match or match.end() == position:
            raise UsageError(f"cannot parse pass spec at: {spec[position:]!r}")
        name, args = match.group(1), match.group(2)
        if name not in passes:
            raise UsageError(_unknown(f"pass '{name}'", passes))
        result.append(_instantiate(passes[name], args or ""))
        position = match.end()
    return result


def _instantiate(cls: type[Pass], args: str) -> Pass:
    known = {o.name: o for o in cls.options}
    values = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise UsageError(f"pass '{cls.name}': option '{item}' needs a value (name=value)")
        if key not in known:
            raise UsageError(_unknown(f"option '{key}' for pass '{cls.name}'", known))
        try:
            values[key] = known[key].parse(text.strip())
        except ValueError as exc:
            raise UsageError(f"pass '{cls.name}': option {key}={text.strip()}: {exc}") from None
    return cls(**values)


def _unknown(what: str, valid: Sequence[str] | dict) -> str:
    choices = ", ".join(valid) or "(none)"
    return f"unknown {what}; valid: {choices}"


class PassManager:
    def __init__(self, passes: Sequence[Pass]):
        self.passes = list(passes)

    @property
    def lossless(self) -> bool:
        return all(p.is_lossless() for p in self.passes)

    def run(self, ctx: PassContext) -> list[PassStats]:
        return [self._run_one(p, ctx) for p in self.passes]

    def _run_one(self, pass_: Pass, ctx: PassContext) -> PassStats:
        model = ctx.model
        before = (model.weight_bytes(), model.node_count(), len(model.weights()))
        start = time.perf_counter()
        model.last_weight = None
        try:
            pass_.requires(ctx)
            result = pass_.call(ctx)
            ctx.model.settle_undeclared_initializers()
            pass_.ensures(ctx)
        except GraphpassError:
            raise
        except Exception as exc:  # a bug in a pass: name it, write nothing
            raise PassFailed(pass_.name, exc, model.last_weight) from exc
        seconds = time.perf_counter() - start
        skipped = [{"weight": name, "reason": reason} for name, reason in result.skipped]
        return PassStats(
            name=pass_.name,
            spec=pass_.describe(),
            options=dict(pass_.config),
            lossless=pass_.is_lossless(),
            seconds=seconds,
            weight_bytes_before=before[0],
            weight_bytes_after=model.weight_bytes(),
            nodes_before=before[1],
            nodes_after=model.node_count(),
            weights_before=before[2],
            tensors_changed=result.tensors_changed,
            tensors_skipped=len(skipped),
            tensors_untouched=max(0, before[2] - result.tensors_changed - len(skipped)),
            skipped=skipped,
            notes=result.notes,
            details=result.details,
        )
