"""codebook: vector quantization with Gather lookups, shared codebooks and residual stages.

The lookups must rebuild exactly the centroids the k-means chose (checked in onnxruntime at both
optimisation levels against the plan's reconstruction and against the stored indices decoded
in numpy), in every place a weight can live, for every reader's sub-vector geometry, padded or
not, and a codebook shared by many tensors must be stored once.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphpass
from graphpass.lowering import lookup
from graphpass.edit import Model
from graphpass.errors import UsageError
from graphpass.manager import PassContext, parse_spec
from graphpass.model import load_model, serialized_bytes
from graphpass.passes.codebook import CodebookPass, KMeansSettings, kmeans_vectors, nearest, vector_layout
from graphpass.verify import Budget, synthesize_inputs, verify
from graphpass.weights import Replacement
from test_weights import overridable_model

ANY = Budget()  # structural checks only; exactness is asserted on the weights themselves
EXACT = Budget(atol=1e-6, rtol=0.0)


def fixture(fixture_dir, name: str) -> onnx.ModelProto:
    return load_model(fixture_dir / f"{name}.onnx").proto


def shapes_model() -> onnx.ModelProto:
    """One weight per reader geometry; with dim=4, W_in, W_conv and E need padding.

    W_in  [30, 20]    MatMul B      vectors along axis 0 (30: padded), 20 columns each
    W_t   [12, 20]    Gemm transB   vectors along axis 1 (20)
    W_b   [2, 8, 6]   batched MatMul  along axis 1 (8), 6 columns, 2 batches
    W_conv [8, 3, 3, 3] Conv        along in*kh*kw (27: padded)
    E     [100, 10]   Gather        along axis 1 (10: padded)
    """
    rng = np.random.default_rng(5)

    def weight(*shape):
        return numpy_helper.from_array((rng.standard_t(4, shape) * 0.1).astype(np.float32), name=None)

    tensors = {"W_in": weight(30, 20), "W_t": weight(12, 20), "W_b": weight(2, 8, 6),
               "W_conv": weight(8, 3, 3, 3), "E": weight(100, 10)}
    for name, tensor in tensors.items():
        tensor.name = name
    nodes = [
        helper.make_node("MatMul", ["x", "W_in"], ["h"]),
        helper.make_node("Gemm", ["h", "W_t"], ["y"], transB=1),
        helper.make_node("MatMul", ["xb", "W_b"], ["yb"]),
        helper.make_node("Conv", ["img", "W_conv"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Gather", ["E", "ids"], ["e"], axis=0),
    ]
    graph = helper.make_graph(
        nodes, "shapes",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 30]),
         helper.make_tensor_value_info("xb", TensorProto.FLOAT, [2, 3, 8]),
         helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 3, 6, 6]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 12]),
         helper.make_tensor_value_info("yb", TensorProto.FLOAT, [2, 3, 6]),
         helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 8, 6, 6]),
         helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 5, 10])],
        list(tensors.values()),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def planned(proto: onnx.ModelProto, **options):
    """Each weight's plan applied, as `plan()` makes them (share=none), to a copy of `proto`:
    (model, {name: plan})."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    ctx = PassContext(Model(copy))
    codec = CodebookPass(**options)
    plans = {}
    for weight in list(ctx.model.weights()):
        plan = codec.plan(ctx, weight)
        if not isinstance(plan, str):
            plans[weight.name] = plan
    for plan in plans.values():
        plan.apply()
    return ctx.model.proto, plans


def weights_in_ort(proto: onnx.ModelProto, names, dtype=TensorProto.FLOAT) -> list[dict[str, np.ndarray]]:
    """The named top-level weights as onnxruntime computes them, at both optimisation levels.
    An embedding whose rows are decoded after each Gather has no whole value to probe: it is
    left out (test_embedding_rows_decode_after_the_gather compares it with the whole rebuild)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    produced = {o for n in proto.graph.node for o in n.output} | {t.name for t in proto.graph.initializer}
    names = [name for name in names if name in produced]
    for name in names:
        probe.graph.output.append(helper.make_tensor_value_info(name, dtype, None))
    feeds = synthesize_inputs(probe)
    levels = []
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        levels.append(dict(zip(names, session.run(list(names), feeds))))
    return levels


def initializer(proto: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == name))


def pass_stats(result) -> dict:
    (stats,) = result.report["passes"]
    return stats


# -- geometry ---------------------------------------------------------------------------------


def test_sub_vectors_run_along_each_readers_input_axis():
    model = Model(shapes_model())
    layouts = {w.name: vector_layout(w, 4) for w in model.weights()}
    expected = {  # (axes, outer, length, inner, padding)
        "W_in": ("axis 0", 1, 30, 20, 2),
        "W_t": ("axis 1", 12, 20, 1, 0),
        "W_b": ("axis 1", 2, 8, 6, 0),
        "W_conv": ("axes 1-3", 8, 27, 1, 1),
        "E": ("axis 1", 100, 10, 1, 2),
    }
    for name, (axes, outer, length, inner, padding) in expected.items():
        layout = layouts[name]
        assert (layout.axes, layout.outer, layout.length, layout.inner, layout.padding) == \
            (axes, outer, length, inner, padding), name
    w_in = next(w for w in model.weights() if w.name == "W_in").read()
    vectors = layouts["W_in"].split(w_in).reshape(1, 8, 20, 4)
    assert np.array_equal(vectors[0, 1, 7], w_in[4:8, 7])  # 4 consecutive inputs of output 7
    assert np.array_equal(vectors[0, 7, 3], [w_in[28, 3], w_in[29, 3], 0, 0])  # zero-padded
    for weight in model.weights():
        assert np.array_equal(layouts[weight.name].merge(layouts[weight.name].split(weight.read())), weight.read())


# -- the k-means engine ---------------------------------------------------------------------------


def test_engine_is_exact_when_k_covers_every_vector_and_deterministic_otherwise():
    vectors = np.random.default_rng(0).standard_normal((3000, 4)).astype(np.float32)
    few = vectors[:40]
    centroids, labels = kmeans_vectors(few, None, KMeansSettings(64, 10, "auto", 0, 0))
    assert np.array_equal(centroids[labels], few)
    for init in ("kmeans++", "random"):
        settings = KMeansSettings(32, 10, init, 1000, 3)
        first, second = (kmeans_vectors(vectors, None, settings) for _ in range(2))
        assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
        assert len(first[0]) == 32 and first[1].max() == 31


@pytest.mark.parametrize("dim", [2, 4])
def test_a_causal_mask_near_float32s_limit_comes_back_exact(dim):
    """A float mask of 0 and float32's lowest (as exporters write causal masks) would overflow
    the k-means distances; fitted at a power-of-two scale, its few sub-vectors are kept exactly."""
    mask = np.triu(np.full((64, 64), np.finfo(np.float32).min, np.float32), 1)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "mask"], ["masked"]), helper.make_node("Softmax", ["masked"], ["y"], axis=-1)],
        "masked_softmax", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64])], [numpy_helper.from_array(mask, "mask")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    result = graphpass.run(model, f"codebook(dim={dim},k=16)", budget=Budget(atol=0.0, rtol=0.0))
    assert pass_stats(result)["tensors_changed"] == 1
    assert result.passed, result.verify_result.failures


def test_large_codebooks_are_assigned_by_a_kd_tree_with_the_same_answer():
    rng = np.random.default_rng(1)
    points, centroids = rng.standard_normal((2000, 2)), rng.standard_normal((5000, 2))  # k > 4096
    labels, distances = nearest(points, centroids)
    brute = ((points[:, None, :] - centroids[None]) ** 2).sum(-1)
    assert np.array_equal(labels, brute.argmin(1))
    assert np.allclose(distances, brute.min(1))


# -- exactness ----------------------------------------------------------------------------------


def test_lookup_reproduces_exactly_the_centroid_chosen_for_every_sub_vector():
    original = shapes_model()
    # k=16: indices packed as base-16 digits; k=200: native uint8.
    for dim, k, expected in ((4, 16, {"W_in", "W_t", "W_b", "W_conv", "E"}), (2, 200, {"W_in", "E"})):
        proto, plans = planned(original, dim=dim, k=k, min_size=16)
        assert set(plans) == expected
        in_ort = weights_in_ort(proto, list(plans))
        codec = CodebookPass(dim=dim, k=k, min_size=16)
        for weight in Model(original).weights():
            if weight.name not in plans:
                continue
            (stage,) = codec.fit([codec.prepare(weight)])  # the engine's own choice
            layout = vector_layout(weight, dim)
            table = initializer(proto, f"{weight.name}.lut_codebook")
            packing = lookup.choose_packing(len(table), 17, 8)
            assert packing.native == (k == 200)
            stored = initializer(proto, f"{weight.name}.lut_indices")
            labels = lookup.unpack_indices(stored, packing, layout.index_shape).ravel()
            assert np.array_equal(labels, stage.labels), weight.name
            assert np.array_equal(table, stage.entries)
            chosen = layout.merge(table[labels])
            assert np.array_equal(chosen, plans[weight.name].reconstruction)
            for rebuilt in in_ort:
                if weight.name == "E" and k == 200:  # byte indices: rows decoded after the Gather
                    assert weight.name not in rebuilt
                    continue
                assert np.array_equal(rebuilt[weight.name], chosen), weight.name


@pytest.mark.parametrize("options", [
    {"dim": 2, "k": 16, "stages": 2, "scale": "channel", "codebook_dtype": "float16"},
    {"dim": 8, "k": 8, "scale": "tensor"},
    {"dim": 4, "k": 16, "scale": "channel"},
], ids=["stages2-channel-fp16", "dim8-tensor", "dim4-channel"])
def test_plan_reconstruction_is_what_onnxruntime_computes(options):
    proto, plans = planned(shapes_model(), min_size=16, **options)
    assert len(plans) >= 3
    if options.get("scale") == "channel":  # the output channel: MatMul's columns, Gemm's and Conv's rows
        expected = {"W_in": "channel axis 1", "W_t": "channel axis 0", "W_conv": "channel axis 0",
                    "E": "channel axis 0"}
        for name in expected.keys() & plans.keys():
            assert plans[name].details["scale"] == expected[name], name
    for rebuilt in weights_in_ort(proto, list(plans)):
        for name, plan in plans.items():
            assert rebuilt[name].dtype == plan.reconstruction.dtype
            assert np.array_equal(rebuilt[name], plan.reconstruction), name


def test_float16_model_rebuilds_exactly_in_float16(fixture_dir):
    proto, plans = planned(fixture(fixture_dir, "mlp_fp16"), dim=4, k=64, stages=2, scale="channel")
    assert len(plans) == 3
    for rebuilt in weights_in_ort(proto, list(plans), TensorProto.FLOAT16):
        for name, plan in plans.items():
            assert plan.reconstruction.dtype == np.float16
            assert np.array_equal(rebuilt[name], plan.reconstruction), name


def test_plan_counts_exactly_the_bytes_it_stores():
    original = shapes_model()
    proto, plans = planned(original, dim=2, k=16, stages=2, scale="channel", min_size=16)
    before = {t.name for t in original.graph.initializer}
    added = sum(lookup.tensor_stored_bytes(t) for t in proto.graph.initializer if t.name not in before)
    assert added == sum(p.stored_bytes for p in plans.values())


# -- shared codebooks ---------------------------------------------------------------------------


def _codebook_tables(proto: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in proto.graph.initializer if ".lut_codebook" in t.name]


@pytest.mark.parametrize("stages", [1, 2])
def test_share_all_stores_each_codebook_once(fixture_dir, stages):
    original = fixture(fixture_dir, "transformer")
    spec = f"codebook(dim=4,k=64,stages={stages},share=all)"
    shared = graphpass.run(original, spec, budget=ANY)
    alone = graphpass.run(original, f"codebook(dim=4,k=64,stages={stages})", budget=ANY)
    changed = pass_stats(shared)["tensors_changed"]
    assert shared.passed and changed == pass_stats(alone)["tensors_changed"] >= 20

    tables = _codebook_tables(shared.model)
    assert len(tables) == stages
    readers = [n for n in shared.model.graph.node if n.op_type == "Gather" and n.input[0] in {t.name for t in tables}]
    assert len(readers) == changed * stages  # every member reads the one table
    details = pass_stats(shared)["details"]
    table_bytes = sum(lookup.tensor_stored_bytes(t) for t in tables)
    assert details["bytes_after"] == sum(t["bytes_after"] for t in details["tensors"]) + table_bytes
    assert details["codebooks_stored"] == stages
    assert len(_codebook_tables(alone.model)) == changed * stages
    assert shared.report["output"]["file_bytes"] < alone.report["output"]["file_bytes"]


def test_share_shape_stores_one_codebook_per_shape(fixture_dir):
    result = graphpass.run(fixture(fixture_dir, "transformer"), "codebook(dim=4,k=64,share=shape)", budget=ANY)
    details = pass_stats(result)["details"]
    shapes = [tuple(t["shape"]) for t in details["tensors"]]
    repeated = {s for s in shapes if shapes.count(s) > 1}
    assert len(details["shared_codebooks"]) == len(repeated) >= 3
    singles = len(shapes) - sum(shapes.count(s) for s in repeated)
    assert len(_codebook_tables(result.model)) == len(repeated) + singles
    assert details["codebooks_stored"] == len(repeated) + singles


# -- where weights live -------------------------------------------------------------------------


def _reference_with_planned_values(original: onnx.ModelProto, names: list[str], options: dict) -> bytes:
    """The original model with each named weight replaced by its planned reconstruction as a
    plain tensor: what the candidate must compute, branch for branch."""
    copy = onnx.ModelProto()
    copy.CopyFrom(original)
    ctx = PassContext(Model(copy))
    codec = CodebookPass(**options)
    chosen = [w for w in ctx.model.weights() if w.name in names]
    groups = [chosen] if options.get("share") == "all" else [[w] for w in chosen]
    for group in groups:
        plans, _ = codec.plan_group(ctx, group)
        for plan in plans:
            r = Replacement(plan.weight)
            plan.weight.replace_with(r, r.stored("exact", plan.reconstruction))
    ctx.model.remove_unused_weights()  # the shared table nothing reads here
    return serialized_bytes(ctx.model.proto)


@pytest.mark.parametrize("share", ["none", "all"])
def test_constant_nodes_and_if_branches_rebuild_exactly_on_every_path(fixture_dir, tmp_path, share):
    original = fixture(fixture_dir, "subgraphs")
    options = {"dim": 2, "k": 16, "min_size": 16, "share": share}
    result = graphpass.run(original, f"codebook({','.join(f'{k}={v}' for k, v in options.items())})",
                           output=tmp_path / "out.onnx", budget=ANY)
    details = pass_stats(result)["details"]
    names = [t["name"] for t in details["tensors"]]
    assert "/fc_in/Constant_output_0" in names and "/then/Constant_output_0" in names  # Constant nodes
    assert "nested_fc.weight" in names and "then_fc_mix.weight" in names  # branch initializers
    if share == "all":
        assert len(details["shared_codebooks"]) == 1 and details["shared_codebooks"][0]["scope"] == "main"
    reference = _reference_with_planned_values(original, names, options)
    for offset in (-1.0, 0.1, 1.0):  # sums < 0, in 0..10 and > 10 pick each path through the Ifs
        x = np.full((2, 32), offset, np.float32)
        checked = verify(reference, tmp_path / "out.onnx", {"x": x}, EXACT)
        assert checked.passed, checked.to_dict()


def test_function_weights_get_their_own_codebook():
    from test_weights import function_model

    result = graphpass.run(function_model(), "codebook(dim=2,k=4,min_size=16)", budget=ANY)
    assert result.passed and pass_stats(result)["tensors_changed"] == 1


# -- runs ---------------------------------------------------------------------------------------


def test_verified_in_onnxruntime_at_both_levels(fixture_dir):
    result = graphpass.run(fixture_dir / "mlp.onnx", "codebook(dim=2,k=256,scale=channel)", budget=ANY)
    assert result.passed
    for output in result.verify_result.outputs.values():
        assert set(output.per_level) == {"default", "disable_all"}
        assert output.cosine > 0.99


def test_running_twice_leaves_the_tables_alone(fixture_dir):
    first = graphpass.run(fixture(fixture_dir, "transformer"), "codebook(dim=4,k=64,share=all,scale=channel)",
                          verify=False)
    second = graphpass.run(first.model, "codebook(dim=4,k=64,share=all,scale=channel)", verify=False)
    stats = pass_stats(second)
    assert stats["tensors_changed"] == 0
    assert serialized_bytes(second.model) == serialized_bytes(first.model)
    reasons = {s["weight"]: s["reason"] for s in stats["skipped"]}
    assert "lookup table" in reasons["codebook.shared.lut_codebook"]


@pytest.mark.parametrize("spec", ["codebook(dim=4,k=64)", "codebook(dim=2,k=32,share=all,stages=2,scale=channel)"])
def test_same_input_same_bytes(fixture_dir, spec):
    runs = [serialized_bytes(graphpass.run(fixture_dir / "transformer.onnx", spec, verify=False).model)
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_rates_are_reported_per_tensor_and_overall(fixture_dir):
    result = graphpass.run(fixture(fixture_dir, "transformer"), "codebook(dim=4,k=256,stages=2)", verify=False)
    details = pass_stats(result)["details"]
    assert details["nominal_bits_per_weight"] == 4.0
    weights = sum(t["weights"] for t in details["tensors"])
    assert details["bits_per_weight"] == round(8 * details["bytes_after"] / weights, 3)
    for tensor in details["tensors"]:
        assert tensor["index_bits_per_weight"] == pytest.approx(4.0, abs=0.02)  # two uint8 indices per 4 weights
        assert tensor["bits_per_weight"] == round(8 * tensor["bytes_after"] / tensor["weights"], 3)
        assert tensor["sqnr_db_stage1"] < tensor["sqnr_db"]  # the residual stage lowers the error
    assert details["index_bits_per_weight"] + details["codebook_bits_per_weight"] <= details["bits_per_weight"]


def test_skipped_weights_say_why(fixture_dir):
    result = graphpass.run(overridable_model(), "codebook(dim=2,k=16,min_size=1)", budget=ANY)
    reasons = {s["weight"]: s["reason"] for s in pass_stats(result)["skipped"]}
    assert "graph input" in reasons["W"]
    assert "not be smaller" in reasons["W2"]
    transformer = fixture(fixture_dir, "transformer")
    shape = next(w for w in Model(transformer).weights() if w.dtype == TensorProto.INT64)
    skipped = pass_stats(graphpass.run(transformer, "codebook", verify=False))["skipped"]
    assert "not a float tensor" in {s["weight"]: s["reason"] for s in skipped}[shape.name]


def test_options_are_checked():
    for bad in ("codebook(dim=1)", "codebook(k=70000)", "codebook(share=layer)", "codebook(stages=3)"):
        with pytest.raises(UsageError):
            parse_spec(bad)


@pytest.mark.parametrize("scale", ["none", "channel"])
@pytest.mark.parametrize("k,columns", [(256, 64), (64, 60), (1024, 60)])  # a byte per index; base-k digits
def test_embedding_rows_decode_after_the_gather(scale, k, columns):
    """An embedding table read only by row Gathers keeps its packed rows (a byte per index, or
    base-k digits in whole words per row); each reader decodes the rows it picks (scaled per
    row), exactly as the whole-table rebuild would."""
    from test_lookup import embedding_model

    rng = np.random.default_rng(5)
    ids_shapes = [(2, 9), ()]
    source = embedding_model(rng.normal(size=(600, columns)).astype(np.float32), ids_shapes)
    spec = f"codebook(dim=2,k={k},scale={scale})"
    gathered = graphpass.run(source, spec, verify=False).model
    # The same codebook, also read by a MatMul: the table is rebuilt whole and serves both.
    dense_source = embedding_model(numpy_helper.to_array(source.graph.initializer[0]), ids_shapes, also_matmul=True)
    dense = graphpass.run(dense_source, spec, verify=False).model
    assert [n.op_type for n in gathered.graph.node if n.input and n.input[0].endswith("lut_indices")] == ["Gather"] * 2
    assert not any(n.input and n.input[0].endswith("lut_indices") and n.op_type == "Gather" for n in dense.graph.node)

    feeds = {f"ids{i}": rng.integers(0, 600, size=s).astype(np.int64) for i, s in enumerate(ids_shapes)}
    dense_rows = ort_session(dense).run([f"rows{i}" for i in range(len(ids_shapes))],
                                        {**feeds, "x": np.zeros((2, columns), np.float32)})
    for got, want in zip(ort_session(gathered).run(None, feeds), dense_rows):
        np.testing.assert_array_equal(got, want)


def ort_session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


# -- hot rows -----------------------------------------------------------------------------------


HOT, ONCE = [3, 17, 599], [40, 41]  # read twice and once by the calibration ids below


def hot_rows_calibration() -> dict[str, np.ndarray]:
    return {"ids0": np.array([[3, 17, 599, 40, 5, 6, 7, 8, 9], [3, 17, 599, 41, 10, 11, 12, 13, 14]], dtype=np.int64)}


@pytest.mark.parametrize("scale", [1.0, 1e6])
@pytest.mark.parametrize("stages,ops", [(1, {"Equal", "MatMul"}), (2, {"ScatterND"})])
def test_hot_rows_come_back_exact_after_either_lowering(stages, ops, scale):
    """Rows the calibration inputs read at least hot_rows times come back to their exact values
    (up to their float16 difference, or float32 where float16 cannot hold it), whether each
    Gather decodes its own rows (a one-hot MatMul picks the differences) or the table is rebuilt
    whole (two stages: ScatterND); every other row, those read once included, is the plain
    codebook's bit for bit, at both levels."""
    from test_lookup import embedding_model

    rng = np.random.default_rng(7)
    table = (rng.normal(size=(600, 64)) * scale).astype(np.float32)
    source = embedding_model(table, [(2, 9)])
    plain = graphpass.run(source, f"codebook(dim=2,k=16,stages={stages})", inputs=hot_rows_calibration(), verify=False)
    hot = graphpass.run(source, f"codebook(dim=2,k=16,stages={stages},hot_rows=2)", inputs=hot_rows_calibration(),
                        verify=False)
    (tensor,) = pass_stats(hot)["details"]["tensors"]
    assert tensor["corrected_rows"] == len(HOT)
    assert {n.op_type for n in hot.model.graph.node} >= ops

    ids = np.array([[3, 17, 599, 40, 41, 0, 100, 598, -1]] * 2, dtype=np.int64)  # -1 is row 599
    feeds = {"ids0": ids}
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        got, want = (ort.InferenceSession(run.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
                     .run(["rows0"], feeds)[0] for run in (hot, plain))
        corrected = np.isin(ids % 600, HOT)
        np.testing.assert_array_equal(got[~corrected], want[~corrected])
        np.testing.assert_allclose(got[corrected], table[ids[corrected]], atol=1e-3 * scale)
        assert np.abs(want[corrected] - table[ids[corrected]]).max() > 1e-2 * scale  # the codebook alone is far


def test_hot_rows_cost_their_differences_and_apply_to_embedding_tables_only():
    """A corrected row costs its float16 difference (and its id); a MatMul weight is the same
    setting with or without hot_rows, so auto measures it once."""
    from test_lookup import embedding_model

    table = np.random.default_rng(7).normal(size=(600, 64)).astype(np.float32)
    source = embedding_model(table, [(2, 9)])
    calibration = hot_rows_calibration()
    plain, hot = (pass_stats(graphpass.run(source, spec, inputs=calibration, verify=False))["details"]["tensors"][0]
                  for spec in ("codebook(dim=2,k=256)", "codebook(dim=2,k=256,hot_rows=2)"))
    assert hot["bytes_after"] - plain["bytes_after"] >= len(HOT) * (64 * 2 + 8)
    assert hot["index_bytes"] == plain["index_bytes"]

    model = Model(shapes_model())
    weights = {w.name: w for w in model.weights()}
    with_hot, without = CodebookPass(hot_rows=2), CodebookPass()
    assert with_hot.effect_key(weights["W_in"]) == without.effect_key(weights["W_in"])
    assert with_hot.effect_key(weights["E"]) != without.effect_key(weights["E"])


def test_hot_rows_without_calibration_inputs_change_nothing():
    """Without calibration inputs nothing counts as hot: the same bytes as without the option."""
    from test_lookup import embedding_model

    source = embedding_model(np.random.default_rng(7).normal(size=(600, 64)).astype(np.float32), [(2, 9)])
    plain, hot = (serialized_bytes(graphpass.run(source, spec, verify=False).model)
                  for spec in ("codebook(dim=2,k=256)", "codebook(dim=2,k=256,hot_rows=2)"))
    assert plain == hot
