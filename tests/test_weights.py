"""Weight discovery finds every place a weight hides; replacement works in each of them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphpass.edit import Model
from graphpass.model import load_model, serialized_bytes
from graphpass.structure import find_structure_problem
from graphpass.verify import Budget, verify
from graphpass.weights import Replacement


def function_model() -> onnx.ModelProto:
    """A graph calling a model-local function whose weight sits in a Constant node."""
    weight = numpy_helper.from_array(np.linspace(-1, 1, 32, dtype=np.float32).reshape(4, 8), "fw")
    body = [
        helper.make_node("Constant", [], ["fw_out"], value=weight),
        helper.make_node("MatMul", ["x", "fw_out"], ["y"]),
    ]
    function = helper.make_function("local", "Project", ["x"], ["y"], body, [helper.make_opsetid("", 17)])
    graph = helper.make_graph(
        [helper.make_node("Project", ["inp"], ["out"], domain="local")],
        "g",
        [helper.make_tensor_value_info("inp", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 8])],
    )
    model = helper.make_model(
        graph, functions=[function], opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    )
    model.ir_version = 8
    return model


def overridable_model() -> onnx.ModelProto:
    """An old-style model listing its initializer among the graph inputs."""
    weight = np.full((4, 4), 0.5, np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("MatMul", ["y", "W2"], ["z"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]), helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(weight.copy(), "W2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_discovery_covers_every_place(fixture_dir):
    weights = Model(load_model(fixture_dir / "subgraphs.onnx").proto).weights()
    places = {(w.source, w.scope.depth) for w in weights}
    assert ("initializer", 0) in places
    assert ("constant", 0) in places
    assert ("initializer", 1) in places and ("constant", 1) in places
    assert max(w.scope.depth for w in weights) >= 2
    float_forms = [w for w in weights if w.source == "constant" and w.dtype == TensorProto.FLOAT]
    assert any(w.read().ndim == 1 for w in float_forms)  # the value_floats form reads back as a vector


def test_discovery_finds_function_weights_and_overridable_initializers():
    weights = Model(function_model()).weights()
    assert [(w.name, w.scope.is_function) for w in weights] == [("fw_out", True)]
    flagged = {w.name: w.overridable for w in Model(overridable_model()).weights()}
    assert flagged == {"W": True, "W2": False}


def _replace_every_float_weight(model: Model) -> int:
    """Rebuild each float weight as Reshape(Gather(table, indices)): the core lookup shape."""
    count = 0
    for weight in list(model.weights()):
        if not weight.is_float or weight.size < 2 or weight.overridable:
            continue
        value = weight.read()
        table, indices = np.unique(value.ravel(), return_inverse=True)
        r = Replacement(weight)
        gathered = r.node("Gather", [r.stored("table", table), r.stored("indices", indices.astype(np.int64))], "gather")
        shape = r.stored("shape", np.array(value.shape, np.int64))
        weight.replace_with(r, result=r.node("Reshape", [gathered, shape], "reshape"))
        count += 1
    return count


@pytest.mark.parametrize("source", ["subgraphs", "cnn", "transformer", "function"])
def test_replacing_weights_everywhere_keeps_outputs_exact(fixture_dir, source):
    proto = function_model() if source == "function" else load_model(fixture_dir / f"{source}.onnx").proto
    reference = serialized_bytes(proto)
    model = Model(proto)
    before = len(model.weights())
    assert _replace_every_float_weight(model) > 0
    assert find_structure_problem(model.proto) is None
    assert len(model.weights()) > before  # tables and indices are weights now
    onnx.checker.check_model(model.proto)
    inputs = _inputs_for(source)
    result = verify(reference, serialized_bytes(model.proto), inputs, Budget(atol=0.0, rtol=0.0))
    assert result.passed, result.to_dict()


def _inputs_for(source: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    if source == "subgraphs":
        return {"x": (rng.standard_normal((3, 32)) + 0.5).astype(np.float32)}
    if source == "cnn":
        return {"image": rng.standard_normal((2, 3, 32, 32)).astype(np.float32)}
    if source == "transformer":
        return {"input_ids": rng.integers(0, 512, (2, 9)).astype(np.int64)}
    return {"inp": rng.standard_normal((2, 4)).astype(np.float32)}


def test_new_names_never_collide():
    model = Model(function_model())
    weight = model.weights()[0]
    names = {model.names.fresh(f"{weight.name}.table") for _ in range(3)}
    assert len(names) == 3 and "fw_out" not in names


def test_weight_that_is_a_graph_output_keeps_its_name():
    value = numpy_helper.from_array(np.arange(6, dtype=np.float32), "c")
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["w"], value=value)],
        "g", [], [helper.make_tensor_value_info("w", TensorProto.FLOAT, [6])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = Model(proto)
    weight = model.weights()[0]
    shared = model.add_shared_tensor(model.scopes[0], "copy", weight.read())
    weight.replace_with(Replacement(weight), result=shared)
    assert [n.op_type for n in proto.graph.node] == ["Identity"]
    assert proto.graph.node[0].output[0] == "w"
    assert find_structure_problem(proto) is None


def test_shape_inference_when_it_works_and_carrying_on_when_not(fixture_dir, monkeypatch):
    model = Model(load_model(fixture_dir / "transformer.onnx").proto)
    types = model.value_types()
    assert len(types) > len(model.proto.graph.input) + len(model.proto.graph.output)
    assert model.shape_inference_error is None

    def refuse(*args, **kwargs):
        raise onnx.shape_inference.InferenceError("[ShapeInferenceError] no rule for this op")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", refuse)
    survivor = Model(load_model(fixture_dir / "transformer.onnx").proto)
    declared = {v.name for v in list(survivor.proto.graph.input) + list(survivor.proto.graph.output)}
    assert set(survivor.value_types()) == declared  # what the model declares, nothing more
    assert "no rule for this op" in survivor.shape_inference_error


def test_a_failed_shape_inference_is_said_in_the_report(fixture_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise onnx.shape_inference.InferenceError("[ShapeInferenceError] no rule for this op")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", refuse)
    import graphpass

    result = graphpass.run(fixture_dir / "transformer.onnx", "fold")  # fold reads the value types
    assert result.passed
    assert any("shape inference failed" in note and "no rule" in note for note in result.report["notes"])
