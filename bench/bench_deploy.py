"""What each objective costs at run time: the 3-layer BERT, measured in fresh processes.

    python bench/bench_deploy.py [--skip-auto] [--openvino] [--rounds 3] [--keep DIR]

Rows: the input; onnxruntime's MatMulNBitsQuantizer (4-bit, block 32); NNCF's compress_weights
(int4 asymmetric, group 32, the model converted to opset 21 first, as NNCF's opset-17 output does
not load) when `import nncf` works (it is not a dependency: `pip install nncf` needs no torch);
the file objective: `tie,kmeans,fold`, `tie,kmeans(bits=6),fold --target any` and
`tie,auto,fold` at each `--min-cosine`; the memory objective: `uniform(bits=4,granularity=group,
group_size=32)` (plain, with GPTQ, MatMuls only) and `tie,auto,fold` at each `--min-cosine`.

Per row: file and zip -9 bytes, onnxruntime session memory (RSS growth from creating the
session through the first run), peak RSS (of the probe process), start (session creation),
latency (median of 20 runs), all on batch 1 x 128 tokens with one intra-op thread, from
`graphpass.runtimes.cost.measure_cost` (one fresh process per model and round, models
alternating, best of the rounds). Ratios are to the input's. Also the worst test sentence's
cosine of the sentence embedding (each of the 32 test sentences alone, ORT default level), the
`.ort` file size after convert_onnx_models_to_ort relative to the `.onnx`, and the runtimes
(onnxruntime, OpenVINO, tract) the output loads and runs a test sentence in. With
`--openvino`, OpenVINO's session memory too (its own probe below).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort

import graphpass
from graphpass import sweep
from graphpass.deployment import Deployment
from graphpass.runtimes import RuntimeFailure, adapter
from graphpass.runtimes.cost import RuntimeCost, measure_cost
from graphpass.verify import Budget

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_auto import CALIBRATION_SENTENCES, EMBEDDING, TEST_SENTENCES, WordPiece, real_models  # noqa: E402

SEQUENCE = 128


# ---------------------------------------------------------------------------------------------
# Runtime cost in a fresh process
# ---------------------------------------------------------------------------------------------

# OpenVINO's session memory: graphpass.runtimes.cost measures onnxruntime only, so the same
# protocol for OpenVINO lives here (RSS growth through the first inference, VmHWM for the peak).
_OPENVINO_PROBE = r"""
import json, sys, time
import numpy as np

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

def peak():  # VmHWM: ru_maxrss would carry the parent's peak across fork and exec
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))

path, feeds_path, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
feeds = dict(np.load(feeds_path))
import openvino as ov
before = rss()
started = time.perf_counter()
core = ov.Core()
compiled = core.compile_model(core.read_model(path), "CPU", {"INFERENCE_NUM_THREADS": 1})
request = compiled.create_infer_request()
start = time.perf_counter() - started
request.infer(feeds)
session_memory = rss() - before
times = []
for _ in range(runs):
    t = time.perf_counter(); request.infer(feeds); times.append(time.perf_counter() - t)
print(json.dumps({"session_memory_bytes": session_memory, "peak_rss_bytes": peak(),
                  "start_seconds": start, "latency_seconds": float(np.median(times))}))
"""


def _openvino_once(path: Path, feeds_path: Path, runs: int) -> RuntimeCost | None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _OPENVINO_PROBE, str(path), str(feeds_path), str(runs)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(f"openvino failed on {path.name}: {done.stderr.strip().splitlines()[-1][:300]}", file=sys.stderr)
        return None
    return RuntimeCost.from_probe({**json.loads(done.stdout.strip().splitlines()[-1]), "runs": runs})


def measure(paths: list[Path], feeds: dict[str, np.ndarray], rounds: int, runs: int = 20,
            runtime: str = "onnxruntime") -> list:
    """Best of `rounds` per model, models alternating within each round."""
    if runtime == "onnxruntime":
        return measure_cost(paths, feeds, rounds=rounds, runs=runs, threads=1)
    with tempfile.TemporaryDirectory() as folder:
        feeds_path = Path(folder) / "feeds.npz"
        np.savez(feeds_path, **feeds)
        rounds_of: list[list[RuntimeCost]] = [[] for _ in paths]
        for _ in range(rounds):
            for i, path in enumerate(paths):
                cost = _openvino_once(path, feeds_path, runs)
                if cost is not None:
                    rounds_of[i].append(cost)
        return [RuntimeCost.best_of(measured) if measured else None for measured in rounds_of]


def runs_in(path: Path, feeds: dict[str, np.ndarray]) -> str:
    """The runtimes that load the model and run one test sentence: o(nnxruntime), v (OpenVINO), t(ract)."""
    letters = []
    for name, letter in (("onnxruntime", "o"), ("openvino", "v"), ("tract", "t")):
        try:
            adapter(name).open(str(path), feeds).run(feeds)
            letters.append(letter)
        except RuntimeFailure:
            letters.append("-")
    return "".join(letters)


# ---------------------------------------------------------------------------------------------
# Accuracy and sizes
# ---------------------------------------------------------------------------------------------


def embeddings(path: Path, sentences: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    count = len(next(iter(sentences.values())))
    return np.concatenate([session.run([EMBEDDING], {k: v[i:i + 1] for k, v in sentences.items()})[0]
                           for i in range(count)])


def worst_sentence_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    dots = np.sum(reference * candidate, axis=1)
    return float(np.min(dots / np.linalg.norm(reference, axis=1) / np.linalg.norm(candidate, axis=1)))


def zip_bytes(path: Path) -> int:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.write(path, path.name)
    return len(buffer.getvalue())


def ort_format_ratio(path: Path) -> float | None:
    """Size of the .ort that convert_onnx_models_to_ort writes, over the .onnx's."""
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / path.name
        copy.write_bytes(path.read_bytes())
        done = subprocess.run([sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(copy)],
                              capture_output=True, text=True)
        converted = copy.with_suffix(".ort")
        if done.returncode != 0 or not converted.exists():
            return None
        return converted.stat().st_size / path.stat().st_size


# ---------------------------------------------------------------------------------------------
# The rows
# ---------------------------------------------------------------------------------------------


def ort_matmul_nbits(source: Path, target: Path) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    quantizer = MatMulNBitsQuantizer(onnx.load(source), block_size=32, is_symmetric=False)
    quantizer.process()
    onnx.save(quantizer.model.model, target)


def nncf_int4(source: Path, target: Path, calibration: dict[str, np.ndarray]) -> str | None:
    """NNCF's compress_weights on the ONNX backend (graphpass.sweep's baseline), when nncf
    imports; else why not."""
    try:
        import nncf  # noqa: F401
    except Exception as exc:  # not installed, or it needs torch
        return f"nncf unavailable: {type(exc).__name__}: {exc}"
    try:
        target.write_bytes(sweep.nncf_int4_baseline(onnx.load(source), calibration))
        return None
    except Exception as exc:
        return f"nncf failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def matmul_nbits_weights(path: Path) -> dict[str, np.ndarray]:
    """Every MatMulNBits weight of a model dequantized to [K, N], by the original weight's name
    (onnxruntime's quantizer stores W as `W_Q4`, graphpass as `W.lut_nbits_weight`)."""
    from graphpass.lowering.onnxruntime_contrib import unpack_bits
    model = onnx.load(path)
    tensors = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        bits, block, k, n = attrs["bits"], attrs["block_size"], attrs["K"], attrs["N"]
        blocks = -(-k // block)
        q = unpack_bits(tensors[node.input[1]].reshape(n, -1), bits, blocks * block).reshape(n, blocks, block)
        zero = (unpack_bits(tensors[node.input[3]], bits, blocks) if len(node.input) > 3 and node.input[3]
                else np.full((n, blocks), 2 ** (bits - 1)))
        q, zero = q.astype(np.float32), zero.astype(np.float32)  # uint8 differences would wrap
        scale = tensors[node.input[2]].reshape(n, blocks)
        name = node.input[1].removesuffix(".lut_nbits_weight").removesuffix(f"_Q{bits}")
        found[name] = ((q - zero[..., None]) * scale[..., None]).reshape(n, -1)[:, :k].T
    return found


def matmul_weight_error(source: Path, candidate: Path, energy: dict[str, np.ndarray] | None = None) -> float:
    """sum e (W - W_q)^2 / sum e W^2 over the MatMul weights the candidate holds as MatMulNBits,
    e the energy of the input channel each value multiplies (None: 1, plain relative error)."""
    originals = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(source).graph.initializer}
    quantized = matmul_nbits_weights(candidate)
    weight = (lambda name: 1.0) if energy is None else energy.__getitem__
    noise = sum(float(np.sum(weight(name) * (originals[name] - w) ** 2)) for name, w in quantized.items())
    signal = sum(float(np.sum(weight(name) * originals[name] ** 2)) for name in quantized)
    return noise / signal if signal else float("nan")


def calibration_energy(source: Path, calibration: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Mean square of each MatMul weight's input channels on the calibration sentences."""
    from graphpass.activations import input_channel_energy
    from graphpass.edit import Model
    model = Model(onnx.load(source))
    return input_channel_energy(model, model.weights(), calibration)


def graphpass_row(source: Path, target: Path, spec: str, calibration, budget: Budget | None, targets: str,
                  objective: str = "memory") -> float:
    started = time.perf_counter()
    graphpass.run(source, spec, output=target, inputs=calibration, budget=budget,
                  budget_outputs=[EMBEDDING] if budget else None, deployment=Deployment.parse(objective, targets))
    return time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-auto", action="store_true")
    parser.add_argument("--openvino", action="store_true",
                        help="target onnxruntime and OpenVINO, and also measure OpenVINO's session memory per row")
    parser.add_argument("--min-cosine", type=float, nargs="+", default=[0.99, 0.993, 0.995],
                        help="auto's budgets (verify's cosine over all calibration sentences at once)")
    parser.add_argument("--keep", type=Path, help="keep the models in this folder")
    args = parser.parse_args(argv)

    source = Path(real_models.fetch("paraphrase_minilm_l3"))
    tokenizer = WordPiece(Path(real_models.fetch("bert_uncased_tokenizer")))
    calibration = tokenizer.encode_batch(CALIBRATION_SENTENCES)
    test = tokenizer.encode_batch(TEST_SENTENCES)
    # The first test sentence, padded to 128 tokens (mask 0 on the padding): batch 1 x 128.
    feeds = {k: np.pad(v[:1], ((0, 0), (0, SEQUENCE - v.shape[1]))) for k, v in test.items()}
    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    folder.mkdir(parents=True, exist_ok=True)

    # With --openvino the outputs are made for both runtimes (--target onnxruntime,openvino).
    targets = "onnxruntime,openvino" if args.openvino else "onnxruntime"
    rows: list[tuple[str, Path, float | None]] = [("input", source, None)]
    ort_path = folder / "ort_matmulnbits_b32.onnx"
    ort_matmul_nbits(source, ort_path)
    rows.append(("onnxruntime MatMulNBitsQuantizer 4-bit block 32", ort_path, None))
    nncf_path = folder / "nncf_int4_g32.onnx"
    why_not = nncf_int4(source, nncf_path, calibration)
    if why_not is None:
        rows.append(("NNCF compress_weights int4_asym group 32 (at opset 21)", nncf_path, None))
    else:
        print(f"NNCF row left out: {why_not}", file=sys.stderr)
    for spec, row_targets in (("tie,kmeans,fold", targets), ("tie,kmeans(bits=6),fold", "any")):
        path = folder / f"file_{spec.replace(',', '_').replace('(', '_').replace(')', '').replace('=', '')}.onnx"
        rows.append((f"{spec} --target {row_targets}", path,
                     graphpass_row(source, path, spec, calibration, None, row_targets, objective="file")))
    for min_cosine in [] if args.skip_auto else args.min_cosine:
        auto_path = folder / f"tie_auto_fold_file_{min_cosine}.onnx"
        rows.append((f"tie,auto,fold --min-cosine {min_cosine}", auto_path,
                     graphpass_row(source, auto_path, "tie,auto,fold", calibration, Budget(min_cosine=min_cosine),
                                   targets, objective="file")))
    uniform_path = folder / "uniform4_b32_memory.onnx"
    spec = "uniform(bits=4,granularity=group,group_size=32)"
    rows.append((f"{spec} --objective memory", uniform_path,
                 graphpass_row(source, uniform_path, spec, calibration, None, targets)))
    gptq_path = folder / "uniform4_b32_gptq_memory.onnx"
    gptq = "uniform(bits=4,granularity=group,group_size=32,gptq=true)"
    rows.append((f"{gptq} --objective memory", gptq_path, graphpass_row(source, gptq_path, gptq, calibration, None,
                                                                         targets)))
    same_path = folder / "uniform4_b32_matmul_only.onnx"
    same = "uniform(bits=4,granularity=group,group_size=32,exclude=Gather)"
    rows.append((f"{same} --objective memory", same_path, graphpass_row(source, same_path, same, calibration, None, targets)))
    for min_cosine in [] if args.skip_auto else args.min_cosine:
        auto_path = folder / f"tie_auto_fold_memory_{min_cosine}.onnx"
        budget = Budget(min_cosine=min_cosine)
        rows.append((f"tie,auto,fold --objective memory --min-cosine {min_cosine}", auto_path,
                     graphpass_row(source, auto_path, "tie,auto,fold", calibration, budget, targets)))

    reference = embeddings(source, test)
    costs = measure([path for _, path, _ in rows], feeds, args.rounds)
    ov_costs = measure([path for _, path, _ in rows], feeds, args.rounds, runtime="openvino") if args.openvino else None
    base, base_file, base_zip = costs[0], source.stat().st_size, zip_bytes(source)
    header = (f"{'model':<66} {'file':>7} {'zip':>7} {'session':>8} {'peak':>7} {'start':>7} {'latency':>8} "
              f"{'worst cos':>10} {'.ort/.onnx':>10} {'runs in':>7} {'time':>6}" + (f" {'OV mem':>8}" if ov_costs else ""))
    print(f"paraphrase-MiniLM-L3-v2, --target {targets}, onnxruntime {ort.__version__}, batch 1 x {SEQUENCE}, 1 thread, best of "
          f"{args.rounds} fresh processes; input: {base_file / 1e6:.2f} MB, session memory "
          f"{base.session_memory_bytes / 1e6:.1f} MB, peak RSS {base.peak_rss_bytes / 1e6:.1f} MB, "
          f"start {base.start_seconds * 1e3:.0f} ms, latency {base.latency_seconds * 1e3:.2f} ms")
    print(header)
    print("-" * len(header))
    for index, ((label, path, seconds), cost) in enumerate(zip(rows, costs)):
        cosine = worst_sentence_cosine(reference, embeddings(path, test))
        ort_ratio = ort_format_ratio(path)
        line = (f"{label:<66} {path.stat().st_size / base_file:>7.3f} {zip_bytes(path) / base_zip:>7.3f} "
                f"{cost.session_memory_bytes / base.session_memory_bytes:>8.3f} "
                f"{cost.peak_rss_bytes / base.peak_rss_bytes:>7.3f} {cost.start_seconds / base.start_seconds:>7.2f} "
                f"{cost.latency_seconds / base.latency_seconds:>8.2f} {cosine:>10.5f} "
                f"{'-' if ort_ratio is None else f'{ort_ratio:.3f}':>10} {runs_in(path, feeds):>7} "
                f"{'-' if seconds is None else f'{seconds:.0f}s':>6}")
        if ov_costs:
            ov = ov_costs[index]
            line += f" {'fails' if ov is None else f'{ov.session_memory_bytes / ov_costs[0].session_memory_bytes:.3f}':>8}"
        print(line)
    energy = calibration_energy(source, calibration)
    print()
    print("The 18 MatMul weights at 4-bit block 32, relative squared error: plain sum (W - Wq)^2 / sum W^2, and")
    print("activation-weighted (each value's error times its input channel's mean square on the calibration):")
    for label, path in (("onnxruntime MatMulNBitsQuantizer", ort_path), ("graphpass uniform kernel", same_path)):
        print(f"  {label:<34} plain {matmul_weight_error(source, path):.5f}   "
              f"activation-weighted {matmul_weight_error(source, path, energy):.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
