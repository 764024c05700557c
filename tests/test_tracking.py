"""tracking/: URI resolution, store setup, retrying, idempotent sweep runs, parallel writers.

Everything runs on SQLite under tmp_path. One store is shared per module (a fresh SQLite schema
costs ~1.5 s); tests keep apart by using their own sweep ids.
"""
from __future__ import annotations

import math
import multiprocessing
import time
import uuid
from pathlib import Path

import pytest
import requests
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    RESOURCE_DOES_NOT_EXIST,
    TEMPORARILY_UNAVAILABLE,
)
from mlflow.tracking import MlflowClient
from sqlalchemy.exc import OperationalError

import tracking.tracker as tracker_mod
from tracking import (
    SweepTracker,
    TrackingError,
    init_store,
    metric_key,
    resolve_tracking_uri,
    retrying,
)

EXPERIMENT = "sketchwalk-test"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(uri, experiment_id, db_dir) of a module-wide SQLite store."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = resolve_tracking_uri(None, root)
    return uri, init_store(uri, EXPERIMENT), root / "runs"


@pytest.fixture
def tracker(store):
    uri, exp_id, _ = store
    return SweepTracker(uri, exp_id, f"sweep-{uuid.uuid4().hex[:8]}")


def _count(uri, exp_id, filt):
    runs = MlflowClient(tracking_uri=uri).search_runs(
        [exp_id], filter_string=filt, run_view_type=ViewType.ALL
    )
    return len(runs)


# -- resolve_tracking_uri ---------------------------------------------------------------------


def test_resolve_default_creates_runs_dir(tmp_path):
    uri = resolve_tracking_uri(None, tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/runs/mlflow.db"
    assert (tmp_path / "runs").is_dir()


@pytest.mark.parametrize(
    "given, expected",
    [
        ("sqlite:///rel/x.db", "sqlite:///{w}/rel/x.db"),
        ("sqlite:////abs/x.db", "sqlite:////abs/x.db"),
        ("data/x.db", "sqlite:///{w}/data/x.db"),
        ("/abs/y.db", "sqlite:////abs/y.db"),
        ("http://mlflow:5000", "http://mlflow:5000"),
        ("https://mlflow.example.com", "https://mlflow.example.com"),
        # The password moves to PGPASSWORD (libpq reads it), so no URI we print or store holds it.
        ("postgresql://u:p@h/db", "postgresql://u@h/db"),
        ("postgresql+psycopg2://u:p@h/db", "postgresql+psycopg2://u@h/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
    ],
)
def test_resolve_forms(tmp_path, monkeypatch, given, expected):
    monkeypatch.delenv("PGPASSWORD", raising=False)
    assert resolve_tracking_uri(given, tmp_path) == expected.format(w=tmp_path.resolve())


@pytest.mark.parametrize("bad", ["ftp://x", "file:///tmp/mlruns", "mlruns", "sqlite:///:memory:"])
def test_resolve_rejects(tmp_path, bad):
    with pytest.raises(TrackingError, match="tracking.uri") as err:
        resolve_tracking_uri(bad, tmp_path)
    assert bad in str(err.value) and "http(s)://" in str(err.value)


# -- init_store ---------------------------------------------------------------------------------


def test_init_store_idempotent_and_artifacts_beside_db(store, tmp_path):
    uri, exp_id, db_dir = store
    assert init_store(uri, EXPERIMENT) == exp_id
    other = init_store(uri, EXPERIMENT + "-2", artifact_root=str(tmp_path / "art"))
    assert other != exp_id and init_store(uri, EXPERIMENT + "-2") == other
    client = MlflowClient(tracking_uri=uri)
    assert client.get_experiment(exp_id).artifact_location == (db_dir / "artifacts").as_uri()
    assert client.get_experiment(other).artifact_location == (tmp_path / "art").as_uri()
    # The MLflow 3 UI opens a model-development experiment on its runs, not the GenAI overview;
    # set when the experiment is created (and on an existing one), the UI's own guess replaced, a
    # kind set by hand kept.
    fresh = init_store(uri, EXPERIMENT + "-3")
    assert client.get_experiment(fresh).tags["mlflow.experimentKind"] == "custom_model_development"
    client.set_experiment_tag(other, "mlflow.experimentKind", "genai_development_inferred")
    init_store(uri, EXPERIMENT + "-2")
    assert client.get_experiment(other).tags["mlflow.experimentKind"] == "custom_model_development"
    client.set_experiment_tag(other, "mlflow.experimentKind", "genai_development")
    init_store(uri, EXPERIMENT + "-2")
    assert client.get_experiment(other).tags["mlflow.experimentKind"] == "genai_development"


def test_init_store_rejects_relative_sqlite():
    with pytest.raises(TrackingError, match="resolve_tracking_uri"):
        init_store("sqlite:///relative.db", "x")


def test_init_store_unreachable_server_fails_fast():
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match="unreachable") as err:
        init_store("http://127.0.0.1:9", "x", timeout_s=2)
    assert time.monotonic() - t0 < 5
    assert "http://127.0.0.1:9" in str(err.value)


def test_init_store_unhealthy_server(monkeypatch):
    class Resp:
        status_code, text = 503, "draining"

    seen = []
    monkeypatch.setattr("tracking.store.requests.get",
                        lambda url, timeout: seen.append((url, timeout)) or Resp())
    with pytest.raises(TrackingError, match="503") as err:
        init_store("https://mlflow.example.com/", "x", timeout_s=3)
    assert seen == [("https://mlflow.example.com/health", 3)]
    assert "https://mlflow.example.com/" in str(err.value)


# -- retrying -----------------------------------------------------------------------------------


class Flaky:
    def __init__(self, failures, exc):
        self.calls, self.failures, self.exc = 0, failures, exc

    def __call__(self, x, y=0):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc
        return x + y


@pytest.mark.parametrize(
    "exc",
    [
        MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE),
        requests.exceptions.ConnectionError("refused"),
        OperationalError("INSERT", {}, Exception("database is locked")),
    ],
)
def test_retrying_recovers_from_transient(exc):
    fn = Flaky(2, exc)
    assert retrying(fn, 40, y=2, base_delay_s=0) == 42
    assert fn.calls == 3


@pytest.mark.parametrize("code", [INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST])
def test_retrying_raises_client_errors_at_once(code):
    fn = Flaky(10, MlflowException("bad", error_code=code))
    with pytest.raises(MlflowException, match="bad"):
        retrying(fn, 1, base_delay_s=0)
    assert fn.calls == 1


def test_retrying_gives_up_after_attempts():
    fn = Flaky(100, MlflowException("still busy", error_code=TEMPORARILY_UNAVAILABLE))
    with pytest.raises(TrackingError, match="log the thing") as err:
        retrying(fn, 1, attempts=4, base_delay_s=0, what="log the thing")
    assert fn.calls == 4
    assert "still busy" in str(err.value)
    assert isinstance(err.value.__cause__, MlflowException)


# -- names --------------------------------------------------------------------------------------


def test_metric_key():
    assert metric_key("acc", "niah_single_1", 4096) == "acc.niah_single_1.4096"
    assert metric_key("acc", "a@b") == "acc.a_b"
    assert metric_key("x y", "p/q:r-s", "é!") == "x y.p/q:r-s.é_"
    with pytest.raises(ValueError):
        metric_key()


# -- runs ---------------------------------------------------------------------------------------


def test_parent_run_is_idempotent(store, tracker):
    uri, exp_id, _ = store
    pid = tracker.parent_run("sweep", params={"budget": 8}, tags={"owner": "ci"})
    tracker.finish(pid)
    again = SweepTracker(uri, exp_id, tracker.sweep_id)  # e.g. a restarted driver
    assert again.parent_run("sweep", params={"budget": 8}) == pid
    filt = f"tags.`sketchwalk.sweep_id` = '{tracker.sweep_id}' and tags.`sketchwalk.role` = 'sweep'"
    assert _count(uri, exp_id, filt) == 1
    run = MlflowClient(tracking_uri=uri).get_run(pid)
    assert run.info.status == "RUNNING"
    assert run.data.params == {"budget": "8"} and run.data.tags["owner"] == "ci"


def test_child_run_needs_parent(tracker):
    with pytest.raises(TrackingError, match="parent_run"):
        tracker.child_run("k", role="trial", name="t")


def test_child_run_is_idempotent_by_key(store, tracker):
    uri, exp_id, _ = store
    pid = tracker.parent_run("sweep")
    first = tracker.child_run("t-001", role="trial", name="trial 1", params={"k": 4},
                              tags={"note": "a"})
    # A worker elsewhere re-attaches with a fresh tracker that finds the parent itself.
    second = SweepTracker(uri, exp_id, tracker.sweep_id).child_run(
        "t-001", role="trial", name="trial 1", params={"k": 4, "extra": "x"})
    assert (first.created, second.created) == (True, False)
    assert first.run_id == second.run_id
    assert second.params == {"k": "4", "extra": "x"}
    assert first.tags["mlflow.parentRunId"] == pid
    assert (first.key, first.role, first.status) == ("t-001", "trial", "RUNNING")
    filt = f"tags.`sketchwalk.key` = 't-001' and tags.`sketchwalk.sweep_id` = '{tracker.sweep_id}'"
    assert _count(uri, exp_id, filt) == 1
    with pytest.raises(TrackingError, match="role"):
        tracker.child_run("t-001", role="baseline", name="b")
    with pytest.raises(ValueError, match="quote"):
        tracker.child_run("it's", role="trial", name="q")
    assert tracker.find_child("t-001").run_id == first.run_id
    assert tracker.find_child("missing") is None
    # A run logged after its work (the dense baseline) starts when the work began.
    late = tracker.child_run("b", role="baseline", name="dense baseline", start_ms=1_700_000_000_000)
    assert late.start_ms == 1_700_000_000_000


def test_children_filter_sort_and_paginate(tracker, monkeypatch):
    pid = tracker.parent_run("sweep")
    for key, role in [("b", "trial"), ("base", "baseline"), ("a", "trial"), ("c", "trial")]:
        tracker.child_run(key, role=role, name=key)
    assert [c.key for c in tracker.children()] == ["a", "b", "base", "c"]
    assert [c.key for c in tracker.children("trial")] == ["a", "b", "c"]
    assert [(c.key, c.role) for c in tracker.children("baseline")] == [("base", "baseline")]
    assert pid not in {c.run_id for c in tracker.children()}
    monkeypatch.setattr(tracker_mod, "_PAGE", 1)  # every search result on its own page
    assert [c.key for c in tracker.children()] == ["a", "b", "base", "c"]


def test_params_flatten_and_immutability(tracker):
    tracker.parent_run("sweep")
    run_id = tracker.child_run("p", role="trial", name="p").run_id
    long = "v" * 7000
    params = {"model": {"name": "tiny", "layers": 2}, "lr": 0.5, "none": None, "a@b": 1,
              "long": long}
    tracker.log_params(run_id, params)
    tracker.log_params(run_id, params)  # resume: same values are fine
    got = tracker.find_child("p").params
    assert got == {"model.name": "tiny", "model.layers": "2", "lr": "0.5", "none": "None",
                   "a_b": "1", "long": long[:6000]}
    with pytest.raises(TrackingError, match="model.layers") as err:
        tracker.log_params(run_id, {"model": {"layers": 3}})
    assert tracker.uri in str(err.value)


def test_metrics_round_trip_with_nan(tracker):
    tracker.parent_run("sweep")
    run_id = tracker.child_run("m", role="trial", name="m").run_id
    key = metric_key("acc", "niah_single_1", 4096)
    tracker.log_metrics(run_id, {key: 0.25, "loss": float("nan"), "odd@name": 3}, step=0)
    tracker.log_metrics(run_id, {key: 0.75}, step=1)
    metrics = tracker.find_child("m").metrics
    assert set(metrics) == {key, "loss", "odd_name"}
    assert metrics[key] == 0.75 and metrics["odd_name"] == 3.0
    assert math.isnan(metrics["loss"])
    history = tracker.client.get_metric_history(run_id, key)
    assert [(m.step, m.value) for m in history] == [(0, 0.25), (1, 0.75)]


def test_finish_with_error(tracker, tmp_path):
    tracker.parent_run("sweep")
    run_id = tracker.child_run("f", role="baseline", name="f").run_id
    error = "Traceback: " + "x" * 600 + " OOM"
    tracker.log_dict(run_id, {"a": [1, 2]}, "cfg/config.yaml")
    with pytest.raises(ValueError, match="FINISHED, FAILED, KILLED"):
        tracker.finish(run_id, "DONE")
    tracker.finish(run_id, "FAILED", error=error)
    child = tracker.find_child("f")
    assert child.status == "FAILED"
    assert child.tags["sketchwalk.error"] == error[:500]
    local = tracker.client.download_artifacts(run_id, "error.txt", str(tmp_path))
    assert Path(local).read_text() == error
    cfg = tracker.client.download_artifacts(run_id, "cfg/config.yaml", str(tmp_path))
    assert "- 1" in Path(cfg).read_text()


def test_read_text_round_trip_and_missing_artifact(tracker):
    """What log_text stored comes back verbatim (unicode, a nested path, after an overwrite); a missing
    artifact is a TrackingError naming the file, not an empty string."""
    tracker.parent_run("sweep")
    run_id = tracker.child_run("rt", role="baseline", name="rt").run_id
    tracker.log_text(run_id, "first", "eval/result.json")
    tracker.log_text(run_id, '{"acc": 0.5, "name": "τ-blocks"}\n', "eval/result.json")
    assert tracker.read_text(run_id, "eval/result.json") == '{"acc": 0.5, "name": "τ-blocks"}\n'
    with pytest.raises(TrackingError, match="nothing.json"):
        tracker.read_text(run_id, "nothing.json")


def test_batches_are_chunked(tracker, monkeypatch):
    tracker.parent_run("sweep")
    run_id = tracker.child_run("chunk", role="trial", name="chunk").run_id
    monkeypatch.setattr(tracker_mod, "MAX_METRICS_PER_BATCH", 2)
    monkeypatch.setattr(tracker_mod, "MAX_PARAMS_TAGS_PER_BATCH", 2)
    tracker.log_metrics(run_id, {f"m{i}": i for i in range(5)} | {"inf": float("inf")})
    tracker.log_params(run_id, {f"p{i}": i for i in range(5)})
    tracker.set_tags(run_id, {f"t{i}": i for i in range(5)})
    child = tracker.find_child("chunk")
    assert {k: v for k, v in child.metrics.items() if k != "inf"} == {f"m{i}": i for i in range(5)}
    assert child.metrics["inf"] > 1e308  # MLflow stores +inf as the largest float
    assert child.params == {f"p{i}": str(i) for i in range(5)}
    assert all(child.tags[f"t{i}"] == str(i) for i in range(5))


def test_deleted_runs_and_experiment_are_restored(store, tracker, tmp_path):
    uri, exp_id, _ = store
    client = tracker.client
    tracker.parent_run("sweep")
    first = tracker.child_run("del", role="trial", name="del")
    client.delete_run(first.run_id)
    again = tracker.child_run("del", role="trial", name="del")
    assert (again.run_id, again.created) == (first.run_id, False)
    assert client.get_run(first.run_id).info.lifecycle_stage == "active"
    artifact = tmp_path / "notes.txt"
    artifact.write_text("hello")
    tracker.log_file(again.run_id, str(artifact), "extra")
    assert [f.path for f in client.list_artifacts(again.run_id, "extra")] == ["extra/notes.txt"]
    gone = init_store(uri, EXPERIMENT + "-deleted")
    client.delete_experiment(gone)
    assert init_store(uri, EXPERIMENT + "-deleted") == gone
    assert client.get_experiment(gone).lifecycle_stage == "active"


def test_duplicate_keys_resolve_to_the_oldest(tracker):
    pid = tracker.parent_run("sweep")
    tags = {"sketchwalk.sweep_id": tracker.sweep_id, "sketchwalk.key": "dup",
            "sketchwalk.role": "trial", "mlflow.parentRunId": pid}
    old = tracker.client.create_run(tracker.experiment_id, start_time=1000, tags=tags).info.run_id
    tracker.client.create_run(tracker.experiment_id, start_time=2000, tags=tags)
    assert tracker.find_child("dup").run_id == old
    assert tracker.child_run("dup", role="trial", name="dup").run_id == old
    assert [c.run_id for c in tracker.children()] == [old]


# -- parallel writers ---------------------------------------------------------------------------


def _worker(args):
    tracker, worker = args  # tracker arrives pickled (no client) with the parent id
    for j in range(5):
        child = tracker.child_run(f"w{worker}-{j}", role="trial", name=f"w{worker}-{j}",
                                  params={"worker": worker, "j": j})
        tracker.log_metrics(child.run_id, {"acc": worker + j / 10, "loss": 1.0, "ms": 5.0})
        tracker.finish(child.run_id)
    return worker


def test_parallel_writers_on_one_sqlite_store(tracker):
    tracker.parent_run("sweep")
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        assert sorted(pool.map(_worker, [(tracker, w) for w in range(4)])) == [0, 1, 2, 3]
    kids = tracker.children("trial")
    assert len(kids) == 20
    assert {c.key for c in kids} == {f"w{w}-{j}" for w in range(4) for j in range(5)}
    assert all(c.status == "FINISHED" for c in kids)
    assert all(set(c.metrics) == {"acc", "loss", "ms"} for c in kids)
    assert all(c.metrics["acc"] == int(c.params["worker"]) + int(c.params["j"]) / 10 for c in kids)
