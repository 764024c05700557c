"""Register Sketch&Walk as a transformers attention implementation and attach it to models.

We register an attention function *and* a mask function under the same name: transformers
builds no attention mask at all for an implementation that has no registered mask function,
which would silently drop padding (and causal) information. The mask function is transformers'
own SDPA mask (4-D boolean, or None when the batch has no padding and plain causal suffices),
from which we read each sequence's left padding.
"""
from __future__ import annotations

import weakref
from typing import Any, Optional

import torch

from ..config import SketchWalkConfig
from ..method.runtime import SketchWalkRuntime
from ..model_shape import model_shape

ATTN_NAME = "sketchwalk"
_RUNTIME_ATTR = "_sketchwalk_runtime"
_PREVIOUS_ATTR = "_sketchwalk_previous_attn"
_LAZY_RUNTIMES: dict[int, SketchWalkRuntime] = {}


def register() -> None:
    """Register the `sketchwalk` attention and mask functions with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, sketchwalk_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]


def get_runtime(model_or_module: torch.nn.Module) -> Optional[SketchWalkRuntime]:
    """The runtime attached to a model (or one of its attention modules), or None."""
    rt = getattr(model_or_module, _RUNTIME_ATTR, None)
    if rt is not None:
        return rt
    for m in _attention_modules(model_or_module):
        return getattr(m, _RUNTIME_ATTR, None)
    return None


def attach(model: torch.nn.Module, config: SketchWalkConfig | None = None, backend: str = "auto") -> SketchWalkRuntime:
    """Run `model`'s attention with Sketch&Walk; returns the runtime (density counters, state).

    Validates `config` against the model (layers, head_dim) before anything runs. Layers below
    `skip_layers` run dense. Re-attaching replaces the previous config. backend: `auto` (Triton
    kernels on CUDA, the PyTorch reference elsewhere), `triton` or `torch`; it changes speed, not
    results (beyond floating-point rounding).
    """
    config = config or SketchWalkConfig()
    num_layers, head_dim = model_shape(model.config)
    config.validate_for_model(num_layers, head_dim)
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention modules with a layer_idx: not a supported architecture")
    for m in modules:
        window = getattr(m, "sliding_window", None)
        if window:
            raise ValueError(f"{type(m).__name__} of layer {m.layer_idx} uses sliding-window attention "
                             f"({window}); SketchWalk supports full causal attention layers only")
    # Some architectures (Mistral, Phi-3) keep the window on the config, not on the modules, and apply it
    # to every layer; with per-layer `layer_types`, the module attribute above is authoritative.
    text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    window = getattr(text_cfg, "sliding_window", None)
    layer_types = getattr(text_cfg, "layer_types", None)
    if window and (layer_types is None or "sliding_attention" in layer_types):
        raise ValueError(f"{type(model).__name__} uses sliding-window attention (config.sliding_window = {window}); "
                         f"SketchWalk supports full causal attention layers only")
    register()
    runtime = SketchWalkRuntime(config, num_layers, head_dim, backend=backend)
    current = model.config._attn_implementation
    if not hasattr(model, _PREVIOUS_ATTR):
        setattr(model, _PREVIOUS_ATTR, current if current != ATTN_NAME else "sdpa")
    model.set_attn_implementation(ATTN_NAME)
    if model.config._attn_implementation != ATTN_NAME:
        raise ValueError(f"{type(model).__name__} does not support pluggable attention (AttentionInterface)")
    setattr(model, _RUNTIME_ATTR, runtime)
    for m in modules:
        setattr(m, _RUNTIME_ATTR, runtime)
    return runtime


def detach(model: torch.nn.Module) -> None:
    """Restore the attention implementation the model had before `attach`."""
    previous = getattr(model, _PREVIOUS_ATTR, None)
    if previous is None:
        return
    model.set_attn_implementation(previous)
    for m in [model, *_attention_modules(model)]:
        if hasattr(m, _RUNTIME_ATTR):
            delattr(m, _RUNTIME_ATTR)
    delattr(model, _PREVIOUS_ATTR)


def _lazy_runtime(module: torch.nn.Module) -> SketchWalkRuntime:
    """Runtime for models loaded with attn_implementation="sketchwalk" without `attach`.

    The config comes from `model.config.sketchwalk_config` (a dict, e.g. passed to
    from_pretrained as `sketchwalk_config=...`) or the defaults; one runtime per model config,
    shared by all its layers so the walk spans them.
    """
    cfg = module.config
    rt = _LAZY_RUNTIMES.get(id(cfg))
    if rt is None:
        raw = getattr(cfg, "sketchwalk_config", None)
        sw = SketchWalkConfig.from_dict(dict(raw)) if raw else SketchWalkConfig()
        num_layers, head_dim = model_shape(cfg)
        rt = SketchWalkRuntime(sw, num_layers, head_dim)
        _LAZY_RUNTIMES[id(cfg)] = rt
        weakref.finalize(cfg, _LAZY_RUNTIMES.pop, id(cfg), None)
    setattr(module, _RUNTIME_ATTR, rt)
    return rt


def key_valid_from_mask(attention_mask: Optional[torch.Tensor], kv_len: int) -> Optional[torch.Tensor]:
    """Which cached keys are real tokens: [batch, kv_len] bool, from a 4-D mask [batch, 1|H, q_len, kv_len].

    Boolean masks use True = attend; float masks use 0 = attend. The last query row of a causal
    (left-padded) mask sees every real key, so it is the padding pattern.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 4:
        raise ValueError(f"expected a 4-D attention mask, got shape {tuple(attention_mask.shape)}")
    last = attention_mask[:, 0, -1, -kv_len:]
    return last if last.dtype == torch.bool else last == 0


def sketchwalk_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                                 dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [B, Hq, q, d], key/value [B, Hkv, kv, d] -> ([B, q, Hq, d], None)."""
    runtime = getattr(module, _RUNTIME_ATTR, None) or _lazy_runtime(module)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    key_valid = key_valid_from_mask(attention_mask, key.shape[-2])
    out = runtime.attention(module.layer_idx, query, key, value, key_valid, scale)
    return out.transpose(1, 2).contiguous(), None
