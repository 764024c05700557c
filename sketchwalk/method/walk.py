"""The walk across layers (method.md step 7)."""
from __future__ import annotations

from typing import Optional, Union

import torch

from ..config import SketchWalkConfig


def walk_update(prev_rows: Optional[torch.Tensor], w: torch.Tensor, row_blocks: Union[torch.Tensor, slice, None],
                cfg: SketchWalkConfig) -> torch.Tensor:
    """Advance the walk by one layer for the given rows.

    prev_rows: [rows, b] rows of R^{k-1} (None at the first sparse layer); w: [b, b] the full
    lower-triangular W^k; row_blocks: which rows of W the walk rows correspond to: a [rows] index
    tensor, a slice (decode: slice(i, i + 1)) or None for all rows in order (prefill). Slices and
    None select without a copy, so the result may be a view of w (walk none / first layer).
    Returns rows of R^k: [rows, b]. Only the requested rows are computed, so decode costs
    O(b^2) per layer, never O(b^3).
      product: R^k = R^{k-1} W^k
      damped:  state = R^{k-1}; `degree` times: state = (1 - β) W + β state W
      none:    R^k = W^k
    """
    if row_blocks is None:
        w_rows = w
    elif isinstance(row_blocks, slice):
        w_rows = w[row_blocks]
    else:
        w_rows = w.index_select(0, row_blocks)
    if prev_rows is None or cfg.walk == "none":
        return w_rows
    prev_rows = prev_rows.to(w.dtype)
    if cfg.walk == "product":
        return prev_rows @ w
    state = prev_rows
    for _ in range(cfg.degree):
        state = (1.0 - cfg.damping) * w_rows + cfg.damping * (state @ w)
    return state
