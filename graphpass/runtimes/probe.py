"""Measure what one model costs to run in onnxruntime, in this process, and print it as one JSON line.

    python -m graphpass.runtimes.probe MODEL FEEDS.npz --runs 20 --threads 1

Meant to run in a fresh process per model (graphpass.runtimes.cost starts one), so that no
other session, allocator cache or page of another model is counted. onnxruntime is imported
and the feeds are loaded before anything is measured, then:

- session memory: resident memory (RSS) grown from just before the session is created
  through its first run (weights, folded constants, the first run's buffers);
- start: seconds to create the session (read, optimise, fold constants);
- latency: median seconds of the runs after the first;
- peak RSS: the highest resident memory this process reached (VmHWM on Linux, else `ru_maxrss`).

A model that does not load or run gives one line on stderr and exit code 2.

This file imports only the standard library, numpy and onnxruntime (never graphpass), so the
figures of a small model are not buried under the compiler's own imports.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort

# The timed runs stop early once they would take longer than this, so a slow model costs
# seconds, not minutes; never fewer than MIN_RUNS, whose median still drops one outlier.
DEFAULT_LATENCY_SECONDS = 3.0
MIN_RUNS = 3


class ProbeError(Exception):
    """The model cannot be measured; the message is one line for the caller to report."""


def current_rss_bytes() -> int:
    """Resident memory now. /proc where it exists; elsewhere the peak so far, which equals the
    current figure while memory only grows (as it does from session creation to first run)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """The highest resident memory of this process. On Linux, VmHWM: ru_maxrss survives exec, so a
    probe started from a large process (graphpass itself, after compiling) would report that
    process's peak; VmHWM belongs to the address space exec gave us."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError as exc:  # Windows
        raise ProbeError("memory figures need /proc or the resource module, and this platform has neither") from exc
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux and the BSDs count kibibytes, macOS bytes.
    return peak if sys.platform == "darwin" else peak * 1024


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def load_feeds(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except Exception as exc:  # numpy raises several types for a bad archive
        raise ProbeError(f"cannot read the inputs {path}: {_one_line(exc)}") from exc


def open_session(model: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # the caller reports our one line; onnxruntime's would repeat it
    try:
        return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated types
        raise ProbeError(f"onnxruntime cannot load {model}: {_one_line(exc)}") from exc


def session_feed(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    needed = [i.name for i in session.get_inputs()]
    missing = [name for name in needed if name not in feeds]
    if missing:
        raise ProbeError(f"no value for input(s) {', '.join(missing)} (given: {', '.join(sorted(feeds)) or 'none'})")
    return {name: feeds[name] for name in needed}


def timed_run(session: ort.InferenceSession, feed: dict[str, np.ndarray]) -> float:
    started = time.perf_counter()
    try:
        session.run(None, feed)
    except Exception as exc:
        raise ProbeError(f"onnxruntime failed to run the model: {_one_line(exc)}") from exc
    return time.perf_counter() - started


def latency_runs(first_run_seconds: float, runs: int, seconds: float) -> int:
    """How many timed runs fit in `seconds`, judged by the first (slowest) run, within [MIN_RUNS, runs]."""
    if first_run_seconds <= 0:
        return runs
    return max(MIN_RUNS, min(runs, int(seconds / first_run_seconds)))


def measure(model: str, feeds: dict[str, np.ndarray], runs: int, threads: int,
            latency_seconds: float = DEFAULT_LATENCY_SECONDS) -> dict:
    rss_before = current_rss_bytes()
    started = time.perf_counter()
    session = open_session(model, threads)
    start_seconds = time.perf_counter() - started
    feed = session_feed(session, feeds)
    first_run_seconds = timed_run(session, feed)
    session_memory = current_rss_bytes() - rss_before
    count = latency_runs(first_run_seconds, runs, latency_seconds)
    latencies = [timed_run(session, feed) for _ in range(count)]
    return {
        "session_memory_bytes": session_memory,
        "peak_rss_bytes": peak_rss_bytes(),
        "start_seconds": start_seconds,
        "latency_seconds": statistics.median(latencies),
        "first_run_seconds": first_run_seconds,
        "runs": count,
    }


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m graphpass.runtimes.probe", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="the .onnx file")
    parser.add_argument("feeds", help="inputs as .npz (name -> array)")
    parser.add_argument("--runs", type=_positive_int, default=20, help="timed runs after the first (at most)")
    parser.add_argument("--threads", type=_positive_int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--latency-seconds", type=float, default=DEFAULT_LATENCY_SECONDS,
                        help="fewer timed runs when the first run says they would take longer than this")
    args = parser.parse_args(argv)
    ort.set_default_logger_severity(4)
    try:
        feeds = load_feeds(args.feeds)
        figures = measure(args.model, feeds, args.runs, args.threads, args.latency_seconds)
    except ProbeError as exc:
        print(f"probe: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print("probe: out of memory", file=sys.stderr)
        return 2
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
