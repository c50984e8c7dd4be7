"""The binning passes (kmeans, uniform, adaptive, gmm, ternary, binary) end to end.

Every `graphpass.run` here verifies the result in onnxruntime at both optimisation levels;
the tests add what verification cannot see: which packing each opset gets, that rebuilt
weights are exactly codebook values, what is skipped and why, and that sizes add up.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphpass
from graphpass import binning
from graphpass.lowering import lookup
from graphpass.edit import Model
from graphpass.model import load_model
from graphpass.codec import layout_for, output_channel_axis
from graphpass.verify import Budget, verify

ANY = Budget()  # structural checks only; the figures are asserted where they matter
# Each method with its own options; the tests add the shared ones.
METHODS = {"kmeans": {"bits": 4}, "uniform": {"bits": 4}, "adaptive": {"bits": 3}, "gmm": {"components": 8},
           "ternary": {}, "binary": {}}


def with_opset(proto: onnx.ModelProto, opset: int, ir_version: int) -> onnx.ModelProto:
    """The same model declared at another opset (the fixtures' ops mean the same at 10..25)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    copy.opset_import[0].version = opset
    copy.ir_version = ir_version
    return copy


def fixture(fixture_dir, name: str) -> onnx.ModelProto:
    return load_model(fixture_dir / f"{name}.onnx").proto


def spec(method: str, **options) -> str:
    """`method(name=value,...)`: the method's own options, overridden by `options`."""
    merged = {**METHODS[method], **options}
    return f"{method}({','.join(f'{k}={v}' for k, v in merged.items())})"


def pass_stats(result) -> dict:
    (stats,) = result.report["passes"]
    return stats


def rebuilt_top_level_weights(proto: onnx.ModelProto, names: list[str]) -> list[dict[str, np.ndarray]]:
    """Each named float32 weight as onnxruntime computes it, at both optimisation levels."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    for name in names:
        probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    feeds = graphpass.verify.synthesize_inputs(probe)
    values = []
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        values.append(dict(zip(names, session.run(names, feeds))))
    return values


# -- every method x granularity ---------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_every_method_and_granularity_runs_and_verifies(fixture_dir, method, granularity):
    result = graphpass.run(fixture_dir / "mlp.onnx", spec(method, granularity=granularity, group_size=32), budget=ANY)
    stats = pass_stats(result)
    assert result.passed and stats["tensors_changed"] == 3
    details = stats["details"]
    assert set(details["granularities"]) == {granularity}
    assert details["bytes_after"] < details["bytes_before"]
    cosine = min(o.cosine for o in result.verify_result.outputs.values())
    assert cosine > (0.9 if method in ("kmeans", "gmm") else 0.3)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_rebuilt_weights_are_exactly_the_engines_codebook_values(fixture_dir, granularity):
    original = fixture(fixture_dir, "mlp")
    result = graphpass.run(original, spec("kmeans", bits=3, granularity=granularity, group_size=64), budget=ANY)
    names = [t["name"] for t in pass_stats(result)["details"]["tensors"]]
    levels = rebuilt_top_level_weights(result.model, names)
    for weight in Model(original).weights():
        if weight.name not in names:
            continue
        layout = layout_for(weight, granularity, 64)
        fitted = binning.kmeans(layout.split(weight.read()), 8)
        codebook, labels = lookup.compact(fitted.codebook, fitted.labels)
        table = lookup.stored_table(codebook, weight.dtype, weight.dtype)
        expected = layout.merge(np.take_along_axis(table, labels.astype(np.intp), axis=1)).reshape(weight.shape)
        for rebuilt in levels:
            assert np.array_equal(rebuilt[weight.name], expected), weight.name
            assert all(np.unique(row).size <= 8 for row in layout.split(rebuilt[weight.name]))


# -- packing by opset -------------------------------------------------------------------------


# Codebooks per channel pack their indices by opset (per-tensor ones on large weights store
# tuples instead: see the tuple tests below).
@pytest.mark.parametrize("pass_spec,opset,ir,packing", [
    ("kmeans(bits=4,granularity=channel)", 13, 8, "base16x2/uint8"),  # opset 13: nibbles unpacked with Div/Mod
    ("kmeans(bits=4,granularity=channel)", 21, 10, "uint4"),
    ("kmeans(bits=2,granularity=channel)", 21, 10, "base4x4/uint8"),
    ("kmeans(bits=2,granularity=channel)", 25, 11, "uint2"),
    # The large weight's 3-bit indices as bit planes (3 bits), the small ones' as digits (3.2 bits):
    # there planes would save less than their nodes cost.
    ("kmeans(bits=3,granularity=channel)", 17, 8, ("planes(base4x4/uint8+base2x8/uint8)", "base8x5/uint16")),
    ("kmeans(bits=8)", 13, 8, "uint8"),  # large ones as tuples/uint8: the same byte per index
    ("ternary(granularity=channel)", 21, 10, "base3x5/uint8"),
    ("binary(granularity=channel)", 25, 11, "base2x8/uint8"),
])
def test_packing_follows_the_opset_and_never_raises_it(fixture_dir, pass_spec, opset, ir, packing):
    model = with_opset(fixture(fixture_dir, "mlp"), opset, ir)
    result = graphpass.run(model, pass_spec, budget=ANY)
    assert result.passed
    packings = pass_stats(result)["details"]["packings"]
    assert sum(packings.values()) == 3
    assert set(packings) - {"tuples/uint8"} == ({packing} if isinstance(packing, str) else set(packing))
    assert result.model.opset_import[0].version == opset and result.model.ir_version == ir


def test_opset_13_model_unpacks_with_integer_arithmetic(fixture_dir):
    result = graphpass.run(fixture_dir / "mlp_opset13.onnx", "kmeans(bits=4,granularity=channel)", budget=ANY)
    assert result.passed and result.model.opset_import[0].version == 13
    ops = {n.op_type for n in result.model.graph.node}
    assert {"Div", "Mod", "GatherElements"} <= ops
    assert all(t.data_type in (TensorProto.UINT8, TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64)
               for t in result.model.graph.initializer)


def test_models_before_opset_11_are_left_alone(fixture_dir):
    result = graphpass.run(with_opset(fixture(fixture_dir, "mlp"), 10, 8), "kmeans", budget=ANY)
    stats = pass_stats(result)
    assert stats["tensors_changed"] == 0 and "GatherElements" in stats["notes"][0]


# -- dtypes and scopes -------------------------------------------------------------------------


def test_float16_model_keeps_float16(fixture_dir):
    result = graphpass.run(fixture_dir / "mlp_fp16.onnx", "kmeans(bits=4,granularity=channel)",
                           budget=Budget(min_cosine=0.99))
    assert result.passed, result.verify_result.failures
    tables = [t for t in result.model.graph.initializer if "lut_codebook" in t.name]
    assert len(tables) == 3 and all(t.data_type == TensorProto.FLOAT16 for t in tables)
    assert not any(n.op_type == "Cast" and "codebook" in n.name for n in result.model.graph.node)


def test_float16_codebooks_for_a_float32_model(fixture_dir):
    result = graphpass.run(fixture_dir / "mlp.onnx", "kmeans(bits=4,granularity=channel,codebook_dtype=float16)",
                           budget=Budget(min_cosine=0.99))
    assert result.passed
    tables = [t for t in result.model.graph.initializer if "lut_codebook" in t.name]
    assert all(t.data_type == TensorProto.FLOAT16 for t in tables)


@pytest.mark.parametrize("name", ["mlp", "mlp_fp16"])
def test_byte_codebooks_take_fewer_bytes_than_float16_ones(fixture_dir, name):
    """uint8: a byte per entry and a float16 scale and offset per codebook, decoded by Cast, Mul
    and Add, in the weight's type."""
    runs = {dtype: graphpass.run(fixture_dir / f"{name}.onnx",
                                 f"kmeans(bits=4,granularity=channel,codebook_dtype={dtype})",
                                 budget=Budget(min_cosine=0.99)) for dtype in ("float16", "uint8")}
    assert all(run.passed for run in runs.values()), runs["uint8"].verify_result.failures
    tables = [t for t in runs["uint8"].model.graph.initializer if t.name.endswith("lut_codebook")]
    assert len(tables) == 3 and all(t.data_type == TensorProto.UINT8 for t in tables)
    sizes = {dtype: run.report["output"]["file_bytes"] for dtype, run in runs.items()}
    assert sizes["uint8"] < sizes["float16"]


def test_constant_nodes_and_if_branches_are_compressed(fixture_dir, tmp_path):
    out = tmp_path / "subgraphs.onnx"
    result = graphpass.run(fixture_dir / "subgraphs.onnx", "kmeans(bits=4,min_size=64)", output=out, budget=ANY)
    changed = {t["name"] for t in pass_stats(result)["details"]["tensors"]}
    assert {"/fc_in/Constant_output_0", "/then/Constant_output_0", "nested_fc.weight", "then_fc_mix.weight",
            "else_fc.weight"} <= changed
    remaining = {w.name for w in Model(result.model).weights() if w.is_float and w.size >= 64}
    assert not remaining & changed
    for offset in (-1.0, 0.1, 1.0):  # sums that take each path through the nested Ifs
        x = np.full((2, 32), offset, np.float32)
        checked = verify(fixture_dir / "subgraphs.onnx", out, {"x": x}, Budget(min_cosine=0.95))
        assert checked.passed, checked.to_dict()


# -- what is left alone ------------------------------------------------------------------------


def test_running_twice_leaves_the_tables_alone(fixture_dir):
    once = graphpass.run(fixture_dir / "mlp.onnx", "kmeans(bits=4,granularity=channel,min_size=16)", budget=ANY)
    twice = graphpass.run(once.model, "kmeans(bits=4,min_size=16)", budget=ANY)
    stats = pass_stats(twice)
    assert stats["tensors_changed"] == 0
    assert twice.model.SerializeToString(deterministic=True) == once.model.SerializeToString(deterministic=True)
    lookups = [s for s in stats["skipped"] if "lookup table" in s["reason"]]
    assert any(".lut_codebook" in s["weight"] for s in lookups)
    assert any(".lut_indices" in s["weight"] for s in lookups)


def skip_model() -> onnx.ModelProto:
    """One weight for each reason a binning pass leaves a weight alone, and one it compresses."""
    rng = np.random.default_rng(0)
    inits = {
        "kept": rng.normal(size=(64, 64)).astype(np.float32),
        "small": rng.normal(size=(8, 8)).astype(np.float32),
        "overridden": rng.normal(size=(64, 64)).astype(np.float32),
        "int_table": rng.integers(0, 9, size=(64, 64)).astype(np.int64),
        "q": np.ones(2048, np.uint8),
        "dq_scale": np.full(2048, 0.5, np.float32),
        "resize_scales": np.linspace(0, 1, 1024, dtype=np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "kept"], ["a"]),
        helper.make_node("Add", ["a", "overridden"], ["b"]),
        helper.make_node("Cast", ["int_table"], ["int_f"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["b", "int_f"], ["c"]),
        helper.make_node("Sum", ["small"], ["s"]),
        helper.make_node("DequantizeLinear", ["q", "dq_scale"], ["dq"], axis=0),
        helper.make_node("Resize", ["x", "", "resize_scales"], ["resized"]),
    ]
    graph = helper.make_graph(
        nodes, "skips",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64]),
         helper.make_tensor_value_info("overridden", TensorProto.FLOAT, [64, 64])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("c", "s", "dq", "resized")],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def scaled_matmul(scale: float, dtype=np.float32) -> onnx.ModelProto:
    """y = (x @ (W * scale)) / scale: the same function whatever the weight's magnitude."""
    weight = (np.random.default_rng(0).standard_normal((64, 256)) * scale).astype(dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["scaled"]), helper.make_node("Mul", ["scaled", "unscale"], ["y"])],
        "scaled_matmul", [helper.make_tensor_value_info("x", elem, ["batch", 64])],
        [helper.make_tensor_value_info("y", elem, ["batch", 256])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(np.array(1 / scale, dtype), "unscale")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


# Codec settings that store a table, a scale or a grid in a type narrower than float32, or
# compute distances in float32.
SCALE_FREE_SPECS = [
    "kmeans(bits=4,codebook_dtype=float16)",
    "kmeans(bits=4,granularity=channel,codebook_dtype=float16)",
    "kmeans(bits=4,granularity=channel,codebook_dtype=uint8)",
    "uniform(bits=4,granularity=channel,lower=dequantize)",
    "uniform(bits=4,granularity=group,lower=kernel)",
    "ternary(granularity=channel)",
    "codebook(dim=2,k=64,codebook_dtype=float16,scale=channel)",
    "codebook(k=16,codebook_dtype=float16)",
    "codebook(stages=2,k=16)",
]


@pytest.mark.parametrize("pass_spec", SCALE_FREE_SPECS)
def test_a_weights_magnitude_does_not_change_what_its_codec_keeps(pass_spec):
    """y = (x @ (W * s)) / s is the same function at any s, and so is its error: past ±65504
    float16 and byte tables would decode to infinity, below 6e-5 float16 loses the weight
    (1e-8s flush to zeros), and float32 distances overflow near 1e30 and underflow near 1e-30.
    What holds such a magnitude (the codebook, or codebook's per-channel scale) stays float32."""
    runs = {s: graphpass.run(scaled_matmul(s), pass_spec, budget=Budget(min_cosine=0.5))
            for s in (1.0, 1e6, 1e-8, 1e30, 1e-30)}
    assert all(run.passed for run in runs.values()), {s: r.verify_result.failures for s, r in runs.items()}
    cosines = {s: run.report["verify"]["outputs"]["y"]["cosine"] for s, run in runs.items()}
    assert all(c == pytest.approx(cosines[1.0], abs=0.005) for c in cosines.values()), cosines
    stored = {t.name: (t.data_type, numpy_helper.to_array(t)) for t in runs[1e6].model.graph.initializer}
    large = {name for name, (_, values) in stored.items()
             if values.dtype.kind == "f" and values.size and np.abs(values).max() > 65504}
    assert large and all(stored[name][0] == TensorProto.FLOAT for name in large)


def test_float64_weights_beyond_float32_keep_their_error_or_are_left_alone():
    """A float64 weight float32 cannot hold: uniform's DequantizeLinear, whose scale is float32,
    gives way to a float64 lookup with the same error, and codebook, whose k-means computes
    in float32, leaves the weight as it is and says why."""
    spec = "uniform(bits=4,granularity=channel,lower=dequantize)"
    cosines = {s: graphpass.run(scaled_matmul(s, np.float64), spec, budget=Budget(min_cosine=0.9))
               .report["verify"]["outputs"]["y"]["cosine"] for s in (1.0, 1e-100, 1e100)}
    assert all(c == pytest.approx(cosines[1.0], abs=0.001) for c in cosines.values()), cosines
    for scale in (1e-100, 1e100):
        result = graphpass.run(scaled_matmul(scale, np.float64), "codebook", budget=Budget())
        reasons = {s["weight"]: s["reason"] for s in pass_stats(result)["skipped"]}
        assert "beyond float32's range" in reasons["W"]


def test_a_float16_row_spanning_float16s_range_is_not_stored_as_bytes():
    """Decoded in float32 and cast back, such a byte row can round past 65504 to infinity;
    the row's own type holds it."""
    row = np.array([[-65504.0, -1.0, 0.5, 65504.0]])
    with np.errstate(over="ignore"):
        assert np.isinf(lookup.stored_table(row, TensorProto.FLOAT16, lookup.BYTE_TABLE)).any()
    assert lookup.table_dtype(TensorProto.FLOAT16, lookup.BYTE_TABLE, row) == TensorProto.FLOAT16
    assert lookup.table_dtype(TensorProto.FLOAT16, lookup.BYTE_TABLE, row / 2) == lookup.BYTE_TABLE


def test_skipped_weights_are_reported_with_their_reason():
    stats = pass_stats(graphpass.run(skip_model(), "kmeans", verify=False))
    reasons = {s["weight"]: s["reason"] for s in stats["skipped"]}
    assert stats["tensors_changed"] == 1 and "kept" not in reasons
    assert "below min_size" in reasons["small"]
    assert "graph input" in reasons["overridden"]
    assert "not a float tensor (int64)" in reasons["int_table"]
    assert "not a float tensor (uint8)" in reasons["q"]
    assert "quantized op (DequantizeLinear)" in reasons["dq_scale"]
    assert "shape, size or index input" in reasons["resize_scales"]


def test_weights_with_nan_are_left_alone():
    model = skip_model()
    kept = next(t for t in model.graph.initializer if t.name == "kept")
    values = numpy_helper.to_array(kept).copy()
    values[3, 5] = np.nan
    kept.CopyFrom(numpy_helper.from_array(values, "kept"))
    reasons = {s["weight"]: s["reason"] for s in pass_stats(graphpass.run(model, "kmeans", verify=False))["skipped"]}
    assert reasons["kept"] == "holds NaN or infinite values"


def test_function_weights_use_the_functions_own_opset():
    from test_weights import function_model

    model = with_opset(function_model(), 21, 10)  # the function itself still imports opset 17
    result = graphpass.run(model, "kmeans(bits=4,min_size=16)", budget=Budget(min_cosine=0.99))
    assert result.passed
    assert pass_stats(result)["details"]["packings"] == {"base16x2/uint8": 1}
    assert any(n.op_type == "GatherElements" for n in result.model.functions[0].node)


def test_include_and_exclude_by_reader_op_and_name(fixture_dir):
    only_gather = graphpass.run(fixture_dir / "transformer.onnx", "kmeans(include=Gather)", verify=False)
    assert [t["name"] for t in pass_stats(only_gather)["details"]["tensors"]] == ["embed_tokens.weight"]
    no_mlp = graphpass.run(fixture_dir / "transformer.onnx", "kmeans(include=MatMul|embed_*,exclude=*.mlp.*|Gather)",
                           verify=False)
    names = [t["name"] for t in pass_stats(no_mlp)["details"]["tensors"]]
    assert "embed_positions.weight" in names and "embed_tokens.weight" not in names
    assert not any(".mlp." in n for n in names) and any("q_proj" in n for n in names)
    reasons = {s["weight"]: s["reason"] for s in pass_stats(no_mlp)["skipped"]}
    assert reasons["embed_tokens.weight"] == "excluded by exclude=*.mlp.*|Gather"


def test_output_channel_axis_follows_the_reader(fixture_dir):
    axes = {w.name: output_channel_axis(w) for w in Model(fixture(fixture_dir, "cnn")).weights() if len(w.shape) >= 2}
    assert axes["conv1.weight"] == 0 and axes["conv2.weight"] == 0  # Conv: [out, in, kh, kw]
    assert axes["fc.weight"] == 0  # Gemm transB=1: [out, in]
    mlp = {w.name: output_channel_axis(w) for w in Model(fixture(fixture_dir, "mlp")).weights()}
    assert mlp["layers.0.weight"] == 1  # MatMul: [in, out]
    lm = {w.name: output_channel_axis(w) for w in Model(fixture(fixture_dir, "transformer")).weights()}
    assert lm["embed_tokens.weight"] == 0  # Gather rows


def test_no_lookup_that_would_not_shrink_the_weight(fixture_dir):
    result = graphpass.run(fixture_dir / "cnn.onnx", "kmeans(granularity=group,group_size=16,min_size=64)",
                           verify=False)
    stats = pass_stats(result)
    assert stats["tensors_changed"] == 0
    conv_reasons = [s["reason"] for s in stats["skipped"] if s["weight"].startswith("conv") and "weight" in s["weight"]]
    assert len(conv_reasons) == 2 and all("would not be smaller" in r for r in conv_reasons)


# -- options and figures -----------------------------------------------------------------------


def test_outliers_are_kept_exactly_and_paid_for(fixture_dir):
    plain = pass_stats(graphpass.run(fixture_dir / "mlp.onnx", "kmeans(bits=2)", verify=False))["details"]
    result = graphpass.run(fixture_dir / "mlp.onnx", "kmeans(bits=2,outliers=1)", budget=ANY)
    kept = pass_stats(result)["details"]
    assert result.passed
    for before, after in zip(plain["tensors"], kept["tensors"]):
        assert after["outliers"] == round(after["weights"] / 100)
        assert after["outlier_bytes"] == after["outliers"] * (4 + (2 if after["weights"] <= 65536 else 4))
        assert after["sqnr_db"] > before["sqnr_db"]
    assert any(n.op_type == "ScatterND" for n in result.model.graph.node)


def test_uniform_lowers_to_dequantize_linear_at_opset_21(fixture_dir, tmp_path):
    model = with_opset(fixture(fixture_dir, "mlp"), 21, 10)
    result = graphpass.run(model, "uniform(bits=4,granularity=group,group_size=32,lower=dequantize)",
                           budget=Budget(min_cosine=0.98))
    assert result.passed, result.verify_result.failures  # fused into MatMulNBits at ORT_ENABLE_ALL
    details = pass_stats(result)["details"]
    assert details["packings"] == {"dequantize/uint4": 3}
    assert details["bits_per_weight"] < 4 + 2 * 32 / 32  # 4-bit levels, float32 scale + uint4 zero per 32
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("DequantizeLinear") == 3 and "GatherElements" not in ops
    # onnxruntime keeps the weights packed: the MatMul fed straight by its DequantizeLinear
    # becomes MatMulNBits. (The two followed by an Add turn into Gemm first and stay unfused.)
    assert optimized_op_types(result.model, tmp_path).count("MatMulNBits") >= 1


def optimized_op_types(model, folder) -> list[str]:
    """The op types onnxruntime runs at ORT_ENABLE_ALL, read from its optimized model."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(folder / "optimized.onnx").graph.node]


def test_blocked_dequantize_before_opset_21_stays_a_lookup(fixture_dir):
    result = graphpass.run(fixture_dir / "mlp.onnx", "uniform(granularity=group,group_size=32,lower=dequantize)",
                           budget=ANY)
    stats = pass_stats(result)
    assert "dequantize" not in str(stats["details"]["packings"])
    assert any("stay lookups" in n for n in stats["notes"])


def test_gmm_reports_the_components_that_remain(fixture_dir):
    result = graphpass.run(fixture_dir / "mlp.onnx", "gmm(components=12,merge_kl=0.5)", verify=False)
    details = pass_stats(result)["details"]
    assert 1 <= details["components_remaining"] <= 12
    assert all(t["k"] <= t["components_remaining"] for t in details["tensors"])


def test_sizes_add_up(fixture_dir, tmp_path):
    out = tmp_path / "out.onnx"
    result = graphpass.run(fixture_dir / "mlp.onnx", "kmeans(bits=4,granularity=channel)", output=out, budget=ANY)
    stats = pass_stats(result)
    details = stats["details"]
    saved = details["bytes_before"] - details["bytes_after"]
    assert stats["weight_bytes_before"] - stats["weight_bytes_after"] == saved
    file_saved = result.report["input"]["file_bytes"] - out.stat().st_size
    # The rest is the graph: node and tensor names, about 800 bytes per replaced weight here.
    assert 0 <= saved - file_saved < 1000 * len(details["tensors"])
    for tensor in details["tensors"]:
        assert tensor["bits_per_weight"] == pytest.approx(8 * tensor["bytes_after"] / tensor["weights"], abs=1e-3)


def test_same_input_same_bytes_with_two_threads(fixture_dir):
    runs = [graphpass.run(fixture_dir / "transformer.onnx", "kmeans(bits=3,granularity=channel)", verify=False)
            for _ in range(2)]
    assert runs[0].model.SerializeToString(deterministic=True) == runs[1].model.SerializeToString(deterministic=True)


def test_progress_counts_every_compressed_tensor(fixture_dir):
    from contextlib import contextmanager

    seen = []

    @contextmanager
    def progress(label, total):
        counted = []
        yield lambda n=1: counted.append(n)
        seen.append((label, total, sum(counted)))

    graphpass.run(fixture_dir / "mlp.onnx", "kmeans", verify=False, progress=progress)
    assert ("kmeans: sharing weight values", 3, 3) in seen
