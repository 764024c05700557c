"""`evaluate`: accuracy, speed and density of one (model, SketchWalk config) on RULER samples.

The one evaluation entry point: sweep trials, ablations and the CLI all call it.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..config import SketchWalkConfig
from ..integration import attach, detach, get_runtime
from ..ruler.scoring import metric_for_task, postprocess
from ..ruler.templates import tokens_to_generate
from .stats import bootstrap_ci
from .timing import synchronize, timer


@dataclasses.dataclass
class SampleResult:
    """One generated answer: task, target length, prompt tokens, prediction, score in [0, 1], timings in s."""

    task: str
    length: int
    index: int
    prompt_tokens: int
    prediction: str
    outputs: list[str]
    score: float
    prefill_s: float
    generate_s: float
    new_tokens: int


@dataclasses.dataclass
class EvalResult:
    """Accuracy (×100 with 95% bootstrap intervals), speed (s, tokens/s) and measured density of one evaluation."""

    model: str
    config: Optional[dict[str, Any]]
    device: str
    dtype: str
    accuracy: dict[str, dict[str, float]]
    prefill_s: dict[str, float]
    decode_tokens_per_s: dict[str, float]
    density: dict[str, Any]
    peak_memory_bytes: Optional[int]
    samples: list[SampleResult]

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON text of the whole result (per-sample predictions included); written to `path` if given."""
        text = json.dumps(dataclasses.asdict(self), indent=2)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        return text


def _encode(tokenizer, sample: dict[str, Any], device: torch.device) -> torch.Tensor:
    # The prompt already carries the chat template; the answer prefix opens the assistant turn.
    text = sample["input"] + sample.get("answer_prefix", "")
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(device)


def evaluate(model, tokenizer, config: Optional[SketchWalkConfig], samples: dict[tuple[str, int], Sequence[dict[str, Any]]],
             *, model_name: str = "", progress: bool = True, warmup: bool = True) -> EvalResult:
    """Greedy-generate every sample with SketchWalk attached (dense when `config` is None) and score it.

    samples: {(task, length): [RULER sample dicts with input, outputs, answer_prefix]}.
    Prefill time is a separate synchronised forward pass over the prompt (time to first token);
    decode throughput is (new tokens - 1) / (generate time - prefill time).
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    runtime = attach(model, config) if config is not None else None
    if config is None:
        detach(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    flat = [(task, length, s) for (task, length), ss in samples.items() for s in ss]
    try:
        if warmup and flat and device.type == "cuda":
            with torch.no_grad():
                model(_encode(tokenizer, flat[0][2], device)[:, :1024])
        if runtime is not None:
            runtime.reset_stats()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        results = _run_samples(model, tokenizer, flat, device, pad_id, progress)
        density = _density(runtime, config)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    finally:
        if config is not None:
            detach(model)
    return EvalResult(
        model=model_name, config=config.to_dict() if config else None, device=_device_name(device), dtype=str(dtype).replace("torch.", ""),
        accuracy=_accuracy(results), prefill_s=_median_by_length(results, lambda r: r.prefill_s),
        decode_tokens_per_s=_median_by_length(results, lambda r: (r.new_tokens - 1) / max(r.generate_s - r.prefill_s, 1e-9) if r.new_tokens > 1 else float("nan")),
        density=density, peak_memory_bytes=peak, samples=results)


def _run_samples(model, tokenizer, flat, device, pad_id, progress: bool) -> list[SampleResult]:
    from rich.progress import Progress

    results = []
    with Progress(disable=not progress, transient=False) as bar:
        job = bar.add_task("evaluating", total=len(flat))
        for task, length, sample in flat:
            ids = _encode(tokenizer, sample, device)
            with torch.no_grad():
                with timer(device) as t_prefill:
                    model(ids, use_cache=True)
                with timer(device) as t_gen:
                    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens_to_generate(task),
                                         do_sample=False, pad_token_id=pad_id)
            new = out[0, ids.shape[1]:]
            pred = postprocess(tokenizer.decode(new, skip_special_tokens=True))
            score = metric_for_task(task)([pred], [sample["outputs"]]) / 100.0
            results.append(SampleResult(task, length, int(sample.get("index", len(results))), ids.shape[1], pred,
                                        list(sample["outputs"]), score, t_prefill[0], t_gen[0], int(new.numel())))
            bar.advance(job)
    synchronize(device)
    return results


def _accuracy(results: list[SampleResult]) -> dict[str, dict[str, float]]:
    groups: dict[str, list[float]] = {}
    for r in results:
        groups.setdefault(f"{r.task}@{r.length}", []).append(r.score)
    acc = {}
    for key, scores in sorted(groups.items()):
        m, lo, hi = bootstrap_ci(scores)
        acc[key] = {"mean": m, "lo": lo, "hi": hi, "n": len(scores)}
    m, lo, hi = bootstrap_ci([r.score for r in results])
    acc["overall"] = {"mean": m, "lo": lo, "hi": hi, "n": len(results)}
    return acc


def _median_by_length(results: list[SampleResult], value) -> dict[str, float]:
    by: dict[int, list[float]] = {}
    for r in results:
        by.setdefault(r.length, []).append(value(r))
    return {str(k): statistics.median(v) for k, v in sorted(by.items())}


def _density(runtime, config) -> dict[str, Any]:
    if runtime is None:
        return {"prefill": 1.0, "decode": 1.0, "per_layer": {}, "dense_layer_share": {"prefill": 1.0, "decode": 1.0}}
    rep = runtime.density()
    return {"prefill": rep.overall["prefill"], "decode": rep.overall["decode"],
            "sparse_layers": rep.sparse_layers, "dense_layer_share": rep.dense_layer_share,
            "per_layer": {ph: {str(k): v for k, v in d.items()} for ph, d in rep.per_layer.items()}}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"
