#!/usr/bin/env python3
"""codebook (vector quantization) against scalar kmeans at equal bits per weight (issue 5).

    python bench/bench_codebook.py              # raw tensors, transformer fixture, 3-layer BERT, timing
    python bench/bench_codebook.py --no-real    # without the BERT (no download)
    python bench/bench_codebook.py --sections raw,models

Rates are matched on what is stored, index packing included: kmeans(bits=1|2|3) stores 1, 2
and 3.2 bits per index (base-8 digits, five per uint16); codebook(dim=4,k=16) 1 bit per weight,
(dim=4,k=256) and (dim=8,k=256,stages=2) 2, (dim=2,k=64) 3.2 (base-64 digits, five per int32).
Codebook tables, scales and per-tensor overheads are counted in every `bits/w` figure.

Tables (figures only; nothing is asserted):

1. Raw heavy-tailed tensors (Student-t df=4 x 0.02, 0.1% outliers x5..20; bench_kmeans.py's
   generator), each in a one-MatMul model: bits per weight and the squared weight error relative
   to the tensor's energy (noise / signal), with its ratio to kmeans at the same rate. Variants
   with lognormal input-row scales and output-column scales imitate real layers.
2. Models (the `transformer` fixture; paraphrase-MiniLM-L3, a 3-layer BERT of 17 M weights):
   every spec through `graphpass.run`, which verifies in onnxruntime at both optimisation levels
   on the same inputs: file size, bits per weight, the worst output cosine and largest absolute
   output error over both levels and all float outputs, the size-weighted mean relative weight
   error, and the pass's time. BERT inputs are random token ids (4 x 16, seed 7) with a full
   attention mask. A verdict line per rate names the best codebook setting.
3. Compile time on the BERT: load + codebook + save (no verify) against load + save untouched.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

import graphpass
from graphpass.model import load_model, save_model
from graphpass.verify import Budget, synthesize_inputs

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # for `fixtures`; appended, so the installed graphpass wins
from fixtures import generate, real_models  # noqa: E402
from fixtures.generate import heavy_tailed, one_matmul  # noqa: E402

NO_BUDGET = Budget()  # structural checks only: the tables report the error, they do not judge it

# Per rate: the scalar baseline first, then the codebook settings compared with it.
RAW_GRID = {
    1: ["kmeans(bits=1)", "codebook(dim=4,k=16)", "codebook(dim=8,k=256)"],
    2: ["kmeans(bits=2)", "codebook(dim=4,k=256)", "codebook(dim=2,k=16)", "codebook(dim=8,k=256,stages=2)",
        "codebook(dim=4,k=256,scale=channel)"],
    3: ["kmeans(bits=3)", "codebook(dim=2,k=64)", "codebook(dim=2,k=64,scale=channel)"],
}
SHAPE = {1: "dim=4,k=16", 2: "dim=4,k=256", 3: "dim=2,k=64"}
MODEL_GRID = {
    rate: [f"kmeans(bits={rate})", f"codebook({shape})", f"codebook({shape},scale=channel)",
           f"codebook({shape},share=shape,scale=channel)", f"codebook({shape},share=all,scale=tensor)",
           f"codebook({shape},share=all,scale=channel,codebook_dtype=float16)"]
    for rate, shape in SHAPE.items()
}
MODEL_GRID[1].append("codebook(dim=8,k=256,share=all,scale=channel,codebook_dtype=float16)")
MODEL_GRID[2].append("codebook(dim=8,k=256,stages=2,share=all,scale=channel,codebook_dtype=float16)")


# ---------------------------------------------------------------------------------------------
# Raw tensors
# ---------------------------------------------------------------------------------------------


def raw_tensors(quick: bool) -> dict[str, np.ndarray]:
    side, wide = (256, 1024) if quick else (768, 3072)
    rng = np.random.default_rng(1)
    rows = heavy_tailed((side, side), 2) * rng.lognormal(0.0, 0.5, (side, 1)).astype(np.float32)
    cols = heavy_tailed((side, side), 3) * rng.lognormal(0.0, 0.5, (1, side)).astype(np.float32)
    return {
        f"t4 {side}x{side}": heavy_tailed((side, side), 0),
        f"t4 {side}x{wide}": heavy_tailed((side, wide), 1),
        f"t4 {side}x{side}, input-row scales": rows,
        f"t4 {side}x{side}, output-column scales": cols,
    }


def raw_table(quick: bool) -> str:
    lines = [f"{'tensor':<36} {'rate':>4} {'spec':<36} {'bits/w':>6} {'rel. SSE':>9} {'SQNR dB':>8} "
             f"{'vs kmeans':>9} {'time':>6}"]
    lines.append("-" * len(lines[0]))
    for label, weight in raw_tensors(quick).items():
        model = one_matmul(weight)
        for rate, specs in RAW_GRID.items():
            baseline = None
            for spec in specs:
                start = time.perf_counter()
                result = graphpass.run(model, spec, verify=False)
                seconds = time.perf_counter() - start
                (tensor,) = result.report["passes"][0]["details"]["tensors"]
                error = relative_error(tensor["sqnr_db"])
                baseline = baseline or error
                lines.append(f"{label:<36} {rate:>4} {spec:<36} {tensor['bits_per_weight']:>6.3f} {error:>9.5f} "
                             f"{tensor['sqnr_db']:>8.2f} {error / baseline:>8.3f}x {seconds:>5.1f}s")
                print(lines[-1], file=sys.stderr, flush=True)
        lines.append("")
    return "\n".join(lines)


def relative_error(sqnr_db: float | None) -> float:
    return 0.0 if sqnr_db is None else 10.0 ** (-sqnr_db / 10.0)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    rate: int
    spec: str
    bits_per_weight: float | None
    file_bytes: int
    cosine: float
    max_abs_error: float
    weight_error: float
    seconds: float


def measure(model: onnx.ModelProto, rate: int, spec: str, feeds) -> Row:
    result = graphpass.run(model, spec, inputs=feeds, budget=NO_BUDGET)
    stats = result.report["passes"][0]
    outputs = [o for o in result.verify_result.outputs.values() if o.cosine is not None]
    return Row(rate, spec, stats["details"].get("bits_per_weight"), result.report["output"]["file_bytes"],
               min(o.cosine for o in outputs), max(o.max_abs_error for o in outputs),
               mean_weight_error(stats["details"]["tensors"]), stats["seconds"])


def mean_weight_error(tensors: list[dict]) -> float:
    """Size-weighted mean of noise/signal over the compressed tensors."""
    weights = sum(t["weights"] for t in tensors)
    return sum(t["weights"] * relative_error(t["sqnr_db"]) for t in tensors) / max(weights, 1)


def model_table(name: str, model: onnx.ModelProto, feeds) -> str:
    input_bytes = len(model.SerializeToString())
    header = (f"{'rate':>4} {'spec':<76} {'bits/w':>6} {'file':>11} {'ratio':>6} {'min cos':>8} "
              f"{'max |err|':>9} {'w. rel err':>10} {'time':>6}")
    lines = [f"model: {name} ({input_bytes:,} bytes)", header, "-" * len(header)]
    rows = []
    for rate, specs in MODEL_GRID.items():
        for spec in specs:
            row = measure(model, rate, spec, feeds)
            rows.append(row)
            lines.append(f"{rate:>4} {spec:<76} {row.bits_per_weight:>6.3f} {row.file_bytes:>11,} "
                         f"{row.file_bytes / input_bytes:>6.1%} {row.cosine:>8.5f} {row.max_abs_error:>9.3g} "
                         f"{row.weight_error:>10.5f} {row.seconds:>5.1f}s")
            print(lines[-1], file=sys.stderr, flush=True)
        lines.append("")
    lines += verdicts(rows)
    return "\n".join(lines)


def verdicts(rows: list[Row]) -> list[str]:
    """Per rate: the best codebook row by output cosine, among those no more than 0.1 bit per
    weight above kmeans (equal rate), against kmeans."""
    lines = []
    for rate in MODEL_GRID:
        scalar = next(r for r in rows if r.rate == rate and r.spec.startswith("kmeans"))
        fair = [r for r in rows if r.rate == rate and r.spec.startswith("codebook")
                and r.bits_per_weight <= scalar.bits_per_weight + 0.1]
        if not fair:
            lines.append(f"~{rate} bpw: no codebook row within 0.1 bit/w of {scalar.spec}")
            continue
        best = max(fair, key=lambda r: r.cosine)
        better = best.cosine > scalar.cosine and best.max_abs_error < scalar.max_abs_error \
            and best.weight_error < scalar.weight_error
        lines.append(
            f"~{rate} bpw: best {best.spec} ({best.bits_per_weight:.3f} b/w): cos {best.cosine:.5f}, "
            f"max|err| {best.max_abs_error:.3g}, w.err {best.weight_error:.5f} vs {scalar.spec} "
            f"({scalar.bits_per_weight:.3f} b/w): cos {scalar.cosine:.5f}, max|err| {scalar.max_abs_error:.3g}, "
            f"w.err {scalar.weight_error:.5f} -> {'codebook lower error on all three' if better else 'mixed'}")
    return lines


def fixture_model(name: str) -> onnx.ModelProto:
    return generate.build(name)


def bert_path() -> Path:
    return real_models.fetch("paraphrase_minilm_l3")


def bert_inputs() -> dict[str, np.ndarray]:
    ids = np.random.default_rng(7).integers(1000, 30522, (4, 16)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


# ---------------------------------------------------------------------------------------------
# Compile time
# ---------------------------------------------------------------------------------------------


def speed_table(path: Path, specs: list[str]) -> str:
    out = Path(tempfile.mkdtemp(prefix="bench-codebook-")) / "out.onnx"
    start = time.perf_counter()
    save_model(load_model(path).proto, out)
    baseline = time.perf_counter() - start
    lines = [f"{'compile (no verify)':<58} {'total':>7} {'pass':>7} {'x load+save':>12}",
             f"{'load + save (no pass)':<58} {baseline:>6.2f}s {'-':>7} {1.0:>11.1f}x"]
    for spec in specs:
        start = time.perf_counter()
        result = graphpass.run(path, spec, output=out, verify=False)
        total = time.perf_counter() - start
        seconds = result.report["passes"][0]["seconds"]
        lines.append(f"{'load + ' + spec + ' + save':<58} {total:>6.2f}s {seconds:>6.2f}s {total / baseline:>11.1f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="raw,models,speed", help="comma separated: raw, models, speed")
    parser.add_argument("--no-real", action="store_true", help="skip the BERT (models and speed)")
    parser.add_argument("--quick", action="store_true", help="smaller raw tensors")
    args = parser.parse_args(argv)
    sections = set(args.sections.split(","))

    if "raw" in sections:
        print("1. squared weight error on raw heavy-tailed tensors (one MatMul each; rel. SSE = noise/signal)")
        print(raw_table(args.quick), flush=True)
    if "models" in sections:
        transformer = fixture_model("transformer")
        print("2. models: output error in onnxruntime (worst over both optimisation levels)")
        print(model_table("transformer fixture", transformer, synthesize_inputs(transformer)), flush=True)
        if not args.no_real:
            print()
            print(model_table("paraphrase_minilm_l3 (3-layer BERT)", load_model(bert_path()).proto, bert_inputs()),
                  flush=True)
    if "speed" in sections and not args.no_real:
        print()
        print("3. compile time on paraphrase_minilm_l3 (17.2 M weights), 2 cores")
        print(speed_table(bert_path(), ["codebook(dim=4,k=256)", "codebook(dim=4,k=256,share=all,scale=channel)",
                                        "kmeans(bits=2)"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
