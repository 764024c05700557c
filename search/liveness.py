"""When a dead trial was last known alive, so its MLflow run ends then and not when a resume found it.

A trial whose process died (SIGKILL, a lost machine) is only noticed when a later driver run
fails it as stale; ending its MLflow run at that moment would give it the whole downtime as
duration. The evidence, latest wins: its last Optuna heartbeat (every `heartbeat_s` while it ran),
the last metric its MLflow run logged, the run's start.
"""
from __future__ import annotations

import time
from typing import Optional

from tracking import ChildRun, SweepTracker


def heartbeat_age_s(storage, trial_id: int) -> Optional[float]:
    """Seconds since trial `trial_id`'s last Optuna heartbeat, or None (no heartbeat recorded, or
    not an Optuna RDB storage). Measured on the database's own clock: heartbeats are stored in the
    database's time, whose zone need not be ours."""
    storage = getattr(storage, "_backend", storage)  # a study's storage is Optuna's cache around the RDB one
    scoped = getattr(storage, "scoped_session", None)
    if scoped is None:
        return None
    import sqlalchemy
    try:
        from optuna.storages._rdb import models  # Optuna has no public reader for heartbeats
    except ImportError:  # a later Optuna moved it: fall back to MLflow's evidence
        return None

    session = scoped()
    try:
        row = models.TrialHeartbeatModel.where_trial_id(trial_id, session)
        if row is None:
            return None
        now = session.execute(sqlalchemy.select(sqlalchemy.func.now())).scalar_one()
        return (now.replace(tzinfo=None) - row.heartbeat.replace(tzinfo=None)).total_seconds()
    except sqlalchemy.exc.SQLAlchemyError:
        return None
    finally:
        session.rollback()  # read only: end the transaction, keep nothing locked


def last_alive_ms(storage, trial_id: int, tracker: SweepTracker, run: ChildRun) -> Optional[int]:
    """The last moment (ms since the epoch) the trial is known to have been alive: the latest of its
    last heartbeat, its run's last logged metric and its run's start; never after now. None when
    none is known (the run then ends now)."""
    now_ms = int(time.time() * 1000)
    known = [run.start_ms, tracker.last_logged_ms(run.run_id)]
    age = heartbeat_age_s(storage, trial_id)
    if age is not None:
        known.append(now_ms - int(age * 1000))
    known = [t for t in known if t is not None]
    return min(max(known), now_ms) if known else None
