"""How a codebook's entries are stored: in a float type, or a byte per entry.

A codebook per output channel or per group is a real share of a lookup's bytes: on the BERT's
30522 x 384 word embedding, 5-bit k-means per row stores 32 float16 entries a row, 1.95 MB of
its 9.77 MB. Stored as bytes, each row's entries are points of a 256-level grid spanning that
row (a float16 scale and offset per row), which nearly halves those bytes: 8.91 MB, the worst
test sentence's cosine 0.99953 against 0.99955 (bench/bench_embedding.py). From 6 bits the grid
crowds the entries (graphpass.grid.BYTE_TABLE_MAX_BITS). Codecs round their fitted entries to the
grid and rebuild the weight from the rounded values (`stored_table`), so a plan's reconstruction
is what the runtime computes, and error feedback assigns labels against those values.

A byte table is decoded by Cast, Mul and Add on the stored bytes, which runtimes fold to a
constant at load as they fold the lookup itself (never DequantizeLinear: onnxruntime keeps it
unfolded, so a Gather of its output would run at every call).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from onnx import TensorProto

from graphpass.lowering.nodes import LUT_ROLE_PREFIX, np_dtype
from graphpass.weights import Replacement

# The stored type that means "a byte per entry, with a float16 scale and offset per row".
BYTE_TABLE = TensorProto.UINT8
_LEVELS = 255
# Weights whose type a float32 decode casts to exactly as numpy rounds it (tests/test_lookup.py
# checks float32 and float16; bfloat16 keeps bfloat16 tables).
_BYTE_TABLE_WEIGHTS = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16)
# The largest rounding, relative to a table's largest entry, that a narrow table may add: a
# byte grid's is 1/255 at most, float16's 1/2048 in its normal range.
_HELD = 1 / 128


def table_dtype(weight_dtype: int, requested: int, entries: np.ndarray | None = None) -> int:
    """The codebook's stored type: the requested one, but never wider than the weight's own
    (a float16 model keeps float16 tables; float32 entries would add nothing), bytes only
    for weights their decode rebuilds exactly, and the weight's own type when the narrower
    one cannot hold `entries` (see `held_table`)."""
    if entries is None:
        return _narrowed(weight_dtype, requested)
    return held_table(weight_dtype, requested, entries)[0]


def held_table(weight_dtype: int, requested: int, entries: np.ndarray) -> tuple[int, np.ndarray]:
    """The type `table_dtype` stores `entries` in, and the values the lookup then produces
    (`stored_table`), decoded once. A narrower type is kept only where its decode is finite and
    within _HELD of the entries' largest magnitude: float16 (a byte table's scale and offset
    too) overflows past ±65504, and a float16 weight's byte row spanning nearly all of that
    range rounds past it when cast back; below 6e-5 float16 loses precision, and it flushes a
    weight of 1e-8s to zeros."""
    entries = np.atleast_1d(np.asarray(entries, dtype=np.float64))
    stored = _narrowed(weight_dtype, requested)
    if stored != weight_dtype:
        with np.errstate(all="ignore"):
            values = stored_table(entries, weight_dtype, stored)
        error = np.abs(values.astype(np.float64) - entries)
        if np.isfinite(values).all() and error.max(initial=0.0) <= _HELD * np.abs(entries).max(initial=0.0):
            return stored, values
    return weight_dtype, stored_table(entries, weight_dtype, weight_dtype)


def _narrowed(weight_dtype: int, requested: int) -> int:
    if requested == BYTE_TABLE and weight_dtype in _BYTE_TABLE_WEIGHTS:
        return BYTE_TABLE
    if requested == TensorProto.FLOAT16 and weight_dtype in (TensorProto.FLOAT, TensorProto.DOUBLE):
        return TensorProto.FLOAT16
    return weight_dtype


def table_bytes(stored_dtype: int, rows: int, k: int) -> int:
    """Bytes of a [rows, k] codebook stored as `stored_dtype`."""
    if stored_dtype == BYTE_TABLE:
        return rows * k + rows * 2 * np.dtype(np.float16).itemsize
    return rows * k * np_dtype(stored_dtype).itemsize


def stored_table(codebook: np.ndarray, weight_dtype: int, stored_dtype: int) -> np.ndarray:
    """The codebook values as the lookup produces them: rounded to the stored type, then cast
    to the weight's type (what reconstructed weights must equal exactly). A byte table's rows
    are the last axis."""
    if stored_dtype == BYTE_TABLE:
        return decoded(*byte_rows(codebook)).astype(np_dtype(weight_dtype))
    return np.asarray(codebook).astype(np_dtype(stored_dtype)).astype(np_dtype(weight_dtype))


def byte_rows(codebook: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bytes, scale, offset) per row of the last axis: entry = byte * scale + offset, in
    float32, with scale and offset float16 ([..., 1]). The row's smallest entry is the offset
    itself, and the largest within a scale's rounding of its own value."""
    values = np.asarray(codebook, dtype=np.float64)
    low = values.min(axis=-1, keepdims=True).astype(np.float16)
    spread = values.max(axis=-1, keepdims=True) - low.astype(np.float64)
    scale = np.where(spread > 0, spread / _LEVELS, 1.0).astype(np.float16)
    scale = np.where(scale > 0, scale, np.float16(np.finfo(np.float16).smallest_subnormal))
    steps = (values - low.astype(np.float32)) / scale.astype(np.float32)
    return np.clip(np.rint(steps), 0, _LEVELS).astype(np.uint8), scale, low


def decoded(q: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """The float32 entries the emitted nodes compute: Cast, Mul, Add, each rounded as float32."""
    return q.astype(np.float32) * scale.astype(np.float32) + offset.astype(np.float32)


def codebook_table(r: Replacement, entries: np.ndarray, stored_dtype: int,
                   arrange: Callable[[np.ndarray], np.ndarray] = np.asarray) -> str:
    """The codebook [rows, k] stored in `stored_dtype` and read as the weight's type;
    `arrange` lays out any [rows, m] array as the lookup's table (a layout's `merge`)."""
    if stored_dtype == BYTE_TABLE:
        return _byte_table(r, entries, arrange)
    table = r.stored(f"{LUT_ROLE_PREFIX}codebook", np.asarray(arrange(entries)).astype(np_dtype(stored_dtype)))
    if stored_dtype != r.weight.dtype:  # cast the table's entries, not the n values
        table = r.node("Cast", [table], f"{LUT_ROLE_PREFIX}codebook_cast", to=r.weight.dtype)
    return table


def _byte_table(r: Replacement, entries: np.ndarray, arrange: Callable[[np.ndarray], np.ndarray]) -> str:
    q, scale, offset = byte_rows(entries)
    stored = r.stored(f"{LUT_ROLE_PREFIX}codebook", np.asarray(arrange(q)))

    def as_float32(role: str, tensor: str) -> str:
        return r.node("Cast", [tensor], f"{LUT_ROLE_PREFIX}{role}", to=TensorProto.FLOAT)

    scales = as_float32("codebook_scale_cast", r.stored(f"{LUT_ROLE_PREFIX}codebook_scale", np.asarray(arrange(scale))))
    offsets = as_float32("codebook_offset_cast", r.stored(f"{LUT_ROLE_PREFIX}codebook_offset",
                                                          np.asarray(arrange(offset))))
    steps = r.node("Mul", [as_float32("codebook_cast", stored), scales], f"{LUT_ROLE_PREFIX}codebook_steps")
    table = r.node("Add", [steps, offsets], f"{LUT_ROLE_PREFIX}codebook_values")
    if r.weight.dtype != TensorProto.FLOAT:
        table = r.node("Cast", [table], f"{LUT_ROLE_PREFIX}codebook_values_cast", to=r.weight.dtype)
    return table
