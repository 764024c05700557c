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


# -- the bad-input matrix (bugs 5, 6, 7, 10): exit 2, the field named, no weights loaded --------------

def _readonly(tmp_path, monkeypatch, name: str):
    """`runs/<name>` exists and reads as not writable (tests run as root, where chmod does not bind)."""
    import os

    db = tmp_path / "runs" / name
    db.parent.mkdir(parents=True, exist_ok=True)
    db.write_bytes(b"")
    real = os.access
    monkeypatch.setattr("search.preflight.os.access",
                        lambda p, mode: False if os.fspath(p) == os.fspath(db) and mode & os.W_OK else real(p, mode))


def _unwritable_workdir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    return ["--workdir", str(blocker / "w")]


BAD_SWEEPS = {
    # case: (sweep file overrides, extra CLI args or a setup(tmp_path, monkeypatch) -> args, field, text)
    "storage-not-a-url": ({"storage": "not a url"}, [], "sweep.storage", "not a database URL"),
    "storage-unsupported": ({"storage": "oracle://u@h/db"}, [], "sweep.storage", "not supported"),
    "storage-in-memory": ({"storage": "sqlite:///:memory:"}, [], "sweep.storage", "in-memory"),
    "storage-read-only": ({}, lambda t, m: _readonly(t, m, "optuna.db") or [], "sweep.storage", "read-only"),
    "export-rule": ({"analysis": {"export_rule": "fastest"}}, [], "sweep.analysis.export_rule", "knee"),
    "tracking-unsupported": ({"tracking": {"uri": "ftp://host/x", "experiment": "e"}}, [], "sweep.tracking.uri",
                             "allowed forms"),
    "tracking-in-memory": ({"tracking": {"uri": "sqlite:///:memory:", "experiment": "e"}}, [], "sweep.tracking.uri",
                           "in-memory"),
    "tracking-unreachable": ({}, ["--tracking-uri", "http://127.0.0.1:9"], "--tracking-uri", "unreachable"),
    "unwritable-runs": ({}, lambda t, m: _unwritable_workdir(t), "--workdir", "cannot create"),
    "unknown-top-level-key": ({"spaces": {}}, [], "sweep.spaces", "unknown key; allowed keys here: ['name', 'model'"),
    "unknown-nested-key": ({"budget": {"trails": 3}}, [], "sweep.budget.trails", "['trials', 'wall_time_s']"),
    "int-range-over-powers-of-two": ({"space": {"sketch_dim": {"type": "int", "low": 16, "high": 64}}}, [],
                                     "sweep.space.sketch_dim", "values [16, 32, 64]"),
    "int-range-over-block-sizes": ({"space": {"block_size": {"type": "int", "low": 16, "high": 128, "step": 16}}}, [],
                                   "sweep.space.block_size", "categorical"),
    "sweep-id-escape": ({}, ["--sweep-id", "../../x"], "--sweep-id", "not a valid sweep id"),
    "sweep-id-quote": ({}, ["--sweep-id", "it's"], "--sweep-id", "not a valid sweep id"),
    "skip-layers-vs-model": ({"base": {"skip_layers": 40}}, [], "sweep.base.skip_layers", "(30 layers)"),
    "missing-suite": ({"suite": "ruler-nope"}, [], "ruler-nope", "suite"),
    "missing-model": ({"model": "/nonexistent/m.gguf"}, [], "/nonexistent/m.gguf", "m.gguf"),
    "corrupt-gguf": (lambda t: {"model": str(_garbage_gguf(t / "bad.gguf", b"\xff" * 64))}, [], "bad.gguf",
                     "truncated"),
    "sketch-dim-vs-model": ({"base": {"sketch_dim": 128}}, [], "sweep.base.sketch_dim", "head_dim = 64"),
    "unknown-objective": ({"objectives": ["accuracy", "speedy"]}, [], "sweep.objectives", "allowed: ['accuracy'"),
    "bad-value": ({"sampler": "annealing"}, [], "sweep.sampler", "'tpe', 'gp' or 'random'"),
    "suite-file-unknown-key": (lambda t: {"suite": _suite_file(t, "tasks: [vt]\nlengths: [512]\nsample: 1\n")}, [],
                               "sample:", "allowed keys here: ['name', 'tasks', 'lengths', 'samples'"),
    "suite-file-bad-length": (lambda t: {"suite": _suite_file(t, "tasks: [vt]\nlengths: [-512]\nsamples: 1\n")}, [],
                              "lengths.0:", "length must be positive"),
}


@pytest.mark.parametrize("case", list(BAD_SWEEPS))
def test_bad_input_matrix_sweep(tmp_path, capsys, monkeypatch, no_weights, case):
    over, extra, field, text = BAD_SWEEPS[case]
    f = _sweep_file(tmp_path, **(over(tmp_path) if callable(over) else over))
    args = extra(tmp_path, monkeypatch) if callable(extra) else list(extra)
    if "--workdir" not in args:
        args += ["--workdir", str(tmp_path)]
    rc, out = _cli(capsys, "sweep", str(f), *args, "--no-progress")
    assert rc == 2, out
    assert f"error: {field}" in out or (field in out and "error:" in out), out
    assert text in out, out
    assert "Traceback" not in out and no_weights == []


def _suite_file(tmp_path, text: str, name: str = "bad-suite.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


VT = "tasks: [vt]\nlengths: [512]\nsamples: 1\n"
ROW = '{"index": 0, "input": "q", "outputs": ["a"], "length": 300}\n'
BAD_EVALS = {
    # case: (suite file text, or a suite name when it has no newline; files {name: content} written
    # beside it; extra `eval` args ({tmp} = the test's folder); the field named; text in the message)
    "suite-unknown-key": ("tasks: [vt]\nlengths: [512]\nsample: 1\n", {}, [], "sample:",
                          "allowed keys here: ['name', 'tasks', 'lengths', 'samples', 'seed', 'imports', 'description', 'singularise_chat_template']"),
    "suite-import-unknown-key": ("tasks: []\nlengths: [512]\nsamples: 1\nimports: [{file: qa.jsonl, task: qa_1}]\n",
                                 {"qa.jsonl": ROW}, [], "imports.0.file:", "allowed keys here: ['path', 'task', 'length']"),
    "suite-bad-length": ("tasks: [vt]\nlengths: [512, 4x]\nsamples: 1\n", {}, [], "lengths.1:",
                         "use tokens (8192) or k-units (8k = 8192)"),
    "suite-no-lengths": ("tasks: [vt]\nsamples: 1\n", {}, [], "lengths:", "Field required"),
    "suite-length-beyond-context": ("tasks: [vt]\nlengths: [1m]\nsamples: 1\n", {}, [], "suite bad-suite",
                                    "exceed the context"),
    "suite-bad-task": ("tasks: [vt, niah_single_9]\nlengths: [512]\nsamples: 1\n", {}, [], "tasks.1:",
                       "known tasks: niah_single_1, niah_single_2"),
    "suite-import-only-task": ("tasks: [qa_1]\nlengths: [512]\nsamples: 1\n", {}, [], "tasks.0:", "under 'imports'"),
    "suite-bad-samples": ("tasks: [vt]\nlengths: [512]\nsamples: 0\n", {}, [], "samples:", "greater than 0 (got 0)"),
    "suite-samples-not-int": ("tasks: [vt]\nlengths: [512]\nsamples: two\n", {}, [], "samples:",
                              "valid integer (got 'two')"),
    "suite-import-bad-task": ("tasks: []\nlengths: [512]\nsamples: 1\nimports: [{path: qa.jsonl, task: qa_9}]\n",
                              {"qa.jsonl": ROW}, [], "imports.0.task:", "'qa_1' or 'qa_2'"),
    "suite-import-missing-file": ("tasks: []\nlengths: [512]\nsamples: 1\nimports: [{path: nope.jsonl, task: qa_1}]\n",
                                  {}, [], "imports.0.path:", "nope.jsonl not found"),
    "suite-import-bad-jsonl": ("tasks: []\nlengths: [512]\nsamples: 1\nimports: [{path: qa.jsonl, task: qa_1}]\n",
                               {"qa.jsonl": '{"index": 0, "input": "q", "length": 5}\n'}, [], "qa.jsonl",
                               "missing field 'outputs'"),
    "suite-unknown-name": ("ruler-nope", {}, [], "suite 'ruler-nope'", "built-in suites: ruler-11"),
    "samples-flag": (VT, {}, ["--samples", "0"], "--samples", "positive integer"),
    "config-empty": (VT, {"cfg.yaml": "# nothing here\n"}, ["--config", "{tmp}/cfg.yaml"], "--config", "empty"),
    "config-missing": (VT, {}, ["--config", "{tmp}/nope.yaml"], "--config", "no such file"),
    "config-bad-value": (VT, {"cfg.yaml": "density: 7\n"}, ["--config", "{tmp}/cfg.yaml"], "density",
                         "density = 7 is invalid"),
    "config-unknown-key": (VT, {"cfg.yaml": "densty: 0.2\n"}, ["--config", "{tmp}/cfg.yaml"], "densty", "cfg.yaml"),
    "config-vs-model": (VT, {"cfg.yaml": "sketch_dim: 128\n"}, ["--config", "{tmp}/cfg.yaml"], "sketch_dim",
                        "head_dim = 64"),
    "dense-and-config": (VT, {"cfg.yaml": "density: 0.2\n"}, ["--config", "{tmp}/cfg.yaml", "--dense"], "--dense",
                         "exclude each other"),
    "model-missing": (VT, {}, ["--model", "/nonexistent/m.gguf"], "--model", "m.gguf"),
    "model-corrupt-gguf": (VT, {"bad.gguf": b"GGUF\x03\x00\x00\x00" + b"\xff" * 64}, ["--model", "{tmp}/bad.gguf"],
                           "--model", "truncated"),
    "essays-missing": ("tasks: [niah_single_2]\nlengths: [512]\nsamples: 1\n", {}, [], "--essays",
                       "PaulGrahamEssays.json"),
    "essays-not-a-file": ("tasks: [niah_single_2]\nlengths: [512]\nsamples: 1\n", {},
                          ["--essays", "{tmp}/nope.json"], "--essays", "no such file"),
}


@pytest.mark.parametrize("case", list(BAD_EVALS))
def test_bad_input_matrix_eval(tmp_path, capsys, monkeypatch, no_weights, case):
    """Every documented bad `eval` input (suite file, imports, config, model, essays): exit 2, one
    error line naming the field or flag, no weights loaded."""
    suite, files, extra, field, text = BAD_EVALS[case]
    monkeypatch.delenv("SKETCHWALK_ESSAYS", raising=False)
    for name, content in files.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    suite_arg = _suite_file(tmp_path, suite) if "\n" in suite else suite
    args = [a.format(tmp=tmp_path) for a in extra]
    rc, out = _cli(capsys, "eval", "--suite", suite_arg, *args)
    assert rc == 2, out
    assert out.startswith("error:") and out.count("error:") == 1, out
    assert field in out and text in out, out
    assert "Traceback" not in out and no_weights == []


def test_bad_suite_exits_2_from_the_real_entry_point(tmp_path):
    """`python -m sketchwalk eval --suite bad.yaml`: the process itself exits 2 with the field named."""
    import subprocess
    import sys

    bad = _suite_file(tmp_path, "tasks: [vt]\nlengths: [512]\nsample: 1\n", "bad.yaml")
    proc = subprocess.run([sys.executable, "-m", "sketchwalk", "eval", "--suite", bad], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.strip() == (f"error: suite {bad}: sample: unknown key; allowed keys here: ['name', 'tasks', "
                                   f"'lengths', 'samples', 'seed', 'imports', 'description', 'singularise_chat_template'] (got 1)")


def test_missing_sweep_file_is_named(tmp_path, capsys, no_weights):
    rc, out = _cli(capsys, "sweep", str(tmp_path / "missing.yaml"), "--workdir", str(tmp_path))
    assert rc == 2 and "sweep.<file>" in out and "missing.yaml" in out, out
    assert no_weights == []


def test_bug6_bad_storage_leaves_no_parent_run(tmp_path, capsys, no_weights):
    """A bad `storage:` is refused before the parent run exists (before: a SQLAlchemy traceback after
    the baseline, the parent left RUNNING)."""
    from tracking import SweepTracker, init_store, resolve_tracking_uri

    f = _sweep_file(tmp_path, storage="postgresql+nosuchdriver://u@h/db")
    rc, out = _cli(capsys, "sweep", str(f), "--sweep-id", "st", "--workdir", str(tmp_path), "--no-progress")
    assert rc == 2 and "sweep.storage" in out, out
    uri = resolve_tracking_uri(None, tmp_path)
    assert SweepTracker(uri, init_store(uri, "rel"), "st").find_parent() is None


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit, RuntimeError])
def test_bug10_interrupted_sweep_marks_the_parent(tmp_path, monkeypatch, exc):
    """Ctrl-C / SIGTERM (SystemExit) leave the parent run KILLED, an error FAILED; never RUNNING."""
    from search import launch
    from search.launch import prepare_sweep, run_sweep
    from tracking import SweepTracker

    f = _sweep_file(tmp_path)
    spec, _, _ = prepare_sweep(str(f), workdir=tmp_path)

    def boom(*a, **k):
        raise exc("stop")

    monkeypatch.setattr(launch, "_run_optuna", boom)
    with pytest.raises(exc):
        run_sweep(spec, "intr", workdir=tmp_path, progress=False)
    from search.session import load_session

    s = load_session("intr", tmp_path)
    run = SweepTracker(s.tracking_uri, s.experiment_id, "intr").client.get_run(s.parent_run_id)
    assert run.info.status == ("FAILED" if exc is RuntimeError else "KILLED")
    assert ("--resume intr" in run.data.tags["sketchwalk.error"]) == (exc is not RuntimeError)


def test_bug10_sigterm_during_a_sweep_marks_the_parent_killed(tmp_path, monkeypatch):
    import os
    import signal

    from search import launch
    from search.launch import prepare_sweep, run_sweep
    from search.session import load_session
    from tracking import SweepTracker

    spec, _, _ = prepare_sweep(str(_sweep_file(tmp_path)), workdir=tmp_path)
    monkeypatch.setattr(launch, "_run_optuna", lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as err:
        run_sweep(spec, "term", workdir=tmp_path, progress=False)
    assert err.value.code == 128 + signal.SIGTERM and signal.getsignal(signal.SIGTERM) == before
    s = load_session("term", tmp_path)
    assert SweepTracker(s.tracking_uri, s.experiment_id, "term").client.get_run(s.parent_run_id).info.status == "KILLED"


def test_bug7_a_trial_failing_on_its_config_gets_a_failed_mlflow_run(tmp_path):
    """A sampled config the method refuses (a non-power-of-two sketch_dim that slipped past the spec)
    still gets its MLflow run, FAILED, with the sampled params and the error (before: FAIL in Optuna,
    no MLflow run at all)."""
    import optuna

    from search import optuna_driver
    from search.session import open_session
    from search.spec import SweepSpec

    # model_validate skips the whole-range check parse_spec now does: the trial body must still cope.
    spec = SweepSpec.model_validate({"name": "p2", "space": {"sketch_dim": {"type": "int", "low": 17, "high": 17}}})
    session = open_session(spec, "p2", OBJECTIVES, workdir=tmp_path)
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.optimize(optuna_driver.make_objective(session, _fake_work()), n_trials=1, catch=(Exception,))
    assert study.trials[0].state.name == "FAIL"
    (run,) = session.tracker().children(role="trial")
    assert run.status == "FAILED" and run.params["sketch_dim"] == "17"
    assert "power of two" in run.tags["sketchwalk.error"] and run.tags["sketchwalk.config_hash"] == "invalid"


# -- bug 3: credentials in a tracking URI are never printed or stored ----------------------------------

def test_bug3_uri_credentials_move_to_the_environment(monkeypatch):
    from tracking import redact_uri, resolve_tracking_uri
    from tracking.credentials import PASSWORD_ENV, PG_PASSWORD_ENV, USER_ENV

    for k in (USER_ENV, PASSWORD_ENV, PG_PASSWORD_ENV):
        monkeypatch.delenv(k, raising=False)
    assert resolve_tracking_uri("http://alice:s3cret@mlflow.example:5000/") == "http://mlflow.example:5000/"
    assert (__import__("os").environ[USER_ENV], __import__("os").environ[PASSWORD_ENV]) == ("alice", "s3cret")
    assert resolve_tracking_uri("postgresql://bob:pw@db:5432/mlflow") == "postgresql://bob@db:5432/mlflow"
    assert __import__("os").environ[PG_PASSWORD_ENV] == "pw"
    assert resolve_tracking_uri("https://mlflow.example") == "https://mlflow.example"
    assert redact_uri("http://alice:s3cret@h:1/x") == "http://alice:***@h:1/x"
    assert redact_uri("sqlite:////tmp/m.db") == "sqlite:////tmp/m.db"


def test_bug3_refused_uri_is_redacted_in_the_error(tmp_path, capsys, no_weights):
    f = _sweep_file(tmp_path)
    for uri in ("http://alice:s3cret@127.0.0.1:9", "ftp://alice:s3cret@host/x"):
        rc, out = _cli(capsys, "sweep", str(f), "--tracking-uri", uri, "--workdir", str(tmp_path), "--no-progress")
        assert rc == 2 and "--tracking-uri" in out and "s3cret" not in out, out


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on a free loopback port (about 30 s to start on a busy machine)."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "server"
    root.mkdir()
    exe = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(exe), "server", "--backend-store-uri", f"sqlite:///{root}/m.db",
                             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start")
        yield port, root
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker: our own process group
        proc.wait(timeout=30)


@pytest.mark.slow
def test_bug3_credentials_never_printed_or_stored(tmp_path, capsys, monkeypatch, mlflow_server):
    """A sweep against http://alice:s3cret@host: the password is on no console line (MLflow's "View
    run" lines included), in no file of the sweep directory (session.json, sweep.yaml, best.yaml) and
    in no MLflow artifact; the URI's credentials reach MLflow through MLFLOW_TRACKING_USERNAME/PASSWORD."""
    import os

    from search import launch
    from search.session import log_baseline
    from search.trial import result_metrics
    from search.trial_body import execute
    from tracking.credentials import PASSWORD_ENV, USER_ENV

    port, root = mlflow_server
    for k in (USER_ENV, PASSWORD_ENV):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr("search.trial_body.run_trial", lambda work, config: _fake_eval(45.0, 0.3))

    def fake_optuna(session, display, baseline=None):  # a baseline and one trial, through the real body
        work = _fake_work()
        log_baseline(session, work.baseline, result_metrics(work.baseline), {})
        execute(session, work, 0, {"density": 0.3}, tracker=session.tracker())
        return {"complete": 1, "failed": 0}

    monkeypatch.setattr(launch, "_run_optuna", fake_optuna)
    f = _sweep_file(tmp_path, tracking={"uri": f"http://alice:s3cret@127.0.0.1:{port}", "experiment": "cred"})
    rc, out = _cli(capsys, "sweep", str(f), "--sweep-id", "cred", "--workdir", str(tmp_path), "--no-progress")
    assert rc == 0, out
    assert "s3cret" not in out and f"127.0.0.1:{port}" in out
    assert os.environ[PASSWORD_ENV] == "s3cret" and os.environ[USER_ENV] == "alice"
    sweep_dir = tmp_path / "runs" / "sweeps" / "cred"
    assert (sweep_dir / "best.yaml").is_file()
    stored = [p for p in sweep_dir.rglob("*") if p.is_file()] + [p for p in (root / "artifacts").rglob("*") if p.is_file()]
    assert any(p.name == "sweep.yaml" for p in stored if root in p.parents)  # the parent run's artifact
    leaks = [str(p) for p in stored if b"s3cret" in p.read_bytes()]
    assert leaks == []


# -- bug 2: concurrent initialisation of fresh stores ------------------------------------------------

def _init_both(db: str, barrier, out):
    """One racing driver: the MLflow store and the Optuna storage on the same fresh files."""
    from pathlib import Path

    from search.preflight import check_storage
    from tracking import init_store

    barrier.wait()
    try:
        exp = init_store(f"sqlite:///{db}/mlflow.db", "race")
        check_storage(f"sqlite:///{db}/optuna.db", Path(db))
        out.put(("ok", exp))
    except BaseException as exc:  # reported to the parent, which asserts on it
        out.put(("error", f"{type(exc).__name__}: {exc}"))


def test_bug2_concurrent_init_of_fresh_stores(tmp_path):
    """Four drivers initialising the same fresh mlflow.db and optuna.db at the same instant all
    succeed, share one experiment, and leave complete schemas (before: `_alembic_tmp_tags already
    exists`, a half-migrated store, or a UNIQUE constraint in optuna.db)."""
    import multiprocessing as mp
    import sqlite3

    import optuna

    ctx = mp.get_context("fork")  # spawn would re-import MLflow per process: 4x slower, same race
    barrier, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_init_both, args=(str(tmp_path), barrier, out)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [r[0] for r in results] == ["ok"] * 4, results
    assert len({r[1] for r in results}) == 1
    con = sqlite3.connect(tmp_path / "mlflow.db")
    assert not [r for r in con.execute("SELECT name FROM sqlite_master WHERE name LIKE '%alembic_tmp%'")]
    con.close()
    optuna.create_study(study_name="after", storage=f"sqlite:///{tmp_path}/optuna.db")


def test_bug2_half_migrated_store_is_named(tmp_path):
    import sqlite3

    from tracking import TrackingError, init_store

    db = tmp_path / "mlflow.db"
    init_store(f"sqlite:///{db}", "e")
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE _alembic_tmp_tags (x INTEGER)")  # what an interrupted migration leaves
    con.commit()
    con.close()
    with pytest.raises(TrackingError, match="half-migrated") as err:
        init_store(f"sqlite:///{db}", "e")
    assert "_alembic_tmp_tags" in str(err.value) and "move" in str(err.value)


# -- bug 8: GGUF headers bounded by the file size; tensor extents checked before loading --------------

def _garbage_gguf(path, body: bytes):
    import struct

    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + body)
    return path


def test_bug8_garbage_and_truncated_gguf_are_named_before_loading(tmp_path, capsys, no_weights):
    import os
    import struct

    from sketchwalk import models

    garbage = [  # a valid magic, then: absurd counts / lengths
        _garbage_gguf(tmp_path / "counts.gguf", b"\xff" * 16 + os.urandom(256)),
        _garbage_gguf(tmp_path / "keylen.gguf", struct.pack("<QQQ", 0, 1, 2**62) + b"x" * 64),
        _garbage_gguf(tmp_path / "array.gguf", struct.pack("<QQQ", 0, 1, 1) + b"k" + struct.pack("<IIQ", 9, 0, 2**60)),
    ]
    src = models.ensure_bundled_gguf(progress=False)
    truncated = tmp_path / "truncated.gguf"
    with open(src, "rb") as f:
        truncated.write_bytes(f.read(os.path.getsize(src) // 2))
    suite = tmp_path / "suite.yaml"
    suite.write_text("tasks: [vt]\nlengths: [512]\nsamples: 1\n")
    for bad in garbage + [truncated]:
        for argv in (["eval", "--model", str(bad), "--suite", str(suite)],
                     ["sweep", str(_sweep_file(tmp_path, model=str(bad))), "--workdir", str(tmp_path / "w"),
                      "--no-progress"]):
            rc, out = _cli(capsys, *argv)
            assert rc == 2 and bad.name in out and "Traceback" not in out and "MemoryError" not in out, (argv, out)
            assert ("truncated" in out) and (("needs bytes" in out) == (bad is truncated)), out
    assert not (tmp_path / "w" / "runs" / "sweeps").exists()  # no parent run, no sweep directory
    assert no_weights == []


# -- bug 12: the ablation report takes a variant's FINISHED run over stale ones ------------------------

def test_bug12_report_prefers_the_finished_run_of_a_variant(tmp_path):
    """A variant with a KILLED attempt, its FINISHED retry and a later attempt left RUNNING (a
    sweep killed again) reports the FINISHED one; a variant with only stale runs reports their state."""
    from ablations.plan import Variant
    from ablations.report import collect_results
    from search.session import config_hash, open_session, start_trial

    spec = parse_spec({"name": "ab", "variants": {"dense": None, "walk=none": {"walk": "none"}}})
    session = open_session(spec, "ab", OBJECTIVES, workdir=tmp_path)
    tracker = session.tracker()
    from sketchwalk.config import SketchWalkConfig

    none_cfg = SketchWalkConfig(walk="none")
    variants = [Variant("dense", "baseline", None, None), Variant("walk=none", "walk", none_cfg.to_dict(), {"walk": "none"})]
    good = _fake_eval(21.4, 1.0)
    runs = {}
    for number, (config, status) in enumerate([(None, "KILLED"), (None, "FINISHED"), (None, None),
                                               (none_cfg, "KILLED"), (none_cfg, None)]):
        run = start_trial(session, number, config, tracker)
        if status == "FINISHED":
            tracker.log_metrics(run.run_id, {"accuracy": 21.4})
            tracker.log_text(run.run_id, good.to_json(), "eval.json")
        if status is not None:
            tracker.finish(run.run_id, status)
        runs[number] = run.run_id
    assert config_hash(None) == "dense"
    results = collect_results(session, variants)
    assert results["dense"].state == "COMPLETE" and results["dense"].run_id == runs[1]
    assert results["dense"].metrics["accuracy"] == pytest.approx(21.4) and len(results["dense"].scores) == 1
    assert results["walk=none"].state == "RUNNING" and results["walk=none"].trial == 4


# -- bug 4: a lost MLflow server: bounded retries, said on the console, no finished trial lost ---------

@pytest.mark.timeout(120)
def test_bug4_mlflow_http_retries_are_bounded_and_reported(monkeypatch, caplog):
    import logging
    import os
    import time

    from tracking import SweepTracker, TrackingError

    # Named here, not imported, so the test also runs (and fails) on the code from before the fix.
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")  # a user's own value is kept
    monkeypatch.setattr("tracking.retry.random.uniform", lambda a, b: 0.0)
    tracker = SweepTracker("http://127.0.0.1:9", "0", "lost")  # nothing listens on port 9
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1" and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    caplog.set_level(logging.WARNING, logger="tracking.retry")
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match="failed after 5 attempts"):
        tracker.find_child("trial-00000")
    assert time.monotonic() - t0 < 60  # MLflow's defaults alone: 7 retries from 2 s, per attempt: minutes
    lines = [r.getMessage() for r in caplog.records if r.name == "tracking.retry"]
    assert len(lines) == 4 and all("MLflow server is unreachable" in m and "retrying in" in m for m in lines), lines


def test_bug4_a_finished_trial_survives_a_lost_server(tmp_path, monkeypatch):
    """MLflow lost between a trial's evaluation and its FINISHED write: the study stops (no more
    trials into a dead store), the numbers are kept on disk, and reopening the sweep delivers them."""
    import optuna

    from search import optuna_driver
    from search.session import deliver_pending, open_session
    from search.trial_body import ResultsKept
    from tracking import TrackingError

    spec = parse_spec({"name": "lost", "space": SPACE, "budget": {"trials": 3}})
    session = open_session(spec, "lost", OBJECTIVES, workdir=tmp_path)
    monkeypatch.setattr("search.trial_body.run_trial", lambda work, config: _fake_eval(42.0, 0.3))

    def lost(*a, **k):
        raise TrackingError("log metrics to run x at http://mlflow failed after 5 attempts: ConnectionError")

    monkeypatch.setattr("search.trial_body.finish_trial", lost)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    with pytest.raises(ResultsKept, match="--resume lost"):
        optuna_driver.run_study(session, _fake_work(), storage_url=storage, heartbeat_s=1)
    assert len(optuna.load_study(study_name="lost", storage=storage).trials) == 1  # stopped after the first
    kept = list((session.sweep_dir / "pending").glob("*.json"))
    assert [p.name for p in kept] == ["trial-00000.json"]
    monkeypatch.undo()
    assert deliver_pending(session) == [0]
    (run,) = session.tracker().children(role="trial")
    assert run.status == "FINISHED" and run.metrics["accuracy"] == pytest.approx(42.0)
    assert run.metrics["accuracy_drop"] == pytest.approx(8.0) and not kept[0].exists()


# -- tidy-up: one τ switch, one MLflow-params reader ---------------------------------------------

def test_config_from_mlflow_params_round_trips_and_tau_switches_once():
    from search.spec import config_from_params
    from sketchwalk.config import SketchWalkConfig

    cfg = SketchWalkConfig(top_k=4, sketch_dim=32, walk="damped")
    as_logged = {k: str(v) for k, v in cfg.to_dict().items()} | {"attention": "sparse"}
    assert SketchWalkConfig.from_params(as_logged) == cfg
    spec = parse_spec({"name": "tau", "base": {"density": 0.3}, "space": {"top_k": {"type": "int", "low": 1, "high": 8}}})
    got = config_from_params(spec, {"top_k": 3})
    assert (got.top_k, got.density) == (3, None)
    spec = parse_spec({"name": "tau", "base": {"top_k": 2, "density": None}, "space": SPACE})
    got = config_from_params(spec, {"density": 0.25})
    assert (got.top_k, got.density) == (None, 0.25)


# -- issue 21: a killed trial's MLflow run ends when it was last alive, not at the resume ----------

def test_killed_trial_run_ends_at_its_last_heartbeat_not_at_the_resume(tmp_path):
    """A trial that died 2 minutes before the sweep was resumed (its last heartbeat 120 s old, in
    the real Optuna SQLite storage): the stale-trial callback marks its run KILLED with MLflow's
    end_time at that heartbeat, so its duration is the time it ran, not the downtime too."""
    import sqlite3
    import time

    import optuna
    from mlflow.tracking import MlflowClient

    from search import optuna_driver
    from search.session import open_session

    spec = parse_spec({"name": "hb", "space": SPACE, "budget": {"trials": 2}})
    session = open_session(spec, "hb", OBJECTIVES, workdir=tmp_path)
    db = tmp_path / "optuna.db"
    study = optuna_driver.open_study(session, storage_url=f"sqlite:///{db}", heartbeat_s=1)
    trial = study.ask()
    study._storage.record_heartbeat(trial._trial_id)
    now_ms = int(time.time() * 1000)
    started = now_ms - 300_000  # the trial began 5 minutes ago ...
    tracker = session.tracker()
    run = tracker.child_run("trial-00000", role="trial", name="t0", start_ms=started)
    tracker.client.log_metric(run.run_id, "started_at", started / 1000, timestamp=started)
    with sqlite3.connect(db) as con:  # ... and was last alive 2 minutes ago (the database's clock)
        con.execute("UPDATE trial_heartbeats SET heartbeat = datetime('now', '-120 seconds')")

    optuna.storages.fail_stale_trials(study)  # what a resume does first

    info = MlflowClient(session.tracking_uri).get_run(run.run_id).info
    assert info.status == "KILLED"
    assert abs(info.end_time - (now_ms - 120_000)) < 3_000, info.end_time - now_ms  # SQLite keeps whole seconds
    assert info.start_time == started
    assert study.trials[0].state.name == "FAIL"
    assert [t.system_attrs.get("failed_trial") for t in study.trials[1:]] == [0]  # still re-queued


def test_last_alive_falls_back_to_the_runs_last_metric(tmp_path):
    """Without a heartbeat (none recorded, or no RDB storage) the run's last logged metric is the
    last sign of life; with neither, None (the run ends now, as MLflow would)."""
    import time

    from search.liveness import last_alive_ms
    from search.session import open_session

    spec = parse_spec({"name": "lm", "space": SPACE})
    session = open_session(spec, "lm", OBJECTIVES, workdir=tmp_path)
    tracker = session.tracker()
    now_ms = int(time.time() * 1000)
    run = tracker.child_run("trial-00000", role="trial", name="t0", start_ms=now_ms - 600_000)
    for ago in (500_000, 90_000, 400_000):  # the latest is what counts, whatever the order logged
        tracker.client.log_metric(run.run_id, "x", 1.0, timestamp=now_ms - ago)
    run = tracker.find_child("trial-00000")
    assert last_alive_ms(object(), 0, tracker, run) == now_ms - 90_000
    bare = tracker.child_run("trial-00001", role="trial", name="t1", start_ms=now_ms - 60_000)
    assert last_alive_ms(object(), 1, tracker, bare) == now_ms - 60_000  # the start, at least
    with pytest.raises(ValueError, match="end_ms must be a non-negative int"):
        tracker.finish(bare.run_id, "KILLED", end_ms=-5)
