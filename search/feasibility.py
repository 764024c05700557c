"""The sweep's feasibility rule, in one place: the live display, the plots and the analysis (front,
table, export, summary) all ask `feasible`, so they can never disagree about a trial.

A trial is feasible when its accuracy drop vs the dense baseline (`accuracy_drop`, points, logged
with every trial) is at most `constraints.max_accuracy_drop`; without a constraint every finished
trial is feasible. A trial whose drop was not recorded is not feasible under a constraint (nothing
shows that it meets it).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

from .records import TrialRecord

_EPS = 1e-9  # a drop equal to the limit is feasible, float noise included


def feasible(record: TrialRecord, max_accuracy_drop: Optional[float]) -> bool:
    """Whether `record` meets the constraint `max_accuracy_drop` (points below dense; None: no
    constraint, always True)."""
    if max_accuracy_drop is None:
        return True
    drop = record.metrics.get("accuracy_drop")
    return drop is not None and math.isfinite(drop) and drop <= max_accuracy_drop + _EPS


def constraint_label(max_accuracy_drop: Optional[float]) -> str:
    """How the constraint is named in output: 'max_accuracy_drop = 50 points' (or 'no constraint')."""
    return "no constraint" if max_accuracy_drop is None else f"max_accuracy_drop = {max_accuracy_drop:g} points"


@dataclasses.dataclass
class FeasibleSplit:
    """The COMPLETE trials of a sweep under its constraint.

    feasible / infeasible: the two groups (COMPLETE trials only); fallback: True when trials finished
    but none is feasible, so the front is taken over the infeasible ones (labelled as such) rather
    than left empty; note: one line saying so and what to change (None when some trial is feasible).
    """

    max_accuracy_drop: Optional[float]
    feasible: list[TrialRecord]
    infeasible: list[TrialRecord]

    @property
    def fallback(self) -> bool:
        """Trials finished, none is feasible: the front is taken over the infeasible ones."""
        return bool(self.infeasible) and not self.feasible

    @property
    def candidates(self) -> list[TrialRecord]:
        """The trials the front is computed over: the feasible ones, else (fallback) the infeasible."""
        return self.feasible or self.infeasible

    @property
    def note(self) -> Optional[str]:
        """With `fallback`: one line naming the constraint, the closest trial and what to change."""
        if not self.fallback:
            return None
        drops = [(r.metrics.get("accuracy_drop", math.nan), r.number) for r in self.infeasible]
        known = [d for d in drops if math.isfinite(d[0])]
        closest = (f" (the smallest drop is {min(known)[0]:.1f} points, trial {min(known)[1]})" if known else "")
        return (f"all {len(self.infeasible)} finished trial(s) are infeasible under {constraint_label(self.max_accuracy_drop)}"
                f"{closest}: the front, the plot and best.yaml show them anyway, labelled infeasible. To get "
                f"feasible trials: raise constraints.max_accuracy_drop, or search denser configs "
                f"(a higher space.density.low), or run more trials (--resume ID --trials N)")

    def to_dict(self) -> dict:
        """The split as summary.json holds it (counts and the infeasible trials' numbers)."""
        return {"max_accuracy_drop": self.max_accuracy_drop, "feasible": len(self.feasible),
                "infeasible": len(self.infeasible), "fallback": self.fallback,
                "infeasible_trials": [r.number for r in self.infeasible]}


def split_feasible(records: Sequence[TrialRecord], max_accuracy_drop: Optional[float]) -> FeasibleSplit:
    """The COMPLETE records split by `feasible` (FAIL / RUNNING / KILLED records are in neither)."""
    done = [r for r in records if r.state == "COMPLETE"]
    return FeasibleSplit(max_accuracy_drop, [r for r in done if feasible(r, max_accuracy_drop)],
                         [r for r in done if not feasible(r, max_accuracy_drop)])


def noise_note(front: Sequence[TrialRecord], baseline: Optional[TrialRecord]) -> Optional[str]:
    """A line saying the front cannot be told apart from dense when every front trial's 95% accuracy
    interval overlaps the dense baseline's (None otherwise, or without a front or baseline): its
    accuracy differences are then within sampling noise, whatever the point estimates say."""
    if not front or baseline is None or "accuracy" not in baseline.metrics:
        return None
    blo, bhi = baseline.accuracy_interval
    if not all(r.accuracy_interval[0] <= bhi and blo <= r.accuracy_interval[1] for r in front):
        return None
    widths = [r.accuracy_interval[1] - r.accuracy_interval[0] for r in front] + [bhi - blo]
    if max(widths) <= 0:  # exact equality with dense (no interval at all): nothing to call noise
        return None
    return (f"the front is not distinguishable from noise: every front trial's 95% accuracy interval overlaps "
            f"dense's [{blo:.0f}, {bhi:.0f}] (intervals {min(widths):.0f}-{max(widths):.0f} points wide), so its "
            f"accuracy differences may be sampling noise; evaluate more samples (--samples N, e.g. 20) to "
            f"separate them")
