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
from graphpass.rows import near_parents


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


def _row_tables(result) -> list[dict]:
    return result.report["passes"][0]["details"]["rows"]


def _units(value: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(value, axis, 0).reshape(value.shape[axis], -1)


def _distinct(units: np.ndarray) -> int:
    return len(np.unique(units, axis=0))


def _assert_bit_exact(result) -> None:
    for name, output in result.report["verify"]["outputs"].items():
        for level, figures in output["per_level"].items():
            assert figures["max_abs_error"] == 0.0, (name, level, figures)


def test_repeated_filters_become_a_row_table(fixture_dir, tmp_path):
    source = fixture_dir / "conv_repeated_filters.onnx"
    result = graphpass.run(source, "tie(rows=true)", output=tmp_path / "o.onnx")
    assert result.passed and result.report["lossless"]
    _assert_bit_exact(result)
    original = {w.name: w.read() for w in Model(load_model(source).proto).weights()}
    tables = _row_tables(result)
    members = {m["weight"]: m for t in tables for m in t["members"]}
    assert {"conv1.weight", "conv2.weight"} <= set(members)
    for name, member in members.items():
        units = _units(original[name], member["axis"])
        assert member["distinct"] == _distinct(units) < member["units"] == len(units)
    for table in tables:
        assert table["bytes_after"] < table["bytes_before"]
    assert result.report["output"]["file_bytes"] < graphpass.run(source, "tie", verify=False).report["output"]["file_bytes"]
    assert "Gather" in _ops(result.model)


def test_head_slices_shared_across_weights_and_blocks(fixture_dir):
    """Q/K/V head slices are columns (axis 1), output-projection head slices rows (axis 0);
    the fixture plants them within a weight, across weights of a block and across blocks."""
    source = fixture_dir / "shared_heads.onnx"
    original = {w.name: w.read() for w in Model(load_model(source).proto).weights()}
    result = graphpass.run(source, "tie(rows=true)")
    assert result.passed and result.report["lossless"]
    _assert_bit_exact(result)
    tables = {frozenset(m["weight"] for m in t["members"]): t for t in _row_tables(result)}
    q0, k0, q1 = "blocks.0.attn.q_proj.weight", "blocks.0.attn.k_proj.weight", "blocks.1.attn.q_proj.weight"
    assert set(tables) == {frozenset({q0, k0, q1}), frozenset({"blocks.0.attn.v_proj.weight"}),
                           frozenset({"blocks.0.attn.o_proj.weight"})}
    for table in tables.values():
        units = [_units(original[m["weight"]], m["axis"]) for m in table["members"]]
        assert table["distinct"] == _distinct(np.concatenate(units)) < sum(len(u) for u in units)
        assert table["unit_size"] == units[0].shape[1]
        assert table["bytes_after"] < table["bytes_before"]
    axes = {m["weight"]: m["axis"] for t in tables.values() for m in t["members"]}
    assert axes == {q0: 1, k0: 1, q1: 1, "blocks.0.attn.v_proj.weight": 1, "blocks.0.attn.o_proj.weight": 0}
    whole_weights_only = graphpass.run(source, "tie").report["output"]["weight_bytes"]
    saved = sum(t["bytes_before"] - t["bytes_after"] for t in tables.values())
    assert result.report["output"]["weight_bytes"] == whole_weights_only - saved


def test_units_are_shared_only_within_one_function_body_or_graph():
    """A function body sees neither the graph's tensors nor another body's."""
    rng = np.random.default_rng(4)
    rows = np.repeat(rng.standard_normal((4, 64)).astype(np.float32), 16, axis=0)
    body = [helper.make_node("Constant", [], ["fw"], value=numpy_helper.from_array(rows, "fw_value")),
            helper.make_node("MatMul", ["x", "fw"], ["y"])]
    function = helper.make_function("local", "Project", ["x"], ["y"], body, [helper.make_opsetid("", 17)])
    graph = helper.make_graph(
        [helper.make_node("Project", ["inp"], ["p"], domain="local"), helper.make_node("MatMul", ["p", "W"], ["out"])],
        "g", [helper.make_tensor_value_info("inp", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 64])], [numpy_helper.from_array(rows, "W")])
    model = helper.make_model(graph, functions=[function], ir_version=8,
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    result = graphpass.run(model, "tie(rows=true)")
    assert result.passed
    _assert_bit_exact(result)
    tables = _row_tables(result)
    assert sorted(m["weight"] for t in tables for m in t["members"]) == ["W", "fw"]
    assert all(len(t["members"]) == 1 and t["distinct"] == 4 for t in tables)


def test_rows_skip_tensors_where_it_would_not_pay(fixture_dir):
    result = graphpass.run(fixture_dir / "mlp.onnx", "tie(rows=true)")
    assert _row_tables(result) == []
    assert result.report["output"]["weight_bytes"] == result.report["input"]["weight_bytes"]


def test_near_rows_with_tolerance():
    rng = np.random.default_rng(5)
    base = rng.standard_normal((4, 64)).astype(np.float32)
    rows = np.repeat(base, 16, axis=0) * (1 + 1e-7 * rng.standard_normal((64, 64))).astype(np.float32)
    model = _model_with([helper.make_node("MatMul", ["x", "W"], ["y"])], {"W": rows},
                        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])])
    assert _row_tables(graphpass.run(model, "tie(rows=true)")) == []
    result = graphpass.run(model, "tie(rows=true,tol=1e-5)")
    assert not result.report["lossless"]
    ((member,),) = [t["members"] for t in _row_tables(result)]
    assert member["distinct"] == 4 and 0 < member["error"] <= member["unit_error"] <= 1e-5
    rebuilt = onnxruntime_weight(result.model, "W")
    error = np.linalg.norm(rebuilt.astype(np.float64) - rows) / np.linalg.norm(rows.astype(np.float64))
    assert error == pytest.approx(member["error"], rel=1e-3)


def onnxruntime_weight(proto: onnx.ModelProto, name: str) -> np.ndarray:
    """The value a rewritten model feeds where weight `name` was, computed in onnxruntime."""
    import onnxruntime

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    readers = [n for n in probe.graph.node if n.op_type == "MatMul" and n.input[1] != name]
    (reader,) = readers or [n for n in probe.graph.node if n.op_type == "MatMul"]
    probe.graph.output.append(helper.make_tensor_value_info(reader.input[1], TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32) for i in session.get_inputs()}
    return session.run([reader.input[1]], feeds)[0]


@settings(max_examples=60, deadline=None)
@given(count=st.integers(2, 300), width=st.sampled_from([1, 3, 8, 40, 200]), copies=st.floats(0.0, 0.9),
       tol=st.sampled_from([1e-6, 1e-3, 0.1, 0.5]), search=st.sampled_from(["k-d tree", "all pairs"]),
       seed=st.integers(0, 2**31))
def test_near_unit_search_matches_the_greedy_definition(count, width, copies, tol, search, seed):
    """Every unit is kept or joins the closest earlier kept unit within tol, checked against
    all pairs: neither the projected k-d tree nor the matrix-product search may miss one."""
    from graphpass import rows

    rng = np.random.default_rng(seed)
    units = rng.standard_normal((count, width))
    for i in np.flatnonzero(rng.random(count) < copies)[1:]:
        source = rng.integers(0, i)
        units[i] = units[source] + rng.standard_normal(width) * np.linalg.norm(units[source]) * tol * rng.random() / np.sqrt(width)
    threshold = rows.ALL_PAIRS_FLOPS
    rows.ALL_PAIRS_FLOPS = 0 if search == "k-d tree" else np.inf
    try:
        parent, errors = near_parents(units, tol)
    finally:
        rows.ALL_PAIRS_FLOPS = threshold
    kept = []
    for i in range(count):
        distances = [np.linalg.norm(units[i] - units[j]) / np.linalg.norm(units[i]) for j in kept]
        if parent[i] == i:
            assert min(distances, default=np.inf) > tol
            kept.append(i)
        else:
            assert parent[i] in kept and errors[i] <= tol
            assert errors[i] == pytest.approx(min(distances), rel=1e-9, abs=1e-15)


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


@pytest.mark.parametrize("keys", ["real", "all collide"])
def test_equal_units_are_found_by_their_bytes(monkeypatch, keys):
    """Equal units share the first copy's position; a key collision must not merge others."""
    from graphpass import rows

    if keys == "all collide":
        monkeypatch.setattr(rows, "unit_keys", lambda units: np.zeros(len(units), np.uint64))
    rng = np.random.default_rng(9)
    distinct = rng.standard_normal((6, 5)).astype(np.float32)
    distinct[5] = -0.0  # differs from +0.0 in its bytes, so it is not tied to a zero unit
    distinct[4] = 0.0
    order = rng.integers(0, 6, size=40)
    ids, errors = rows.distinct_units(distinct[order], tol=0.0)
    first = {unit: int(np.flatnonzero(order == unit)[0]) for unit in set(order.tolist())}
    assert ids.tolist() == [first[u] for u in order.tolist()]
    assert not errors.any()
