"""The search space as an Optuna define-by-run function, and the objectives a sweep optimises.

Both drivers sample through `suggest_params`: the Optuna backend calls it on its own trials,
the Ray backend hands it to `OptunaSearch` as the define-by-run space. Conditional parameters
(`when: {walk: damped}`) are only sampled when their condition holds, so TPE never models a
value that had no effect.
"""
from __future__ import annotations

from typing import Any, Optional

from .records import OBJECTIVES, Objective
from .spec import SPEED_AUTO, VARIANT_PARAM, CategoricalParam, FloatParam, IntParam, SweepSpec


def suggest_params(trial, spec: SweepSpec) -> dict[str, Any]:
    """Sample the spec's space on an `optuna.Trial`; returns {config field: value} of the sampled
    (active) parameters only. Parameters are visited in file order, so a `when` condition may
    refer to any parameter listed before it. A fixed-variant sweep has one parameter, `variant`
    (its trials are enqueued, so the value is fixed, never sampled)."""
    if spec.variants:
        return {VARIANT_PARAM: trial.suggest_categorical(VARIANT_PARAM, list(spec.variants))}
    params: dict[str, Any] = {}
    for name, p in spec.space.items():
        if p.when and any(params.get(k, spec.base.get(k)) != v for k, v in p.when.items()):
            continue
        if isinstance(p, CategoricalParam):
            params[name] = trial.suggest_categorical(name, p.values)
        elif isinstance(p, IntParam):
            params[name] = trial.suggest_int(name, p.low, p.high, step=p.step, log=p.log)
        elif isinstance(p, FloatParam):
            params[name] = trial.suggest_float(name, p.low, p.high, log=p.log, step=p.step)
    return params


def resolve_objectives(spec: SweepSpec, cuda: bool) -> list[Objective]:
    """The spec's objectives with `speed` resolved: the prefill speedup at the deployment lengths when the
    spec times them (`speed:`); else the bare prefill forward time on a CUDA device (time to first
    token adds generate()'s host work, which for a small model is most of it and jitters run to run),
    measured density on a CPU (where the reference path's latency says nothing about GPU speed)."""
    out = []
    for name in spec.objectives:
        if name == SPEED_AUTO:
            name = "prefill_speedup" if spec.speed is not None else "prefill_forward" if cuda else "density"
        out.append(Objective(name, OBJECTIVES[name][1]))
    return out


def make_sampler(spec: SweepSpec):
    """The Optuna sampler named by `spec.sampler`, seeded.

    TPE (default) handles categorical and conditional parameters and multiple objectives and
    leaves random search after `n_startup_trials` (here a quarter of the trial budget, at least 3,
    at most 10); NSGA-II would stay random for its whole first population of 50, longer than our
    budgets. GP suits small, mostly continuous spaces.
    """
    import warnings

    import optuna

    # Optuna 5 prefers Trial.set_constraint, which Ray Tune's OptunaSearch cannot call; the
    # sampler's constraints_func serves both drivers and works until Optuna 7. Filtered here, where
    # both drivers build their sampler (the Ray driver never opens a study of its own).
    warnings.filterwarnings("ignore", message=".*constraints_func.* has been deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Argument ``group`` is an experimental feature")
    n = spec.budget.trials or 20
    startup = max(3, min(10, n // 4))
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=startup, multivariate=True,
                                          group=True, constraints_func=_constraints_func(spec))
    if spec.sampler == "gp":
        return optuna.samplers.GPSampler(seed=spec.seed, n_startup_trials=startup,
                                         constraints_func=_constraints_func(spec))
    return optuna.samplers.RandomSampler(seed=spec.seed)


CONSTRAINT_ATTR = "accuracy_drop_excess"


def constraint_excess(spec: SweepSpec, metrics: dict[str, float]) -> Optional[float]:
    """The trial's accuracy drop beyond `max_accuracy_drop` (<= 0 feasible), the value both drivers
    put in the trial's user attr CONSTRAINT_ATTR for the sampler; None without a constraint or drop."""
    limit = spec.constraints.max_accuracy_drop
    if limit is None or "accuracy_drop" not in metrics:
        return None
    return float(metrics["accuracy_drop"]) - limit


def _constraints_func(spec: SweepSpec):
    """Optuna constraint (<= 0 is feasible): accuracy drop vs dense minus the allowed drop."""
    return None if spec.constraints.max_accuracy_drop is None else _AccuracyDropConstraint()


class _AccuracyDropConstraint:
    """Reads the trial's excess accuracy drop (set by the driver before it tells Optuna). A class,
    not a closure, so the sampler pickles (Ray Tune checkpoints its searcher)."""

    def __call__(self, frozen_trial) -> tuple[float]:
        return (float(frozen_trial.user_attrs.get(CONSTRAINT_ATTR, 0.0)),)
