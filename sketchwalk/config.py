"""`SketchWalkConfig`: every knob of the method, validated, YAML round-trippable, hashable.

This is the one config class of the project: the sweep varies it, the evaluation harness
consumes it, the export writes it. Validation happens at construction (field ranges) and at
attach time (`validate_for_model`: fields that depend on the model's shape).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import yaml

BLOCK_SIZES = (16, 32, 64, 128)
WALKS = ("product", "damped", "none")
SKETCHES = ("hadamard", "exact")
HEAD_AGGREGATIONS = ("mean_qk", "sum_probs")
PHASES = ("prefill", "decode", "both")
DECODE_QUERIES = ("token", "block_mean", "window")
SELECTORS = ("sketchwalk", "oracle", "random", "streaming")
BUDGET_RULES = ("causal", "free_quantile")
SELECTION_HEADS = ("shared", "kv")
# Selectors with per-KV-head scores (`selection_heads: kv`): random and streaming score every head alike.
PER_HEAD_SELECTORS = ("oracle", "sketchwalk")
DEFAULT_DENSITY = 0.2  # the paper's "80% sparsity"
# Fields added after config hashes were first recorded (sweeps, baselines, exports): left out of
# short_hash() while at these defaults, so every earlier config keeps its hash.
_HASH_OMITTED_DEFAULTS = {"selector": "sketchwalk", "score_block_size": None, "dense_last_blocks": 0,
                          "sink_fraction": None, "local_fraction": None, "budget_rule": "causal",
                          "selection_heads": "shared"}
SCORE_BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64)


#: Named configs, accepted wherever a config file is (`--config recommended`, `from_yaml("release")`).
#: `paper` is the defaults. `recommended` is the selector study's best on SmolLM2 at density 0.2
#: (results/selector-study: 1.8 / 1.7 points below dense at 4K / 8K, pooled over two fresh seeds,
#: against 24 / 14 for the paper's scores); `release` is the authors' release in our options (its
#: README defaults; results/selector-study/ablation-s45/configs/release.yaml says why each value).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "recommended": {"score_block_size": 1, "head_aggregation": "sum_probs", "walk": "none", "dense_last_blocks": 1},
    "release": {"density": 0.125, "budget_rule": "free_quantile", "sink_fraction": 0.025, "local_fraction": 0.05,
                "dense_last_blocks": 4, "sparsity_exponent": 0.64, "walk": "damped", "damping": 0.25, "degree": 3,
                "head_aggregation": "sum_probs", "decode_query": "window", "decode_window": 32},
}


class ConfigError(ValueError):
    """A config field has an invalid value; `field` names it."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"SketchWalkConfig.{field} = {value!r} is invalid: allowed {allowed}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_file(source: str) -> bool:
    """Whether `source` names an existing file; text that cannot be a path (too long, NUL) is not one."""
    try:
        return Path(source).is_file()
    except (OSError, ValueError):
        return False


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


@dataclasses.dataclass(frozen=True)
class SketchWalkConfig:
    """Hyperparameters of Sketch&Walk sparse attention (see docs/method.md for each option).

    Exactly one of `top_k` (τ as a block count per query-block row) or `density` (τ as a
    fraction of the row's causal blocks, rounded up) is set; if neither is given, density
    defaults to 0.2. Paper defaults: block_size 64, sketch_dim 64, sparsity_exponent 8,
    skip_layers 2.

    `score_block_size` (None = block_size, the paper): the key granularity of the block scores.
    Smaller (a power of two dividing block_size) scores each key block by the log-sum-exp of its
    sub-blocks' scores instead of one mean key, so a block whose few relevant tokens the mean
    would dilute (a needle) still scores high; W[i, j] = sum over j's sub-blocks u of
    softmax(s * Â)[i, u]. Selection and attention stay on block_size blocks.

    `dense_last_blocks` (0 = the paper): the last that many query-block rows of every prefill attend
    all their causal blocks. The last prompt row predicts the first answer token, yet its selection
    is made from its block's mean query (template and question tokens), which on the real model
    never selects the needle (results/selector-study); at 32K one dense row of 512 costs 0.2%
    density. The release keeps its last 4 query blocks (256 tokens) dense. Decode rows are unaffected.

    `sink_fraction` / `local_fraction` (None = the block counts `sink_blocks` / `local_blocks`, the
    paper): the sink and the recent window sized as a fraction of the sequence's current length in
    tokens, as the authors' release sizes them: max(1, int(f * n)) tokens, rounded up to whole
    blocks (n = the prompt in prefill, the cache in decode, so they grow as decode goes on). Set
    one and leave its block count at its default 1.

    `budget_rule` (`causal`, the paper): a row keeps max(τ, forced) blocks, τ = ceil(density x its
    causal blocks). `free_quantile` (the release): the forced blocks plus, of the f remaining
    causal blocks, those scoring strictly above the row's (1 - density) quantile (linear
    interpolation, as torch.nanquantile on float32): f - 1 - floor((1 - density)(f - 1)) of them
    for distinct scores; with `top_k`, top_k of them.

    `selection_heads` (`shared`, the paper: one selection per layer for all heads): `kv` gives each
    KV head its own selection (the query heads of a GQA group share it): the per-KV-head oracle,
    the limit of per-head selection, or Sketch&Walk with `head_aggregation: sum_probs` and `walk:
    none`, each group scored by its own query heads' summed softmax rows.

    `selector` swaps the block scores for a baseline at the same density (same forced blocks and
    τ rule, so the same counts per row): `oracle` (exact dense block attention mass), `random`,
    `streaming` (sink + most recent blocks); `sketchwalk` is the method itself.
    """

    block_size: int = 64
    sketch_dim: int = 64
    top_k: Optional[int] = None
    density: Optional[float] = None
    sparsity_exponent: float = 8.0
    skip_layers: int = 2
    sink_blocks: int = 1
    local_blocks: int = 1
    walk: Literal["product", "damped", "none"] = "product"
    damping: float = 0.25
    degree: int = 3
    sketch: Literal["hadamard", "exact"] = "hadamard"
    head_aggregation: Literal["mean_qk", "sum_probs"] = "mean_qk"
    phases: Literal["prefill", "decode", "both"] = "both"
    decode_query: Literal["token", "block_mean", "window"] = "token"
    decode_window: int = 32
    seed: int = 0
    selector: Literal["sketchwalk", "oracle", "random", "streaming"] = "sketchwalk"
    score_block_size: Optional[int] = None
    dense_last_blocks: int = 0
    sink_fraction: Optional[float] = None
    local_fraction: Optional[float] = None
    budget_rule: Literal["causal", "free_quantile"] = "causal"
    selection_heads: Literal["shared", "kv"] = "shared"

    def __post_init__(self) -> None:
        if self.top_k is None and self.density is None:
            object.__setattr__(self, "density", DEFAULT_DENSITY)
        self._validate()
        if self.score_block_size == self.block_size:  # the paper's scores: one spelling, one hash
            object.__setattr__(self, "score_block_size", None)
        # Normalise numeric types so that 8 and 8.0 hash and serialise identically.
        optional = ("density", "sink_fraction", "local_fraction")
        for name in ("sparsity_exponent", "damping") + tuple(n for n in optional if getattr(self, n) is not None):
            object.__setattr__(self, name, float(getattr(self, name)))

    # -- validation -------------------------------------------------------------------
    def _validate(self) -> None:
        if not _is_int(self.block_size) or self.block_size not in BLOCK_SIZES:
            raise ConfigError("block_size", self.block_size, f"one of {list(BLOCK_SIZES)}")
        if not _is_int(self.sketch_dim) or self.sketch_dim < 1 or self.sketch_dim & (self.sketch_dim - 1):
            raise ConfigError("sketch_dim", self.sketch_dim, "a power of two >= 1 and <= head_dim")
        if self.top_k is not None and self.density is not None:
            raise ConfigError("top_k", self.top_k, "None when density is set (set exactly one of top_k, density)")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ConfigError("top_k", self.top_k, "an integer >= 1 (blocks per query-block row)")
        if self.density is not None and (not _is_number(self.density) or not 0.0 < self.density <= 1.0):
            raise ConfigError("density", self.density, "a number in (0, 1]")
        if not _is_number(self.sparsity_exponent) or self.sparsity_exponent <= 0:
            raise ConfigError("sparsity_exponent", self.sparsity_exponent, "a number > 0")
        if not _is_int(self.skip_layers) or self.skip_layers < 0:
            raise ConfigError("skip_layers", self.skip_layers, "an integer >= 0 and < the model's number of layers")
        if not _is_int(self.sink_blocks) or self.sink_blocks < 0:
            raise ConfigError("sink_blocks", self.sink_blocks, "an integer >= 0")
        if not _is_int(self.local_blocks) or self.local_blocks < 1:
            raise ConfigError("local_blocks", self.local_blocks, "an integer >= 1 (the diagonal block is always attended)")
        if self.walk not in WALKS:
            raise ConfigError("walk", self.walk, f"one of {list(WALKS)}")
        if not _is_number(self.damping) or not 0.0 <= self.damping < 1.0:
            raise ConfigError("damping", self.damping, "a number in [0, 1)")
        if not _is_int(self.degree) or self.degree < 1:
            raise ConfigError("degree", self.degree, "an integer >= 1")
        if self.sketch not in SKETCHES:
            raise ConfigError("sketch", self.sketch, f"one of {list(SKETCHES)}")
        if self.head_aggregation not in HEAD_AGGREGATIONS:
            raise ConfigError("head_aggregation", self.head_aggregation, f"one of {list(HEAD_AGGREGATIONS)}")
        if self.phases not in PHASES:
            raise ConfigError("phases", self.phases, f"one of {list(PHASES)}")
        if self.decode_query not in DECODE_QUERIES:
            raise ConfigError("decode_query", self.decode_query, f"one of {list(DECODE_QUERIES)}")
        if not _is_int(self.decode_window) or self.decode_window < 1:
            raise ConfigError("decode_window", self.decode_window, "an integer >= 1 (tokens)")
        if not _is_int(self.seed) or self.seed < 0:
            raise ConfigError("seed", self.seed, "an integer >= 0")
        if self.selector not in SELECTORS:
            raise ConfigError("selector", self.selector, f"one of {list(SELECTORS)}")
        if self.score_block_size is not None and (
                not _is_int(self.score_block_size) or self.score_block_size not in SCORE_BLOCK_SIZES
                or self.score_block_size > self.block_size):
            raise ConfigError("score_block_size", self.score_block_size,
                              f"null or one of {list(SCORE_BLOCK_SIZES)} and <= block_size = {self.block_size}")

        if not _is_int(self.dense_last_blocks) or self.dense_last_blocks < 0:
            raise ConfigError("dense_last_blocks", self.dense_last_blocks,
                              "an integer >= 0 (query-block rows at the end of a prefill attended densely)")
        for name, blocks in (("sink_fraction", "sink_blocks"), ("local_fraction", "local_blocks")):
            f = getattr(self, name)
            if f is None:
                continue
            if not _is_number(f) or not 0.0 < f < 1.0:
                raise ConfigError(name, f, "null or a number in (0, 1) (a fraction of the sequence's tokens)")
            if getattr(self, blocks) != 1:
                raise ConfigError(blocks, getattr(self, blocks), f"1 (its default) when {name} is set: {name} sizes it")
        if self.budget_rule not in BUDGET_RULES:
            raise ConfigError("budget_rule", self.budget_rule, f"one of {list(BUDGET_RULES)}")
        if self.selection_heads not in SELECTION_HEADS:
            raise ConfigError("selection_heads", self.selection_heads, f"one of {list(SELECTION_HEADS)}")
        if self.selection_heads == "kv" and self.selector not in PER_HEAD_SELECTORS:
            raise ConfigError("selection_heads", self.selection_heads,
                              f"'shared' with selector {self.selector!r} ('kv' needs selector one of {list(PER_HEAD_SELECTORS)})")
        if self.selection_heads == "kv" and self.selector == "sketchwalk" and (
                self.head_aggregation != "sum_probs" or self.walk != "none"):
            # Per KV head, Sketch&Walk sums the per-head probabilities of each GQA group; a walk per
            # head (R^k per KV head across layers) is not built.
            raise ConfigError("selection_heads", self.selection_heads,
                              "'shared' unless head_aggregation is 'sum_probs' and walk is 'none' "
                              "('kv' scores each GQA group with its own heads' summed probabilities, without a walk)")

    def validate_for_model(self, num_layers: int, head_dim: int) -> None:
        """Check the fields that depend on the model: skip_layers < num_layers, sketch_dim <= head_dim."""
        if self.skip_layers >= num_layers:
            raise ConfigError("skip_layers", self.skip_layers, f"an integer in [0, {num_layers - 1}] for this model ({num_layers} layers)")
        if self.sketch_dim > head_dim:
            raise ConfigError("sketch_dim", self.sketch_dim, f"a power of two <= head_dim = {head_dim} for this model")

    # -- derived ----------------------------------------------------------------------
    @property
    def sub_blocks(self) -> int:
        """Key sub-blocks per block in the block scores (1 = one mean key per block, the paper)."""
        return 1 if self.score_block_size is None else self.block_size // self.score_block_size

    @property
    def score_block(self) -> int:
        """Tokens per key sub-block of the block scores (block_size unless score_block_size is set)."""
        return self.block_size // self.sub_blocks

    @property
    def per_kv_head(self) -> bool:
        """Whether each KV head has its own selection (`selection_heads: kv`)."""
        return self.selection_heads == "kv"

    @property
    def length_dependent(self) -> bool:
        """Whether the forced blocks depend on the sequence length (sink_fraction / local_fraction set)."""
        return self.sink_fraction is not None or self.local_fraction is not None

    def forced_sizes(self, n_tokens: Optional[int] = None) -> tuple[int, int]:
        """(sink blocks, local blocks) of a sequence of n_tokens real tokens: the block counts, or
        the fractions' max(1, int(f * n_tokens)) tokens in whole blocks. n_tokens is needed only
        when `length_dependent`."""
        if not self.length_dependent:
            return self.sink_blocks, self.local_blocks
        if n_tokens is None:
            raise ValueError("sink_fraction / local_fraction size the forced blocks from the sequence length: pass n_tokens")

        def blocks(f: Optional[float], default: int) -> int:
            return default if f is None else -(-max(1, int(f * n_tokens)) // self.block_size)

        return blocks(self.sink_fraction, self.sink_blocks), blocks(self.local_fraction, self.local_blocks)

    @property
    def sparse_prefill(self) -> bool:
        return self.phases in ("prefill", "both")

    @property
    def sparse_decode(self) -> bool:
        return self.phases in ("decode", "both")

    def budget(self, causal_blocks: int) -> int:
        """τ for a query-block row with `causal_blocks` causal key blocks (before forced blocks)."""
        if self.top_k is not None:
            return self.top_k
        return max(1, math.ceil(self.density * causal_blocks - 1e-9))

    def row_count(self, causal_blocks: int, forced_blocks: int) -> int:
        """Blocks a row keeps, of its `causal_blocks`, `forced_blocks` of them forced: the one
        statement of `budget_rule` (see the class docstring)."""
        n, forced = causal_blocks, min(forced_blocks, causal_blocks)
        if self.budget_rule == "causal":
            return min(n, max(self.budget(n), forced))
        free = n - forced
        if self.top_k is not None:
            return forced + min(free, self.top_k)
        # Scores strictly above the interpolated (1 - density) quantile of f distinct values, the
        # rank computed in float32 as torch.nanquantile does on the release's float32 scores.
        return forced + (free - 1 - math.floor(np.float32(1.0 - self.density) * np.float32(free - 1)) if free else 0)

    # -- serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SketchWalkConfig":
        """Build from a mapping; unknown keys are an error naming them."""
        if not isinstance(data, dict):
            raise ConfigError("<root>", data, "a mapping of field names to values")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(unknown[0], data[unknown[0]], f"a known field name: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_params(cls, params: dict[str, str]) -> "SketchWalkConfig":
        """Build from string params as MLflow stores them (`to_dict()` values str()-ed, "None" for
        None); keys that are no field (other params of the run) are ignored. ConfigError if invalid."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls.from_dict({k: None if v == "None" else yaml.safe_load(v) for k, v in params.items() if k in known})

    def replace(self, **changes: Any) -> "SketchWalkConfig":
        """A copy with `changes`; switching between top_k and density clears the other."""
        data = self.to_dict()
        if "top_k" in changes and changes["top_k"] is not None and "density" not in changes:
            data["density"] = None
        if "density" in changes and changes["density"] is not None and "top_k" not in changes:
            data["top_k"] = None
        data.update(changes)
        return SketchWalkConfig(**data)

    def to_yaml(self, path: str | Path | None = None) -> str:
        """YAML text of the config; also written to `path` if given."""
        text = yaml.safe_dump({"sketchwalk": self.to_dict()}, sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, source: str | Path) -> "SketchWalkConfig":
        """Load from a YAML file path, YAML text or a preset name (`PRESETS`, when no such file exists);
        accepts a top-level `sketchwalk:` key or bare fields."""
        if isinstance(source, str) and source in PRESETS and not _is_file(source):
            return cls.preset(source)
        text = Path(source).read_text() if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and _is_file(source)) else str(source)
        data = yaml.safe_load(text) or {}
        if isinstance(data, str):  # one word: neither a file nor a preset
            raise ConfigError("config", data, f"a YAML file, YAML text or a preset name: one of {list(PRESETS)}")
        if isinstance(data, dict) and "sketchwalk" in data:
            data = data["sketchwalk"]
        return cls.from_dict(data)

    @classmethod
    def preset(cls, name: str) -> "SketchWalkConfig":
        """The named config `PRESETS[name]` (ConfigError naming the presets otherwise)."""
        if name not in PRESETS:
            raise ConfigError("preset", name, f"one of {list(PRESETS)}")
        return cls(**PRESETS[name])

    def short_hash(self) -> str:
        """A stable 12-hex-digit hash of the normalised field values (dedup key for sweeps).

        Fields in _HASH_OMITTED_DEFAULTS are left out while at their default (see there).
        """
        data = {k: v for k, v in self.to_dict().items() if _HASH_OMITTED_DEFAULTS.get(k, object()) != v}
        canon = json.dumps(data, sort_keys=True, separators=(",", ":"), default=float)
        return hashlib.sha256(canon.encode()).hexdigest()[:12]
