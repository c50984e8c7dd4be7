"""The inputs models run on, for verification and for the passes that calibrate on them: --shape
specs, an .npz of real inputs, or values synthesized from the model's declared inputs so that the
model makes sense of them (token ids inside the table they index, masks of ones, lengths that fit
the padded axis)."""

from __future__ import annotations

import os
import re
import zlib
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from graphpass.errors import VerifyInputError
from graphpass.metrics import is_float_dtype

# Input synthesis defaults.
BATCH_DIM = 1
DEFAULT_DYNAMIC_DIM = 16
# Largest declared input size taken at face value; a bigger one is a corrupt or placeholder dim.
MAX_INPUT_DIM = 2**31 - 1
# Largest input generated for verification (1 GiB of float32).
MAX_SYNTHESIZED_ELEMENTS = 2**28
SMALL_INT_HIGH = 4          # other integer inputs take values in [0, SMALL_INT_HIGH)
FALLBACK_TABLE_ROWS = 2     # Gather indices when the table size cannot be resolved
SAMPLE_RATE_NAMES = frozenset({"sr", "sample_rate"})
SAMPLE_RATE = 16000
# Ops that carry index values through unchanged, so that an input reaching a
# Gather's indices through them still has to stay inside the table.
INDEX_PASSTHROUGH_OPS = frozenset(
    {"Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity", "Expand"})
# Ops whose output has the same shape as input 0. Used to find a Gather table's
# size when the table is, e.g., a dequantised or cast initializer.
SHAPE_PRESERVING_OPS = frozenset({"Cast", "Identity", "DequantizeLinear"})
_LENGTH_NAME = re.compile(r"length|(?:^|[_.])(?:seq_?)?lens?(?:[_.]|$)")


# ---------------------------------------------------------------------------
# Shapes and inputs
# ---------------------------------------------------------------------------


def parse_shapes(specs: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parse --shape specs such as "input_ids=1x128" (commas are also accepted between
    dims). Zero-sized dims are allowed, e.g. an empty KV cache "past=1x8x0x64"."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, dims = _split_shape_spec(spec)
        if name in shapes:
            raise VerifyInputError(f"bad --shape {spec!r}: input {name!r} given twice")
        shapes[name] = dims
    return shapes


def _split_shape_spec(spec: str) -> tuple[str, tuple[int, ...]]:
    # rpartition: input names may contain '=' in theory, dims never do.
    name, sep, dims_text = spec.rpartition("=")
    name = name.strip()
    parts = [part.strip() for part in re.split(r"[xX,]", dims_text)]
    if not sep or not name or not all(part.isdigit() for part in parts):
        raise VerifyInputError(
            f"bad --shape {spec!r}: expected NAME=DIMxDIM..., e.g. input_ids=1x128")
    return name, tuple(int(part) for part in parts)


def load_inputs(npz_path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an .npz file whose keys are input names."""
    try:
        with np.load(npz_path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as exc:
        raise VerifyInputError(f"cannot read inputs from {npz_path}: {_one_line(exc)}") from exc



def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def synthesize_inputs(
    model: onnx.ModelProto,
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    default_dim: int | None = None,
) -> dict[str, np.ndarray]:
    """Make deterministic values for every graph input that is not an initializer.

    Shapes: a `shapes` entry gives an input's whole shape. Symbolic dims named in an
    override apply to every input that shares the symbol. A remaining dynamic dim is
    batch-like, and gets BATCH_DIM, when its symbol contains "batch" or sits on axis 0
    of an input of rank >= 2. Every other dynamic dim gets `default_dim` (16). A symbol
    gets one value across all inputs.

    Values. Each input has its own generator, seeded from (seed, crc32(name)), so
    adding an input changes no other input's values. Rules, first match wins:
      1. name contains "mask"                   -> ones
      2. bool                                   -> random True/False
      3. float (incl. float16/bfloat16)         -> N(0, 1) cast to the dtype
      4. integer reaching a Gather's indices    -> [0, table rows along the axis)
         (directly or through INDEX_PASSTHROUGH_OPS; FALLBACK_TABLE_ROWS if unknown)
      5. 0-d integer named sr / sample_rate     -> 16000
      6. integer whose name says length/len/lens -> the smallest non-batch dynamic dim
         chosen above (default_dim if none), so a length never exceeds a padded axis
      7. other 0-d integer                      -> 1
      8. other integer                          -> [0, SMALL_INT_HIGH)
    """
    default_dim = DEFAULT_DYNAMIC_DIM if default_dim is None else int(default_dim)
    if default_dim < 1:
        raise VerifyInputError(f"default_dim must be >= 1, got {default_dim}")
    feeds = _feedable_inputs(model.graph)
    overrides = {name: tuple(int(d) for d in dims) for name, dims in (shapes or {}).items()}
    unknown = sorted(set(overrides) - {vi.name for vi in feeds})
    if unknown:
        raise VerifyInputError(f"--shape names unknown input(s): {', '.join(unknown)}; "
                               f"model inputs: {', '.join(vi.name for vi in feeds) or 'none'}")
    resolved, sequence_dims = _resolve_shapes(feeds, overrides, default_dim)
    index_bounds = _gather_index_bounds(model.graph, [vi.name for vi in feeds])
    length_fill = min(sequence_dims, default=default_dim)
    return {
        vi.name: _synthesize_value(
            vi.name, _input_dtype(vi), resolved[vi.name],
            np.random.default_rng([seed, zlib.crc32(vi.name.encode())]),
            index_bounds.get(vi.name), length_fill)
        for vi in feeds
    }


def _feedable_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    # Inputs that are also initializers have default values, so they need no data.
    initialized = {t.name for t in graph.initializer} | {
        t.values.name for t in graph.sparse_initializer}
    return [vi for vi in graph.input if vi.name not in initialized]


def _input_dtype(value_info: onnx.ValueInfoProto) -> np.dtype:
    kind = value_info.type.WhichOneof("value")
    elem_type = value_info.type.tensor_type.elem_type if kind == "tensor_type" else 0
    if not elem_type:
        raise VerifyInputError(f"cannot synthesize input {value_info.name!r} "
                               f"(type {kind or 'unknown'}); pass --inputs")
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):
        raise VerifyInputError(f"input {value_info.name!r} declares element type {elem_type}, "
                               "which onnx does not know; pass --inputs") from None


def _declared_dims(value_info: onnx.ValueInfoProto) -> list[int | str | None] | None:
    """Dims as int (static), str (symbol) or None (anonymous dynamic); None if rank unknown.

    Older exporters write -1 for a dynamic size: it is read as one. Any other negative size,
    or one no input could have, is refused with the input's name."""
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims: list[int | str | None] = []
    for axis, dim in enumerate(tensor_type.shape.dim):
        which = dim.WhichOneof("value")
        if which != "dim_value":
            dims.append(dim.dim_param or None)
        elif dim.dim_value == -1:
            dims.append(None)
        elif not 0 <= dim.dim_value <= MAX_INPUT_DIM:
            raise VerifyInputError(
                f"input {value_info.name!r} declares size {dim.dim_value} on axis {axis}, which no input can have; "
                f"pass --shape {value_info.name}=... (or real data with --inputs)")
        else:
            dims.append(dim.dim_value)
    return dims


def _checked_size(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A synthesized input must fit in memory: refuse one that would not, naming it."""
    count = int(np.prod(shape, dtype=object)) if shape else 1
    if count > MAX_SYNTHESIZED_ELEMENTS:
        raise VerifyInputError(
            f"input {name!r} of shape {list(shape)} would hold {count} values, too many to generate; "
            f"pass --shape {name}=... with smaller sizes (or real data with --inputs)")
    return shape


def _resolve_shapes(feeds, overrides, default_dim):
    """Return ({input: shape}, [sizes chosen for non-batch dynamic dims])."""
    declared = {vi.name: _declared_dims(vi) for vi in feeds}
    symbols = _symbols_from_overrides(declared, overrides)
    batch_symbols = _batch_like_symbols(declared.values())
    shapes: dict[str, tuple[int, ...]] = {}
    sequence_dims: list[int] = []
    for name, dims in declared.items():
        if name in overrides:
            shapes[name] = _checked_override(name, dims, overrides[name])
        elif dims is None:
            raise VerifyInputError(f"input {name!r} has no declared shape; pass --shape {name}=...")
        else:
            shapes[name] = tuple(_default_size(dim, axis, len(dims), symbols, batch_symbols, default_dim)
                                 for axis, dim in enumerate(dims))
        shapes[name] = _checked_size(name, shapes[name])
        sequence_dims += _non_batch_dynamic_sizes(dims, shapes[name], batch_symbols)
    return shapes, sequence_dims


def _symbols_from_overrides(declared, overrides) -> dict[str, int]:
    symbols: dict[str, int] = {}
    for name, shape in overrides.items():
        dims = declared.get(name) or []
        if len(dims) == len(shape):
            for dim, size in zip(dims, shape):
                if isinstance(dim, str):
                    symbols.setdefault(dim, size)
    return symbols


def _batch_like_symbols(all_dims: Iterable[list | None]) -> set[str]:
    batch = set()
    for dims in all_dims:
        for axis, dim in enumerate(dims or []):
            if isinstance(dim, str) and ("batch" in dim.lower() or (axis == 0 and len(dims) >= 2)):
                batch.add(dim)
    return batch


# A dim named as a sum of symbols and numbers, e.g. "past_sequence_length + 1".
_SUM_OF_DIMS = re.compile(r"\s*(?:[A-Za-z_][\w.]*|\d+)(?:\s*\+\s*(?:[A-Za-z_][\w.]*|\d+))+\s*")


def _is_batch_like(dim, axis: int, rank: int, batch_symbols: set[str]) -> bool:
    if isinstance(dim, str):
        return dim in batch_symbols
    return axis == 0 and rank >= 2


def _default_size(dim, axis, rank, symbols, batch_symbols, default_dim) -> int:
    if isinstance(dim, int):
        return dim
    if isinstance(dim, str) and dim in symbols:
        return symbols[dim]
    if isinstance(dim, str) and _SUM_OF_DIMS.fullmatch(dim):
        # Exporters name a KV-cache model's total length "past_sequence_length + sequence_length"
        # (optimum): it must equal the sum of its parts wherever those appear.
        parts = [p.strip() for p in dim.split("+")]
        size = sum(int(p) if p.isdigit() else _default_size(p, axis, rank, symbols, batch_symbols, default_dim)
                   for p in parts)
        symbols[dim] = size
        return size
    size = BATCH_DIM if _is_batch_like(dim, axis, rank, batch_symbols) else default_dim
    if isinstance(dim, str):
        symbols[dim] = size  # every later use of this symbol gets the same size
    return size


def _non_batch_dynamic_sizes(dims, shape, batch_symbols) -> list[int]:
    if dims is None or len(dims) != len(shape):
        return []
    # Zero-sized axes (an empty KV cache) say nothing about sequence lengths.
    return [size for axis, (dim, size) in enumerate(zip(dims, shape))
            if size > 0 and not isinstance(dim, int)
            and not _is_batch_like(dim, axis, len(dims), batch_symbols)]


def _checked_override(name, dims, shape) -> tuple[int, ...]:
    if dims is None:
        return shape
    if len(dims) != len(shape):
        raise VerifyInputError(f"--shape {name}: model input has rank {len(dims)}, got {len(shape)} dims")
    for axis, (dim, size) in enumerate(zip(dims, shape)):
        if isinstance(dim, int) and dim != size:
            raise VerifyInputError(f"--shape {name}: axis {axis} is fixed at {dim} in the model, got {size}")
    return shape


def _synthesize_value(name, dtype, shape, rng, index_bound, length_fill) -> np.ndarray:
    if "mask" in name.lower():
        return np.ones(shape, dtype=dtype)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if is_float_dtype(dtype):
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind in "iu":
        return _synthesize_integer(name, dtype, shape, rng, index_bound, length_fill)
    raise VerifyInputError(f"cannot synthesize input {name!r} of dtype {dtype}; pass --inputs")


def _synthesize_integer(name, dtype, shape, rng, index_bound, length_fill) -> np.ndarray:
    lowered = name.lower()
    if index_bound is not None:
        values = rng.integers(0, index_bound, size=shape)
    elif len(shape) == 0 and lowered in SAMPLE_RATE_NAMES:
        values = np.array(SAMPLE_RATE)
    elif _LENGTH_NAME.search(lowered):
        values = np.full(shape, length_fill)
    elif len(shape) == 0:
        values = np.array(1)
    else:
        values = rng.integers(0, SMALL_INT_HIGH, size=shape)
    return np.asarray(values).astype(dtype)


# ---------------------------------------------------------------------------
# Gather index bounds
# ---------------------------------------------------------------------------


def _gather_index_bounds(graph: onnx.GraphProto, input_names: Sequence[str]) -> dict[str, int]:
    """For each input whose values reach a Gather's indices, the exclusive upper bound
    that keeps every index inside the table (the smallest table if there are several)."""
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in graph.node:
        for position, tensor in enumerate(node.input):
            if tensor:
                consumers[tensor].append((node, position))
    shapes = _StaticShapes(graph)
    bounds = {}
    for name in input_names:
        tables = [_gather_rows(node, shapes) for node in _gathers_indexed_by(name, consumers)]
        if tables:
            bounds[name] = max(1, min(tables))
    return bounds


def _gathers_indexed_by(source: str, consumers) -> list[onnx.NodeProto]:
    gathers, frontier, seen = [], [source], {source}
    while frontier:
        tensor = frontier.pop()
        for node, position in consumers.get(tensor, ()):
            if node.op_type == "Gather" and position == 1:
                gathers.append(node)
            elif node.op_type in INDEX_PASSTHROUGH_OPS and position == 0:
                for output in node.output:
                    if output not in seen:
                        seen.add(output)
                        frontier.append(output)
    return gathers


def _gather_rows(node: onnx.NodeProto, shapes: _StaticShapes) -> int:
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    shape = shapes.of(node.input[0])
    if shape is None or not -len(shape) <= axis < len(shape):
        return FALLBACK_TABLE_ROWS
    rows = shape[axis]
    return rows if isinstance(rows, int) and rows > 0 else FALLBACK_TABLE_ROWS


class _StaticShapes:
    """Static shapes of graph tensors, from initializers, Constant nodes and value_info,
    following SHAPE_PRESERVING_OPS back to their source."""

    def __init__(self, graph: onnx.GraphProto):
        self._known: dict[str, tuple] = {}
        for vi in [*graph.value_info, *graph.input, *graph.output]:
            dims = _declared_dims(vi)
            if dims is not None:
                self._known[vi.name] = tuple(dims)
        for tensor in graph.initializer:
            self._known[tensor.name] = tuple(tensor.dims)
        self._producers = {}
        for node in graph.node:
            constant_dims = _constant_dims(node)
            if constant_dims is not None:
                self._known[node.output[0]] = constant_dims
            for output in node.output:
                self._producers[output] = node

    def of(self, tensor: str, depth: int = 0) -> tuple | None:
        if tensor in self._known:
            return self._known[tensor]
        producer = self._producers.get(tensor)
        if producer is None or producer.op_type not in SHAPE_PRESERVING_OPS or depth > 32:
            return None
        return self.of(producer.input[0], depth + 1)


def _constant_dims(node: onnx.NodeProto) -> tuple[int, ...] | None:
    if node.op_type != "Constant":
        return None
    for attribute in node.attribute:
        if attribute.name == "value":
            return tuple(attribute.t.dims)
    return None
