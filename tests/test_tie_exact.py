"""Exact tie: byte-identical weights become one stored tensor, in any scope, bit-exact."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import graphpass
from graphpass.cli import main
from graphpass.edit import Model
from graphpass.model import load_model
from test_weights import function_model, overridable_model


def _stored_digests(proto: onnx.ModelProto) -> list[bytes]:
    return [w.read().tobytes() + str(w.shape).encode() for w in Model(proto).weights() if w.size > 1]


def test_albert_duplicates_become_one_copy_each(fixture_dir, tmp_path):
    result = graphpass.run(fixture_dir / "albert.onnx", "tie", output=tmp_path / "out.onnx")
    assert result.passed
    digests = _stored_digests(result.model)
    assert len(digests) == len(set(digests))
    # Four blocks' worth of identical weights are now stored once.
    report = result.report
    assert report["output"]["file_bytes"] < report["input"]["file_bytes"] * 0.4
    assert (tmp_path / "out.onnx").stat().st_size == report["output"]["file_bytes"]


def test_ties_across_subgraph_scopes_and_verifies_on_every_branch(fixture_dir, tmp_path):
    result = graphpass.run(fixture_dir / "subgraphs.onnx", "tie", output=tmp_path / "out.onnx")
    assert result.report["passes"][0]["tensors_changed"] >= 1
    digests = _stored_digests(result.model)
    assert len(digests) == len(set(digests))
    # Inputs whose sums pick each path through the nested Ifs.
    for offset in (-1.0, 0.1, 1.0):
        x = np.full((2, 32), offset, np.float32)
        checked = graphpass.verify.verify(fixture_dir / "subgraphs.onnx", tmp_path / "out.onnx", {"x": x},
                                          graphpass.verify.Budget(atol=0.0, rtol=0.0))
        assert checked.passed, checked.to_dict()


def test_overridable_initializers_are_never_tied():
    result = graphpass.run(overridable_model(), "tie")
    names = {w.name for w in Model(result.model).weights()}
    assert names == {"W", "W2"}
    (stats,) = result.report["passes"]
    assert stats["skipped"] == [{"weight": "W", "reason": "initializer is also a graph input, so a caller may override it"}]
    assert result.report["notes"] and "graph inputs" in result.report["notes"][0]


def test_function_bodies_are_left_consistent():
    proto = function_model()
    body = proto.functions[0]
    body.node.insert(0, onnx.helper.make_node("Constant", [], ["dup"], value=body.node[0].attribute[0].t))
    body.node.append(onnx.helper.make_node("MatMul", ["x", "dup"], ["y_dup"]))
    body.node.append(onnx.helper.make_node("Add", ["y", "y_dup"], ["y2"]))
    body.output[0] = "y2"
    result = graphpass.run(proto, "tie", verify=True)
    assert result.passed
    assert len(Model(result.model).weights()) == 1


def test_output_is_deterministic(fixture_dir, tmp_path):
    for name in ("a", "b"):
        graphpass.run(fixture_dir / "albert.onnx", "tie", output=tmp_path / f"{name}.onnx", verify=False)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_caller_model_is_not_modified(fixture_dir):
    proto = load_model(fixture_dir / "albert.onnx").proto
    before = proto.SerializeToString(deterministic=True)
    graphpass.run(proto, "tie", verify=False)
    assert proto.SerializeToString(deterministic=True) == before


def test_scalar_duplicates_stay_scalars():
    """Exporters write many 0-d Constants; a tied copy must keep rank 0."""
    scalar = onnx.numpy_helper.from_array(np.array(2.0, np.float32), "s")
    nodes = [
        onnx.helper.make_node("Constant", [], [f"c{i}"], value=scalar) for i in range(2)
    ] + [onnx.helper.make_node("Mul", ["x", "c0"], ["m"]), onnx.helper.make_node("Add", ["m", "c1"], ["y"])]
    graph = onnx.helper.make_graph(
        nodes, "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3])],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    result = graphpass.run(proto, "tie")
    assert result.passed
    (weight,) = Model(result.model).weights()
    assert weight.shape == ()


@pytest.mark.parametrize("dtype", [onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.INT4])
def test_weights_of_ml_dtypes_types_are_tied_and_inspected(dtype, tmp_path):
    """bfloat16, float8 and int4 have no buffer-protocol code; hashing must not depend on one."""
    from onnx import helper, numpy_helper

    values = np.random.default_rng(0).normal(size=(64, 32)).clip(-7, 7)
    target = helper.tensor_dtype_to_np_dtype(dtype)
    copies = [numpy_helper.from_array(values.astype(target), name) for name in ("A", "B")]
    nodes = [helper.make_node("Cast", [name], [f"{name}f"], to=onnx.TensorProto.FLOAT) for name in ("A", "B")]
    nodes += [helper.make_node("MatMul", ["x", "Af"], ["ya"]), helper.make_node("MatMul", ["x", "Bf"], ["yb"]),
              helper.make_node("Add", ["ya", "yb"], ["y"])]
    graph = helper.make_graph(nodes, "ml_dtypes", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 32])], copies)
    path = tmp_path / "in.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), path)

    result = graphpass.run(path, "tie", output=tmp_path / "out.onnx")
    assert result.passed and result.report["passes"][0]["tensors_changed"] == 1
    assert len(Model(result.model).weights()) == 1
    inspected = CliRunner().invoke(main, ["inspect", str(path)])
    assert inspected.exit_code == 0 and "Traceback" not in inspected.output, inspected.output


def test_string_tensors_are_tied_by_content_and_inspected(tmp_path):
    """Classifiers keep their labels in string initializers: they have no raw bytes to view."""
    from onnx import TensorProto, helper, numpy_helper

    def labels(name, values):
        return numpy_helper.from_array(np.array(values, dtype=object), name)

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("ArgMax", ["y"], ["i"], axis=1, keepdims=0)]
    nodes += [helper.make_node("Gather", [table, "i"], [f"{table}_out"]) for table in ("A", "B", "C")]
    graph = helper.make_graph(
        nodes, "labels", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info(f"{t}_out", TensorProto.STRING, [2]) for t in ("A", "B", "C")],
        [weight, labels("A", ["ab", "c", "d"]), labels("B", ["ab", "c", "d"]), labels("C", ["a", "bc", "d"])])
    path = tmp_path / "labels.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)

    result = graphpass.run(path, "tie(rows=true)", output=tmp_path / "out.onnx")
    assert result.passed
    stored = {w.name: w.read().tolist() for w in Model(result.model).weights() if w.dtype == TensorProto.STRING}
    assert sorted(stored.values()) == [["a", "bc", "d"], ["ab", "c", "d"]]
    inspected = CliRunner().invoke(main, ["inspect", str(path), "--rows"])
    assert inspected.exit_code == 0 and "exact duplicates: 1 groups" in inspected.output, inspected.output
