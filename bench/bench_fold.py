#!/usr/bin/env python3
"""Benchmark of `fold`: nodes, file size, onnxruntime latency and session creation.

Prints one table; asserts nothing.

    python bench/bench_fold.py                 # fixtures and the real 3-layer BERT
    python bench/bench_fold.py --more          # also the 6-layer int8 MiniLM and the T5 encoder
    python bench/bench_fold.py --threads 0     # onnxruntime's default thread count
    python bench/bench_fold.py --no-real

For each model the unrolled baseline (the input, or `tie` alone for albert, whose blocks
hold equal weights) and its folded variants are loaded into sessions once, then run pair by
pair in the same loop (baseline, variant, baseline, variant, ...) at batch 1, sequence 128,
so that a load spike on the machine hits both sides of a pair. The ratio column is the median
of the per-pair ratios. One intra-op thread by default: on a small shared machine that is
what gives stable pairs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import graphpass
from graphpass.edit import Model
from graphpass.scopes import iter_nodes

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # for `fixtures`; appended, so the installed graphpass wins

from fixtures import generate, real_models  # noqa: E402
BATCH, SEQ = 1, 128
SESSION_REPEATS = 3


@dataclass
class Variant:
    label: str
    path: Path
    nodes_top: int
    nodes_all: int
    file_bytes: int
    weight_bytes: int
    create_ms: float = 0.0
    run_ms: float = 0.0  # median
    best_ms: float = 0.0  # minimum: what the model costs when the machine leaves it alone
    ratio: float = 1.0


def make_variant(label: str, source: Path, spec: str | None, out: Path) -> Variant:
    """Run `spec` on `source` (verified in onnxruntime) and describe the written file."""
    if spec is None:
        path = source
    else:
        result = graphpass.run(source, spec, output=out)
        if not result.passed:
            raise SystemExit(f"{label}: verification failed")
        path = out
    model = onnx.load(path)
    weights = Model(model).weight_bytes()
    nodes_all = sum(1 for _ in iter_nodes(model.graph))
    return Variant(label, path, len(model.graph.node), nodes_all, path.stat().st_size, weights)


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def token_feeds(sess: ort.InferenceSession, low: int, high: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for value in sess.get_inputs():
        if "mask" in value.name:
            feeds[value.name] = np.ones((BATCH, SEQ), np.int64)
        elif "type" in value.name:  # token_type_ids: one segment
            feeds[value.name] = np.zeros((BATCH, SEQ), np.int64)
        else:
            feeds[value.name] = rng.integers(low, high, (BATCH, SEQ)).astype(np.int64)
    return feeds


def measure(variants: list[Variant], threads: int, repeats: int, id_range: tuple[int, int]) -> None:
    """Session creation (median of a few) and latency, pair by pair against variants[0]."""
    sessions = []
    for variant in variants:
        times = []
        for _ in range(SESSION_REPEATS):
            start = time.perf_counter()
            sess = session(variant.path, threads)
            times.append(time.perf_counter() - start)
        variant.create_ms = statistics.median(times) * 1e3
        sessions.append(sess)
    feeds = token_feeds(sessions[0], *id_range)
    for sess in sessions:
        for _ in range(3):  # warm up allocators and caches
            sess.run(None, feeds)
    samples = [[] for _ in sessions]
    for _ in range(repeats):
        for i, sess in enumerate(sessions):
            start = time.perf_counter()
            sess.run(None, feeds)
            samples[i].append(time.perf_counter() - start)
    base = np.array(samples[0])
    for variant, times in zip(variants, samples):
        variant.run_ms = float(np.median(times)) * 1e3
        variant.best_ms = float(np.min(times)) * 1e3
        variant.ratio = float(np.median(np.array(times) / base))


def case(name: str, source: Path, variants: list[tuple[str, str | None]], work: Path, args, id_range) -> list[Variant]:
    built = [make_variant(label, source, spec, work / f"{name}.{i}.onnx") for i, (label, spec) in enumerate(variants)]
    measure(built, args.threads, args.repeats, id_range)
    return [(name, v) for v in built]


def render(rows: list[tuple[str, Variant]]) -> str:
    header = (
        f"{'model':<20} {'variant':<20} {'nodes top/all':>14} {'file':>10} {'weights':>10} "
        f"{'session':>9} {'min':>8} {'median':>8} {'vs base':>8}"
    )
    lines = [header, "-" * len(header)]
    last = None
    for name, v in rows:
        if last is not None and name != last:
            lines.append("")
        last = name
        lines.append(
            f"{name:<20} {v.label:<20} {f'{v.nodes_top}/{v.nodes_all}':>14} {v.file_bytes / 1e6:>8.2f}MB "
            f"{v.weight_bytes / 1e6:>8.2f}MB {v.create_ms:>7.0f}ms "
            f"{v.best_ms:>6.2f}ms {v.run_ms:>6.2f}ms {v.ratio:>7.3f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (0: onnxruntime's default)")
    parser.add_argument("--repeats", type=int, default=60, help="timed pairs per variant")
    parser.add_argument("--no-real", action="store_true", help="fixtures only (no download)")
    parser.add_argument("--more", action="store_true", help="also the int8 MiniLM-L6 and the T5 encoder")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-fold-") as tmp:
        work = Path(tmp)
        for name in ("transformer", "albert"):
            generate.write(generate.build(name), str(work / f"{name}.onnx"))
        rows += case("transformer", work / "transformer.onnx", [
            ("unrolled", None), ("fold (auto: scan)", "fold"), ("fold(mode=loop)", "fold(mode=loop)"),
        ], work, args, (0, 512))  # fmt: skip
        rows += case("albert", work / "albert.onnx", [
            ("unrolled", None), ("tie", "tie"), ("tie,fold (loop)", "tie,fold"), ("fold alone", "fold"),
        ], work, args, (0, 512))  # fmt: skip
        if not args.no_real:
            rows += case("paraphrase_minilm_l3", real_models.fetch("paraphrase_minilm_l3"), [
                ("unrolled", None), ("fold (auto: scan)", "fold"), ("fold(mode=loop)", "fold(mode=loop)"),
            ], work, args, (1000, 2000))  # fmt: skip
            if args.more:
                rows += case("minilm_l6_int8", real_models.fetch("minilm_l6_int8"), [
                    ("unrolled", None), ("fold (auto: scan)", "fold"),
                ], work, args, (1000, 2000))  # fmt: skip
                rows += case("t5_title_encoder", real_models.fetch("t5_title_encoder"), [
                    ("unrolled", None), ("fold (auto: scan)", "fold"),
                ], work, args, (10, 2000))  # fmt: skip
    threads = args.threads or "default"
    print(f"batch {BATCH}, sequence {SEQ}, {threads} intra-op thread(s), {args.repeats} pairs; "
          "nodes: top graph / including the loop body; vs base: median of per-pair latency ratios")  # fmt: skip
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
