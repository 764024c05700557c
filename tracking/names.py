"""Names the tracking package writes: tag keys, metric/param keys, search-filter literals."""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# Tags that make sweep runs findable again after a driver restart (idempotent re-attach).
TAG_SWEEP_ID = "sketchwalk.sweep_id"
TAG_KEY = "sketchwalk.key"
TAG_ROLE = "sketchwalk.role"
TAG_ERROR = "sketchwalk.error"
TAG_PARENT = "mlflow.parentRunId"  # what the MLflow UI uses to nest child runs

# The MLflow 3 UI opens an experiment on its GenAI "Overview" (traces, an assistant) unless the
# experiment says it holds model-development runs; with this kind it opens on the runs table. The
# values are the UI's (mlflow/server/js: "genai_development" | "custom_model_development"; an
# "_inferred" suffix is the UI's own guess, which an explicit kind overrides).
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# Tags the sweep service sets on its runs (search/, ablations/): one home for every name, so a
# reader of MLflow and the code that writes it cannot disagree on a spelling.
TAG_TRIAL_NUMBER = "sketchwalk.trial_number"
TAG_CONFIG_HASH = "sketchwalk.config_hash"
TAG_RETRY_OF = "sketchwalk.retry_of"  # the interrupted trial an Optuna retry re-runs
TAG_RAY_TRIAL_ID = "sketchwalk.ray_trial_id"
TAG_DEVICE = "sketchwalk.device"
TAG_DTYPE = "sketchwalk.dtype"
TAG_OBJECTIVES = "sketchwalk.objectives"
TAG_BACKEND = "sketchwalk.backend"
TAG_BUDGET_TRIALS = "sketchwalk.budget.trials"
TAG_BUDGET_WALL_TIME_S = "sketchwalk.budget.wall_time_s"
TAG_CONCURRENCY = "sketchwalk.concurrency"
TAG_VARIANT = "sketchwalk.variant"
TAG_VARIANT_GROUP = "sketchwalk.variant_group"
TAG_WORKER_HOST = "sketchwalk.worker.host"
TAG_WORKER_PID = "sketchwalk.worker.pid"
TAG_WORKER_GPUS = "sketchwalk.worker.gpus"
TAG_WORKER_GPU_SHARE = "sketchwalk.worker.gpu_share"

TAG_STOP_REASON = "sketchwalk.stop_reason"  # why the trial phase ended (search.launch.stop_reason)
TAG_NOTES = "sketchwalk.notes"  # the analysis' notes (nothing feasible, noise, no export)
TAG_FRONT_FEASIBLE = "sketchwalk.front_feasible"

ROLE_SWEEP = "sweep"
CHILD_ROLES = ("trial", "baseline")

# Same character class MLflow validates metric/param/tag names with on POSIX
# (mlflow.utils.validation.validate_param_and_metric_name): \w is Unicode-aware there too.
_REJECTED = re.compile(r"[^/\w.\- :]")


def sanitize_key(key: object) -> str:
    """str(key) with every character MLflow rejects in metric/param/tag names replaced by "_"."""
    return _REJECTED.sub("_", str(key))


def metric_key(*parts: object) -> str:
    """Join `parts` (str()-ed) with "." and sanitise, e.g. ("acc", "niah_single_1", 4096) ->
    "acc.niah_single_1.4096" and ("acc", "a@b") -> "acc.a_b". Raises ValueError if empty."""
    key = sanitize_key(".".join(str(p) for p in parts))
    if not key:
        raise ValueError("metric_key needs at least one non-empty part")
    return key


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> one level, keys joined with "." ({"a": {"b": 1}} -> {"a.b": 1}).
    Leaf values are returned unchanged; keys are not sanitised here."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, name))
        else:
            out[name] = v
    return out


def filter_literal(value: str, field: str) -> str:
    """`value` as a single-quoted literal for an MLflow search filter string.

    MLflow's filter grammar has no escape for quotes, so a value containing a single quote (or a
    backslash, which the SQL backends may interpret) is rejected with ValueError naming `field`
    rather than silently matching the wrong runs."""
    value = str(value)
    if "'" in value or "\\" in value:
        raise ValueError(f"{field} must not contain a single quote or backslash: {value!r}")
    return f"'{value}'"
