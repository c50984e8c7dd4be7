"""The `graphpass` command: a thin click layer over graphpass.run and friends.

Exit codes: 0 ok, 1 verification budget not met, 2 bad input or usage, 3 a pass failed (a bug).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import click

from graphpass import __version__
from graphpass import sweep as sweeping
from graphpass import verify as verification
from graphpass.api import run as run_pipeline
from graphpass.budget import Budget
from graphpass.deployment import ANY_TARGET, OBJECTIVES, RUNTIMES, Deployment
from graphpass.edit import Model
from graphpass.errors import GraphpassError, UsageError, VerifyInputError
from graphpass.inputs import load_inputs, parse_shapes, synthesize_inputs
from graphpass.inspect import inspect_model, render_inspection
from graphpass.manager import PassContext, registered_passes
from graphpass.model import freeze_initializer_inputs, load_model
from graphpass.parallel import Workers
from graphpass.report import render_report
from graphpass.runtimes.cost import BUDGETS, CostBudget, check_cost, render_cost, seconds_beside

JOBS_HELP = ("Worker threads for the per-tensor work (fingerprints, fits, auto's measurements) "
             "[default: every core]; the output is the same whatever the number.")

# A bar appears only for steps that are still running after this long.
PROGRESS_DELAY_SECONDS = 1.0
# Where stderr is not a terminal (a log, CI), a line with the count at most this often.
PROGRESS_LINE_SECONDS = 30.0


@contextmanager
def delayed_progress(label: str, total: int):
    """click's progress bar on stderr, shown once a step has taken more than a second; where
    stderr is not a terminal, which click's bar leaves blank, a count line every half minute."""
    if not sys.stderr.isatty():
        yield _progress_lines(label, total)
        return
    started = time.monotonic()
    bar = None
    done = 0

    def advance(n: int = 1) -> None:
        nonlocal bar, done
        done += n
        if bar is None and time.monotonic() - started > PROGRESS_DELAY_SECONDS:
            bar = click.progressbar(length=total, label=label, file=sys.stderr)
            bar.__enter__()
            bar.update(done)
        elif bar is not None:
            bar.update(n)

    try:
        yield advance
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)


def _progress_lines(label: str, total: int):
    """An `advance` that prints `label: done/total` once the step has run PROGRESS_DELAY_SECONDS,
    then every PROGRESS_LINE_SECONDS."""
    next_line = time.monotonic() + PROGRESS_DELAY_SECONDS
    done = 0

    def advance(n: int = 1) -> None:
        nonlocal next_line, done
        done += n
        if time.monotonic() >= next_line:
            next_line = time.monotonic() + PROGRESS_LINE_SECONDS
            click.echo(f"{label}: {done}/{total}", err=True)

    return advance


def _fail(message: str, code: int) -> None:
    click.echo(f"graphpass: error: {message}", err=True)
    sys.exit(code)


class GraphpassGroup(click.Group):
    """Turns every expected failure into one line on stderr and its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GraphpassError as exc:
            _fail(str(exc), exc.exit_code)
        except VerifyInputError as exc:
            _fail(str(exc), 2)
        except MemoryError:
            _fail("out of memory", 2)


def _budget(atol, rtol, min_cosine) -> Budget | None:
    if atol is None and rtol is None and min_cosine is None:
        return None
    return Budget(atol=atol, rtol=rtol, min_cosine=min_cosine)


def _shapes(specs) -> dict | None:
    return parse_shapes(specs) if specs else None


TARGET_HELP = (f"Comma-separated runtimes the output must run in: {', '.join(RUNTIMES)}, or {ANY_TARGET}. "
               "Verification compares output and input in each of them (and always in onnxruntime); "
               "where the input itself does not run, that runtime is a note, not a failure, and an output that "
               "runs there is compared with the input's onnxruntime outputs.")

input_options = [
    click.option("--inputs", "inputs", type=click.Path(dir_okay=False), help="Real inputs as .npz (name -> array)."),
    click.option("--shape", "shapes", multiple=True, metavar="NAME=DxD", help="Size of dynamic dims, e.g. input_ids=1x128."),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed for generated inputs."),
]
budget_options = [
    click.option("--atol", type=float, help="Elementwise budget: |cand-ref| <= atol + rtol*|ref|."),
    click.option("--rtol", type=float, help="Elementwise relative budget (see --atol)."),
    click.option("--min-cosine", type=float, help="Budget: cosine similarity of every sample (rows of the batch axis) of every output at least this."),
    *input_options,
]

cost_options = [
    click.option("--no-cost", is_flag=True,
                 help="Skip measuring the runtime cost (memory, start, latency) of input and output."),
    click.option("--max-memory", type=float, metavar="R",
                 help="Cost budget: the output's onnxruntime session memory at most R times the input's."),
    click.option("--max-peak-rss", type=float, metavar="R", help="Cost budget: peak RSS at most R times the input's."),
    click.option("--max-start", type=float, metavar="R",
                 help="Cost budget: session creation time at most R times the input's."),
    click.option("--max-latency", type=float, metavar="R", help="Cost budget: median latency at most R times the input's."),
]


def _cost_budget(no_cost, max_memory, max_peak_rss, max_start, max_latency) -> CostBudget:
    budget = CostBudget(max_memory=max_memory, max_peak_rss=max_peak_rss, max_start=max_start, max_latency=max_latency)
    if no_cost and budget.given:
        options = [BUDGETS[name][1] for name in budget.given]
        verb = "needs" if len(options) == 1 else "need"
        raise UsageError(f"{', '.join(options)} {verb} the cost measurement; drop --no-cost")
    return budget


def with_options(options):
    def decorate(func):
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


@click.group(cls=GraphpassGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="graphpass")
@click.option("-v", "--verbose", is_flag=True, help="Log what the passes do.")
def main(verbose: bool) -> None:
    """Post-training weight-sharing compiler for ONNX.

    Rewrites a model so it stores fewer bytes, and checks in onnxruntime how close its
    outputs stay to the original's.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")
    # onnx-graphsurgeon warns at length on models whose branches reuse node names.
    logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)
    if threading.current_thread() is threading.main_thread():  # only there can Python take signals
        signal.signal(signal.SIGTERM, _stop_on_sigterm)


# What a shell reports for a process ended by SIGTERM.
SIGTERM_EXIT = 128 + signal.SIGTERM


def _stop_on_sigterm(signum, frame) -> None:
    """Stop as Ctrl-C does, through every cleanup: by default SIGTERM ends Python on the spot
    and left a run's hidden staging folder (up to the output's size) beside the output."""
    click.echo("graphpass: stopped by SIGTERM", err=True)
    sys.exit(SIGTERM_EXIT)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the result.")
@click.option("--passes", "spec", default="tie", show_default=True, help='Pass spec, e.g. "tie,kmeans(bits=4),fold".')
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Also write the report as JSON here.")
@with_options(budget_options)
@click.option("--budget-output", "budget_outputs", multiple=True, metavar="NAME",
              help="Apply the budget to this output only (repeatable); the others get structural checks.")
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime comparison.")
@click.option("--keep-failed", is_flag=True, help="Write the output even when the budget is not met.")
@click.option("--external-data", is_flag=True, help="Store large tensors in OUTPUT.data (automatic above 2 GB).")
@click.option("--in-place", is_flag=True, help="Allow OUTPUT to be the input file.")
@click.option("--freeze-initializers", is_flag=True,
              help="Treat initializers that are also graph inputs (every IR 3 model's, and older exporters' "
                   "default) as constants, so that passes may rewrite them; a caller can no longer feed them. "
                   "An IR 3 model is written as IR 4, which that needs.")
@click.option("--objective", type=click.Choice(OBJECTIVES), default="file", show_default=True,
              help="file: the smallest file (weights may be rebuilt dense at load); memory: weights stay "
                   "compressed in the target runtimes' memory.")
@click.option("--target", "targets", default="onnxruntime", show_default=True, metavar="RUNTIMES",
              help=TARGET_HELP + " Passes leave alone what a target needs kept as is (openvino: LSTM/GRU/RNN "
                                 "weights, quantized LSTMs' too, stay constants).")
@with_options(cost_options)
@click.option("--jobs", type=click.IntRange(min=1), help=JOBS_HELP)
@click.option("--scheduler", metavar="ADDRESS",
              help="Send the per-tensor fits that can leave this machine (the kmeans family's) to this Dask "
                   "scheduler, e.g. tcp://host:8786; its workers read the weights from the model's external data "
                   "themselves (pip install 'graphpass[dask]').")
def run(model, output, spec, report_path, atol, rtol, min_cosine, inputs, shapes, seed, budget_outputs, no_verify,
        keep_failed, external_data, in_place, freeze_initializers, objective, targets, no_cost, max_memory,
        max_peak_rss, max_start, max_latency, jobs, scheduler):
    """Run passes on MODEL, write OUTPUT, verify it against MODEL in onnxruntime and each --target, and measure
    what each costs to run."""
    deployment = Deployment.parse(objective, targets)
    cost_budget = _cost_budget(no_cost, max_memory, max_peak_rss, max_start, max_latency)
    result = run_pipeline(
        model, spec, output=output, inputs=inputs, shapes=_shapes(shapes), budget=_budget(atol, rtol, min_cosine),
        budget_outputs=budget_outputs or None, verify=not no_verify, external_data=external_data, in_place=in_place,
        keep_failed=keep_failed, progress=delayed_progress, seed=seed, deployment=deployment,
        cost=not no_cost, cost_budget=cost_budget, jobs=jobs, scheduler=scheduler,
        freeze_initializers=freeze_initializers,
    )
    click.echo(render_report(result.report, result.verify_result))
    if report_path:
        Path(report_path).write_text(json.dumps(result.report, indent=2, sort_keys=True) + "\n")
    if not result.passed:
        where = f"; {output} written anyway (--keep-failed)" if result.written else "; no output written"
        _fail(f"{'; '.join(result.failures)}{where}", 1)
    click.echo(f"wrote {output}")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--tol", type=click.FloatRange(0, 1), default=1e-3, show_default=True,
              help="List near copies within this relative error.")
@click.option("--rows", is_flag=True, help="Also list rows, filters and head slices that tie(rows=true) would share "
                                          "(reads every weight in full).")
@click.option("--freeze-initializers", is_flag=True,
              help="Inspect MODEL as run --freeze-initializers sees it: initializers that are also graph inputs "
                   "count as constants, which passes may rewrite.")
@click.option("--jobs", type=click.IntRange(min=1), help=JOBS_HELP)
def inspect(model, as_json, tol, rows, freeze_initializers, jobs):
    """Show where MODEL's bytes are and what the passes could share."""
    loaded = load_model(model, map_external=True)
    if freeze_initializers:
        freeze_initializer_inputs(loaded.proto)
    found = inspect_model(PassContext(Model(loaded.proto), delayed_progress, workers=Workers(jobs)), tol, rows=rows)
    found["file_bytes"] = loaded.file_bytes
    click.echo(json.dumps(found, indent=2) if as_json else render_inspection(found))


@main.command(name="passes")
def list_passes():
    """List every registered pass with its options."""
    for name, cls in registered_passes().items():
        kind = "lossless" if cls.lossless else "lossy"
        click.echo(f"{name} ({kind}): {cls.summary}")
        for option in cls.options:
            click.echo(f"    {option.describe()}")


@main.command()
@click.argument("reference", type=click.Path(dir_okay=False))
@click.argument("candidate", type=click.Path(dir_okay=False))
@with_options(budget_options)
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Also write the figures as JSON here.")
@click.option("--target", "targets", default="onnxruntime", show_default=True, metavar="RUNTIMES", help=TARGET_HELP)
@with_options(cost_options)
def verify(reference, candidate, atol, rtol, min_cosine, inputs, shapes, seed, report_path, targets, no_cost,
           max_memory, max_peak_rss, max_start, max_latency):
    """Run REFERENCE and CANDIDATE in onnxruntime (and each --target) on the same inputs, compare outputs and
    runtime cost."""
    runtimes = Deployment.parse(targets=targets).targets
    started = time.perf_counter()
    cost_budget = _cost_budget(no_cost, max_memory, max_peak_rss, max_start, max_latency)
    loaded = load_model(reference, map_external=True)  # checked, its weights left where they are
    load_model(candidate, map_external=True)  # a clear input error beats an onnxruntime one
    if inputs:
        feeds = load_inputs(inputs)
    else:
        feeds = synthesize_inputs(loaded.proto, shapes=_shapes(shapes), seed=seed)
    given = _budget(atol, rtol, min_cosine)
    # Two models without a budget: the figures are shown, but held to nothing, so no PASS.
    result = verification.verify(reference, candidate, feeds, given or Budget(), runtimes=runtimes,
                                 levels=verification.levels_for(loaded.file_bytes), budget_given=given is not None)
    click.echo(verification.render_table(result))
    cost = None
    if not no_cost:
        cost = check_cost(reference, candidate, feeds, cost_budget,
                          seconds_budget=seconds_beside(time.perf_counter() - started))
        click.echo("\n" + render_cost(cost.to_dict()))
    if report_path:
        figures = {**result.to_dict(), "cost": cost.to_dict() if cost is not None else None}
        Path(report_path).write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    if not result.passed or (cost is not None and not cost.passed):
        sys.exit(1)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--methods", help="Comma-separated codecs (default: kmeans,uniform,codebook).")
@click.option("--bits", "bits_text", default="2..8", show_default=True, help="Index bits: a range 2..8 or a list 2,4,8.")
@click.option("--granularities", default="tensor,channel,group", show_default=True,
              help="Comma-separated granularities of the scalar codecs.")
@click.option("--group-size", type=int, default=128, show_default=True, help="Values per codebook with granularity group.")
@with_options(input_options)
@click.option("--model-output", "model_outputs", multiple=True, metavar="NAME",
              help="Measure this output only (repeatable; default: all).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the table here (.csv or .json).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write the rate-distortion plot here (.svg).")
@click.option("--no-baselines", is_flag=True,
              help="Leave out the reference points (onnxruntime's MatMulNBits and int8; NNCF's where it imports).")
@click.option("--feedback", is_flag=True, help="Also sweep every setting with error feedback (a dashed line each).")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False),
              help=".npz the settings that learn from data (feedback, NNCF) learn from; default: the --inputs.")
@click.option("--freeze-initializers", is_flag=True,
              help="Sweep MODEL as run --freeze-initializers sees it: initializers that are also graph inputs "
                   "count as constants, which the settings may rewrite.")
def sweep(model, methods, bits_text, granularities, group_size, inputs, shapes, seed, model_outputs, output, plot,
          no_baselines, feedback, calibration, freeze_initializers):
    """Rate-distortion table of MODEL: file size against output error per method x bits x granularity."""
    sweeping.check_destinations(output, plot)
    rows = sweeping.sweep(model, sweeping.parse_methods(methods), sweeping.parse_bits(bits_text),
                          sweeping.parse_list(granularities), inputs=inputs, shapes=_shapes(shapes), seed=seed,
                          outputs=model_outputs or None, group_size=group_size, baselines=not no_baselines,
                          feedback=feedback, calibration=calibration, freeze_initializers=freeze_initializers,
                          progress=delayed_progress)
    click.echo(sweeping.render_text(rows))
    if output:
        sweeping.write_table(rows, output)
        click.echo(f"wrote {output}")
    if plot:
        sweeping.write_svg(rows, plot, f"{Path(model).name}: size against output error")
        click.echo(f"wrote {plot}")


if __name__ == "__main__":
    main()
