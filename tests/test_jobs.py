"""`--jobs`: the run's workers (graphpass/parallel.py) change how fast, never what is written."""

from __future__ import annotations

import threading
import time

import pytest
from click.testing import CliRunner

import graphpass
from graphpass.cli import main
from graphpass.errors import UsageError
from graphpass.parallel import Workers, stop_point
from graphpass.verify import Budget

AUTO = "tie,auto(methods=kmeans|codebook,bits=2|4,granularities=tensor|channel)"


# Budgets each spec meets on the (small, sensitive) transformer fixture; the low-rate ones
# keep little, but the test is about identical bytes, verified all the same.
@pytest.mark.parametrize("spec, min_cosine", [
    ("tie", 0.999),
    ("kmeans(bits=4,granularity=channel)", 0.95),
    ("uniform(bits=4,granularity=group,group_size=32)", 0.9),
    ("ternary(granularity=channel,include=Gather)", 0.5),
    ("codebook(dim=2,k=256)", 0.95),
    ("codebook(dim=2,k=16,share=shape,scale=channel)", 0.4),
])
def test_one_and_two_workers_write_the_same_bytes(fixture_dir, tmp_path, spec, min_cosine):
    outputs = []
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}.onnx"
        result = graphpass.run(fixture_dir / "transformer.onnx", spec, output=out, jobs=jobs,
                               budget=Budget(min_cosine=min_cosine))
        assert result.passed, result.failures  # verified in onnxruntime against the input
        assert result.report["passes"][-1]["tensors_changed"] > 0
        assert result.report["workers"] == {"jobs": jobs, "scheduler": None}
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


def test_auto_measures_the_same_whatever_the_workers(fixture_dir, tmp_path):
    outputs = []
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}.onnx"
        result = graphpass.run(fixture_dir / "transformer.onnx", AUTO, output=out, jobs=jobs,
                               budget=Budget(min_cosine=0.999))
        assert result.passed, result.failures
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


def test_results_come_in_input_order_whichever_task_finishes_first():
    finished = []
    second_done = threading.Event()

    def task(i: int) -> int:
        if i == 0:  # the first task finishes only after the second, on the other worker
            assert second_done.wait(timeout=30)
        finished.append(i)
        if i == 1:
            second_done.set()
        return i

    assert list(Workers(2).map(task, range(5))) == [0, 1, 2, 3, 4]
    assert finished.index(1) < finished.index(0)


def test_one_job_runs_in_the_calling_thread():
    caller = threading.get_ident()
    assert set(Workers(1).map(lambda _: threading.get_ident(), range(3))) == {caller}


def test_zero_jobs_is_a_usage_error(fixture_dir, tmp_path):
    with pytest.raises(UsageError):
        Workers(0)
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["run", str(fixture_dir / "mlp.onnx"), "-o", str(out), "--jobs", "0"])
    assert result.exit_code == 2 and not out.exists()


def test_inspect_takes_jobs(fixture_dir):
    result = CliRunner().invoke(main, ["inspect", str(fixture_dir / "transformer.onnx"), "--json", "--jobs", "2"])
    assert result.exit_code == 0, result.output
    assert '"exact_duplicates"' in result.output


def test_a_task_that_maps_again_runs_its_tasks_itself():
    workers = Workers(2)

    def inner_threads(_: int) -> tuple[int, set[int]]:
        return threading.get_ident(), set(workers.map(lambda _: threading.get_ident(), range(4)))

    for outer, inner in workers.map(inner_threads, range(2)):
        assert inner == {outer}


def test_tasks_not_yet_started_never_start_once_the_caller_stops():
    """Ctrl-C or SIGTERM in the caller ends the map: the tasks submitted ahead must not all run
    first (one of auto's is a whole weight's study, minutes on a large model)."""
    release, started = threading.Event(), []

    def task(item: int) -> int:
        started.append(item)
        if item:  # both workers hold items 1 and 2 while 3 to 5 wait in the queue
            release.wait(5)
        return item

    results = Workers(jobs=2).map(task, range(20))
    assert next(results) == 0
    threading.Timer(0.5, release.set).start()
    results.close()  # the caller stops here, as an exception in its loop would
    assert sorted(started) == [0, 1, 2]


def test_running_tasks_end_at_their_next_stop_point_once_the_caller_stops():
    """Found on a 78 M-parameter decoder: after SIGTERM, auto's two running studies went on
    through every setting of their weights, minutes, before the run could clean up and exit."""
    units_done = []

    def study(item: int) -> int:
        for unit in range(200 if item else 0):  # a study's settings, each a unit of work (~2 s)
            stop_point()
            time.sleep(0.01)
            units_done.append((item, unit))
        return item

    results = Workers(jobs=2).map(study, range(4), ahead=4)
    assert next(results) == 0
    time.sleep(0.1)  # items 1 and 2 are running
    results.close()  # returns once both have ended
    done = {item: sum(1 for i, _ in units_done if i == item) for item in (1, 2)}
    assert {item for item, _ in units_done} == {1, 2}  # item 3 never started
    assert all(0 < count < 200 for count in done.values()), done  # both stopped before their end
