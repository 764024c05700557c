"""Issue 18: the bugs found by probing the CLI as a user would, one regression test each (named
`test_bugN_...`), and the bad-input matrix: every documented bad input through the CLI, exit 2,
the field named, no weights loaded."""
from __future__ import annotations

import functools
import types

import pytest

from search.records import Objective
from search.spec import parse_spec

OBJECTIVES = [Objective("accuracy", "maximize"), Objective("density", "minimize")]


def _fake_eval(acc: float, density: float = 0.5):
    from sketchwalk.evaluation import EvalResult, SampleResult

    s = SampleResult("niah_single_1", 1024, 0, 1000, "1", ["1"], acc / 100, 0.1, 0.2, 3, 0.1)
    overall = {"mean": acc, "lo": acc, "hi": acc, "n": 1}
    return EvalResult("m", None, "cpu", "float32", {"niah_single_1@1024": overall, "overall": overall},
                      {"1024": 0.1}, {"1024": 20.0}, {"prefill": density, "decode": density}, None, [s])


def _fake_work(layers: int = 30, baseline_acc: float = 50.0):
    """A loaded workload's stand-in: SmolLM2's shape, a dense baseline, no weights."""
    cfg = types.SimpleNamespace(num_hidden_layers=layers, head_dim=64, hidden_size=576, num_attention_heads=9)
    return types.SimpleNamespace(model=types.SimpleNamespace(config=cfg), baseline=_fake_eval(baseline_acc),
                                 device="cpu", load_s=1.0, spec=None)


def _ray_step(session, work, config: dict, trial_id: str) -> dict:
    """`SweepTrainable.step` on a stand-in actor (no Ray started): the driver's real trial code."""
    from search.ray_driver import SweepTrainable

    actor = types.SimpleNamespace(session=session, work=work, tracker=session.tracker(), config=config,
                                  trial_id=trial_id)
    actor._report = functools.partial(SweepTrainable._report, actor)
    return SweepTrainable.step(actor)


# -- bug 1: one trial body; Ray's sampler sees the accuracy constraint ----------------------------

def test_bug1_ray_sampler_gets_the_accuracy_constraint(tmp_path, monkeypatch):
    """Under --backend ray the trial's accuracy-drop excess reaches the Optuna trial behind
    OptunaSearch, where the sampler's constraint function reads it (before: only the Optuna driver
    set it, so max_accuracy_drop never guided TPE under Ray)."""
    from search import ray_driver
    from search.session import open_session
    from search.space import CONSTRAINT_ATTR, _AccuracyDropConstraint

    spec = parse_spec({"name": "c", "backend": "ray", "space": {"density": {"type": "float", "low": 0.1, "high": 0.5}},
                       "constraints": {"max_accuracy_drop": 5.0}, "budget": {"trials": 4}})
    session = open_session(spec, "c", OBJECTIVES, workdir=tmp_path)
    monkeypatch.setattr("search.trial_body.run_trial", lambda work, config: _fake_eval(42.0))
    searcher = ray_driver.make_searcher(spec, OBJECTIVES)
    config = searcher.suggest("t0")
    result = _ray_step(session, _fake_work(baseline_acc=50.0), config, "t0")
    assert result[CONSTRAINT_ATTR] == pytest.approx(3.0)  # drop 8 points, 5 allowed
    searcher.on_trial_complete("t0", result)
    (trial,) = searcher._ot_study.trials
    assert trial.state.name == "COMPLETE"
    assert trial.user_attrs[CONSTRAINT_ATTR] == pytest.approx(3.0)
    assert _AccuracyDropConstraint()(trial) == (pytest.approx(3.0),)


@pytest.mark.parametrize("backend", ["optuna", "ray"])
def test_bug1_both_drivers_check_the_model_shape_and_fail_alike(tmp_path, monkeypatch, backend):
    """A config the loaded model cannot run (skip_layers >= its layers) is refused by the trial body
    of either driver, recorded FAILED in MLflow with the field named, and never evaluated."""
    import optuna

    from search import optuna_driver
    from search.session import open_session
    from sketchwalk.config import ConfigError

    spec = parse_spec({"name": "s", "backend": backend, "base": {"skip_layers": 3},
                       "space": {"density": {"type": "float", "low": 0.1, "high": 0.5}}})
    session = open_session(spec, "s", OBJECTIVES, workdir=tmp_path)
    ran = []
    monkeypatch.setattr("search.trial_body.run_trial", lambda work, config: ran.append(config) or _fake_eval(42.0))
    work = _fake_work(layers=2)
    if backend == "ray":
        with pytest.raises(ConfigError, match="skip_layers"):
            _ray_step(session, work, {"optuna_trial_number": 0, "density": 0.2}, "t0")
    else:
        study = optuna.create_study(directions=["maximize", "minimize"])
        objective = optuna_driver.make_objective(session, work)
        study.optimize(objective, n_trials=1, catch=(Exception,))
        assert study.trials[0].state.name == "FAIL" and "skip_layers" in study.trials[0].user_attrs["error"]
    (run,) = session.tracker().children(role="trial")
    assert run.status == "FAILED" and "skip_layers" in run.tags["sketchwalk.error"]
    assert ran == []


# -- bug 9 / bug 1: one ray.init helper, loopback unless an address is given -------------------------

def test_bug9_local_ray_binds_loopback_and_one_helper_starts_it(monkeypatch):
    from search import launch, ray_cluster, ray_driver

    assert ray_cluster.init_kwargs(None)["_node_ip_address"] == "127.0.0.1"
    assert "_node_ip_address" not in ray_cluster.init_kwargs("ray-head:6379")
    assert ray_cluster.init_kwargs("auto")["address"] == "auto"
    calls = []
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    from ray._private import ray_constants

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    spec = parse_spec({"name": "r", "backend": "ray", "space": {"density": {"type": "float", "low": 0.1, "high": 0.5}}})
    launch._ray_has_gpus(None, spec)
    assert calls[-1]["_node_ip_address"] == "127.0.0.1" and calls[-1]["address"] is None
    # Ray would resolve 127.0.0.1 to the outward address with cluster mode on; it is switched off
    # here and for the processes Ray starts.
    assert ray_constants.ENABLE_RAY_CLUSTER is False
    import os

    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    launch._ray_has_gpus("ray-head:6379", spec)
    assert calls[-1] == {**ray_cluster.init_kwargs("ray-head:6379")}
    # The driver has no ray.init of its own: it goes through the same helper.
    import inspect

    assert "ray.init(" not in inspect.getsource(ray_driver) and "ray.init(" not in inspect.getsource(launch)


# -- helpers for CLI runs that must stop before any weight loads -----------------------------------

@pytest.fixture
def no_weights(monkeypatch):
    """Model loading refused: a CLI case that reaches it fails the test (the list records attempts)."""
    loads = []

    def refuse(*args, **kwargs):
        loads.append(args)
        raise AssertionError("model weights were loaded")

    monkeypatch.setattr("sketchwalk.models.load", refuse)
    return loads


SPACE = {"density": {"type": "float", "low": 0.1, "high": 0.5}}


def _sweep_file(tmp_path, **over):
    """A sweep on the bundled model over a tiny vt suite (no essays needed)."""
    import yaml

    suite = tmp_path / "tiny-suite.yaml"
    suite.write_text("tasks: [vt]\nlengths: [512]\nsamples: 1\n")
    data = {"name": "t", "model": "smollm2-135m", "suite": str(suite), "space": SPACE, "budget": {"trials": 2},
            "tracking": {"experiment": "rel"}}
    data.update(over)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _cli(capsys, *argv) -> tuple[int, str]:
    from sketchwalk import cli

    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, " ".join((out.out + out.err).split())  # whitespace-normalised: immune to wrapping


# -- bug 5: --sweep-id validated, no path escape, an existing id refused ---------------------------

@pytest.mark.parametrize("bad", ["../../../x", "a/b", "it's", ".hidden", ""])
def test_bug5_bad_sweep_id_refused_before_anything_is_written(tmp_path, capsys, no_weights, bad):
    f = _sweep_file(tmp_path)
    work = tmp_path / "w"
    rc, out = _cli(capsys, "sweep", str(f), "--sweep-id", bad, "--workdir", str(work), "--no-progress")
    assert rc == 2 and "--sweep-id" in out and "not a valid sweep id" in out, out
    assert not (work / "runs" / "sweeps").exists() and not (tmp_path / "x").exists()
    assert no_weights == []


def test_bug5_new_sweep_with_an_existing_id_is_refused(tmp_path, capsys, no_weights):
    """Reusing a finished sweep's id for a new sweep is refused, pointing to --resume; its parent run
    stays FINISHED and its sweep.yaml untouched (before: trials appended, sweep.yaml overwritten)."""
    from search.launch import prepare_sweep
    from search.session import open_session

    f = _sweep_file(tmp_path)
    spec, _, _ = prepare_sweep(str(f), workdir=tmp_path)
    session = open_session(spec, "done", OBJECTIVES, workdir=tmp_path, new=True)
    tracker = session.tracker()
    tracker.finish(session.parent_run_id, "FINISHED")
    stored = (session.sweep_dir / "sweep.yaml").read_text()
    other = _sweep_file(tmp_path, space={"skip_layers": {"type": "int", "low": 1, "high": 3}}, samples=2)
    rc, out = _cli(capsys, "sweep", str(other), "--sweep-id", "done", "--workdir", str(tmp_path), "--no-progress")
    assert rc == 2 and "--sweep-id" in out and "--resume done" in out, out
    assert (session.sweep_dir / "sweep.yaml").read_text() == stored
    assert tracker.client.get_run(session.parent_run_id).info.status == "FINISHED"
    # Known to MLflow only (the sweep directory is gone): still refused, still FINISHED.
    import shutil

    shutil.rmtree(session.sweep_dir)
    rc, out = _cli(capsys, "sweep", str(other), "--sweep-id", "done", "--workdir", str(tmp_path), "--no-progress")
    assert rc == 2 and "already holds a sweep 'done'" in out and "--resume done" in out, out
    assert tracker.client.get_run(session.parent_run_id).info.status == "FINISHED"
    assert not session.sweep_dir.exists() and no_weights == []


def test_bug5_conflicting_params_never_flip_a_finished_parent(tmp_path):
    from tracking import SweepTracker, TrackingError, init_store, resolve_tracking_uri

    uri = resolve_tracking_uri(None, tmp_path)
    tracker = SweepTracker(uri, init_store(uri, "flip"), "s1")
    run_id = tracker.parent_run("s1", params={"samples": 1})
    tracker.finish(run_id, "FINISHED")
    with pytest.raises(TrackingError, match="immutable"):
        SweepTracker(uri, tracker.experiment_id, "s1").parent_run("s1", params={"samples": 2})
    assert tracker.client.get_run(run_id).info.status == "FINISHED"


def test_bug5_resume_and_report_ids_cannot_escape(tmp_path, capsys, no_weights):
    for argv in (["sweep", "--resume", "../x"], ["pareto", "../x"], ["export", "../x"], ["ablate", "--resume", "../x"],
                 ["ablate", "report", "../x"]):
        rc, out = _cli(capsys, *argv, "--workdir", str(tmp_path))
        assert rc == 2 and "not a valid sweep id" in out, (argv, out)
