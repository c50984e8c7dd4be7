#!/usr/bin/env python3
"""Error feedback (feedback=true) against the same codec without it, on the 3-layer BERT (issue
15's figures). Prints a table; asserts nothing.

    python bench/bench_feedback.py              # kmeans, uniform, codebook at 3 and 4 bits
    python bench/bench_feedback.py --bits 3 --codecs codebook
    python bench/bench_feedback.py --memory     # also uniform's MatMulNBits kernels (--objective memory)
    python bench/bench_feedback.py --shrink-study   # why H is shrunk toward its diagonal (feedback.SHRINK)

paraphrase-MiniLM-L3-v2 as bench/bench_auto.py sets it up: 32 English sentences calibrate (the
feedback's H = X^T X comes from them), 32 others test. Each row gives the file size, the cosine
of the worst test sentence's embedding (output "461") and of the worst calibration sentence's,
and the time the pass took; the feedback row's time is also given as a ratio to the row without,
both measured in this run one after the other (the machine is shared: read ratios, not seconds).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import graphpass
from graphpass import feedback
from graphpass.deployment import Deployment
from graphpass.verify import Budget

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_auto import (  # noqa: E402  (one WordPiece, one sentence list, one cosine for every BERT bench)
    CALIBRATION_SENTENCES, EMBEDDING, TEST_SENTENCES, WordPiece, real_models, worst_cosine,
)

# Codec settings per index bit rate: per-channel scalar codebooks (their tables cost little on
# the BERT's 384-1536 long channels) and 2-d vector codebooks with per-channel scales.
SETTINGS = {
    3: ["kmeans(bits=3,granularity=channel)", "uniform(bits=3,granularity=channel)",
        "codebook(dim=2,k=64,scale=channel)"],
    4: ["kmeans(bits=4,granularity=channel)", "uniform(bits=4,granularity=channel)",
        "codebook(dim=2,k=256,scale=channel)"],
}


# --objective memory: MatMulNBits 4-bit block 32 (GPTQ's own setting).
MEMORY_SETTING = "uniform(bits=4,granularity=group,group_size=32,lower=kernel)"


# The study behind feedback.SHRINK: 3-bit kmeans of the MatMul weights alone (the embedding
# table, which takes no feedback, would only add its own error), at (damping, shrink) pairs.
STUDY_SETTING = "kmeans(bits=3,granularity=channel,include=MatMul)"
STUDY_POINTS = ((0.01, 0.0), (0.1, 0.0), (1.0, 0.0), (0.01, 0.25), (0.01, 0.5), (0.01, 0.7))


def with_feedback(spec: str) -> str:
    return spec[:-1] + ",feedback=true)"


def compress(path: Path, spec: str, calibration, objective: str = "file") -> tuple[bytes, float]:
    """The compressed model's bytes and the seconds its pass took."""
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "out.onnx"
        result = graphpass.run(path, spec, output=target, inputs=calibration, budget=Budget(), keep_failed=True,
                               deployment=Deployment.parse(objective))
        seconds = sum(p.get("seconds", 0.0) for p in result.report["passes"])
        return target.read_bytes(), seconds


def row(label: str, data: bytes, input_bytes: int, path: Path, test, calibration, seconds: float, ratio: str) -> str:
    return (f"{label:<80} {len(data) / 1e6:>7.2f}MB {len(data) / input_bytes:>8.1%} "
            f"{worst_cosine(path, data, test, EMBEDDING):>11.6f} "
            f"{worst_cosine(path, data, calibration, EMBEDDING):>11.6f} {seconds:>8.1f}s {ratio:>6}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="3,4", help="comma-separated: 3, 4")
    parser.add_argument("--codecs", default="kmeans,uniform,codebook", help="comma-separated")
    parser.add_argument("--memory", action="store_true", help=f"also {MEMORY_SETTING} under --objective memory")
    parser.add_argument("--shrink-study", action="store_true",
                        help=f"instead: {STUDY_SETTING} without feedback and with it at damping/shrink pairs")
    args = parser.parse_args(argv)
    path = Path(real_models.fetch("paraphrase_minilm_l3"))
    tokenizer = WordPiece(Path(real_models.fetch("bert_uncased_tokenizer")))
    calibration = tokenizer.encode_batch(CALIBRATION_SENTENCES)
    test = tokenizer.encode_batch(TEST_SENTENCES)
    input_bytes = path.stat().st_size
    header = (f"{'setting':<80} {'file':>9} {'of input':>8} {'worst test':>11} {'worst calib':>11} "
              f"{'pass time':>9} {'ratio':>6}")
    print(f"paraphrase-MiniLM-L3-v2 ({input_bytes / 1e6:.2f} MB), cosine of output {EMBEDDING}; "
          f"load {os.getloadavg()[0]:.2f} at start")
    print(header)
    print("-" * len(header))
    if args.shrink_study:
        data, seconds = compress(path, STUDY_SETTING, calibration)
        print(row(STUDY_SETTING, data, input_bytes, path, test, calibration, seconds, ""), flush=True)
        for damping, shrink in STUDY_POINTS:
            feedback.DAMPING, feedback.SHRINK = damping, shrink  # the module's constants, for this study only
            data, seconds = compress(path, with_feedback(STUDY_SETTING), calibration)
            label = f"{with_feedback(STUDY_SETTING)} damping {damping} shrink {shrink}"
            print(row(label, data, input_bytes, path, test, calibration, seconds, ""), flush=True)
        return 0
    codecs = args.codecs.split(",")
    runs = [(spec, "file") for bits in args.bits.split(",") for spec in SETTINGS[int(bits)]
            if spec.split("(")[0] in codecs]
    for spec, objective in runs + ([(MEMORY_SETTING, "memory")] if args.memory else []):
        plain_seconds = None
        for label in (spec, with_feedback(spec)):
            data, seconds = compress(path, label, calibration, objective)
            ratio = "" if plain_seconds is None else f"{seconds / plain_seconds:.1f}x"
            plain_seconds = plain_seconds or seconds
            label += " --objective memory" if objective == "memory" else ""
            print(row(label, data, input_bytes, path, test, calibration, seconds, ratio), flush=True)
    print(f"load {os.getloadavg()[0]:.2f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
