"""Every stored tensor holds what it declares: checked once, at load, on the file's own bytes.

A tensor whose data does not match its dtype and dims (raw_data a byte short, data fields empty,
dims that promise more than is stored, an unknown data_type, malformed external-data keys)
would crash a pass or a runtime much later and far from its cause. Checked here, it is one
line naming the tensor, what it declares and what it holds; passes can then trust what they
read.

The check reads the serialized model with a small wire-format walker rather than the parsed
protobuf: upb copies `raw_data` on every access, so asking the proto for each tensor's length
would copy every weight (a third of the load time of a 69 MB BERT). The walker only steps over
those bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from onnx import TensorProto

from graphpass.weights import element_bits

# Field numbers of onnx.proto3 (stable since IR version 1).
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_FUNCTION_NODE = 7
_NODE_NAME, _NODE_OP_TYPE, _NODE_ATTRIBUTE = 3, 4, 5
_ATTR_NAME, _ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS = 1, 5, 6, 10, 11
_ATTR_SPARSE_TENSOR, _ATTR_SPARSE_TENSORS = 22, 23
_SPARSE_VALUES, _SPARSE_INDICES, _SPARSE_DIMS = 1, 2, 3
_T_DIMS, _T_DATA_TYPE, _T_NAME, _T_RAW, _T_EXTERNAL, _T_LOCATION = 1, 2, 8, 9, 13, 14
_T_FLOAT, _T_INT32, _T_STRING, _T_INT64, _T_DOUBLE, _T_UINT64 = 4, 5, 6, 7, 10, 11
_ENTRY_KEY, _ENTRY_VALUE = 1, 2

# Width in bytes of one element of a packed typed field (0: varints, counted by their last bytes).
_FIELD_WIDTH = {_T_FLOAT: 4, _T_DOUBLE: 8, _T_INT32: 0, _T_INT64: 0, _T_UINT64: 0}

# Which typed field holds each dtype, and how many field entries one element takes.
_TYPED_FIELD = {
    TensorProto.FLOAT: (_T_FLOAT, 1), TensorProto.COMPLEX64: (_T_FLOAT, 2),
    TensorProto.DOUBLE: (_T_DOUBLE, 1), TensorProto.COMPLEX128: (_T_DOUBLE, 2),
    TensorProto.INT64: (_T_INT64, 1), TensorProto.STRING: (_T_STRING, 1),
    TensorProto.UINT32: (_T_UINT64, 1), TensorProto.UINT64: (_T_UINT64, 1),
}  # every other dtype lives in int32_data, one element each (sub-byte types packed)

# A tensor may declare at most this many elements (2**40, about 4 TB of float32): more is a
# corrupt dim, whatever the data says.
MAX_ELEMENTS = 1 << 40


def _known_dtypes() -> dict[int, str]:
    known = {}
    for name, value in TensorProto.DataType.items():
        if value == TensorProto.UNDEFINED:
            continue
        try:
            if value != TensorProto.STRING:
                element_bits(value)
        except (KeyError, TypeError, ValueError):
            continue  # onnx names it, but numpy has no type for it: graphpass cannot read it
        known[value] = name
    return known


KNOWN_DTYPES = _known_dtypes()


class TensorProblem(Exception):
    """One tensor is inconsistent; the message is one line for the user."""


def check_tensors(data: bytes) -> None:
    """Raise TensorProblem for the first tensor of the serialized model `data` that is not
    what it declares, wherever it lives (initializers, sparse initializers, Constant and other
    tensor attributes, If/Loop/Scan bodies, function bodies)."""
    try:
        for number, start, end in _fields(data, 0, len(data)):
            if number == _MODEL_GRAPH:
                _check_graph(data, start, end, "main")
            elif number == _MODEL_FUNCTIONS:
                _check_body(data, start, end, "function", _FUNCTION_NODE)
    except IndexError:  # a length that runs past its message: protobuf itself would refuse it
        raise TensorProblem("malformed protobuf (a field runs past the end of its message)") from None


# ---------------------------------------------------------------------------
# Walking the wire format
# ---------------------------------------------------------------------------


def _varint(view: bytes, pos: int) -> tuple[int, int]:
    byte = view[pos]
    if byte < 0x80:  # most keys and lengths fit in one byte
        return byte, pos + 1
    result, shift = byte & 0x7F, 7
    pos += 1
    while True:
        byte = view[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise TensorProblem("malformed protobuf varint")


def _fields(view: bytes, pos: int, end: int) -> list[tuple[int, int, int]]:
    """(field number, start, end) of every length-delimited field in view[pos:end]; varint
    and fixed fields are skipped (those the checks need are read by _read_tensor)."""
    found = []
    while pos < end:
        key = view[pos]
        pos += 1
        if key >= 0x80:
            key, pos = _varint(view, pos - 1)
        wire = key & 7
        if wire == 2:
            length = view[pos]
            pos += 1
            if length >= 0x80:
                length, pos = _varint(view, pos - 1)
            found.append((key >> 3, pos, pos + length))
            pos += length
        elif wire == 0:
            while view[pos] >= 0x80:
                pos += 1
            pos += 1
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise TensorProblem(f"malformed protobuf (wire type {wire})")
    return found


@dataclass
class _Tensor:
    """What one TensorProto declares and holds, read off the wire."""

    dims: list[int] = field(default_factory=list)
    data_type: int = 0
    name: str = ""
    raw_bytes: int | None = None
    entries: dict[int, int] = field(default_factory=dict)  # typed field -> entries held
    external: dict[str, str] = field(default_factory=dict)
    location: int = 0


def _read_tensor(view: bytes, pos: int, end: int) -> _Tensor:
    tensor = _Tensor()
    while pos < end:
        key, pos = _varint(view, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(view, pos)
            if number == _T_DIMS:
                tensor.dims.append(_signed(value))
            elif number == _T_DATA_TYPE:
                tensor.data_type = _signed(value)
            elif number == _T_LOCATION:
                tensor.location = value
            elif number in _FIELD_WIDTH:
                tensor.entries[number] = tensor.entries.get(number, 0) + 1
        elif wire == 2:
            length, pos = _varint(view, pos)
            chunk_end = pos + length
            if number == _T_RAW:
                tensor.raw_bytes = length
            elif number == _T_DIMS:
                tensor.dims += [_signed(v) for v in _varints(view, pos, chunk_end)]
            elif number == _T_NAME:
                tensor.name = bytes(view[pos:chunk_end]).decode("utf-8", "replace")
            elif number == _T_STRING:
                tensor.entries[number] = tensor.entries.get(number, 0) + 1
            elif number == _T_EXTERNAL:
                key_text, value_text = _entry(view, pos, chunk_end)
                tensor.external[key_text] = value_text
            elif number in _FIELD_WIDTH:
                tensor.entries[number] = tensor.entries.get(number, 0) + _packed_count(
                    view, pos, chunk_end, _FIELD_WIDTH[number])
            pos = chunk_end
        elif wire == 1:
            if number in _FIELD_WIDTH:
                tensor.entries[number] = tensor.entries.get(number, 0) + 1
            pos += 8
        elif wire == 5:
            if number in _FIELD_WIDTH:
                tensor.entries[number] = tensor.entries.get(number, 0) + 1
            pos += 4
        else:
            raise TensorProblem(f"malformed protobuf (wire type {wire})")
    return tensor


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _varints(view: bytes, pos: int, end: int) -> Iterator[int]:
    while pos < end:
        value, pos = _varint(view, pos)
        yield value


def _packed_count(view: bytes, pos: int, end: int, width: int) -> int:
    if width:
        return (end - pos) // width
    # A varint ends at each byte below 0x80.
    return int(np.count_nonzero(np.frombuffer(view[pos:end], dtype=np.uint8) < 0x80))


def _entry(view: bytes, pos: int, end: int) -> tuple[str, str]:
    key = value = ""
    for number, start, stop in _fields(view, pos, end):
        text = bytes(view[start:stop]).decode("utf-8", "replace")
        if number == _ENTRY_KEY:
            key = text
        elif number == _ENTRY_VALUE:
            value = text
    return key, value


# ---------------------------------------------------------------------------
# Scopes: where tensors live
# ---------------------------------------------------------------------------


def _check_graph(view: bytes, start: int, end: int, path: str) -> None:
    _check_body(view, start, end, path, _GRAPH_NODE)


def _check_body(view: bytes, start: int, end: int, path: str, node_field: int) -> None:
    node_index = 0
    for number, begin, stop in _fields(view, start, end):
        if number == node_field:
            _check_node(view, begin, stop, path, node_index)
            node_index += 1
        elif number == _GRAPH_INITIALIZER and node_field == _GRAPH_NODE:
            _check_tensor(view, begin, stop, _place("initializer", path))
        elif number == _GRAPH_SPARSE_INITIALIZER and node_field == _GRAPH_NODE:
            _check_sparse(view, begin, stop, _place("sparse initializer", path))


def _place(kind: str, path: str) -> str:
    return kind if path == "main" else f"{kind} in {path}"


def _check_node(view: bytes, start: int, end: int, path: str, index: int) -> None:
    fields = _fields(view, start, end)
    attributes = [(b, s) for n, b, s in fields if n == _NODE_ATTRIBUTE]
    if not attributes:
        return
    name = op_type = ""
    for number, begin, stop in fields:
        if number == _NODE_NAME:
            name = bytes(view[begin:stop]).decode("utf-8", "replace")
        elif number == _NODE_OP_TYPE:
            op_type = bytes(view[begin:stop]).decode("utf-8", "replace")
    label = name or f"{op_type}#{index}"
    for begin, stop in attributes:
        _check_attribute(view, begin, stop, path, label, op_type)


def _check_attribute(view: bytes, start: int, end: int, path: str, label: str, op_type: str) -> None:
    fields = _fields(view, start, end)
    holders = [f for f in fields if f[0] in _TENSOR_OR_GRAPH_FIELDS]
    if not holders:
        return
    attr_name = next((bytes(view[b:s]).decode("utf-8", "replace") for n, b, s in fields if n == _ATTR_NAME), "")
    where = _place(f"{op_type} node '{label}' attribute '{attr_name}'", path)
    graph_index = 0
    for number, begin, stop in holders:
        if number in (_ATTR_T, _ATTR_TENSORS):
            _check_tensor(view, begin, stop, where)
        elif number in (_ATTR_SPARSE_TENSOR, _ATTR_SPARSE_TENSORS):
            _check_sparse(view, begin, stop, where)
        elif number == _ATTR_G:
            _check_graph(view, begin, stop, f"{path}/{label}.{attr_name}")
        elif number == _ATTR_GRAPHS:
            _check_graph(view, begin, stop, f"{path}/{label}.{attr_name}[{graph_index}]")
            graph_index += 1


_TENSOR_OR_GRAPH_FIELDS = frozenset({_ATTR_T, _ATTR_TENSORS, _ATTR_SPARSE_TENSOR, _ATTR_SPARSE_TENSORS,
                                     _ATTR_G, _ATTR_GRAPHS})


def _check_sparse(view: bytes, start: int, end: int, where: str) -> None:
    parts: dict[int, _Tensor] = {}
    for number, begin, stop in _fields(view, start, end):
        if number in (_SPARSE_VALUES, _SPARSE_INDICES):
            parts[number] = _check_tensor(view, begin, stop, where)
    values, indices = parts.get(_SPARSE_VALUES), parts.get(_SPARSE_INDICES)
    if values is None or indices is None:
        raise TensorProblem(f"{where}: sparse tensor without values or indices")
    if len(values.dims) != 1 or not indices.dims or indices.dims[0] != values.dims[0]:
        raise TensorProblem(f"{where}: sparse tensor '{values.name}' has values of shape {values.dims} "
                            f"and indices of shape {indices.dims}; they must agree on the count")


# ---------------------------------------------------------------------------
# One tensor
# ---------------------------------------------------------------------------


def _check_tensor(view: bytes, start: int, end: int, where: str) -> _Tensor:
    tensor = _read_tensor(view, start, end)
    label = f"{where}: tensor '{tensor.name}'"
    dtype_name = KNOWN_DTYPES.get(tensor.data_type)
    if dtype_name is None:
        raise TensorProblem(f"{label} has data_type {tensor.data_type}, which graphpass does not know")
    if any(d < 0 for d in tensor.dims):
        raise TensorProblem(f"{label} declares negative dims {tensor.dims}")
    count = math.prod(tensor.dims)
    declared = f"{dtype_name} {tensor.dims}"
    if count > MAX_ELEMENTS:
        raise TensorProblem(f"{label} declares {declared}: {count} elements, more than any model holds")
    if tensor.location == TensorProto.EXTERNAL:
        _check_external(tensor, label, declared, count)
    elif tensor.raw_bytes is not None:
        _check_raw(tensor, label, declared, count)
    else:
        _check_typed(tensor, label, declared, count)
    return tensor


def expected_bytes(data_type: int, count: int) -> int:
    return (count * element_bits(data_type) + 7) // 8


def _check_raw(tensor: _Tensor, label: str, declared: str, count: int) -> None:
    if tensor.data_type == TensorProto.STRING:
        raise TensorProblem(f"{label} is a STRING tensor with raw_data; strings live in string_data")
    needed = expected_bytes(tensor.data_type, count)
    if tensor.raw_bytes != needed:
        raise TensorProblem(f"{label} declares {declared} ({needed} bytes) but holds {tensor.raw_bytes} bytes "
                            "of raw_data")


def _check_typed(tensor: _Tensor, label: str, declared: str, count: int) -> None:
    number, per_element = _TYPED_FIELD.get(tensor.data_type, (_T_INT32, 1))
    held = tensor.entries.get(number, 0)
    needed = count * per_element
    accepted = {needed}
    if number == _T_INT32 and tensor.data_type != TensorProto.STRING and element_bits(tensor.data_type) < 8:
        # Sub-byte types: one entry per element, or packed into bytes or into whole int32s.
        bits = element_bits(tensor.data_type)
        accepted |= {-(-count * bits // 8), -(-count * bits // 32)}
    if held not in accepted:
        field_name = _FIELD_NAMES[number]
        raise TensorProblem(f"{label} declares {declared} ({needed} values) but holds {held} in {field_name}"
                            + (" and no raw_data" if held == 0 else ""))
    others = [_FIELD_NAMES[n] for n, entries in tensor.entries.items() if n != number and entries]
    if others:
        raise TensorProblem(f"{label} declares {declared} but holds data in {', '.join(others)}, "
                            f"which is not where {declared.split()[0]} values live")


_FIELD_NAMES = {_T_FLOAT: "float_data", _T_INT32: "int32_data", _T_STRING: "string_data",
                _T_INT64: "int64_data", _T_DOUBLE: "double_data", _T_UINT64: "uint64_data"}


def _check_external(tensor: _Tensor, label: str, declared: str, count: int) -> None:
    if not tensor.external.get("location"):
        raise TensorProblem(f"{label} has external data with no location")
    for key in ("offset", "length"):
        text = tensor.external.get(key)
        if text is None or text == "":
            continue
        if not (text.isascii() and text.isdigit()):
            raise TensorProblem(f"{label} has external data {key} '{text}'; it must be a whole number of bytes")
    length = tensor.external.get("length")
    needed = expected_bytes(tensor.data_type, count) if tensor.data_type != TensorProto.STRING else None
    if needed is None:
        raise TensorProblem(f"{label} is a STRING tensor with external data; strings live in string_data")
    if length and int(length) != needed:
        raise TensorProblem(f"{label} declares {declared} ({needed} bytes) but its external data length is {length}")


def tensor_label(tensor: TensorProto) -> str:
    """What a tensor declares, as the messages above say it: `FLOAT [384, 384]`."""
    return f"{KNOWN_DTYPES.get(tensor.data_type, tensor.data_type)} {list(tensor.dims)}"
