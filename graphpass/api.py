"""`graphpass.run`: load, run passes, write, verify. The CLI is a thin layer over this."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphpass import report as reporting
from graphpass import verify as verification
from graphpass.budget import Budget, lossless_budget
from graphpass.deployment import Deployment
from graphpass.edit import Model
from graphpass.errors import InputError, ModelLoadError, OutputUnloadable, PassFailed, UsageError
from graphpass.inputs import load_inputs, synthesize_inputs
from graphpass.loadable import onnxruntime_load_problem
from graphpass.manager import Pass, PassContext, PassManager, ProgressFactory, parse_spec
from graphpass.memory import release_freed_memory
from graphpass.download import DownloadSize, download_size
from graphpass.model import (
    LoadedModel, WrittenModel, check_output_path, drop_symbolic_value_info, external_data_path,
    freeze_initializer_inputs, load_model, save_compacted, serialized_bytes,
)
from graphpass.parallel import Workers
from graphpass.streamed import stored_weights
from graphpass.runtimes import usable_adapters
from graphpass.runtimes.cost import CostBudget, CostCheck, check_cost, seconds_beside


@dataclass
class RunResult:
    output: WrittenModel = field(repr=False)  # see `model`
    report: dict[str, Any]
    written: Path | None  # the output file, if one was written
    verify_result: verification.VerifyResult | None
    cost: CostCheck | None = None  # runtime cost of input and output, when measured

    @property
    def model(self) -> onnx.ModelProto:
        """The output model, every tensor inside it. Large tensors are read back from the
        written file(s) on first access: a run never holds them itself."""
        return self.output.inline(self.written) if self.written else self.output.proto

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def failures(self) -> list[str]:
        """Which budgets the run missed, one message each (empty when it passed)."""
        return budget_failures(self.verify_result, self.cost)


def budget_failures(checked: verification.VerifyResult | None, cost: CostCheck | None) -> list[str]:
    missed = []
    if checked is not None and not checked.passed:
        unrun = [name for name, outcome in checked.runtimes.items() if outcome.failed]
        if unrun:
            missed.append(f"the output does not run in {', '.join(unrun)}, where its input does")
        if not all(m.passed for m in checked.outputs.values()):
            missed.append("verification budget not met")
    if cost is not None:
        missed += cost.failures
    return missed


def run(
    model: str | os.PathLike | bytes | onnx.ModelProto,
    passes: str | Sequence[Pass] = "tie",
    *,
    output: str | os.PathLike | None = None,
    inputs: dict[str, np.ndarray] | str | os.PathLike | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
    budget: Budget | None = None,
    budget_outputs: Sequence[str] | None = None,
    verify: bool = True,
    external_data: bool = False,
    in_place: bool = False,
    keep_failed: bool = False,
    progress: ProgressFactory | None = None,
    seed: int = 0,
    deployment: Deployment | None = None,
    cost: bool = False,
    cost_budget: CostBudget | None = None,
    jobs: int | None = None,
    scheduler: str | None = None,
    freeze_initializers: bool = False,
) -> RunResult:
    """Compress `model` with `passes`; verify the written result in onnxruntime and in each
    target runtime of `deployment` (where the input runs).

    The output file appears only when verification passes (or `keep_failed`), and is written
    atomically. Without `output`, the result is written to a temporary folder so that its size
    and outputs are still measured on real bytes. `budget_outputs` names the outputs the budget
    applies to (default: all); the others get the structural checks only. `deployment` names
    the objective (file or memory) and the runtimes the output is for (default: file size,
    onnxruntime). With `cost` (implied by a `cost_budget`), the runtime cost of input and output
    is measured side by side after verification (`graphpass.runtimes.cost`), and a missed
    cost budget fails the run as a missed accuracy budget does. `jobs` worker threads (default:
    every core) run the passes' per-tensor work, and `scheduler` (a Dask scheduler's address)
    the part of it that can run on other machines; the output bytes are the same either way.
    `freeze_initializers` makes initializers that are also graph inputs constants, which passes
    may then rewrite (graphpass.model.freeze_initializer_inputs); verification compares against
    the input with their stored values.
    """
    started = time.perf_counter()
    deployment = deployment or Deployment()
    if verify:
        usable_adapters(deployment.targets)  # a missing runtime fails before the passes run, not after
    cost_budget = cost_budget or CostBudget()
    if cost_budget.given and not verify:
        raise UsageError("cost budgets are measured on the verification inputs; drop --no-verify to use them")
    measure_cost = verify and (cost or bool(cost_budget.given))
    manager = PassManager(parse_spec(passes) if isinstance(passes, str) else list(passes))
    if output is not None and not Path(output).parent.is_dir():
        raise UsageError(f"{output}: folder {Path(output).parent} does not exist")
    stage = Path(tempfile.mkdtemp(prefix=".graphpass-", dir=Path(output).parent if output else None))
    written = None
    try:
        staged = stage / (Path(output).name if output else "candidate.onnx")
        compiled = _compile(model, manager, staged, output=output, in_place=in_place, inputs=inputs, shapes=shapes,
                            seed=seed, verify=verify, budget=budget, budget_outputs=budget_outputs,
                            progress=progress, deployment=deployment, external_data=external_data,
                            jobs=jobs, scheduler=scheduler, freeze_initializers=freeze_initializers)
        # Model and its weight handles refer to each other: the input's protobuf goes at a collection.
        release_freed_memory()
        written_files = [p for p in (staged, external_data_path(staged)) if p.exists()]
        _add_download_size(compiled.after, download_size(written_files))
        checked = None
        if verify:
            checked = _verified(compiled, staged, manager, budget, deployment)
        elif output is not None:  # a file will be written: it must load
            _check_output_loads(staged, compiled.reference, manager.passes)
        measured = None
        if measure_cost:
            measured = check_cost(compiled.reference, staged, compiled.feeds, cost_budget,
                                  seconds_budget=seconds_beside(time.perf_counter() - started))
        passed = not budget_failures(checked, measured)
        if output is not None and (passed or keep_failed):
            written = _move_into_place(staged, Path(output))
        if written is None:  # the staged files go with the stage: read the tensors back first
            compiled.output.inline(staged)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    report = _run_report(compiled, manager, deployment, checked, measured)
    return RunResult(compiled.output, report, written, checked, measured)


def _verified(compiled: _Compiled, staged: Path, manager: PassManager, budget: Budget | None,
              deployment: Deployment) -> verification.VerifyResult:
    """The staged output verified against the input, in onnxruntime and in each target."""
    # A lossless pipeline keeps its tight elementwise check when the caller gives only a cosine.
    if manager.lossless:
        chosen = lossless_budget(compiled.output.proto).overridden_by(budget)
    else:
        chosen = budget or Budget()
    levels = verification.levels_for(compiled.before["file_bytes"])
    if levels != verification.DEFAULT_LEVELS:
        compiled.notes.append(_unfolded_note())
    try:
        return verification.verify(compiled.reference, staged, compiled.feeds, chosen,
                                   budget_outputs=compiled.budget_outputs, levels=levels, runtimes=deployment.targets,
                                   budget_given=manager.lossless or _holds_accuracy(budget))
    except ModelLoadError as exc:
        if exc.role == "candidate":  # the reference loaded at the same level just before
            raise OutputUnloadable(_describe(manager.passes), str(exc)) from None
        raise


def _run_report(compiled: _Compiled, manager: PassManager, deployment: Deployment,
                checked: verification.VerifyResult | None, measured: CostCheck | None) -> dict[str, Any]:
    report = reporting.build_report(compiled.before, compiled.after, compiled.stats, compiled.pass_seconds, checked,
                                    manager.lossless)
    report["deployment"] = deployment.to_dict()
    report["workers"] = compiled.workers  # what the passes' seconds ran on
    report["cost"] = measured.to_dict() if measured is not None else None
    # The cost probes run in processes of their own, with their own peaks in report["cost"].
    # Imported here: the probe is also `python -m graphpass.runtimes.probe`, which must not find
    # itself imported already by the package it lives in.
    from graphpass.runtimes.probe import peak_rss_bytes

    report["peak_rss_bytes"] = peak_rss_bytes()
    report["notes"] += compiled.notes
    if compiled.budget_outputs:
        report["notes"].append(f"the budget applies to output(s) {', '.join(compiled.budget_outputs)}; "
                               "the others get the structural checks only")
    return report


@dataclass
class _Compiled:
    """What a run keeps of its input once the passes are done: the output in memory of its own,
    and the figures and inputs the rest of the run needs."""

    output: WrittenModel
    reference: Path | bytes  # the model to verify against
    feeds: dict[str, np.ndarray] | None
    budget_outputs: list[str] | None
    stats: list
    pass_seconds: float
    before: dict[str, Any]
    after: dict[str, Any]  # the download size is added once the written files are measured
    notes: list[str]
    workers: dict[str, Any]  # the workers the passes ran on


def _compile(model, manager: PassManager, staged: Path, *, output, in_place, inputs, shapes, seed, verify, budget,
             budget_outputs, progress, deployment, external_data, jobs, scheduler, freeze_initializers) -> _Compiled:
    """Load `model`, run the passes and write the result to `staged`. The loaded protobuf ends
    with this function: the passes edit it in place and upb frees none of a message's memory
    until the whole message goes, so the input's weights would stay resident under the
    output's through verifying (see save_compacted)."""
    # Weights stay in the input's data file until read: the run holds none of them whole.
    loaded = load_model(_private_copy(model), map_external=True)
    if output is not None:
        check_output_path(Path(output), loaded.path, in_place, loaded.data_files)
    # Once load has rewritten declared -1 sizes, the model to compare against is the rewritten one.
    repaired = loaded.dynamic_minus_one > 0
    reference = loaded.path if loaded.path is not None and not repaired else serialized_bytes(loaded.proto)
    # Without verification, given inputs still calibrate the passes that measure activations.
    feeds = _verification_inputs(loaded, inputs, shapes, seed) if verify or inputs is not None else None
    before = reporting.model_summary(Model(loaded.proto), loaded.file_bytes, loaded.path)
    notes = _frozen(loaded.proto) if freeze_initializers else []
    budget_outputs = verification.budget_output_names(loaded.proto, budget_outputs) if budget_outputs else None

    workers = Workers(jobs, scheduler, stored_weights(loaded.path) if scheduler else None)
    ctx = PassContext(Model(loaded.proto), progress, budget=budget, budget_outputs=budget_outputs,
                      calibration_inputs=feeds, deployment=deployment, workers=workers)
    with ThreadPoolExecutor(max_workers=1) as background:
        # zlib lets go of the GIL, so the input's download size costs no time beside the passes.
        input_download = background.submit(loaded.download_size)
        start = time.perf_counter()
        try:
            stats = _run_passes(manager, ctx, reference)
        finally:
            workers.close()
        pass_seconds = time.perf_counter() - start
        _add_download_size(before, input_download.result())
    notes += _without_symbolic_value_info(ctx.model.proto, deployment)
    if ctx.model.shape_inference_error:
        notes.append(f"onnx shape inference failed ({ctx.model.shape_inference_error}); "
                     "the passes worked from the types the model declares")
    if repaired:
        notes.append(f"{loaded.dynamic_minus_one} declared size(s) of -1 read as dynamic (and written so)")
    after = reporting.model_summary(ctx.model, None, Path(output) if output else None)
    after["file_bytes"], written_model = save_compacted(ctx.model.proto, staged, external_data=external_data)
    return _Compiled(written_model, reference, feeds, budget_outputs, stats, pass_seconds, before, after, notes,
                     {"jobs": workers.jobs, "scheduler": scheduler})


def _without_symbolic_value_info(proto: onnx.ModelProto, deployment: Deployment) -> list[str]:
    """Symbolic shapes declared on intermediate values dropped for the targets that refuse them;
    what the report says of it."""
    refusing = deployment.without_symbolic_value_info
    dropped = drop_symbolic_value_info(proto) if refusing else 0
    if not dropped:
        return []
    return [f"{dropped} symbolic shape(s) declared on intermediate values dropped: {', '.join(refusing)} cannot "
            "unify them with the inputs' sizes (they are hints; runtimes infer shapes themselves)"]


def _frozen(proto: onnx.ModelProto) -> list[str]:
    """Initializers that are also graph inputs made constants; what the report says of it."""
    input_ir = proto.ir_version
    frozen = freeze_initializer_inputs(proto)
    if not frozen:
        return []
    note = f"{frozen} initializer(s) that were also graph inputs are constants now (--freeze-initializers)"
    if proto.ir_version != input_ir:
        note += f"; IR version {input_ir} raised to {proto.ir_version}, which that needs"
    return [note]


def _add_download_size(summary: dict[str, Any], size: DownloadSize) -> None:
    summary["zip_bytes"] = size.zip_bytes
    summary["zip_sample_bytes"] = size.sample_bytes  # None: exact


def _unfolded_note() -> str:
    return (f"the input is above {verification.FOLDED_VERIFICATION_MAX_BYTES >> 20} MiB, so onnxruntime's default "
            "level was verified without constant folding (level 'unfolded': the same kernels and values, without a "
            "dense copy of every lookup in memory); a deployed session folds them when it opens, as the cost step "
            "measures")


def _holds_accuracy(budget: Budget | None) -> bool:
    return budget is not None and (budget.has_elementwise or budget.min_cosine is not None)


def _run_passes(manager: PassManager, ctx: PassContext, reference: Path | bytes) -> list:
    """A pass that fails on an input onnxruntime cannot load either met bad input (exit 2), not a
    bug: the passes may assume a model a runtime accepts (an op that its opset lacks, say)."""
    try:
        return manager.run(ctx)
    except PassFailed:
        problem = onnxruntime_load_problem(reference)
        if problem is not None:
            raise InputError(f"onnxruntime cannot load the input model: {problem}") from None
        raise


def _describe(pipeline: Sequence[Pass]) -> str:
    return ",".join(p.describe() for p in pipeline)


def _check_output_loads(staged: Path, reference: Path | bytes, pipeline: Sequence[Pass]) -> None:
    """Without verification, still write only what onnxruntime loads: an input it cannot load
    either is bad input (exit 2); otherwise the passes broke it (exit 3)."""
    problem = onnxruntime_load_problem(staged)
    if problem is None:
        return
    input_problem = onnxruntime_load_problem(reference)
    if input_problem is not None:
        raise InputError(f"onnxruntime cannot load the input model: {input_problem}")
    raise OutputUnloadable(_describe(pipeline), problem)


def _private_copy(model):
    """Passes edit in place; a caller's ModelProto must come back untouched."""
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    return model


def _verification_inputs(loaded: LoadedModel, inputs, shapes, seed) -> dict[str, np.ndarray]:
    if inputs is None:
        return synthesize_inputs(loaded.proto, shapes=shapes, seed=seed)
    if isinstance(inputs, dict):
        return inputs
    return load_inputs(inputs)


def _move_into_place(staged: Path, output: Path) -> Path:
    data = external_data_path(staged)
    if data.exists():
        # Data first: a model file that appears must find its data already there.
        os.replace(data, external_data_path(output))
    os.replace(staged, output)
    return output
