"""Block-wise affine quantization fitted for the least (importance-weighted) squared error.

The compressed kernels runtimes keep in memory (com.microsoft MatMulNBits and
GatherBlockQuantized, which onnxruntime and OpenVINO both run, and blocked DequantizeLinear) all
store the same thing: per block of `block_size` consecutive values of a row, integers q in
[0, 2**bits) with one scale and one integer zero point, read back as w = scale * (q - zero_point).
What is left to choose is the range each block's grid covers.

Min/max ranges (what onnxruntime's MatMulNBitsQuantizer and most converters use) waste levels on
the one outlier of a block. Here each block's range is searched, as AWQ's clip search and
MSE-optimal ranges do: the block's [min, max] is shrunk by each factor of a grid, every value is
rounded onto the resulting levels, and the factor with the least weighted squared error wins,
per block. The scale is then refitted by least squares for the chosen integers (w ~ s * (q - z)
has a closed-form best s), and the values re-rounded, kept only where that lowers the error.

Importance weights each value's squared error, e.g. the mean square of the activation channel a
MatMul weight multiplies (graphpass.activations.input_channel_energy): an error on a loud input
channel moves the output more. On the 3-layer BERT's MatMul weights at 4-bit block 32 this gave
an activation-weighted error 0.70x that of onnxruntime's MatMulNBitsQuantizer (plain error 1.06x;
bench/bench_deploy.py). `quantize_blocks_gptq` adds GPTQ's error feedback; with 32 calibration
sentences it lowered the mean test cosine gap but overfitted the worst sentence.

Rows whose length the block size does not divide are padded with zeros (importance 0), which
MatMulNBits accepts (K is an attribute; the padding multiplies nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphpass.feedback import quantize_with_feedback

# Clip search: the block range shrinks by these factors, 1.0 (min/max) first.
CLIP_FACTORS = tuple(np.round(np.linspace(1.0, 0.55, 19), 4))
# Blocks fitted per numpy step: bounds the temporary arrays to a few tens of MB.
_CHUNK_VALUES = 1 << 21


@dataclass
class BlockQuantized:
    """Integers [rows, blocks, block_size], scales and zero points [rows, blocks]."""

    q: np.ndarray  # uint8
    scale: np.ndarray  # float32
    zero_point: np.ndarray  # uint8
    bits: int
    block_size: int
    length: int  # values per row before padding

    @property
    def rows(self) -> int:
        return self.q.shape[0]

    @property
    def blocks(self) -> int:
        return self.q.shape[1]

    def dequantized(self, dtype=np.float32) -> np.ndarray:
        """[rows, length]: scale * (q - zero_point) in float32, as the kernels compute it."""
        steps = self.q.astype(np.float32) - self.zero_point.astype(np.float32)[..., None]
        values = (steps * self.scale.astype(np.float32)[..., None]).reshape(self.rows, -1)
        return values[:, : self.length].astype(dtype)


def quantize_blocks(rows: np.ndarray, bits: int, block_size: int, importance: np.ndarray | None = None,
                    *, search: bool = True) -> BlockQuantized:
    """Fit `rows` [R, L] block-wise along L. `importance` broadcasts to [R, L] (None: all 1).

    `search=False` gives plain min/max ranges (the baseline the search is measured against)."""
    rows = np.asarray(rows, dtype=np.float32)
    count, length = rows.shape
    blocks = -(-length // block_size)
    padded = np.zeros((count, blocks * block_size), dtype=np.float32)
    padded[:, :length] = rows
    weight = np.zeros_like(padded)
    weight[:, :length] = 1.0 if importance is None else np.broadcast_to(np.asarray(importance, np.float32),
                                                                          rows.shape)
    values = padded.reshape(count, blocks, block_size)
    weight = weight.reshape(count, blocks, block_size)
    per_chunk = max(1, _CHUNK_VALUES // max(blocks * block_size, 1))
    parts = [_fit(values[i:i + per_chunk], weight[i:i + per_chunk], bits, search) for i in range(0, count, per_chunk)]
    q, scale, zero = (np.concatenate(p) for p in zip(*parts))
    return BlockQuantized(q, scale, zero, bits, block_size, length)


def _fit(values: np.ndarray, weight: np.ndarray, bits: int, search: bool):
    top = float(2**bits - 1)
    low = np.minimum(values.min(axis=-1), 0.0)
    high = np.maximum(values.max(axis=-1), 0.0)
    best = None
    for factor in CLIP_FACTORS if search else (1.0,):
        candidate = _grid(values, weight, low * factor, high * factor, top)
        best = candidate if best is None else _better(best, candidate)
    if search:
        best = _better(best, _refit_scale(values, weight, best, top))
    error, q, scale, zero = best
    return q.astype(np.uint8), scale.astype(np.float32), zero.astype(np.uint8)


def _grid(values, weight, low, high, top):
    """Round onto the levels of [low, high] (widened to hold 0, so the zero point is an integer)."""
    scale = np.where(high > low, (high - low) / top, 1.0).astype(np.float32)
    zero = np.clip(np.rint(-low / scale), 0, top)
    return _rounded(values, weight, scale, zero, top)


def _rounded(values, weight, scale, zero, top):
    q = np.clip(np.rint(values / scale[..., None]) + zero[..., None], 0, top)
    rebuilt = (q - zero[..., None]) * scale[..., None]
    error = np.sum(weight * np.square(rebuilt - values), axis=-1)
    return error, q, scale, zero


def _refit_scale(values, weight, current, top):
    """The least-squares scale for the current integers, then the values rounded again on it."""
    _, q, scale, zero = current
    steps = q - zero[..., None]
    numerator = np.sum(weight * steps * values, axis=-1)
    denominator = np.sum(weight * steps * steps, axis=-1)
    refit = np.where(denominator > 0, numerator / np.maximum(denominator, 1e-30), scale)
    refit = np.where(refit > 0, refit, scale).astype(np.float32)
    return _rounded(values, weight, refit, zero, top)


def _better(a, b):
    """Per block, whichever of two fits has the lower error."""
    take_b = b[0] < a[0]
    return (np.where(take_b, b[0], a[0]), np.where(take_b[..., None], b[1], a[1]),
            np.where(take_b, b[2], a[2]), np.where(take_b, b[3], a[3]))


def weighted_error(rows: np.ndarray, fitted: BlockQuantized, importance: np.ndarray | None = None) -> float:
    """Sum of importance-weighted squared errors of a fit (for comparisons and reports)."""
    diff = np.square(fitted.dequantized(np.float64) - np.asarray(rows, np.float64))
    return float(np.sum(diff if importance is None else diff * np.broadcast_to(importance, diff.shape)))


def quantize_blocks_gptq(rows: np.ndarray, bits: int, block_size: int, hessian: np.ndarray,
                         ) -> tuple[BlockQuantized, str | None]:
    """GPTQ's error feedback (graphpass.feedback) on the same block format, and the reason it
    fell back to rounding each block on its own (None when it did not).

    `rows` [N, K] are the weight's output rows, `hessian` [K, K] the second moment of the
    activations along K. Each block's range is fitted (clip search, weighted by the Hessian's
    diagonal) on the columns as updated when the block is reached, as GPTQ fits its groups."""
    rows = np.asarray(rows, dtype=np.float64)
    count, length = rows.shape
    blocks = -(-length // block_size)
    padded = np.zeros((count, blocks * block_size))
    padded[:, :length] = rows
    h = np.zeros((blocks * block_size,) * 2)
    h[:length, :length] = hessian  # padding columns are dead inputs: zeroed, as they are stored
    importance = np.where(np.diag(h) > 0, np.diag(h), 1.0)
    top = float(2**bits - 1)
    q = np.zeros((count, blocks, block_size), dtype=np.uint8)
    scales = np.zeros((count, blocks), dtype=np.float32)
    zeros = np.zeros((count, blocks), dtype=np.uint8)

    def fit_block(start: int, stop: int, values: np.ndarray) -> None:
        fitted = quantize_blocks(values, bits, block_size, importance[start:stop][None, :])
        scales[:, start // block_size], zeros[:, start // block_size] = fitted.scale[:, 0], fitted.zero_point[:, 0]

    def round_column(start: int, values: np.ndarray, metric: np.ndarray) -> np.ndarray:
        b, j = divmod(start, block_size)
        scale, zero = scales[:, b].astype(np.float64), zeros[:, b].astype(np.float64)
        level = np.clip(np.rint(values[:, 0] / scale) + zero, 0, top)
        q[:, b, j] = level
        return ((level - zero) * scale)[:, None]

    result = quantize_with_feedback(padded, h, round_column, block=block_size, begin_block=fit_block)
    return BlockQuantized(q, scales, zeros, bits, block_size, length), result.note
