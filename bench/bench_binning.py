#!/usr/bin/env python3
"""Rate-distortion of the binning passes (issue 4's figures). Prints tables; asserts nothing.

    python bench/bench_binning.py                      # the `transformer` fixture, full grid
    python bench/bench_binning.py --model PATH         # any model, smaller grid (--grid full for all)
    python bench/bench_binning.py --methods kmeans,uniform --granularities tensor,channel

Each row runs one pass spec through `graphpass.run` (which verifies in onnxruntime at both
optimisation levels on the same synthesized inputs) and reports: file size and its ratio to the
input, size after zlib level 9 (what a download would cost), stored bits per compressed weight
(indices + codebooks + scales, from the pass report), the worst output cosine and the largest
absolute output error over both levels, and the pass's own time. Rows marked `opset 21` run on a
copy converted with onnx.version_converter, where UINT4 indices and blocked DequantizeLinear
exist. The baseline row is onnxruntime's MatMulNBitsQuantizer (4-bit, block 32, its defaults
otherwise), verified the same way.

A second table times compilation: kmeans(bits=4) end to end (load, pass, save; no verify)
against loading and saving the same model untouched.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import version_converter

import graphpass
from graphpass.model import load_model, save_model, serialized_bytes
from graphpass.verify import Budget, synthesize_inputs, verify

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # for `fixtures`; appended, so the installed graphpass wins
METHODS = ("kmeans", "uniform", "adaptive", "gmm", "ternary", "binary")
GRANULARITIES = ("tensor", "channel", "group")
FIXED_BITS = {"gmm": [4], "ternary": [1.6], "binary": [1]}  # what the codebook size implies
# Structural checks only: the table reports the error, it does not judge it.
NO_BUDGET = Budget()


@dataclass
class Row:
    label: str
    opset: int
    file_bytes: int
    zlib_bytes: int
    bits_per_weight: float | None
    cosine: float | None
    max_abs_error: float | None
    seconds: float | None


def spec_for(method: str, bits: float, granularity: str, group_size: int) -> str:
    options = [] if method in FIXED_BITS else [f"bits={int(bits)}"]
    if method == "gmm":
        options.append("components=16")
    options.append(f"granularity={granularity}")
    if granularity == "group":
        options.append(f"group_size={group_size}")
    if granularity != "tensor":
        options.append("codebook_dtype=float16")  # per-channel tables are big enough to matter
    return f"{method}({','.join(options)})"


# The small grid's rows per method: granularities that take minutes on a real model are left out
# (gmm runs EM per group; kmeans per group of <= 256 values is an exact DP per group).
SMALL_GRID = {"kmeans": GRANULARITIES, "uniform": GRANULARITIES, "adaptive": ("tensor", "channel"),
              "gmm": ("tensor",), "ternary": ("tensor", "channel"), "binary": ("tensor", "channel")}


def grid(methods, granularities, full: bool, group_size: int) -> list[str]:
    specs = []
    for method in methods:
        for bits in FIXED_BITS.get(method, [2, 3, 4, 8] if full else [4]):
            for granularity in granularities:
                if full or granularity in SMALL_GRID[method]:
                    specs.append(spec_for(method, bits, granularity, group_size))
        if not full and method == "kmeans":
            specs += [spec_for("kmeans", b, "tensor", group_size) for b in (2, 3, 8)]
    return specs


def measure(model: onnx.ModelProto, spec: str, feeds) -> Row:
    result = graphpass.run(model, spec, inputs=feeds, budget=NO_BUDGET)
    data = serialized_bytes(result.model)
    details = result.report["passes"][0]["details"]
    return Row(spec, _opset(model), len(data), len(zlib.compress(data, 9)), details.get("bits_per_weight"),
               *_worst(result.verify_result), result.report["pass_seconds"])


def baseline(model: onnx.ModelProto, feeds) -> Row | None:
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError:
        return None
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    start = time.perf_counter()
    quantizer = MatMulNBitsQuantizer(copy, bits=4, block_size=32)
    quantizer.process()
    seconds = time.perf_counter() - start
    data = serialized_bytes(quantizer.model.model)
    checked = verify(serialized_bytes(model), data, feeds, NO_BUDGET)
    return Row("onnxruntime MatMulNBitsQuantizer(bits=4, block=32)", _opset(model), len(data),
               len(zlib.compress(data, 9)), None, *_worst(checked), seconds)


def reference_row(model: onnx.ModelProto) -> Row:
    data = serialized_bytes(model)
    return Row("(input)", _opset(model), len(data), len(zlib.compress(data, 9)), 32.0, 1.0, 0.0, None)


def _worst(checked) -> tuple[float | None, float | None]:
    cosines = [o.cosine for o in checked.outputs.values() if o.cosine is not None]
    errors = [o.max_abs_error for o in checked.outputs.values() if o.max_abs_error is not None]
    return (min(cosines) if cosines else None, max(errors) if errors else None)


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def at_opset_21(model: onnx.ModelProto) -> onnx.ModelProto | None:
    if _opset(model) >= 21:
        return model
    try:
        converted = version_converter.convert_version(model, 21)
        converted.ir_version = max(converted.ir_version, 10)
        return converted
    except Exception as exc:  # the converter lacks adapters for some ops
        print(f"(no opset-21 rows: version_converter failed: {exc})", file=sys.stderr)
        return None


def compile_times(path: Path, repeats: int = 3) -> list[tuple[str, float]]:
    """Best of `repeats` wall times: load+save untouched, and kmeans(bits=4) end to end."""
    out = Path(tempfile.mkdtemp()) / "out.onnx"

    def load_save():
        save_model(load_model(path).proto, out)

    def kmeans():
        graphpass.run(path, "kmeans(bits=4)", output=out, verify=False)

    times = []
    for label, action in (("load + save (no pass)", load_save), ("kmeans(bits=4) load + pass + save", kmeans)):
        best = min(_timed(action) for _ in range(repeats))
        times.append((label, best))
    return times


def _timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def render(rows: list[Row], input_bytes: int, width: int = 72) -> str:
    width = max([width] + [len(r.label) for r in rows])
    header = (f"{'spec':<{width}} {'opset':>5} {'file':>11} {'ratio':>6} {'zlib-9':>11} {'bits/w':>6} "
              f"{'min cos':>9} {'max |err|':>10} {'time':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        seconds = "-" if r.seconds is None else f"{r.seconds:.2f}s"
        lines.append(
            f"{r.label:<{width}} {r.opset:>5} {r.file_bytes:>11,} {r.file_bytes / input_bytes:>6.1%} "
            f"{r.zlib_bytes:>11,} {_fmt(r.bits_per_weight, '.2f'):>6} {_fmt(r.cosine, '.6f'):>9} "
            f"{_fmt(r.max_abs_error, '.3g'):>10} {seconds:>7}")
    return "\n".join(lines)


def _fmt(value, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def fixture_path(name: str, folder: Path) -> Path:
    from fixtures import generate

    path = folder / f"{name}.onnx"
    generate.write(generate.build(name), str(path))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an ONNX model (default: the transformer fixture)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--granularities", default=",".join(GRANULARITIES))
    parser.add_argument("--grid", choices=("full", "small"), help="bits 2,3,4,8 for every method (full) or "
                        "4 bits plus a kmeans bit sweep (small); default: full on the fixture, small on --model")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="bench-binning-"))
    path = args.model or fixture_path("transformer", folder)
    full = (args.grid or ("small" if args.model else "full")) == "full"
    model = load_model(path).proto
    feeds = synthesize_inputs(model)
    specs = grid(args.methods.split(","), args.granularities.split(","), full, args.group_size)

    rows = [reference_row(model)]
    for spec in specs:
        rows.append(measure(model, spec, feeds))
        print(render(rows[-1:], rows[0].file_bytes).splitlines()[-1], file=sys.stderr)  # progress
    modern = at_opset_21(model)
    if modern is not None:
        for spec in (f"uniform(bits=4,granularity=group,group_size={args.group_size},lower=dequantize)",
                     "uniform(bits=4,granularity=channel,lower=dequantize)", "kmeans(bits=4)"):
            rows.append(measure(modern, spec, feeds))
    if not args.no_baseline:
        row = baseline(model, feeds)
        if row is not None:
            rows.append(row)

    print(f"model: {path} ({rows[0].file_bytes:,} bytes, opset {rows[0].opset}); group_size={args.group_size}")
    print(render(rows, rows[0].file_bytes))
    print()
    for label, seconds in compile_times(path):
        print(f"{label:<40} {seconds:7.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
