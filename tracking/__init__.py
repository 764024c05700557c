"""MLflow tracking for SketchWalk sweeps: store setup, retrying, key names and SweepTracker.

Depends only on MLflow, requests and the standard library (no other package of this repo).
"""
from tracking.credentials import redact_uri
from tracking.names import metric_key
from tracking.retry import TrackingError, retrying
from tracking.store import init_store, resolve_tracking_uri
from tracking.tracker import ChildRun, SweepTracker

__all__ = [
    "ChildRun",
    "SweepTracker",
    "TrackingError",
    "init_store",
    "metric_key",
    "redact_uri",
    "resolve_tracking_uri",
    "retrying",
]
