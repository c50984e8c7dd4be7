"""What a run costs on a gigabyte model (issue 17): wall time, per-pass seconds and peak RSS.

    flock /tmp/graphpass-bigmem.lock python bench/bench_scale.py [--model PATH] [--cost] [--specs SPEC ...]

Generates the 1.07 GB synthetic model of `fixtures.synthetic` (16 MatMuls of 4096x4096 with Tanh
between, external data; kept at --model if given, else in a temporary folder), then runs
`graphpass run` on it once per case, each in a fresh process, with verification on and
`--external-data`. Beside them, a baseline process only loads and saves the model, as a run
does (its weights left in the input's data file until written): each run's time is also shown
as a multiple of it, which holds better than seconds on a busy machine.

Columns: wall seconds of the process, the passes' seconds (from the JSON report), everything
else (load, download sizes, save, verification and, with --cost, the runtime cost probes),
peak RSS of graphpass itself (the report's figure: its onnxruntime sessions included) and of the
whole process tree (wait4: the cost probes included), and how the download size was computed.
Asserts nothing. Needs about 3.5 GB of RAM and 2.5 GB of disk.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # for `fixtures`; appended, so the installed graphpass wins
from fixtures.synthetic import write_tanh_chain  # noqa: E402

DEFAULT_SPECS = ("tie", "kmeans(bits=4)")
BASELINE_SCRIPT = """
import sys
from graphpass.model import load_model, save_model
save_model(load_model(sys.argv[1], map_external=True).proto, sys.argv[2], external_data=True)
"""


@dataclass(frozen=True)
class Case:
    """One `graphpass run` configuration. A new option to compare (--jobs, say) is one more
    field here and one more loop in `cases`."""

    spec: str
    cost: bool = False

    def args(self) -> list[str]:
        return [] if self.cost else ["--no-cost"]

    @property
    def label(self) -> str:
        return self.spec + (" +cost" if self.cost else "")


@dataclass
class Measured:
    wall_seconds: float
    tree_peak_rss_bytes: int
    report: dict | None = None


def cases(specs: list[str], cost: bool) -> list[Case]:
    return [Case(spec, measured) for spec in specs for measured in ((False, True) if cost else (False,))]


def timed_process(command: list[str]) -> Measured:
    """Wall time and peak RSS of one process and its children (wait4 reports the largest)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode not in (0, 1):  # 1: a budget missed, still a measured run
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}): {process.stderr.read().decode()[-400:]}")
    return Measured(wall, usage.ru_maxrss * 1024)


def run_case(case: Case, model: Path, scratch: Path) -> Measured:
    output, report = scratch / "out.onnx", scratch / "report.json"
    measured = timed_process([sys.executable, "-m", "graphpass.cli", "run", str(model), "--passes", case.spec,
                              "-o", str(output), "--external-data", "--report", str(report), *case.args()])
    measured.report = json.loads(report.read_text())
    return measured


def baseline(model: Path, scratch: Path) -> Measured:
    return timed_process([sys.executable, "-c", BASELINE_SCRIPT, str(model), str(scratch / "copy.onnx")])


def gigabytes(count: int | None) -> str:
    return "-" if count is None else f"{count / 1e9:.2f} GB"


def zip_method(report: dict) -> str:
    sampled = report["input"].get("zip_sample_bytes")
    return "exact" if sampled is None else f"{sampled / 1e6:.1f} MB sample"


def render(rows: list[tuple[str, Measured]], base: Measured) -> str:
    header = (f"{'case':<22} {'wall':>8} {'x load+save':>11} {'passes':>8} {'other':>8} "
              f"{'peak RSS':>9} {'tree peak':>9}  download size")
    lines = [header, "-" * len(header),
             f"{'load + save only':<22} {base.wall_seconds:>7.1f}s {1.0:>10.1f}x {'':>8} {'':>8} "
             f"{'':>9} {gigabytes(base.tree_peak_rss_bytes):>9}"]
    for label, m in rows:
        passes = sum(p["seconds"] for p in m.report["passes"])
        lines.append(f"{label:<22} {m.wall_seconds:>7.1f}s {m.wall_seconds / base.wall_seconds:>10.1f}x "
                     f"{passes:>7.1f}s {m.wall_seconds - passes:>7.1f}s {gigabytes(m.report.get('peak_rss_bytes')):>9} "
                     f"{gigabytes(m.tree_peak_rss_bytes):>9}  {zip_method(m.report)}")
        lines += [f"    {p['spec']:<18} {p['seconds']:>7.1f}s" for p in m.report["passes"]]
    return "\n".join(lines)


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="Where to keep the generated model (reused when present).")
    parser.add_argument("--specs", nargs="+", default=list(DEFAULT_SPECS), help="Pass specs to run.")
    parser.add_argument("--cost", action="store_true", help="Also run each spec measuring the runtime cost (as `run` does by default).")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="graphpass-scale-") as folder:
        scratch = Path(folder)
        model = args.model or scratch / "chain.onnx"
        if not model.exists():
            write_tanh_chain(model)
        print(f"load average before: {load_average()}")
        base = baseline(model, scratch)
        rows = [(case.label, run_case(case, model, scratch)) for case in cases(args.specs, args.cost)]
        print(render(rows, base))
        print(f"load average after: {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
