"""`SketchWalkRuntime`: runs one model's attention layers with Sketch&Walk (the PyTorch reference path).

One runtime per attached model. It owns the walk state of the current forward pass (reset at
the first sparse layer), the per-layer decode states of each sequence (reset at every new
prefill) and the measured density counters. Batches are processed one sequence at a time on
its real (non-padded) tokens, so block boundaries follow real token positions and padded keys
can never be selected or attended. The exception is a decode step of a batch (bsz > 1): one
vectorised front end for all sequences, every selector and head aggregation
(`batched_decode.py`; same selections, `batched_decode = False` switches it off).

The selection front end issues no device->host synchronisation per layer: selected-pair counts
and selection widths are known on the host from the config (`BlockSelector`), the left-padding
offsets are read once per forward pass (`_PadCache`), and constant tensors (aranges, masks, SRHT
parameters, count tables) are cached on the device. The selection path runs on detached q/k: it
only yields block indices, through which no gradient flows; attention keeps the graph.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Optional, Sequence, Union

import torch

from ..config import SketchWalkConfig
from .attention import sparse_attention
from .baselines import batched_decode_scores, decode_scores, prefill_scores
from .batched_decode import BatchedSelection, DecodeBatch, batched_walk, dense_rows, feature_groups, select_rows
from .decode_state import LayerDecodeState
from .scores import compute_dtype, group_features, score_scale, sketch_features, softmax_rows, transition_rows
from .selection import BlockSelection, BlockSelector
from .sketch import block_means, sketch_matrix
from .static_decode import StaticDecodeBatch, static_attention, static_decode_refusal
from .walk import walk_update


BACKENDS = ("auto", "triton", "torch")


@dataclasses.dataclass
class DensityReport:
    """Measured density: fraction of causal (query-block, key-block) pairs computed.

    per_layer[phase][layer] in [0, 1]; overall[phase] over all layers (skipped layers count as
    dense); sparse_layers[phase] over the sparse layers only; dense_layer_share: fraction of
    layers that ran dense in that phase.
    """

    per_layer: dict[str, dict[int, float]]
    overall: dict[str, float]
    sparse_layers: dict[str, float]
    dense_layer_share: dict[str, float]


class SketchWalkRuntime:
    """Per-model Sketch&Walk state and the batched attention entry point.

    `batched_decode` (default True): decode steps of batches take the vectorised front end
    (every selector and head aggregation); False keeps them on the per-sequence path.
    Switch it between generations: once a batch decodes batched, its per-sequence states are
    gone, and the per-sequence path would refuse to continue it.
    """

    def __init__(self, config: SketchWalkConfig, num_layers: Optional[int] = None, head_dim: Optional[int] = None,
                 backend: str = "auto"):
        if num_layers is not None and head_dim is not None:
            config.validate_for_model(num_layers, head_dim)
        if backend not in BACKENDS:
            raise ValueError(f"backend = {backend!r} is invalid: allowed one of {list(BACKENDS)}")
        self.config = config
        self.backend = backend
        self.num_layers = num_layers
        self._walk: list[Optional[torch.Tensor]] = []
        # per layer, per sequence: its decode state (a list of one per KV head with `selection_heads: kv`)
        self._states: dict[int, list[Any]] = {}
        self._pairs: dict[str, dict[int, list[int]]] = {"prefill": {}, "decode": {}}
        self._dense_layers: dict[str, set[int]] = {"prefill": set(), "decode": set()}
        self.last_selection: dict[int, list[Optional[BlockSelection]]] = {}
        self.keep_selections = False
        # Selections only (tensor-level studies on recorded inputs): attention returns zeros, so a
        # replay measures what is selected without paying for the attention it would compute.
        self.selection_only = False
        self._selector = BlockSelector(config)
        self._pads = _PadCache()
        self.batched_decode = True
        self._batch: Optional[DecodeBatch] = None  # the batched decode state since the last prefill
        # Per-KV-head Sketch&Walk: the state batch holds one virtual sequence per (sequence, KV head);
        # this one plans the real rows (selection, counts).
        self._rows_batch: Optional[DecodeBatch] = None
        self._walk_rows: Optional[torch.Tensor] = None  # [batch, cap] walk rows of the batched decode path
        # Rows of a batch whose decode steps count towards the density (None = all). A batched
        # generate() keeps feeding sequences that already ended (EOS or their own budget); the
        # evaluation harness clears their flag so density covers the answers alone, as at batch 1.
        self.counted_rows: Optional[list[bool]] = None
        # Decode on a static cache (`static_cache`): its capacity, and the device state once seeded.
        self._static_capacity: Optional[int] = None
        self._static: Optional[StaticDecodeBatch] = None

    @property
    def selector(self) -> BlockSelector:
        """The cached selection helper of the current config (rebuilt if `config` was replaced)."""
        if self._selector.cfg is not self.config:
            self._selector = BlockSelector(self.config)
        return self._selector

    # -- bookkeeping ------------------------------------------------------------------
    def reset(self) -> None:
        """Forget all sequence state and density counters."""
        self._walk, self._states = [], {}
        self._batch, self._walk_rows = None, None
        self.counted_rows = None
        self.reset_stats()

    def reset_stats(self) -> None:
        """Zero the density counters (e.g. between evaluation samples)."""
        if self._static is not None:
            self._static.take_pairs()
        self._pairs = {"prefill": {}, "decode": {}}
        self._dense_layers = {"prefill": set(), "decode": set()}
        self.last_selection = {}

    @contextlib.contextmanager
    def uncounted(self):
        """Within: attention runs as usual, but the density counters and `last_selection` are left
        as they were (the harness re-runs an already counted prompt to time it)."""
        saved = ({ph: {l: list(v) for l, v in d.items()} for ph, d in self._pairs.items()},
                 {ph: set(v) for ph, v in self._dense_layers.items()}, self.last_selection)
        try:
            yield
        finally:
            self._pairs, self._dense_layers, self.last_selection = saved

    def _count(self, phase: str, layer: int, selected: int, causal: int, dense: bool) -> None:
        acc = self._pairs[phase].setdefault(layer, [0, 0])
        acc[0] += selected
        acc[1] += causal
        if dense:
            self._dense_layers[phase].add(layer)

    def _counted(self, b: int) -> bool:
        """Whether decode steps of batch row b count towards the density (see `counted_rows`)."""
        rows = self.counted_rows
        return rows is None or b >= len(rows) or rows[b]

    def density(self) -> DensityReport:
        """The measured density since the last reset_stats() (static-cache steps included: one read)."""
        self._fold_static_pairs()
        per_layer, overall, sparse, share = {}, {}, {}, {}
        for phase, layers in self._pairs.items():
            per_layer[phase] = {l: s / c for l, (s, c) in sorted(layers.items()) if c}
            tot_s = sum(s for s, _ in layers.values())
            tot_c = sum(c for _, c in layers.values())
            overall[phase] = tot_s / tot_c if tot_c else float("nan")
            sp = [(s, c) for l, (s, c) in layers.items() if l not in self._dense_layers[phase]]
            sparse[phase] = sum(s for s, _ in sp) / sum(c for _, c in sp) if sp and sum(c for _, c in sp) else float("nan")
            share[phase] = len(self._dense_layers[phase]) / len(layers) if layers else float("nan")
        return DensityReport(per_layer, overall, sparse, share)

    def _fold_static_pairs(self) -> None:
        """Move the static decode's device counters into the host counters."""
        if self._static is None:
            return
        for layer, (selected, causal) in self._static.take_pairs().items():
            self._count("decode", layer, selected, causal, dense=layer in self._static.dense_layers)

    # -- prefill in parts ---------------------------------------------------------------
    def prefill_states(self) -> dict[int, list[Any]]:
        """The per-sequence decode states the last prefill left ({layer: one entry per sequence}), for
        `adopt_prefill_states` after prefilling a batch in row chunks."""
        return {layer: list(states) for layer, states in self._states.items()}

    def adopt_prefill_states(self, parts: Sequence[dict[int, list[Any]]]) -> None:
        """Make the prefills of consecutive row chunks of one batch (their `prefill_states`, in row
        order) the prefill of the whole batch: the next decode step continues all its sequences."""
        layers = set().union(*(p.keys() for p in parts)) if parts else set()
        if any(p.keys() != layers for p in parts):
            raise ValueError("every row chunk must have prefilled the same layers")
        self._states = {layer: [s for p in parts for s in p[layer]] for layer in sorted(layers)}
        self._batch, self._rows_batch, self._walk_rows, self._static = None, None, None, None

    # -- decode on a static cache ------------------------------------------------------
    @contextlib.contextmanager
    def static_cache(self, capacity: int):
        """Within: the model runs on a transformers StaticCache of `capacity` tokens, and every decode
        step runs on the device alone (`static_decode.StaticDecodeBatch`), so that a CUDA graph can
        replay it. The prefill (an unpadded batch, positions 0..n-1) runs as usual on its own keys and
        seeds the static state at the first decode step. Refuses, before anything runs, a config the
        static decode does not cover (ValueError naming the field)."""
        refusal = static_decode_refusal(self.config)
        if refusal:
            raise ValueError(refusal)
        if capacity < 1:
            raise ValueError(f"capacity = {capacity}: a static cache holds at least one token")
        self._static_capacity, self._static = capacity, None
        try:
            yield self
        finally:
            self._fold_static_pairs()
            self._static_capacity, self._static = None, None

    def _static_attention(self, layer_idx: int, q, k, v, key_valid: Optional[torch.Tensor], scale: float) -> torch.Tensor:
        """One layer on the static cache: q [B, Hq, q_len, d]; k, v [B, Hkv, capacity, d] (the whole buffer)."""
        cfg = self.config
        bsz, _, q_len, _ = q.shape
        if k.shape[-2] != self._static_capacity:
            raise ValueError(f"static cache of {k.shape[-2]} tokens, but static_cache() was entered with "
                             f"capacity {self._static_capacity}")
        if q_len > 1:  # the prefill: its keys are the first q_len positions of the buffer
            if key_valid is not None:
                raise ValueError("decode on a static cache takes an unpadded batch (no attention mask) "
                                 "prefilled from position 0")
            self._static = None  # a new prefill: the next decode step seeds from it
            return self._attention(layer_idx, q, k[:, :, :q_len], v[:, :, :q_len], None, scale)
        if key_valid is None:
            raise ValueError("a decode step on a static cache needs its attention mask (the valid prefix)")
        if self._static is None:
            self._static = StaticDecodeBatch(cfg, bsz, self._static_capacity, q.shape[-1], q.device,
                                             compute_dtype(q.dtype))
        static = self._static
        sparse = layer_idx >= cfg.skip_layers and cfg.sparse_decode
        if sparse and layer_idx not in static.layers:  # the first step (eager, before any capture): seed
            static.seed_layer(layer_idx, self._states.get(layer_idx) or [])
            self._states[layer_idx] = [None] * bsz  # superseded: free the eager copies
        lengths = key_valid.sum(-1)  # [B]: the valid prefix, counted on the device (no host read)
        indices, counts = static.step(layer_idx, q.detach(), k.detach(), lengths, sparse,
                                      first_sparse=layer_idx == cfg.skip_layers)
        if self.selection_only:
            return torch.zeros_like(q)
        if self.uses_triton(q.device):
            from ..kernels import block_sparse_decode

            return block_sparse_decode(q.contiguous(), k.contiguous(), v.contiguous(), indices, counts,
                                       static.zero_offsets, cfg.block_size, scale, lengths=lengths.to(torch.int32))
        return static_attention(q, k, v, indices, counts, lengths, cfg.block_size, scale)

    # -- the attention entry point ----------------------------------------------------
    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  key_valid: Optional[torch.Tensor], scale: float) -> torch.Tensor:
        """Sketch&Walk attention for one layer of a (possibly left-padded) batch.

        q: [batch, Hq, q_len, d]; k, v: [batch, Hkv, kv_len, d] (the whole KV cache after the
        update); key_valid: [batch, kv_len] bool (False = padding, which must be a prefix) or None;
        scale: softmax scale. The queries are the last q_len positions. q_len == kv_len is a
        prefill; q_len == 1 with a cache is a decode step. Within `static_cache`, k and v are the
        static cache's whole buffer and key_valid its valid prefix. Returns [batch, Hq, q_len, d].
        """
        if self._static_capacity is not None:
            return self._static_attention(layer_idx, q, k, v, key_valid, scale)
        return self._attention(layer_idx, q, k, v, key_valid, scale)

    def _attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   key_valid: Optional[torch.Tensor], scale: float) -> torch.Tensor:
        """Sketch&Walk attention for one layer of a (possibly left-padded) batch.

        q: [batch, Hq, q_len, d]; k, v: [batch, Hkv, kv_len, d] (the whole KV cache after the
        update); key_valid: [batch, kv_len] bool (False = padding, which must be a prefix) or None;
        scale: softmax scale. The queries are the last q_len positions. q_len == kv_len is a
        prefill; q_len == 1 with a cache is a decode step. Returns [batch, Hq, q_len, d].
        """
        cfg = self.config
        bsz, _, q_len, _ = q.shape
        kv_len = k.shape[-2]
        past = kv_len - q_len
        if past != 0 and q_len != 1:
            raise NotImplementedError(
                f"SketchWalk supports prefill (no cache) and single-token decode; got {q_len} new tokens on a "
                f"cache of {past} (chunked prefill / assisted decoding are not supported)")
        pads = self._pads.get(layer_idx, key_valid, bsz, kv_len, q.device)
        offsets = pads.host
        phase = "prefill" if past == 0 else "decode"
        sparse_layer = layer_idx >= cfg.skip_layers
        sparse = sparse_layer and (cfg.sparse_prefill if phase == "prefill" else cfg.sparse_decode)
        if layer_idx == cfg.skip_layers:
            self._walk = [None] * bsz  # a new forward pass starts its walk here
            self._walk_rows = None
        if phase == "prefill":
            self._states[layer_idx] = [None] * bsz
            self._batch = None
        if self.keep_selections:
            self.last_selection[layer_idx] = [None] * bsz
        if phase == "decode" and self._batched_decode_applies(bsz, kv_len, offsets):
            return self._decode_batched(layer_idx, q, k, v, pads, sparse, scale)

        # Selection (and decode state) per sequence on its real tokens; then one attention call.
        selections: list[Optional[BlockSelection]] = []
        for b in range(bsz):
            off = offsets[b]
            qs, ks = q[b, :, max(off - past, 0):], k[b, :, off:]
            if ks.shape[-2] == 0:
                selections.append(None)
            elif phase == "prefill":
                selections.append(self._prefill_select(layer_idx, b, qs, ks, sparse_layer, sparse, scale))
            else:
                selections.append(self._decode_select(layer_idx, b, qs, ks, sparse, scale))
        return self._attend(q, k, v, pads, selections, scale)

    def _batched_decode_applies(self, bsz: int, kv_len: int, offsets: list[int]) -> bool:
        """Whether a decode step takes the batched front end: a batch with no empty sequence."""
        return self.batched_decode and bsz > 1 and max(offsets) < kv_len

    def _decode_batched(self, layer: int, q, k, v, pads: "_Pads", sparse: bool, scale: float) -> torch.Tensor:
        """One decode step of a batch with one vectorised front end (q: [batch, Hq, 1, d], k, v: the cache).

        Selections, outputs and density counters are the per-sequence path's (`_decode_select` per sequence).
        """
        cfg = self.config
        n = tuple(k.shape[-2] - off for off in pads.host)  # real tokens per sequence, the new one included
        if not sparse:
            for b, m in enumerate(n):
                nb = -(-m // cfg.block_size)
                if self._counted(b):
                    self._count("decode", layer, nb, nb, dense=True)
            return self._attend(q, k, v, pads, [None] * len(n), scale)
        groups = feature_groups(cfg, q.shape[1])
        # Per KV head (Sketch&Walk): S = Hkv virtual sequences per sequence, each with its GQA
        # group's query heads as feature groups; feature row b * G + g keeps its place.
        heads = k.shape[1] if cfg.per_kv_head and cfg.selector == "sketchwalk" else 1
        vn, vgroups = tuple(m for m in n for _ in range(heads)), groups // heads
        if self._batch is None or self._batch.bsz != len(vn) or self._batch.groups != vgroups:
            self._batch = DecodeBatch(self.selector, len(vn), vgroups)
            self._rows_batch = DecodeBatch(self.selector, len(n), groups) if heads > 1 else self._batch
        args = (q.device, compute_dtype(q.dtype), self._index_dtype(q.device))
        vplan = self._batch.plan(vn, *args)
        plan = self._rows_batch.plan(n, *args) if heads > 1 else vplan
        if cfg.selector != "sketchwalk":  # a baseline: scores from the cache, no state, no walk
            scores = batched_decode_scores(q.detach(), k.detach(), pads.on(q.device), plan.block, plan.cap,
                                           cfg, layer, scale)
            sel = select_rows(plan, scores)
        else:
            state = self._batch.layers.get(layer)
            if state is None:
                states = self._states.get(layer)
                if heads > 1 and states is not None:  # [sequence][KV head] -> virtual sequences
                    states = [st for per_head in states for st in (per_head or [None] * heads)]
                state = self._batch.seed(layer, states, vplan)
                self._states[layer] = [None] * len(n)  # superseded: free the per-sequence copies
            # The batch is a row axis of group_features' inputs: [G, B, 1, d] -> feature rows [B * G, d].
            qf, kf = group_features(q.detach().transpose(0, 1), k[:, :, -1:].detach().transpose(0, 1), cfg)
            if groups == 1:
                qf, kf = qf[0, :, 0], kf[0, :, 0]
            else:
                qf, kf = (x[:, :, 0].transpose(0, 1).reshape(-1, x.shape[-1]) for x in (qf, kf))
            w, row = state.step(vplan, qf, kf)
            if heads > 1:  # walk none (validated): the rows themselves, one per KV head
                sel = select_rows(plan, row.view(len(n), heads, row.shape[-1]))
            else:
                self._walk_rows = batched_walk(self._walk_rows, w, row, cfg)
                sel = select_rows(plan, self._walk_rows)
        if self.counted_rows is None:
            self._count("decode", layer, plan.selected_pairs, plan.causal_pairs, dense=False)
        else:
            live = [self._counted(b) for b in range(len(n))]
            self._count("decode", layer, sum(c for c, keep in zip(plan.counts, live) if keep),
                        sum(i + 1 for i, keep in zip(plan.blocks, live) if keep), dense=False)
        if self.keep_selections:
            self.last_selection[layer] = sel.per_sequence()
        return self._attend(q, k, v, pads, sel, scale)

    def uses_triton(self, device: torch.device) -> bool:
        """Whether attention runs in the Triton kernels: `triton`, or `auto` on a CUDA device."""
        return self.backend == "triton" or (self.backend == "auto" and device.type == "cuda")

    def _index_dtype(self, device: torch.device) -> torch.dtype:
        """Selections are built in the dtype their attention reads: int32 for the kernels, int64 for SDPA."""
        return torch.int32 if self.uses_triton(device) else torch.long

    def _attend(self, q, k, v, pads: "_Pads", selections: Union[list[Optional[BlockSelection]], BatchedSelection],
                scale: float) -> torch.Tensor:
        """Attention of each sequence's real queries over its selected blocks (None = dense causal).

        q: [batch, Hq, q_len, d]; k, v: [batch, Hkv, kv_len, d] -> [batch, Hq, q_len, d].
        selections: one per sequence, or a decode step's `BatchedSelection`.
        """
        if self.selection_only:
            return torch.zeros_like(q)
        if self.uses_triton(q.device):
            return _attend_triton(q, k, v, pads, selections, self.selector, scale)
        if isinstance(selections, BatchedSelection):
            selections = selections.per_sequence()
        offsets = pads.host
        q_len, kv_len = q.shape[-2], k.shape[-2]
        past = kv_len - q_len
        out = torch.zeros_like(q)  # padded query rows get zeros, never NaN
        for b, sel in enumerate(selections):
            off = offsets[b]
            m = kv_len - off
            if m == 0:
                continue
            qs = q[b, :, max(off - past, 0):]
            pos = torch.arange(m - qs.shape[-2], m, device=q.device)
            out[b, :, q_len - qs.shape[-2]:] = sparse_attention(qs, k[b, :, off:], v[b, :, off:], pos, sel, scale)
        return out

    # -- one sequence -----------------------------------------------------------------
    def _prefill_select(self, layer: int, b: int, q, k, sparse_layer: bool, sparse: bool,
                        scale: float) -> Optional[BlockSelection]:
        """Selection for a prefill of one sequence (q: [Hq, m, d], k: [Hkv, m, d]); None = dense. Seeds decode state."""
        cfg = self.config
        m, d = k.shape[-2], k.shape[-1]
        nb = -(-m // cfg.block_size)
        causal_pairs = nb * (nb + 1) // 2
        needs_state = sparse_layer and cfg.sparse_decode and cfg.selector == "sketchwalk"  # baselines keep none
        if not sparse and not needs_state:
            self._count("prefill", layer, causal_pairs, causal_pairs, dense=True)
            return None
        if cfg.selector != "sketchwalk":  # a baseline's scores (method/baselines.py): no sketch, no walk
            scores = prefill_scores(q.detach(), k.detach(), cfg, layer, scale)
            return self._select_prefill(layer, b, scores, causal_pairs, m)
        if self.uses_triton(q.device) and _fused_front_end_applies(q, cfg):
            w, state = self._prefill_transition_fused(layer, q.detach(), k.detach(), needs_state)
        else:
            qf, kf = group_features(q.detach(), k.detach(), cfg)
            if cfg.per_kv_head:  # each KV head's W from its own group's query heads: [Hkv, nb, nb]
                parts = _head_groups(qf, kf, k.shape[0])
                ws = [self._prefill_transition(layer, qh, kh, d) for qh, kh in parts]
                w = torch.stack(ws)
                state = ([LayerDecodeState(cfg, layer, d, qh, kh, wh) for (qh, kh), wh in zip(parts, ws)]
                         if needs_state else None)
            else:
                w = self._prefill_transition(layer, qf, kf, d)
                state = LayerDecodeState(cfg, layer, d, qf, kf, w) if needs_state else None
        if needs_state:
            self._states[layer][b] = state
        if not sparse:
            self._count("prefill", layer, causal_pairs, causal_pairs, dense=True)
            return None
        r = walk_update(self._walk[b], w, None, cfg)
        self._walk[b] = r
        return self._select_prefill(layer, b, r, causal_pairs, m)

    def _select_prefill(self, layer: int, b: int, scores: torch.Tensor, causal_pairs: int, m: int) -> BlockSelection:
        """Selection of every row of a prefill of m real tokens from its scores [(Hkv,) nb, nb] (walk rows or a baseline's), counted."""
        sel = self.selector.prefill(scores, self._index_dtype(scores.device), m)
        self._record(layer, b, sel)
        self._count("prefill", layer, self.selector.pairs(scores.shape[-1], m), causal_pairs, dense=False)
        return sel

    def _prefill_transition(self, layer: int, qf: torch.Tensor, kf: torch.Tensor, head_dim: int) -> torch.Tensor:
        """W [nb, nb] of one sequence from its group features qf, kf: [G, m, d]."""
        cfg = self.config
        # Keys are pooled at the score granularity (sub-blocks when score_block_size is set).
        qm, km = block_means(qf, cfg.block_size), block_means(kf, cfg.score_block)  # [G, nb, d], [G, nf, d]
        nb = qm.shape[-2]
        if cfg.sketch == "hadamard" and self.uses_triton(qf.device) and qm.dtype == torch.float32:
            # The SRHT as one GEMM with its [d, r] matrix, as the fused front end applies it: with sub-block
            # scores the butterfly's strided passes over every key sub-block (x G groups) dominated the front
            # end on the GPU. Same linear map; values equal up to fp32 rounding.
            m = sketch_matrix(head_dim, cfg.sketch_dim, cfg.seed, layer, qf.device)
            return self._transition_of_sketches(qm @ m, km @ m, head_dim)
        # One SRHT call for both (rows are independent, so the values are those of two calls).
        sk = sketch_features(torch.cat([qm, km], dim=-2), cfg, layer)
        return self._transition_of_sketches(sk[:, :nb], sk[:, nb:], head_dim)

    def _prefill_transition_fused(self, layer: int, q, k, needs_state: bool
                                  ) -> tuple[torch.Tensor, Optional[LayerDecodeState]]:
        """W [nb, nb] (and the seeded decode state, if needed) from q: [Hq, m, d], k: [Hkv, m, d]
        through the fused Triton front end (mean_qk): Q and K are read once, no per-token features."""
        from ..kernels import block_sketch

        cfg = self.config
        m, d = k.shape[-2], k.shape[-1]
        matrix = None if cfg.sketch == "exact" else sketch_matrix(d, cfg.sketch_dim, cfg.seed, layer, q.device)
        fe = block_sketch(q, k, block_size=cfg.block_size, matrix=matrix)
        w = self._transition_of_sketches(fe.q_sk, fe.k_sk, d)
        if not needs_state:
            return w, None
        window_q = None
        if cfg.decode_query == "window":  # only the last decode_window queries' features, as group_features has them
            window_q = q[:, m - min(m, cfg.decode_window):].to(compute_dtype(q.dtype)).mean(0, keepdim=True)
        return w, LayerDecodeState.from_block_sums(cfg, layer, d, fe.q_sums, fe.k_sums, m, window_q, w)

    def _transition_of_sketches(self, q_sk: torch.Tensor, k_sk: torch.Tensor, head_dim: int) -> torch.Tensor:
        """W [nb, nb] of a prefill from its sketched block means q_sk: [G, nb, r] and key (sub-)block
        means k_sk: [G, nb, r] ([G, nf, r] with sub-block scores)."""
        nb, device = q_sk.shape[-2], q_sk.device
        if self.config.sub_blocks > 1 and self.uses_triton(device):
            # Sub-block logits never materialise: the kernel reduces them to per-block log-sum-exps.
            from ..kernels import block_logsumexp

            return softmax_rows(block_logsumexp(q_sk, k_sk, self.config.sub_blocks, score_scale(head_dim, self.config)))
        causal = self.selector.prefill_causal(nb, device)
        return transition_rows(q_sk, k_sk, self.selector.arange(nb, device), head_dim, self.config, causal=causal)

    def _decode_select(self, layer: int, b: int, q, k, sparse: bool, scale: float) -> Optional[BlockSelection]:
        """Selection for one decode step of one sequence (q: [Hq, 1, d], k: [Hkv, m, d]); None = dense."""
        cfg = self.config
        m = k.shape[-2]
        i = (m - 1) // cfg.block_size
        if not sparse:
            if self._counted(b):
                self._count("decode", layer, i + 1, i + 1, dense=True)
            return None
        if cfg.selector != "sketchwalk":
            return self._select_decode(layer, b, decode_scores(q.detach(), k.detach(), cfg, layer, scale), i, m)
        states = self._states.get(layer)
        state = states[b] if states is not None and b < len(states) else None
        tokens = None if state is None else (state[0] if cfg.per_kv_head else state).n_tokens
        if state is None or tokens != m - 1:
            raise RuntimeError(
                f"SketchWalk decode state of layer {layer} is out of sync with the KV cache (cache has {m - 1} "
                f"earlier tokens, state has {tokens}); start sequences with a prefill")
        qf, kf = group_features(q.detach(), k[:, -1:].detach(), cfg)
        if cfg.per_kv_head:  # one state per KV head; walk none: each head's current W row
            rows = []
            for st, (qh, kh) in zip(state, _head_groups(qf[:, 0], kf[:, 0], k.shape[0])):
                st.append(qh, kh)
                rows.append(st.transition_with_current_row(qh)[i:i + 1])
            return self._select_decode(layer, b, torch.stack(rows), i, m)
        state.append(qf[:, 0], kf[:, 0])
        w = state.transition_with_current_row(qf[:, 0])
        r = walk_update(self._walk[b], w, slice(i, i + 1), cfg)
        self._walk[b] = r
        return self._select_decode(layer, b, r, i, m)

    def _select_decode(self, layer: int, b: int, scores: torch.Tensor, i: int, m: int) -> BlockSelection:
        """Selection of query-block row i of a decode step (cache of m real tokens) from its scores [1, >= i+1], counted."""
        sel = self.selector.decode(scores, i, self._index_dtype(scores.device), m)
        self._record(layer, b, sel)
        if self._counted(b):
            self._count("decode", layer, self.selector.row_count(i, m), i + 1, dense=False)
        return sel

    def _record(self, layer: int, b: int, sel: BlockSelection) -> None:
        if self.keep_selections:
            self.last_selection[layer][b] = sel


def _head_groups(qf: torch.Tensor, kf: torch.Tensor, heads: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Group features [G, ...] (G = Hq, head-major: KV head h owns rows h*G/Hkv ..) -> per KV head (qf_h, kf_h)."""
    g = qf.shape[0] // heads
    return [(qf[h * g:(h + 1) * g], kf[h * g:(h + 1) * g]) for h in range(heads)]


def _fused_front_end_applies(q: torch.Tensor, cfg: SketchWalkConfig) -> bool:
    """Whether `block_sketch` covers this prefill: mean_qk, block-mean keys, a kernel dtype, head_dim <= 256, a device it runs on."""
    from ..kernels._triton import interpreting

    return (cfg.head_aggregation == "mean_qk" and cfg.sub_blocks == 1 and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and q.shape[-1] <= 256 and (q.device.type == "cuda" or interpreting()))


def _pack_rows(selections: list[Optional[BlockSelection]], offsets: list[int], kv_len: int, selector: BlockSelector,
               decode: bool, device, heads: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch the per-sequence selections into the kernels' layout (None = all causal blocks).

    Prefill: indices [B, nqb, max_count], counts [B, nqb]; decode: indices [B, max_count], counts [B]; int32.
    With one selection per KV head (`heads` = Hkv) the indices gain a head axis after B.
    One sequence with a selection (the common case) passes its tensors through as views.
    """
    block_size = selector.cfg.block_size
    per_head = heads is not None
    nbs = [-(-(kv_len - off) // block_size) for off in offsets]
    if decode and len(selections) == 1 and nbs[0]:
        sel = selections[0]
        if sel is None:  # dense: every block of the row, from the cached tables
            nb = nbs[0]
            dense = selector.arange(nb, device, torch.int32)
            return (dense.expand(1, heads, nb) if per_head else dense[None]), selector.arange(nb + 1, device, torch.int32)[nb:]
        return (sel.indices[None, :, 0] if per_head else sel.indices), sel.counts
    if not decode and len(selections) == 1 and selections[0] is not None:
        return selections[0].indices[None], selections[0].counts[None]
    if (not per_head and decode and all(s is not None for s in selections)
            and len({s.indices.shape[1] for s in selections}) == 1):
        # Unpadded batch: every sequence is at the same block, so all rows have one width.
        return torch.cat([s.indices for s in selections]), torch.cat([s.counts for s in selections])
    rows = 1 if decode else max(nbs)
    width = max(nbs) if any(s is None for s in selections) else max(int(s.indices.shape[-1]) for s in selections)
    lead = (len(selections), heads) if per_head else (len(selections),)
    indices = torch.full((*lead, rows, max(width, 1)), -1, dtype=torch.int32, device=device)
    counts = torch.zeros(len(selections), rows, dtype=torch.int32, device=device)
    for b, (sel, nb) in enumerate(zip(selections, nbs)):
        if nb == 0:
            continue
        if sel is None:  # dense: every causal block of each row
            r = selector.arange(nb, device)
            dense = torch.where(r[None, :] <= r[:, None], r[None, :], -1)
            if decode:
                indices[b, ..., 0, :nb], counts[b, 0] = dense[-1], nb
            else:
                indices[b, ..., :nb, :nb], counts[b, :nb] = dense, r + 1
        else:
            indices[b, ..., :sel.indices.shape[-2], :sel.indices.shape[-1]] = sel.indices
            counts[b, :sel.counts.shape[0]] = sel.counts
    return (indices[..., 0, :], counts[:, 0]) if decode else (indices, counts)


def _attend_triton(q, k, v, pads: "_Pads", selections: Union[list[Optional[BlockSelection]], BatchedSelection],
                   selector: BlockSelector, scale: float) -> torch.Tensor:
    """The same attention as the reference path through the Triton kernels (one launch per layer)."""
    from ..kernels import block_sparse_decode, block_sparse_prefill

    kv_len, q_len = k.shape[-2], q.shape[-2]
    offsets = pads.host
    batched_rows = isinstance(selections, BatchedSelection)
    if q_len == kv_len and not pads.any and not batched_rows and all(s is None for s in selections):
        # A dense layer without padding: FlashAttention is the fastest exact kernel.
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                enable_gqa=q.shape[1] != k.shape[1])
    decode = q_len == 1 and kv_len > 1
    if batched_rows:  # already in the kernel's layout
        indices, counts = selections.indices, selections.counts
    elif decode and len(selections) > 1 and all(s is None for s in selections):
        # A dense decode layer of a batch: all rows at once from the device offsets (no per-sequence packing).
        max_blocks = -(-(kv_len - min(offsets)) // selector.cfg.block_size)
        indices, counts = dense_rows(pads.on(q.device), kv_len, max_blocks, selector)
    else:
        heads = k.shape[1] if selector.cfg.per_kv_head else None
        indices, counts = _pack_rows(selections, offsets, kv_len, selector, decode, q.device, heads)
    if decode:  # the decode launcher takes the offsets as a device tensor as they are (no copy)
        return block_sparse_decode(q.contiguous(), k.contiguous(), v.contiguous(), indices, counts,
                                   pads.on(q.device), selector.cfg.block_size, scale)
    # The prefill launcher sizes its grid from the host offsets and reads the device ones: no copy
    # either way, so a prefill forward holds no host-to-device copy of its own.
    # q goes in as the model made it (transformers' [B, Hq, N, d] is a transposed view of
    # [B, N, Hq, d]) and the output is laid out like it, so that neither the kernel's input nor the
    # model's `transpose(1, 2).contiguous()` of the output copies: two full [B, Hq, N, d] copies per
    # layer (~0.8 ms per layer at 32K on the 8B shape) that dense SDPA does not pay for its input.
    return block_sparse_prefill(q, k.contiguous(), v.contiguous(), indices, counts, pads.on(q.device),
                                selector.cfg.block_size, scale, offsets_host=offsets)


@dataclasses.dataclass
class _Pads:
    """Left-padding offsets of a batch: host ints (slicing, grid sizes) and, lazily, an int32 device copy."""

    host: list[int]
    device_offsets: Optional[torch.Tensor] = None  # int32 [batch], computed on the device (no copy)
    any: bool = False

    def on(self, device) -> torch.Tensor:
        if self.device_offsets is None or self.device_offsets.device != torch.device(device):
            # Only reached without a mask (all zeros): a fill, no host-to-device copy.
            self.device_offsets = torch.zeros(len(self.host), dtype=torch.int32, device=device)
        return self.device_offsets


class _PadCache:
    """The left-padding offsets of the current forward pass, read from the mask once per pass.

    Reading offsets needs a device->host copy (a sync), and every layer of a pass sees the same
    mask. A cached value is reused only within one pass (layer indices increasing) and for the
    same mask: same storage, shape, strides and version counter (an in-place edit bumps it). A
    new pass (the layer index does not increase: next decode step or new prefill) always
    re-reads, so a recycled allocation holding a different mask cannot be mistaken for the last.
    """

    def __init__(self):
        self._key = None
        self._last_layer = -1
        self._value: Optional[_Pads] = None
        self._no_mask: dict[tuple, _Pads] = {}

    def get(self, layer_idx: int, key_valid: Optional[torch.Tensor], bsz: int, kv_len: int, device) -> _Pads:
        same_pass = layer_idx > self._last_layer
        self._last_layer = layer_idx
        if key_valid is None:
            pads = self._no_mask.get((bsz, device))
            if pads is None:
                pads = self._no_mask[(bsz, device)] = _Pads([0] * bsz)
            return pads
        key = (key_valid.data_ptr(), key_valid.device, key_valid.dtype, tuple(key_valid.shape), key_valid.stride(),
               key_valid._version)
        if not (same_pass and key == self._key and self._value is not None):
            self._key, self._value = key, _left_pad_offsets(key_valid, kv_len)
        return self._value


def _left_pad_offsets(key_valid: torch.Tensor, kv_len: int) -> _Pads:
    """Number of left-padding tokens per sequence; refuses masks whose padding is not a prefix.

    key_valid: [batch, kv_len] bool. One device->host copy carries the offsets and the check.
    """
    kv = key_valid.to(torch.bool)
    offsets = kv_len - kv.sum(-1)
    pos = torch.arange(kv_len, device=kv.device)
    prefix = ((pos[None, :] >= offsets[:, None]) == kv).all()
    host = torch.cat([offsets, prefix.long()[None]]).tolist()
    if not host[-1]:
        raise ValueError("SketchWalk needs left padding (padding tokens as a prefix of each sequence); "
                         "got an attention mask with padding elsewhere (right padding or packed sequences)")
    offsets_host = host[:-1]
    return _Pads(offsets_host, offsets.to(torch.int32), any(offsets_host))
