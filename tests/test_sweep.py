"""`graphpass sweep`: the rate-distortion table (CSV, JSON) and its hand-written SVG plot."""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET

import pytest
from click.testing import CliRunner

from graphpass import sweep
from graphpass.cli import main

SVG = "{http://www.w3.org/2000/svg}"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def table(fixture_dir, tmp_path_factory):
    """One CLI sweep of the mlp fixture: 2 methods x 2 bits x 2 granularities, plus baselines."""
    folder = tmp_path_factory.mktemp("sweep")
    done = invoke("sweep", fixture_dir / "mlp.onnx", "--methods", "kmeans,uniform", "--bits", "2..3",
                  "--granularities", "tensor,channel", "-o", folder / "rd.csv", "--plot", folder / "rd.svg")
    assert done.exit_code == 0, done.output
    return folder, done.output


def test_csv_has_a_row_per_method_bits_granularity_and_the_baselines(table, fixture_dir):
    folder, _ = table
    rows = list(csv.DictReader((folder / "rd.csv").open()))
    ours = [r for r in rows if r["baseline"] == "False"]
    assert {(r["method"], r["bits"], r["granularity"]) for r in ours} == {
        (m, b, g) for m in ("kmeans", "uniform") for b in ("2", "3") for g in ("tensor", "channel")}
    assert {r["method"] for r in rows if r["baseline"] == "True"} == {name for name, _, _ in sweep.available_baselines()}
    assert {"onnxruntime MatMulNBits 4-bit block 32", "onnxruntime int8 quantize_dynamic"} <= {
        r["method"] for r in rows if r["baseline"] == "True"}
    input_bytes = (fixture_dir / "mlp.onnx").stat().st_size
    for row in rows:
        assert 0 < int(row["file_bytes"]) < input_bytes
        assert float(row["size_ratio"]) == pytest.approx(int(row["file_bytes"]) / input_bytes)
        assert -1.0 <= float(row["cosine"]) <= 1.0 and float(row["one_minus_cosine"]) >= 0
        assert row["cosine[logits]"] == row["cosine"]
    by_bits = {r["bits"]: float(r["cosine"]) for r in ours if r["method"] == "kmeans" and r["granularity"] == "tensor"}
    assert by_bits["3"] > by_bits["2"]  # more bits, less error


def test_svg_is_a_valid_plot_with_series_and_baselines(table):
    folder, output = table
    root = ET.parse(folder / "rd.svg").getroot()
    assert root.tag == f"{SVG}svg"
    assert len(root.findall(f"{SVG}polyline")) == 4  # kmeans and uniform, tensor and channel
    baselines = [p for p in root.findall(f"{SVG}path") if "onnxruntime" in (p.findtext(f"{SVG}title") or "")]
    assert len(baselines) == 2  # NNCF's, where it imports, are titled NNCF
    assert f"wrote {folder / 'rd.svg'}" in output and "onnxruntime MatMulNBits" in output


def test_json_table_holds_the_same_rows(fixture_dir, tmp_path):
    rows = sweep.sweep(fixture_dir / "mlp.onnx", ["kmeans"], [2], ["tensor"], baselines=False)
    sweep.write_table(rows, tmp_path / "rd.json")
    (record,) = json.loads((tmp_path / "rd.json").read_text())
    assert record["spec"] == rows[0].spec and record["file_bytes"] == rows[0].file_bytes
    assert record["one_minus_cosine"] == pytest.approx(1 - record["cosine"])


def test_vector_codebooks_are_rows_at_their_rate(fixture_dir):
    (row,) = sweep.sweep(fixture_dir / "mlp.onnx", ["codebook"], [2], ["tensor"], baselines=False)
    assert row.bits == 2 and row.spec.startswith("codebook(") and row.cosine is not None


@pytest.mark.parametrize("args, fragment", [
    (["-o", "table.txt"], "written as .csv or .json"),
    (["--plot", "plot.png"], "written as .svg"),
    (["--bits", "two"], "bad --bits"),
    (["--methods", "gzip"], "not a weight codec"),
])
def test_bad_requests_fail_fast_with_exit_2(fixture_dir, tmp_path, args, fragment):
    done = invoke("sweep", fixture_dir / "mlp.onnx", *[str(tmp_path / a) if a.endswith(("txt", "png")) else a
                                                       for a in args])
    assert done.exit_code == 2 and fragment in done.output


def test_bits_ranges_and_lists():
    assert sweep.parse_bits("2..5") == [2, 3, 4, 5]
    assert sweep.parse_bits("8,2,4") == [2, 4, 8]


def test_help():
    done = invoke("sweep", "--help")
    assert done.exit_code == 0 and "--plot" in done.output and "--model-output" in done.output


def test_feedback_doubles_each_series_fitted_on_the_calibration_inputs(fixture_dir, tmp_path):
    """--feedback: each setting again with error feedback, learnt from --calibration and measured
    on --inputs; the plot draws it dashed in its plain series' colour."""
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((16, 64)).astype(np.float32))
    np.savez(tmp_path / "test.npz", x=rng.standard_normal((16, 64)).astype(np.float32))
    done = invoke("sweep", fixture_dir / "mlp.onnx", "--methods", "kmeans", "--bits", "2,3", "--granularities",
                  "channel", "--feedback", "--calibration", tmp_path / "calib.npz", "--inputs", tmp_path / "test.npz",
                  "--no-baselines", "-o", tmp_path / "rd.csv", "--plot", tmp_path / "rd.svg")
    assert done.exit_code == 0, done.output
    rows = list(csv.DictReader((tmp_path / "rd.csv").open()))
    assert sorted((r["bits"], r["feedback"]) for r in rows) == [("2", "False"), ("2", "True"), ("3", "False"),
                                                                ("3", "True")]
    assert all(("feedback=True" in r["spec"]) == (r["feedback"] == "True") for r in rows)
    lines = ET.parse(tmp_path / "rd.svg").getroot().findall(f"{SVG}polyline")
    plain, dashed = ([line for line in lines if ("stroke-dasharray" in line.attrib) == d] for d in (False, True))
    assert len(plain) == len(dashed) == 1 and plain[0].get("stroke") == dashed[0].get("stroke")


def test_feedback_rows_learn_from_the_calibration_inputs_only(fixture_dir):
    """The same sweep measured on the same inputs, calibrated on two different sets: the plain
    row does not change, the feedback row does."""
    import numpy as np

    rng = np.random.default_rng(1)
    test = {"x": rng.standard_normal((16, 64)).astype(np.float32)}
    rows = [sweep.sweep(fixture_dir / "mlp.onnx", ["kmeans"], [2], ["channel"], inputs=test, baselines=False,
                        feedback=True, calibration={"x": rng.standard_normal((16, 64)).astype(np.float32)})
            for _ in range(2)]
    (plain_a, fed_a), (plain_b, fed_b) = (sorted(r, key=lambda row: row.feedback) for r in rows)
    assert plain_a.cosine == plain_b.cosine and fed_a.feedback and fed_a.cosine != fed_b.cosine


def test_nncf_points_join_the_baselines(fixture_dir):
    # nncf is in the test extras: this runs in CI, and an ImportError here is a failure.
    rows = sweep.sweep(fixture_dir / "mlp.onnx", ["kmeans"], [4], ["tensor"])
    nncf_rows = [r for r in rows if r.baseline and r.method.startswith("NNCF")]
    assert len(nncf_rows) == 2
    for row in nncf_rows:
        assert 0 < row.size_ratio < 1 and row.cosine is not None and row.cosine > 0.9, row.spec
