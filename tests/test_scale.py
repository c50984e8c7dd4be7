"""Large models: the download size is sampled above a size and says so, runs on external data
keep the model's outputs, and the report carries the run's peak memory."""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

from fixtures.synthetic import write_tanh_chain
from graphpass import download, run
from graphpass.download import SAMPLE_CHUNK_BYTES, SAMPLE_CHUNKS, download_size
from graphpass.model import external_data_path, load_model
from graphpass.report import render_report
from graphpass.verify import Budget

# The sample's deflated size, scaled to the whole, is held to this fraction of the exact figure.
ESTIMATE_TOLERANCE = 0.02


def _files(model: Path) -> list[Path]:
    return [model, external_data_path(model)]


def _exact(paths: list[Path]) -> int:
    return len(zlib.compress(b"".join(p.read_bytes() for p in paths), 9))


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    """A 12.6 MB Tanh chain with its weights in external data (the issue's model, smaller)."""
    return write_tanh_chain(tmp_path_factory.mktemp("chain") / "chain.onnx", layers=3, dim=1024)


def test_download_size_is_exact_up_to_the_threshold(chain):
    size = sum(p.stat().st_size for p in _files(chain))
    found = download_size(_files(chain), exact_up_to=size)
    assert not found.estimated and found.describe() == "exact"
    assert found.zip_bytes == _exact(_files(chain))


def test_download_size_above_the_threshold_is_a_close_deterministic_estimate(chain):
    size = sum(p.stat().st_size for p in _files(chain))
    found = download_size(_files(chain), exact_up_to=size - 1)
    assert found.estimated and found.sample_bytes == SAMPLE_CHUNKS * SAMPLE_CHUNK_BYTES
    assert found.describe() == f"estimated from a {found.sample_bytes / 1e6:.1f} MB sample"
    assert abs(found.zip_bytes - _exact(_files(chain))) <= ESTIMATE_TOLERANCE * _exact(_files(chain))
    assert download_size(_files(chain), exact_up_to=size - 1) == found


def test_sample_spans_files_of_different_content(tmp_path):
    """Zeros then noise: a sample that read one file only would miss by half."""
    zeros, noise = tmp_path / "zeros.bin", tmp_path / "noise.bin"
    zeros.write_bytes(bytes(6 << 20))
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 6 << 20, dtype=np.uint8).tobytes())
    found = download_size([zeros, noise], exact_up_to=0)
    exact = _exact([zeros, noise])
    assert found.estimated and abs(found.zip_bytes - exact) <= ESTIMATE_TOLERANCE * exact


def _outputs(model: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _digest(paths: list[Path]) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in paths)).hexdigest()


def test_external_data_run_keeps_outputs_and_returns_what_it_wrote(chain, tmp_path):
    before = _digest(_files(chain))
    out = tmp_path / "out.onnx"
    result = run(chain, "tie", output=out, external_data=True)
    assert result.passed and result.written == out and external_data_path(out).exists()
    assert _digest(_files(chain)) == before  # the input is never modified
    x = np.random.default_rng(1).standard_normal((2, 1024)).astype(np.float32)
    assert np.array_equal(_outputs(out, x), _outputs(chain, x))
    # The model handed back (a copy, freed of the input's memory) is the model written.
    written = load_model(out).proto
    assert written.SerializeToString(deterministic=True) == result.model.SerializeToString(deterministic=True)


def test_a_run_that_writes_no_file_still_hands_back_every_tensor(chain, tmp_path):
    # Without an output (and with a missed budget) the staged data file is removed: the model
    # handed back must hold its tensors' bytes, read before that.
    for kwargs in ({"output": None}, {"output": tmp_path / "failed.onnx", "budget": Budget(min_cosine=0.9999999)}):
        result = run(chain, "kmeans(bits=4)", external_data=True, **kwargs)
        assert result.written is None and not list(tmp_path.iterdir())
        tensors = result.model.graph.initializer
        assert tensors and all(t.data_location != TensorProto.EXTERNAL and not t.external_data for t in tensors)
        x = np.random.default_rng(3).standard_normal((1, 1024)).astype(np.float32)
        session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
        assert session.run(None, {"x": x})[0].shape == (1, 1024)


def test_lossy_run_on_external_data_is_verified_against_the_input(chain, tmp_path):
    out = tmp_path / "out.onnx"
    result = run(chain, "kmeans(bits=4)", output=out, external_data=True)
    figures = result.verify_result.outputs["y"]
    x = np.random.default_rng(2).standard_normal((1, 1024)).astype(np.float32)
    reference, candidate = _outputs(chain, x), _outputs(out, x)
    cosine = float(np.dot(reference.ravel(), candidate.ravel())
                   / (np.linalg.norm(reference) * np.linalg.norm(candidate)))
    assert 0.5 < figures.cosine < 1.0 and 0.5 < cosine < 1.0
    assert not np.array_equal(reference, candidate)


def test_report_carries_peak_rss_and_how_the_download_size_was_found(chain, tmp_path, monkeypatch):
    monkeypatch.setattr(download, "EXACT_UP_TO_BYTES", 1 << 20)  # the chain is above it
    result = run(chain, "tie", output=tmp_path / "out.onnx", external_data=True)
    report = result.report
    assert report["input"]["zip_sample_bytes"] == SAMPLE_CHUNKS * SAMPLE_CHUNK_BYTES
    assert report["output"]["zip_sample_bytes"] == SAMPLE_CHUNKS * SAMPLE_CHUNK_BYTES
    weights = sum(p.stat().st_size for p in _files(chain))
    assert report["peak_rss_bytes"] > weights  # the process held the weights at least once
    text = render_report(report, result.verify_result)
    assert "estimated from a 8.4 MB sample of each" in text
    assert "peak RSS of this run" in text


def test_small_models_keep_the_exact_download_size(chain, tmp_path):
    report = run(chain, "tie", output=tmp_path / "out.onnx", external_data=True).report
    assert report["input"]["zip_sample_bytes"] is None
    assert report["input"]["zip_bytes"] == _exact(_files(chain))
