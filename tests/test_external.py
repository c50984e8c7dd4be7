"""Weights left in the input's external data file (graphpass.external): read through memory maps,
copied file to file when written, the input never touched, the output bytes those of a model
whose weights were read in."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

import graphpass
import graphpass.external as external
from fixtures.generate import one_matmul
from fixtures.synthetic import write_tanh_chain
from graphpass.edit import Model
from graphpass.errors import InputError, UsageError
from graphpass.model import load_model, save_compacted, save_model, serialized_bytes


@pytest.fixture
def chain(tmp_path) -> Path:
    """Three 64x64 float32 MatMuls (16 KB each) in one external data file, in a folder of its own."""
    folder = tmp_path / "input"
    folder.mkdir()
    return write_tanh_chain(folder / "chain.onnx", layers=3, dim=64)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_mapped_weights_read_what_the_file_holds_and_stay_out_of_the_protobuf(chain):
    mapped, read_in = load_model(chain, map_external=True), load_model(chain)
    values = {t.name: numpy_helper.to_array(t) for t in read_in.proto.graph.initializer}
    weights = Model(mapped.proto).weights()
    assert sorted(w.name for w in weights) == sorted(values)
    for weight in weights:
        value = weight.read()
        assert not value.flags.writeable  # as a view over raw_data is
        np.testing.assert_array_equal(value, values[weight.name])
    assert all(external.is_mapped(t) for t in mapped.proto.graph.initializer)
    assert mapped.proto.ByteSize() < 3 * 64 * 64 * 4 / 10
    assert mapped.file_bytes == read_in.file_bytes and mapped.data_files == read_in.data_files
    assert serialized_bytes(mapped.proto) == serialized_bytes(read_in.proto)


@pytest.mark.parametrize("external_data", [False, True])
def test_a_mapped_model_is_written_as_one_read_in_and_comes_back_mapped(chain, tmp_path, external_data):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    save_model(load_model(chain).proto, tmp_path / "a" / "out.onnx", external_data=external_data)
    mapped = load_model(chain, map_external=True).proto
    before = mapped.SerializeToString(deterministic=True)
    save_model(mapped, tmp_path / "b" / "out.onnx", external_data=external_data)
    assert mapped.SerializeToString(deterministic=True) == before  # still pointing at the input's file
    assert _files(tmp_path / "b") == _files(tmp_path / "a")


@pytest.mark.parametrize("external_data", [False, True])
def test_save_compacted_of_a_mapped_model_hands_back_every_tensor(chain, tmp_path, external_data):
    read_in = load_model(chain).proto
    written, output = save_compacted(load_model(chain, map_external=True).proto, tmp_path / "out.onnx",
                                     external_data=external_data)
    compact = output.inline(tmp_path / "out.onnx")
    assert not any(external.is_mapped(t) for t in compact.graph.initializer)
    assert serialized_bytes(compact) == serialized_bytes(read_in)


def test_without_copy_file_range_the_bytes_go_through_in_chunks(chain, tmp_path, monkeypatch):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    save_model(load_model(chain, map_external=True).proto, tmp_path / "a" / "out.onnx", external_data=True)
    monkeypatch.setattr(external, "_kernel_copy", lambda *args: 0)
    monkeypatch.setattr(external, "COPY_CHUNK_BYTES", 1000)  # several chunks per tensor
    save_model(load_model(chain, map_external=True).proto, tmp_path / "b" / "out.onnx", external_data=True)
    assert _files(tmp_path / "b") == _files(tmp_path / "a")


def test_a_data_file_cut_short_after_load_is_an_input_error_and_writes_nothing(chain, tmp_path):
    mapped = load_model(chain, map_external=True).proto
    data = chain.with_name(chain.name + ".data")
    with open(data, "r+b") as handle:
        handle.truncate(data.stat().st_size // 2)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match="changed while graphpass read it"):
        save_model(mapped, out / "o.onnx", external_data=True)
    assert list(out.iterdir()) == []


def test_reading_a_weight_whose_data_file_was_cut_short_after_load_is_an_input_error(chain):
    weight = Model(load_model(chain, map_external=True).proto).weights()[-1]
    data = chain.with_name(chain.name + ".data")
    with open(data, "r+b") as handle:
        handle.truncate(data.stat().st_size - 1)
    with pytest.raises(InputError, match=f"changed while graphpass read it \\(tensor '{weight.name}'\\)"):
        weight.read()


def test_small_external_tensors_are_read_in(tmp_path):
    weight = np.arange(16, dtype=np.float32).reshape(4, 4)  # 64 bytes: the writer keeps it inline
    (tmp_path / "w.bin").write_bytes(weight.tobytes())
    model = one_matmul(weight)
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "w.bin"), ("offset", "0"), ("length", "64")):
        tensor.external_data.add(key=key, value=value)
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    loaded = load_model(tmp_path / "m.onnx", map_external=True).proto.graph.initializer[0]
    assert loaded.data_location != TensorProto.EXTERNAL
    np.testing.assert_array_equal(numpy_helper.to_array(loaded), weight)


@pytest.mark.parametrize("in_place", [False, True])
def test_a_run_only_reads_its_input(chain, tmp_path, in_place):
    """Lossy, so the output's data replaces the input's when written in place: the input's data
    file must be read to the end before it goes."""
    before = _digests(chain.parent)
    output = chain if in_place else tmp_path / "out.onnx"
    result = graphpass.run(chain, "kmeans(bits=4)", output=output, external_data=True, in_place=in_place,
                           budget=graphpass.verify.Budget(min_cosine=0.9))
    assert result.passed and result.written == output
    if not in_place:
        assert _digests(chain.parent) == before
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": x})[0].shape == (2, 64)
    assert all(not external.is_mapped(t) for t in result.model.graph.initializer)


def test_an_output_whose_data_file_is_the_inputs_is_refused_before_anything_is_written(chain):
    """A model file renamed away from its data file: writing the old name would replace the data
    the input still reads."""
    renamed = chain.with_name("model.onnx")
    chain.rename(renamed)
    before = _digests(chain.parent)
    with pytest.raises(UsageError, match="would overwrite the input's external data"):
        graphpass.run(renamed, "kmeans(bits=4)", output=chain, external_data=True)
    assert _digests(chain.parent) == before
