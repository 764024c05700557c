"""`SketchWalkRuntime`: runs one model's attention layers with Sketch&Walk (the PyTorch reference path).

One runtime per attached model. It owns the walk state of the current forward pass (reset at
the first sparse layer), the per-layer decode states of each sequence (reset at every new
prefill) and the measured density counters. Batches are processed one sequence at a time on
its real (non-padded) tokens, so block boundaries follow real token positions and padded keys
can never be selected or attended.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..config import SketchWalkConfig
from .attention import sparse_attention
from .decode_state import LayerDecodeState
from .scores import group_features, sketch_features, transition_rows
from .selection import BlockSelection, select_blocks
from .sketch import block_means
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
    """Per-model Sketch&Walk state and the batched attention entry point."""

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
        self._states: dict[int, list[Optional[LayerDecodeState]]] = {}
        self._pairs: dict[str, dict[int, list[int]]] = {"prefill": {}, "decode": {}}
        self._dense_layers: dict[str, set[int]] = {"prefill": set(), "decode": set()}
        self.last_selection: dict[int, list[Optional[BlockSelection]]] = {}
        self.keep_selections = False

    # -- bookkeeping ------------------------------------------------------------------
    def reset(self) -> None:
        """Forget all sequence state and density counters."""
        self._walk, self._states = [], {}
        self.reset_stats()

    def reset_stats(self) -> None:
        """Zero the density counters (e.g. between evaluation samples)."""
        self._pairs = {"prefill": {}, "decode": {}}
        self._dense_layers = {"prefill": set(), "decode": set()}
        self.last_selection = {}

    def _count(self, phase: str, layer: int, selected: int, causal: int, dense: bool) -> None:
        acc = self._pairs[phase].setdefault(layer, [0, 0])
        acc[0] += selected
        acc[1] += causal
        if dense:
            self._dense_layers[phase].add(layer)

    def density(self) -> DensityReport:
        """The measured density since the last reset_stats()."""
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

    # -- the attention entry point ----------------------------------------------------
    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
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
        offsets = _left_pad_offsets(key_valid, bsz, kv_len, q.device)
        phase = "prefill" if past == 0 else "decode"
        sparse_layer = layer_idx >= cfg.skip_layers
        sparse = sparse_layer and (cfg.sparse_prefill if phase == "prefill" else cfg.sparse_decode)
        if layer_idx == cfg.skip_layers:
            self._walk = [None] * bsz  # a new forward pass starts its walk here
        if phase == "prefill":
            self._states[layer_idx] = [None] * bsz
        if self.keep_selections:
            self.last_selection[layer_idx] = [None] * bsz

        # Selection (and decode state) per sequence on its real tokens; then one attention call.
        selections: list[Optional[BlockSelection]] = []
        for b in range(bsz):
            off = offsets[b]
            qs, ks = q[b, :, max(off - past, 0):], k[b, :, off:]
            if ks.shape[-2] == 0:
                selections.append(None)
            elif phase == "prefill":
                selections.append(self._prefill_select(layer_idx, b, qs, ks, sparse_layer, sparse))
            else:
                selections.append(self._decode_select(layer_idx, b, qs, ks, sparse))
        return self._attend(q, k, v, offsets, selections, scale)

    def uses_triton(self, device: torch.device) -> bool:
        """Whether attention runs in the Triton kernels: `triton`, or `auto` on a CUDA device."""
        return self.backend == "triton" or (self.backend == "auto" and device.type == "cuda")

    def _attend(self, q, k, v, offsets: list[int], selections: list[Optional[BlockSelection]], scale: float) -> torch.Tensor:
        """Attention of each sequence's real queries over its selected blocks (None = dense causal).

        q: [batch, Hq, q_len, d]; k, v: [batch, Hkv, kv_len, d] -> [batch, Hq, q_len, d].
        """
        if self.uses_triton(q.device):
            return _attend_triton(q, k, v, offsets, selections, self.config.block_size, scale)
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
    def _prefill_select(self, layer: int, b: int, q, k, sparse_layer: bool, sparse: bool) -> Optional[BlockSelection]:
        """Selection for a prefill of one sequence (q: [Hq, m, d], k: [Hkv, m, d]); None = dense. Seeds decode state."""
        cfg = self.config
        m, d = k.shape[-2], k.shape[-1]
        nb = -(-m // cfg.block_size)
        causal_pairs = nb * (nb + 1) // 2
        needs_state = sparse_layer and cfg.sparse_decode
        if not sparse and not needs_state:
            self._count("prefill", layer, causal_pairs, causal_pairs, dense=True)
            return None
        qf, kf = group_features(q, k, cfg)
        rows = torch.arange(nb, device=q.device)
        w = transition_rows(sketch_features(block_means(qf, cfg.block_size), cfg, layer),
                            sketch_features(block_means(kf, cfg.block_size), cfg, layer), rows, d, cfg)
        if needs_state:
            self._states[layer][b] = LayerDecodeState(cfg, layer, d, qf, kf, w)
        if not sparse:
            self._count("prefill", layer, causal_pairs, causal_pairs, dense=True)
            return None
        r = walk_update(self._walk[b], w, rows, cfg)
        self._walk[b] = r
        sel = select_blocks(r, rows, cfg)
        self._record(layer, b, sel)
        self._count("prefill", layer, int(sel.selected_pairs()), causal_pairs, dense=False)
        return sel

    def _decode_select(self, layer: int, b: int, q, k, sparse: bool) -> Optional[BlockSelection]:
        """Selection for one decode step of one sequence (q: [Hq, 1, d], k: [Hkv, m, d]); None = dense."""
        cfg = self.config
        m = k.shape[-2]
        i = (m - 1) // cfg.block_size
        if not sparse:
            self._count("decode", layer, i + 1, i + 1, dense=True)
            return None
        states = self._states.get(layer)
        state = states[b] if states is not None and b < len(states) else None
        if state is None or state.n_tokens != m - 1:
            raise RuntimeError(
                f"SketchWalk decode state of layer {layer} is out of sync with the KV cache (cache has {m - 1} "
                f"earlier tokens, state has {None if state is None else state.n_tokens}); start sequences with a prefill")
        qf, kf = group_features(q, k[:, -1:], cfg)
        state.append(qf[:, 0], kf[:, 0])
        w = state.transition_with_current_row(qf[:, 0])
        row = torch.tensor([i], device=q.device)
        r = walk_update(self._walk[b], w, row, cfg)
        self._walk[b] = r
        sel = select_blocks(r, row, cfg)
        self._record(layer, b, sel)
        self._count("decode", layer, int(sel.counts.sum()), i + 1, dense=False)
        return sel

    def _record(self, layer: int, b: int, sel: BlockSelection) -> None:
        if self.keep_selections:
            self.last_selection[layer][b] = sel


def _pack_rows(selections: list[Optional[BlockSelection]], offsets: list[int], kv_len: int, block_size: int,
               decode: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch the per-sequence selections into the kernels' layout (None = all causal blocks).

    Prefill: indices [B, nqb, max_count], counts [B, nqb]; decode: indices [B, max_count], counts [B].
    """
    nbs = [-(-(kv_len - off) // block_size) for off in offsets]
    rows = 1 if decode else max(nbs)
    width = max(nbs) if any(s is None for s in selections) else max(int(s.indices.shape[1]) for s in selections)
    indices = torch.full((len(selections), rows, max(width, 1)), -1, dtype=torch.int32, device=device)
    counts = torch.zeros(len(selections), rows, dtype=torch.int32, device=device)
    for b, (sel, nb) in enumerate(zip(selections, nbs)):
        if nb == 0:
            continue
        if sel is None:  # dense: every causal block of each row
            r = torch.arange(nb, device=device)
            dense = torch.where(r[None, :] <= r[:, None], r[None, :], torch.full_like(r[None, :], -1))
            if decode:
                indices[b, 0, :nb], counts[b, 0] = dense[-1], nb
            else:
                indices[b, :nb, :nb], counts[b, :nb] = dense, r + 1
        else:
            indices[b, :sel.indices.shape[0], :sel.indices.shape[1]] = sel.indices
            counts[b, :sel.counts.shape[0]] = sel.counts
    return (indices[:, 0], counts[:, 0]) if decode else (indices, counts)


def _attend_triton(q, k, v, offsets: list[int], selections: list[Optional[BlockSelection]], block_size: int,
                   scale: float) -> torch.Tensor:
    """The same attention as the reference path through the Triton kernels (one launch per layer)."""
    from ..kernels import block_sparse_decode, block_sparse_prefill

    kv_len, q_len = k.shape[-2], q.shape[-2]
    if q_len == kv_len and not any(offsets) and all(s is None for s in selections):
        # A dense layer without padding: FlashAttention is the fastest exact kernel.
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                enable_gqa=q.shape[1] != k.shape[1])
    decode = q_len == 1 and kv_len > 1
    indices, counts = _pack_rows(selections, offsets, kv_len, block_size, decode, q.device)
    kernel = block_sparse_decode if decode else block_sparse_prefill
    return kernel(q.contiguous(), k.contiguous(), v.contiguous(), indices, counts, offsets, block_size, scale)


def _left_pad_offsets(key_valid: Optional[torch.Tensor], bsz: int, kv_len: int, device) -> list[int]:
    """Number of left-padding tokens per sequence; refuses masks whose padding is not a prefix."""
    if key_valid is None:
        return [0] * bsz
    kv = key_valid.to(torch.bool)
    n_valid = kv.sum(-1)
    offsets = kv_len - n_valid
    pos = torch.arange(kv_len, device=kv.device)
    expected = pos[None, :] >= offsets[:, None]
    if not torch.equal(expected, kv):
        raise ValueError("SketchWalk needs left padding (padding tokens as a prefix of each sequence); "
                         "got an attention mask with padding elsewhere (right padding or packed sequences)")
    return offsets.tolist()
