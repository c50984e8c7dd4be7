"""--objective memory: weights lowered to kernels that keep them compressed in the runtime.

Every lowering here runs in onnxruntime and is compared with numpy on the plan's own
reconstruction (the dequantized weight), so packing, scales, zero points, padding and the bias
are checked by what the kernel computes, not by how the graph looks.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphpass
from graphpass.affine import quantize_blocks, quantize_blocks_gptq, weighted_error
from graphpass.deployment import Deployment
from graphpass.edit import Model
from graphpass.lowering.choose import NON_AFFINE_NOTE, compressed_plan, kernel_lowering
from graphpass.lowering.onnxruntime_contrib import pack_bits, unpack_bits
from graphpass.verify import Budget

ORT_ONLY = Deployment.parse("memory", "onnxruntime")
LEVELS = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)


def _model(nodes, inputs, outputs, initializers, opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def matmul_bias_model(k: int, n: int, seed: int = 0, bias_first: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "bias")
    add_inputs = ["bias", "mm"] if bias_first else ["mm", "bias"]
    nodes = [helper.make_node("MatMul", ["A", "W"], ["mm"]), helper.make_node("Add", add_inputs, ["Y"])]
    return _model(nodes, [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["b", 7, k])],
                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], [weight, bias])


def embedding_model(vocab: int, dim: int, index_type=TensorProto.INT64, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    table = numpy_helper.from_array(rng.standard_normal((vocab, dim)).astype(np.float32), "E")
    nodes = [helper.make_node("Gather", ["E", "ids"], ["Y"], axis=0)]
    return _model(nodes, [helper.make_tensor_value_info("ids", index_type, ["b", "s"])],
                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], [table])


def lowered(proto: onnx.ModelProto, name: str, bits: int, block: int, deployment=ORT_ONLY):
    """(the model with `name` lowered, the plan) through the chooser."""
    model = Model(proto)
    weight = next(w for w in model.weights() if w.name == name)
    plan = compressed_plan(weight, deployment, bits, block)
    assert not isinstance(plan, str), plan
    plan.apply()
    return model.proto, plan


def run_all_levels(proto: onnx.ModelProto, feeds) -> list[np.ndarray]:
    outputs = []
    for level in LEVELS:
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, feeds)[0])
    return outputs


def ops(proto: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in proto.graph.node]


# ---------------------------------------------------------------------------------------------
# Packing and fitting
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("length", [16, 13, 1])
def test_packing_round_trips_low_bits_first(bits, length):
    q = np.random.default_rng(bits).integers(0, 2**bits, (3, length))
    packed = pack_bits(q, bits)
    assert packed.shape == (3, -(-length * bits // 8))
    assert np.array_equal(unpack_bits(packed, bits, length), q)
    if bits == 4 and length >= 2:
        assert packed[0, 0] == q[0, 0] | (q[0, 1] << 4)


def test_clip_search_beats_min_max_ranges_and_weighs_loud_channels():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((64, 256)).astype(np.float32) * rng.gamma(1.0, 1.0, (64, 1))
    rows[rng.random(rows.shape) < 0.01] *= 6  # a few outliers per block, as in real weights
    plain = quantize_blocks(rows, 4, 32, search=False)
    searched = quantize_blocks(rows, 4, 32)
    assert weighted_error(rows, searched) < 0.97 * weighted_error(rows, plain)
    loud = np.ones(256, np.float32)
    loud[:32] = 100.0
    aware = quantize_blocks(rows, 4, 32, loud)
    assert weighted_error(rows, aware, loud) <= weighted_error(rows, searched, loud)
    assert searched.q.max() <= 15 and searched.zero_point.max() <= 15


def test_gptq_error_feedback_lowers_the_layer_output_error_on_correlated_inputs():
    rng = np.random.default_rng(9)
    mixing = rng.standard_normal((128, 128)) / np.sqrt(128) + np.eye(128)
    x = rng.standard_normal((2048, 128)) @ mixing  # correlated input channels, as real activations are
    w = rng.standard_normal((128, 64))  # [K, N]
    hessian = x.T @ x / len(x)
    rounded = quantize_blocks(w.T, 4, 32).dequantized(np.float64).T
    fed_back = quantize_blocks_gptq(w.T, 4, 32, hessian)[0].dequantized(np.float64).T
    assert np.sum((x @ (w - fed_back)) ** 2) < 0.8 * np.sum((x @ (w - rounded)) ** 2)


# ---------------------------------------------------------------------------------------------
# MatMulNBits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,k,n,block", [(4, 64, 32, 32), (8, 96, 24, 16), (2, 64, 16, 64), (4, 100, 24, 32)])
def test_matmul_nbits_matches_numpy_on_the_dequantized_weight_and_takes_the_bias_once(bits, k, n, block):
    proto = matmul_bias_model(k, n, seed=bits)
    # For OpenVINO the chooser also takes 2 and 8 bits (slow in onnxruntime, not wrong): check them here.
    out, plan = lowered(proto, "W", bits, block, Deployment.parse("memory", "openvino"))
    assert ops(out) == ["MatMulNBits"]  # the Add went into the kernel
    node = out.graph.node[0]
    assert node.domain == "com.microsoft" and node.input[5] == "bias" and node.output[0] == "Y"
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert (attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (k, n, bits,
                                                                                                        block, 0)
    assert any(o.domain == "com.microsoft" for o in out.opset_import)
    assert next(o.version for o in out.opset_import if o.domain == "") == 17  # never raised
    a = np.random.default_rng(1).standard_normal((2, 7, k)).astype(np.float32)
    bias = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "bias"))
    expected = a @ plan.reconstruction + bias
    for got in run_all_levels(out, {"A": a}):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    packed = next(t for t in out.graph.initializer if t.data_type == TensorProto.UINT8 and len(t.dims) == 3)
    assert list(packed.dims) == [n, -(-k // block), block * bits // 8]


def test_a_bias_added_first_is_folded_too():
    out, _ = lowered(matmul_bias_model(64, 16, bias_first=True), "W", 4, 32)
    assert ops(out) == ["MatMulNBits"]


def test_a_matmul_read_twice_keeps_its_add_when_the_product_is_read_elsewhere():
    proto = matmul_bias_model(64, 16)
    proto.graph.output.append(helper.make_tensor_value_info("mm", TensorProto.FLOAT, None))
    out, plan = lowered(proto, "W", 4, 32)
    assert ops(out) == ["MatMulNBits", "Add"]
    assert len(out.graph.node[0].input) == 4  # no bias in the kernel: it is added once, by the Add


def test_gemm_with_trans_b_and_c_becomes_one_kernel_with_the_bias():
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.standard_normal((24, 64)).astype(np.float32), "W")  # [N, K]
    c = numpy_helper.from_array(rng.standard_normal(24).astype(np.float32), "C")
    proto = _model([helper.make_node("Gemm", ["A", "W", "C"], ["Y"], transB=1)],
                   [helper.make_tensor_value_info("A", TensorProto.FLOAT, [5, 64])],
                   [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], [w, c])
    out, plan = lowered(proto, "W", 4, 32)
    assert ops(out) == ["MatMulNBits"] and out.graph.node[0].input[5] == "C"
    a = rng.standard_normal((5, 64)).astype(np.float32)
    expected = a @ plan.reconstruction.T + numpy_helper.to_array(c)
    for got in run_all_levels(out, {"A": a}):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_gemm_with_alpha_has_no_kernel_and_says_why():
    rng = np.random.default_rng(4)
    w = numpy_helper.from_array(rng.standard_normal((64, 24)).astype(np.float32), "W")
    proto = _model([helper.make_node("Gemm", ["A", "W"], ["Y"], alpha=2.0)],
                   [helper.make_tensor_value_info("A", TensorProto.FLOAT, [5, 64])],
                   [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], [w])
    weight = Model(proto).weights()[0]
    assert "alpha" in kernel_lowering(weight, ORT_ONLY, 4, 32)


# ---------------------------------------------------------------------------------------------
# GatherBlockQuantized
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index_type", [TensorProto.INT64, TensorProto.INT32])
@pytest.mark.parametrize("bits,block", [(4, 32), (8, 16), (4, 64)])
def test_gather_block_quantized_takes_token_ids_and_matches_numpy(index_type, bits, block):
    proto = embedding_model(300, 128, index_type)
    out, plan = lowered(proto, "E", bits, block)
    assert ops(out) == ["GatherBlockQuantized"]
    assert out.graph.node[0].input[1] == "ids"  # token ids straight in, no Cast, never a MatMulNBits
    ids = np.random.default_rng(5).integers(0, 300, (2, 9)).astype(helper.tensor_dtype_to_np_dtype(index_type))
    for got in run_all_levels(out, {"ids": ids}):
        np.testing.assert_array_equal(got, plan.reconstruction[ids])


def test_a_row_length_the_block_does_not_divide_has_no_gather_kernel():
    weight = Model(embedding_model(50, 96)).weights()[0]
    assert "multiple of the block" in kernel_lowering(weight, ORT_ONLY, 4, 64)
    assert "4, 8 bits" in kernel_lowering(weight, ORT_ONLY, 2, 32)


# ---------------------------------------------------------------------------------------------
# The chooser and the passes
# ---------------------------------------------------------------------------------------------


def test_targets_that_cannot_run_the_kernel_or_run_it_slowly_get_a_reason():
    weight = Model(matmul_bias_model(64, 16)).weights()[0]
    tract = Deployment.parse("memory", "tract")
    assert not isinstance(kernel_lowering(weight, tract, 4, 32), str)
    assert kernel_lowering(weight, tract, 8, 32) == "tract runs MatMulNBits at 4 bits only, not 8"
    assert "fast at 4 bits only" in kernel_lowering(weight, ORT_ONLY, 8, 32)
    assert not isinstance(kernel_lowering(weight, Deployment.parse("memory", "onnxruntime,openvino"), 4, 32), str)


def test_uniform_under_memory_lowers_kernels_and_reports_every_fallback(tmp_path):
    rng = np.random.default_rng(6)
    table = numpy_helper.from_array(rng.standard_normal((256, 64)).astype(np.float32), "E")
    w = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W")
    odd = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "S")  # read by Mul: no kernel
    nodes = [helper.make_node("Gather", ["E", "ids"], ["x"], axis=0),
             helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("Mul", ["h", "S"], ["Y"])]
    proto = _model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 64])],
                   [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], [table, w, odd])
    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(proto, source)
    result = graphpass.run(source, "uniform(bits=4,granularity=group,group_size=32)", output=target,
                           deployment=ORT_ONLY)
    out = onnx.load(target)
    assert sorted(ops(out)).count("GatherBlockQuantized") == 1 and ops(out).count("MatMulNBits") == 1
    (stats,) = result.report["passes"]
    fallback = [t for t in stats["details"]["tensors"] if t["name"] == "S"]
    assert "rebuilt dense at load" in fallback[0]["memory"] and "Mul" in fallback[0]["memory"]
    assert any("stay lookups" in note and "S" in note for note in stats["notes"])


def test_uniform_asked_for_kernels_leaves_a_weight_without_one_as_it_is(tmp_path):
    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(matmul_bias_model(64, 32), source)
    result = graphpass.run(source, "uniform(bits=8,granularity=group,group_size=32,lower=kernel)", output=target,
                           deployment=ORT_ONLY)
    (stats,) = result.report["passes"]
    assert stats["tensors_changed"] == 0
    assert any(s["weight"] == "W" and "fast at 4 bits only" in s["reason"] for s in stats["skipped"])


def test_uniform_gptq_lowers_kernels_that_match_their_plan(tmp_path):
    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(matmul_bias_model(128, 32), source)
    a = np.random.default_rng(10).standard_normal((16, 7, 128)).astype(np.float32)
    result = graphpass.run(source, "uniform(bits=4,granularity=group,group_size=32,gptq=true)", output=target,
                           inputs={"A": a}, deployment=ORT_ONLY)
    (stats,) = result.report["passes"]
    assert stats["details"]["tensors"][0]["fit"] == "feedback"
    assert ops(onnx.load(target)) == ["MatMulNBits"] and result.report["verify"]["passed"]


def test_kmeans_under_memory_runs_as_before_and_says_it_is_rebuilt_dense(tmp_path):
    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(matmul_bias_model(64, 32), source)
    result = graphpass.run(source, "kmeans(bits=4)", output=target, deployment=ORT_ONLY)
    (stats,) = result.report["passes"]
    assert stats["tensors_changed"] == 1
    assert any(NON_AFFINE_NOTE in note for note in stats["notes"])
    assert all(t["memory"] == NON_AFFINE_NOTE for t in stats["details"]["tensors"])


def test_uniform_under_the_file_objective_is_unchanged_by_default(tmp_path):
    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(matmul_bias_model(64, 32), source)
    graphpass.run(source, "uniform(bits=4,granularity=group,group_size=32)", output=target)
    assert "MatMulNBits" not in ops(onnx.load(target))


def test_openvino_targets_get_no_table_whose_zero_points_end_in_padding():
    weight = Model(embedding_model(50, 384)).weights()[0]
    both = Deployment.parse("memory", "onnxruntime,openvino")
    assert "OpenVINO" in kernel_lowering(weight, both, 4, 128)  # 3 blocks: 1.5 bytes of zero points
    assert not isinstance(kernel_lowering(weight, ORT_ONLY, 4, 128), str)
    assert not isinstance(kernel_lowering(weight, both, 8, 128), str)


def test_openvino_runs_both_kernels_as_onnxruntime_does(tmp_path):
    ov = pytest.importorskip("openvino")
    out, plan = lowered(matmul_bias_model(64, 32), "W", 4, 32)
    table, table_plan = lowered(embedding_model(300, 128), "E", 4, 32)
    core = ov.Core()
    a = np.random.default_rng(8).standard_normal((2, 7, 64)).astype(np.float32)
    ids = np.random.default_rng(8).integers(0, 300, (2, 9))
    for proto, feeds in ((out, [a]), (table, [ids])):
        onnx.save(proto, tmp_path / "m.onnx")
        # Exact arithmetic: OpenVINO's CPU plugin otherwise computes in bf16 where the CPU has it
        # and quantizes activations to int8 for compressed weights (both by design).
        exact = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
        compiled = core.compile_model(core.read_model(tmp_path / "m.onnx"), "CPU", exact)
        got = list(compiled(feeds).values())[0]
        expected = run_all_levels(proto, {proto.graph.input[0].name: feeds[0]})[0]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


# ---------------------------------------------------------------------------------------------
# The real BERT
# ---------------------------------------------------------------------------------------------


def _bert_sentences():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_auto import TEST_SENTENCES, WordPiece, real_models

    tokenizer = WordPiece(Path(real_models.fetch("bert_uncased_tokenizer")))
    return real_models.fetch("paraphrase_minilm_l3"), tokenizer.encode_batch(TEST_SENTENCES[:8])


def test_bert_under_memory_keeps_both_kernels_in_the_optimized_graph(tmp_path):
    source, sentences = _bert_sentences()
    target = tmp_path / "bert.onnx"
    graphpass.run(source, "uniform(bits=4,granularity=group,group_size=32)", output=target, deployment=ORT_ONLY)
    optimized = tmp_path / "optimized.onnx"
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(optimized)
    session = ort.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])
    kept = ops(onnx.load(optimized))
    assert kept.count("GatherBlockQuantized") == 2 and kept.count("MatMulNBits") == 18  # not folded to dense
    reference = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    for i in range(len(sentences["input_ids"])):
        feeds = {k: v[i:i + 1] for k, v in sentences.items()}
        want, got = reference.run(["461"], feeds)[0].ravel(), session.run(["461"], feeds)[0].ravel()
        assert np.dot(want, got) / np.linalg.norm(want) / np.linalg.norm(got) > 0.97


def test_auto_under_memory_chooses_only_kernels_and_meets_its_budget(fixture_dir, tmp_path):
    target = tmp_path / "auto.onnx"
    result = graphpass.run(fixture_dir / "transformer_untied.onnx", "auto", output=target,
                           budget=Budget(min_cosine=0.99), deployment=ORT_ONLY)
    assert result.report["verify"]["passed"]
    auto = next(p for p in result.report["passes"] if p["name"] == "auto")
    chosen = [t for t in auto["details"]["tensors"] if t["setting"] != "kept as is"]
    assert chosen and all("lower=kernel" in t["setting"] for t in chosen)
    assert all(t["plan"]["packing"].startswith(("MatMulNBits/4bit", "GatherBlockQuantized/")) for t in chosen)
    kernels = [n.op_type for n in onnx.load(target).graph.node if n.domain == "com.microsoft"]
    assert len(kernels) >= len(chosen)  # one kernel per reader: a weight may have several


def test_cli_objective_memory_keeps_the_kernel_for_every_target(tmp_path):
    from click.testing import CliRunner

    from graphpass.cli import main

    source = tmp_path / "in.onnx"
    onnx.save(matmul_bias_model(64, 32), source)
    spec = "uniform(bits=4,granularity=group,group_size=32)"
    for target in ("onnxruntime", "onnxruntime,openvino", "any"):  # verified in each target
        out = tmp_path / f"{target}.onnx"
        ran = CliRunner().invoke(main, ["run", str(source), "--passes", spec, "--objective", "memory", "--target",
                                        target, "-o", str(out)])
        assert ran.exit_code == 0, ran.output
        assert "MatMulNBits" in ops(onnx.load(out))
    ran = CliRunner().invoke(main, ["run", str(source), "--passes", spec.replace("bits=4", "bits=8"), "--objective",
                                    "memory", "--target", "tract", "-o", str(tmp_path / "tract8.onnx")])
    assert ran.exit_code == 0 and "tract runs MatMulNBits at 4 bits only" in ran.output, ran.output


def test_a_float16_matmul_keeps_float16_scales_and_matches_its_plan():
    proto = matmul_bias_model(64, 32)
    for tensor in proto.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    proto.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    proto.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    out, plan = lowered(proto, "W", 4, 32)
    scales = next(t for t in out.graph.initializer if t.name.endswith("lut_scale"))
    assert scales.data_type == TensorProto.FLOAT16
    a = np.random.default_rng(11).standard_normal((2, 7, 64)).astype(np.float16)
    bias = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "bias"))
    expected = a.astype(np.float32) @ plan.reconstruction.astype(np.float32) + bias
    for got in run_all_levels(out, {"A": a}):
        np.testing.assert_allclose(got.astype(np.float32), expected, rtol=1e-2, atol=1e-2 * np.abs(expected).max())


def test_auto_under_memory_for_every_runtime_chooses_4_bit_kernels(fixture_dir, tmp_path):
    """tract runs the kernels at 4 bits only, so with every runtime targeted auto picks among those,
    and the output runs within budget in all three (verification covers each target)."""
    result = graphpass.run(fixture_dir / "mlp.onnx", "auto", output=tmp_path / "auto.onnx",
                           budget=Budget(min_cosine=0.99), deployment=Deployment.parse("memory", "any"))
    assert result.passed
    auto = next(p for p in result.report["passes"] if p["name"] == "auto")
    chosen = [t for t in auto["details"]["tensors"] if t["setting"] != "kept as is"]
    assert chosen and all("bits=4" in t["setting"] for t in chosen)


def test_the_ort_format_keeps_the_kernels_packed(tmp_path):
    out, _ = lowered(matmul_bias_model(1024, 1024), "W", 4, 32)
    table, _ = lowered(embedding_model(4096, 256), "E", 4, 32)
    for name, proto in (("matmul", out), ("table", table)):
        path = tmp_path / f"{name}.onnx"
        onnx.save(proto, path)
        subprocess.run([sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(path)], check=True,
                       capture_output=True)
        assert path.with_suffix(".ort").stat().st_size < 1.15 * path.stat().st_size  # not folded to dense


def test_a_table_also_read_as_a_tied_output_head_has_no_kernel_and_says_so():
    rng = np.random.default_rng(12)
    table = numpy_helper.from_array(rng.standard_normal((256, 64)).astype(np.float32), "E")
    nodes = [helper.make_node("Gather", ["E", "ids"], ["x"], axis=0),
             helper.make_node("Transpose", ["E"], ["Et"]),
             helper.make_node("MatMul", ["x", "Et"], ["Y"])]
    proto = _model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])],
                   [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], [table])
    reason = kernel_lowering(Model(proto).weights()[0], ORT_ONLY, 4, 32)
    assert "Gather and Transpose" in reason
