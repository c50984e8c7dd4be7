"""Spec strings, option validation, per-pass statistics, failures that name the pass."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import graphpass
from graphpass.analysis import WeightFingerprints
from graphpass.edit import Model
from graphpass.errors import PassFailed, UsageError
from graphpass.manager import Analysis, Option, Pass, PassContext, PassResult, parse_spec
from graphpass.model import load_model
from graphpass.verify import Budget
from graphpass.weights import Replacement


def test_spec_parses_passes_and_typed_options(scratch_pass):
    @scratch_pass
    class Knobs(Pass):
        name = "knobs"
        summary = "test"
        lossless = True
        options = (
            Option("bits", int, 4, "bits", low=1, high=8),
            Option("granularity", str, "tensor", "where", choices=("tensor", "channel")),
            Option("strict", bool, False, "flag"),
            Option("tol", float, 0.0, "tolerance", low=0.0),
        )

        def call(self, ctx):
            return PassResult()

    first, second = parse_spec(" tie , knobs(bits=3, granularity=channel,strict=true,tol=1e-6)")
    assert first.name == "tie"
    assert second.config == {"bits": 3, "granularity": "channel", "strict": True, "tol": 1e-6}
    assert second.describe() == "knobs(bits=3,granularity=channel,strict=True,tol=1e-06)"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nosuch", "unknown pass 'nosuch'; valid: .*tie"),
        ("tie(bogus=1)", "unknown option 'bogus' for pass 'tie'"),
        ("", "no passes given"),
        ("tie((", "cannot parse"),
    ],
)
def test_bad_specs_are_usage_errors_that_list_choices(spec, message):
    with pytest.raises(UsageError, match=message):
        parse_spec(spec)


def test_bad_option_values_are_usage_errors(scratch_pass):
    @scratch_pass
    class Bounded(Pass):
        name = "bounded"
        summary = "test"
        lossless = False
        options = (Option("bits", int, 4, "bits", low=1, high=8), Option("mode", str, "a", "m", choices=("a", "b")))

        def call(self, ctx):
            return PassResult()

    for spec, message in [
        ("bounded(bits=9)", "at most 8"),
        ("bounded(bits=four)", "bits=four"),
        ("bounded(mode=c)", "one of a, b"),
        ("bounded(bits)", "needs a value"),
    ]:
        with pytest.raises(UsageError, match=message):
            parse_spec(spec)


def test_a_raising_pass_is_named_and_nothing_is_written(raising_pass, fixture_dir, tmp_path):
    raising_pass("broken", ZeroDivisionError("boom"))
    with pytest.raises(PassFailed, match="pass 'broken' failed: ZeroDivisionError: boom"):
        graphpass.run(fixture_dir / "mlp.onnx", "tie,broken", output=tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_pass_that_breaks_the_graph_fails_its_postcondition(scratch_pass, fixture_dir, tmp_path):
    @scratch_pass
    class Vandal(Pass):
        name = "vandal"
        summary = "test"
        lossless = True

        def call(self, ctx):
            del ctx.model.proto.graph.initializer[:]
            return PassResult(changed=True)

    with pytest.raises(PassFailed, match="vandal.*left the model broken"):
        graphpass.run(fixture_dir / "mlp.onnx", "vandal", output=tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


def test_per_pass_statistics(fixture_dir):
    report = graphpass.run(fixture_dir / "albert.onnx", "tie").report
    (stats,) = report["passes"]
    assert stats["name"] == "tie" and stats["seconds"] > 0
    assert stats["weight_bytes_after"] < stats["weight_bytes_before"]
    assert stats["weight_bytes_after"] == report["output"]["weight_bytes"]
    assert stats["tensors_changed"] + stats["tensors_skipped"] + stats["tensors_untouched"] == stats["weights_before"]
    assert stats["nodes_after"] == report["output"]["nodes"]


def test_analyses_are_cached_until_the_model_changes(fixture_dir):
    model = Model(load_model(fixture_dir / "albert.onnx").proto)
    ctx = PassContext(model)
    first = ctx.analysis(WeightFingerprints)
    assert ctx.analysis(WeightFingerprints) is first
    model.add_shared_tensor(model.scopes[0], "extra", model.weights()[0].read())
    assert ctx.analysis(WeightFingerprints) is not first


def test_an_analysis_asked_for_by_several_workers_at_once_is_computed_once(fixture_dir):
    class Slow(Analysis):
        computed = []

        @classmethod
        def compute(cls, ctx):
            cls.computed.append(ctx)
            time.sleep(0.2)  # long enough for every worker to ask before it is done
            return object()

    ctx = PassContext(Model(load_model(fixture_dir / "mlp.onnx").proto))
    with ThreadPoolExecutor(4) as pool:
        found = list(pool.map(lambda _: ctx.analysis(Slow), range(4)))
    assert len(Slow.computed) == 1 and all(f is found[0] for f in found)


@pytest.mark.parametrize("budget, passes", [
    (None, False),
    (Budget(min_cosine=0.5), False),  # a cosine alone does not lift the elementwise check
    (Budget(atol=1.0), True),  # the caller's own elementwise bounds replace it
])
def test_a_lossless_pipeline_keeps_its_tight_check(scratch_pass, fixture_dir, budget, passes):
    @scratch_pass
    class Drifting(Pass):
        """Claims to be lossless, yet moves one weight by 1%."""

        name = "drifting"
        summary = "test"
        lossless = True

        def call(self, ctx):
            weight = max(ctx.model.weights(), key=lambda w: w.size)
            replacement = Replacement(weight)
            weight.replace_with(replacement, replacement.stored("drifted", weight.read() * 1.01))
            return PassResult(changed=True, tensors_changed=1)

    result = graphpass.run(fixture_dir / "mlp.onnx", "drifting", budget=budget)
    assert result.passed is passes, result.report["verify"]
