"""The held-out share of auto's calibration inputs (graphpass/holdout.py) and how auto uses it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphpass
from graphpass import holdout
from graphpass.model import load_model, serialized_bytes
from graphpass.passes import auto
from graphpass.verify import Budget, verify


def model_with_inputs(*inputs: tuple[str, list]) -> onnx.ModelProto:
    values = [helper.make_tensor_value_info(name, TensorProto.FLOAT, dims) for name, dims in inputs]
    nodes = [helper.make_node("Identity", [name], [f"{name}_out"]) for name, _ in inputs]
    outputs = [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None) for name, _ in inputs]
    return helper.make_model(helper.make_graph(nodes, "g", values, outputs))


def test_rows_are_spread_over_the_batch_and_leave_both_sides_a_sample():
    assert holdout.held_out_rows(32) == (2, 6, 10, 14, 18, 22, 26, 30)
    assert holdout.held_out_rows(2) == (1,) and holdout.held_out_rows(3) == (1,)
    assert holdout.held_out_rows(1) == () and holdout.held_out_rows(0) == ()
    for samples in range(2, 40):
        rows = holdout.held_out_rows(samples)
        assert 1 <= len(rows) <= samples - 1 and len(set(rows)) == len(rows) and max(rows) < samples


def test_split_follows_each_inputs_batch_axis_and_shares_the_others():
    proto = model_with_inputs(("x", ["batch", 3]), ("state", [2, "batch_size", 5]), ("scale", [1]))
    x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    state = np.arange(2 * 8 * 5, dtype=np.float32).reshape(2, 8, 5)
    scale = np.ones(1, np.float32)
    split = holdout.split_inputs(proto, {"x": x, "state": state, "scale": scale})
    rows = list(split.held_out_rows)
    kept = [i for i in range(8) if i not in rows]
    assert split.samples == 8 and len(rows) == 2 and split.note is None
    np.testing.assert_array_equal(split.held_out["x"], x[rows])
    np.testing.assert_array_equal(split.fitting["x"], x[kept])
    np.testing.assert_array_equal(split.held_out["state"], state[:, rows])
    np.testing.assert_array_equal(split.fitting["state"], state[:, kept])
    np.testing.assert_array_equal(split.fitting["scale"], scale)
    np.testing.assert_array_equal(split.held_out["scale"], scale)
    again = holdout.split_inputs(proto, {"x": x, "state": state, "scale": scale})
    assert again.held_out_rows == split.held_out_rows  # deterministic


@pytest.mark.parametrize("dims, batch, fragment", [
    (["batch", 3], 1, "holds 1 sample: too few"),
    ([4, 3], 4, "no input has a batch axis"),
])
def test_nothing_is_held_out_when_the_batch_cannot_spare_a_sample(dims, batch, fragment):
    x = np.zeros((batch, 3), np.float32)
    split = holdout.split_inputs(model_with_inputs(("x", dims)), {"x": x})
    assert split.held_out is None and fragment in split.note
    assert split.fitting["x"].shape == x.shape


def test_a_candidate_passes_only_when_the_held_out_share_meets_the_budget_too():
    fitting, held_out = auto.Check(True, 0.5, {}), auto.Check(False, 1.4, {})

    class FakeBuilder:
        def build(self, picks):
            return onnx.ModelProto()

        def check(self, proto):
            return fitting, held_out, 100

    front = auto.pareto_front([auto.Point(auto.KEPT, 1000, None)])
    study = auto.Study(weight=None, front=front)
    verdict = auto.AutoPass()._try(FakeBuilder(), [study], [0], 1.0)
    assert not verdict.passed and verdict.measured == 1.4 and verdict.held_out is held_out
    held_out = auto.Check(True, 0.3, {})
    verdict = auto.AutoPass()._try(FakeBuilder(), [study], [0], 1.0)
    assert verdict.passed and verdict.measured == 0.5


def test_auto_checks_its_model_on_samples_it_never_fitted(fixture_dir):
    """The transformer's 8-sample batch: 2 held out; the model meets the budget on them, and
    the report gives their figures."""
    path = fixture_dir / "transformer.onnx"
    rng = np.random.default_rng(3)
    inputs = {"input_ids": rng.integers(0, 512, (8, 12)).astype(np.int64)}
    budget = Budget(min_cosine=0.999)
    result = graphpass.run(path, "auto(methods=kmeans,bits=2|4|6,granularities=tensor|channel)", inputs=inputs,
                           budget=budget)
    details = next(p for p in result.report["passes"] if p["name"] == "auto")["details"]
    rows = details["held_out"]["held_out_rows"]
    assert details["held_out"]["samples"] == 8 and len(rows) == 2
    assert details["fitting"]["input_ids"] == [6, 12]
    assert 0 < details["held_out"]["units"] <= auto.HEADROOM
    held_out_inputs = {"input_ids": inputs["input_ids"][rows]}
    checked = verify(path, serialized_bytes(result.model), held_out_inputs, budget)
    assert checked.passed
    assert checked.outputs["logits"].cosine == pytest.approx(details["held_out"]["outputs"]["logits"]["cosine"],
                                                             abs=1e-6)


def test_settings_that_learnt_from_the_fitting_share_are_measured_on_the_held_out_one_too():
    """Error feedback fits the fitting share: its error there understates it, so a feedback
    setting counts the worse of the two shares; other settings are measured on the fitting share."""
    from types import SimpleNamespace

    def share(units):
        probe = SimpleNamespace(run=lambda overrides: overrides)
        meter = SimpleNamespace(measure=lambda outputs: SimpleNamespace(units=units))
        return probe, meter

    fitting_probe, fitting_meter = share(0.1)
    calibration = auto.Calibration(fitting_probe, fitting_meter, {}, {}, 0.01, unseen=share(0.7))
    weight = SimpleNamespace(name="w")
    assert calibration.measure(weight, np.zeros(2), learnt=True).units == 0.7
    assert calibration.measure(weight, np.zeros(2), learnt=False).units == 0.1
    calibration.unseen = share(0.05)
    assert calibration.measure(weight, np.zeros(2), learnt=True).units == 0.1
