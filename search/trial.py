"""The one trial function both drivers call: build config -> evaluate -> metrics.

A `Workload` is what a worker loads once (model, tokenizer, RULER samples, dense baseline) and
reuses for every trial it runs; `run_trial` evaluates one `SketchWalkConfig` on it and returns
the flat metrics that go to MLflow and, through the objectives, to the sampler.
"""
from __future__ import annotations

import dataclasses
import math
import os
import socket
import time
from typing import Any, Optional

from sketchwalk.bench.deploy import speedups
from sketchwalk.config import SketchWalkConfig
from sketchwalk.evaluation import EvalResult, evaluate
from sketchwalk.evaluation.plan import EvalPlan, baseline_key, build_samples, load_model, prepare_run
from sketchwalk.model_shape import model_shape
from tracking.names import TAG_WORKER_GPU_SHARE, TAG_WORKER_GPUS, TAG_WORKER_HOST, TAG_WORKER_PID

from .records import Objective
from .spec import SweepSpec, SweepSpecError


def plan_for(spec: SweepSpec) -> EvalPlan:
    """Validate the spec's model/suite/essays/dtype without loading weights (EvalInputError if bad)."""
    return prepare_run(spec.model, spec.suite, essays=spec.essays, samples=spec.samples, dtype=spec.dtype)


class TrialFailed(RuntimeError):
    """A trial finished without usable objective values (e.g. NaN); recorded as FAIL. The one error
    type both drivers raise for such a trial."""


@dataclasses.dataclass
class Workload:
    """What one worker holds for the whole sweep: loaded once, reused by every trial it runs."""

    spec: SweepSpec
    plan: EvalPlan
    model: Any
    tokenizer: Any
    samples: dict
    load_s: float  # seconds spent loading the model and building the samples
    baseline: Optional[EvalResult] = None

    @property
    def device(self) -> str:
        return str(next(self.model.parameters()).device)


def load_workload(spec: SweepSpec, *, device: Optional[str] = None) -> Workload:
    """Load the model and build the samples of `spec` (seconds spent in `load_s`). A `speed:` plan the
    device cannot hold is refused here, before any trial (SweepSpecError naming `speed.lengths`)."""
    from sketchwalk import models
    from sketchwalk.bench.deploy import SpeedPlanError

    t0 = time.perf_counter()
    plan = plan_for(spec)
    if device is None:
        model, tokenizer = load_model(plan)
    else:
        model, tokenizer = models.load(plan.model_spec, dtype=plan.dtype, device=device)
    samples = build_samples(plan, tokenizer)
    if spec.speed is not None:
        try:
            spec.speed.check(model)
        except SpeedPlanError as exc:
            raise SweepSpecError(exc.field, exc.message) from None
    return Workload(spec, plan, model, tokenizer, samples, time.perf_counter() - t0)


def dense_result(work: Workload, *, cache_dir=None, progress: bool = True) -> EvalResult:
    """The dense baseline of this workload (disk-cached per model, suite, dtype and device)."""
    from sketchwalk.evaluation import dense_baseline

    key = baseline_key(work.plan, work.samples, work.model, batch_size=work.spec.batch_size,
                       timing_samples=work.spec.timing_samples, speed=work.spec.speed)
    work.baseline = dense_baseline(work.model, work.tokenizer, work.samples, key, cache_dir=cache_dir,
                                   model_name=work.spec.model, progress=progress)
    return work.baseline


def run_trial(work: Workload, config: Optional[SketchWalkConfig], *, progress: bool = False) -> EvalResult:
    """Evaluate `config` on the workload's samples with the spec's attention backend.

    config None (a fixed `dense` variant) is the workload's dense baseline when it has one: the same
    samples through the same harness settings, so it is reused rather than evaluated twice.
    """
    if config is None and work.baseline is not None:
        return work.baseline
    return evaluate(work.model, work.tokenizer, config, work.samples, model_name=work.spec.model,
                    progress=progress, backend=work.spec.attention_backend, batch_size=work.spec.batch_size,
                    timing_samples=work.spec.timing_samples, speed=work.spec.speed)


def result_metrics(result: EvalResult, *, model=None, baseline: Optional[EvalResult] = None) -> dict[str, float]:
    """Flat MLflow metrics of one evaluation.

    accuracy / accuracy_lo / accuracy_hi (x100, 95% bootstrap), acc.<task>.<len> (its interval is in
    the run's eval.json);
    prefill_s (mean over lengths of the per-length median TTFT, s) and prefill_s.<len>;
    prefill_forward_s and prefill_forward_s.<len> (the same for the bare prefill forward; CUDA only);
    decode_ms_per_token (mean over lengths of 1000 / median tokens/s) and decode_tok_s.<len>;
    density (prefill, all layers), density_decode, density_sparse_layers; attention_tflop
    (prefill attention FLOPs per sample at the measured density, mean over samples; needs `model`);
    peak_memory_mb (CUDA only); accuracy_drop (points below `baseline`, when given);
    with a deployment-speed plan: prefill_ms_at.<len> / decode_ms_at.<len> (ms at each speed length)
    and, against `baseline`'s times there, prefill_speedup.<len> / decode_speedup.<len> and their
    geometric means prefill_speedup / decode_speedup (x dense).
    """
    m: dict[str, float] = {}
    for key, acc in result.accuracy.items():
        if key == "overall":
            m["accuracy"], m["accuracy_lo"], m["accuracy_hi"] = acc["mean"], acc["lo"], acc["hi"]
        else:
            # Per task x length only the mean: its interval bounds are in the run's eval.json. As
            # metrics they were 2/3 of the run's charts in the MLflow UI, ahead of everything else.
            task, length = key.rsplit("@", 1)
            m[f"acc.{task}.{length}"] = acc["mean"]
    _log_by_length(m, "prefill_s", result.prefill_s)
    if result.prefill_forward_s:  # {} = not measured (CPU): not logged at all
        _log_by_length(m, "prefill_forward_s", result.prefill_forward_s)
    rates = [v for v in result.decode_tokens_per_s.values() if not _nan(v) and v > 0]
    for n, v in result.decode_tokens_per_s.items():
        m[f"decode_tok_s.{n}"] = v
    m["decode_ms_per_token"] = sum(1000.0 / r for r in rates) / len(rates) if rates else math.nan
    dens = result.density or {}
    m["density"] = float(dens.get("prefill", math.nan))
    m["density_decode"] = float(dens.get("decode", math.nan))
    m["density_sparse_layers"] = float((dens.get("sparse_layers") or {}).get("prefill", math.nan))
    if model is not None and result.samples:
        m["attention_tflop"] = attention_tflop(result, model)
    if result.peak_memory_bytes is not None:
        m["peak_memory_mb"] = result.peak_memory_bytes / 2**20
    if baseline is not None:
        m["accuracy_drop"] = baseline.accuracy["overall"]["mean"] - m["accuracy"]
        m["dense_accuracy"] = baseline.accuracy["overall"]["mean"]
    _deployment_metrics(m, result, baseline)
    return m


def baseline_metrics(work: Workload, result: EvalResult, started: float) -> dict[str, float]:
    """The dense baseline run's MLflow metrics (either driver): its `result_metrics` against itself
    (accuracy_drop 0, speedups 1 at the deployment lengths: its point on the front), the worker's
    load time and the seconds since `started` (time.time())."""
    return {**result_metrics(result, model=work.model, baseline=result), "worker_load_s": work.load_s,
            "eval_s": time.time() - started}


def _deployment_metrics(m: dict[str, float], result: EvalResult, baseline: Optional[EvalResult]) -> None:
    """The deployment-length times (ms) and, with the dense baseline's, the speedups (see result_metrics)."""
    speed = result.deployment_speed or {}
    for phase in ("prefill", "decode"):
        for n, ms in (speed.get(f"{phase}_ms") or {}).items():
            m[f"{phase}_ms_at.{n}"] = ms
    if not speed or baseline is None or not baseline.deployment_speed:
        return
    ratios = speedups(speed, baseline.deployment_speed)
    for phase in ("prefill", "decode"):
        for n, x in (ratios.get(phase) or {}).items():
            m[f"{phase}_speedup.{n}"] = x
        if ratios.get(phase):
            m[f"{phase}_speedup"] = ratios[f"{phase}_mean"]


def _log_by_length(m: dict[str, float], name: str, by_length: dict[str, float]) -> None:
    """`name.<len>` per length and `name` = their mean over the finite ones (NaN if none), in s."""
    for n, v in by_length.items():
        m[f"{name}.{n}"] = v
    finite = [v for v in by_length.values() if not _nan(v)]
    m[name] = sum(finite) / len(finite) if finite else math.nan


def attention_tflop(result: EvalResult, model) -> float:
    """Prefill attention FLOPs per sample (TFLOP) at the measured prefill density: QK^T and PV over
    the causal pairs, 4 * n(n+1)/2 * head_dim * q_heads per layer, times density, mean over samples."""
    layers, head_dim = model_shape(model.config)
    heads = model.config.num_attention_heads
    density = float((result.density or {}).get("prefill", 1.0))
    per = [4.0 * n * (n + 1) / 2 * head_dim * heads * layers * density
           for n in (s.prompt_tokens for s in result.samples)]
    return sum(per) / len(per) / 1e12


def objective_values(metrics: dict[str, float], objectives: list[Objective]) -> Optional[list[float]]:
    """The objectives' values in order, or None if any is missing or not finite (such a trial is
    told FAIL: a NaN reported to Optuna would leave it RUNNING)."""
    vals = [metrics.get(o.metric, math.nan) for o in objectives]
    return None if any(_nan(v) for v in vals) else [float(v) for v in vals]


#: Trial-run tags naming the worker process that ran the trial (see `worker_tags`).
WORKER_HOST, WORKER_PID, WORKER_GPUS = TAG_WORKER_HOST, TAG_WORKER_PID, TAG_WORKER_GPUS
WORKER_GPU_SHARE = TAG_WORKER_GPU_SHARE


def worker_tags(gpu_share: Optional[float] = None) -> dict[str, str]:
    """Where this trial runs: host name, process id and the GPUs the process sees (its
    CUDA_VISIBLE_DEVICES, which Ray sets per actor to the GPU ids it assigned; "" = not set, "-" = no
    CUDA), plus `gpu_share` when the scheduler assigned one (Ray: GPUs per trial, 0.5 = the GPU is
    shared with another trial). Tagged on every trial run, so placement, packing and model reuse can be
    checked from MLflow alone."""
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    if gpus is None:
        try:
            import torch

            gpus = "" if torch.cuda.is_available() else "-"
        except Exception:
            gpus = "-"
    tags = {WORKER_HOST: socket.gethostname(), WORKER_PID: str(os.getpid()), WORKER_GPUS: gpus}
    if gpu_share is not None:
        tags[WORKER_GPU_SHARE] = f"{gpu_share:g}"
    return tags


def worker_metrics(work: Workload, model_loads: int, eval_s: float) -> dict[str, float]:
    """The trial's cost split: `eval_s` (this trial's evaluation, s), `worker_load_s` (the worker's
    one-time model + samples load, s) and `worker_model_loads` (model loads in this process so far:
    1 on a worker that reuses its model)."""
    return {"eval_s": float(eval_s), "worker_load_s": float(work.load_s), "worker_model_loads": float(model_loads)}


def free_cuda_cache() -> None:
    """Return cached CUDA blocks after a failed trial (an OOM leaves them allocated); no-op without CUDA."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # cleanup must never mask the trial's own error
        pass


def _nan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and not math.isfinite(v))
