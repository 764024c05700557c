"""`sketchwalk sweep | pareto | export`: registered into the `sketchwalk` command through the
`sketchwalk.commands` entry point, so `sketchwalk` itself never imports `search`."""
from __future__ import annotations

import argparse
from pathlib import Path

from sketchwalk.cli import command


def _console():
    from sketchwalk.console import make_console

    return make_console()


def _error(console, exc: Exception) -> int:
    from sketchwalk.console import print_error

    return print_error(console, exc)


# -- sweep ------------------------------------------------------------------------------------

def _sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", nargs="?", default=None, metavar="SWEEP.yaml",
                   help="sweep definition (default: sweeps/default.yaml: the bundled SmolLM2 on the CPU smoke "
                        "suite with local SQLite stores)")
    p.add_argument("--resume", metavar="SWEEP_ID", default=None,
                   help="resume an earlier sweep (its id is printed at start and is the directory name under "
                        "runs/sweeps/): finished trials are kept, interrupted ones re-run, MLflow runs re-attached")
    p.add_argument("--sweep-id", default=None, help="id for a new sweep (default: <name>-<UTC timestamp>)")
    p.add_argument("--trials", type=int, default=None, help="override budget.trials")
    p.add_argument("--wall-time", type=float, default=None, metavar="SECONDS",
                   help="override budget.wall_time_s (no new trial starts after it; a running one finishes)")
    p.add_argument("--suite", default=None, help="override the RULER suite (name, name@4k,8k, or YAML path)")
    p.add_argument("--concurrency", type=int, default=None, metavar="N",
                   help="override concurrency: trials in parallel, one GPU each (ray backend); a resume may change it")
    p.add_argument("--gpus-per-trial", type=_gpus_per_trial, default=None, metavar="G",
                   help="override resources.gpus (ray backend): 'auto', 0, a fraction in (0, 1] or a whole number. "
                        "A fraction packs several trials on one GPU (0.5: two per GPU); that raises throughput "
                        "when one trial leaves the GPU idle, but the packed trials share the GPU while their "
                        "latency is timed (see results/ray-scaling-h200/)")
    add_run_arguments(p, source="the file's")


def _gpus_per_trial(text: str):
    """'auto' or a number (validated with the spec: the error names resources.gpus)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: 'auto' or a number") from None


def add_run_arguments(p: argparse.ArgumentParser, *, source: str) -> None:
    """The options every sweep-driven command shares (`sweep`, `ablate`): driver backend, Ray address,
    samples, essays, tracking URI, work directory, progress. `source` names where defaults come from."""
    p.add_argument("--backend", choices=["optuna", "ray"], default=None, help=f"override {source} driver backend")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (e.g. ray-head:6379 or auto); default: start a local Ray")
    p.add_argument("--samples", type=int, default=None, metavar="N", help="override samples per task per length")
    p.add_argument("--essays", default=None, metavar="PATH", help="PaulGrahamEssays.json (default: $SKETCHWALK_ESSAYS)")
    p.add_argument("--tracking-uri", default=None, metavar="URI",
                   help=f"MLflow tracking URI (default: {source} tracking.uri, else sqlite:///runs/mlflow.db)")
    p.add_argument("--workdir", default=".", metavar="DIR", help="where runs/ (stores, outputs) lives (default: .)")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")

@command("sweep", arguments=_sweep_arguments,
         help="search SketchWalk configs for the accuracy/speed Pareto front (Optuna or Ray Tune) -> MLflow",
         description="Run a hyperparameter sweep over SketchWalkConfig fields: every trial evaluates the model "
                     "with one config on a RULER suite; the dense baseline is evaluated once; every trial is an "
                     "MLflow child run of the sweep's parent run. At the end the Pareto front is computed, "
                     "plotted (PNG + HTML) and tabulated (markdown + CSV) under runs/sweeps/<id>/, and the config "
                     "chosen by the file's export rule is written as best.yaml (loadable by `sketchwalk eval "
                     "--config`). Kill it at any time and continue with --resume <id>. With no arguments, "
                     "runs sweeps/default.yaml (CPU-friendly). All input is checked before any model loads.")
def cmd_sweep(args: argparse.Namespace) -> int:
    """`sketchwalk sweep`: exit 0 on success, 2 on bad input, 1 if no trial completed."""
    from sketchwalk.evaluation.plan import EvalInputError

    from tracking import TrackingError

    from .launch import prepare_sweep, run_sweep
    from .spec import SweepSpecError

    console = _console()
    workdir = Path(args.workdir)
    overrides = {"backend": args.backend, "budget.trials": args.trials, "budget.wall_time_s": args.wall_time,
                 "suite": args.suite,
                 "samples": args.samples, "essays": args.essays, "concurrency": args.concurrency,
                 "resources.gpus": args.gpus_per_trial}
    try:
        spec, sweep_id, earlier = prepare_sweep(args.file, resume=args.resume, workdir=workdir, overrides=overrides)
        if args.sweep_id is not None:
            if args.resume:
                raise SweepSpecError("<cli>", "--sweep-id and --resume exclude each other")
            sweep_id = args.sweep_id
        outcome = run_sweep(spec, sweep_id, workdir=workdir, address=args.address, resume=bool(args.resume),
                            progress=not args.no_progress,
                            tracking_uri=args.tracking_uri or (earlier.tracking_uri if earlier else None))
    except (SweepSpecError, EvalInputError, FileNotFoundError, TrackingError) as exc:
        return _error(console, exc)
    _print_outcome(console, outcome)
    return 0 if outcome.analysis.records and any(r.state == "COMPLETE" for r in outcome.analysis.records) else 1


def _cell(value) -> str:
    """Table cell text: floats to 4 significant digits (the CSV keeps full precision)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _print_outcome(console, outcome) -> None:
    from rich.markup import escape
    from rich.table import Table

    a, s = outcome.analysis, outcome.session
    split = a.feasibility
    what = ("complete trials, none feasible: infeasible front" if split and split.fallback
            else "complete trials" if not split or split.max_accuracy_drop is None
            else f"complete trials, {len(split.feasible)} feasible")
    table = Table(title=f"Pareto front of {s.sweep_id} ({len(a.front)} of "
                        f"{sum(r.state == 'COMPLETE' for r in a.records)} {what})")
    if a.table:
        for col in a.table[0]:
            table.add_column(str(col))
        for row in a.table:
            table.add_row(*[_cell(v) for v in row.values()])
    console.print(table)
    wall = f"; wall time {outcome.wall_s:.0f} s" if outcome.wall_s else ""  # `pareto` runs no trials
    console.print(f"trials: {outcome.counts.get('complete')} complete, {outcome.counts.get('failed')} failed{wall}",
                  highlight=False)
    if a.throughput:
        _print_throughput(console, a.throughput)
    for f in a.files:
        console.print(f"wrote {f}", highlight=False)
    for note in a.notes:  # why it stopped early, nothing feasible, a front within noise, no export
        console.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False)
    if a.exported:
        label = " [yellow](infeasible: see the note above)[/yellow]" if split and split.fallback else ""
        console.print(f"best config (trial {a.chosen.number}){label}: {a.exported}  ->  "
                      f"sketchwalk eval --config {a.exported}", highlight=False)
    console.print(mlflow_hint(s), highlight=False)


def mlflow_hint(session) -> str:
    """How to look at the sweep in MLflow: the `mlflow ui` command for a local store (a server's
    URI is opened as is) and the address of the sweep's parent run, which shows its front.

    `workflowType=machine_learning`: MLflow 3.17's UI opens every experiment in its GenAI view
    (traces overview, an assistant) unless told otherwise in the address or by its toggle; the
    experiment's `mlflow.experimentKind` tag (set by tracking.init_store) is not enough there."""
    uri = session.tracking_uri
    server = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    run = (f"{server}/#/experiments/{session.experiment_id}/runs/{session.parent_run_id}"
           f"?workflowType=machine_learning")
    start = "" if uri.startswith(("http://", "https://")) else f"mlflow ui --backend-store-uri {uri}, then "
    return f"MLflow: {start}open {run} (the sweep's run: front.png, front.md, best.yaml)"


def _print_throughput(console, t) -> None:
    from rich.table import Table

    down = f", {t.wall_s - t.span_s:.0f} s of downtime between runs left out" if t.wall_s - t.span_s > 1 else ""
    console.print(f"throughput: {t.complete} complete trials in {t.span_s:.0f} s of trial phase{down} = "
                  f"{t.trials_per_hour:.1f} trials/hour; slot occupancy {t.occupancy:.0%}", highlight=False)
    table = Table(title="workers")
    for col in ("role", "host", "pid", "GPUs", "GPU share", "trials", "model loads", "load s", "eval s"):
        table.add_column(col)
    for w in t.workers:
        table.add_row(w.role, w.host, w.pid, w.gpus or "(all)", w.gpu_share or "-", str(w.trials),
                      str(w.model_loads), f"{w.load_s:.1f}", "-" if w.eval_s is None else f"{w.eval_s:.1f}")
    console.print(table)


# -- pareto / export ----------------------------------------------------------------------------

def _sweep_ref_arguments(p: argparse.ArgumentParser) -> None:
    """SWEEP_ID and --workdir: which earlier sweep a command reads (pareto, export, store-check, screenshots)."""
    p.add_argument("sweep_id", metavar="SWEEP_ID", help="the sweep (directory name under runs/sweeps/)")
    p.add_argument("--workdir", default=".", help="where runs/ lives (default: .)")


def _analysis_arguments(p: argparse.ArgumentParser, *, export: bool) -> None:
    _sweep_ref_arguments(p)
    p.add_argument("--noise-aware", action="store_true", default=None,
                   help="a trial dominates another on accuracy only when their 95%% intervals do not overlap")
    if export:
        p.add_argument("--rule", default=None,
                       help="fastest-within-drop:POINTS | most-accurate-under:VALUE | knee (default: the sweep "
                            "file's analysis.export_rule)")
        p.add_argument("--out", default=None, help="YAML path (default: runs/sweeps/<id>/best.yaml)")


@command("pareto", arguments=lambda p: _analysis_arguments(p, export=False),
         help="recompute a sweep's Pareto front, table and plots from MLflow",
         description="Read every trial of a sweep from MLflow, compute the non-dominated set on the sweep's "
                     "objectives (optionally noise-aware), print the front table and write table (md, csv) and "
                     "plots (png, html) under runs/sweeps/<id>/, logged to the sweep's parent run.")
def cmd_pareto(args: argparse.Namespace) -> int:
    from .analysis import analyze
    from .session import load_session

    from .spec import SweepSpecError

    console = _console()
    try:
        session = load_session(args.sweep_id, Path(args.workdir))
    except (FileNotFoundError, SweepSpecError) as exc:
        return _error(console, exc)
    a = analyze(session, noise_aware=args.noise_aware, export=False)
    from types import SimpleNamespace

    _print_outcome(console, SimpleNamespace(analysis=a, session=session, wall_s=None,
                                            counts={"complete": sum(r.state == "COMPLETE" for r in a.records),
                                                    "failed": sum(r.state == "FAIL" for r in a.records)}))
    return 0


@command("export", arguments=lambda p: _analysis_arguments(p, export=True),
         help="export a config from a sweep's front as YAML (with provenance)",
         description="Pick one config from a sweep's finished trials by a rule -- fastest-within-drop:POINTS "
                     "(fastest trial at most POINTS below dense accuracy), most-accurate-under:VALUE (most "
                     "accurate with the speed objective <= VALUE), knee (the front's knee point) -- and write "
                     "it as YAML with its provenance. Only trials feasible under the sweep's constraints.max_accuracy_drop "
                     "are candidates; when none is, the most accurate finished trial is written, labelled "
                     "`feasible: false` in its provenance, with a warning naming the constraint. `sketchwalk eval "
                     "--config` and SketchWalkConfig.from_yaml accept the file unchanged.")
def cmd_export(args: argparse.Namespace) -> int:
    import shutil

    from .analysis import analyze
    from .session import load_session

    console = _console()
    try:
        session = load_session(args.sweep_id, Path(args.workdir))
        from .export import ExportRule

        if args.rule:
            ExportRule.parse(args.rule)
    except (FileNotFoundError, ValueError) as exc:  # SweepSpecError is a ValueError
        return _error(console, exc)
    a = analyze(session, noise_aware=args.noise_aware, rule=args.rule, export=True)
    if a.exported is None:
        return _error(console, LookupError(a.export_error))
    path = a.exported
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        path = Path(shutil.copyfile(a.exported, args.out))
    if a.feasibility.fallback:  # exported all the same (labelled in the file): say why, loudly
        from sketchwalk.console import print_error

        print_error(console, a.feasibility.note, label="warning")
    console.print(f"trial {a.chosen.number} -> {path}", highlight=False)
    return 0


# -- store check --------------------------------------------------------------------------------

def _store_check_arguments(p: argparse.ArgumentParser) -> None:
    _sweep_ref_arguments(p)
    p.add_argument("--out", default=None, help="JSON path (default: runs/sweeps/<id>/store_check.json)")


@command("store-check", arguments=_store_check_arguments,
         help="audit a sweep's MLflow store: runs = trials, no duplicates, nothing recorded missing",
         description="Read every run of a sweep from its MLflow store and check: one parent run; one run per "
                     "trial key and at most one dense baseline, all nested under the parent; no key twice; every "
                     "FINISHED run with its metrics, eval.json and (trials) config.yaml; nothing RUNNING after the "
                     "sweep ended; trial numbers without gaps; with the Optuna backend, as many trial runs as the "
                     "study has trials. Prints a table, writes JSON; exit 0 when complete, 1 otherwise.")
def cmd_store_check(args: argparse.Namespace) -> int:
    from rich.table import Table

    from .session import load_session, write_json
    from .spec import SweepSpecError
    from .store_check import check_store

    console = _console()
    try:
        session = load_session(args.sweep_id, Path(args.workdir))
    except (FileNotFoundError, SweepSpecError) as exc:
        return _error(console, exc)
    report = check_store(session)
    table = Table(title=f"store of sweep {report.sweep_id}")
    table.add_column("check")
    table.add_column("value")
    for name, value in (("parent runs", report.parents), ("parent status", report.parent_status),
                        ("trial runs", report.trial_runs), ("their status", report.status_counts),
                        ("Optuna study trials", "n/a" if report.study_trials is None else report.study_trials),
                        ("dense baseline runs", report.baseline_runs)):
        table.add_row(name, str(value))
    console.print(table)
    for problem in report.problems:
        console.print(f"[red]problem:[/red] {problem}", highlight=False)
    console.print("store complete" if report.ok else f"{len(report.problems)} problem(s)", highlight=False)
    path = write_json(Path(args.out) if args.out else session.sweep_dir / "store_check.json", report.to_dict())
    console.print(f"wrote {path}", highlight=False)
    return 0 if report.ok else 1


# -- screenshots --------------------------------------------------------------------------------

def _screenshot_arguments(p: argparse.ArgumentParser) -> None:
    _sweep_ref_arguments(p)
    p.add_argument("--out", default=None, metavar="DIR", help="where the PNGs go (default: runs/sweeps/<id>/screenshots/)")


@command("screenshots", arguments=_screenshot_arguments,
         help="render a sweep's MLflow UI pages (runs table, parent run, front plot, a trial's metrics) as PNGs",
         description="Start a throwaway MLflow server on the sweep's SQLite store (or use its http store), render "
                     "the experiment's runs table (the parent run with its child trials), the parent run, the front "
                     "plot as the UI shows it and the most accurate trial's metrics in headless Chromium, and write "
                     "the PNGs with screenshots.json (pages, URLs, a not-blank check). Needs Chromium on PATH "
                     "(Debian: apt-get install chromium; or SKETCHWALK_CHROMIUM=PATH). Exit 1 when a page renders blank.")
def cmd_screenshots(args: argparse.Namespace) -> int:
    from .screenshots import ScreenshotError, find_browser, take_screenshots
    from .session import load_session, write_json
    from .spec import SweepSpecError

    console = _console()
    try:
        session = load_session(args.sweep_id, Path(args.workdir))
        browser = find_browser()
    except (FileNotFoundError, SweepSpecError, ScreenshotError) as exc:
        return _error(console, exc)
    out = Path(args.out) if args.out else session.sweep_dir / "screenshots"
    try:
        report = take_screenshots(session, out, browser)
    except ScreenshotError as exc:
        return _error(console, exc)
    path = write_json(out / "screenshots.json", report)
    for shot in report["pages"]:
        console.print(f"{shot['page']}: {out / shot['file']} ({shot['distinct_colours']} colours)", highlight=False)
    if report["blank_pages"]:
        console.print(f"[red]blank:[/red] {', '.join(report['blank_pages'])}", highlight=False)
    console.print(f"wrote {path}", highlight=False)
    return 0 if report["ok"] else 1
