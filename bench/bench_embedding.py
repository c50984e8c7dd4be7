#!/usr/bin/env python3
"""The BERT's word embedding alone: bytes against the worst test sentence, per codec setting.

    python bench/bench_embedding.py [--specs "codebook(dim=2,k=256,scale=channel);..."]
    python bench/bench_embedding.py --spectrum   # what a transform codec, or any code, could still gain

paraphrase-MiniLM-L3-v2's 30522 x 384 word embedding is two thirds of what auto writes at
--min-cosine 0.99. Each setting here compresses that table alone (every other weight exact),
planned by the codec as auto plans it, with hot rows counted on the 32 calibration sentences;
the figures are the worst of the 32 test (and calibration) sentences' embedding cosine in
onnxruntime, and the table's stored bytes. Settings with feedback=true assign through the
table's output sensitivity G (graphpass.table_sensitivity), measured once on the calibration
sentences, as auto does on its fitting share. Prints a table; asserts nothing.

--spectrum instead prints what transform coding could gain on the table, at high rate (each
halving of a value's error costs half a bit): errors count as e^T G e per row, so coding each
direction of the best basis (the eigenvectors of G^1/2 C G^1/2, C the table's covariance) at its
own rate (reverse water-filling) beats coding every column alike by the ratio of the arithmetic to
the geometric mean of the directions' weighted variances. Error feedback through G reaches part of
that gain without a transform (the table above: about a quarter to a third less error).
It then plans each of --at's settings and prints the bits per weight that reverse water-filling
over those directions needs for the setting's own error: what an ideal code (of unbounded
dimension) would need on a Gaussian table of the same covariance, in the same metric. A Gaussian
is the hardest source of a given covariance, so this is not a bound for the real table, only for
codes that use no more of it than its covariance.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

import graphpass  # noqa: F401  (registers the passes)
from graphpass.activations import gathered_row_counts
from graphpass.edit import Model
from graphpass.manager import PassContext, parse_spec
from graphpass.parallel import Workers
from graphpass.sensitivity import Probe
from graphpass.table_sensitivity import table_sensitivity

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # for `fixtures`; appended, so the installed graphpass wins
sys.path.append(str(ROOT / "bench"))
from bench_auto import CALIBRATION_SENTENCES, EMBEDDING, TEST_SENTENCES, WordPiece  # noqa: E402
from fixtures import real_models  # noqa: E402

TABLE = "model.0.auto_model.embeddings.word_embeddings.weight"
AT = "codebook(dim=3,k=1024,scale=channel,hot_rows=2,feedback=true);kmeans(bits=5,granularity=channel,codebook_dtype=uint8)"
CODEBOOKS = ((4, 256), (2, 64), (3, 1024), (2, 256), (2, 1024))  # (dim, k): 2.1 to 5.4 bits per weight
SPECS = [f"codebook(dim={d},k={k},scale=channel{hot})" for d, k in CODEBOOKS
         for hot in ("", ",hot_rows=2", ",hot_rows=2,feedback=true")] \
    + [f"kmeans(bits={b},granularity=channel,codebook_dtype={dtype})" for b in (4, 5) for dtype in ("float16", "uint8")]


def worst_cosine(session: ort.InferenceSession, reference: np.ndarray, feeds) -> float:
    got = session.run([EMBEDDING], feeds)[0]
    cosine = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
    return float(cosine.min())


def gain_db(alike: float, variances: np.ndarray) -> float:
    """Reverse water-filling's gain at high rate, in dB: every value at one rate (error `alike`,
    the mean of the columns' weighted variances) against each direction of `variances` at its
    own (their geometric mean)."""
    return float(10 * np.log10(alike / np.exp(np.log(variances).mean())))


def water_filling_bits(variances: np.ndarray, distortion: float) -> tuple[float, int]:
    """Bits per row that reverse water-filling needs over independent Gaussian directions of
    `variances` for a total error of `distortion`, and how many directions it leaves uncoded:
    each direction is coded to error min(level, variance) at half a bit per halving, the level
    found by bisection."""
    low, high = 0.0, float(variances.max())
    for _ in range(200):
        level = (low + high) / 2
        low, high = (level, high) if np.minimum(level, variances).sum() < distortion else (low, level)
    return float(0.5 * np.log2(variances / level).clip(min=0).sum()), int((variances <= level).sum())


def print_spectrum(g: np.ndarray, table: np.ndarray) -> np.ndarray:
    """The table's transform coding gain in the metric of `g` (G, symmetric), against coding its
    columns alike; returns the weighted variances along the best basis."""
    eigenvalues, eigenvectors = np.linalg.eigh(g)
    covariance = np.cov(table.T)
    per_column = np.diag(g) * np.diag(covariance)
    alike = float(per_column.mean())  # every column at one rate
    root = eigenvectors @ np.diag(np.sqrt(np.maximum(eigenvalues, 0))) @ eigenvectors.T
    best = np.linalg.eigvalsh(root @ covariance @ root)
    in_g_basis = eigenvalues * np.diag(eigenvectors.T @ covariance @ eigenvectors)
    spread = eigenvalues / eigenvalues.mean()
    print(f"G's eigenvalues over their mean: {spread.max():.2f} down to {spread.min():.4f}; "
          f"10th percentile {np.percentile(spread, 10):.3f}")
    print(f"gain over one rate for all columns: each column at its own rate: {gain_db(alike, per_column):.2f} dB")
    print(f"G's eigenbasis, each direction at its own rate: {gain_db(alike, in_g_basis):.2f} dB")
    print(f"best basis (G^1/2 C G^1/2), each direction at its own rate: {gain_db(alike, best):.2f} dB")
    print(f"(1 dB is 1/6 bit per weight; the basis costs a {table.shape[1]} x {table.shape[1]} matrix to store)")
    return best


def print_ideal_rate(spec: str, plan, g: np.ndarray, best: np.ndarray, table: np.ndarray) -> None:
    """How many bits per weight an ideal code needs (see the module docstring) for the error
    `plan` leaves, in the metric of `g`, beside what the plan stores."""
    error = plan.reconstruction.astype(np.float64) - table
    distortion = float(np.einsum("ri,ij,rj->", error, g, error) / len(error))
    bits, uncoded = water_filling_bits(best, distortion)
    ideal = bits / table.shape[1]
    stored = 8 * plan.stored_bytes / table.size
    print(f"{spec}: stores {stored:.2f} bits per weight; an ideal code on a Gaussian table of this "
          f"covariance, at its error: {ideal:.2f} ({ideal * table.size / 8e6:.2f} MB), "
          f"{uncoded} of the {len(best)} directions left uncoded")


def planned(spec: str, model: Model, table, calibration, counts: np.ndarray, sensitivity):
    """The codec's plan for the table under `spec`, as auto plans it."""
    (codec,) = parse_spec(spec)
    extra = {"row_counts": counts} if "hot_rows" in spec else {}
    if "feedback=true" in spec:
        extra["hessian"] = sensitivity
    return codec.plan(PassContext(model, calibration_inputs=calibration), table, **extra)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", default=";".join(SPECS))
    parser.add_argument("--spectrum", action="store_true",
                        help="print the transform coding gain, and the ideal rate at --at's errors, and stop")
    parser.add_argument("--at", default=AT, help="--spectrum's settings, separated by ';'")
    args = parser.parse_args(argv)
    proto = onnx.load(real_models.fetch("paraphrase_minilm_l3"))
    tokenizer = WordPiece(Path(real_models.fetch("bert_uncased_tokenizer")))
    calibration, test = tokenizer.encode_batch(CALIBRATION_SENTENCES), tokenizer.encode_batch(TEST_SENTENCES)
    model = Model(proto)
    table = next(w for w in model.weights() if w.name == TABLE)
    counts = gathered_row_counts(model, [table], calibration)[TABLE]
    initializer = next(t for t in proto.graph.initializer if t.name == TABLE)
    original = numpy_helper.to_array(initializer)

    def session(values: np.ndarray) -> ort.InferenceSession:
        """A session with the table replaced; the model the codecs plan on keeps the original."""
        initializer.CopyFrom(numpy_helper.from_array(values.astype(original.dtype), TABLE))
        try:
            return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        finally:
            initializer.CopyFrom(numpy_helper.from_array(original, TABLE))

    sensitivity = None
    if "feedback=true" in args.specs or args.spectrum:
        probe = Probe(model, [table], calibration, [EMBEDDING])
        sensitivity = table_sensitivity(probe, table, np.flatnonzero(counts), True, {EMBEDDING: 0}, Workers(2))
    if args.spectrum:
        g, values = (sensitivity + sensitivity.T) / 2, original.astype(np.float64)
        best = print_spectrum(g, values)
        for spec in args.at.split(";"):
            plan = planned(spec, model, table, calibration, counts, sensitivity)
            print_ideal_rate(spec, plan, g, best, values)
        return 0
    reference = session(original)
    references = [reference.run([EMBEDDING], feeds)[0] for feeds in (test, calibration)]
    print(f"{'setting (word embedding only)':<64} {'table':>9} {'bits/w':>6} {'test':>8} {'calib':>8}")
    for spec in args.specs.split(";"):
        plan = planned(spec, model, table, calibration, counts, sensitivity)
        candidate = session(plan.reconstruction)
        test_cos, calib_cos = (worst_cosine(candidate, r, f) for r, f in zip(references, (test, calibration)))
        print(f"{spec:<64} {plan.stored_bytes / 1e6:>7.2f}MB {8 * plan.stored_bytes / original.size:>6.2f} "
              f"{test_cos:>8.5f} {calib_cos:>8.5f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
