"""A lossy pass's plan for one weight: what it would become, what it would cost, how to emit it.

Passes that compress weights one at a time (the binning family, codebook) implement
`WeightCodec.plan`. Their own `call` plans and applies; `auto` plans several settings per
weight, measures each reconstruction's effect on the outputs, and applies the plans it picks,
without ever writing a model it does not keep.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from onnx import NodeProto, helper

from graphpass.lowering import lookup
from graphpass.lowering.lookup import Layout
from graphpass.manager import Option, PassContext
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
    """What `auto` needs of a codec to search its settings without writing models."""

    def plan(self, ctx: PassContext, weight: WeightRef) -> Plan | str:
        """The plan for this weight, or the reason it stays as it is."""
        ...

    def expected_bytes(self, weight: WeightRef, model) -> int:
        """What a plan would store, predicted without fitting (to try cheap settings first)."""
        ...

    def effect_key(self, weight: WeightRef) -> tuple:
        """Equal for two configurations that would plan this weight the same way (a group
        longer than the channel is the channel), so that auto measures such settings once."""
        ...

    def row_local(self, weight: WeightRef) -> bool:
        """Whether each row of the weight gets codebooks of its own, so that planning some rows
        alone gives those rows exactly what planning the whole weight would."""
        ...


# Options every codec shares to choose its weights (read by WeightFilter.from_config).
WEIGHT_FILTER_OPTIONS = (
    Option("min_size", int, 1024, "leave weights with fewer values as they are", low=1),
    Option("include", str, "", "only these weights: |-separated reader op types and name patterns"),
    Option("exclude", str, "", "not these weights: |-separated reader op types and name patterns"),
)
CODEBOOK_DTYPE_OPTION = Option("codebook_dtype", str, "float32",
                               "how codebook entries are stored (never wider than the weight, and the weight's "
                               "own type where the narrower one cannot hold its values: past float16's ±65504, "
                               "or 1e-8s that it would flush to zeros)",
                               choices=("float32", "float16"))

# Ops whose float inputs are quantization parameters or already-quantized data.
_QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "MatMulInteger", "ConvInteger", "MatMulNBits", "GatherBlockQuantized", "DynamicQuantizeMatMul",
})
# (op type, input index) of inputs that are shapes, sizes, axes or index ranges, not data.
_SHAPE_LIKE_INPUTS = frozenset({
    ("Reshape", 1), ("Expand", 1), ("Tile", 1), ("ConstantOfShape", 0), ("Range", 0), ("Range", 1),
    ("Range", 2), ("Slice", 1), ("Slice", 2), ("Slice", 3), ("Slice", 4), ("Pad", 1), ("Pad", 3),
    ("Resize", 1), ("Resize", 2), ("Resize", 3), ("Upsample", 1), ("TopK", 1), ("Squeeze", 1),
    ("Unsqueeze", 1), ("Split", 1), ("OneHot", 1), ("CumSum", 1), ("Gather", 1), ("GatherElements", 1),
    ("GatherND", 1), ("ScatterND", 1), ("ScatterElements", 1), ("NonMaxSuppression", 2),
})


# ---------------------------------------------------------------------------------------------
# Which weights
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightFilter:
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    min_size: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> WeightFilter:
        return cls(_tokens(config["include"]), _tokens(config["exclude"]), config["min_size"])

    def reason_to_skip(self, weight: WeightRef) -> str | None:
        """Why this weight stays as it is, or None when it is shared."""
        if lookup.is_lookup_table(weight):
            return "a lookup table stored by an earlier run (codebook or indices)"
        if not weight.is_float:
            kind = helper.tensor_dtype_to_string(weight.dtype).removeprefix("TensorProto.").lower()
            return f"not a float tensor ({kind}): integer, quantized or index data"
        if weight.overridable:
            return "initializer is also a graph input, so a caller may override it"
        if weight.pinned:
            return weight.pinned
        if weight.consumer_ops & _QUANTIZED_OPS:
            return "read by a quantized op (" + ", ".join(sorted(weight.consumer_ops & _QUANTIZED_OPS)) + ")"
        if any(reader in _SHAPE_LIKE_INPUTS for reader in weight.consumers):
            return "read as a shape, size or index input"
        if not weight.consumers:
            return "nothing reads it"
        if weight.size < self.min_size:
            return f"{weight.size} value{'s' if weight.size != 1 else ''}, below min_size={self.min_size}"
        if self.include and not _matches(weight, self.include):
            return f"not selected by include={'|'.join(self.include)}"
        if _matches(weight, self.exclude):
            return f"excluded by exclude={'|'.join(self.exclude)}"
        return None


def _tokens(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split("|") if t.strip())


def _matches(weight: WeightRef, tokens: tuple[str, ...]) -> bool:
    return any(t in weight.consumer_ops or fnmatch.fnmatchcase(weight.name, t) for t in tokens)


# ---------------------------------------------------------------------------------------------
# Layout: the output channel of each weight
# ---------------------------------------------------------------------------------------------


def output_channel_axis(weight: WeightRef) -> int | None:
    """The axis that indexes output channels, from the first reader that tells; else axis 0."""
    rank = len(weight.shape)
    if rank < 2:
        return None
    for node, index in weight.reader_nodes():
        axis = _reader_channel_axis(node, index, rank)
        if axis is not None:
            return axis
    return 0


def _reader_channel_axis(node: NodeProto, index: int, rank: int) -> int | None:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMul":  # [.., in, out] on the right, [.., out, in] on the left
        return rank - 1 if index == 1 else rank - 2
    if node.op_type == "Gemm" and index in (0, 1):
        transposed = attrs.get("transB" if index == 1 else "transA", 0)
        return (1 - transposed) if index == 1 else transposed
    if node.op_type in ("Conv", "ConvTranspose") and index == 1:
        return 0  # Conv: [out, in, kh, kw]; ConvTranspose: input channels, the end axis nearest
    if node.op_type == "Gather" and index == 0:
        return attrs.get("axis", 0) % rank  # one row per token
    return None


def scope_opset(weight: WeightRef, model) -> int:
    """The default-domain opset the weight's nodes run at: a model-local function's own import,
    else the model's (subgraphs share it)."""
    root = list(weight.scope.ancestors())[-1]
    if root.is_function:
        for entry in root.body.opset_import:
            if entry.domain in ("", "ai.onnx"):
                return entry.version
    return model.opset


def layout_for(weight: WeightRef, granularity: str, group_size: int) -> Layout:
    if granularity == "tensor":
        return Layout.per_tensor(weight.shape)
    axis = output_channel_axis(weight)
    if granularity == "channel":
        return Layout.per_channel(weight.shape, axis)
    return Layout.per_group(weight.shape, axis, group_size)


def sqnr_figure(value: float) -> float | None:
    """Report figures stay strict JSON: an exact reconstruction (infinite SQNR) reads null."""
    return round(value, 2) if math.isfinite(value) else None


def sqnr_db(reference: np.ndarray, rebuilt: np.ndarray) -> float:
    """Signal to quantization noise of a reconstruction, in dB (inf when exact)."""
    reference = reference.astype(np.float64)
    noise = float(np.sum((reference - rebuilt) ** 2))
    signal = float(np.sum(reference**2))
    if noise == 0.0:
        return math.inf
    if not math.isfinite(noise):
        return -math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf
