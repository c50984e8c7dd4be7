"""Tests for graphpass/verify.py, using tiny models built with onnx.helper."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphpass.verify as gv

OPSET = [helper.make_opsetid("", 17)]
TIGHT = gv.Budget(atol=1e-6, rtol=0.0)


def _model(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "test", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = 8  # keep loadable by any supported onnxruntime
    onnx.checker.check_model(model)
    return model


def matmul_model(weight: np.ndarray):
    """y[batch, out] = x[batch, in] @ W."""
    return _model(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", weight.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", weight.shape[1]])],
        [numpy_helper.from_array(weight.astype(np.float32), "W")],
    )


def embedding_model(vocab: int, dim: int = 4, through_cast: bool = False):
    """out = table[input_ids] * attention_mask[..., None]; ids optionally go via Cast."""
    table = np.arange(vocab * dim, dtype=np.float32).reshape(vocab, dim)
    nodes, ids = [], "input_ids"
    if through_cast:
        nodes.append(helper.make_node("Cast", ["input_ids"], ["ids32"], to=TensorProto.INT32))
        ids = "ids32"
    nodes += [
        helper.make_node("Gather", ["table", ids], ["emb"]),
        helper.make_node("Unsqueeze", ["attention_mask", "axes"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["out"]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.FLOAT, ["batch", "seq"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "seq", dim])],
        [numpy_helper.from_array(table, "table"),
         numpy_helper.from_array(np.array([-1], dtype=np.int64), "axes")],
    )


def identity_model(elem_type=TensorProto.FLOAT, shape=("batch", 3), out_name="y"):
    return _model(
        [helper.make_node("Identity", ["x"], [out_name])],
        [helper.make_tensor_value_info("x", elem_type, list(shape))],
        [helper.make_tensor_value_info(out_name, elem_type, list(shape))],
    )


def constant_output_model(values: np.ndarray, out_name="y"):
    """Output = x * 0 + constant, so a test controls the output exactly."""
    return _model(
        [helper.make_node("Mul", ["x", "zero"], ["z"]), helper.make_node("Add", ["z", "c"], [out_name])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(values.shape))],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, list(values.shape))],
        [numpy_helper.from_array(np.zeros((), np.float32), "zero"),
         numpy_helper.from_array(values.astype(np.float32), "c")],
    )


@pytest.fixture
def weight():
    return np.random.default_rng(1).standard_normal((8, 5)).astype(np.float32)


# --- identical and perturbed models ---------------------------------------------------


def test_identical_models_pass_with_zero_error_at_both_levels(tmp_path, weight):
    ref, cand = tmp_path / "ref.onnx", tmp_path / "cand.onnx"
    onnx.save(matmul_model(weight), ref)
    onnx.save(matmul_model(weight), cand)
    inputs = gv.synthesize_inputs(onnx.load(ref))
    result = gv.verify(ref, cand, inputs, gv.LOSSLESS_BUDGET)
    assert result.passed
    assert result.levels == ["default", "disable_all"]
    y = result.outputs["y"]
    assert set(y.per_level) == {"default", "disable_all"}
    for metrics in [y, *y.per_level.values()]:
        assert metrics.passed and metrics.failure is None
        assert metrics.max_abs_error == 0.0 and metrics.max_rel_error == 0.0
        assert metrics.cosine == 1.0 and metrics.snr_db == math.inf
        assert metrics.mismatch_fraction == 0.0


def test_perturbed_candidate_fails_tight_budget_and_passes_loose_one(weight):
    delta = np.zeros_like(weight)
    delta[2, 3] = 0.05
    reference, candidate = matmul_model(weight), matmul_model(weight + delta)
    inputs = gv.synthesize_inputs(reference, seed=3, shapes={"x": (4, 8)})
    # float32 matmuls round the two outputs differently, so allow a few ulps.
    expected = 0.05 * float(np.abs(inputs["x"][:, 2]).max())
    assert expected > 1e-3

    tight = gv.verify(reference.SerializeToString(), candidate.SerializeToString(), inputs, TIGHT)
    assert not tight.passed
    assert tight.outputs["y"].failure.startswith("elementwise")
    assert "default" in tight.outputs["y"].failure
    assert tight.outputs["y"].max_abs_error == pytest.approx(expected, abs=1e-5)

    loose = gv.verify(reference, candidate, inputs, gv.Budget(atol=10 * expected, min_cosine=0.99))
    assert loose.passed
    assert loose.outputs["y"].max_abs_error == pytest.approx(expected, abs=1e-5)
    assert 0.99 < loose.outputs["y"].cosine < 1.0
    assert math.isfinite(loose.outputs["y"].snr_db) and loose.outputs["y"].snr_db > 0


def test_the_reference_runs_once_for_many_candidates(monkeypatch, weight):
    """reference_runs: later calls reuse the reference's outputs per level (auto's builds)."""
    roles = []
    run = gv._run_in_onnxruntime
    monkeypatch.setattr(gv, "_run_in_onnxruntime",
                        lambda source, role, level, inputs: roles.append(role) or run(source, role, level, inputs))
    reference = matmul_model(weight)
    inputs = gv.synthesize_inputs(reference, seed=3, shapes={"x": (4, 8)})
    runs: dict = {}
    results = [gv.verify(reference, matmul_model(weight + scale), inputs, gv.Budget(min_cosine=0.99),
                         reference_runs=runs) for scale in (0.01, 0.02, 0.03)]
    assert roles.count("reference") == len(gv.DEFAULT_LEVELS)
    assert roles.count("candidate") == 3 * len(gv.DEFAULT_LEVELS)
    assert set(runs) == set(gv.DEFAULT_LEVELS)
    fresh = gv.verify(reference, matmul_model(weight + 0.03), inputs, gv.Budget(min_cosine=0.99))
    assert results[-1].outputs["y"].cosine == fresh.outputs["y"].cosine < 1.0


def test_cosine_budget_failure_is_named():
    reference = constant_output_model(np.array([[1.0, 0.0]]))
    candidate = constant_output_model(np.array([[0.0, 1.0]]))
    inputs = {"x": np.zeros((1, 2), np.float32)}
    result = gv.verify(reference, candidate, inputs, gv.Budget(min_cosine=0.5))
    assert not result.passed
    assert result.outputs["y"].cosine == 0.0
    assert result.outputs["y"].failure.startswith("cosine")
    assert result.outputs["y"].mismatch_fraction is None  # no elementwise budget

    both = gv.verify(reference, candidate, inputs, gv.Budget(atol=0.1, min_cosine=0.5))
    clauses = both.outputs["y"].failure.split("; ")
    assert clauses[0].startswith("elementwise: 2/2") and clauses[1].startswith("cosine")
    assert both.outputs["y"].mismatch_fraction == 1.0


def test_relative_error_uses_floor_for_zero_reference():
    reference = constant_output_model(np.array([[100.0, 0.0]]))
    candidate = constant_output_model(np.array([[100.0, 0.05]]))
    result = gv.verify(reference, candidate, {"x": np.zeros((1, 2), np.float32)}, gv.Budget())
    floor = gv.REL_ERROR_FLOOR_FRACTION * 100.0
    assert result.outputs["y"].max_rel_error == pytest.approx(0.05 / floor, rel=1e-5)
    assert result.passed  # no checks requested


# --- input synthesis ------------------------------------------------------------------


def test_gather_indices_stay_inside_small_vocab():
    model = embedding_model(vocab=7, through_cast=True)
    inputs = gv.synthesize_inputs(model, shapes={"input_ids": (2, 50)})
    ids = inputs["input_ids"]
    assert ids.dtype == np.int64 and ids.shape == (2, 50)
    assert ids.min() >= 0 and ids.max() < 7
    assert len(np.unique(ids)) > 1  # actually random, not a constant
    # The shared "seq" symbol carries the override over to attention_mask.
    assert inputs["attention_mask"].shape == (2, 50)
    assert gv.verify(model, model, inputs, gv.LOSSLESS_BUDGET).passed

    # Out-of-range ids are a real hazard: onnxruntime refuses them.
    bad = dict(inputs, input_ids=np.full((2, 50), 7, np.int64))
    with pytest.raises(gv.VerifyInputError, match="failed to run the reference"):
        gv.verify(model, model, bad, gv.LOSSLESS_BUDGET)


def test_gather_table_from_constant_node_and_axis():
    table = np.zeros((3, 5), np.float32)
    model = _model(
        [helper.make_node("Constant", [], ["table"], value=numpy_helper.from_array(table)),
         helper.make_node("Gather", ["table", "idx"], ["y"], axis=1)],
        [helper.make_tensor_value_info("idx", TensorProto.INT64, [64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 64])],
    )
    idx = gv.synthesize_inputs(model)["idx"]
    assert idx.max() < 5 and idx.max() >= 3  # bound is axis 1 (5), not axis 0 (3)


def test_mask_inputs_are_ones_and_defaults_for_dynamic_dims():
    inputs = gv.synthesize_inputs(embedding_model(vocab=11))
    assert inputs["attention_mask"].shape == (1, 16)
    assert np.all(inputs["attention_mask"] == 1)
    assert inputs["input_ids"].shape == (1, 16)
    assert gv.synthesize_inputs(embedding_model(vocab=11), default_dim=5)["input_ids"].shape == (1, 5)


def test_synthesis_is_deterministic_and_seeded(weight):
    model = matmul_model(weight)
    first, again = gv.synthesize_inputs(model, seed=4), gv.synthesize_inputs(model, seed=4)
    other = gv.synthesize_inputs(model, seed=5)
    np.testing.assert_array_equal(first["x"], again["x"])
    assert not np.array_equal(first["x"], other["x"])
    assert first["x"].dtype == np.float32 and first["x"].shape == (1, 8)


def test_synthesis_dtype_rules():
    inputs_info = [
        helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        helper.make_tensor_value_info("h16", TensorProto.FLOAT16, [2, 3]),
        helper.make_tensor_value_info("flags", TensorProto.BOOL, [64]),
        helper.make_tensor_value_info("seq_lens", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("steps", TensorProto.INT64, [32]),
        helper.make_tensor_value_info("W", TensorProto.FLOAT, [2]),
    ]
    model = _model(
        [helper.make_node("Identity", [name], [name + "_out"]) for name in
         ("sr", "h16", "flags", "seq_lens", "steps", "W")],
        inputs_info,
        [helper.make_value_info(vi.name + "_out", vi.type) for vi in inputs_info],
        [numpy_helper.from_array(np.ones(2, np.float32), "W")],
    )
    inputs = gv.synthesize_inputs(model, default_dim=9)
    assert "W" not in inputs  # an initializer with a default value
    assert inputs["sr"].shape == () and inputs["sr"] == 16000 and inputs["sr"].dtype == np.int64
    assert inputs["h16"].dtype == np.float16
    assert inputs["flags"].dtype == np.bool_ and 0 < inputs["flags"].sum() < 64
    assert inputs["seq_lens"].dtype == np.int32 and np.all(inputs["seq_lens"] == 9)
    assert inputs["steps"].min() >= 0 and inputs["steps"].max() < gv.SMALL_INT_HIGH


def test_other_scalar_int_input_is_one():
    model = identity_model(TensorProto.INT64, shape=(), out_name="y")
    assert gv.synthesize_inputs(model)["x"] == 1


def test_bad_shape_overrides_raise():
    model = embedding_model(vocab=5)
    with pytest.raises(gv.VerifyInputError, match="unknown input"):
        gv.synthesize_inputs(model, shapes={"nope": (1,)})
    with pytest.raises(gv.VerifyInputError, match="rank"):
        gv.synthesize_inputs(model, shapes={"input_ids": (1, 2, 3)})
    with pytest.raises(gv.VerifyInputError, match="fixed at 8"):
        gv.synthesize_inputs(matmul_model(np.ones((8, 2))), shapes={"x": (1, 4)})


def test_bfloat16_model_round_trips():
    model = identity_model(TensorProto.BFLOAT16)
    inputs = gv.synthesize_inputs(model)
    assert inputs["x"].dtype.name == "bfloat16"
    result = gv.verify(model, model, inputs, gv.LOSSLESS_BUDGET)
    assert result.passed and result.outputs["y"].max_abs_error == 0.0


# --- parse_shapes / load_inputs --------------------------------------------------------


def test_parse_shapes():
    assert gv.parse_shapes(["input_ids=1x128", " pixel_values = 1x3x224x224 ", "past=1,8,0,64"]) == {
        "input_ids": (1, 128), "pixel_values": (1, 3, 224, 224), "past": (1, 8, 0, 64)}
    assert gv.parse_shapes([]) == {}


@pytest.mark.parametrize("spec", ["input_ids", "input_ids=", "=1x2", "x=1x", "x=1xa", "x=-1", "x=1.5"])
def test_parse_shapes_rejects_bad_syntax(spec):
    with pytest.raises(gv.VerifyInputError, match="bad --shape"):
        gv.parse_shapes([spec])


def test_parse_shapes_rejects_duplicates():
    with pytest.raises(gv.VerifyInputError, match="twice"):
        gv.parse_shapes(["x=1", "x=2"])


def test_load_inputs_and_missing_input(tmp_path, weight):
    path = tmp_path / "inputs.npz"
    np.savez(path, other=np.zeros(3, np.float32))
    inputs = gv.load_inputs(path)
    assert list(inputs) == ["other"]
    with pytest.raises(gv.VerifyInputError, match=r"input\(s\) x"):
        gv.verify(matmul_model(weight), matmul_model(weight), inputs, gv.LOSSLESS_BUDGET)
    with pytest.raises(gv.VerifyInputError, match="cannot read inputs"):
        gv.load_inputs(tmp_path / "absent.npz")


def test_unloadable_model_raises(tmp_path, weight):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    inputs = {"x": np.zeros((1, 8), np.float32)}
    with pytest.raises(gv.VerifyInputError, match="cannot load the candidate"):
        gv.verify(matmul_model(weight), broken, inputs, gv.LOSSLESS_BUDGET)
    with pytest.raises(gv.VerifyInputError, match="not found"):
        gv.verify(tmp_path / "missing.onnx", broken, inputs, gv.LOSSLESS_BUDGET)


def test_unknown_level_and_bad_budget_raise(weight):
    with pytest.raises(gv.VerifyInputError, match="level"):
        gv.verify(matmul_model(weight), matmul_model(weight), {}, TIGHT, levels=("turbo",))
    with pytest.raises(gv.VerifyInputError, match="atol"):
        gv.Budget(atol=-1.0)


# --- failure modes ---------------------------------------------------------------------


def test_nan_in_candidate_fails_even_with_no_budget():
    reference = constant_output_model(np.array([[1.0, 2.0]]))
    candidate = constant_output_model(np.array([[1.0, np.nan]]))
    result = gv.verify(reference, candidate, {"x": np.zeros((1, 2), np.float32)}, gv.Budget())
    assert not result.passed
    assert result.outputs["y"].failure.startswith("non-finite")
    # Its figures do not pretend the finite positions are the whole story, budget or not.
    for budget in (gv.Budget(), gv.Budget(min_cosine=0.9, atol=0.1)):
        y = gv.verify(reference, candidate, {"x": np.zeros((1, 2), np.float32)}, budget).outputs["y"]
        assert not y.passed and y.failure.startswith("non-finite")
        assert y.cosine is None and y.max_abs_error == math.inf and y.snr_db == -math.inf
    json.dumps(result.to_dict(), allow_nan=False)
    # Both NaN at the same place is agreement, not an error.
    assert gv.verify(candidate, candidate, {"x": np.zeros((1, 2), np.float32)}, TIGHT).passed


def test_shape_mismatch_fails_cleanly():
    reference = constant_output_model(np.zeros((1, 3)))
    candidate = _model(
        [helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(np.array([value], np.int64), name)
         for name, value in (("starts", 0), ("ends", 2), ("axes", 1))],
    )
    result = gv.verify(reference, candidate, {"x": np.zeros((1, 3), np.float32)}, gv.Budget())
    y = result.outputs["y"]
    assert not result.passed and not y.passed
    assert y.failure.startswith("shape mismatch: reference (1, 3) vs candidate (1, 2)")
    assert y.max_abs_error is None
    json.dumps(result.to_dict(), allow_nan=False)
    assert "FAIL" in gv.render_table(result)


def test_missing_output_and_integer_outputs():
    inputs = {"x": np.arange(6, dtype=np.int64).reshape(2, 3)}
    reference = identity_model(TensorProto.INT64)
    shifted = _model(
        [helper.make_node("Add", ["x", "one"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.INT64, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, ["batch", 3])],
        [numpy_helper.from_array(np.array([0, 0, 1], np.int64), "one")],
    )
    result = gv.verify(reference, shifted, inputs, gv.Budget(atol=10.0))
    y = result.outputs["y"]
    assert not y.passed and y.failure.startswith("exact match required")
    assert y.mismatch_fraction == pytest.approx(2 / 6) and y.max_abs_error == 1.0
    assert y.cosine is None and y.argmax_agreement is None

    renamed = identity_model(TensorProto.INT64, out_name="z")
    missing = gv.verify(reference, renamed, inputs, gv.Budget())
    assert missing.outputs["y"].failure.startswith("output missing from candidate")


# --- argmax, JSON, rendering -----------------------------------------------------------


def test_argmax_agreement_on_classifier_output():
    ref_logits = np.array([[[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]]])
    cand_logits = ref_logits.copy()
    cand_logits[0, 1] = [0.0, 1.0, 2.0]  # one of four rows changes its top class
    reference = constant_output_model(ref_logits, out_name="logits")
    candidate = constant_output_model(cand_logits, out_name="logits")
    result = gv.verify(reference, candidate, {"x": np.zeros(ref_logits.shape, np.float32)}, gv.Budget())
    assert result.outputs["logits"].argmax_agreement == pytest.approx(0.75)
    assert "75.0%" in gv.render_table(result)

    hidden = constant_output_model(ref_logits, out_name="last_hidden_state")
    same = gv.verify(hidden, hidden, {"x": np.zeros(ref_logits.shape, np.float32)}, gv.Budget())
    assert same.outputs["last_hidden_state"].argmax_agreement is None


def test_to_dict_is_strict_json_and_table_verdict(weight):
    model = matmul_model(weight)
    result = gv.verify(model, model, gv.synthesize_inputs(model), gv.LOSSLESS_BUDGET)
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["passed"] is True
    assert data["budget"] == {"atol": 1e-5, "rtol": 1e-4, "min_cosine": None}
    assert data["outputs"]["y"]["snr_db"] is None  # +inf (exact match) is written as null
    assert set(data["outputs"]["y"]["per_level"]) == {"default", "disable_all"}
    table = gv.render_table(result)
    assert table.splitlines()[0].split()[:3] == ["output", "max", "abs"]
    assert "PASS" in table and "inf" in table
    assert table.splitlines()[-1] == (
        "verification PASSED (budget: atol=1e-05, rtol=0.0001; levels: default, disable_all)")


def test_single_level_and_failed_verdict(weight):
    reference, candidate = matmul_model(weight), matmul_model(weight * 2)
    inputs = gv.synthesize_inputs(reference)
    result = gv.verify(reference, candidate, inputs, TIGHT, levels=("disable_all",))
    assert result.levels == ["disable_all"] and not result.passed
    assert set(result.outputs["y"].per_level) == {"disable_all"}
    verdict = gv.render_table(result).splitlines()[-1]
    assert verdict.startswith("verification FAILED (budget: atol=1e-06, rtol=0;")


def test_candidate_with_external_data_loads_from_path(tmp_path, weight):
    candidate = tmp_path / "cand.onnx"
    onnx.save(matmul_model(weight), candidate, save_as_external_data=True,
              all_tensors_to_one_file=True, location="cand.data", size_threshold=0)
    assert (tmp_path / "cand.data").exists()
    model = matmul_model(weight)
    result = gv.verify(model, candidate, gv.synthesize_inputs(model), gv.LOSSLESS_BUDGET)
    assert result.passed and result.outputs["y"].max_abs_error == 0.0


def test_budget_can_apply_to_some_outputs_only():
    weight = np.eye(4, dtype=np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("Identity", ["x"], ["b"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in ("a", "b")]
    reference = _model(nodes, inputs, outputs, [numpy_helper.from_array(weight, "W")])
    candidate = _model(nodes, inputs, outputs, [numpy_helper.from_array(weight * 1.5, "W")])
    feeds = {"x": np.ones((1, 4), np.float32)}
    assert not gv.verify(reference, candidate, feeds, TIGHT).passed
    only_b = gv.verify(reference, candidate, feeds, TIGHT, budget_outputs=["b"])
    assert only_b.passed and only_b.outputs["a"].max_abs_error == pytest.approx(0.5)


# --- per-sample figures ----------------------------------------------------------------


def _batch_with_one_bad_sample():
    """Eight samples of 64 values; the candidate reverses sample 3 only, so the whole-tensor
    cosine stays high while that sample's cosine is far lower."""
    reference = np.random.default_rng(7).standard_normal((8, 64))
    candidate = reference.copy()
    candidate[3] = reference[3][::-1]
    return reference, candidate


def _own_cosine(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_table_shows_the_worst_sample_and_min_cosine_holds_every_sample():
    reference, candidate = _batch_with_one_bad_sample()
    worst, whole = _own_cosine(reference[3], candidate[3]), _own_cosine(reference, candidate)
    assert worst < whole - 0.05  # the case this guards: one bad sample, a good-looking batch
    inputs = {"x": np.zeros((8, 64), np.float32)}
    between = gv.Budget(min_cosine=(worst + whole) / 2)
    result = gv.verify(constant_output_model(reference), constant_output_model(candidate), inputs, between)
    y = result.outputs["y"]
    assert y.samples == 8
    assert y.cosine == pytest.approx(worst, abs=1e-6)
    assert y.whole_tensor["cosine"] == pytest.approx(whole, abs=1e-6)
    assert not result.passed and y.failure.startswith("worst-sample cosine")
    assert f"{worst:.6f}" in gv.render_table(result)
    below_both = gv.Budget(min_cosine=worst - 0.01)
    assert gv.verify(constant_output_model(reference), constant_output_model(candidate), inputs, below_both).passed


def test_mean_abs_error_and_snr_are_the_worst_samples():
    reference, candidate = _batch_with_one_bad_sample()
    figures = gv.worst_sample_figures(reference, candidate)
    gap = np.abs(candidate[3] - reference[3])
    assert figures["mean_abs_error"] == pytest.approx(gap.mean())
    assert figures["snr_db"] == pytest.approx(10 * math.log10(np.sum(reference[3] ** 2) / np.sum(gap ** 2)))
    assert figures["max_abs_error"] == pytest.approx(np.abs(candidate - reference).max())


def test_rank_one_output_is_one_sample():
    reference = np.random.default_rng(3).standard_normal(32)
    candidate = reference.copy()
    candidate[:4] = -candidate[:4]
    result = gv.verify(constant_output_model(reference), constant_output_model(candidate),
                       {"x": np.zeros(32, np.float32)}, gv.Budget())
    y = result.outputs["y"]
    assert y.samples == 1
    assert y.cosine == pytest.approx(_own_cosine(reference, candidate), abs=1e-6)
    assert y.cosine == pytest.approx(y.whole_tensor["cosine"])


def test_zero_samples_and_zero_rows_do_not_break_the_figures():
    empty = gv.worst_sample_figures(np.zeros((0, 5)), np.zeros((0, 5)))
    assert empty["samples"] == 0 and empty["cosine"] == 1.0
    zero_rows = gv.worst_sample_figures(np.zeros((2, 3)), np.array([[0.0, 0, 0], [1, 0, 0]]))
    assert zero_rows["cosine"] == 0.0 and zero_rows["snr_db"] == -math.inf


def test_json_has_worst_sample_and_whole_tensor_figures():
    reference, candidate = _batch_with_one_bad_sample()
    result = gv.verify(constant_output_model(reference), constant_output_model(candidate),
                       {"x": np.zeros((8, 64), np.float32)}, gv.Budget())
    y = json.loads(json.dumps(result.to_dict(), allow_nan=False))["outputs"]["y"]
    assert y["samples"] == 8
    assert y["cosine"] < y["whole_tensor"]["cosine"]
    assert {"max_abs_error", "max_rel_error", "mean_abs_error", "cosine", "snr_db"} <= y["whole_tensor"].keys()
    assert y["per_level"]["default"]["whole_tensor"]["cosine"] == pytest.approx(y["whole_tensor"]["cosine"])
    assert result.to_dict()["budget_given"] is True


# --- no budget, no PASS ----------------------------------------------------------------


def test_lossy_cli_run_without_budget_says_so_and_writes_the_output(fixture_dir, tmp_path):
    from click.testing import CliRunner

    from graphpass.cli import main

    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    args = ["run", str(fixture_dir / "example.onnx"), "--passes", "kmeans(bits=2)", "--no-cost",
            "-o", str(out), "--report", str(report_path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert out.is_file()
    assert "PASS" not in result.output  # neither the verdict nor the table's rows
    report = json.loads(report_path.read_text())["verify"]
    assert report["budget_given"] is False
    cosine = report["outputs"]["logits"]["cosine"]
    verdict = result.output.strip().splitlines()
    line = next(line for line in verdict if line.startswith("no accuracy budget given"))
    assert f"logits={cosine:.6f}" in line and "--min-cosine" in line

    held = CliRunner().invoke(main, [*args, "--min-cosine", "-1"])
    assert held.exit_code == 0 and "verification PASSED" in held.output


def test_verify_command_without_budget_shows_no_pass(fixture_dir):
    from click.testing import CliRunner

    from graphpass.cli import main

    pair = [str(fixture_dir / "negated.onnx"), str(fixture_dir / "scaled.onnx"), "--no-cost"]
    unbudgeted = CliRunner().invoke(main, ["verify", *pair])
    assert unbudgeted.exit_code == 0, unbudgeted.output
    assert "PASS" not in unbudgeted.output and "hold it with --min-cosine" in unbudgeted.output
    held = CliRunner().invoke(main, ["verify", *pair, "--min-cosine", "-1"])
    assert held.exit_code == 0 and "verification PASSED" in held.output


def test_auto_measures_the_cosine_verification_holds():
    from graphpass.sensitivity import error_units

    reference, candidate = _batch_with_one_bad_sample()
    worst = _own_cosine(reference[3], candidate[3])
    units, metrics = error_units("y", reference, candidate, gv.Budget(min_cosine=0.99))
    assert metrics.cosine == pytest.approx(worst)
    assert units == pytest.approx((1 - worst) / (1 - 0.99))


def _state_model(values: np.ndarray):
    """A constant output declared as [2, batch, n], as recurrent state is: h and c on axis 0."""
    model = constant_output_model(values)
    dims = model.graph.output[0].type.tensor_type.shape.dim
    dims[1].Clear()
    dims[1].dim_param = "batch"
    return model


def test_declared_batch_axis_holds_the_samples():
    reference = np.random.default_rng(5).standard_normal((2, 3, 16))
    candidate = reference.copy()
    candidate[:, 1] = -reference[:, 1]  # batch sample 1 flipped, in both h and c
    result = gv.verify(_state_model(reference), _state_model(candidate),
                       {"x": np.zeros((2, 3, 16), np.float32)}, gv.Budget())
    y = result.outputs["y"]
    assert gv.declared_batch_axes(_state_model(reference)) == {"y": 1}
    assert y.samples == 3
    assert y.cosine == pytest.approx(-1.0)
    assert y.whole_tensor["cosine"] > -0.9  # axis 0 (h, c) would mix the flipped sample in
