"""The numeric budget a candidate's outputs are held to, and the one lossless pipelines get."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import onnx

from graphpass.errors import VerifyInputError


@dataclass(frozen=True)
class Budget:
    """How far candidate outputs may drift from the reference.

    Elementwise: |cand - ref| <= atol + rtol * |ref|, with a missing atol or rtol
    counted as 0. When both are None, no elementwise check runs.
    Cosine: for each float output, cosine(ref, cand) >= min_cosine (when it is set).
    """

    atol: float | None = None
    rtol: float | None = None
    min_cosine: float | None = None

    def __post_init__(self) -> None:
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise VerifyInputError(f"budget {name} must be a finite number >= 0, got {value}")
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise VerifyInputError(f"budget min_cosine must lie in [-1, 1], got {self.min_cosine}")

    @property
    def has_elementwise(self) -> bool:
        return self.atol is not None or self.rtol is not None

    def describe_elementwise(self) -> str:
        return ", ".join(f"{name}={value:g}" for name, value in
                         (("atol", self.atol), ("rtol", self.rtol)) if value is not None)

    def describe(self) -> str:
        parts = [self.describe_elementwise()]
        if self.min_cosine is not None:
            parts.append(f"min_cosine={self.min_cosine:g}")
        return ", ".join(part for part in parts if part) or "structural checks only"

    def to_dict(self) -> dict:
        return asdict(self)

    def overridden_by(self, given: Budget | None) -> Budget:
        """This budget with what the caller gave in its place: their atol/rtol replace these
        elementwise bounds (they said what drift they accept), their min_cosine is added."""
        if given is None:
            return self
        atol, rtol = (given.atol, given.rtol) if given.has_elementwise else (self.atol, self.rtol)
        cosines = [c for c in (self.min_cosine, given.min_cosine) if c is not None]
        return Budget(atol=atol, rtol=rtol, min_cosine=max(cosines) if cosines else None)


# Lossless pipelines: tie is bit-exact, but fold may reorder float operations, so
# allow a few float32 ulps of drift.
LOSSLESS_BUDGET = Budget(atol=1e-5, rtol=1e-4)
# ... or a few float16 ulps (eps 9.8e-4) when a float output is half precision: each
# reordered sum rounds to it, and a decoder's layers compound that (measured 2-4 ulps at
# the logits of the 4-layer fixtures.llm decoder).
LOSSLESS_HALF_BUDGET = Budget(atol=1e-2, rtol=1e-2)
HALF_TYPES = frozenset({onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16})


def lossless_budget(model: onnx.ModelProto) -> Budget:
    """The budget a lossless pipeline is held to, for the precision of the model's outputs."""
    outputs = {v.type.tensor_type.elem_type for v in model.graph.output}
    return LOSSLESS_HALF_BUDGET if outputs & HALF_TYPES else LOSSLESS_BUDGET
