"""An embedding table's output sensitivity G (graphpass.table_sensitivity) and feedback through it.

G is checked against its closed form where there is one (one row per sample, a linear reader),
and feedback through it against plain assignment on unseen inputs in onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphpass
from graphpass.edit import Model
from graphpass.feedback import SHRINK, TABLE_SHRINK, input_axis, shrink_for
from graphpass.manager import PassContext, parse_spec
from graphpass.parallel import Workers
from graphpass.sensitivity import Probe
from graphpass.table_sensitivity import table_sensitivity, wants_sensitivity
from graphpass.verify import Budget

ROWS, WIDTH, OUT = 4096, 16, 12


def mixing(seed: int = 7) -> np.ndarray:
    """[WIDTH, OUT] with singular values from 10 down to 0.05: some table directions matter far
    more than others, and not along the table's own axes."""
    rng = np.random.default_rng(seed)
    left, _ = np.linalg.qr(rng.standard_normal((WIDTH, WIDTH)))
    right, _ = np.linalg.qr(rng.standard_normal((OUT, OUT)))
    singular = np.geomspace(10.0, 0.05, OUT)
    return (left[:, :OUT] * singular) @ right.T


def embedding_model(nonlinear: bool, seed: int = 3) -> onnx.ModelProto:
    """ids [B, T] -> Gather(E [ROWS, WIDTH]) -> MatMul(M) -> (Tanh) -> mean over T -> y [B, OUT]."""
    rng = np.random.default_rng(seed)
    table = (rng.standard_normal((ROWS, WIDTH)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["rows"], axis=0),
             helper.make_node("MatMul", ["rows", "M"], ["mixed"])]
    last = "mixed"
    if nonlinear:
        nodes.append(helper.make_node("Tanh", ["mixed"], ["bent"]))
        last = "bent"
    nodes.append(helper.make_node("ReduceMean", [last], ["y"], axes=[1], keepdims=0))
    graph = helper.make_graph(nodes, "embedding", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "t"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", OUT])],
                              [numpy_helper.from_array(table, "E"),
                               numpy_helper.from_array(mixing().astype(np.float32), "M")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def measured_g(proto: onnx.ModelProto, ids: np.ndarray, cosine: bool) -> np.ndarray:
    model = Model(proto)
    table = next(w for w in model.weights() if w.name == "E")
    probe = Probe(model, [table], {"ids": ids}, ["y"])
    return table_sensitivity(probe, table, np.unique(ids), cosine, {"y": 0}, Workers(2))


def test_sensitivity_of_a_linear_reader_is_its_closed_form():
    """One distinct row per sample through y = row @ M: each sample's Jacobian to its row is M^T,
    so G = B M M^T for the outputs' plain change, and sum_b M P_b M^T / |y_b|^2 for cosine
    (P_b removing the change along y_b)."""
    proto = embedding_model(nonlinear=False)
    ids = np.arange(0, 40 * 7, 7, dtype=np.int64)[:, None]  # 40 samples, one distinct row each
    m = mixing()
    np.testing.assert_allclose(measured_g(proto, ids, cosine=False), len(ids) * m @ m.T, rtol=1e-3, atol=1e-3)

    table = numpy_helper.to_array(proto.graph.initializer[0]).astype(np.float64)
    expected = np.zeros((WIDTH, WIDTH))
    for y in table[ids[:, 0]] @ m:
        unit = y / np.linalg.norm(y)
        across = np.eye(OUT) - np.outer(unit, unit)
        expected += m @ across @ m.T / (y @ y)
    np.testing.assert_allclose(measured_g(proto, ids, cosine=True), expected, rtol=1e-3, atol=1e-6)


def test_a_table_read_only_by_gathers_takes_its_columns_as_inputs():
    model = Model(embedding_model(nonlinear=True))
    weights = {w.name: w for w in model.weights()}
    assert input_axis(weights["E"]) == 1  # rows are the table's rows, G is over its columns
    assert input_axis(weights["M"]) == 0  # a MatMul's B as before
    assert wants_sensitivity(weights["E"]) and not wants_sensitivity(weights["M"])
    # G is measured over every row and output feature: feedback takes it unshrunk.
    assert shrink_for(weights["E"]) == TABLE_SHRINK != SHRINK == shrink_for(weights["M"])


def output_error(proto: onnx.ModelProto, table: np.ndarray, ids: np.ndarray) -> float:
    """Squared error of y with the table replaced, relative to y's energy, in onnxruntime."""
    def run(model: onnx.ModelProto) -> np.ndarray:
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"ids": ids})[0].astype(np.float64)

    replaced = onnx.ModelProto()
    replaced.CopyFrom(proto)
    replaced.graph.initializer[0].CopyFrom(numpy_helper.from_array(table.astype(np.float32), "E"))
    reference, got = run(proto), run(replaced)
    return float(np.sum((got - reference) ** 2) / np.sum(reference**2))


def test_feedback_through_the_tables_sensitivity_lowers_the_output_error_on_unseen_inputs():
    proto = embedding_model(nonlinear=True)
    rng = np.random.default_rng(0)
    calibration, unseen = (rng.integers(0, ROWS, (64, 8)).astype(np.int64) for _ in range(2))
    g = measured_g(proto, calibration, cosine=False)
    model = Model(proto)
    table = next(w for w in model.weights() if w.name == "E")
    ctx = PassContext(model, calibration_inputs={"ids": calibration})
    (plain,) = parse_spec("codebook(dim=2,k=16,scale=channel)")
    (fed,) = parse_spec("codebook(dim=2,k=16,scale=channel,feedback=true)")
    plain_plan, fed_plan = plain.plan(ctx, table), fed.plan(ctx, table, hessian=g)
    assert fed_plan.details["feedback"] == "applied"
    assert fed_plan.stored_bytes == plain_plan.stored_bytes
    assert output_error(proto, fed_plan.reconstruction, unseen) < 0.7 * output_error(
        proto, plain_plan.reconstruction, unseen)


def auto_details(result) -> dict:
    return next(p for p in result.report["passes"] if p["name"] == "auto")["details"]


@pytest.mark.parametrize("feedback", [False, True])
def test_auto_feeds_back_through_a_tables_sensitivity_and_meets_the_budget(tmp_path, feedback):
    """The table's own settings (hot rows, rungs) come with feedback through G, whether or not
    auto's feedback option is on; the model auto writes meets the budget in onnxruntime."""
    proto = embedding_model(nonlinear=True)
    rng = np.random.default_rng(1)
    calibration = {"ids": rng.integers(0, ROWS, (32, 8)).astype(np.int64)}
    target = tmp_path / "out.onnx"
    result = graphpass.run(proto, f"auto(methods=codebook,bits=2|3|4,feedback={str(feedback).lower()})",
                           output=target, inputs=calibration, budget=Budget(min_cosine=0.98))
    assert result.passed
    tensors = {t["name"]: t for t in auto_details(result)["tensors"]}
    table_settings = [t["setting"] for t in tensors["E"]["tried"] if "hot_rows" in t["setting"]]
    assert table_settings and all("feedback=True" in s for s in table_settings)
    plain = [t["setting"] for t in tensors["E"]["tried"] if "hot_rows" not in t["setting"]]
    assert plain and any("feedback" not in s for s in plain)  # plain codebooks stay on offer
    unseen = {"ids": rng.integers(0, ROWS, (32, 8)).astype(np.int64)}
    reference = ort.InferenceSession(proto.SerializeToString()).run(None, unseen)[0]
    got = ort.InferenceSession(str(target)).run(None, unseen)[0]
    cosine = np.sum(reference * got, axis=1) / np.linalg.norm(reference, axis=1) / np.linalg.norm(got, axis=1)
    assert cosine.min() > 0.95  # unseen rows are coded like the seen ones: near the budget too


def test_outputs_wider_than_the_sketch_keep_the_sensitivity():
    """An output of 3000 features per sample is seen through PROJECTED_WIDTH buckets: G stays
    near its closed form B M M^T (the sketch keeps inner products on average, so each entry is
    off by about |m_i| |m_j| / sqrt(buckets))."""
    rng = np.random.default_rng(4)
    m = rng.standard_normal((WIDTH, 3000)) / 50
    table = rng.standard_normal((ROWS, WIDTH)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Gather", ["E", "ids"], ["rows"], axis=0),
                               helper.make_node("MatMul", ["rows", "M"], ["y3"]),
                               helper.make_node("ReduceMean", ["y3"], ["y"], axes=[1], keepdims=0)], "wide",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "t"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3000])],
                              [numpy_helper.from_array(table, "E"), numpy_helper.from_array(m.astype(np.float32), "M")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    ids = np.arange(0, 30 * 11, 11, dtype=np.int64)[:, None]
    found, expected = measured_g(proto, ids, cosine=False), len(ids) * m @ m.T
    np.testing.assert_allclose(np.diag(found), np.diag(expected), rtol=0.1)
    assert np.linalg.norm(found - expected) < 0.2 * np.linalg.norm(expected)


def pooled_model(keepdims: int) -> onnx.ModelProto:
    """ids [t] -> Gather(E) -> MatMul(M) -> mean over t -> y: [OUT] (keepdims=0) or [1, OUT]."""
    rng = np.random.default_rng(5)
    table = (rng.standard_normal((ROWS, WIDTH)) * 0.3).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Gather", ["E", "ids"], ["rows"], axis=0),
                               helper.make_node("MatMul", ["rows", "M"], ["mixed"]),
                               helper.make_node("ReduceMean", ["mixed"], ["y"], axes=[0], keepdims=keepdims)],
                              "pooled", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["t"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, OUT][1 - keepdims:])],
                              [numpy_helper.from_array(table, "E"),
                               numpy_helper.from_array(mixing().astype(np.float32), "M")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_an_output_of_rank_one_is_one_sample_as_the_budget_counts_it():
    """The budget (graphpass.metrics.sample_rows) takes an output of rank 1 as one sample, so G
    must weigh its change across the whole output: the same G as for that output shaped [1, OUT].
    Taking each element as a sample of one feature would leave no change across any sample under
    a cosine budget, and G would be 0."""
    ids = np.arange(0, 40 * 7, 7, dtype=np.int64)  # 40 distinct rows pooled into one output
    for cosine in (True, False):
        vector = measured_g(pooled_model(keepdims=0), ids, cosine)
        batch_of_one = measured_g(pooled_model(keepdims=1), ids, cosine)
        assert np.linalg.norm(batch_of_one) > 0
        np.testing.assert_allclose(vector, batch_of_one, rtol=1e-6, atol=1e-9 * np.abs(batch_of_one).max())

    # One row read: y = E[r] M, whose Jacobian to the row is M^T, so G = M P M^T / |y|^2 with P
    # removing the change along y (the closed form, as for one row per sample above).
    (row,) = ids[:1]
    table = numpy_helper.to_array(pooled_model(keepdims=0).graph.initializer[0]).astype(np.float64)
    m = mixing()
    y = table[row] @ m
    unit = y / np.linalg.norm(y)
    expected = m @ (np.eye(OUT) - np.outer(unit, unit)) @ m.T / (y @ y)
    np.testing.assert_allclose(measured_g(pooled_model(keepdims=0), ids[:1], cosine=True), expected,
                               rtol=1e-3, atol=1e-6 * np.abs(expected).max())
