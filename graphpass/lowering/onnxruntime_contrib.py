"""Weights onnxruntime keeps compressed in memory: com.microsoft MatMulNBits and GatherBlockQuantized.

Plain-op lookups and DequantizeLinear of a constant are constant-folded into dense tensors when
onnxruntime creates a session. Two contrib operators read block-quantized weights at run time
instead, and keep them packed in memory:

- `MatMulNBits(A, B, scales, zero_points, g_idx, bias)`: Y = A @ W (+ bias), W [K, N] quantized
  in blocks of `block_size` along K per output column. B is uint8 [N, k_blocks, block_size *
  bits / 8], values packed low bits first; scales [N * k_blocks] in A's type; zero points uint8
  [N, ceil(k_blocks * bits / 8)], packed the same way. K need not be a multiple of the block:
  the last block is padded. bits 2, 4 or 8. accuracy_level 0 computes in A's float type (what
  the plan's reconstruction predicts); 4 would quantize A to int8 (faster, drifts by ~1e-2).
- `GatherBlockQuantized(data, indices, scales, zero_points)`: Gather on axis 0 of a table
  quantized in blocks along its last axis. uint8 data [V, D * bits / 8] packed low bits first;
  scales [V, D / block_size]; zero points uint8 packed along the last axis like the data (an
  unpacked zero point is rejected for bits < 8). Indices int32 or int64, so token ids feed it
  directly. D must be a multiple of the block.

Each lowering here is found from a weight's readers (`matmul_lowering`, `gather_lowering`): it
returns a reason instead when the readers are not all of its kind or the kernel cannot express
them. A lowering takes over the reader nodes through `Replacement.take_over`; a bias that a
MatMul's only reader Add (or Gemm's C) adds is passed to MatMulNBits once and the Add goes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper

from graphpass.affine import BlockQuantized
from graphpass.lowering.lookup import LUT_ROLE_PREFIX
from graphpass.scopes import iter_nodes
from graphpass.weights import Replacement, WeightRef

DOMAIN = "com.microsoft"
MATMUL_NBITS_BITS = (2, 4, 8)
GATHER_BLOCK_QUANTIZED_BITS = (4, 8)
MIN_BLOCK = 16  # both kernels: a power of two, at least 16
# Scales are stored in the activation's type, which must be one of these.
_ACTIVATION_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16)


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Integers below 2**bits packed along the last axis, low bits first (the last byte padded)."""
    per_byte = 8 // bits
    q = np.asarray(q, dtype=np.uint8)
    pad = (-q.shape[-1]) % per_byte
    if pad:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (pad,), dtype=np.uint8)], axis=-1)
    q = q.reshape(q.shape[:-1] + (-1, per_byte))
    packed = np.zeros(q.shape[:-1], dtype=np.uint8)
    for position in range(per_byte):
        packed |= (q[..., position] << (bits * position)).astype(np.uint8)
    return packed


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """numpy mirror of the kernels' unpacking (for tests): the first `count` values of each row."""
    per_byte = 8 // bits
    packed = np.asarray(packed, dtype=np.uint8)
    shifts = (bits * np.arange(per_byte)).astype(np.uint8)
    values = (packed[..., None] >> shifts) & np.uint8(2**bits - 1)
    return values.reshape(packed.shape[:-1] + (-1,))[..., :count]


def is_block_size(size: int) -> bool:
    return size >= MIN_BLOCK and size & (size - 1) == 0


# ---------------------------------------------------------------------------------------------
# MatMulNBits
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MatMulUse:
    """One reader of the weight as MatMulNBits will replace it."""

    activation: str
    output: str  # what the kernel writes: the reader's output, or the folded Add's
    bias: str  # "" when none
    taken: tuple[str, ...]  # first outputs of the nodes the kernel replaces


@dataclass(frozen=True)
class MatMulNBitsLowering:
    """W [K, N] (or [N, K] for Gemm with transB) read as the right operand of MatMul/Gemm."""

    uses: tuple[MatMulUse, ...]
    k: int
    n: int
    stored_transposed: bool  # the weight is stored [N, K]
    bits_allowed = MATMUL_NBITS_BITS
    op = "MatMulNBits"

    def rows(self, array: np.ndarray) -> np.ndarray:
        """The weight as [N, K]: one row per output column, blocks along K."""
        return np.asarray(array) if self.stored_transposed else np.asarray(array).T

    def from_rows(self, rows: np.ndarray) -> np.ndarray:
        return rows if self.stored_transposed else rows.T

    def block_reason(self, block_size: int, length: int) -> str | None:
        return None if is_block_size(block_size) else f"MatMulNBits needs a power-of-two block >= {MIN_BLOCK}"

    def stored_bytes(self, fitted: BlockQuantized, scale_bytes: int) -> int:
        blob = fitted.block_size * fitted.bits // 8
        zero_bytes = -(-fitted.blocks * fitted.bits // 8)
        return fitted.rows * (fitted.blocks * blob + fitted.blocks * scale_bytes + zero_bytes)

    def emit(self, r: Replacement, fitted: BlockQuantized) -> None:
        n, blocks = fitted.rows, fitted.blocks
        packed = pack_bits(fitted.q.reshape(n, -1), fitted.bits).reshape(n, blocks, -1)
        weights = r.stored(f"{LUT_ROLE_PREFIX}nbits_weight", packed)
        scales = r.stored(f"{LUT_ROLE_PREFIX}scale", fitted.scale.ravel().astype(_np_type(r.weight.dtype)))
        zeros = r.stored(f"{LUT_ROLE_PREFIX}zero_point", pack_bits(fitted.zero_point, fitted.bits))
        for use in self.uses:
            inputs = [use.activation, weights, scales, zeros] + (["", use.bias] if use.bias else [])
            r.kernel_node("MatMulNBits", inputs, [use.output], f"{LUT_ROLE_PREFIX}matmul_nbits", domain=DOMAIN,
                          K=self.k, N=self.n, bits=fitted.bits, block_size=fitted.block_size, accuracy_level=0)
            for taken in use.taken:
                r.take_over(_node_writing(r.weight, taken))


def matmul_lowering(weight: WeightRef) -> MatMulNBitsLowering | str:
    """MatMulNBits for a weight read only as MatMul's B (2-D) or Gemm's B; else the reason."""
    if len(weight.shape) != 2:
        return f"MatMulNBits takes a 2-D weight, this one is {len(weight.shape)}-D"
    if weight.dtype not in _ACTIVATION_TYPES:
        return "MatMulNBits computes in float32 or float16 only"
    uses, transposed = [], set()
    for node, index in weight.reader_nodes():
        use = _matmul_use(weight, node, index)
        if isinstance(use, str):
            return use
        uses.append(use[0])
        transposed.add(use[1])
    if len(transposed) != 1:
        return "read by Gemms that disagree on transB"
    stored_transposed = transposed.pop()
    n, k = weight.shape if stored_transposed else weight.shape[::-1]
    return MatMulNBitsLowering(tuple(uses), int(k), int(n), stored_transposed)


def _matmul_use(weight: WeightRef, node, index: int) -> tuple[MatMulUse, bool] | str:
    if node.op_type not in ("MatMul", "Gemm") or index != 1:
        return f"read by {node.op_type} (input {index}), not as the right operand of MatMul or Gemm"
    if not _top_level(weight, node):
        return "read inside a subgraph"
    rank = _rank(weight, node.input[0])
    if node.op_type == "MatMul":
        if rank is not None and rank < 2:
            return "MatMulNBits needs an activation of rank >= 2"
        bias, add = _folded_bias(weight, node)
        taken = (node.output[0],) + ((add.output[0],) if add is not None else ())
        output = add.output[0] if add is not None else node.output[0]
        return MatMulUse(node.input[0], output, bias, taken), False
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
        return "Gemm with transA or alpha != 1"
    bias = node.input[2] if len(node.input) > 2 else ""
    if bias and (attrs.get("beta", 1.0) != 1.0 or not _is_vector_weight(weight, bias, _gemm_n(weight, attrs))):
        return "Gemm's C is not a constant [N] bias added once (beta 1)"
    return MatMulUse(node.input[0], node.output[0], bias, (node.output[0],)), bool(attrs.get("transB", 0))


def _gemm_n(weight: WeightRef, attrs) -> int:
    return weight.shape[0] if attrs.get("transB", 0) else weight.shape[1]


def _folded_bias(weight: WeightRef, matmul) -> tuple[str, object | None]:
    """(bias, Add) when the MatMul's only reader is an Add of a constant [N] vector, else ("", None)."""
    out = matmul.output[0]
    readers = [n for n in iter_nodes(weight.scope.body) if out in n.input]
    if len(readers) != 1 or readers[0].op_type != "Add" or out in weight.scope.output_names():
        return "", None
    add = readers[0]
    if not _top_level(weight, add) or len(add.input) != 2:
        return "", None
    other = add.input[1] if add.input[0] == out else add.input[0]
    n = weight.shape[1]
    return (other, add) if _is_vector_weight(weight, other, n) else ("", None)


def _is_vector_weight(weight: WeightRef, name: str, n: int) -> bool:
    """An initializer of the main graph shaped [n], of the weight's type, that no caller overrides."""
    body = weight.scope.body
    tensor = next((t for t in body.initializer if t.name == name), None)
    overridden = any(v.name == name for v in body.input)
    return tensor is not None and not overridden and list(tensor.dims) == [n] and tensor.data_type == weight.dtype


def _rank(weight: WeightRef, value: str) -> int | None:
    found = weight.model.value_types().get(value)
    if found is None or not found.tensor_type.HasField("shape"):
        return None
    return len(found.tensor_type.shape.dim)


# ---------------------------------------------------------------------------------------------
# GatherBlockQuantized
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GatherBlockQuantizedLowering:
    """A 2-D table [V, D] read only as Gather's data on axis 0 (an embedding)."""

    outputs: tuple[str, ...]  # of the Gathers replaced
    indices: tuple[str, ...]
    bits_allowed = GATHER_BLOCK_QUANTIZED_BITS
    op = "GatherBlockQuantized"

    def rows(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array)

    def from_rows(self, rows: np.ndarray) -> np.ndarray:
        return rows

    def block_reason(self, block_size: int, length: int) -> str | None:
        if not is_block_size(block_size):
            return f"GatherBlockQuantized needs a power-of-two block >= {MIN_BLOCK}"
        if length % block_size:
            return f"GatherBlockQuantized needs the row length ({length}) to be a multiple of the block ({block_size})"
        return None

    def stored_bytes(self, fitted: BlockQuantized, scale_bytes: int) -> int:
        row = fitted.length * fitted.bits // 8
        zero_bytes = -(-fitted.blocks * fitted.bits // 8)
        return fitted.rows * (row + fitted.blocks * scale_bytes + zero_bytes)

    def emit(self, r: Replacement, fitted: BlockQuantized) -> None:
        data = r.stored(f"{LUT_ROLE_PREFIX}blocked_table", pack_bits(fitted.q.reshape(fitted.rows, -1), fitted.bits))
        scales = r.stored(f"{LUT_ROLE_PREFIX}scale", fitted.scale.astype(_np_type(r.weight.dtype)))
        zeros = r.stored(f"{LUT_ROLE_PREFIX}zero_point", pack_bits(fitted.zero_point, fitted.bits))
        for output, indices in zip(self.outputs, self.indices):
            r.kernel_node("GatherBlockQuantized", [data, indices, scales, zeros], [output],
                          f"{LUT_ROLE_PREFIX}gather_block_quantized", domain=DOMAIN, bits=fitted.bits,
                          block_size=fitted.block_size, gather_axis=0, quantize_axis=1)
            r.take_over(_node_writing(r.weight, output))


def gather_lowering(weight: WeightRef) -> GatherBlockQuantizedLowering | str:
    """GatherBlockQuantized for a 2-D table read only by main-graph Gathers on axis 0; else the reason."""
    if len(weight.shape) != 2:
        return f"GatherBlockQuantized here takes a 2-D table, this one is {len(weight.shape)}-D"
    if weight.dtype not in _ACTIVATION_TYPES:
        return "GatherBlockQuantized outputs float32 or float16 only"
    outputs, indices = [], []
    for node, index in weight.reader_nodes():
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        if node.op_type != "Gather" or index != 0 or axis % 2 != 0:
            return f"read by {node.op_type} (input {index}), not as the table of a Gather on axis 0"
        if not _top_level(weight, node):
            return "read inside a subgraph"
        outputs.append(node.output[0])
        indices.append(node.input[1])
    return GatherBlockQuantizedLowering(tuple(outputs), tuple(indices))


def _top_level(weight: WeightRef, node) -> bool:
    """Whether `node` is in the weight's own scope rather than in a subgraph below it."""
    return any(n.output[:1] == node.output[:1] for n in weight.scope.body.node)


def _node_writing(weight: WeightRef, output: str):
    return next(n for n in weight.scope.body.node if n.output and n.output[0] == output)


def _np_type(onnx_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(onnx_type))
