"""A model's (num_layers, head_dim), read from its config: the one derivation of the two numbers
`SketchWalkConfig.validate_for_model` checks and `SketchWalkRuntime` is built with."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def model_shape(config: Any) -> tuple[int, int]:
    """(num_layers, head_dim) of an HF config object or a `config.json` dict.

    Multimodal configs answer for their text model (`get_text_config()` / `text_config`);
    head_dim is the config's `head_dim` where set, else hidden_size // num_attention_heads (the
    LLaMA convention). Raises ValueError naming the missing field.
    """
    if isinstance(config, Mapping):
        text = config.get("text_config")
        cfg = text if isinstance(text, Mapping) else config
        get = cfg.get
    else:
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        get = lambda name: getattr(cfg, name, None)  # noqa: E731
    layers, heads, width = get("num_hidden_layers"), get("num_attention_heads"), get("hidden_size")
    head_dim = get("head_dim") or (width // heads if isinstance(width, int) and isinstance(heads, int) and heads
                                   else None)
    for name, value in (("num_hidden_layers", layers), ("head_dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"model config: {name} is {value!r}; need a positive integer "
                             f"(head_dim may also come from hidden_size / num_attention_heads)")
    return layers, head_dim
