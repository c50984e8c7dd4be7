"""What the calibration inputs show about the weights' inputs, captured in onnxruntime.

- the energy of each MatMul weight's input channels (activation-aware clustering, and the
  compressed kernels' clip search);
- the second moment of MatMul, Gemm and unfolded Conv inputs (error feedback, graphpass.feedback);
- the rows of each embedding table the calibration inputs read, and how often (hot rows, per-row
  settings measured on those rows alone, feedback's row weights).

Each is one run of a probe model (graphpass.sensitivity.Probe) that also outputs the values
wanted, with the large weights fed from their arrays rather than serialized into it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx.numpy_helper
from onnx import helper

from graphpass.edit import Model
from graphpass.sensitivity import Probe, hoist_reason
from graphpass.weights import WeightRef, is_row_gather




def input_channel_energy(model: Model, weights: Sequence[WeightRef], inputs: Mapping[str, np.ndarray],
                         ) -> dict[str, np.ndarray]:
    """For each 2-D weight read as a main-graph MatMul's right operand (or Gemm's B), the mean
    square of every input channel of the activations it multiplies: diag(X^T X) / rows, shaped
    to broadcast against the weight ([in, 1], or [1, in] for Gemm with transB).

    Output error from a weight error dW is X dW, whose squared norm is close to
    sum_i energy[i] * |dW[i, :]|^2 when channels are weakly correlated: the weight that
    activation-aware clustering gives each value's squared error.
    """
    readers = _matmul_readers(model, weights)
    captured = _capture(model, inputs, {act for uses in readers.values() for act, _ in uses})
    return {weight: _energy(captured, uses) for weight, uses in readers.items()}


def input_covariance(model: Model, weights: Sequence[WeightRef], inputs: Mapping[str, np.ndarray],
                     ) -> dict[str, np.ndarray]:
    """For each 2-D weight read as a main-graph MatMul's right operand (or Gemm's B), the second
    moment X^T X / rows [in, in] of the activations it multiplies: the Hessian of the output's
    squared error in the weight's input axis, which GPTQ-style error feedback needs (its
    diagonal is `input_channel_energy`)."""
    readers = _matmul_readers(model, weights)
    captured = _capture(model, inputs, {act for uses in readers.values() for act, _ in uses})
    found = {}
    for weight, uses in readers.items():
        rows = [np.asarray(captured[act], dtype=np.float64).reshape(-1, np.shape(captured[act])[-1]) for act, _ in uses]
        stacked = np.concatenate(rows)
        found[weight] = stacked.T @ stacked / max(len(stacked), 1)
    return found


def conv_input_covariance(model: Model, weights: Sequence[WeightRef], inputs: Mapping[str, np.ndarray],
                          ) -> dict[str, np.ndarray]:
    """For each weight read only as the filters of main-graph Convs with group=1 and explicit
    pads, the second moment P^T P / rows of their unfolded inputs (im2col): P has one row per
    output position and one column per value of a filter, in the order of W.reshape(C_out, -1),
    so that the Conv's output error is P dW^T as a MatMul's is X dW."""
    readers = _conv_readers(model, weights)
    captured = _capture(model, inputs, {node.input[0] for nodes in readers.values() for node in nodes})
    found = {}
    for name, nodes in readers.items():
        shape = next(w.shape for w in weights if w.name == name)
        total, rows = 0.0, 0
        for node in nodes:
            for sample in np.asarray(captured[node.input[0]], dtype=np.float64):  # one item at a time bounds memory
                patches = unfolded(sample, shape[2:], _attributes(node))
                total, rows = total + patches.T @ patches, rows + len(patches)
        found[name] = total / max(rows, 1)
    return found


def _conv_readers(model: Model, weights: Sequence[WeightRef]) -> dict[str, list[onnx.NodeProto]]:
    by_name = {w.name: w for w in weights if len(w.shape) >= 3 and w.scope.parent is None and not w.scope.is_function}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.proto.graph.node:
        if node.op_type == "Conv" and len(node.input) >= 2 and node.input[1] in by_name:
            attrs = _attributes(node)
            if attrs.get("group", 1) == 1 and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", b"VALID"):
                readers.setdefault(node.input[1], []).append(node)
    return {name: nodes for name, nodes in readers.items() if len(nodes) == len(by_name[name].consumers)}


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def unfolded(sample: np.ndarray, kernel: Sequence[int], attrs: dict) -> np.ndarray:
    """One input item [C, *spatial] as patches [positions, C * prod(kernel)] (im2col)."""
    spatial = len(kernel)
    pads = attrs.get("pads", [0] * 2 * spatial)
    strides = attrs.get("strides", [1] * spatial)
    dilations = attrs.get("dilations", [1] * spatial)
    padded = np.pad(sample, [(0, 0)] + [(pads[i], pads[i + spatial]) for i in range(spatial)])
    reach = [d * (k - 1) + 1 for k, d in zip(kernel, dilations)]
    windows = np.lib.stride_tricks.sliding_window_view(padded, reach, axis=tuple(range(1, spatial + 1)))
    # windows: [C, *positions, *reach]; take every stride-th position and dilation-th tap.
    windows = windows[(slice(None),) + tuple(slice(None, None, s) for s in strides)
                      + tuple(slice(None, None, d) for d in dilations)]
    positions = windows.shape[1:1 + spatial]
    order = tuple(range(1, spatial + 1)) + (0,) + tuple(range(spatial + 1, 2 * spatial + 1))
    return windows.transpose(order).reshape(int(np.prod(positions)), -1)


def gathered_rows(model: Model, weights: Sequence[WeightRef], inputs: Mapping[str, np.ndarray],
                  ) -> dict[str, np.ndarray]:
    """For each weight read only as the table of main-graph Gathers on axis 0 (an embedding), the
    sorted rows those Gathers read on the calibration inputs. Nothing else of such a table reaches
    the outputs, which lets per-row settings be measured on these rows alone."""
    return {name: np.flatnonzero(counts) for name, counts in gathered_row_counts(model, weights, inputs).items()}


def gathered_row_counts(model: Model, weights: Sequence[WeightRef], inputs: Mapping[str, np.ndarray],
                        also_read_otherwise: bool = False) -> dict[str, np.ndarray]:
    """For each embedding table only Gathers (axis 0) read, how many times the calibration
    inputs read each row; with `also_read_otherwise`, for tables other nodes read too (a tied
    embedding that is also the LM head)."""
    tables = _gather_tables(model, weights, also_read_otherwise)
    captured = _capture(model, inputs, {index for indices in tables.values() for index in indices})
    found = {}
    for name, indices in tables.items():
        count = next(w.shape[0] for w in weights if w.name == name)
        seen = np.concatenate([np.asarray(captured[i], dtype=np.int64).ravel() for i in indices])
        found[name] = np.bincount(np.where(seen < 0, seen + count, seen), minlength=count)
    return found


def _gather_tables(model: Model, weights: Sequence[WeightRef], also_read_otherwise: bool = False,
                   ) -> dict[str, list[str]]:
    """table weight name -> names of the index tensors that read it."""
    top = {w.name: w for w in weights if w.scope.parent is None and not w.scope.is_function and len(w.shape) >= 1}
    tables: dict[str, list[str]] = {}
    for node in model.proto.graph.node:
        if is_row_gather(node, 0) and node.input[0] in top:
            tables.setdefault(node.input[0], []).append(node.input[1])
    return {name: indices for name, indices in tables.items()
            if also_read_otherwise or len(indices) == len(top[name].consumers)}


def _capture(model: Model, inputs: Mapping[str, np.ndarray], names: set[str]) -> dict[str, np.ndarray]:
    """Values of main-graph tensors on the calibration inputs (one run, the original weights)."""
    captured = {name: np.asarray(inputs[name]) for name in names if name in inputs}
    wanted = [(name, _value_dtype(model, name)) for name in sorted(names) if name not in captured]
    if wanted:
        captured.update(Probe(model, _fed_weights(model), inputs, [], extra_outputs=wanted).run())
    return captured


# Weights at least this large are fed to a capture run rather than stored in its model.
FED_WEIGHT_BYTES = 1 << 20


def _fed_weights(model: Model) -> list[WeightRef]:
    """The large weights a capture run gets as inputs, straight from their (memory-mapped)
    arrays: stored in its model, they would be serialized into it and copied again into the
    session (and a float16 one cast to float32 there), three copies of the model at once."""
    return [w for w in model.weights() if w.nbytes >= FED_WEIGHT_BYTES and w.dtype in _FEEDABLE
            and hoist_reason(model, w) is None]


# Types numpy holds natively, so that onnxruntime reads the array in place.
_FEEDABLE = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE})


def row_subset(model: Model, weight: WeightRef, rows: np.ndarray) -> tuple[Model, WeightRef]:
    """A one-node model whose only weight is `weight`'s `rows`, under the same name, type, opset
    and reader (a Gather on axis 0), so that a codec plans it as it would plan those rows."""
    values = np.asarray(weight.read())[rows]
    index = helper.make_tensor_value_info("rows", onnx.TensorProto.INT64, [None])
    out = helper.make_tensor_value_info("values", weight.dtype, None)
    node = helper.make_node("Gather", [weight.name, "rows"], ["values"], axis=0)
    graph = helper.make_graph([node], "rows", [index], [out], [onnx.numpy_helper.from_array(values, weight.name)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", model.opset)])
    proto.ir_version = model.proto.ir_version
    subset = Model(proto)
    return subset, subset.weights()[0]


def _matmul_readers(model: Model, weights: Sequence[WeightRef]) -> dict[str, list[tuple[str, bool]]]:
    """weight name -> [(activation name, energy along the weight's last axis?)]."""
    by_name = {w.name: w for w in weights if len(w.shape) == 2 and w.scope.parent is None and not w.scope.is_function}
    readers: dict[str, list[tuple[str, bool]]] = {}
    for node in model.proto.graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in by_name:
            readers.setdefault(node.input[1], []).append((node.input[0], False))
        elif node.op_type == "Gemm" and len(node.input) >= 2 and node.input[1] in by_name:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if not attrs.get("transA", 0):
                readers.setdefault(node.input[1], []).append((node.input[0], bool(attrs.get("transB", 0))))
    # A weight also read in another way (Transpose for a tied embedding, say) keeps plain k-means.
    return {name: uses for name, uses in readers.items()
            if len(uses) == len(by_name[name].consumers) and len({axis for _, axis in uses}) == 1}


def _value_dtype(model: Model, name: str) -> int:
    value_type = model.value_types().get(name)
    if value_type is not None and value_type.tensor_type.elem_type:
        return value_type.tensor_type.elem_type
    return onnx.TensorProto.FLOAT


def _energy(captured: Mapping[str, np.ndarray], uses: list[tuple[str, bool]]) -> np.ndarray:
    last_axis = uses[0][1]
    total = None
    for activation, _ in uses:
        x = np.asarray(captured[activation], dtype=np.float64)
        energy = np.mean(np.square(x.reshape(-1, x.shape[-1])), axis=0)
        total = energy if total is None else total + energy
    return total[None, :] if last_axis else total[:, None]
