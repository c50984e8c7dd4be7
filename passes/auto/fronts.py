"""auto's measured points: each weight's settings as (bytes, error alone), the Pareto front of
each weight, and the allocation of one point per weight within an error target."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphpass.codec import Plan
from graphpass.grid import Setting
from graphpass.sensitivity import Measurement
from graphpass.weights import WeightRef

KEPT = "kept as is"


@dataclass
class Point:
    """One way to store one weight: its bytes and the error it causes alone."""

    label: str
    bytes: int
    measured: Measurement | None  # None: kept as is, no error
    plan: Plan | None = None  # None: kept as is, released (off the front) or not fitted yet (see Trial in passes/auto)
    seconds: float = 0.0  # planning and measuring it
    setting: Setting | None = None
    predicted: bool = False  # its error predicted from another setting's (graphpass.sampling), not measured

    def to_dict(self) -> dict[str, Any]:
        return {"setting": self.label, "bytes": self.bytes, "error_units": finite(self.units),
                "seconds": round(self.seconds, 2), **({"predicted": True} if self.predicted else {})}

    @property
    def kept(self) -> bool:
        return self.measured is None

    @property
    def units(self) -> float:
        return 0.0 if self.measured is None else self.measured.units


@dataclass
class Study:
    """A candidate weight, every setting tried on it and the front allocation chooses from."""

    weight: WeightRef
    points: list[Point] = field(default_factory=list)
    unplanned: list[tuple[str, str]] = field(default_factory=list)  # (setting, reason)
    front: list[Point] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str]:
        return self.weight.scope.path, self.weight.name


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """The points no other point beats on both bytes and error, cheapest first: the only ones
    a choice of fewest bytes within an error budget can ever pick."""
    front: list[Point] = []
    for point in sorted((p for p in points if math.isfinite(p.units)), key=lambda p: (p.bytes, p.units)):
        if not front or point.units < front[-1].units:
            front.append(point)
    return front


# The allocation counts error in steps of target / ALLOCATION_STEPS, each weight's error rounded
# up: the summed error never exceeds the target, and at most N steps of it go unused.
ALLOCATION_STEPS = 2000


def allocate(fronts: Sequence[Sequence[Point]], target: float) -> list[int]:
    """Index into each front: the fewest bytes whose summed error fits `target`.

    A multiple-choice knapsack, solved exactly by dynamic programming over the error (in steps,
    see ALLOCATION_STEPS): fewest_bytes[b] is the cheapest choice so far using at most b steps.
    Every front holds "kept as is" at zero error, so a choice always exists."""
    fewest_bytes = np.zeros(ALLOCATION_STEPS + 1)
    choices, costs = [], []
    for front in fronts:
        cost = [_error_steps(p.units, target) for p in front]
        best, choice = np.full(ALLOCATION_STEPS + 1, np.inf), np.zeros(ALLOCATION_STEPS + 1, dtype=np.int64)
        for index, (point, steps) in enumerate(zip(front, cost)):
            if steps is None:
                continue
            candidate = np.full(ALLOCATION_STEPS + 1, np.inf)
            candidate[steps:] = fewest_bytes[: ALLOCATION_STEPS + 1 - steps] + point.bytes
            better = candidate < best  # ties keep the cheaper point listed first
            best[better], choice[better] = candidate[better], index
        fewest_bytes = best
        choices.append(choice)
        costs.append(cost)
    chosen, budget = [0] * len(fronts), ALLOCATION_STEPS
    for i in reversed(range(len(fronts))):
        chosen[i] = int(choices[i][budget])
        budget -= costs[i][chosen[i]]
    return chosen


def _error_steps(units: float, target: float) -> int | None:
    if units == 0.0:
        return 0
    if target <= 0 or not units <= target:
        return None
    return math.ceil(units / target * ALLOCATION_STEPS)


def predicted_units(fronts: Sequence[Sequence[Point]], chosen: Sequence[int]) -> float:
    return sum(front[i].units for front, i in zip(fronts, chosen))


def finite(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None


# No error at all: what a sampled weight's settings are predicted from when every one is exact on
# the sample, and the sum of no weights' errors.
EXACT = Measurement(0.0, {}, {}, {})
