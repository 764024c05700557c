"""`evaluate`: accuracy, speed and density of one (model, SketchWalk config) on RULER samples.

The one evaluation entry point: sweep trials, ablations and the CLI all call it.
"""
from __future__ import annotations

import contextlib
import math
import statistics
from typing import Any, Optional, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..bench.deploy import DeploymentSpeed, measure_deployment_speed
from ..config import SketchWalkConfig
from ..integration import attach, detach
from ..method.batched_decode import decode_state_bytes
from ..model_shape import model_shape
from ..ruler.scoring import metric_for_task, postprocess
from ..ruler.templates import tokens_to_generate
from .result import EvalResult, SampleResult
from .stats import bootstrap_ci
from .timing import PREFILL_FORWARD_REPEATS, AttentionTimer, TokenClock, prefill_forward_s, synchronize

__all__ = ["EvalResult", "SampleResult", "evaluate", "TIMING_METHOD"]

# New tokens of a batch-1 timing pass: enough decode steps for a stable tokens/s, not a whole
# answer (the answers come from the batched pass).
TIMING_NEW_TOKENS = 32

TIMING_METHOD = ("SDPA (dense layers, dense baseline) pinned to FlashAttention first; "
                 "one greedy generate() per sample at batch 1, timed by a streamer that synchronises the "
                 "device at every new token: prefill_s = start to first new token (time to first token); "
                 "decode tokens/s = (timed new tokens - 1) / (last token - first token), per length the "
                 "median over the timed samples; prefill_forward_s = per timed sample the median of "
                 f"{PREFILL_FORWARD_REPEATS} bare prefill forwards of its prompt (CUDA events; GPU only; the "
                 "prefill without generate()'s per-call host work), per length the median over samples; "
                 "GPU runs are warmed up (one untimed generate per length) "
                 "and synchronised; attention_s (optional) wraps the registered attention function (CUDA "
                 "events on GPU, wall time on CPU)")
BATCHED_TIMING = ("; with batch_size > 1 the answers come from left-padded batched generate() calls over "
                  "the samples of one length, all tasks mixed (untimed), and the speed numbers and peak memory "
                  "from a separate batch-1 pass over timing_samples samples per length (drawn from different "
                  "tasks), each generating at most {} new tokens").format(TIMING_NEW_TOKENS)

Samples = dict[tuple[str, int], Sequence[dict[str, Any]]]


def _encode(tokenizer, sample: dict[str, Any], device: torch.device) -> torch.Tensor:
    # The prompt already carries the chat template; the answer prefix opens the assistant turn.
    text = sample["input"] + sample.get("answer_prefix", "")
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(device)


def evaluate(model, tokenizer, config: Optional[SketchWalkConfig], samples: Samples, *, model_name: str = "",
             progress: bool = True, warmup: bool = True, attention_timing: bool = False,
             backend: str = "auto", batch_size: int = 1, timing_samples: int = 2,
             prefill_repeats: Optional[int] = None, speed: Optional[DeploymentSpeed] = None) -> EvalResult:
    """Greedy-generate every sample with SketchWalk attached (dense when `config` is None) and score it.

    samples: {(task, length in tokens): [RULER sample dicts with input, outputs, answer_prefix]}.
    Speed is measured inside the one generate() call that produces the answer (see TIMING_METHOD):
    a separate timed prefill would run the prompt twice and, with SketchWalk, double-count density.
    On CUDA one untimed warm-up generate per length runs first (kernels, allocator) and peak memory
    is reset after it. `attention_timing` adds per-layer attention-function times (slower: one sync per call on GPU).
    backend: the attention backend passed to `attach` (`auto`: Triton kernels on CUDA, reference on CPU).
    batch_size > 1: answers come from greedy generate() over left-padded batches of one length, tasks
    mixed and sorted by prompt length (SketchWalk selects per sequence on its real tokens, so batching
    changes no selection; each answer is cut to its own task's budget, as batch 1 would stop); latency
    and peak memory then come from a batch-1 pass over `timing_samples` samples per length from
    different tasks, at most TIMING_NEW_TOKENS new tokens each, run first (so the density counters
    cover exactly the answered samples).
    prefill_repeats: bare prefill forwards timed per timed sample (`prefill_forward_s`; outside the
    density counters); None = PREFILL_FORWARD_REPEATS on CUDA, 0 (not measured) on CPU.
    speed: also time the config at deployment lengths (`bench.deploy`: on this model or a named shape,
    after the samples, outside the density counters) into `deployment_speed`; checked before any sample runs.
    """
    if batch_size < 1 or timing_samples < 1:
        raise ValueError(f"batch_size and timing_samples must be >= 1, got {batch_size} and {timing_samples}")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    if prefill_repeats is None:
        prefill_repeats = PREFILL_FORWARD_REPEATS if device.type == "cuda" else 0
    if speed is not None:
        speed.check(model, config)  # memory and the shape's limits: refused before any sample runs
    runtime = attach(model, config, backend=backend) if config is not None else None
    if config is None:
        detach(model)
    flat = [(task, length, s) for (task, length), ss in samples.items() for s in ss]
    positions = sample_positions(flat)
    try:
        with prefer_flash_sdpa(device):
            if warmup and flat and device.type == "cuda":
                _warm_up(model, tokenizer, flat, device)
            if runtime is not None:
                runtime.reset_stats()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            attn = AttentionTimer(model, device) if attention_timing else None
            timed_flat = flat if batch_size == 1 else _timing_samples(flat, timing_samples)
            with attn if attn is not None else contextlib.nullcontext():
                timed = _run_samples(model, tokenizer, timed_flat, device, progress, attn,
                                     label="evaluating" if batch_size == 1 else "timing (batch 1)",
                                     max_new_tokens=None if batch_size == 1 else TIMING_NEW_TOKENS,
                                     runtime=runtime, prefill_repeats=prefill_repeats, positions=positions)
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            results = timed
            if batch_size > 1:
                if runtime is not None:
                    runtime.reset_stats()  # density over the answered samples only, not the timing pass
                results = _run_batched(model, tokenizer, flat, device, progress, batch_size, timed, runtime,
                                       positions=positions)
            density = _density(runtime)
    finally:
        if config is not None:
            detach(model)
    deployment = {}
    if speed is not None:
        with prefer_flash_sdpa(device):
            deployment = measure_deployment_speed(model, config, speed, backend=backend)
    return EvalResult(
        model=model_name, config=config, device=device_name(device),
        dtype=str(dtype).replace("torch.", ""), accuracy=accuracy_table(results),
        prefill_s=_median_by_length(results, lambda r: r.prefill_s),
        decode_tokens_per_s=_median_by_length(results, lambda r: r.decode_tokens_per_s),
        density=density, peak_memory_bytes=peak, samples=results,
        attention_s=attn.medians() if attn is not None else {},
        timing=TIMING_METHOD + (BATCHED_TIMING if batch_size > 1 else ""),
        prefill_forward_s=(_median_by_length(results, lambda r: _nan_if_none(r.prefill_forward_s))
                           if prefill_repeats else {}),
        deployment_speed=deployment)


def prefer_flash_sdpa(device: torch.device):
    """Context in which SDPA tries FlashAttention first (then memory-efficient, cuDNN, math) on CUDA.

    The dense baseline (and the dense layers of a SketchWalk model) must be FlashAttention, the
    paper's baseline. Left to its default order, PyTorch on Hopper can pick cuDNN attention, which
    builds an execution plan per new sequence length: every decode step (one more key) and every
    prompt of a new length pays it, which would inflate dense latency and flatter SketchWalk.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch < 2.6 has no priority order: allow all but cuDNN
        return sdpa_kernel(order[:2] + order[3:])


def _warm_up(model, tokenizer, flat, device) -> None:
    """One untimed batch-1 generate() per length (its first sample, TIMING_NEW_TOKENS new tokens).

    Kernels compile and allocator pools grow per shape: Triton specialises on sizes, so a first
    prompt of each length would otherwise pay its compilation inside a timed call.
    """
    first: dict[int, dict[str, Any]] = {}
    for _, length, sample in flat:
        first.setdefault(length, sample)
    for length in sorted(first):
        ids = _encode(tokenizer, first[length], device)
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=TIMING_NEW_TOKENS,
                           do_sample=False, pad_token_id=_pad_id(tokenizer))
        synchronize(device)


def _pad_id(tokenizer) -> Optional[int]:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _score(tokenizer, task: str, sample: dict[str, Any], new: torch.Tensor) -> tuple[str, float]:
    """(prediction, score in [0, 1]) of one answer: new: [new tokens] as generated."""
    pred = postprocess(tokenizer.decode(new, skip_special_tokens=True))
    return pred, metric_for_task(task)([pred], [sample["outputs"]]) / 100.0


def sample_positions(flat) -> dict[int, int]:
    """Each sample's identity within its (task, length): its position there (0, 1, ... in file order),
    keyed by the sample dict's id(). RULER's own `index` cannot serve: in imported niah files it is
    the answer's character offset and repeats (11 distinct values in 20 samples of
    niah_multikey_3@2048), so keying by it merged different samples."""
    seen: dict[tuple, int] = {}
    out = {}
    for task, length, sample in flat:
        out[id(sample)] = seen.get((task, length), 0)
        seen[(task, length)] = out[id(sample)] + 1
    return out


def _timing_samples(flat, n: int):
    """n samples per length for the batch-1 timing pass, round-robin over the tasks of that length
    (the first sample of each task first): speed depends on the length, not on the task."""
    by_length: dict[int, dict[str, list]] = {}
    for task, length, sample in flat:
        by_length.setdefault(length, {}).setdefault(task, []).append((task, length, sample))
    out = []
    for length in sorted(by_length):
        queues = list(by_length[length].values())
        picked, depth = [], 0
        while len(picked) < n and any(depth < len(q) for q in queues):
            picked += [q[depth] for q in queues if depth < len(q)][:n - len(picked)]
            depth += 1
        out += picked
    return out


def _run_samples(model, tokenizer, flat, device, progress: bool, attn: Optional[AttentionTimer],
                 label: str = "evaluating", max_new_tokens: Optional[int] = None, runtime=None,
                 prefill_repeats: int = 0, positions: Optional[dict[int, int]] = None) -> list[SampleResult]:
    """Greedy generate() per sample at batch 1, timed per token; max_new_tokens caps the task's budget.
    prefill_repeats > 0: then `prefill_repeats` bare prefill forwards of the prompt, timed, left out of
    the SketchWalk `runtime`'s density counters and of the attention timer. positions: each sample's
    `sample_positions` in the whole suite (default: computed from `flat`)."""
    positions = sample_positions(flat) if positions is None else positions
    from rich.progress import Progress

    results = []
    clock = TokenClock(device)
    with Progress(disable=not progress, transient=False) as bar:
        job = bar.add_task(label, total=len(flat))
        for task, length, sample in flat:
            ids = _encode(tokenizer, sample, device)
            with torch.no_grad():
                clock.start()
                budget = tokens_to_generate(task) if max_new_tokens is None else min(max_new_tokens, tokens_to_generate(task))
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget,
                                     do_sample=False, pad_token_id=_pad_id(tokenizer), streamer=clock)
                synchronize(device)
            total = clock.stamps[-1] - clock.t0 if clock.stamps else float("nan")
            if attn is not None:
                attn.collect()
            forward_s = None
            if prefill_repeats:
                with (runtime.uncounted() if runtime is not None else contextlib.nullcontext()), \
                        (attn.suspended() if attn is not None else contextlib.nullcontext()):
                    forward_s = prefill_forward_s(model, ids, prefill_repeats)
            new = out[0, ids.shape[1]:]
            pred, score = _score(tokenizer, task, sample, new)
            results.append(SampleResult(task, length, int(sample.get("index", len(results))), ids.shape[1], pred,
                                        list(sample["outputs"]), score, clock.prefill_s, total, int(new.numel()),
                                        clock.decode_s, prefill_forward_s=forward_s, position=positions[id(sample)]))
            bar.advance(job)
    return results


def _run_batched(model, tokenizer, flat, device, progress: bool, batch_size: int,
                 timed: Sequence[SampleResult], runtime=None,
                 positions: Optional[dict[int, int]] = None) -> list[SampleResult]:
    """Answer every sample with greedy generate() over left-padded batches of one length.

    Tasks are mixed in a batch, sorted by prompt length (least padding); a batch generates up to
    the largest budget of its tasks and each answer is cut to its own task's budget, then at the
    first EOS: greedy decoding makes that exactly the answer a batch-1 generate() returns.
    Results come back in the order of `flat`. Per-sample speed fields are copied from the batch-1
    timing pass where that sample was timed, NaN otherwise (a batched call says nothing about one
    sample's latency). With a SketchWalk `runtime`, a row's decode steps stop counting towards the
    density once its answer is complete (`_AnswerTracker`), so density covers the answers alone.
    """
    from rich.progress import Progress

    positions = sample_positions(flat) if positions is None else positions
    # Joined by position, not RULER's `index` (which repeats in imported files): see sample_positions.
    timing = {(r.task, r.length, r.position): r for r in timed}
    pad, eos = _pad_id(tokenizer), tokenizer.eos_token_id
    encoded = [_encode(tokenizer, s, device)[0] for _, _, s in flat]
    by_length: dict[int, list[int]] = {}
    for i, (_, length, _) in enumerate(flat):
        by_length.setdefault(length, []).append(i)
    results: list[Optional[SampleResult]] = [None] * len(flat)
    nan = float("nan")
    with Progress(disable=not progress, transient=False) as bar:
        job = bar.add_task(f"answering (batch {batch_size})", total=len(flat))
        for length in sorted(by_length):
            order = sorted(by_length[length], key=lambda i: (int(encoded[i].numel()), i))
            tokens = max(int(encoded[i].numel()) + tokens_to_generate(flat[i][0]) for i in order)
            size, why = memory_batch_size(model, runtime, batch_size, tokens, _free_device_bytes(device))
            if why:
                bar.console.print(f"note: {length} tokens: {why}", soft_wrap=True)
            for start in range(0, len(order), size):
                chunk = order[start:start + size]
                ids, mask = _left_pad([encoded[i] for i in chunk], pad if pad is not None else 0)
                budgets = [tokens_to_generate(flat[i][0]) for i in chunk]
                tracker = _AnswerTracker(runtime, budgets, eos)
                try:
                    with torch.no_grad():
                        out = model.generate(ids, attention_mask=mask, max_new_tokens=max(budgets), do_sample=False,
                                             pad_token_id=pad, stopping_criteria=StoppingCriteriaList([tracker]))
                finally:
                    tracker.close()
                for j, i in enumerate(chunk):
                    task, _, sample = flat[i]
                    new = _until_eos(out[j, ids.shape[1]:ids.shape[1] + budgets[j]], eos)
                    pred, score = _score(tokenizer, task, sample, new)
                    index, position = int(sample.get("index", i)), positions[id(sample)]
                    t = timing.get((task, length, position))
                    results[i] = SampleResult(task, length, index, int(encoded[i].numel()), pred,
                                              list(sample["outputs"]), score, t.prefill_s if t else nan,
                                              t.generate_s if t else nan, int(new.numel()),
                                              t.decode_s if t else nan, t.new_tokens if t else None,
                                              t.prefill_forward_s if t else None, position=position)
                bar.advance(job, len(chunk))
    return results


# Share of the device's free memory a batch's Sketch&Walk decode state may take: the rest is for
# the KV cache, activations and the allocator's slack.
DECODE_STATE_SHARE = 0.5


def memory_batch_size(model, runtime, batch_size: int, tokens: int, free_bytes: Optional[int]) -> tuple[int, str]:
    """(batch size that fits, '' or why it was lowered) for left-padded batches of prompts up to
    `tokens` tokens (prompt + answer budget): the runtime's decode state (`decode_state_bytes`, per
    sequence) may use DECODE_STATE_SHARE of `free_bytes` (None: no limit, e.g. on the CPU). Batching
    changes no answer, so a smaller batch is safe; it only takes longer."""
    if runtime is None or free_bytes is None or batch_size == 1:
        return batch_size, ""
    layers, head_dim = model_shape(model.config)
    per_seq = decode_state_bytes(runtime.config, layers, int(model.config.num_attention_heads), head_dim, tokens)
    if per_seq == 0:
        return batch_size, ""
    fits = max(1, int(DECODE_STATE_SHARE * free_bytes // per_seq))
    if fits >= batch_size:
        return batch_size, ""
    return fits, (f"answering in batches of {fits}, not {batch_size}: the Sketch&Walk decode state needs about "
                  f"{per_seq / 2 ** 30:.2f} GiB per sequence and {free_bytes / 2 ** 30:.1f} GiB are free")


def _free_device_bytes(device: torch.device) -> Optional[int]:
    """Free memory of a CUDA device in bytes; None elsewhere (no limit is applied)."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


class _AnswerTracker(StoppingCriteria):
    """Follows which rows of a batched generate() have a complete answer (EOS, or their own budget)
    and tells the SketchWalk runtime to stop counting their decode steps (`counted_rows`).

    generate() calls it after every new token, before the step that feeds that token back: a row
    whose token k ended its answer takes no further counted step, exactly the steps batch 1 runs.
    It never stops generation itself (generate's own EOS and length checks do).
    """

    def __init__(self, runtime, budgets: Sequence[int], eos: Optional[int]):
        self.runtime, self.budgets, self.eos = runtime, list(budgets), eos
        self.live = [True] * len(budgets)
        self.new_tokens = 0
        if runtime is not None:
            runtime.counted_rows = None

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        self.new_tokens += 1
        if self.runtime is not None:
            last = input_ids[:, -1].tolist()
            self.live = [keep and tok != self.eos and self.new_tokens < budget
                         for keep, tok, budget in zip(self.live, last, self.budgets)]
            self.runtime.counted_rows = list(self.live)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def close(self) -> None:
        if self.runtime is not None:
            self.runtime.counted_rows = None


def _left_pad(seqs: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[n] token tensors -> (ids, attention_mask): [batch, longest], padding on the left."""
    longest = max(int(s.numel()) for s in seqs)
    ids = seqs[0].new_full((len(seqs), longest), pad_id)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, longest - s.numel():] = s
        mask[b, longest - s.numel():] = 1
    return ids, mask


def _until_eos(new: torch.Tensor, eos: Optional[int]) -> torch.Tensor:
    """New tokens up to and including the first EOS (what a batch-1 generate() would have returned)."""
    if eos is None:
        return new
    hits = (new == eos).nonzero()
    return new[:int(hits[0, 0]) + 1] if hits.numel() else new


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


def _nan_if_none(v: Optional[float]) -> float:
    """A per-sample timing for medians: None (not timed) as NaN."""
    return float("nan") if v is None else v


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
