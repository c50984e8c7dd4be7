"""Sub-vector geometry: a weight viewed as [outer, length, inner], cut into sub-vectors of `dim`
along the axes its reader sums over (its fan-in), and the output-channel axis a scale can use."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from onnx import NodeProto, helper

from graphpass.codec import output_channel_axis
from graphpass.weights import WeightRef


@dataclass(frozen=True)
class VectorLayout:
    """A weight viewed as [outer, length, inner]; sub-vectors of `dim` run along `length`
    (axes `start` to `stop` of the weight, flattened), zero-padded to `blocks * dim`."""

    shape: tuple[int, ...]
    start: int
    stop: int
    dim: int

    @property
    def outer(self) -> int:
        return math.prod(self.shape[: self.start])

    @property
    def length(self) -> int:
        return math.prod(self.shape[self.start : self.stop])

    @property
    def inner(self) -> int:
        return math.prod(self.shape[self.stop :])

    @property
    def blocks(self) -> int:
        return -(-self.length // self.dim)

    @property
    def padding(self) -> int:
        return self.blocks * self.dim - self.length

    @property
    def count(self) -> int:
        return self.outer * self.blocks * self.inner

    @property
    def index_shape(self) -> tuple[int, ...]:
        """One index per sub-vector; the Gather output adds `dim` as its last axis."""
        return (self.outer, self.blocks, self.inner) if self.inner > 1 else (self.outer, self.blocks)

    @property
    def axes(self) -> str:
        last = self.stop - 1
        return f"axis {self.start}" if last == self.start else f"axes {self.start}-{last}"

    def split(self, array: np.ndarray) -> np.ndarray:
        """[count, dim] sub-vectors, in index order, padded with zeros."""
        lines = np.asarray(array).reshape(self.outer, self.length, self.inner)
        if self.padding:
            lines = np.pad(lines, ((0, 0), (0, self.padding), (0, 0)))
        cut = lines.reshape(self.outer, self.blocks, self.dim, self.inner)
        return cut.transpose(0, 1, 3, 2).reshape(self.count, self.dim)

    def merge(self, vectors: np.ndarray) -> np.ndarray:
        """Inverse of `split`: the weight, padding dropped."""
        cut = np.asarray(vectors).reshape(self.outer, self.blocks, self.inner, self.dim)
        lines = cut.transpose(0, 1, 3, 2).reshape(self.outer, self.blocks * self.dim, self.inner)
        return lines[:, : self.length].reshape(self.shape)


def vector_layout(weight: WeightRef, dim: int) -> VectorLayout:
    start, stop = fan_in_axes(weight)
    return VectorLayout(tuple(weight.shape), start, stop, dim)


def fan_in_axes(weight: WeightRef) -> tuple[int, int]:
    """[start, stop) of the axes the first telling reader sums over; else the last axis."""
    rank = len(weight.shape)
    for node, index in weight.reader_nodes():
        axes = _reader_fan_in(node, index, rank)
        if axes is not None:
            return axes
    return (rank - 1, rank) if rank else (0, 0)


def _reader_fan_in(node: NodeProto, index: int, rank: int) -> tuple[int, int] | None:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMul" and index in (0, 1):
        axis = rank - 2 if index == 1 and rank >= 2 else rank - 1  # B [.., in, out], A [.., out, in]
        return axis, axis + 1
    if node.op_type == "Gemm" and index in (0, 1) and rank == 2:
        transposed = attrs.get("transB" if index == 1 else "transA", 0)
        axis = (1 if transposed else 0) if index == 1 else (0 if transposed else 1)
        return axis, axis + 1
    if node.op_type in ("Conv", "ConvTranspose") and index == 1 and rank >= 2:
        return 1, rank
    if node.op_type == "Gather" and index == 0 and rank >= 2:
        gathered = attrs.get("axis", 0) % rank  # whole slices are read: vectors run across them
        return (gathered + 1, rank) if gathered < rank - 1 else (rank - 2, rank - 1)
    return None


def channel_scale_axis(weight: WeightRef, layout: VectorLayout) -> int | None:
    """The output-channel axis a per-channel scale can use: not one the sub-vectors cross."""
    axis = output_channel_axis(weight)
    if axis is None or layout.start <= axis < layout.stop:
        return None
    return axis
