"""tie: store one copy of weights that are the same tensor stored several times.

- Exact duplicates (same dtype, shape and bytes) of any size are merged.
- Transposed copies become a Transpose of the kept tensor, scaled copies (negated too) a Mul
  by a scalar; both are checked bit for bit, so they stay lossless.
- With rows=true, units that repeat inside and across weights (rows, filters and head
  slices along axis 0, columns and Q/K/V head slices along axis 1; see graphpass.rows) become
  one table of distinct units plus a row-index Gather per weight, where that shrinks the
  bytes. With tol > 0, a unit within tol of an earlier one shares it.
- With tol > 0, weights within relative error tol of each other share one representative
  (the group's mean where that keeps every member within tol); that is lossy, and the error
  each tie introduced goes into the report.

Every group keeps one stored tensor in the innermost scope that encloses all its members.
Weights that a caller may override (initializers also listed as graph inputs) are never tied.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from graphpass.analysis import ExactDuplicates, common_scope
from graphpass.lowering.lookup import MIN_OPSET as LOOKUP_MIN_OPSET, emit_row_lookup
from graphpass.manager import Option, Pass, PassContext, PassResult, register
from graphpass.related import RelatedGroup, Relation, find_related, relative_error
from graphpass.rows import RowMember, shared_row_tables
from graphpass.weights import Replacement, WeightRef, tensor_stored_bytes


@register
class TiePass(Pass):
    name = "tie"
    summary = "one stored copy for exact, transposed, scaled (bit-exact) and, with tol>0, near-duplicate weights"
    lossless = True
    options = (
        Option("transposed", bool, True, "tie copies that are a transposition (2-D, and common 3-D/4-D permutations)"),
        Option("scaled", bool, True, "tie copies that are c times another weight, c=-1 included"),
        Option("rows", bool, False, "share repeated rows, filters and head slices within and across weights via a row-index Gather"),
        Option("tol", float, 0.0, "tie weights within this relative error ||A-B||/||A|| (0: exact only; >0 is lossy)",
               low=0.0, high=1.0),
    )

    def is_lossless(self) -> bool:
        return self.config["tol"] == 0

    def call(self, ctx: PassContext) -> PassResult:
        result = PassResult()
        groups = ctx.analysis(ExactDuplicates)
        for group in groups:
            self._tie_exact(ctx, group.members, result)
        result.details["exact_groups"] = len(groups)
        kinds = {k for k in ("transposed", "scaled") if self.config[k]} | ({"near"} if not self.is_lossless() else set())
        related = find_related(ctx, self.config["tol"], kinds) if kinds else []
        related = [group for group in (_without_pinned(g, result) for g in related) if group.members]
        result.details["ties"] = [self._tie_related(ctx, group, result) for group in related]
        if self.config["rows"] and ctx.model.opset < LOOKUP_MIN_OPSET:
            result.notes.append(f"rows: opset {ctx.model.opset} is below {LOOKUP_MIN_OPSET}, which row-index "
                                "lookups need; rows left unshared")
        elif self.config["rows"]:
            result.details["rows"] = self._share_rows(ctx, result)
        result.changed = result.tensors_changed > 0
        return result

    def _tie_exact(self, ctx: PassContext, members: list[WeightRef], result: PassResult) -> None:
        tieable = []
        for weight in members:
            if weight.overridable:
                result.skip(weight.name, "initializer is also a graph input, so a caller may override it")
            else:
                tieable.append(weight)
        # Function bodies cannot see the graph, nor one another: tie within each root only.
        for family in _by_root_scope(tieable):
            if len(family) > 1:
                shared = _store_once(ctx, family, keepable=family)
                for weight in family:
                    if weight.name != shared:
                        weight.replace_with(Replacement(weight), result=shared)
                        result.tensors_changed += 1

    def _tie_related(self, ctx: PassContext, group: RelatedGroup, result: PassResult) -> dict:
        representative, errors = _representative(group)
        everyone = [group.root] + [m for m, _ in group.members]
        # Members are transforms of the root, so only the root may keep its storage.
        shared = _store_once(ctx, everyone, keepable=[group.root], value=representative)
        if group.root.name != shared:
            group.root.replace_with(Replacement(group.root), result=shared)
            result.tensors_changed += 1
        for member, relation in group.members:
            member.replace_with(*_rebuild(member, relation, shared))
            result.tensors_changed += 1
        return {
            "root": group.root.name,
            "root_error": errors[0],
            "saved_bytes": group.saved_bytes,
            "members": [
                {"weight": m.name, "kind": rel.kind, "error": err, **_transform_fields(rel)}
                for (m, rel), err in zip(group.members, errors[1:])
            ],
        }


    def _share_rows(self, ctx: PassContext, result: PassResult) -> list[dict]:
        model = ctx.model
        report = []
        for shared in shared_row_tables(ctx, self.config["tol"]):
            members = [m.view.weight for m in shared.members]
            # Named as a weight, not a lookup role: binning may still share the table's values.
            table = model.add_shared_tensor(common_scope([w.scope for w in members]), f"{members[0].name}.rows",
                                            shared.table)
            rows = [self._rebuild_from_table(ctx, member, table, len(shared.table), result) for member in shared.members]
            report.append({"table": table, "unit_size": shared.table.shape[1], "distinct": len(shared.table),
                           "table_bytes": shared.table.nbytes, "bytes_before": shared.bytes_before,
                           "bytes_after": shared.table.nbytes + sum(m["index_bytes"] for m in rows),
                           "error": max(m["error"] for m in rows), "members": rows})
        return report

    def _rebuild_from_table(self, ctx: PassContext, member: RowMember, table: str, table_rows: int,
                            result: PassResult) -> dict:
        weight, axis = member.view.weight, member.view.axis
        r = Replacement(weight)
        weight.replace_with(r, result=emit_row_lookup(r, table, member.ids, table_rows=table_rows, axis=axis,
                                                      opset=ctx.model.opset, ir_version=ctx.model.proto.ir_version))
        result.tensors_changed += 1
        return {"weight": weight.name, "axis": axis, "units": member.view.count,
                "distinct": int(len(np.unique(member.ids))), "index_bytes": _stored_bytes(r),
                "error": member.error, "unit_error": member.unit_error}


def _without_pinned(group: RelatedGroup, result: PassResult) -> RelatedGroup:
    """The group less the members a target runtime needs as constants: a Transpose or Mul
    would rebuild them at load time (a near copy just reads the stored tensor, so it stays)."""
    kept = []
    for member, relation in group.members:
        if member.pinned and relation.kind != "near":
            result.skip(member.name, member.pinned)
        else:
            kept.append((member, relation))
    return RelatedGroup(group.root, kept)


def _stored_bytes(r: Replacement) -> int:
    return sum(tensor_stored_bytes(t) for t in r.tensors)


def _representative(group: RelatedGroup) -> tuple[np.ndarray | None, list[float]]:
    """The value to store and each weight's resulting relative error (root first).

    A group of near copies stores its mean, which minimises the total squared error, unless
    that would put some member beyond the error it was admitted with; then the root stays.
    """
    admitted = [0.0] + [rel.error for _, rel in group.members]
    if not group.pure_near:
        return None, admitted
    values = [group.root.read()] + [m.read() for m, _ in group.members]
    mean = np.mean([v.astype(np.float64) for v in values], axis=0).astype(values[0].dtype)
    errors = [relative_error(v, mean) for v in values]
    if max(errors) <= max(admitted):
        return mean, errors
    return None, admitted


def _rebuild(member: WeightRef, relation: Relation, shared: str) -> tuple[Replacement, str]:
    r = Replacement(member)
    if relation.kind == "transposed":
        return r, r.node("Transpose", [shared], "transposed", perm=list(relation.perm))
    if relation.kind == "scaled":
        scale = r.stored("scale", np.array(relation.scale, dtype=helper.tensor_dtype_to_np_dtype(member.dtype)))
        return r, r.node("Mul", [shared, scale], "scaled")
    return r, shared


def _transform_fields(relation: Relation) -> dict:
    if relation.kind == "transposed":
        return {"perm": list(relation.perm)}
    if relation.kind == "scaled":
        return {"scale": relation.scale}
    return {}


def _store_once(ctx: PassContext, everyone: list[WeightRef], keepable: list[WeightRef],
                value: np.ndarray | None = None) -> str:
    """The name every member will read. A keepable initializer in the innermost common scope
    is visible to all from that scope's first node, so it stays; otherwise the value (by
    default the first weight's) moves to a new initializer there."""
    home = common_scope([w.scope for w in everyone])
    if value is None:
        keeper = next((w for w in keepable if w.scope is home and w.source == "initializer"), None)
        if keeper is not None:
            return keeper.name
        value = everyone[0].read()
    return ctx.model.add_shared_tensor(home, f"{everyone[0].name}.shared", value)


def _by_root_scope(weights: list[WeightRef]) -> list[list[WeightRef]]:
    families: dict[int, list[WeightRef]] = {}
    for weight in weights:
        root = list(weight.scope.ancestors())[-1]
        families.setdefault(id(root), []).append(weight)
    return list(families.values())
