"""SketchWalk Tune: Sketch&Walk sparse attention (arXiv 2602.07397) for LLaMA-family transformers models."""
from .config import ConfigError, SketchWalkConfig
from .integration import attach, detach, get_runtime, register
from .method import BlockSelection, DensityReport, SketchWalkRuntime

__version__ = "0.1.0"

# Registering is cheap and lets `from_pretrained(..., attn_implementation="sketchwalk")` work
# right after `import sketchwalk`.
try:
    register()
except ImportError:  # transformers missing: the method itself still works
    pass

__all__ = ["BlockSelection", "ConfigError", "DensityReport", "SketchWalkConfig", "SketchWalkRuntime", "attach",
           "detach", "get_runtime", "register", "__version__"]
