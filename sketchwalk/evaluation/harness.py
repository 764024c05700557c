"""`evaluate`: accuracy, speed and density of one (model, SketchWalk config) on RULER samples.

The one evaluation entry point: sweep trials, ablations and the CLI all call it.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Optional, Sequence

import torch

from ..config import SketchWalkConfig
from ..integration import attach, detach
from ..ruler.scoring import metric_for_task, postprocess
from ..ruler.templates import tokens_to_generate
from .result import EvalResult, SampleResult
from .stats import bootstrap_ci
from .timing import AttentionTimer, TokenClock, synchronize

__all__ = ["EvalResult", "SampleResult", "evaluate", "TIMING_METHOD"]

TIMING_METHOD = ("one greedy generate() per sample, timed by a streamer that synchronises the device "
                 "at every new token: prefill_s = start to first new token (time to first token); "
                 "decode tokens/s = (new_tokens - 1) / (last token - first token), per length the "
                 "median over samples; GPU runs are warmed up and synchronised; attention_s "
                 "(optional) wraps the registered attention function (CUDA events on GPU, wall "
                 "time on CPU)")

Samples = dict[tuple[str, int], Sequence[dict[str, Any]]]


def _encode(tokenizer, sample: dict[str, Any], device: torch.device) -> torch.Tensor:
    # The prompt already carries the chat template; the answer prefix opens the assistant turn.
    text = sample["input"] + sample.get("answer_prefix", "")
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(device)


def evaluate(model, tokenizer, config: Optional[SketchWalkConfig], samples: Samples, *, model_name: str = "",
             progress: bool = True, warmup: bool = True, attention_timing: bool = False,
             backend: str = "auto") -> EvalResult:
    """Greedy-generate every sample with SketchWalk attached (dense when `config` is None) and score it.

    samples: {(task, length in tokens): [RULER sample dicts with input, outputs, answer_prefix]}.
    Speed is measured inside the one generate() call that produces the answer (see TIMING_METHOD):
    a separate timed prefill would run the prompt twice and, with SketchWalk, double-count density.
    On CUDA a short warm-up generate runs first (kernels, allocator) and peak memory is reset after
    it. `attention_timing` adds per-layer attention-function times (slower: one sync per call on GPU).
    backend: the attention backend passed to `attach` (`auto`: Triton kernels on CUDA, reference on CPU).
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    runtime = attach(model, config, backend=backend) if config is not None else None
    if config is None:
        detach(model)
    flat = [(task, length, s) for (task, length), ss in samples.items() for s in ss]
    try:
        if warmup and flat and device.type == "cuda":
            _warm_up(model, tokenizer, flat[0][2], device)
        if runtime is not None:
            runtime.reset_stats()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        attn = AttentionTimer(model, device) if attention_timing else None
        if attn is not None:
            with attn:
                results = _run_samples(model, tokenizer, flat, device, progress, attn)
        else:
            results = _run_samples(model, tokenizer, flat, device, progress, None)
        density = _density(runtime)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    finally:
        if config is not None:
            detach(model)
    return EvalResult(
        model=model_name, config=config.to_dict() if config else None, device=device_name(device),
        dtype=str(dtype).replace("torch.", ""), accuracy=accuracy_table(results),
        prefill_s=_median_by_length(results, lambda r: r.prefill_s),
        decode_tokens_per_s=_median_by_length(results, _decode_rate),
        density=density, peak_memory_bytes=peak, samples=results,
        attention_s=attn.medians() if attn is not None else {}, timing=TIMING_METHOD)


def _warm_up(model, tokenizer, sample, device) -> None:
    ids = _encode(tokenizer, sample, device)[:, :1024]
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                       pad_token_id=_pad_id(tokenizer))
    synchronize(device)


def _pad_id(tokenizer) -> Optional[int]:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _run_samples(model, tokenizer, flat, device, progress: bool, attn: Optional[AttentionTimer]) -> list[SampleResult]:
    from rich.progress import Progress

    results = []
    clock = TokenClock(device)
    with Progress(disable=not progress, transient=False) as bar:
        job = bar.add_task("evaluating", total=len(flat))
        for task, length, sample in flat:
            ids = _encode(tokenizer, sample, device)
            with torch.no_grad():
                clock.start()
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens_to_generate(task),
                                     do_sample=False, pad_token_id=_pad_id(tokenizer), streamer=clock)
                synchronize(device)
            total = clock.stamps[-1] - clock.t0 if clock.stamps else float("nan")
            if attn is not None:
                attn.collect()
            new = out[0, ids.shape[1]:]
            pred = postprocess(tokenizer.decode(new, skip_special_tokens=True))
            score = metric_for_task(task)([pred], [sample["outputs"]]) / 100.0
            results.append(SampleResult(task, length, int(sample.get("index", len(results))), ids.shape[1], pred,
                                        list(sample["outputs"]), score, clock.prefill_s, total, int(new.numel()),
                                        clock.decode_s))
            bar.advance(job)
    return results


def _decode_rate(r: SampleResult) -> float:
    if r.new_tokens < 2 or not r.decode_s > 0:
        return float("nan")
    return (r.new_tokens - 1) / r.decode_s


def accuracy_table(results: Sequence[SampleResult]) -> dict[str, dict[str, float]]:
    """{"task@length": {mean, lo, hi, n}, ..., "overall": {...}}: ×100 with 95% bootstrap intervals."""
    groups: dict[str, list[float]] = {}
    for r in results:
        groups.setdefault(f"{r.task}@{r.length}", []).append(r.score)
    acc = {}
    for key, scores in sorted(groups.items(), key=lambda kv: (kv[0].rsplit("@", 1)[0], int(kv[0].rsplit("@", 1)[1]))):
        m, lo, hi = bootstrap_ci(scores)
        acc[key] = {"mean": m, "lo": lo, "hi": hi, "n": len(scores)}
    m, lo, hi = bootstrap_ci([r.score for r in results])
    acc["overall"] = {"mean": m, "lo": lo, "hi": hi, "n": len(results)}
    return acc


def _median_by_length(results: Sequence[SampleResult], value) -> dict[str, float]:
    by: dict[int, list[float]] = {}
    for r in results:
        v = value(r)
        if not math.isnan(v):
            by.setdefault(r.length, []).append(v)
    lengths = sorted({r.length for r in results})
    return {str(n): statistics.median(by[n]) if by.get(n) else float("nan") for n in lengths}


def _density(runtime) -> dict[str, Any]:
    if runtime is None:
        return {"prefill": 1.0, "decode": 1.0, "sparse_layers": {"prefill": 1.0, "decode": 1.0},
                "per_layer": {}, "dense_layer_share": {"prefill": 1.0, "decode": 1.0}}
    rep = runtime.density()
    return {"prefill": rep.overall["prefill"], "decode": rep.overall["decode"],
            "sparse_layers": rep.sparse_layers, "dense_layer_share": rep.dense_layer_share,
            "per_layer": {ph: {str(k): v for k, v in d.items()} for ph, d in rep.per_layer.items()}}


def device_name(device: torch.device) -> str:
    """'cpu', or the CUDA device's product name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"
