"""Loading and saving: bad input is one clear error, output is atomic and deterministic."""

from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures.generate import one_matmul
from graphpass.errors import InputError, UsageError
from graphpass.model import check_output_path, load_model, save_compacted, save_model


def _with_external_data(tmp_path: Path, location: str, *, length: int | None = None) -> Path:
    """A model whose weight points at `location`, written with its data at tmp_path/w.bin."""
    weight = np.arange(64 * 8, dtype=np.float32).reshape(64, 8)
    (tmp_path / "w.bin").write_bytes(weight.tobytes())
    model = one_matmul(weight)
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": "0", "length": str(length or weight.nbytes)}
    for key, value in entries.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def test_loads_external_data_from_the_models_folder(tmp_path):
    loaded = load_model(_with_external_data(tmp_path, "w.bin"))
    weight = numpy_helper.to_array(loaded.proto.graph.initializer[0])
    assert np.array_equal(weight, np.arange(512, dtype=np.float32).reshape(64, 8))
    assert loaded.file_bytes == (tmp_path / "model.onnx").stat().st_size + 512 * 4
    both = (tmp_path / "model.onnx").read_bytes() + (tmp_path / "w.bin").read_bytes()
    assert loaded.download_size().zip_bytes == len(zlib.compress(both, 9))


@pytest.mark.parametrize(
    "location, length, message",
    [
        ("../w.bin", None, "escapes the model's folder"),
        ("/etc/passwd", None, "is absolute"),
        ("missing.bin", None, "is missing"),
        ("w.bin", 64 * 8 * 4 + 100, r"declares FLOAT \[64, 8\] \(2048 bytes\) but its external data length is 2148"),
    ],
)
def test_bad_external_data_is_an_input_error(tmp_path, location, length, message):
    inner = tmp_path / "inner"
    inner.mkdir()
    path = _with_external_data(inner, location, length=length)
    (tmp_path / "w.bin").write_bytes(b"\0" * 4096)  # what ../w.bin would reach
    with pytest.raises(InputError, match=message):
        load_model(path)


def test_external_data_file_cut_short_is_an_input_error(tmp_path):
    path = _with_external_data(tmp_path, "w.bin")
    (tmp_path / "w.bin").write_bytes((tmp_path / "w.bin").read_bytes()[:-1])
    with pytest.raises(InputError, match="is short: w.bin has 2047 bytes, needs 2048"):
        load_model(path)


def test_symlink_out_of_the_folder_is_refused(tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    path = _with_external_data(inner, "link.bin")
    os.symlink(inner / "w.bin", tmp_path / "outside.bin")
    (inner / "w.bin").rename(tmp_path / "real.bin")
    os.symlink(tmp_path / "real.bin", inner / "link.bin")
    with pytest.raises(InputError, match="escapes"):
        load_model(path)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"this is plainly not a model\n", "not an ONNX model"),
        (b"", "not an ONNX model"),
    ],
)
def test_not_onnx_is_an_input_error(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        load_model(path)


def test_every_truncation_is_an_input_error(tmp_path, fixture_dir):
    data = (fixture_dir / "subgraphs.onnx").read_bytes()
    path = tmp_path / "cut.onnx"
    # Cuts everywhere, including the message boundaries protobuf parses without complaint.
    for cut in range(1, len(data), max(1, len(data) // 300)):
        path.write_bytes(data[:cut])
        with pytest.raises(InputError):
            load_model(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_model(tmp_path / "nope.onnx")
    with pytest.raises(InputError, match="directory"):
        load_model(tmp_path)


def test_save_is_deterministic_and_leaves_no_temporary_files(tmp_path):
    model = one_matmul(np.ones((8, 4), np.float32))
    save_model(model, tmp_path / "a.onnx")
    save_model(model, tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx"]


def test_failed_write_leaves_the_target_absent(tmp_path, monkeypatch):
    model = one_matmul(np.ones((8, 4), np.float32))

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        save_model(model, tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


def test_external_data_round_trip_runs_and_restores_the_proto(tmp_path):
    weight = np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)
    model = one_matmul(weight)
    before = model.SerializeToString(deterministic=True)
    written = save_model(model, tmp_path / "ext.onnx", external_data=True)
    assert model.SerializeToString(deterministic=True) == before
    data_file = tmp_path / "ext.onnx.data"
    assert data_file.stat().st_size == weight.nbytes
    assert written == (tmp_path / "ext.onnx").stat().st_size + weight.nbytes
    x = np.ones((1, 256), np.float32)
    session = ort.InferenceSession(str(tmp_path / "ext.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ weight, rtol=1e-5)
    assert np.array_equal(numpy_helper.to_array(load_model(tmp_path / "ext.onnx").proto.graph.initializer[0]), weight)


def test_output_may_not_overwrite_the_input(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"x")
    with pytest.raises(UsageError, match="--in-place"):
        check_output_path(tmp_path / "." / "m.onnx", path, in_place=False)
    check_output_path(path, path, in_place=True)


def test_loading_never_modifies_the_input(tmp_path, fixture_dir):
    path = tmp_path / "m.onnx"
    path.write_bytes((fixture_dir / "albert.onnx").read_bytes())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    import graphpass

    graphpass.run(path, "tie", output=tmp_path / "out.onnx")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_models_over_the_protobuf_limit_get_external_data(tmp_path, monkeypatch):
    import graphpass.model as model_io

    weight = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    model = one_matmul(weight)
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 1000)  # stand-in for 2 GB
    save_model(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").stat().st_size == weight.nbytes
    reloaded = numpy_helper.to_array(load_model(tmp_path / "big.onnx").proto.graph.initializer[0])
    assert np.array_equal(reloaded, weight)


def test_a_model_onnxruntime_cannot_load_is_exit_2(tmp_path):
    from click.testing import CliRunner

    from graphpass.cli import main

    model = one_matmul(np.ones((4, 4), np.float32))
    model.graph.node[0].op_type = "NoSuchOp"
    model.graph.node[0].domain = "custom.domain"
    model.opset_import.append(helper.make_opsetid("custom.domain", 1))
    path = tmp_path / "custom.onnx"
    path.write_bytes(model.SerializeToString())
    result = CliRunner().invoke(main, ["run", str(path), "-o", str(tmp_path / "o.onnx")])
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert "onnxruntime cannot load" in line
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("external_data", [False, True])
def test_save_compacted_hands_back_the_model_it_wrote(tmp_path, external_data):
    weight = np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)
    model = one_matmul(weight)
    before = model.SerializeToString(deterministic=True)
    written, output = save_compacted(model, tmp_path / "out.onnx", external_data=external_data)
    # Until read back, the large tensors' bytes are only in the written file(s).
    assert bool(output.moved) == external_data and output.reread != external_data
    assert output.proto.ByteSize() < weight.nbytes
    compact = output.inline(tmp_path / "out.onnx")
    assert not output.moved and compact.SerializeToString(deterministic=True) == before
    assert load_model(tmp_path / "out.onnx").proto.SerializeToString(deterministic=True) == before
    files = [p for p in tmp_path.iterdir()]
    assert written == sum(p.stat().st_size for p in files)
    assert sorted(p.name for p in files) == ["out.onnx"] + (["out.onnx.data"] if external_data else [])
    x = np.ones((1, 256), np.float32)
    session = ort.InferenceSession(str(tmp_path / "out.onnx"), providers=["CPUExecutionProvider"])
    assert np.allclose(session.run(None, {"x": x})[0], x @ weight, rtol=1e-5, atol=1e-5)


def test_run_into_a_missing_folder_is_a_usage_error(tmp_path, fixture_dir):
    from graphpass import run

    with pytest.raises(UsageError, match="does not exist"):
        run(fixture_dir / "albert.onnx", "tie", output=tmp_path / "missing" / "out.onnx", verify=False)
