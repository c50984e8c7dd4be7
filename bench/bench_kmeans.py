"""Benchmark graphpass.binning.kmeans against scikit-learn's KMeans.

    python bench/bench_kmeans.py [--quick]

Heavy-tailed weights (Student-t, df=4, 0.1% outliers) at k=16 and k=256,
timed for our kmeans and ``KMeans(n_clusters=k, n_init=1, random_state=0)``
in the same run, plus a per-channel row (768 groups x 768 weights, k=16).
Targets: time ratio sklearn/ours >= 30, SSE ratio ours/sklearn <= 1.0.
Prints a table; asserts nothing.  ``--quick`` shrinks every size for a
smoke run.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from graphpass import binning

sys.path.append(str(Path(__file__).resolve().parents[1]))  # for `fixtures`; appended, so the installed graphpass wins
from fixtures.generate import heavy_tailed  # noqa: E402


def sse(x: np.ndarray, codebook: np.ndarray, labels: np.ndarray) -> float:
    return float(((x.astype(np.float64) - codebook[labels]) ** 2).sum())


def run_ours(binning, x: np.ndarray, k: int, repeats: int):
    """Best-of-``repeats`` wall time and the result of the last run."""
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        result = binning.kmeans(x, k)
        best = min(best, time.perf_counter() - start)
    return best, result


def run_sklearn(x: np.ndarray, k: int):
    from sklearn.cluster import KMeans

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = KMeans(n_clusters=k, n_init=1, random_state=0).fit(x[:, None])
    seconds = time.perf_counter() - start
    return seconds, sse(x, model.cluster_centers_[:, 0].astype(np.float64), model.labels_)


def per_tensor_row(binning, n: int, k: int, repeats: int) -> tuple:
    x = heavy_tailed(n)
    ours_s, result = run_ours(binning, x, k, repeats)
    ours_sse = sse(x, result.codebook[0], result.labels[0])
    sk_s, sk_sse = run_sklearn(x, k)
    return f"{n:,}", k, ours_s, sk_s, ours_sse / sk_sse


def per_channel_row(binning, groups: int, n: int, k: int, sampled: int, repeats: int) -> tuple:
    """sklearn runs on ``sampled`` groups only (one fit per group); its time
    is scaled to all groups and the SSE ratio is over those groups."""
    x = heavy_tailed((groups, n))
    ours_s, result = run_ours(binning, x, k, repeats)
    picked = np.linspace(0, groups - 1, sampled).astype(int)
    sk_s, sk_sse, ours_sse = 0.0, 0.0, 0.0
    for g in picked:
        seconds, value = run_sklearn(x[g], k)
        sk_s += seconds
        sk_sse += value
        ours_sse += sse(x[g], result.codebook[g], result.labels[g])
    label = f"{groups}x{n}" + ("" if sampled == groups else f" (sklearn on {sampled} groups, time scaled)")
    return label, k, ours_s, sk_s * groups / sampled, ours_sse / sk_sse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    args = parser.parse_args()
    sizes = [100_000, 200_000] if args.quick else [1_000_000, 4_000_000]
    channel_groups, channel_sample = (96, 16) if args.quick else (768, 96)

    header = f"{'n':>44} {'k':>4} {'ours s':>8} {'sklearn s':>10} {'time ratio':>11} {'SSE ours/sk':>12}"
    print(header)
    print("-" * len(header))
    rows = [(n, k) for n in sizes for k in (16, 256)]
    for n, k in rows:
        print_row(*per_tensor_row(binning, n, k, repeats=3))
    print_row(*per_channel_row(binning, channel_groups, 768, 16, channel_sample, repeats=3))
    print("targets: time ratio >= 30, SSE ours/sk <= 1.0")


def print_row(label, k, ours_s, sk_s, sse_ratio) -> None:
    print(f"{label:>44} {k:>4} {ours_s:>8.3f} {sk_s:>10.2f} {sk_s / ours_s:>10.1f}x {sse_ratio:>12.4f}", flush=True)


if __name__ == "__main__":
    main()
