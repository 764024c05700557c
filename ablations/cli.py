"""`sketchwalk ablate`: registered into the `sketchwalk` command through the `sketchwalk.commands`
entry point (as search/cli.py is), so `sketchwalk` itself never imports `ablations`."""
import argparse
import math
from pathlib import Path

from search.cli import add_run_arguments, mlflow_hint
from sketchwalk.cli import command
from sketchwalk.console import print_error

REPORT = "report"


def _arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("examples: `sketchwalk ablate ablations/plans/tiny.yaml` (CPU, minutes); `sketchwalk ablate "
                "ablations/plans/components.yaml --essays PaulGrahamEssays.json` (GPU); `sketchwalk ablate --resume "
                "ID`; `sketchwalk ablate report ID`.")
    p.add_argument("plan", nargs="?", default=None, metavar="PLAN.yaml | report",
                   help="the ablation plan to run (e.g. ablations/plans/tiny.yaml, ablations/plans/components.yaml), "
                        "or the word 'report' followed by an ablation ID to rebuild that ablation's report")
    p.add_argument("report_id", nargs="?", default=None, metavar="ID", help=argparse.SUPPRESS)
    p.add_argument("--resume", metavar="ID", default=None,
                   help="continue an ablation (its id is printed at start and names runs/ablations/<id>/): "
                        "finished variants are kept, interrupted ones re-run, MLflow runs re-attached")
    p.add_argument("--report-only", action="store_true",
                   help="with --resume ID: only rebuild the report from MLflow (same as `ablate report ID`)")
    p.add_argument("--id", dest="ablation_id", default=None, metavar="ID", help="id for a new ablation (default: <name>-<UTC timestamp>)")
    add_run_arguments(p, source="the plan's")

@command("ablate", arguments=_arguments,
         help="ablate Sketch&Walk's components and compare baselines at matched density -> table, plots, MLflow",
         description="Evaluate every variant of an ablation plan once on the plan's RULER suite: base (an inline "
                     "config, an exported best.yaml via base_from, or the paper defaults at density 0.2), "
                     "component switches (walk, sketch, head aggregation, sparsity exponent, sink, skipped layers, "
                     "phases), one-factor sweeps, baselines (dense, oracle, streaming, random, one-hop) and density "
                     "levels per selector. Variants run through the sweep machinery (optuna or ray backend): one "
                     "MLflow parent run, one child run per variant; kill it at any time and continue with --resume "
                     "ID. The report (runs/ablations/<id>/report.md, .csv, .json, differences.png, "
                     "density_curves.png; also logged to the parent run) gives accuracy with its 95% interval, "
                     "prefill and decode latency, measured density, and each variant's accuracy difference to "
                     "base with a paired-bootstrap 95% interval. The whole plan is checked before any model loads. "
                     "`sketchwalk ablate report ID` rebuilds the report without evaluating anything.")
def cmd_ablate(args: argparse.Namespace) -> int:
    """`sketchwalk ablate`: exit 0 when every variant finished, 1 when some did not (the report is
    written anyway), 2 on bad input."""
    from sketchwalk.evaluation.plan import EvalInputError
    from search.spec import SweepSpecError
    from tracking.retry import TrackingError

    from .plan import PlanError
    from .runner import prepare_ablation, report_ablation, run_ablation

    console = _console()
    workdir = Path(args.workdir)
    try:
        report_id = _report_target(args)
        if report_id is not None:
            report = report_ablation(report_id, workdir=workdir)
            _print_report(console, report_id, report, workdir)
            return _exit_code(report)
        prep = prepare_ablation(args.plan, resume=args.resume, workdir=workdir, ablation_id=args.ablation_id,
                                samples=args.samples, essays=args.essays, backend=args.backend)
        console.print(f"ablation [bold]{prep.ablation_id}[/bold]: {len(prep.variants)} variants "
                      f"({', '.join(v.name for v in prep.variants)}) on {prep.spec.model}, suite {prep.spec.suite}",
                      highlight=False)
        outcome = run_ablation(prep, workdir=workdir, address=args.address, progress=not args.no_progress,
                               tracking_uri=args.tracking_uri)
    except (PlanError, SweepSpecError, EvalInputError, FileNotFoundError, TrackingError) as exc:
        return print_error(console, exc)
    _print_report(console, prep.ablation_id, outcome.report, workdir)
    console.print(mlflow_hint(outcome.sweep.session), highlight=False)
    return _exit_code(outcome.report)


def _report_target(args: argparse.Namespace):
    """The ablation id whose report alone is wanted, or None to run (or resume) an ablation."""
    from .plan import PlanError

    if args.plan == REPORT:
        if not args.report_id:
            raise PlanError("<cli>", "usage: sketchwalk ablate report ID")
        return args.report_id
    if args.report_id:
        raise PlanError("<cli>", f"unexpected argument {args.report_id!r} (did you mean `ablate report ID`?)")
    if args.report_only:
        if not args.resume:
            raise PlanError("<cli>", "--report-only needs --resume ID")
        return args.resume
    return None


def _exit_code(report) -> int:
    return 0 if report.rows and all(r["state"] == "COMPLETE" for r in report.rows) else 1


def _console():
    from sketchwalk.console import make_console

    return make_console()


def _cell(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def _print_report(console, ablation_id: str, report, workdir: Path) -> None:
    from rich.table import Table

    table = Table(title=f"Ablation {ablation_id}: accuracy x100, difference to base with its paired 95% interval")
    for col in ("variant", "accuracy [95%]", "diff vs base [95%]", "excl. 0", "prefill s", "forward s", "decode ms/tok",
                "density"):
        table.add_column(col)
    for r in report.rows:
        if r["state"] == "COMPLETE":
            acc = f"{_cell(r['accuracy'])} [{_cell(r['accuracy_lo'])}, {_cell(r['accuracy_hi'])}]"
        else:
            acc = r["state"]
        diff = f"{r['diff']:+.2f} [{r['diff_lo']:+.2f}, {r['diff_hi']:+.2f}]" if r["pairs"] else ""
        table.add_row(r["variant"], acc, diff, r["excludes_zero"], _cell(r["prefill_s"]),
                      _cell(r["prefill_forward_s"]), _cell(r["decode_ms_per_token"]), _cell(r["density"]))
    console.print(table)
    for f in report.files:
        console.print(f"wrote {f}", highlight=False)
    failed = [r["variant"] for r in report.rows if r["state"] != "COMPLETE"]
    if failed:
        console.print(f"[yellow]not finished:[/yellow] {', '.join(failed)} -> sketchwalk ablate --resume {ablation_id} "
                      f"--workdir {workdir}", highlight=False)
