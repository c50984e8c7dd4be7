"""Verification engine: run a reference and a candidate ONNX model in onnxruntime (and in
the other target runtimes) on the same inputs and check that every output stays within a
numeric budget.

Each model runs once per onnxruntime optimisation level (by default ORT_ENABLE_ALL, called
"default", and ORT_DISABLE_ALL). At each level the candidate is compared with the
reference at that same level, so the check sees what a deployment sees (fused
kernels) and what the graph literally says (no fusion). Each other target runtime
(graphpass.runtimes: openvino, tract) is one more level, named after it, where the
candidate is compared with the reference run in that runtime. A reference that does not run
in a runtime leaves that runtime out with a note; a candidate that does not run where its
reference does fails. Each output reports the worst figure across levels, each level's
figures, and each runtime's worst.

Metric definitions. Float outputs are compared in float64, over the positions
where both reference and candidate are finite. d = candidate - reference.

Samples. A user who budgets an embedding or a classifier means every sample: a batch whose
whole cosine looks high can hide one sentence far below it. So the figures below are
computed per sample, a sample being one slice along the batch axis of an output of rank >= 2
(an output of rank 0 or 1 is one sample). The batch axis is the one the model declares with
a symbol naming a batch (recurrent state such as [2, batch, 128] holds h and c on axis 0),
else axis 0, and each figure reported is the worst sample's (largest error, smallest cosine and
SNR). `whole_tensor` keeps the same figures over the whole output, `samples` says how many
there were. The elementwise atol/rtol check is per element, so it covers every sample as is.

* max_abs_error   max |d|
* max_rel_error   max |d| / max(|ref|, floor), where floor = REL_ERROR_FLOOR_FRACTION *
                  max|ref| of that output (at least TINY). Without a floor, an element
                  where ref is exactly 0 gives an infinite or meaningless value. With
                  it, elements below 0.1% of the output's scale are measured against
                  that 0.1%.
* mean_abs_error  mean |d|
* cosine          cos(ref, cand) of one flattened sample; 1.0 when both are all-zero,
                  0.0 when exactly one is.
* snr_db          10*log10(sum(ref^2) / sum(d^2)) over one sample. +inf when d == 0
                  everywhere, -inf when the reference is all-zero and d is not. to_dict() writes both
                  infinities as null so the JSON stays valid (tell them apart by
                  max_abs_error == 0).
* argmax_agreement  Only for outputs that look like class scores (see
                  looks_like_class_scores). It is the fraction of rows (all axes but
                  the last) whose argmax along the last axis agrees. It is reported,
                  not checked: Budget has no threshold for it.
* mismatch_fraction  The fraction of elements that fail the elementwise check: exact
                  inequality for integer, bool and string outputs; outside atol/rtol
                  (or a non-finite mismatch) for float outputs. None for float outputs
                  when the budget has neither atol nor rtol.

Checks: missing output, shape mismatch and dtype mismatch stop the comparison. Float
outputs then get the non-finite check (NaN/Inf in one model where the other is
finite or differs; it applies whatever the budget), the elementwise
|d| <= atol + rtol*|ref| check, and cosine >= min_cosine. Each failing check adds a
clause to `failure`, separated by "; ". An output's `failure` is the first failing
level's message followed by "[failed at: <levels>]". Integer, bool and string outputs
must match exactly.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import tempfile
import zlib
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence, Union

import numpy as np
import onnx
from onnx import helper

from graphpass.memory import release_freed_memory
from graphpass.runtimes import Runtime, RuntimeFailure, usable_adapters
from graphpass.runtimes.onnxruntime import OPTIMIZATION_LEVELS, OnnxRuntime

ModelSource = Union[str, os.PathLike, bytes, onnx.ModelProto]


class VerifyInputError(Exception):
    """Verification cannot start: a model does not load or run, inputs are missing, or a
    --shape is malformed. The message is one line, ready to show to a user."""


class ModelLoadError(VerifyInputError):
    """onnxruntime cannot load one of the models; `role` says which ("reference", "candidate")."""

    def __init__(self, message: str, role: str):
        super().__init__(message)
        self.role = role


# ---------------------------------------------------------------------------
# Budget
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """How far candidate outputs may drift from the reference.

    Elementwise: |cand - ref| <= atol + rtol * |ref|, with a missing atol or rtol
    counted as 0. When both are None, no elementwise check runs.
    Cosine: for each float output, cosine(ref, cand) >= min_cosine (when it is set).
    """

    atol: float | None = None
    rtol: float | None = None
    min_cosine: float | None = None

    def __post_init__(self) -> None:
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise VerifyInputError(f"budget {name} must be a finite number >= 0, got {value}")
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise VerifyInputError(f"budget min_cosine must lie in [-1, 1], got {self.min_cosine}")

    @property
    def has_elementwise(self) -> bool:
        return self.atol is not None or self.rtol is not None

    def describe_elementwise(self) -> str:
        return ", ".join(f"{name}={value:g}" for name, value in
                         (("atol", self.atol), ("rtol", self.rtol)) if value is not None)

    def describe(self) -> str:
        parts = [self.describe_elementwise()]
        if self.min_cosine is not None:
            parts.append(f"min_cosine={self.min_cosine:g}")
        return ", ".join(part for part in parts if part) or "structural checks only"

    def to_dict(self) -> dict:
        return asdict(self)

    def overridden_by(self, given: Budget | None) -> Budget:
        """This budget with what the caller gave in its place: their atol/rtol replace these
        elementwise bounds (they said what drift they accept), their min_cosine is added."""
        if given is None:
            return self
        atol, rtol = (given.atol, given.rtol) if given.has_elementwise else (self.atol, self.rtol)
        cosines = [c for c in (self.min_cosine, given.min_cosine) if c is not None]
        return Budget(atol=atol, rtol=rtol, min_cosine=max(cosines) if cosines else None)


# Lossless pipelines: tie is bit-exact, but fold may reorder float operations, so
# allow a few float32 ulps of drift.
LOSSLESS_BUDGET = Budget(atol=1e-5, rtol=1e-4)
# ... or a few float16 ulps (eps 9.8e-4) when a float output is half precision: each
# reordered sum rounds to it, and a decoder's layers compound that (measured 2-4 ulps at
# the logits of the 4-layer fixtures.llm decoder).
LOSSLESS_HALF_BUDGET = Budget(atol=1e-2, rtol=1e-2)
HALF_TYPES = frozenset({onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16})


def lossless_budget(model: onnx.ModelProto) -> Budget:
    """The budget a lossless pipeline is held to, for the precision of the model's outputs."""
    outputs = {v.type.tensor_type.elem_type for v in model.graph.output}
    return LOSSLESS_HALF_BUDGET if outputs & HALF_TYPES else LOSSLESS_BUDGET

# ---------------------------------------------------------------------------
# Constants (documented choices)
# ---------------------------------------------------------------------------

ONNXRUNTIME = "onnxruntime"
DEFAULT_LEVELS: tuple[str, ...] = ("default", "disable_all")
# Models above this many bytes verify at "unfolded" instead of "default": opening them folded
# would cost verification more memory than the whole compile (graphpass.runtimes.onnxruntime).
FOLDED_VERIFICATION_MAX_BYTES = 256 * 2**20
LARGE_MODEL_LEVELS: tuple[str, ...] = ("unfolded", "disable_all")

# Floor for the max_rel_error denominator, as a fraction of the output's max |ref|.
REL_ERROR_FLOOR_FRACTION = 1e-3
TINY = float(np.finfo(np.float32).tiny)

# Substrings of output names that mark hidden states, embeddings or recurrent and
# KV-cache state. Their last axis is features, not classes, so argmax means nothing.
NON_CLASS_NAME_HINTS = ("embed", "hidden", "pool", "feature", "state", "present", "past", "cache")

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
# Result types
# ---------------------------------------------------------------------------


@dataclass
class Figures:
    """The figures measured for one output (see the module docstring)."""

    max_abs_error: float | None = None
    max_rel_error: float | None = None
    mean_abs_error: float | None = None
    cosine: float | None = None
    snr_db: float | None = None
    argmax_agreement: float | None = None
    mismatch_fraction: float | None = None
    samples: int | None = None
    # The same figures over the whole output (flattened), next to the worst sample's.
    whole_tensor: dict[str, float] | None = None

    def figures_dict(self) -> dict:
        figures = {name: _json_float(getattr(self, name)) for name in _WORST_OF}
        whole = None if self.whole_tensor is None else {k: _json_float(v) for k, v in self.whole_tensor.items()}
        return {**figures, "samples": self.samples, "whole_tensor": whole}


# For each figure, the function that picks the worst value across levels.
_WORST_OF = {
    "max_abs_error": max, "max_rel_error": max, "mean_abs_error": max,
    "mismatch_fraction": max, "cosine": min, "snr_db": min, "argmax_agreement": min,
}


@dataclass
class LevelMetrics(Figures):
    """One output compared at one optimisation level."""

    passed: bool = True
    failure: str | None = None

    def to_dict(self) -> dict:
        return {**self.figures_dict(), "passed": self.passed, "failure": self.failure}


@dataclass
class OutputMetrics(Figures):
    """One output: the worst figures across levels (and runtimes), each level's figures, and
    each runtime's worst (onnxruntime: the worse of its levels)."""

    passed: bool = True
    failure: str | None = None
    per_level: dict[str, LevelMetrics] = field(default_factory=dict)
    per_runtime: dict[str, OutputMetrics] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            **self.figures_dict(),
            "passed": self.passed,
            "failure": self.failure,
            "per_level": {level: m.to_dict() for level, m in self.per_level.items()},
            "per_runtime": {name: {**m.figures_dict(), "passed": m.passed, "failure": m.failure}
                            for name, m in self.per_runtime.items()},
        }


COMPARED = "compared"
INPUT_DOES_NOT_RUN = "input does not run"
OUTPUT_DOES_NOT_RUN = "output does not run"


@dataclass
class RuntimeOutcome:
    """What verification did in one runtime: compared at `levels`, or why it could not.

    `stage` and `reason` say where the runtime failed (load, inputs, run) and its own words.
    An input that does not run there is a note, not a failure: that runtime says nothing of
    the candidate. An output that does not run where its input does is a failure."""

    levels: list[str]
    status: str = COMPARED
    stage: str | None = None
    reason: str | None = None

    @property
    def failed(self) -> bool:
        return self.status == OUTPUT_DOES_NOT_RUN

    def message(self, runtime: str) -> str | None:
        return None if self.status == COMPARED else f"{self.status} in {runtime}: {self.reason}"

    def to_dict(self) -> dict:
        return {"status": self.status, "levels": list(self.levels), "stage": self.stage, "reason": self.reason}


@dataclass
class VerifyResult:
    passed: bool
    budget: dict
    levels: list[str]
    outputs: dict[str, OutputMetrics]
    runtimes: dict[str, RuntimeOutcome] = field(default_factory=dict)
    # False when a lossy run got no accuracy budget: `passed` then means the structural
    # checks only, and the verdict line says so instead of PASSED.
    budget_given: bool = True

    @property
    def failures(self) -> dict[str, str]:
        """Output name -> failure message, for the outputs that failed."""
        return {name: m.failure or "failed" for name, m in self.outputs.items() if not m.passed}

    @property
    def runtime_notes(self) -> list[str]:
        """One line per runtime that was not compared: a note for the input, a failure for the output."""
        return [message for name, outcome in self.runtimes.items() if (message := outcome.message(name))]

    def to_dict(self) -> dict:
        """Strict-JSON-safe dict (non-finite floats become None)."""
        return {
            "passed": self.passed,
            "budget": {k: _json_float(v) for k, v in self.budget.items()},
            "budget_given": self.budget_given,
            "levels": list(self.levels),
            "outputs": {name: m.to_dict() for name, m in self.outputs.items()},
            "runtimes": {name: outcome.to_dict() for name, outcome in self.runtimes.items()},
        }


def _json_float(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


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
    if _is_float_dtype(dtype):
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


def _is_float_dtype(dtype: np.dtype) -> bool:
    # ml_dtypes floats (bfloat16, float8*) have kind "V", so match them by name.
    return dtype.kind == "f" or dtype.name.startswith(("bfloat16", "float8", "float4"))


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


# ---------------------------------------------------------------------------
# Running models
# ---------------------------------------------------------------------------


def verify(
    reference: ModelSource,
    candidate: ModelSource,
    inputs: Mapping[str, np.ndarray],
    budget: Budget,
    *,
    levels: Sequence[str] = DEFAULT_LEVELS,
    budget_outputs: Sequence[str] | None = None,
    runtimes: Sequence[str] = (ONNXRUNTIME,),
    budget_given: bool = True,
) -> VerifyResult:
    """Run both models at each onnxruntime level, and in each other runtime of `runtimes`, on
    `inputs` and compare each reference output with the candidate output of the same name
    (run in the same runtime). Inputs the models do not take are ignored. Extra candidate
    outputs are ignored. With `budget_outputs`, only those outputs are held to `budget`; the
    others get the structural checks (missing, misshapen, non-finite).

    onnxruntime always runs: a model it cannot load or run raises VerifyInputError. In another
    runtime, a reference that does not run there is a note (that runtime says nothing of the
    candidate); a candidate that does not run where the reference does fails verification.
    A runtime that is not installed raises RuntimeUnavailable. `budget_given=False` says the
    caller chose no accuracy budget: the verdict line then does not claim a PASS."""
    levels = _checked_levels(levels)
    others = [r for r in usable_adapters(list(dict.fromkeys(runtimes))) if r.name != ONNXRUNTIME]
    reference, candidate = _as_source(reference), _as_source(candidate)
    same_model = _source_key(reference) == _source_key(candidate)
    per_output: dict[str, dict[str, LevelMetrics]] = defaultdict(dict)
    comparison = _Comparison(per_output, budget, budget_outputs, declared_batch_axes(reference))
    outcomes = {ONNXRUNTIME: RuntimeOutcome(list(levels))}
    for level in levels:
        ref_outputs = _run_in_onnxruntime(reference, "reference", level, inputs)
        # One session per (model, level): an identical candidate reuses the reference run.
        cand_outputs = ref_outputs if same_model else _run_in_onnxruntime(candidate, "candidate", level, inputs)
        comparison.add(level, ref_outputs, cand_outputs)
    if others:
        with _as_files(reference, candidate) as (reference_path, candidate_path):
            for runtime in others:
                outcomes[runtime.name] = _verify_in(runtime, reference_path, candidate_path, same_model,
                                                    inputs, comparison)
                release_freed_memory()
    compared = [level for outcome in outcomes.values() for level in outcome.levels]
    outputs = {name: _summarise_output(per_level, outcomes) for name, per_level in per_output.items()}
    return VerifyResult(
        passed=all(m.passed for m in outputs.values()) and not any(o.failed for o in outcomes.values()),
        budget=budget.to_dict(),
        levels=compared,
        outputs=outputs,
        runtimes=outcomes,
        budget_given=budget_given,
    )


@dataclass
class _Comparison:
    """Collects each output's figures at each level (an onnxruntime level or another runtime)."""

    per_output: dict[str, dict[str, LevelMetrics]]
    budget: Budget
    budget_outputs: Sequence[str] | None
    batch_axes: Mapping[str, int] = field(default_factory=dict)

    def add(self, level: str, ref_outputs: Mapping[str, np.ndarray], cand_outputs: Mapping[str, np.ndarray]) -> None:
        for name, ref_value in ref_outputs.items():
            held = self.budget if self.budget_outputs is None or name in self.budget_outputs else Budget()
            self.per_output[name][level] = compare_arrays(name, ref_value, cand_outputs.get(name), held,
                                                          self.batch_axes.get(name, 0))


def _verify_in(runtime: Runtime, reference: str, candidate: str, same_model: bool,
               inputs: Mapping[str, np.ndarray], comparison: _Comparison) -> RuntimeOutcome:
    """Compare in one runtime other than onnxruntime, at its one level."""
    try:
        ref_outputs = runtime.open(reference, inputs).run(inputs)
    except RuntimeFailure as failure:
        return RuntimeOutcome([], INPUT_DOES_NOT_RUN, failure.stage, failure.detail)
    try:
        cand_outputs = ref_outputs if same_model else runtime.open(candidate, inputs).run(inputs)
    except RuntimeFailure as failure:
        return RuntimeOutcome([], OUTPUT_DOES_NOT_RUN, failure.stage, failure.detail)
    level = runtime.levels[0]
    # Outputs onnxruntime gave define what is compared; a runtime that drops one fails on it.
    named = {name: ref_outputs.get(name) for name in comparison.per_output}
    if any(value is None for value in named.values()):
        lost = ", ".join(name for name, value in named.items() if value is None)
        return RuntimeOutcome([], INPUT_DOES_NOT_RUN, "run", f"gives no output {lost}")
    comparison.add(level, named, cand_outputs)
    return RuntimeOutcome([level])


def _summarise_output(per_level: dict[str, LevelMetrics], outcomes: Mapping[str, RuntimeOutcome]) -> OutputMetrics:
    """The worst figures over every level of every runtime, and each runtime's own worst."""
    summary = _summarise_levels(per_level)
    for name, outcome in outcomes.items():
        own = {level: per_level[level] for level in outcome.levels if level in per_level}
        if own:
            summary.per_runtime[name] = _summarise_levels(own)
    return summary


def declared_batch_axes(model: ModelSource | onnx.ModelProto) -> dict[str, int]:
    """Output name -> the axis its declared shape names as a batch (a symbol containing
    "batch"), for the outputs that declare one; the others use axis 0."""
    proto = model if isinstance(model, onnx.ModelProto) else _graph_outputs_of(_as_source(model))
    axes = {}
    for value in proto.graph.output:
        dims = value.type.tensor_type.shape.dim
        named = [axis for axis, dim in enumerate(dims) if "batch" in dim.dim_param.lower()]
        if named:
            axes[value.name] = named[0]
    return axes


def _graph_outputs_of(source: str | bytes) -> onnx.ModelProto:
    """The model without its external data: only its declared outputs are read."""
    try:
        if isinstance(source, bytes):
            return onnx.load_from_string(source)
        return onnx.load(source, load_external_data=False)
    except Exception:  # an unreadable model fails with onnxruntime's own words below
        return onnx.ModelProto()


def budget_output_names(proto: onnx.ModelProto, names: Sequence[str] | None) -> list[str]:
    """The outputs a budget applies to: `names` (each must exist), or all outputs. For a
    --budget-output the user got wrong, one line that lists the real ones."""
    available = [value.name for value in proto.graph.output]
    if not names:
        return available
    unknown = [name for name in names if name not in available]
    if unknown:
        raise VerifyInputError(f"unknown budget output(s) {', '.join(unknown)}; the model's outputs: {', '.join(available)}")
    return list(dict.fromkeys(names))


def levels_for(model_bytes: int | None) -> tuple[str, ...]:
    """The onnxruntime levels to verify a model of `model_bytes` (file and external data) at."""
    if model_bytes is not None and model_bytes > FOLDED_VERIFICATION_MAX_BYTES:
        return LARGE_MODEL_LEVELS
    return DEFAULT_LEVELS


def _checked_levels(levels: Sequence[str]) -> tuple[str, ...]:
    if isinstance(levels, str):
        levels = (levels,)
    unknown = [level for level in levels if level not in OPTIMIZATION_LEVELS]
    if unknown or not levels:
        raise VerifyInputError(f"unknown optimisation level(s) {', '.join(unknown) or '(none given)'}; "
                               f"choose from {', '.join(OPTIMIZATION_LEVELS)}")
    return tuple(dict.fromkeys(levels))


def _as_source(model: ModelSource) -> str | bytes:
    """Paths stay paths so onnxruntime resolves external data next to the file."""
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    return os.fspath(model)


def _source_key(source: str | bytes) -> tuple[str, str]:
    if isinstance(source, bytes):
        return ("bytes", hashlib.sha256(source).hexdigest())
    return ("path", os.path.realpath(source))


@contextmanager
def _as_files(*sources: str | bytes):
    """Paths for runtimes that read models only from files: serialized models go to a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="graphpass-verify-") as folder:
        paths = []
        for index, source in enumerate(sources):
            if isinstance(source, bytes):
                path = Path(folder) / f"model{index}.onnx"
                path.write_bytes(source)
                source = str(path)
            paths.append(source)
        yield paths


def _run_in_onnxruntime(source: str | bytes, role: str, level: str,
                        inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One model at one onnxruntime level, its failures worded as verification input errors."""
    if isinstance(source, str) and not Path(source).is_file():
        raise VerifyInputError(f"{role} model not found: {source}")
    try:
        return OnnxRuntime().open(source, inputs, level).run(inputs)
    except RuntimeFailure as failure:
        message = _onnxruntime_message(failure, role, level)
        if failure.stage == "load":
            raise ModelLoadError(message, role) from failure
        raise VerifyInputError(message) from failure
    finally:
        release_freed_memory()  # the session is gone: its pages go back before the next one opens


def _onnxruntime_message(failure: RuntimeFailure, role: str, level: str) -> str:
    if failure.stage == "load":
        return f"onnxruntime cannot load the {role} model (level {level}): {failure.detail}"
    if failure.stage == "inputs":
        return failure.detail.replace("no value for model", f"no value for {role} model", 1)
    return (f"onnxruntime failed to run the {role} model at level {level}: {failure.detail} "
            "(give real inputs with --inputs, or sizes of dynamic dims with --shape)")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ---------------------------------------------------------------------------
# Comparing outputs
# ---------------------------------------------------------------------------


def compare_arrays(name: str, reference: np.ndarray, candidate: np.ndarray | None,
                   budget: Budget, batch_axis: int = 0) -> LevelMetrics:
    """Compare one output at one level (public so other passes can reuse the metrics);
    `batch_axis` is where its samples lie (see declared_batch_axes)."""
    if candidate is None:
        return LevelMetrics(passed=False, failure="output missing from candidate")
    if reference.shape != candidate.shape:
        return LevelMetrics(passed=False, failure=(
            f"shape mismatch: reference {tuple(reference.shape)} vs candidate {tuple(candidate.shape)}"))
    if reference.dtype != candidate.dtype:
        return LevelMetrics(passed=False, failure=(
            f"dtype mismatch: reference {reference.dtype} vs candidate {candidate.dtype}"))
    if _is_float_dtype(reference.dtype):
        return _compare_float(name, reference, candidate, budget, batch_axis)
    return _compare_exact(reference, candidate)


def _compare_exact(reference: np.ndarray, candidate: np.ndarray) -> LevelMetrics:
    differs = np.asarray(reference != candidate)
    count, size = int(differs.sum()), reference.size
    metrics = LevelMetrics(mismatch_fraction=count / size if size else 0.0)
    if reference.dtype.kind in "iub":
        gap = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
        metrics.max_abs_error = float(gap.max()) if size else 0.0
    if count:
        metrics.passed = False
        metrics.failure = f"exact match required for {reference.dtype} output: {count}/{size} elements differ"
    return metrics


def _compare_float(name: str, reference: np.ndarray, candidate: np.ndarray, budget: Budget,
                   batch_axis: int = 0) -> LevelMetrics:
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    both_finite = np.isfinite(ref) & np.isfinite(cand)
    nonfinite_mismatches = int((~both_finite & ~_same_nonfinite(ref, cand)).sum())
    ref_f, diff = ref[both_finite], np.abs(cand[both_finite] - ref[both_finite])
    metrics = LevelMetrics(**worst_sample_figures(ref, cand, both_finite, batch_axis),
                           whole_tensor=_float_figures(ref_f, cand[both_finite], diff),
                           argmax_agreement=_argmax_agreement(name, ref, cand))
    failures = [_nonfinite_failure(ref, cand, nonfinite_mismatches)]
    if budget.has_elementwise:
        over = int((diff > (budget.atol or 0.0) + (budget.rtol or 0.0) * np.abs(ref_f)).sum())
        metrics.mismatch_fraction = (over + nonfinite_mismatches) / ref.size if ref.size else 0.0
        if over:
            failures.append(f"elementwise: {over}/{ref.size} elements exceed {budget.describe_elementwise()} "
                            f"(max abs error {metrics.max_abs_error:.3e})")
    if budget.min_cosine is not None and metrics.cosine < budget.min_cosine:
        failures.append(f"{_worst_cosine_words(metrics)} {metrics.cosine:.6f} < min_cosine {budget.min_cosine:g}")
    metrics.failure = "; ".join(f for f in failures if f) or None
    metrics.passed = metrics.failure is None
    return metrics


def _worst_cosine_words(metrics: LevelMetrics) -> str:
    return "cosine" if metrics.samples == 1 else "worst-sample cosine"


def sample_rows(ref: np.ndarray, cand: np.ndarray, batch_axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays as (samples, values): `batch_axis` holds the samples of an output of rank
    >= 2 when both have the same shape; anything else is one sample."""
    if ref.ndim >= 2 and ref.shape == cand.shape:
        if not 0 <= batch_axis < ref.ndim:
            batch_axis = 0
        ref, cand = np.moveaxis(ref, batch_axis, 0), np.moveaxis(cand, batch_axis, 0)
        rows = (ref.shape[0], math.prod(ref.shape[1:]))  # explicit: reshape(0, -1) is ambiguous
        return ref.reshape(rows), cand.reshape(rows)
    return ref.reshape(1, ref.size), cand.reshape(1, cand.size)


def worst_sample_figures(ref: np.ndarray, cand: np.ndarray, finite: np.ndarray | None = None,
                         batch_axis: int = 0) -> dict:
    """The figures of the worst sample (see the module docstring), over the positions where
    `finite` holds (all when None), and how many samples there were. The one definition of
    the cosine a budget holds: verification and auto's measurements both come through here."""
    ref, cand = np.asarray(ref, dtype=np.float64), np.asarray(cand, dtype=np.float64)
    if finite is None:
        finite = np.ones(ref.shape, dtype=bool)
    ref_rows, cand_rows = sample_rows(np.where(finite, ref, 0.0), np.where(finite, cand, 0.0), batch_axis)
    counted = sample_rows(finite, finite, batch_axis)[0]
    samples = ref_rows.shape[0]
    if not counted.any():
        return dict(max_abs_error=0.0, max_rel_error=0.0, mean_abs_error=0.0, cosine=1.0, snr_db=math.inf,
                    samples=samples)
    diff = np.abs(cand_rows - ref_rows)  # 0 where not finite, since both were zeroed there
    # The floor is the whole output's, as in the module docstring: a sample of small values
    # is measured against the output's scale, not its own.
    floor = max(REL_ERROR_FLOOR_FRACTION * float(np.abs(ref_rows).max()), TINY)
    per_sample_mean = diff.sum(axis=1) / np.maximum(counted.sum(axis=1), 1)
    return dict(
        max_abs_error=float(diff.max()),
        max_rel_error=float((diff / np.maximum(np.abs(ref_rows), floor)).max()),
        mean_abs_error=float(per_sample_mean.max()),
        cosine=float(_row_cosines(ref_rows, cand_rows).min()),
        snr_db=float(_row_snr_db(ref_rows, cand_rows - ref_rows).min()),
        samples=samples,
    )


def _row_cosines(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """cos(ref[i], cand[i]) per row: 1.0 where both rows are all-zero, 0.0 where one is."""
    # Scale each row by its common max first so the norms cannot overflow.
    scale = np.maximum(np.abs(ref).max(axis=1, initial=0.0), np.abs(cand).max(axis=1, initial=0.0))
    safe = np.where(scale == 0.0, 1.0, scale)[:, None]
    a, b = ref / safe, cand / safe
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        cosines = np.clip(np.einsum("ij,ij->i", a, b) / norms, -1.0, 1.0)
    return np.where(scale == 0.0, 1.0, np.where(norms == 0.0, 0.0, cosines))


def _row_snr_db(ref: np.ndarray, diff: np.ndarray) -> np.ndarray:
    """10*log10(signal / noise) per row: +inf where the row has no error, -inf where its
    reference is all-zero and it has some."""
    scale = np.maximum(np.abs(ref).max(axis=1, initial=0.0), np.abs(diff).max(axis=1, initial=0.0))
    safe = np.where(scale == 0.0, 1.0, scale)[:, None]
    signal = np.square(ref / safe).sum(axis=1)
    noise = np.square(diff / safe).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = 10.0 * np.log10(signal / noise)
    return np.where(noise == 0.0, np.inf, np.where(signal == 0.0, -np.inf, snr))


def _same_nonfinite(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Where both are NaN, or both the same infinity: these positions agree."""
    return (np.isnan(ref) & np.isnan(cand)) | (np.isinf(ref) & (ref == cand))


def _nonfinite_failure(ref: np.ndarray, cand: np.ndarray, mismatches: int) -> str | None:
    if not mismatches:
        return None
    introduced = int((np.isfinite(ref) & ~np.isfinite(cand)).sum())
    if introduced:
        return f"non-finite: candidate has NaN/Inf at {introduced} position(s) where the reference is finite"
    return f"non-finite: {mismatches} position(s) where the reference is NaN/Inf and the candidate differs"


def _float_figures(ref: np.ndarray, cand: np.ndarray, abs_diff: np.ndarray) -> dict:
    if ref.size == 0:
        return dict(max_abs_error=0.0, max_rel_error=0.0, mean_abs_error=0.0, cosine=1.0, snr_db=math.inf)
    ref_scale = float(np.abs(ref).max())
    floor = max(REL_ERROR_FLOOR_FRACTION * ref_scale, TINY)
    return dict(
        max_abs_error=float(abs_diff.max()),
        max_rel_error=float((abs_diff / np.maximum(np.abs(ref), floor)).max()),
        mean_abs_error=float(abs_diff.mean()),
        cosine=_cosine(ref, cand),
        snr_db=_snr_db(ref, cand - ref),
    )


def _cosine(ref: np.ndarray, cand: np.ndarray) -> float:
    # Scale by the common max first so the norms cannot overflow.
    scale = max(float(np.abs(ref).max()), float(np.abs(cand).max()))
    if scale == 0.0:
        return 1.0
    a, b = ref.ravel() / scale, cand.ravel() / scale
    norms = float(np.linalg.norm(a)) * float(np.linalg.norm(b))
    if norms == 0.0:
        return 0.0
    return float(np.clip(np.dot(a, b) / norms, -1.0, 1.0))


def _snr_db(ref: np.ndarray, diff: np.ndarray) -> float:
    scale = max(float(np.abs(ref).max()), float(np.abs(diff).max()))
    if scale == 0.0 or not np.any(diff):
        return math.inf
    signal = float(np.sum(np.square(ref / scale)))
    noise = float(np.sum(np.square(diff / scale)))
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def looks_like_class_scores(name: str, array: np.ndarray) -> bool:
    """Float, rank >= 2, last axis >= 2, and not named like an embedding or state."""
    return (_is_float_dtype(array.dtype) and array.ndim >= 2 and array.shape[-1] >= 2
            and not any(hint in name.lower() for hint in NON_CLASS_NAME_HINTS))


def _argmax_agreement(name: str, ref: np.ndarray, cand: np.ndarray) -> float | None:
    if not looks_like_class_scores(name, ref):
        return None
    rows = ref.size // ref.shape[-1]
    if rows == 0:
        return None
    ref_top = ref.reshape(rows, -1).argmax(axis=1)
    cand_top = cand.reshape(rows, -1).argmax(axis=1)
    return float(np.mean(ref_top == cand_top))


def _summarise_levels(per_level: dict[str, LevelMetrics]) -> OutputMetrics:
    worst = {}
    for figure, pick in _WORST_OF.items():
        values = [getattr(m, figure) for m in per_level.values() if getattr(m, figure) is not None]
        worst[figure] = pick(values) if values else None
    worst["samples"] = next((m.samples for m in per_level.values() if m.samples is not None), None)
    worst["whole_tensor"] = _worst_whole_tensor([m.whole_tensor for m in per_level.values() if m.whole_tensor])
    failing = [level for level, m in per_level.items() if not m.passed]
    failure = None
    if failing:
        failure = f"{per_level[failing[0]].failure} [failed at: {', '.join(failing)}]"
    return OutputMetrics(**worst, passed=not failing, failure=failure, per_level=dict(per_level))


def _worst_whole_tensor(figures: list[dict]) -> dict | None:
    if not figures:
        return None
    return {name: _WORST_OF[name](f[name] for f in figures) for name in figures[0]}


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------

_COLUMNS = ("output", "max abs", "max rel", "mean abs", "cosine", "SNR dB", "argmax", "result")


def render_table(result: VerifyResult) -> str:
    """Plain-text comparison summary: one row per output (per output and runtime when more
    than onnxruntime ran), failure reasons, runtime notes, verdict."""
    by_runtime = set(result.runtimes) - {ONNXRUNTIME}
    columns = _COLUMNS[:1] + ("runtime",) + _COLUMNS[1:] if by_runtime else _COLUMNS
    rows = [columns]
    for name, m in result.outputs.items():
        if by_runtime:
            rows += [(name, runtime, *_figure_cells(own, result.budget_given))
                     for runtime, own in m.per_runtime.items()]
        else:
            rows.append((name, *_figure_cells(m, result.budget_given)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(width) if i < len(columns) - len(_COLUMNS) + 1 else cell.rjust(width)
                       for i, (cell, width) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines += [f"  {name}: {message}" for name, message in result.failures.items()]
    for name, outcome in result.runtimes.items():
        message = outcome.message(name)
        if message:
            lines.append(f"  {'FAIL' if outcome.failed else 'note'}: {message}")
    lines.append(_verdict_line(result))
    return "\n".join(lines)


def _verdict_line(result: VerifyResult) -> str:
    """PASSED or FAILED against the budget; without an accuracy budget a run that passed the
    structural checks has passed nothing a user chose, so it shows what to hold instead."""
    levels = ", ".join(result.levels)
    if result.passed and not result.budget_given:
        cosines = ", ".join(f"{name}={m.cosine:.6f}" for name, m in result.outputs.items() if m.cosine is not None)
        figures = f"worst-sample cosine {cosines}; " if cosines else ""
        return (f"no accuracy budget given: {figures}hold it with --min-cosine "
                f"(structural checks passed; levels: {levels})")
    verdict = "PASSED" if result.passed else "FAILED"
    budget = Budget(**result.budget).describe()
    return f"verification {verdict} (budget: {budget}; levels: {levels})"


def _figure_cells(m: OutputMetrics, budget_given: bool = True) -> tuple[str, ...]:
    return (
        _format_number(m.max_abs_error, "{:.3e}"),
        _format_number(m.max_rel_error, "{:.3e}"),
        _format_number(m.mean_abs_error, "{:.3e}"),
        _format_number(m.cosine, "{:.6f}"),
        _format_number(m.snr_db, "{:.1f}"),
        "-" if m.argmax_agreement is None else f"{100 * m.argmax_agreement:.1f}%",
        _result_cell(m.passed, budget_given),
    )


def _result_cell(passed: bool, budget_given: bool) -> str:
    # Passing the structural checks alone is no PASS: the user held the figures to nothing.
    if not passed:
        return "FAIL"
    return "PASS" if budget_given else "no budget"


def _format_number(value: float | None, pattern: str) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return pattern.format(value)
