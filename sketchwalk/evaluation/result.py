"""The records an evaluation produces: one `SampleResult` per generated answer, one `EvalResult` per run."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

from ..config import SketchWalkConfig


@dataclasses.dataclass
class SampleResult:
    """One generated answer.

    prompt_tokens: tokens of input + answer prefix; score in [0, 1]; prefill_s: seconds to the
    first new token; decode_s: seconds from the first to the last new token (timed_tokens - 1
    decode steps); generate_s: the whole generate() call, s. timed_tokens: new tokens of the timed
    generate() call; None = the answer's own call (new_tokens). A batched answer copies its speed
    fields from a shorter batch-1 timing call, which generated fewer tokens.
    """

    task: str
    length: int
    index: int
    prompt_tokens: int
    prediction: str
    outputs: list[str]
    score: float
    prefill_s: float
    generate_s: float
    new_tokens: int
    decode_s: float = float("nan")
    timed_tokens: Optional[int] = None
    prefill_forward_s: Optional[float] = None  # median bare prefill forward of this prompt, s; None: not timed
    # The sample's identity: its position within its (task, length) in the suite (file order). `index`
    # is RULER's field, kept as data: imported files repeat it. None: a result written before this field.
    position: Optional[int] = None

    @property
    def key(self) -> tuple:
        """(task, length, position): what pairs this answer with the same sample in another run
        (falls back to RULER's index for results written without a position)."""
        return (self.task, int(self.length), int(self.index if self.position is None else self.position))

    @property
    def decode_tokens_per_s(self) -> float:
        """(timed tokens - 1) / decode_s: NaN without a timed decode of at least two tokens."""
        tokens = self.new_tokens if self.timed_tokens is None else self.timed_tokens
        if tokens < 2 or not self.decode_s > 0:
            return float("nan")
        return (tokens - 1) / self.decode_s


@dataclasses.dataclass
class EvalResult:
    """Accuracy, speed and density of one evaluation, each number tagged with `device` and `dtype`.

    accuracy: {"task@length" | "overall": {mean, lo, hi (×100, 95% percentile bootstrap), n}};
    prefill_s / decode_tokens_per_s: {length: median over samples} in s and tokens/s;
    prefill_forward_s: {length: median over samples of each sample's bare-prefill median}, s ({}
    when not measured: CPU, or results from before it existed);
    attention_s: {phase: {layer: median s per forward}} when attention timing was on, else {};
    density: measured fraction of causal block pairs (see `SketchWalkRuntime.density`);
    peak_memory_bytes: CUDA max_memory_allocated, None on CPU;
    deployment_speed: the prefill / decode times at deployment lengths (`bench.deploy`), {} when not asked.
    """

    model: str
    config: Optional[SketchWalkConfig]  # None = dense; written to JSON as its dict
    device: str
    dtype: str
    accuracy: dict[str, dict[str, float]]
    prefill_s: dict[str, float]
    decode_tokens_per_s: dict[str, float]
    density: dict[str, Any]
    peak_memory_bytes: Optional[int]
    samples: list[SampleResult]
    attention_s: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    timing: str = ""  # how the speed numbers were measured, for readers of the JSON
    prefill_forward_s: dict[str, float] = dataclasses.field(default_factory=dict)
    deployment_speed: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of the whole result (per-sample predictions included)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvalResult":
        """Inverse of `to_dict` (unknown keys ignored, so older files still load)."""
        names = {f.name for f in dataclasses.fields(cls)}
        sample_names = {f.name for f in dataclasses.fields(SampleResult)}
        kw = {k: v for k, v in data.items() if k in names}
        if kw.get("config") is not None:
            kw["config"] = SketchWalkConfig.from_dict(kw["config"])
        kw["samples"] = [SampleResult(**{k: v for k, v in s.items() if k in sample_names})
                         for s in data.get("samples", [])]
        return cls(**kw)

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON text of the whole result; also written to `path` if given."""
        text = json.dumps(self.to_dict(), indent=2, default=str)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        return text
