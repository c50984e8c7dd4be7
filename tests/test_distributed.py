"""`--scheduler`: the kmeans family's fits on a Dask cluster, each worker reading its weights from
the model's external data (graphpass/streamed.py), give the bytes of a local run."""

from __future__ import annotations

import distributed
import numpy as np
import pytest

import graphpass
from graphpass import parallel
from graphpass.edit import Model
from graphpass.model import load_model, save_model
from graphpass.parallel import Workers
from graphpass.streamed import InlineWeight, StoredWeight, stored_weights
from graphpass.verify import Budget

SPEC = "kmeans(bits=4,granularity=channel,outliers=0.5)"


@pytest.fixture(scope="module")
def external_model(fixture_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("streamed") / "transformer.onnx"
    save_model(load_model(fixture_dir / "transformer.onnx").proto, path, external_data=True)
    return path


def test_large_weights_are_streamed_from_the_file_and_read_back_exactly(external_model):
    stored = stored_weights(external_model)
    workers = Workers(1, stored=stored)
    sources = {w.name: (w, workers.source_of(w)) for w in Model(load_model(external_model).proto).weights()}
    streamed = [(w, s) for w, s in sources.values() if isinstance(s, StoredWeight)]
    assert len(streamed) == len(stored) > 0
    assert all(isinstance(s, InlineWeight) for w, s in sources.values() if w.nbytes < 1024)
    for weight, source in streamed:
        assert np.array_equal(source.read(), weight.read())


def _run(model, out, **where):
    out.parent.mkdir()
    result = graphpass.run(model, SPEC, output=out, budget=Budget(min_cosine=0.95), **where)
    assert result.passed, result.failures  # verified in onnxruntime against the input
    assert result.report["passes"][0]["tensors_changed"] > 0
    return b"".join(p.read_bytes() for p in sorted(out.parent.glob(out.name + "*")))


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_a_dask_cluster_writes_the_bytes_of_a_local_run(external_model, tmp_path, processes):
    local = _run(external_model, tmp_path / "local" / "out.onnx", jobs=1)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=processes,
                                  dashboard_address=None) as cluster:
        remote = _run(external_model, tmp_path / "remote" / "out.onnx", scheduler=cluster.scheduler_address)
        assert "fit_weight" in cluster.scheduler.task_prefixes  # the fits ran there
    assert remote == local


def test_an_unreachable_scheduler_is_a_usage_error(external_model, tmp_path, monkeypatch):
    from graphpass.errors import UsageError

    monkeypatch.setattr(parallel, "CONNECT_SECONDS", 1)
    with pytest.raises(UsageError, match="cannot reach the Dask scheduler"):
        graphpass.run(external_model, SPEC, output=tmp_path / "out.onnx", scheduler="tcp://127.0.0.1:9",
                      verify=False)
