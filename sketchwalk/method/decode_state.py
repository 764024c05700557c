"""Incremental per-layer decode state of one sequence (method.md, Decode / Algorithm 2).

What a decode step costs here is O(b) memory traffic plus a fixed number of small launches,
with no device->host synchronisation:
- the sketched key-block means of completed blocks never change, so they are cached and only
  the current block's mean is re-sketched (together with the current query: one SRHT call);
- token counts per block follow from the token count alone, so they live on the host (the
  divisions still divide by a device scalar, as the reference does: see `_divide`);
- W is kept as one contiguous [i+1, i+1] matrix whose last row is rewritten in place each step
  (no per-step clone), reallocated only when a new block starts;
- the decode_window queries live in a buffer written once per step (no per-step concatenation).
Every value equals what the straightforward recomputation gives (tests/test_frontend.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..config import SketchWalkConfig
from .scores import current_transition_row, sketch_features, transition_rows
from .sketch import block_sums


class LayerDecodeState:
    """Running block statistics and the cached transition matrix of one layer for one sequence.

    Holds, per block j (real-token coordinates): the sums of the group query/key features
    (qsum: [cap, G, d]; the token count of block j is min(B, n_tokens - j*B)); keys at the score
    granularity Bk = cfg.score_block (block_size unless sub-block scores are on): ksum [cap*f, G, d]
    and the sketched key (sub-)block means k_sk: [G, cap*f, r], final for completed ones; W over blocks 0..i
    (w: [i+1, i+1]; rows < final_rows are final, row i is the current row); the last
    `decode_window` query features (decode_query = window only).
    """

    def __init__(self, cfg: SketchWalkConfig, layer_idx: int, head_dim: int, qf: torch.Tensor, kf: torch.Tensor,
                 w: torch.Tensor):
        """Seed from a prefill: qf, kf: [G, m, d] group features of the real tokens; w: [nb, nb] transition matrix.

        w is not copied (the prefill's walk may alias it); the first write in place clones it.
        """
        B = cfg.block_size
        g, m, d = qf.shape
        nb = -(-m // B)
        qsum = seed_block_sums(qf, B, state_capacity(nb))
        ksum = seed_block_sums(kf, cfg.score_block, state_capacity(nb) * cfg.sub_blocks)
        window_q = qf[:, m - min(m, cfg.decode_window):] if cfg.decode_query == "window" else None
        self._seed(cfg, layer_idx, head_dim, qsum, ksum, m, window_q, w)

    @classmethod
    def from_block_sums(cls, cfg: SketchWalkConfig, layer_idx: int, head_dim: int, q_sums: torch.Tensor,
                        k_sums: torch.Tensor, m: int, window_q: Optional[torch.Tensor],
                        w: torch.Tensor) -> "LayerDecodeState":
        """Seed from a prefill's block sums (the fused front end's), without per-token features.

        q_sums, k_sums: [nb, d] (G = 1) or [nb, G, d], per block the sum of its tokens' group
        features, nb = ceil(m / block_size); m: real tokens; window_q: [G, min(m, decode_window), d]
        the last queries' group features (decode_query == "window"; else ignored, may be None);
        w: [nb, nb] transition matrix (not copied, as in __init__).
        """
        if cfg.sub_blocks != 1:
            raise ValueError("from_block_sums takes block sums: sub-block scores (score_block_size) seed from features")
        if q_sums.dim() == 2:
            q_sums, k_sums = q_sums[:, None], k_sums[:, None]
        nb, g, d = q_sums.shape
        qsum = q_sums.new_zeros(state_capacity(nb), g, d)
        ksum = k_sums.new_zeros(state_capacity(nb), g, d)
        qsum[:nb], ksum[:nb] = q_sums, k_sums
        if cfg.decode_query == "window" and (window_q is None or window_q.shape[1] != min(m, cfg.decode_window)):
            raise ValueError(f"decode_query = window needs the last min(m, decode_window) = "
                             f"{min(m, cfg.decode_window)} query features as window_q")
        state = cls.__new__(cls)
        state._seed(cfg, layer_idx, head_dim, qsum, ksum, m, window_q, w)
        return state

    def _seed(self, cfg: SketchWalkConfig, layer_idx: int, head_dim: int, qsum: torch.Tensor, ksum: torch.Tensor,
              m: int, window_q: Optional[torch.Tensor], w: torch.Tensor) -> None:
        """Common seeding: block sums qsum, ksum [cap, G, d] of m tokens, window queries [G, keep, d] or None."""
        self.cfg, self.layer_idx, self.head_dim = cfg, layer_idx, head_dim
        B = cfg.block_size
        self.qsum, self.ksum = qsum, ksum
        # Token counts 0..B as device scalars: dividing by a device tensor keeps true division
        # (a Python divisor would be turned into a multiplication by its reciprocal on CUDA).
        self._count_values = torch.arange(B + 1, device=qsum.device, dtype=qsum.dtype)
        self._f, self._kb = cfg.sub_blocks, cfg.score_block  # key sub-blocks per block, tokens per key sub-block
        self.w = w
        self._w_owned = False
        self.final_rows = m // B  # rows of complete query blocks are final
        self.k_sk: Optional[torch.Tensor] = None  # sketched on the first decode step
        self.n_tokens = m
        self._window: Optional[torch.Tensor] = None
        if cfg.decode_query == "window":
            g, keep, d = window_q.shape
            self._window = qsum.new_empty(g, 2 * cfg.decode_window, d)
            self._window[:, :keep] = window_q
            self._window_end = keep

    # -- storage ------------------------------------------------------------------------
    def _grow(self, need: int) -> None:
        """Make room for blocks 0..need-1 (capacity doubles: amortised O(1) per block)."""
        cap = self.qsum.shape[0]
        if need <= cap:
            return
        pad = max(need, 2 * cap) - cap
        kpad = pad * self._f
        self.qsum = torch.cat([self.qsum, self.qsum.new_zeros(pad, *self.qsum.shape[1:])])
        self.ksum = torch.cat([self.ksum, self.ksum.new_zeros(kpad, *self.ksum.shape[1:])])
        if self.k_sk is not None:
            g, _, r = self.k_sk.shape
            self.k_sk = torch.cat([self.k_sk, self.k_sk.new_zeros(g, kpad, r)], dim=1)

    def _divide(self, sums: torch.Tensor, count: int) -> torch.Tensor:
        """sums / count with the count as a device scalar (the reference divides by its count tensor)."""
        return sums / self._count_values[count]

    def _sketch(self, x: torch.Tensor) -> torch.Tensor:
        """[G, rows, d] -> [G, rows, r] (rows are independent: batching rows changes no value)."""
        return sketch_features(x, self.cfg, self.layer_idx)

    def _push_window(self, qf_t: torch.Tensor) -> None:
        """Append one query to the window buffer [G, 2W, d]; every W steps the last W-1 move to the front."""
        win = self.cfg.decode_window
        if self._window_end == self._window.shape[1]:
            self._window[:, :win - 1] = self._window[:, self._window_end - win + 1:]  # disjoint: 2W - W + 1 > W - 1
            self._window_end = win - 1
        self._window[:, self._window_end] = qf_t
        self._window_end += 1

    def recent_queries(self) -> torch.Tensor:
        """The queries `_window_mean` averages, in token order: [G, min(decode_window, n_tokens), d] (a view).

        decode_query = window only (the batched decode state is seeded from it).
        """
        end = self._window_end
        return self._window[:, max(0, end - self.cfg.decode_window):end]

    def _window_mean(self) -> torch.Tensor:
        """Mean of the last decode_window queries in token order: [G, d]."""
        end = self._window_end
        return self._window[:, max(0, end - self.cfg.decode_window):end].mean(1)

    # -- W ------------------------------------------------------------------------------
    def _start_block(self, i: int) -> None:
        """Block i starts: W grows to [i+1, i+1]; rows of the blocks completed since become final,
        scored with their block-mean query against the (final) sketched key means."""
        B = self.cfg.block_size
        n_old = self.w.shape[0]
        w = self.w.new_zeros(i + 1, i + 1)
        w[:n_old, :n_old] = self.w
        self.w, self._w_owned = w, True
        if self.final_rows < i:
            rows = torch.arange(self.final_rows, i, device=w.device)
            q_sk = self._sketch(self._divide(self.qsum[self.final_rows:i], B).transpose(0, 1))
            w[self.final_rows:i, :i] = transition_rows(q_sk, self.k_sk[:, :i * self._f], rows, self.head_dim, self.cfg)
            self.final_rows = i

    def current_row_query(self, qf_t: torch.Tensor) -> torch.Tensor:
        """The query feature that drives the current row, per `decode_query`: [G, d] (after `append`)."""
        mode = self.cfg.decode_query
        if mode == "token":
            return qf_t
        if mode == "block_mean":
            i = (self.n_tokens - 1) // self.cfg.block_size
            return self._divide(self.qsum[i], self.n_tokens - i * self.cfg.block_size)
        return self._window_mean()

    # -- one decode step ----------------------------------------------------------------
    def append(self, qf_t: torch.Tensor, kf_t: torch.Tensor) -> int:
        """Add one token's group features (qf_t, kf_t: [G, d]); returns its query-block index."""
        B = self.cfg.block_size
        i = self.n_tokens // B
        u = self.n_tokens // self._kb  # the token's key (sub-)block
        self._grow(i + 1)
        if self.k_sk is None:  # first step after the prefill: sketch the complete key (sub-)blocks once
            self.k_sk = self.ksum.new_zeros(self.ksum.shape[1], self.ksum.shape[0], self._sketch_dim())
            if u:
                self.k_sk[:, :u] = self._sketch(self._divide(self.ksum[:u], self._kb).transpose(0, 1))
        self.qsum[i].add_(qf_t)
        self.ksum[u].add_(kf_t)
        if self._window is not None:
            self._push_window(qf_t)
        self.n_tokens += 1
        if i + 1 > self.w.shape[0]:
            self._start_block(i)
        return i

    def _sketch_dim(self) -> int:
        return self.head_dim if self.cfg.sketch == "exact" else self.cfg.sketch_dim

    def transition_with_current_row(self, qf_t: torch.Tensor) -> torch.Tensor:
        """W^k over blocks 0..i with row i recomputed from the current query: [i+1, i+1] (after `append`).

        Also re-sketches the current key block's running mean (the query and the key mean in one
        SRHT call). The returned matrix is this state's buffer: valid until the next step.
        """
        B = self.cfg.block_size
        i = (self.n_tokens - 1) // B
        u = (self.n_tokens - 1) // self._kb
        k_mean = self._divide(self.ksum[u], self.n_tokens - u * self._kb)
        sk = self._sketch(torch.stack([self.current_row_query(qf_t), k_mean], dim=1))  # [G, 2, r]
        self.k_sk[:, u] = sk[:, 1]
        row = current_transition_row(sk[:, :1], self.k_sk[:, :u + 1], self.head_dim, self.cfg)
        if not self._w_owned:  # the prefill's W may be aliased by its walk: copy before writing
            self.w, self._w_owned = self.w.clone(), True
        self.w[i] = row[0]
        return self.w


def seed_block_sums(x: torch.Tensor, size: int, capacity: int) -> torch.Tensor:
    """x: [G, m, d] -> [capacity, G, d]: rows j < ceil(m / size) the sums of tokens [j*size, (j+1)*size),
    the rest zeros. A sum over the block's own axis, not a scatter-add: on CUDA `index_add_` is atomics
    in no fixed order (8 ms of a 32K token-level SmolLM2 prefill, more with 32 heads); a sum is
    deterministic. Its rounding differs from a token-by-token fold by ~1e-7 relative (the decode
    steps then continue the current block with `+=`)."""
    g, _, d = x.shape
    sums = block_sums(x, size)  # [G, blocks, d]; x itself at size 1 (token-level keys)
    out = x.new_zeros(capacity, g, d)
    out[:sums.shape[1]] = sums.transpose(0, 1)
    return out


def state_capacity(nb: int) -> int:
    """Initial block capacity of the running sums for a prefill of nb blocks: room for an eighth more
    (at least 16 blocks) to decode into; `_grow` doubles it when a longer generation needs more. (It
    was 2 * nb: with token-level keys that doubled the largest state an evaluation holds.)"""
    return nb + max(16, nb // 8)

