"""How a sweep used its workers, read from MLflow alone: trials per hour over the trial phase and,
per worker process, the trials it ran, its model loads and its load vs evaluation time.

Every trial run carries its worker's tags (`trial.worker_tags`) and cost metrics (`eval_s`,
`worker_load_s`, `worker_model_loads`), so this works the same for both backends and for a store
brought back from another machine.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from tracking import ChildRun

from .trial import WORKER_GPU_SHARE, WORKER_GPUS, WORKER_HOST, WORKER_PID


@dataclasses.dataclass
class WorkerUse:
    """One worker process: `trials` it finished or failed, `model_loads` (the most it reported: 1 when
    it kept its model), `load_s` (its one-time load, s), `eval_s` (its trials' evaluation time, s)."""

    host: str
    pid: str
    gpus: str  # CUDA_VISIBLE_DEVICES as the worker saw it ("" unset, "-" no CUDA)
    role: str  # "trial" | "baseline"
    trials: int
    model_loads: int
    load_s: float
    eval_s: Optional[float]  # None: not recorded (a baseline logged by an older version)
    gpu_share: str = ""  # GPUs the scheduler assigned it ("0.5": two trials per GPU; "" unknown)


@dataclasses.dataclass
class Throughput:
    """The trial phase of a sweep.

    span_s: the time trial workers were up: the union over worker processes of [their first trial's
    start, their last trial's end] (s); a killed and resumed sweep's downtime is not in it, a running
    sweep's gaps between trials are. wall_s: first trial start -> last trial end, downtime included.
    trials_per_hour: complete trials / span_s * 3600; occupancy: summed trial durations / (span_s *
    slots), 1.0 = every slot (concurrency: trials at once) was busy all the time.
    """

    complete: int
    failed: int
    span_s: float
    wall_s: float
    trials_per_hour: float
    occupancy: float
    workers: list[WorkerUse]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def trial_interval(run: ChildRun) -> tuple[float, float]:
    """(start, end) of the run's last attempt, epoch s: start from its `started_at` metric, else its
    end minus `eval_s` (a re-attached run keeps its first start time), else the run's start."""
    end = run.end_ms / 1000.0
    if "started_at" in run.metrics:
        return min(run.metrics["started_at"], end), end
    if "eval_s" in run.metrics:
        return max(run.start_ms / 1000.0, end - run.metrics["eval_s"]), end
    return run.start_ms / 1000.0, end


def sweep_throughput(runs: list[ChildRun], slots: int = 1) -> Optional[Throughput]:
    """Throughput and worker use of a sweep's child runs (trials and baseline), `slots` trials at
    once; None before any trial run has ended. Runs still RUNNING or KILLED (interrupted) count in
    no total."""
    ended = [r for r in runs if r.role == "trial" and r.start_ms is not None and r.end_ms is not None
             and r.status in ("FINISHED", "FAILED")]
    if not ended:
        return None
    complete = sum(r.status == "FINISHED" for r in ended)
    intervals = {r.run_id: trial_interval(r) for r in ended}
    workers: dict[tuple, WorkerUse] = {}
    windows: dict[tuple, list[float]] = {}
    for r in ended + [r for r in runs if r.role == "baseline" and r.status == "FINISHED"]:
        key = (r.tags.get(WORKER_HOST, "?"), r.tags.get(WORKER_PID, "?"), r.role)
        w = workers.setdefault(key, WorkerUse(key[0], key[1], r.tags.get(WORKER_GPUS, "?"), r.role, 0, 0, 0.0, 0.0,
                                              r.tags.get(WORKER_GPU_SHARE, "")))
        w.load_s = max(w.load_s, float(r.metrics.get("worker_load_s", 0.0)))
        w.model_loads = max(w.model_loads, int(r.metrics.get("worker_model_loads", 1)))
        if r.role == "baseline":
            # None: a baseline logged before eval_s was recorded (shown as "-", not as 0 s).
            w.eval_s = r.metrics.get("eval_s")
        if r.role == "trial":
            w.trials += 1
            w.eval_s += float(r.metrics.get("eval_s", 0.0))
            start, end = intervals[r.run_id]
            win = windows.setdefault(key, [start, end])
            win[0], win[1] = min(win[0], start), max(win[1], end)
    span_s = max(_union_length(list(windows.values())), 1e-3)
    wall_s = max(e for _, e in intervals.values()) - min(s for s, _ in intervals.values())
    busy_s = sum(e - s for s, e in intervals.values())
    return Throughput(complete, sum(r.status == "FAILED" for r in ended), span_s, wall_s,
                      complete / span_s * 3600.0, busy_s / (span_s * max(1, slots)),
                      sorted(workers.values(), key=lambda w: (w.role, w.host, w.pid)))


def _union_length(intervals: list[list[float]]) -> float:
    """Total length covered by [start, end] intervals (overlaps counted once)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total
