"""Splitting calibration inputs into a fitting share and a held-out share, along the batch axis.

`auto` fits its choices (probes, allocation) on some samples; a model that meets the budget on
exactly those samples may still miss it on others (a 32-sentence calibration set fits the
sentences, not the language). So it holds a share of the samples out, never measures a weight
on them, and accepts a model only when they meet the budget too.

An input's batch axis is the one its declared shape names with a symbol containing "batch",
else axis 0 of an input of rank >= 2 whose first size is dynamic (as verify.synthesize_inputs
reads shapes). Inputs without one (a sample rate, a shared state of fixed size) go whole to
both shares. The split is deterministic: every held-out sample is picked by position, spread
evenly over the batch, so the same inputs always split the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

# The share of the calibration samples auto holds out (rounded; at least one on each side).
HOLDOUT_SHARE = 0.25


@dataclass(frozen=True)
class Split:
    """The fitting inputs, the held-out inputs (None when the batch is too small to hold any
    out), and what the report says about it."""

    fitting: dict[str, np.ndarray]
    held_out: dict[str, np.ndarray] | None
    samples: int  # along the batch axis; 0 when no input has one
    held_out_rows: tuple[int, ...]
    note: str | None = None  # why nothing was held out

    def to_dict(self) -> dict:
        return {"samples": self.samples, "held_out": len(self.held_out_rows),
                "held_out_rows": list(self.held_out_rows), **({"note": self.note} if self.note else {})}


def input_batch_axes(proto: onnx.ModelProto) -> dict[str, int]:
    """Graph input name -> its batch axis, for the inputs that have one (see the docstring)."""
    initialized = {t.name for t in proto.graph.initializer}
    axes = {}
    for value in proto.graph.input:
        if value.name in initialized or not value.type.tensor_type.HasField("shape"):
            continue
        dims = value.type.tensor_type.shape.dim
        named = [axis for axis, dim in enumerate(dims) if "batch" in dim.dim_param.lower()]
        if named:
            axes[value.name] = named[0]
        elif len(dims) >= 2 and dims[0].WhichOneof("value") != "dim_value":
            axes[value.name] = 0
    return axes


def held_out_rows(samples: int, share: float = HOLDOUT_SHARE) -> tuple[int, ...]:
    """round(samples * share) positions spread evenly over the batch, at least one and at most
    samples - 1 (nothing for fewer than two samples)."""
    if samples < 2:
        return ()
    count = min(max(round(samples * share), 1), samples - 1)
    return tuple(int((j + 0.5) * samples / count) for j in range(count))


def split_inputs(proto: onnx.ModelProto, inputs: Mapping[str, np.ndarray], share: float = HOLDOUT_SHARE) -> Split:
    """The fitting and held-out shares of `inputs` (see the module docstring)."""
    everything = {name: np.asarray(value) for name, value in inputs.items()}
    axes = {name: axis for name, axis in input_batch_axes(proto).items()
            if name in everything and everything[name].ndim > axis}
    sizes = {everything[name].shape[axis] for name, axis in axes.items()}
    if not axes:
        return Split(everything, None, 0, (), "no input has a batch axis: nothing held out")
    if len(sizes) > 1:
        return Split(everything, None, 0, (), f"the inputs' batch sizes differ ({', '.join(map(str, sorted(sizes)))}): "
                     "nothing held out")
    samples = sizes.pop()
    rows = held_out_rows(samples, share)
    if not rows:
        return Split(everything, None, samples, (), f"the calibration batch holds {samples} sample: too few to hold "
                     "any out")
    kept = np.setdiff1d(np.arange(samples), rows)
    fitting = {name: np.take(value, kept, axis=axes[name]) if name in axes else value
               for name, value in everything.items()}
    held_out = {name: np.take(value, list(rows), axis=axes[name]) if name in axes else value
                for name, value in everything.items()}
    return Split(fitting, held_out, samples, rows)
