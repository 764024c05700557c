"""What both drivers share around the trial function: the sweep's directory, MLflow parent run,
dense-baseline run, per-trial child runs (keyed by sweep id + trial number, so a resumed sweep
re-attaches instead of duplicating), and the analysis at the end.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import yaml

from sketchwalk.config import ConfigError, SketchWalkConfig
from sketchwalk.evaluation import EvalResult
from tracking import ChildRun, SweepTracker, init_store, resolve_tracking_uri
from tracking.names import (TAG_BACKEND, TAG_BUDGET_TRIALS, TAG_BUDGET_WALL_TIME_S, TAG_CONCURRENCY, TAG_CONFIG_HASH,
                            TAG_DEVICE, TAG_DTYPE, TAG_ERROR, TAG_OBJECTIVES, TAG_TRIAL_NUMBER)

from .records import Objective, TrialRecord
from .spec import SweepSpec, SweepSpecError, check_sweep_id, spec_to_yaml, variant_config
from .trial import objective_values

_log = logging.getLogger(__name__)
BASELINE_KEY = "baseline-dense"


def trial_key(number: int) -> str:
    """The MLflow key of trial `number` within its sweep (zero-padded so keys sort by number)."""
    return f"trial-{number:05d}"


def default_storage(workdir: Path) -> str:
    """The embedded Optuna RDB storage: a SQLite file next to the MLflow store."""
    path = (workdir / "runs" / "optuna.db").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


@dataclasses.dataclass
class SweepSession:
    """One sweep's identity and stores, shared by its driver and (serialised) by its workers."""

    spec: SweepSpec
    sweep_id: str
    workdir: Path
    tracking_uri: str
    experiment_id: str
    objectives: list[Objective]
    parent_run_id: Optional[str] = None

    @property
    def sweep_dir(self) -> Path:
        """`runs/sweeps/<sweep id>/`: the resolved spec, the Pareto table/plots, the export."""
        return self.workdir / "runs" / "sweeps" / self.sweep_id

    def tracker(self) -> SweepTracker:
        """A tracker for this sweep (cheap; make one per process or thread)."""
        return SweepTracker(self.tracking_uri, self.experiment_id, self.sweep_id)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for handing the session to Ray workers."""
        return {"spec": self.spec.model_dump(mode="json"), "sweep_id": self.sweep_id, "workdir": str(self.workdir),
                "tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id,
                "objectives": [dataclasses.asdict(o) for o in self.objectives], "parent_run_id": self.parent_run_id}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SweepSession":
        return cls(SweepSpec.model_validate(d["spec"]), d["sweep_id"], Path(d["workdir"]), d["tracking_uri"],
                   d["experiment_id"], [Objective(**o) for o in d["objectives"]], d.get("parent_run_id"))


def refuse_existing(sweep_id: str, workdir: Path) -> None:
    """SweepSpecError naming --sweep-id if a sweep `sweep_id` already exists under `workdir`'s
    runs/sweeps: a new sweep would append its trials to it and overwrite its sweep.yaml."""
    if (workdir / "runs" / "sweeps" / sweep_id).exists():
        raise SweepSpecError("--sweep-id", f"a sweep {sweep_id!r} already exists under {workdir / 'runs' / 'sweeps'}; "
                                           f"continue it with `--resume {sweep_id}` or pick another id")


def open_session(spec: SweepSpec, sweep_id: str, objectives: list[Objective], *, workdir: Path,
                 tracking_uri: Optional[str] = None, device: str = "cpu", new: bool = False) -> SweepSession:
    """Initialise the MLflow store and experiment once (here, before any worker starts), find or
    create the sweep's parent run, and write the resolved spec into the sweep directory. `new`: a
    new sweep, refused (SweepSpecError, nothing written) if MLflow already holds a sweep of that id."""
    uri = resolve_tracking_uri(tracking_uri or spec.tracking.uri, workdir)
    exp = init_store(uri, spec.tracking.experiment)
    session = SweepSession(spec, sweep_id, workdir.resolve(), uri, exp, objectives)
    tracker = session.tracker()
    if new and tracker.find_parent() is not None:
        raise SweepSpecError("--sweep-id", f"MLflow at {uri} already holds a sweep {sweep_id!r}; continue it with "
                                           f"`--resume {sweep_id}` or pick another id")
    session.sweep_dir.mkdir(parents=True, exist_ok=True)
    (session.sweep_dir / "sweep.yaml").write_text(spec_to_yaml(spec))
    # Params are what makes trials comparable (immutable in MLflow); the budget and concurrency
    # are run control that a resume may change (`--resume ID --trials N`), so they are tags.
    params = {"model": spec.model, "suite": spec.suite, "samples": spec.samples, "backend": spec.backend,
              "sampler": spec.sampler, "seed": spec.seed, "attention_backend": spec.attention_backend,
              "max_accuracy_drop": spec.constraints.max_accuracy_drop}
    tags = {TAG_OBJECTIVES: ",".join(f"{o.name}:{o.direction}" for o in objectives),
            TAG_DEVICE: device, TAG_BACKEND: spec.backend,
            TAG_BUDGET_TRIALS: spec.budget.trials, TAG_BUDGET_WALL_TIME_S: spec.budget.wall_time_s,
            TAG_CONCURRENCY: spec.concurrency,
            "mlflow.note.content": f"Sketch&Walk sweep `{sweep_id}`: objectives "
                                   + ", ".join(f"{o.direction} {o.name} ({o.unit})" for o in objectives)}
    session.parent_run_id = tracker.parent_run(sweep_id, params=params, tags=tags)
    tracker.log_text(session.parent_run_id, spec_to_yaml(spec), "sweep.yaml")
    write_json(session.sweep_dir / SESSION_FILE, session.to_dict())
    return session


SESSION_FILE = "session.json"


@contextlib.contextmanager
def parent_closed_on_exit(session: SweepSession) -> Iterator[None]:
    """Leave no parent run RUNNING behind: Ctrl-C, SIGTERM (what `timeout` and schedulers send) and
    SystemExit end it KILLED, any other error FAILED with the error, then the exception goes on. A
    resume re-opens it. SIGTERM is turned into SystemExit here (main thread only) so this runs."""
    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except (KeyboardInterrupt, SystemExit) as exc:
        _close_parent(session, "KILLED", f"sweep interrupted ({type(exc).__name__}); continue it with "
                                         f"`sketchwalk sweep --resume {session.sweep_id}`")
        raise
    except BaseException as exc:
        _close_parent(session, "FAILED", error_text(exc))
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _close_parent(session: SweepSession, status: str, error: str) -> None:
    try:
        session.tracker().finish(session.parent_run_id, status, error=error)
    except Exception as exc:  # the store may be what failed: the original error must still surface
        _log.warning("could not mark sweep %s %s in MLflow: %s", session.sweep_id, status, exc)


def load_session(sweep_id: str, workdir: Path) -> SweepSession:
    """The session of an earlier sweep from `runs/sweeps/<id>/session.json` (for resume, pareto, export);
    SweepSpecError for an id that is no valid sweep id (it could name a path outside runs/sweeps)."""
    check_sweep_id(sweep_id, "SWEEP_ID")
    path = workdir / "runs" / "sweeps" / sweep_id / SESSION_FILE
    if not path.is_file():
        known = sorted(p.parent.name for p in (workdir / "runs" / "sweeps").glob(f"*/{SESSION_FILE}"))
        raise FileNotFoundError(f"no sweep {sweep_id!r} under {workdir / 'runs' / 'sweeps'} (known: {known or 'none'})")
    return SweepSession.from_dict(json.loads(path.read_text()))


def log_baseline(session: SweepSession, baseline: EvalResult, metrics: dict[str, float],
                 tags: Optional[dict[str, str]] = None, started_at: Optional[float] = None) -> str:
    """Log the dense baseline as its own child run, once per sweep: `metrics` (`result_metrics` of
    it, plus the loading worker's `worker_load_s` and the evaluation's `eval_s`) and `tags` (its
    `worker_tags`). `started_at` (epoch s): when the evaluation began, the run's start time, so its
    MLflow duration is the evaluation's (the run is only created once the result exists). A resume
    finds it FINISHED and leaves it as it is, the worker that made it included."""
    tracker = session.tracker()
    run = tracker.child_run(BASELINE_KEY, role="baseline", name="dense baseline",
                            params={"attention": "dense", "model": session.spec.model, "suite": session.spec.suite},
                            start_ms=None if started_at is None else int(started_at * 1000))
    if run.status != "FINISHED":
        tracker.set_tags(run.run_id, tags or {})
        tracker.log_metrics(run.run_id, metrics)
        tracker.log_text(run.run_id, baseline.to_json(), "eval.json")
        tracker.finish(run.run_id)
    return run.run_id


def recorded_baseline(session: SweepSession) -> Optional[tuple[EvalResult, str]]:
    """The dense baseline a resumed sweep already logged, with its run id: (EvalResult from the
    run's eval.json, run id), or None when there is no FINISHED baseline run. Its trials go on
    comparing against this result instead of a fresh evaluation (another machine, another cache
    would not reproduce it bit for bit)."""
    tracker = session.tracker()
    run = tracker.find_child(BASELINE_KEY)
    if run is None or run.status != "FINISHED":
        return None
    return EvalResult.from_dict(json.loads(tracker.read_text(run.run_id, "eval.json"))), run.run_id


DENSE = "dense"  # config hash and `attention` param of a dense trial (a fixed variant with config None)


def config_hash(config: Optional[SketchWalkConfig]) -> str:
    """A trial's dedup key: `config.short_hash()`, or "dense" for dense attention (config None)."""
    return DENSE if config is None else config.short_hash()


INVALID = "invalid"  # config hash of a trial whose sampled params make no valid config


#: Short names of SketchWalkConfig fields in run names (others use the field name).
_SHORT = {"block_size": "b", "sketch_dim": "r", "density": "d", "top_k": "k", "sparsity_exponent": "s",
          "skip_layers": "skip", "walk": "walk"}


def trial_run_name(number: int, config: Optional[SketchWalkConfig], spec: SweepSpec) -> str:
    """The trial's MLflow run name: its number and the values of the searched fields, e.g.
    "t3 b64 r32 d0.42 s8.1 skip2", so the runs table and chart legends tell trials apart by config
    (a fixed-variant sweep: "t3 walk=none", the variant's name; dense: "t3 dense")."""
    if spec.variants:
        name = next((n for n in spec.variants if variant_config(spec, n) == config), None)
        return f"t{number} {name or ('dense' if config is None else config.short_hash())}"
    if config is None:
        return f"t{number} dense"
    values = config.to_dict()
    parts = []
    for field in spec.space:
        v = values.get(field)
        text = f"{v:.3g}" if isinstance(v, float) else str(v)
        short = _SHORT.get(field)
        parts.append(f"{short}{text}" if short else f"{field}={text}")
    return " ".join([f"t{number}", *parts])


def start_trial(session: SweepSession, number: int, config: Optional[SketchWalkConfig], tracker: SweepTracker,
                extra_tags: Optional[dict[str, Any]] = None, params: Optional[dict[str, Any]] = None) -> ChildRun:
    """The trial's MLflow child run (created, or re-attached on resume), with the full config as params
    (config None: a dense variant, logged as param attention=dense). `params`: the raw sampled params
    of a trial whose config was refused; they are logged instead, so the failed run says what was tried."""
    chash = INVALID if params is not None else config_hash(config)
    tags = {TAG_TRIAL_NUMBER: number, TAG_CONFIG_HASH: chash, **(extra_tags or {})}
    if params is not None:
        logged, text = dict(params), f"# sampled params (not a valid config)\n{yaml.safe_dump(dict(params))}"
    elif config is not None:
        logged, text = config.to_dict(), config.to_yaml()
    else:
        logged, text = {"attention": DENSE}, "sketchwalk: null  # dense attention\n"
    name = f"t{number} invalid" if params is not None else trial_run_name(number, config, session.spec)
    run = tracker.child_run(trial_key(number), role="trial", name=name, params=logged, tags=tags)
    # When this attempt began (epoch s): a re-attached run keeps its first attempt's start time.
    tracker.log_metrics(run.run_id, {"started_at": time.time()})
    tracker.log_text(run.run_id, text, "config.yaml")
    return run


def finish_trial(session: SweepSession, tracker: SweepTracker, run: ChildRun, result: EvalResult,
                 metrics: dict[str, float], device: str) -> None:
    """Metrics and the evaluation JSON to the trial's run, then FINISHED (the last write: a run that
    reads FINISHED holds everything, which is what resume relies on)."""
    tracker.log_metrics(run.run_id, metrics)
    tracker.log_text(run.run_id, result.to_json(), "eval.json")
    tracker.set_tags(run.run_id, {TAG_DEVICE: device, TAG_DTYPE: result.dtype})
    tracker.finish(run.run_id, "FINISHED")


PENDING_DIR = "pending"  # under the sweep directory: finished trials MLflow could not take yet


def keep_pending(session: SweepSession, number: int, result: EvalResult, metrics: dict[str, float],
                 device: str) -> Path:
    """Write a finished trial's numbers to `runs/sweeps/<id>/pending/trial-NNNNN.json` when MLflow
    cannot take them (server lost past the retry bound): `deliver_pending` hands them over later."""
    data = {"number": number, "metrics": metrics, "result": result.to_dict(), "device": device}
    return write_json(session.sweep_dir / PENDING_DIR / f"{trial_key(number)}.json", data)


def deliver_pending(session: SweepSession) -> list[int]:
    """Log every kept trial (see `keep_pending`) to its MLflow run and mark it FINISHED, deleting each
    file once delivered; returns their numbers. Called when a sweep (re)opens."""
    tracker, done = session.tracker(), []
    for path in sorted((session.sweep_dir / PENDING_DIR).glob("trial-*.json")):
        data = json.loads(path.read_text())
        run = tracker.find_child(trial_key(int(data["number"])))
        if run is None:  # the run is created before the trial starts; without it there is nothing to attach to
            continue
        if run.status != "FINISHED":
            finish_trial(session, tracker, run, EvalResult.from_dict(data["result"]), data["metrics"], data["device"])
        path.unlink()
        done.append(int(data["number"]))
    return done


def recorded_trial(tracker: SweepTracker, number: int, objectives: list[Objective]) -> Optional[ChildRun]:
    """Trial `number`'s run if it is FINISHED with every objective value recorded (the process died,
    or a driver's own checkpoint missed it, between logging and telling the sampler); else None. A
    resumed driver completes such a trial from MLflow instead of re-running it."""
    run = tracker.find_child(trial_key(number))
    if run is None or run.status != "FINISHED" or objective_values(run.metrics, objectives) is None:
        return None
    return run


def error_text(exc: BaseException) -> str:
    """`Type: message` first, then the full traceback, as a failed trial's run and study record it
    (the first line first: the run's error tag keeps only the first 500 characters)."""
    return f"{type(exc).__name__}: {exc}\n\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def fail_trial(tracker: SweepTracker, run: Optional[ChildRun], exc: BaseException, status: str = "FAILED") -> str:
    """Record a failed trial in MLflow (status + error text); returns the error text."""
    text = error_text(exc)
    if run is not None:
        tracker.finish(run.run_id, status, error=text)
    return text


def load_records(session: SweepSession, runs: Optional[list[ChildRun]] = None
                 ) -> tuple[list[TrialRecord], Optional[TrialRecord]]:
    """All trials of the sweep as TrialRecords, plus the dense baseline (or None); from `runs` (the
    sweep's child runs, already read) or else read from MLflow."""
    records, baseline = [], None
    for run in session.tracker().children() if runs is None else runs:
        state = {"FINISHED": "COMPLETE", "FAILED": "FAIL"}.get(run.status, run.status)
        if run.role == "baseline":
            baseline = TrialRecord(-1, state, None, dict(run.metrics), run.run_id)
            continue
        number = int(run.tags.get(TAG_TRIAL_NUMBER, run.key.rsplit("-", 1)[-1]))
        config = None if run.params.get("attention") == DENSE else _config_from_params(run.params)
        records.append(TrialRecord(number, state, config, dict(run.metrics), run.run_id,
                                   run.tags.get(TAG_ERROR)))
    records.sort(key=lambda r: r.number)
    return records, baseline


def _config_from_params(params: dict[str, str]) -> Optional[SketchWalkConfig]:
    """The trial's config from its MLflow params, or None if they make no valid config."""
    try:
        return SketchWalkConfig.from_params(params)
    except (ConfigError, TypeError, ValueError):  # e.g. the raw params of a refused trial
        return None


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
    return path
