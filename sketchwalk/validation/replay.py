"""Replay block selectors on recorded Q, K, V, layer by layer, beside exact dense attention.

One `SketchWalkRuntime` per config and prompt runs the recorded layers in order (batch 1, no
padding), so the walk is carried across the recorded layers exactly as in a forward pass;
layers below skip_layers run dense. When only some layers were recorded, the walk steps from
one recorded layer to the next (R^k = R^k' W^k for the previous recorded layer k').

`replay` measures the prefill's selections; `replay_decode` the decode phase: the prompt's last
`steps` tokens become decode steps after a prefill of the rest (the recorded keys and values
are those a generation would have cached: the recording is causal).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch

from ..config import ConfigError, SketchWalkConfig
from ..method.attention import sparse_attention
from ..method.baselines import block_attention_mass, query_block_sizes
from ..method.runtime import SketchWalkRuntime
from .record import Recording, load_recording


@dataclasses.dataclass
class SelectorStep:
    """One config's result on one recorded layer of one prompt.

    out: [Hq, n, d] its attention output; mask: [nb, nb] bool, the selected (query-block, key-block)
    pairs (every causal pair when the layer ran dense); density: the runtime's measured density;
    dense: whether the layer ran dense (below skip_layers, or sparse prefill off).
    """

    out: torch.Tensor
    mask: torch.Tensor
    density: float
    dense: bool


@dataclasses.dataclass
class LayerStep:
    """Everything replayed for one (prompt, layer): the exact reference and each config's step.

    mass: [nb, nb] dense block attention mass (mean over heads and the block's queries, rows sum to
    1); weights: [nb] queries per block row; dense_out: [Hq, n, d] dense causal attention;
    steps: label -> SelectorStep.
    """

    prompt: int
    layer: int
    length: int
    mass: torch.Tensor
    weights: torch.Tensor
    dense_out: torch.Tensor
    steps: dict[str, SelectorStep]


def as_recording(record: Union[str, Path, Recording]) -> Recording:
    """A Recording from a directory path (or the Recording itself)."""
    return record if isinstance(record, Recording) else load_recording(record)


def default_device() -> torch.device:
    """Where replays run by default: the GPU if there is one (the Triton path), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def replay(record: Union[str, Path, Recording], configs: dict[str, SketchWalkConfig], *,
           device: Union[str, torch.device, None] = None, backend: str = "auto",
           selection_only: bool = False) -> Iterator[LayerStep]:
    """Yield one LayerStep per recorded (prompt, layer), prompts in order, layers ascending.

    configs: label -> config; all must share one block_size (their masks and the mass are on one
    block grid). Each config is checked against the recorded model (ConfigError). backend: the
    runtime's attention backend (`auto`: Triton on CUDA). selection_only: the configs' outputs
    are zeros (the runtime's `selection_only`), for studies that read only masks and the mass.
    """
    rec = as_recording(record)
    block_size, device, layers = _plan(rec, configs, device)
    for prompt in rec.prompts:
        runtimes = _runtimes(rec, configs, layers, backend, selection_only)
        for layer in layers:
            e = rec.entry(prompt, layer)
            q, k, v = _gqa_inputs(rec, *rec.load(prompt, layer, device))
            n = q.shape[-2]
            pos = torch.arange(n, device=device)
            steps = {label: _step(rt, configs[label], layer, q, k, v, e.scale) for label, rt in runtimes.items()}
            yield LayerStep(prompt, layer, n, block_attention_mass(q, k, e.scale, block_size),
                            query_block_sizes(0, n, block_size, device),
                            sparse_attention(q, k, v, pos, None, e.scale), steps)


def replay_decode(record: Union[str, Path, Recording], configs: dict[str, SketchWalkConfig], steps: int, *,
                  device: Union[str, torch.device, None] = None, backend: str = "auto",
                  selection_only: bool = False) -> Iterator[LayerStep]:
    """Yield one LayerStep per (prompt, decode step, recorded layer): the last `steps` tokens of each
    prompt decoded one at a time after a prefill of the others, layers ascending within a step.

    Per step: mass [1, nb] (the token's dense block attention mass, mean over heads), weights [1],
    dense_out [Hq, 1, d], and per config a SelectorStep with mask [1, nb] (its decode selection;
    every block when the layer ran dense) and density = selected / causal blocks of that row.
    `length` is the tokens in the cache at that step (the decoded token included). Same config
    rules as `replay` (selection_only too); steps must leave at least one prompt token for the prefill.
    """
    rec = as_recording(record)
    if steps < 1:
        raise ValueError(f"decode steps must be >= 1, got {steps}")
    block_size, device, layers = _plan(rec, configs, device)
    for prompt in rec.prompts:
        runtimes = _runtimes(rec, configs, layers, backend, selection_only)
        data = {layer: _gqa_inputs(rec, *rec.load(prompt, layer, device)) for layer in layers}
        scales = {layer: rec.entry(prompt, layer).scale for layer in layers}
        n = data[layers[0]][0].shape[-2]
        if steps >= n:
            raise ValueError(f"decode steps ({steps}) must be fewer than the prompt's {n} recorded tokens "
                             f"(prompt {prompt})")
        m0 = n - steps
        for layer in layers:  # the prefill of the first m0 tokens seeds every runtime's decode state
            q, k, v = data[layer]
            for rt in runtimes.values():
                rt.attention(layer, q[None, :, :m0], k[None, :, :m0], v[None, :, :m0], None, scales[layer])
        for t in range(m0, n):
            nb = t // block_size + 1
            for layer in layers:
                q, k, v = data[layer]
                qt, kt, vt = q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1]
                results = {}
                for label, rt in runtimes.items():
                    out = rt.attention(layer, qt[None], kt[None], vt[None], None, scales[layer])[0]
                    sel = rt.last_selection[layer][0]
                    mask = (torch.ones(1, nb, dtype=torch.bool, device=device) if sel is None
                            else sel.dense_block_mask(nb))
                    results[label] = SelectorStep(out, mask, float(mask.sum()) / nb, dense=sel is None)
                pos = torch.arange(t, t + 1, device=device)
                yield LayerStep(prompt, layer, t + 1, block_attention_mass(qt, kt, scales[layer], block_size, q_start=t),
                                torch.ones(1, dtype=torch.long, device=device),
                                sparse_attention(qt, kt, vt, pos, None, scales[layer]), results)


def _plan(rec: Recording, configs: dict[str, SketchWalkConfig], device) -> tuple[int, torch.device, list[int]]:
    """(block size, device, recorded layers ascending) of a replay; every config checked first."""
    block_sizes = {c.block_size for c in configs.values()}
    if len(block_sizes) != 1:
        raise ValueError(f"replayed configs must share one block_size, got {sorted(block_sizes)}")
    for cfg in configs.values():
        cfg.validate_for_model(rec.meta["num_layers"], rec.meta["head_dim"])
        if cfg.per_kv_head:  # recall here is of one shared mask; per-head limits have their own tool
            raise ConfigError("selection_heads", cfg.selection_heads,
                              "'shared' in the tensor tools (per-KV-head limits: python -m ablations.head_limit)")
    device = torch.device(device) if device is not None else default_device()
    return block_sizes.pop(), device, sorted(rec.layers)


def _runtimes(rec: Recording, configs: dict[str, SketchWalkConfig], layers: list[int],
              backend: str, selection_only: bool = False) -> dict[str, SketchWalkRuntime]:
    """One fresh runtime per config label (a prompt's replay starts from no state)."""
    num_layers, head_dim = rec.meta["num_layers"], rec.meta["head_dim"]
    runtimes = {label: _runtime(_replay_config(cfg, layers), num_layers, head_dim, backend)
                for label, cfg in configs.items()}
    for rt in runtimes.values():
        rt.selection_only = selection_only
    return runtimes


def _replay_config(cfg: SketchWalkConfig, layers: Sequence[int]) -> SketchWalkConfig:
    """The config the runtime replays with: the runtime starts its walk at layer == skip_layers, so
    when that layer was not recorded, skip_layers moves to the first recorded sparse layer (the same
    layers run dense: none was recorded in between)."""
    sparse = [layer for layer in layers if layer >= cfg.skip_layers]
    return cfg.replace(skip_layers=sparse[0]) if sparse and sparse[0] != cfg.skip_layers else cfg


def _runtime(cfg: SketchWalkConfig, num_layers: int, head_dim: int, backend: str) -> SketchWalkRuntime:
    rt = SketchWalkRuntime(cfg, num_layers, head_dim, backend=backend)
    rt.keep_selections = True
    return rt


def _gqa_inputs(rec: Recording, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """(q, k, v) with a uniform GQA grouping: a head subset whose query heads do not split evenly over
    its KV heads gets one KV head per query head (the same pairs, no grouping to infer)."""
    q_to_kv = rec.meta["q_to_kv"]
    hq, hkv = q.shape[0], k.shape[0]
    uniform = hq % hkv == 0 and q_to_kv == [h // (hq // hkv) for h in range(hq)]
    if uniform:
        return q, k, v
    idx = torch.tensor(q_to_kv, device=k.device)
    return q, k.index_select(0, idx), v.index_select(0, idx)


def _step(rt: SketchWalkRuntime, cfg: SketchWalkConfig, layer: int, q, k, v, scale: float) -> SelectorStep:
    out = rt.attention(layer, q[None], k[None], v[None], None, scale)[0]
    nb = -(-q.shape[-2] // cfg.block_size)
    sel = rt.last_selection[layer][0]
    if sel is None:
        mask = torch.ones(nb, nb, dtype=torch.bool, device=q.device).tril()
    else:
        mask = sel.dense_block_mask(nb)
    density = rt.density().per_layer["prefill"][layer]
    return SelectorStep(out, mask, density, dense=sel is None)


def mass_recall(mass: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of the dense softmax mass (mean over heads and query tokens) inside the selected blocks.

    mass: [nb, nb] per-row mean mass; weights: [nb] queries per row; mask: [nb, nb] bool selection.
    """
    w = weights.to(mass.dtype)
    return float(((mass * mask).sum(-1) * w).sum() / w.sum())


def output_errors(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Errors of out vs ref (equal shapes, e.g. [Hq, n, d]): cosine (flattened, fp64),
    rel_error = ||out - ref|| / ||ref||, max_abs_error."""
    o, r = out.double().flatten(), ref.double().flatten()
    diff = o - r
    return {"cosine": float(torch.dot(o, r) / (o.norm() * r.norm()).clamp_min(1e-300)),
            "rel_error": float(diff.norm() / r.norm().clamp_min(1e-300)),
            "max_abs_error": float(diff.abs().max()) if diff.numel() else 0.0}


def summarize(rows: list[dict], metrics: Sequence[str], worst: Sequence[str] = (),
              group: Sequence[str] = ("layer",)) -> tuple[list[dict], dict[str, float]]:
    """Per-group aggregates over prompts, then overall aggregates over the sparse groups.

    rows: dicts with the `group` keys, `dense` (bool) and each metric. A metric is averaged, except
    those in `worst`, which take the max (errors). Overall: over groups that ran sparse (all groups
    when none did). Returns (per-group rows in first-seen order, overall {metric: value}).
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[g] for g in group), []).append(r)
    per_group = []
    for key, rs in groups.items():
        agg = dict(zip(group, key), dense=all(r["dense"] for r in rs), prompts=len(rs))
        agg.update({m: _reduce([r[m] for r in rs], m in worst) for m in metrics})
        per_group.append(agg)
    sparse = [g for g in per_group if not g["dense"]] or per_group
    overall = {m: _reduce([g[m] for g in sparse], m in worst) for m in metrics}
    return per_group, overall


def _reduce(values: list[float], take_max: bool) -> float:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return float("nan")
    return max(finite) if take_max else sum(finite) / len(finite)


def config_label(cfg: SketchWalkConfig, taken: Optional[set] = None) -> str:
    """A short label for a config in tables and metric names: its selector, plus its hash if that is taken."""
    label = cfg.selector
    if taken is not None and label in taken:
        label = f"{cfg.selector}-{cfg.short_hash()}"
    return label
