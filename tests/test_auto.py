"""auto (passes/auto/), the probe it measures with (graphpass/sensitivity.py), and the codec
contract it relies on (graphpass/codec.py, as passes/binning/engine.py implements it).

Every auto run here uses a small grid (FAST) so the file stays well under a minute.
"""

from __future__ import annotations

import gc
import itertools
import math
import weakref
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, version_converter

import graphpass
from graphpass import activations, feedback, grid, sensitivity
from graphpass.cli import main
from graphpass.codec import Plan
from graphpass.edit import Model
from graphpass.errors import BudgetError
from graphpass.manager import PassContext, PassResult, parse_spec
from graphpass.model import load_model, serialized_bytes
from graphpass.passes import auto
from graphpass.verify import Budget, synthesize_inputs, verify

FAST = "auto(methods=kmeans,bits=2|4|6,granularities=tensor|channel)"


def fixture(fixture_dir, name: str) -> onnx.ModelProto:
    return load_model(fixture_dir / f"{name}.onnx").proto


def auto_stats(result) -> dict:
    return next(p for p in result.report["passes"] if p["name"] == "auto")


@pytest.fixture(scope="module")
def two_runs(fixture_dir):
    """The same auto run twice: the budget is met, and the bytes are the same."""
    spec = f"tie,{FAST},fold"
    return [graphpass.run(fixture_dir / "transformer.onnx", spec, budget=Budget(min_cosine=0.999)) for _ in range(2)]


# -- the budget, end to end --------------------------------------------------------------------


def test_budget_is_met_on_the_verification_inputs(two_runs, fixture_dir):
    result = two_runs[0]
    assert result.passed and result.verify_result.outputs["logits"].cosine >= 0.999
    original = fixture(fixture_dir, "transformer")
    again = verify(serialized_bytes(original), serialized_bytes(result.model), synthesize_inputs(original),
                   Budget(min_cosine=0.999))
    assert again.passed
    stats = auto_stats(result)
    assert stats["tensors_changed"] >= 10
    assert result.report["output"]["file_bytes"] < 0.6 * result.report["input"]["file_bytes"]
    assert stats["details"]["measured"]["units"] <= auto.HEADROOM


def test_same_input_and_options_give_the_same_bytes(two_runs):
    first, second = (serialized_bytes(r.model) for r in two_runs)
    assert first == second


def test_report_says_what_each_tensor_got_and_why(two_runs):
    details = auto_stats(two_runs[0])["details"]
    tensors = details["tensors"]
    assert {t["name"] for t in tensors} >= {"blocks.0.attn.q_proj.weight", "blocks.3.mlp.fc2.weight"}
    for tensor in tensors:
        assert {"setting", "bytes_before", "bytes_after", "error_units", "why", "tried"} <= tensor.keys()
        if tensor["setting"] != auto.KEPT:
            parse_spec(tensor["setting"])  # every chosen setting is a pass spec one can run alone
            assert tensor["bytes_after"] < tensor["bytes_before"]
    assert details["predicted"]["units"] > 0 and "logits" in details["predicted"]["cosine"]
    assert details["measured"]["outputs"]["logits"]["cosine"] >= 0.999
    assert details["rounds"][-1]["file_bytes"] > 0
    assert details["tensors_compressed"] == auto_stats(two_runs[0])["tensors_changed"]


def test_codebooks_per_channel_are_bytes_and_from_6_bits_float16_too(fixture_dir):
    """From 6 bits a byte table's 256 levels crowd the entries: on the mlp fixture 6-bit
    per-channel k-means with byte tables had twice the largest error (grid.BYTE_TABLE_MAX_BITS)."""
    model = Model(fixture(fixture_dir, "mlp"))
    settings = grid.binning_grid(type(parse_spec("kmeans")[0]), {"granularities": "tensor|channel|group",
                                                                  "bits": "5|6", "group_size": 64}, model)
    stored = {(o["bits"], o["granularity"]): [] for o in settings}
    for options in settings:
        stored[options["bits"], options["granularity"]].append(options.get("codebook_dtype"))
    assert stored == {(5, "tensor"): [None], (6, "tensor"): [None], (5, "channel"): ["uint8"],
                      (6, "channel"): ["uint8", "float16"], (5, "group"): ["uint8"], (6, "group"): ["uint8", "float16"]}


def test_an_elementwise_budget_is_met(fixture_dir):
    inputs = synthesize_inputs(fixture(fixture_dir, "mlp"))
    reference = ort.InferenceSession(str(fixture_dir / "mlp.onnx")).run(None, inputs)[0]
    atol = 0.02 * float(np.abs(reference).max())
    result = graphpass.run(fixture_dir / "mlp.onnx", FAST, inputs=inputs, budget=Budget(atol=atol))
    assert result.passed and auto_stats(result)["tensors_changed"] == 3
    assert result.verify_result.outputs["logits"].max_abs_error <= atol


def test_the_budget_can_target_one_output(fixture_dir, tmp_path):
    """With two outputs and the budget on one, auto spends it on that one; the other output is
    still reported, with the structural checks only."""
    proto = fixture(fixture_dir, "mlp")
    hidden = next(n.output[0] for n in proto.graph.node if n.op_type == "MatMul")
    proto.graph.output.append(helper.make_tensor_value_info(hidden, TensorProto.FLOAT, None))
    path = tmp_path / "two_outputs.onnx"
    path.write_bytes(serialized_bytes(proto))
    result = graphpass.run(path, FAST, budget=Budget(min_cosine=0.999), budget_outputs=["logits"])
    assert result.passed and set(result.verify_result.outputs) == {"logits", hidden}
    assert auto_stats(result)["details"]["outputs"] == ["logits"]
    assert any("applies to output(s) logits" in note for note in result.report["notes"])


def _fed_inputs(name: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    if name == "cnn":
        return {"image": rng.standard_normal((8, 3, 32, 32)).astype(np.float32)}
    return {"input_ids": rng.integers(0, 512, (8, 12)).astype(np.int64)}


@pytest.mark.parametrize("name,readers", [("transformer", {"MatMul"}), ("cnn", {"Conv", "Gemm"})])
def test_feedback_settings_join_the_candidates_on_weights_with_input_second_moments(fixture_dir, name, readers,
                                                                                   monkeypatch):
    """With feedback=true each setting is also tried with error feedback on the weights whose
    inputs' second moment the fitting share gives: MatMul's and Gemm's, and Conv filters (of the
    unfolded inputs); the model meets the budget in onnxruntime. The codecs plan with auto's own
    second moments: none captures the whole model's activations again (on the 1.1 B decoder,
    two workers doing so at once went past 20 GB)."""
    captures = []
    monkeypatch.setattr(feedback.InputHessians, "compute", classmethod(lambda cls, ctx: captures.append(ctx)))
    result = graphpass.run(fixture_dir / f"{name}.onnx",
                           "auto(methods=kmeans,bits=3|5,granularities=channel,feedback=true,min_size=256)",
                           inputs=_fed_inputs(name), budget=Budget(min_cosine=0.999))
    assert result.passed
    tensors = auto_stats(result)["details"]["tensors"]
    model = Model(fixture(fixture_dir, name))
    fed = {w.name for w in model.weights() if any(node.op_type in readers and index == 1
                                                  for node, index in w.reader_nodes())}
    for tensor in tensors:
        fed_back = [t for t in tensor["tried"] if "feedback=True" in t["setting"]]
        assert bool(fed_back) == (tensor["name"] in fed), tensor["name"]
    assert any("feedback=True" in t["setting"] for t in tensors)  # it pays on some weight
    assert captures == []


def test_weights_in_subgraphs_are_measured_through_outer_scope_inputs(fixture_dir):
    result = graphpass.run(fixture_dir / "subgraphs.onnx", "auto(methods=kmeans,bits=4|8,granularities=tensor,"
                           "min_size=16)", budget=Budget(min_cosine=0.999))
    assert result.passed and auto_stats(result)["tensors_changed"] > 0


# -- failures ----------------------------------------------------------------------------------


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_an_impossible_budget_stops_with_exit_1_and_one_line(fixture_dir, tmp_path):
    out = tmp_path / "out.onnx"
    done = invoke("run", fixture_dir / "mlp.onnx", "-o", out, "--passes", FAST, "--min-cosine", "1.0")
    assert done.exit_code == 1, done.output
    message = done.output.strip().splitlines()[-1]
    assert message.startswith("graphpass: error: auto: no weight can be compressed within the budget")
    assert "min_cosine=1" in message and not out.exists()


def test_auto_without_a_budget_is_a_usage_error(fixture_dir, tmp_path):
    done = invoke("run", fixture_dir / "mlp.onnx", "-o", tmp_path / "o.onnx", "--passes", "auto")
    assert done.exit_code == 2 and "auto needs an error budget" in done.output


@pytest.mark.parametrize("args, fragment", [
    (["--passes", "auto(methods=gzip)", "--min-cosine", "0.99"], "not a weight codec"),
    (["--passes", "auto", "--min-cosine", "0.99", "--budget-output", "nope"], "unknown budget output(s) nope"),
])
def test_bad_auto_requests_are_usage_errors(fixture_dir, tmp_path, args, fragment):
    done = invoke("run", fixture_dir / "mlp.onnx", "-o", tmp_path / "o.onnx", *args)
    assert done.exit_code == 2 and fragment in done.output


# -- allocation --------------------------------------------------------------------------------


def points(*pairs) -> list[auto.Point]:
    kept = auto.Point(auto.KEPT, pairs[0][0], None)
    return [kept] + [auto.Point(f"s{i}", b, sensitivity.Measurement(e, {}, {}, {})) for i, (b, e) in
                     enumerate(pairs[1:])]


def test_weights_kept_for_one_reason_share_its_words():
    """The summary groups skipped weights by reason: a reason with each weight's share of the
    budget in it gave the 1.1 B decoder one line per weight. The figures are in `tensors`."""
    def kept_for(*pairs):
        study = auto.Study(SimpleNamespace(name="w"), points(*pairs))
        study.front = auto.pareto_front(study.points)
        return auto.why_kept(study)

    assert kept_for((1000, 0), (100, 0.31), (200, 0.2)) == kept_for((1000, 0), (120, 0.86), (300, 0.4))
    assert kept_for((1000, 0), (100, 3.1)) == kept_for((1000, 0), (100, 12.0), (500, 1.5))
    assert kept_for((1000, 0), (100, 0.31)) != kept_for((1000, 0), (100, 3.1))


def test_front_keeps_only_points_a_budget_could_choose():
    candidates = points((1000, 0), (100, 5.0), (200, 1.0), (250, 1.2), (300, 0.2), (400, 0.3), (500, 0.15))
    front = auto.pareto_front(candidates)
    assert [(p.bytes, p.units) for p in front] == [(100, 5.0), (200, 1.0), (300, 0.2), (500, 0.15), (1000, 0.0)]


def test_allocation_is_the_cheapest_choice_within_the_target():
    fronts = [auto.pareto_front(points((1000, 0), (100, 4.0), (200, 1.0), (400, 0.1))),
              auto.pareto_front(points((800, 0), (50, 2.0), (150, 0.5), (300, 0.45))),
              auto.pareto_front(points((600, 0), (300, 0.3)))]
    def fewest_bytes(target):  # brute force over every combination
        fitting = [c for c in itertools.product(*(range(len(f)) for f in fronts))
                   if auto.predicted_units(fronts, c) <= target]
        return min(sum(f[i].bytes for f, i in zip(fronts, c)) for c in fitting)

    # Errors round up to steps of target / ALLOCATION_STEPS: never over the target, and never
    # worse than the exact optimum of a target smaller by one step per weight.
    slack = 1 - len(fronts) / auto.ALLOCATION_STEPS
    for target in (0.05, 0.5, 0.6, 1.0, 1.7, 3.0, 10.0):
        chosen = auto.allocate(fronts, target)
        spent = sum(f[i].bytes for f, i in zip(fronts, chosen))
        assert auto.predicted_units(fronts, chosen) <= target
        assert fewest_bytes(target) <= spent <= fewest_bytes(target * slack)


def a_round(target, predicted, measured, passed) -> auto.Round:
    return auto.Round(target, [2], predicted, measured, passed, 1000)  # chose (500 bytes, 0.1)


def test_a_failed_build_tightens_the_target_below_its_prediction():
    fronts = [auto.pareto_front(points((1000, 0), (100, 2.0), (300, 0.9), (500, 0.1)))]
    proposal = auto.next_target(a_round(0.98, 0.9, 1.2, False), 0.98, 0.0, 0.98, fronts)
    assert proposal < 0.9 * auto.HEADROOM / 1.2 * 1.0001 and proposal < 0.9


def test_a_build_with_room_to_spare_loosens_the_target_within_the_bracket():
    fronts = [auto.pareto_front(points((1000, 0), (100, 2.0), (300, 0.9), (500, 0.1)))]
    # Measured 0.3 for a predicted 0.5: the edge of the budget is near a predicted 1.55.
    assert auto.next_target(a_round(0.98, 0.5, 0.3, True), 0.98, 0.98, math.inf, fronts) > 0.98
    bracketed = auto.next_target(a_round(0.98, 0.5, 0.3, True), 0.98, 0.98, 1.5, fronts)
    assert 0.98 < bracketed < 1.5
    assert auto.next_target(a_round(0.98, 0.9, 0.9, True), 0.98, 0.98, math.inf, fronts) is None  # near the edge
    # Measured twice the prediction: a cheaper choice than this one would not pass either.
    assert auto.next_target(a_round(0.98, 0.1, 0.2, True), 0.98, 0.98, math.inf, fronts) is None


def search_with(monkeypatch, measure) -> tuple[auto.Round, list[auto.Round]]:
    """auto's search over three weights, with builds faked: measured error = measure(predicted)."""
    fronts = [auto.pareto_front(points((1000, 0), (100, 1.5), (200, 0.6), (400, 0.1), (600, 0.02))),
              auto.pareto_front(points((800, 0), (50, 2.0), (150, 0.5), (300, 0.2), (500, 0.05))),
              auto.pareto_front(points((600, 0), (120, 0.8), (300, 0.3), (450, 0.04)))]
    studies = [auto.Study(SimpleNamespace(name=f"w{i}"), list(f), front=f) for i, f in enumerate(fronts)]

    def build_and_verify(builder, studies, chosen, target):
        predicted = auto.predicted_units(fronts, chosen)
        measured = measure(predicted)
        spent = sum(f[i].bytes for f, i in zip(fronts, chosen))
        return auto.Round(target, chosen, predicted, measured, measured <= auto.HEADROOM, spent, proto=object())

    searcher = auto.AutoPass()
    monkeypatch.setattr(searcher, "_try", build_and_verify)
    monkeypatch.setattr(searcher, "_fit_whole", lambda *args: True)
    monkeypatch.setattr(auto, "Builder", lambda *args: None)
    ctx = PassContext(Model(onnx.ModelProto()), budget=Budget(min_cosine=0.99))
    return searcher._search(ctx, studies, {}, [], SimpleNamespace(release_probes=lambda: None))


def test_a_chosen_prediction_is_measured_once_fitted_and_the_allocation_made_again(monkeypatch):
    """p1 was predicted at 0.01 and measures 5.0 whole: it falls off its front (p0 is cheaper
    and better), and the allocation moves to p2, planned whole, not to whatever now sits at p1's
    index."""
    fitted, measured = [], []

    def setting(name):
        def plan(ctx, weight, *figures):
            fitted.append(name)
            return Plan(weight, np.zeros(1), 10, lambda replacement: "")
        return SimpleNamespace(plan=plan, codec=None)

    def point(label, size, units, predicted=False):
        return auto.Point(label, size, sensitivity.Measurement(units, {}, {}, {}), None, setting=setting(label),
                          predicted=predicted)

    first = auto.Study(SimpleNamespace(name="a"), [auto.Point(auto.KEPT, 1000, None), point("p0", 80, 3.0),
                                                   point("p1", 100, 0.01, predicted=True), point("p2", 300, 0.2)])
    second = auto.Study(SimpleNamespace(name="b"), [auto.Point(auto.KEPT, 800, None), point("q1", 50, 0.3)])
    for study in (first, second):
        study.front = auto.pareto_front(study.points)
    calibration = SimpleNamespace(planning=None, fit_inputs=lambda setting, weight: (None, None, None),
                                  measure=lambda weight, values, learnt: measured.append(weight.name)
                                  or sensitivity.Measurement(5.0, {}, {}, {}))
    ctx = PassContext(Model(onnx.ModelProto()), budget=Budget(min_cosine=0.99))
    chosen = auto.AutoPass()._allocate_fitted(ctx, [first, second], 1.0, calibration)
    picks = [study.front[index] for study, index in zip((first, second), chosen)]
    assert [p.label for p in picks] == ["p2", "q1"] and all(p.plan is not None for p in picks)
    assert measured == ["a"] and sorted(fitted) == ["p1", "p2", "q1"]
    p1 = first.points[2]
    assert p1.units == 5.0 and not p1.predicted and p1.plan is None  # off the front: released


@pytest.mark.parametrize("ratio", [0.3, 0.8, 1.0, 1.6, 3.0])
def test_search_finds_a_passing_model_near_the_edge_without_building_twice(monkeypatch, ratio):
    best, rounds = search_with(monkeypatch, lambda predicted: ratio * predicted)
    assert best.passed and len(rounds) <= auto.MAX_ROUNDS
    assert len({tuple(r.chosen) for r in rounds}) == len(rounds)
    assert best.file_bytes == min(r.file_bytes for r in rounds if r.passed)
    # Only the model returned is still held: each holds the bytes of every weight it compressed.
    assert [r for r in rounds if r.passed and r.proto is not None] == [best]


def test_search_stops_with_a_budget_error_when_nothing_passes(monkeypatch):
    with pytest.raises(BudgetError, match="auto: no weight can be compressed within the budget"):
        search_with(monkeypatch, lambda predicted: math.inf if predicted > 0 else 0.0)


def test_error_units_add_up_as_the_budget_does():
    ref = np.linspace(-1, 1, 100, dtype=np.float32)
    noisy = ref + np.float32(0.01) * np.sin(np.arange(100, dtype=np.float32))
    gap = 1 - verify_cosine(ref, noisy)
    units, _ = sensitivity.error_units("y", ref, noisy, Budget(min_cosine=1 - 2 * gap))
    assert units == pytest.approx(0.5, rel=1e-6)
    units, _ = sensitivity.error_units("y", ref, noisy, Budget(atol=0.02))
    assert units == pytest.approx((np.abs(noisy - ref).max() / 0.02) ** 2, rel=1e-6)
    assert sensitivity.error_units("y", np.arange(3), np.array([0, 1, 3]), Budget(min_cosine=0.9))[0] == np.inf


def verify_cosine(a, b) -> float:
    return verify(_identity_model(a), _identity_model(b), {}, Budget()).outputs["y"].cosine


def _identity_model(values: np.ndarray) -> bytes:
    node = helper.make_node("Constant", [], ["y"], value=onnx.numpy_helper.from_array(values))
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, values.shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


# -- the probe ---------------------------------------------------------------------------------


def candidate_weights(model: Model) -> list:
    return auto.AutoPass(min_size=16)._candidates(PassContext(model), PassResult())


@pytest.mark.parametrize("name", ["transformer", "subgraphs"])
def test_probe_with_the_original_weights_is_the_model(fixture_dir, name):
    proto = fixture(fixture_dir, name)
    model = Model(proto)
    weights = candidate_weights(model)
    assert weights
    inputs = synthesize_inputs(proto)
    outputs = [o.name for o in proto.graph.output]
    probe = sensitivity.Probe(model, weights, inputs, outputs)
    expected = ort.InferenceSession(serialized_bytes(proto)).run(outputs, inputs)
    for name_, value in zip(outputs, expected):
        np.testing.assert_allclose(probe.run()[name_], value, rtol=1e-5, atol=1e-6)
    reference = probe.run()[outputs[0]]
    zeroed = [probe.run({w.name: np.zeros(w.shape, np.float32)})[outputs[0]] for w in weights]
    assert any(not np.array_equal(z, reference) for z in zeroed)  # some feed reaches the outputs
    np.testing.assert_array_equal(probe.run()[outputs[0]], reference)  # and feeds do not stick


def test_a_released_probe_lets_every_thread_session_go_and_runs_again(fixture_dir):
    """auto releases its probes while it builds: on the 1.1 B decoder their weights alone are
    the model's size. A measurement after a build reads them again, to the same figures."""
    proto = fixture(fixture_dir, "transformer")
    model = Model(proto)
    weights = candidate_weights(model)
    probe = sensitivity.Probe(model, weights, synthesize_inputs(proto), [o.name for o in proto.graph.output])
    before = probe.run({weights[0].name: np.zeros(weights[0].shape, np.float32)})
    with ThreadPoolExecutor(2) as pool:
        sessions = list(pool.map(lambda _: weakref.ref(probe._session()), range(8)))
        values = weakref.ref(probe.originals[weights[0].name])
        probe.release()
        gc.collect()
        assert all(s() is None for s in sessions) and values() is None and probe.released
    after = probe.run({weights[0].name: np.zeros(weights[0].shape, np.float32)})
    assert not probe.released and before.keys() == after.keys()
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value)


def test_probes_are_released_while_candidates_are_built(fixture_dir, monkeypatch):
    probes, states = [], []

    class RecordedProbe(sensitivity.Probe):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            probes.append(self)

    build = auto.Builder.build

    def recorded_build(builder, picks):
        states.append([p.released for p in probes])
        return build(builder, picks)

    monkeypatch.setattr(auto, "Probe", RecordedProbe)
    monkeypatch.setattr(auto.Builder, "build", recorded_build)
    # Feedback settings are measured on the held-out share too: a second probe.
    inputs = {"input_ids": np.random.default_rng(5).integers(0, 64, (8, 12)).astype(np.int64)}
    result = graphpass.run(fixture_dir / "transformer_untied.onnx", "auto(methods=codebook,bits=3|4,feedback=true)",
                           inputs=inputs, budget=Budget(min_cosine=0.999))
    assert result.passed and auto_stats(result)["tensors_changed"] > 0
    assert len(probes) == 2  # the fitting and the held-out shares
    assert states and all(all(state) for state in states)
    assert all(p.released for p in probes)


def test_embedding_rows_measure_exactly_what_the_whole_table_gets(fixture_dir):
    proto = fixture(fixture_dir, "transformer_untied")
    model = Model(proto)
    weights = candidate_weights(model)
    rows = activations.gathered_rows(model, weights, synthesize_inputs(proto))
    table = next(w for w in weights if w.name == "embed_tokens.weight")
    assert set(rows) == {table.name} and 0 < len(rows[table.name]) < table.shape[0]
    (setting,) = [s for s in grid.candidate_settings(
        {"methods": "kmeans", "bits": "3", "granularities": "channel", "group_size": 128, "min_size": 16,
         "include": "", "exclude": ""}, model)]
    assert setting.row_local(table)
    subset, subset_weight = activations.row_subset(model, table, rows[table.name])
    on_rows = setting.plan(PassContext(subset), subset_weight, None)
    whole = setting.plan(PassContext(model), table, None)
    np.testing.assert_array_equal(on_rows.reconstruction, whole.reconstruction[rows[table.name]])


def test_activation_energy_weights_each_input_channel(fixture_dir):
    proto = fixture(fixture_dir, "mlp")
    model = Model(proto)
    weights = candidate_weights(model)
    energy = activations.input_channel_energy(model, weights, synthesize_inputs(proto))
    matmul_weights = [w for w in weights if w.consumer_ops == {"MatMul"}]
    assert set(energy) == {w.name for w in matmul_weights} and matmul_weights
    for weight in matmul_weights:
        assert energy[weight.name].shape == (weight.shape[0], 1) and (energy[weight.name] >= 0).all()


# -- the codec contract: a plan's reconstruction and bytes are what the model gets -------------


def at_opset_21(proto: onnx.ModelProto) -> onnx.ModelProto:
    converted = version_converter.convert_version(proto, 21)
    converted.ir_version = 10
    return converted


@pytest.mark.parametrize("opset", [17, 21])
@pytest.mark.parametrize("spec", [
    "kmeans(bits=3)", "kmeans(bits=2,granularity=channel,outliers=1.0,codebook_dtype=float16)",
    "kmeans(bits=5,granularity=channel,codebook_dtype=uint8)",
    "kmeans(bits=4,granularity=group,group_size=64,codebook_dtype=uint8)",
    "uniform(bits=4,granularity=group,group_size=32,lower=dequantize)", "uniform(bits=8,lower=dequantize)",
    "codebook(dim=4,k=16)",
])
def test_plan_reconstruction_and_bytes_are_what_onnxruntime_gets(fixture_dir, spec, opset):
    proto = fixture(fixture_dir, "mlp")
    proto = at_opset_21(proto) if opset == 21 else proto
    model = Model(proto)
    ctx = PassContext(model)
    (codec,) = parse_spec(spec)
    plans = []
    for weight in [w for w in model.weights() if w.size >= 1024]:
        before = model.weight_bytes()
        plan = codec.plan(ctx, weight)
        assert not isinstance(plan, str), plan
        plan.apply()
        assert model.weight_bytes() == before - weight.nbytes + plan.stored_bytes
        plans.append(plan)
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        computed = weights_as_computed(model.proto, [p.weight.name for p in plans], level)
        for plan in plans:
            np.testing.assert_array_equal(computed[plan.weight.name], plan.reconstruction)


def weights_as_computed(proto: onnx.ModelProto, names: list[str], level) -> dict[str, np.ndarray]:
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    for name in names:
        probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(names, synthesize_inputs(probe))))


def test_hot_row_settings_are_tried_on_embedding_tables_only(fixture_dir):
    """Codebook settings come again with hot_rows; on a weight other than an embedding table
    that is the same setting and is measured once. The rungs between the grid's rates for
    tables are tried on the embedding table alone."""
    rng = np.random.default_rng(5)
    inputs = {"input_ids": rng.integers(0, 64, (8, 12)).astype(np.int64)}  # few tokens: most repeat
    result = graphpass.run(fixture_dir / "transformer_untied.onnx", "auto(methods=codebook,bits=3|4)",
                           inputs=inputs, budget=Budget(min_cosine=0.99))
    assert result.passed
    for tensor in auto_stats(result)["details"]["tensors"]:
        hot = [t for t in tensor["tried"] if "hot_rows" in t["setting"]]
        assert bool(hot) == (tensor["name"] == "embed_tokens.weight"), tensor["name"]
        rungs = [t for t in tensor["tried"] if "include=Gather" in t["setting"]]  # grid.TABLE_RUNGS, on tables only
        assert bool(rungs) == (tensor["name"] == "embed_tokens.weight"), tensor["name"]
