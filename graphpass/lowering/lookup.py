"""Codebook lookups as ONNX nodes: a weight becomes `table[indices]`, computed in the graph.

Passes that share weight values (the binning passes, the codebook pass, tie(rows)) hand this
module a codebook and an index per weight; it stores both as compactly as the model's opset
allows and adds the nodes that rebuild the weight, through a `Replacement`.

This module is the lowerings' front: passes import what they need from here. The parts live in
their own modules: `layout` (which values share a codebook row), `packing` (how indices are
stored and unpacked), `tables` (how codebook entries are stored), `row_storage` (tuple tables
and rows decoded after a Gather) and `nodes` (role names and small node builders).

Layout. A weight is split into groups that each own one row of the codebook: the whole tensor,
one output channel, or a block of `group_size` values of one output channel. The weight is only
*reshaped* (never transposed) into a "view" in which one axis runs within a group, so
`GatherElements(table, indices, axis=that axis)` rebuilds it, whatever the granularity:

    tensor           view (1, n)            table (1, k)          axis 1
    channel, first   view (C, R)            table (C, k)          axis 1
    channel, last    view (R, C)            table (k, C)          axis 0
    group, first     view (C, R/g, g)       table (C, R/g, k)     axis 2
    group, last      view (R/g, g, C)       table (R/g, k, C)     axis 1

GatherElements needs no Transpose and, in onnxruntime 1.32 without graph optimisation, rebuilt a
768x3072 per-channel weight in 3.6 ms against 14.6 ms for Gather on a flat table plus per-group
offsets and 24 ms for GatherND (with ORT_ENABLE_ALL all of them are constant-folded at load).

Index packing is chosen per tensor, never raising the model's opset (`packing.choose_packing`).

What the runtime pays. Runtimes rebuild these lookups when they load a model, and each
intermediate of the rebuild is a transient copy. So a large weight with one codebook stores
tuples (a byte names m indices; one Gather over the k**m tuples rebuilds m values), a codebook
per row keeps its digits within rows, and a weight that only row Gathers read (an embedding)
is never rebuilt: the core lets each Gather decode the rows it picks (`RowGather`,
`RowDigits`, set on the Replacement as `row_gather`). See "Row-aligned storage" below.

Entry points: `emit_lookup` (scalar codebooks), `emit_row_lookup` (shared rows, Gather),
`emit_dequantize` (affine codebooks as DequantizeLinear), `emit_outliers` (exact values patched
in), `emit_row_corrections` (whole rows brought back to their exact values), `emit_indices`
(packed integers for any other gather), `cost_of` (stored bytes by part).
Every tensor stored here has a role starting with `LUT_ROLE_PREFIX`, so that later runs
recognise lookup tables and leave them alone (`is_lookup_table`).
"""

from __future__ import annotations


from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
from onnx import TensorProto

# The public names of the parts, so that passes import lookups from one place.
from graphpass.lowering.layout import Layout, element_count
from graphpass.lowering.nodes import LUT_ROLE_PREFIX, np_dtype, reshape
from graphpass.lowering.packing import (
    MIN_OPSET,
    UINT4_MIN_IR,
    UINT4_MIN_OPSET,
    Packing,
    Planes,
    choose_packing,
    emit_indices,
    pack_indices,
    unpack_indices,
)
from graphpass.lowering.row_corrections import RowCorrections, emit_row_corrections
from graphpass.lowering.row_storage import (
    RowDigits,
    RowGather,
    RowVectorDigits,
    emit_row_aligned,
    emit_row_digits,
    pack_row_digits,
    per_row_codebooks,
    row_digits_bytes,
    row_storage,
    row_storage_bytes,
    storage_name,
)
from graphpass.lowering.tables import BYTE_TABLE, codebook_table, held_table, stored_table, table_bytes, table_dtype
from graphpass.weights import Replacement, WeightRef, tensor_stored_bytes

__all__ = [
    "BLOCKED_DQ_MIN_OPSET",
    "BYTE_TABLE",
    "HALF_SCALE_DQ_MIN_OPSET",
    "LUT_ROLE_PREFIX",
    "MIN_OPSET",
    "PER_AXIS_DQ_MIN_OPSET",
    "UINT4_MIN_IR",
    "UINT4_MIN_OPSET",
    "Layout",
    "LookupCost",
    "Outliers",
    "Packing",
    "Planes",
    "RowDigits",
    "RowCorrections",
    "RowGather",
    "RowVectorDigits",
    "choose_packing",
    "compact",
    "cost_of",
    "dequantize_packing",
    "dequantize_supported",
    "emit_dequantize",
    "emit_indices",
    "emit_lookup",
    "emit_outliers",
    "emit_row_corrections",
    "emit_row_lookup",
    "held_table",
    "is_lookup_table",
    "np_dtype",
    "pack_indices",
    "pack_row_digits",
    "per_row_codebooks",
    "row_digits_bytes",
    "row_storage",
    "row_storage_bytes",
    "storage_name",
    "stored_table",
    "table_bytes",
    "table_dtype",
    "unpack_indices",
]

# Blocked DequantizeLinear (block_size) is opset 21; per-axis scales are opset 13.
BLOCKED_DQ_MIN_OPSET, PER_AXIS_DQ_MIN_OPSET = 21, 13
# float16/bfloat16 DequantizeLinear scales are opset 19; before that scales are float32.
HALF_SCALE_DQ_MIN_OPSET = 19


# ---------------------------------------------------------------------------------------------
# Lookups
# ---------------------------------------------------------------------------------------------


@dataclass
class Outliers:
    """Values kept exactly: flat positions in the weight (C order) and their values."""

    positions: np.ndarray
    values: np.ndarray


@dataclass
class LookupCost:
    """Stored bytes of one replaced weight, by part, and what they buy."""

    weights: int  # values represented
    original_bytes: int
    index_bytes: int = 0
    table_bytes: int = 0  # codebook entries, or scales and zero points of an affine lowering
    outlier_bytes: int = 0
    other_bytes: int = 0  # shapes and digit powers: a few bytes per tensor
    packing: str = ""

    @property
    def total_bytes(self) -> int:
        return self.index_bytes + self.table_bytes + self.outlier_bytes + self.other_bytes

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.total_bytes / max(self.weights, 1)

    def to_dict(self) -> dict:
        return {
            "weights": self.weights,
            "bytes_before": self.original_bytes,
            "bytes_after": self.total_bytes,
            "index_bytes": self.index_bytes,
            "table_bytes": self.table_bytes,
            "outlier_bytes": self.outlier_bytes,
            "other_bytes": self.other_bytes,
            "bits_per_weight": round(self.bits_per_weight, 3),
            "packing": self.packing,
        }


def compact(codebook: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop codebook entries no label uses, per group, so k is the most any group needs.

    A group of n values uses at most n entries, and engines pad rows (or leave merged or empty
    clusters) that nothing references; indices then pack into fewer bits. Rows stay ascending:
    the used entries keep their order and the row is padded with its last used entry.
    """
    groups, k = codebook.shape
    rows = np.arange(groups)[:, None]
    used = np.zeros((groups, k), dtype=bool)
    used[rows, labels] = True
    width = int(used.sum(axis=1).max())
    if width == k:
        return codebook, labels
    renumber = np.cumsum(used, axis=1) - 1
    new_labels = np.take_along_axis(renumber, labels.astype(np.intp), axis=1).astype(labels.dtype)
    slot = np.where(used, renumber, width)  # unused entries go to a scratch column
    packed = np.empty((groups, width + 1), dtype=codebook.dtype)
    packed[rows, slot] = codebook
    counts = used.sum(axis=1)
    last = packed[np.arange(groups), counts - 1][:, None]
    packed = np.where(np.arange(width + 1) < counts[:, None], packed, last)
    return packed[:, :width], new_labels


def emit_lookup(
    r: Replacement,
    codebook: np.ndarray,
    labels: np.ndarray,
    layout: Layout,
    *,
    stored_dtype: int | None = None,
    opset: int,
    ir_version: int,
) -> str:
    """Nodes computing the weight from a codebook [groups, k] and labels [groups, group_size]
    (in `layout.split` order); returns the output name, shaped and typed like the weight.

    A large weight with one codebook is stored row-aligned (see `row_storage`), so that its
    rebuild at load needs no wide intermediates and a reader that only gathers rows can
    decode just those rows (`Replacement.row_gather`)."""
    weight_dtype = r.weight.dtype
    stored_dtype = weight_dtype if stored_dtype is None else stored_dtype
    k = codebook.shape[1]
    storage = row_storage(k, layout, np_dtype(stored_dtype).itemsize, opset, ir_version)
    if storage is not None:
        return emit_row_aligned(r, codebook[0], labels.reshape(layout.shape), storage, stored_dtype)
    if per_row_codebooks(layout):
        return emit_row_digits(r, codebook, labels, choose_packing(k, opset, ir_version, whole_bytes=True),
                                stored_dtype)
    index = emit_indices(r, layout.merge(labels), k, opset, ir_version)
    table = codebook_table(r, np.asarray(codebook), stored_dtype, arrange=layout.merge)
    values = r.node("GatherElements", [table, index], f"{LUT_ROLE_PREFIX}values", axis=layout.within_axis)
    return reshape(r, values, layout.view, layout.shape)




def emit_row_lookup(r: Replacement, table: str, indices: np.ndarray, *, table_rows: int, axis: int = 0,
                    opset: int, ir_version: int) -> str:
    """The weight as `table[indices]` along `axis`: `table` is a stored [table_rows, unit] tensor,
    possibly shared with other weights, `indices` one row per unit of the weight along `axis`
    (Gather on axis 0, then reshaped, and transposed when `axis` is not 0)."""
    shape = tuple(r.weight.shape)
    index = emit_indices(r, np.asarray(indices).ravel(), table_rows, opset, ir_version)
    values = r.node("Gather", [table, index], f"{LUT_ROLE_PREFIX}values", axis=0)
    moved = (shape[axis],) + shape[:axis] + shape[axis + 1 :]
    values = reshape(r, values, (shape[axis], r.weight.size // shape[axis]), moved)
    if axis == 0:
        return values
    perm = list(range(1, axis + 1)) + [0] + list(range(axis + 1, len(shape)))
    return r.node("Transpose", [values], f"{LUT_ROLE_PREFIX}transposed", perm=perm)


def emit_dequantize(
    r: Replacement,
    quantized: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    layout: Layout,
    *,
    opset: int,
    ir_version: int,
) -> str:
    """DequantizeLinear for an affine codebook: w = scale * (q - zero_point) per group.

    `quantized` is [groups, group_size] in `layout.split` order with values below 16 (UINT4) or
    256 (uint8); `scale` and `zero_point` are [groups]. Per-tensor works at any opset, per-channel
    from 13, per-group (blocked) from 21. At opset >= 21 a UINT4 MatMul weight grouped along its
    input axis is what onnxruntime fuses into MatMulNBits at ORT_ENABLE_ALL: fast, but that
    kernel's default accuracy_level 4 quantizes activations to int8, so outputs drift by ~1e-2
    relative (the session option `session.qdq_matmulnbits_accuracy_level=0` avoids it).
    """
    if not dequantize_supported(layout, opset):
        raise ValueError(f"DequantizeLinear cannot express {layout.granularity} scales at opset {opset}")
    q_type = np.dtype(ml_dtypes.uint4) if dequantize_packing(quantized, opset, ir_version) == "uint4" else np.uint8
    weight_dtype = r.weight.dtype
    half_scale_ok = opset >= HALF_SCALE_DQ_MIN_OPSET and weight_dtype in (TensorProto.FLOAT16, TensorProto.BFLOAT16)
    scale_dtype = weight_dtype if half_scale_ok else TensorProto.FLOAT
    matrix_q = layout.merge(quantized).reshape(layout.matrix if layout.granularity != "tensor" else layout.shape)
    q = r.stored(f"{LUT_ROLE_PREFIX}quantized", matrix_q.astype(q_type))
    scales, zeros, attrs = _dequantize_params(layout, scale, zero_point)
    s = r.stored(f"{LUT_ROLE_PREFIX}scale", scales.astype(np_dtype(scale_dtype)))
    z = r.stored(f"{LUT_ROLE_PREFIX}zero_point", zeros.astype(q_type))
    out = r.node("DequantizeLinear", [q, s, z], f"{LUT_ROLE_PREFIX}dequantized", **attrs)
    if scale_dtype != weight_dtype:
        out = r.node("Cast", [out], f"{LUT_ROLE_PREFIX}dequantized_cast", to=weight_dtype)
    return reshape(r, out, np.shape(matrix_q), layout.shape)


def dequantize_packing(quantized: np.ndarray, opset: int, ir_version: int) -> str:
    """The type DequantizeLinear reads: UINT4 where levels fit and the opset has it, else uint8."""
    small = int(np.max(quantized, initial=0)) < 16
    return "uint4" if small and opset >= UINT4_MIN_OPSET and ir_version >= UINT4_MIN_IR else "uint8"


def dequantize_supported(layout: Layout, opset: int) -> bool:
    needed = {"tensor": 10, "channel": PER_AXIS_DQ_MIN_OPSET, "group": BLOCKED_DQ_MIN_OPSET}
    return opset >= needed[layout.granularity]


def _dequantize_params(layout: Layout, scale: np.ndarray, zero_point: np.ndarray):
    """Scales laid out for DequantizeLinear on the layout's matrix, and its attributes."""
    if layout.granularity == "tensor":
        return np.asarray(scale).reshape(()), np.asarray(zero_point).reshape(()), {}
    if layout.granularity == "channel":
        return np.asarray(scale).ravel(), np.asarray(zero_point).ravel(), {"axis": layout.channel_axis}
    blocked_axis = 1 - layout.channel_axis  # the blocks run along the reduced axis
    shape = list(layout.matrix)
    shape[blocked_axis] = layout.blocks
    # split() orders groups [channel, block] (channel first) or [block, channel] (channel last),
    # which is exactly the row-major order of this scale shape.
    attrs = {"axis": blocked_axis, "block_size": layout.group_size}
    return np.asarray(scale).reshape(shape), np.asarray(zero_point).reshape(shape), attrs


def emit_outliers(r: Replacement, values: str, outliers: Outliers, shape: tuple[int, ...]) -> str:
    """Overwrite a few positions of `values` with exact values (ScatterND on the flat tensor).

    Positions are stored as uint16 or int32 and cast to the int64 ScatterND needs: 6 (float16)
    or 8 (float32) bytes per kept value.
    """
    r.row_gather = None  # the patch applies to the whole weight, so rows cannot be decoded alone
    count = element_count(shape)
    position_type = np.uint16 if count <= 2**16 else np.int32
    positions = r.stored(f"{LUT_ROLE_PREFIX}outlier_positions", outliers.positions.astype(position_type).reshape(-1, 1))
    positions = r.node("Cast", [positions], f"{LUT_ROLE_PREFIX}outlier_index", to=TensorProto.INT64)
    exact = r.stored(f"{LUT_ROLE_PREFIX}outlier_values", outliers.values.astype(np_dtype(r.weight.dtype)).ravel())
    flat = reshape(r, values, shape, (count,))
    patched = r.node("ScatterND", [flat, positions, exact], f"{LUT_ROLE_PREFIX}patched")
    return reshape(r, patched, (count,), shape)



def cost_of(r: Replacement, packing: str = "") -> LookupCost:
    """Real stored bytes of a replacement, by part (from the tensors it stores)."""
    cost = LookupCost(weights=r.weight.size, original_bytes=r.weight.nbytes, packing=packing)
    for tensor in r.tensors:
        role = tensor.name[len(r.weight.name) + 1 :]
        nbytes = tensor_stored_bytes(tensor)
        if role.startswith((f"{LUT_ROLE_PREFIX}indices", f"{LUT_ROLE_PREFIX}quantized")):
            cost.index_bytes += nbytes
        elif role.startswith(tuple(f"{LUT_ROLE_PREFIX}{part}" for part in ("codebook", "rows", "scale", "zero_point"))):
            cost.table_bytes += nbytes
        elif role.startswith(f"{LUT_ROLE_PREFIX}outlier"):
            cost.outlier_bytes += nbytes
        else:
            cost.other_bytes += nbytes
    return cost


# ---------------------------------------------------------------------------------------------
# Recognising earlier lookups
# ---------------------------------------------------------------------------------------------

def is_lookup_table(weight: WeightRef) -> bool:
    """A tensor an earlier lookup stored: by its role name (every role here starts with
    LUT_ROLE_PREFIX; other passes' tables should too), or by structure (read only as the table
    of a GatherElements, which no exporter does with a plain weight)."""
    if f".{LUT_ROLE_PREFIX}" in weight.name:
        return True
    return bool(weight.consumers) and all(reader == ("GatherElements", 0) for reader in weight.consumers)
