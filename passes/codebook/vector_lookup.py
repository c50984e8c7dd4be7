"""Lowering: the nodes that rebuild a member's weight from its codebooks (Gather, Transpose,
Reshape, Slice, Mul), how its indices are packed, and the bytes that costs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
from onnx import TensorProto

from graphpass.lowering import lookup
from graphpass.lowering.lookup import LUT_ROLE_PREFIX
from graphpass.passes.codebook.geometry import VectorLayout
from graphpass.passes.codebook.stages import Member, Stage
from graphpass.scopes import NameAllocator
from graphpass.weights import Replacement, WeightRef

# Indices packed in whole words per row (so that rows decode alone after a Gather) may cost up
# to this factor more than packed flat: a row's last word is padded (1% for the BERT's rows of
# 128 sub-vectors in words of 3), and the runtime then never rebuilds the table.
_ROW_PADDING_ALLOWANCE = 1.02


def emit_vector_lookup(r: Replacement, member: Member, stages: list[Stage], stage_labels: list[np.ndarray],
                       opset: int, ir_version: int) -> str:
    """The nodes that rebuild the member's weight; returns the value standing in for it."""
    layout, weight_type = member.layout, member.weight.dtype
    summed, words, table, digits = None, None, None, None
    row_packing = _row_packing(member, stages, opset, ir_version)
    for number, (stage, labels) in enumerate(zip(stages, stage_labels), start=1):
        suffix = "" if number == 1 else f"_stage{number}"
        table = stage.shared_name or r.stored(f"{LUT_ROLE_PREFIX}codebook{suffix}", stage.entries)
        if stage.entries.dtype != stage.values.dtype:  # cast k entries, not every weight
            table = r.node("Cast", [table], f"{LUT_ROLE_PREFIX}codebook_cast{suffix}", to=weight_type)
        if row_packing is not None and row_packing.native:  # a byte (or two) per sub-vector
            words = r.stored(f"{LUT_ROLE_PREFIX}indices{suffix}",
                             labels.reshape(layout.index_shape).astype(row_packing.dtype))
            index = r.node("Cast", [words], f"{LUT_ROLE_PREFIX}index{suffix}", to=TensorProto.INT32)
        elif row_packing is not None:  # base-k digits, each row's in whole words of its own
            words = r.stored(f"{LUT_ROLE_PREFIX}indices{suffix}",
                             lookup.pack_row_digits(labels.reshape(layout.index_shape), row_packing))
            digits = lookup.RowDigits(words, table, row_packing, layout.blocks)
            index = digits.unpack(r, words, _stored_shape(r, (layout.outer, digits.padded_length)))
        else:
            index = lookup.emit_indices(r, labels.reshape(layout.index_shape), stage.k, opset, ir_version)
        part = r.node("Gather", [table, index], f"{LUT_ROLE_PREFIX}vectors{suffix}", axis=0)
        summed = part if summed is None else r.node("Add", [summed, part], f"{LUT_ROLE_PREFIX}vectors_sum")
    out = _to_weight_shape(r, summed, layout)
    scale = None
    if member.scale is not None:
        scale = r.stored(f"{LUT_ROLE_PREFIX}scale", member.scale_entries)
        if member.scale_entries.dtype != member.scale.dtype:
            scale = r.node("Cast", [scale], f"{LUT_ROLE_PREFIX}scale_cast", to=weight_type)
        out = r.node("Mul", [out, scale], f"{LUT_ROLE_PREFIX}scaled")
    if digits is not None:
        r.row_gather = lookup.RowVectorDigits(digits, layout.shape, row_scale=scale)
    elif row_packing is not None:
        r.row_gather = lookup.RowGather(words, table, layout.dim, layout.shape, row_scale=scale)
    return out


def _row_packing(member: Member, stages: list[Stage], opset: int, ir_version: int) -> lookup.Packing | None:
    """How to pack a member's indices so that a row Gather can pick its packed rows (then only
    those rows are decoded): a byte or two per sub-vector, or base-k digits in whole words per
    row; None where that does not apply: more than one stage, sub-vectors not along whole rows,
    a scale other than per row, or whole words per row packing looser than the flat packing."""
    layout = member.layout
    if len(stages) != 1 or len(layout.shape) != 2 or layout.start != 1 or layout.padding:
        return None
    if member.scale is not None and member.scale_axis != 0:
        return None
    # Against digits, as before bit planes: a table read by row Gathers keeps rows that decode
    # alone (the runtime never rebuilds it) though planes would store its indices 6% tighter.
    flat = lookup.choose_packing(stages[0].k, opset, ir_version, planes=False)
    rows = lookup.choose_packing(stages[0].k, opset, ir_version, whole_bytes=True)
    if rows.native and rows.dtype not in (np.uint8, np.uint16):
        return None
    padded = -(-layout.blocks // rows.per_word) * rows.per_word
    row_bits, flat_bits = rows.bits_per_index * padded, flat.bits_per_index * layout.blocks
    return rows if row_bits <= flat_bits * _ROW_PADDING_ALLOWANCE else None


def _stored_shape(r: Replacement, shape: tuple[int, ...]) -> str:
    return r.stored(f"{LUT_ROLE_PREFIX}shape", np.array(shape, dtype=np.int64))


def _to_weight_shape(r: Replacement, gathered: str, layout: VectorLayout) -> str:
    """[outer, blocks, (inner,) dim] -> the weight: dim back before inner, padding cut off."""
    if layout.inner > 1:
        gathered = r.node("Transpose", [gathered], f"{LUT_ROLE_PREFIX}transposed", perm=[0, 1, 3, 2])
    if layout.padding:
        lines = _reshape(r, gathered, (layout.outer, layout.blocks * layout.dim, layout.inner))
        ends = r.stored(f"{LUT_ROLE_PREFIX}slice_ends", np.array([layout.length], dtype=np.int64))
        starts = r.stored(f"{LUT_ROLE_PREFIX}slice_starts", np.array([0], dtype=np.int64))
        axes = r.stored(f"{LUT_ROLE_PREFIX}slice_axes", np.array([1], dtype=np.int64))
        gathered = r.node("Slice", [lines, starts, ends, axes], f"{LUT_ROLE_PREFIX}unpadded")
    return _reshape(r, gathered, layout.shape)


def _reshape(r: Replacement, name: str, shape: tuple[int, ...]) -> str:
    target = r.stored(f"{LUT_ROLE_PREFIX}shape", np.array(shape, dtype=np.int64))
    return r.node("Reshape", [name, target], f"{LUT_ROLE_PREFIX}reshaped")


def dry_run(weight: WeightRef, emit: Callable[[Replacement], str]) -> lookup.LookupCost:
    """The bytes `emit` stores, counted by emitting into a replacement with names of its own,
    so the figure is exactly what applying will store and the model's names are untouched."""
    scratch = dataclasses.replace(weight, model=SimpleNamespace(names=NameAllocator(set())))
    r = Replacement(scratch)
    emit(r)
    return lookup.cost_of(r)
