"""`sketchwalk store-check SWEEP_ID`: audit what a sweep left in its MLflow store.

What a user relies on after a sweep (killed, resumed, on any backend): one parent run; one child
run per trial key and one dense baseline, all nested under the parent; no key twice; every
FINISHED run holding what resume and analysis read (its metrics, `eval.json`, and for a trial its
`config.yaml`); nothing left RUNNING once the parent has ended; and, with the Optuna backend, as
many trial runs as the study has trials. The report is a table and a JSON (`store_check.json` in
the sweep directory, or `--out`); the exit code is 0 when the store is complete, 1 otherwise.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Optional

from tracking.names import ROLE_SWEEP, TAG_PARENT, TAG_ROLE

from .session import SweepSession, default_storage

REQUIRED = {"trial": ("config.yaml", "eval.json"), "baseline": ("eval.json",)}


@dataclasses.dataclass
class StoreReport:
    """The audit of one sweep's store: counts, the problems found (empty = complete)."""

    sweep_id: str
    tracking_uri: str
    parents: int
    parent_status: Optional[str]
    trial_runs: int
    baseline_runs: int
    status_counts: dict[str, int]
    study_trials: Optional[int]  # Optuna backend: trials in the study; None otherwise or unreadable
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ok": self.ok}


def _study_trials(session: SweepSession) -> Optional[int]:
    """Trials of the sweep's Optuna study (None for Ray, or when the storage cannot be read)."""
    if session.spec.backend != "optuna":
        return None
    import optuna

    try:
        storage = session.spec.storage or default_storage(session.workdir)
        return len(optuna.load_study(study_name=session.sweep_id, storage=storage).trials)
    except Exception:  # a missing or foreign storage: reported as unknown, not as a crash
        return None


def check_store(session: SweepSession) -> StoreReport:
    """Read every run of the sweep and list what a complete store would not show."""
    tracker = session.tracker()
    runs = tracker.all_runs()
    parents = [r for r in runs if r.tags.get(TAG_ROLE) == ROLE_SWEEP]
    children = [r for r in runs if r.tags.get(TAG_ROLE) != ROLE_SWEEP]
    problems: list[str] = []
    if len(parents) != 1:
        problems.append(f"{len(parents)} parent runs (expected 1)")
    parent = parents[0] if parents else None
    keys = collections.Counter(r.key for r in children)
    for key, n in sorted(keys.items()):
        if n > 1:
            problems.append(f"key {key!r} has {n} runs (duplicates)")
    trials = [r for r in children if r.role == "trial"]
    baselines = [r for r in children if r.role == "baseline"]
    if len(baselines) > 1:
        problems.append(f"{len(baselines)} dense-baseline runs (expected at most 1)")
    for r in children:
        if r.role not in REQUIRED:
            problems.append(f"run {r.run_id} has no known role ({r.role!r})")
            continue
        if parent is not None and r.tags.get(TAG_PARENT) != parent.run_id:
            problems.append(f"{r.key}: not nested under the parent run")
        if r.status == "FINISHED":
            missing = [a for a in REQUIRED[r.role] if a not in tracker.artifact_names(r.run_id)]
            if missing:
                problems.append(f"{r.key}: FINISHED without {', '.join(missing)}")
            if not r.metrics:
                problems.append(f"{r.key}: FINISHED without metrics")
        elif r.status == "RUNNING" and parent is not None and parent.status != "RUNNING":
            problems.append(f"{r.key}: still RUNNING although the sweep ended ({parent.status})")
    numbers = sorted(int(r.key.split("-")[-1]) for r in trials if r.key.split("-")[-1].isdigit())
    if numbers and numbers != list(range(numbers[-1] + 1)):
        gaps = sorted(set(range(numbers[-1] + 1)) - set(numbers))
        problems.append(f"trial numbers missing from the store: {gaps[:20]}")
    study = _study_trials(session)
    if study is not None and study != len(trials):
        problems.append(f"the Optuna study has {study} trials, the store {len(trials)} trial runs")
    status = dict(collections.Counter(r.status for r in trials))
    return StoreReport(session.sweep_id, session.tracking_uri, len(parents), parent.status if parent else None,
                       len(trials), len(baselines), status, study, problems)
