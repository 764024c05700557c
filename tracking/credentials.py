"""Credentials in tracking URIs: taken out of the URI into the environment, never shown or stored.

MLflow's HTTP client reads basic-auth credentials from MLFLOW_TRACKING_USERNAME /
MLFLOW_TRACKING_PASSWORD, and libpq (PostgreSQL stores) reads PGPASSWORD; both are inherited by
the processes a sweep starts (a local Ray's workers included). So a URI given as
`http://user:password@host` is split once, when it is resolved: the secret goes to the
environment, and the URI every process uses, prints and writes (console, session.json, sweep.yaml,
best.yaml, MLflow artifacts) carries none. `redact_uri` covers text that still has the raw URI
(error messages about a URI that was refused).
"""
from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

USER_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
PG_PASSWORD_ENV = "PGPASSWORD"
REDACTED = "***"


def _split(uri: str):
    try:
        parts = urlsplit(uri)
        return parts, parts.username, parts.password
    except ValueError:  # not a URL (e.g. a bad port): nothing to split
        return None, None, None


def redact_uri(uri: str) -> str:
    """`uri` with any password replaced by *** (`http://user:***@host`); unchanged without one."""
    parts, user, password = _split(str(uri))
    if parts is None or password is None:
        return str(uri)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user or ''}:{REDACTED}@{host}"))


def take_credentials(uri: str) -> str:
    """The URI without its secret, the secret moved into this process's environment:
    http(s)://user:password@host -> http(s)://host, MLFLOW_TRACKING_USERNAME/PASSWORD set;
    postgresql://user:password@host/db -> postgresql://user@host/db, PGPASSWORD set. Other URIs and
    URIs without credentials are returned unchanged."""
    parts, user, password = _split(uri)
    if parts is None or (user is None and password is None):
        return uri
    host = parts.netloc.rpartition("@")[2]
    if parts.scheme in ("http", "https"):
        if user is not None:
            os.environ[USER_ENV] = user
        if password is not None:
            os.environ[PASSWORD_ENV] = password
        return urlunsplit(parts._replace(netloc=host))
    if parts.scheme.startswith("postgresql") and password is not None:
        os.environ[PG_PASSWORD_ENV] = password
        return urlunsplit(parts._replace(netloc=f"{parts.netloc.rpartition('@')[0].partition(':')[0]}@{host}"))
    return uri


def credential_env() -> dict[str, str]:
    """The credential variables set in this process (for workers that do not inherit it: a Ray cluster)."""
    return {k: os.environ[k] for k in (USER_ENV, PASSWORD_ENV, PG_PASSWORD_ENV) if k in os.environ}
