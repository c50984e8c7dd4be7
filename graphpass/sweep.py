"""Rate-distortion sweep: file size against output error, one row per method x bits x granularity.

    graphpass sweep model.onnx --methods kmeans,codebook,uniform --bits 2..8 -o table.csv --plot rd.svg
    graphpass sweep model.onnx --feedback --calibration calib.npz --inputs test.npz --plot rd.svg

Each row compresses every eligible weight of the model with one setting (the same grid `auto`
chooses from, so the table shows auto's options side by side), writes the model, and compares
it with the input in onnxruntime at both optimisation levels on the same inputs (`--inputs`, or
generated ones). With `--feedback` every setting of a codec that has error feedback comes again
with it (graphpass.feedback), a dashed line beside the plain one. Settings that learn from data
(feedback's second moments) learn from `--calibration` when given, else from the inputs they
are measured on, which flatters them: give held-out inputs to measure them fairly.

Reference points, marked apart on the plot: onnxruntime's 4-bit MatMulNBits
(MatMulNBitsQuantizer, block 32) and its int8 quantize_dynamic (int8 weights, activations
quantized on the fly), and, when `import nncf` works (it is not a dependency), NNCF's
compress_weights int4 asymmetric group 32 (calibrated, at opset 21: NNCF's opset-17 MatMulNBits
does not load) and int8 asymmetric per channel. The plot is a hand-written SVG: no plotting
library is needed.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import onnx
from onnx import version_converter

from graphpass import verify as verification
from graphpass.api import run as run_pipeline
from graphpass.budget import Budget
from graphpass.edit import Model
from graphpass.errors import UsageError
from graphpass.grid import candidate_settings, index_bits, uses_feedback
from graphpass.inputs import load_inputs, synthesize_inputs
from graphpass.manager import progress_of
from graphpass.model import freeze_initializer_inputs, initializer_inputs, load_model, serialized_bytes

log = logging.getLogger(__name__)

STRUCTURAL = Budget()  # the table reports the error; it does not judge it


@dataclass
class SweepRow:
    method: str
    bits: float | None  # index bits per weight (log2(k)/dim for vector codebooks)
    granularity: str | None
    spec: str  # the pass spec that produced it, or the baseline's name
    file_bytes: int
    size_ratio: float  # of the input file
    cosine: float | None  # the worst over the measured outputs and both levels
    max_abs_error: float | None
    seconds: float
    baseline: bool = False
    outputs: dict[str, float | None] = field(default_factory=dict)  # cosine per output
    feedback: bool = False  # the setting assigns its entries with error feedback

    @property
    def distortion(self) -> float | None:
        return None if self.cosine is None else max(0.0, 1.0 - self.cosine)


# The methods a sweep compares when none are named.
DEFAULT_METHODS = ("kmeans", "uniform", "codebook")


def parse_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_methods(text: str | None) -> list[str]:
    return parse_list(text) if text else list(DEFAULT_METHODS)


def parse_bits(text: str) -> list[int]:
    """"2..8" or "2,3,4" -> [2, ..., 8]."""
    try:
        if ".." in text:
            low, high = (int(part) for part in text.split(".."))
            return list(range(low, high + 1))
        return sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UsageError(f"bad --bits {text!r}: expected a range like 2..8 or a list like 2,3,4") from None


def sweep(model, methods: Sequence[str], bits: Sequence[int], granularities: Sequence[str], *,
          inputs: dict[str, np.ndarray] | str | None = None, shapes=None, seed: int = 0,
          outputs: Sequence[str] | None = None, group_size: int = 128, baselines: bool = True,
          feedback: bool = False, calibration: dict[str, np.ndarray] | str | None = None,
          freeze_initializers: bool = False, progress=None) -> list[SweepRow]:
    """One row per setting of the grid (twice with `feedback`), then the baselines. Measured on
    `inputs`; settings and baselines that learn from data learn from `calibration` (else `inputs`).
    `freeze_initializers`: as graphpass.run's; without it, such weights stay as they are."""
    loaded = load_model(model)
    if freeze_initializers:
        freeze_initializer_inputs(loaded.proto)
    elif fed := initializer_inputs(loaded.proto):
        log.warning("%d initializers are also graph inputs; a caller may override them, so no setting rewrites "
                    "them (--freeze-initializers makes them constants)", len(fed))
    reference = loaded.path if loaded.path is not None else serialized_bytes(loaded.proto)
    feeds = _feeds(loaded.proto, inputs, shapes, seed)
    fitting = feeds if calibration is None else _feeds(loaded.proto, calibration, shapes, seed)
    measured = verification.budget_output_names(loaded.proto, outputs)
    config = {"methods": "|".join(methods), "bits": "|".join(map(str, bits)), "granularities": "|".join(granularities),
              "group_size": group_size, "min_size": 1024, "include": "", "exclude": "", "feedback": feedback,
              "table_settings": False}  # auto's refinements for embedding tables: no setting for a whole model
    settings = candidate_settings(config, Model(loaded.proto))
    references = available_baselines() if baselines else ()
    rows = []
    with progress_of(progress, "sweep: one model per setting", len(settings) + len(references)) as advance:
        for setting in settings:
            rows.append(_setting_row(loaded, reference, setting, feeds, fitting, measured))
            advance(1)
        for name, bits, build in references:
            rows.append(_baseline_row(loaded, reference, name, bits, build, feeds, fitting, measured))
            advance(1)
    return rows


def _feeds(proto: onnx.ModelProto, inputs, shapes, seed) -> dict[str, np.ndarray]:
    if inputs is None:
        return synthesize_inputs(proto, shapes=shapes, seed=seed)
    return inputs if isinstance(inputs, dict) else load_inputs(inputs)


def _setting_row(loaded, reference, setting, feeds, fitting, outputs: list[str]) -> SweepRow:
    start = time.perf_counter()
    result = run_pipeline(loaded.proto, setting.label, inputs=fitting, budget=STRUCTURAL)
    checked = result.verify_result
    if fitting is not feeds:  # fitted on the calibration inputs: measured on the others
        checked = verification.verify(reference, serialized_bytes(result.model), feeds, STRUCTURAL)
    options = dict(setting.options)
    row = _row(setting.method, index_bits(options), options.get("granularity"), setting.label,
               result.report["output"]["file_bytes"], loaded.file_bytes, checked, outputs,
               time.perf_counter() - start)
    row.feedback = uses_feedback(setting)
    return row


def _row(method, bits, granularity, spec, file_bytes, input_bytes, checked, outputs, seconds,
         baseline=False) -> SweepRow:
    cosines = {name: checked.outputs[name].cosine for name in outputs if name in checked.outputs}
    errors = [checked.outputs[name].max_abs_error for name in outputs if name in checked.outputs]
    known = [c for c in cosines.values() if c is not None]
    return SweepRow(method, bits, granularity, spec, file_bytes, file_bytes / input_bytes,
                    min(known) if known else None, max((e for e in errors if e is not None), default=None),
                    round(seconds, 2), baseline, cosines)


def _baseline_row(loaded, reference, name: str, bits: int, build, feeds, fitting, outputs: list[str]) -> SweepRow:
    start = time.perf_counter()
    try:
        with _quiet_logging():
            data = build(loaded.proto, fitting)
    except Exception as exc:  # onnxruntime's quantizers reject some graphs; the sweep goes on
        return SweepRow(name, bits, None, f"{name} (failed: {type(exc).__name__}: {exc})", 0, 0.0, None, None, 0.0, True)
    checked = verification.verify(reference, data, feeds, STRUCTURAL)
    return _row(name, bits, None, name, len(data), loaded.file_bytes, checked, outputs,
                time.perf_counter() - start, baseline=True)


@contextlib.contextmanager
def _quiet_logging():
    """onnxruntime's quantizers log every node they skip at INFO on the root logger."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def matmul_nbits_baseline(proto: onnx.ModelProto, calibration=None) -> bytes:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(_copy(proto), bits=4, block_size=32)
    quantizer.process()
    return serialized_bytes(quantizer.model.model)


def int8_dynamic_baseline(proto: onnx.ModelProto, calibration=None) -> bytes:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "int8.onnx"
        quantize_dynamic(_copy(proto), target, weight_type=QuantType.QInt8)
        return target.read_bytes()


# NNCF's ONNX backend writes MatMulNBits with unpacked 4-bit zero points at opset 17, which
# onnxruntime refuses to load; at opset 21 it writes blocked DequantizeLinear + MatMul.
NNCF_INT4_OPSET = 21


def nncf_int4_baseline(proto: onnx.ModelProto, calibration: dict[str, np.ndarray]) -> bytes:
    """NNCF's compress_weights, int4 asymmetric in groups of 32 (every MatMul), calibrated on
    `calibration` one sample at a time."""
    import nncf

    model = version_converter.convert_version(_copy(proto), NNCF_INT4_OPSET)
    count = len(next(iter(calibration.values())))
    dataset = nncf.Dataset([{k: v[i:i + 1] for k, v in calibration.items()} for i in range(count)])
    return serialized_bytes(nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_ASYM, group_size=32,
                                                  ratio=1.0, dataset=dataset))


def nncf_int8_baseline(proto: onnx.ModelProto, calibration=None) -> bytes:
    """NNCF's compress_weights, int8 asymmetric per channel (data-free: int8 takes no dataset)."""
    import nncf

    return serialized_bytes(nncf.compress_weights(_copy(proto), mode=nncf.CompressWeightsMode.INT8_ASYM))


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy


# (name, bits per weight, build: (ModelProto, calibration inputs) -> file bytes)
BASELINES = (
    ("onnxruntime MatMulNBits 4-bit block 32", 4, matmul_nbits_baseline),
    ("onnxruntime int8 quantize_dynamic", 8, int8_dynamic_baseline),
)
NNCF_BASELINES = (
    ("NNCF compress_weights int4_asym group 32", 4, nncf_int4_baseline),
    ("NNCF compress_weights int8_asym", 8, nncf_int8_baseline),
)


def available_baselines() -> tuple:
    """onnxruntime's baselines, and NNCF's where `import nncf` works (NNCF is not a dependency)."""
    try:
        import nncf  # noqa: F401
    except Exception:  # not installed, or it wants a framework it cannot find
        return BASELINES
    return BASELINES + NNCF_BASELINES


# ---------------------------------------------------------------------------------------------
# Writing the table
# ---------------------------------------------------------------------------------------------

_COLUMNS = ("method", "bits", "granularity", "feedback", "spec", "file_bytes", "size_ratio", "cosine",
            "one_minus_cosine", "max_abs_error", "seconds", "baseline")


def table_dicts(rows: Sequence[SweepRow]) -> list[dict[str, Any]]:
    return [{**{k: v for k, v in asdict(row).items() if k != "outputs"}, "one_minus_cosine": row.distortion,
             **{f"cosine[{name}]": value for name, value in row.outputs.items()}} for row in rows]


def check_destinations(table: str | None, plot: str | None) -> None:
    """Fail before the sweep, not after it, on a table or plot the sweep cannot write."""
    if table and Path(table).suffix.lower() not in (".csv", ".json"):
        raise UsageError(f"{table}: the table is written as .csv or .json")
    if plot and Path(plot).suffix.lower() != ".svg":
        raise UsageError(f"{plot}: the plot is written as .svg")
    for path in filter(None, (table, plot)):
        if not Path(path).resolve().parent.is_dir():
            raise UsageError(f"{path}: folder {Path(path).resolve().parent} does not exist")


def write_table(rows: Sequence[SweepRow], path: str | Path) -> None:
    check_destinations(str(path), None)
    path = Path(path)
    records = table_dicts(rows)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(records, indent=2) + "\n")
    else:
        columns = list(_COLUMNS) + sorted({k for r in records for k in r if k.startswith("cosine[")})
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        path.write_text(buffer.getvalue())


def render_text(rows: Sequence[SweepRow]) -> str:
    header = f"{'spec':<62} {'file':>11} {'of input':>8} {'cosine':>9} {'1-cos':>9} {'max abs':>9} {'time':>6}"
    lines = [header, "-" * len(header)]
    for row in rows:
        cosine = "-" if row.cosine is None else f"{row.cosine:.6f}"
        gap = "-" if row.distortion is None else f"{row.distortion:.2e}"
        error = "-" if row.max_abs_error is None else f"{row.max_abs_error:.2e}"
        lines.append(f"{row.spec[:62]:<62} {row.file_bytes:>11,} {row.size_ratio:>8.1%} {cosine:>9} {gap:>9} "
                     f"{error:>9} {row.seconds:>5.0f}s")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The plot (hand-written SVG)
# ---------------------------------------------------------------------------------------------

_WIDTH, _HEIGHT = 760, 480
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 230, 40, 60
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf")
# 1 - cosine of an exact model is 0, which a log axis cannot show: such points sit on this floor.
_DISTORTION_FLOOR = 1e-9


def write_svg(rows: Sequence[SweepRow], path: str | Path, title: str) -> None:
    check_destinations(None, str(path))
    Path(path).write_text(render_svg(rows, title))


def render_svg(rows: Sequence[SweepRow], title: str) -> str:
    """File size (% of the input, x) against 1 - cosine (log y): a line per method and
    granularity through its bits (dashed, in the same colour, with error feedback), baselines as
    labelled diamonds."""
    plotted = [r for r in rows if r.distortion is not None and r.file_bytes > 0]
    axes = _Axes(plotted)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{_HEIGHT}" '
             f'font-family="sans-serif" font-size="11">',
             f'<rect width="{_WIDTH}" height="{_HEIGHT}" fill="white"/>',
             f'<text x="{_LEFT}" y="22" font-size="14">{escape(title)}</text>']
    parts += axes.grid()
    series = _series(plotted)
    colours = {}
    for index, ((name, feedback), points) in enumerate(series.items()):
        colour = colours.setdefault(name, _PALETTE[len(colours) % len(_PALETTE)])
        parts += _draw_series(name + (" + feedback" if feedback else ""), points, axes, colour, index, feedback)
    parts += _draw_baselines([r for r in plotted if r.baseline], axes, len(series))
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


class _Axes:
    def __init__(self, rows: Sequence[SweepRow]):
        ratios = [100 * r.size_ratio for r in rows] or [0.0, 100.0]
        self.x_max = max(10.0, _nice_ceiling(max(ratios)))
        gaps = [max(r.distortion, _DISTORTION_FLOOR) for r in rows] or [1e-6, 1e-1]
        self.y_low = math.floor(math.log10(min(gaps)))
        self.y_high = max(self.y_low + 1, math.ceil(math.log10(max(gaps))))

    def x(self, ratio: float) -> float:
        return _LEFT + (100 * ratio / self.x_max) * (_WIDTH - _LEFT - _RIGHT)

    def y(self, distortion: float) -> float:
        fraction = (math.log10(max(distortion, _DISTORTION_FLOOR)) - self.y_low) / (self.y_high - self.y_low)
        return _HEIGHT - _BOTTOM - fraction * (_HEIGHT - _TOP - _BOTTOM)

    def grid(self) -> list[str]:
        right, bottom = _WIDTH - _RIGHT, _HEIGHT - _BOTTOM
        lines = [f'<rect x="{_LEFT}" y="{_TOP}" width="{right - _LEFT}" height="{bottom - _TOP}" '
                 f'fill="none" stroke="#444"/>']
        step = self.x_max / 5
        for i in range(6):
            x = _LEFT + i * (right - _LEFT) / 5
            lines.append(f'<line x1="{x:.1f}" y1="{_TOP}" x2="{x:.1f}" y2="{bottom}" stroke="#ddd"/>')
            lines.append(f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">{i * step:g}%</text>')
        for power in range(self.y_low, self.y_high + 1):
            y = self.y(10.0**power)
            lines.append(f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#ddd"/>')
            lines.append(f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">1e{power}</text>')
        lines.append(f'<text x="{(_LEFT + right) / 2:.0f}" y="{_HEIGHT - 18}" text-anchor="middle">'
                     "file size (% of the input)</text>")
        lines.append(f'<text x="16" y="{(_TOP + bottom) / 2:.0f}" text-anchor="middle" '
                     f'transform="rotate(-90 16 {(_TOP + bottom) / 2:.0f})">1 - cosine (worst output, log)</text>')
        return lines


def _nice_ceiling(value: float) -> float:
    for step in (10, 20, 25, 50, 100):
        if value <= step:
            return float(step)
    return float(math.ceil(value / 50) * 50)


def _series(rows: Sequence[SweepRow]) -> dict[tuple[str, bool], list[SweepRow]]:
    """(method / granularity, with feedback) -> its rows by size; each plain series before the
    same one with feedback."""
    series: dict[tuple[str, bool], list[SweepRow]] = {}
    for row in rows:
        if not row.baseline:
            name = row.method + (f" / {row.granularity}" if row.granularity else "")
            series.setdefault((name, row.feedback), []).append(row)
    order = sorted(series, key=lambda key: (list(series).index((key[0], False)) if (key[0], False) in series
                                            else len(series), key[1]))
    return {key: sorted(series[key], key=lambda r: r.size_ratio) for key in order}


def _draw_series(name: str, points: list[SweepRow], axes: _Axes, color: str, index: int,
                 dashed: bool = False) -> list[str]:
    path = " ".join(f"{axes.x(p.size_ratio):.1f},{axes.y(p.distortion):.1f}" for p in points)
    dash = ' stroke-dasharray="5,3"' if dashed else ""
    parts = [f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"{dash}/>']
    for p in points:
        x, y = axes.x(p.size_ratio), axes.y(p.distortion)
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"><title>{escape(p.spec)}: '
                     f'{p.file_bytes:,} bytes, cosine {p.cosine:.6f}</title></circle>')
        if p.bits is not None:
            parts.append(f'<text x="{x + 4:.1f}" y="{y - 4:.1f}" fill="{color}" font-size="9">{p.bits:g}</text>')
    parts += _legend_entry(index, name, f'<line x1="0" y1="0" x2="16" y2="0" stroke="{color}" stroke-width="2"{dash}/>')
    return parts


def _draw_baselines(rows: Sequence[SweepRow], axes: _Axes, first_entry: int) -> list[str]:
    parts = []
    for offset, row in enumerate(rows):
        x, y = axes.x(row.size_ratio), axes.y(row.distortion)
        parts.append(f'<path d="M{x:.1f},{y - 6:.1f} L{x + 6:.1f},{y:.1f} L{x:.1f},{y + 6:.1f} '
                     f'L{x - 6:.1f},{y:.1f} Z" fill="black"><title>{escape(row.spec)}: {row.file_bytes:,} '
                     f'bytes, cosine {row.cosine:.6f}</title></path>')
        parts.append(f'<text x="{x + 8:.1f}" y="{y + 4:.1f}" font-size="9">{escape(row.method)}</text>')
    if rows:
        parts += _legend_entry(first_entry, "baselines (onnxruntime, NNCF)" if any("NNCF" in r.method for r in rows)
                               else "onnxruntime baselines",
                               '<path d="M8,-5 L13,0 L8,5 L3,0 Z" fill="black"/>')
    return parts


def _legend_entry(index: int, label: str, mark: str) -> list[str]:
    x, y = _WIDTH - _RIGHT + 16, _TOP + 10 + 16 * index
    return [f'<g transform="translate({x},{y})">{mark}<text x="22" y="4">{escape(label)}</text></g>']
