#!/usr/bin/env python3
"""`--jobs 1` against `--jobs 2` on the 1.07 GB synthetic model (issue 17's scale figures).

    flock /tmp/graphpass-bigmem.lock python bench/bench_jobs.py [--rounds 2] [--spec "tie,kmeans(bits=4)"]

Generates (once, cached in bench/out/) `python -m fixtures.synthetic` at 16 layers of
4096 x 4096 float32 weights, then runs `graphpass run --no-verify --no-cost` on it with each
worker count in turn, alternating the order every round, each run a fresh process. Prints each
pass's seconds per run, the speedup of the passes' total (best of the rounds) and whether every
run wrote the same bytes. Then the per-tensor throughput of one worker: the last pass's plan of
a few weights, timed in CPU seconds of the calling thread (time.thread_time), so that other
processes on the machine slow it little, with what that projects for a 70 B-parameter model on
N workers. `--rounds 0` measures the throughput alone. Asserts nothing. Peak RSS is about 3 GB
per run: hold the big-memory lock.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from graphpass.edit import Model
from graphpass.manager import PassContext, parse_spec
from graphpass.model import load_model
from graphpass.parallel import Workers

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
LAYERS, DIM = 16, 4096
PROJECTED_PARAMS = 70e9
PROJECTED_WORKERS = (1, 8, 64, 256)
TIMED_TENSORS = 3


def synthetic_model() -> Path:
    path = OUT / f"tanh_chain_{LAYERS}x{DIM}.onnx"
    if not path.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "fixtures.synthetic", str(path), "--layers", str(LAYERS),
                        "--dim", str(DIM)], check=True, cwd=ROOT)
    return path


def run_once(model: Path, spec: str, jobs: int, folder: Path) -> tuple[dict[str, float], str, float]:
    """Per-pass seconds of one `graphpass run`, a digest of the files it wrote, and the cores it
    used on average (CPU seconds over wall seconds, load and save included): on a busy machine
    the scheduler's share, not the worker count, may be what limits a run."""
    out, report = folder / f"jobs{jobs}.onnx", folder / f"jobs{jobs}.json"
    cpu_before, wall_before = _children_cpu(), time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "graphpass"), "run", str(model), "-o", str(out), "--passes", spec,
                    "--no-verify", "--no-cost", "--jobs", str(jobs), "--report", str(report)],
                   check=True, stdout=subprocess.DEVNULL)
    cores = (_children_cpu() - cpu_before) / (time.perf_counter() - wall_before)
    seconds = {p["spec"]: p["seconds"] for p in json.loads(report.read_text())["passes"]}
    digest = hashlib.sha256()
    for written in sorted(folder.glob(f"jobs{jobs}.onnx*")):
        digest.update(written.read_bytes())
    return seconds, digest.hexdigest(), cores


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--spec", default="tie,kmeans(bits=4)")
    parser.add_argument("--jobs", type=int, nargs=2, default=(1, 2), metavar=("FEW", "MANY"))
    parser.add_argument("--model", type=Path, help=f"an existing {LAYERS} x {DIM} synthetic model to use")
    args = parser.parse_args()
    model = args.model or synthetic_model()
    on_disk = sum(p.stat().st_size for p in model.parent.glob(model.name + "*")) / 1e6
    print(f"model: {model.name}, {on_disk:,.0f} MB on disk; spec {args.spec}; "
          f"load {os.getloadavg()[0]:.2f} at the start")
    if args.rounds:
        side_by_side(model, args)
    project(args.spec, model)
    return 0


def side_by_side(model: Path, args) -> None:
    runs: dict[int, list[dict[str, float]]] = {jobs: [] for jobs in args.jobs}
    digests = set()
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=OUT) as folder:
        for round_ in range(args.rounds):
            order = args.jobs if round_ % 2 == 0 else args.jobs[::-1]
            for jobs in order:
                seconds, digest, cores = run_once(model, args.spec, jobs, Path(folder))
                runs[jobs].append(seconds)
                digests.add(digest)
                shown = ", ".join(f"{name} {s:.1f} s" for name, s in seconds.items())
                print(f"round {round_ + 1} --jobs {jobs}: {shown}; total {sum(seconds.values()):.1f} s; "
                      f"{cores:.2f} cores used; load {os.getloadavg()[0]:.2f}", flush=True)
    few, many = (min(runs[jobs], key=lambda s: sum(s.values())) for jobs in args.jobs)
    print(f"\nbest of {args.rounds} rounds      --jobs {args.jobs[0]:>2}   --jobs {args.jobs[1]:>2}   speedup")
    for name in few:
        print(f"{name:24} {few[name]:9.1f} s {many[name]:9.1f} s {few[name] / many[name]:8.2f}x")
    total_few, total_many = sum(few.values()), sum(many.values())
    print(f"{'passes':24} {total_few:9.1f} s {total_many:9.1f} s {total_few / total_many:8.2f}x")
    print(f"identical output bytes across all {2 * args.rounds} runs: {len(digests) == 1}")


def project(spec: str, model: Path) -> None:
    """Weights are independent tasks, so N workers divide the time. The fits work in float32
    whatever the stored type, so the rate is per parameter."""
    codec = parse_spec(spec)[-1]
    if not hasattr(codec, "plan"):
        print(f"\n{codec.name} plans no single weight: no per-tensor throughput")
        return
    ctx = PassContext(Model(load_model(model, map_external=True).proto), workers=Workers(1))
    weights = ctx.model.weights()[:TIMED_TENSORS]
    started = time.thread_time()
    for weight in weights:
        codec.plan(ctx, weight)
    seconds = time.thread_time() - started
    params = sum(w.size for w in weights)
    rate = params / seconds
    hours = ", ".join(f"{n}: {PROJECTED_PARAMS / (rate * n) / 3600:.2f} h" for n in PROJECTED_WORKERS)
    print(f"\n{codec.describe()} per tensor, one worker: {rate / 1e6:.2f} M parameters per CPU second "
          f"({params * 4 / 1e6 / seconds:.1f} MB/s of float32; {len(weights)} tensors of {weights[0].size:,})")
    print(f"{PROJECTED_PARAMS / 1e9:.0f} B parameters on N workers: {hours}")


if __name__ == "__main__":
    sys.exit(main())
