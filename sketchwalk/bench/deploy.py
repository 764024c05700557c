"""Speed at deployment lengths: the prefill forward and one decode step at the lengths users deploy.

RULER accuracy is measured at lengths inside the model's context (4K-8K for the bundled SmolLM2),
where a small model's prefill is launch-bound and no sparse config can beat dense. What a user
ships is decided at the lengths they deploy (32K-128K), so a sweep (`speed:` in the sweep file) and
`sketchwalk eval --speed-lengths` also time the model, or a named shape with random weights (e.g.
`llama8b`: the architecture decides the speed, not the weights), at those lengths:

  prefill_ms[n]  the bare prefill forward of [1, n] random ids with a KV cache, logits_to_keep=1;
  decode_ms[n]   one decode step at batch `batch` on the cache of a [batch, n] prefill;

each the median of `repeats` calls after `warmup` (CUDA events on a GPU; wall clock on the CPU, a
code-path check, not a measurement). The same calls as `sketchwalk bench e2e` (`e2e.Bench`).
Speedups against dense come from the dense baseline measured with the same plan
(`speedups`).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..config import SketchWalkConfig
from ..method.batched_decode import decode_state_bytes
from ..method.static_decode import static_decode_refusal
from .e2e_plan import MAX_SEQ, ModelShape, PlanError, check_memory, load_shape, weight_count

MIN_SEQ = 128  # shorter is not a deployment length (and below a few blocks nothing is sparse)


class SpeedPlanError(ValueError):
    """A speed plan that cannot run here (memory, a config the shape refuses): `field` names the entry."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


class DeploymentSpeed(BaseModel):
    """What to time at deployment lengths (the `speed:` entry of a sweep file or ablation plan).

    lengths: tokens, each in [128, 1M]; shape: None = the evaluated model itself, else a named shape
    (`llama8b`, `smollm2`, `tiny`) or a config.json path built with random weights; decode: also
    time one decode step; batch: its batch size; repeats / warmup: timed / untimed calls per value;
    graphs: time the prefill forward captured in one CUDA graph and the decode step replayed from one
    on a StaticCache (`e2e.Bench.graphed_prefill_ms` / `graphed_decode_ms`), as a deployment with
    CUDA graphs runs them, for dense and the config alike (CUDA only; the config's decode must be
    one the static decode covers).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    lengths: list[int] = Field(min_length=1, max_length=16)
    shape: Optional[str] = None
    decode: bool = True
    batch: int = Field(default=1, ge=1, le=256)
    repeats: int = Field(default=3, ge=1, le=50)
    warmup: int = Field(default=1, ge=0, le=10)
    graphs: bool = False

    @field_validator("lengths")
    @classmethod
    def _lengths(cls, values):
        for n in values:
            if not MIN_SEQ <= n <= MAX_SEQ:
                raise ValueError(f"{n} is outside [{MIN_SEQ}, {MAX_SEQ}] tokens")
        return sorted(set(values))

    @field_validator("shape")
    @classmethod
    def _shape(cls, value):
        if value is not None:
            try:
                load_shape(value)
            except PlanError as exc:
                raise ValueError(exc.message) from None
        return value

    def fingerprint(self) -> dict[str, Any]:
        """What the dense baseline's speed numbers depend on (its cache key): the plan, and the shape's
        fields when it is a config.json file (whose content could change under the same path)."""
        d = self.model_dump()
        if self.shape is not None:
            d["shape_fields"] = load_shape(self.shape).fields
        return d

    def target_shape(self, model) -> ModelShape:
        """The ModelShape timed: the named shape, else the evaluated model's own config."""
        if self.shape is not None:
            return load_shape(self.shape)
        fields = {k: v for k, v in model.config.to_dict().items() if isinstance(v, (int, float, bool, str))}
        return ModelShape("model", "the evaluated model", fields)

    def check(self, model, config: Optional[SketchWalkConfig] = None, free_bytes: Optional[int] = None) -> None:
        """Refuse, before any timing, a plan the device cannot hold or a config the timed shape refuses.

        model: the evaluated model, loaded (its device and dtype are the timing's); free_bytes: device
        memory free now (None = ask the device). Raises SpeedPlanError naming `speed.lengths` /
        `speed.batch` / `speed.shape`."""
        from .e2e import free_memory_bytes

        param = next(model.parameters())
        free = free_memory_bytes(param.device) if free_bytes is None else free_bytes
        if self.shape is None:
            free += _weight_bytes(model)  # its weights are loaded already: check_memory counts them
        self._check(self.target_shape(model), param.device.type, param.element_size(), free, config)

    def check_before_load(self, model_fields: Optional[dict[str, Any]], device: str, elem_bytes: int,
                          free_bytes: int, config: Optional[SketchWalkConfig] = None) -> None:
        """The same refusals before the evaluated model is loaded, from its architecture
        (`model_facts.config_fields_without_loading`; None = unknown, then only a named shape is checked):
        device 'cuda' | 'cpu', elem_bytes of the dtype it will load in, free_bytes on that device now.
        A named shape must fit beside the evaluated model's weights."""
        model = ModelShape("model", "the evaluated model", model_fields) if model_fields else None
        if self.shape is None:
            if model is not None:
                self._check(model, device, elem_bytes, free_bytes, config)
            return
        if model is not None:
            free_bytes -= weight_count(model) * elem_bytes
        self._check(load_shape(self.shape), device, elem_bytes, free_bytes, config)

    def _check(self, shape: ModelShape, device: str, elem_bytes: int, free: int,
               config: Optional[SketchWalkConfig]) -> None:
        if self.graphs:
            if device != "cuda":
                raise SpeedPlanError("speed.graphs", f"CUDA graphs need a CUDA device (this run is on {device})")
            refusal = static_decode_refusal(config) if config is not None and self.decode else None
            if refusal:
                raise SpeedPlanError("speed.graphs", refusal)
        if config is not None:
            try:
                config.validate_for_model(shape.fields["num_hidden_layers"], shape.head_dim)
            except ValueError as exc:
                raise SpeedPlanError("speed.shape", f"{shape.name} cannot run this config: {exc}") from None
        for n in self.lengths:
            if device != "cuda":
                # Off CUDA, attention (the reference path, SDPA's math kernel) materialises a layer's
                # [heads, n, n] scores, which check_memory (for the O(n) kernels) does not count.
                scores = shape.fields["num_attention_heads"] * n * n * elem_bytes
                if scores > free:
                    raise SpeedPlanError("speed.lengths", f"{n} tokens on {device}: one layer's attention "
                                                          f"scores need {scores / 2 ** 30:.1f} GiB, more than the "
                                                          f"{free / 2 ** 30:.1f} GiB free")
            # A prefill builds the config's decode state per sequence; a static decode (graphs) holds
            # its own beside it while seeding.
            state = 0 if config is None else decode_state_bytes(
                config, shape.fields["num_hidden_layers"], shape.fields["num_attention_heads"], shape.head_dim, n)
            for batch in ([1, self.batch] if self.decode else [1]):
                err = check_memory(shape, n, batch, elem_bytes, free, self.repeats + self.warmup,
                                   state * (2 if self.graphs and self.decode else 1))
                if err is not None:
                    field = "speed.batch" if err.flag == "--batch" else "speed.lengths"
                    raise SpeedPlanError(field, err.message)


def _weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


_SHAPE_MODELS: dict[tuple, Any] = {}  # one random-weight model kept per (shape, device, dtype): a sweep times every trial on it


def shape_model(shape: ModelShape, device: torch.device, dtype: torch.dtype):
    """The random-weight model of `shape` on device/dtype, built once (the last one built is kept)."""
    from .e2e import build_model

    key = (shape.name, tuple(sorted(shape.fields.items())), str(device), dtype)
    if key not in _SHAPE_MODELS:
        _SHAPE_MODELS.clear()
        _SHAPE_MODELS[key] = build_model(shape, device, dtype, seed=0)
    return _SHAPE_MODELS[key]


def measure_deployment_speed(model, config: Optional[SketchWalkConfig], plan: DeploymentSpeed, *,
                             backend: str = "auto") -> dict[str, Any]:
    """Time `config` (None = dense) at the plan's lengths on `model` (or the plan's shape, on the
    model's device and dtype).

    Returns {"shape", "clock", "batch", "prefill_ms": {str(n): ms}, "decode_ms": {str(n): ms}} (decode_ms
    empty when plan.decode is off). Call `plan.check` first: this does not re-check memory.
    """
    from ..integration.hf import attach, detach
    from .e2e import Bench, _free

    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    shape = plan.target_shape(model)
    target = model if plan.shape is None else shape_model(shape, device, dtype)
    bench = Bench(target, shape.name, device, repeats=plan.repeats, warmup=plan.warmup, seed=0)
    runtime = attach(target, config, backend=backend) if config is not None else None
    out: dict[str, Any] = {"shape": shape.name, "clock": "cuda-events" if device.type == "cuda" else "cpu",
                           "batch": plan.batch, "prefill_ms": {}, "decode_ms": {}}
    try:
        for n in plan.lengths:
            out["prefill_ms"][str(n)] = _timed(bench, "prefill", n, 1, runtime, plan.graphs)
            _free(device)
            if plan.decode:
                out["decode_ms"][str(n)] = _timed(bench, "decode", n, plan.batch, runtime, plan.graphs)
                _free(device)
    finally:
        if runtime is not None:
            detach(target)
    return out


def _timed(bench, phase: str, n: int, batch: int, runtime, graphs: bool) -> float:
    """ms of one call of `phase`: eager, or from a CUDA graph (SpeedPlanError naming speed.graphs
    when the capture fails: the trial fails, the sweep goes on)."""
    if not graphs:
        return bench.measure(phase, n, batch, runtime, breakdown=False)[0]
    ms, why = bench.graphed_prefill_ms(n, batch) if phase == "prefill" else bench.graphed_decode_ms(n, batch)
    if ms is None:
        raise SpeedPlanError("speed.graphs", f"the {phase} at {n} tokens could not be captured: {why}")
    return ms


def speedups(speed: dict[str, Any], dense: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{"prefill": {n: dense ms / ms}, "decode": {...}} over the lengths both measured (same shape),
    plus "prefill_mean" / "decode_mean": their geometric means (NaN when none)."""
    if speed.get("shape") != dense.get("shape"):
        return {}
    out: dict[str, Any] = {}
    for phase in ("prefill", "decode"):
        mine, ref = speed.get(f"{phase}_ms") or {}, dense.get(f"{phase}_ms") or {}
        ratios = {n: ref[n] / ms for n, ms in mine.items() if n in ref and ms > 0 and math.isfinite(ref[n] / ms)}
        out[phase] = ratios
        out[f"{phase}_mean"] = (math.exp(sum(math.log(r) for r in ratios.values()) / len(ratios))
                                if ratios else float("nan"))
    return out
