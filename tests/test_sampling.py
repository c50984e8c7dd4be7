"""Large weights in auto: settings fitted on a sample of the weight's output channels and
predicted from one measured setting (graphpass.sampling, auto's predict option)."""

from __future__ import annotations

import contextlib

from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphpass
from graphpass import sampling
from graphpass.edit import Model
from graphpass.manager import PassContext, parse_spec
from graphpass.verify import Budget, synthesize_inputs, verify
from fixtures.llm import TINY, write_llm


@pytest.fixture
def small_samples(monkeypatch):
    """Samples of 16 channels, so that weights of 64 channels and more are sampled."""
    monkeypatch.setattr(sampling, "SAMPLE_VALUES", 1024)
    monkeypatch.setattr(sampling, "MIN_CHANNELS", 16)


def one_reader_model(op_type: str, values: np.ndarray, **attrs) -> Model:
    weight = onnx.numpy_helper.from_array(values, "w")
    if op_type == "Gather":
        node = helper.make_node("Gather", ["w", "ids"], ["y"], axis=0)
        x = helper.make_tensor_value_info("ids", TensorProto.INT64, [None])
    else:
        node = helper.make_node(op_type, ["x", "w"], ["y"], **attrs)
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None])
    graph = helper.make_graph([node], "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [weight])
    return Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def kmeans_plan(model: Model, weight, granularity: str):
    codec = parse_spec(f"kmeans(bits=3,granularity={granularity},group_size=32)")[0]
    return codec.plan(PassContext(model), weight)


@pytest.mark.parametrize("op_type, attrs, axis", [("MatMul", {}, 1), ("Gemm", {"transB": 1}, 0)])
@pytest.mark.parametrize("granularity", ["channel", "group"])
def test_a_sample_plans_its_channels_as_the_whole_weight_does(small_samples, op_type, attrs, axis, granularity):
    values = np.random.default_rng(0).normal(size=(64, 256) if axis == 1 else (256, 64)).astype(np.float32)
    model = one_reader_model(op_type, values, **attrs)
    weight = model.weights()[0]
    sample = sampling.channel_sample(model, weight)
    assert sample is not None and sample.axis == axis and len(sample.channels) == 16
    assert [p.error_scale for p in sample.parts] == [256 / 16]  # errors of distinct output channels add
    np.testing.assert_array_equal(sample.original, np.take(values, sample.channels, axis=axis))
    whole = kmeans_plan(model, weight, granularity).reconstruction
    part = kmeans_plan(sample.model, sample.weight, granularity).reconstruction
    np.testing.assert_array_equal(part, np.take(whole, sample.channels, axis=axis))


@pytest.mark.parametrize("granularity", ["channel", "group"])
def test_an_embedding_table_is_sampled_on_the_rows_the_inputs_read(small_samples, granularity):
    values = np.random.default_rng(0).normal(size=(256, 64)).astype(np.float32)
    model = one_reader_model("Gather", values)
    weight, read = model.weights()[0], np.arange(5, 245, 10)  # 24 rows: above kmeans min_size
    sample = sampling.channel_sample(model, weight, read)
    # Rows nobody reads add nothing to the error measured on those inputs: no scaling.
    assert sample.axis == 0 and list(sample.channels) == list(read) and [p.error_scale for p in sample.parts] == [1.0]
    whole = kmeans_plan(model, weight, granularity).reconstruction
    np.testing.assert_array_equal(kmeans_plan(sample.model, sample.weight, granularity).reconstruction, whole[read])
    assert sampling.channel_sample(model, weight, None) is None  # rows read unknown


def test_a_tied_table_is_measured_on_the_rows_read_and_on_rows_for_its_lm_head(small_samples):
    """A tied embedding: the rows the inputs read carry the Gather's error, every row the LM
    head's; each part is measured on its own."""
    table = onnx.numpy_helper.from_array(np.ones((256, 64), np.float32), "w")
    nodes = [helper.make_node("Gather", ["w", "ids"], ["e"], axis=0),
             helper.make_node("Transpose", ["w"], ["wt"]), helper.make_node("MatMul", ["e", "wt"], ["y"])]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [table])
    model = Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    sample = sampling.channel_sample(model, model.weights()[0], np.array([1, 2]))
    read, others = sample.parts
    assert list(sample.channels[read.positions]) == [1, 2] and read.error_scale == 1.0
    assert len(others.positions) == 16 and not {1, 2} & set(sample.channels[others.positions])
    assert others.error_scale == (256 - 2) / 16
    whole, rebuilt = np.zeros((256, 64)), np.ones((len(sample.channels), 64))
    assert set(np.flatnonzero(sample.patched(whole, rebuilt, others).any(axis=1))) == set(
        sample.channels[others.positions])


def test_a_weight_too_small_to_save_work_is_not_sampled(small_samples):
    model = one_reader_model("MatMul", np.ones((64, 48), np.float32))  # 16 channels of 48: a third
    assert sampling.channel_sample(model, model.weights()[0]) is None


def test_the_proxy_is_the_squared_error_of_the_readers_outputs():
    rng = np.random.default_rng(1)
    inputs = rng.normal(size=(500, 32)) * rng.uniform(0.1, 3.0, size=32)  # channels of unequal energy
    weight = rng.normal(size=(32, 8))
    rebuilt = weight + rng.normal(scale=0.01, size=weight.shape)
    output_error = float(np.sum((inputs @ (rebuilt - weight)) ** 2)) / len(inputs)
    hessian = inputs.T @ inputs / len(inputs)
    assert sampling.proxy_error(weight, rebuilt, 0, hessian=hessian) == pytest.approx(output_error)
    assert sampling.proxy_error(weight.T, rebuilt.T, 1, hessian=hessian) == pytest.approx(output_error)
    energy = np.diag(hessian)[:, None]  # the diagonal alone: channels taken as uncorrelated
    assert sampling.proxy_error(weight, rebuilt, 0, energy=energy) == pytest.approx(
        float(np.sum(energy * (rebuilt - weight) ** 2)))


def test_measurements_scale_and_add_as_squared_errors():
    measured = graphpass.sensitivity.Measurement(0.5, {"y": 0.5}, {"y": 0.998}, {"y": 0.3})
    scaled = measured.scaled(4.0)
    assert scaled.units == 2.0 and scaled.per_output == {"y": 2.0}
    assert scaled.cosine["y"] == pytest.approx(0.992) and scaled.max_abs_error["y"] == pytest.approx(0.6)
    both = measured.plus(graphpass.sensitivity.Measurement(0.25, {"y": 0.25}, {"y": 0.999}, {"y": 0.4}))
    assert both.units == 0.75 and both.per_output == {"y": 0.75}
    assert both.cosine["y"] == pytest.approx(0.997) and both.max_abs_error["y"] == pytest.approx(0.5)


# -- auto, end to end ---------------------------------------------------------------------------

SPEC = "auto(methods=kmeans,bits=3|4|6,granularities=tensor|channel,predict={})"


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    return write_llm(tmp_path_factory.mktemp("llm") / "decoder.onnx", replace(TINY, dtype="float32"))


BUDGET = Budget(min_cosine=0.999)


@pytest.fixture(scope="module")
def runs(decoder):
    """auto on the tiny decoder with predictions (16-channel samples) and without; each run's
    progress steps (label, total, steps advanced) are in `progress`."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sampling, "SAMPLE_VALUES", 1024)
        patch.setattr(sampling, "MIN_CHANNELS", 16)
        found = {}
        for mode in ("always", "never"):
            steps = []
            found[mode] = graphpass.run(decoder, SPEC.format(mode), budget=BUDGET, progress=recording(steps))
            found[mode].progress = steps
        return found


def recording(steps: list):
    """A progress factory that records each step as [label, total, advanced]."""
    @contextlib.contextmanager
    def factory(label, total):
        step = [label, total, 0]
        steps.append(step)
        yield lambda n=1: step.__setitem__(2, step[2] + n)
    return factory


def auto_details(result) -> dict:
    return next(p for p in result.report["passes"] if p["name"] == "auto")["details"]


def test_predicted_settings_meet_the_budget_in_onnxruntime(runs, decoder):
    result = runs["always"]
    assert result.passed
    original = onnx.load(str(decoder))
    assert verify(original, result.model, synthesize_inputs(original), BUDGET).passed
    details = auto_details(result)
    sampled = [t for t in details["tensors"] if any(p.get("predicted") for p in t["tried"])]
    assert sampled, "no weight was sampled"
    assert details["settings_predicted"] == sum(p.get("predicted", False) for t in sampled for p in t["tried"])
    assert any(t["setting"] != "kept as is" for t in sampled)
    # Fitting the chosen settings whole, 17 minutes on the 1.1 B decoder, shows its progress.
    fitting = [s for s in result.progress if s[0] == "auto: fitting the chosen settings on whole weights"]
    assert fitting and all(total == advanced for _, total, advanced in fitting)


def test_chosen_settings_are_measured_once_fitted_whole(runs):
    """A prediction guides the choice only: every setting a sampled weight keeps is measured
    whole, and the chosen errors, measured, fit the target the model was built for."""
    details = auto_details(runs["always"])
    chosen = {t["name"]: next(p for p in t["tried"] if p["setting"] == t["setting"])
              for t in details["tensors"] if t["setting"] != "kept as is"}
    sampled = {t["name"] for t in details["tensors"] if any(p.get("predicted") for p in t["tried"])}
    assert sampled & set(chosen), "no sampled weight was compressed"
    assert not any(point.get("predicted") for point in chosen.values())
    built = next(r for r in details["rounds"] if r["file_bytes"] == details["measured"]["file_bytes"])
    assert sum(point["error_units"] for point in chosen.values()) <= built["target_units"] * (1 + 1e-6)


def test_predictions_track_measurements(runs):
    """Each predicted error against the same setting measured: within a factor of two at the
    median on the tiny decoder's random weights, and a model about as small."""
    tried = {mode: {(t["name"], p["setting"]): p for t in auto_details(result)["tensors"] for p in t["tried"]}
             for mode, result in runs.items()}
    ratios = [p["error_units"] / tried["never"][key]["error_units"] for key, p in tried["always"].items()
              if p.get("predicted") and tried["never"].get(key, {}).get("error_units")]
    assert len(ratios) >= 10
    assert 0.5 <= float(np.median(ratios)) <= 2.0
    sizes = {mode: result.report["output"]["file_bytes"] for mode, result in runs.items()}
    assert sizes["always"] <= 1.25 * sizes["never"]


def test_small_models_are_measured_setting_by_setting(decoder):
    details = auto_details(graphpass.run(decoder, SPEC.format("auto"), budget=BUDGET))
    assert not any(p.get("predicted") for t in details["tensors"] for p in t["tried"])
    assert details["settings_predicted"] == 0 and details["settings_measured"] > 0


def test_settings_with_feedback_are_predicted_from_the_whole_models_figures(small_samples, decoder):
    """A sample's one-node model cannot run the calibration inputs: its feedback fit takes the
    second moment of the whole weight's inputs."""
    spec = "auto(methods=kmeans,bits=3|4,granularities=channel,feedback=true,predict=always)"
    result = graphpass.run(decoder, spec, budget=BUDGET)
    assert result.passed
    tried = [p for t in auto_details(result)["tensors"] for p in t["tried"]]
    assert any(p.get("predicted") and "feedback=True" in p["setting"] for p in tried)
