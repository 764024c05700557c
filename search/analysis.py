"""End-of-sweep analysis (also `sketchwalk pareto` / `sketchwalk export`): records from MLflow ->
Pareto front -> table, plots -> best-config YAML, all logged to the sweep's parent run."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from tracking.names import TAG_FRONT_FEASIBLE, TAG_NOTES, TAG_STOP_REASON  # parent-run tags (stop reason: run_sweep)

from .records import TrialRecord
from .feasibility import FeasibleSplit, constraint_label, feasible, noise_note, split_feasible
from .session import SweepSession, load_records, write_json
from .throughput import Throughput, sweep_throughput


@dataclasses.dataclass
class Analysis:
    """What the analysis produced: the front (TrialRecords), the files written, the exported pick.

    feasibility: the COMPLETE trials split by the constraint (`search.feasibility`); when none is
    feasible (`feasibility.fallback`) the front and the export are the infeasible trials', labelled.
    notes: lines a reader must see (why the sweep stopped early, why nothing is feasible, a front
    within noise, why nothing was exported), in the printed output, summary.json and the parent run.
    """

    records: list[TrialRecord]
    baseline: Optional[TrialRecord]
    front: list[TrialRecord]
    files: list[Path]
    table: list[dict]
    exported: Optional[Path] = None
    chosen: Optional[TrialRecord] = None
    export_error: Optional[str] = None
    throughput: Optional[Throughput] = None
    feasibility: Optional[FeasibleSplit] = None
    stop_reason: Optional[str] = None
    noise: Optional[str] = None
    notes: list[str] = dataclasses.field(default_factory=list)


#: Analysis files logged at the parent run's artifact root (what the MLflow UI shows first); the
#: others go under analysis/.
MAIN_ARTIFACTS = ("front.png", "front.md", "best.yaml")


def analyze(session: SweepSession, *, noise_aware: Optional[bool] = None, rule: Optional[str] = None,
            export: bool = True, log: bool = True, stop_reason: Optional[str] = None) -> Analysis:
    """Compute the front of the sweep's finished, feasible trials (all finished trials, labelled
    infeasible, when none is feasible); write table (md + csv), front plot and parallel coordinates
    (png + html), summary.json and, with `export`, the chosen config YAML into the sweep directory;
    log them all to the parent run when `log`. `stop_reason`: why the sweep's trial phase ended (from
    `run_sweep`); None reads the parent run's tag (set by the sweep that ran)."""
    from .export import ExportRule, choose, export_yaml, most_accurate
    from .pareto import front_table, pareto_front, write_front_table
    from .plots import plot_front, plot_parallel_coordinates

    spec, objectives = session.spec, session.objectives
    noise_aware = spec.analysis.noise_aware if noise_aware is None else noise_aware
    tracker = session.tracker()
    runs = tracker.children()  # one read for the records and the throughput
    records, baseline = load_records(session, runs)
    limit = spec.constraints.max_accuracy_drop
    split = split_feasible(records, limit)
    front = pareto_front(split.candidates, objectives, noise_aware=noise_aware)
    out = session.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    table = front_table(front, objectives, baseline=baseline)
    if limit is not None:  # the constraint's verdict beside each row ("no": the fallback front)
        table = [{"number": row["number"], "feasible": "yes" if feasible(r, limit) else "no",
                  **{k: v for k, v in row.items() if k != "number"}} for row, r in zip(table, front)]
    if stop_reason is None and session.parent_run_id:
        stop_reason = tracker.run_tags(session.parent_run_id).get(TAG_STOP_REASON)
    result = Analysis(records, baseline, front, [], table, feasibility=split, stop_reason=stop_reason,
                      noise=noise_note(front, baseline), throughput=sweep_throughput(runs, slots=spec.concurrency))
    files = result.files
    files += write_front_table(table, out / "front")
    complete = [r for r in records if r.state == "COMPLETE" and r.config is not None]
    if complete and len(objectives) >= 2:  # nothing to plot before the first finished trial
        files += plot_front(complete, objectives, front, baseline=baseline, path_stem=out / "front",
                            max_accuracy_drop=limit, noise=result.noise is not None)
        files += plot_parallel_coordinates(complete, objectives, list(spec.space), path_stem=out / "parallel")
    if export:
        rule_text = rule or spec.analysis.export_rule
        prov = provenance(session, rule_text)
        try:
            if split.fallback:
                # Nothing meets the constraint: hand over the most accurate trial, labelled, rather than
                # nothing (a newcomer's sweep must end with a config to try); the rule is not applied.
                chosen = most_accurate(split.infeasible, objectives)
                prov.update(feasible=False, rule=None, selected_by=f"most accurate finished trial (none is feasible "
                                                                   f"under {constraint_label(limit)})")
                rule_text = None
            elif split.feasible:
                chosen = choose(split.feasible, objectives, ExportRule.parse(rule_text), baseline=baseline)
                prov.update(feasible=True)
            else:
                raise LookupError(no_finished_trial(records))
            result.chosen = chosen
            result.exported = export_yaml(chosen, out / "best.yaml", provenance=prov, rule=rule_text,
                                          objectives=objectives)
            files.append(result.exported)
        except LookupError as exc:
            result.export_error = str(exc)
    elif (out / "best.yaml").is_file():
        # `sketchwalk pareto` exports nothing: the sweep's best.yaml stays its answer, and summary.json
        # must keep saying so rather than "exported": null.
        import yaml

        trial = (yaml.safe_load((out / "best.yaml").read_text()) or {}).get("provenance", {}).get("trial")
        result.chosen = next((r for r in records if r.number == trial), None)
        result.exported = out / "best.yaml" if result.chosen is not None else None
    result.notes = [n for n in (_early_stop(stop_reason), split.note, result.noise,
                                f"no best.yaml: {result.export_error}" if result.export_error else None) if n]
    files.append(write_json(out / "summary.json", summary(session, result)))
    if log and session.parent_run_id:
        for f in files:
            tracker.log_file(session.parent_run_id, str(f), None if f.name in MAIN_ARTIFACTS else "analysis")
        tracker.log_metrics(session.parent_run_id, {
            "trials_complete": sum(r.state == "COMPLETE" for r in records),
            "trials_failed": sum(r.state == "FAIL" for r in records),
            "trials_feasible": len(split.feasible),
            "front_size": len(front)})
        if result.chosen is not None:  # the exported trial's objectives: metric columns on the parent row
            tracker.log_metrics(session.parent_run_id, {f"best.{o.metric}": result.chosen.value(o) for o in objectives})
        if result.throughput:
            tracker.log_metrics(session.parent_run_id, {"trials_per_hour": result.throughput.trials_per_hour,
                                                        "trial_phase_s": result.throughput.span_s,
                                                        "worker_occupancy": result.throughput.occupancy})
        tracker.set_tags(session.parent_run_id, {
            TAG_NOTES: "\n".join(result.notes) or "none", TAG_FRONT_FEASIBLE: str(not split.fallback).lower(),
            # The run's description in the MLflow UI: the front table and the notes, on the run's page.
            "mlflow.note.content": run_description(session, result)})
    return result


def _early_stop(stop_reason: Optional[str]) -> Optional[str]:
    # Only a stop before the trial budget was spent needs the reader's attention.
    return stop_reason if stop_reason and not stop_reason.startswith("trials:") else None


def no_finished_trial(records: list[TrialRecord]) -> str:
    """Why there is nothing to export when no trial finished: the counts and where the errors are."""
    if not records:
        return "no finished trial to export: no trial has run yet"
    failed = sum(r.state == "FAIL" for r in records)
    other = len(records) - failed
    return (f"no finished trial to export: {len(records)} trial(s), {failed} failed, {other} interrupted or running; "
            f"the failed trials' errors are in their MLflow runs (tag sketchwalk.error, artifact error.txt)")


def run_description(session: SweepSession, a: "Analysis") -> str:
    """Markdown for the parent run's MLflow description: objectives, notes, the front table, the export."""
    from .pareto import markdown_table

    lines = [f"Sketch&Walk sweep `{session.sweep_id}`: objectives "
             + ", ".join(f"{o.direction} {o.name} ({o.unit})" for o in session.objectives), ""]
    lines += [f"**Note:** {n}" for n in a.notes] + ([""] if a.notes else [])
    title = "Pareto front" + (" (no trial feasible: infeasible trials shown)" if a.feasibility and a.feasibility.fallback
                              else "")
    lines += [f"### {title}", "", markdown_table(a.table), ""]
    if a.exported:
        lines.append(f"Exported trial {a.chosen.number} as `best.yaml` (artifact): `sketchwalk eval --config best.yaml`")
    return "\n".join(lines)


def provenance(session: SweepSession, rule: str) -> dict:
    """Where an exported config came from (written beside it in the YAML)."""
    spec = session.spec
    return {"sweep_id": session.sweep_id, "model": spec.model, "suite": spec.suite, "samples": spec.samples,
            "tracking_uri": session.tracking_uri, "experiment_id": session.experiment_id,
            "parent_run_id": session.parent_run_id, "rule": rule,
            "objectives": [f"{o.direction} {o.name}" for o in session.objectives]}


def summary(session: SweepSession, a: Analysis) -> dict:
    """The sweep in one JSON: counts, objectives, the front (numbers, values, configs, feasibility), the
    export (or `export_error`), `stop_reason`, `feasibility`, `noise` and the `notes` printed at the end."""
    limit = session.spec.constraints.max_accuracy_drop

    def row(r: TrialRecord) -> dict:
        return {"number": r.number, "state": r.state, "feasible": feasible(r, limit), "run_id": r.run_id,
                "config": None if r.config is None else r.config_fields,
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
            "stop_reason": a.stop_reason,
            "feasibility": a.feasibility.to_dict() if a.feasibility else None,
            "front_feasible": not (a.feasibility and a.feasibility.fallback),
            "noise": a.noise, "notes": a.notes,
            "throughput": a.throughput.to_dict() if a.throughput else None}
