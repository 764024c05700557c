"""Block selection (method.md step 8) and its container, `BlockSelection`."""
from __future__ import annotations

import dataclasses

import torch

from ..config import SketchWalkConfig


@dataclasses.dataclass
class BlockSelection:
    """Which key blocks each query-block row attends to; one selection shared by all heads.

    Contract (what kernels rely on):
      indices: [rows, max_count] int64, key-block indices in ascending order; entries at
               positions >= counts[row] are -1 and must never be read.
      counts:  [rows] int64, number of valid entries per row (>= 1: the diagonal block is always kept).
      row_blocks: [rows] int64, the query-block index of each row (causal limit: indices <= row_blocks).
      block_size: tokens per block; block j covers real positions [j*B, (j+1)*B).
    Block indices are in the sequence's real-token coordinates (left padding is not counted).
    """

    indices: torch.Tensor
    counts: torch.Tensor
    row_blocks: torch.Tensor
    block_size: int

    def dense_block_mask(self, num_key_blocks: int) -> torch.Tensor:
        """Boolean [rows, num_key_blocks], True where the row selected the key block."""
        rows = self.indices.shape[0]
        mask = torch.zeros(rows, num_key_blocks + 1, dtype=torch.bool, device=self.indices.device)
        # -1 padding lands in the extra last column, which is then dropped.
        idx = torch.where(self.indices >= 0, self.indices, torch.full_like(self.indices, num_key_blocks))
        mask.scatter_(1, idx, True)
        return mask[:, :num_key_blocks]

    def selected_pairs(self) -> torch.Tensor:
        """Number of (query-block, key-block) pairs computed: scalar tensor."""
        return self.counts.sum()

    def causal_pairs(self) -> torch.Tensor:
        """Number of causal (query-block, key-block) pairs for these rows: scalar tensor."""
        return (self.row_blocks + 1).sum()


def select_blocks(scores: torch.Tensor, row_blocks: torch.Tensor, cfg: SketchWalkConfig) -> BlockSelection:
    """Pick key blocks per row from walk scores.

    scores: [rows, b] walk scores R^k (any real values; only causal columns are considered);
    row_blocks: [rows] query-block index of each row.
    Always keeps the sink blocks (0 .. sink_blocks-1) and the local blocks (the diagonal and the
    local_blocks-1 before it), then fills up to τ with the highest-scoring remaining causal blocks
    (ties go to the lower block index). A row with at most τ causal blocks is dense.
    """
    rows, b = scores.shape
    device = scores.device
    cols = torch.arange(b, device=device)
    rb = row_blocks.to(device=device, dtype=torch.long)
    causal = cols[None, :] <= rb[:, None]
    forced = causal & ((cols[None, :] < cfg.sink_blocks) | (cols[None, :] > rb[:, None] - cfg.local_blocks))
    n_causal = rb + 1
    if cfg.top_k is not None:
        tau = torch.full_like(rb, cfg.top_k)
    else:
        tau = torch.ceil(n_causal.to(torch.float64) * cfg.density - 1e-9).long().clamp_min(1)
    counts = torch.minimum(n_causal, torch.maximum(tau, forced.sum(-1)))
    inf = torch.tensor(float("inf"), dtype=scores.dtype, device=device)
    key = torch.where(forced, inf, torch.where(causal, scores, -inf))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    max_count = int(counts.max().item()) if rows else 0
    top = order[:, :max_count]
    keep = torch.arange(max_count, device=device)[None, :] < counts[:, None]
    # Sort kept indices ascending; invalid slots sort last via the sentinel b, then become -1.
    top = torch.where(keep, top, torch.full_like(top, b)).sort(dim=-1).values
    top = torch.where(top == b, torch.full_like(top, -1), top)
    return BlockSelection(indices=top, counts=counts, row_blocks=rb, block_size=cfg.block_size)
