"""Sketch&Walk decode on a static (preallocated) KV cache, every step on the device.

What a CUDA graph can replay: a graph runs the kernels it captured, with the shapes and the host
values of the capture, while the cache grows by one token per replay. So nothing here may depend
on a host value that changes per step. The eager decode state (`decode_state.LayerDecodeState`)
keeps its token counts, block index and buffer sizes on the host and grows its buffers; this one
holds, for a batch of B sequences on a cache of `capacity` tokens (C = ceil(capacity / block_size)
blocks), fixed-size buffers and reads the sequence lengths from a device tensor:

  qsum        [B, C, G, d]     per block the sum of its tokens' query features (G feature groups:
                               1 for mean_qk, Hq for sum_probs, as `scores.group_features`);
  ksum        [B, C*f, G, d]   the same for the keys, per key sub-block (f = cfg.sub_blocks: 1, or
                               block_size / score_block_size with sub-block scores);
  k_sk        [B, G, C*f, r]   sketched key (sub-)block means: final for completed ones, the current
                               one re-sketched every step;
  w           [B, C, C]        the transition matrix: row j over columns <= j, zeros elsewhere;
  final       [B]              rows below it are final (scored with their block-mean query).

Every row is computed over all C columns with the non-causal ones masked (-inf logits, zero walk
mass), so a step costs O(C^2) per layer for the walk product however short the sequence is: the
price of one shape for every step. The values equal the eager state's up to floating-point
reduction order (tests/test_static_decode.py); the selections are the same rule
(`selection.BlockSelector.decode`), applied to the full row.

Supported: selector sketchwalk with either head aggregation (mean_qk, sum_probs), block-mean or
sub-block (token-level) key scores, any walk, decode_query token or block_mean, one selection for
all heads, the causal budget and forced blocks in whole blocks — the paper's config and the
recommended one — and any config whose decode is dense (`phases: prefill`). The rest is refused
by `static_decode_refusal`, naming the field.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..config import SketchWalkConfig
from .batched_decode import batched_walk
from .decode_state import LayerDecodeState
from .scores import block_logits, compute_dtype, sketch_features
from .selection import BlockSelector, select_blocks


def static_decode_refusal(cfg: SketchWalkConfig) -> Optional[str]:
    """Why `cfg` cannot decode on a static cache (naming the field and what is supported), or None."""
    if not cfg.sparse_decode:
        return None  # dense decode: nothing config-specific runs per step
    checks = [
        ("selector", cfg.selector == "sketchwalk", "'sketchwalk' (or phases: prefill)"),
        ("decode_query", cfg.decode_query in ("token", "block_mean"), "'token' or 'block_mean'"),
        ("selection_heads", cfg.selection_heads == "shared", "'shared'"),
        ("budget_rule", cfg.budget_rule == "causal", "'causal'"),
        ("sink_fraction", cfg.sink_fraction is None, "null (sink_blocks sizes the sink)"),
        ("local_fraction", cfg.local_fraction is None, "null (local_blocks sizes the window)"),
    ]
    for field, ok, allowed in checks:
        if not ok:
            return (f"SketchWalkConfig.{field} = {getattr(cfg, field)!r}: decode on a static cache (CUDA graphs) "
                    f"supports {field} = {allowed}")
    return None


class StaticLayerState:
    """One sparse layer's device buffers for B sequences (see the module docstring)."""

    def __init__(self, batch: int, blocks: int, sub_blocks: int, groups: int, head_dim: int, sketch_dim: int,
                 device, dtype):
        self.qsum = torch.zeros(batch, blocks, groups, head_dim, device=device, dtype=dtype)
        self.ksum = torch.zeros(batch, blocks * sub_blocks, groups, head_dim, device=device, dtype=dtype)
        self.k_sk = torch.zeros(batch, groups, blocks * sub_blocks, sketch_dim, device=device, dtype=dtype)
        self.w = torch.zeros(batch, blocks, blocks, device=device, dtype=dtype)
        self.final = torch.zeros(batch, dtype=torch.long, device=device)


class StaticDecodeBatch:
    """The static decode state of every layer of one batch, and one decode step per layer.

    cfg: the config (`static_decode_refusal(cfg)` must be None); batch: B sequences, all of the
    same length (an unpadded batch); capacity: tokens the cache holds; head_dim: d; dtype: the
    selection math's (`scores.compute_dtype` of the model's). `pairs[layer]`
    [2] int64 accumulates the (selected, causal) query-block / key-block pairs of its steps on the
    device (`take_pairs` reads and clears them); a layer's counter is made at its first step, which
    runs eagerly before any capture.
    """

    def __init__(self, cfg: SketchWalkConfig, batch: int, capacity: int, head_dim: int, device,
                 dtype: torch.dtype = torch.float32):
        refusal = static_decode_refusal(cfg)
        if refusal:
            raise ValueError(refusal)
        self.cfg, self.batch, self.capacity, self.head_dim = cfg, batch, capacity, head_dim
        self.device = torch.device(device)
        self.blocks = -(-capacity // cfg.block_size)
        self.dtype = dtype  # the selection math's dtype (scores.compute_dtype of the model's)
        self.layers: dict[int, StaticLayerState] = {}
        self.dense_layers: set[int] = set()
        self.pairs: dict[int, torch.Tensor] = {}
        selector = BlockSelector(cfg)
        # The selection's fixed width: the widest row any step can have.
        self.width = max(selector.row_count(i) for i in range(self.blocks))
        self.cols = torch.arange(self.blocks, device=self.device)
        self.sub_cols = torch.arange(self.blocks * cfg.sub_blocks, device=self.device)
        self.batch_index = torch.arange(batch, device=self.device)
        # Token counts 0..B as device scalars: the eager state divides by these (true division).
        self.count_values = torch.arange(cfg.block_size + 1, device=self.device, dtype=self.dtype)
        self.zero_offsets = torch.zeros(batch, dtype=torch.int32, device=self.device)
        self.walk: Optional[torch.Tensor] = None  # [B, C] walk rows of the current step (the last sparse layer's)

    # -- seeding ---------------------------------------------------------------------------
    def seed_layer(self, layer: int, states: list[Optional[LayerDecodeState]]) -> StaticLayerState:
        """Buffers of `layer` from the prefill's eager states (one per sequence, same length)."""
        cfg = self.cfg
        if len(states) != self.batch or any(s is None for s in states):
            raise ValueError(f"layer {layer}: the static decode needs a prefill of all {self.batch} sequences first")
        m = states[0].n_tokens
        if any(s.n_tokens != m for s in states):
            raise ValueError("decode on a static cache takes an unpadded batch: every sequence of the same length")
        if m >= self.capacity:
            raise ValueError(f"the prompt ({m} tokens) leaves no room in a static cache of {self.capacity} tokens")
        r = self.head_dim if cfg.sketch == "exact" else cfg.sketch_dim
        f, groups = cfg.sub_blocks, states[0].qsum.shape[1]
        st = StaticLayerState(self.batch, self.blocks, f, groups, self.head_dim, r, self.device, self.dtype)
        nb = -(-m // cfg.block_size)
        nf, done = -(-m // cfg.score_block), m // cfg.score_block  # key sub-blocks holding tokens, complete ones
        for b, s in enumerate(states):
            st.qsum[b, :nb], st.ksum[b, :nf] = s.qsum[:nb], s.ksum[:nf]
            st.w[b, :nb, :nb] = s.w
            st.final[b] = s.final_rows
            if s.k_sk is not None:
                st.k_sk[b, :, :nf] = s.k_sk[:, :nf]
        if states[0].k_sk is None and done:  # as the eager state's first step: complete key sub-blocks, sketched once
            means = st.ksum[:, :done] / self.count_values[cfg.score_block]
            st.k_sk[:, :, :done] = self._sketch(means.transpose(1, 2), layer)
        self.layers[layer] = st
        return st

    # -- one step --------------------------------------------------------------------------
    def _sketch(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        return sketch_features(x, self.cfg, layer)

    def _row(self, q_sk: torch.Tensor, k_sk: torch.Tensor, last_sub: torch.Tensor) -> torch.Tensor:
        """W rows [B, C] of queries q_sk [B, G, r] over the key sub-blocks 0..last_sub[b] (k_sk:
        [B, G, C*f, r]): the softmax over the sub-blocks summed per block (`scores.coarse_softmax`; the
        plain softmax when f = 1), then the mean over the G groups (`scores.softmax_rows`)."""
        logits = block_logits(q_sk[:, :, None], k_sk, self.head_dim, self.cfg)[:, :, 0]  # [B, G, C*f]
        logits = logits.masked_fill((self.sub_cols[None, :] > last_sub[:, None])[:, None], float("-inf"))
        p = torch.softmax(logits, dim=-1)
        if self.cfg.sub_blocks > 1:
            p = p.unflatten(-1, (self.blocks, self.cfg.sub_blocks)).sum(-1)
        return p[:, 0] if p.shape[1] == 1 else p.mean(1)

    def step(self, layer: int, q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, sparse: bool,
             first_sparse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The selection of one decode step of `layer`: (indices [B, width] int32, -1 padded, ascending;
        counts [B] int32). q: [B, Hq, 1, d]; k: [B, Hkv, capacity, d] the cache with the new token
        written; lengths: [B] int64 real tokens per sequence, the new one included. A dense layer
        (`sparse` False) selects every causal block. first_sparse: this layer starts the walk."""
        cfg, bsz = self.cfg, self.batch
        t = lengths - 1  # the new token's position
        i = torch.div(t, cfg.block_size, rounding_mode="floor")  # its query block
        if layer not in self.pairs:
            self.pairs[layer] = torch.zeros(2, dtype=torch.long, device=self.device)
        if not sparse:
            self.dense_layers.add(layer)
            self.pairs[layer] += (i + 1).sum()
            idx = self.cols[None].expand(bsz, self.blocks).to(torch.int32)
            return idx, (i + 1).to(torch.int32)
        st = self.layers[layer]
        bi, f, kb = self.batch_index, cfg.sub_blocks, cfg.score_block
        qf, kf = self._features(q, k, t)  # [B, G, d] each
        u = torch.div(t, kb, rounding_mode="floor")  # the token's key sub-block
        pos = t - i * cfg.block_size  # the token's index inside its block
        # One row per sequence: a gather, one add (the eager state's `add_`, bit for bit) and a scatter.
        st.qsum[bi, i] = st.qsum[bi, i] + qf
        st.ksum[bi, u] = st.ksum[bi, u] + kf
        # A block starts: the row before it becomes final, scored with its block-mean query over the
        # complete blocks before it (the eager `_start_block`); at most one row per step. Computed
        # always, written where it applies.
        prev = (i - 1).clamp_min(0)
        starts = (pos == 0) & (st.final < i)
        q_mean = st.qsum[bi, prev] / self.count_values[cfg.block_size]
        final_row = self._row(self._sketch(q_mean, layer), st.k_sk, (prev + 1) * f - 1)
        st.w[bi, prev] = torch.where(starts[:, None], final_row, st.w[bi, prev])
        st.final.copy_(torch.where(starts, i, st.final))
        # The current row: the current key sub-block's running mean re-sketched, the query's row
        # over the sub-blocks so far.
        k_mean = st.ksum[bi, u] / self.count_values[t - u * kb + 1][:, None, None]
        query = qf if cfg.decode_query == "token" else st.qsum[bi, i] / self.count_values[pos + 1][:, None, None]
        sk = self._sketch(torch.stack([query, k_mean], dim=2), layer)  # [B, G, 2, r]
        st.k_sk[bi, :, u] = sk[:, :, 1]
        row = self._row(sk[:, :, 0], st.k_sk, u)
        st.w[bi, i] = row
        walk = batched_walk(None if first_sparse else self.walk, st.w, row, cfg)  # the same formulas
        self.walk = walk
        return self._select(layer, walk, i)

    def _features(self, q: torch.Tensor, k: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`scores.group_features` of the new token: q [B, Hq, 1, d] and the cache k [B, Hkv, cap, d]
        at positions t [B] -> (qf, kf) [B, G, d] in the compute dtype."""
        bsz, hkv, _, d = k.shape
        k_new = k.gather(2, t[:, None, None, None].expand(bsz, hkv, 1, d))[:, :, 0].to(self.dtype)
        q_new = q[:, :, 0].to(self.dtype)
        if self.cfg.head_aggregation == "mean_qk":
            return q_new.mean(1, keepdim=True), k_new.mean(1, keepdim=True)
        return q_new, k_new.repeat_interleave(q.shape[1] // hkv, dim=1)

    def _select(self, layer: int, scores: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`select_blocks` (the reference rule, which BlockSelector.decode equals) on the full rows, at
        the fixed width; the pairs counted on the device."""
        sel = select_blocks(scores, i, self.cfg, width=self.width)
        self.pairs[layer] += torch.stack([sel.counts.sum(), (i + 1).sum()])
        return sel.indices.to(torch.int32), sel.counts.to(torch.int32)

    def take_pairs(self) -> dict[int, tuple[int, int]]:
        """{layer: (selected, causal)} pairs since the last call (one device-to-host read), then zeroed."""
        if not self.pairs:
            return {}
        layers = sorted(self.pairs)
        host = torch.stack([self.pairs[layer] for layer in layers]).tolist()
        for t in self.pairs.values():
            t.zero_()
        return {layer: (s, c) for layer, (s, c) in zip(layers, host) if c}


def static_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor,
                     lengths: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """The reference attention of one decode step on a static cache (the Triton kernel's contract with
    `lengths`): q [B, Hq, 1, d] over the keys of k, v [B, Hkv, capacity, d] at positions < lengths[b]
    inside the selected blocks (indices [B, width], -1 padded; counts [B]). Returns [B, Hq, 1, d]."""
    bsz, blocks = q.shape[0], -(-k.shape[2] // block_size)
    picked = torch.zeros(bsz, blocks + 1, dtype=torch.bool, device=q.device)
    slots = torch.arange(indices.shape[1], device=q.device)[None, :] < counts[:, None].long()
    idx = torch.where(slots & (indices >= 0), indices.long(), blocks)
    picked.scatter_(1, idx, True)
    pos = torch.arange(k.shape[2], device=q.device)
    valid = picked[:, pos // block_size] & (pos[None, :] < lengths[:, None])
    dt = compute_dtype(q.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.to(dt), k.to(dt), v.to(dt), attn_mask=valid[:, None, None, :], scale=scale,
        enable_gqa=q.shape[1] != k.shape[1])
    return out.to(q.dtype)


__all__ = ["StaticDecodeBatch", "StaticLayerState", "static_attention", "static_decode_refusal"]
