"""What a task builder produces, and the interface `fitting` drives."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Protocol


@dataclass(frozen=True)
class TaskPrompt:
    """One sample before chat wrapping: `content` is the user turn (few-shot example first where
    RULER has one), `answer_prefix` opens the assistant turn, `outputs` are the references."""

    content: str
    answer_prefix: str
    outputs: list[str]


class Builder(Protocol):
    """Builds a task's prompt for a haystack of `n` units (essay words, noise/needle lines, cwe
    distinct words, fwe word budget). `step` is RULER's search/back-off increment in units,
    `min_units`/`max_units` the feasible range (max None: unbounded). `grid_origin`: None when
    RULER searches the size exactly (binary search); an int when RULER's search is linear from
    there in whole steps (fwe), so the fitted size is the last grid point that fits."""

    unit: str
    step: int
    min_units: int
    max_units: Optional[int]
    grid_origin: Optional[int]

    def build(self, rng: random.Random, n: int) -> TaskPrompt:
        """The prompt for `n` haystack units, all randomness drawn from `rng`."""
        ...
