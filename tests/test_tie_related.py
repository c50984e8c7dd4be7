"""tie beyond exact copies: transposed, scaled and near duplicates, in every scope."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import graphpass
from graphpass.analysis import WeightSketches, candidate_pairs
from graphpass.edit import Model
from graphpass.manager import PassContext
from graphpass.model import load_model
from graphpass.related import find_related


def _large_weights(proto: onnx.ModelProto, at_least: int = 64):
    return [w for w in Model(proto).weights() if w.size >= at_least]


def _ops(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


def test_transposed_output_embedding_is_stored_once(fixture_dir, tmp_path):
    result = graphpass.run(fixture_dir / "transformer_untied.onnx", "tie", output=tmp_path / "o.onnx")
    assert result.passed and result.report["lossless"]
    shapes = sorted(w.shape for w in _large_weights(result.model) if w.shape in ((512, 64), (64, 512)))
    assert shapes == [(512, 64)]
    assert _ops(result.model).count("Transpose") == _ops(load_model(fixture_dir / "transformer_untied.onnx").proto).count("Transpose") + 1
    (group,) = result.report["passes"][0]["details"]["ties"]
    assert group["members"][0]["kind"] == "transposed" and group["members"][0]["error"] == 0.0


@pytest.mark.parametrize("fixture, factor", [("negated", -1.0), ("scaled", 0.5)])
def test_scaled_copies_become_a_mul(fixture_dir, tmp_path, fixture, factor):
    before = _large_weights(load_model(fixture_dir / f"{fixture}.onnx").proto)
    result = graphpass.run(fixture_dir / f"{fixture}.onnx", "tie", output=tmp_path / "o.onnx")
    assert result.passed
    assert len(_large_weights(result.model)) == len(before) - 1
    (group,) = result.report["passes"][0]["details"]["ties"]
    (member,) = group["members"]
    assert member["kind"] == "scaled" and abs(member["scale"]) in (abs(factor), 1 / abs(factor))
    assert "Mul" in _ops(result.model)


def test_albert_shrinks_to_one_block_plus_unshared_parts(fixture_dir):
    source = fixture_dir / "albert.onnx"
    model = Model(load_model(source).proto)
    per_block = {}
    for weight in model.weights():
        per_block.setdefault((weight.shape, weight.read().tobytes()), []).append(weight.nbytes)
    expected = sum(sizes[0] for sizes in per_block.values())  # one copy of every distinct weight
    result = graphpass.run(source, "tie")
    assert result.report["output"]["weight_bytes"] == expected
    assert result.report["output"]["file_bytes"] < 0.4 * result.report["input"]["file_bytes"]


def test_near_copies_need_a_tolerance(fixture_dir):
    source = fixture_dir / "near_copies.onnx"
    exact = graphpass.run(source, "tie(tol=0)")
    assert exact.report["passes"][0]["tensors_changed"] == 0
    near = graphpass.run(source, "tie(tol=1e-6)")
    assert not near.report["lossless"]
    (group,) = near.report["passes"][0]["details"]["ties"]
    errors = [group["root_error"]] + [m["error"] for m in group["members"]]
    assert all(0 < e <= 1e-6 for e in errors)
    assert len(_large_weights(near.model)) == len(_large_weights(exact.model)) - 1
    assert near.passed  # the user's budget decides; here verification only reports


def test_distinct_blocks_are_not_tied(fixture_dir):
    result = graphpass.run(fixture_dir / "transformer.onnx", "tie")
    assert result.report["passes"][0]["details"]["ties"] == []


def _model_with(nodes, weights, inputs, outputs, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def test_three_dimensional_permutation_and_subgraph_copy():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((4, 8, 16)).astype(np.float32)
    then_branch = helper.make_graph(
        [helper.make_node("Constant", [], ["neg"], value=numpy_helper.from_array(-a, "neg_value")),
         helper.make_node("Add", ["y", "neg"], ["t"])],
        "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["y"], ["e"])], "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)]
    )
    nodes = [
        helper.make_node("Transpose", ["B"], ["bt"], perm=[0, 2, 1]),
        helper.make_node("Add", ["x", "A"], ["xa"]),
        helper.make_node("Add", ["xa", "bt"], ["y"]),
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["out"], then_branch=then_branch, else_branch=else_branch),
    ]
    weights = {"A": a, "B": a.transpose(0, 2, 1).copy(), "zero": np.array(0.0, np.float32)}
    model = _model_with(nodes, weights, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8, 16])],
                        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4, 8, 16])])
    result = graphpass.run(model, "tie", inputs={"x": np.ones((4, 8, 16), np.float32)})
    assert result.passed
    kinds = sorted(m["kind"] for g in result.report["passes"][0]["details"]["ties"] for m in g["members"])
    assert kinds == ["scaled", "transposed"]
    assert len(_large_weights(result.model)) == 1
    other_branch = graphpass.verify.verify(model, result.model, {"x": -np.ones((4, 8, 16), np.float32)},
                                           graphpass.verify.Budget(atol=0, rtol=0))
    assert other_branch.passed


def test_options_turn_kinds_off(fixture_dir):
    result = graphpass.run(fixture_dir / "transformer_untied.onnx", "tie(transposed=false)")
    assert result.report["passes"][0]["details"]["ties"] == []


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(64, 2000),
    tol=st.sampled_from([1e-6, 1e-4, 1e-2]),
    fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31),
)
def test_sketch_filter_never_misses_a_near_copy(size, tol, fraction, seed):
    """Whatever the perturbation's shape, a copy within tol stays a candidate."""
    rng = np.random.default_rng(seed)
    a = rng.standard_t(4, size).astype(np.float32)
    noise = rng.standard_normal(size)
    noise[rng.random(size) > fraction] = 0  # concentrated or spread perturbations
    if not noise.any():
        noise[0] = 1.0
    b = (a + noise / np.linalg.norm(noise) * np.linalg.norm(a) * tol * 0.999).astype(np.float32)
    # A tie's error is measured against the weight it replaces (B, the later one).
    error = np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64))
    if error > tol:  # rounding or B's smaller norm pushed it just over; not a case owed
        return
    model = _model_with(
        [helper.make_node("Add", ["x", "A"], ["y"]), helper.make_node("Add", ["y", "B"], ["z"])],
        {"A": a, "B": b}, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [size])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [size])],
    )
    ctx = PassContext(Model(model))
    pairs = candidate_pairs(ctx.analysis(WeightSketches), tol)
    assert any({p[0].name, p[1].name} == {"A", "B"} for p in pairs)
    groups = find_related(ctx, tol, {"near"})
    assert groups and groups[0].members[0][1].error <= tol


def test_repeated_filters_become_a_row_table(fixture_dir, tmp_path):
    source = fixture_dir / "conv_repeated_filters.onnx"
    result = graphpass.run(source, "tie(rows=true)", output=tmp_path / "o.onnx")
    assert result.passed and result.report["lossless"]
    rows = {r["weight"]: r for r in result.report["passes"][0]["details"]["rows"]}
    original = {w.name: w.read() for w in Model(load_model(source).proto).weights()}
    for name, row in rows.items():
        value = original[name]
        assert row["distinct"] == len(np.unique(value.reshape(len(value), -1), axis=0)) < row["rows"]
        assert row["bytes_after"] < row["bytes_before"]
    assert result.report["output"]["file_bytes"] < result.report["input"]["file_bytes"]
    assert "Gather" in _ops(result.model)


def test_rows_skip_tensors_where_it_would_not_pay(fixture_dir):
    result = graphpass.run(fixture_dir / "mlp.onnx", "tie(rows=true)")
    assert result.report["passes"][0]["details"]["rows"] == []
    assert result.report["output"]["weight_bytes"] == result.report["input"]["weight_bytes"]


def test_near_rows_with_tolerance():
    rng = np.random.default_rng(5)
    base = rng.standard_normal((4, 64)).astype(np.float32)
    rows = np.repeat(base, 16, axis=0) * (1 + 1e-7 * rng.standard_normal((64, 64))).astype(np.float32)
    model = _model_with([helper.make_node("MatMul", ["x", "W"], ["y"])], {"W": rows},
                        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])])
    assert graphpass.run(model, "tie(rows=true)").report["passes"][0]["details"]["rows"] == []
    result = graphpass.run(model, "tie(rows=true,tol=1e-5)")
    (row,) = result.report["passes"][0]["details"]["rows"]
    assert row["distinct"] == 4 and 0 < row["error"] <= 1e-5


def test_scaled_copy_whose_ratio_rounds_off_is_still_exact():
    """(a*1.5)/a can round to 1.5000001 at the pivot; the exact factor must still be found."""
    a = np.random.default_rng(1).standard_normal(256).astype(np.float32)  # such a pivot, checked:
    pivot = np.argmax(np.abs(a))
    assert (a * np.float32(1.5))[pivot] / a[pivot] != np.float32(1.5)
    model = _model_with(
        [helper.make_node("Add", ["x", "A"], ["y"]), helper.make_node("Add", ["y", "B"], ["z"])],
        {"A": a, "B": a * np.float32(1.5)}, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [256])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [256])],
    )
    result = graphpass.run(model, "tie")
    (group,) = result.report["passes"][0]["details"]["ties"]
    assert group["members"][0] == {"weight": "B", "kind": "scaled", "error": 0.0, "scale": 1.5}
