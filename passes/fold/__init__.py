"""fold: run repeated blocks as one Loop (or Scan) instead of N unrolled copies.

The runs come from `graphpass.blocks.RepeatedBlocks`. A run whose weights are equal in every
block (after `tie`, or already) becomes a Loop with trip count N whose body is the first
block, holding the one remaining copy of each weight as its own initializer: weight bytes
drop to one block's worth. A run whose weights differ keeps one [N, ...] stack per weight,
fed as Scan inputs or sliced by Gather on the iteration number inside a Loop; the bytes
stay, the nodes drop to one block.

Lookup weights (a codebook pass's GatherElements of a codebook by unpacked indices, and any
other node computed from weights alone that depends on a per-block weight) are not run in
the body, where nothing is constant and every iteration would rebuild them (4-5x the
latency on BERT). They run once before the loop, over the stacked packed indices (see
`graphpass.batched_lookup`), or once per block with the results stacked when an op has no batched
form; runtimes fold either to a constant at load and the body slices dense weights. The
file keeps the packed indices. With the `memory` objective they stay in the body, where
the weights stay compressed in memory.

Blocks that read a graph input each (a decoder layer's past keys and values) and make a
graph output each (its present keys and values) fold into a Scan too: the inputs are stacked
[N, ...] before it (Unsqueeze, Concat) and enter as scan inputs, the body's outputs leave as
scan outputs and are split back into the graph outputs after it (Split, Squeeze).

The Scan runs in onnxruntime, OpenVINO and tract: the body reads nothing from the outer
scope (what it needs enters as a state variable returned unchanged, or as its own copy of a
small constant) and declares no symbolic dims. tract has no Loop, so with tract as a target
every fold is a Scan (mode=loop leaves the run unfolded, with a note).

The body computes what each block computed, so the pass is lossless up to float rounding:
a MatMul whose weight changes per iteration runs without MLAS prepacking, which sums in
another order (about 1e-6 absolute on BERT, as much as onnxruntime's own optimisation
levels differ on the unrolled model).

The body is built with onnx-graphsurgeon (import of the block, typed signature, port
rewiring, cleanup, ordering, export). The main graph is edited in place instead: a
graphsurgeon round trip would rewrite every unrelated node and tensor (dropping doc strings,
re-encoding attributes) and its cleanup() would also drop dead weights other passes own.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import onnx_graphsurgeon as gs

from graphpass.blocks import BlockAnalysis, BlockRun, Dims, RepeatedBlocks
from graphpass.manager import Option, Pass, PassContext, PassResult, register
from graphpass.passes.fold.graph_helpers import topological_order
from graphpass.passes.fold.plan import _scan_over_copies, plan_run
from graphpass.passes.fold.rewrite import _Rewrite
from graphpass.runtimes import ConstantInputs

# Stacking per-block weights saves no bytes and costs a slice per iteration: worth it only
# when the run is long enough for the node count to matter.
MIN_STACKED_BLOCKS = 3
# Scan needs opset 9 (its current signature); Loop works from opset 1.
SCAN_MIN_OPSET = 9
# Never computed before the loop (see _may_precompute): random ops differ per call...
RANDOM_OPS = frozenset({
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
})  # fmt: skip
# ... and onnxruntime does not fold these (it keeps QDQ pairs for its fusions, MatMulNBits
# among them): outside the loop they would run at every call, once per block and then
# stacked. They stay in the body unless tract is a target, which needs their scales constant.
QUANTIZE_OPS = frozenset({"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear"})


@register
class FoldPass(Pass):
    name = "fold"
    summary = "run repeated blocks as one Loop over shared weights, or over per-block weights stacked [N, ...]"
    lossless = True
    options = (
        Option(
            "stack", bool, True,
            f"also fold runs of {MIN_STACKED_BLOCKS}+ blocks whose weights differ, stacked [N, ...]",
        ),
        Option(
            "mode", str, "auto",
            "how stacked weights are sliced: scan (Scan inputs), loop (Gather on the iteration number), "
            "auto (scan: measured faster in onnxruntime, see bench/bench_fold.py)",
            choices=("auto", "loop", "scan"),
        ),
        Option("min_blocks", int, 2, "fold runs of at least this many blocks", low=2),
    )  # fmt: skip

    def call(self, ctx: PassContext) -> PassResult:
        result = PassResult()
        found: BlockAnalysis = ctx.analysis(RepeatedBlocks)
        for unsafe in found.unsafe:
            result.notes.append(f"fold: left the block starting at '{unsafe.first_node}' unfolded: {unsafe.reason}")
        if not found.runs:
            result.notes.append("fold: no repeated blocks found; the model is unchanged")
            return result
        self._types = found.value_types
        modes = {id(run): self._mode(run, ctx) for run in found.runs}
        chosen = [run for run in found.runs if self._foldable(run, modes[id(run)], ctx, result)]
        if not chosen:
            return result
        hoist = ctx.deployment.objective != "memory"
        keep_in_body = RANDOM_OPS | (frozenset() if ctx.deployment.needs_constant_quantize_params else QUANTIZE_OPS)
        plans = {}
        for run in list(chosen):
            plans[id(run)], why_not = plan_run(run, found.value_types, hoist, keep_in_body)
            if why_not:
                result.notes.append(f"fold: the lookups of the run at '{run.nodes(0)[0].name}' stay in the loop body, "
                                    f"rebuilt at every iteration: {why_not}")
            steps = plans[id(run)].sliced or run.inputs
            if modes[id(run)] == "scan" and not steps and not _scan_over_copies(run, plans[id(run)]):
                result.notes.append(f"fold: left the run at '{run.nodes(0)[0].name}' unfolded: a target "
                                    "runtime has no Loop, and no small float weight could give a Scan its steps")
                chosen.remove(run)
        if not chosen:
            return result
        with quiet_graphsurgeon():
            rewrite = _Rewrite(ctx.model, found)
            folded = [rewrite.fold(run, modes[id(run)], plans[id(run)]) for run in chosen]
            result.tensors_changed = rewrite.commit()
        if rewrite.also_outside:
            result.notes.append(
                f"fold: {len(rewrite.also_outside)} per-block weights are also read outside their run, "
                f"so they stay stored besides their stack (e.g. {sorted(rewrite.also_outside)[0]})"
            )
        result.changed = True
        result.details["runs"] = folded
        for info in folded:
            result.notes.append(
                f"fold: {info['blocks']} blocks of {info['nodes_per_block']} nodes -> one {info['op']} "
                f"({info['shared_weights']} shared weights, {info['stacked_weights']} stacked"
                + (f", {info['gemm_weights']} of them read by Gemm(transB=1))" if info["gemm_weights"] else ")")
            )
            if info["per_block_inputs"] or info["per_block_outputs"]:
                result.notes.append(
                    f"fold: each block's own graph inputs ({info['per_block_inputs']} per block) are stacked into "
                    f"scan inputs, its graph outputs ({info['per_block_outputs']} per block) split from scan outputs"
                )
            if info["precomputed_values"]:
                how = (
                    "rebuilt once, over the stacked stored inputs," if info["precomputed_once"]
                    else f"rebuilt per block ({info['precomputed_nodes_per_block']} nodes each) and stacked"
                )
                result.notes.append(
                    f"fold: {info['precomputed_values']} per-block weights are lookups: {how} before the "
                    f"{info['op']}, so runtimes fold them to constants at load and the body does no lookup"
                )
        return result

    def _foldable(self, run: BlockRun, mode: str, ctx: PassContext, result: PassResult) -> bool:
        where = f"run of {run.length} blocks at '{run.nodes(0)[0].name or run.nodes(0)[0].op_type}'"
        reason = None
        if mode == "loop" and not ctx.deployment.runs_loop:
            why = "mode=loop" if self.config["mode"] == "loop" else f"Scan needs opset {SCAN_MIN_OPSET}"
            reason = f"a target runtime does not run Loop ({', '.join(ctx.deployment.without_loop)}), and {why}"
        elif run.length < self.config["min_blocks"]:
            reason = f"shorter than min_blocks={self.config['min_blocks']}"
        elif run.per_block_slots and not self.config["stack"]:
            reason = f"{len(run.per_block_slots)} weights differ between blocks and stack=false"
        elif run.per_block_slots and run.length < MIN_STACKED_BLOCKS:
            reason = f"weights differ between blocks; stacking pays only for {MIN_STACKED_BLOCKS}+ blocks"
        elif mode == "loop" and (run.inputs or run.outputs):
            reason = "its blocks read or make graph inputs or outputs of their own, which only a Scan slices and stacks"
        elif any(c.dtype is None for c in run.carried):
            reason = "the type of a carried value is unknown (shape inference could not tell)"
        elif any(v.dtype is None or v.dims is None for v in run.inputs + run.outputs):
            reason = "the type of a graph input or output of a block is unknown (shape inference could not tell)"
        elif needed := _needs_constants(run, ctx.deployment.constant_in_loops):
            reason = needed
        elif mode == "scan" and any(i.name not in self._types for i in run.invariants):
            # a Scan takes it as a state variable, which must declare its element type
            reason = "the type of a value every block reads is unknown (shape inference could not tell)"
        if reason:
            result.notes.append(f"fold: left the {where} unfolded: {reason}")
        return reason is None

    def _mode(self, run: BlockRun, ctx: PassContext) -> str:
        """Scan unless told otherwise (or the opset predates it).

        Both slice a stacked weight per iteration; Scan hands out views of the stack where
        Gather copies, and it measured faster on BERT. A run of shared weights only is a Loop
        (a Scan takes its trip count from a scan input, see _scan_over_copies), except when a
        target runtime has no Loop (tract). The choice is fixed rather than timed per model, so a run always writes
        the same bytes."""
        if self.config["mode"] == "loop" or ctx.model.opset < SCAN_MIN_OPSET:
            return "loop"
        if not (run.per_block_slots or run.inputs or run.outputs) and ctx.deployment.runs_loop:
            return "loop"  # per-block graph inputs and outputs need a Scan: a Loop would not slice them
        return "scan"


def _needs_constants(run: BlockRun, needs: Mapping[str, Sequence[ConstantInputs]]) -> str | None:
    """Why a target could not run this run folded, or None: it needs an input of a block node
    constant (`needs`, from the deployment), and a loop body reads every weight as a slice or a
    state variable."""
    for node in run.nodes(0):
        for rule in needs.get(node.op_type, ()):
            if any(i < len(node.input) and node.input[i] for i in rule.indices):
                return f"{rule.reason}, which a loop body does not have"
    return None


@contextmanager
def quiet_graphsurgeon() -> Iterator[None]:
    """graphsurgeon warns about things that are fine here (outer-scope names, say)."""
    with gs.logger.G_LOGGER.suppress(gs.logger.G_LOGGER.ERROR):
        yield


__all__ = ["FoldPass", "topological_order", "quiet_graphsurgeon", "Dims"]
