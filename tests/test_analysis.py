"""The shared weight analyses: batched reads, bucket keys, chunked sketches, candidate pairs.

Each faster path is checked against the plain computation it replaced.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import graphpass.analysis as analysis
import graphpass.related as related
from graphpass.analysis import (
    ROUNDING_SLACK,
    ExactDuplicates,
    WeightFingerprints,
    WeightSketches,
    candidate_pairs,
    content_key,
    same_bytes,
    sketch_of,
    value_bytes,
)
from graphpass.edit import Model
from graphpass.manager import PassContext
from graphpass.weights import WeightReader

# -- models holding one weight in every storage form ---------------------------------------


def _storage_forms() -> dict[str, TensorProto]:
    """The same kinds of values stored each way an exporter may write them."""
    rng = np.random.default_rng(0)
    values = rng.standard_normal((4, 6)).astype(np.float32)
    return {
        "raw": numpy_helper.from_array(values, "raw"),
        "float_data": helper.make_tensor("float_data", TensorProto.FLOAT, values.shape, values.ravel().tolist()),
        "double_data": helper.make_tensor("double_data", TensorProto.DOUBLE, [5], [0.5, -1.0, 2.0, 3.5, 1e-3]),
        "int64_data": helper.make_tensor("int64_data", TensorProto.INT64, [3], [1, -2, 3]),
        "fp16_int32_data": helper.make_tensor("fp16_int32_data", TensorProto.FLOAT16, [4], [1.5, -2.0, 0.25, 7.0]),
        "bf16_raw": numpy_helper.from_array(values[:2].astype(ml_dtypes.bfloat16), "bf16_raw"),
        "int4_packed": helper.make_tensor("int4_packed", TensorProto.INT4, [5], [1, -2, 3, -4, 5]),
    }


def _every_place_model() -> onnx.ModelProto:
    """Initializers in each storage form, Constant nodes of each attribute kind, and a
    subgraph whose own initializer shadows an outer name."""
    forms = _storage_forms()
    constants = [
        helper.make_node("Constant", [], ["c_tensor"], value=numpy_helper.from_array(np.arange(8, dtype=np.float32), "t")),
        helper.make_node("Constant", [], ["c_floats"], value_floats=[1.0, 2.5, -3.0]),
        helper.make_node("Constant", [], ["c_float"], value_float=4.0),
        helper.make_node("Constant", [], ["c_ints"], value_ints=[7, 8, 9]),
    ]
    branches = [helper.make_graph(
        [helper.make_node("Identity", ["raw"], ["branch_out"])], f"branch{fill}", [],
        [helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, [4, 6])],
        [numpy_helper.from_array(np.full((4, 6), fill, np.float32), "raw")],  # shadows the outer "raw"
    ) for fill in (3.0, 5.0)]
    nodes = constants + [
        helper.make_node("If", ["cond"], ["picked"], then_branch=branches[0], else_branch=branches[1]),
        helper.make_node("Add", ["picked", "float_data"], ["y"]),
    ]
    readers = [n for n in forms if n != "float_data"]
    nodes += [helper.make_node("Identity", [name], [f"{name}_out"]) for name in readers + [n.output[0] for n in constants]]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 6])]
    outputs += [helper.make_tensor_value_info(f"{name}_out", TensorProto.UNDEFINED, None)
                for name in readers + [n.output[0] for n in constants]]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])], outputs,
                              list(forms.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _assert_same_array(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert value_bytes(got).tobytes() == value_bytes(expected).tobytes()


def test_reader_reads_what_read_does_in_every_storage_form_and_scope():
    model = Model(_every_place_model())
    weights = model.weights()
    assert {w.name for w in weights} >= {*_storage_forms(), "c_tensor", "c_floats", "c_float", "c_ints"}
    assert sum(w.name == "raw" for w in weights) == 3  # the outer one and each branch's own
    reader = WeightReader(weights)
    for weight in weights:
        _assert_same_array(reader.read(weight), weight.read())


def test_reader_reads_external_data_as_read_does(tmp_path, monkeypatch):
    """A proto loaded without its external data still reads (relative to the working folder)."""
    proto = _every_place_model()
    onnx.save_model(proto, tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    lazy = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in lazy.graph.initializer)
    monkeypatch.chdir(tmp_path)
    weights = Model(lazy).weights()
    reader = WeightReader(weights)
    for weight, original in zip(weights, Model(_every_place_model()).weights()):
        _assert_same_array(reader.read(weight), weight.read())
        _assert_same_array(reader.read(weight), original.read())


def test_reader_reads_function_body_constants():
    body = [
        helper.make_node("Constant", [], ["fw"], value=numpy_helper.from_array(np.linspace(-1, 1, 32, dtype=np.float32), "v")),
        helper.make_node("Constant", [], ["fb"], value_floats=[0.5, 1.5]),
        helper.make_node("Sum", ["x", "fw", "fb"], ["y"]),
    ]
    function = helper.make_function("local", "Shift", ["x"], ["y"], body, [helper.make_opsetid("", 17)])
    graph = helper.make_graph([helper.make_node("Shift", ["inp"], ["out"], domain="local")], "g",
                              [helper.make_tensor_value_info("inp", TensorProto.FLOAT, [32])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [32])])
    model = helper.make_model(graph, functions=[function],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    weights = Model(model).weights()
    assert weights and all(w.scope.is_function for w in weights)
    reader = WeightReader(weights)
    for weight in weights:
        _assert_same_array(reader.read(weight), weight.read())


# -- exact duplicates ------------------------------------------------------------------------


def _misaligned_copies(data: bytes) -> list[np.ndarray]:
    """The same bytes at every offset from an 8-byte boundary."""
    copies = []
    for offset in range(8):
        backing = np.zeros(len(data) + 16, np.uint8)
        start = offset + (-backing.ctypes.data) % 8
        view = backing[start:start + len(data)]
        view[:] = np.frombuffer(data, np.uint8)
        copies.append(view)
    return copies


@pytest.mark.parametrize("length", [0, 1, 7, 8, 9, 64 * 8, 64 * 8 + 3, 10_000, 1 << 16])
def test_equal_bytes_get_equal_keys_at_any_alignment(length):
    data = np.random.default_rng(length).integers(0, 256, length, dtype=np.uint8).tobytes()
    keys = {content_key(copy) for copy in _misaligned_copies(data)}
    assert len(keys) == 1


def test_keys_tell_apart_moved_values():
    """Not owed (a collision costs only a comparison), but a transposed or row-swapped copy
    should rarely share a bucket."""
    matrix = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    swapped = matrix[::-1].copy()
    keys = {content_key(value_bytes(a)) for a in (matrix, matrix.T.copy(), swapped)}
    assert len(keys) == 3


def _duplicates_model() -> onnx.ModelProto:
    """One value stored raw, as float_data and in a Constant; a second value once; a third
    value twice. Exact duplicates whatever the storage, so whatever the buffer alignment."""
    rng = np.random.default_rng(3)
    shared, other, third = (rng.standard_normal((16, 8)).astype(np.float32) for _ in range(3))
    initializers = [
        numpy_helper.from_array(shared, "a_raw"),
        helper.make_tensor("a_float_data", TensorProto.FLOAT, shared.shape, shared.ravel().tolist()),
        numpy_helper.from_array(other, "b"),
        numpy_helper.from_array(third, "c1"),
        numpy_helper.from_array(third, "c2"),
    ]
    nodes = [helper.make_node("Constant", [], ["a_const"], value=numpy_helper.from_array(shared, "v"))]
    names = [t.name for t in initializers] + ["a_const"]
    nodes += [helper.make_node("Identity", [n], [f"{n}_out"]) for n in names]
    outputs = [helper.make_tensor_value_info(f"{n}_out", TensorProto.FLOAT, [16, 8]) for n in names]
    model = helper.make_model(helper.make_graph(nodes, "g", [], outputs, initializers),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _groups(ctx: PassContext) -> set[frozenset[str]]:
    return {frozenset(w.name for w in g.members) for g in ctx.analysis(ExactDuplicates)}


def test_exact_duplicates_across_storage_forms():
    assert _groups(PassContext(Model(_duplicates_model()))) == {
        frozenset({"a_raw", "a_float_data", "a_const"}), frozenset({"c1", "c2"})}


def test_a_key_collision_costs_only_a_comparison(monkeypatch):
    """With every weight in one bucket, the byte comparison alone still finds the groups."""
    monkeypatch.setattr(analysis, "content_key", lambda data: b"same for all")
    ctx = PassContext(Model(_duplicates_model()))
    assert len(set(ctx.analysis(WeightFingerprints).values())) == 1
    assert _groups(ctx) == {frozenset({"a_raw", "a_float_data", "a_const"}), frozenset({"c1", "c2"})}


def test_same_bytes_compares_every_slice(monkeypatch):
    monkeypatch.setattr(analysis, "_COMPARE_SLICE", 7)
    a = np.arange(100, dtype=np.uint8)
    for position in (0, 6, 7, 50, 99):
        b = a.copy()
        b[position] ^= 1
        assert not same_bytes(a, b)
    assert same_bytes(a, a.copy())
    assert not same_bytes(a, a[:-1])


# -- sketches --------------------------------------------------------------------------------


def _reference_sketch(values: np.ndarray) -> dict:
    """The whole-array computation the chunked sketch replaced."""
    values = values.astype(np.float64).ravel()
    count = min(analysis.LAYOUT_BLOCKS, values.size)
    starts = np.arange(count, dtype=np.int64) * values.size // count
    lengths = np.diff(np.append(starts, values.size))
    return {
        "norm": np.sqrt(np.sum(values * values)), "total": values.sum(), "abs_total": np.abs(values).sum(),
        "high": values.max(), "low": values.min(), "blocks": np.add.reduceat(values, starts) / np.sqrt(lengths),
    }


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 5000),
    chunk=st.sampled_from([1, 3, 16, 1000, 1 << 18]),
    dtype=st.sampled_from([np.float32, np.float16, np.float64, ml_dtypes.bfloat16]),
    seed=st.integers(0, 2**31),
)
def test_chunked_sketch_matches_the_whole_array_one(size, chunk, dtype, seed):
    """Chunks either hold whole layout blocks or cut one into pieces; both match."""
    default = analysis.SKETCH_CHUNK
    try:
        analysis.SKETCH_CHUNK = chunk
        values = (np.random.default_rng(seed).standard_t(4, size) + 0.2).astype(dtype)
        got, expected = sketch_of(values), _reference_sketch(values)
    finally:
        analysis.SKETCH_CHUNK = default
    assert got.size == size and got.high == expected["high"] and got.low == expected["low"]
    slack = 1e-12 * expected["norm"] * np.sqrt(size)
    for name in ("norm", "total", "abs_total"):
        assert abs(getattr(got, name) - expected[name]) <= slack, name
    assert got.blocks.shape == expected["blocks"].shape
    assert np.max(np.abs(got.blocks - expected["blocks"])) <= slack


@pytest.mark.parametrize("shape, perm", [((48, 96), (1, 0)), ((6, 20, 30), (0, 2, 1)), ((12, 8, 3, 3), (1, 0, 2, 3))])
def test_a_transposed_copy_has_the_same_features_within_the_rounding_slack(shape, perm, monkeypatch):
    """Chunk boundaries fall at other values in the copy, so its sums round differently."""
    monkeypatch.setattr(analysis, "SKETCH_CHUNK", 100)
    values = np.random.default_rng(1).standard_t(3, shape).astype(np.float32)
    a, b = sketch_of(values), sketch_of(np.ascontiguousarray(values.transpose(perm)))
    limits = np.array([np.sqrt(a.size), np.sqrt(a.size), 1.0, 1.0]) * 2 * ROUNDING_SLACK
    assert np.all(np.abs(a.features() - b.features()) <= limits)


# -- candidate pairs -------------------------------------------------------------------------


def _all_pairs(members, sketches, size, tol) -> set[tuple[str, str, bool]]:
    """The quadratic comparison of every pair that the windowed search replaced."""
    invariant = np.stack([sketches[w].features() for w in members])
    exact_limits = np.array([np.sqrt(size), np.sqrt(size), 1.0, 1.0]) * 2 * ROUNDING_SLACK
    layout = np.stack([sketches[w].blocks / sketches[w].norm for w in members])
    bound = 2 * (tol + ROUNDING_SLACK)
    pairs = set()
    for i in range(len(members) - 1):
        transposed = np.all(np.abs(invariant[i + 1:] - invariant[i]) <= exact_limits, axis=1)
        same = np.linalg.norm(layout[i + 1:] - layout[i], axis=1) <= bound
        flipped = np.linalg.norm(layout[i + 1:] + layout[i], axis=1) <= bound
        pairs |= {(members[i], members[i + 1 + j], False) for j in np.flatnonzero(transposed | same)}
        pairs |= {(members[i], members[i + 1 + j], True) for j in np.flatnonzero(flipped)}
    return pairs


def _family(rng, size: int, count: int) -> list[np.ndarray]:
    """Copies of a few roots (exact, negated and scaled, noisy, permuted) among unrelated
    tensors, and a tight cluster like LayerNorm gammas."""
    roots = [rng.standard_normal(size) for _ in range(max(1, count // 6))]
    values = []
    for _ in range(count):
        root = roots[int(rng.integers(len(roots)))]
        kind = int(rng.integers(6))
        if kind == 0:
            value = root.copy()
        elif kind == 1:
            value = -root * rng.uniform(0.5, 2)
        elif kind == 2:
            value = root + rng.standard_normal(size) * float(rng.choice([1e-7, 1e-4, 1e-3, 1e-2]))
        elif kind == 3:
            value = rng.permutation(root)
        elif kind == 4:
            value = 1 + 0.002 * rng.standard_normal(size)
        else:
            value = rng.standard_normal(size)
        values.append(value.astype(np.float32))
    return values


@settings(max_examples=30, deadline=None)
@given(size=st.integers(64, 3000), count=st.integers(2, 80), tol=st.sampled_from([0.0, 1e-6, 1e-3, 1e-1]),
       seed=st.integers(0, 2**31))
def test_candidate_pairs_are_those_of_the_quadratic_comparison(size, count, tol, seed):
    values = _family(np.random.default_rng(seed), size, count)
    sketches = {f"w{i}": sketch_of(v) for i, v in enumerate(values)}
    members = list(sketches)
    assert set(analysis._close_pairs(members, sketches, size, tol)) == _all_pairs(members, sketches, size, tol)


@settings(max_examples=60, deadline=None)
@given(count=st.integers(2, 60), pool=st.integers(1, 256), coordinates=st.integers(1, 256),
       spread=st.sampled_from([0.0, 1e-3, 0.05]), seed=st.integers(0, 2**31))
def test_pairs_at_the_bound_are_those_of_the_quadratic_comparison(count, pool, coordinates, spread, seed):
    """Layouts around one point and its mirror image, about the bound apart, differing in a few
    coordinates (of a pool all share) or in all: the pair search must decide each boundary
    case as the full test does."""
    rng = np.random.default_rng(seed)
    bound = 2 * (1e-3 + ROUNDING_SLACK)
    centre = spread * rng.standard_normal(analysis.LAYOUT_BLOCKS)
    sketches = {}
    for i in range(count):
        direction = np.zeros(analysis.LAYOUT_BLOCKS)
        used = rng.choice(pool, min(coordinates, pool), replace=False)
        direction[used] = rng.standard_normal(used.size)
        layout = rng.choice([-1, 1]) * centre + direction / np.linalg.norm(direction) * bound * rng.uniform(0.3, 0.7)
        # Features far apart, so that only the layout tests pair them.
        sketches[f"w{i}"] = analysis.Sketch(size=4096, norm=1.0, total=float(rng.uniform(-1e3, 1e3)), abs_total=1.0,
                                            high=1.0, low=-1.0, blocks=layout)
    members = list(sketches)
    expected = _all_pairs(members, sketches, 4096, 1e-3)
    assert set(analysis._close_pairs(members, sketches, 4096, 1e-3)) == expected


def test_a_cluster_of_near_identical_sketches_is_tested_in_batches(monkeypatch):
    """Every pair of the cluster is a candidate; batches of 7 must not drop any."""
    monkeypatch.setattr(analysis, "_PAIR_BATCH", 7)
    rng = np.random.default_rng(5)
    values = [(1 + 1e-5 * rng.standard_normal(256)).astype(np.float32) for _ in range(30)]
    sketches = {f"w{i}": sketch_of(v) for i, v in enumerate(values)}
    pairs = analysis._close_pairs(list(sketches), sketches, 256, 1e-3)
    assert len({(a, b) for a, b, mirrored in pairs if not mirrored}) == 30 * 29 // 2
    assert set(pairs) == _all_pairs(list(sketches), sketches, 256, 1e-3)


def test_candidate_pairs_through_the_analysis_find_every_planted_copy():
    rng = np.random.default_rng(9)
    root = rng.standard_normal((32, 48)).astype(np.float32)
    planted = {"transposed": np.ascontiguousarray(root.T), "negated": -root, "scaled": root * np.float32(1.5),
               "near": (root * (1 + 1e-7 * rng.standard_normal(root.shape))).astype(np.float32)}
    unrelated = {f"other{i}": rng.standard_normal((32, 48)).astype(np.float32) for i in range(20)}
    arrays = {"root": root, **planted, **unrelated}
    initializers = [numpy_helper.from_array(v, k) for k, v in arrays.items()]
    nodes = [helper.make_node("Identity", [k], [f"{k}_out"]) for k in arrays]
    outputs = [helper.make_tensor_value_info(f"{k}_out", TensorProto.FLOAT, list(v.shape)) for k, v in arrays.items()]
    model = helper.make_model(helper.make_graph(nodes, "g", [], outputs, initializers),
                              opset_imports=[helper.make_opsetid("", 17)])
    pairs = candidate_pairs(PassContext(Model(model)).analysis(WeightSketches), 1e-6)
    partners = {b.name for a, b, _ in pairs if a.name == "root"}
    assert set(planted) <= partners


# -- related: tiled comparisons and the chunked error ------------------------------------------


@pytest.mark.parametrize("shape, perm", [((5, 7), (1, 0)), ((9, 4, 6), (0, 2, 1)), ((9, 4, 6), (1, 0, 2)),
                                         ((6, 5, 3, 3), (1, 0, 2, 3)), ((6, 5, 3, 2), (0, 1, 3, 2))])
def test_tiled_comparison_agrees_with_array_equal(shape, perm, monkeypatch):
    monkeypatch.setattr(related, "_TILE", 2)
    root = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    copy = np.ascontiguousarray(root.transpose(perm))
    assert related._equal(root.transpose(perm), copy)
    for index in [(0,) * copy.ndim, tuple(d - 1 for d in copy.shape), tuple(d // 2 for d in copy.shape)]:
        changed = copy.copy()
        changed[index] += 1
        assert not related._equal(root.transpose(perm), changed)


def test_chunked_relative_error_matches_the_plain_one(monkeypatch):
    monkeypatch.setattr(related, "_ERROR_CHUNK", 7)
    rng = np.random.default_rng(4)
    member = rng.standard_normal((13, 11)).astype(np.float32)
    for approximation in (member * np.float32(1.001), member.astype(ml_dtypes.bfloat16), member, np.float32(0.5),
                          np.ascontiguousarray(member.T).T):  # a scalar broadcasts; a view keeps its layout
        wide = member.astype(np.float64)
        expected = np.linalg.norm(wide - approximation.astype(np.float64)) / np.linalg.norm(wide)
        assert related.relative_error(member, approximation) == pytest.approx(expected, rel=1e-12, abs=0)
    assert related.relative_error(member, member) == 0.0
    assert related.relative_error(np.zeros(5, np.float32), np.ones(5, np.float32)) == float("inf")


def test_a_weight_alone_with_its_dtype_and_shape_is_not_read(monkeypatch):
    read = []
    original = analysis.WeightReader.read
    monkeypatch.setattr(analysis.WeightReader, "read", lambda self, weight: read.append(weight.name) or original(self, weight))
    proto = _duplicates_model()
    proto.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "lonely"))
    proto.graph.node.append(helper.make_node("Identity", ["lonely"], ["lonely_out"]))
    proto.graph.output.append(helper.make_tensor_value_info("lonely_out", TensorProto.FLOAT, [3]))
    ctx = PassContext(Model(proto))
    prints = ctx.analysis(WeightFingerprints)
    assert "lonely" in {w.name for w in prints} and "lonely" not in read
    assert len(set(prints.values())) == len(prints) - 3  # a_raw = a_float_data = a_const, c1 = c2
