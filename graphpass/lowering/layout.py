"""Layout: which values of a weight share a codebook row, and the view that rebuilds it.

A weight is split into groups that each own one row of the codebook: the whole tensor, one
output channel, or a block of `group_size` values of one output channel. The weight is only
*reshaped* (never transposed) into a view in which one axis runs within a group, so
`GatherElements(table, indices, axis=that axis)` rebuilds it (see `graphpass.lowering.lookup`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Layout:
    """How a weight splits into codebook groups; see the module docstring for the views.

    `matrix` is the weight as a 2-D [rows, cols] without moving data, `channel_axis` (0 or 1)
    the matrix axis that indexes channels, and `group_size` how many values of one channel
    share a codebook row (the whole channel for per-channel, everything for per-tensor).
    """

    shape: tuple[int, ...]
    granularity: str
    matrix: tuple[int, int]
    channel_axis: int
    group_size: int

    @classmethod
    def per_tensor(cls, shape) -> Layout:
        size = element_count(shape)
        return cls(tuple(shape), "tensor", (1, size), 0, size)

    @classmethod
    def per_channel(cls, shape, axis: int | None) -> Layout:
        """One row per slice along `axis`; an axis other than the first or last falls back
        to the first (a view without transposes needs the channel axis at an end)."""
        shape = tuple(shape)
        if axis is None or len(shape) < 2:
            return cls.per_tensor(shape)
        axis = axis % len(shape)
        if axis == len(shape) - 1:
            channels = shape[-1]
            return cls(shape, "channel", (element_count(shape) // channels, channels), 1, element_count(shape) // channels)
        channels = shape[0]
        return cls(shape, "channel", (channels, element_count(shape) // channels), 0, element_count(shape) // channels)

    @classmethod
    def per_group(cls, shape, axis: int | None, group_size: int) -> Layout:
        """Blocks of `group_size` values within each channel. A channel shorter than that is one
        block; a length it does not divide uses its largest divisor >= group_size / 2, or falls
        back to per-channel (check `.granularity` and `.group_size` for what was chosen)."""
        channel = cls.per_channel(shape, axis)
        if channel.granularity != "channel":
            return channel
        reduced = channel.matrix[1 - channel.channel_axis]
        size = _largest_divisor_at_most(reduced, group_size)
        if reduced <= group_size or size < max(1, group_size // 2):
            return channel
        return cls(channel.shape, "group", channel.matrix, channel.channel_axis, size)

    @property
    def channels(self) -> int:
        return self.matrix[self.channel_axis]

    @property
    def groups(self) -> int:
        return element_count(self.shape) // self.group_size

    @property
    def blocks(self) -> int:
        """Groups per channel."""
        return self.matrix[1 - self.channel_axis] // self.group_size

    @property
    def view(self) -> tuple[int, ...]:
        rows, cols = self.matrix
        if self.granularity != "group":
            return (rows, cols)
        if self.channel_axis == 0:
            return (rows, self.blocks, self.group_size)
        return (self.blocks, self.group_size, cols)

    @property
    def within_axis(self) -> int:
        """The view axis along which one group's values run: GatherElements' axis."""
        if self.granularity == "group":
            return 2 if self.channel_axis == 0 else 1
        return 1 - self.channel_axis

    def split(self, array: np.ndarray) -> np.ndarray:
        """The weight as [groups, group_size], one group a row, in codebook-row order."""
        view = np.asarray(array).reshape(self.view)
        return np.moveaxis(view, self.within_axis, -1).reshape(self.groups, self.group_size)

    def merge(self, rows: np.ndarray) -> np.ndarray:
        """Inverse of `split` for any row length: [groups, m] -> the view with m on the within axis.

        With m = group_size this rebuilds a weight-sized array (labels); with m = k it lays a
        codebook out as the GatherElements table.
        """
        outer = [d for axis, d in enumerate(self.view) if axis != self.within_axis]
        stacked = np.asarray(rows).reshape(*outer, rows.shape[-1])
        return np.moveaxis(stacked, -1, self.within_axis)


def element_count(shape) -> int:
    """Values in a tensor of `shape` (1 for a scalar)."""
    return int(np.prod(shape, dtype=np.int64)) if len(shape) else 1


def _largest_divisor_at_most(n: int, limit: int) -> int:
    for candidate in range(min(n, limit), 0, -1):
        if n % candidate == 0:
            return candidate
    return 1

