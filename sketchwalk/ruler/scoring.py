"""RULER scoring: prediction post-processing and the two string-match metrics (scores ×100)."""
from __future__ import annotations

import re
from typing import Callable, Sequence

from .errors import RulerError
from .templates import family_of

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(pred: str) -> str:
    """RULER's cleanup of a generated answer: strip, control characters [\\x00-\\x1f] → newline, strip."""
    return _CONTROL.sub("\n", pred.strip()).strip()


def _check(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> None:
    if len(preds) != len(refs):
        raise RulerError(f"{len(preds)} predictions but {len(refs)} reference lists")
    if not preds:
        raise RulerError("nothing to score: no predictions")
    for i, r in enumerate(refs):
        if isinstance(r, str) or not len(r):
            raise RulerError(f"references of sample {i} must be a non-empty list of strings, got {r!r}")


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Mean over samples of the fraction of a sample's references found in its prediction
    (case-insensitive substring), ×100, rounded to 2 decimals (niah, vt, cwe, fwe)."""
    _check(preds, refs)
    total = sum(sum(r.lower() in p.lower() for r in ref) / len(ref) for p, ref in zip(preds, refs))
    return round(total / len(preds) * 100, 2)


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Mean over samples of 1 if any reference is found in the prediction (case-insensitive
    substring), else 0; ×100, rounded to 2 decimals (qa)."""
    _check(preds, refs)
    total = sum(max(r.lower() in p.lower() for r in ref) for p, ref in zip(preds, refs))
    return round(total / len(preds) * 100, 2)


def metric_for_task(task: str) -> Callable[[Sequence[str], Sequence[Sequence[str]]], float]:
    """The metric RULER uses for `task`: string_match_part for qa_*, string_match_all otherwise."""
    return string_match_part if family_of(task) == "qa" else string_match_all


def score_task(task: str, preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Task score ×100 (2 decimals): post-process raw predictions, then apply the task's metric."""
    return metric_for_task(task)([postprocess(p) for p in preds], refs)
