"""Codebook lookups as ONNX nodes: a weight becomes `table[indices]`, computed in the graph.

Passes that share weight values (the binning passes, the codebook pass, tie(rows)) hand this
module a codebook and an index per weight; it stores both as compactly as the model's opset
allows and adds the nodes that rebuild the weight, through a `Replacement`.

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

Index packing is chosen per tensor, never raising the model's opset (see `choose_packing`):
native UINT4 (opset >= 21) and UINT2 (opset >= 25), which onnxruntime casts directly; otherwise
several indices per uint8/uint16/int32 word as base-k digits, unpacked with Div and Mod on int32
(valid from opset 11, so opset-13 models work; BitShift with BitwiseAnd was at most 20% faster
and needs opset 18). Base-k digits also pack non-power-of-two k tighter than bits: k=3 takes
1.6 bits, k=5 2.46 bits, k=8 3.2 bits per index.

What the runtime pays. Runtimes rebuild these lookups when they load a model, and each
intermediate of the rebuild is a transient copy. So a large weight with one codebook stores
tuples (a byte names m indices; one Gather over the k**m tuples rebuilds m values), a codebook
per row keeps its digits within rows, and a weight that only row Gathers read (an embedding)
is never rebuilt: the core lets each Gather decode the rows it picks (`RowGather`,
`RowDigits`, set on the Replacement as `row_gather`). See "Row-aligned storage" below.

Entry points: `emit_lookup` (scalar codebooks), `emit_row_lookup` (shared rows, Gather),
`emit_dequantize` (affine codebooks as DequantizeLinear), `emit_outliers` (exact values patched
in), `emit_indices` (packed integers for any other gather), `cost_of` (stored bytes by part).
Every tensor stored here has a role starting with `LUT_ROLE_PREFIX`, so that later runs
recognise lookup tables and leave them alone (`is_lookup_table`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from onnx import TensorProto, helper

from graphpass.weights import Replacement, WeightRef, tensor_stored_bytes

# Every stored role name starts with this; `is_lookup_table` looks for it.
LUT_ROLE_PREFIX = "lut_"
# GatherElements is opset 11 (Mod is 10, Slice with input bounds 10).
MIN_OPSET = 11
# onnxruntime's Cast from UINT4 needs opset 21 (and UINT4 needs IR 10).
UINT4_MIN_OPSET, UINT4_MIN_IR = 21, 10
# UINT2 arrived in opset 25 / IR 11; onnxruntime 1.32 casts it from opset 25 on.
UINT2_MIN_OPSET, UINT2_MIN_IR = 25, 11
# Blocked DequantizeLinear (block_size) is opset 21; per-axis scales are opset 13.
BLOCKED_DQ_MIN_OPSET, PER_AXIS_DQ_MIN_OPSET = 21, 13
# float16/bfloat16 DequantizeLinear scales are opset 19; before that scales are float32.
HALF_SCALE_DQ_MIN_OPSET = 19

_HAS_UINT2 = hasattr(TensorProto, "UINT2") and hasattr(ml_dtypes, "uint2")


# ---------------------------------------------------------------------------------------------
# Layout: which values share a codebook row
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """How a weight splits into codebook groups; see the module docstring for the views.

    `matrix` is the weight as a 2-D [rows, cols] without moving data, `channel_axis` (0 or 1)
    the matrix axis that indexes channels, and `group_size` how many values of one channel
    share a codebook row (the whole channel for per-channel, everything for per-tensor).
    """

    shape: tuple[int, ...]
    granularity: str
    matrix: tuple[int, int]
    channel_axis: int
    group_size: int

    @classmethod
    def per_tensor(cls, shape) -> Layout:
        size = _size(shape)
        return cls(tuple(shape), "tensor", (1, size), 0, size)

    @classmethod
    def per_channel(cls, shape, axis: int | None) -> Layout:
        """One row per slice along `axis`; an axis other than the first or last falls back
        to the first (a view without transposes needs the channel axis at an end)."""
        shape = tuple(shape)
        if axis is None or len(shape) < 2:
            return cls.per_tensor(shape)
        axis = axis % len(shape)
        if axis == len(shape) - 1:
            channels = shape[-1]
            return cls(shape, "channel", (_size(shape) // channels, channels), 1, _size(shape) // channels)
        channels = shape[0]
        return cls(shape, "channel", (channels, _size(shape) // channels), 0, _size(shape) // channels)

    @classmethod
    def per_group(cls, shape, axis: int | None, group_size: int) -> Layout:
        """Blocks of `group_size` values within each channel. A channel shorter than that is one
        block; a length it does not divide uses its largest divisor >= group_size / 2, or falls
        back to per-channel (check `.granularity` and `.group_size` for what was chosen)."""
        channel = cls.per_channel(shape, axis)
        if channel.granularity != "channel":
            return channel
        reduced = channel.matrix[1 - channel.channel_axis]
        size = _largest_divisor_at_most(reduced, group_size)
        if reduced <= group_size or size < max(1, group_size // 2):
            return channel
        return cls(channel.shape, "group", channel.matrix, channel.channel_axis, size)

    @property
    def channels(self) -> int:
        return self.matrix[self.channel_axis]

    @property
    def groups(self) -> int:
        return _size(self.shape) // self.group_size

    @property
    def blocks(self) -> int:
        """Groups per channel."""
        return self.matrix[1 - self.channel_axis] // self.group_size

    @property
    def view(self) -> tuple[int, ...]:
        rows, cols = self.matrix
        if self.granularity != "group":
            return (rows, cols)
        if self.channel_axis == 0:
            return (rows, self.blocks, self.group_size)
        return (self.blocks, self.group_size, cols)

    @property
    def within_axis(self) -> int:
        """The view axis along which one group's values run: GatherElements' axis."""
        if self.granularity == "group":
            return 2 if self.channel_axis == 0 else 1
        return 1 - self.channel_axis

    def split(self, array: np.ndarray) -> np.ndarray:
        """The weight as [groups, group_size], one group a row, in codebook-row order."""
        view = np.asarray(array).reshape(self.view)
        return np.moveaxis(view, self.within_axis, -1).reshape(self.groups, self.group_size)

    def merge(self, rows: np.ndarray) -> np.ndarray:
        """Inverse of `split` for any row length: [groups, m] -> the view with m on the within axis.

        With m = group_size this rebuilds a weight-sized array (labels); with m = k it lays a
        codebook out as the GatherElements table.
        """
        outer = [d for axis, d in enumerate(self.view) if axis != self.within_axis]
        stacked = np.asarray(rows).reshape(*outer, rows.shape[-1])
        return np.moveaxis(stacked, -1, self.within_axis)


def _size(shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) if len(shape) else 1


def _largest_divisor_at_most(n: int, limit: int) -> int:
    for candidate in range(min(n, limit), 0, -1):
        if n % candidate == 0:
            return candidate
    return 1


# ---------------------------------------------------------------------------------------------
# Index packing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Packing:
    """How indices below `base` are stored.

    `native`: one index per element of `dtype` (uint8, uint16, or the sub-byte UINT4/UINT2,
    which onnxruntime casts directly). Otherwise `per_word` base-`base` digits per element of
    `dtype` (uint8, uint16 or int32), unpacked with Div and Mod.
    """

    name: str
    dtype: np.dtype
    element_bits: int
    per_word: int = 1
    base: int = 0

    @property
    def native(self) -> bool:
        return self.per_word == 1

    @property
    def bits_per_index(self) -> float:
        return self.element_bits / self.per_word

    def stored_bytes(self, count: int) -> int:
        words = -(-count // self.per_word)
        return (words * self.element_bits + 7) // 8


def _native(name: str, dtype, bits: int) -> Packing:
    return Packing(name, np.dtype(dtype), bits)


# Word types for base-k digits, with the exclusive bound of a word's value. int32 words stay
# below 2**31 so that Div and Mod run on int32 without a sign problem.
_DIGIT_WORDS = ((np.uint8, 8, 2**8), (np.uint16, 16, 2**16), (np.int32, 32, 2**31))


def choose_packing(k: int, opset: int, ir_version: int, *, whole_bytes: bool = False) -> Packing:
    """The smallest storage for indices in [0, k) that the model's opset and IR can read.

    Ties go to the native types, whose unpacking is a single Cast. `whole_bytes` leaves out
    UINT4/UINT2, which onnxruntime cannot Gather rows of.
    """
    if whole_bytes:
        ir_version = min(ir_version, UINT4_MIN_IR - 1)
    if opset < MIN_OPSET:
        raise ValueError(f"lookups need opset >= {MIN_OPSET}, the model has {opset}")
    if k > 2**16:
        raise ValueError(f"at most 65536 codebook entries, got {k}")
    base = max(int(k), 2)
    candidates = [_native("uint8", np.uint8, 8) if base <= 256 else _native("uint16", np.uint16, 16)]
    if base <= 16 and opset >= UINT4_MIN_OPSET and ir_version >= UINT4_MIN_IR:
        candidates.append(_native("uint4", ml_dtypes.uint4, 4))
    if _HAS_UINT2 and base <= 4 and opset >= UINT2_MIN_OPSET and ir_version >= UINT2_MIN_IR:
        candidates.append(_native("uint2", ml_dtypes.uint2, 2))
    for dtype, bits, bound in _DIGIT_WORDS:
        per_word = _digits_per_word(base, bound)
        if per_word >= 2:
            name = f"base{base}x{per_word}/{np.dtype(dtype).name}"
            candidates.append(Packing(name, np.dtype(dtype), bits, per_word, base))
    return min(candidates, key=lambda p: (p.bits_per_index, not p.native, p.element_bits))


def _digits_per_word(base: int, bound: int) -> int:
    count = int(math.log(bound, base))
    while base ** (count + 1) <= bound:  # log() may round down an exact power
        count += 1
    while base**count > bound:
        count -= 1
    return count


def pack_indices(indices: np.ndarray, packing: Packing) -> np.ndarray:
    """The array to store: native packings keep the indices' shape, digit packings give [words, 1]
    (the trailing 1 lets Div broadcast against the digit powers without an Unsqueeze)."""
    if packing.native:
        return np.asarray(indices).astype(packing.dtype)
    flat = np.asarray(indices, dtype=np.int64).ravel()
    padded = np.zeros(-(-flat.size // packing.per_word) * packing.per_word, dtype=np.int64)
    padded[: flat.size] = flat
    powers = packing.base ** np.arange(packing.per_word, dtype=np.int64)
    words = padded.reshape(-1, packing.per_word) @ powers
    return words.astype(packing.dtype).reshape(-1, 1)


def unpack_indices(stored: np.ndarray, packing: Packing, shape) -> np.ndarray:
    """numpy mirror of the unpacking nodes (for tests and accounting checks)."""
    if packing.native:
        return np.asarray(stored).astype(np.int64).reshape(shape)
    powers = packing.base ** np.arange(packing.per_word, dtype=np.int64)
    digits = (np.asarray(stored, dtype=np.int64) // powers) % packing.base
    return digits.ravel()[: _size(shape)].reshape(shape)


def emit_indices(r: Replacement, indices: np.ndarray, k: int, opset: int, ir_version: int) -> str:
    """Store `indices` (integers in [0, k)) packed; return an int32 tensor of their shape.

    The int32 result feeds GatherElements or Gather directly.
    """
    packing = choose_packing(k, opset, ir_version)
    stored = r.stored(f"{LUT_ROLE_PREFIX}indices", pack_indices(indices, packing))
    if packing.native:
        return r.node("Cast", [stored], f"{LUT_ROLE_PREFIX}index", to=TensorProto.INT32)
    return _unpack_digits(r, stored, packing, tuple(np.shape(indices)))


def _unpack_digits(r: Replacement, stored: str, packing: Packing, shape: tuple[int, ...]) -> str:
    words = stored
    if packing.dtype != np.int32:
        words = r.node("Cast", [stored], f"{LUT_ROLE_PREFIX}words", to=TensorProto.INT32)
    powers = r.stored(f"{LUT_ROLE_PREFIX}powers", packing.base ** np.arange(packing.per_word, dtype=np.int32))
    base = r.stored(f"{LUT_ROLE_PREFIX}base", np.array(packing.base, dtype=np.int32))
    shifted = r.node("Div", [words, powers], f"{LUT_ROLE_PREFIX}shifted")  # [words, per_word]
    digits = r.node("Mod", [shifted, base], f"{LUT_ROLE_PREFIX}digits")
    count = _size(shape)
    if -(-count // packing.per_word) * packing.per_word != count:  # drop the padding digits
        flat = r.node("Reshape", [digits, _int64s(r, "flat_shape", [-1])], f"{LUT_ROLE_PREFIX}flat")
        digits = r.node(
            "Slice", [flat, _int64s(r, "starts", [0]), _int64s(r, "ends", [count])], f"{LUT_ROLE_PREFIX}trimmed"
        )
    return r.node("Reshape", [digits, _int64s(r, "index_shape", list(shape))], f"{LUT_ROLE_PREFIX}index")


def _int64s(r: Replacement, role: str, values: list[int]) -> str:
    return r.stored(f"{LUT_ROLE_PREFIX}{role}", np.array(values, dtype=np.int64))


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


def table_dtype(weight_dtype: int, requested: int) -> int:
    """The codebook's stored type: the requested one, but never wider than the weight's own
    (a float16 model keeps float16 tables; float32 entries would add nothing)."""
    if requested == TensorProto.FLOAT16 and weight_dtype in (TensorProto.FLOAT, TensorProto.DOUBLE):
        return TensorProto.FLOAT16
    return weight_dtype


def np_dtype(onnx_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(onnx_type))


def stored_table(codebook: np.ndarray, weight_dtype: int, stored_dtype: int) -> np.ndarray:
    """The codebook values as the lookup produces them: rounded to the stored type, then cast
    to the weight's type (what reconstructed weights must equal exactly)."""
    return np.asarray(codebook).astype(np_dtype(stored_dtype)).astype(np_dtype(weight_dtype))


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
        return _emit_row_aligned(r, codebook[0], labels.reshape(layout.shape), storage, stored_dtype)
    if per_row_codebooks(layout):
        return _emit_row_digits(r, codebook, labels, choose_packing(k, opset, ir_version, whole_bytes=True),
                                stored_dtype)
    index = emit_indices(r, layout.merge(labels), k, opset, ir_version)
    table = _codebook_table(r, np.asarray(layout.merge(codebook)), stored_dtype)
    values = r.node("GatherElements", [table, index], f"{LUT_ROLE_PREFIX}values", axis=layout.within_axis)
    return _reshape(r, values, layout.view, layout.shape)


def _codebook_table(r: Replacement, entries: np.ndarray, stored_dtype: int) -> str:
    table = r.stored(f"{LUT_ROLE_PREFIX}codebook", entries.astype(np_dtype(stored_dtype)))
    if stored_dtype != r.weight.dtype:  # cast the table's entries, not the n values
        table = r.node("Cast", [table], f"{LUT_ROLE_PREFIX}codebook_cast", to=r.weight.dtype)
    return table


# ---------------------------------------------------------------------------------------------
# Row-aligned storage: cheap to rebuild at load, and decodable after a row Gather
# ---------------------------------------------------------------------------------------------
#
# Runtimes rebuild a plain-op lookup when they load the model (onnxruntime constant-folds it),
# and every intermediate of that rebuild is a transient copy as large as its element type:
# the base-k digit path above widens indices to int32 (4 bytes a weight) three times over, and
# a Reshape copies the whole weight once more. On the 3-layer BERT that made peak RSS 2.6x the
# original's. A tensor-wide codebook can do better: a byte names a tuple of m indices, a table
# of all k**m tuples turns one Gather into m values, and the bytes keep the weight's rows, so
# the Gather's output is the weight itself up to merging its last two axes. Per weight, the
# rebuild's widest intermediate is then 4/m bytes of int32 index.

# A tuple table pays only where it is small beside the indices it serves.
_TUPLE_TABLE_MAX_SHARE = 1 / 16
# Below this many index bytes the rebuild is cheap whatever its form: keep the densest packing.
_ROW_STORAGE_MIN_BYTES = 16 * 1024


@dataclass(frozen=True)
class RowStorage:
    """A byte (or uint16) per `per_word` indices, indexing a table of k**per_word tuples
    (per_word 1: plain indices). `row_aligned`: the words keep the weight's rows (its last
    axis divided by per_word), so a row Gather can pick them; otherwise they run over the
    flattened weight."""

    k: int
    per_word: int
    dtype: np.dtype
    row_aligned: bool

    @property
    def name(self) -> str:
        return f"tuples/{self.dtype.name}" + (f"x{self.per_word}" if self.per_word > 1 else "")

    def table_rows(self) -> int:
        return self.k**self.per_word

    def word_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.row_aligned:
            return tuple(shape[:-1]) + (shape[-1] // self.per_word,)
        return (_size(shape) // self.per_word,)


def row_storage(k: int, layout: Layout, table_itemsize: int, opset: int, ir_version: int) -> RowStorage | None:
    """Tuple storage for a per-tensor codebook of a large weight, or None where the packed
    digits of `emit_indices` should stay: small weights (their rebuild is cheap anyway),
    codebooks per channel or group, and tuples that would store more bits per index than
    digits do (a weight the tuple width does not divide).

    Between 17 and 256 entries a byte holds one index, which stores up to 1.6 bits more than
    base-k digits (8 against 6.4 for k=64) but rebuilds without the three int32 copies the
    digits' Div and Mod make at load; size estimates see that, so auto weighs it."""
    if layout.granularity != "tensor" or not layout.shape:
        return None
    count, last = _size(layout.shape), layout.shape[-1]
    base = max(int(k), 2)
    per_word = _digits_per_word(base, 2**8) if base <= 16 else 1
    dtype = np.dtype(np.uint8 if base**per_word <= 2**8 else np.uint16)
    if base <= 16 and dtype.itemsize * 8 / per_word > choose_packing(base, opset, ir_version).bits_per_index:
        return None
    if count % per_word:
        return None
    index_bytes = count // per_word * dtype.itemsize
    if index_bytes < _ROW_STORAGE_MIN_BYTES or (
            _tuple_table_bytes(base, per_word, table_itemsize) > _TUPLE_TABLE_MAX_SHARE * index_bytes):
        return None
    return RowStorage(base, per_word, dtype, row_aligned=last % per_word == 0)


def storage_name(k: int, layout: Layout, stored_dtype: int, opset: int, ir_version: int) -> str:
    """How `emit_lookup` stores this weight's indices, for reports."""
    storage = row_storage(k, layout, np_dtype(stored_dtype).itemsize, opset, ir_version)
    if storage is not None:
        return storage.name
    if per_row_codebooks(layout):
        return "rows/" + choose_packing(k, opset, ir_version, whole_bytes=True).name
    return choose_packing(k, opset, ir_version).name


def per_row_codebooks(layout: Layout) -> bool:
    """A codebook per row of a 2-D weight: what a row Gather (an embedding) reads whole, so its
    indices are packed within rows (see `RowDigits`)."""
    return layout.granularity == "channel" and layout.channel_axis == 0 and len(layout.shape) == 2


def row_digits_bytes(k: int, layout: Layout, opset: int, ir_version: int) -> int:
    """Stored index bytes of `RowDigits`: whole words per row."""
    packing = choose_packing(k, opset, ir_version, whole_bytes=True)
    rows, length = layout.shape
    return rows * -(-length // packing.per_word) * packing.dtype.itemsize


def _emit_row_digits(r: Replacement, codebook: np.ndarray, labels: np.ndarray, packing: Packing,
                     stored_dtype: int) -> str:
    rows, length = r.weight.shape
    words = r.stored(f"{LUT_ROLE_PREFIX}indices", pack_row_digits(labels, packing))
    table = _codebook_table(r, np.asarray(codebook), stored_dtype)
    decoder = RowDigits(words, table, packing, length)
    r.row_gather = decoder
    index = decoder.unpack(r, words, _int64s(r, "index_shape", [rows, decoder.padded_length]))
    return r.node("GatherElements", [table, index], f"{LUT_ROLE_PREFIX}values", axis=1)


def pack_row_digits(labels: np.ndarray, packing: Packing) -> np.ndarray:
    """Labels [rows, length] -> words [rows, length] (native) or [rows, words, 1] (base-k
    digits within each row, least significant first, the row's end padded with zeros)."""
    labels = np.asarray(labels, dtype=np.int64)
    if packing.native:
        return labels.astype(packing.dtype)
    rows, length = labels.shape
    padded = np.zeros((rows, -(-length // packing.per_word) * packing.per_word), dtype=np.int64)
    padded[:, :length] = labels
    powers = packing.base ** np.arange(packing.per_word, dtype=np.int64)
    words = padded.reshape(rows, -1, packing.per_word) @ powers
    return words.astype(packing.dtype)[..., None]


@dataclass(frozen=True)
class RowDigits:
    """Indices packed within rows, one codebook per row: a row Gather picks the rows' words and
    their codebooks, and only those are unpacked and looked up."""

    words: str
    table: str
    packing: Packing
    length: int

    @property
    def padded_length(self) -> int:
        return -(-self.length // self.packing.per_word) * self.packing.per_word

    def unpack(self, r: Replacement, words: str, shape: str) -> str:
        """int32 indices [..., length] from words [..., w] or [..., w, 1]; `shape` is the
        unpacked digits' shape [..., padded length]."""
        index = r.node("Cast", [words], f"{LUT_ROLE_PREFIX}index", to=TensorProto.INT32)
        if self.packing.native:
            return index
        powers = r.stored(f"{LUT_ROLE_PREFIX}powers",
                          self.packing.base ** np.arange(self.packing.per_word, dtype=np.int32))
        base = r.stored(f"{LUT_ROLE_PREFIX}base", np.array(self.packing.base, dtype=np.int32))
        shifted = r.node("Div", [index, powers], f"{LUT_ROLE_PREFIX}shifted")  # [..., w, per_word]
        digits = r.node("Mod", [shifted, base], f"{LUT_ROLE_PREFIX}digits")
        index = r.node("Reshape", [digits, shape], f"{LUT_ROLE_PREFIX}row_index")
        if self.padded_length == self.length:
            return index
        return r.node("Slice", [index, _int64s(r, "starts", [0]), _int64s(r, "ends", [self.length]),
                                _int64s(r, "axes", [-1])], f"{LUT_ROLE_PREFIX}trimmed")

    def decode(self, r: Replacement, indices: str) -> str:
        """Nodes computing Gather(weight, indices, axis=0) from the stored rows."""
        words = r.node("Gather", [self.words, indices], f"{LUT_ROLE_PREFIX}gathered_words", axis=0)
        index = self.unpack(r, words, _gathered_shape(r, indices, (self.padded_length,)))
        table = r.node("Gather", [self.table, indices], f"{LUT_ROLE_PREFIX}gathered_codebooks", axis=0)
        return r.node("GatherElements", [table, index], f"{LUT_ROLE_PREFIX}gathered_values", axis=-1)


def _tuple_table_bytes(base: int, per_word: int, itemsize: int) -> int:
    return base**per_word * per_word * itemsize


def row_storage_bytes(k: int, layout: Layout, table_itemsize: int, opset: int, ir_version: int) -> int | None:
    """Stored bytes (words and table) of `row_storage`, or None where it does not apply."""
    storage = row_storage(k, layout, table_itemsize, opset, ir_version)
    if storage is None:
        return None
    words = _size(layout.shape) // storage.per_word * storage.dtype.itemsize
    return words + _tuple_table_bytes(storage.k, storage.per_word, table_itemsize)


def tuple_table(codebook: np.ndarray, storage: RowStorage) -> np.ndarray:
    """[k**m, m]: row w holds the values of the m indices whose base-k digits spell w (most
    significant first), so that Gather(table, word) yields them in order."""
    codebook = np.asarray(codebook)
    padded = np.concatenate([codebook, np.repeat(codebook[-1:], storage.k - len(codebook))])
    codes = np.arange(storage.table_rows())
    powers = storage.k ** np.arange(storage.per_word - 1, -1, -1)
    return padded[(codes[:, None] // powers) % storage.k]


def pack_rows(labels: np.ndarray, storage: RowStorage) -> np.ndarray:
    """Labels shaped like the weight -> words shaped `storage.word_shape`."""
    labels = np.asarray(labels, dtype=np.int64)
    grouped = labels.reshape(*storage.word_shape(labels.shape), storage.per_word)
    powers = storage.k ** np.arange(storage.per_word - 1, -1, -1, dtype=np.int64)
    return (grouped @ powers).astype(storage.dtype)


def _emit_row_aligned(r: Replacement, codebook: np.ndarray, labels: np.ndarray, storage: RowStorage,
                      stored_dtype: int) -> str:
    shape = tuple(r.weight.shape)
    words = r.stored(f"{LUT_ROLE_PREFIX}indices", pack_rows(labels, storage))
    table = _codebook_table(r, tuple_table(codebook, storage), stored_dtype)
    if storage.per_word == 1:
        table = _reshape(r, table, (storage.table_rows(), 1), (storage.table_rows(),))
    if storage.row_aligned:
        r.row_gather = RowGather(words, table, storage.per_word, shape)
    index = r.node("Cast", [words], f"{LUT_ROLE_PREFIX}index", to=TensorProto.INT32)
    values = r.node("Gather", [table, index], f"{LUT_ROLE_PREFIX}values", axis=0)
    word_shape = storage.word_shape(shape)
    gathered = word_shape + ((storage.per_word,) if storage.per_word > 1 else ())
    return _reshape(r, values, gathered, shape)


def _gathered_shape(r: Replacement, indices: str, tail) -> str:
    """[*indices.shape, *tail], the indices' own dimensions read at run time, so that any
    index shape (a scalar included) works."""
    index_shape = r.node("Shape", [indices], f"{LUT_ROLE_PREFIX}gathered_index_shape")
    target_tail = _int64s(r, "gathered_tail", list(tail))
    return r.node("Concat", [index_shape, target_tail], f"{LUT_ROLE_PREFIX}gathered_shape", axis=0)


@dataclass(frozen=True)
class RowGather:
    """How to decode only the rows a Gather picks: gather `words` rows, cast, look them up in
    `table` (rows of `per_word` values), merge that axis into the last one, and multiply by
    the rows' own scale where there is one (`row_scale`, [rows, 1])."""

    words: str
    table: str
    per_word: int
    shape: tuple[int, ...]
    row_scale: str | None = None

    def decode(self, r: Replacement, indices: str) -> str:
        """Nodes computing Gather(weight, indices, axis=0) from the stored rows."""
        rows = r.node("Gather", [self.words, indices], f"{LUT_ROLE_PREFIX}gathered_words", axis=0)
        index = r.node("Cast", [rows], f"{LUT_ROLE_PREFIX}gathered_index", to=TensorProto.INT32)
        values = r.node("Gather", [self.table, index], f"{LUT_ROLE_PREFIX}gathered_values", axis=0)
        if self.per_word > 1:
            # [*indices, *shape[1:-1], last/m, m] -> [*indices, *shape[1:]]
            target = _gathered_shape(r, indices, self.shape[1:])
            values = r.node("Reshape", [values, target], f"{LUT_ROLE_PREFIX}gathered_rows")
        if self.row_scale is None:
            return values
        scale = r.node("Gather", [self.row_scale, indices], f"{LUT_ROLE_PREFIX}gathered_scale", axis=0)
        return r.node("Mul", [values, scale], f"{LUT_ROLE_PREFIX}gathered_scaled")


def emit_row_lookup(r: Replacement, table: str, indices: np.ndarray, *, table_rows: int, axis: int = 0,
                    opset: int, ir_version: int) -> str:
    """The weight as `table[indices]` along `axis`: `table` is a stored [table_rows, unit] tensor,
    possibly shared with other weights, `indices` one row per unit of the weight along `axis`
    (Gather on axis 0, then reshaped, and transposed when `axis` is not 0)."""
    shape = tuple(r.weight.shape)
    index = emit_indices(r, np.asarray(indices).ravel(), table_rows, opset, ir_version)
    values = r.node("Gather", [table, index], f"{LUT_ROLE_PREFIX}values", axis=0)
    moved = (shape[axis],) + shape[:axis] + shape[axis + 1 :]
    values = _reshape(r, values, (shape[axis], r.weight.size // shape[axis]), moved)
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
    return _reshape(r, out, np.shape(matrix_q), layout.shape)


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
    count = _size(shape)
    position_type = np.uint16 if count <= 2**16 else np.int32
    positions = r.stored(f"{LUT_ROLE_PREFIX}outlier_positions", outliers.positions.astype(position_type).reshape(-1, 1))
    positions = r.node("Cast", [positions], f"{LUT_ROLE_PREFIX}outlier_index", to=TensorProto.INT64)
    exact = r.stored(f"{LUT_ROLE_PREFIX}outlier_values", outliers.values.astype(np_dtype(r.weight.dtype)).ravel())
    flat = _reshape(r, values, shape, (count,))
    patched = r.node("ScatterND", [flat, positions, exact], f"{LUT_ROLE_PREFIX}patched")
    return _reshape(r, patched, (count,), shape)


def _reshape(r: Replacement, name: str, current, target) -> str:
    if tuple(current) == tuple(target):
        return name
    return r.node("Reshape", [name, _int64s(r, "shape", list(target))], f"{LUT_ROLE_PREFIX}reshaped")


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
