"""Model integration: Sketch&Walk inside Hugging Face transformers through AttentionInterface."""
from .hf import ATTN_NAME, attach, detach, get_runtime, register

__all__ = ["ATTN_NAME", "attach", "detach", "get_runtime", "register"]
