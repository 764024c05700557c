"""SweepTracker: idempotent parent/child runs of one sweep, addressed by explicit run ids.

Only MlflowClient with explicit run ids is used, never the fluent API: its global "active run"
is not safe across threads, processes and Ray workers. Every client call goes through
`retrying`; MLflow errors that survive it are re-raised as TrackingError naming the URI.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from mlflow.entities import Metric, Param, Run, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from tracking.names import (
    CHILD_ROLES,
    ROLE_SWEEP,
    TAG_ERROR,
    TAG_KEY,
    TAG_PARENT,
    TAG_ROLE,
    TAG_SWEEP_ID,
    filter_literal,
    flatten,
    sanitize_key,
)
from tracking.retry import TrackingError, bound_mlflow_http, retrying
from tracking.store import check_supported

_log = logging.getLogger(__name__)
T = TypeVar("T")

FINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
_ERROR_TAG_CHARS = 500
_PAGE = 1000  # MLflow's default (and a safe) search page size
_OLDEST_FIRST = ["attributes.start_time ASC"]


@dataclass
class ChildRun:
    """A trial/baseline run of a sweep as last read from the store."""

    run_id: str
    key: str
    role: str  # "trial" | "baseline"
    status: str  # RUNNING | FINISHED | FAILED | KILLED (MLflow run status)
    created: bool  # True if the call that returned it created the run
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # latest value per key
    tags: dict[str, str] = field(default_factory=dict)
    start_ms: int | None = None  # MLflow run start / end, ms since the epoch (end: None while running)
    end_ms: int | None = None

    @classmethod
    def from_run(cls, run: Run, created: bool) -> "ChildRun":
        """Build from an mlflow Run (its data holds the latest value of each metric)."""
        tags = dict(run.data.tags)
        return cls(
            run_id=run.info.run_id,
            key=tags.get(TAG_KEY, ""),
            role=tags.get(TAG_ROLE, ""),
            status=run.info.status,
            created=created,
            params=dict(run.data.params),
            metrics=dict(run.data.metrics),
            tags=tags,
            start_ms=run.info.start_time,
            end_ms=run.info.end_time,
        )


@contextlib.contextmanager
def _quiet_downloads():
    # MLflow draws a progress bar per artifact download; one per run read only clutters the log.
    old = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = old


def _chunks(items: list[T], size: int) -> list[list[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _param_value(value: Any) -> str:
    # Cut exactly where MLflow would, so a re-logged long value equals the stored one.
    return str(value)[:MAX_PARAM_VAL_LENGTH]


def _sanitised(data: dict, what: str) -> dict[str, Any]:
    """Sanitise keys; two different keys that collapse to one name are a caller bug."""
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for k, v in data.items():
        name = sanitize_key(k)
        if name in out and origin[name] != str(k):
            raise ValueError(f"{what} keys {origin[name]!r} and {k!r} both become {name!r}")
        out[name], origin[name] = v, str(k)
    return out


class SweepTracker:
    """Tracks one sweep (`sweep_id`) in one experiment: a parent run plus one child run per
    trial/baseline key. Safe to construct in every worker process; picklable (the MLflow client
    is recreated on first use after unpickling)."""

    def __init__(self, uri: str, experiment_id: str, sweep_id: str):
        check_supported(uri)
        if uri.startswith(("http://", "https://")):
            bound_mlflow_http()
        filter_literal(sweep_id, "sweep_id")  # fail now, not at the first search
        self.uri = uri
        self.experiment_id = str(experiment_id)
        self.sweep_id = str(sweep_id)
        self._client: MlflowClient | None = None
        self._parent_id: str | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    # -- plumbing -----------------------------------------------------------------------------

    @property
    def client(self) -> MlflowClient:
        """The (lazily created) MlflowClient for `uri`."""
        if self._client is None:
            self._client = self._call("opening MLflow store", MlflowClient, tracking_uri=self.uri)
        return self._client

    def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        what = f"{what} at {self.uri}"
        try:
            return retrying(fn, *args, what=what, **kwargs)
        except MlflowException as exc:  # non-transient: say where and what, keep the cause
            raise TrackingError(f"{what} failed: {exc.error_code}: {exc.message}") from exc

    def _search_all(self, filter_string: str, order_by: list[str] | None = None) -> list[Run]:
        runs: list[Run] = []
        token: str | None = None
        while True:
            page = self._call(
                "search_runs", self.client.search_runs, [self.experiment_id],
                filter_string=filter_string, run_view_type=ViewType.ALL, max_results=_PAGE,
                order_by=order_by, page_token=token,
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def _sweep_filter(self) -> str:
        return f"tags.`{TAG_SWEEP_ID}` = {filter_literal(self.sweep_id, 'sweep_id')}"

    def _key_runs(self, key: str) -> list[Run]:
        """Runs of this sweep tagged with `key`, oldest first (normally zero or one)."""
        filt = f"tags.`{TAG_KEY}` = {filter_literal(key, 'key')} and {self._sweep_filter()}"
        runs = self._search_all(filt, _OLDEST_FIRST)
        return [r for r in runs if r.data.tags.get(TAG_ROLE) != ROLE_SWEEP]

    def _reattach(self, run: Run, n_found: int, label: str) -> None:
        if n_found > 1:
            _log.warning("%d runs found for %s at %s; using the oldest, %s",
                         n_found, label, self.uri, run.info.run_id)
        if run.info.lifecycle_stage == "deleted":
            _log.warning("run %s (%s) was deleted; restoring it", run.info.run_id, label)
            self._call(f"restore run {run.info.run_id}", self.client.restore_run, run.info.run_id)

    def _find_parent(self) -> Run | None:
        filt = f"{self._sweep_filter()} and tags.`{TAG_ROLE}` = '{ROLE_SWEEP}'"
        runs = self._search_all(filt, _OLDEST_FIRST)
        if not runs:
            return None
        self._reattach(runs[0], len(runs), f"sweep {self.sweep_id!r}")
        self._parent_id = runs[0].info.run_id
        return runs[0]

    def _get(self, run_id: str) -> Run:
        return self._call(f"get run {run_id}", self.client.get_run, run_id)

    # -- runs ---------------------------------------------------------------------------------

    def parent_run(self, name: str, params: dict | None = None, tags: dict | None = None) -> str:
        """Id of the sweep's parent run (tags sketchwalk.sweep_id / sketchwalk.role="sweep").
        Re-attaches to an existing one (status set back to RUNNING, a deleted one restored),
        else creates it with run name `name`. Logs `params` (see log_params) and `tags`."""
        run = self._find_parent()
        if run is None:
            all_tags = {**{str(k): v for k, v in (tags or {}).items()},
                        TAG_SWEEP_ID: self.sweep_id, TAG_ROLE: ROLE_SWEEP}
            run = self._call("create parent run", self.client.create_run, self.experiment_id,
                             tags=self._tag_values(all_tags), run_name=name)
            self._parent_id = run.info.run_id
            if params:
                self.log_params(self._parent_id, params)
            return self._parent_id
        # Params first: a conflicting one raises before a finished parent is flipped to RUNNING.
        if params:
            self.log_params(self._parent_id, params)
        if run.info.status != "RUNNING":
            self._call(f"update run {self._parent_id}", self.client.update_run,
                       self._parent_id, status="RUNNING")
        if tags:
            self.set_tags(self._parent_id, tags)
        return self._parent_id

    def find_parent(self) -> str | None:
        """The id of this sweep's parent run, or None if the store holds none (nothing is changed)."""
        filt = f"{self._sweep_filter()} and tags.`{TAG_ROLE}` = '{ROLE_SWEEP}'"
        runs = self._search_all(filt, _OLDEST_FIRST)
        return runs[0].info.run_id if runs else None

    def _require_parent(self) -> str:
        if self._parent_id is None and self._find_parent() is None:
            raise TrackingError(
                f"no parent run for sweep {self.sweep_id!r} in experiment {self.experiment_id} "
                f"at {self.uri}: call parent_run() before child_run()"
            )
        return self._parent_id

    def child_run(
        self,
        key: str,
        *,
        role: str,
        name: str,
        params: dict | None = None,
        tags: dict | None = None,
        start_ms: int | None = None,
    ) -> ChildRun:
        """The child run of this sweep with tag sketchwalk.key == `key`, created if missing.

        Idempotent by key: an existing run is returned with created=False and only params it
        does not have yet are logged (a differing value for a present param is left as is, with
        a warning); `tags` are (re)set. A new run gets run name `name`, tag mlflow.parentRunId =
        the parent run id and the sketchwalk.* tags, and starts at `start_ms` (ms since the epoch;
        default now: a run logged after its work set it to when the work began). Raises TrackingError if the sweep has no
        parent run, or if the existing run has a different role; ValueError for a bad role/key.
        """
        if role not in CHILD_ROLES:
            raise ValueError(f"role must be one of {CHILD_ROLES}, got {role!r}")
        filter_literal(key, "key")
        found = self._key_runs(key)
        if found:
            run = found[0]
            self._reattach(run, len(found), f"key {key!r} of sweep {self.sweep_id!r}")
            have_role = run.data.tags.get(TAG_ROLE)
            if have_role != role:
                raise TrackingError(
                    f"run {run.info.run_id} for key {key!r} at {self.uri} has role "
                    f"{have_role!r}, not {role!r}"
                )
            if params:
                self._log_missing_params(run, params)
            if tags:
                self.set_tags(run.info.run_id, tags)
            return ChildRun.from_run(self._get(run.info.run_id), created=False)

        parent_id = self._require_parent()
        all_tags = {**{str(k): v for k, v in (tags or {}).items()}, TAG_PARENT: parent_id,
                    TAG_SWEEP_ID: self.sweep_id, TAG_KEY: key, TAG_ROLE: role}
        run = self._call(f"create child run {key!r}", self.client.create_run, self.experiment_id,
                         start_time=start_ms, tags=self._tag_values(all_tags), run_name=name)
        if params:
            self.log_params(run.info.run_id, params)
        return ChildRun.from_run(self._get(run.info.run_id), created=True)

    def _log_missing_params(self, run: Run, params: dict) -> None:
        have = run.data.params
        missing = {}
        for k, v in self._param_strings(params).items():
            if k not in have:
                missing[k] = v
            elif have[k] != v:
                _log.warning("run %s keeps param %r = %r (asked for %r; params are immutable)",
                             run.info.run_id, k, have[k], v)
        self._log_param_batch(run.info.run_id, missing)

    def find_child(self, key: str) -> ChildRun | None:
        """The child run with this key (the oldest if several), or None."""
        found = self._key_runs(key)
        return ChildRun.from_run(found[0], created=False) if found else None

    def children(self, role: str | None = None) -> list[ChildRun]:
        """All child runs of this sweep (deleted ones included), optionally only `role`,
        sorted by key; one per key (the oldest) should duplicates exist. Pages through
        search_runs, so any number of children works."""
        filt = self._sweep_filter()
        if role is not None:
            filt += f" and tags.`{TAG_ROLE}` = {filter_literal(role, 'role')}"
        by_key: dict[str, ChildRun] = {}
        for run in self._search_all(filt, _OLDEST_FIRST):
            tags = run.data.tags
            if tags.get(TAG_ROLE) == ROLE_SWEEP or TAG_KEY not in tags:
                continue
            if tags[TAG_KEY] in by_key:
                _log.warning("duplicate runs for key %r of sweep %r at %s; keeping %s",
                             tags[TAG_KEY], self.sweep_id, self.uri, by_key[tags[TAG_KEY]].run_id)
                continue
            by_key[tags[TAG_KEY]] = ChildRun.from_run(run, created=False)
        return [by_key[k] for k in sorted(by_key)]

    def all_runs(self) -> list[ChildRun]:
        """Every run of this sweep as stored, the parent and duplicates included (oldest first): what
        a store audit counts, where `children` keeps one run per key."""
        return [ChildRun.from_run(run, created=False) for run in self._search_all(self._sweep_filter(), _OLDEST_FIRST)]

    def artifact_names(self, run_id: str) -> list[str]:
        """The paths of a run's top-level artifacts."""
        return sorted(f.path for f in self._call("list_artifacts", self.client.list_artifacts, run_id))

    # -- data ---------------------------------------------------------------------------------

    @staticmethod
    def _param_strings(params: dict) -> dict[str, str]:
        flat = _sanitised(flatten(params), "param")
        return {k: _param_value(v) for k, v in flat.items()}

    @staticmethod
    def _tag_values(tags: dict) -> dict[str, str]:
        return {k: str(v)[:MAX_TAG_VAL_LENGTH] for k, v in _sanitised(tags, "tag").items()}

    def _log_param_batch(self, run_id: str, params: dict[str, str]) -> None:
        items = [Param(k, v) for k, v in params.items()]
        for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            self._call(f"log params to run {run_id}", self.client.log_batch, run_id, params=chunk)

    def log_params(self, run_id: str, params: dict) -> None:
        """Log params: nested dicts flattened with ".", keys sanitised like metric_key, values
        str()-ed (None -> "None") and cut to MLflow's 6000-char limit. Params already present
        with the same value are skipped; a different value raises TrackingError naming the key
        (MLflow params are immutable)."""
        wanted = self._param_strings(params)
        have = self._get(run_id).data.params
        for k, v in wanted.items():
            if k in have and have[k] != v:
                raise TrackingError(
                    f"param {k!r} of run {run_id} at {self.uri} is already {have[k]!r}; "
                    f"MLflow params are immutable, cannot set it to {v!r}"
                )
        self._log_param_batch(run_id, {k: v for k, v in wanted.items() if k not in have})

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        """Log metrics at `step` with one timestamp (ms), in log_batch calls of at most 1000.
        Keys sanitised; values float()-ed; NaN/inf are logged, not dropped (MLflow stores +-inf
        as +-1.797e308)."""
        ts = int(time.time() * 1000)
        items = []
        for k, v in _sanitised(metrics, "metric").items():
            try:
                value = float(v)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"metric {k!r} must be a number, got {v!r}") from exc
            items.append(Metric(k, value, ts, int(step)))
        for chunk in _chunks(items, MAX_METRICS_PER_BATCH):
            self._call(f"log metrics to run {run_id}", self.client.log_batch, run_id, metrics=chunk)

    def set_tags(self, run_id: str, tags: dict) -> None:
        """Set tags (mutable, unlike params): keys sanitised, values str()-ed, cut to 8000 chars."""
        items = [RunTag(k, v) for k, v in self._tag_values(tags).items()]
        for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            self._call(f"set tags on run {run_id}", self.client.log_batch, run_id, tags=chunk)

    def run_tags(self, run_id: str) -> dict[str, str]:
        """The run's tags as stored now."""
        return dict(self._get(run_id).data.tags)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """Store `text` as artifact `artifact_file` (a relative path, e.g. "logs/out.txt")."""
        self._call(f"log artifact {artifact_file!r} to run {run_id}",
                   self.client.log_text, run_id, text, artifact_file)

    def read_text(self, run_id: str, artifact_file: str) -> str:
        """The text of the run's artifact `artifact_file` (TrackingError if it is missing or the
        artifact store is unreachable)."""
        with tempfile.TemporaryDirectory() as tmp, _quiet_downloads():
            try:
                local = self._call(f"read artifact {artifact_file!r} of run {run_id}",
                                   self.client.download_artifacts, run_id, artifact_file, tmp)
            except OSError as exc:  # local artifact stores raise plain OSErrors for a missing file
                raise TrackingError(f"read artifact {artifact_file!r} of run {run_id} at {self.uri} failed: "
                                    f"{exc}") from exc
            with open(local, encoding="utf-8") as f:
                return f.read()

    def log_dict(self, run_id: str, data: dict, artifact_file: str) -> None:
        """Store `data` as artifact `artifact_file`: YAML if it ends in .yaml/.yml, JSON if .json
        (any other suffix -> ValueError)."""
        suffix = os.path.splitext(artifact_file)[1].lower()
        if suffix not in (".json", ".yaml", ".yml"):
            raise ValueError(f"artifact_file must end in .json, .yaml or .yml: {artifact_file!r}")
        self._call(f"log artifact {artifact_file!r} to run {run_id}",
                   self.client.log_dict, run_id, data, artifact_file)

    def log_file(self, run_id: str, path: str, artifact_path: str | None = None) -> None:
        """Copy local file or directory `path` into the run's artifacts (under `artifact_path`)."""
        if not os.path.exists(path):
            raise FileNotFoundError(f"cannot log artifact: {path} does not exist")
        self._call(f"log artifact {path!r} to run {run_id}",
                   self.client.log_artifact, run_id, path, artifact_path)

    def finish(self, run_id: str, status: str = "FINISHED", error: str | None = None,
               end_ms: int | None = None) -> None:
        """End a run with `status` (FINISHED | FAILED | KILLED, else ValueError). With `error`:
        tag sketchwalk.error = its first 500 chars and the full text as artifact error.txt.
        `end_ms` (ms since the epoch; default now): when the run ended, for a run found dead later."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"status must be one of {', '.join(FINAL_STATUSES)}, got {status!r}")
        if end_ms is not None and (isinstance(end_ms, bool) or not isinstance(end_ms, int) or end_ms < 0):
            raise ValueError(f"end_ms must be a non-negative int (ms since the epoch), got {end_ms!r}")
        if error is not None:
            self.set_tags(run_id, {TAG_ERROR: error[:_ERROR_TAG_CHARS]})
            self.log_text(run_id, error, "error.txt")
        self._call(f"finish run {run_id}", self.client.set_terminated, run_id, status=status, end_time=end_ms)

    def last_logged_ms(self, run_id: str) -> int | None:
        """The latest timestamp (ms since the epoch) of any metric value the run logged; None if none."""
        latest = None
        for key in self._get(run_id).data.metrics:
            history = self._call(f"read metric {key!r} of run {run_id}", self.client.get_metric_history, run_id, key)
            for m in history:
                latest = m.timestamp if latest is None else max(latest, m.timestamp)
        return latest
