"""The sweep's live display: a progress bar over trials (done / running / failed) and one line
per finished trial with its objectives, its feasibility and the size and best point of the front so far."""
from __future__ import annotations

import math
from typing import Any, Optional

from rich.markup import escape

from sketchwalk.console import make_console

from .feasibility import feasible, split_feasible
from .pareto import pareto_front
from .records import Objective, TrialRecord


class SweepDisplay:
    """Rich progress over the trial budget; `trial_done` / `status` are the drivers' callbacks.

    The running front applies the analysis' own rules (`search.feasibility.feasible` under
    `max_accuracy_drop`, then `search.pareto.pareto_front`), so what it counts is what the end of
    the sweep reports: feasible trials only, or, while none is feasible, the infeasible ones, said so.
    """

    def __init__(self, objectives: list[Objective], total: Optional[int], *, enabled: bool = True,
                 max_accuracy_drop: Optional[float] = None):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.objectives = objectives
        self.max_accuracy_drop = max_accuracy_drop
        self.console = make_console()
        self.records: list[TrialRecord] = []
        self.progress = Progress(TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[state]}"), TimeElapsedColumn(),
                                 console=self.console, disable=not enabled)
        self.task = self.progress.add_task("trials", total=total, state="starting")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def log(self, text: str) -> None:
        self.progress.console.print(text, highlight=False)

    def status(self, done: int, failed: int, running: int) -> None:
        """Counts from the driver: finished (complete), failed, running now."""
        self.progress.update(self.task, completed=done + failed,
                             state=f"done {done}  running {running}  failed {failed}  {self._front_text()}")

    def trial_done(self, number: int, metrics: Optional[dict[str, Any]], error: Optional[str]) -> None:
        """One trial finished: print its objectives (or its error), its feasibility and the front so far."""
        if metrics is None:
            last = (error or "").strip().splitlines()[-1:] or ["error"]
            self.log(f"[red]trial {number} failed[/red]: {escape(last[0][:200])}")
            return
        vals = [metrics.get(o.metric, metrics.get(o.name, math.nan)) for o in self.objectives]
        record = TrialRecord(number, "COMPLETE", None, {k: float(v) for k, v in metrics.items() if _number(v)})
        for o, v in zip(self.objectives, vals):  # Ray reports objectives by name
            if _number(v):
                record.metrics.setdefault(o.metric, float(v))
        if all(_number(v) and math.isfinite(v) for v in vals):
            self.records.append(record)
        shown = "  ".join(f"{o.name} {v:.4g}" if _number(v) else f"{o.name} ?" for o, v in zip(self.objectives, vals))
        verdict = ""
        if not feasible(record, self.max_accuracy_drop):
            drop = record.metrics.get("accuracy_drop")
            verdict = (f"  [yellow]infeasible[/yellow] (drop {drop:.1f} > {self.max_accuracy_drop:g} points)"
                       if drop is not None else "  [yellow]infeasible[/yellow] (accuracy drop not recorded)")
        self.log(f"trial {number}: {shown}{verdict}  | {self._front_text(best=True)}")

    def _front_text(self, best: bool = False) -> str:
        split = split_feasible(self.records, self.max_accuracy_drop)
        front = pareto_front(split.candidates, self.objectives)
        if not front:
            return "front empty"
        if split.fallback:
            text = f"front {len(front)} (no trial feasible yet: {len(split.infeasible)} infeasible)"
        else:
            text = f"front {len(front)} feasible trial(s)"
        if best:
            top = front[0]  # pareto_front sorts best first on the first objective
            text += f", best {self.objectives[0].name}: trial {top.number}"
        return text


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
