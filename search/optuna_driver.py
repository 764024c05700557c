"""The `optuna` backend: an in-process multi-objective study persisted in an Optuna RDB storage.

Kill-safety, in three parts:
- every trial runs inside `study.optimize` with a heartbeat, so a trial whose process died
  (SIGKILL included) goes stale after `grace_s`, is marked FAIL and is re-queued with the same
  params by the stale-trial callback (its MLflow run is marked KILLED, never deleted, and ends
  when the trial was last known alive: `liveness.last_alive_ms`);
- a trial's MLflow run is finished *before* Optuna is told, and a RUNNING trial whose run already
  reads FINISHED is completed from MLflow's metrics on resume (nothing re-run, nothing lost);
- MLflow child runs are keyed by (sweep id, trial number), so re-attaching never duplicates.
"""
from __future__ import annotations

import time
import warnings
from typing import Callable, Optional

from tracking import TrackingError
from tracking.names import TAG_CONFIG_HASH, TAG_RETRY_OF

from .liveness import last_alive_ms
from .session import SweepSession, config_hash, error_text, recorded_trial, trial_key
from .space import CONSTRAINT_ATTR, constraint_excess, make_sampler, suggest_params
from .spec import VARIANT_PARAM
from .trial import Workload, objective_values, worker_tags
from .trial_body import execute


def open_study(session: SweepSession, *, storage_url: str, heartbeat_s: int = 10):
    """Create or load the study named after the sweep, with heartbeats and stale-trial retry; a
    fixed-variant sweep's variants are enqueued in order, once (a resumed study skips those it has)."""
    import optuna

    spec = session.spec
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = optuna.storages.RDBStorage(
        storage_url, heartbeat_interval=heartbeat_s, grace_period=3 * heartbeat_s,
        heartbeat_stale_trial_callback=_StaleTrialCallback(session),
        engine_kwargs={"connect_args": {"timeout": 60}} if storage_url.startswith("sqlite") else None)
    study = optuna.create_study(study_name=session.sweep_id, storage=storage, sampler=make_sampler(spec),
                                directions=[o.direction for o in session.objectives], load_if_exists=True)
    study.set_metric_names([o.name for o in session.objectives])
    study.set_user_attr("sweep_id", session.sweep_id)
    for name in spec.variants:
        study.enqueue_trial({VARIANT_PARAM: name}, skip_if_exists=True)
    return study


class _StaleTrialCallback:
    """Marks the dead trial's MLflow run KILLED, ended at its last sign of life, then re-queues its
    params (Optuna's retry callback)."""

    def __init__(self, session: SweepSession, max_retry: int = 2):
        import optuna

        self.session = session
        retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) \
            or optuna.storages.RetryFailedTrialCallback  # renamed in Optuna 4.9
        self.retry = retry_cls(max_retry=max_retry)

    def __call__(self, study, frozen) -> None:
        tracker = self.session.tracker()
        run = tracker.find_child(trial_key(frozen.number))
        if run is not None and run.status == "RUNNING":
            # Ended when it was last seen alive, not now: now may be a resume days later.
            tracker.finish(run.run_id, "KILLED", error=f"trial {frozen.number} was interrupted (its worker stopped "
                                                        f"heartbeating); its params were re-queued as a new trial",
                           end_ms=last_alive_ms(study._storage, frozen._trial_id, tracker, run))
        self.retry(study, frozen)  # the re-queued trial names this one in system_attrs["failed_trial"]


def recover_finished(study, session: SweepSession) -> list[int]:
    """Complete RUNNING trials whose MLflow run already reads FINISHED (the process died between
    logging and telling Optuna); returns their numbers."""
    import optuna

    tracker, done = session.tracker(), []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        run = recorded_trial(tracker, t.number, session.objectives)
        if run is None:
            continue
        values = objective_values(run.metrics, session.objectives)
        excess = constraint_excess(session.spec, run.metrics)
        if excess is not None:
            study._storage.set_trial_user_attr(t._trial_id, CONSTRAINT_ATTR, excess)
        study.tell(t.number, values)
        done.append(t.number)
    return done


def counted_trials(study) -> tuple[int, int, int]:
    """(complete, failed, running) trials towards the budget; interrupted trials that were
    re-queued do not count (their retry does)."""
    import optuna

    S = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials} - {None}
    complete = sum(t.state == S.COMPLETE for t in trials)
    failed = sum(t.state == S.FAIL and t.number not in retried for t in trials)
    running = sum(t.state == S.RUNNING for t in trials)
    return complete, failed, running


def make_objective(session: SweepSession, work: Workload, on_result: Optional[Callable] = None):
    """The define-by-run objective: sample, then the shared trial body (`trial_body.execute`)."""
    tracker = session.tracker()

    def objective(trial):
        def remember(run, config):
            trial.set_user_attr("mlflow_run_id", run.run_id)
            trial.set_user_attr("config_hash", run.tags.get(TAG_CONFIG_HASH, config_hash(config)))

        try:
            params = suggest_params(trial, session.spec)
            retry_of = _retry_of(trial)
            outcome = execute(session, work, trial.number, params, tracker=tracker, on_run=remember,
                              tags={TAG_RETRY_OF: "" if retry_of is None else retry_of, **worker_tags()})
        except BaseException as exc:
            error = error_text(exc)
            trial.set_user_attr("error", error[-2000:])
            if isinstance(exc, TrackingError):
                objective.store_lost = exc  # run_study stops: the next trial could not be recorded either
            if on_result:
                on_result(trial.number, None, error)
            raise
        if outcome.constraint is not None:
            trial.set_user_attr(CONSTRAINT_ATTR, outcome.constraint)
        if on_result:
            on_result(trial.number, outcome.metrics, None)
        return outcome.values

    objective.store_lost = None
    return objective


def _retry_of(trial) -> Optional[int]:
    """The number of the interrupted trial this one re-runs (set by the stale-trial callback), or None."""
    frozen = trial.study._storage.get_trial(trial._trial_id)
    return frozen.system_attrs.get("failed_trial")


def run_study(session: SweepSession, work: Workload, *, storage_url: str, heartbeat_s: int = 10,
              on_result: Optional[Callable] = None, on_status: Optional[Callable] = None) -> dict:
    """Run trials until the budget (finished trials and/or wall time) is spent; returns counts."""
    import optuna

    spec = session.spec
    study = open_study(session, storage_url=storage_url, heartbeat_s=heartbeat_s)
    recovered = recover_finished(study, session)
    optuna.storages.fail_stale_trials(study)
    objective = make_objective(session, work, on_result)
    deadline = time.monotonic() + spec.budget.wall_time_s if spec.budget.wall_time_s else None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own display reports each trial
    waited = 0.0
    while True:
        complete, failed, running = counted_trials(study)
        if on_status:
            on_status(complete, failed, running)
        if spec.budget.trials is not None and complete + failed >= spec.budget.trials:
            if running and waited <= 3 * heartbeat_s:
                # RUNNING trials left by a dead process go stale after the grace period; wait that
                # long so they end FAIL (interrupted) rather than RUNNING. A live worker's trial
                # keeps heartbeating and is left to it.
                time.sleep(heartbeat_s)
                waited += heartbeat_s
                optuna.storages.fail_stale_trials(study)
                continue
            break
        if deadline is not None and time.monotonic() >= deadline:
            break
        if spec.variants and not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
            # A fixed-variant sweep never samples (that would repeat a variant): with nothing queued,
            # wait for the RUNNING trials, a dead worker's goes stale and its variant is re-queued.
            if not running:
                break
            time.sleep(heartbeat_s)
            optuna.storages.fail_stale_trials(study)
            continue
        study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False)
        if objective.store_lost is not None:
            raise objective.store_lost
    complete, failed, running = counted_trials(study)
    return {"complete": complete, "failed": failed, "running": running, "recovered": recovered}

