"""Initializers also listed as graph inputs: every IR 3 model's, and older exporters' default.

A caller may feed such an initializer, so no pass rewrites it unless the run is told to treat
them as constants (--freeze-initializers); then the model compresses as if it had been exported
without them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import helper

import graphpass
from graphpass.cli import main
from graphpass.verify import Budget

EXAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "example.onnx"

SPEC = "tie,kmeans(bits=6),fold"


def listed_as_inputs(example: onnx.ModelProto, ir_version: int) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(example)
    model.ir_version = ir_version
    for tensor in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return model


@pytest.fixture
def example() -> onnx.ModelProto:
    return onnx.load(EXAMPLE)


def test_initializers_a_caller_may_feed_stay_as_they_are_and_the_note_names_the_flag(example, tmp_path):
    model = listed_as_inputs(example, example.ir_version)
    result = graphpass.run(model, SPEC, output=tmp_path / "out.onnx", budget=Budget(min_cosine=0.99))
    written = onnx.load(tmp_path / "out.onnx")
    assert {v.name for v in written.graph.input} == {v.name for v in model.graph.input}
    assert result.report["passes"][1]["tensors_changed"] == 0  # kmeans
    assert any("--freeze-initializers" in note for note in result.report["notes"])


def test_frozen_initializers_compress_as_if_exported_without_them(example, tmp_path):
    direct = graphpass.run(example, SPEC, output=tmp_path / "direct.onnx", budget=Budget(min_cosine=0.99))
    frozen = graphpass.run(listed_as_inputs(example, example.ir_version), SPEC, output=tmp_path / "frozen.onnx",
                           budget=Budget(min_cosine=0.99), freeze_initializers=True)
    assert direct.passed and frozen.passed
    assert (tmp_path / "frozen.onnx").read_bytes() == (tmp_path / "direct.onnx").read_bytes()
    assert any("are constants now" in note for note in frozen.report["notes"])


def test_an_ir3_model_is_written_as_ir4_and_runs_as_its_input_does(example, tmp_path):
    source = tmp_path / "ir3.onnx"
    source.write_bytes(listed_as_inputs(example, 3).SerializeToString())
    result = CliRunner().invoke(main, ["run", str(source), "--passes", SPEC, "--min-cosine", "0.99", "-o",
                                       str(tmp_path / "out.onnx"), "--no-cost", "--freeze-initializers",
                                       "--target", "openvino,tract", "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert {"openvino", "tract"} <= set(report["verify"]["levels"])  # compared there, not only noted
    written = onnx.load(tmp_path / "out.onnx")
    assert written.ir_version == 4 and [v.name for v in written.graph.input] == ["input_ids"]
    assert (tmp_path / "out.onnx").stat().st_size < source.stat().st_size / 2
    feed = {"input_ids": np.array([[1, 5, 9, 2]], dtype=np.int64)}
    reference = ort.InferenceSession(str(source)).run(None, feed)[0]
    candidate = ort.InferenceSession(str(tmp_path / "out.onnx")).run(None, feed)[0]
    cosine = float((reference * candidate).sum() / np.linalg.norm(reference) / np.linalg.norm(candidate))
    assert cosine > 0.99
    assert any("IR version 3 raised to 4" in note for note in report["notes"])


def test_inspect_says_which_weights_a_caller_may_feed_and_sees_them_frozen_as_run_would(example, tmp_path):
    source = tmp_path / "listed.onnx"
    source.write_bytes(listed_as_inputs(example, example.ir_version).SerializeToString())

    def inspected(path, *flags):
        result = CliRunner().invoke(main, ["inspect", str(path), "--json", *flags])
        assert result.exit_code == 0, result.output
        found = json.loads(result.output)
        del found["file_bytes"]  # the listed model's graph inputs take bytes of their own
        return found

    listed = inspected(source)
    assert len(listed["overridable_weights"]) == len(example.graph.initializer)
    assert list(listed["bytes_by_place"]) == ["initializers also graph inputs"]
    assert listed["exact_duplicates"] == [] and listed["related"] == []  # tie leaves such weights alone
    direct = inspected(EXAMPLE)
    assert direct["exact_duplicates"] and direct["related"]  # so the model shows what freezing gains
    assert inspected(source, "--freeze-initializers") == direct
    assert "--freeze-initializers" in CliRunner().invoke(main, ["inspect", str(source)]).output


def test_sweep_warns_of_weights_a_caller_may_feed_and_sweeps_them_frozen_as_run_would(example, tmp_path, caplog):
    from graphpass.sweep import sweep

    listed = listed_as_inputs(example, example.ir_version)
    grid = (["kmeans"], [4], ["channel"])
    kept = sweep(listed, *grid, baselines=False)
    assert kept[0].cosine == 1.0 and kept[0].size_ratio == 1.0  # nothing rewritten
    assert "--freeze-initializers" in caplog.text
    frozen = sweep(listed, *grid, baselines=False, freeze_initializers=True)
    direct = sweep(example, *grid, baselines=False)
    assert (frozen[0].file_bytes, frozen[0].cosine) == (direct[0].file_bytes, direct[0].cosine)
    assert frozen[0].cosine < 1.0
