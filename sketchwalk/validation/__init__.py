"""Tensor-level validation: record a model's post-RoPE Q, K, V, replay block selectors on them
layer by layer against dense attention, and compare selections with the oracle's.

  collect(model, tokenizer, prompts, out_dir)  -> Recording (safetensors per prompt x layer + meta.json)
  validate(record_dir, config)                 -> ValidationResult (cosine, errors, mass recall, density)
  compare(record_dir, config, others)          -> Comparison (Jaccard / overlap / recall vs the oracle)
  heatmap(comparison, path)                    -> PNG of one layer's selection vs the oracle's
"""
from .compare import Comparison, compare, heatmap
from .record import (DEFAULT_MAX_BYTES, Recording, RecordSizeError, answer_annotation, collect, estimate_bytes,
                     load_recording)
from .replay import mass_recall, replay
from .validate import ValidationResult, validate

__all__ = [
    "Comparison", "DEFAULT_MAX_BYTES", "RecordSizeError", "Recording", "ValidationResult", "answer_annotation", "collect", "compare",
    "estimate_bytes", "heatmap", "load_recording", "mass_recall", "replay", "validate",
]
