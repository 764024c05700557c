"""SketchWalkConfig: validation (field ranges and model-dependent fields), YAML round-trip, hashing, replace."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sketchwalk.config import ConfigError, SketchWalkConfig

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------
# Field validation: every invalid value -> ConfigError naming the field and its range
# --------------------------------------------------------------------------------------

# (field, bad value, extra kwargs, substrings the message must contain to describe the allowed range)
INVALID = [
    ("block_size", 8, {}, ["16", "32", "64", "128"]),
    ("block_size", 48, {}, ["16", "32", "64", "128"]),
    ("block_size", 256, {}, ["16", "32", "64", "128"]),
    ("block_size", 64.0, {}, ["16", "32", "64", "128"]),
    ("block_size", True, {}, ["16", "32", "64", "128"]),
    ("sketch_dim", 48, {}, ["power of two"]),
    ("sketch_dim", 0, {}, ["power of two"]),
    ("sketch_dim", -8, {}, ["power of two"]),
    ("sketch_dim", 12, {}, ["power of two"]),
    ("sketch_dim", 32.0, {}, ["power of two"]),
    ("sketch_dim", True, {}, ["power of two"]),
    ("top_k", 4, {"density": 0.2}, ["exactly one of top_k, density"]),
    ("top_k", 0, {}, [">= 1"]),
    ("top_k", -3, {}, [">= 1"]),
    ("top_k", 2.0, {}, [">= 1"]),
    ("top_k", True, {}, [">= 1"]),
    ("density", 0, {}, ["(0, 1]"]),
    ("density", 0.0, {}, ["(0, 1]"]),
    ("density", -0.5, {}, ["(0, 1]"]),
    ("density", 1.0001, {}, ["(0, 1]"]),
    ("density", 2, {}, ["(0, 1]"]),
    ("density", float("nan"), {}, ["(0, 1]"]),
    ("density", True, {}, ["(0, 1]"]),
    ("density", "0.2", {}, ["(0, 1]"]),
    ("sparsity_exponent", 0, {}, ["> 0"]),
    ("sparsity_exponent", -1.5, {}, ["> 0"]),
    ("sparsity_exponent", float("inf"), {}, ["> 0"]),
    ("sparsity_exponent", float("nan"), {}, ["> 0"]),
    ("sparsity_exponent", True, {}, ["> 0"]),
    ("skip_layers", -1, {}, [">= 0"]),
    ("skip_layers", 1.0, {}, [">= 0"]),
    ("skip_layers", False, {}, [">= 0"]),
    ("sink_blocks", -1, {}, [">= 0"]),
    ("sink_blocks", True, {}, [">= 0"]),
    ("local_blocks", 0, {}, [">= 1"]),
    ("local_blocks", -2, {}, [">= 1"]),
    ("local_blocks", True, {}, [">= 1"]),
    ("walk", "random", {}, ["product", "damped", "none"]),
    ("walk", "Product", {}, ["product", "damped", "none"]),
    ("walk", None, {}, ["product", "damped", "none"]),
    ("sketch", "gaussian", {}, ["hadamard", "exact"]),
    ("head_aggregation", "max", {}, ["mean_qk", "sum_probs"]),
    ("phases", "all", {}, ["prefill", "decode", "both"]),
    ("decode_query", "mean", {}, ["token", "block_mean", "window"]),
    ("damping", -0.01, {}, ["[0, 1)"]),
    ("damping", 1.0, {}, ["[0, 1)"]),
    ("damping", 1, {}, ["[0, 1)"]),
    ("damping", 3.5, {}, ["[0, 1)"]),
    ("damping", False, {}, ["[0, 1)"]),
    ("degree", 0, {}, [">= 1"]),
    ("degree", -1, {}, [">= 1"]),
    ("degree", True, {}, [">= 1"]),
    ("decode_window", 0, {}, [">= 1"]),
    ("decode_window", 4.0, {}, [">= 1"]),
    ("decode_window", True, {}, [">= 1"]),
    ("seed", -1, {}, [">= 0"]),
    ("seed", 1.5, {}, [">= 0"]),
    ("seed", True, {}, [">= 0"]),
    ("selector", "quest", {}, ["sketchwalk", "oracle", "random", "streaming"]),
    ("score_block_size", 12, {}, ["[1, 2, 4, 8, 16, 32, 64]", "<= block_size = 64"]),
    ("score_block_size", 64, {"block_size": 32}, ["<= block_size = 32"]),
    ("score_block_size", 8.0, {}, ["null or one of"]),
    ("score_block_size", True, {}, ["null or one of"]),
    ("dense_last_blocks", -1, {}, [">= 0"]),
    ("dense_last_blocks", 1.5, {}, [">= 0"]),
    ("dense_last_blocks", True, {}, [">= 0"]),
    ("sink_fraction", 0.0, {}, ["(0, 1)"]),
    ("sink_fraction", 1.0, {}, ["(0, 1)"]),
    ("sink_fraction", "5%", {}, ["(0, 1)"]),
    ("local_fraction", -0.1, {}, ["(0, 1)"]),
    ("local_fraction", True, {}, ["(0, 1)"]),
    ("sink_blocks", 2, {"sink_fraction": 0.05}, ["1 (its default) when sink_fraction is set"]),
    ("local_blocks", 3, {"local_fraction": 0.05}, ["1 (its default) when local_fraction is set"]),
    ("budget_rule", "quantile", {}, ["causal", "free_quantile"]),
    ("selection_heads", "query", {}, ["shared", "kv"]),
    ("selection_heads", "kv", {}, ["sum_probs", "walk is 'none'"]),
    ("selection_heads", "kv", {"head_aggregation": "sum_probs"}, ["walk is 'none'"]),
    ("selection_heads", "kv", {"selector": "streaming"}, ["'shared' with selector 'streaming'"]),
]


@pytest.mark.parametrize("field,value,extra,allowed", INVALID,
                         ids=[f"{f}={v!r}" for f, v, _, _ in INVALID])
def test_invalid_field_raises_config_error_naming_field_and_range(field, value, extra, allowed):
    with pytest.raises(ConfigError) as info:
        SketchWalkConfig(**{field: value, **extra})
    err = info.value
    assert isinstance(err, ValueError)  # callers may catch ValueError
    assert err.field == field
    msg = str(err)
    assert re.search(rf"\b{field}\b", msg), msg
    for s in allowed:
        assert s in msg, (s, msg)


def test_every_field_has_an_invalid_case():
    import dataclasses
    fields = {f.name for f in dataclasses.fields(SketchWalkConfig)}
    covered = {f for f, *_ in INVALID}
    assert fields == covered, fields ^ covered


@pytest.mark.parametrize("kwargs", [
    {},
    {"block_size": 16, "sketch_dim": 1},
    {"block_size": 128, "sketch_dim": 128, "top_k": 1},
    {"density": 1.0},
    {"density": 1},
    {"density": 1e-6},
    {"sparsity_exponent": 1e-3, "damping": 0.0, "degree": 1},
    {"skip_layers": 0, "sink_blocks": 0, "local_blocks": 1, "seed": 0},
    {"walk": "damped", "sketch": "exact", "head_aggregation": "sum_probs", "phases": "decode",
     "decode_query": "window", "decode_window": 1},
    {"walk": "none", "phases": "prefill", "decode_query": "block_mean", "damping": 0.999},
])
def test_valid_configs_construct(kwargs):
    cfg = SketchWalkConfig(**kwargs)
    for k, v in kwargs.items():
        assert getattr(cfg, k) == v


def test_density_defaults_to_paper_value_when_neither_budget_given():
    cfg = SketchWalkConfig()
    assert cfg.top_k is None and cfg.density == pytest.approx(0.2)
    cfg = SketchWalkConfig(top_k=3)
    assert cfg.top_k == 3 and cfg.density is None


@pytest.mark.parametrize("density,causal,expected", [
    (0.2, 10, 2), (0.2, 11, 3), (0.3, 10, 3), (0.1, 1, 1), (0.5, 7, 4), (1.0, 13, 13), (0.25, 8, 2)])
def test_budget_density_is_ceil_of_fraction(density, causal, expected):
    assert SketchWalkConfig(density=density).budget(causal) == expected


def test_budget_top_k_is_fixed():
    cfg = SketchWalkConfig(top_k=5)
    assert [cfg.budget(n) for n in (1, 5, 50)] == [5, 5, 5]


def test_phase_switches():
    assert (SketchWalkConfig(phases="both").sparse_prefill, SketchWalkConfig(phases="both").sparse_decode) == (True, True)
    assert (SketchWalkConfig(phases="prefill").sparse_prefill, SketchWalkConfig(phases="prefill").sparse_decode) == (True, False)
    assert (SketchWalkConfig(phases="decode").sparse_prefill, SketchWalkConfig(phases="decode").sparse_decode) == (False, True)


def test_config_is_frozen():
    cfg = SketchWalkConfig()
    with pytest.raises(Exception):
        cfg.block_size = 32  # type: ignore[misc]


# --------------------------------------------------------------------------------------
# Model-dependent validation
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("skip,layers", [(4, 4), (5, 4), (1, 1)])
def test_validate_for_model_skip_layers(skip, layers):
    cfg = SketchWalkConfig(skip_layers=skip, sketch_dim=16)
    with pytest.raises(ConfigError) as info:
        cfg.validate_for_model(num_layers=layers, head_dim=64)
    assert info.value.field == "skip_layers"
    msg = str(info.value)
    assert "skip_layers" in msg and f"[0, {layers - 1}]" in msg, msg


@pytest.mark.parametrize("sketch_dim,head_dim", [(32, 16), (128, 64), (256, 128)])
def test_validate_for_model_sketch_dim(sketch_dim, head_dim):
    cfg = SketchWalkConfig(sketch_dim=sketch_dim, skip_layers=0)
    with pytest.raises(ConfigError) as info:
        cfg.validate_for_model(num_layers=4, head_dim=head_dim)
    assert info.value.field == "sketch_dim"
    msg = str(info.value)
    assert "sketch_dim" in msg and str(head_dim) in msg, msg


def test_validate_for_model_accepts_edges():
    SketchWalkConfig(skip_layers=3, sketch_dim=16).validate_for_model(num_layers=4, head_dim=16)
    SketchWalkConfig(skip_layers=0, sketch_dim=64).validate_for_model(num_layers=1, head_dim=80)


def test_runtime_with_model_shape_validates():
    from sketchwalk import SketchWalkRuntime
    with pytest.raises(ConfigError) as info:
        SketchWalkRuntime(SketchWalkConfig(skip_layers=2, sketch_dim=8), num_layers=2, head_dim=16)
    assert info.value.field == "skip_layers"


def _tiny_llama(num_layers=2, head_dim=16):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=4 * head_dim, intermediate_size=64, num_hidden_layers=num_layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, vocab_size=64,
                      max_position_embeddings=128, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("kwargs,field", [
    ({"skip_layers": 2, "sketch_dim": 8}, "skip_layers"),
    ({"skip_layers": 0, "sketch_dim": 32}, "sketch_dim"),
])
def test_attach_validates_before_running(kwargs, field):
    from sketchwalk import attach, get_runtime
    model = _tiny_llama(num_layers=2, head_dim=16)
    with pytest.raises(ConfigError) as info:
        attach(model, SketchWalkConfig(**kwargs))
    assert info.value.field == field
    # Nothing was changed on the model: it still runs its original attention, no runtime attached.
    assert model.config._attn_implementation == "sdpa"
    assert get_runtime(model) is None
    assert not hasattr(model, "_sketchwalk_previous_attn")


# --------------------------------------------------------------------------------------
# YAML round trip
# --------------------------------------------------------------------------------------

ROUNDTRIP = [
    SketchWalkConfig(),
    SketchWalkConfig(top_k=7, block_size=32, sketch_dim=16),
    SketchWalkConfig(density=0.35, walk="damped", damping=0.5, degree=2, sketch="exact",
                     head_aggregation="sum_probs", phases="decode", decode_query="window", decode_window=8, seed=123),
    SketchWalkConfig(top_k=1, skip_layers=0, sink_blocks=0, local_blocks=3, sparsity_exponent=2, walk="none",
                     phases="prefill", decode_query="block_mean"),
    SketchWalkConfig(density=1),
]


@pytest.mark.parametrize("cfg", ROUNDTRIP, ids=range(len(ROUNDTRIP)))
def test_yaml_round_trip_file(cfg, tmp_path):
    path = tmp_path / "sw.yaml"
    text = cfg.to_yaml(path)
    assert path.read_text() == text
    for source in (path, str(path)):
        back = SketchWalkConfig.from_yaml(source)
        assert back == cfg
        assert back.short_hash() == cfg.short_hash()
        assert (back.top_k is None) == (cfg.top_k is None) and (back.density is None) == (cfg.density is None)


@pytest.mark.parametrize("cfg", ROUNDTRIP, ids=range(len(ROUNDTRIP)))
def test_yaml_round_trip_text(cfg):
    text = cfg.to_yaml()
    data = yaml.safe_load(text)
    assert set(data) == {"sketchwalk"}
    assert data["sketchwalk"]["top_k"] == cfg.top_k and data["sketchwalk"]["density"] == cfg.density
    assert SketchWalkConfig.from_yaml(text) == cfg
    # bare fields (no top-level `sketchwalk:` key) are accepted too
    assert SketchWalkConfig.from_yaml(yaml.safe_dump(data["sketchwalk"])) == cfg


def test_from_yaml_partial_fields_use_defaults():
    cfg = SketchWalkConfig.from_yaml("sketchwalk:\n  top_k: 4\n  block_size: 32\n")
    assert cfg == SketchWalkConfig(top_k=4, block_size=32)


def test_from_yaml_single_line_text():
    assert SketchWalkConfig.from_yaml("{top_k: 4, walk: damped}") == SketchWalkConfig(top_k=4, walk="damped")
    long_line = "{" + ", ".join(f"{k}: {v!r}" if isinstance(v, str) else f"{k}: {v}"
                                for k, v in SketchWalkConfig(top_k=3).to_dict().items() if v is not None) + "}"
    assert len(long_line) > 255  # longer than a file name may be
    assert SketchWalkConfig.from_yaml(long_line) == SketchWalkConfig(top_k=3)


@pytest.mark.parametrize("text,key", [
    ("sketchwalk:\n  blocksize: 64\n", "blocksize"),
    ("top_k: 3\nwalk_mode: product\n", "walk_mode"),
    ("sketchwalk:\n  density: 0.2\n  zz_unknown: 1\n  aa_unknown: 2\n", "aa_unknown"),
])
def test_unknown_yaml_key_is_an_error_naming_it(text, key):
    with pytest.raises(ConfigError) as info:
        SketchWalkConfig.from_yaml(text)
    assert info.value.field == key
    assert key in str(info.value)


def test_yaml_invalid_value_is_config_error():
    with pytest.raises(ConfigError) as info:
        SketchWalkConfig.from_yaml("sketchwalk:\n  block_size: 100\n")
    assert info.value.field == "block_size"


def test_from_dict_rejects_non_mapping():
    with pytest.raises(ConfigError):
        SketchWalkConfig.from_dict([1, 2, 3])  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# short_hash
# --------------------------------------------------------------------------------------

def test_short_hash_format_and_determinism():
    h = SketchWalkConfig().short_hash()
    assert re.fullmatch(r"[0-9a-f]{12}", h)
    assert SketchWalkConfig().short_hash() == h


def test_short_hash_normalises_numeric_types():
    assert SketchWalkConfig(sparsity_exponent=8).short_hash() == SketchWalkConfig(sparsity_exponent=8.0).short_hash()
    assert SketchWalkConfig(density=1).short_hash() == SketchWalkConfig(density=1.0).short_hash()
    assert SketchWalkConfig(damping=0).short_hash() == SketchWalkConfig(damping=0.0).short_hash()
    assert SketchWalkConfig(sparsity_exponent=8) == SketchWalkConfig(sparsity_exponent=8.0)
    assert isinstance(SketchWalkConfig(sparsity_exponent=8).sparsity_exponent, float)


CHANGES = [
    {"block_size": 32}, {"sketch_dim": 32}, {"top_k": 4}, {"density": 0.3}, {"sparsity_exponent": 4.0},
    {"skip_layers": 1}, {"sink_blocks": 2}, {"local_blocks": 2}, {"walk": "damped"}, {"damping": 0.5},
    {"degree": 2}, {"sketch": "exact"}, {"head_aggregation": "sum_probs"}, {"phases": "prefill"},
    {"decode_query": "window"}, {"decode_window": 16}, {"seed": 1}, {"selector": "oracle"},
    {"score_block_size": 8}, {"dense_last_blocks": 1},
    {"sink_fraction": 0.025}, {"local_fraction": 0.05}, {"budget_rule": "free_quantile"},
    {"selector": "oracle", "selection_heads": "kv"},
]


def test_short_hash_differs_when_any_field_differs():
    import dataclasses
    base = SketchWalkConfig()
    hashes = {base.short_hash()}
    changed_fields = set()
    for change in CHANGES:
        other = base.replace(**change)
        assert other != base
        h = other.short_hash()
        assert h != base.short_hash(), change
        hashes.add(h)
        changed_fields |= set(change)
    assert len(hashes) == len(CHANGES) + 1  # all distinct
    assert changed_fields == {f.name for f in dataclasses.fields(SketchWalkConfig)}


def test_short_hash_stable_across_processes():
    cfg = SketchWalkConfig(top_k=5, walk="damped", seed=3)
    # load config.py on its own (no transformers import), in a process with a different hash seed
    code = ("import importlib.util as u, sys; s = u.spec_from_file_location('swc', sys.argv[1]);"
            "m = u.module_from_spec(s); sys.modules['swc'] = m; s.loader.exec_module(m);"
            "print(m.SketchWalkConfig(top_k=5, walk='damped', seed=3).short_hash())")
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code, str(REPO / "sketchwalk" / "config.py")], capture_output=True, text=True, env=env, cwd=REPO, check=True)
    assert out.stdout.strip() == cfg.short_hash()


# --------------------------------------------------------------------------------------
# replace
# --------------------------------------------------------------------------------------

def test_replace_switches_density_to_top_k():
    cfg = SketchWalkConfig(density=0.3, block_size=32, walk="damped")
    new = cfg.replace(top_k=6)
    assert new.top_k == 6 and new.density is None
    assert new.block_size == 32 and new.walk == "damped"
    assert cfg.density == pytest.approx(0.3) and cfg.top_k is None  # original untouched


def test_replace_switches_top_k_to_density():
    cfg = SketchWalkConfig(top_k=6, seed=9)
    new = cfg.replace(density=0.5)
    assert new.density == pytest.approx(0.5) and new.top_k is None and new.seed == 9


def test_replace_other_fields_keeps_budget():
    cfg = SketchWalkConfig(top_k=6)
    new = cfg.replace(block_size=16)
    assert new.top_k == 6 and new.density is None and new.block_size == 16
    cfg = SketchWalkConfig(density=0.4)
    assert cfg.replace(seed=2).density == pytest.approx(0.4)


def test_replace_explicit_both_set_is_error_and_invalid_value_is_error():
    with pytest.raises(ConfigError) as info:
        SketchWalkConfig(top_k=2).replace(top_k=3, density=0.5)
    assert info.value.field == "top_k"
    with pytest.raises(ConfigError) as info:
        SketchWalkConfig().replace(block_size=20)
    assert info.value.field == "block_size"


def test_replace_clearing_top_k_falls_back_to_default_density():
    new = SketchWalkConfig(top_k=2).replace(top_k=None)
    assert new.top_k is None and math.isclose(new.density, 0.2)


def test_score_block_size_default_hash_and_block_size_spelling():
    """score_block_size = block_size is the paper's scores: normalised to null, one hash; a new value hashes apart."""
    paper = SketchWalkConfig()
    assert SketchWalkConfig(score_block_size=64) == paper and SketchWalkConfig(score_block_size=64).short_hash() == paper.short_hash()
    assert SketchWalkConfig(score_block_size=8).short_hash() != paper.short_hash()
    assert SketchWalkConfig(score_block_size=8).sub_blocks == 8 and paper.sub_blocks == 1 and paper.score_block == 64


def test_dense_last_blocks_default_keeps_old_hashes():
    """dense_last_blocks = 0 (the paper) is left out of the hash, so configs recorded before the
    field existed keep their hash (`sub8_sumprobs` was 36f35232cd9e on the GPU runs); 1 hashes apart."""
    old = SketchWalkConfig(density=0.2, score_block_size=8, head_aggregation="sum_probs")
    assert old.short_hash() == "36f35232cd9e"
    assert old.replace(dense_last_blocks=1).short_hash() != old.short_hash()
    assert SketchWalkConfig.from_dict(old.replace(dense_last_blocks=2).to_dict()).dense_last_blocks == 2


def test_forced_sizes_follow_the_release_rule():
    """max(1, int(f * n)) tokens in whole blocks; block counts unless a fraction is set."""
    cfg = SketchWalkConfig(sink_fraction=0.025, local_fraction=0.05)
    assert cfg.length_dependent
    assert cfg.forced_sizes(4096) == (2, 4)      # 102 tokens -> 2 blocks; 204 -> 4 blocks
    assert cfg.forced_sizes(8192) == (4, 7)      # 204 -> 4; 409 -> 7
    assert cfg.forced_sizes(10) == (1, 1)        # at least one token, so one block
    assert SketchWalkConfig(local_fraction=0.05).forced_sizes(4096) == (1, 4)
    assert SketchWalkConfig(sink_blocks=3).forced_sizes() == (3, 1)
    with pytest.raises(ValueError, match="n_tokens"):
        cfg.forced_sizes()


@pytest.mark.parametrize("density,forced", [(0.125, 2), (0.2, 0), (0.5, 3), (0.9, 1)])
def test_free_quantile_counts_match_torch_nanquantile(density, forced):
    """The count is what torch.nanquantile's threshold keeps (strictly above) for distinct scores."""
    import torch
    cfg = SketchWalkConfig(density=density, budget_rule="free_quantile")
    for free in range(0, 400):
        scores = torch.randperm(max(free, 1), generator=torch.Generator().manual_seed(free)).float()[:free]
        kept = 0 if free == 0 else int((scores > torch.nanquantile(scores, 1 - density)).sum())
        assert cfg.row_count(free + forced, forced) == forced + kept, free
    assert SketchWalkConfig(top_k=3, budget_rule="free_quantile").row_count(10, 2) == 5
    assert SketchWalkConfig(top_k=30, budget_rule="free_quantile").row_count(10, 2) == 10
    # the paper's rule: max(τ, forced), capped at the causal blocks
    assert SketchWalkConfig(density=0.2).row_count(10, 2) == 2
    assert SketchWalkConfig(density=0.5).row_count(10, 2) == 5


def test_new_fields_at_defaults_keep_earlier_hashes():
    base = SketchWalkConfig()
    assert base.short_hash() == SketchWalkConfig(sink_fraction=None, budget_rule="causal").short_hash()
    assert base.short_hash() != SketchWalkConfig(budget_rule="free_quantile").short_hash()
    assert SketchWalkConfig(sink_fraction=0.05).sink_fraction == 0.05
    assert SketchWalkConfig.from_yaml(SketchWalkConfig(local_fraction=0.05).to_yaml()).local_fraction == 0.05


def test_presets_load_by_name_and_match_the_shipped_files():
    """`paper` is the defaults; `recommended` and `release` equal the configs their results ran."""
    from sketchwalk.config import PRESETS
    assert SketchWalkConfig.from_yaml("paper") == SketchWalkConfig()
    here = Path(__file__).resolve().parents[1] / "results" / "selector-study"
    assert SketchWalkConfig.from_yaml("recommended") == SketchWalkConfig.from_yaml(
        here / "confirm-s45" / "configs" / "sub1sp_none_dl1.yaml")
    assert SketchWalkConfig.from_yaml("release") == SketchWalkConfig.from_yaml(
        here / "ablation-s45" / "configs" / "release.yaml")
    assert set(PRESETS) == {"paper", "recommended", "release"}
    with pytest.raises(ConfigError, match="preset name") as info:
        SketchWalkConfig.from_yaml("recomended")
    assert "recommended" in str(info.value)
    with pytest.raises(ConfigError, match="preset"):
        SketchWalkConfig.preset("fast")
