"""Runtime cost: the probe's figures, side-by-side rounds, budgets in the CLI, and the report."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import load_fixture_module
from graphpass.cli import main
from graphpass.errors import UsageError
from graphpass.runtimes import cost as costing
from graphpass.runtimes.cost import CostBudget, CostComparison, CostError, RuntimeCost, measure_cost
from graphpass.runtimes.probe import current_rss_bytes

MB = 1_000_000


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_matmul_file(path, rows, cols):
    generate = load_fixture_module()
    path.write_bytes(generate.one_matmul(generate.heavy_tailed((rows, cols))).SerializeToString())
    return path


@pytest.fixture(scope="module")
def matmuls(tmp_path_factory):
    """A model with a 40 MB weight, one with a 4 MB weight, and inputs for both."""
    folder = tmp_path_factory.mktemp("matmuls")
    big = one_matmul_file(folder / "big.onnx", 1000, 10_000)
    small = one_matmul_file(folder / "small.onnx", 1000, 1000)
    return big, small, {"x": np.ones((1, 1000), np.float32)}


def test_session_memory_follows_the_weights_measured_side_by_side(matmuls):
    big, small, feeds = matmuls
    # The small model goes in memory: measure_cost writes it to a temporary file.
    big_cost, small_cost = measure_cost([big, small.read_bytes()], feeds, rounds=1, runs=3)
    weight_gap = 36 * MB
    assert big_cost.session_memory_bytes - small_cost.session_memory_bytes > 0.8 * weight_gap
    assert big_cost.peak_rss_bytes - small_cost.peak_rss_bytes > 0.8 * weight_gap
    assert big_cost.rounds == small_cost.rounds == 1 and big_cost.runs == 3


def test_peak_rss_is_the_probes_own_not_its_parents(matmuls):
    # Linux keeps ru_maxrss across exec, so a probe started by a large graphpass process would
    # report that process's peak; the probe reads its own address space's high-water mark.
    _, small, feeds = matmuls
    ballast = np.ones(300 * MB // 8)
    (measured,) = measure_cost([small], feeds, rounds=1, runs=3)
    assert measured.peak_rss_bytes < current_rss_bytes() - 200 * MB
    del ballast


def test_probe_prints_one_json_line_and_fails_in_one_line(matmuls, tmp_path):
    _, small, feeds = matmuls
    np.savez(tmp_path / "feeds.npz", **feeds)
    probe = [sys.executable, "-m", "graphpass.runtimes.probe"]
    done = subprocess.run(probe + [str(small), str(tmp_path / "feeds.npz"), "--runs", "4"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert set(costing.FIGURES) <= figures.keys() and figures["runs"] == 4
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    done = subprocess.run(probe + [str(bad), str(tmp_path / "feeds.npz")], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "cannot load" in done.stderr and "Traceback" not in done.stderr


def test_a_model_the_probe_cannot_load_is_one_line(matmuls, tmp_path):
    _, small, feeds = matmuls
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(CostError) as caught:
        measure_cost([small, bad], feeds, rounds=1, runs=3)
    message = str(caught.value)
    assert "\n" not in message and "bad.onnx" in message and "onnxruntime cannot load" in message


def test_best_of_rounds_takes_each_figures_minimum():
    rounds = [RuntimeCost(10, 300, 0.5, 0.02, runs=20), RuntimeCost(12, 200, 0.4, 0.03, runs=7)]
    best = RuntimeCost.best_of(rounds)
    assert best == RuntimeCost(10, 200, 0.4, 0.02, runs=7, rounds=2)


def fake_probe(calls, seconds=0.0):
    def probe(model, feeds, runs, threads):
        calls.append(model.name)
        time.sleep(seconds)
        return RuntimeCost(len(calls), 1, 1.0, 1.0, runs=runs)
    return probe


def test_rounds_alternate_the_models(matmuls, monkeypatch):
    big, small, feeds = matmuls
    calls = []
    monkeypatch.setattr(costing, "_probe", fake_probe(calls))
    measure_cost([big, small], feeds, rounds=3)
    assert calls == ["big.onnx", "small.onnx"] * 3


def test_rounds_stop_at_the_time_budget_and_for_large_models(matmuls, monkeypatch):
    big, small, feeds = matmuls
    calls = []
    monkeypatch.setattr(costing, "_probe", fake_probe(calls, seconds=0.02))
    # One round takes at least 0.04 s, so a second would end past 0.05 s.
    measured = measure_cost([big, small], feeds, rounds=3, seconds_budget=0.05)
    assert len(calls) == 2 and all(m.rounds == 1 for m in measured)
    calls.clear()
    monkeypatch.setattr(costing, "ONE_ROUND_BYTES", small.stat().st_size)  # big is over it
    measure_cost([big, small], feeds, rounds=3)
    assert len(calls) == 2


def test_budgets_are_ratios_to_the_input():
    comparison = CostComparison(RuntimeCost(100, 200, 1.0, 0.010), RuntimeCost(150, 200, 0.5, 0.012), seconds=1.0)
    assert comparison.ratios() == pytest.approx(
        {"session_memory_bytes": 1.5, "peak_rss_bytes": 1.0, "start_seconds": 0.5, "latency_seconds": 1.2})
    assert CostBudget(max_memory=1.5, max_latency=1.2).misses(comparison) == []
    (missed,) = CostBudget(max_memory=1.4, max_start=2).misses(comparison)
    assert "session memory is 1.50x" in missed and "--max-memory 1.4" in missed
    with pytest.raises(UsageError):
        CostBudget(max_latency=0)


def test_run_reports_cost_in_text_and_json(fixture_dir, tmp_path):
    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    result = invoke("run", fixture_dir / "albert.onnx", "-o", out, "--passes", "tie", "--report", report_path)
    assert result.exit_code == 0, result.output
    assert "runtime cost" in result.output and "session memory" in result.output and "latency" in result.output
    cost = json.loads(report_path.read_text())["cost"]
    for side in ("reference", "candidate"):
        assert set(cost[side]) == set(costing.FIGURES)
    for name in costing.FIGURES:
        assert cost["ratios"][name] == pytest.approx(cost["candidate"][name] / cost["reference"][name])
    assert cost["seconds"] > 0 and cost["rounds"] >= 1 and cost["runs"] >= 1
    assert cost["passed"] is True and cost["failures"] == [] and cost["budget"] == {}


def test_impossible_cost_budget_fails_the_run_and_writes_nothing(fixture_dir, tmp_path):
    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    result = invoke("run", fixture_dir / "albert.onnx", "-o", out, "--max-latency", "0.0001", "--report", report_path)
    assert result.exit_code == 1 and not out.exists()
    (line,) = result.stderr.strip().splitlines()
    assert "cost budget not met: latency" in line and "--max-latency 0.0001" in line and "no output written" in line
    cost = json.loads(report_path.read_text())["cost"]
    assert cost["passed"] is False and cost["budget"] == {"max_latency": 0.0001}
    kept = invoke("run", fixture_dir / "albert.onnx", "-o", out, "--max-latency", "0.0001", "--keep-failed")
    assert kept.exit_code == 1 and out.exists()


def test_generous_cost_budgets_pass(fixture_dir, tmp_path):
    out = tmp_path / "out.onnx"
    generous = ["--max-memory", "1000", "--max-peak-rss", "1000", "--max-start", "1000", "--max-latency", "1000"]
    result = invoke("run", fixture_dir / "albert.onnx", "-o", out, *generous)
    assert result.exit_code == 0, result.output
    assert out.exists() and "cost budget met" in result.output


def test_verify_measures_cost_and_holds_its_budget(matmuls, tmp_path):
    _, small, _ = matmuls
    report_path = tmp_path / "v.json"
    # A model against itself: every ratio is near 1, far above 0.001.
    result = invoke("verify", small, small, "--max-memory", "0.001", "--report", report_path)
    assert result.exit_code == 1 and "cost budget not met: session memory" in result.output
    cost = json.loads(report_path.read_text())["cost"]
    assert set(cost["reference"]) == set(costing.FIGURES) and cost["passed"] is False
    skipped = invoke("verify", small, small, "--no-cost", "--report", report_path)
    assert skipped.exit_code == 0 and "runtime cost" not in skipped.output
    assert json.loads(report_path.read_text())["cost"] is None


@pytest.mark.parametrize("flags, fragment", [
    (["--no-cost", "--max-latency", "2"], "--max-latency needs the cost measurement"),
    (["--no-verify", "--max-memory", "2"], "drop --no-verify"),
    (["--max-start", "0"], "--max-start must be a ratio to the input above 0"),
    (["--max-peak-rss", "nan"], "--max-peak-rss must be a ratio"),
])
def test_bad_cost_options_are_one_line_and_exit_2(fixture_dir, tmp_path, flags, fragment):
    out = tmp_path / "out.onnx"
    result = invoke("run", fixture_dir / "mlp.onnx", "-o", out, *flags)
    assert result.exit_code == 2 and not out.exists()
    (line,) = result.stderr.strip().splitlines()
    assert fragment in line


def test_no_cost_skips_the_measurement(fixture_dir, tmp_path):
    report_path = tmp_path / "r.json"
    result = invoke("run", fixture_dir / "mlp.onnx", "-o", tmp_path / "o.onnx", "--no-cost", "--report", report_path)
    assert result.exit_code == 0 and "runtime cost" not in result.output
    assert json.loads(report_path.read_text())["cost"] is None


def test_a_candidate_the_probe_cannot_load_is_a_report_line(fixture_dir, tmp_path, monkeypatch):
    import graphpass.api as api

    # Verification loads the candidate in this process; make only the probe's copy unreadable.
    unreadable = tmp_path / "unreadable.onnx"
    unreadable.write_bytes(b"\x00garbage")
    real_check = api.check_cost
    monkeypatch.setattr(api, "check_cost", lambda ref, cand, *a, **k: real_check(ref, unreadable, *a, **k))
    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    result = invoke("run", fixture_dir / "mlp.onnx", "-o", out, "--report", report_path)
    assert result.exit_code == 0 and out.exists() and "Traceback" not in result.output
    (line,) = [text for text in result.output.splitlines() if "runtime cost" in text]
    assert line.startswith("runtime cost not measured: cannot measure the runtime cost of unreadable.onnx")
    assert "onnxruntime cannot load" in line
    assert json.loads(report_path.read_text())["cost"]["error"] in line
    # With a cost budget, a cost that was not measured fails the run.
    out.unlink()
    budgeted = invoke("run", fixture_dir / "mlp.onnx", "-o", out, "--max-latency", "2")
    assert budgeted.exit_code == 1 and not out.exists() and "cost budget not checked" in budgeted.stderr
