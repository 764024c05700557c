"""The end of a sweep as a newcomer meets it (issue 21), on a synthetic sweep in a real SQLite MLflow
store (no model): the feasibility rule shared by display, plots and analysis; a constraint nothing
meets still ends with a labelled front and best.yaml; stop reasons, noise and the export's message
name what happened, in the output, summary.json and the parent run."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from search.feasibility import feasible, noise_note, split_feasible
from search.records import Objective, TrialRecord
from sketchwalk.config import SketchWalkConfig

OBJ = [Objective("accuracy", "maximize"), Objective("density", "minimize")]


def rec(number, acc, density, drop, *, lo=None, hi=None, state="COMPLETE"):
    m = {"accuracy": acc, "density": density, "accuracy_lo": acc - 5 if lo is None else lo,
         "accuracy_hi": acc + 5 if hi is None else hi}
    if drop is not None:
        m["accuracy_drop"] = drop
    return TrialRecord(number, state, SketchWalkConfig(density=density), m)


# -- the one rule -------------------------------------------------------------------------------

def test_feasible_rule():
    assert feasible(rec(0, 40, 0.3, 50.0), 50) and not feasible(rec(0, 40, 0.3, 50.5), 50)
    assert feasible(rec(0, 40, 0.3, 80.0), None)  # no constraint
    assert not feasible(rec(0, 40, 0.3, None), 50)  # drop unknown: nothing shows it meets the limit
    assert not feasible(rec(0, 40, 0.3, math.nan), 50)
    split = split_feasible([rec(0, 40, 0.3, 60.0), rec(1, 45, 0.5, 55.0), rec(2, 0, 0.1, 1.0, state="FAIL")], 50)
    assert split.fallback and [r.number for r in split.candidates] == [0, 1] and split.feasible == []
    assert "all 2 finished trial(s) are infeasible under max_accuracy_drop = 50 points" in split.note
    assert "smallest drop is 55.0 points, trial 1" in split.note
    assert split_feasible([rec(0, 40, 0.3, 10.0), rec(1, 45, 0.5, 55.0)], 50).note is None


def test_noise_note_when_every_front_interval_overlaps_dense():
    dense = TrialRecord(-1, "COMPLETE", None, {"accuracy": 60, "accuracy_lo": 10, "accuracy_hi": 100})
    wide = [rec(0, 50, 0.3, 10, lo=0, hi=100), rec(1, 30, 0.2, 30, lo=0, hi=80)]
    assert "not distinguishable from noise" in noise_note(wide, dense)
    assert "[10, 100]" in noise_note(wide, dense)
    apart = wide + [rec(2, 2, 0.1, 58, lo=0, hi=5)]  # one front trial measurably below dense
    assert noise_note(apart, dense) is None
    assert noise_note([], dense) is None


def test_display_applies_the_analysis_rule(capsys, monkeypatch):
    """The live display said 'front 1 trial(s)' for infeasible trials; now it judges each trial by
    `feasible` and names the infeasible front as such."""
    monkeypatch.setenv("COLUMNS", "40")
    from search.display import SweepDisplay

    d = SweepDisplay(OBJ, 3, enabled=False, max_accuracy_drop=50)
    d.trial_done(0, {"accuracy": 20.0, "density": 0.3, "accuracy_drop": 62.5}, None)
    d.trial_done(1, {"accuracy": 80.0, "density": 0.5, "accuracy_drop": 2.5}, None)
    d.trial_done(2, {"accuracy": 70.0, "density": 0.2, "accuracy_drop": 12.5}, None)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3  # one line per trial, none wrapped
    assert "infeasible (drop 62.5 > 50 points)" in lines[0] and "no trial feasible yet: 1 infeasible" in lines[0]
    assert "infeasible" not in lines[1] and "front 1 feasible trial(s), best accuracy: trial 1" in lines[1]
    assert "front 2 feasible trial(s)" in lines[2]


# -- a synthetic sweep in MLflow ------------------------------------------------------------------

def _sweep(tmp_path: Path, trials: list[dict], *, max_drop=50, dense=(90.0, 70.0, 100.0), sweep_id="syn"):
    """A sweep whose trials were 'evaluated' already: MLflow parent, baseline and child runs with the
    given metrics (accuracy, accuracy_lo/hi, density; accuracy_drop from the dense accuracy)."""
    from search.session import BASELINE_KEY, open_session, start_trial
    from search.spec import config_from_params, parse_spec

    spec = parse_spec({"name": "syn", "space": {"density": {"type": "float", "low": 0.1, "high": 0.9}},
                       "constraints": {"max_accuracy_drop": max_drop}, "budget": {"trials": max(1, len(trials))},
                       "tracking": {"experiment": "syn"}})
    session = open_session(spec, sweep_id, OBJ, workdir=tmp_path)
    tracker = session.tracker()
    base = tracker.child_run(BASELINE_KEY, role="baseline", name="dense baseline", params={"attention": "dense"})
    tracker.log_metrics(base.run_id, {"accuracy": dense[0], "accuracy_lo": dense[1], "accuracy_hi": dense[2],
                                      "density": 1.0})
    tracker.finish(base.run_id)
    for n, t in enumerate(trials):
        run = start_trial(session, n, config_from_params(spec, {"density": t["density"]}), tracker)
        tracker.log_metrics(run.run_id, {**t, "accuracy_drop": dense[0] - t["accuracy"]})
        tracker.finish(run.run_id)
    return session


def test_nothing_feasible_still_ends_with_a_labelled_front_and_export(tmp_path, capsys):
    """The issue's sweep: every trial > 50 points below dense. Before: empty front, no best.yaml,
    `"export_error": null`, `export` said 'no finished trial'. Now the infeasible trials form the
    front, labelled; best.yaml is the most accurate one with `feasible: false`; the reason is in the
    notes, summary.json and the parent run's tags; `export` warns with it and exits 0."""
    from search.analysis import analyze
    from sketchwalk import cli

    session = _sweep(tmp_path, [{"accuracy": 20.0, "accuracy_lo": 0.0, "accuracy_hi": 40.0, "density": 0.3},
                                {"accuracy": 35.0, "accuracy_lo": 10.0, "accuracy_hi": 60.0, "density": 0.6}])
    a = analyze(session, stop_reason="trials: the budget of 2 trial(s) was spent (2 complete)")
    assert a.feasibility.fallback and [r.number for r in a.front] == [1, 0]
    assert [row["feasible"] for row in a.table] == ["no", "no"]
    assert a.chosen.number == 1 and a.export_error is None  # the most accurate, not the knee
    best = yaml.safe_load(a.exported.read_text())
    assert best["provenance"]["feasible"] is False and "none is feasible" in best["provenance"]["selected_by"]
    assert SketchWalkConfig.from_yaml(a.exported).density == pytest.approx(0.6)
    out = session.sweep_dir
    summary = json.loads((out / "summary.json").read_text())
    assert summary["front_feasible"] is False and len(summary["front"]) == 2
    assert [r["feasible"] for r in summary["front"]] == [False, False]
    assert summary["feasibility"] == {"max_accuracy_drop": 50.0, "feasible": 0, "infeasible": 2, "fallback": True,
                                      "infeasible_trials": [0, 1]}
    assert summary["stop_reason"].startswith("trials:")
    assert any("all 2 finished trial(s) are infeasible under max_accuracy_drop = 50 points" in n
               for n in summary["notes"])
    assert "| no |" in (out / "front.md").read_text()
    tags = session.tracker().run_tags(session.parent_run_id)
    assert tags["sketchwalk.front_feasible"] == "false" and "infeasible" in tags["sketchwalk.notes"]
    assert "Pareto front (no trial feasible" in tags["mlflow.note.content"]

    # The UI opens on the runs: trials named by their config, the front as the parent's main artifacts.
    names = {c.tags["mlflow.runName"] for c in session.tracker().children("trial")}
    assert names == {"t0 d0.3", "t1 d0.6"}
    root = {f.path for f in session.tracker().client.list_artifacts(session.parent_run_id)}
    assert {"front.png", "front.md", "best.yaml", "analysis"} <= root

    capsys.readouterr()
    rc = cli.main(["export", "syn", "--workdir", str(tmp_path), "--out", str(tmp_path / "b.yaml")])
    assert rc == 0 and SketchWalkConfig.from_yaml(tmp_path / "b.yaml").density == pytest.approx(0.6)
    warning, done = capsys.readouterr().out.splitlines()
    assert warning.startswith("warning: all 2 finished trial(s) are infeasible under max_accuracy_drop = 50 points")
    assert done == f"trial 1 -> {tmp_path / 'b.yaml'}"


def test_export_names_the_reason_when_no_trial_finished(tmp_path, capsys):
    from search.analysis import analyze
    from search.session import start_trial
    from search.spec import config_from_params
    from sketchwalk import cli

    session = _sweep(tmp_path, [], sweep_id="none")
    tracker = session.tracker()
    run = start_trial(session, 0, config_from_params(session.spec, {"density": 0.5}), tracker)
    tracker.finish(run.run_id, "FAILED", error="RuntimeError: boom")
    a = analyze(session)
    assert a.exported is None and a.export_error.startswith("no finished trial to export: 1 trial(s), 1 failed")
    summary = json.loads((session.sweep_dir / "summary.json").read_text())
    assert summary["export_error"] == a.export_error and summary["front"] == []
    capsys.readouterr()
    assert cli.main(["export", "none", "--workdir", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().out.splitlines()
    assert "1 failed" in line and "sketchwalk.error" in line


def test_feasible_trials_are_the_front_and_plots_mark_the_rest(tmp_path):
    from search.analysis import analyze

    session = _sweep(tmp_path, [{"accuracy": 85.0, "accuracy_lo": 80.0, "accuracy_hi": 90.0, "density": 0.5},
                                {"accuracy": 10.0, "accuracy_lo": 0.0, "accuracy_hi": 20.0, "density": 0.1},
                                {"accuracy": 60.0, "accuracy_lo": 50.0, "accuracy_hi": 69.0, "density": 0.3}])
    a = analyze(session)
    assert not a.feasibility.fallback and [r.number for r in a.front] == [0, 2]  # trial 1: drop 80 > 50
    assert a.chosen.number in (0, 2) and yaml.safe_load(a.exported.read_text())["provenance"]["feasible"] is True
    html = (session.sweep_dir / "front.html").read_text()
    assert "infeasible (drop \\u003e 50)" in html  # plotly's JSON escapes '>'

    assert "constraint: dense - 50 points" in html
    assert a.noise is None  # trial 2's interval [50, 69] lies below dense's [70, 100]: measurably worse
    # `sketchwalk pareto` (no export) keeps the sweep's answer in summary.json.
    again = analyze(session, export=False)
    summary = json.loads((session.sweep_dir / "summary.json").read_text())
    assert again.chosen.number == a.chosen.number and summary["exported"] == str(a.exported)


def test_stop_reason_names_the_budget_that_stopped_the_sweep():
    """`make sweep` stopped after 2 of 8 trials on its wall-time budget and nothing said so."""
    from search.launch import stop_reason
    from search.spec import parse_spec

    spec = parse_spec({"name": "s", "space": {"density": {"type": "float", "low": 0.1, "high": 0.9}},
                       "budget": {"trials": 8, "wall_time_s": 780}})
    early = stop_reason(spec, {"complete": 2, "failed": 0}, 800.0, sweep_id="s-1")
    assert early.startswith("wall_time: the 780 s wall-time budget") and "after 2 of 8 trial(s)" in early
    assert "sketchwalk sweep --resume s-1 --trials 8 --wall-time 1560" in early
    assert stop_reason(spec, {"complete": 7, "failed": 1}, 800.0, sweep_id="s-1").startswith("trials: the budget of 8")
    assert stop_reason(spec, {"complete": 3, "failed": 0}, 10.0, sweep_id="s-1").startswith("ended: 3 trial(s)")


def test_dense_baseline_is_listed_once(tmp_path, monkeypatch):
    """Issue 21: "dense baseline" appeared twice in the legend of the front chart MLflow shows (the
    star and the dashed line at its accuracy had an entry each). Now one entry; the interactive
    chart has one baseline trace; and MLflow holds one run named "dense baseline" per sweep, also
    when a resume logs the baseline again (real SQLite store)."""
    from matplotlib.figure import Figure
    from mlflow.tracking import MlflowClient

    from search.analysis import analyze
    from search.session import log_baseline
    from sketchwalk.evaluation import EvalResult

    legends = []
    savefig = Figure.savefig

    def spy(fig, *args, **kwargs):
        legends.extend(t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts())
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    session = _sweep(tmp_path, [{"accuracy": 80.0, "accuracy_lo": 60.0, "accuracy_hi": 95.0, "density": 0.3},
                                {"accuracy": 85.0, "accuracy_lo": 70.0, "accuracy_hi": 100.0, "density": 0.6}])
    overall = {"mean": 90.0, "lo": 70.0, "hi": 100.0, "n": 1}
    again = EvalResult("m", None, "cpu", "float32", {"overall": overall}, {}, {}, {"prefill": 1.0}, None, [])
    log_baseline(session, again, {"accuracy": 90.0})  # a resume: the FINISHED run is kept as it is
    analyze(session, stop_reason="trials: the budget of 2 trial(s) was spent (2 complete)")
    baseline_entries = [t for t in legends if "dense" in t and "constraint" not in t]
    assert baseline_entries == ["dense baseline"], legends
    assert (session.sweep_dir / "front.html").read_text().count('"name":"dense baseline"') == 1
    runs = MlflowClient(session.tracking_uri).search_runs([session.experiment_id])
    names = [r.info.run_name for r in runs]
    assert names.count("dense baseline") == 1 and len(names) == 4, names  # parent, baseline, 2 trials
