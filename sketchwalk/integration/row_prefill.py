"""Prefill a batch a few rows at a time into one KV cache.

A prefill forward of [B, n] tokens holds the activations of all B * n tokens at once (the MLP's
[B, n, intermediate] tensors dominate: about 68 GiB at B = 8, n = 64K on the Llama-3.1-8B shape),
while the KV cache it leaves is far smaller than that. Prefilling chunks of rows, each into a cache
of its own, and copying each chunk's keys and values into the batch's cache needs the activations
of one chunk only: how a long-context decode at batch 8 gets its cache on one GPU. With Sketch&Walk
attached, the chunks' decode states are joined too, so the next decode step continues every row
as if the batch had been prefilled at once (the rows of a prefill never interact).
"""
from __future__ import annotations

from typing import Callable

import torch

from .hf import get_runtime


def _is_static(layer) -> bool:
    from transformers.cache_utils import StaticLayer

    if getattr(layer, "is_sliding", False):
        raise ValueError("a row-chunked prefill supports full-attention cache layers only (got a sliding one)")
    return isinstance(layer, StaticLayer)


def prefill_by_rows(model: torch.nn.Module, ids: torch.Tensor, rows: int, target,
                    new_cache: Callable[[], object],
                    forward: Callable[[torch.Tensor, object], torch.Tensor]) -> torch.Tensor:
    """Prefill ids [B, n] into `target` (an empty transformers DynamicCache or StaticCache) in chunks
    of `rows` sequences; returns the last-position logits [B, vocab].

    new_cache(): an empty cache of target's kind for one chunk (a StaticCache of the same
    capacity); forward(chunk_ids [r, n], chunk_cache) -> logits [r, vocab]: the model's prefill
    call on that cache. Each chunk's cache is dropped once copied, so the peak is the target plus
    one chunk's cache and activations.
    """
    if ids.dim() != 2 or ids.shape[0] < 1:
        raise ValueError(f"ids must be [batch >= 1, n], got {tuple(ids.shape)}")
    if rows < 1:
        raise ValueError(f"rows = {rows}: need at least one sequence per prefill forward")
    bsz = ids.shape[0]
    runtime = get_runtime(model)
    logits, states = [], []
    dynamic: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> [B, H, n, d] keys, values
    for start in range(0, bsz, rows):
        part = new_cache()
        logits.append(forward(ids[start:start + rows], part))
        if runtime is not None:
            states.append(runtime.prefill_states())
        stop = start + logits[-1].shape[0]
        for i, layer in enumerate(part.layers):
            k, v = layer.keys, layer.values
            if _is_static(layer):
                dest = target.layers[i]
                if not dest.is_initialized:  # allocates the [B, H, capacity, d] buffers (zeros)
                    dest.lazy_initialization(k.new_empty((bsz, *k.shape[1:2], 0, k.shape[-1])),
                                             v.new_empty((bsz, *v.shape[1:2], 0, v.shape[-1])))
                dest.keys[start:stop].copy_(k)
                dest.values[start:stop].copy_(v)
                if hasattr(dest, "cumulative_length"):  # where the next update writes
                    dest.cumulative_length.copy_(layer.cumulative_length)
            else:
                if i not in dynamic:
                    dynamic[i] = (k.new_empty((bsz, *k.shape[1:])), v.new_empty((bsz, *v.shape[1:])))
                dynamic[i][0][start:stop].copy_(k)
                dynamic[i][1][start:stop].copy_(v)
        del part
    for i in sorted(dynamic):
        target.update(*dynamic.pop(i), i)  # one layer's copy at a time: the buffers go as they are taken
    if runtime is not None:
        runtime.adopt_prefill_states(states)
    return torch.cat(logits)

