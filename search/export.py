"""Pick one trial of a sweep by a rule and export its config as a loadable YAML file."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from search.pareto import is_valid, knee_point, pareto_front
from search.records import OBJECTIVES, Objective, TrialRecord

RULE_FORMS = ("fastest-within-drop:<points>", "most-accurate-under:<value>", "knee")
_ACCURACY = Objective("accuracy", "maximize")


class RuleError(ValueError):
    """An export rule string is malformed; `field` is always 'rule'."""

    field = "rule"

    def __init__(self, value: Any, why: str):
        self.value, self.why = value, why
        super().__init__(f"rule = {value!r} is invalid ({why}): allowed forms are {', '.join(RULE_FORMS)}")


class NoTrialMatches(LookupError):
    """No trial satisfies an export rule's constraint; the message names it and the best available value."""


@dataclasses.dataclass(frozen=True)
class ExportRule:
    """A parsed export rule: `kind` is 'fastest-within-drop' | 'most-accurate-under' | 'knee';
    `value` is the drop in accuracy points or the speed-objective bound (None for knee)."""

    kind: str
    value: Optional[float] = None

    @classmethod
    def parse(cls, text: "str | ExportRule") -> "ExportRule":
        """Parse 'fastest-within-drop:<points>' (points >= 0), 'most-accurate-under:<value>' or
        'knee'; an ExportRule is returned as is. Anything else -> RuleError (a ValueError)."""
        if isinstance(text, ExportRule):
            return text
        if not isinstance(text, str):
            raise RuleError(text, "not a string")
        kind, sep, arg = text.strip().partition(":")
        if kind == "knee" and not sep:
            return cls("knee")
        if kind not in ("fastest-within-drop", "most-accurate-under"):
            raise RuleError(text, f"unknown rule {kind!r}")
        try:
            value = float(arg)
        except ValueError:
            raise RuleError(text, f"{arg!r} is not a number") from None
        if not math.isfinite(value) or (kind == "fastest-within-drop" and value < 0):
            raise RuleError(text, f"{arg!r} must be a finite number" + (" >= 0" if kind == "fastest-within-drop" else ""))
        return cls(kind, value)

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{self.value:g}"


def _speed_objective(objectives: Sequence[Objective]) -> Objective:
    for o in objectives:
        if o.name != "accuracy":
            return o
    raise ValueError("objectives: the rule needs a speed objective (one other than accuracy)")


def _accuracy_objective(objectives: Sequence[Objective]) -> Objective:
    return next((o for o in objectives if o.name == "accuracy"), _ACCURACY)


def _better(o: Objective, v: float) -> float:
    # A sort key where smaller is better, whatever the direction.
    return -v if o.maximize else v


def choose(records: list[TrialRecord], objectives: list[Objective], rule: "str | ExportRule", *, baseline: Optional[TrialRecord] = None) -> TrialRecord:
    """The trial `rule` selects among COMPLETE records with a config and finite accuracy and speed.

    The speed objective is the first non-accuracy objective; accuracy is in x100 points.
    - fastest-within-drop:P: accuracy >= baseline accuracy - P; best on speed (ties: more accurate).
      Needs `baseline` (the dense run).
    - most-accurate-under:V: speed value <= V (>= V for a maximised speed objective, e.g. a speedup);
      highest accuracy (ties: faster).
    - knee: `knee_point` of the plain Pareto front over `objectives`.
    Records without a config (the dense baseline) are never chosen. Raises RuleError for a bad
    rule, ValueError for a missing baseline / speed objective, NoTrialMatches when nothing fits.
    """
    rule = ExportRule.parse(rule)
    acc = _accuracy_objective(objectives)
    pool = [r for r in records if r.config is not None]
    if rule.kind == "knee":
        front = pareto_front(pool, objectives)
        if not front:
            raise NoTrialMatches("knee: no COMPLETE trial with finite values on every objective, so there is no front")
        return knee_point(front, objectives)
    speed = _speed_objective(objectives)
    pool = [r for r in pool if is_valid(r, [acc, speed])]
    if not pool:
        raise NoTrialMatches(f"{rule}: no COMPLETE trial has finite {acc.name} and {speed.name}")
    if rule.kind == "fastest-within-drop":
        if baseline is None or not math.isfinite(baseline.value(acc)):
            raise ValueError("baseline: fastest-within-drop needs the dense baseline's accuracy")
        floor = baseline.value(acc) - rule.value
        fits = [r for r in pool if r.value(acc) >= floor]
        if not fits:
            best = max(pool, key=lambda r: r.value(acc))
            raise NoTrialMatches(
                f"{rule}: no trial has accuracy >= {floor:.2f} (baseline {baseline.value(acc):.2f} - {rule.value:g} points); "
                f"the best available accuracy is {best.value(acc):.2f} (trial {best.number}, drop {baseline.value(acc) - best.value(acc):.2f} points)"
            )
        return min(fits, key=lambda r: (_better(speed, r.value(speed)), -r.value(acc), r.number))
    # The bound is on the speed objective's good side: at most `value` of a time, at least `value` of a speedup.
    fits = [r for r in pool if (r.value(speed) >= rule.value if speed.maximize else r.value(speed) <= rule.value)]
    if not fits:
        best = min(pool, key=lambda r: _better(speed, r.value(speed)))
        raise NoTrialMatches(
            f"{rule}: no trial has {speed.name} {'>=' if speed.maximize else '<='} {rule.value:g} ({speed.unit}); "
            f"the {'highest' if speed.maximize else 'lowest'} available {speed.name} is {best.value(speed):.4g} "
            f"(trial {best.number})"
        )
    return min(fits, key=lambda r: (-r.value(acc), _better(speed, r.value(speed)), r.number))


def most_accurate(records: list[TrialRecord], objectives: list[Objective]) -> TrialRecord:
    """The most accurate COMPLETE record with a config and finite accuracy (ties: better on the speed
    objective, then the lower number); NoTrialMatches when there is none. The analysis exports it
    when no trial is feasible."""
    acc = _accuracy_objective(objectives)
    pool = [r for r in records if r.config is not None and is_valid(r, [acc])]
    if not pool:
        raise NoTrialMatches(f"no COMPLETE trial with a config has a finite {acc.name}")
    others = [o for o in objectives if o.name != acc.name]
    speed = others[0] if others else None

    def key(r: TrialRecord) -> tuple:
        tie = _better(speed, r.value(speed)) if speed is not None and math.isfinite(r.value(speed)) else math.inf
        return (-r.value(acc), tie, r.number)

    return min(pool, key=key)


def _plain(v: Any) -> Any:
    # yaml.safe_dump only takes builtin types; metric values may be numpy scalars.
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if hasattr(v, "item") and callable(v.item):
        return v.item()
    return v


def export_yaml(
    record: TrialRecord,
    path: str | Path,
    *,
    provenance: dict,
    rule: "str | ExportRule | None" = None,
    objectives: Optional[Sequence[Objective]] = None,
) -> Path:
    """Write `{"sketchwalk": <config>, "provenance": {...}}` to `path`; returns the path.

    The `sketchwalk` block is the record's config validated through SketchWalkConfig, so the file
    loads with `SketchWalkConfig.from_yaml(path)`. `provenance` holds the given dict (sweep id,
    model, suite, ...) plus, overriding same-named keys: trial, run_id, rule, objectives
    ({name: value} for `objectives`, else every OBJECTIVES metric the record logged), accuracy,
    accuracy_interval ([lo, hi], x100 points) and created (ISO 8601 UTC). ValueError without config.
    """
    if record.config is None:
        raise ValueError(f"record: trial {record.number} has no config (the dense baseline cannot be exported)")
    config = record.config
    if objectives is None:
        objectives = [Objective(n, d) for n, (m, d, _) in OBJECTIVES.items() if m in record.metrics]
    lo, hi = record.accuracy_interval
    prov = dict(provenance)
    prov.update(
        trial=record.number,
        run_id=record.run_id,
        rule=None if rule is None else str(ExportRule.parse(rule)),
        objectives={o.name: record.value(o) for o in objectives},
        accuracy=record.metrics.get("accuracy"),
        accuracy_interval=[lo, hi],
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"sketchwalk": config.to_dict(), "provenance": _plain(prov)}, sort_keys=False))
    return path
