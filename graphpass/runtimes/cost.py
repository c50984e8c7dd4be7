"""Runtime cost: what a model costs to run in onnxruntime, measured side by side and held to
budgets the way accuracy is.

Each figure comes from `graphpass.runtimes.probe`, run in a fresh process per model so that no
model inherits another's memory or warm caches: session memory (RSS growth from creating the
session through its first run), peak RSS, start (session creation) and latency (median run).
Models are measured in rounds, alternating within each round (A B A B ...), and each figure
keeps the best (lowest) value of its rounds: a busy neighbour slows a process down or makes it
page, it never makes one faster or smaller, so the minimum is the least disturbed measurement
and the alternation spreads any disturbance over both sides.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Union

import numpy as np
import onnx

from graphpass.errors import GraphpassError, UsageError
from graphpass.metrics import json_float
from graphpass.model import external_data_path

ModelSource = Union[str, os.PathLike, bytes, onnx.ModelProto]

# Run by path, not imported: `python -m graphpass.runtimes.probe` would find itself imported already.
PROBE_SCRIPT = Path(__file__).with_name("probe.py")
# A model this large takes one round: each extra round reloads it twice over.
ONE_ROUND_BYTES = 256 * 1000 * 1000
# Measured after a run or a verification, the cost may add about this share of the time they
# took (at least MIN_COST_SECONDS; the first round always runs), so it never doubles a long run.
COST_SHARE_OF_RUN = 0.5
MIN_COST_SECONDS = 5.0
# A probe that has not finished by then is stuck or swapping; its figures would mean nothing.
PROBE_TIMEOUT_SECONDS = 900.0


class CostError(GraphpassError):
    """A model could not be measured (it does not load or run in the probe); one line."""


@dataclass
class RuntimeCost:
    """One model's cost in onnxruntime: the best of `rounds` fresh processes for each figure."""

    session_memory_bytes: int
    peak_rss_bytes: int
    start_seconds: float
    latency_seconds: float
    runs: int = 0  # timed runs behind the latency median (the fewest of any round)
    rounds: int = 1

    @classmethod
    def from_probe(cls, figures: Mapping) -> RuntimeCost:
        return cls(int(figures["session_memory_bytes"]), int(figures["peak_rss_bytes"]),
                   float(figures["start_seconds"]), float(figures["latency_seconds"]), int(figures["runs"]))

    @classmethod
    def best_of(cls, measured: Sequence[RuntimeCost]) -> RuntimeCost:
        """Each figure's minimum over the rounds (they need not come from the same round)."""
        return cls(*(min(getattr(m, name) for m in measured) for name in FIGURES),
                   runs=min(m.runs for m in measured), rounds=len(measured))

    def figures(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in FIGURES}


# The four measured figures, in the order the report shows them.
FIGURES = tuple(f.name for f in fields(RuntimeCost))[:4]


def measure_cost(models: Sequence[ModelSource], feeds: Mapping[str, np.ndarray], *, rounds: int = 3, runs: int = 20,
                 threads: int = 1, seconds_budget: float | None = None) -> list[RuntimeCost]:
    """Each model's runtime cost, in the order given, measured side by side on `feeds`.

    One fresh process per model per round, the models alternating within each round; each
    figure is the best of the rounds. Models larger than ONE_ROUND_BYTES get one round. With
    `seconds_budget`, no further round starts once it would likely end past the budget (the
    first round always runs). Models given as bytes or ModelProto are written to a temporary
    file. Raises CostError with one line when a model does not load or run.
    """
    if rounds < 1 or runs < 1 or threads < 1:
        raise UsageError(f"rounds, runs and threads must be at least 1, got {rounds}, {runs}, {threads}")
    with tempfile.TemporaryDirectory(prefix="graphpass-cost-") as scratch:
        paths = [_as_path(model, Path(scratch) / f"model{i}.onnx") for i, model in enumerate(models)]
        feeds_path = Path(scratch) / "feeds.npz"
        np.savez(feeds_path, **{name: np.asarray(value) for name, value in feeds.items()})
        if any(_stored_bytes(p) > ONE_ROUND_BYTES for p in paths):
            rounds = 1
        measured: list[list[RuntimeCost]] = [[] for _ in paths]
        started = time.perf_counter()
        for done in range(rounds):
            elapsed = time.perf_counter() - started
            if done and seconds_budget is not None and elapsed * (done + 1) / done > seconds_budget:
                break
            for path, results in zip(paths, measured):
                results.append(_probe(path, feeds_path, runs, threads))
    return [RuntimeCost.best_of(results) for results in measured]


def _as_path(model: ModelSource, spare: Path) -> Path:
    """Paths stay paths (onnxruntime finds external data beside them); bytes go to `spare`."""
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    if isinstance(model, (bytes, bytearray)):
        spare.write_bytes(model)
        return spare
    path = Path(model)
    if not path.is_file():
        raise CostError(f"cannot measure the runtime cost of {path}: no such file")
    return path


def _stored_bytes(model: Path) -> int:
    """The model file and the external data graphpass writes beside it."""
    data = external_data_path(model)
    return model.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def _probe(model: Path, feeds: Path, runs: int, threads: int) -> RuntimeCost:
    # -I: the probe runs by path, so that neither graphpass's imports nor a module beside it
    # (this folder holds runtime adapters) can stand in for onnxruntime or weigh on its figures.
    command = [sys.executable, "-I", str(PROBE_SCRIPT), str(model), str(feeds), "--runs", str(runs),
               "--threads", str(threads)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired as exc:
        raise CostError(f"measuring the runtime cost of {model.name} took over {PROBE_TIMEOUT_SECONDS:.0f} s") from exc
    if done.returncode != 0:
        raise CostError(f"cannot measure the runtime cost of {model.name}: {_failure_line(done)}")
    try:
        return RuntimeCost.from_probe(json.loads(done.stdout.strip().splitlines()[-1]))
    except (IndexError, ValueError, KeyError) as exc:
        raise CostError(f"the cost probe printed no figures for {model.name}") from exc


def _failure_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    if done.returncode < 0:
        return f"the probe was killed by signal {-done.returncode} (out of memory?)"
    # The probe's own message, or the last line of an unexpected traceback.
    return lines[-1].removeprefix("probe: ") if lines else f"the probe exited with code {done.returncode}"


@dataclass
class CostComparison:
    """Input (reference) against output (candidate), measured side by side."""

    reference: RuntimeCost
    candidate: RuntimeCost
    seconds: float  # what the measurement took
    threads: int = 1

    def ratios(self) -> dict[str, float]:
        """Candidate over reference per figure: below 1 is cheaper than the input."""
        return {name: _ratio(getattr(self.candidate, name), getattr(self.reference, name)) for name in FIGURES}

    def to_dict(self) -> dict:
        return {
            "reference": self.reference.figures(),
            "candidate": self.candidate.figures(),
            "ratios": {name: json_float(value) for name, value in self.ratios().items()},
            "seconds": self.seconds,
            "rounds": min(self.reference.rounds, self.candidate.rounds),
            "runs": min(self.reference.runs, self.candidate.runs),
            "threads": self.threads,
        }


def _ratio(candidate: float, reference: float) -> float:
    if reference > 0:
        return candidate / reference
    return 1.0 if candidate <= 0 else math.inf


def seconds_beside(spent_seconds: float) -> float:
    """The seconds_budget for a cost measured after work that took `spent_seconds`."""
    return max(MIN_COST_SECONDS, COST_SHARE_OF_RUN * spent_seconds)


def compare_cost(reference: ModelSource, candidate: ModelSource, feeds: Mapping[str, np.ndarray],
                 **options) -> CostComparison:
    """Runtime cost of `candidate` against `reference` (options as for measure_cost)."""
    started = time.perf_counter()
    ref_cost, cand_cost = measure_cost([reference, candidate], feeds, **options)
    return CostComparison(ref_cost, cand_cost, time.perf_counter() - started, options.get("threads", 1))


# budget field -> (the figure it bounds, its CLI option, the figure's name in messages)
BUDGETS = {
    "max_memory": ("session_memory_bytes", "--max-memory", "session memory"),
    "max_peak_rss": ("peak_rss_bytes", "--max-peak-rss", "peak RSS"),
    "max_start": ("start_seconds", "--max-start", "start"),
    "max_latency": ("latency_seconds", "--max-latency", "latency"),
}


@dataclass(frozen=True)
class CostBudget:
    """Upper bounds on the output's cost as ratios to the input's (1.0: no worse than the input)."""

    max_memory: float | None = None
    max_peak_rss: float | None = None
    max_start: float | None = None
    max_latency: float | None = None

    def __post_init__(self) -> None:
        for name, (_, option, _) in BUDGETS.items():
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise UsageError(f"{option} must be a ratio to the input above 0, got {value}")

    @property
    def given(self) -> dict[str, float]:
        return {name: value for name, value in asdict(self).items() if value is not None}

    def misses(self, comparison: CostComparison) -> list[str]:
        """One message per budget the comparison misses."""
        ratios = comparison.ratios()
        missed = []
        for name, limit in self.given.items():
            figure, option, label = BUDGETS[name]
            if ratios[figure] > limit:
                missed.append(f"cost budget not met: {label} is {_times(ratios[figure])} the input's, over {option} {limit:g}")
        return missed


def _times(ratio: float) -> str:
    return f"{ratio:.2f}x" if math.isfinite(ratio) else "infinitely"


@dataclass
class CostCheck:
    """The cost measured for a run, or why it could not be, and the budgets it met or missed."""

    budget: CostBudget = field(default_factory=CostBudget)
    comparison: CostComparison | None = None
    error: str | None = None

    @property
    def failures(self) -> list[str]:
        if self.comparison is None:
            return [f"cost budget not checked: {self.error}"] if self.budget.given else []
        return self.budget.misses(self.comparison)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        measured = self.comparison.to_dict() if self.comparison is not None else {"error": self.error}
        return {**measured, "budget": self.budget.given, "passed": self.passed, "failures": self.failures}


def check_cost(reference: ModelSource, candidate: ModelSource, feeds: Mapping[str, np.ndarray],
               budget: CostBudget | None = None, **options) -> CostCheck:
    """compare_cost against `budget`; a model the probe cannot measure becomes the check's error
    (a report line), not an exception."""
    budget = budget or CostBudget()
    try:
        return CostCheck(budget, compare_cost(reference, candidate, feeds, **options))
    except CostError as exc:
        return CostCheck(budget, error=str(exc))


# ---------------------------------------------------------------------------
# Rendering (from the report's dict, so a saved JSON report renders the same)
# ---------------------------------------------------------------------------

_LABELS = {"session_memory_bytes": "session memory", "peak_rss_bytes": "peak RSS",
           "start_seconds": "start", "latency_seconds": "latency"}


def render_cost(cost: Mapping) -> str:
    """The cost table: input, output, ratio (and budget) per figure, then how it was measured."""
    if cost.get("error"):
        lines = [f"runtime cost not measured: {cost['error']}"]
    else:
        limits = {BUDGETS[name][0]: limit for name, limit in cost.get("budget", {}).items()}
        header = ("runtime cost", "input", "output", "ratio") + (("budget",) if limits else ())
        rows = [header] + [_cost_row(name, cost, limits) for name in FIGURES]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                 .rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"onnxruntime default level, {_count(cost['threads'], 'thread')}, a fresh process each; best of "
                     f"{_count(cost['rounds'], 'round')}, median of {_count(cost['runs'], 'run')}; "
                     f"measured in {cost['seconds']:.1f} s")
    lines += cost.get("failures", [])
    if cost.get("budget") and cost.get("passed"):
        lines.append("cost budget met")
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _cost_row(name: str, cost: Mapping, limits: Mapping[str, float]) -> tuple[str, ...]:
    show = _format_bytes if name.endswith("_bytes") else _format_seconds
    ratio = cost["ratios"][name]
    row = (_LABELS[name], show(cost["reference"][name]), show(cost["candidate"][name]),
           "-" if ratio is None else f"{ratio:.2f}x")
    if not limits:
        return row
    limit = limits.get(name)
    if limit is None:
        return row + ("",)
    met = ratio is not None and ratio <= limit
    return row + (f"{limit:g}x {'ok' if met else 'MISSED'}",)


def _format_bytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


def _format_seconds(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"
