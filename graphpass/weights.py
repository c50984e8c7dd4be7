"""Weights wherever they live, and the one way to replace a weight by a subgraph that computes it.

A weight is a stored tensor that nodes read: a graph initializer (top level or in a subgraph) or
the value of a `Constant` node (in a graph, subgraph or model-local function). Passes find them
with `Model.weights()` and rewrite them only through `Replacement`, so every pass works on every
place an exporter may have put a weight.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
from onnx import AttributeProto, NodeProto, TensorProto, helper, numpy_helper

from graphpass.external import tensor_array
from graphpass.scopes import Scope, iter_nodes

if TYPE_CHECKING:
    from graphpass.edit import Model

# Attributes of Constant that hold a numeric value, with the dtype and rank each implies.
_CONSTANT_SCALAR_ATTRS = {
    "value_float": (TensorProto.FLOAT, np.float32, False),
    "value_floats": (TensorProto.FLOAT, np.float32, True),
    "value_int": (TensorProto.INT64, np.int64, False),
    "value_ints": (TensorProto.INT64, np.int64, True),
}

FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE})

# Bits per element of the types whose elements are not whole bytes.
_SUB_BYTE_BITS = {
    TensorProto.UINT4: 4,
    TensorProto.INT4: 4,
    TensorProto.FLOAT4E2M1: 4,
}
for _name in ("UINT2", "INT2"):
    if hasattr(TensorProto, _name):
        _SUB_BYTE_BITS[getattr(TensorProto, _name)] = 2


def element_bits(dtype: int) -> int:
    if dtype in _SUB_BYTE_BITS:
        return _SUB_BYTE_BITS[dtype]
    if dtype == TensorProto.STRING:
        return 0
    return 8 * np.dtype(helper.tensor_dtype_to_np_dtype(dtype)).itemsize


def stored_bytes(dtype: int, shape: Sequence[int]) -> int:
    """Bytes the tensor's data occupies in the file (sub-byte types are packed)."""
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    return (count * element_bits(dtype) + 7) // 8


def tensor_stored_bytes(tensor: TensorProto) -> int:
    if tensor.data_type == TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    return stored_bytes(tensor.data_type, tensor.dims)


WeightSource = Literal["initializer", "constant"]


@dataclass(eq=False)
class WeightRef:
    """A handle on one stored weight. It stays valid until that weight is replaced."""

    model: Model
    scope: Scope
    name: str
    source: WeightSource
    dtype: int
    shape: tuple[int, ...]
    overridable: bool = False  # an initializer also listed as a graph input: the caller may feed it
    consumers: list[tuple[str, int]] = field(default_factory=list)  # (op_type, input index) of readers
    # Why a target runtime needs this weight kept a plain stored tensor (graphpass.pinned), or None:
    # it may then be shared as it is (an exact tie), never rebuilt by nodes at load time.
    pinned: str | None = None

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return stored_bytes(self.dtype, self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_TYPES

    @property
    def where(self) -> str:
        kind = "initializer" if self.source == "initializer" else "Constant node"
        return kind if self.scope.parent is None and not self.scope.is_function else f"{kind} in {self.scope.path}"

    @property
    def consumer_ops(self) -> set[str]:
        return {op for op, _ in self.consumers}

    def reader_nodes(self) -> Iterator[tuple[NodeProto, int]]:
        """(node, input index) of every node reading this weight, in its scope and subgraphs.

        Unlike `consumers`, this gives the nodes themselves, for passes that need attributes
        (Gemm's transB, Gather's axis)."""
        for node in iter_nodes(self.scope.body):
            for index, name in enumerate(node.input):
                if name == self.name:
                    yield node, index

    def read_by_row_gathers(self) -> bool:
        """Whether only Gathers on axis 0 read this weight, as they read an embedding table: each
        reader picks whole rows."""
        readers = list(self.reader_nodes())
        return bool(readers) and all(is_row_gather(node, index) for node, index in readers)

    def read(self) -> np.ndarray:
        """The weight's value as numpy (float16 stays float16; bfloat16 comes back as ml_dtypes).

        To read many weights, a WeightReader finds them faster."""
        self.model.last_weight = self.name
        if self.source == "initializer":
            return tensor_array(self.model.find_initializer(self.scope, self.name))
        return constant_value(self.model.find_constant_node(self.scope, self.name))

    def replace_with(self, replacement: Replacement, result: str) -> None:
        """Make `result`, a value the replacement computes or references, stand in for this weight."""
        self.model.apply_replacement(self, replacement, result)


def is_row_gather(node: NodeProto, index: int) -> bool:
    """Whether `node` reads its input `index` as an embedding table: a Gather on axis 0."""
    return (node.op_type == "Gather" and index == 0
            and next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0) == 0)


class WeightReader:
    """Reads the weights of one model state, finding each definition by name in O(1).

    `WeightRef.read` searches its scope's initializers (or nodes) in turn: fine for one weight,
    quadratic for all of them (0.3 s of every pass over a 2,000-weight model). Build a reader,
    in one thread, for the weights a batch of reads will touch; it may then be read from
    several threads. It is valid only until the model is next edited.

    Reads are read-only: a memory map of the input's data file for a weight left there
    (graphpass.external), else numpy_helper.to_array's view over raw_data's bytes (which upb
    copies on every access, holding the GIL).
    """

    def __init__(self, weights: Sequence[WeightRef]):
        # By id, as scopes are unhashable; each entry holds its scope, so no id is reused.
        self._definitions: dict[int, tuple[Scope, dict[str, TensorProto], dict[str, NodeProto]]] = {}
        for weight in weights:
            if id(weight.scope) not in self._definitions:
                self._definitions[id(weight.scope)] = (weight.scope, *_definitions(weight.scope))

    def read(self, weight: WeightRef) -> np.ndarray:
        """Exactly what `weight.read()` returns."""
        weight.model.last_weight = weight.name
        _, initializers, constants = self._definitions[id(weight.scope)]
        if weight.source == "initializer":
            return tensor_array(initializers[weight.name])
        return constant_value(constants[weight.name])


def _definitions(scope: Scope) -> tuple[dict[str, TensorProto], dict[str, NodeProto]]:
    """A scope's initializers and Constant nodes by name; the first of a name wins, as in
    Model.find_initializer and Model.find_constant_node."""
    initializers: dict[str, TensorProto] = {}
    if not scope.is_function:
        for tensor in scope.body.initializer:
            initializers.setdefault(tensor.name, tensor)
    constants: dict[str, NodeProto] = {}
    for node in scope.body.node:
        if node.op_type == "Constant" and node.output:
            constants.setdefault(node.output[0], node)
    return initializers, constants


def constant_value(node: NodeProto) -> np.ndarray:
    attr = node.attribute[0]
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    _, np_type, is_list = _CONSTANT_SCALAR_ATTRS[attr.name]
    if attr.name.startswith("value_float"):
        values = list(attr.floats) if is_list else attr.f
    else:
        values = list(attr.ints) if is_list else attr.i
    return np.array(values, dtype=np_type)


def constant_type_and_shape(node: NodeProto) -> tuple[int, tuple[int, ...]] | None:
    """dtype and shape of a Constant's numeric value, or None for strings and sparse values."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
        return None
    attr = node.attribute[0]
    if attr.name == "value" and attr.type == AttributeProto.TENSOR:
        if attr.t.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
            return None
        return attr.t.data_type, tuple(attr.t.dims)
    if attr.name in _CONSTANT_SCALAR_ATTRS:
        dtype, _, is_list = _CONSTANT_SCALAR_ATTRS[attr.name]
        count = len(attr.floats) if attr.name == "value_floats" else len(attr.ints)
        return dtype, ((count,) if is_list else ())
    return None


class Replacement:
    """Builds the nodes and stored tensors that compute a weight's value.

    Names are drawn from the model's allocator as they are requested, so they are unique
    across every scope and the same run always yields the same names.
    """

    def __init__(self, weight: WeightRef):
        self.weight = weight
        self.nodes: list[NodeProto] = []
        self.tensors: list[TensorProto] = []
        self.taken_over: list[str] = []  # first outputs of the nodes this replacement removes
        self.domains: dict[str, int] = {}  # operator domains its nodes need imported
        self._names = weight.model.names
        # Set by a lowering that can also decode just the rows a Gather picks (an object with
        # `decode(replacement, indices) -> rows`); the core uses it when every reader gathers rows.
        self.row_gather = None

    def stored(self, role: str, array: np.ndarray, *, dtype: int | None = None) -> str:
        """A new stored tensor; `dtype` converts first, so UINT4/UINT2 land packed in raw_data."""
        name = self._names.fresh(f"{self.weight.name}.{role}")
        # np.asarray keeps 0-d arrays 0-d; np.ascontiguousarray would make them 1-d.
        array = np.asarray(array, order="C")
        if dtype is not None:
            array = array.astype(helper.tensor_dtype_to_np_dtype(dtype))  # ml_dtypes for sub-byte types
        self.tensors.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op_type: str, inputs: Sequence[str], role: str, **attrs) -> str:
        output = self._names.fresh(f"{self.weight.name}.{role}")
        node_name = self._names.fresh(f"{self.weight.name}.{role}.node")
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], name=node_name, **attrs))
        return output

    # -- taking over the readers -----------------------------------------------------------
    # A runtime's compressed kernel (MatMulNBits, say) reads the packed weight and the
    # activation together, so it replaces the weight's reader node rather than computing the
    # weight. Such a replacement names the nodes it takes over (every reader of the weight, and
    # nodes folded into the kernel, like a bias Add) and adds nodes writing their outputs.

    def take_over(self, node: NodeProto) -> None:
        """`node` leaves the graph; this replacement's nodes write its outputs instead."""
        self.taken_over.append(node.output[0])

    def kernel_node(self, op_type: str, inputs: Sequence[str], outputs: Sequence[str], role: str, *,
                    domain: str = "", domain_version: int = 1, **attrs) -> None:
        """A node writing the given outputs (those of a node taken over), in `domain`."""
        node_name = self._names.fresh(f"{self.weight.name}.{role}.node")
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=node_name, domain=domain or None,
                                           **attrs))
        if domain:
            self.domains[domain] = domain_version

    @property
    def takes_over_readers(self) -> bool:
        return bool(self.taken_over)
