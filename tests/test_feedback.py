"""Error feedback (feedback=true; graphpass.feedback): the codecs' outputs move less.

Each model is compressed with and without feedback by `graphpass.run` (which verifies it in
onnxruntime) and both are run in onnxruntime on inputs drawn like the calibration inputs but
not the same: the comparison is measured here, not a stored figure.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphpass
from graphpass import activations, feedback
from graphpass.errors import UsageError
from graphpass.feedback import inverse_factor, quantize_with_feedback
from graphpass.verify import Budget
from conftest import load_fixture_module

ANY = Budget()  # structural checks only; the figures are asserted where they matter


def gemm_then_matmul(seed: int = 0) -> onnx.ModelProto:
    """x [B, 48] -> Gemm(transB=1, B [96, 48]) -> Relu -> MatMul(W [96, 32]): both weight layouts."""
    rng = np.random.default_rng(seed)
    b = (rng.standard_t(4, (96, 48)) / 10).astype(np.float32)
    w = (rng.standard_t(4, (96, 32)) / 14).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "B", "c"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W"], ["y"])]
    graph = helper.make_graph(nodes, "gemm_matmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 48])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 32])],
                              [numpy_helper.from_array(b, "B"), numpy_helper.from_array(np.zeros(96, np.float32), "c"),
                               numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def correlated(width: int, seed: int, rows: int = 256) -> np.ndarray:
    """Inputs whose channels move together (a few factors plus noise), as real activations do."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).standard_normal((6, width))
    return (rng.standard_normal((rows, 6)) @ mixing + 0.1 * rng.standard_normal((rows, width))).astype(np.float32)


def relative_error(original: onnx.ModelProto, compressed: bytes, feeds: dict) -> float:
    ref = ort.InferenceSession(original.SerializeToString()).run(None, feeds)[0].astype(np.float64)
    out = ort.InferenceSession(compressed).run(None, feeds)[0].astype(np.float64)
    return float(np.sum((out - ref) ** 2) / np.sum(ref**2))


def compressed(model: onnx.ModelProto, spec: str, inputs: dict, tmp_path) -> tuple[bytes, dict]:
    target = tmp_path / "out.onnx"
    result = graphpass.run(model, spec, output=target, inputs=inputs, budget=ANY)
    return target.read_bytes(), result.report["passes"][0]


def blurred_images(seed: int, count: int = 64) -> np.ndarray:
    """[count, 3, 32, 32]: 8x8 random images upscaled, plus a little noise: neighbouring pixels agree."""
    rng = np.random.default_rng(seed)
    coarse = np.repeat(np.repeat(rng.standard_normal((count, 3, 8, 8)), 4, axis=2), 4, axis=3)
    return (coarse + 0.05 * rng.standard_normal(coarse.shape)).astype(np.float32)


# model -> (builder, inputs drawn with a seed)
MODELS = {
    "mlp": (lambda: load_fixture_module().build_mlp(), lambda seed: {"x": correlated(64, seed)}),
    "gemm": (gemm_then_matmul, lambda seed: {"x": correlated(48, seed)}),
    "cnn": (lambda: load_fixture_module().build_cnn(), lambda seed: {"image": blurred_images(seed)}),
}


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("spec", ["kmeans(bits=3,granularity=channel)", "uniform(bits=3,granularity=channel)",
                                  "codebook(dim=2,k=64,scale=channel)"])
def test_feedback_lowers_the_output_error_at_3_bits(model_name, spec, tmp_path, monkeypatch):
    build, draw = MODELS[model_name]
    model, calibration, held_out = build(), draw(1), draw(2)
    fed = spec[:-1] + ",feedback=true)"
    plain, _ = compressed(model, spec, calibration, tmp_path)
    fed_back, report = compressed(model, fed, calibration, tmp_path)
    assert {t.get("feedback") for t in report["details"]["tensors"]} == {"applied"}
    assert len(fed_back) == len(plain)  # the same codebooks and indices, chosen differently
    # With H's diagonal alone the fit and the metric are weighted as with feedback, but no
    # error moves to other columns: feedback must do better than that too.
    for name in ("input_covariance", "conv_input_covariance"):
        covariance = getattr(feedback, name)
        monkeypatch.setattr(feedback, name, lambda *args, of=covariance: {k: np.diag(np.diag(h))
                                                                          for k, h in of(*args).items()})
    diagonal, _ = compressed(model, fed, calibration, tmp_path)
    error = relative_error(model, fed_back, held_out)
    assert error < relative_error(model, plain, held_out)
    assert error < relative_error(model, diagonal, held_out)


def test_uniform_gptq_is_feedback_and_the_output_bytes_repeat(tmp_path):
    model = MODELS["mlp"][0]()
    calibration = {"x": correlated(64, 1)}
    spec = "uniform(bits=3,granularity=group,group_size=32,{})"
    first, _ = compressed(model, spec.format("feedback=true"), calibration, tmp_path)
    again, _ = compressed(model, spec.format("feedback=true"), calibration, tmp_path)
    alias, _ = compressed(model, spec.format("gptq=true"), calibration, tmp_path)
    assert first == again == alias
    vectors = "codebook(dim=4,k=64,share=all,feedback=true)"
    assert compressed(model, vectors, calibration, tmp_path)[0] == compressed(model, vectors, calibration, tmp_path)[0]


def test_silent_inputs_fall_back_to_plain_rounding_and_say_so(tmp_path):
    model = MODELS["mlp"][0]()
    silent = {"x": np.zeros((8, 64), np.float32)}  # the first layer's H is 0; the next ones see its bias
    plain, _ = compressed(model, "kmeans(bits=3,granularity=channel)", silent, tmp_path)
    fed_back, report = compressed(model, "kmeans(bits=3,granularity=channel,feedback=true)", silent, tmp_path)
    notes = {t["name"]: t["feedback"] for t in report["details"]["tensors"]}
    assert notes["layers.0.weight"].startswith("no input was ever non-zero")
    assert notes["layers.1.weight"] == "applied"
    # The first layer is rounded as without feedback: on inputs that only reach it, outputs agree.
    first = lambda data: numpy_helper.to_array(next(t for t in onnx.load_from_string(data).graph.initializer
                                                   if "layers.0.weight" in t.name))
    assert np.array_equal(first(plain), first(fed_back))


def test_an_indefinite_hessian_falls_back_with_a_note_and_a_dead_input_is_zeroed():
    rows = np.array([[0.4, -0.3], [0.2, 0.9]])
    rounded = lambda start, values, metric: np.round(values * 2) / 2
    indefinite = np.array([[1.0, 100.0], [100.0, 1.0]])  # no damping the core tries makes it definite
    assert inverse_factor(indefinite)[0] is None
    result = quantize_with_feedback(rows, indefinite, rounded)
    assert result.note.startswith("the input second moment stays singular")
    assert np.array_equal(result.rows, np.round(rows * 2) / 2)
    dead = quantize_with_feedback(rows, np.diag([1.0, 0.0]), rounded)
    assert dead.note is None and np.array_equal(dead.rows[:, 1], [0.0, 0.0])


def test_feedback_minimises_the_layer_error_a_vector_at_a_time():
    """GPTVQ's group update equals OBQ's one column at a time when each group is rounded the same."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 12)) @ rng.standard_normal((12, 12))
    hessian = x.T @ x / len(x)
    rows = rng.standard_normal((5, 12))
    grid = lambda start, values, metric: np.round(values * 4) / 4
    by_column = quantize_with_feedback(rows, hessian, grid)
    by_pair = quantize_with_feedback(rows, hessian, grid, width=2, block=4)
    assert np.allclose(by_column.rows, by_pair.rows)
    plain = np.round(rows * 4) / 4
    layer_error = lambda q: np.sum((x @ (rows - q).T) ** 2)
    assert layer_error(by_column.rows) < layer_error(plain)


def test_embedding_rows_count_by_calibration_use(tmp_path):
    rng = np.random.default_rng(5)
    table = (rng.standard_t(4, (512, 16)) / 10).astype(np.float32)
    table[:32] *= 0.05  # the rows calibration reads are small: a per-tensor fit for all rows misses them
    node = helper.make_node("Gather", ["E", "ids"], ["y"], axis=0)
    graph = helper.make_graph([node], "embedding", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])],
                              [numpy_helper.from_array(table, "E")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    calibration = {"ids": rng.integers(0, 32, 200).astype(np.int64)}
    plain, _ = compressed(model, "kmeans(bits=2)", calibration, tmp_path)
    fed_back, _ = compressed(model, "kmeans(bits=2,feedback=true)", calibration, tmp_path)
    used = {"ids": np.arange(32, dtype=np.int64)}
    unused = {"ids": np.arange(32, 512, dtype=np.int64)}
    assert relative_error(model, fed_back, used) < relative_error(model, plain, used)
    assert relative_error(model, fed_back, unused) < 1.0  # unused rows keep their values, more coarsely


def test_feedback_without_calibration_inputs_is_a_usage_error():
    with pytest.raises(UsageError, match="calibration inputs"):
        graphpass.run(MODELS["mlp"][0](), "kmeans(bits=3,feedback=true)", verify=False)


@pytest.mark.parametrize("kernel,attributes", [((3, 3), {"pads": [1, 1, 1, 1], "strides": [2, 1]}),
                                               ((2, 3), {"pads": [0, 1, 2, 0], "dilations": [2, 1], "strides": [1, 2]}),
                                               ((3,), {"pads": [1, 1]})])
def test_unfolded_conv_inputs_times_the_filters_are_the_conv(kernel, attributes):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 4) + ((9, 10) if len(kernel) == 2 else (11,))).astype(np.float32)
    w = rng.standard_normal((5, 4) + kernel).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], **attributes)], "conv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    y = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    patches = activations.unfolded(x[0].astype(np.float64), kernel, attributes)
    assert np.allclose(patches @ w.reshape(5, -1).T, y[0].reshape(5, -1).T, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_second_moments_come_from_the_large_weights_read_in_place(dtype):
    """The capture run feeds weights of a MiB and more as inputs (not serialized into its model,
    where a large model would be copied twice more): the second moment of the second MatMul's
    input must still be the one numpy computes."""
    rng = np.random.default_rng(0)
    first = rng.standard_normal((512, 1024)).astype(dtype) / 16  # 1 MiB in float16, 2 in float32
    second = rng.standard_normal((1024, 8)).astype(dtype)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "first"], ["hidden"]), helper.make_node("MatMul", ["hidden", "second"], ["y"])],
        "two", [helper.make_tensor_value_info("x", helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), [None, 512])],
        [helper.make_tensor_value_info("y", helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), None)],
        [numpy_helper.from_array(first, "first"), numpy_helper.from_array(second, "second")])
    model = graphpass.edit.Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    x = rng.standard_normal((16, 512)).astype(dtype)
    assert activations.FED_WEIGHT_BYTES <= first.nbytes
    found = activations.input_covariance(model, model.weights(), {"x": x})["second"]
    session = ort.InferenceSession(helper.make_model(helper.make_graph(
        graph.node[:1], "first", graph.input, [helper.make_tensor_value_info("hidden", graph.input[0].type.tensor_type.elem_type, None)],
        graph.initializer[:1]), opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    hidden = session.run(None, {"x": x})[0].astype(np.float64)
    expected = hidden.T @ hidden / len(hidden)
    # A fed weight is not prepacked, so onnxruntime may sum in another order: rounding apart.
    rounding = 1e-5 if dtype == np.float32 else 2e-3
    np.testing.assert_allclose(found, expected, rtol=0, atol=rounding * np.abs(expected).max())
