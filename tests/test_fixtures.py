"""Tests for the ONNX fixture generator in fixtures/generate.py."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from conftest import FIXTURES_DIR, load_fixture_module

gen = load_fixture_module()
NAMES = list(gen.FIXTURES)
DIM_VALUES = {"batch": 3, "N": 2, "seq": 9, "?": 2}

_ORT_TYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64,
}


@pytest.fixture(scope="module")
def models() -> dict[str, onnx.ModelProto]:
    return {name: gen.build(name) for name in NAMES}


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(gen.serialize(model), providers=["CPUExecutionProvider"])


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _vocab_for(model: onnx.ModelProto, input_name: str) -> int:
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[1] == input_name and node.input[0] in inits:
            return inits[node.input[0]].dims[0]
    raise AssertionError(f"no Gather consumes {input_name}")


def _shape(vi: onnx.ValueInfoProto) -> list:
    """Sizes and symbols; "?" for a dynamic size with no name (unset, or -1 as older exporters wrote it)."""
    return [d.dim_param if d.HasField("dim_param") else d.dim_value if d.HasField("dim_value") and d.dim_value != -1
            else "?" for d in vi.type.tensor_type.shape.dim]


def _random_feeds(model: onnx.ModelProto, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for vi in model.graph.input:
        shape = [DIM_VALUES[d] if isinstance(d, str) else d for d in _shape(vi)]
        dtype = _ORT_TYPES[vi.type.tensor_type.elem_type]
        if dtype == np.int64:
            feeds[vi.name] = rng.integers(0, _vocab_for(model, vi.name), size=shape, dtype=np.int64)
        else:
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


# --------------------------------------------------------------------------
# Generic checks for every fixture
# --------------------------------------------------------------------------


def test_registry():
    assert NAMES[:13] == ["mlp", "cnn", "transformer", "transformer_untied", "albert",
                          "subgraphs", "negated", "scaled", "near_copies",
                          "conv_repeated_filters", "mlp_fp16", "mlp_opset13", "example"]
    with pytest.raises(KeyError):
        gen.build("no_such_fixture")


@pytest.mark.parametrize("name", NAMES)
def test_checker_full(models, name):
    model = models[name]
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    opset = {o.domain: o.version for o in model.opset_import}
    assert opset.get("", opset.get("ai.onnx")) == (13 if name == "mlp_opset13" else 17)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic(name):
    assert gen.serialize(gen.build(name)) == gen.serialize(gen.build(name))


@pytest.mark.parametrize("name", NAMES)
def test_size(models, name):
    limit = 1_000_000 if name == "example" else 2_000_000
    assert len(gen.serialize(models[name])) < limit


@pytest.mark.parametrize("name", NAMES)
def test_runs_in_onnxruntime(models, name):
    model = models[name]
    feeds = _random_feeds(model, np.random.default_rng(0))
    outputs = _session(model).run(None, feeds)
    assert len(outputs) == len(model.graph.output)
    for vi, out in zip(model.graph.output, outputs):
        assert out.dtype == _ORT_TYPES[vi.type.tensor_type.elem_type]
        expected = [DIM_VALUES[d] if isinstance(d, str) else d for d in _shape(vi)]
        assert list(out.shape) == expected
        assert np.isfinite(out).all()
        assert np.abs(out).max() > 0


@pytest.mark.parametrize("name", NAMES)
def test_dynamic_dims(models, name):
    for vi in list(models[name].graph.input) + list(models[name].graph.output):
        assert isinstance(_shape(vi)[0], str), f"{vi.name}: batch dim must be dynamic"


@pytest.mark.parametrize("name", [n for n in NAMES if n != "mlp_fp16"])
def test_weights_look_trained(models, name):
    """Large weight matrices are heavy-tailed with outliers, not uniform noise."""
    big = [w for w in _inits(models[name]).values()
           if w.dtype == np.float32 and w.ndim >= 2 and w.size >= 256]
    assert big
    for w in big:
        z = (w - w.mean()) / w.std()
        kurtosis = float(np.mean(z ** 4))
        assert kurtosis > 4.0, kurtosis  # Gaussian = 3, uniform = 1.8
        assert np.abs(z).max() > 5.0  # outliers


def test_example_on_disk_is_fresh():
    path = FIXTURES_DIR / "example.onnx"
    assert path.exists(), "run: python fixtures/generate.py --example"
    assert path.read_bytes() == gen.serialize(gen.build("example")), \
        "fixtures/example.onnx is stale; run: python fixtures/generate.py --example"


def test_cli_writes_files(tmp_path):
    assert gen.main([str(tmp_path), "mlp", "scaled"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "scaled.onnx"]
    assert (tmp_path / "mlp.onnx").read_bytes() == gen.serialize(gen.build("mlp"))


# --------------------------------------------------------------------------
# Fixture-specific properties
# --------------------------------------------------------------------------


def _pairs_same_shape(model):
    inits = _inits(model)
    for (na, a), (nb, b) in itertools.combinations(inits.items(), 2):
        if a.shape == b.shape and a.size >= 100 and a.dtype == b.dtype:
            yield na, a, nb, b


def test_negated(models):
    hits = [(na, nb) for na, a, nb, b in _pairs_same_shape(models["negated"])
            if np.array_equal(a, -b)]
    assert len(hits) == 1


def test_scaled(models):
    hits = [(na, nb) for na, a, nb, b in _pairs_same_shape(models["scaled"])
            if np.array_equal(b, a * np.float32(0.5)) or np.array_equal(a, b * np.float32(0.5))]
    assert len(hits) == 1


def test_near_copies(models):
    hits = []
    for na, a, nb, b in _pairs_same_shape(models["near_copies"]):
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        rel = np.linalg.norm(a64 - b64) / np.linalg.norm(a64)
        if rel < 1e-5:
            hits.append((na, nb, rel, a, b))
    assert len(hits) == 1
    _, _, rel, a, b = hits[0]
    assert a.tobytes() != b.tobytes()
    assert np.count_nonzero(a != b) > a.size // 4
    assert 5e-8 <= rel <= 5e-7


def test_transformer_tied(models):
    model = models["transformer"]
    inits = _inits(model)
    E = inits["embed_tokens.weight"]
    assert E.shape == (512, 64)
    assert not any(np.array_equal(w, E.T) for w in inits.values() if w.shape == (64, 512))
    transposes = [n for n in model.graph.node
                  if n.op_type == "Transpose" and n.input[0] == "embed_tokens.weight"]
    assert len(transposes) == 1
    head = [n for n in model.graph.node if "logits" in n.output]
    assert head[0].op_type == "MatMul" and head[0].input[1] == transposes[0].output[0]
    # 4 blocks with distinct weights
    qs = [inits[f"blocks.{i}.attn.q_proj.weight"] for i in range(4)]
    assert all(not np.array_equal(a, b) for a, b in itertools.combinations(qs, 2))


@pytest.mark.parametrize("name,vocab", [("transformer_untied", 512), ("example", 256)])
def test_untied_has_transposed_copy(models, name, vocab):
    inits = _inits(models[name])
    E = inits["embed_tokens.weight"]
    assert E.shape == (vocab, 64)
    copies = [n for n, w in inits.items() if w.shape == E.T.shape and np.array_equal(w, E.T)]
    assert len(copies) == 1


def test_albert_blocks_share_values(models):
    inits = _inits(models["albert"])
    assert inits["embed_tokens.weight"].shape == (512, 32)
    assert inits["embed_proj.weight"].shape == (32, 64)
    suffixes = {k.split(".", 2)[2] for k in inits if k.startswith("blocks.")}
    assert len(suffixes) == 16
    for suffix in suffixes:
        vals = [inits[f"blocks.{i}.{suffix}"] for i in range(4)]
        assert all(np.array_equal(vals[0], v) for v in vals[1:]), suffix


@pytest.mark.parametrize("name", ["transformer", "transformer_untied", "albert", "example"])
def test_transformer_is_causal(models, name):
    model = models[name]
    rng = np.random.default_rng(1)
    ids = rng.integers(0, _vocab_for(model, "input_ids"), size=(2, 8), dtype=np.int64)
    ids2 = ids.copy()
    ids2[:, 5:] = (ids2[:, 5:] + 1) % _vocab_for(model, "input_ids")
    sess = _session(model)
    a = sess.run(None, {"input_ids": ids})[0]
    b = sess.run(None, {"input_ids": ids2})[0]
    np.testing.assert_allclose(a[:, :5], b[:, :5], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[:, 5:], b[:, 5:])


def test_transformer_blocks_structurally_identical(models):
    ops = {}
    for node in models["transformer"].graph.node:
        if node.name.startswith("/blocks."):
            block = node.name.split("/")[1]
            ops.setdefault(block, []).append(node.op_type)
    assert len(ops) == 4
    assert len({tuple(v) for v in ops.values()}) == 1


def test_conv_repeated_filters(models):
    inits = _inits(models["conv_repeated_filters"])
    w1, w2 = inits["conv1.weight"], inits["conv2.weight"]
    assert w1.shape == (32, 3, 3, 3)
    assert len(np.unique(w1.reshape(32, -1), axis=0)) == 8
    n2 = len(np.unique(w2.reshape(w2.shape[0], -1), axis=0))
    assert 8 <= n2 < w2.shape[0]


def test_mlp_fp16(models):
    model = models["mlp_fp16"]
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    for vi in list(model.graph.input) + list(model.graph.output):
        assert vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


# --------------------------------------------------------------------------
# subgraphs: numpy reference for every path through the (nested) If
# --------------------------------------------------------------------------


def _subgraph_weights(model):
    w = _inits(model)
    for node in model.graph.node:
        if node.op_type == "Constant":
            attr = node.attribute[0]
            if attr.name == "value":
                w[node.name] = numpy_helper.to_array(attr.t)
            else:
                assert attr.name == "value_floats"
                w[node.name] = np.array(attr.floats, dtype=np.float32)
    (if_node,) = [n for n in model.graph.node if n.op_type == "If"]
    branches = {a.name: a.g for a in if_node.attribute}
    then_g, else_g = branches["then_branch"], branches["else_branch"]
    for init in then_g.initializer:
        w[init.name] = numpy_helper.to_array(init)
    for node in then_g.node:
        if node.op_type == "Constant":
            w[node.name] = numpy_helper.to_array(node.attribute[0].t)
        if node.op_type == "If":
            nested = {a.name: a.g for a in node.attribute}
            for init in nested["then_branch"].initializer:
                w[init.name] = numpy_helper.to_array(init)
    return w, then_g, else_g


def _subgraph_reference(w, x, path):
    h = np.maximum(x @ w["/fc_in/Constant"] + w["/fc_in/Constant_bias"], 0)
    if path == "else":
        t = np.tanh(h @ w["else_fc.weight"])
    else:
        t = np.maximum(h @ w["/then/Constant"], 0) @ w["then_fc_mix.weight"]
        if path == "then/then":
            t = np.tanh(t @ w["nested_fc.weight"])
    y = np.maximum(t @ w["fc_mix.weight"], 0)
    return y @ w["head.weight"] + w["head.bias"]


def test_subgraphs_structure(models):
    model = models["subgraphs"]
    w, then_g, else_g = _subgraph_weights(model)
    consts = [n for n in model.graph.node if n.op_type == "Constant"]
    assert {a.name for n in consts for a in n.attribute} == {"value", "value_floats"}
    assert any(n.op_type == "Constant" for n in then_g.node)
    assert len(then_g.initializer) == 1
    assert any(n.op_type == "If" for n in then_g.node)
    # else-branch reads a top-level initializer from the outer scope
    top = {t.name for t in model.graph.initializer}
    assert not else_g.initializer
    assert any(i in top for n in else_g.node for i in n.input)
    # duplicate between top graph and branch
    assert np.array_equal(w["then_fc_mix.weight"], w["fc_mix.weight"])
    assert "then_fc_mix.weight" not in top


def test_subgraphs_all_branches(models):
    model = models["subgraphs"]
    w, _, _ = _subgraph_weights(model)
    sess = _session(model)
    rng = np.random.default_rng(2)
    base = rng.standard_normal((1, 32)).astype(np.float32)
    base -= base.mean()  # sum ~ 0, then shift to hit each path
    cases = {
        "else": base - 0.5,          # sum = -16
        "then/else": base + 0.15,    # sum = 4.8  (0 < sum <= 10)
        "then/then": base + 1.0,     # sum = 32   (sum > 10)
    }
    results = {}
    for path, x in cases.items():
        x = np.repeat(x, 2, axis=0).astype(np.float32)
        got = sess.run(None, {"x": x})[0]
        results[path] = got
        expected = _subgraph_reference(w, x, path)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        for other in cases:
            if other != path:
                assert not np.allclose(got, _subgraph_reference(w, x, other), rtol=1e-3, atol=1e-4), \
                    f"{path} indistinguishable from {other}"
