"""Weights named by where their bytes are, so that a task on another machine reads them itself.

A model too large for one machine cannot be shipped weight by weight from the client to the
workers of a cluster. A per-tensor task sent there (graphpass.parallel.Workers.map_remote)
names its weight instead: `StoredWeight` is the external data file, offset, length, type and
shape of one initializer, which any worker that sees the file (a shared or copied folder) reads
on its own, a memory map of just that range. Weights the file does not hold (inline tensors,
or a model without external data) travel as `InlineWeight`, their values in the task.

Which weights are streamed comes from the input model's own external-data table, read once
(`stored_weights`). A pass that changes a weight's values always stores the result under a new
name (graphpass.edit: replacements, shared tensors), so a weight still under a stored name and
with the stored type and shape still holds the stored bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from graphpass.external import MAPPABLE, mapped_array
from graphpass.weights import WeightRef


@dataclass(frozen=True)
class StoredWeight:
    """One weight's bytes in an external data file: a few numbers, whatever the weight's size."""

    path: str  # absolute, as the workers see it
    offset: int
    dtype: int  # onnx TensorProto type
    shape: tuple[int, ...]

    def read(self) -> np.ndarray:
        return mapped_array(self.path, self.offset, self.dtype, self.shape)


@dataclass(frozen=True)
class InlineWeight:
    """A weight the file holds inline, or a model read without external data: its values travel."""

    values: np.ndarray

    def read(self) -> np.ndarray:
        return self.values


WeightSource = StoredWeight | InlineWeight


def stored_weights(model_path: str | os.PathLike | None) -> dict[str, StoredWeight]:
    """The main graph's initializers that the model file keeps in external data, by name."""
    if model_path is None:
        return {}
    model_path = Path(model_path).resolve()
    proto = onnx.load(str(model_path), load_external_data=False)
    found = {}
    for tensor in proto.graph.initializer:
        if tensor.data_location != TensorProto.EXTERNAL or tensor.data_type not in MAPPABLE:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        shape = tuple(int(d) for d in tensor.dims)
        # graphpass.model.load_model has checked the location stays beside the model, and the length.
        found[tensor.name] = StoredWeight(str(model_path.parent / info["location"]), int(info.get("offset", 0)),
                                          tensor.data_type, shape)
    return found


def source_of(weight: WeightRef, stored: dict[str, StoredWeight]) -> WeightSource:
    """Where a task finds this weight's values: the file when it still holds them, else inline."""
    place = stored.get(weight.name)
    main_graph = weight.scope.parent is None and not weight.scope.is_function
    if (place is not None and main_graph and weight.source == "initializer" and place.dtype == weight.dtype
            and place.shape == tuple(weight.shape)):
        return place
    return InlineWeight(np.asarray(weight.read()))
