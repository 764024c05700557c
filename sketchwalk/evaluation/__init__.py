"""Evaluation harness: one entry point, `evaluate`, for accuracy, speed and density.

Modules, one job each: result (records), harness (evaluate), timing (clocks), stats (intervals),
baseline (dense-result cache), model_facts (context/identity without weights), plan (input
validation before loading), report (tables and JSON files).
"""
from .baseline import BaselineKey, default_cache_dir, dense_baseline, load_baseline, store_baseline, suite_fingerprint
from .harness import evaluate
from .result import EvalResult, SampleResult
from .stats import bootstrap_ci

__all__ = ["BaselineKey", "EvalResult", "SampleResult", "bootstrap_ci", "default_cache_dir", "dense_baseline",
           "evaluate", "load_baseline", "store_baseline", "suite_fingerprint"]
