"""Evaluation harness: one entry point, `evaluate`, for accuracy, speed and density."""
from .harness import EvalResult, SampleResult, evaluate
from .stats import bootstrap_ci

__all__ = ["EvalResult", "SampleResult", "bootstrap_ci", "evaluate"]
