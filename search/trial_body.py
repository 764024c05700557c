"""The one trial body every driver runs: params -> config -> checks -> evaluate -> MLflow -> Outcome.

The Optuna driver calls `execute` from its objective, the Ray driver from `SweepTrainable.step`;
neither has a trial body of its own, so what a trial checks, records and reports (the accuracy
constraint for the sampler included) cannot drift between backends.

Failure handling, the same for every stage: the trial's MLflow child run is opened first, with
the raw params when they do not even make a valid config, so a trial that fails anywhere (bad
config, model-shape check, evaluation, NaN objective) ends FAILED in MLflow with its error, then
the exception propagates for the driver to tell its sampler FAIL.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional

from sketchwalk.config import ConfigError, SketchWalkConfig
from sketchwalk.model_shape import model_shape
from tracking import ChildRun, SweepTracker, TrackingError

from .session import SweepSession, fail_trial, finish_trial, keep_pending, start_trial
from .space import constraint_excess
from .spec import config_from_params
from .trial import (TrialFailed, Workload, free_cuda_cache, objective_values, result_metrics,
                    run_trial, worker_metrics)


@dataclasses.dataclass
class Outcome:
    """A finished trial: objective values (in the session's order), its flat metrics, and the
    accuracy-drop excess the sampler's constraint reads (<= 0 feasible; None without a constraint)."""

    values: list[float]
    metrics: dict[str, float]
    constraint: Optional[float]


def execute(session: SweepSession, work: Workload, number: int, params: dict[str, Any], *,
            tracker: SweepTracker, tags: Optional[dict[str, Any]] = None, model_loads: int = 1,
            on_run: Optional[Callable[[ChildRun, Optional[SketchWalkConfig]], None]] = None) -> Outcome:
    """Run trial `number` with sampled `params` on `work` and record it in MLflow.

    `tags`: extra tags for the trial's run (worker facts, retry or Ray trial id); `model_loads`: model
    loads in this worker process so far; `on_run(run, config)`: called once the run exists (the Optuna
    driver stores its id on the study's trial). Raises (after the run is marked FAILED) on any failure.
    """
    spec, objectives = session.spec, session.objectives
    run: Optional[ChildRun] = None
    try:
        config, invalid = _config(spec, params)
        run = start_trial(session, number, config, tracker, extra_tags=tags,
                          params=params if invalid is not None else None)
        if on_run:
            on_run(run, config)
        if invalid is not None:
            raise invalid
        if config is not None:  # None: a dense variant
            config.validate_for_model(*model_shape(work.model.config))
        t0 = time.perf_counter()
        result = run_trial(work, config)
        metrics = result_metrics(result, model=work.model, baseline=work.baseline)
        metrics.update(worker_metrics(work, model_loads, time.perf_counter() - t0))
        values = objective_values(metrics, objectives)
        if values is None:
            bad = [o.metric for o in objectives if objective_values(metrics, [o]) is None]
            raise TrialFailed(f"objective metric(s) {bad} missing or not finite: {[metrics.get(b) for b in bad]}")
    except BaseException as exc:
        fail_trial(tracker, run, exc)
        free_cuda_cache()
        raise
    try:
        finish_trial(session, tracker, run, result, metrics, work.device)
    except TrackingError as exc:
        # The evaluation is done and paid for: keep its numbers, then stop (the store is gone).
        path = keep_pending(session, number, result, metrics, work.device)
        raise ResultsKept(f"trial {number} finished but MLflow at {session.tracking_uri} did not take its results "
                          f"({exc}); they are kept in {path}, and `sketchwalk sweep --resume {session.sweep_id}` "
                          f"delivers them") from exc
    return Outcome(values, metrics, constraint_excess(spec, metrics))


class ResultsKept(TrackingError):
    """MLflow was lost after a trial finished: its results are on disk (`session.keep_pending`)."""


def _config(spec, params: dict[str, Any]) -> tuple[Optional[SketchWalkConfig], Optional[ConfigError]]:
    """(the trial's config, None) or (None, the ConfigError that refused the params)."""
    try:
        return config_from_params(spec, params), None
    except ConfigError as exc:
        return None, exc
