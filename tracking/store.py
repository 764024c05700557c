"""Where runs are recorded: resolving the tracking URI and preparing the store once per sweep."""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import requests
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient

from tracking.credentials import redact_uri, take_credentials
from tracking.names import EXPERIMENT_KIND, TAG_EXPERIMENT_KIND
from tracking.retry import TrackingError, bound_mlflow_http, retrying

_log = logging.getLogger(__name__)

_SQLITE = "sqlite:///"
_PASS_THROUGH = ("http://", "https://", "postgresql://", "postgresql+psycopg2://")
_ALLOWED_FORMS = (
    "unset (-> sqlite:///<workdir>/runs/mlflow.db), sqlite:///<path>.db, a file path ending in "
    ".db, http(s)://<host>[:port], postgresql[+psycopg2]://..."
)
# INFO lines MLflow/alembic print while creating a fresh SQLite schema: pure noise for a sweep.
# Only their INFO is muted; warnings and errors still get through.
_NOISY_INIT_LOGGERS = ("mlflow.store.db.utils", "alembic")


def resolve_tracking_uri(uri: str | None, workdir: str | os.PathLike = ".") -> str:
    """Config value `tracking.uri` -> the URI every process of the sweep uses.

    None (or blank) -> "sqlite:///<absolute workdir>/runs/mlflow.db", creating runs/. Relative
    SQLite paths (``sqlite:///rel.db`` or a bare ``*.db`` path) are made absolute against
    `workdir`, because Ray workers run in other directories and would otherwise open a different
    database. http(s) and postgresql URIs pass through unchanged. Anything else (including
    in-memory SQLite, which each process would see empty) -> TrackingError naming `tracking.uri`.
    """
    base = Path(workdir).expanduser().resolve()
    if uri is None or not str(uri).strip():
        runs = base / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        return _SQLITE + str(runs / "mlflow.db")
    uri = str(uri).strip()
    if uri.startswith(_PASS_THROUGH):
        # user:password@ leave the URI here for the environment (see tracking.credentials), so no
        # process prints or stores them.
        return take_credentials(uri)
    if uri.startswith(_SQLITE):
        path, sep, query = uri[len(_SQLITE):].partition("?")
    elif "://" not in uri and uri.split("?")[0].endswith(".db"):
        path, sep, query = uri.partition("?")
    else:
        raise TrackingError(
            f"tracking.uri {redact_uri(uri)!r} is not supported; allowed forms: {_ALLOWED_FORMS}"
        )
    if not path or path == ":memory:" or "mode=memory" in query:
        raise TrackingError(
            f"tracking.uri {uri!r}: an in-memory SQLite store is private to one process and cannot "
            f"hold a sweep; allowed forms: {_ALLOWED_FORMS}"
        )
    full = Path(path).expanduser()
    if not full.is_absolute():
        full = base / full
    return _SQLITE + os.path.normpath(full) + sep + query


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other schemes). Raises TrackingError
    for a relative path: every process must open the same file, whatever its cwd."""
    if not uri.startswith(_SQLITE):
        return None
    path = Path(uri[len(_SQLITE):].partition("?")[0])
    if not path.is_absolute():
        raise TrackingError(
            f"tracking URI {uri!r} has a relative SQLite path; pass it through "
            "resolve_tracking_uri() first so that all workers open the same database"
        )
    return path


def check_supported(uri: str) -> None:
    """Raise TrackingError unless `uri` is one resolve_tracking_uri() can return."""
    if not (uri.startswith(_PASS_THROUGH) or sqlite_path(uri) is not None):
        raise TrackingError(
            f"tracking URI {redact_uri(uri)!r} is not supported; allowed forms: {_ALLOWED_FORMS}"
        )


@contextlib.contextmanager
def _quiet_schema_init() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _NOISY_INIT_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        if lg.getEffectiveLevel() < logging.WARNING:
            lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _check_http(uri: str, timeout_s: float) -> None:
    url = uri.rstrip("/") + "/health"
    try:
        resp = requests.get(url, timeout=timeout_s)
    except requests.exceptions.RequestException as exc:
        raise TrackingError(
            f"MLflow tracking server at {uri} is unreachable: GET {url} failed within "
            f"{timeout_s:g} s: {type(exc).__name__}: {exc}"
        ) from exc
    if resp.status_code != 200:
        raise TrackingError(
            f"MLflow tracking server at {uri} is unreachable: GET {url} returned HTTP "
            f"{resp.status_code}: {resp.text[:200]!r}"
        )


def _check_sqlite(uri: str, db: Path) -> None:
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrackingError(
            f"SQLite tracking store {uri}: cannot create directory {db.parent}: {exc}"
        ) from exc
    if not os.access(db.parent, os.W_OK | os.X_OK):
        # SQLite writes journal/WAL files beside the database, so the directory must be writable.
        raise TrackingError(f"SQLite tracking store {uri}: directory {db.parent} is not writable")
    if db.exists() and not os.access(db, os.W_OK):
        raise TrackingError(f"SQLite tracking store {uri}: database file {db} is not writable")


def _artifact_location(db: Path | None, artifact_root: str | None) -> str | None:
    if artifact_root is not None:
        if "://" in artifact_root:
            return artifact_root
        return Path(artifact_root).expanduser().resolve().as_uri()
    if db is not None:
        return (db.parent / "artifacts").as_uri()
    return None  # server / database default


def init_store(
    uri: str,
    experiment: str,
    *,
    artifact_root: str | None = None,
    timeout_s: float = 10.0,
) -> str:
    """Prepare the store once, in the sweep driver, before any worker starts; returns the
    experiment id (a string). Idempotent.

    Parallel first writers race on SQLite's schema migration, hence a single call up front.
    Checks reachability (http(s): GET <uri>/health within `timeout_s` seconds; sqlite: the
    database directory exists or can be created and is writable), creates the schema and the
    experiment if missing (a deleted experiment of that name is restored) and tags it
    `mlflow.experimentKind = custom_model_development` (the UI then opens on its runs, not on
    the GenAI overview). For sqlite the
    experiment's artifact location defaults to the file URI of "<dir of the db>/artifacts";
    `artifact_root` (path or URI) overrides it. It applies only when the experiment is created.
    Raises TrackingError naming `uri` on failure.
    """
    check_supported(uri)
    db = sqlite_path(uri)
    if db is not None:
        _check_sqlite(uri, db)
    elif uri.startswith(("http://", "https://")):
        bound_mlflow_http()
        _check_http(uri, timeout_s)
    try:
        # Two drivers starting on one fresh SQLite file both run MLflow's schema migration, and the
        # loser leaves it half-migrated for good: the first creates the schema under a file lock,
        # the others wait, then find it complete (MLflow skips a migration that is up to date).
        with _schema_lock(db), _quiet_schema_init():
            if db is not None:
                _refuse_half_migrated(uri, db)
            client = retrying(MlflowClient, tracking_uri=uri, what=f"opening MLflow store {uri}")
            location = _artifact_location(db, artifact_root)
            return _ensure_experiment(client, uri, experiment, location)
    except TrackingError:
        raise
    except Exception as exc:
        if db is not None and "_alembic_tmp_" in str(exc):
            raise TrackingError(_half_migrated(uri, db, str(exc))) from exc
        raise TrackingError(
            f"preparing MLflow store {uri} (experiment {experiment!r}) failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


SCHEMA_LOCK_TIMEOUT_S = 300.0  # a fresh schema takes seconds; minutes means the holder is stuck


@contextlib.contextmanager
def _schema_lock(db: Path | None) -> Iterator[None]:
    """An exclusive file lock `<db>.lock` beside a SQLite store (no-op for servers and databases)."""
    if db is None:
        yield
        return
    from filelock import FileLock, Timeout

    lock = FileLock(str(db) + ".lock")
    try:
        lock.acquire(timeout=SCHEMA_LOCK_TIMEOUT_S)
    except Timeout:
        raise TrackingError(f"SQLite tracking store {db}: another process has held {lock.lock_file} for "
                            f"{SCHEMA_LOCK_TIMEOUT_S:g} s while creating the schema") from None
    try:
        yield
    finally:
        lock.release()


def _refuse_half_migrated(uri: str, db: Path) -> None:
    """TrackingError if an interrupted MLflow schema migration left its temporary tables in `db`."""
    import sqlite3

    if not db.exists() or db.stat().st_size == 0:
        return
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        left = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                          "AND name LIKE '\\_alembic\\_tmp\\_%' ESCAPE '\\'")]
    finally:
        con.close()
    if left:
        raise TrackingError(_half_migrated(uri, db, f"leftover table(s) {left}"))


def _half_migrated(uri: str, db: Path, evidence: str) -> str:
    return (f"SQLite tracking store {uri} is half-migrated ({evidence}): an MLflow schema upgrade was "
            f"interrupted, e.g. by two sweeps creating it at once before this was locked. Every sweep on it "
            f"would fail; move {db} aside (or restore a backup) and start again with a fresh store")


def _ensure_experiment(client: MlflowClient, uri: str, name: str, location: str | None) -> str:
    what = f"get experiment {name!r} at {uri}"
    exp = retrying(client.get_experiment_by_name, name, what=what)
    if exp is None:
        try:
            created = retrying(
                client.create_experiment, name, artifact_location=location,
                what=f"create experiment {name!r} at {uri}",
            )
            _set_experiment_kind(client, uri, created)
            return created
        except MlflowException as exc:
            # Another driver created it between our lookup and create: use theirs.
            if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            exp = retrying(client.get_experiment_by_name, name, what=what)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        _log.warning("experiment %r at %s was deleted; restoring it", name, uri)
        retrying(client.restore_experiment, exp.experiment_id,
                 what=f"restore experiment {name!r} at {uri}")
    if location is not None and exp.artifact_location != location:
        _log.info("experiment %r keeps its artifact location %s (requested %s)",
                  name, exp.artifact_location, location)
    _set_experiment_kind(client, uri, exp.experiment_id)
    return exp.experiment_id


def _set_experiment_kind(client: MlflowClient, uri: str, experiment_id: str) -> None:
    """Tag the experiment as model development (see names.EXPERIMENT_KIND), so the MLflow UI opens
    on its runs; a kind someone set by hand (not the UI's "_inferred" guess) is left alone."""
    exp = retrying(client.get_experiment, experiment_id, what=f"get experiment {experiment_id} at {uri}")
    kind = (exp.tags or {}).get(TAG_EXPERIMENT_KIND)
    if kind is None or kind.endswith("_inferred"):
        retrying(client.set_experiment_tag, experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND,
                 what=f"tag experiment {experiment_id} at {uri}")
