"""What the search finds: runs of blocks, and what each block reads, carries and makes."""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from graphpass.scopes import Scope

# Name suffixes of the tensors a codebook pass stores (graphpass.lowering.lookup), shown by inspect.
LOOKUP_ROLES = ("codebook", "codebook_scale", "codebook_offset", "indices", "quantized", "scale", "zero_point")

# Dims of a value: an int where static, a symbol name where symbolic, None where unknown.
Dims = tuple[int | str | None, ...]


@dataclass(frozen=True)
class Port:
    """An input of a block node: `node` indexes the block's aligned node list."""

    node: int
    index: int


@dataclass
class WeightSlot:
    """One weight the block reads, and which tensor each block of the run reads there."""

    ports: tuple[Port, ...]
    names: tuple[str, ...]  # first block first
    dtype: int
    shape: tuple[int, ...]
    equal: bool  # the same values in every block (one shared tensor, or byte-equal copies)
    nbytes: int  # of one copy

    @property
    def shared(self) -> bool:
        return len(set(self.names)) == 1

    @property
    def role(self) -> str | None:
        """The role of a lookup weight (`.codebook`, `.lut_indices`, ...), if it has one."""
        tail = self.names[0].rsplit(".", 1)[-1].removeprefix("lut_")
        return tail if tail in LOOKUP_ROLES else None


@dataclass
class CarriedValue:
    """A value each block hands to the next: the loop-carried state of a folded run."""

    ports: tuple[Port, ...]
    source: tuple[int, int]  # (aligned node, output index) that produces it in every block
    initial: str  # what the first block reads
    final: str  # what the last block produces; the run's result
    dtype: int | None
    dims: Dims | None  # None when the rank is unknown


@dataclass
class Invariant:
    """A value every block reads unchanged (a mask, a position table, a shared shape)."""

    name: str
    ports: tuple[Port, ...]


@dataclass
class PerBlockValue:
    """A graph input each block reads (`ports`) or a graph output each block makes (`source`):
    one value per block, `names` first block first, stacked along a new leading axis when the
    run is folded."""

    names: tuple[str, ...]
    dtype: int | None
    dims: Dims | None
    ports: tuple[Port, ...] = ()
    source: tuple[int, int] | None = None  # (aligned node, output index), for an output


@dataclass
class BlockRun:
    """Consecutive blocks with one structure. `blocks[j][k]` is the scope position of the
    k-th node of block j; the k-th node plays the same role in every block."""

    scope: Scope
    blocks: list[list[int]]
    carried: list[CarriedValue]
    invariants: list[Invariant]
    slots: list[WeightSlot]
    inputs: list[PerBlockValue] = field(default_factory=list)  # graph inputs, one per block
    outputs: list[PerBlockValue] = field(default_factory=list)  # graph outputs, one per block

    @property
    def length(self) -> int:
        return len(self.blocks)

    @property
    def nodes_per_block(self) -> int:
        return len(self.blocks[0])

    def nodes(self, block: int) -> list[onnx.NodeProto]:
        return [self.scope.body.node[i] for i in self.blocks[block]]

    def all_positions(self) -> set[int]:
        return {i for block in self.blocks for i in block}

    @property
    def shared_slots(self) -> list[WeightSlot]:
        return [s for s in self.slots if s.equal]

    @property
    def per_block_slots(self) -> list[WeightSlot]:
        return [s for s in self.slots if not s.equal]


@dataclass
class UnsafeBlocks:
    """Blocks that match the run's structure but cannot be folded, and why."""

    first_node: str
    nodes_per_block: int
    reason: str


@dataclass
class BlockAnalysis:
    runs: list[BlockRun]
    unsafe: list[UnsafeBlocks] = field(default_factory=list)
    value_types: dict[str, tuple[int, Dims | None]] = field(default_factory=dict)
