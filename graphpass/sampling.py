"""A large weight's settings fitted on a sample of its output channels, and predicted from one
measured setting.

auto measures each setting of each weight alone in onnxruntime: a fit over every value, then one
run of the model. On the 1.1 B-parameter decoder (fixtures.llm) that is about 3,000 runs of 2 s
and fits of up to 18 s each: hours. For a large model auto instead fits each setting on a sample
of the weight's output channels and measures one setting on the whole weight; the others'
errors are predicted from it.

* The sample: evenly spaced output channels of a MatMul or Gemm weight, or the rows of an
  embedding table that the calibration inputs read, read by the same kind of node, so that a
  codec plans them as it plans the whole weight. Per-channel and per-group codebooks are fitted
  on those channels exactly as on the whole weight; a per-tensor codebook sees a sample of its
  values.
* The prediction: a setting's error is the measured setting's times the ratio of their proxy
  errors on the sample. The proxy is the squared error each reader's output sees, to first
  order: e^T H e over output channels, with H the second moment of the weight's inputs, its
  diagonal (activation energy) where only that was measured, else the plain squared error.
  Outputs' errors are small there, so they scale with it (the same premise that lets auto add
  weights' errors).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from graphpass.codec import output_channel_axis
from graphpass.edit import Model
from graphpass.weights import WeightRef

# Channels are sampled up to about this many values, and at least MIN_CHANNELS of them.
SAMPLE_VALUES = 1 << 17
MIN_CHANNELS = 64
# A sample of more than this share of the channels saves too little to be worth the prediction.
MAX_SHARE = 0.25


@dataclass
class ChannelSample:
    """`weight`'s `channels` along its output-channel `axis`, as the only weight of a one-node
    `model` whose node copies the weight's reader."""

    model: Model
    weight: WeightRef
    axis: int
    channels: np.ndarray
    original: np.ndarray  # the sampled values, as stored
    error_scale: float  # what an error measured with the sample in place is multiplied by for the whole weight

    def patched(self, whole: np.ndarray, rebuilt: np.ndarray) -> np.ndarray:
        """A copy of the whole weight with the sampled channels replaced by `rebuilt`."""
        patched = np.array(whole, copy=True)
        index = [slice(None)] * patched.ndim
        index[self.axis] = self.channels
        patched[tuple(index)] = rebuilt
        return patched

    def row_counts(self, counts: np.ndarray | None) -> np.ndarray | None:
        """An embedding table's per-row read counts, for the sampled rows."""
        return None if counts is None or self.axis != 0 else counts[self.channels]


def channel_sample(model: Model, weight: WeightRef, read_rows: np.ndarray | None = None) -> ChannelSample | None:
    """A sample of a 2-D weight, or None when it would not save work.

    * An embedding table only Gathers read: `read_rows`, the rows the calibration inputs read,
      which carry all of its error there (error_scale 1).
    * A weight only MatMul and Gemm read: about SAMPLE_VALUES values of evenly spaced output
      channels, its errors scaled by channels / sampled (errors of distinct output channels add).
    """
    if len(weight.shape) != 2:
        return None
    readers = [node for node, _ in weight.reader_nodes()]
    if weight.read_by_row_gathers():
        if read_rows is None or not 0 < len(read_rows) <= MAX_SHARE * weight.shape[0]:
            return None
        return _sample(model, weight, readers[0], 0, np.asarray(read_rows), 1.0)
    if not readers or not all(_is_dense_reader(node, index) for node, index in weight.reader_nodes()):
        return None
    axis = output_channel_axis(weight)
    channels = weight.shape[axis]
    count = max(MIN_CHANNELS, -(-SAMPLE_VALUES // (weight.size // channels)))
    if count > MAX_SHARE * channels:
        return None
    picks = np.unique(np.linspace(0, channels - 1, count).round().astype(np.int64))
    return _sample(model, weight, readers[0], axis, picks, channels / len(picks))


def _is_dense_reader(node: onnx.NodeProto, index: int) -> bool:
    return node.domain in ("", "ai.onnx") and node.op_type in ("MatMul", "Gemm") and index == 1


def _sample(model: Model, weight: WeightRef, reader: onnx.NodeProto, axis: int, picks: np.ndarray,
            error_scale: float) -> ChannelSample:
    original = np.take(np.asarray(weight.read()), picks, axis=axis)
    sample = _one_node_model(model, weight, reader, original)
    return ChannelSample(sample, sample.weights()[0], axis, picks, original, error_scale)


def _one_node_model(model: Model, weight: WeightRef, reader: onnx.NodeProto, values: np.ndarray) -> Model:
    """A model whose only node reads `values`, under the weight's name, as `reader` reads the
    weight: same operator, attributes and input position; other inputs are graph inputs."""
    inputs = [weight.name, "other"] if reader.op_type == "Gather" else ["other", weight.name]
    node = helper.make_node(reader.op_type, inputs, ["out"])
    node.attribute.extend(reader.attribute)
    other_type = onnx.TensorProto.INT64 if reader.op_type == "Gather" else weight.dtype
    graph = helper.make_graph([node], "sample", [helper.make_tensor_value_info("other", other_type, None)],
                              [helper.make_tensor_value_info("out", weight.dtype, None)],
                              [onnx.numpy_helper.from_array(values, weight.name)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", model.opset)])
    proto.ir_version = model.proto.ir_version
    return Model(proto)


def proxy_error(original: np.ndarray, rebuilt: np.ndarray, input_axis: int,
                energy: np.ndarray | None = None, hessian: np.ndarray | None = None) -> float:
    """The squared error the weight's readers see, to first order: sum of e^T H e over output
    channels with `hessian` [K, K] along `input_axis`; else the squared error weighted by
    `energy` (H's diagonal, shaped to broadcast against the weight); else the plain one."""
    error = np.asarray(rebuilt, dtype=np.float64) - np.asarray(original, dtype=np.float64)
    if hessian is not None and error.ndim == 2:
        moved = error if input_axis == 0 else error.T  # [K, channels]
        return float(np.sum(moved * (hessian @ moved)))
    squared = error * error
    return float(np.sum(squared * energy if energy is not None else squared))
