"""The sweep's live display: a progress bar over trials (done / running / failed) and one line
per finished trial with its objectives and the size and best point of the front so far."""
from __future__ import annotations

import math
from typing import Any, Optional

from sketchwalk.console import make_console

from .records import Objective


class SweepDisplay:
    """Rich progress over the trial budget; `trial_done` / `status` are the drivers' callbacks."""

    def __init__(self, objectives: list[Objective], total: Optional[int], *, enabled: bool = True):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.objectives = objectives
        self.console = make_console()
        self.points: list[tuple[int, list[float]]] = []
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
                             state=f"done {done}  running {running}  failed {failed}  front {len(self._front())}")

    def trial_done(self, number: int, metrics: Optional[dict[str, Any]], error: Optional[str]) -> None:
        """One trial finished: print its objectives (or its error) and the front so far."""
        if metrics is None:
            last = (error or "").strip().splitlines()[-1:] or ["error"]
            self.log(f"[red]trial {number} failed[/red]: {last[0][:200]}")
            return
        vals = [metrics.get(o.metric, metrics.get(o.name, math.nan)) for o in self.objectives]
        if all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals):
            self.points.append((number, [float(v) for v in vals]))
        shown = "  ".join(f"{o.name} {v:.4g}" for o, v in zip(self.objectives, vals))
        front = self._front()
        best = max(front, key=lambda p: p[1][0] if self.objectives[0].maximize else -p[1][0]) if front else None
        best_txt = f"  | front {len(front)} trial(s), best {self.objectives[0].name}: trial {best[0]}" if best else ""
        self.log(f"trial {number}: {shown}{best_txt}")

    def _front(self) -> list[tuple[int, list[float]]]:
        # Cheap running front for the display only; the analysis uses search.pareto.
        signs = [1.0 if o.maximize else -1.0 for o in self.objectives]
        pts = [(n, [s * v for s, v in zip(signs, vals)]) for n, vals in self.points]

        def dominated(a, b):  # b dominates a
            return all(x >= y for x, y in zip(b, a)) and any(x > y for x, y in zip(b, a))

        keep = {n for n, v in pts if not any(dominated(v, w) for _, w in pts)}
        return [(n, vals) for n, vals in self.points if n in keep]
