"""`SweepSpec`: a sweep definition (YAML), validated before anything runs.

A sweep file holds the model, the RULER suite, the search space over `SketchWalkConfig` fields,
the objectives, constraints, budget, driver backend and tracking settings. Every error names the
field (as a dotted path, e.g. `space.density.low`) and what is allowed. See `sweeps/default.yaml`
for an annotated example.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sketchwalk.bench.deploy import DeploymentSpeed
from sketchwalk.config import ConfigError, SketchWalkConfig
from sketchwalk.input_errors import first_error

from .records import OBJECTIVES, SPEEDUP_OBJECTIVES

SPEED_AUTO = "speed"  # resolves to prefill_speedup with `speed:`, else prefill_forward on CUDA, density on CPU
BACKENDS = ("optuna", "ray")
VARIANT_PARAM = "variant"  # the one parameter of a fixed-variant sweep; its values are the variant names
VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:=@,+-]{0,127}$")  # safe in MLflow filters and file names
SAMPLERS = ("tpe", "gp", "random")
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(SketchWalkConfig))


class SweepSpecError(ValueError):
    """Invalid sweep definition; `field` is the dotted path of the offending entry."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        # A command-line flag is named as typed; a file entry as its dotted path under `sweep.`.
        super().__init__(f"{field}: {message}" if field.startswith("-") else f"sweep.{field}: {message}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CategoricalParam(_Strict):
    """Pick one of `values`."""

    type: Literal["categorical"]
    values: list[Union[int, float, str, bool, None]] = Field(min_length=1)
    when: Optional[dict[str, Any]] = None


class IntParam(_Strict):
    """An integer in [low, high] (inclusive), with `step`, or log-uniform."""

    type: Literal["int"]
    low: int
    high: int
    step: int = 1
    log: bool = False
    when: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _range(self):
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) must be >= low ({self.low})")
        if self.log and (self.low <= 0 or self.step != 1):
            raise ValueError("log: true needs low > 0 and step 1")
        return self


class FloatParam(_Strict):
    """A float in [low, high], uniform or log-uniform (optionally quantised by `step`)."""

    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: Optional[float] = None
    when: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _range(self):
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.high < self.low:
            raise ValueError(f"need finite low <= high, got [{self.low}, {self.high}]")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("log: true needs low > 0 and no step")
        return self


Param = Annotated[Union[CategoricalParam, IntParam, FloatParam], Field(discriminator="type")]


class Budget(_Strict):
    """Stop after `trials` finished trials (COMPLETE or FAIL) and/or `wall_time_s` seconds."""

    trials: Optional[int] = Field(default=None, ge=1)
    wall_time_s: Optional[float] = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _some(self):
        if self.trials is None and self.wall_time_s is None:
            raise ValueError("set trials and/or wall_time_s")
        return self


class Constraints(_Strict):
    """`max_accuracy_drop`: points of accuracy below the dense baseline a trial may lose and still be
    feasible (infeasible trials are recorded but never on the front nor exported)."""

    max_accuracy_drop: Optional[float] = Field(default=None, ge=0)


class Resources(_Strict):
    """Per trial: `gpus` ('auto' = 1 if the driver sees a CUDA GPU, else 0) and `cpus`."""

    gpus: Union[Literal["auto"], float] = "auto"
    cpus: float = Field(default=1, gt=0)

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, v):
        if v != "auto" and (v < 0 or (v > 1 and v != int(v))):
            raise ValueError("gpus must be 'auto', 0, a fraction in (0, 1] or a whole number")
        return v


class Tracking(_Strict):
    """MLflow: `uri` (None = sqlite file runs/mlflow.db under the working directory; http(s)://
    for a server) and the `experiment` name."""

    uri: Optional[str] = None
    experiment: str = "sketchwalk"


class Analysis(_Strict):
    """Pareto analysis and export at the end of the sweep."""

    noise_aware: bool = False
    export_rule: str = "knee"

    @field_validator("export_rule")
    @classmethod
    def _rule(cls, v):
        # Parsed here, so a typo fails before the first trial rather than after the last one.
        from .export import RULE_FORMS, ExportRule, RuleError

        try:
            ExportRule.parse(v)
        except RuleError as exc:
            raise ValueError(f"{v!r} is not an export rule ({exc.why}); "
                             f"allowed: {', '.join(RULE_FORMS)}") from None
        return v


class RunSettings(_Strict):
    """What a sweep file and an ablation plan both set, with one meaning: the name, what is
    evaluated (model, suite, samples, essays, dtype, batching, attention backend), how it is driven
    (backend, concurrency, resources, seed) and where it is stored (storage, tracking). An ablation
    plan hands these to its sweep unchanged (`ablations.runner.sweep_spec`)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    model: str = "smollm2-135m"
    suite: str = "ruler-smoke"
    samples: Optional[int] = Field(default=None, ge=1)
    batch_size: int = Field(default=1, ge=1)  # samples per generate() call (latency still timed at batch 1)
    timing_samples: int = Field(default=2, ge=1)  # with batch_size > 1: samples per length timed at batch 1
    essays: Optional[str] = None
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    attention_backend: Literal["auto", "triton", "torch"] = "auto"
    backend: Literal["optuna", "ray"] = "optuna"
    seed: int = Field(default=0, ge=0)
    concurrency: int = Field(default=1, ge=1)
    resources: Resources = Field(default_factory=Resources)
    tracking: Tracking = Field(default_factory=Tracking)
    storage: Optional[str] = None  # Optuna RDB URL; None = sqlite:///<workdir>/runs/optuna.db
    # Speed at deployment lengths (sketchwalk.bench.deploy): accuracy stays on the suite's lengths, the
    # speed objectives are timed here, e.g. {lengths: [32768, 65536], shape: null}. None = not timed.
    speed: Optional[DeploymentSpeed] = None


RUN_SETTINGS = tuple(RunSettings.model_fields)


class SweepSpec(RunSettings):
    """A validated sweep definition (see the module docstring and sweeps/*.yaml)."""

    sampler: Literal["tpe", "gp", "random"] = "tpe"
    base: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, Param] = Field(default_factory=dict)
    # Fixed trials instead of a search (set exactly one of space, variants): {name: SketchWalkConfig
    # overrides on `base`, or null = dense attention}. Each is evaluated exactly once, enqueued in file
    # order as the categorical parameter `variant`; budget.trials defaults to (and must equal) their number.
    variants: dict[str, Optional[dict[str, Any]]] = Field(default_factory=dict)
    objectives: list[str] = Field(default_factory=lambda: ["accuracy", SPEED_AUTO], min_length=1)
    constraints: Constraints = Field(default_factory=Constraints)
    budget: Budget = Field(default_factory=lambda: Budget(trials=8))
    trial_retries: int = Field(default=0, ge=0)  # ray: FailureConfig.max_failures (worker crashes)
    heartbeat_s: int = Field(default=10, ge=1)  # optuna: a trial silent for 3x this is stale -> re-queued
    analysis: Analysis = Field(default_factory=Analysis)

    @field_validator("space")
    @classmethod
    def _space_fields(cls, space):
        for name, p in space.items():
            if name not in CONFIG_FIELDS:
                raise ValueError(f"{name!r} is not a SketchWalkConfig field; allowed: {list(CONFIG_FIELDS)}")
            if p.when:
                for cond in p.when:
                    if cond not in CONFIG_FIELDS:
                        raise ValueError(f"{name}.when refers to {cond!r}, which is not a SketchWalkConfig field")
        if "top_k" in space and "density" in space:
            raise ValueError("search either top_k or density, not both (they are two ways to set τ)")
        return space

    @field_validator("variants")
    @classmethod
    def _variants(cls, variants):
        for name, over in variants.items():
            if not VARIANT_NAME.match(name):
                raise ValueError(f"variant name {name!r} must match {VARIANT_NAME.pattern}")
            unknown = sorted(set(over or {}) - set(CONFIG_FIELDS))
            if unknown:
                raise ValueError(f"{name}: {unknown[0]!r} is not a SketchWalkConfig field; allowed: {list(CONFIG_FIELDS)}")
        return variants

    @model_validator(mode="before")
    @classmethod
    def _variant_budget(cls, data):
        # A fixed-variant sweep runs each variant once: its natural budget is their number.
        if isinstance(data, dict) and data.get("variants") and "budget" not in data and isinstance(data["variants"], dict):
            data = {**data, "budget": {"trials": len(data["variants"])}}
        return data

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, objs):
        allowed = ["accuracy", SPEED_AUTO, *[o for o in OBJECTIVES if o != "accuracy"]]
        for o in objs:
            if o not in allowed:
                raise ValueError(f"unknown objective {o!r}; allowed: {allowed}")
        if len(set(objs)) != len(objs):
            raise ValueError("objectives must be distinct")
        return objs

    @field_validator("base")
    @classmethod
    def _base(cls, base):
        unknown = sorted(set(base) - set(CONFIG_FIELDS))
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a SketchWalkConfig field; allowed: {list(CONFIG_FIELDS)}")
        return base

    @model_validator(mode="after")
    def _speedups_need_speed(self):
        for o in self.objectives:
            if o in SPEEDUP_OBJECTIVES and self.speed is None:
                raise ValueError(f"objective {o!r} is measured at deployment lengths: add `speed: {{lengths: "
                                 f"[32768, 65536]}}` (or use prefill_forward)")
            if o == "decode_speedup" and self.speed is not None and not self.speed.decode:
                raise ValueError("objective 'decode_speedup' needs speed.decode: true")
        return self

    @model_validator(mode="after")
    def _cross(self):
        if bool(self.space) == bool(self.variants):
            raise ValueError("set exactly one of `space` (a search) and `variants` (fixed configs, each run once)")
        if self.variants and self.budget.trials != len(self.variants):
            raise ValueError(f"budget.trials must equal the number of variants ({len(self.variants)}), or be "
                             f"omitted: each variant is evaluated exactly once")
        if self.backend == "optuna" and self.concurrency != 1:
            raise ValueError("concurrency > 1 needs backend: ray (the optuna backend runs one trial at a time "
                             "per process; start more workers with `sketchwalk sweep --resume ID` to share its study)")
        return self


# -- loading ----------------------------------------------------------------------------------

def parse_spec(data: dict[str, Any], *, source: str = "<dict>") -> SweepSpec:
    """Validate a mapping into a SweepSpec; raises SweepSpecError naming the first bad field."""
    if not isinstance(data, dict):
        raise SweepSpecError("<root>", f"{source} must hold a mapping, got {type(data).__name__}")
    data = dict(data)
    data.setdefault("name", Path(source).stem if source != "<dict>" else "sweep")
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        field, msg = first_error(exc, SweepSpec)
        raise SweepSpecError(field or "<root>", msg) from None
    check_space_values(spec)
    return spec


def read_yaml_file(path: str | os.PathLike, error=SweepSpecError):
    """The parsed content of a YAML file ({} when empty); `error("<file>", message)` is raised when
    the file is missing or not valid YAML (sweep files and ablation plans share this)."""
    p = Path(path)
    if not p.is_file():
        raise error("<file>", f"{path}: no such file")
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise error("<file>", f"{path}: invalid YAML: {exc}") from None


def load_spec(path: str | os.PathLike) -> SweepSpec:
    """Read and validate a sweep YAML file."""
    return parse_spec(read_yaml_file(path), source=str(Path(path)))


def spec_to_yaml(spec: SweepSpec) -> str:
    """The spec as YAML (all defaults filled in), loadable by `load_spec`."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def check_space_values(spec: SweepSpec) -> None:
    """Every value the space can produce must be a valid SketchWalkConfig value: probe the bounds
    and each categorical value on top of `base`, so a bad range fails before any trial runs."""
    try:
        base = SketchWalkConfig.from_dict(_base_with_tau(spec.base, spec.space))
    except ConfigError as exc:
        raise SweepSpecError(f"base.{exc.field}", str(exc)) from None
    for name, p in spec.space.items():
        for v in _probes(p):
            try:
                base.replace(**{name: v})
            except ConfigError as exc:
                if isinstance(p, CategoricalParam) or v in (p.low, p.high):
                    where = "values" if isinstance(p, CategoricalParam) else ("low" if v == p.low else "high")
                    raise SweepSpecError(f"space.{name}.{where}", f"{v!r} is invalid: allowed {exc.allowed}") from None
                # An inner value of an int range (e.g. 17 in sketch_dim [16, 64]): every trial that
                # samples one would fail, so the range itself is refused.
                valid = [x for x in _probes(p) if _accepts(base, name, x)]
                raise SweepSpecError(f"space.{name}", f"type int over [{p.low}, {p.high}] step {p.step} samples "
                                                      f"{v!r}, which is invalid: allowed {exc.allowed}; use type: "
                                                      f"categorical with values {valid[:16]}") from None
            except TypeError as exc:
                raise SweepSpecError(f"space.{name}", str(exc)) from None
    seen: dict[str, str] = {}
    for name in spec.variants:
        try:
            config = variant_config(spec, name)
        except ConfigError as exc:
            raise SweepSpecError(f"variants.{name}.{exc.field}", str(exc)) from None
        key = "dense" if config is None else config.short_hash()
        if key in seen:
            raise SweepSpecError(f"variants.{name}", f"same config as variant {seen[key]!r}: each config runs once")
        seen[key] = name


_MAX_PROBED = 10_000  # int ranges up to this many values are checked value by value


def _probes(p) -> list:
    """The values of a param to validate: every categorical value; every value of an int range (its
    bounds only beyond _MAX_PROBED values); a float range's bounds."""
    if isinstance(p, CategoricalParam):
        return list(p.values)
    if isinstance(p, IntParam) and (p.high - p.low) // p.step < _MAX_PROBED:
        return list(range(p.low, p.high + 1, p.step))
    return [p.low, p.high]


def _accepts(base: SketchWalkConfig, name: str, value: Any) -> bool:
    try:
        base.replace(**{name: value})
    except (ConfigError, TypeError):
        return False
    return True


def check_space_for_model(spec: SweepSpec, num_layers: int, head_dim: int, model: str) -> None:
    """The fields that depend on the model (skip_layers < num_layers, sketch_dim <= head_dim) for
    `base`, each bound / categorical value of the space and each variant: SweepSpecError naming the
    dotted field and this model's range, before any weight loads."""
    def problem(config: Optional[SketchWalkConfig]) -> Optional[ConfigError]:
        try:
            if config is not None:
                config.validate_for_model(num_layers, head_dim)
        except ConfigError as exc:
            return exc
        return None

    def refuse(field: str, exc: ConfigError) -> None:
        raise SweepSpecError(field, f"{exc.value!r} is invalid for {model}: allowed {exc.allowed}")

    base = SketchWalkConfig.from_dict(_base_with_tau(spec.base, spec.space))
    for name, p in spec.space.items():
        for v in p.values if isinstance(p, CategoricalParam) else [p.low, p.high]:
            exc = problem(base.replace(**{name: v}))
            if exc is not None:  # the sampled field itself, or a base field no sample overrides
                where = "values" if isinstance(p, CategoricalParam) else ("low" if v == p.low else "high")
                refuse(f"space.{name}.{where}" if exc.field == name else f"base.{exc.field}", exc)
    exc = problem(base)
    if exc is not None and exc.field not in spec.space:  # a searched field's base value is never used
        refuse(f"base.{exc.field}", exc)
    for name in spec.variants:
        exc = problem(variant_config(spec, name))
        if exc is not None:
            refuse(f"variants.{name}.{exc.field}", exc)


def _base_with_tau(base: dict[str, Any], space: dict[str, Any]) -> dict[str, Any]:
    """`base` with τ expressed the way the space searches it (top_k xor density)."""
    out = dict(base)
    if "top_k" in space and "density" not in out:
        out["density"] = None
        out.setdefault("top_k", 1)
    return out


def config_from_params(spec: SweepSpec, params: dict[str, Any]) -> Optional[SketchWalkConfig]:
    """The trial's SketchWalkConfig: `base`, then the sampled `params` (ConfigError if invalid).
    In a fixed-variant sweep `params` is {"variant": name}: that variant's config (None = dense)."""
    if spec.variants:
        return variant_config(spec, params[VARIANT_PARAM])
    # `replace` is where switching τ between top_k and density is written (once).
    return SketchWalkConfig.from_dict(_base_with_tau(spec.base, spec.space)).replace(**params)


def variant_config(spec: SweepSpec, name: str) -> Optional[SketchWalkConfig]:
    """Variant `name` of a fixed-variant sweep: `base` with its overrides (switching between top_k and
    density as `SketchWalkConfig.replace` does), or None for a dense variant. KeyError if unknown."""
    overrides = spec.variants[name]
    if overrides is None:
        return None
    return SketchWalkConfig.from_dict(dict(spec.base)).replace(**overrides)


def new_sweep_id(spec: SweepSpec, now: Optional[_dt.datetime] = None) -> str:
    """`<name>-<UTC timestamp>`: unique per launch, readable, and safe as a study/run/dir name."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return f"{spec.name}-{now.strftime('%Y%m%d-%H%M%S')}"


SWEEP_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def check_sweep_id(sweep_id: str, flag: str = "--sweep-id") -> str:
    """`sweep_id` if it is safe as a directory name, an Optuna study name and an MLflow filter literal
    (no "/", no quote, no leading "."); else SweepSpecError naming `flag` and the allowed form."""
    if not SWEEP_ID_RE.match(str(sweep_id)):
        raise SweepSpecError(flag, f"{sweep_id!r} is not a valid sweep id: allowed 1-96 letters, digits, '_', '.' "
                                   f"or '-', starting with a letter or digit ({SWEEP_ID_RE.pattern})")
    return sweep_id
