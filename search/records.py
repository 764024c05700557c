"""The records the sweep's analysis works on: one `TrialRecord` per trial, one `Objective` per axis.

Both backends (Optuna, Ray Tune) log every trial to MLflow; Pareto analysis, plots and export
read `TrialRecord`s (from MLflow or straight from a driver) and never a backend's own objects.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from sketchwalk.config import SketchWalkConfig

#: Objective name -> (MLflow metric it reads, default direction, unit shown in tables/plots).
OBJECTIVES: dict[str, tuple[str, str, str]] = {
    "accuracy": ("accuracy", "maximize", "RULER score x100"),
    "prefill_latency": ("prefill_s", "minimize", "s (median time to first token, mean over lengths)"),
    "prefill_forward": ("prefill_forward_s", "minimize",
                        "s (median bare prefill forward, CUDA events, mean over lengths)"),
    "decode_latency": ("decode_ms_per_token", "minimize", "ms per generated token"),
    "density": ("density", "minimize", "fraction of causal block pairs computed (prefill)"),
    "attention_flops": ("attention_tflop", "minimize", "TFLOP of attention per sample (prefill, measured density)"),
    "memory": ("peak_memory_mb", "minimize", "MiB (CUDA max_memory_allocated)"),
    # At the deployment lengths of `speed:` (sketchwalk.bench.deploy), against the dense baseline's times there.
    "prefill_speedup": ("prefill_speedup", "maximize", "x dense (prefill forward at the speed lengths, geometric mean)"),
    "decode_speedup": ("decode_speedup", "maximize", "x dense (one decode step at the speed lengths, geometric mean)"),
}
SPEEDUP_OBJECTIVES = ("prefill_speedup", "decode_speedup")  # need `speed:` (and the dense baseline)


@dataclasses.dataclass(frozen=True)
class Objective:
    """One optimisation axis: `name` in OBJECTIVES, `direction` 'maximize' | 'minimize'."""

    name: str
    direction: str

    @property
    def metric(self) -> str:
        """The MLflow metric (and `TrialRecord.metrics` key) holding this objective's value."""
        return OBJECTIVES[self.name][0]

    @property
    def unit(self) -> str:
        return OBJECTIVES[self.name][2]

    @property
    def maximize(self) -> bool:
        return self.direction == "maximize"


@dataclasses.dataclass
class TrialRecord:
    """One finished (or failed) trial.

    number: trial number within the sweep (0-based, unique); state: 'COMPLETE' | 'FAIL' | 'RUNNING'
    | 'KILLED'; config: the trial's `SketchWalkConfig` (None for the dense baseline; `config_fields`
    is its dict view for tables and plots); metrics: the
    MLflow metrics of the trial's run, e.g. accuracy, accuracy_lo, accuracy_hi (x100, 95% bootstrap),
    prefill_s, prefill_forward_s, decode_ms_per_token, density, attention_tflop, peak_memory_mb;
    run_id: its MLflow run.
    """

    number: int
    state: str
    config: Optional[SketchWalkConfig]
    metrics: dict[str, float]
    run_id: Optional[str] = None
    error: Optional[str] = None

    def __post_init__(self) -> None:
        # The config travels as the object from the sampler to the record (a dict here is how two
        # shapes of one idea start to drift).
        if self.config is not None and not isinstance(self.config, SketchWalkConfig):
            raise TypeError(f"TrialRecord.config: a SketchWalkConfig or None, got {type(self.config).__name__}")

    @property
    def config_fields(self) -> dict[str, Any]:
        """{field: value} of the config ({} for the dense baseline): the view tables and plots use."""
        return {} if self.config is None else self.config.to_dict()

    def value(self, objective: Objective) -> float:
        """The objective's value (NaN when the metric is missing)."""
        v = self.metrics.get(objective.metric)
        return float(v) if v is not None else math.nan

    @property
    def accuracy_interval(self) -> tuple[float, float]:
        """(lo, hi) of the accuracy's 95% interval; (accuracy, accuracy) when no interval was logged."""
        acc = self.metrics.get("accuracy", math.nan)
        return (self.metrics.get("accuracy_lo", acc), self.metrics.get("accuracy_hi", acc))
