"""How much could per-head selection gain? The oracle's limits per head granularity, on recorded tensors.

Issue 16's hypothesis 3: one selection shared by all heads averages away per-head signal. Before the
block selection grows a head axis (kernels included), this measures the ceiling it could reach.
Per recording (`sketchwalk tensors collect --append-answer`), every sparse layer, each query head h:
the exact causal attention, its block mass per prefill row M_h and per answer-token row. Selections at
each density use the product's `select_blocks` (sinks, locals and dense_last_blocks from `base`), with
scores pooled at three granularities:

  shared    one selection for all heads (today's layout): scores = mean over heads;
  kv        one per KV head (a GQA group shares it; what `[B, Hkv, rows]` indices would allow);
  head      one per query head (the limit of any per-head layout);

for the oracle (scores = the exact mass) and for the token-level selector (scores = the softmax of
s * q.k / sqrt(d) over every key token, summed per block: `score_block_size: 1`, `walk: none`; the
block-mean query in prefill rows, the token's query in decode rows; unsketched, which the Hadamard
sketch at sketch_dim = head_dim equals up to rounding). Recall of head h = the share of its dense mass
inside the selection its head uses, averaged over heads, rows (prefill rows weighted by their queries)
and layers; needle recall = of the answer rows' mass on the needle blocks, the share kept.

    python -m ablations.head_limit runs/recordings/vt_4k ... --out results/selector-study/head-limit

writes head_limit.json and head_limit.md.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from sketchwalk.config import SketchWalkConfig
from sketchwalk.method.selection import select_blocks
from sketchwalk.validation.record import Recording, load_recording

GRANULARITIES = ("shared", "kv", "head")


def head_mass(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int, rows: slice):
    """Exact per-head block mass. q: [Hq, n, d], k: [Hkv, n, d] (fp32) -> (M [Hq, nb, nb] mean over the
    queries of each block row, D [Hq, len(rows), nb] the token rows `rows`, weights [nb] queries per row)."""
    hq, n, d = q.shape
    kk = k.repeat_interleave(hq // k.shape[0], 0)
    nb = -(-n // block_size)
    pos = torch.arange(n)
    logits = torch.matmul(q, kk.transpose(-1, -2)) * scale
    logits.masked_fill_(pos[None, :] > pos[:, None], float("-inf"))
    p = torch.softmax(logits, -1)
    del logits
    per_token = torch.nn.functional.pad(p, (0, nb * block_size - n)).view(hq, n, nb, block_size).sum(-1)
    del p
    weights = torch.bincount(pos // block_size, minlength=nb).to(q.dtype)
    m = torch.zeros(hq, nb, nb, dtype=q.dtype).index_add_(1, pos // block_size, per_token) / weights[None, :, None]
    return m, per_token[:, rows], weights


def token_scores(q: torch.Tensor, k: torch.Tensor, s: float, block_size: int, rows: slice):
    """Token-level block scores per head (softmax of s * q.k / sqrt(d) over key tokens, summed per block):
    (W [Hq, nb, nb] from block-mean queries over the causal blocks, Wd [Hq, len(rows), nb] from the
    queries of `rows` over their causal tokens)."""
    hq, n, d = q.shape
    kk = k.repeat_interleave(hq // k.shape[0], 0)
    nb = -(-n // block_size)
    pad = nb * block_size - n
    pos = torch.arange(n)
    counts = torch.bincount(pos // block_size, minlength=nb).to(q.dtype)
    qm = torch.nn.functional.pad(q, (0, 0, 0, pad)).view(hq, nb, block_size, d).sum(2) / counts[None, :, None]
    lg = torch.matmul(qm, kk.transpose(-1, -2)) * (s / math.sqrt(d))
    lg.masked_fill_((pos[None, :] // block_size > torch.arange(nb)[:, None])[None], float("-inf"))
    w = torch.nn.functional.pad(torch.softmax(lg, -1), (0, pad)).view(hq, nb, nb, block_size).sum(-1)
    t = torch.arange(n)[rows]
    lgd = torch.matmul(q[:, rows], kk.transpose(-1, -2)) * (s / math.sqrt(d))
    lgd.masked_fill_(pos[None, :] > t[:, None], float("-inf"))
    wd = torch.nn.functional.pad(torch.softmax(lgd, -1), (0, pad)).view(hq, len(t), nb, block_size).sum(-1)
    return w, wd


def pooled(scores: torch.Tensor, granularity: str, group: int) -> torch.Tensor:
    """[Hq, R, nb] per-head scores -> [G, R, nb] at a granularity: shared (G=1), kv (G=Hkv), head (G=Hq)."""
    if granularity == "shared":
        return scores.mean(0, keepdim=True)
    if granularity == "kv":
        return scores.view(-1, group, *scores.shape[1:]).mean(1)
    return scores


def prefill_masks(scores: torch.Tensor, cfg: SketchWalkConfig) -> torch.Tensor:
    """[G, nb, nb] scores -> [G, nb, nb] bool selections of every prefill row."""
    nb = scores.shape[-1]
    rows = torch.arange(nb)
    return torch.stack([select_blocks(s, rows, cfg, nb).dense_block_mask(nb) for s in scores])


def decode_masks(scores: torch.Tensor, token_rows: torch.Tensor, cfg: SketchWalkConfig) -> torch.Tensor:
    """[G, T, nb] scores of decode rows at tokens `token_rows` -> [G, T, nb] bool selections."""
    g, t, nb = scores.shape
    out = torch.zeros(g, t, nb, dtype=torch.bool)
    for r, tok in enumerate(token_rows.tolist()):
        i = tok // cfg.block_size
        for gi in range(g):
            sel = select_blocks(scores[gi, r:r + 1, :i + 1], torch.tensor([i]), cfg, None)
            out[gi, r, sel.indices[0, :int(sel.counts[0])]] = True
    return out


def measure(records: Sequence[str | Path | Recording], densities: Sequence[float],
            base: Optional[SketchWalkConfig] = None) -> list[dict[str, Any]]:
    """One row per (selector in oracle | token, granularity, density): recall_prefill, recall_decode,
    needle_recall, density_prefill (measured, the sparse layers' causal pairs kept), means over
    recordings' layers (see the module doc). base: the selection rule's config (density replaced)."""
    base = base or SketchWalkConfig(dense_last_blocks=1)
    acc: dict[tuple, dict[str, Any]] = {}
    for rec in records:
        rec = rec if isinstance(rec, Recording) else load_recording(rec)
        for prompt in rec.prompts:
            notes = (rec.meta.get("annotations") or [None] * (prompt + 1))[prompt] or {}
            if not notes.get("answer_tokens"):
                raise ValueError(f"{rec.path}: prompt {prompt} has no answer tokens (record with --append-answer)")
            a0, a1 = notes["answer_tokens"]
            needles = sorted({t // base.block_size for s0, s1 in notes.get("needles", []) for t in range(s0, s1)})
            for layer in rec.layers:
                if layer < base.skip_layers:
                    continue
                q, k, _ = rec.load(prompt, layer)
                q, k = q.float(), k.float()
                group = q.shape[0] // k.shape[0]
                rows = slice(a0, a1)
                mass, dmass, weights = head_mass(q, k, rec.entry(prompt, layer).scale, base.block_size, rows)
                w, wd = token_scores(q, k, base.sparsity_exponent, base.block_size, rows)
                token_rows = torch.arange(a0, a1)
                for dens in densities:
                    cfg = base.replace(density=float(dens))
                    for selector, (sp, sd) in (("oracle", (mass, dmass)), ("token", (w, wd))):
                        for gran in GRANULARITIES:
                            per = {"shared": q.shape[0], "kv": group, "head": 1}[gran]
                            mp = prefill_masks(pooled(sp, gran, group), cfg).repeat_interleave(per, 0)
                            md = decode_masks(pooled(sd, gran, group), token_rows, cfg).repeat_interleave(per, 0)
                            a = acc.setdefault((selector, gran, float(dens)),
                                               {"rp": [], "rd": [], "nn": 0.0, "nd": 0.0, "dp": []})
                            a["rp"].append(float(((mass * mp).sum(-1) * weights).sum() / (weights.sum() * q.shape[0])))
                            a["rd"].append(float((dmass * md).sum(-1).mean()))
                            if needles:
                                a["nn"] += float((dmass[..., needles] * md[..., needles]).sum())
                                a["nd"] += float(dmass[..., needles].sum())
                            nb = mass.shape[-1]
                            a["dp"].append(float(mp.sum()) / (q.shape[0] * nb * (nb + 1) / 2))
    return [dict(selector=sel, granularity=gran, density=dens, recall_prefill=sum(a["rp"]) / len(a["rp"]),
                 recall_decode=sum(a["rd"]) / len(a["rd"]),
                 needle_recall=a["nn"] / a["nd"] if a["nd"] > 0 else float("nan"),
                 density_prefill=sum(a["dp"]) / len(a["dp"]))
            for (sel, gran, dens), a in acc.items()]


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    lines = ["| selector | per | density | recall prefill | recall decode | needle recall | measured density |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['selector']} | {r['granularity']} | {r['density']:.2f} | {r['recall_prefill']:.3f} | "
                     f"{r['recall_decode']:.3f} | {r['needle_recall']:.3f} | {r['density_prefill']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    """Command line: exit 0, or 2 on bad input (a message naming the argument)."""
    p = argparse.ArgumentParser(prog="python -m ablations.head_limit", description=__doc__.split("\n\n")[0])
    p.add_argument("recordings", nargs="+", help="recording directories (tensors collect --append-answer)")
    p.add_argument("--density", type=float, action="append", default=None, help="density (repeatable; default 0.2)")
    p.add_argument("--out", required=True, help="directory for head_limit.json and head_limit.md")
    args = p.parse_args(argv)
    densities = args.density or [0.2]
    try:
        if any(not 0 < d <= 1 for d in densities):
            raise ValueError(f"--density: each must be in (0, 1], got {densities}")
        recs = []
        for path in args.recordings:
            if not (Path(path) / "meta.json").is_file():
                raise ValueError(f"recordings: {path} is not a recording directory (no meta.json)")
            recs.append(load_recording(path))
        rows = measure(recs, densities)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "head_limit.json").write_text(json.dumps({"recordings": args.recordings, "rows": rows}, indent=1))
    (out / "head_limit.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
