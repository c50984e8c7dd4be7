#!/usr/bin/env python3
"""`--jobs 1` against `--jobs 2` on the 1.07 GB synthetic model (issue 17's scale figures).

    flock /tmp/graphpass-bigmem.lock python bench/bench_jobs.py [--rounds 2] [--spec "tie,kmeans(bits=4)"]

Generates (once, cached in bench/out/) `python -m fixtures.synthetic` at 16 layers of
4096 x 4096 float32 weights, then runs `graphpass run --no-verify --no-cost` on it with each
worker count in turn, alternating the order every round, each run a fresh process. Prints each
pass's seconds per run, the speedup of the passes' total (best of the rounds), whether every
run wrote the same bytes, and the per-tensor throughput of one worker (weight MB per second of
each pass at --jobs 1), with what that projects for a 70 B-parameter model on N workers. Asserts
nothing. Peak RSS is about 3 GB per run: hold the big-memory lock.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
LAYERS, DIM = 16, 4096
PROJECTED_PARAMS = 70e9
PROJECTED_WORKERS = (1, 8, 64, 256)


def synthetic_model() -> Path:
    path = OUT / f"tanh_chain_{LAYERS}x{DIM}.onnx"
    if not path.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "fixtures.synthetic", str(path), "--layers", str(LAYERS),
                        "--dim", str(DIM)], check=True, cwd=ROOT)
    return path


def run_once(model: Path, spec: str, jobs: int, folder: Path) -> tuple[dict[str, float], str]:
    """Per-pass seconds of one `graphpass run` and a digest of the files it wrote."""
    out, report = folder / f"jobs{jobs}.onnx", folder / f"jobs{jobs}.json"
    subprocess.run([str(Path(sys.executable).parent / "graphpass"), "run", str(model), "-o", str(out), "--passes", spec,
                    "--no-verify", "--no-cost", "--jobs", str(jobs), "--report", str(report)],
                   check=True, stdout=subprocess.DEVNULL)
    seconds = {p["spec"]: p["seconds"] for p in json.loads(report.read_text())["passes"]}
    digest = hashlib.sha256()
    for written in sorted(folder.glob(f"jobs{jobs}.onnx*")):
        digest.update(written.read_bytes())
    return seconds, digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--spec", default="tie,kmeans(bits=4)")
    parser.add_argument("--jobs", type=int, nargs=2, default=(1, 2), metavar=("FEW", "MANY"))
    parser.add_argument("--model", type=Path, help=f"an existing {LAYERS} x {DIM} synthetic model to use")
    args = parser.parse_args()
    model = args.model or synthetic_model()
    weight_mb = LAYERS * DIM * DIM * 4 / 1e6
    print(f"model: {model.name}, {weight_mb:,.0f} MB of float32 weights; spec {args.spec}; "
          f"load {os.getloadavg()[0]:.2f} at the start")
    runs: dict[int, list[dict[str, float]]] = {jobs: [] for jobs in args.jobs}
    digests = set()
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=OUT) as folder:
        for round_ in range(args.rounds):
            order = args.jobs if round_ % 2 == 0 else args.jobs[::-1]
            for jobs in order:
                seconds, digest = run_once(model, args.spec, jobs, Path(folder))
                runs[jobs].append(seconds)
                digests.add(digest)
                shown = ", ".join(f"{name} {s:.1f} s" for name, s in seconds.items())
                print(f"round {round_ + 1} --jobs {jobs}: {shown}; total {sum(seconds.values()):.1f} s; "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)
    few, many = (min(runs[jobs], key=lambda s: sum(s.values())) for jobs in args.jobs)
    print(f"\nbest of {args.rounds} rounds      --jobs {args.jobs[0]:>2}   --jobs {args.jobs[1]:>2}   speedup")
    for name in few:
        print(f"{name:24} {few[name]:9.1f} s {many[name]:9.1f} s {few[name] / many[name]:8.2f}x")
    total_few, total_many = sum(few.values()), sum(many.values())
    print(f"{'passes':24} {total_few:9.1f} s {total_many:9.1f} s {total_few / total_many:8.2f}x")
    print(f"identical output bytes across all {2 * args.rounds} runs: {len(digests) == 1}")
    if args.jobs[0] == 1:
        project(few, weight_mb)
    return 0


def project(one_worker: dict[str, float], weight_mb: float) -> None:
    """Weights are independent tasks, so N workers divide the time (their reads included). The
    fits work in float32 whatever the stored type, so the rate is per parameter."""
    params = LAYERS * DIM * DIM
    print(f"\nper-tensor throughput of one worker, and {PROJECTED_PARAMS / 1e9:.0f} B parameters on N workers:")
    for name, seconds in one_worker.items():
        rate = params / seconds
        hours = [PROJECTED_PARAMS / (rate * n) / 3600 for n in PROJECTED_WORKERS]
        shown = ", ".join(f"{n}: {h:.2f} h" for n, h in zip(PROJECTED_WORKERS, hours))
        print(f"  {name}: {rate / 1e6:.1f} M parameters/s ({weight_mb / seconds:.0f} MB/s of float32) per worker; "
              f"hours on N workers: {shown}")


if __name__ == "__main__":
    sys.exit(main())
