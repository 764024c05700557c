"""The `ray` backend: Ray Tune with `OptunaSearch`, one GPU per trial, actors reused across trials.

- The multi-objective metric/mode lists go to `OptunaSearch` (TuneConfig takes one metric only).
- `SweepTrainable` loads model + tokenizer + samples once per worker process (`_workload`) and
  keeps them across trials: `reuse_actors=True` + `reset_config` returning True.
- The dense baseline is evaluated once, in a Ray task with a trial's resources, before the Tuner
  starts, and handed to every worker.
- Trials that raise (CUDA OOM included) are recorded FAILED in MLflow, then re-raised so Ray marks
  them ERROR and OptunaSearch tells Optuna FAIL; NaN objectives are turned into such failures,
  never reported (Optuna would leave the trial RUNNING).
- `--resume`: `Tuner.restore` on `runs/ray/<sweep id>`; finished trials are kept, unfinished ones
  re-run, and their MLflow runs re-attached by key (Ray's MLflowLoggerCallback keeps its map in
  memory only, so it is not used).
"""
from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable, Optional

from ray import tune
from ray.tune.search.optuna import OptunaSearch

from sketchwalk.evaluation import EvalResult
from tracking.names import TAG_RAY_TRIAL_ID

from .ray_cluster import init_ray
from .records import Objective
from .session import SweepSession, log_baseline, recorded_trial
from .space import CONSTRAINT_ATTR, constraint_excess, make_sampler, suggest_params
from .spec import CONFIG_FIELDS, VARIANT_PARAM, SweepSpec, SweepSpecError
from .trial import Workload, baseline_metrics, dense_result, load_workload, objective_values, worker_tags
from .trial_body import Outcome, execute

_WORKLOADS: dict[str, Workload] = {}  # per worker process: spec json -> loaded workload
MODEL_LOADS = {"count": 0}


def _workload(spec: SweepSpec) -> Workload:
    """The worker's workload for `spec`, loaded on first use in this process and kept."""
    key = spec.model_dump_json()
    if key not in _WORKLOADS:
        _WORKLOADS[key] = load_workload(spec)
        MODEL_LOADS["count"] += 1
    return _WORKLOADS[key]


TRIAL_NUMBER_KEY = "optuna_trial_number"


def trial_number(config: dict) -> int:
    """The trial's number: the Optuna trial number OptunaSearch sampled it in, which the
    define-by-run space returns as a constant into the trial's config. It is stored with the
    trial, so it survives `Tuner.restore` (Ray's own trial ids are random)."""
    return int(config[TRIAL_NUMBER_KEY])


class SweepTrainable(tune.Trainable):
    """One trial = one `step`: evaluate the sampled config, log to MLflow, report objectives."""

    def setup(self, config: dict, session: Optional[dict] = None, baseline: Optional[dict] = None):
        self.session = SweepSession.from_dict(session)
        self.work = _workload(self.session.spec)
        self.work.baseline = EvalResult.from_dict(baseline) if baseline else None
        self.tracker = self.session.tracker()

    def step(self) -> dict[str, Any]:
        objectives = self.session.objectives
        number = trial_number(self.config)
        done = recorded_trial(self.tracker, number, objectives)
        if done is not None:
            # Finished and logged before the sweep was killed, but after Tune's last experiment
            # checkpoint: Tune re-runs it on restore; report what MLflow holds instead.
            return self._report(number, Outcome(objective_values(done.metrics, objectives), done.metrics,
                                                constraint_excess(self.session.spec, done.metrics)))
        params = {k: v for k, v in self.config.items() if k in CONFIG_FIELDS or k == VARIANT_PARAM}
        outcome = execute(self.session, self.work, number, params, tracker=self.tracker,
                          model_loads=MODEL_LOADS["count"],
                          tags={TAG_RAY_TRIAL_ID: self.trial_id, **worker_tags(_gpu_share())})
        return self._report(number, outcome)

    def _report(self, number: int, outcome: Outcome) -> dict[str, Any]:
        """The step result Tune hands to OptunaSearch: objective values by name, the accuracy-drop
        excess for the sampler's constraint (`ConstrainedOptunaSearch`), plus worker facts."""
        out = {o.name: v for o, v in zip(self.session.objectives, outcome.values)}
        if outcome.constraint is not None:
            out[CONSTRAINT_ATTR] = outcome.constraint
        # accuracy_drop: the live display judges feasibility by it, as the analysis does.
        out.update(trial_number=number, eval_s=outcome.metrics.get("eval_s"),
                   accuracy_drop=outcome.metrics.get("accuracy_drop"), load_s=self.work.load_s,
                   worker_pid=os.getpid(), model_loads=MODEL_LOADS["count"], done=True)
        return out

    def save_checkpoint(self, checkpoint_dir: str) -> dict:
        # A trial is a single evaluation: nothing to resume mid-way; its results live in MLflow.
        return {}

    def load_checkpoint(self, checkpoint) -> None:
        pass

    def reset_config(self, new_config: dict) -> bool:
        self.config = new_config  # model, tokenizer and samples stay loaded
        return True


def _baseline_task(session_dict: dict) -> dict:
    """Ray task: the dense baseline of the sweep's workload (disk-cached per model/suite/dtype/device),
    its MLflow metrics and the tags of the process that loaded the model for it."""
    session = SweepSession.from_dict(session_dict)
    work = load_workload(session.spec)
    started = time.time()
    result = dense_result(work, progress=False)
    metrics = baseline_metrics(work, result, started)
    return {"result": result.to_dict(), "metrics": metrics, "tags": worker_tags(_gpu_share()), "started_at": started}


def _gpu_share() -> Optional[float]:
    """GPUs Ray assigned to this actor or task (0.5: it shares its GPU with another trial)."""
    import ray

    if not ray.is_initialized():  # called outside a Ray worker (tests): asking would start a Ray
        return None
    return float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))


def resolve_gpus(spec: SweepSpec, cluster_gpus: float) -> float:
    """GPUs per trial: `auto` -> 1 if the cluster has any, else 0. Requests the cluster cannot meet
    are refused here: such trials would sit PENDING forever."""
    g = spec.resources.gpus
    if g == "auto":
        return 1.0 if cluster_gpus >= 1 else 0.0
    if g > cluster_gpus:
        raise SweepSpecError("resources.gpus", f"{g} GPU(s) per trial requested but the Ray cluster has "
                                               f"{cluster_gpus:g}; trials would hang PENDING. Use 0 on CPU-only clusters")
    return float(g)


def run_tune(session: SweepSession, *, address: Optional[str] = None, resume: bool = False,
             baseline: Optional[EvalResult] = None, on_result: Optional[Callable] = None,
             on_status: Optional[Callable] = None) -> dict:
    """Run the sweep on Ray Tune; returns counts and the per-trial worker facts. `baseline`: the dense
    baseline the sweep already logged (a resume); without it, one Ray task evaluates and logs it."""
    import ray

    spec = session.spec
    init_ray(address)
    gpus = resolve_gpus(spec, ray.cluster_resources().get("GPU", 0.0))
    resources = {"cpu": spec.resources.cpus, "gpu": gpus}
    session_dict = session.to_dict()

    if baseline is None:
        # The dense baseline: once per sweep, in a task with a trial's resources. max_calls=1: its
        # worker process exits after it, so its model and CUDA memory are gone before trials start.
        task = ray.remote(num_cpus=spec.resources.cpus, num_gpus=gpus, max_calls=1)(_baseline_task)
        base = ray.get(task.remote(session_dict))
        baseline = EvalResult.from_dict(base["result"])
        log_baseline(session, baseline, base["metrics"], base["tags"], started_at=base["started_at"])

    storage_path = str((session.workdir / "runs" / "ray").resolve())
    exp_dir = os.path.join(storage_path, session.sweep_id)
    trainable = tune.with_resources(
        tune.with_parameters(SweepTrainable, session=session_dict, baseline=baseline.to_dict()), resources)
    callbacks = [_progress_callback(session.objectives, on_result, on_status)]
    if resume and tune.Tuner.can_restore(exp_dir):
        tuner = tune.Tuner.restore(exp_dir, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False)
    else:
        from ray.tune.search import ConcurrencyLimiter

        searcher = make_searcher(spec, session.objectives)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=spec.concurrency),
                                        num_samples=spec.budget.trials or -1, reuse_actors=True,
                                        time_budget_s=spec.budget.wall_time_s),
            run_config=tune.RunConfig(name=session.sweep_id, storage_path=storage_path, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=spec.trial_retries, fail_fast=False),
                                      callbacks=callbacks))
    grid = tuner.fit()
    rows = []
    for r in grid:
        m = r.metrics or {}
        rows.append({"trial_number": m.get("trial_number"), "worker_pid": m.get("worker_pid"),
                     "model_loads": m.get("model_loads"), "eval_s": m.get("eval_s"), "load_s": m.get("load_s"),
                     "error": str(r.error)[:300] if r.error else None})
    return {"complete": sum(r["error"] is None and r["trial_number"] is not None for r in rows),
            "failed": sum(r["error"] is not None for r in rows), "trials": rows, "gpus_per_trial": gpus}


class ConstrainedOptunaSearch(OptunaSearch):
    """OptunaSearch that hands the trial's accuracy-drop excess (reported under CONSTRAINT_ATTR) to
    the Optuna trial before telling it, so the sampler's constraint (`space._AccuracyDropConstraint`)
    guides TPE under Ray exactly as under the Optuna backend (plain OptunaSearch only tells values)."""

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False):
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and result and result.get(CONSTRAINT_ATTR) is not None:
            ot_trial.set_user_attr(CONSTRAINT_ATTR, float(result[CONSTRAINT_ATTR]))
        super().on_trial_complete(trial_id, result=result, error=error)


def make_searcher(spec: SweepSpec, objectives: list[Objective]) -> ConstrainedOptunaSearch:
    """The Tune searcher of a new sweep: the define-by-run space, the objectives as metric/mode lists,
    the seeded sampler of `space.make_sampler` (OptunaSearch ignores seed= then) and, for a fixed-variant
    sweep, each variant enqueued once, in order."""
    return ConstrainedOptunaSearch(space=functools.partial(_define_by_run, spec=spec),  # picklable: Tune checkpoints it
                                   metric=[o.name for o in objectives],
                                   mode=["max" if o.maximize else "min" for o in objectives],
                                   sampler=make_sampler(spec),
                                   points_to_evaluate=[{VARIANT_PARAM: n} for n in spec.variants] or None)


def _define_by_run(trial, spec: SweepSpec) -> dict:
    suggest_params(trial, spec)
    return {TRIAL_NUMBER_KEY: trial.number}


def _progress_callback(objectives: list[Objective], on_result, on_status):
    """A Tune callback feeding the sweep display: each finished/errored trial, and the counts."""
    from ray.tune import Callback

    class ProgressCallback(Callback):
        def __init__(self, on_result, on_status):
            self.done = self.failed = 0
            self.on_result, self.on_status = on_result, on_status

        def __getstate__(self):
            # Tune pickles its callbacks with the experiment state; the display (locks, a console)
            # stays with this process.
            return {"done": self.done, "failed": self.failed}

        def __setstate__(self, state):
            self.__dict__.update(state, on_result=None, on_status=None)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            if self.on_result:
                self.on_result(trial_number(trial.config), trial.last_result or {}, None)
            self._status(trials)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.failed += 1
            if self.on_result:
                self.on_result(trial_number(trial.config), None, "error (see the trial's MLflow run)")
            self._status(trials)

        def _status(self, trials):
            if self.on_status:
                self.on_status(self.done, self.failed, sum(t.status == "RUNNING" for t in trials))

    return ProgressCallback(on_result, on_status)

