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
                    cfg: SketchWalkConfig, key_blocks_valid: int | None = None) -> torch.Tensor:
    """Rows of the transition matrix W for the given query blocks.

    q_sk: [G, rows, r] sketched query-block features; k_sk: [G, b, r] sketched key-block means;
    row_blocks: [rows] block index of each row (causal: column j <= row block).
    Returns W rows: [rows, b], each row a probability vector over its causal blocks,
    W = mean over G of softmax(s * Â), Â = q̃·k̃ / sqrt(head_dim) (softmax^s renormalised == softmax(s·Â)).
    """
    b = k_sk.shape[-2]
    scores = torch.matmul(q_sk, k_sk.transpose(-1, -2)) / math.sqrt(head_dim)  # [G, rows, b]
    cols = torch.arange(b, device=scores.device)
    causal = cols[None, :] <= row_blocks[:, None]
    if key_blocks_valid is not None:
        causal = causal & (cols[None, :] < key_blocks_valid)
    logits = (cfg.sparsity_exponent * scores).masked_fill(~causal, float("-inf"))
    return torch.softmax(logits, dim=-1).mean(0)
