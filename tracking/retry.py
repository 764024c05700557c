"""Bounded retrying of MLflow calls, and the one error type the tracking package raises."""
from __future__ import annotations

import logging
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
            _log.warning(
                "%s failed (attempt %d/%d, retrying in %.2f s): %s: %s",
                what, i + 1, attempts, delay, type(exc).__name__, exc,
            )
            time.sleep(delay)
    raise TrackingError(
        f"{what} failed after {attempts} attempts: {type(last).__name__}: {last}"
    ) from last
