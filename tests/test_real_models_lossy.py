"""The lossy passes on real third-party models, where exporters really put their weights.

Each rewrite is verified in onnxruntime against the original (both optimization levels) on
inputs the model means something on: real-looking audio for silero, a text-like image for the
OCR detector, token ids for the BERTs.
"""

from __future__ import annotations

import onnx

import graphpass
from graphpass.lowering import lookup
from graphpass.edit import Model
from graphpass.model import load_model
from graphpass.verify import Budget, verify
from conftest import real_inputs
from fixtures import real_models

PACKED_SUB_BYTE = {onnx.TensorProto.UINT4, onnx.TensorProto.INT4, onnx.TensorProto.UINT2, onnx.TensorProto.INT2}


def large_float_weights(path, min_size=1024):
    return [w for w in Model(load_model(path).proto).weights()
            if w.is_float and w.size >= min_size and w.consumers and not lookup.is_lookup_table(w)]


def run_verified(name, spec, tmp_path, budget, **options):
    """Run `spec` on a real model, then hold every further input set to the same budget."""
    source = real_models.fetch(name)
    inputs = real_inputs(name)
    out = tmp_path / "out.onnx"
    result = graphpass.run(source, spec, output=out, inputs=inputs[0], budget=budget, **options)
    assert result.passed, result.report["verify"]
    for feeds in inputs[1:]:
        checked = verify(source, out, feeds, budget)
        assert checked.passed, checked.to_dict()
    return source, out, result.report


def test_kmeans_rewrites_the_constants_inside_silero_if_branches(tmp_path):
    source, out, report = run_verified("silero_vad", "kmeans(bits=8)", tmp_path, Budget(min_cosine=0.98))
    targets = large_float_weights(source)
    assert len(targets) >= 12 and all(w.scope.depth > 0 and w.source == "constant" for w in targets)
    assert report["passes"][0]["tensors_changed"] == len(targets)
    # No dense copy of any of them is left, at any depth: only codebooks and indices.
    assert large_float_weights(out) == []
    assert report["output"]["file_bytes"] < 0.4 * report["input"]["file_bytes"]


def test_if_branches_that_read_outer_scope_initializers_keep_working(tmp_path):
    source, out, report = run_verified("silero_vad_op18_ifless", "kmeans(bits=8)", tmp_path,
                                       Budget(min_cosine=0.98))
    assert report["passes"][0]["tensors_changed"] == len(large_float_weights(source)) >= 12
    assert large_float_weights(out) == []


def test_an_opset_12_model_unpacks_its_indices_with_integer_arithmetic(tmp_path):
    """paddle2onnx's detector: every weight a Constant node, opset 12, no UINT4 possible."""
    source, out, report = run_verified("ppocr_det", "kmeans(bits=4)", tmp_path, Budget(min_cosine=0.98))
    written = onnx.load(out)
    assert [o.version for o in written.opset_import if o.domain in ("", "ai.onnx")] == [12]
    stored = [t.data_type for t in written.graph.initializer]
    stored += [a.t.data_type for n in written.graph.node if n.op_type == "Constant" for a in n.attribute if a.t]
    assert not PACKED_SUB_BYTE & set(stored)
    assert report["passes"][0]["tensors_changed"] == len(large_float_weights(source))
    assert report["output"]["file_bytes"] < 0.25 * report["input"]["file_bytes"]


def test_codebook_on_a_constant_only_export(tmp_path):
    source, out, report = run_verified("ppocr_det", "codebook(dim=2,k=256,share=shape,scale=channel)", tmp_path,
                                       Budget(min_cosine=0.98))
    assert report["passes"][0]["tensors_changed"] == len(large_float_weights(source))
    assert large_float_weights(out) == []


def test_already_quantized_weights_pass_through_untouched_and_are_reported(tmp_path):
    source, out, report = run_verified("minilm_l6_int8", "kmeans(bits=6)", tmp_path, Budget(min_cosine=0.999))
    int8 = {t.name: t.SerializeToString() for t in onnx.load(source).graph.initializer
            if t.data_type == onnx.TensorProto.INT8}
    assert len(int8) >= 36
    written = {t.name: t.SerializeToString() for t in onnx.load(out).graph.initializer}
    assert all(written.get(name) == data for name, data in int8.items())
    reasons = {s["weight"]: s["reason"] for s in report["passes"][0]["skipped"]}
    assert all(reasons[name].startswith("not a float tensor (int8)") for name in int8)


def test_kmeans_then_fold_on_a_real_bert(tmp_path):
    source, out, report = run_verified("paraphrase_minilm_l3", "kmeans(bits=6),fold", tmp_path,
                                       Budget(min_cosine=0.99), budget_outputs=["461"])
    kmeans, fold = report["passes"]
    assert kmeans["tensors_changed"] == len(large_float_weights(source))
    assert "3 blocks" in " ".join(fold["notes"])
    assert sum(n.op_type == "Scan" for n in onnx.load(out).graph.node) == 1
    assert report["output"]["nodes"] < report["input"]["nodes"]
    # Large weights store a byte per 6-bit index (so the runtime rebuilds them without int32
    # copies); the download, what zip keeps of the bytes, stays near 6 bits per weight.
    assert report["output"]["file_bytes"] < 0.26 * report["input"]["file_bytes"]
    assert report["output"]["zip_bytes"] < 0.21 * report["input"]["zip_bytes"]


def test_auto_meets_its_budget_on_magika(tmp_path):
    _, out, report = run_verified("magika", "auto(bits=4|8,granularities=tensor)", tmp_path,
                                  Budget(min_cosine=0.999))
    assert report["verify"]["outputs"]["target_label"]["cosine"] >= 0.999
    assert report["output"]["file_bytes"] < 0.5 * report["input"]["file_bytes"]
