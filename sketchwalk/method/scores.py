"""Block scores and the transition matrix (method.md steps 2, 5, 6)."""
from __future__ import annotations

import math

import torch

from ..config import SketchWalkConfig
from .sketch import srht


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Selection math runs in fp32 (fp64 if the inputs are fp64): the b x b matrices are small."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def group_features(q: torch.Tensor, k: torch.Tensor, cfg: SketchWalkConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group query/key features used for block scoring.

    q: [Hq, n_q, d], k: [Hkv, n_k, d] -> (qf: [G, n_q, d], kf: [G, n_k, d]) in the compute dtype.
    mean_qk: G = 1, Q averaged over query heads and K over KV heads (equal to averaging the
    GQA-repeated K). sum_probs: G = Hq, each query head paired with its KV head.
    """
    dt = compute_dtype(q.dtype)
    q, k = q.to(dt), k.to(dt)
    if cfg.head_aggregation == "mean_qk":
        return q.mean(0, keepdim=True), k.mean(0, keepdim=True)
    return q, k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)


def sketch_features(x: torch.Tensor, cfg: SketchWalkConfig, layer_idx: int) -> torch.Tensor:
    """Feature-space sketch of block means: x: [..., d] -> [..., sketch_dim] (hadamard) or x itself (exact)."""
    if cfg.sketch == "exact":
        return x
    return srht(x, cfg.sketch_dim, cfg.seed, layer_idx)


def transition_rows(q_sk: torch.Tensor, k_sk: torch.Tensor, row_blocks: torch.Tensor, head_dim: int,
                    cfg: SketchWalkConfig, key_blocks_valid: int | None = None,
                    causal: torch.Tensor | None = None, sub_causal: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of the transition matrix W for the given query blocks.

    q_sk: [G, rows, r] sketched query-block features; k_sk: [G, b, r] sketched key-block means
    (with cfg.sub_blocks = f > 1: [G, nf, r] sketched key sub-block means, nf <= b * f the
    sub-blocks holding real tokens, and b = ceil(nf / f); see `coarse_softmax`);
    row_blocks: [rows] block index of each row (causal: column j <= row block).
    causal: optional precomputed [rows, b] bool mask of the causal columns (the runtime caches it;
    it must equal the one built from row_blocks and key_blocks_valid here); sub_causal: optional
    sub-block mask for f > 1 (see `coarse_softmax`).
    Returns W rows: [rows, b], each row a probability vector over its causal blocks,
    W = mean over G of softmax(s * Â), Â = q̃·k̃ / sqrt(head_dim) (softmax^s renormalised == softmax(s·Â)).
    """
    f = cfg.sub_blocks
    b = -(-k_sk.shape[-2] // f)
    if causal is None:
        cols = torch.arange(b, device=q_sk.device)
        causal = cols[None, :] <= row_blocks[:, None]
        if key_blocks_valid is not None:
            causal = causal & (cols[None, :] < key_blocks_valid)
    if f > 1:
        return coarse_softmax(block_logits(q_sk, k_sk, head_dim, cfg), f, causal, sub_causal)
    return softmax_rows(block_logits(q_sk, k_sk, head_dim, cfg).masked_fill(~causal, float("-inf")))


def current_transition_row(q_sk: torch.Tensor, k_sk: torch.Tensor, head_dim: int, cfg: SketchWalkConfig) -> torch.Tensor:
    """W row of the last query block over all b = i+1 key blocks so far (decode): [1, b].

    q_sk: [G, 1, r]; k_sk: [G, b, r]. Every column is causal, so this is transition_rows(q_sk,
    k_sk, [b-1], ...) without the (all-false) mask: the same values, fewer launches.
    """
    if cfg.sub_blocks > 1:
        b = -(-k_sk.shape[-2] // cfg.sub_blocks)
        return coarse_softmax(block_logits(q_sk, k_sk, head_dim, cfg), cfg.sub_blocks,
                              torch.ones(1, b, dtype=torch.bool, device=q_sk.device))
    return softmax_rows(block_logits(q_sk, k_sk, head_dim, cfg))


def coarse_softmax(logits: torch.Tensor, f: int, causal: torch.Tensor,
                   sub_causal: torch.Tensor | None = None) -> torch.Tensor:
    """W rows over blocks from sub-block logits: the softmax over every causal sub-block, summed per block.

    logits: [G, ..., rows, nf] (s·Â per key sub-block, nf <= b * f real sub-blocks); causal: [..., rows, b]
    bool over blocks (broadcast against the logits' dims after G); sub_causal: optional [..., rows, b * f]
    bool over sub-blocks, ANDed in (a padded batch whose current block is partly empty).
    Returns [..., rows, b], rows summing to 1: W[i, j] = sum_{u in j} softmax(logits)[i, u], i.e. the
    block's score is the log-sum-exp of its sub-blocks' (mean over G of the group rows).
    """
    b, nf = causal.shape[-1], logits.shape[-1]
    full = torch.nn.functional.pad(logits, (0, b * f - nf), value=float("-inf"))
    keep = causal.repeat_interleave(f, dim=-1)
    if sub_causal is not None:
        keep = keep & sub_causal
    p = torch.softmax(full.masked_fill(~keep, float("-inf")), dim=-1).unflatten(-1, (b, f)).sum(-1)
    return p[0] if p.shape[0] == 1 else p.mean(0)


def score_scale(head_dim: int, cfg: SketchWalkConfig) -> float:
    """The factor s / sqrt(head_dim) of the block scores s·Â (what `block_logits` applies, in the
    reference's order: the division first), for kernels that take it as one scalar."""
    return cfg.sparsity_exponent / math.sqrt(head_dim)


def block_logits(q_sk: torch.Tensor, k_sk: torch.Tensor, head_dim: int, cfg: SketchWalkConfig) -> torch.Tensor:
    """s * Â = s * q̃·k̃ / sqrt(head_dim): [G, rows, b] (this association order is the reference's)."""
    scores = torch.matmul(q_sk, k_sk.transpose(-1, -2)) / math.sqrt(head_dim)
    return cfg.sparsity_exponent * scores


def softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """[G, rows, b] masked logits (-inf outside the causal columns) -> mean over G of the row
    softmaxes: [rows, b]. Also W from per-block log-sum-exps of sub-block logits (kernels.block_logsumexp)."""
    p = torch.softmax(logits, dim=-1)
    # The mean over a single group is the value itself (x / 1): skip the launch.
    return p[0] if p.shape[0] == 1 else p.mean(0)
