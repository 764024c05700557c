"""`validate`: a config replayed on recorded Q, K, V against dense attention, layer by layer."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Union

import torch

from ..config import SketchWalkConfig
from .record import Recording
from .replay import as_recording, mass_recall, output_errors, replay, replay_decode, summarize

METRICS = ("cosine", "rel_error", "max_abs_error", "recall", "density")
WORST = ("max_abs_error",)  # reported as the maximum, not the mean


@dataclasses.dataclass
class ValidationResult:
    """Per-layer numbers (over prompts: means, max for max_abs_error) and overall numbers (over the
    sparse layers; all layers if none ran sparse).

    Each layer row: layer, dense (ran dense), prompts, cosine (output vs dense, flattened over heads
    and tokens), rel_error (||o - o_dense|| / ||o_dense||), max_abs_error, recall (fraction of the
    dense softmax mass, averaged over heads and query tokens, inside the selected blocks), density
    (measured: selected / causal block pairs). `rows`: the same per (prompt, layer); with
    decode_steps, per (prompt, step, layer) over the decoded tokens (phase = "decode").
    """

    config: dict[str, Any]
    record_dir: str
    model: str
    layers: list[dict[str, Any]]
    overall: dict[str, float]
    rows: list[dict[str, Any]]
    decode_steps: int = 0

    @property
    def phase(self) -> str:
        return "decode" if self.decode_steps else "prefill"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields and the phase."""
        return dict(dataclasses.asdict(self), phase=self.phase)


@torch.no_grad()
def validate(record: Union[str, Path, Recording], config: SketchWalkConfig, *, device=None,
             backend: str = "auto", decode_steps: int = 0) -> ValidationResult:
    """Replay `config` on a recording (see replay.replay) and measure it against dense attention.

    decode_steps > 0: measure the decode phase instead, the last decode_steps tokens of each prompt
    decoded one at a time (replay.replay_decode); layer rows then average over the steps too.
    """
    rec = as_recording(record)
    rows = []
    steps = (replay_decode(rec, {"config": config}, decode_steps, device=device, backend=backend) if decode_steps
             else replay(rec, {"config": config}, device=device, backend=backend))
    for step in steps:
        s = step.steps["config"]
        rows.append({"prompt": step.prompt, "layer": step.layer, "length": step.length, "dense": s.dense,
                     **output_errors(s.out, step.dense_out), "recall": mass_recall(step.mass, step.weights, s.mask),
                     "density": s.density})
    layers, overall = summarize(rows, METRICS, WORST)
    return ValidationResult(config.to_dict(), str(rec.path), rec.meta.get("model", ""), layers, overall, rows,
                            decode_steps)
