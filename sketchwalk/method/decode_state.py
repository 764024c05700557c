"""Incremental per-layer decode state of one sequence (method.md, Decode / Algorithm 2)."""
from __future__ import annotations

import torch

from ..config import SketchWalkConfig
from .scores import sketch_features, transition_rows


class LayerDecodeState:
    """Running block statistics and the cached transition matrix of one layer for one sequence.

    Holds, per block j (real-token coordinates): the sums of the group query/key features
    (qsum, ksum: [cap, G, d]) and the token count; the cached rows of W ([cap, cap]) for
    completed query blocks; the last `decode_window` query features ([G, <=W, d]).
    """

    def __init__(self, cfg: SketchWalkConfig, layer_idx: int, head_dim: int, qf: torch.Tensor, kf: torch.Tensor,
                 w: torch.Tensor):
        """Seed from a prefill: qf, kf: [G, m, d] group features of the real tokens; w: [nb, nb] transition matrix."""
        self.cfg, self.layer_idx, self.head_dim = cfg, layer_idx, head_dim
        B = cfg.block_size
        g, m, d = qf.shape
        nb = -(-m // B)
        cap = max(16, 2 * nb)
        self.qsum = qf.new_zeros(cap, g, d)
        self.ksum = kf.new_zeros(cap, g, d)
        self.counts = torch.zeros(cap, dtype=qf.dtype, device=qf.device)
        blk = torch.arange(m, device=qf.device) // B
        self.qsum.index_add_(0, blk, qf.transpose(0, 1))
        self.ksum.index_add_(0, blk, kf.transpose(0, 1))
        self.counts.index_add_(0, blk, torch.ones(m, dtype=qf.dtype, device=qf.device))
        self.w = w.new_zeros(cap, cap)
        self.w[:nb, :nb] = w
        self.final_rows = m // B  # rows of complete query blocks are final
        self.window = qf[:, -cfg.decode_window:]
        self.n_tokens = m

    def _grow(self, need: int) -> None:
        cap = self.qsum.shape[0]
        if need <= cap:
            return
        new = max(need, 2 * cap)
        pad = new - cap
        self.qsum = torch.cat([self.qsum, self.qsum.new_zeros(pad, *self.qsum.shape[1:])])
        self.ksum = torch.cat([self.ksum, self.ksum.new_zeros(pad, *self.ksum.shape[1:])])
        self.counts = torch.cat([self.counts, self.counts.new_zeros(pad)])
        w = self.w.new_zeros(new, new)
        w[:cap, :cap] = self.w
        self.w = w

    def _sketched_key_means(self, upto: int) -> torch.Tensor:
        """Sketched key-block means of blocks 0..upto-1: [G, upto, r]."""
        means = self.ksum[:upto] / self.counts[:upto, None, None]
        return sketch_features(means.transpose(0, 1), self.cfg, self.layer_idx)

    def append(self, qf_t: torch.Tensor, kf_t: torch.Tensor) -> int:
        """Add one token's group features (qf_t, kf_t: [G, d]); returns its query-block index."""
        i = self.n_tokens // self.cfg.block_size
        self._grow(i + 1)
        self.qsum[i] += qf_t
        self.ksum[i] += kf_t
        self.counts[i] += 1
        self.window = torch.cat([self.window, qf_t[:, None]], dim=1)[:, -self.cfg.decode_window:]
        self.n_tokens += 1
        # Rows of blocks completed since the last step become final, scored with their block-mean query.
        if self.final_rows < i:
            rows = torch.arange(self.final_rows, i, device=self.w.device)
            q_means = self.qsum[self.final_rows:i] / self.counts[self.final_rows:i, None, None]
            q_sk = sketch_features(q_means.transpose(0, 1), self.cfg, self.layer_idx)
            self.w[self.final_rows:i, :i] = transition_rows(q_sk, self._sketched_key_means(i), rows, self.head_dim, self.cfg)
            self.final_rows = i
        return i

    def current_row_query(self, qf_t: torch.Tensor) -> torch.Tensor:
        """The query feature that drives the current row, per `decode_query`: [G, d]."""
        mode = self.cfg.decode_query
        if mode == "token":
            return qf_t
        if mode == "block_mean":
            i = (self.n_tokens - 1) // self.cfg.block_size
            return self.qsum[i] / self.counts[i]
        return self.window.mean(1)

    def transition_with_current_row(self, qf_t: torch.Tensor) -> torch.Tensor:
        """W^k over blocks 0..i with row i recomputed from the current query: [i+1, i+1]."""
        i = (self.n_tokens - 1) // self.cfg.block_size
        q_sk = sketch_features(self.current_row_query(qf_t)[:, None], self.cfg, self.layer_idx)  # [G, 1, r]
        row = transition_rows(q_sk, self._sketched_key_means(i + 1), torch.tensor([i], device=self.w.device),
                              self.head_dim, self.cfg)
        w = self.w[: i + 1, : i + 1].clone()
        w[i] = row[0]
        return w
