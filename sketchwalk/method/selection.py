"""Block selection (method.md step 8) and its container, `BlockSelection`."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..config import SketchWalkConfig


@dataclasses.dataclass
class BlockSelection:
    """Which key blocks each query-block row attends to: one selection shared by all heads, or one
    per KV head (the query heads of a GQA group share their KV head's; `selection_heads: kv`).

    Contract (what kernels rely on):
      indices: [rows, max_count] int64 (int32 when built for the Triton kernels), key-block indices in
               ascending order; entries at positions >= counts[row] are -1 and must never be read.
               Per KV head: [Hkv, rows, max_count], each head's rows under the same rule.
      counts:  [rows] int64 (int32 likewise), valid entries per row (>= 1: the diagonal block is always kept);
               the same for every head (counts depend on the config and the row alone).
      row_blocks: [rows] int64, the query-block index of each row (causal limit: indices <= row_blocks).
      block_size: tokens per block; block j covers real positions [j*B, (j+1)*B).
    Block indices are in the sequence's real-token coordinates (left padding is not counted).
    """

    indices: torch.Tensor
    counts: torch.Tensor
    row_blocks: torch.Tensor
    block_size: int

    @property
    def heads(self) -> Optional[int]:
        """KV heads with their own selection, None for a shared one."""
        return self.indices.shape[0] if self.indices.dim() == 3 else None

    def dense_block_mask(self, num_key_blocks: int) -> torch.Tensor:
        """Boolean [rows, num_key_blocks] ([Hkv, rows, num_key_blocks] per head), True where the row selected the key block."""
        mask = torch.zeros(*self.indices.shape[:-1], num_key_blocks + 1, dtype=torch.bool, device=self.indices.device)
        # -1 padding lands in the extra last column, which is then dropped.
        indices = self.indices.long()  # scatter_ takes int64 indices
        idx = torch.where(indices >= 0, indices, torch.full_like(indices, num_key_blocks))
        mask.scatter_(-1, idx, True)
        return mask[..., :num_key_blocks]

    def selected_pairs(self) -> torch.Tensor:
        """Number of (query-block, key-block) pairs computed: scalar tensor."""
        return self.counts.sum()

    def causal_pairs(self) -> torch.Tensor:
        """Number of causal (query-block, key-block) pairs for these rows: scalar tensor."""
        return (self.row_blocks + 1).sum()


def dense_tail_start(cfg: SketchWalkConfig, num_blocks: int) -> int:
    """First query-block row of a prefill of `num_blocks` rows that `cfg.dense_last_blocks` makes
    dense (num_blocks when none is): the one statement of that rule."""
    return max(0, num_blocks - cfg.dense_last_blocks)


def row_budget(cfg: SketchWalkConfig, i: int, num_blocks: Optional[int] = None,
               n_tokens: Optional[int] = None) -> int:
    """Blocks kept by query-block row i: `cfg.row_count(i+1, |forced_i|)` — config, row index and
    (for `sink_fraction` / `local_fraction`) the sequence length n_tokens alone, except that in a
    prefill of `num_blocks` rows the last `cfg.dense_last_blocks` rows keep all i+1.

    forced_i = the sinks [0, min(sink, i+1)) and the locals (i-local, i] (`cfg.forced_sizes`), a
    prefix and a suffix of the row's i+1 causal blocks, so |forced_i| = min(i+1, |sinks| + |locals|).
    Equals select_blocks' counts (τ_i uses the same float64 rounding as there: cfg.budget).
    """
    n = i + 1
    if num_blocks is not None and i >= dense_tail_start(cfg, num_blocks):
        return n
    sink, local = cfg.forced_sizes(n_tokens)
    return cfg.row_count(n, min(n, min(sink, n) + min(local, n)))


def forced_mask(cfg: SketchWalkConfig, rows: torch.Tensor, num_cols: int, n_tokens: Optional[int] = None) -> torch.Tensor:
    """[len(rows), num_cols] bool: the sink and local blocks of each query-block row (causal only),
    which every selector keeps. rows: [R] query-block indices; n_tokens: the sequence length (needed
    only when the config sizes them as fractions of it)."""
    sink, local = cfg.forced_sizes(n_tokens)
    cols = torch.arange(num_cols, device=rows.device)
    causal = cols[None, :] <= rows[:, None]
    return causal & ((cols[None, :] < sink) | (cols[None, :] > rows[:, None] - local))


def select_blocks(scores: torch.Tensor, row_blocks: torch.Tensor, cfg: SketchWalkConfig,
                  num_blocks: Optional[int] = None, n_tokens: Optional[int] = None,
                  width: Optional[int] = None) -> BlockSelection:
    """Pick key blocks per row from walk scores.

    scores: [rows, b] walk scores R^k (any real values; only causal columns are considered);
    row_blocks: [rows] query-block index of each row; num_blocks: the prefill's number of query
    blocks when the rows belong to one (rows >= num_blocks - cfg.dense_last_blocks are dense), None
    for a decode row; n_tokens: the sequence's real tokens (prompt or cache), needed only when the
    forced blocks are fractions of it (`cfg.length_dependent`); width: the indices' width, at least
    every row's count (None = the largest count, read on the host: one sync; a fixed width keeps
    the call free of host reads, as a CUDA-graph replay needs).
    Always keeps the sink blocks and the local blocks (the diagonal and the ones before it), then
    fills up to the row's count (`cfg.budget_rule`) with the highest-scoring remaining causal
    blocks (ties go to the lower block index). A row with at most τ causal blocks is dense.
    This is the reference for any rows; the runtime uses `BlockSelector` (the same result, with the
    masks and counts cached and no device->host sync).
    """
    rows, b = scores.shape
    device = scores.device
    cols = torch.arange(b, device=device)
    rb = row_blocks.to(device=device, dtype=torch.long)
    causal = cols[None, :] <= rb[:, None]
    forced = forced_mask(cfg, rb, b, n_tokens)
    n_causal = rb + 1
    n_forced = forced.sum(-1)
    if cfg.budget_rule == "causal":
        if cfg.top_k is not None:
            tau = torch.full_like(rb, cfg.top_k)
        else:
            tau = torch.ceil(n_causal.to(torch.float64) * cfg.density - 1e-9).long().clamp_min(1)
        counts = torch.minimum(n_causal, torch.maximum(tau, n_forced))
    else:  # free_quantile: a count of the free blocks on top of the forced ones
        free = n_causal - n_forced
        if cfg.top_k is not None:
            extra = free.clamp_max(cfg.top_k)
        else:
            q = torch.tensor(1.0 - cfg.density, dtype=torch.float32, device=device)  # float32 rank, as torch.nanquantile
            extra = free - 1 - torch.floor(q * (free - 1).to(torch.float32)).long()
        counts = n_forced + torch.where(free > 0, extra, 0)
    if num_blocks is not None and cfg.dense_last_blocks:
        dense = rb >= dense_tail_start(cfg, num_blocks)
        forced = forced | (causal & dense[:, None])
        counts = torch.where(dense, n_causal, counts)
    key = torch.where(forced, float("inf"), torch.where(causal, scores, float("-inf")))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    max_count = width if width is not None else (int(counts.max().item()) if rows else 0)
    top = order[:, :max_count]
    keep = torch.arange(max_count, device=device)[None, :] < counts[:, None]
    # Sort kept indices ascending; invalid slots sort last via the sentinel b, then become -1.
    top = torch.where(keep, top, torch.full_like(top, b)).sort(dim=-1).values
    top = torch.where(top == b, torch.full_like(top, -1), top)
    return BlockSelection(indices=top, counts=counts, row_blocks=rb, block_size=cfg.block_size)


@dataclasses.dataclass
class _PrefillMasks:
    """Everything of a prefill selection that depends only on (config, nb, device)."""

    causal: torch.Tensor  # [nb, nb] bool: key block <= query block
    forced: torch.Tensor  # [nb, nb] bool: sinks and locals (always kept)
    free: torch.Tensor  # [nb, nb] bool: causal and not forced (competes on its score)
    keep: torch.Tensor  # [nb, max_count] bool: slot < the row's count
    counts: dict = dataclasses.field(default_factory=dict)  # dtype -> [nb]: the row counts
    fills: dict = dataclasses.field(default_factory=dict)  # dtype -> [nb, nb]: +inf forced, -inf not causal

    def fill(self, dtype: torch.dtype) -> torch.Tensor:
        f = self.fills.get(dtype)
        if f is None:
            f = self.fills[dtype] = torch.where(self.forced, float("inf"), float("-inf")).to(dtype)
        return f


class BlockSelector:
    """`select_blocks` for the runtime's two row patterns, without device->host syncs.

    Row counts depend only on the config, the row index and the forced sizes (`row_budget`; the
    sizes depend on the sequence length only with `sink_fraction` / `local_fraction`), so the host
    knows them, their sum (the density counters) and the selection width; the device tensors that
    depend only on (number of rows, forced sizes, device) — aranges, count tables, the
    causal/forced masks — are built once and reused as views. Results equal select_blocks' bit for bit:
      prefill(scores [nb, nb], n)  == select_blocks(scores, arange(nb), cfg, num_blocks=nb, n_tokens=n)
      decode(scores [1, i+1], i, n) == select_blocks(scores, tensor([i]), cfg, n_tokens=n)
    (n, the sequence's real tokens, matters only for a length-dependent config.)
    `index_dtype` int32 gives indices and counts in the Triton kernels' dtype (no conversion
    there); the reference attention takes int64.
    """

    MAX_CACHED = 8  # prefill mask sets kept (one per distinct sequence length in blocks)

    def __init__(self, cfg: SketchWalkConfig):
        self.cfg = cfg
        self._counts: dict[tuple, list[int]] = {}  # forced sizes -> row counts of rows 0..len-1
        self._prefix: dict[tuple, list[int]] = {}  # forced sizes -> prefix sums (prefix[nb] = sum of nb counts)
        self._tables: dict[tuple, torch.Tensor] = {}
        self._masks: dict[tuple, _PrefillMasks] = {}

    # -- host side ------------------------------------------------------------------------
    def sizes(self, n_tokens: Optional[int] = None) -> tuple[int, int]:
        """(sink, local) blocks for a sequence of n_tokens real tokens (`cfg.forced_sizes`)."""
        return self.cfg.forced_sizes(n_tokens)

    def _extend(self, nb: int, sizes: tuple[int, int]) -> list[int]:
        counts = self._counts.setdefault(sizes, [])
        prefix = self._prefix.setdefault(sizes, [0])
        sink, local = sizes
        while len(counts) < nb:
            n = len(counts) + 1
            c = self.cfg.row_count(n, min(n, min(sink, n) + min(local, n)))  # row_budget with these sizes
            counts.append(c)
            prefix.append(prefix[-1] + c)
        return counts

    def row_count(self, i: int, n_tokens: Optional[int] = None) -> int:
        """Blocks selected by query-block row i (host int) of a sequence of n_tokens real tokens."""
        return self._extend(i + 1, self.sizes(n_tokens))[i]

    def _tail(self, nb: int) -> int:
        return dense_tail_start(self.cfg, nb)

    def pairs(self, nb: int, n_tokens: Optional[int] = None) -> int:
        """Selected (query-block, key-block) pairs of a prefill of nb blocks: sum of its row counts."""
        sizes = self.sizes(n_tokens)
        self._extend(nb, sizes)
        t = self._tail(nb)
        return self._prefix[sizes][t] + (nb * (nb + 1) - t * (t + 1)) // 2

    def max_count(self, nb: int, n_tokens: Optional[int] = None) -> int:
        """Width of a prefill selection of nb rows: its largest row count."""
        counts = self._extend(nb, self.sizes(n_tokens))
        return nb if self._tail(nb) < nb else max(counts[:nb], default=0)

    def prefill_counts(self, nb: int, device, dtype=torch.long, n_tokens: Optional[int] = None) -> torch.Tensor:
        """Row counts of a prefill of nb rows, [nb] (a cached view unless dense_last_blocks applies)."""
        t = self._tail(nb)
        if t == nb:
            return self.counts(0, nb, device, dtype, n_tokens)
        return torch.cat([self.counts(0, t, device, dtype, n_tokens), self.arange(nb + 1, device, dtype)[t + 1:]])

    # -- cached device tables -----------------------------------------------------------
    def _table(self, kind: str, n: int, device: torch.device, dtype: torch.dtype,
               sizes: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """A device table of at least n entries, grown by doubling: `arange` (0, 1, ...) or `counts`
        (row counts with these forced sizes). Callers slice it: views, no kernel launch."""
        key = (kind, device, dtype, sizes)
        t = self._tables.get(key)
        if t is None or t.shape[0] < n:
            size = max(n, 64, 2 * (0 if t is None else t.shape[0]))
            if kind == "arange":
                t = torch.arange(size, device=device, dtype=dtype)
            else:  # built on the host once per growth: one small copy, not one per layer
                t = torch.tensor(self._extend(size, sizes)[:size], dtype=dtype).to(device)
            self._tables[key] = t
        return t

    def arange(self, n: int, device, dtype=torch.long) -> torch.Tensor:
        """arange(n) as a view of a cached table."""
        return self._table("arange", n, _as_device(device), dtype)[:n]

    def counts(self, start: int, stop: int, device, dtype=torch.long, n_tokens: Optional[int] = None) -> torch.Tensor:
        """Row counts of rows start..stop-1 (a sequence of n_tokens real tokens) as a view of a cached device table."""
        return self._table("counts", stop, _as_device(device), dtype, self.sizes(n_tokens))[start:stop]

    def _prefill_masks(self, nb: int, device: torch.device, n_tokens: Optional[int]) -> _PrefillMasks:
        sizes = self.sizes(n_tokens)
        key = (nb, sizes, device)
        m = self._masks.get(key)
        if m is None:
            cols = torch.arange(nb, device=device)
            causal = cols[None, :] <= cols[:, None]
            forced = forced_mask(self.cfg, cols, nb, n_tokens)
            forced = forced | (causal & (cols[:, None] >= self._tail(nb)))  # dense last rows
            counts = self.prefill_counts(nb, device, n_tokens=n_tokens)
            keep = torch.arange(self.max_count(nb, n_tokens), device=device)[None, :] < counts[:, None]
            m = _PrefillMasks(causal=causal, forced=forced, free=causal & ~forced, keep=keep,
                              counts={torch.long: counts})
            if len(self._masks) >= self.MAX_CACHED:
                self._masks.pop(next(iter(self._masks)))
            self._masks[key] = m
        return m

    def prefill_causal(self, nb: int, device) -> torch.Tensor:
        """The causal mask of a prefill's W rows, [nb, nb] bool (cached unless the forced sizes
        depend on the length, which the mask itself does not)."""
        if self.cfg.length_dependent:
            cols = self.arange(nb, device)
            return cols[None, :] <= cols[:, None]
        return self._prefill_masks(nb, _as_device(device), None).causal

    # -- the two selections ---------------------------------------------------------------
    def prefill(self, scores: torch.Tensor, index_dtype: torch.dtype = torch.long,
                n_tokens: Optional[int] = None) -> BlockSelection:
        """Selection of every query-block row of a prefill: scores [nb, nb] (walk rows 0..nb-1) of a
        prompt of n_tokens real tokens (needed only by a length-dependent config); scores
        [Hkv, nb, nb] give one selection per KV head (each head's as from its own [nb, nb])."""
        nb = scores.shape[-1]
        device = scores.device
        m = self._prefill_masks(nb, device, n_tokens)
        key = torch.where(m.free, scores, m.fill(scores.dtype))
        order = torch.sort(key, dim=-1, descending=True, stable=True).indices
        top = order[..., :m.keep.shape[1]]
        # Kept slots ascending; the others sort last via the sentinel nb, then become -1.
        top = torch.where(m.keep, top, nb).sort(dim=-1).values
        top = torch.where(top == nb, -1, top)
        counts = m.counts.get(index_dtype)
        if counts is None:
            counts = m.counts[index_dtype] = self.prefill_counts(nb, device, index_dtype, n_tokens)
        return BlockSelection(indices=top.to(index_dtype), counts=counts,
                              row_blocks=self.arange(nb, device), block_size=self.cfg.block_size)

    def decode(self, scores: torch.Tensor, i: int, index_dtype: torch.dtype = torch.long,
               n_tokens: Optional[int] = None) -> BlockSelection:
        """Selection of query-block row i from its walk row: scores [1, >= i+1] (columns > i ignored),
        or [Hkv, 1, >= i+1] for one selection per KV head; n_tokens: the cache's real tokens (needed
        only by a length-dependent config).

        The forced blocks are a prefix [0, lo) and a suffix [hi, i] of the row, so the free
        candidates are the contiguous range [lo, hi): a stable descending sort of that slice ranks
        them exactly as select_blocks' full-row sort (forced = +inf first, ties to the lower index).
        """
        cfg, device = self.cfg, scores.device
        sink, local = self.sizes(n_tokens)
        lo = min(sink, i + 1)
        hi = max(i - local + 1, lo)
        count = self.row_count(i, n_tokens)
        free = count - lo - (i + 1 - hi)
        ar = self._table("arange", i + 1, device, index_dtype)
        lead = scores.shape[:-1]  # (1,) shared, (Hkv, 1) per KV head
        if free == hi - lo:  # every causal block: a dense row
            indices = ar[:i + 1].expand(*lead, i + 1)
        else:
            parts = [ar[:lo].expand(*lead, lo)] if lo else []
            if free:
                order = torch.sort(scores[..., lo:hi], dim=-1, descending=True, stable=True).indices[..., :free]
                parts.append((order.sort(dim=-1).values + lo).to(index_dtype))  # ar[lo:hi][picks] = lo + picks
            parts.append(ar[hi:i + 1].expand(*lead, i + 1 - hi))
            indices = torch.cat(parts, dim=-1)
        return BlockSelection(indices=indices, counts=self.counts(i, i + 1, device, index_dtype, n_tokens),
                              row_blocks=self.arange(i + 1, device)[i:], block_size=cfg.block_size)


def _as_device(device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)
