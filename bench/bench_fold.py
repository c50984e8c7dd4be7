#!/usr/bin/env python3
"""Benchmark of `fold`: nodes, file size, onnxruntime latency and session creation.

Prints one table; asserts nothing.

    python bench/bench_fold.py                 # fixtures and the real 3-layer BERT
    python bench/bench_fold.py --more          # also the 6-layer int8 MiniLM and the T5 encoder
    python bench/bench_fold.py --threads 0     # onnxruntime's default thread count
    python bench/bench_fold.py --no-real
    python bench/bench_fold.py --cost-only     # only the runtime-cost table of the BERT

For each model the unrolled baseline (the input, or `tie` alone for albert, whose blocks
hold equal weights) and its folded variants are loaded into sessions once, then run pair by
pair in the same loop (baseline, variant, baseline, variant, ...) at batch 1, sequence 128,
so that a load spike on the machine hits both sides of a pair. The ratio column is the median
of the per-pair ratios. One intra-op thread by default: on a small shared machine that is
what gives stable pairs.

The runtime-cost table (the real BERT, unless --no-real) measures each model the way a
deployment meets it: one fresh process per model at onnxruntime's default level, one
intra-op thread, batch 1 x 128; start = session creation, latency = median of 20 runs after
one warm-up run, session memory = RSS growth from creating the session through the first
run, peak = ru_maxrss of the process. The input and the variants are measured in turn, three
rounds, and each figure is the best of its rounds, so that a busy neighbour does not bias
one side. Ratios are against the input.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
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
COST_RUNS, COST_ROUNDS = 20, 3


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


# -- runtime cost, one fresh process per model --------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024  # kB


def measure_one(path: str, low: int, high: int) -> dict:
    """Runs in a fresh process: start, latency, session memory and peak RSS of one model."""
    before = rss_bytes()
    start = time.perf_counter()
    sess = session(Path(path), 1)
    start_ms = (time.perf_counter() - start) * 1e3
    feeds = token_feeds(sess, low, high)
    sess.run(None, feeds)  # the warm-up run
    session_bytes = rss_bytes() - before
    times = []
    for _ in range(COST_RUNS):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    # ru_maxrss would do, but Linux carries it over from the parent across fork and exec (this
    # benchmark's parent holds the models it built); VmHWM is this process image's own peak.
    peak = peak_rss_bytes()
    return {"start_ms": start_ms, "latency_ms": statistics.median(times) * 1e3,
            "session_bytes": session_bytes, "peak_bytes": peak}


def cost_in_fresh_process(path: Path, id_range: tuple[int, int]) -> dict:
    command = [sys.executable, __file__, "--measure-one", str(path), "--ids", f"{id_range[0]},{id_range[1]}"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def runtime_cost(variants: list[tuple[str, Path]], id_range: tuple[int, int]) -> list[tuple[str, int, dict]]:
    """Best of COST_ROUNDS rounds per figure; within a round the models take turns."""
    best: dict[str, dict] = {}
    for _ in range(COST_ROUNDS):
        for label, path in variants:
            figures = cost_in_fresh_process(path, id_range)
            kept = best.setdefault(label, figures)
            for key, value in figures.items():
                kept[key] = min(kept[key], value)
    return [(label, path.stat().st_size, best[label]) for label, path in variants]


def render_cost(name: str, rows: list[tuple[str, int, dict]]) -> str:
    base = rows[0][2]
    header = (
        f"{'model':<20} {'variant':<22} {'file':>9} {'start':>8} {'latency':>9} {'session mem':>12} "
        f"{'peak RSS':>9} {'start':>6} {'latency':>7} {'session':>7} {'peak':>6}"
    )
    lines = [header, " " * 54 + "absolute" + " " * 36 + "ratio to the input", "-" * len(header)]
    for label, size, f in rows:
        ratios = [f[k] / base[k] if base[k] > 0 else float("nan")
                  for k in ("start_ms", "latency_ms", "session_bytes", "peak_bytes")]
        lines.append(
            f"{name:<20} {label:<22} {size / 1e6:>7.2f}MB {f['start_ms']:>6.0f}ms {f['latency_ms']:>7.2f}ms "
            f"{f['session_bytes'] / 1e6:>10.1f}MB {f['peak_bytes'] / 1e6:>7.0f}MB "
            + " ".join(f"{r:>6.2f}x" for r in ratios)
        )
    return "\n".join(lines)


def bert_cost(work: Path) -> str:
    source = real_models.fetch("paraphrase_minilm_l3")
    specs = [("input", None), ("tie,fold", "tie,fold"), ("tie,kmeans", "tie,kmeans"),
             ("tie,kmeans,fold", "tie,kmeans,fold")]
    variants = []
    for i, (label, spec) in enumerate(specs):
        path = make_variant(label, source, spec, work / f"cost.{i}.onnx").path
        variants.append((label, path))
    return render_cost("paraphrase_minilm_l3", runtime_cost(variants, (1000, 2000)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (0: onnxruntime's default)")
    parser.add_argument("--repeats", type=int, default=60, help="timed pairs per variant")
    parser.add_argument("--no-real", action="store_true", help="fixtures only (no download)")
    parser.add_argument("--more", action="store_true", help="also the int8 MiniLM-L6 and the T5 encoder")
    parser.add_argument("--cost-only", action="store_true", help="only the runtime-cost table of the BERT")
    parser.add_argument("--measure-one", metavar="PATH", help=argparse.SUPPRESS)  # the fresh process
    parser.add_argument("--ids", default="1000,2000", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_one:
        low, high = map(int, args.ids.split(","))
        print(json.dumps(measure_one(args.measure_one, low, high)))
        return 0
    if args.cost_only:
        with tempfile.TemporaryDirectory(prefix="bench-fold-") as tmp:
            print(bert_cost(Path(tmp)))
        return 0

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
    if not args.no_real:
        print()
        with tempfile.TemporaryDirectory(prefix="bench-fold-") as tmp:
            print(bert_cost(Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
