#!/usr/bin/env python3
"""What checking every tensor at load costs (issue 16's target: <= 5% of load time on the
3-layer BERT). Prints a table; asserts nothing.

    python bench/bench_validate.py [--rounds 15] [--models paraphrase_minilm_l3 magika ...]

Each round loads each model twice, with and without the check (alternated, so that a busy
neighbour does not bias one side), and each figure is the best of the rounds. `check` is the
check alone on the file's bytes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.append(str(Path(__file__).resolve().parents[1]))

from fixtures import real_models  # noqa: E402
from graphpass import model as model_io  # noqa: E402
from graphpass.validate import check_tensors  # noqa: E402

DEFAULT_MODELS = ("paraphrase_minilm_l3", "t5_title_encoder", "minilm_l6_int8", "magika", "silero_vad", "ppocr_rec")


def best_seconds(action, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - start)
    return best


def measure(path: Path, rounds: int) -> tuple[float, float, float]:
    """Best load time with the check, without it, and of the check alone."""
    data = path.read_bytes()
    with_check, without_check = float("inf"), float("inf")
    for _ in range(rounds):
        with_check = min(with_check, best_seconds(lambda: model_io.load_model(path), 1))
        with mock.patch.object(model_io, "_check_tensors", lambda *_: None):
            without_check = min(without_check, best_seconds(lambda: model_io.load_model(path), 1))
    check_alone = best_seconds(lambda: check_tensors(data), rounds)
    return with_check, without_check, check_alone


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--models", nargs="*", default=list(DEFAULT_MODELS))
    options = parser.parse_args()
    header = f"{'model':<22} {'file':>9} {'load, no check':>15} {'load, checked':>14} {'check alone':>12} {'check/load':>11}"
    print(header)
    print("-" * len(header))
    for name in options.models:
        path = Path(real_models.fetch(name))
        with_check, without_check, check_alone = measure(path, options.rounds)
        size_mb = path.stat().st_size / 1e6
        print(f"{name:<22} {size_mb:>7.2f}MB {without_check * 1e3:>12.2f} ms {with_check * 1e3:>11.2f} ms "
              f"{check_alone * 1e3:>9.2f} ms {check_alone / without_check:>10.1%}")
    print(f"best of {options.rounds} rounds; load = read + parse + external data + structure checks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
