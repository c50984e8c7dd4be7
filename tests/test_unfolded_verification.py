"""Large inputs verify at onnxruntime's "unfolded" level: lookups run with the model instead of
being expanded to dense weights when the session opens, which costs the same values and none
of the memory (graphpass.runtimes.onnxruntime)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import graphpass
import graphpass.verify as gv
from graphpass.cli import main
from graphpass.runtimes.onnxruntime import DISABLED_OPTIMIZERS, OPTIMIZATION_LEVELS, OnnxRuntime

from tests.test_verify import matmul_model


@pytest.fixture
def lookup_model(tmp_path):
    """A k-means output: its weight is a lookup into a codebook, which the default level folds."""
    weight = np.random.default_rng(3).standard_normal((96, 64)).astype(np.float32)
    source = tmp_path / "dense.onnx"
    onnx.save(matmul_model(weight), source)
    output = tmp_path / "lookup.onnx"
    graphpass.run(str(source), "kmeans(bits=4)", output=output, verify=False)
    return source, output


def _optimized_ops(path, level, tmp_path) -> set[str]:
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION_LEVELS[level]
    options.optimized_model_filepath = str(tmp_path / f"optimized_{level}.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=DISABLED_OPTIMIZERS.get(level))
    return {node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node}


def test_unfolded_keeps_the_lookup_in_the_graph_and_gives_the_folded_values(lookup_model, tmp_path):
    _, output = lookup_model
    lookup_ops = {node.op_type for node in onnx.load(output).graph.node} - {"MatMul"}
    assert lookup_ops
    assert not lookup_ops & _optimized_ops(output, "default", tmp_path)
    assert lookup_ops <= _optimized_ops(output, "unfolded", tmp_path)
    feed = {"x": np.random.default_rng(4).standard_normal((3, 96)).astype(np.float32)}
    folded = OnnxRuntime().open(str(output), feed, "default").run(feed)["y"]
    unfolded = OnnxRuntime().open(str(output), feed, "unfolded").run(feed)["y"]
    np.testing.assert_array_equal(unfolded, folded)


def test_a_large_input_is_verified_unfolded_and_the_report_says_so(lookup_model, monkeypatch, tmp_path):
    source, _ = lookup_model
    small = graphpass.run(str(source), "kmeans(bits=4)", budget=gv.Budget(min_cosine=0.9))
    assert small.report["verify"]["levels"] == list(gv.DEFAULT_LEVELS)

    monkeypatch.setattr(gv, "FOLDED_VERIFICATION_MAX_BYTES", 1024)  # the fixture's input is a few KB
    large = graphpass.run(str(source), "kmeans(bits=4)", budget=gv.Budget(min_cosine=0.9),
                          output=tmp_path / "out.onnx")
    assert large.passed
    assert large.report["verify"]["levels"] == ["unfolded", "disable_all"]
    assert any("without constant folding" in note for note in large.report["notes"])
    # The same outputs were compared: the figures match the folded verification's.
    for name, figures in small.report["verify"]["outputs"].items():
        assert large.report["verify"]["outputs"][name]["cosine"] == pytest.approx(figures["cosine"], abs=1e-6)


def test_the_verify_command_checks_a_large_model_unfolded_too(lookup_model, monkeypatch):
    source, output = lookup_model
    monkeypatch.setattr(gv, "FOLDED_VERIFICATION_MAX_BYTES", 1024)
    result = CliRunner().invoke(main, ["verify", str(source), str(output), "--min-cosine", "0.9", "--no-cost"])
    assert result.exit_code == 0, result.output
    assert "levels: unfolded, disable_all" in result.output
