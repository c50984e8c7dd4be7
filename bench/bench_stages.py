#!/usr/bin/env python3
"""graphpass's own memory and time, stage by stage, without onnxruntime: load, passes, save.

    flock /tmp/graphpass-bigmem.lock python bench/bench_stages.py MODEL [--passes SPEC] [--jobs N] [--read-in]

Runs in this one process what `graphpass run --no-verify` does before it opens the output in
onnxruntime: load the model as a run does (its external weights left mapped in their data file;
`--read-in` reads them into the protobuf instead, as loads did before), run the passes, save
with external data to a temporary folder beside the model. After each stage it prints the
seconds, the process's peak RSS so far (ru_maxrss) and its RSS then. The verification and cost
steps, whose peaks are onnxruntime's, are left out, so the peak is the passes' own. Asserts
nothing.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from graphpass.edit import Model
from graphpass.manager import PassContext, PassManager, parse_spec
from graphpass.model import load_model, save_compacted
from graphpass.parallel import Workers


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def show(stage: str, started: float) -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"{stage:7} {time.perf_counter() - started:7.1f} s   peak RSS {peak / 1e9:5.2f} GB   "
          f"RSS now {resident_bytes() / 1e9:5.2f} GB", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--passes", default="tie,kmeans(bits=4)")
    parser.add_argument("--jobs", type=int, default=None, help="worker threads (default: every core)")
    parser.add_argument("--read-in", action="store_true", help="read external weights into the protobuf at load")
    args = parser.parse_args(argv)
    print(f"{args.model.name}: {args.passes}, weights {'read in' if args.read_in else 'mapped'}")
    started = time.perf_counter()
    loaded = load_model(args.model, map_external=not args.read_in)
    show("load", started)
    ctx = PassContext(Model(loaded.proto), workers=Workers(args.jobs))
    started = time.perf_counter()
    try:
        PassManager(parse_spec(args.passes)).run(ctx)
    finally:
        ctx.workers.close()
    show("passes", started)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.model.parent, prefix=".bench-stages-") as folder:
        save_compacted(ctx.model.proto, Path(folder) / "out.onnx", external_data=True)
    show("save", started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
