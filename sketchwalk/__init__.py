"""SketchWalk Tune: Sketch&Walk sparse attention (arXiv 2602.07397) for LLaMA-family transformers models.

Public names are imported lazily so that `sketchwalk --help` does not pay for importing torch
and transformers. Call `sketchwalk.register()` before
`from_pretrained(..., attn_implementation="sketchwalk")`; `attach` registers by itself.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "ConfigError": "sketchwalk.config",
    "SketchWalkConfig": "sketchwalk.config",
    "attach": "sketchwalk.integration",
    "detach": "sketchwalk.integration",
    "get_runtime": "sketchwalk.integration",
    "register": "sketchwalk.integration",
    "BlockSelection": "sketchwalk.method",
    "DensityReport": "sketchwalk.method",
    "SketchWalkRuntime": "sketchwalk.method",
    "evaluate": "sketchwalk.evaluation",
    "EvalResult": "sketchwalk.evaluation",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sketchwalk' has no attribute {name!r}")
