"""The selector study: several block selectors x densities on recorded Q, K, V, measured where
RULER's answers are decided.

Per (variant, density), over the sparse layers of every recording:
- recall_prefill: dense attention mass inside the prefill's selection, all query rows
  (`replay.mass_recall`); recall_last: the same for the last query-block row (the question);
- recall_decode: the same for the decode steps over the recorded answer tokens (a recording made
  with `tensors collect --append-answer`: teacher-forced answer rows, the queries that must reach
  the needle), or the last `decode_steps` tokens;
- needle_recall: of the dense mass that those decode rows put on the blocks holding the answer in
  the haystack (the recording's `annotations`), the share inside the selection;
- jaccard: |A ∩ O| / |A ∪ O| of the prefill's selected pairs against the `oracle` variant's
  (when the study has one), at the same density;
- density: the measured density of the sparse layers (prefill, decode).
Per recorded layer, once: block coherence = mean over blocks and KV heads of the within-block key
variance (mean squared distance to the block's mean key) over the squared norm of the block mean:
near 0 a block mean represents its keys; >= 1 its keys scatter more than the mean says (the
paper's block-coherence assumption fails).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from ..config import SketchWalkConfig
from .record import Recording
from .replay import as_recording, mass_recall, replay, replay_decode

ORACLE = "oracle"


@dataclasses.dataclass
class StudyResult:
    """rows: one per (variant, density) with the metrics above, means over recordings; coherence:
    per recording, layer -> block coherence; recordings: the directories studied."""

    rows: list[dict[str, Any]]
    coherence: dict[str, dict[int, float]]
    recordings: list[str]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: rows, coherence, recordings, and `variants`: name -> the row at density 0.2 (if run)."""
        at = {r["variant"]: r for r in self.rows if math.isclose(r["target_density"], 0.2)}
        return {"rows": self.rows, "coherence": self.coherence, "recordings": self.recordings, "variants": at}


def block_coherence(k: torch.Tensor, block_size: int) -> float:
    """k: [Hkv, n, d] -> mean over KV heads and complete blocks of E||k - μ||² / ||μ||² (float)."""
    hkv, n, d = k.shape
    nb = n // block_size
    if nb == 0:
        return float("nan")
    x = k[:, :nb * block_size].double().view(hkv, nb, block_size, d)
    mu = x.mean(2, keepdim=True)
    var = (x - mu).pow(2).sum(-1).mean(2)  # [Hkv, nb]
    return float((var / mu.squeeze(2).pow(2).sum(-1).clamp_min(1e-30)).mean())


def _answer_rows(rec: Recording, prompt: int, decode_steps: Optional[int]) -> tuple[int, list[list[int]]]:
    """(decode steps, needle token spans) of one prompt: the annotated answer tokens, else decode_steps."""
    notes = (rec.meta.get("annotations") or [None] * len(rec.prompts))[prompt] or {}
    n = rec.entry(prompt, rec.layers[0]).length
    answer = notes.get("answer_tokens")
    if decode_steps is None:
        if not answer:
            raise ValueError(f"{rec.path}: prompt {prompt} has no recorded answer tokens (record with "
                             f"`tensors collect --append-answer`) and no decode_steps was given")
        return n - answer[0], notes.get("needles", [])
    return decode_steps, notes.get("needles", [])


def study(records: Sequence[Union[str, Path, Recording]], variants: dict[str, SketchWalkConfig],
          densities: Sequence[float], *, decode_steps: Optional[int] = None,
          device: Union[str, torch.device, None] = "cpu") -> StudyResult:
    """Run the study (see the module doc). variants: name -> config (its density is replaced by
    each of `densities`; all must share one block_size); decode_steps: None = the annotated answer
    tokens of each prompt. Every prompt of every recording is studied."""
    recs = [as_recording(r) for r in records]
    acc: dict[tuple[str, float], dict[str, list[float]]] = {}
    coherence: dict[str, dict[int, float]] = {}
    block = {c.block_size for c in variants.values()}
    if len(block) != 1:
        raise ValueError(f"variants must share one block_size, got {sorted(block)}")
    block_size = block.pop()
    for rec in recs:
        coherence[str(rec.path)] = {layer: block_coherence(rec.load(rec.prompts[0], layer)[1], block_size)
                                    for layer in rec.layers}
        # Every (variant, density) in one replay: the exact mass of each layer is computed once.
        configs = {(name, float(d)): cfg.replace(density=float(d)) for d in densities for name, cfg in variants.items()}
        _prefill_metrics(rec, configs, acc, device)
        _decode_metrics(rec, configs, acc, decode_steps, device)
    rows = []
    for (name, d), m in acc.items():
        row = {"variant": name, "target_density": float(d), "config": variants[name].replace(density=float(d)).to_dict()}
        for key, values in m.items():
            if key.endswith("_num") or key.endswith("_den"):
                continue
            row[key] = sum(values) / len(values) if values else float("nan")
        num, den = sum(m.get("needle_num", [])), sum(m.get("needle_den", []))
        row["needle_recall"] = num / den if den > 0 else float("nan")
        rows.append(row)
    return StudyResult(rows, coherence, [str(r.path) for r in recs])


def _prefill_metrics(rec, configs, acc, device) -> None:
    for step in replay(rec, configs, device=device, backend="torch", selection_only=True):
        for key, s in step.steps.items():
            if s.dense:
                continue
            oracle = step.steps.get((ORACLE, key[1]))
            m = acc.setdefault(key, {})
            m.setdefault("recall_prefill", []).append(mass_recall(step.mass, step.weights, s.mask))
            m.setdefault("recall_last", []).append(float((step.mass[-1] * s.mask[-1]).sum()))
            m.setdefault("density_prefill", []).append(s.density)
            if oracle is not None:
                inter = (s.mask & oracle.mask).sum().item()
                union = (s.mask | oracle.mask).sum().item()
                m.setdefault("jaccard", []).append(inter / union if union else float("nan"))


def _decode_metrics(rec, configs, acc, decode_steps, device) -> None:
    for prompt in rec.prompts:
        steps, needles = _answer_rows(rec, prompt, decode_steps)
        blocks_of = sorted({t // next(iter(configs.values())).block_size for s0, s1 in needles for t in range(s0, s1)})
        one = Recording(rec.path, rec.meta, [e for e in rec.entries if e.prompt == prompt])
        for step in replay_decode(one, configs, steps, device=device, backend="torch", selection_only=True):
            mass = step.mass[0]
            needle = [j for j in blocks_of if j < mass.shape[0]]
            for key, s in step.steps.items():
                if s.dense:
                    continue
                m = acc.setdefault(key, {})
                m.setdefault("recall_decode", []).append(float((mass * s.mask[0]).sum()))
                m.setdefault("density_decode", []).append(s.density)
                if needle:
                    m.setdefault("needle_num", []).append(float((mass[needle] * s.mask[0, needle]).sum()))
                    m.setdefault("needle_den", []).append(float(mass[needle].sum()))
