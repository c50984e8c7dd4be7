"""graphpass.lowering.lookup: layouts, index packing and the lookup nodes, run in onnxruntime.

Every lookup here replaces the only weight of a model whose output is that weight, so running
the model *is* reconstructing the weight; graphpass.verify runs it at both optimisation levels
against a model that stores the expected values, with a zero error budget.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphpass.lowering import lookup
from graphpass.edit import Model
from graphpass.lowering.lookup import Layout, Outliers
from graphpass.verify import Budget, verify
from graphpass.weights import Replacement

EXACT = Budget(atol=0.0, rtol=0.0)
RNG_SEED = 7

# (shape, output-channel axis): a MatMul weight, a Conv weight, an embedding, a vector.
SHAPES = [((48, 40), 1), ((8, 3, 3, 3), 0), ((64, 32), 0), ((100,), None)]


def weight_model(values: np.ndarray, opset: int, ir_version: int) -> onnx.ModelProto:
    dtype = helper.np_dtype_to_tensor_dtype(values.dtype)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["W"], ["out"])], "weight", [],
        [helper.make_tensor_value_info("out", dtype, list(values.shape))],
        initializer=[numpy_helper.from_array(values, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def replaced(values: np.ndarray, opset: int, ir_version: int, build) -> tuple[onnx.ModelProto, lookup.LookupCost]:
    """The weight model with W replaced by what `build(r)` emits."""
    proto = weight_model(values, opset, ir_version)
    weight = Model(proto).weights()[0]
    r = Replacement(weight)
    weight.replace_with(r, result=build(r))
    onnx.checker.check_model(proto)
    return proto, lookup.cost_of(r)


def assert_rebuilds(candidate: onnx.ModelProto, expected: np.ndarray) -> None:
    reference = weight_model(expected, 21, 10)
    result = verify(reference.SerializeToString(), candidate.SerializeToString(), {}, EXACT)
    assert result.passed, result.failures


def layout_of(shape, axis, granularity: str, group_size: int = 16) -> Layout:
    if granularity == "tensor":
        return Layout.per_tensor(shape)
    if granularity == "channel":
        return Layout.per_channel(shape, axis)
    return Layout.per_group(shape, axis, group_size)


def random_binning(layout: Layout, k: int, rng) -> tuple[np.ndarray, np.ndarray]:
    codebook = np.sort(rng.normal(size=(layout.groups, k)), axis=1)
    labels = rng.integers(0, k, size=(layout.groups, layout.group_size)).astype(np.uint16)
    return codebook, labels


def expected_weight(layout: Layout, codebook, labels, dtype=np.float32) -> np.ndarray:
    values = np.take_along_axis(codebook.astype(dtype), labels.astype(np.intp), axis=1)
    return np.ascontiguousarray(layout.merge(values).reshape(layout.shape))


# -- layouts --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_split_and_merge_are_inverse(shape, axis, granularity):
    layout = layout_of(shape, axis, granularity)
    array = np.arange(int(np.prod(shape))).reshape(shape)
    groups = layout.split(array)
    assert groups.shape == (layout.groups, layout.group_size)
    assert np.array_equal(layout.merge(groups).reshape(shape), array)


def test_channel_groups_follow_the_output_channel():
    matmul = Layout.per_channel((6, 4), axis=1)  # [in, out]: a group is one column
    assert np.array_equal(matmul.split(np.arange(24).reshape(6, 4))[1], np.arange(24).reshape(6, 4)[:, 1])
    conv = Layout.per_channel((4, 2, 3, 3), axis=0)  # [out, in, kh, kw]: a group is one filter
    assert np.array_equal(conv.split(np.arange(72).reshape(4, 2, 3, 3))[3], np.arange(54, 72))
    blocks = Layout.per_group((8, 3), axis=1, group_size=4)  # column 0, rows 4..7 is group 3
    assert np.array_equal(blocks.split(np.arange(24).reshape(8, 3))[3], [12, 15, 18, 21])


def test_layout_fallbacks():
    assert Layout.per_channel((100,), 0).granularity == "tensor"
    assert Layout.per_channel((2, 5, 7), 1).channel_axis == 0  # a middle axis falls back to the first
    assert Layout.per_group((64, 10), 1, 128).granularity == "channel"  # channel shorter than a group
    odd = Layout.per_group((96, 10), 1, 64)  # 96 = 2 x 48: the largest divisor >= 32
    assert (odd.granularity, odd.group_size) == ("group", 48)
    assert Layout.per_group((97, 10), 1, 64).granularity == "channel"  # 97 is prime


# -- packing --------------------------------------------------------------------------------


@pytest.mark.parametrize("k,opset,ir,name,bits", [
    (16, 13, 8, "base16x2/uint8", 4),
    (16, 21, 10, "uint4", 4),
    (16, 21, 9, "base16x2/uint8", 4),  # UINT4 needs IR 10 as well
    (4, 21, 10, "base4x4/uint8", 2),  # crumbs in a byte beat UINT4
    (4, 25, 11, "uint2", 2),
    (2, 25, 11, "base2x8/uint8", 1),
    (3, 13, 8, "base3x5/uint8", 1.6),
    (9, 21, 10, "base9x5/uint16", 3.2),
    (5, 13, 8, "base5x13/int32", 32 / 13),
    # Where digits waste bits, bit planes of 1, 2, 4 and 8 bits store exactly log2(k).
    (8, 13, 8, "planes(base4x4/uint8+base2x8/uint8)", 3),  # not 3.2 (base-8 digits in uint16)
    (64, 13, 8, "planes(base16x2/uint8+base4x4/uint8)", 6),  # not 6.4 (base-64 digits in int32)
    (32, 21, 10, "planes(uint4+base2x8/uint8)", 5),
    (128, 13, 8, "planes(base16x2/uint8+base4x4/uint8+base2x8/uint8)", 7),  # not a byte
    (256, 13, 8, "uint8", 8),
    (1000, 13, 8, "planes(uint8+base4x4/uint8)", 10),  # not 10.67 (base-1000 digits in int32)
    (40000, 13, 8, "uint16", 16),
])
def test_choose_packing(k, opset, ir, name, bits):
    packing = lookup.choose_packing(k, opset, ir)
    assert packing.name == name
    assert packing.bits_per_index == pytest.approx(bits)


@pytest.mark.parametrize("k", [8, 64, 1000])
def test_whole_words_and_digits_only_leave_out_bit_planes(k):
    assert lookup.choose_packing(k, 13, 8, planes=False).name.startswith(f"base{k}x")
    assert isinstance(lookup.choose_packing(k, 13, 8, whole_bytes=True), lookup.Packing)


def test_packing_needs_gather_elements():
    with pytest.raises(ValueError, match="opset"):
        lookup.choose_packing(16, 10, 8)


@pytest.mark.parametrize("k", [2, 3, 4, 5, 7, 8, 16, 17, 64, 255, 256, 300])
@pytest.mark.parametrize("opset,ir", [(13, 8), (21, 10), (25, 11)])
def test_pack_unpack_roundtrip(k, opset, ir):
    rng = np.random.default_rng(k)
    indices = rng.integers(0, k, size=(7, 13))
    packing = lookup.choose_packing(k, opset, ir)
    stored = lookup.pack_indices(indices, packing)
    assert np.array_equal(lookup.unpack_indices(stored, packing, indices.shape), indices)
    arrays = stored if isinstance(stored, tuple) else (stored,)  # bit planes store one array each
    assert sum(numpy_helper.from_array(a).ByteSize() for a in arrays) < packing.stored_bytes(indices.size) + 32 * len(arrays)


# -- lookups in onnxruntime -----------------------------------------------------------------

# Each packing path at the lowest opset that has it (opset-13 models use digit arithmetic).
PACKING_PATHS = [
    (16, 13, 8),  # nibbles in uint8, Div/Mod on int32
    (16, 21, 10),  # native UINT4
    (4, 25, 11),  # native UINT2
    (2, 21, 10),  # bits in uint8
    (3, 13, 8),  # base-3 digits, 5 per byte
    (9, 17, 8),  # base-9 digits, 5 per uint16
    (5, 13, 8),  # base-5 digits, 13 per int32
    (64, 17, 8),  # base-64 digits, 5 per int32 (on weights this small, bit planes save too little)
    (256, 13, 8),  # plain uint8
    (300, 13, 8),  # base-300 digits, 3 per int32
    (2000, 13, 8),  # plain uint16 (base-2000 digits would take 16 bits each too)
]


@pytest.mark.parametrize("k,opset,ir", PACKING_PATHS)
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_lookup_rebuilds_codebook_values_exactly(k, opset, ir, granularity):
    rng = np.random.default_rng(RNG_SEED)
    for shape, axis in SHAPES[:3]:
        layout = layout_of(shape, axis, granularity)
        codebook, labels = random_binning(layout, k, rng)
        values = rng.normal(size=shape).astype(np.float32)
        model, cost = replaced(values, opset, ir, lambda r: lookup.emit_lookup(
            r, codebook, labels, layout, opset=opset, ir_version=ir))
        assert model.opset_import[0].version == opset  # never raised
        assert_rebuilds(model, expected_weight(layout, codebook, labels))
        if lookup.per_row_codebooks(layout):  # packed within rows, whole bytes, for row Gathers
            assert cost.index_bytes == lookup.row_digits_bytes(k, layout, opset, ir)
        else:
            assert cost.index_bytes == lookup.choose_packing(k, opset, ir, count=values.size).stored_bytes(values.size)


# Bit planes on weights whose saving outweighs the planes' nodes: (k, opset, IR, planes).
PLANE_PATHS = [
    (64, 13, 8, 2),  # 4 + 2 bits, digits in uint8, Div/Mod on int32
    (32, 21, 10, 2),  # 4 bits as native UINT4, + 1 bit
    (128, 17, 8, 3),  # 4 + 2 + 1 bits
    (1024, 13, 8, 2),  # 8 bits as plain uint8, + 2 bits
]


@pytest.mark.parametrize("k,opset,ir,planes", PLANE_PATHS)
@pytest.mark.parametrize("granularity", ["channel", "group"])  # one large per-tensor codebook stores tuples
def test_bit_planes_rebuild_exactly_in_log2_k_bits(k, opset, ir, planes, granularity):
    rng = np.random.default_rng(k)
    shape = (8, 128, 5, 5)  # a Conv filter: 25600 indices, where planes save 1.3 KB or more
    layout = layout_of(shape, 0, granularity, group_size=640)
    codebook, labels = random_binning(layout, k, rng)
    model, cost = replaced(np.zeros(shape, np.float32), opset, ir, lambda r: lookup.emit_lookup(
        r, codebook, labels, layout, opset=opset, ir_version=ir))
    assert model.opset_import[0].version == opset  # never raised
    assert_rebuilds(model, expected_weight(layout, codebook, labels))
    packing = lookup.choose_packing(k, opset, ir, count=labels.size)
    assert isinstance(packing, lookup.Planes) and len(packing.parts) == planes
    assert cost.index_bytes == packing.stored_bytes(labels.size) == -(-labels.size * int(np.log2(k)) // 8)


def test_bit_planes_only_where_they_save_more_than_their_nodes():
    saving = 1024 * 8 / 0.4  # 6-bit indices: 0.4 bits per index less than base-64 digits
    assert isinstance(lookup.choose_packing(64, 13, 8, count=int(saving * 1.1)), lookup.Planes)
    assert not isinstance(lookup.choose_packing(64, 13, 8, count=int(saving * 0.9)), lookup.Planes)


def test_opset_13_lookup_unpacks_with_integer_arithmetic():
    rng = np.random.default_rng(1)
    layout = Layout.per_tensor((64, 32))
    codebook, labels = random_binning(layout, 16, rng)
    model, _ = replaced(np.zeros((64, 32), np.float32), 13, 8,
                        lambda r: lookup.emit_lookup(r, codebook, labels, layout, opset=13, ir_version=8))
    ops = [n.op_type for n in model.graph.node]
    assert {"Div", "Mod", "GatherElements"} <= set(ops)
    assert all(t.data_type != TensorProto.UINT4 for t in model.graph.initializer)


@pytest.mark.parametrize("dtype,table,opset", [
    (np.float16, TensorProto.FLOAT16, 13),
    (ml_dtypes.bfloat16, TensorProto.BFLOAT16, 13),
    (np.float64, TensorProto.DOUBLE, 13),
    (np.float32, TensorProto.FLOAT16, 21),  # float16 table, cast to float32 before the gather
])
def test_lookup_produces_the_weight_dtype(dtype, table, opset):
    rng = np.random.default_rng(2)
    layout = Layout.per_channel((32, 24), 1)
    codebook, labels = random_binning(layout, 16, rng)
    values = rng.normal(size=(32, 24)).astype(dtype)
    weight_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    model, cost = replaced(values, opset, 10, lambda r: lookup.emit_lookup(
        r, codebook, labels, layout, stored_dtype=table, opset=opset, ir_version=10))
    rounded = lookup.stored_table(codebook, weight_type, table)
    assert_rebuilds(model, expected_weight(layout, rounded, labels, dtype=rounded.dtype))
    table_tensor = next(t for t in model.graph.initializer if "lut_codebook" in t.name)
    assert table_tensor.data_type == table


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_row_lookup_rebuilds_units_along_any_axis(axis):
    rng = np.random.default_rng(8)
    shape = (6, 3, 4)
    count = shape[axis]
    rest = shape[:axis] + shape[axis + 1 :]
    table = rng.normal(size=(5, int(np.prod(rest)))).astype(np.float32)
    indices = rng.integers(0, 5, size=count)
    expected = np.moveaxis(table[indices].reshape((count,) + rest), 0, axis)
    for opset, ir in ((13, 8), (21, 10)):
        model, cost = replaced(np.zeros(shape, np.float32), opset, ir, lambda r: lookup.emit_row_lookup(
            r, r.stored("lut_rows", table), indices, table_rows=len(table), axis=axis, opset=opset, ir_version=ir))
        assert_rebuilds(model, expected)
        assert cost.table_bytes == table.nbytes


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("k,opset,ir", [(16, 13, 8), (64, 17, 8), (16, 21, 10)])
@pytest.mark.parametrize("granularity", ["channel", "group"])
def test_byte_tables_rebuild_exactly_what_the_codec_is_told(dtype, k, opset, ir, granularity):
    """A byte per codebook entry, a float16 scale and offset per row: the weight rebuilt in
    onnxruntime is exactly `stored_table`'s values, which the codecs assign labels against."""
    rng = np.random.default_rng(RNG_SEED)
    weight_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    for shape, axis in SHAPES[:3]:
        layout = layout_of(shape, axis, granularity)
        codebook, labels = random_binning(layout, k, rng)
        model, cost = replaced(rng.normal(size=shape).astype(dtype), opset, ir, lambda r: lookup.emit_lookup(
            r, codebook, labels, layout, stored_dtype=lookup.BYTE_TABLE, opset=opset, ir_version=ir))
        rounded = lookup.stored_table(codebook, weight_type, lookup.BYTE_TABLE)
        assert np.abs(rounded - codebook).max() <= (codebook.max(1) - codebook.min(1)).max() / 255
        assert_rebuilds(model, expected_weight(layout, rounded, labels, dtype=dtype))
        (table,) = [t for t in model.graph.initializer if t.name.endswith("lut_codebook")]
        assert table.data_type == TensorProto.UINT8
        assert cost.table_bytes == lookup.table_bytes(lookup.BYTE_TABLE, layout.groups, k)
        assert not any(n.op_type == "DequantizeLinear" for n in model.graph.node)  # which ORT would not fold


def test_byte_tables_rows_decode_after_the_gather():
    rng = np.random.default_rng(12)
    shape = (1000, 96)
    layout = Layout.per_channel(shape, 0)
    codebook, labels = random_binning(layout, 32, rng)
    proto = embedding_model(rng.normal(size=shape).astype(np.float32), [(2, 3)], False)
    weight = Model(proto).weights()[0]
    r = Replacement(weight)
    weight.replace_with(r, result=lookup.emit_lookup(r, codebook, labels, layout, stored_dtype=lookup.BYTE_TABLE,
                                                     opset=13, ir_version=8))
    onnx.checker.check_model(proto, full_check=True)
    rounded = lookup.stored_table(codebook, TensorProto.FLOAT, lookup.BYTE_TABLE)
    reference = embedding_model(expected_weight(layout, rounded, labels), [(2, 3)], False)
    feeds = {"ids0": rng.integers(0, shape[0], size=(2, 3)).astype(np.int64)}
    result = verify(reference.SerializeToString(), proto.SerializeToString(), feeds, EXACT)
    assert result.passed, result.failures
    assert not [n for n in proto.graph.node if n.output[0] == "W"]  # rows decode after the gather


def test_table_dtype_never_widens():
    assert lookup.table_dtype(TensorProto.FLOAT16, TensorProto.FLOAT) == TensorProto.FLOAT16
    assert lookup.table_dtype(TensorProto.FLOAT, TensorProto.FLOAT16) == TensorProto.FLOAT16
    assert lookup.table_dtype(TensorProto.BFLOAT16, TensorProto.FLOAT16) == TensorProto.BFLOAT16
    assert lookup.table_dtype(TensorProto.FLOAT16, lookup.BYTE_TABLE) == lookup.BYTE_TABLE
    assert lookup.table_dtype(TensorProto.BFLOAT16, lookup.BYTE_TABLE) == TensorProto.BFLOAT16


@pytest.mark.parametrize("granularity,opset,ir,q_type", [
    ("tensor", 13, 8, TensorProto.UINT8),
    ("channel", 13, 8, TensorProto.UINT8),
    ("channel", 21, 10, TensorProto.UINT4),
    ("group", 21, 10, TensorProto.UINT4),
])
def test_dequantize_rebuilds_affine_codebook(granularity, opset, ir, q_type):
    rng = np.random.default_rng(3)
    layout = layout_of((64, 24), 1, granularity, group_size=32)
    quantized = rng.integers(0, 16, size=(layout.groups, layout.group_size))
    scale = rng.uniform(0.01, 0.1, size=layout.groups).astype(np.float32)
    zero_point = rng.integers(0, 16, size=layout.groups)
    model, cost = replaced(np.zeros((64, 24), np.float32), opset, ir, lambda r: lookup.emit_dequantize(
        r, quantized, scale, zero_point, layout, opset=opset, ir_version=ir))
    expected = (quantized - zero_point[:, None]).astype(np.float32) * scale[:, None]
    assert_rebuilds(model, np.ascontiguousarray(layout.merge(expected).reshape(64, 24)))
    assert next(t for t in model.graph.initializer if "lut_quantized" in t.name).data_type == q_type
    assert cost.table_bytes > 0 and cost.index_bytes == (64 * 24 * (4 if q_type == TensorProto.UINT4 else 8)) // 8


def test_blocked_dequantize_needs_opset_21():
    layout = Layout.per_group((64, 24), 1, 32)
    assert not lookup.dequantize_supported(layout, 20)
    assert lookup.dequantize_supported(layout, 21)
    assert lookup.dequantize_supported(Layout.per_channel((64, 24), 1), 13)


def test_outliers_are_kept_exactly():
    rng = np.random.default_rng(4)
    layout = Layout.per_tensor((40, 30))
    codebook, labels = random_binning(layout, 4, rng)
    positions = np.array([0, 17, 599, 1199])
    exact = np.array([9.5, -8.25, 7.0, 1e3], dtype=np.float32)

    def build(r):
        out = lookup.emit_lookup(r, codebook, labels, layout, opset=17, ir_version=8)
        return lookup.emit_outliers(r, out, Outliers(positions, exact), (40, 30))

    model, cost = replaced(np.zeros((40, 30), np.float32), 17, 8, build)
    expected = expected_weight(layout, codebook, labels)
    expected.ravel()[positions] = exact
    assert_rebuilds(model, expected)
    assert cost.outlier_bytes == 4 * (2 + 4)  # uint16 positions, float32 values


def test_cost_is_what_the_file_holds():
    rng = np.random.default_rng(5)
    values = rng.normal(size=(256, 256)).astype(np.float32)
    layout = Layout.per_channel(values.shape, 1)
    codebook, labels = random_binning(layout, 16, rng)
    before = len(weight_model(values, 21, 10).SerializeToString())
    model, cost = replaced(values, 21, 10, lambda r: lookup.emit_lookup(
        r, codebook, labels, layout, stored_dtype=TensorProto.FLOAT16, opset=21, ir_version=10))
    stored = sum(len(t.raw_data) for t in model.graph.initializer)
    assert stored == cost.total_bytes  # every stored tensor is raw and packed
    assert cost.index_bytes == 256 * 256 // 2 and cost.table_bytes == 256 * 16 * 2
    after = len(model.SerializeToString())
    assert 0 <= after - (before - values.nbytes + cost.total_bytes) < 600  # names and nodes only
    assert cost.bits_per_weight == pytest.approx(8 * cost.total_bytes / values.size)


def test_lookup_tables_are_recognised():
    rng = np.random.default_rng(6)
    layout = Layout.per_tensor((64, 32))
    codebook, labels = random_binning(layout, 16, rng)
    model, _ = replaced(np.zeros((64, 32), np.float32), 13, 8,
                        lambda r: lookup.emit_lookup(r, codebook, labels, layout, opset=13, ir_version=8))
    weights = Model(model).weights()
    assert weights and all(lookup.is_lookup_table(w) for w in weights)


# -- tuple storage: cheap rebuilds at load, and rows decoded after a Gather ------------------

# Large enough for tuple storage (the table is small beside the indices).
TUPLE_SHAPE = (256, 512)


# Each shape is about the smallest whose tuple table stays within a 16th of its indices.
@pytest.mark.parametrize("k,per_word,shape", [
    (16, 2, TUPLE_SHAPE), (4, 4, (512, 512)), (3, 5, (640, 640)), (2, 8, (1024, 1024)), (40, 1, TUPLE_SHAPE),
    (200, 1, TUPLE_SHAPE),
])
@pytest.mark.parametrize("opset,ir", [(13, 8), (21, 10)])
def test_tuple_storage_rebuilds_exactly_with_narrow_indices(k, per_word, shape, opset, ir):
    rng = np.random.default_rng(k)
    layout = Layout.per_tensor(shape)
    codebook, labels = random_binning(layout, k, rng)
    model, cost = replaced(np.zeros(shape, np.float32), opset, ir, lambda r: lookup.emit_lookup(
        r, codebook, labels, layout, opset=opset, ir_version=ir))
    assert_rebuilds(model, expected_weight(layout, codebook, labels))
    assert lookup.storage_name(k, layout, TensorProto.FLOAT, opset, ir).startswith("tuples/")
    # The rebuild's only index array at int32 has one element per `per_word` weights, and no
    # Div/Mod unpacking runs at load.
    (cast,) = [n for n in model.graph.node if n.op_type == "Cast" and n.attribute[0].i == TensorProto.INT32]
    (words,) = [t for t in model.graph.initializer if t.name == cast.input[0]]
    assert int(np.prod(words.dims)) == layout.groups * layout.group_size // per_word
    assert not {"Div", "Mod", "GatherElements"} & {n.op_type for n in model.graph.node}
    # Up to 16 entries, tuples never store more bits per index than the packed digits would.
    if k <= 16:
        assert cost.index_bytes <= lookup.choose_packing(k, opset, ir).stored_bytes(int(np.prod(shape)))


def test_small_or_per_channel_weights_keep_packed_digits():
    assert lookup.row_storage(16, Layout.per_tensor((32, 32)), 4, 13, 8) is None  # small: rebuild is cheap
    assert lookup.row_storage(16, Layout.per_channel(TUPLE_SHAPE, 1), 4, 13, 8) is None
    # A weight the tuple width does not divide would store a byte per 4-bit index.
    assert lookup.row_storage(16, Layout.per_tensor((255, 513)), 4, 13, 8) is None


def embedding_model(table: np.ndarray, ids_shapes: list[tuple[int, ...]], also_matmul: bool = False) -> onnx.ModelProto:
    """Gathers rows of one table once per ids input; with `also_matmul`, the table is also a
    MatMul weight (a tied LM head), so its rows cannot be decoded alone."""
    inputs, nodes, outputs = [], [], []
    for i, shape in enumerate(ids_shapes):
        inputs.append(helper.make_tensor_value_info(f"ids{i}", TensorProto.INT64, list(shape)))
        nodes.append(helper.make_node("Gather", ["W", f"ids{i}"], [f"rows{i}"], axis=0))
        outputs.append(helper.make_tensor_value_info(f"rows{i}", TensorProto.FLOAT, [*shape, table.shape[1]]))
    if also_matmul:
        inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, table.shape[1]]))
        nodes.append(helper.make_node("Transpose", ["W"], ["Wt"]))
        nodes.append(helper.make_node("MatMul", ["x", "Wt"], ["logits"]))
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, table.shape[0]]))
    graph = helper.make_graph(nodes, "embedding", inputs, outputs, [numpy_helper.from_array(table, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("also_matmul", [False, True])
@pytest.mark.parametrize("granularity,k,columns", [
    ("tensor", 16, 128),  # tuples
    ("channel", 16, 128),  # a codebook per row, base-16 digits packed within rows
    ("channel", 3, 127),  # base-3 digits, the row's last word padded
    ("channel", 200, 128),  # a codebook per row, a byte per index
])
def test_embedding_rows_decode_after_the_gather(also_matmul, granularity, k, columns):
    rng = np.random.default_rng(11)
    shape = (1000, columns)
    layout = Layout.per_tensor(shape) if granularity == "tensor" else Layout.per_channel(shape, 0)
    codebook, labels = random_binning(layout, k, rng)
    ids_shapes = [(2, 3, 5), (), (7,)]  # any index rank, a scalar index included
    proto = embedding_model(rng.normal(size=shape).astype(np.float32), ids_shapes, also_matmul)
    weight = Model(proto).weights()[0]
    r = Replacement(weight)
    weight.replace_with(r, result=lookup.emit_lookup(r, codebook, labels, layout, opset=13, ir_version=8))
    onnx.checker.check_model(proto, full_check=True)

    expected = expected_weight(layout, codebook, labels)
    reference = embedding_model(expected, ids_shapes, also_matmul)
    feeds = {f"ids{i}": rng.integers(0, shape[0], size=s).astype(np.int64) for i, s in enumerate(ids_shapes)}
    if also_matmul:
        feeds["x"] = rng.normal(size=(2, shape[1])).astype(np.float32)
    result = verify(reference.SerializeToString(), proto.SerializeToString(), feeds, EXACT)
    assert result.passed, result.failures

    gathers_of_words = [n for n in proto.graph.node if n.op_type == "Gather" and n.input[0].endswith("lut_indices")]
    rebuilds_weight = [n for n in proto.graph.node if n.output[0] == "W"]
    if also_matmul:  # one dense rebuild serves both readers
        assert not gathers_of_words and rebuilds_weight
    else:  # each reader gathers packed rows; nothing rebuilds the table
        assert len(gathers_of_words) == len(ids_shapes) and not rebuilds_weight
        (words,) = [t for t in proto.graph.initializer if t.name.endswith("lut_indices")]
        assert words.dims[0] == shape[0] and words.data_type in (TensorProto.UINT8, TensorProto.UINT16)
