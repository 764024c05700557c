"""`run_sweep`: validate -> open the sweep (MLflow parent run) -> run a driver -> analyse -> export.

Everything the user typed is checked before any weights load or GPU time is spent: the sweep
YAML (`search.spec`), the model/suite/essays (`sketchwalk.evaluation.plan`), the tracking store
(reachability) and, for Ray, whether the cluster has the GPUs a trial asks for.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional

from sketchwalk.evaluation import EvalResult
from tracking import redact_uri

from .preflight import check_storage, check_tracking, check_workdir
from .records import Objective
from .session import (SweepSession, deliver_pending, load_session, log_baseline, open_session, parent_closed_on_exit, recorded_baseline,
                      refuse_existing)
from .space import resolve_objectives
from .spec import SweepSpec, SweepSpecError, check_space_for_model, check_sweep_id, load_spec, new_sweep_id

DEFAULT_SWEEP = Path("sweeps") / "default.yaml"


def default_sweep_file() -> Path:
    """`sweeps/default.yaml` in the working directory, else the one beside this source checkout."""
    if DEFAULT_SWEEP.is_file():
        return DEFAULT_SWEEP
    beside = Path(__file__).resolve().parent.parent / DEFAULT_SWEEP
    if beside.is_file():
        return beside
    raise SweepSpecError("<file>", f"no sweep file given and no {DEFAULT_SWEEP} here or in the source tree")


@dataclasses.dataclass
class SweepOutcome:
    session: SweepSession
    counts: dict
    analysis: object
    wall_s: float


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def prepare_sweep(path: Optional[str], *, resume: Optional[str] = None, workdir: Path = Path("."),
                  overrides: Optional[dict] = None) -> tuple[SweepSpec, str, Optional[SweepSession]]:
    """The validated spec and sweep id (new, or the resumed one with its stored spec); raises
    SweepSpecError / EvalInputError before anything heavy runs."""
    from .trial import plan_for

    earlier = None
    if resume:
        earlier = load_session(check_sweep_id(resume, "--resume"), workdir)
        spec, sweep_id = earlier.spec, resume
        if path:
            raise SweepSpecError("<file>", "--resume takes the sweep definition stored with the sweep; omit the file")
    else:
        spec = load_spec(path or default_sweep_file())
        sweep_id = None
    if overrides:
        data = spec.model_dump(mode="json")
        if earlier is not None:
            _refuse_changed_identity(data, overrides, resume)
        for dotted, value in overrides.items():
            if value is not None:
                node, last = _dotted(data, dotted)
                node[last] = value
        from .spec import parse_spec

        spec = parse_spec(data, source=str(path or "<resume>"))
    plan = plan_for(spec)  # model, suite, essays, lengths vs context: all before any weight is loaded
    if plan.shape is not None:
        check_space_for_model(spec, *plan.shape, model=spec.model)
    if spec.speed is not None and spec.backend == "optuna":
        # The optuna backend evaluates in this process, so this machine's memory is the trials'; Ray
        # workers (maybe on other machines) check theirs when they load (`trial.load_workload`).
        from sketchwalk.bench.deploy import SpeedPlanError
        from sketchwalk.evaluation.plan import check_speed_before_load

        try:
            check_speed_before_load(plan, spec.speed)
        except SpeedPlanError as exc:
            raise SweepSpecError(exc.field, exc.message) from None
    return spec, sweep_id or new_sweep_id(spec), earlier


# What a resumed sweep may not change: its trials would no longer be comparable with the earlier
# ones (suite, samples; resources.gpus: a packed trial is timed on a shared GPU) or the study would
# be driven differently (backend). Budget, wall time, concurrency and the essays' path (another
# machine) may change.
RESUME_FIXED = ("suite", "samples", "backend", "resources.gpus")


def _refuse_changed_identity(stored: dict, overrides: dict, sweep_id: str) -> None:
    """Raise SweepSpecError naming the first RESUME_FIXED key (dotted) an override would change
    (stored: the resumed spec as JSON data)."""
    for key in RESUME_FIXED:
        value = overrides.get(key)
        node, last = _dotted(stored, key)
        if value is not None and value != node.get(last):
            raise SweepSpecError(key, f"a resumed sweep keeps its {key} ({node.get(last)!r} in sweep {sweep_id!r}); "
                                      f"got {value!r}: start a new sweep to change it")


def _dotted(data: dict, key: str) -> tuple[dict, str]:
    """(the mapping holding dotted `key`'s last part, that part), creating missing levels."""
    *head, last = key.split(".")
    for h in head:
        data = data.setdefault(h, {})
    return data, last


def run_sweep(spec: SweepSpec, sweep_id: str, *, workdir: Path = Path("."), address: Optional[str] = None,
              resume: bool = False, progress: bool = True, tracking_uri: Optional[str] = None) -> SweepOutcome:
    """Run (or resume) the sweep to its budget, then analyse and export; returns what happened. The
    parent run ends FINISHED, or KILLED (Ctrl-C, SIGTERM, a timeout) / FAILED (an error) on the way out."""
    from .analysis import TAG_STOP_REASON, analyze

    t0 = time.perf_counter()
    # Everything the stores need, before Ray starts, a run is created or a weight loads.
    check_sweep_id(sweep_id)
    check_workdir(workdir)
    if not resume:
        refuse_existing(sweep_id, workdir)
    if spec.backend == "optuna":
        check_storage(spec.storage, workdir)
    uri = check_tracking(tracking_uri or spec.tracking.uri, spec.tracking.experiment, workdir,
                         "--tracking-uri" if tracking_uri else "tracking.uri")
    if spec.tracking.uri is not None:  # what is stored (session.json, sweep.yaml, MLflow) holds no secret
        clean = redact_uri(spec.tracking.uri) if tracking_uri else uri
        spec = spec.model_copy(update={"tracking": spec.tracking.model_copy(update={"uri": clean})})
    if spec.backend == "ray":
        cuda = spec.resources.gpus != 0 and _ray_has_gpus(address, spec)
    else:
        cuda = _cuda_available()
    objectives = resolve_objectives(spec, cuda)
    session = open_session(spec, sweep_id, objectives, workdir=workdir, tracking_uri=uri,
                           device="cuda" if cuda else "cpu", new=not resume)
    with parent_closed_on_exit(session):
        deliver_pending(session)  # trials that finished while MLflow was unreachable
        counts, reason = _drive(session, spec, address=address, resume=resume, progress=progress, cuda=cuda)
        # A tag, so that `sketchwalk pareto` / `export` later and the MLflow UI say it too.
        session.tracker().set_tags(session.parent_run_id, {TAG_STOP_REASON: reason})
        analysis = analyze(session, stop_reason=reason)
    session.tracker().finish(session.parent_run_id, "FINISHED")
    return SweepOutcome(session, counts, analysis, time.perf_counter() - t0)


def _drive(session: SweepSession, spec: SweepSpec, *, address: Optional[str], resume: bool, progress: bool,
           cuda: bool) -> tuple[dict, str]:
    """The display and the backend's driver, to the budget; returns the driver's counts and the stop reason."""
    from .display import SweepDisplay

    objectives, sweep_id = session.objectives, session.sweep_id
    display = SweepDisplay(objectives, spec.budget.trials, enabled=progress,
                           max_accuracy_drop=spec.constraints.max_accuracy_drop)
    with display:
        display.log(f"sweep [bold]{sweep_id}[/bold] ({spec.backend}, {'resumed' if resume else 'new'}): "
                    f"objectives {_describe(objectives)}; MLflow {session.tracking_uri}")
        if any(o.name == "density" for o in objectives) and "speed" in spec.objectives and not cuda:
            display.log("no CUDA device: the speed objective is measured density (CPU latency of the reference "
                        "path says nothing about GPU speed)")
        if _packs_timed_trials(spec, objectives, cuda):
            display.log(f"[yellow]resources.gpus = {spec.resources.gpus:g}:[/yellow] trials share a GPU while their "
                        f"latency is timed, so latency objectives include the other trials' load (compare trials "
                        f"of one sweep with each other, not with an unpacked sweep)")
        recorded = recorded_baseline(session)
        baseline = recorded[0] if recorded else None
        if recorded:
            display.log(f"dense baseline: {_accuracy(baseline)}, as logged in MLflow run {recorded[1]} (reused, "
                        f"not evaluated again)")
        driver_t0 = time.perf_counter()
        if spec.backend == "optuna":
            counts = _run_optuna(session, display, baseline)
        else:
            from .ray_driver import run_tune

            counts = run_tune(session, address=address, resume=resume, baseline=baseline,
                              on_result=display.trial_done, on_status=display.status)
        reason = stop_reason(spec, counts, time.perf_counter() - driver_t0, sweep_id=sweep_id)
    return counts, reason


def stop_reason(spec: SweepSpec, counts: dict, driver_s: float, *, sweep_id: str) -> str:
    """Why the trial phase ended, as one line starting with its kind: 'trials:' (the trial budget was
    spent), 'wall_time:' (budget.wall_time_s stopped it before the trial budget; says how to go on),
    or 'ended:' (fewer trials than budgeted for another reason, e.g. every fixed variant ran).
    `driver_s`: seconds the driver ran (the wall-time clock starts inside it, so it is an upper bound)."""
    done = int(counts.get("complete") or 0) + int(counts.get("failed") or 0)
    budget, wall = spec.budget.trials, spec.budget.wall_time_s
    if budget is not None and done >= budget:
        return f"trials: the budget of {budget} trial(s) was spent ({counts.get('complete')} complete)"
    if wall is not None and driver_s >= wall:
        of = f" of {budget}" if budget is not None else ""
        more = f" --trials {budget}" if budget is not None else ""
        return (f"wall_time: the {wall:g} s wall-time budget (budget.wall_time_s) stopped the sweep after {done}{of} "
                f"trial(s); to run more: sketchwalk sweep --resume {sweep_id}{more} --wall-time {max(2 * wall, 600):g}")
    return f"ended: {done} trial(s) finished or failed" + (f" of a budget of {budget}" if budget is not None else "")


def _run_optuna(session: SweepSession, display, baseline: Optional[EvalResult] = None) -> dict:
    """The optuna backend in this process: load the workload once, evaluate and log the dense
    baseline unless the sweep already recorded one (`baseline`), then run the study."""
    from .optuna_driver import run_study
    from .session import default_storage
    from .trial import baseline_metrics, dense_result, load_workload, worker_tags

    spec = session.spec
    display.log("loading the model and building the RULER samples (once for the whole sweep)")
    work = load_workload(spec)
    display.log(f"loaded in {work.load_s:.1f} s on {work.device}")
    from rich.markup import escape

    from sketchwalk.ruler import short_samples_note

    note = short_samples_note(work.samples)
    if note:  # RULER's step back-off: said here, so a short prompt is not read as our bug
        display.log(f"[yellow]note:[/yellow] {escape(note)}")
    if baseline is None:
        started = time.time()
        baseline = dense_result(work, progress=False)
        log_baseline(session, baseline, baseline_metrics(work, baseline, started), worker_tags(), started_at=started)
        display.log(f"dense baseline: {_accuracy(baseline)}")
    work.baseline = baseline
    storage = spec.storage or default_storage(session.workdir)
    return run_study(session, work, storage_url=storage, heartbeat_s=spec.heartbeat_s,
                     on_result=display.trial_done, on_status=display.status)


TIMED_OBJECTIVES = ("prefill_latency", "prefill_forward", "decode_latency")


def _packs_timed_trials(spec: SweepSpec, objectives: list[Objective], cuda: bool) -> bool:
    """Ray with a fractional `resources.gpus` on CUDA and a latency objective: timings are shared-GPU timings."""
    g = spec.resources.gpus
    return (spec.backend == "ray" and cuda and g != "auto" and 0 < g < 1
            and any(o.name in TIMED_OBJECTIVES for o in objectives))


def _accuracy(result: EvalResult) -> str:
    acc = result.accuracy["overall"]
    return f"accuracy {acc['mean']:.1f} [{acc['lo']:.1f}, {acc['hi']:.1f}]"


def _ray_has_gpus(address: Optional[str], spec: SweepSpec) -> bool:
    import ray

    from .ray_cluster import init_ray

    init_ray(address)
    return ray.cluster_resources().get("GPU", 0.0) >= 1 if spec.resources.gpus == "auto" else spec.resources.gpus > 0


def _describe(objectives: list[Objective]) -> str:
    return ", ".join(f"{o.direction} {o.name}" for o in objectives)
