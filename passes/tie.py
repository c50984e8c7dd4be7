"""tie: store one copy of weights that are the same tensor stored several times.

Exact duplicates (same dtype, shape and bytes) of any size are merged: each group keeps one
stored tensor in the innermost scope that encloses every member, and readers of the others
read that one instead. Weights that a caller may override (initializers also listed as graph
inputs) are never merged.
"""

from __future__ import annotations

from graphpass.analysis import DuplicateGroup, ExactDuplicates, common_scope
from graphpass.manager import Pass, PassContext, PassResult, register
from graphpass.weights import Replacement, WeightRef


@register
class TiePass(Pass):
    name = "tie"
    summary = "one stored copy for weights that are exact duplicates (any size, any scope)"
    lossless = True
    options = ()

    def call(self, ctx: PassContext) -> PassResult:
        result = PassResult()
        groups: list[DuplicateGroup] = ctx.analysis(ExactDuplicates)
        for group in groups:
            self._tie_group(ctx, group.members, result)
        result.changed = result.tensors_changed > 0
        result.details["exact_groups"] = len(groups)
        return result

    def _tie_group(self, ctx: PassContext, members: list[WeightRef], result: PassResult) -> None:
        tieable = []
        for weight in members:
            if weight.overridable:
                result.skip(weight.name, "initializer is also a graph input, so a caller may override it")
            else:
                tieable.append(weight)
        # Function bodies cannot see the graph, nor one another: tie within each root only.
        for family in _by_root_scope(tieable):
            if len(family) > 1:
                self._share(ctx, family, result)

    def _share(self, ctx: PassContext, family: list[WeightRef], result: PassResult) -> None:
        home = common_scope([w.scope for w in family])
        keeper = next((w for w in family if w.scope is home and w.source == "initializer"), None)
        if keeper is None:
            # An initializer in the common scope is visible to every member from its first node
            # on; a Constant node there would not be, so the value moves to a new initializer.
            shared = ctx.model.add_shared_tensor(home, f"{family[0].name}.shared", family[0].read())
        else:
            shared = keeper.name
        for weight in family:
            if weight is not keeper:
                weight.replace_with(Replacement(weight), result=shared)
                result.tensors_changed += 1


def _by_root_scope(weights: list[WeightRef]) -> list[list[WeightRef]]:
    families: dict[int, list[WeightRef]] = {}
    for weight in weights:
        root = list(weight.scope.ancestors())[-1]
        families.setdefault(id(root), []).append(weight)
    return list(families.values())
