#!/usr/bin/env python3
"""Issue 17 at LLM scale: `tie,kmeans(bits=4),fold` and `tie,auto,fold` on a >= 1 B-parameter
LLM-shaped decoder (fixtures/llm.py: TinyLlama-1.1B's shape, KV-cache inputs and outputs, LM
head stored as the embedding's transpose, external data), in float16 and float32.

Prints a table; asserts nothing. Each pipeline runs through the CLI in a fresh process under
`/usr/bin/time -v` (peak RSS, wall time) and, when it may exceed 3 GB, under
`flock /tmp/graphpass-bigmem.lock` (one big run on the machine at a time), with verification
in onnxruntime on generated inputs (batch 1, 16 new tokens after a past of 16). The tie and
fold findings come from the JSON report.

    python bench/bench_llm.py                          # float16 and float32, tie,kmeans(bits=4),fold
    python bench/bench_llm.py --dtypes float16 --auto  # also tie,auto,fold --min-cosine 0.99
    python bench/bench_llm.py --layers 4 --hidden 512 --ffn 1408 --heads 8 --kv-heads 2 --vocab 8000 --auto

Models are generated into a temporary folder (or --workdir, kept) and deleted afterwards:
the float16 one is 2.2 GB, the float32 one 4.4 GB, and each output lands next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fixtures.llm import LlmConfig, write_llm  # noqa: E402

LOCK = "/tmp/graphpass-bigmem.lock"
# Runs expected above this peak RSS take the lock; a run peaks at about 3x the model's bytes.
BIG_RUN_BYTES = 3e9
PEAK_PER_MODEL_BYTE = 3
KMEANS = ("tie,kmeans(bits=4),fold", [])
AUTO = ("tie,auto,fold", ["--min-cosine", "0.99"])


def graphpass_command() -> list[str]:
    found = shutil.which("graphpass", path=str(Path(sys.executable).parent))
    return [found] if found else [sys.executable, "-m", "graphpass.cli"]


def timed(command: list[str], big: bool) -> dict:
    """Run `command` under /usr/bin/time -v (and flock when `big`): exit code, wall seconds,
    peak RSS bytes, output."""
    full = (["flock", LOCK] if big else []) + ["/usr/bin/time", "-v", *command]
    started = time.perf_counter()
    done = subprocess.run(full, capture_output=True, text=True)
    wall = time.perf_counter() - started  # includes waiting for the lock; time -v's own figure does not
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    elapsed = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", done.stderr)
    return {
        "returncode": done.returncode,
        "seconds": _seconds(elapsed.group(1)) if elapsed else wall,
        "peak_rss": int(peak.group(1)) * 1024 if peak else None,
        "stdout": done.stdout,
        "stderr": done.stderr,
    }


def _seconds(clock: str) -> float:
    total = 0.0
    for part in clock.split(":"):
        total = total * 60 + float(part)
    return total


def files_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + ".data")) if p.exists())


def findings(report_path: Path) -> dict:
    """tie's transposed LM head and fold's runs, from the JSON report."""
    report = json.loads(report_path.read_text())
    passes = {p["name"]: p for p in report["passes"]}
    ties = passes.get("tie", {}).get("details", {}).get("ties", [])
    head = [m for t in ties for m in t["members"] if m["weight"] == "lm_head.weight"]
    runs = passes.get("fold", {}).get("details", {}).get("runs", [])
    verified = report.get("verify") or {}
    return {
        "head_tied": f"{head[0]['kind']} {head[0].get('perm')}" if head else "no",
        "fold": ", ".join(f"{r['blocks']} layers -> {r['op']}" for r in runs) or "none",
        "verified": verified.get("passed"),
        "worst_cosine": _worst_cosine(verified),
        "pass_seconds": {name: round(p["seconds"], 1) for name, p in passes.items()},
    }


def _worst_cosine(verified: dict) -> float | None:
    cosines = [o.get("cosine") for o in (verified.get("outputs") or {}).values() if o.get("cosine") is not None]
    return min(cosines) if cosines else None


def bench(config: LlmConfig, workdir: Path, pipelines: list[tuple[str, list[str]]]) -> list[dict]:
    model = workdir / f"llm_{config.dtype}.onnx"
    started = time.perf_counter()
    if not model.exists():
        write_llm(model, config)
    print(f"{model.name}: {config.parameters / 1e9:.2f} B parameters, {files_bytes(model) / 1e9:.2f} GB, "
          f"generated in {time.perf_counter() - started:.0f} s", flush=True)
    rows = []
    for spec, extra in pipelines:
        out = workdir / f"out_{config.dtype}_{spec.split(',')[1].split('(')[0]}.onnx"
        report = out.with_suffix(".json")
        command = [*graphpass_command(), "run", str(model), "--passes", spec, "-o", str(out), "--report",
                   str(report), "--no-cost", *extra]
        load = os.getloadavg()[0]
        measured = timed(command, big=files_bytes(model) * PEAK_PER_MODEL_BYTE > BIG_RUN_BYTES)
        row = {"dtype": config.dtype, "spec": " ".join([spec, *extra]), "input_bytes": files_bytes(model),
               "output_bytes": files_bytes(out) if measured["returncode"] == 0 else None,
               "seconds": measured["seconds"], "peak_rss": measured["peak_rss"], "load": load,
               "returncode": measured["returncode"]}
        if report.exists():
            row.update(findings(report))
        if measured["returncode"] != 0:
            row["error"] = measured["stderr"].strip().splitlines()[-1:] if measured["stderr"] else ""
            tail = [line for line in measured["stderr"].splitlines() if "graphpass" in line][-1:]
            row["error"] = tail or row["error"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        for path in (out, out.with_name(out.name + ".data")):
            path.unlink(missing_ok=True)
    return rows


def render(rows: list[dict]) -> str:
    header = f"{'dtype':8} {'pipeline':40} {'input':>8} {'output':>8} {'time':>7} {'peak RSS':>9} {'RSS/input':>9} " \
             f"{'tie head':>14} {'fold':>18} {'cosine':>8} {'load':>5}"
    lines = [header, "-" * len(header)]
    for r in rows:
        ratio = r["peak_rss"] / r["input_bytes"] if r.get("peak_rss") else float("nan")
        output = f"{r['output_bytes'] / 1e9:.2f} GB" if r.get("output_bytes") else "failed"
        cosine = f"{r['worst_cosine']:.4f}" if r.get("worst_cosine") is not None else "-"
        lines.append(
            f"{r['dtype']:8} {r['spec']:40} {r['input_bytes'] / 1e9:6.2f}GB {output:>8} {r['seconds']:6.0f}s "
            f"{(r['peak_rss'] or 0) / 1e9:7.2f}GB {ratio:8.2f}x {r.get('head_tied', '-'):>14} "
            f"{r.get('fold', '-'):>18} {cosine:>8} {r['load']:5.1f}"
        )
        if r.get("error"):
            lines.append(f"    failed: {r['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    defaults = LlmConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["float16", "float32"], choices=["float16", "float32"])
    parser.add_argument("--auto", action="store_true", help="also run tie,auto,fold --min-cosine 0.99")
    parser.add_argument("--no-kmeans", action="store_true", help="skip tie,kmeans(bits=4),fold")
    parser.add_argument("--workdir", type=Path, help="keep models here (default: a temporary folder)")
    for name in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    args = parser.parse_args(argv)
    pipelines = ([] if args.no_kmeans else [KMEANS]) + ([AUTO] if args.auto else [])
    shape = {k: getattr(args, k) for k in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab")}
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_llm_"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for dtype in args.dtypes:
            config = replace(defaults, **shape, dtype=dtype)
            rows += bench(config, workdir, pipelines)
            if not args.workdir:
                for path in workdir.glob(f"llm_{dtype}.onnx*"):
                    path.unlink()
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(f"config: {asdict(replace(defaults, **shape))}; verification on generated inputs (batch 1, 16 tokens, "
          "past 16); time and peak RSS from /usr/bin/time -v of the CLI process; load = 1-min load average at start")
    print(render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
