"""Reference attention over selected blocks (method.md step 9) and dense attention, one sequence at a time."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .selection import BlockSelection


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """mask: [n_q, n_k] for all heads, or [Hkv, n_q, n_k] per KV head (repeated over its query heads)."""
    if mask.dim() == 3:
        mask = mask.repeat_interleave(q.shape[0] // k.shape[0], dim=0)[None]
    else:
        mask = mask[None, None]
    # GQA without repeat_kv copies where SDPA supports it.
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[0] != k.shape[0])[0]


def token_mask(q_pos: torch.Tensor, n_keys: int, selection: Optional[BlockSelection], row_of_query: Optional[torch.Tensor]) -> torch.Tensor:
    """Token-level mask [n_q, n_keys] ([Hkv, n_q, n_keys] for a per-KV-head selection): causal (key
    pos <= query pos) and, if given, inside the selected blocks.

    q_pos: [n_q] real positions of the queries; row_of_query: [n_q] selection row of each query.
    """
    k_pos = torch.arange(n_keys, device=q_pos.device)
    mask = k_pos[None, :] <= q_pos[:, None]
    if selection is not None:
        nb = -(-n_keys // selection.block_size)
        blocks = selection.dense_block_mask(nb)[..., row_of_query, :]  # [(Hkv,) n_q, nb]
        mask = mask & blocks[..., k_pos // selection.block_size]
    return mask


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                     selection: Optional[BlockSelection], scale: float) -> torch.Tensor:
    """Attention of queries over the keys of their selected blocks with exact token-level causal masking.

    q: [Hq, n_q, d]; k, v: [Hkv, n_k, d] (real tokens only, position j at index j);
    q_pos: [n_q] real positions; selection rows are query blocks, row of a query = its block
    matched against selection.row_blocks. selection None means dense causal attention.
    Returns [Hq, n_q, d] in q's dtype.
    """
    row_of_query = None
    if selection is not None:
        qb = q_pos // selection.block_size
        # rows are sorted by block index; map each query to the row holding its block
        row_of_query = torch.searchsorted(selection.row_blocks, qb)
    mask = token_mask(q_pos, k.shape[-2], selection, row_of_query)
    return _sdpa(q, k, v, mask, scale)
