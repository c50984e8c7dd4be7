"""Runs described for `graphpass inspect`: a JSON-able summary and its text."""

from __future__ import annotations

from typing import Any

from onnx import helper

from graphpass.blocks.graph_index import _node_label
from graphpass.blocks.runs import BlockAnalysis, BlockRun
from graphpass.report import human_bytes


def describe_runs(found: BlockAnalysis) -> dict[str, Any]:
    """JSON-able summary of the runs and of the blocks left out of them."""
    return {
        "runs": [_describe_run(run) for run in found.runs],
        "unsafe": [
            {"first_node": u.first_node, "nodes_per_block": u.nodes_per_block, "reason": u.reason}
            for u in found.unsafe
        ],
    }


def _describe_run(run: BlockRun) -> dict[str, Any]:
    first = run.blocks[0][0]
    shared, per_block = run.shared_slots, run.per_block_slots
    return {
        "start_node": _node_label(run.scope.body.node[first], first),
        "start_index": first,
        "blocks": run.length,
        "nodes_per_block": run.nodes_per_block,
        "carried": [{"initial": c.initial, "final": c.final} for c in run.carried],
        "invariants": [i.name for i in run.invariants],
        "per_block_inputs": [list(v.names) for v in run.inputs],
        "per_block_outputs": [list(v.names) for v in run.outputs],
        "shared_weights": len(shared),
        "shared_weight_bytes": sum(s.nbytes for s in shared),
        "per_block_weights": len(per_block),
        "per_block_weight_bytes": sum(s.nbytes for s in per_block) * run.length,
        "bytes_saved_if_shared": sum(s.nbytes for s in shared if not s.shared) * (run.length - 1),
        "slots": [
            {
                "names": list(s.names),
                "shape": list(s.shape),
                "dtype": helper.tensor_dtype_to_string(s.dtype),
                "equal": s.equal,
                **({"role": s.role} if s.role else {}),
            }
            for s in run.slots
        ],
    }


def render_runs(found: dict[str, Any]) -> str:
    """Text for `graphpass inspect`, from `describe_runs`."""
    runs = found["runs"]
    if not runs and not found["unsafe"]:
        return "repeated blocks: none"
    lines = [f"repeated blocks: {len(runs)} run(s)"]
    for run in runs:
        carried = ", ".join(c["initial"] for c in run["carried"])
        lines.append(
            f"  {run['blocks']} blocks x {run['nodes_per_block']} nodes from '{run['start_node']}' "
            f"(node {run['start_index']}), carrying {carried}"
        )
        lines.append(
            f"    weights: {run['shared_weights']} equal in every block ({human_bytes(run['shared_weight_bytes'])} "
            f"for one copy), {run['per_block_weights']} differ ({human_bytes(run['per_block_weight_bytes'])} in all)"
        )
        if run["invariants"]:
            lines.append(f"    loop-invariant inputs: {', '.join(run['invariants'])}")
        if run["per_block_inputs"] or run["per_block_outputs"]:
            first_in = ", ".join(names[0] for names in run["per_block_inputs"]) or "none"
            first_out = ", ".join(names[0] for names in run["per_block_outputs"]) or "none"
            lines.append(f"    graph inputs and outputs of each block (the first block's): in {first_in}; "
                         f"out {first_out}")
    for unsafe in found["unsafe"]:
        lines.append(f"  left out: the block starting at '{unsafe['first_node']}': {unsafe['reason']}")
    return "\n".join(lines)
