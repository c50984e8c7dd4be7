"""Row-aligned storage: lookups cheap to rebuild at load, and decodable after a row Gather.

Runtimes rebuild a plain-op lookup when they load the model (onnxruntime constant-folds it),
and every intermediate of that rebuild is a transient copy as large as its element type:
the base-k digits of `packing` widen indices to int32 (4 bytes a weight) three times over, and
a Reshape copies the whole weight once more. On the 3-layer BERT that made peak RSS 2.6x the
original's. A tensor-wide codebook can do better: a byte names a tuple of m indices, a table
of all k**m tuples turns one Gather into m values, and the bytes keep the weight's rows, so
the Gather's output is the weight itself up to merging its last two axes. Per weight, the
rebuild's widest intermediate is then 4/m bytes of int32 index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from graphpass.lowering.layout import Layout, element_count
from graphpass.lowering.nodes import LUT_ROLE_PREFIX, int64s, np_dtype, reshape
from graphpass.lowering.packing import Packing, choose_packing, digits_per_word
from graphpass.lowering.tables import BYTE_TABLE, codebook_table
from graphpass.weights import Replacement

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
        return (element_count(shape) // self.per_word,)


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
    count, last = element_count(layout.shape), layout.shape[-1]
    base = max(int(k), 2)
    per_word = digits_per_word(base, 2**8) if base <= 16 else 1
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
    return choose_packing(k, opset, ir_version, count=element_count(layout.shape)).name


def per_row_codebooks(layout: Layout) -> bool:
    """A codebook per row of a 2-D weight: what a row Gather (an embedding) reads whole, so its
    indices are packed within rows (see `RowDigits`)."""
    return layout.granularity == "channel" and layout.channel_axis == 0 and len(layout.shape) == 2


def row_digits_bytes(k: int, layout: Layout, opset: int, ir_version: int) -> int:
    """Stored index bytes of `RowDigits`: whole words per row."""
    packing = choose_packing(k, opset, ir_version, whole_bytes=True)
    rows, length = layout.shape
    return rows * -(-length // packing.per_word) * packing.dtype.itemsize


def emit_row_digits(r: Replacement, codebook: np.ndarray, labels: np.ndarray, packing: Packing,
                     stored_dtype: int) -> str:
    rows, length = r.weight.shape
    words = r.stored(f"{LUT_ROLE_PREFIX}indices", pack_row_digits(labels, packing))
    table = codebook_table(r, np.asarray(codebook), stored_dtype)
    decoder = RowDigits(words, table, packing, length)
    r.row_gather = decoder
    index = decoder.unpack(r, words, int64s(r, "index_shape", [rows, decoder.padded_length]))
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
        return r.node("Slice", [index, int64s(r, "starts", [0]), int64s(r, "ends", [self.length]),
                                int64s(r, "axes", [-1])], f"{LUT_ROLE_PREFIX}trimmed")

    def decode(self, r: Replacement, indices: str) -> str:
        """Nodes computing Gather(weight, indices, axis=0) from the stored rows."""
        words = r.node("Gather", [self.words, indices], f"{LUT_ROLE_PREFIX}gathered_words", axis=0)
        index = self.unpack(r, words, gathered_shape(r, indices, (self.padded_length,)))
        table = r.node("Gather", [self.table, indices], f"{LUT_ROLE_PREFIX}gathered_codebooks", axis=0)
        return r.node("GatherElements", [table, index], f"{LUT_ROLE_PREFIX}gathered_values", axis=-1)


@dataclass(frozen=True)
class RowVectorDigits:
    """Sub-vector indices packed as base-k digits within each row, into one table of vectors
    [k, dim] (the codebook pass): a row Gather picks the rows' words, and only those are unpacked
    and looked up, then multiplied by the rows' own scale where there is one ([rows, 1])."""

    digits: RowDigits  # words, the vector table, packing, and indices per row
    shape: tuple[int, ...]
    row_scale: str | None = None

    def decode(self, r: Replacement, indices: str) -> str:
        """Nodes computing Gather(weight, indices, axis=0) from the stored rows."""
        digits = self.digits
        words = r.node("Gather", [digits.words, indices], f"{LUT_ROLE_PREFIX}gathered_words", axis=0)
        index = digits.unpack(r, words, gathered_shape(r, indices, (digits.padded_length,)))
        vectors = r.node("Gather", [digits.table, index], f"{LUT_ROLE_PREFIX}gathered_values", axis=0)
        values = r.node("Reshape", [vectors, gathered_shape(r, indices, self.shape[1:])],
                        f"{LUT_ROLE_PREFIX}gathered_rows")
        if self.row_scale is None:
            return values
        scale = r.node("Gather", [self.row_scale, indices], f"{LUT_ROLE_PREFIX}gathered_scale", axis=0)
        return r.node("Mul", [values, scale], f"{LUT_ROLE_PREFIX}gathered_scaled")


def _tuple_table_bytes(base: int, per_word: int, itemsize: int) -> int:
    return base**per_word * per_word * itemsize


def row_storage_bytes(k: int, layout: Layout, table_itemsize: int, opset: int, ir_version: int) -> int | None:
    """Stored bytes (words and table) of `row_storage`, or None where it does not apply."""
    storage = row_storage(k, layout, table_itemsize, opset, ir_version)
    if storage is None:
        return None
    words = element_count(layout.shape) // storage.per_word * storage.dtype.itemsize
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


def emit_row_aligned(r: Replacement, codebook: np.ndarray, labels: np.ndarray, storage: RowStorage,
                      stored_dtype: int) -> str:
    if stored_dtype == BYTE_TABLE:  # a tuple table's rows are not a codebook's
        raise ValueError("byte tables are for codebooks per channel or group; a tensor's one codebook stays float")
    shape = tuple(r.weight.shape)
    words = r.stored(f"{LUT_ROLE_PREFIX}indices", pack_rows(labels, storage))
    table = codebook_table(r, tuple_table(codebook, storage), stored_dtype)
    if storage.per_word == 1:
        table = reshape(r, table, (storage.table_rows(), 1), (storage.table_rows(),))
    if storage.row_aligned:
        r.row_gather = RowGather(words, table, storage.per_word, shape)
    index = r.node("Cast", [words], f"{LUT_ROLE_PREFIX}index", to=TensorProto.INT32)
    values = r.node("Gather", [table, index], f"{LUT_ROLE_PREFIX}values", axis=0)
    word_shape = storage.word_shape(shape)
    gathered = word_shape + ((storage.per_word,) if storage.per_word > 1 else ())
    return reshape(r, values, gathered, shape)


def gathered_shape(r: Replacement, indices: str, tail) -> str:
    """[*indices.shape, *tail], the indices' own dimensions read at run time, so that any
    index shape (a scalar included) works."""
    index_shape = r.node("Shape", [indices], f"{LUT_ROLE_PREFIX}gathered_index_shape")
    target_tail = int64s(r, "gathered_tail", list(tail))
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
            target = gathered_shape(r, indices, self.shape[1:])
            values = r.node("Reshape", [values, target], f"{LUT_ROLE_PREFIX}gathered_rows")
        if self.row_scale is None:
            return values
        scale = r.node("Gather", [self.row_scale, indices], f"{LUT_ROLE_PREFIX}gathered_scale", axis=0)
        return r.node("Mul", [values, scale], f"{LUT_ROLE_PREFIX}gathered_scaled")

