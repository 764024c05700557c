"""Pareto analysis of a sweep's `TrialRecord`s: the front, a table of it, and its knee point.

The plain front is Optuna's own (`Study.best_trials` on an in-memory study); the noise-aware
front is hand-written because it needs the accuracy intervals, which Optuna does not know about.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from search.records import Objective, TrialRecord

# user_attrs key carrying a record's number through an Optuna study (Optuna renumbers trials).
RECORD_ATTR = "record"


def is_valid(record: TrialRecord, objectives: Sequence[Objective]) -> bool:
    """Whether `record` is COMPLETE with a finite value on every objective (front candidates)."""
    return record.state == "COMPLETE" and all(math.isfinite(record.value(o)) for o in objectives)


def _sort_key(objectives: Sequence[Objective]):
    # Best first on the first objective, then the others, then number for a stable order.
    def key(r: TrialRecord) -> tuple:
        return tuple(-r.value(o) if o.maximize else r.value(o) for o in objectives) + (r.number,)

    return key


# -- Optuna study ---------------------------------------------------------------------------
def infer_distributions(records: Sequence[TrialRecord], params: Sequence[str]) -> dict[str, Any]:
    """Optuna distributions for config fields `params`, inferred from the records' configs.

    Numeric fields (all non-None values int/float) -> Int/FloatDistribution over the observed
    range; anything else -> CategoricalDistribution of the observed values (None included).
    Records without a config (the dense baseline) are ignored. Unknown field -> ValueError.
    """
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    configs = [r.config_fields for r in records if r.config is not None]
    dists: dict[str, Any] = {}
    for p in params:
        if not any(p in c for c in configs):
            raise ValueError(f"params: {p!r} is not a config field of any record")
        values = [c.get(p) for c in configs]
        present = [v for v in values if v is not None]
        numeric = bool(present) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present)
        if numeric and all(isinstance(v, int) for v in present):
            dists[p] = IntDistribution(min(present), max(present))
        elif numeric:
            dists[p] = FloatDistribution(float(min(present)), float(max(present)))
        else:
            # Keep first-seen order; CategoricalDistribution rejects duplicate choices.
            dists[p] = CategoricalDistribution(list(dict.fromkeys(values)))
    return dists


def build_study(records: Sequence[TrialRecord], objectives: Sequence[Objective], *, params: Sequence[str] = ()):
    """An in-memory `optuna.Study` holding the valid records (see `is_valid`) as COMPLETE trials.

    Each trial carries `user_attrs={"record": record.number}` and, for `params` (config field
    names), params with distributions from `infer_distributions`; a numeric field whose value is
    None in a record is left out of that trial. Returns the study (trial numbers are Optuna's).
    """
    import optuna
    from optuna.distributions import CategoricalDistribution

    # Silence "A new study created in memory" without changing the caller's Optuna logging.
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(directions=[o.direction for o in objectives])
    finally:
        optuna.logging.set_verbosity(verbosity)
    dists = infer_distributions(records, params) if params else {}
    trials = []
    for r in records:
        if not is_valid(r, objectives):
            continue
        config = r.config_fields
        # Categorical choices may include None; numeric distributions cannot hold it.
        kept = {p: d for p, d in dists.items() if p in config and (config[p] is not None or isinstance(d, CategoricalDistribution))}
        trials.append(
            optuna.trial.create_trial(
                values=[r.value(o) for o in objectives],
                state=optuna.trial.TrialState.COMPLETE,
                params={p: config[p] for p in kept},
                distributions=kept,
                user_attrs={RECORD_ATTR: r.number},
            )
        )
    study.add_trials(trials)
    return study


# -- front ----------------------------------------------------------------------------------
def _at_least_as_good(a: TrialRecord, b: TrialRecord, o: Objective) -> bool:
    if o.name == "accuracy":
        (alo, ahi), (blo, bhi) = a.accuracy_interval, b.accuracy_interval
        return ahi >= blo if o.maximize else alo <= bhi
    return a.value(o) >= b.value(o) if o.maximize else a.value(o) <= b.value(o)


def _strictly_better(a: TrialRecord, b: TrialRecord, o: Objective) -> bool:
    if o.name == "accuracy":
        (alo, ahi), (blo, bhi) = a.accuracy_interval, b.accuracy_interval
        return alo > bhi if o.maximize else ahi < blo
    return a.value(o) > b.value(o) if o.maximize else a.value(o) < b.value(o)


def noise_aware_dominates(a: TrialRecord, b: TrialRecord, objectives: Sequence[Objective]) -> bool:
    """Whether `a` dominates `b` when accuracy differences inside the 95% intervals do not count.

    `a` dominates `b` iff on every objective `a` is at least as good and on one strictly better.
    For `accuracy` (maximised) "strictly better" means a.lo > b.hi (the intervals are disjoint,
    a above) and "at least as good" means a.hi >= b.lo (a's interval is not entirely below b's);
    other objectives compare point values.
    """
    return all(_at_least_as_good(a, b, o) for o in objectives) and any(_strictly_better(a, b, o) for o in objectives)


def pareto_front(records: list[TrialRecord], objectives: list[Objective], *, noise_aware: bool = False) -> list[TrialRecord]:
    """The non-dominated COMPLETE records with finite values on every objective.

    Plain mode: Optuna's Pareto front (`Study.best_trials`) of an in-memory study of the records.
    Noise-aware mode: non-dominated under `noise_aware_dominates` (A dominates B iff A is at least
    as good on every objective and strictly better on one; for accuracy, strictly better means
    A.lo > B.hi and at least as good means A.hi >= B.lo, on the 95% intervals; other objectives
    compare point values). An accuracy gain inside the noise no longer removes a record, so e.g.
    equally fast records with overlapping intervals all stay (the front usually grows); note that
    it also works the other way: a slower record whose higher accuracy is not significant is
    dominated by a faster one, so the noise-aware front is not a superset of the plain one.
    Returns the front sorted by the first objective, best first (ties: next objectives, number).
    """
    if not objectives:
        raise ValueError("objectives: at least one objective is needed")
    valid = [r for r in records if is_valid(r, objectives)]
    if noise_aware:
        front = [b for b in valid if not any(a is not b and noise_aware_dominates(a, b, objectives) for a in valid)]
    else:
        by_number = {r.number: r for r in valid}
        front = [by_number[t.user_attrs[RECORD_ATTR]] for t in build_study(valid, objectives).best_trials]
    return sorted(front, key=_sort_key(objectives))


# -- knee -----------------------------------------------------------------------------------
def _normalised_costs(front: Sequence[TrialRecord], objectives: Sequence[Objective]) -> list[list[float]]:
    """Per record, each objective mapped to [0, 1] with 0 = best on the front, 1 = worst."""
    costs = []
    for o in objectives:
        vals = [r.value(o) for r in front]
        best, worst = (max(vals), min(vals)) if o.maximize else (min(vals), max(vals))
        span = abs(worst - best)
        costs.append([abs(v - best) / span if span > 0 else 0.0 for v in vals])
    return [list(c) for c in zip(*costs)]


def knee_point(front: list[TrialRecord], objectives: list[Objective]) -> TrialRecord:
    """The front's knee: the best trade-off point.

    Objectives are normalised over the front to costs in [0, 1] (0 = best, direction-aware).
    Two objectives: the point farthest from the straight line through the two extremes (the
    points best on each objective), on the side of the ideal point (0, 0) — the standard
    maximum-distance knee; ties (e.g. a straight front) go to the point nearest the ideal.
    More objectives: the point nearest (Euclidean) the ideal point. A 1-point front -> that point.
    Raises ValueError on an empty front.
    """
    if not front:
        raise ValueError("front: the knee of an empty front is undefined")
    if len(front) == 1:
        return front[0]
    costs = _normalised_costs(front, objectives)
    ideal_dist = [math.hypot(*c) for c in costs]
    if len(objectives) != 2:
        return front[min(range(len(front)), key=lambda i: (ideal_dist[i], i))]
    e1 = costs[min(range(len(front)), key=lambda i: (costs[i][0], costs[i][1]))]
    e2 = costs[min(range(len(front)), key=lambda i: (costs[i][1], costs[i][0]))]
    dx, dy = e2[0] - e1[0], e2[1] - e1[1]
    norm = math.hypot(dx, dy)
    if norm == 0:
        return front[min(range(len(front)), key=lambda i: (ideal_dist[i], i))]

    def cross(p: Sequence[float]) -> float:
        return dx * (p[1] - e1[1]) - dy * (p[0] - e1[0])

    # Signed distance to the extremes' line, positive on the ideal point's side: a point bulging
    # away from the ideal (a concave stretch) is a poor trade-off, not a knee.
    sign = -1.0 if cross((0.0, 0.0)) < 0 else 1.0
    dist = [round(sign * cross(c) / norm, 12) for c in costs]
    return front[max(range(len(front)), key=lambda i: (dist[i], -ideal_dist[i], -i))]


# -- table ----------------------------------------------------------------------------------
def _fmt_accuracy(r: TrialRecord) -> str:
    lo, hi = r.accuracy_interval
    return f"{r.metrics.get('accuracy', math.nan):.2f} [{lo:.2f}, {hi:.2f}]"


def front_table(front: list[TrialRecord], objectives: list[Objective], *, baseline: Optional[TrialRecord] = None) -> list[dict]:
    """One row per front record, in the front's order.

    Columns: `number`; each objective by name (accuracy as the string "mean [lo, hi]", x100
    points; others as floats in the objective's unit); `accuracy_drop` (baseline accuracy minus
    the record's, points; positive = worse; only with a baseline); `measured_density` (the
    logged `density` metric, NaN if absent); then the config fields whose values differ across
    the front (constant fields are omitted to keep the table readable), named `config.<field>`
    where the field's name is already a column (e.g. `config.density`, the target density).
    """
    configs = [r.config_fields for r in front]
    fields = list(dict.fromkeys(k for c in configs for k in c))
    varying = [k for k in fields if len({repr(c.get(k)) for c in configs}) > 1]
    rows = []
    for r, c in zip(front, configs):
        row: dict[str, Any] = {"number": r.number}
        for o in objectives:
            row[o.name] = _fmt_accuracy(r) if o.name == "accuracy" else r.value(o)
        if baseline is not None:
            row["accuracy_drop"] = baseline.metrics.get("accuracy", math.nan) - r.metrics.get("accuracy", math.nan)
        row["measured_density"] = float(r.metrics.get("density", math.nan))
        # A config field named like a column (e.g. density, the target) must not overwrite it.
        row.update({(f"config.{k}" if k in row else k): c.get(k) for k in varying})
        rows.append(row)
    return rows


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def markdown_table(rows: list[dict]) -> str:
    """`rows` (from `front_table`) as a markdown table (floats to 4 significant digits); an empty
    front is the header alone."""
    columns = list(dict.fromkeys(k for row in rows for k in row)) or ["number"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(k)).replace("|", "\\|") for k in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_front_table(rows: list[dict], path_stem: str | Path) -> tuple[Path, Path]:
    """Write `rows` (from `front_table`) to `<stem>.md` (a markdown table) and `<stem>.csv`.

    Markdown cells show floats to 4 significant digits; the CSV keeps full precision.
    Returns (md_path, csv_path); parent folders are created.
    """
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = stem.with_name(stem.name + ".md"), stem.with_name(stem.name + ".csv")
    columns = list(dict.fromkeys(k for row in rows for k in row)) or ["number"]
    md_path.write_text(markdown_table(rows) + "\n")
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return md_path, csv_path
