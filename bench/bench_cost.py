#!/usr/bin/env python3
"""Runtime cost of compressed outputs against their input, in onnxruntime.

Prints one table; asserts nothing.

    python bench/bench_cost.py                       # the 3-layer BERT, 1 x 128 tokens
    python bench/bench_cost.py --rounds 5 --runs 30
    python bench/bench_cost.py --specs "tie,kmeans" "tie,kmeans,fold" "tie,uniform(lower=dequantize)"

The input and each output of the pass specs are measured side by side with
`graphpass.runtimes.cost.measure_cost`: one fresh process per model per round (default level,
one intra-op thread), the models alternating within each round, each figure the best of the
rounds. Session memory is RSS growth from creating the session through the first run; peak RSS
is the probe process's high-water mark (python, numpy and onnxruntime included); start is
session creation; latency the median of the timed runs. Outputs are written to bench/out/
(without verification: this bench is about cost; `graphpass run` verifies them).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np

import graphpass
from graphpass.runtimes.cost import FIGURES, RuntimeCost, measure_cost

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
sys.path.append(str(ROOT))  # for `fixtures`; appended, so the installed graphpass wins

from fixtures import real_models  # noqa: E402

BATCH, SEQ = 1, 128
DEFAULT_SPECS = ("tie,kmeans", "tie,kmeans,fold")


def bert_feeds(seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids inside the vocabulary (30522) and a mask of ones: what a tokenizer gives."""
    ids = np.random.default_rng(seed).integers(1000, 30522, (BATCH, SEQ)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def compressed(source: Path, spec: str) -> tuple[Path, float]:
    """`spec`'s output of `source` in bench/out/, and the seconds it took. Made anew on every
    run: an output kept from an earlier version of graphpass would measure that version."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"cost-{source.stem}-{re.sub(r'[^A-Za-z0-9=]+', '_', spec).strip('_')}.onnx"
    started = time.perf_counter()
    graphpass.run(source, spec, output=path, verify=False)
    return path, time.perf_counter() - started


def render(rows: list[tuple[str, Path, RuntimeCost]]) -> str:
    reference = rows[0][2]
    reference_file = rows[0][1].stat().st_size
    header = ("model", "file", "session memory", "peak RSS", "start", "latency")
    table = [header]
    for label, path, cost in rows:
        size = path.stat().st_size
        cells = [label, f"{size / 1e6:.2f} MB ({size / reference_file:.3f})"]
        for name in FIGURES:
            value, base = getattr(cost, name), getattr(reference, name)
            shown = f"{value / 1e6:.1f} MB" if name.endswith("_bytes") else f"{value * 1e3:.1f} ms"
            cells.append(f"{shown} ({value / base:.2f})" if base > 0 else shown)
        table.append(tuple(cells))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--specs", nargs="+", default=list(DEFAULT_SPECS), help="pass specs to compare with the input")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    source = real_models.fetch("paraphrase_minilm_l3")
    rows_in = [("input", source)]
    for spec in args.specs:
        path, seconds = compressed(source, spec)
        print(f"{spec}: {path.name} ({seconds:.1f} s)", file=sys.stderr)
        rows_in.append((spec, path))
    started = time.perf_counter()
    costs = measure_cost([path for _, path in rows_in], bert_feeds(), rounds=args.rounds, runs=args.runs,
                         threads=args.threads)
    seconds = time.perf_counter() - started
    print(f"paraphrase-MiniLM-L3-v2, batch {BATCH} x {SEQ} tokens, onnxruntime default level, {args.threads} "
          f"intra-op thread(s); best of {costs[0].rounds} rounds, median of {min(c.runs for c in costs)} or more runs "
          f"(ratio to the input); measured in {seconds:.1f} s")
    print(render([(label, path, cost) for (label, path), cost in zip(rows_in, costs)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
