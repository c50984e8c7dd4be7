"""`graphpass inspect`: where a model's bytes are, and what the passes could share."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from graphpass.analysis import DuplicateGroup, ExactDuplicates
from graphpass.blocks import RepeatedBlocks, describe_runs, render_runs
from graphpass.manager import PassContext
from graphpass.related import find_related
from graphpass.report import human_bytes
from graphpass.rows import SharedRows, shared_row_tables

TOP_TENSORS = 15
OVERRIDABLE_PLACE = "initializers also graph inputs"


def inspect_model(ctx: PassContext, tol: float = 1e-3, rows: bool = False) -> dict[str, Any]:
    """`tol` bounds the near copies (and with `rows`, near units) listed; tying them is the
    user's call (tie(tol=...)). `rows` reads every weight in full, so it is asked for."""
    model = ctx.model
    weights = model.weights()
    by_op: dict[str, int] = defaultdict(int)
    by_place: dict[str, int] = defaultdict(int)
    for weight in weights:
        ops = sorted(weight.consumer_ops) or ["(unused)"]
        by_op["/".join(ops)] += weight.nbytes
        by_place[_place(weight)] += weight.nbytes
    largest = sorted(weights, key=lambda w: (-w.nbytes, w.name))[:TOP_TENSORS]
    groups = _tieable(ctx.analysis(ExactDuplicates))
    found = {
        "weights": len(weights),
        "weight_bytes": model.weight_bytes(),
        "nodes": model.node_count(),
        "opset": model.opset,
        "bytes_by_consumer_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
        "bytes_by_place": dict(sorted(by_place.items(), key=lambda kv: -kv[1])),
        "overridable_weights": sorted(w.name for w in weights if w.overridable),
        "largest_tensors": [_tensor_row(w) for w in largest],
        "exact_duplicates": [
            {"members": [w.name for w in g.members], "shape": list(g.members[0].shape), "saved_bytes": g.saved_bytes}
            for g in sorted(groups, key=lambda g: -g.saved_bytes)
        ],
        "exact_duplicate_bytes": sum(g.saved_bytes for g in groups),
        # Only one copy of each exact group is related to others: two transposes of one weight
        # are an exact pair, and listing both as transposed too would count one of them twice.
        "related": [_related_row(g) for g in find_related(ctx, tol, {"transposed", "scaled", "near"},
                                                          exclude=frozenset(w for g in groups for w in g.members[1:]))],
        "near_tol": tol,
        "repeated_blocks": describe_runs(ctx.analysis(RepeatedBlocks)),
    }
    if rows:
        found["shared_rows"] = [_rows_row(t) for t in shared_row_tables(ctx, tol)]
    return found


def _tieable(groups: list[DuplicateGroup]) -> list[DuplicateGroup]:
    """The groups without the copies a caller may feed, which tie leaves alone."""
    kept = [DuplicateGroup([w for w in g.members if not w.overridable]) for g in groups]
    return [g for g in kept if len(g.members) > 1]


def _rows_row(shared: SharedRows) -> dict[str, Any]:
    return {
        "unit_size": shared.table.shape[1],
        "distinct": len(shared.table),
        "saved_bytes": shared.bytes_before - shared.bytes_after,
        "members": [{"weight": m.view.weight.name, "axis": m.view.axis, "units": m.view.count, "error": m.error}
                    for m in shared.members],
    }


def _related_row(group) -> dict[str, Any]:
    return {
        "root": group.root.name,
        "saved_bytes": group.saved_bytes,
        "members": [{"weight": m.name, "kind": rel.kind, "error": rel.error} for m, rel in group.members],
    }


def _place(weight) -> str:
    if weight.overridable:
        return OVERRIDABLE_PLACE
    kind = "initializers" if weight.source == "initializer" else "Constant nodes"
    if weight.scope.is_function:
        return f"{kind} in functions"
    return f"{kind} in subgraphs" if weight.scope.parent is not None else f"{kind} (top graph)"


def _tensor_row(weight) -> dict[str, Any]:
    return {
        "name": weight.name,
        "shape": list(weight.shape),
        "bytes": weight.nbytes,
        "where": weight.where,
        "read_by": sorted(weight.consumer_ops),
    }


def render_inspection(found: dict[str, Any]) -> str:
    lines = [
        f"{found['weights']} weights, {human_bytes(found['weight_bytes'])}, {found['nodes']} nodes, opset {found['opset']}",
        "",
        "bytes by the op that reads them:",
    ]
    lines += [f"  {op:<30} {human_bytes(n):>12}" for op, n in found["bytes_by_consumer_op"].items()]
    lines += ["", "bytes by where they are stored:"]
    lines += [f"  {place:<30} {human_bytes(n):>12}" for place, n in found["bytes_by_place"].items()]
    if found["overridable_weights"]:
        lines.append(f"  ({len(found['overridable_weights'])} {OVERRIDABLE_PLACE}: a caller may feed them, so no pass "
                     "rewrites them; --freeze-initializers, here and in run, makes them constants)")
    lines += ["", f"largest {len(found['largest_tensors'])} tensors:"]
    for row in found["largest_tensors"]:
        shape = "x".join(map(str, row["shape"])) or "scalar"
        lines.append(f"  {row['name']:<40} {shape:>14} {human_bytes(row['bytes']):>12}  {row['where']}")
    groups = found["exact_duplicates"]
    lines += ["", f"exact duplicates: {len(groups)} groups, tie would save {human_bytes(found['exact_duplicate_bytes'])}"]
    for group in groups[:TOP_TENSORS]:
        lines.append(f"  {human_bytes(group['saved_bytes']):>12}  {', '.join(group['members'])}")
    related = found["related"]
    saved = sum(g["saved_bytes"] for g in related)
    lines += ["", f"transposed, scaled and near (tol {found['near_tol']:g}) copies: {len(related)} groups, "
                  f"{human_bytes(saved)} could be saved"]
    for group in related[:TOP_TENSORS]:
        for member in group["members"]:
            lines.append(f"  {member['kind']:<10} {member['weight']} of {group['root']}  (error {member['error']:.2e})")
    if "shared_rows" in found:
        lines += ["", *_render_rows(found["shared_rows"], found["near_tol"])]
    lines += ["", render_runs(found["repeated_blocks"])]
    return "\n".join(lines)


def _render_rows(tables: list[dict[str, Any]], tol: float) -> list[str]:
    saved = sum(t["saved_bytes"] for t in tables)
    lines = [f"shared rows and head slices (tol {tol:g}): {len(tables)} tables, {human_bytes(saved)} could be saved"]
    for table in tables[:TOP_TENSORS]:
        units = sum(m["units"] for m in table["members"])
        members = ", ".join(f"{m['weight']} (axis {m['axis']}, error {m['error']:.1e})" for m in table["members"])
        lines.append(f"  {human_bytes(table['saved_bytes']):>12}  {table['distinct']} of {units} "
                     f"{table['unit_size']}-value units: {members}")
    return lines
