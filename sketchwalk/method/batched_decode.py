"""The decode front end for a whole left-padded batch at once (method.md, Decode / Algorithm 2).

The per-sequence path (`LayerDecodeState` + `walk_update` + `BlockSelector.decode`, driven by
`SketchWalkRuntime._decode_select`) issues a fixed set of ~70 small launches per layer *and
sequence*: a batch of B sequences pays B times that. Here one layer's decode step for the whole
batch is one set of launches whose number does not depend on B. Sequences keep their own real
lengths (left padding: sequence b has n_b real tokens, its current query block is
i_b = (n_b - 1) // block_size), so every row is padded to a common block capacity `cap` and
masked to its own causal blocks 0..i_b.

- `DecodeBatch` (one per batch, rebuilt by every prefill): the capacity, the `StepPlan` of the
  current step and each layer's `BatchedDecodeState`.
- `StepPlan`: everything of a step that depends on the sequence lengths alone, shared by all
  layers of the step: host lists (i_b, tokens in block i_b, row counts) and their device
  tensors and masks (one host->device copy per step, non-blocking from pinned memory on CUDA;
  no device->host synchronisation at all).
- `BatchedDecodeState`: one layer's running statistics, padded: block sums [V, cap, 2, d],
  sketched key-block means [V, cap, r], W [B, cap, cap], the decode_window queries [V, 2W, d];
  seeded from the prefill's per-sequence `LayerDecodeState`s at the first decode step. V = B * G
  feature rows, row b * G + g holding group g of sequence b (mean_qk: G = 1; sum_probs: G = Hq,
  whose per-group softmax rows are averaged into each sequence's W row, as `transition_rows` does).
- `batched_walk`, `select_rows`: the walk row and the selection of every sequence at once;
  `BatchedSelection` carries what the Triton decode kernel takes (indices [B, max_count],
  counts [B]) and per-sequence `BlockSelection` views for the reference attention.

Equivalence with the per-sequence path: each step performs the same operations in the same
order (sums in token order, the same divisors, the same SRHT, `transition_rows`, the walk
formulas, a stable descending sort with ties to the lower block), only on padded rows.
Elementwise work (sums, means, sketches) is bit-identical. Softmax and the matmuls run over
`cap` columns instead of i_b + 1, and CPU vector units / BLAS / GPU kernels group the terms of
a sum by the width, so W and walk values can differ from the per-sequence ones in the last bit;
selections then agree unless two candidate blocks tie to the last bit (on a GPU the model's own
batched matmuls already differ from batch-1 runs by more).

The baseline selectors (oracle, random, streaming; method/baselines.py) keep no state: their
batched decode scores come from `baselines.batched_decode_scores` and go through the same
`select_rows`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from ..config import SketchWalkConfig
from .decode_state import LayerDecodeState, state_capacity
from .scores import sketch_features, transition_rows
from .selection import BlockSelection, BlockSelector


def feature_groups(cfg: SketchWalkConfig, num_heads: int) -> int:
    """G, the feature groups per sequence: 1 for mean_qk, the query heads for sum_probs."""
    return 1 if cfg.head_aggregation == "mean_qk" else num_heads


def batch_capacity(blocks: int) -> int:
    """Block capacity for `blocks` blocks: some room to decode into (W is [B, cap, cap], so no doubling)."""
    return blocks + max(16, blocks // 8)


def _out_of_sync(layer_idx: int, cache_tokens, state_tokens) -> RuntimeError:
    """The per-sequence path's error for a decode step whose state does not match the KV cache."""
    return RuntimeError(f"SketchWalk decode state of layer {layer_idx} is out of sync with the KV cache (cache has "
                        f"{cache_tokens} earlier tokens, state has {state_tokens}); start sequences with a prefill")


def _device_ints(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """Host ints -> int64 tensor on `device` without a synchronising copy (pinned + non_blocking on CUDA)."""
    host = torch.tensor(rows, dtype=torch.long, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


# --------------------------------------------------------------------------------------
# One step of the batch
# --------------------------------------------------------------------------------------

class StepPlan:
    """What one decode step of the batch needs that depends only on the sequence lengths.

    n: real tokens per sequence, the new one included. groups: G feature rows per sequence (the
    `v*` tensors repeat the per-sequence ones G times for the V = B * G feature rows; G = 1 shares them). Host: `blocks` (i_b), `in_block` (tokens
    of block i_b), `counts` (blocks the row selects), `started` (the new token opens block i_b).
    Device (B = batch, cap = block capacity): `batch` [B] arange, `block` [B] i_b, `divisor` [B]
    tokens of block i_b as floats, `count_values` [block_size + 1] counts as floats (dividing by
    a device tensor keeps true division, as `LayerDecodeState` does), `causal` [B, cap]
    (block <= i_b), `free` [B, cap] (causal, neither sink nor local: competes on its score),
    `fill` [B, cap] (+inf forced, -inf not causal), `drop` [B, max_count] (slot >= count),
    `row_counts` [B] in the index dtype.
    """

    def __init__(self, selector: BlockSelector, n: tuple[int, ...], cap: int, device: torch.device,
                 dtype: torch.dtype, index_dtype: torch.dtype, groups: int = 1):
        cfg = selector.cfg
        bs = cfg.block_size
        self.key = (n, cap, device, dtype, index_dtype, groups)
        self.groups = groups
        self.selector, self.n, self.cap, self.dtype, self.index_dtype = selector, n, cap, dtype, index_dtype
        self.blocks = [(m - 1) // bs for m in n]
        self.in_block = [m - i * bs for m, i in zip(n, self.blocks)]
        self.started = [c == 1 for c in self.in_block]
        self.counts = [selector.row_count(i, m) for i, m in zip(self.blocks, n)]
        self.max_count = max(self.counts)
        self.selected_pairs = sum(self.counts)
        self.causal_pairs = sum(i + 1 for i in self.blocks)

        sizes = [selector.sizes(m) for m in n]  # (sink, local) per sequence: fixed unless length-dependent
        dev = _device_ints([self.blocks, self.in_block, self.counts, [s for s, _ in sizes], [l for _, l in sizes]], device)
        self.batch = selector.arange(len(n), device)
        self.block = dev[0]
        self.count_values = selector.arange(bs + 1, device, dtype)
        self.divisor = self.count_values[dev[1]]
        self.row_counts = dev[2].to(index_dtype)
        cols = selector.arange(cap, device)
        self.causal = cols[None, :] <= self.block[:, None]
        # Forced = sinks [0, sink) and locals (i - local, i]: the free blocks are [sink, i - local].
        self.free = (cols[None, :] >= dev[3][:, None]) & (cols[None, :] <= (self.block - dev[4])[:, None])
        self.fill = torch.full((len(n), cap), float("inf"), dtype=dtype, device=device).masked_fill_(
            ~self.causal, float("-inf"))
        self.drop = selector.arange(self.max_count, device)[None, :] >= self.row_counts[:, None]
        self._previous: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._masks: dict[tuple[bool, ...], torch.Tensor] = {}
        # Feature rows: V = B * G, row b * G + g (sequence b, group g).
        self.vbatch = self.batch if groups == 1 else selector.arange(len(n) * groups, device)
        self.vblock = self._rows_of(self.block)
        self.vdivisor = self._rows_of(self.divisor)
        self.vcausal = self._rows_of(self.causal)
        # Sub-block scores (cfg.sub_blocks = f > 1): keys live at score_block granularity, so the
        # current key sub-block u_b, its token count and the sub-block columns holding real tokens.
        self.sub_causal: Optional[torch.Tensor] = None
        if cfg.sub_blocks > 1:
            kb, f = cfg.score_block, cfg.sub_blocks
            sub = [(m - 1) // kb for m in n]
            dsub = _device_ints([sub, [m - u * kb for m, u in zip(n, sub)]], device)
            self.vsub = self._rows_of(dsub[0])
            self.vsubdivisor = self._rows_of(self.count_values[dsub[1]])
            fine = selector.arange(cap * f, device)
            self.sub_causal = self._rows_of(fine[None, :] <= dsub[0][:, None])

    def _rows_of(self, x: torch.Tensor) -> torch.Tensor:
        """A per-sequence tensor [B, ...] repeated for the feature rows: [V, ...] (itself when G = 1)."""
        return x if self.groups == 1 else x.repeat_interleave(self.groups, dim=0)

    def group_mean(self, rows: torch.Tensor) -> torch.Tensor:
        """Feature rows [V, cap] -> per-sequence rows [B, cap]: the mean over each sequence's G groups."""
        return rows if self.groups == 1 else rows.view(-1, self.groups, rows.shape[-1]).mean(1)

    def previous_sub_causal(self) -> Optional[torch.Tensor]:
        """[V, cap * f] the sub-blocks of blocks 0..i_b - 1 (all complete) when f > 1, else None."""
        if self.sub_causal is None:
            return None
        f = self.selector.cfg.sub_blocks
        fine = self.selector.arange(self.cap * f, self.block.device)
        return self._rows_of(fine[None, :] < (self.block * f)[:, None])

    def previous(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(j [V], causal [V, cap]) per feature row: the block before i_b (clamped at 0) and its causal
        columns (cached)."""
        if self._previous is None:
            j = (self.block - 1).clamp_min(0)
            self._previous = (self._rows_of(j), self._rows_of(self.selector.arange(self.cap, j.device)[None, :] <= j[:, None]))
        return self._previous

    def mask(self, flags: Sequence[bool]) -> torch.Tensor:
        """A [B] bool device mask of host flags; the common one (flags == started) costs no copy."""
        flags = tuple(flags)
        m = self._masks.get(flags)
        if m is None:
            if list(flags) == self.started:
                m = self.divisor == 1  # tokens in block i_b == 1: the block just started
            else:
                m = _device_ints([list(flags)], self.block.device)[0].bool()
            self._masks[flags] = m
        return m


# --------------------------------------------------------------------------------------
# One layer's state
# --------------------------------------------------------------------------------------

class BatchedDecodeState:
    """Running block statistics and W of one layer for a batch, padded to the block capacity.

    V = B * G feature rows (row b * G + g: group g of sequence b; see StepPlan).
    sums: [V, cap, 2, d], per block the sum of the group query (slot 0) and key (slot 1) features
    of its real tokens; k_sk: [V, cap, r] sketched key-block means (final for blocks < i_b, block
    i_b re-sketched every step, the rest unused); w: [B, cap, cap] W of each sequence over its
    blocks 0..i_b (rows < final_rows[b] final, row i_b the current row, everything else zero, so
    a walk row that is zero past i_b stays so); window: [V, 2W, d] the last decode_window queries
    of each feature row, right-aligned at the shared `window_end` (decode_query = window only).
    n, final_rows: host lists per sequence. With sub-block scores (f = cfg.sub_blocks > 1) the keys
    live at sub-block granularity: ksub [V, cap * f, d] their sums and k_sk [V, cap * f, r] their
    sketched means (the key slot of `sums` is then unused).
    """

    def __init__(self, cfg: SketchWalkConfig, layer_idx: int, head_dim: int, sums: torch.Tensor,
                 k_sk: torch.Tensor, w: torch.Tensor, n: tuple[int, ...], final_rows: list[int],
                 window: Optional[torch.Tensor], groups: int = 1, ksub: Optional[torch.Tensor] = None):
        self.cfg, self.layer_idx, self.head_dim, self.groups = cfg, layer_idx, head_dim, groups
        self.sums, self.k_sk, self.w = sums, k_sk, w
        self.ksub = ksub
        self.n, self.final_rows = n, final_rows
        self.window = window
        self.window_end = cfg.decode_window

    @classmethod
    def from_states(cls, states: Sequence[LayerDecodeState], plan: StepPlan) -> "BatchedDecodeState":
        """Gather the per-sequence states of one layer (as the prefill left them, or later) into one.

        A one-off per batch and layer: a few copies per sequence.
        """
        first = states[0]
        cfg, bs, cap = first.cfg, first.cfg.block_size, plan.cap
        g, d = first.qsum.shape[-2:]
        sums = first.qsum.new_zeros(len(states) * g, cap, 2, d)
        w = first.qsum.new_zeros(len(states), cap, cap)
        for b, st in enumerate(states):
            nb = -(-st.n_tokens // bs)
            if g == 1:
                sums[b, :nb, 0], sums[b, :nb, 1] = st.qsum[:nb, 0], st.ksum[:nb, 0]
            else:
                sums[b * g:(b + 1) * g, :nb, 0] = st.qsum[:nb].transpose(0, 1)
                sums[b * g:(b + 1) * g, :nb, 1] = st.ksum[:nb].transpose(0, 1)
            rows = st.w.shape[0]
            w[b, :rows, :rows] = st.w
        # The sketch of a complete block's key mean is what the per-sequence state caches for it
        # (the same sums and divisor); other rows are overwritten (block i_b) or masked before use.
        ksub = None
        if cfg.sub_blocks > 1:  # keys per sub-block, as the per-sequence states hold them
            f, kb = cfg.sub_blocks, cfg.score_block
            ksub = first.ksum.new_zeros(len(states) * g, cap * f, d)
            for b, st in enumerate(states):
                nf = -(-st.n_tokens // kb)
                ksub[b * g:(b + 1) * g, :nf] = st.ksum[:nf].transpose(0, 1)
            k_sk = sketch_features(ksub / plan.count_values[kb], cfg, first.layer_idx)
        else:
            k_sk = sketch_features(sums[:, :, 1] / plan.count_values[bs], cfg, first.layer_idx)
        window = None
        if cfg.decode_query == "window":
            win = cfg.decode_window
            window = sums.new_zeros(len(states) * g, 2 * win, d)
            for b, st in enumerate(states):
                recent = st.recent_queries()  # [G, min(W, n_b), d]
                window[b * g:(b + 1) * g, win - recent.shape[1]:win] = recent
        return cls(cfg, first.layer_idx, first.head_dim, sums, k_sk, w, tuple(st.n_tokens for st in states),
                   [st.final_rows for st in states], window, g, ksub)

    # -- storage ------------------------------------------------------------------------
    def _grow(self, cap: int) -> None:
        """Make room for `cap` blocks (zero-padded: new rows and columns are not causal for anyone yet)."""
        old = self.w.shape[-1]
        if cap <= old:
            return
        bsz, rows, f = self.w.shape[0], self.sums.shape[0], self.cfg.sub_blocks
        sums = self.sums.new_zeros(rows, cap, *self.sums.shape[2:])
        k_sk = self.k_sk.new_zeros(rows, cap * f, self.k_sk.shape[-1])
        w = self.w.new_zeros(bsz, cap, cap)
        sums[:, :old], k_sk[:, :old * f], w[:, :old, :old] = self.sums, self.k_sk, self.w
        self.sums, self.k_sk, self.w = sums, k_sk, w
        if self.ksub is not None:
            ksub = self.ksub.new_zeros(rows, cap * f, self.ksub.shape[-1])
            ksub[:, :old * f] = self.ksub
            self.ksub = ksub

    def _sketch(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d] -> [..., r] (rows are independent: batching them changes no value)."""
        return sketch_features(x, self.cfg, self.layer_idx)

    def _rows(self, plan: StepPlan, q_sk: torch.Tensor, causal: torch.Tensor,
              sub_causal: Optional[torch.Tensor] = None) -> torch.Tensor:
        """W rows of each sequence from its query sketches q_sk [V, 1, r] over the causal columns [V, cap]: [B, cap].

        The feature rows are `transition_rows`' row axis under a single group, so the scores, the
        mask and the softmax are that function's; the mean over a sequence's G groups follows.
        sub_causal [V, cap * f]: the key sub-blocks holding real tokens (sub-block scores only).
        """
        sub = None if sub_causal is None else sub_causal[:, None]
        rows = transition_rows(q_sk[None], self.k_sk[None], None, self.head_dim, self.cfg, causal=causal[:, None],
                               sub_causal=sub)[:, 0]
        return plan.group_mean(rows)

    def _push_window(self, qf: torch.Tensor) -> None:
        """Append one query per sequence (qf: [B, d]); every W steps the last W-1 move to the front
        (as `LayerDecodeState._push_window`, with one end shared by the batch)."""
        win = self.cfg.decode_window
        if self.window_end == self.window.shape[1]:
            self.window[:, :win - 1] = self.window[:, self.window_end - win + 1:]  # disjoint: W + 1 > W - 1
            self.window_end = win - 1
        self.window[:, self.window_end] = qf
        self.window_end += 1

    def _window_mean(self) -> torch.Tensor:
        """Mean of each feature row's last min(decode_window, n_b) queries: [V, d]."""
        win, end, g = self.cfg.decode_window, self.window_end, self.groups
        lengths = [min(win, m) for m in self.n]
        if min(lengths) == win:
            return self.window[:, end - win:end].mean(1)
        # A prompt shorter than the window: a sum over the zero-padded window would round
        # differently from the per-sequence mean, so these steps (< W of them) average per sequence.
        return torch.cat([self.window[b * g:(b + 1) * g, end - length:end].mean(1) for b, length in enumerate(lengths)])

    # -- one decode step ----------------------------------------------------------------
    def step(self, plan: StepPlan, qf: torch.Tensor, kf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append one token per sequence and rebuild the current W rows; qf, kf: [V, d] group features
        (feature row b * G + g: group g of sequence b).

        Returns (w [B, cap, cap], row [B, cap]): W after the step and its current rows w[b, i_b].
        The returned w is this state's buffer: valid until the next step.
        """
        if self.n != tuple(m - 1 for m in plan.n):
            raise _out_of_sync(self.layer_idx, [m - 1 for m in plan.n], list(self.n))
        self._grow(plan.cap)
        cur = self.sums[plan.vbatch, plan.vblock] + torch.stack([qf, kf], dim=1)  # [V, 2, d]: block i_b's sums
        self.sums[plan.vbatch, plan.vblock] = cur
        if self.window is not None:
            self._push_window(qf)
        self.n = plan.n
        # A new block completes the previous one's row, unless a prefill that ended on the boundary
        # already did (LayerDecodeState._start_block's final_rows < i).
        finalise = [s and i > f for s, i, f in zip(plan.started, plan.blocks, self.final_rows)]
        if any(finalise):
            self._finalise(plan, plan.mask(finalise))
            self.final_rows = [i if f else r for i, f, r in zip(plan.blocks, finalise, self.final_rows)]
        means = cur / plan.vdivisor[:, None, None]  # block i_b's query mean and key mean
        mode = self.cfg.decode_query
        query = qf if mode == "token" else means[:, 0] if mode == "block_mean" else self._window_mean()
        if self.ksub is None:
            k_mean, k_at = means[:, 1], plan.vblock
        else:  # the current key sub-block u_b instead of the block
            k_cur = self.ksub[plan.vbatch, plan.vsub] + kf
            self.ksub[plan.vbatch, plan.vsub] = k_cur
            k_mean, k_at = k_cur / plan.vsubdivisor[:, None], plan.vsub
        sk = self._sketch(torch.stack([query, k_mean], dim=1))  # [V, 2, r]: one SRHT call for both
        self.k_sk[plan.vbatch, k_at] = sk[:, 1]
        row = self._rows(plan, sk[:, :1], plan.vcausal, plan.sub_causal)
        self.w[plan.batch, plan.block] = row
        return self.w, row

    def _finalise(self, plan: StepPlan, mask: torch.Tensor) -> None:
        """Rows j = i_b - 1 of the sequences in `mask` ([B] bool: their block j just completed) become
        final, scored with block j's mean query against the final key sketches of blocks 0..j."""
        vj, causal = plan.previous()
        q_mean = self.sums[plan.vbatch, vj, 0] / plan.count_values[self.cfg.block_size]  # [V, d]
        rows = self._rows(plan, self._sketch(q_mean[:, None]), causal, plan.previous_sub_causal())
        j = vj if plan.groups == 1 else vj[::plan.groups]
        self.w[plan.batch, j] = torch.where(mask[:, None], rows, self.w[plan.batch, j])


# --------------------------------------------------------------------------------------
# Walk and selection
# --------------------------------------------------------------------------------------

def batched_walk(prev: Optional[torch.Tensor], w: torch.Tensor, row: torch.Tensor,
                 cfg: SketchWalkConfig) -> torch.Tensor:
    """`walk_update` of one current row per sequence: R^k rows [B, cap].

    prev: [B, cap] R^{k-1} rows (None at the first sparse layer), zero past each row's block;
    w: [B, cap, cap] W^k; row: [B, cap] the current rows w[b, i_b]. Same formulas:
      product: r = prev W;  damped: `degree` times state = (1 - β) row + β state W;  none: row.
    """
    if prev is None or cfg.walk == "none":
        return row
    prev = prev.to(w.dtype)
    if cfg.walk == "product":
        return torch.bmm(prev[:, None], w)[:, 0]
    state = prev
    for _ in range(cfg.degree):
        state = (1.0 - cfg.damping) * row + cfg.damping * torch.bmm(state[:, None], w)[:, 0]
    return state


@dataclasses.dataclass
class BatchedSelection:
    """The selected key blocks of one decode step, one row per sequence (the decode kernel's layout).

    indices: [B, max_count] ascending block indices, -1 past counts[b] ([B, Hkv, max_count] per KV
    head); counts: [B]; both in the index dtype (int32 for the kernels). blocks, widths: host lists of each row's query block and count.
    """

    indices: torch.Tensor
    counts: torch.Tensor
    blocks: list[int]
    widths: list[int]
    selector: BlockSelector

    def per_sequence(self) -> list[BlockSelection]:
        """Per-sequence `BlockSelection`s (views), as `BlockSelector.decode` returns them."""
        device, bs = self.indices.device, self.selector.cfg.block_size
        per_head = self.indices.dim() == 3
        return [BlockSelection(indices=self.indices[b, :, None, :width] if per_head else self.indices[b:b + 1, :width],
                               counts=self.counts[b:b + 1],
                               row_blocks=self.selector.arange(i + 1, device)[i:], block_size=bs)
                for b, (i, width) in enumerate(zip(self.blocks, self.widths))]


def select_rows(plan: StepPlan, scores: torch.Tensor) -> BatchedSelection:
    """Selection of every sequence's current row from its walk row, scores: [B, cap] ([B, Hkv, cap]
    for one selection per KV head: indices [B, Hkv, max_count]).

    As `select_blocks`: forced blocks first (+inf), then the free blocks by score in a stable
    descending sort (ties to the lower block), the first counts[b] kept, in ascending order.
    """
    per_head = scores.dim() == 3
    free, fill, drop = ((x[:, None] for x in (plan.free, plan.fill, plan.drop)) if per_head
                        else (plan.free, plan.fill, plan.drop))
    key = torch.where(free, scores, fill)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :plan.max_count]
    # Kept slots ascending; dropped ones sort last via the sentinel cap, exactly the `drop` slots.
    top = torch.where(drop, plan.cap, order).sort(dim=-1).values.masked_fill_(drop.expand_as(order), -1)
    return BatchedSelection(indices=top.to(plan.index_dtype), counts=plan.row_counts, blocks=plan.blocks,
                            widths=plan.counts, selector=plan.selector)


def dense_rows(offsets: torch.Tensor, kv_len: int, max_blocks: int, selector: BlockSelector
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every causal block of each sequence's decode row, for the kernel: indices [B, max_blocks], counts [B] (int32).

    offsets: [B] int32 left-padding lengths on the device (sequence b has kv_len - offsets[b] real tokens).
    """
    bs = selector.cfg.block_size
    counts = (kv_len + bs - 1 - offsets) // bs
    ar = selector.arange(max_blocks, offsets.device, torch.int32)
    return torch.where(ar[None, :] < counts[:, None], ar, -1), counts


# --------------------------------------------------------------------------------------
# The batch
# --------------------------------------------------------------------------------------

class DecodeBatch:
    """Decode state of one batch between two prefills: block capacity, the current step's plan, layer states."""

    def __init__(self, selector: BlockSelector, bsz: int, groups: int = 1):
        self.selector, self.bsz, self.groups = selector, bsz, groups
        self.cap = 0
        self.layers: dict[int, BatchedDecodeState] = {}
        self._plan: Optional[StepPlan] = None

    def plan(self, n: tuple[int, ...], device: torch.device, dtype: torch.dtype,
             index_dtype: torch.dtype) -> StepPlan:
        """The plan of the step where sequence b has n[b] real tokens (built once, shared by the layers).

        The capacity grows here, before any layer's step, so every layer (and the walk) of a step has the same.
        """
        need = (max(n) - 1) // self.selector.cfg.block_size + 1  # blocks 0..max i_b
        if need > self.cap:
            self.cap = batch_capacity(need)
        plan = self._plan
        if plan is None or plan.key != (n, self.cap, device, dtype, index_dtype, self.groups):
            plan = self._plan = StepPlan(self.selector, n, self.cap, device, dtype, index_dtype, self.groups)
        return plan

    def seed(self, layer_idx: int, states: Optional[Sequence[Optional[LayerDecodeState]]],
             plan: StepPlan) -> BatchedDecodeState:
        """A layer's batched state at its first step, from its per-sequence states (checked against the cache)."""
        for b, m in enumerate(plan.n):
            st = states[b] if states is not None and b < len(states) else None
            if st is None or st.n_tokens != m - 1:
                raise _out_of_sync(layer_idx, m - 1, None if st is None else st.n_tokens)
        state = self.layers[layer_idx] = BatchedDecodeState.from_states(states, plan)
        return state


def decode_state_bytes(cfg: SketchWalkConfig, num_layers: int, q_heads: int, head_dim: int, tokens: int) -> int:
    """Estimated bytes of one sequence's Sketch&Walk decode state after a prefill of `tokens` tokens
    (all its sparse layers; fp32), for sizing a batch before it runs.

    Per sparse layer it holds the key sums at the score granularity for G feature rows (G = q_heads
    with sum_probs, else 1), the query-block sums and W: after the prefill in the per-sequence state
    (`LayerDecodeState`, `state_capacity` blocks), from the first decode step in the batched state (the
    sums and their sketches, `batch_capacity`; each layer's per-sequence copy is freed as it is
    converted), so the peak is the larger of the two. Token-level scores (score_block_size 1) with
    sum_probs make this the dominant memory of a batched evaluation (SmolLM2 at 8K: ~1.1 GiB per
    sequence, so a batch of 110 does not fit in an H200's 139 GiB); the paper's scores need a few
    MiB. 0 when decode is dense or a baseline selector (which keeps no state) is used.
    """
    if not cfg.sparse_decode or cfg.selector != "sketchwalk":
        return 0
    layers = max(0, num_layers - cfg.skip_layers)
    g = q_heads if cfg.head_aggregation == "sum_probs" else 1
    nb = -(-tokens // cfg.block_size)
    cap, cap_b = state_capacity(nb), batch_capacity(nb)
    per_sequence = cap * cfg.sub_blocks * g * head_dim + cap * g * head_dim + cap * cap
    batched = 2 * cap_b * cfg.sub_blocks * g * head_dim + cap_b * g * head_dim + cap_b * cap_b
    return layers * 4 * max(per_sequence, batched)
