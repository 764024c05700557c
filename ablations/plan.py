"""Ablation plans: a YAML file -> validated `AblationPlan` -> the list of named `Variant`s to run.

A plan fixes the model, the RULER suite and the sweep settings (as a sweep file does), a `base`
SketchWalkConfig (inline, `base_from` an exported best.yaml, or the paper defaults at density 0.2),
and the variants to compare with it, built from four sources under `variants:`:

- `components`: named switch sets per component group (`default` = DEFAULT_COMPONENTS, a list of
  its group names, or your own {group: [{field: value, ...}, ...]}; an own set may carry `name:`,
  the variant's name instead of its `field=value` list);
- `one_factor`: {field: [values]}: each field swept over its values, the others at base;
- `baselines`: dense, oracle, streaming, random (the selectors at base's τ rule, so density is
  matched by construction) and one_hop ({sketch: exact, walk: none});
- `densities` x `selectors`: density levels per selector, for accuracy-vs-density curves.

Every variant has a stable name (`walk=none`, `baseline:oracle`, `selector=random@0.1`); a variant
whose config equals an earlier one's (base included) is not run twice: its name becomes an alias.
Errors name the dotted field (`variants.one_factor.walk`) and the allowed values, and are raised
before any model loads.
"""
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from search.spec import RunSettings, Tracking
from sketchwalk.config import PHASES, ConfigError, SketchWalkConfig
from sketchwalk.input_errors import first_error

CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(SketchWalkConfig))
SELECTORS = ("sketchwalk", "oracle", "random", "streaming")
BASE = "base"  # the name of the base variant (always run, always first)
DENSE_NAME = "baseline:dense"

# Component switch sets of `components: default`. A set equal to base (e.g. walk=product when base
# walks the product) is base itself and becomes an alias of it, so "X vs base" needs no special case.
# local_blocks has no "off" switch: SketchWalkConfig requires local_blocks >= 1 because the diagonal
# block holds each query's own token and the causal mask inside it; without it a query in block 0
# would attend to nothing (an all -inf softmax row). Use `one_factor: {local_blocks: [2, 4]}` to
# measure sensitivity to the local window instead.
DEFAULT_COMPONENTS: dict[str, list[dict[str, Any]]] = {
    "walk": [{"walk": "product"}, {"walk": "damped"}, {"walk": "none"}],
    "sketch": [{"sketch": "hadamard"}, {"sketch": "exact"}],
    "head_aggregation": [{"head_aggregation": "mean_qk"}, {"head_aggregation": "sum_probs"}],
    "sparsity_exponent": [{"sparsity_exponent": 1.0}],
    "sink_blocks": [{"sink_blocks": 0}],
    "skip_layers": [{"skip_layers": n} for n in range(5)],
    "phases": [{"phases": p} for p in PHASES],
}

# Baselines: (variant name, switch set on base; None = dense attention).
BASELINES: dict[str, tuple[str, Optional[dict[str, Any]]]] = {
    "dense": (DENSE_NAME, None),
    "oracle": ("baseline:oracle", {"selector": "oracle"}),
    "streaming": ("baseline:streaming", {"selector": "streaming"}),
    "random": ("baseline:random", {"selector": "random"}),
    "one_hop": ("baseline:one-hop", {"sketch": "exact", "walk": "none"}),
}


class PlanError(ValueError):
    """Invalid ablation plan; `field` is the dotted path of the offending entry."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"plan.{field}: {message}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VariantSources(_Strict):
    """Where the variants come from (see the module docstring)."""

    components: Any = Field(default=None, validate_default=True)
    one_factor: dict[str, list[Any]] = Field(default_factory=dict)
    baselines: list[Literal["dense", "oracle", "streaming", "random", "one_hop"]] = Field(default_factory=list)
    densities: list[float] = Field(default_factory=list)
    # crossed with `densities` (ignored without them); default: every selector
    selectors: list[Literal["sketchwalk", "oracle", "random", "streaming"]] = Field(default_factory=lambda: list(SELECTORS))

    @field_validator("components")
    @classmethod
    def _components(cls, value):
        """Normalise to {group: [switch set, ...]}."""
        allowed = f"'default', a list of {list(DEFAULT_COMPONENTS)} or {{group: [{{field: value}}, ...]}}"
        if value is None or value is False:
            return {}
        if value is True or value == "default":
            return {g: [dict(s) for s in sets] for g, sets in DEFAULT_COMPONENTS.items()}
        if isinstance(value, list) and all(isinstance(g, str) for g in value):
            unknown = [g for g in value if g not in DEFAULT_COMPONENTS]
            if unknown:
                raise ValueError(f"unknown component group {unknown[0]!r}; allowed: {list(DEFAULT_COMPONENTS)}")
            return {g: [dict(s) for s in DEFAULT_COMPONENTS[g]] for g in value}
        if isinstance(value, dict):
            out = {}
            for group, sets in value.items():
                if not isinstance(sets, list) or not sets or not all(isinstance(s, dict) and s for s in sets):
                    raise ValueError(f"{group}: a non-empty list of switch sets ({{field: value}}) expected")
                for s in sets:
                    unknown = sorted(set(s) - set(CONFIG_FIELDS) - {"name"})
                    if unknown:
                        raise ValueError(f"{group}: {unknown[0]!r} is not a SketchWalkConfig field; "
                                         f"allowed: {list(CONFIG_FIELDS)}")
                out[str(group)] = [dict(s) for s in sets]
            return out
        raise ValueError(f"got {value!r}; allowed: {allowed}")

    @field_validator("one_factor")
    @classmethod
    def _one_factor(cls, value):
        for name, values in value.items():
            if name not in CONFIG_FIELDS:
                raise ValueError(f"{name!r} is not a SketchWalkConfig field; allowed: {list(CONFIG_FIELDS)}")
            if not values:
                raise ValueError(f"{name}: list at least one value")
        return value

    @field_validator("densities")
    @classmethod
    def _densities(cls, value):
        for d in value:
            if not (isinstance(d, (int, float)) and math.isfinite(d) and 0 < d <= 1):
                raise ValueError(f"{d!r} is invalid: allowed numbers in (0, 1]")
        if len(set(value)) != len(value):
            raise ValueError("densities must be distinct")
        return [float(d) for d in value]


class AblationPlan(RunSettings):
    """A validated ablation plan: the run settings of a sweep file (`search.spec.RunSettings`, the
    same names and meaning, handed to the sweep unchanged), the base config and the variants."""

    tracking: Tracking = Field(default_factory=lambda: Tracking(experiment="sketchwalk-ablations"))
    base: Optional[dict[str, Any]] = None
    base_from: Optional[str] = None
    variants: VariantSources = Field(default_factory=VariantSources)
    # seed (a run setting): the paired bootstrap's seed, and the sweep's


@dataclasses.dataclass(frozen=True)
class Variant:
    """One configuration to evaluate.

    name: stable identifier (`base`, `walk=none`, `baseline:oracle`, `selector=random@0.1`);
    group: `base`, `baseline`, `density`, a component group or a one-factor field;
    config: `SketchWalkConfig.to_dict()`, None for dense attention;
    changes: the fields whose values differ from base ({} for base, None for dense);
    aliases: other names the plan asked for with the same config (not run again).
    """

    name: str
    group: str
    config: Optional[dict[str, Any]]
    changes: Optional[dict[str, Any]]
    aliases: tuple[str, ...] = ()

    def sketchwalk_config(self) -> Optional[SketchWalkConfig]:
        """The variant's SketchWalkConfig (None = dense)."""
        return None if self.config is None else SketchWalkConfig.from_dict(dict(self.config))

    @property
    def selector(self) -> Optional[str]:
        """The block selector ('sketchwalk' where the config has no `selector` field); None for dense."""
        return None if self.config is None else self.config.get("selector", "sketchwalk")


# -- loading ----------------------------------------------------------------------------------

def parse_plan(data: Any, *, source: str = "<dict>") -> AblationPlan:
    """Validate a mapping into an AblationPlan and expand its variants once (so every error,
    including a bad config value deep in `variants`, surfaces here); raises PlanError."""
    if not isinstance(data, dict):
        raise PlanError("<root>", f"{source} must hold a mapping, got {type(data).__name__}")
    data = dict(data)
    data.setdefault("name", Path(source).stem if source != "<dict>" else "ablation")
    try:
        plan = AblationPlan.model_validate(data)
    except ValidationError as exc:
        field, msg = first_error(exc, AblationPlan)
        raise PlanError(field or "<root>", msg) from None
    if plan.base is not None and plan.base_from is not None:
        raise PlanError("base_from", "base and base_from exclude each other: give the config inline or as a file")
    if plan.variants.selectors != list(SELECTORS) and not plan.variants.densities:
        raise PlanError("variants.selectors", "needs variants.densities (the density levels to cross them with)")
    if plan.base_from is not None:
        plan = plan.model_copy(update={"base_from": str(_find_base_file(plan.base_from, source))})
    expand_variants(plan)
    return plan


def load_plan(path: str | Path) -> AblationPlan:
    """Read and validate an ablation plan YAML file (see `parse_plan`)."""
    from search.spec import read_yaml_file

    return parse_plan(read_yaml_file(path, PlanError), source=str(Path(path)))


def _find_base_file(path: str, source: str) -> Path:
    # Relative to where the command runs (runs/sweeps/<id>/best.yaml), else beside the plan file.
    tried = [Path(path)]
    if source != "<dict>" and not Path(path).is_absolute():
        tried.append(Path(source).parent / path)
    for p in tried:
        if p.is_file():
            return p.resolve()
    raise PlanError("base_from", f"no such file: {' or '.join(str(t) for t in tried)}")


def base_config(plan: AblationPlan) -> SketchWalkConfig:
    """The plan's base: `base` inline, the config of the `base_from` file (an exported best.yaml;
    its provenance block is ignored), or the paper defaults (density 0.2)."""
    if plan.base_from is not None:
        try:
            return SketchWalkConfig.from_yaml(Path(plan.base_from))
        except ConfigError as exc:
            raise PlanError("base_from", f"{plan.base_from}: {exc}") from None
        except (OSError, yaml.YAMLError) as exc:
            raise PlanError("base_from", f"{plan.base_from}: {type(exc).__name__}: {exc}") from None
    try:
        return SketchWalkConfig.from_dict(dict(plan.base or {}))
    except ConfigError as exc:
        raise PlanError(f"base.{exc.field}", str(exc)) from None


def resolved_plan(plan: AblationPlan) -> AblationPlan:
    """The plan with its base written out inline (what is stored with a launched ablation, so a
    resume or report never depends on the base file still existing or being unchanged)."""
    return plan.model_copy(update={"base": base_config(plan).to_dict(), "base_from": None})


def plan_to_yaml(plan: AblationPlan) -> str:
    """The plan as YAML (defaults filled in), loadable by `load_plan`."""
    return yaml.safe_dump(plan.model_dump(mode="json"), sort_keys=False)


# -- expansion --------------------------------------------------------------------------------

def selector_available() -> bool:
    """Whether this sketchwalk's SketchWalkConfig has the `selector` field (oracle/random/streaming)."""
    return "selector" in CONFIG_FIELDS


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "null"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def switch_name(switches: dict[str, Any]) -> str:
    """A switch set's variant name: `field=value` pairs joined by ',' in the set's order."""
    return ",".join(f"{k}={_fmt(v)}" for k, v in switches.items())


def _apply(base: SketchWalkConfig, switches: dict[str, Any], where: str, *, name_field: bool = True) -> SketchWalkConfig:
    """`base` with `switches`; PlanError at `where` (`where.<field>` with `name_field`) naming the
    allowed values."""
    if "selector" in switches and not selector_available():
        if switches["selector"] != "sketchwalk":
            raise PlanError(where, f"selector {switches['selector']!r} needs SketchWalkConfig.selector, which this "
                                   f"version of sketchwalk lacks (only the sketchwalk selector can run)")
        switches = {k: v for k, v in switches.items() if k != "selector"}
    try:
        return base.replace(**switches)
    except ConfigError as exc:
        field = f"{where}.{exc.field}" if name_field else where
        raise PlanError(field, f"{exc.field} = {exc.value!r} is invalid: allowed {exc.allowed}") from None
    except TypeError as exc:
        raise PlanError(where, str(exc)) from None


class _Variants:
    """Collects variants in order; a config seen before becomes an alias of its first name."""

    def __init__(self, base: SketchWalkConfig):
        self.base = base.to_dict()
        self.items: dict[str, dict[str, Any]] = {}
        self.by_config: dict[str, str] = {}

    def add(self, name: str, group: str, config: Optional[SketchWalkConfig]) -> None:
        key = "dense" if config is None else config.short_hash()
        if key in self.by_config:
            first = self.items[self.by_config[key]]
            if name != first["name"] and name not in first["aliases"]:
                first["aliases"].append(name)
            return
        if name in self.items:  # same name, different config: two sources disagree on what it means
            raise PlanError("variants", f"two different configs are both named {name!r}")
        data = None if config is None else config.to_dict()
        changes = None if data is None else {k: v for k, v in data.items() if self.base.get(k) != v}
        self.items[name] = {"name": name, "group": group, "config": data, "changes": changes, "aliases": []}
        self.by_config[key] = name

    def result(self) -> list[Variant]:
        return [Variant(d["name"], d["group"], d["config"], d["changes"], tuple(d["aliases"]))
                for d in self.items.values()]


def expand_variants(plan: AblationPlan) -> list[Variant]:
    """The plan's variants in run order: base, components, one-factor, baselines, density curves.

    Each distinct config appears once (later duplicates become aliases). Raises PlanError (with
    the dotted field) for values SketchWalkConfig rejects or selectors this version lacks, and when
    nothing but base would run."""
    base = base_config(plan)
    out = _Variants(base)
    out.add(BASE, "base", base)
    src = plan.variants
    for group, sets in src.components.items():
        for i, switches in enumerate(sets):
            switches = dict(switches)
            name = str(switches.pop("name", None) or switch_name(switches))  # `name`: a short label for a long set
            out.add(name, group, _apply(base, switches, f"variants.components.{group}.{i}"))
    for name, values in src.one_factor.items():
        for value in values:
            out.add(switch_name({name: value}), name, _apply(base, {name: value}, "variants.one_factor"))
    for b in src.baselines:
        vname, switches = BASELINES[b]
        out.add(vname, "baseline", None if switches is None else _apply(base, switches, f"variants.baselines.{b}"))
    for selector in (src.selectors if src.densities else []):
        for d in src.densities:
            switches = {"selector": selector, "density": d}
            out.add(f"selector={selector}@{d:g}", "density", _apply(base, switches, "variants.selectors", name_field=False))
    variants = out.result()
    if len(variants) < 2:
        raise PlanError("variants", "nothing to compare with base: set components, one_factor, baselines or "
                                    "densities (switch sets equal to base are base itself)")
    return variants


# -- storage ----------------------------------------------------------------------------------

def save_variants(variants: list[Variant], path: Path) -> Path:
    """Write the variants as JSON (what a launched ablation ran; the report reads it back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([dataclasses.asdict(v) for v in variants], indent=2))
    return path


def load_variants(path: Path) -> list[Variant]:
    """Inverse of `save_variants`."""
    return [Variant(d["name"], d["group"], d["config"], d["changes"], tuple(d.get("aliases", ())))
            for d in json.loads(Path(path).read_text())]
