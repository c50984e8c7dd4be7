"""The settings of the weight codecs that `auto` chooses from and `sweep` tabulates.

A setting is one configured codec (kmeans(bits=3,granularity=channel), say). The grid is laid
out per codec family: the binning family over bits x granularity, vector codebooks over the
rates where they pay off. Both auto and sweep read it from here, so the table sweep writes
shows exactly the options auto weighs, but for auto's refinements for embedding tables (codebook
with hot rows, and two more rates: `table_settings`), which are no setting for a whole model.
With `feedback` in the config, every setting of a codec that has error feedback
(graphpass.feedback) comes twice: without it and with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphpass.lowering import lookup
from graphpass.codec import Plan
from graphpass.deployment import Deployment
from graphpass.edit import Model
from graphpass.errors import UsageError
from graphpass.manager import Pass, PassContext, registered_passes
from graphpass.weights import WeightRef

# Codecs auto chooses from when `methods` is empty, in this order.
DEFAULT_METHODS = ("kmeans", "codebook")



@dataclass(frozen=True)
class Setting:
    """One configured codec: `options` are the grid's (the codec's defaults fill in the rest)."""

    method: str
    options: tuple[tuple[str, Any], ...]
    codec: Pass

    @property
    def label(self) -> str:
        """The setting as a pass spec, e.g. kmeans(bits=3,granularity=channel)."""
        return f"{self.method}({','.join(f'{k}={v}' for k, v in self.options)})"

    def plan(self, ctx: PassContext, weight: WeightRef, value_weight: np.ndarray | None,
             hessian: np.ndarray | None = None, row_counts: np.ndarray | None = None) -> Plan | str:
        """`value_weight`, `hessian` (the weight's input second moment) and `row_counts` (how often
        the inputs read each row of an embedding table) reach codecs that declare they use them
        (`supports_value_weight`, `supports_hessian`, `supports_row_counts`)."""
        extra = {}
        if value_weight is not None and getattr(self.codec, "supports_value_weight", False):
            extra["value_weight"] = value_weight
        if hessian is not None and getattr(self.codec, "supports_hessian", False) and self.codec.uses_feedback():
            extra["hessian"] = hessian
        if row_counts is not None and getattr(self.codec, "supports_row_counts", False):
            extra["row_counts"] = row_counts
        return self.codec.plan(ctx, weight, **extra)

    def expected_bytes(self, weight: WeightRef, model: Model) -> int:
        return self.codec.expected_bytes(weight, model)

    def effective(self, weight: WeightRef) -> tuple:
        return self.codec.effect_key(weight)

    def row_local(self, weight: WeightRef) -> bool:
        return self.codec.row_local(weight)

    @property
    def for_tables(self) -> bool:
        """A refinement for embedding tables (hot rows, or a rung only Gather tables get)."""
        options = dict(self.options)
        return bool(options.get("hot_rows")) or options.get("include") == "Gather"

    def with_feedback(self) -> Setting | None:
        """The same setting with error feedback, or None when its codec has none (or it has it)."""
        if "feedback" not in {o.name for o in self.codec.options} or dict(self.options).get("feedback"):
            return None
        options = (*self.options, ("feedback", True))
        return Setting(self.method, options, type(self.codec)(**{**self.codec.config, "feedback": True}))


def index_bits(config: dict[str, Any]) -> float:
    """Index bits per weight a codec's options imply: `bits`, or log2(k)/dim for vector codebooks
    (an int when whole, so that tables print 2, not 2.0)."""
    bits = config.get("bits") or math.log2(config.get("k", 256)) / config.get("dim", 1)
    return int(bits) if float(bits).is_integer() else bits


def _tokens(text: str) -> list[str]:
    return [t.strip() for t in text.split("|") if t.strip()]


def _bits(config: dict[str, Any]) -> list[int]:
    try:
        return sorted({int(token) for token in _tokens(config["bits"])})
    except ValueError:
        raise UsageError(f"bits={config['bits']!r}: expected |-separated integers, e.g. 2|3|4") from None


def densest_k(bits: int, opset: int, ir_version: int) -> int:
    """The most codebook entries whose indices pack as tightly as 2**bits entries: below opset 21
    indices are base-k digits in words, and k=21 costs the same 4.57 bits as k=16 (35 vs 32,
    73 vs 64): extra levels for free."""
    return densest_entries(2**bits, opset, ir_version)


def densest_entries(k: int, opset: int, ir_version: int, whole_bytes: bool = False) -> int:
    """The most entries, up to 2k, whose indices pack as tightly as k entries' (`whole_bytes`:
    as `lookup.choose_packing` takes it, for indices kept in whole words per row). Counted in
    digits: bit planes (exactly log2(k) bits) pay only on weights large enough, and a large
    per-tensor codebook stores tuples or bytes anyway (graphpass.lowering.row_storage)."""
    def bits(entries: int) -> float:
        return lookup.choose_packing(entries, opset, ir_version, whole_bytes=whole_bytes, planes=False).bits_per_index

    cost, densest = bits(k), k
    while densest < 2 * k and bits(densest + 1) <= cost:
        densest += 1
    return densest


def binning_grid(cls: type[Pass], config: dict[str, Any], model: Model) -> list[dict[str, Any]]:
    """Option sets for a codec with bits and granularity options (the binning family).

    Per-tensor codebooks take the densest k their index packing allows (their one table costs
    nothing); per-channel and per-group ones keep 2**bits entries and store them as bytes
    (graphpass.lowering.tables), and float16 from 6 bits (`table_dtypes`), since there the tables
    are a real share of the bytes."""
    known = {o.name for o in cls.options}
    grid = []
    for granularity in _tokens(config["granularities"]) if "granularity" in known else [None]:
        for bits in _bits(config) if "bits" in known else [None]:
            options = {"bits": bits, "granularity": granularity}
            if granularity == "tensor" and bits is not None and "k" in known:
                k = densest_k(bits, model.opset, model.proto.ir_version)
                options["k"] = k if k != 2**bits else None
            tables = table_dtypes(bits) if granularity in ("channel", "group") and "codebook_dtype" in known else [None]
            for dtype in tables:
                stored = {**options, "codebook_dtype": dtype}
                if granularity == "group" and "group_size" in known:
                    stored["group_size"] = config["group_size"]
                grid.append({k: v for k, v in stored.items() if v is not None})
    return grid


def table_dtypes(bits: int | None) -> list[str]:
    """How per-channel and per-group codebooks of 2**bits entries are stored, each a setting: as
    bytes, and from BYTE_TABLE_MAX_BITS + 1 bits as float16 too."""
    return ["uint8"] if bits is not None and bits <= BYTE_TABLE_MAX_BITS else ["uint8", "float16"]


# A byte table has 256 levels. Up to 5 bits its entries sit far apart on it and rounding to it
# costs next to nothing (the BERT's word embedding, 5-bit k-means per row: worst test sentence
# 0.99955 with float16 entries, 0.99953 with bytes); from 6 bits the entries crowd it (the mlp
# fixture's 6-bit per-channel weights: RMS error 1.36x, largest error 2x), so there the float16
# table is a setting too.
BYTE_TABLE_MAX_BITS = 5
# Vector codebooks pay off at low rates; past 4 bits per weight scalar k-means is as good and
# k-means over tens of thousands of vectors would dominate auto's time.
CODEBOOK_MAX_BITS = 4
# Tables beyond 256 vectors fit slowly and cost more than they save on weights of this size.
CODEBOOK_MAX_K = 256
# The embedding rows the fitting inputs read at least twice are corrected to exact (codebook's
# hot_rows): rows read once stand for the unseen ones, so the fit's measure stays honest.
HOT_ROWS = 2
# Rates between the grid's for tables that Gathers read (embeddings), where a table of 1024
# vectors costs nothing next to the indices: (the index bits it stands in for, options). On the
# 3-layer BERT's word embedding with hot rows, dim=3,k=1024 (3.56 bits per weight stored) sits
# between 4 bits (0.66 MB more, half the error) and 3.2 bits, and dim=2,k=1024 (5.33 bits) is
# 1.8 MB smaller than per-row 5-bit k-means at 1.5 times its error.
TABLE_RUNGS = ((4, {"dim": 3, "k": 1024}), (5, {"dim": 2, "k": 1024}))


def codebook_grid(cls: type[Pass], config: dict[str, Any], model: Model) -> list[dict[str, Any]]:
    """Vector codebooks at each rate of `bits` up to CODEBOOK_MAX_BITS bits per weight: the
    longest sub-vectors whose k = 2**(bits*dim) stays within CODEBOOK_MAX_K, one scale per
    output channel (channels of different magnitude then share the vectors well); each again
    with HOT_ROWS (on an embedding table only: elsewhere it is the same setting, and auto
    measures it once); and TABLE_RUNGS for the weights Gathers read. `table_settings` false
    leaves those two out: sweep applies each setting to every weight, one row per rate.

    k is the densest whose indices pack as tightly (`densest_entries`): dim=2,k=64 becomes
    k=73 (five base-73 digits fill an int32 as five base-64 ones do), k=1024 in threes 1290.
    On the BERT's word embedding alone that lowered the worst test sentence's 1 - cosine by
    14% and 16% at the same bytes (bench/bench_embedding.py)."""
    tables = config.get("table_settings", True)
    opset, ir_version = model.opset, model.proto.ir_version
    grid = []
    for bits in _bits(config):
        dims = [dim for dim in (8, 4, 2) if 2 ** (bits * dim) <= CODEBOOK_MAX_K]
        if bits <= CODEBOOK_MAX_BITS and dims:
            k = densest_entries(2 ** (bits * dims[0]), opset, ir_version)
            options = {"dim": dims[0], "k": k, "scale": "channel"}
            grid += [options, {**options, "hot_rows": HOT_ROWS}] if tables else [options]
    if tables and not config.get("include"):  # the rungs select Gather tables themselves
        # Tables keep each row's indices in whole words (codebook's row packing): k for those.
        grid += [{**options, "k": densest_entries(options["k"], opset, ir_version, whole_bytes=True),
                  "scale": "channel", "hot_rows": HOT_ROWS, "include": "Gather"}
                 for bits, options in TABLE_RUNGS if bits in _bits(config)]
    return grid


# How each method's settings are laid out; a codec with other knobs registers its grid here.
# Any other codec gets `binning_grid` over the options it has.
SETTING_GRIDS: dict[str, Callable[[type[Pass], dict[str, Any], Model], list[dict[str, Any]]]] = {
    "codebook": codebook_grid,
}


def is_codec(cls: type[Pass]) -> bool:
    """Whether a registered pass implements graphpass.codec.WeightCodec."""
    return all(hasattr(cls, method) for method in ("plan", "expected_bytes", "effect_key", "row_local"))


# --objective memory: what the compressed kernels take and run fast (MatMulNBits 4 bits in
# onnxruntime, GatherBlockQuantized 4/8; blocks a power of two >= 16), searched per weight by auto.
MEMORY_METHODS = ("uniform",)
MEMORY_BITS = (4, 8)
MEMORY_BLOCKS = (32, 64, 128)


def kernel_grid(cls: type[Pass], config: dict[str, Any], model: Model) -> list[dict[str, Any]]:
    """Affine block settings the memory objective lowers to compressed kernels: each of `bits`
    the kernels take, in blocks of 32, 64 and 128 (the chooser drops what a weight's kernel
    cannot take or runs slowly, e.g. 8-bit MatMulNBits in onnxruntime)."""
    bits = [b for b in _bits(config) if b in MEMORY_BITS]
    return [{"bits": b, "granularity": "group", "group_size": size, "lower": "kernel"}
            for b in bits for size in MEMORY_BLOCKS]


def candidate_settings(config: dict[str, Any], model: Model, deployment: Deployment | None = None) -> list[Setting]:
    """Every setting of the grid `config` describes: `methods`, `bits` and `granularities`
    (|-separated), `group_size`, and the weight filter options every codec shares.

    Under `--objective memory` the default methods are the affine ones the targets keep
    compressed, on `kernel_grid`; other methods asked for by name keep their own grids (and
    their lookups are rebuilt dense at load, which their passes report)."""
    passes = registered_passes()
    memory = deployment is not None and deployment.objective == "memory"
    methods = _tokens(config["methods"]) or list(MEMORY_METHODS if memory else DEFAULT_METHODS)
    settings = []
    for method in methods:
        cls = passes.get(method)
        if cls is None or not is_codec(cls):
            codecs = [name for name, c in passes.items() if is_codec(c)]
            raise UsageError(f"method '{method}' is not a weight codec; valid: {', '.join(codecs)}")
        shared = {o.name: config[o.name] for o in cls.options if o.name in ("min_size", "include", "exclude")}
        kernels = memory and method in MEMORY_METHODS
        grid = kernel_grid if kernels else SETTING_GRIDS.get(method, binning_grid)
        feedback = bool(config.get("feedback") or config.get("gptq"))  # gptq: feedback's earlier name
        for options in _with_feedback(grid(cls, config, model), cls, feedback):
            settings.append(Setting(method, tuple(options.items()), cls(**{**shared, **options})))
    return settings


def _with_feedback(grid: list[dict[str, Any]], cls: type[Pass], feedback: bool) -> list[dict[str, Any]]:
    """The grid, and with `feedback` each of its option sets again with error feedback
    (graphpass.feedback), for codecs that have the option (the memory objective's kernels too:
    GPTQ on their blocks)."""
    if not feedback or "feedback" not in {o.name for o in cls.options}:
        return grid
    return grid + [{**options, "feedback": True} for options in grid]


def uses_feedback(setting: Setting) -> bool:
    """Whether a setting assigns its entries with error feedback (and so needs a Hessian)."""
    return bool(getattr(setting.codec, "uses_feedback", lambda: False)())
