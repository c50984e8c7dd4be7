"""The LLM-shaped decoder of issue 17 (fixtures/llm.py), at its tiny config: tie finds the LM
head stored as the embedding's transpose, fold runs every decoder layer as one Scan whose
past keys and values come in as scan inputs and whose present ones go out as scan outputs,
and the result runs in onnxruntime, OpenVINO and tract."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import graphpass
from graphpass.deployment import Deployment
from graphpass.verify import Budget, synthesize_inputs
from fixtures.llm import TINY, write_llm

ANY = Deployment.parse("file", "any")


@pytest.fixture(scope="module", params=["float32", "float16"])
def decoder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"llm_{request.param}") / "decoder.onnx"
    return write_llm(path, replace(TINY, dtype=request.param))


def pass_report(result, name: str) -> dict:
    return next(p for p in result.report["passes"] if p["name"] == name)


def outputs_of(path, feeds) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def test_the_decoder_is_what_exporters_write(decoder):
    model = onnx.load(str(decoder), load_external_data=False)
    stored = {t.name: t for t in model.graph.initializer}
    assert stored["lm_head.weight"].data_location == onnx.TensorProto.EXTERNAL
    assert list(stored["lm_head.weight"].dims) == [TINY.hidden, TINY.vocab]
    assert list(stored["model.embed_tokens.weight"].dims) == [TINY.vocab, TINY.hidden]
    inputs = [v.name for v in model.graph.input]
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert len(inputs) == 3 + 2 * TINY.layers and len(model.graph.output) == 1 + 2 * TINY.layers


def test_generated_inputs_fit_the_kv_cache(decoder):
    """attention_mask spans past + new tokens: its dim is named as that sum, and the
    generated inputs honour it, so the reference model runs on them."""
    feeds = synthesize_inputs(onnx.load(str(decoder), load_external_data=False))
    past, seq = feeds["past_key_values.0.key"].shape[2], feeds["input_ids"].shape[1]
    assert feeds["attention_mask"].shape[1] == past + seq and np.all(feeds["attention_mask"] == 1)
    assert feeds["input_ids"].max() < TINY.vocab
    present = outputs_of(decoder, feeds)["present.0.key"]
    assert present.shape[2] == past + seq


def test_tie_stores_the_transposed_lm_head_once(decoder, tmp_path):
    result = graphpass.run(decoder, "tie", output=tmp_path / "tied.onnx")
    ties = pass_report(result, "tie")["details"]["ties"]
    head = [t for t in ties if any(m["weight"] == "lm_head.weight" for m in t["members"])]
    assert len(head) == 1 and head[0]["root"] == "model.embed_tokens.weight"
    assert head[0]["members"][0]["kind"] == "transposed" and head[0]["members"][0]["perm"] == [1, 0]
    assert result.passed  # the lossless budget, on logits and every present key and value


def test_fold_runs_every_layer_as_one_scan_in_every_runtime(decoder, tmp_path):
    result = graphpass.run(decoder, "fold", output=tmp_path / "folded.onnx", deployment=ANY)
    (run,) = pass_report(result, "fold")["details"]["runs"]
    assert run["op"] == "Scan" and run["blocks"] == TINY.layers
    assert run["per_block_inputs"] == 2 and run["per_block_outputs"] == 2  # past and present key, value
    checked = result.verify_result
    assert result.passed, result.failures
    assert {name: r.status for name, r in checked.runtimes.items()} == {
        "onnxruntime": "compared", "openvino": "compared", "tract": "compared"}
    folded = onnx.load(str(tmp_path / "folded.onnx"), load_external_data=False)
    assert [n.op_type for n in folded.graph.node].count("Scan") == 1
    assert not any(n.name.startswith("/model/layers.") for n in folded.graph.node)


def test_kmeans_then_fold_keeps_what_kmeans_alone_computes(decoder, tmp_path):
    """Folding the 4-bit model changes none of its outputs (logits, present keys and values)
    beyond float rounding, and the folded model runs in every runtime."""
    spec = "tie,kmeans(bits=4)"
    unfolded = graphpass.run(decoder, spec, output=tmp_path / "k.onnx", verify=False)
    folded = graphpass.run(decoder, spec + ",fold", output=tmp_path / "kf.onnx", deployment=ANY,
                           budget=Budget(min_cosine=0.5))
    assert unfolded.written and folded.passed, folded.failures
    (run,) = pass_report(folded, "fold")["details"]["runs"]
    assert run["blocks"] == TINY.layers and run["precomputed_once"]
    feeds = synthesize_inputs(onnx.load(str(decoder), load_external_data=False), seed=3)
    expected, got = outputs_of(tmp_path / "k.onnx", feeds), outputs_of(tmp_path / "kf.onnx", feeds)
    assert expected.keys() == got.keys()
    tolerance = 1e-2 if got["logits"].dtype == np.float16 else 1e-4  # of each output's largest value
    for name in expected:
        scale = np.abs(expected[name]).max()
        assert np.abs(got[name].astype(np.float32) - expected[name]).max() <= tolerance * scale, name
