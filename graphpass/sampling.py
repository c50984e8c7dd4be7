"""A large weight's settings fitted on a sample of its output channels, and predicted from one
measured setting.

auto measures each setting of each weight alone in onnxruntime: a fit over every value, then one
run of the model. On the 1.1 B-parameter decoder (fixtures.llm) that is about 3,000 runs of 2 s
and fits of up to 18 s each: hours. For a large model auto instead fits each setting on a sample
of the weight's output channels and measures one setting with the sampled channels in place,
scaled to the whole weight (each `SamplePart` on its own, their errors added); the others'
errors are predicted from it.

* The sample: evenly spaced output channels of a MatMul or Gemm weight, or the rows of an
  embedding table that the calibration inputs read (with evenly spaced others for a tied LM
  head), read by the same kind of node, so that a
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
from graphpass.weights import WeightRef, is_row_gather

# Channels are sampled up to about this many values, and at least MIN_CHANNELS of them.
SAMPLE_VALUES = 1 << 17
MIN_CHANNELS = 64
# A sample of more than this share of the channels saves too little to be worth the prediction.
MAX_SHARE = 0.25


@dataclass(frozen=True)
class SamplePart:
    """Sampled channels (`positions` in the sample) whose error, measured with them in place and
    multiplied by `error_scale`, stands for the error of a share of the whole weight."""

    positions: np.ndarray
    error_scale: float


@dataclass
class ChannelSample:
    """`weight`'s `channels` along its output-channel `axis`, as the only weight of a one-node
    `model` whose node copies one of the weight's readers."""

    model: Model
    weight: WeightRef
    axis: int
    channels: np.ndarray
    original: np.ndarray  # the sampled values, as stored
    parts: tuple[SamplePart, ...]  # each measured on its own; their errors add up to the whole weight's

    def patched(self, whole: np.ndarray, rebuilt: np.ndarray, part: SamplePart) -> np.ndarray:
        """A copy of the whole weight with the part's channels replaced by theirs in `rebuilt`."""
        patched = np.array(whole, copy=True)
        index = [slice(None)] * patched.ndim
        index[self.axis] = self.channels[part.positions]
        patched[tuple(index)] = np.take(rebuilt, part.positions, axis=self.axis)
        return patched

    def row_counts(self, counts: np.ndarray | None) -> np.ndarray | None:
        """An embedding table's per-row read counts, for the sampled rows."""
        return None if counts is None or self.axis != 0 else counts[self.channels]


def channel_sample(model: Model, weight: WeightRef, read_rows: np.ndarray | None = None) -> ChannelSample | None:
    """A sample of a 2-D weight, or None when it would not save work.

    * An embedding table only Gathers read: `read_rows`, the rows the calibration inputs read,
      which carry all of its error there (error scale 1).
    * A weight only MatMul and Gemm read: about SAMPLE_VALUES values of evenly spaced output
      channels, their error scaled by channels / sampled (errors of distinct output channels add).
    * A table Gathers read and a MatMul reads through a Transpose (a tied embedding and LM head):
      the rows read (scale 1) and evenly spaced others (scaled to the rows not read), each
      measured on its own.
    """
    if len(weight.shape) != 2:
        return None
    readers = list(weight.reader_nodes())
    gathers = [node for node, index in readers if _is_row_gather(node, index)]
    if gathers and all(_is_row_gather(node, index) or node.op_type == "Transpose" for node, index in readers):
        return _table_sample(model, weight, gathers[0], read_rows, len(gathers) < len(readers))
    if not readers or not all(_is_dense_reader(node, index) for node, index in readers):
        return None
    axis = output_channel_axis(weight)
    picks = _evenly_spaced(weight.shape[axis], weight.size // weight.shape[axis])
    if picks is None:
        return None
    return _sample(model, weight, readers[0][0], axis, picks,
                   (SamplePart(np.arange(len(picks)), weight.shape[axis] / len(picks)),))


def _table_sample(model: Model, weight: WeightRef, gather: onnx.NodeProto, read_rows: np.ndarray | None,
                  read_otherwise: bool) -> ChannelSample | None:
    rows = weight.shape[0]
    if read_rows is None or len(read_rows) > MAX_SHARE * rows:
        return None
    read_rows = np.asarray(read_rows, dtype=np.int64)
    others = np.empty(0, dtype=np.int64)
    if read_otherwise:
        others = _evenly_spaced(rows, weight.shape[1])
        if others is None:
            return None
        others = np.setdiff1d(others, read_rows)
    if not len(read_rows) + len(others):
        return None
    picks = np.union1d(read_rows, others)
    parts = [SamplePart(np.searchsorted(picks, chosen), scale)
             for chosen, scale in ((read_rows, 1.0), (others, (rows - len(read_rows)) / max(len(others), 1)))
             if len(chosen)]
    return _sample(model, weight, gather, 0, picks, tuple(parts))


def _evenly_spaced(channels: int, per_channel: int) -> np.ndarray | None:
    """About SAMPLE_VALUES values of evenly spaced channels (None: more than MAX_SHARE of them)."""
    count = max(MIN_CHANNELS, -(-SAMPLE_VALUES // per_channel))
    if count > MAX_SHARE * channels:
        return None
    return np.unique(np.linspace(0, channels - 1, count).round().astype(np.int64))


def _is_dense_reader(node: onnx.NodeProto, index: int) -> bool:
    return node.domain in ("", "ai.onnx") and node.op_type in ("MatMul", "Gemm") and index == 1


def _is_row_gather(node: onnx.NodeProto, index: int) -> bool:
    return node.domain in ("", "ai.onnx") and is_row_gather(node, index)


def _sample(model: Model, weight: WeightRef, reader: onnx.NodeProto, axis: int, picks: np.ndarray,
            parts: tuple[SamplePart, ...]) -> ChannelSample:
    original = np.take(np.asarray(weight.read()), picks, axis=axis)
    sample = _one_node_model(model, weight, reader, original)
    return ChannelSample(sample, sample.weights()[0], axis, picks, original, parts)


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
