"""Checks of the sweep's local stores that run before any weights load or any run is created.

The sweep file itself is validated by `search.spec`; the model, suite and essays by
`sketchwalk.evaluation.plan`; the MLflow store by `tracking.init_store`. What is left is
checked here: the work directory (runs/ must be writable: the stores, the sweep directory and
Ray's results live there) and the Optuna RDB storage (`storage:`, a URL SQLAlchemy can open, not
in-memory, writable when it is a SQLite file). Each failure is a SweepSpecError naming the field
(or flag) and what is allowed, so the CLI exits 2 with a one-line message instead of a
traceback after the model has loaded.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .spec import SweepSpecError

STORAGE_FORMS = "sqlite:///<path>.db, postgresql[+driver]://user[:password]@host[:port]/db, mysql[+driver]://..."
_BACKENDS = ("sqlite", "postgresql", "mysql")


def check_workdir(workdir: Path) -> Path:
    """`workdir`/runs, created if missing; SweepSpecError naming --workdir if it cannot be created
    or written (SQLite also writes its journal beside each database file)."""
    runs = Path(workdir) / "runs"
    try:
        runs.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SweepSpecError("--workdir", f"cannot create {runs}: {exc.strerror or exc}; pass a writable "
                                          f"--workdir (runs/ there holds the stores and outputs)") from None
    if not os.access(runs, os.W_OK | os.X_OK):
        raise SweepSpecError("--workdir", f"{runs} is not writable; pass a writable --workdir (runs/ there holds "
                                          f"the stores and outputs)")
    return runs


def check_storage(url: Optional[str], workdir: Path) -> None:
    """The Optuna storage the optuna backend will open: `url` (the spec's `storage`) or the default
    SQLite file runs/optuna.db. SweepSpecError naming `storage` for a URL SQLAlchemy cannot parse, an
    unsupported or uninstalled backend, in-memory SQLite, or a SQLite file / directory not writable."""
    if url is None:
        db = Path(workdir).resolve() / "runs" / "optuna.db"
        _check_sqlite_file(db, "storage", "(default) ")
        _create_sqlite_schema(f"sqlite:///{db}", db)
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise SweepSpecError("storage", f"{url!r} is not a database URL ({exc}); allowed: {STORAGE_FORMS}") from None
    backend = parsed.get_backend_name()
    if backend not in _BACKENDS:
        raise SweepSpecError("storage", f"{backend!r} databases are not supported; allowed: {STORAGE_FORMS}")
    try:
        parsed.get_dialect()
    except NoSuchModuleError as exc:
        raise SweepSpecError("storage", f"no SQLAlchemy driver for {parsed.drivername!r} is installed ({exc}); "
                                        f"allowed: {STORAGE_FORMS}") from None
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:" or "mode=memory" in url:
            raise SweepSpecError("storage", "an in-memory SQLite study is private to one process and lost at exit "
                                            f"(--resume would find nothing); allowed: {STORAGE_FORMS}")
        _check_sqlite_file(Path(parsed.database), "storage", "")
        _create_sqlite_schema(url, Path(parsed.database))


def _create_sqlite_schema(url: str, db: Path) -> None:
    """Create Optuna's schema in a SQLite storage now, under a file lock: two sweeps starting on one
    fresh file raced on it (one died on a UNIQUE constraint after loading the model and running the
    baseline); later opens find it complete. SweepSpecError naming `storage` if SQLite refuses."""
    import optuna
    from filelock import FileLock, Timeout

    try:
        with FileLock(str(db) + ".lock", timeout=300):
            storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
            storage.engine.dispose()
    except Timeout:
        raise SweepSpecError("storage", f"SQLite file {db}: another process has held {db}.lock for 300 s") from None
    except Exception as exc:  # SQLAlchemy / Optuna errors: named, not a traceback after the model loads
        raise SweepSpecError("storage", f"cannot open the Optuna storage {db}: {type(exc).__name__}: "
                                        f"{str(exc).splitlines()[0]}") from None


def _check_sqlite_file(db: Path, field: str, what: str) -> None:
    """A SQLite database file must be writable, and so must its directory (journal, WAL)."""
    if db.exists() and not os.access(db, os.W_OK):
        raise SweepSpecError(field, f"{what}SQLite file {db} is read-only: make it writable or point {field} "
                                    f"elsewhere ({STORAGE_FORMS})")
    parent = db.parent if db.parent != Path("") else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise SweepSpecError(field, f"{what}SQLite file {db}: its directory {parent} is not writable (SQLite "
                                    f"writes a journal beside the database)")
    if not parent.exists():
        raise SweepSpecError(field, f"{what}SQLite file {db}: directory {parent} does not exist")


def check_tracking(uri: Optional[str], experiment: str, workdir: Path, field: str) -> str:
    """Resolve and prepare the MLflow store (`tracking.init_store`: supported form, not in-memory,
    reachable, writable, schema and experiment created); the resolved URI, or SweepSpecError naming
    `field` (`tracking.uri`, or `--tracking-uri` when the flag gave it) with the store's own reason."""
    from tracking import TrackingError, init_store, resolve_tracking_uri

    try:
        resolved = resolve_tracking_uri(uri, workdir)
        init_store(resolved, experiment)
    except TrackingError as exc:
        raise SweepSpecError(field, str(exc)) from None
    return resolved
