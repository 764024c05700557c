"""`compare`: a config's block selections vs the oracle's (and other selectors') at the same density,
on recorded Q, K, V; `heatmap`: one layer's selection against the oracle's as a PNG."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from ..config import SELECTORS, SketchWalkConfig
from ..method.selection import forced_mask
from .record import Recording
from .replay import as_recording, config_label, mass_recall, replay, replay_decode, summarize

METRICS = ("recall", "jaccard", "overlap", "free_overlap", "density")
REFERENCE = "oracle"


@dataclasses.dataclass
class Comparison:
    """Selections of several configs on one recording, each against the oracle's (`reference`).

    layers: one row per (selector, layer), means over prompts: recall (dense mass inside the
    selection, see replay.mass_recall), jaccard (|A ∩ O| / |A ∪ O| over selected (query-block,
    key-block) pairs, O the oracle's), overlap (|A ∩ O| / |O|: oracle pairs recovered),
    free_overlap (the same over the pairs that are not forced sink/local blocks: the ones a
    selector has to find; NaN when the oracle has none), density (measured).
    overall: selector -> metric -> mean over its sparse layers. rows: the same per prompt.
    masks: selector -> layer -> [nb, nb] bool selection of the first prompt (for heatmaps; not in to_dict;
    prefill only). phase: "prefill", or "decode" when the rows are decode steps (replay.replay_decode:
    the last decode_steps tokens of each prompt; layer rows average over steps and prompts).
    """

    config: dict[str, Any]
    record_dir: str
    model: str
    reference: str
    labels: list[str]
    layers: list[dict[str, Any]]
    overall: dict[str, dict[str, float]]
    rows: list[dict[str, Any]]
    masks: dict[str, dict[int, torch.Tensor]] = dataclasses.field(repr=False, default_factory=dict)
    decode_steps: int = 0

    @property
    def phase(self) -> str:
        return "decode" if self.decode_steps else "prefill"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (the masks left out) and the phase."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "masks"}
        return dict(d, phase=self.phase)

    def layer_row(self, selector: str, layer: int) -> dict[str, Any]:
        """The per-layer row of one selector label (StopIteration if absent)."""
        return next(r for r in self.layers if r["selector"] == selector and r["layer"] == layer)


def resolve_configs(config: SketchWalkConfig, others: Sequence[Union[str, SketchWalkConfig]]
                    ) -> dict[str, SketchWalkConfig]:
    """label -> config: `config` first, the oracle at its density (the reference), then `others`
    (a selector name means `config` with that selector; a config is taken as is)."""
    out = {config_label(config): config}
    if config.selector != REFERENCE:
        out[REFERENCE] = config.replace(selector=REFERENCE)
    for other in others:
        if isinstance(other, str):
            if other not in SELECTORS:
                raise ValueError(f"unknown selector {other!r}: allowed one of {list(SELECTORS)} or a config")
            other = config.replace(selector=other)
        if other in out.values():
            continue
        out[config_label(other, set(out))] = other
    return out


def _forced(cfg: SketchWalkConfig, nb: int, device, rows: Optional[torch.Tensor] = None,
            n_tokens: Optional[int] = None) -> torch.Tensor:
    """[len(rows), nb] bool (rows default: every row 0..nb-1): the sink and local pairs every selector keeps."""
    rows = torch.arange(nb, device=device) if rows is None else rows
    return forced_mask(cfg, rows, nb, n_tokens)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> float:
    return float(num) / float(den) if int(den) else float("nan")


@torch.no_grad()
def compare(record: Union[str, Path, Recording], config: SketchWalkConfig,
            others: Sequence[Union[str, SketchWalkConfig]] = (), *, device=None, backend: str = "auto",
            decode_steps: int = 0) -> Comparison:
    """Replay `config`, the oracle at the same density and `others` on a recording; measure each against the oracle.

    decode_steps > 0: compare decode selections instead (the last decode_steps tokens of each prompt).
    """
    rec = as_recording(record)
    configs = resolve_configs(config, others)
    rows, masks = [], {label: {} for label in configs}
    first_prompt = min(rec.prompts)
    steps = (replay_decode(rec, configs, decode_steps, device=device, backend=backend) if decode_steps
             else replay(rec, configs, device=device, backend=backend))
    for step in steps:
        ref = step.steps[REFERENCE].mask
        nb = ref.shape[-1]
        rows_of = None if not decode_steps else torch.tensor([nb - 1], device=ref.device)
        free = ~_forced(config, nb, ref.device, rows_of, step.length)
        for label, s in step.steps.items():
            both = s.mask & ref
            rows.append({"prompt": step.prompt, "layer": step.layer, "length": step.length, "selector": label,
                         "dense": s.dense,
                         "recall": mass_recall(step.mass, step.weights, s.mask),
                         "jaccard": _ratio(both.sum(), (s.mask | ref).sum()),
                         "overlap": _ratio(both.sum(), ref.sum()),
                         "free_overlap": _ratio((both & free).sum(), (ref & free).sum()),
                         "density": s.density})
            if step.prompt == first_prompt and not decode_steps:
                masks[label][step.layer] = s.mask.cpu()
    layers, overall = [], {}
    for label in configs:
        per_layer, overall[label] = summarize([r for r in rows if r["selector"] == label], METRICS)
        layers.extend(dict(r, selector=label) for r in per_layer)
    return Comparison(config.to_dict(), str(rec.path), rec.meta.get("model", ""), REFERENCE, list(configs),
                      layers, overall, rows, masks, decode_steps)


# Heatmap colours by cell code: not causal, causal but selected by neither, both, only the selector,
# only the reference.
_COLOURS = ("#ffffff", "#e8e8e8", "#303030", "#1f77b4", "#d62728")


def default_heatmap_layer(comparison: Comparison) -> int:
    """The deepest layer on which the compared config ran sparse (the deepest layer if none did)."""
    main = comparison.labels[0]
    sparse = [r["layer"] for r in comparison.layers if r["selector"] == main and not r["dense"]]
    return max(sparse or [r["layer"] for r in comparison.layers])


def heatmap(comparison: Comparison, path: Union[str, Path], *, layer: Optional[int] = None,
            selector: Optional[str] = None, against: Optional[str] = None) -> Path:
    """Write a PNG of one layer's block selection (first prompt) against another's, 3 colours over the
    causal [query block, key block] grid: both / only `selector` / only `against`.

    Defaults: layer = default_heatmap_layer; selector = the compared config; against = the oracle.
    Returns the path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    if comparison.phase != "prefill":
        raise ValueError("heatmaps show a prefill's [query block, key block] grid; this comparison is of decode steps")
    layer = default_heatmap_layer(comparison) if layer is None else layer
    selector = selector or comparison.labels[0]
    against = against or comparison.reference
    a, o = comparison.masks[selector][layer], comparison.masks[against][layer]
    nb = a.shape[0]
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    codes = causal.long() + (a & o).long() + 2 * (a & ~o).long() + 3 * (~a & o).long()
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(codes.numpy(), cmap=ListedColormap(_COLOURS), vmin=0, vmax=len(_COLOURS) - 1, interpolation="nearest")
    row = comparison.layer_row(selector, layer)
    ax.set_title(f"layer {layer}: {selector} vs {against} (mean Jaccard {row['jaccard']:.3f})")
    ax.set_xlabel("key block")
    ax.set_ylabel("query block")
    ax.legend(handles=[Patch(color=_COLOURS[2], label="both"), Patch(color=_COLOURS[3], label=f"only {selector}"),
                       Patch(color=_COLOURS[4], label=f"only {against}")], loc="upper right", fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
