"""End-of-sweep analysis (also `sketchwalk pareto` / `sketchwalk export`): records from MLflow ->
Pareto front -> table, plots -> best-config YAML, all logged to the sweep's parent run."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from .records import Objective, TrialRecord
from .session import SweepSession, feasible, load_records, write_json
from .throughput import Throughput, sweep_throughput


@dataclasses.dataclass
class Analysis:
    """What the analysis produced: the front (TrialRecords), the files written, the exported pick."""

    records: list[TrialRecord]
    baseline: Optional[TrialRecord]
    front: list[TrialRecord]
    files: list[Path]
    table: list[dict]
    exported: Optional[Path] = None
    chosen: Optional[TrialRecord] = None
    export_error: Optional[str] = None
    throughput: Optional[Throughput] = None


def analyze(session: SweepSession, *, noise_aware: Optional[bool] = None, rule: Optional[str] = None,
            export: bool = True, log: bool = True) -> Analysis:
    """Compute the front of the sweep's finished, feasible trials; write table (md + csv), front plot
    and parallel coordinates (png + html) and, with `export`, the chosen config YAML into the sweep
    directory; log them all to the parent run when `log`."""
    from .export import ExportRule, choose, export_yaml
    from .pareto import front_table, pareto_front, write_front_table
    from .plots import plot_front, plot_parallel_coordinates

    spec, objectives = session.spec, session.objectives
    noise_aware = spec.analysis.noise_aware if noise_aware is None else noise_aware
    runs = session.tracker().children()  # one read for the records and the throughput
    records, baseline = load_records(session, runs)
    candidates = [r for r in records if r.state == "COMPLETE" and feasible(r, spec)]
    front = pareto_front(candidates, objectives, noise_aware=noise_aware)
    out = session.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    table = front_table(front, objectives, baseline=baseline)
    files = list(write_front_table(table, out / "front"))
    complete = [r for r in records if r.state == "COMPLETE" and r.config is not None]
    if complete and len(objectives) >= 2:  # nothing to plot before the first finished trial
        files += plot_front(complete, objectives, front, baseline=baseline, path_stem=out / "front")
        files += plot_parallel_coordinates(complete, objectives, list(spec.space), path_stem=out / "parallel")
    result = Analysis(records, baseline, front, files, table,
                      throughput=sweep_throughput(runs, slots=spec.concurrency))
    if export and candidates:
        rule_text = rule or spec.analysis.export_rule
        try:
            chosen = choose(candidates, objectives, ExportRule.parse(rule_text), baseline=baseline)
            result.chosen = chosen
            result.exported = export_yaml(chosen, out / "best.yaml", provenance=provenance(session, rule_text),
                                          rule=rule_text, objectives=objectives)
            files.append(result.exported)
        except LookupError as exc:
            result.export_error = str(exc)
    files.append(write_json(out / "summary.json", summary(session, result)))
    if log and session.parent_run_id:
        tracker = session.tracker()
        for f in files:
            tracker.log_file(session.parent_run_id, str(f), "analysis")
        tracker.log_metrics(session.parent_run_id, {
            "trials_complete": sum(r.state == "COMPLETE" for r in records),
            "trials_failed": sum(r.state == "FAIL" for r in records),
            "front_size": len(front)})
        if result.throughput:
            tracker.log_metrics(session.parent_run_id, {"trials_per_hour": result.throughput.trials_per_hour,
                                                        "trial_phase_s": result.throughput.span_s,
                                                        "worker_occupancy": result.throughput.occupancy})
    return result


def provenance(session: SweepSession, rule: str) -> dict:
    """Where an exported config came from (written beside it in the YAML)."""
    spec = session.spec
    return {"sweep_id": session.sweep_id, "model": spec.model, "suite": spec.suite, "samples": spec.samples,
            "tracking_uri": session.tracking_uri, "experiment_id": session.experiment_id,
            "parent_run_id": session.parent_run_id, "rule": rule,
            "objectives": [f"{o.direction} {o.name}" for o in session.objectives]}


def summary(session: SweepSession, a: Analysis) -> dict:
    """The sweep in one JSON: counts, objectives, the front (numbers, values, configs), the export."""
    def row(r: TrialRecord) -> dict:
        return {"number": r.number, "state": r.state, "run_id": r.run_id, "config": r.config,
                "objectives": {o.name: r.value(o) for o in session.objectives},
                "accuracy_interval": list(r.accuracy_interval), "metrics": r.metrics}

    return {"sweep_id": session.sweep_id, "objectives": [dataclasses.asdict(o) for o in session.objectives],
            "trials": {"complete": sum(r.state == "COMPLETE" for r in a.records),
                       "failed": sum(r.state == "FAIL" for r in a.records),
                       "other": sum(r.state not in ("COMPLETE", "FAIL") for r in a.records)},
            "baseline": row(a.baseline) if a.baseline else None,
            "front": [row(r) for r in a.front],
            "exported": str(a.exported) if a.exported else None,
            "chosen_trial": a.chosen.number if a.chosen else None, "export_error": a.export_error,
            "throughput": a.throughput.to_dict() if a.throughput else None}
