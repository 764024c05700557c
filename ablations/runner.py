"""Run an ablation plan through the sweep machinery, then report.

An ablation is a fixed-variant sweep (`SweepSpec.variants`): its one parameter, `variant`, takes
each variant name exactly once (the names are enqueued in plan order), and `variant_config` maps a
name to its config (None = dense, evaluated like the dense baseline). So kill/resume, failure
handling, MLflow parent/child runs and both backends (Optuna, Ray Tune) are the sweep's own. The
ablation id is the sweep id: its sweep files live in `runs/sweeps/<id>/`, the plan, the variants
and the report in `runs/ablations/<id>/`.
"""
import dataclasses
from pathlib import Path
from typing import Any, Optional

from search.launch import SweepOutcome, prepare_sweep, run_sweep
from search.preflight import check_workdir
from search.session import SweepSession, load_session
from search.spec import RUN_SETTINGS, SweepSpec, SweepSpecError, check_sweep_id, new_sweep_id, parse_spec

from .plan import (AblationPlan, PlanError, Variant, expand_variants, load_plan, load_variants, parse_plan, plan_to_yaml,
                   resolved_plan, save_variants)

PLAN_FILE = "plan.yaml"
VARIANTS_FILE = "variants.json"


def ablation_dir(workdir: Path, ablation_id: str) -> Path:
    """`<workdir>/runs/ablations/<id>/`: the resolved plan, the variants, the report."""
    return Path(workdir) / "runs" / "ablations" / ablation_id


def sweep_spec(plan: AblationPlan, variants: list[Variant]) -> SweepSpec:
    """The fixed-variant SweepSpec of a plan: base = the plan's base config, one variant per entry
    ({changes vs base}, None for dense), budget = their number. Objectives are the sweep's default
    (accuracy and speed), so its Pareto analysis of the variants comes along. PlanError (naming the
    plan's field) if the sweep side rejects a setting."""
    plan = resolved_plan(plan)
    data: dict[str, Any] = {k: v for k, v in plan.model_dump(mode="json").items() if k in RUN_SETTINGS}
    data.update(name=plan.name, sampler="random", base=dict(plan.base),
                variants={v.name: v.changes for v in variants})
    try:
        return parse_spec(data, source=f"<ablation {plan.name}>")
    except SweepSpecError as exc:
        raise PlanError(exc.field, exc.message) from None


@dataclasses.dataclass
class PreparedAblation:
    """A validated ablation, ready to run: nothing heavy has happened yet."""

    plan: AblationPlan
    variants: list[Variant]
    spec: SweepSpec
    ablation_id: str
    earlier: Optional[SweepSession] = None  # the session being resumed


def prepare_ablation(path: Optional[str], *, resume: Optional[str] = None, workdir: Path = Path("."),
                     ablation_id: Optional[str] = None, samples: Optional[int] = None, essays: Optional[str] = None,
                     backend: Optional[str] = None) -> PreparedAblation:
    """Validate a plan file (or reload a launched ablation for `resume`) and the model/suite/essays,
    without loading weights. samples / essays / backend override the plan's; on resume only essays
    may change (a path can differ between machines; the samples and backend are what already ran).
    Raises PlanError, SweepSpecError, EvalInputError or FileNotFoundError."""
    from search.trial import plan_for

    if resume:
        check_sweep_id(resume, "--resume")
        if path:
            raise PlanError("<file>", "--resume takes the plan stored with the ablation; omit the file")
        if samples is not None or backend is not None or ablation_id is not None:
            raise PlanError("<cli>", "--samples, --backend and --id cannot change on --resume (finished variants ran with them)")
        out = ablation_dir(workdir, resume)
        if not (out / VARIANTS_FILE).is_file():
            raise FileNotFoundError(f"no ablation {resume!r} under {out.parent}")
        spec, _, earlier = prepare_sweep(None, resume=resume, workdir=workdir, overrides={"essays": essays})
        plan = load_plan(out / PLAN_FILE)
        variants = load_variants(out / VARIANTS_FILE)
        if list(spec.variants) != [v.name for v in variants]:
            raise PlanError("variants", f"{out / VARIANTS_FILE} and the sweep {resume} list different variants")
        return PreparedAblation(plan, variants, spec, resume, earlier)
    if path is None:
        raise PlanError("<file>", "give a plan file (e.g. ablations/plans/tiny.yaml) or --resume ID")
    if ablation_id is not None:
        check_sweep_id(ablation_id, "--id")
        if ablation_dir(workdir, ablation_id).exists():
            raise SweepSpecError("--id", f"an ablation {ablation_id!r} already exists under {ablation_dir(workdir, '')}; "
                                         f"continue it with `--resume {ablation_id}` or pick another id")
    plan = load_plan(path)
    update = {k: v for k, v in (("samples", samples), ("essays", essays), ("backend", backend)) if v is not None}
    if update:
        plan = parse_plan({**plan.model_dump(mode="json"), **update}, source=str(path))
    variants = expand_variants(plan)
    spec = sweep_spec(plan, variants)
    plan_for(spec)  # model, suite, essays, lengths vs context: all before any weight is loaded
    return PreparedAblation(plan, variants, spec, ablation_id or new_sweep_id(spec))


@dataclasses.dataclass
class AblationOutcome:
    sweep: SweepOutcome
    report: Any  # ablations.report.AblationReport


def run_ablation(prep: PreparedAblation, *, workdir: Path = Path("."), address: Optional[str] = None,
                 progress: bool = True, tracking_uri: Optional[str] = None) -> AblationOutcome:
    """Store the plan and variants, run (or resume) the sweep to the last variant, then write and
    log the report; returns both outcomes."""
    from .report import build_report

    check_workdir(workdir)  # before plan.yaml is written there
    out = ablation_dir(workdir, prep.ablation_id)
    out.mkdir(parents=True, exist_ok=True)
    if prep.earlier is None:
        (out / PLAN_FILE).write_text(plan_to_yaml(resolved_plan(prep.plan)))
        save_variants(prep.variants, out / VARIANTS_FILE)
    uri = tracking_uri or (prep.earlier.tracking_uri if prep.earlier else None)
    sweep = run_sweep(prep.spec, prep.ablation_id, workdir=workdir, address=address, resume=prep.earlier is not None,
                      progress=progress, tracking_uri=uri)
    report = build_report(sweep.session, prep.variants, out, seed=prep.plan.seed)
    return AblationOutcome(sweep, report)


def report_ablation(ablation_id: str, *, workdir: Path = Path(".")):
    """Rebuild the report of a launched ablation from MLflow (no evaluation); returns it."""
    from .report import build_report

    out = ablation_dir(workdir, check_sweep_id(ablation_id, "ID"))
    if not (out / VARIANTS_FILE).is_file():
        raise FileNotFoundError(f"no ablation {ablation_id!r} under {out.parent}")
    session = load_session(ablation_id, workdir)
    plan = load_plan(out / PLAN_FILE)
    return build_report(session, load_variants(out / VARIANTS_FILE), out, seed=plan.seed)
