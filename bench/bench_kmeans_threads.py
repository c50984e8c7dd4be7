"""Per-group k-means on two threads against one, per DP batch size.

    python bench/bench_kmeans_threads.py [--cells 8192,65536,262144]

graphpass.binning's DP runs its groups in batches of about `_DP_CHUNK_CELLS / bins` groups.
Small batches spend their time in numpy's per-call work, which holds the GIL, so the run's
worker threads wait on each other. For groups of 128 values (auto's granularity=group) and
channels of 2048 and 5632 values (the 1.1 B decoder's), at k = 8 and 16, this times four
weights fitted on two threads and two fitted on one (doubled), per batch size, and checks
that the batch size leaves the answer unchanged. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from graphpass.binning import kmeans1d

SHAPES = {"groups of 128": (4096, 128), "channels of 2048": (256, 2048), "channels of 5632": (96, 5632)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", default="8192,65536,262144", help="comma-separated DP batch sizes")
    cells = [int(c) for c in parser.parse_args().cells.split(",")]
    default = kmeans1d._DP_CHUNK_CELLS
    rng = np.random.default_rng(0)
    print(f"seconds on two threads (four weights) / on one (two weights, doubled); now {default}")
    print(f"{'weights':<18} {'k':>3}  " + "  ".join(f"{c:>15}" for c in cells))
    for name, shape in SHAPES.items():
        weights = [rng.standard_normal(shape).astype(np.float32) for _ in range(4)]
        energy = rng.uniform(0.5, 2, shape)  # as auto's activation-aware fit weighs values
        for k in (8, 16):
            row, answers = [], []
            for size in cells:
                kmeans1d._DP_CHUNK_CELLS = size
                fit = lambda x: kmeans1d.kmeans(x, k, sample_weight=energy)  # noqa: E731
                with ThreadPoolExecutor(2) as pool:
                    start = time.perf_counter()
                    answers.append(list(pool.map(fit, weights))[0])
                    two = time.perf_counter() - start
                start = time.perf_counter()
                for x in weights[:2]:
                    fit(x)
                one = 2 * (time.perf_counter() - start)
                row.append(f"{two:6.2f} / {one:6.2f}")
            same = all(np.array_equal(a.labels, answers[0].labels) for a in answers)
            print(f"{name:<18} {k:>3}  " + "  ".join(f"{r:>15}" for r in row) + ("" if same else "  ANSWERS DIFFER"))
    kmeans1d._DP_CHUNK_CELLS = default


if __name__ == "__main__":
    main()
