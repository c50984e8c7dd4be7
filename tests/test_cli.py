"""The command line: exit codes, one-line errors, JSON report, help on every command."""

from __future__ import annotations

import json
import subprocess
import sys
import zlib

import numpy as np
import pytest
from click.testing import CliRunner

from graphpass.cli import main


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("command", [[], ["run"], ["inspect"], ["passes"], ["verify"], ["sweep"]])
def test_help_everywhere(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0 and "Usage:" in result.output


def test_console_entry_point_is_installed():
    done = subprocess.run([sys.executable, "-m", "graphpass.cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and "graphpass" in done.stdout


def test_run_writes_output_and_json_report(fixture_dir, tmp_path):
    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    result = invoke("run", fixture_dir / "albert.onnx", "-o", out, "--passes", "tie", "--report", report_path)
    assert result.exit_code == 0, result.output
    assert "verification PASSED" in result.output
    report = json.loads(report_path.read_text())
    assert report["input"]["file_bytes"] == (fixture_dir / "albert.onnx").stat().st_size
    assert report["output"]["file_bytes"] == out.stat().st_size
    # Downloads are compressed, so the report gives what zip -9 (deflate level 9) stores too.
    assert report["input"]["zip_bytes"] == len(zlib.compress((fixture_dir / "albert.onnx").read_bytes(), 9))
    assert report["output"]["zip_bytes"] == len(zlib.compress(out.read_bytes(), 9))
    assert "zip -9 (download) size" in result.output
    (tie,) = report["passes"]
    assert {"name", "options", "seconds", "weight_bytes_before", "weight_bytes_after"} <= tie.keys()
    assert report["verify"]["passed"] is True
    for figures in report["verify"]["outputs"].values():
        assert figures["max_abs_error"] == 0.0 and figures["cosine"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "content, fragment",
    [(b"not a model at all", "not an ONNX model"), (b"", "not an ONNX model")],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, content, fragment):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    result = invoke("run", bad, "-o", tmp_path / "out.onnx")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and str(bad) in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "out.onnx").exists()


def test_truncated_file_is_exit_2(fixture_dir, tmp_path):
    cut = tmp_path / "cut.onnx"
    cut.write_bytes((fixture_dir / "transformer.onnx").read_bytes()[:50_000])
    result = invoke("inspect", cut)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "spec, fragment",
    [("nosuch", "unknown pass 'nosuch'; valid:"), ("tie(x=1)", "unknown option 'x'")],
)
def test_bad_spec_is_exit_2(fixture_dir, tmp_path, spec, fragment):
    result = invoke("run", fixture_dir / "mlp.onnx", "-o", tmp_path / "o.onnx", "--passes", spec)
    assert result.exit_code == 2 and fragment in result.stderr


def test_refuses_to_overwrite_input_without_in_place(fixture_dir, tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes((fixture_dir / "albert.onnx").read_bytes())
    assert invoke("run", model, "-o", model).exit_code == 2
    assert invoke("run", model, "-o", model, "--in-place").exit_code == 0
    assert model.stat().st_size < (fixture_dir / "albert.onnx").stat().st_size


def test_budget_failure_is_exit_1_and_writes_nothing(fixture_dir, tmp_path):
    # Verify a model against a different one: a real failure of the budget.
    result = invoke("verify", fixture_dir / "negated.onnx", fixture_dir / "scaled.onnx", "--min-cosine", "0.9999")
    assert result.exit_code == 1 and "FAIL" in result.output
    out = tmp_path / "out.onnx"
    result = invoke("run", fixture_dir / "albert.onnx", "-o", out, "--min-cosine", "1.5")
    assert result.exit_code == 2  # an impossible budget is a usage error, not a failed run
    assert not out.exists()


def test_keep_failed_writes_the_failing_output(fixture_dir, tmp_path, monkeypatch):
    import graphpass.verify as verification

    real_compare = verification.compare_arrays

    def pessimistic(name, reference, candidate, budget, *batch_axis):
        shifted = None if candidate is None else candidate + np.ones_like(candidate)
        return real_compare(name, reference, shifted, budget, *batch_axis)

    monkeypatch.setattr(verification, "compare_arrays", pessimistic)
    out = tmp_path / "out.onnx"
    assert invoke("run", fixture_dir / "albert.onnx", "-o", out).exit_code == 1
    assert not out.exists()
    result = invoke("run", fixture_dir / "albert.onnx", "-o", out, "--keep-failed")
    assert result.exit_code == 1 and out.exists() and "written anyway" in result.stderr


def test_inspect_lists_bytes_and_duplicates(fixture_dir):
    result = invoke("inspect", fixture_dir / "albert.onnx", "--json")
    assert result.exit_code == 0
    found = json.loads(result.output)
    assert found["exact_duplicate_bytes"] > 0.5 * found["weight_bytes"]
    assert found["file_bytes"] == (fixture_dir / "albert.onnx").stat().st_size
    text = invoke("inspect", fixture_dir / "subgraphs.onnx").output
    assert "Constant nodes in subgraphs" in text and "exact duplicates" in text


def test_inspect_rows_lists_what_tie_rows_shares(fixture_dir):
    import graphpass

    source = fixture_dir / "shared_heads.onnx"
    assert "shared_rows" not in json.loads(invoke("inspect", source, "--json").output)  # opt-in: reads every weight
    found = json.loads(invoke("inspect", source, "--json", "--rows", "--tol", "0").output)
    tied = graphpass.run(source, "tie(rows=true)", verify=False).report["passes"][0]["details"]["rows"]

    def members(tables):
        return sorted(sorted((m["weight"], m["axis"]) for m in t["members"]) for t in tables)

    assert found["shared_rows"] and members(found["shared_rows"]) == members(tied)
    assert all(t["saved_bytes"] > 0 for t in found["shared_rows"])
    text = invoke("inspect", source, "--rows", "--tol", "0").output
    assert f"shared rows and head slices (tol 0): {len(found['shared_rows'])} tables" in text


def test_passes_lists_every_pass_with_options():
    result = invoke("passes")
    assert result.exit_code == 0 and "tie (lossless)" in result.output


def test_inputs_npz_and_shapes(fixture_dir, tmp_path):
    ids = np.random.default_rng(0).integers(0, 512, (2, 7)).astype(np.int64)
    np.savez(tmp_path / "x.npz", input_ids=ids)
    out = tmp_path / "o.onnx"
    ok = invoke("run", fixture_dir / "transformer.onnx", "-o", out, "--inputs", tmp_path / "x.npz")
    assert ok.exit_code == 0, ok.output
    np.savez(tmp_path / "wrong.npz", other=ids)
    missing = invoke("run", fixture_dir / "transformer.onnx", "-o", out, "--inputs", tmp_path / "wrong.npz")
    assert missing.exit_code == 2 and "input_ids" in missing.stderr
    shaped = invoke("run", fixture_dir / "transformer.onnx", "-o", out, "--shape", "input_ids=1x5")
    assert shaped.exit_code == 0
    bad_shape = invoke("run", fixture_dir / "transformer.onnx", "-o", out, "--shape", "input_ids=1xq")
    assert bad_shape.exit_code == 2


def test_progress_in_a_log_is_a_count_line(fixture_dir, tmp_path, monkeypatch):
    """Where stderr is not a terminal (CliRunner's is not), click's bar would show only its
    label; a long step prints `label: done/total` lines instead."""
    import graphpass.cli as cli

    monkeypatch.setattr(cli, "PROGRESS_DELAY_SECONDS", 0.0)
    monkeypatch.setattr(cli, "PROGRESS_LINE_SECONDS", 0.0)
    result = invoke("run", fixture_dir / "albert.onnx", "-o", tmp_path / "out.onnx", "--passes", "kmeans(bits=4)")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("kmeans: sharing weight values: ")]
    counts = [tuple(map(int, line.rsplit(" ", 1)[1].split("/"))) for line in lines]
    assert counts and counts[-1][0] == counts[-1][1] and counts == sorted(counts)


def test_sigterm_stops_a_run_and_removes_its_staging_folder(fixture_dir, tmp_path):
    """A run killed with SIGTERM (a scheduler's stop, `kill`) goes through its cleanups as with
    Ctrl-C: no hidden staging folder and no output left. The run is held inside the pipeline
    (a sleep before the passes) so the signal lands while the staging folder exists."""
    import signal
    import time

    held = ("import sys, time; import graphpass.api as api; compile_ = api._compile; "
            "api._compile = lambda *a, **k: (time.sleep(60), compile_(*a, **k))[1]; "
            "from graphpass.cli import main; sys.argv[0] = 'graphpass'; main()")
    out = tmp_path / "out.onnx"
    run = subprocess.Popen([sys.executable, "-c", held, "run", str(fixture_dir / "albert.onnx"), "-o", str(out),
                            "--passes", "tie", "--no-cost"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".graphpass-*")) and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.05)
    assert list(tmp_path.glob(".graphpass-*")), "the run never staged its output"
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in stderr
    assert not list(tmp_path.iterdir())
