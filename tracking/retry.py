"""Bounded retrying of MLflow calls, and the one error type the tracking package raises."""
from __future__ import annotations

import logging
import os
import random
import time
from typing import Any, Callable, TypeVar

import requests
from mlflow.exceptions import MlflowException

try:  # MLflow's SQL stores need SQLAlchemy, but a skinny MLflow talking HTTP may not have it.
    from sqlalchemy.exc import OperationalError as _SqlOperationalError
except ImportError:  # pragma: no cover - depends on the installed extras
    _SqlOperationalError = None

_log = logging.getLogger(__name__)
T = TypeVar("T")

# MlflowException error codes are HTTP-like: 4xx means "the request itself is wrong" (unknown run,
# bad parameter, immutable param overwritten), so repeating it cannot help. 429 is the exception:
# rate limiting clears up by waiting.
_RETRYABLE_CLIENT_STATUS = {429}
_MAX_DELAY_S = 30.0


class TrackingError(RuntimeError):
    """A tracking operation failed for good; the message names the tracking URI and the step."""


# MLflow's HTTP client retries on its own (7 times, exponential backoff from 2 s, 120 s timeout per
# request: minutes per call), and each of our attempts below would sit through all of that: a lost
# server hung a sweep silently for over 15 minutes. Bounded per call instead, so our attempts, with
# their console lines, decide the total (about two minutes at most). A user's own values win.
MLFLOW_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def bound_mlflow_http() -> None:
    """Set MLFLOW_HTTP_ENV's defaults in this process (and so in the workers it starts), unless set."""
    for key, value in MLFLOW_HTTP_ENV.items():
        os.environ.setdefault(key, value)


def _unreachable(exc: BaseException) -> bool:
    """True for errors that mean the server did not answer (as opposed to a server-side error)."""
    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return True
    text = str(exc)
    return isinstance(exc, MlflowException) and ("Max retries exceeded" in text or "Connection" in text
                                                 or "timed out" in text)


def is_transient(exc: BaseException) -> bool:
    """True if `exc` is worth retrying: server-side/5xx or rate-limit MlflowException, a network
    error or timeout from requests, or SQLAlchemy's OperationalError (e.g. SQLite "database is
    locked" while another process holds the write lock)."""
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return status >= 500 or status in _RETRYABLE_CLIENT_STATUS
    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return True
    return _SqlOperationalError is not None and isinstance(exc, _SqlOperationalError)


def retrying(
    fn: Callable[..., T],
    *args: Any,
    attempts: int = 5,
    base_delay_s: float = 0.5,
    what: str = "MLflow call",
    **kwargs: Any,
) -> T:
    """Call ``fn(*args, **kwargs)`` and return its value, retrying transient errors.

    Up to `attempts` calls in all; before retry i (0-based) it sleeps
    ``base_delay_s * 2**i`` seconds (capped at 30 s) plus up to 25 % jitter, so parallel workers
    that collided on a lock do not collide again in lock step. Non-transient errors (see
    `is_transient`) propagate unchanged from the first call. When every attempt failed with a
    transient error, raises TrackingError naming `what` and the last error (chained).
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    last: BaseException | None = None
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - classified right below, never swallowed
            if not is_transient(exc):
                raise
            last = exc
            if i == attempts - 1:
                break
            delay = min(base_delay_s * 2**i, _MAX_DELAY_S)
            delay += random.uniform(0.0, 0.25 * delay)
            if _unreachable(exc):
                _log.warning(
                    "the MLflow server is unreachable: %s failed (attempt %d/%d); retrying in %.1f s "
                    "(%s: %s)", what, i + 1, attempts, delay, type(exc).__name__, str(exc)[:200],
                )
            else:
                _log.warning(
                    "%s failed (attempt %d/%d, retrying in %.2f s): %s: %s",
                    what, i + 1, attempts, delay, type(exc).__name__, exc,
                )
            time.sleep(delay)
    raise TrackingError(
        f"{what} failed after {attempts} attempts: {type(last).__name__}: {last}"
    ) from last
