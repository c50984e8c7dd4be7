"""Repeated blocks, found by structure (for fold and inspect).

  runs.py         what the search finds: BlockRun and the weights, carried values and
                  per-block inputs and outputs of its blocks
  graph_index.py  one scope indexed by node position: producers, readers, weights, types
  hashing.py      structural hashes of values (Weisfeiler-Lehman refinement)
  matching.py     a template block between two cut points, matched port by port
  finder.py       RepeatedBlocks: the search itself, from seeds to checked loops
  describe.py     the runs as `graphpass inspect` shows them
"""

from graphpass.blocks.describe import describe_runs, render_runs
from graphpass.blocks.finder import RepeatedBlocks
from graphpass.blocks.graph_index import GraphIndex, infer_value_types, node_reads
from graphpass.blocks.hashing import value_hashes
from graphpass.blocks.matching import template_between
from graphpass.blocks.runs import (
    LOOKUP_ROLES, BlockAnalysis, BlockRun, CarriedValue, Dims, Invariant, PerBlockValue, Port, UnsafeBlocks,
    WeightSlot,
)

__all__ = [
    "LOOKUP_ROLES", "BlockAnalysis", "BlockRun", "CarriedValue", "Dims", "GraphIndex", "Invariant", "PerBlockValue",
    "Port", "RepeatedBlocks", "UnsafeBlocks", "WeightSlot", "describe_runs", "infer_value_types", "node_reads",
    "render_runs", "template_between", "value_hashes",
]
