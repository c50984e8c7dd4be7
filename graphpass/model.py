"""Loading and saving models: safe external data, checked structure (graphpass.structure), atomic
deterministic writes."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto

from graphpass.download import DownloadSize, bytes_download_size, download_size
from graphpass.errors import InputError, UsageError
from graphpass.external import (MAPPABLE, copy_range, hold_inline, initializer_ids, inlined, is_mapped, map_tensor,
                                mapped_bytes, mapped_place)
from graphpass.scopes import build_scope_tree, iter_tensors
from graphpass.structure import check_structure
from graphpass.validate import TensorProblem, check_tensors, tensor_label
from graphpass.weights import stored_bytes

log = logging.getLogger(__name__)

# Protobuf cannot serialize a message of 2 GiB or more; leave headroom for the graph itself.
PROTOBUF_LIMIT = 2**31 - 2**24
# Tensors below this size stay inline when writing external data, as onnx does.
EXTERNAL_DATA_MIN_BYTES = 1024


@dataclass
class LoadedModel:
    proto: onnx.ModelProto
    path: Path | None
    file_bytes: int | None  # the model file plus its external data, as read from disk
    data_files: tuple[Path, ...] = ()  # the external data files it read or maps, in first-use order
    dynamic_minus_one: int = 0  # declared sizes of -1 read as dynamic (cleared in `proto`)

    def download_size(self) -> DownloadSize:
        """What the model costs to download: `zip -9` of its file(s), exact or estimated."""
        if self.path is None:
            return bytes_download_size(serialized_bytes(self.proto))
        return download_size([self.path, *self.data_files])


def load_model(source: str | os.PathLike | bytes | onnx.ModelProto, *, map_external: bool = False) -> LoadedModel:
    """Read a model and check it is whole; every problem becomes an InputError with one line.

    With `map_external`, initializers of EXTERNAL_DATA_MIN_BYTES or more that a model file
    keeps in external data stay there, mapped (graphpass.external): the protobuf holds none of
    their bytes, and only graphpass.weights, the writers here and `inlined` read them. Without
    it every tensor is read into the protobuf, for callers that hand it on as it is."""
    if isinstance(source, onnx.ModelProto):
        data = source.SerializeToString()
        _check_tensors(data, "model")
        check_structure(source, label="model")
        cleared = clear_minus_one_dims(source, "model")
        return LoadedModel(source, None, len(data), dynamic_minus_one=cleared)  # what it would take as a file
    if isinstance(source, bytes):
        proto = _parse(source, "model bytes")
        _check_tensors(source, "model bytes")
        check_structure(proto, label="model bytes")
        cleared = clear_minus_one_dims(proto, "model bytes")
        return LoadedModel(proto, None, len(source), dynamic_minus_one=cleared)
    path = Path(source)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not an ONNX file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    proto = _parse(data, str(path))
    _check_tensors(data, str(path))  # before external data is read: its keys and lengths are checked
    external_bytes, data_files = _load_external_data(proto, path, map_external)
    check_structure(proto, label=str(path))
    cleared = clear_minus_one_dims(proto, str(path))
    return LoadedModel(proto, path, len(data) + external_bytes, data_files, cleared)


def _parse(data: bytes, label: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError:
        raise InputError(f"{label}: not an ONNX model, or the file is truncated (protobuf cannot parse it)") from None
    if proto.ir_version <= 0 or not proto.opset_import or not proto.HasField("graph"):
        raise InputError(f"{label}: not an ONNX model (no IR version, opset or graph)")
    return proto


# A declared input size above this is no real input's: refused at load, as a negative one is.
MAX_DECLARED_DIM = 2**31 - 1


def clear_minus_one_dims(proto: onnx.ModelProto, label: str) -> int:
    """Read a declared size of -1 (older exporters' spelling of "dynamic") as dynamic, in every
    graph's inputs, outputs and value_info; return how many were cleared. onnx's shape
    inference takes -1 literally and aborts the process on some models, so it must not see one.
    A top-level input with another negative or an impossibly large size is refused."""
    cleared = 0
    for scope in build_scope_tree(proto):
        if scope.is_function:
            continue
        body = scope.body
        for kind, values in (("input", body.input), ("output", body.output), ("value", body.value_info)):
            for value in values:
                for axis, dim in enumerate(value.type.tensor_type.shape.dim):
                    if dim.WhichOneof("value") != "dim_value" or 0 <= dim.dim_value <= MAX_DECLARED_DIM:
                        continue
                    if dim.dim_value != -1 and scope.parent is None and kind == "input":
                        raise InputError(
                            f"{label}: input '{value.name}' declares size {dim.dim_value} on axis {axis}, which no "
                            f"input can have; declare it dynamic (-1 or a name) and give its size with "
                            f"--shape {value.name}=...")
                    dim.Clear()  # dynamic; elsewhere than an input it is only a hint
                    cleared += 1
    return cleared


def drop_symbolic_value_info(proto: onnx.ModelProto) -> int:
    """Remove the shapes declared on intermediate values (value_info, in every graph) that name a
    symbolic size; return how many. They are hints: runtimes infer shapes themselves, and some
    (tract) refuse a symbol they cannot unify with an input's concrete size."""
    dropped = 0
    for scope in build_scope_tree(proto):
        if scope.is_function:
            continue
        values = scope.body.value_info
        kept = [v for v in values if not any(d.HasField("dim_param") for d in v.type.tensor_type.shape.dim)]
        if len(kept) < len(values):
            dropped += len(values) - len(kept)
            del values[:]
            values.extend(kept)
    return dropped


def initializer_inputs(proto: onnx.ModelProto) -> set[str]:
    """Names of the main graph's initializers that are also its inputs: a caller may feed them."""
    graph = proto.graph
    stored = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    return stored & {value.name for value in graph.input}


def freeze_initializer_inputs(proto: onnx.ModelProto) -> int:
    """Initializers also listed as main-graph inputs made constants: dropped from the inputs, so
    that passes may rewrite them; returns how many. IR 3 requires every initializer to be an
    input (older exporters also wrote them so by default), so an IR 3 model is raised to IR 4,
    which only lifts that rule. A caller can no longer feed them."""
    graph = proto.graph
    fed = initializer_inputs(proto)
    kept = [value for value in graph.input if value.name not in fed]
    frozen = len(graph.input) - len(kept)
    if frozen:
        del graph.input[:]
        graph.input.extend(kept)
        proto.ir_version = max(proto.ir_version, 4)
    return frozen


def _check_tensors(data: bytes, label: str) -> None:
    try:
        check_tensors(data)
    except TensorProblem as exc:
        raise InputError(f"{label}: {exc}") from None


def _load_external_data(proto: onnx.ModelProto, path: Path, map_external: bool) -> tuple[int, tuple[Path, ...]]:
    """Read (or map) external tensors from the model's own folder only; return the bytes and
    files they take."""
    base = path.resolve().parent
    total, files = 0, {}
    mappable, _held = initializer_ids(proto) if map_external else (set(), [])
    for tensor in iter_tensors(proto):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        data_path = _confined_data_path(base, info.get("location", ""), path, tensor.name)
        offset = int(info.get("offset", 0) or 0)
        file_size = data_path.stat().st_size
        length = int(info["length"]) if info.get("length") else file_size - offset
        if offset < 0 or length < 0 or offset + length > file_size:
            raise InputError(
                f"{path}: external data for tensor '{tensor.name}' is short: "
                f"{data_path.name} has {file_size} bytes, needs {offset + length}"
            )
        needed = stored_bytes(tensor.data_type, tensor.dims)
        if length != needed:  # without a length key, the data runs to the end of the file
            raise InputError(
                f"{path}: tensor '{tensor.name}' declares {tensor_label(tensor)} ({needed} bytes) but its "
                f"external data in {data_path.name} from offset {offset} holds {length} bytes"
            )
        if id(tensor) in mappable and tensor.data_type in MAPPABLE and length >= EXTERNAL_DATA_MIN_BYTES:
            map_tensor(tensor, data_path, offset, length)  # small ones are read: the writer keeps them inline
        else:
            _read_into(tensor, data_path, offset, length)
        total += length
        files.setdefault(data_path, None)
    return total, tuple(files)


def _read_into(tensor: TensorProto, data_path: Path, offset: int, length: int) -> None:
    with open(data_path, "rb") as handle:
        handle.seek(offset)
        tensor.raw_data = handle.read(length)
    tensor.ClearField("data_location")
    del tensor.external_data[:]


def _confined_data_path(base: Path, location: str, path: Path, tensor_name: str) -> Path:
    if not location:
        raise InputError(f"{path}: tensor '{tensor_name}' has external data with no location")
    if os.path.isabs(location) or Path(location).is_absolute():
        raise InputError(f"{path}: external data location '{location}' is absolute; only files beside the model are read")
    resolved = (base / location).resolve()
    if not resolved.is_relative_to(base):
        raise InputError(f"{path}: external data location '{location}' escapes the model's folder")
    if not resolved.is_file():
        raise InputError(f"{path}: external data file '{location}' is missing")
    return resolved


def serialized_bytes(proto: onnx.ModelProto) -> bytes:
    """The deterministic encoding, every tensor's bytes inside it (mapped ones read in): same
    model, same bytes."""
    return inlined(proto).SerializeToString(deterministic=True)


def needs_external_data(proto: onnx.ModelProto) -> bool:
    """Whether the model, every tensor inline, is too large for protobuf."""
    return proto.ByteSize() + mapped_bytes(proto) >= PROTOBUF_LIMIT


def check_output_path(output: Path, input_path: Path | None, in_place: bool,
                      input_data_files: tuple[Path, ...] = ()) -> None:
    if input_path is None or in_place:
        return
    if _same_file(output, input_path):
        raise UsageError(f"{output}: output would overwrite the input; pass --in-place if you mean it")
    output_data = external_data_path(output)
    if any(_same_file(output_data, data) for data in input_data_files):
        raise UsageError(f"{output}: its data file {output_data.name} would overwrite the input's external data; "
                         "choose another output name")


def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


def external_data_path(model_file: Path) -> Path:
    """Where a model written with external data keeps it: `<model file>.data` beside it."""
    return model_file.with_name(model_file.name + ".data")


def save_model(proto: onnx.ModelProto, output: str | os.PathLike, *, external_data: bool = False) -> int:
    """Write atomically and return the bytes written (model file plus external data); `proto`
    comes back unchanged.

    Large tensors go to `<output>.data` when asked or when protobuf could not hold the model.
    The data file is renamed into place before the model, so a reader never sees a model whose
    data is missing; the model file itself is either whole or absent.
    """
    output = _checked_output(output)
    if not (external_data or needs_external_data(proto)):
        return _write_inline(proto, output)
    written = _ExternalWrite.start(proto, output)
    return written.finish(output, restore_into=proto)


def save_compacted(proto: onnx.ModelProto, output: str | os.PathLike, *,
                   external_data: bool = False) -> tuple[int, WrittenModel]:
    """Write as save_model does; return the bytes written and the same model in a message of its
    own, holding only what the model still holds, its large tensors still pointing at the data
    file (`WrittenModel.inline` reads them back). Drop `proto` afterwards: its large tensors are
    left pointing at the data file too.

    upb frees none of a message's memory until the whole message goes: a model the passes
    edited in place still holds every weight they replaced. The copy lets all of it go, and
    leaving the tensors in the file until someone asks for them keeps a run from holding the
    output's weights while onnxruntime holds them too, to verify it.
    """
    output = _checked_output(output)
    if not (external_data or needs_external_data(proto)):
        compact = inlined(proto)  # a copy already when it read mapped tensors in
        compact = _copied(proto) if compact is proto else compact
        return _write_inline(compact, output), WrittenModel.skeleton_of(compact)
    written = _ExternalWrite.start(proto, output)
    compact = _copied(proto)  # small: the large tensors' bytes are in the data file now
    return written.finish(output), WrittenModel(compact, written.moved)


@dataclass
class WrittenModel:
    """A written model in memory without its large tensors' bytes, which stay in what was
    written until `inline` reads them: the `moved` tensors (place in iter_tensors order, offset,
    length) still point at the data file, and with `reread` the model file holds them all."""

    proto: onnx.ModelProto
    moved: list[tuple[int, int, int]]
    reread: bool = False

    @classmethod
    def skeleton_of(cls, written: onnx.ModelProto) -> WrittenModel:
        """`written`, just saved inline, without its large tensors' bytes (`written` goes with them):
        the 1.1 B decoder's 0.52 GB output was otherwise held through verification."""
        for tensor in iter_tensors(written):
            if len(tensor.raw_data) >= EXTERNAL_DATA_MIN_BYTES:
                tensor.ClearField("raw_data")
        return cls(_copied(written), [], reread=True)  # a copy: upb frees nothing of `written` until it goes

    def inline(self, model_file: Path) -> onnx.ModelProto:
        """The model with every tensor's bytes inside it, read from `model_file` (and its data
        file) the first time."""
        if self.reread:
            self.proto, self.reread = _parse(Path(model_file).read_bytes(), str(model_file)), False
        elif self.moved:
            _restore_inline(self.moved, list(iter_tensors(self.proto)), external_data_path(model_file))
            self.moved = []
        return self.proto


def _copied(proto: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy


def _checked_output(output: str | os.PathLike) -> Path:
    output = Path(output)
    if not output.parent.is_dir():
        raise UsageError(f"{output}: folder {output.parent} does not exist")
    return output


def _write_inline(proto: onnx.ModelProto, output: Path) -> int:
    data = serialized_bytes(proto)
    _atomic_write(output, [data])
    return len(data)


@dataclass
class _ExternalWrite:
    """A model whose large tensors were streamed into a temporary data file beside the output,
    each pointed at `<output>.data` as its bytes were written (one tensor's copy held at a
    time; a mapped tensor's bytes go file to file), and serialised so. `moved` holds (place in
    iter_tensors order, offset, length); `origins` the external-data entries each mapped one
    had, by place, to point it back."""

    data_file: Path
    model_bytes: bytes
    moved: list[tuple[int, int, int]]
    origins: dict[int, list[tuple[str, str]]]

    @classmethod
    def start(cls, proto: onnx.ModelProto, output: Path) -> _ExternalWrite:
        data_name = external_data_path(output).name
        handle = tempfile.NamedTemporaryFile(dir=output.parent, prefix=f".{data_name}.", suffix=".tmp",
                                             delete=False)
        try:
            origins: dict[int, list[tuple[str, str]]] = {}
            with handle:
                try:
                    moved = _move_to_external(proto, data_name, handle, origins)
                except BaseException:
                    _point_back(origins, list(iter_tensors(proto)))
                    raise
                handle.flush()
                os.fsync(handle.fileno())
            try:
                return cls(Path(handle.name), serialized_bytes(proto), moved, origins)
            except BaseException:  # the caller's model comes back as it was
                _restore(moved, origins, list(iter_tensors(proto)), Path(handle.name))
                raise
        except BaseException:
            Path(handle.name).unlink(missing_ok=True)
            raise

    def finish(self, output: Path, *, restore_into: onnx.ModelProto | None = None) -> int:
        """Read the moved tensors' bytes back into `restore_into` (the model or a copy of it; none
        read when None), then put the data, and after it the model, in place; return the bytes
        written."""
        try:
            if restore_into is not None:
                _restore(self.moved, self.origins, list(iter_tensors(restore_into)), self.data_file)
            os.replace(self.data_file, external_data_path(output))
        except BaseException:
            self.data_file.unlink(missing_ok=True)
            raise
        _atomic_write(output, [self.model_bytes])
        return len(self.model_bytes) + sum(length for _, _, length in self.moved)


def _move_to_external(proto: onnx.ModelProto, data_name: str, sink,
                      origins: dict[int, list[tuple[str, str]]]) -> list[tuple[int, int, int]]:
    """Point large tensors at the data file as their bytes are written to `sink`; record in
    `origins` where each mapped one pointed before."""
    moved = []
    offset = 0
    for index, tensor in enumerate(iter_tensors(proto)):
        if is_mapped(tensor):
            source, start, length = mapped_place(tensor)
            copy_range(source, start, length, sink, tensor.name)
            origins[index] = [(entry.key, entry.value) for entry in tensor.external_data]
            del tensor.external_data[:]
        elif tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_DATA_MIN_BYTES:
            length = sink.write(tensor.raw_data)
            tensor.ClearField("raw_data")
        else:
            continue
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        moved.append((index, offset, length))
        offset += length
    return moved


def _restore(moved: list[tuple[int, int, int]], origins: dict[int, list[tuple[str, str]]],
             tensors: list[TensorProto], data_path: Path) -> None:
    """The model as it was before _move_to_external: mapped tensors pointed back where they
    were, the others read back inline from `data_path`."""
    _point_back(origins, tensors)
    _restore_inline([entry for entry in moved if entry[0] not in origins], tensors, data_path)


def _point_back(origins: dict[int, list[tuple[str, str]]], tensors: list[TensorProto]) -> None:
    for index, entries in origins.items():
        tensor = tensors[index]
        del tensor.external_data[:]
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in entries:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value


def _restore_inline(moved: list[tuple[int, int, int]], tensors: list[TensorProto], data_path: Path) -> None:
    with open(data_path, "rb") as source:
        for index, offset, length in moved:
            source.seek(offset)
            hold_inline(tensors[index], source.read(length))


def _atomic_write(target: Path, chunks: list[bytes]) -> None:
    handle = tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, target)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
