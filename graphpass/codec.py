"""A lossy pass's plan for one weight: what it would become, what it would cost, how to emit it.

Passes that compress weights one at a time (the binning family, codebook) implement
`WeightCodec.plan`. Their own `call` plans and applies; `auto` plans several settings per
weight, measures each reconstruction's effect on the outputs, and applies the plans it picks,
without ever writing a model it does not keep.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from graphpass.manager import PassContext
from graphpass.weights import Replacement, WeightRef


@dataclass
class Plan:
    weight: WeightRef
    reconstruction: np.ndarray  # exactly what the emitted nodes compute, in the weight's dtype and shape
    stored_bytes: int  # what the replacement stores: indices, tables, scales, shapes
    emit: Callable[[Replacement], str]  # adds the nodes; returns the value that stands in for the weight
    details: dict[str, Any] = field(default_factory=dict)

    def apply(self) -> None:
        r = Replacement(self.weight)
        self.weight.replace_with(r, result=self.emit(r))


class WeightCodec(Protocol):
    def plan(self, ctx: PassContext, weight: WeightRef) -> Plan | str:
        """The plan for this weight, or the reason it stays as it is."""
        ...
