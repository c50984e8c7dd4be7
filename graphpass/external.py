"""Weights a run leaves in its input's external data file, read through memory maps.

Copying a gigabyte of external data into the protobuf at load cost a second of reading, kept
every weight resident for the whole run beside the output's, and made each read copy it again
(upb copies `raw_data` on every access, holding the GIL). A *mapped* tensor instead stays
where the input keeps it: `data_location` EXTERNAL, its `location` the absolute path of the
input's data file. graphpass.model makes such tensors at load, only for initializers and only
after confining the path to the model's folder and checking the offset and length against the
file; an input's own locations are never absolute (load refuses them), so an absolute one is
always this. Only the core sees mapped tensors:

- `tensor_array` reads one as a read-only memory map, as numpy_helper.to_array reads raw_data;
- the writer copies its bytes from that file in chunks (`copy_range`, graphpass.model);
- `inlined` gives a self-contained copy of a model for anything that hands it to a runtime.

The input's files are only ever read, and stay in place until the output is written.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphpass.errors import InputError
from graphpass.scopes import build_scope_tree, iter_tensors

# Types whose stored bytes are plain little-endian elements numpy maps as they are (not the
# packed 4-bit ones, nor strings): only these are left mapped.
MAPPABLE = frozenset({
    TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16, TensorProto.INT8,
    TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16, TensorProto.INT32, TensorProto.UINT32,
    TensorProto.INT64, TensorProto.UINT64, TensorProto.BOOL,
})

# Bytes copied per call when the kernel cannot copy file to file itself.
COPY_CHUNK_BYTES = 16 << 20


def map_tensor(tensor: TensorProto, data_path: Path, offset: int, length: int) -> None:
    """Point `tensor` at `length` bytes of `data_path` (absolute, already checked) from `offset`."""
    del tensor.external_data[:]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", str(data_path)), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def is_mapped(tensor: TensorProto) -> bool:
    if tensor.data_location != TensorProto.EXTERNAL:
        return False
    location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
    return os.path.isabs(location)


def mapped_place(tensor: TensorProto) -> tuple[Path, int, int]:
    """(data file, offset, length) of a mapped tensor."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    return Path(info["location"]), int(info["offset"]), int(info["length"])


def tensor_array(tensor: TensorProto) -> np.ndarray:
    """The tensor's value, read-only: a memory map of the data file for a mapped tensor (pages
    are read as they are touched and leave memory with the array), else numpy_helper's view."""
    if not is_mapped(tensor):
        return numpy_helper.to_array(tensor)
    path, offset, length = mapped_place(tensor)
    if path.stat().st_size < offset + length:  # numpy would refuse to map it, naming no tensor
        raise _changed(path, tensor)
    # Only tensors of EXTERNAL_DATA_MIN_BYTES or more are mapped: never an empty range, which numpy cannot map.
    return mapped_array(path, offset, tensor.data_type, tuple(tensor.dims))


def mapped_array(path: str | os.PathLike, offset: int, dtype: int, shape: tuple[int, ...]) -> np.ndarray:
    """The `shape` values of ONNX type `dtype` stored at `offset` of `path`, read-only: a plain
    ndarray over a memory map of just that range, which lives as long as the array does."""
    count = int(np.prod(shape, dtype=np.int64))
    # ONNX stores little-endian, as every machine numpy maps it on here.
    values = np.memmap(path, dtype=helper.tensor_dtype_to_np_dtype(dtype), mode="r", offset=offset, shape=(count,))
    return np.asarray(values).reshape(shape)


def mapped_tensors(proto: onnx.ModelProto) -> Iterator[TensorProto]:
    return (tensor for tensor in iter_tensors(proto) if is_mapped(tensor))


def mapped_bytes(proto: onnx.ModelProto) -> int:
    """What the mapped tensors would add to the model's size held inline."""
    return sum(mapped_place(tensor)[2] for tensor in mapped_tensors(proto))


def inline_tensor(tensor: TensorProto) -> None:
    """Read a mapped tensor's bytes into raw_data, as a load without mapping would have."""
    path, offset, length = mapped_place(tensor)
    with open(path, "rb") as source:
        source.seek(offset)
        data = source.read(length)
    if len(data) != length:
        raise _changed(path, tensor)
    hold_inline(tensor, data)


def hold_inline(tensor: TensorProto, data: bytes) -> None:
    """Make an external tensor hold `data` in raw_data, as one loaded inline does."""
    del tensor.external_data[:]
    tensor.ClearField("data_location")  # absent in a loaded tensor, so absent here: same bytes
    tensor.raw_data = data


def _changed(path: Path, tensor: TensorProto) -> InputError:
    return InputError(f"{path}: external data changed while graphpass read it (tensor '{tensor.name}')")


def inlined(proto: onnx.ModelProto) -> onnx.ModelProto:
    """`proto` itself when nothing in it is mapped, else a copy holding every tensor's bytes.

    A copy rather than an edit in place: upb would keep the bytes read into `proto` until
    `proto` goes, however the tensors are pointed back afterwards."""
    if next(mapped_tensors(proto), None) is None:
        return proto
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for tensor in mapped_tensors(copy):
        inline_tensor(tensor)
    return copy


def initializer_ids(proto: onnx.ModelProto) -> tuple[set[int], list[TensorProto]]:
    """ids of every scope's initializers (the only tensors left mapped), with the tensors
    themselves to keep those ids taken while they are compared (upb keeps one wrapper per
    message while it lives)."""
    tensors = [tensor for scope in build_scope_tree(proto) if not scope.is_function
               for tensor in scope.body.initializer]
    return {id(tensor) for tensor in tensors}, tensors


def copy_range(source: Path, offset: int, length: int, sink, label: str) -> None:
    """Append `length` bytes of `source` from `offset` to the open file `sink`, in chunks; the
    kernel copies file to file where it can (copy_file_range), without passing through here."""
    sink.flush()
    start = sink.tell()
    with open(source, "rb") as handle:
        copied = _kernel_copy(handle.fileno(), sink.fileno(), offset, start, length)
        handle.seek(offset + copied)
        sink.seek(start + copied)
        while copied < length:
            chunk = handle.read(min(COPY_CHUNK_BYTES, length - copied))
            if not chunk:
                raise InputError(f"{source}: external data changed while graphpass read it (tensor '{label}')")
            sink.write(chunk)
            copied += len(chunk)


def _kernel_copy(source: int, sink: int, offset: int, sink_offset: int, length: int) -> int:
    """Bytes copied by copy_file_range (0 where the platform or file system has none: the
    caller copies the rest through user space)."""
    if not hasattr(os, "copy_file_range"):
        return 0
    copied = 0
    try:
        while copied < length:
            done = os.copy_file_range(source, sink, length - copied, offset + copied, sink_offset + copied)
            if done == 0:  # end of the source: the caller's read finds it short and says so
                break
            copied += done
    except OSError:  # EXDEV, ENOSYS, EINVAL on some file systems: fall back, from where it stopped
        pass
    return copied
