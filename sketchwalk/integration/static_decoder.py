"""Decoding on a transformers StaticCache, each step optionally replayed from one CUDA graph.

An eager decode step of a small model is host-bound: the GPU waits for Python to launch ~10
kernels per layer (40-100 ms per step on an H200 host, dense and Sketch&Walk alike). A CUDA graph
replays a whole step's kernels from one launch, which needs every step to have the same shapes
and no host reads: a preallocated cache (transformers' StaticCache) and, with Sketch&Walk
attached, its static decode state (`SketchWalkRuntime.static_cache`, `method/static_decode.py`).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .hf import get_runtime
from .row_prefill import prefill_by_rows


class StaticDecoder:
    """prefill(ids) then step(token) on a StaticCache of `capacity` tokens, for the model as it is:
    dense, or with Sketch&Walk attached (whose config must support static decode; ValueError
    naming the field otherwise).

    graph=True (CUDA only): the first `warmup` steps run eagerly on a side stream (the first seeds
    the Sketch&Walk static state), the next is captured into one CUDA graph and replayed, and every
    later step is a replay: the token and the position go into the graph's static inputs. The
    logits returned by a replayed step are the graph's output buffer: valid until the next step.
    Use as a context manager (or call `close`) to leave the runtime's static mode and free the graph.

    prefill_rows: sequences per prefill forward (None = the whole batch in one): a long batch
    prefilled a few rows at a time (`row_prefill.prefill_by_rows`) needs the activations of those
    rows only, and decodes exactly as if prefilled at once.
    """

    def __init__(self, model: torch.nn.Module, batch: int, capacity: int, graph: bool = False, warmup: int = 2,
                 prefill_rows: Optional[int] = None):
        from transformers import StaticCache

        if batch < 1 or capacity < 2:
            raise ValueError(f"batch = {batch}, capacity = {capacity}: need batch >= 1 and capacity >= 2 tokens")
        if prefill_rows is not None and prefill_rows < 1:
            raise ValueError(f"prefill_rows = {prefill_rows}: need at least one sequence per prefill forward (or None)")
        self.prefill_rows = batch if prefill_rows is None else min(prefill_rows, batch)
        self.model, self.batch, self.capacity = model, batch, capacity
        self.device = next(model.parameters()).device
        if graph and self.device.type != "cuda":
            raise ValueError("graph=True needs the model on a CUDA device")
        self.graph, self.warmup = graph, max(1, warmup)
        self.cache = StaticCache(config=model.config, max_cache_len=capacity)
        self.length = 0  # tokens in the cache
        self._steps = 0
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        self._token: Optional[torch.Tensor] = None
        self._position: Optional[torch.Tensor] = None
        self._logits: Optional[torch.Tensor] = None
        self._stack = contextlib.ExitStack()
        runtime = get_runtime(model)
        if runtime is not None:
            self._stack.enter_context(runtime.static_cache(capacity))

    def __enter__(self) -> "StaticDecoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Leave the runtime's static mode, drop the graph and the cache."""
        self._graph = None
        self._logits = self._token = self._position = None
        self._stack.close()
        self.cache = None

    def _forward(self, ids: torch.Tensor, position: torch.Tensor, cache=None) -> torch.Tensor:
        """Logits [B, vocab] of the last of ids [B, q] at cache positions `position` [q] (on `cache`,
        default this decoder's)."""
        out = self.model(input_ids=ids, past_key_values=self.cache if cache is None else cache, cache_position=position,
                         position_ids=position[None].expand(ids.shape[0], -1), use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Prefill an unpadded batch ids [B, n] (n < capacity) into the empty cache: logits [B, vocab]."""
        if ids.dim() != 2 or ids.shape[0] != self.batch:
            raise ValueError(f"ids must be [batch={self.batch}, n], got {tuple(ids.shape)}")
        n = ids.shape[1]
        if not 1 <= n < self.capacity:
            raise ValueError(f"a prompt of {n} tokens needs 1 <= n < capacity = {self.capacity}")
        if self.length:
            raise ValueError("this decoder's cache is in use: one prefill per StaticDecoder")
        ids, position = ids.to(self.device), torch.arange(n, device=self.device)
        if self.prefill_rows < self.batch:
            from transformers import StaticCache

            logits = prefill_by_rows(self.model, ids, self.prefill_rows, self.cache,
                                     lambda: StaticCache(config=self.model.config, max_cache_len=self.capacity),
                                     lambda chunk, part: self._forward(chunk, position, part))
        else:
            logits = self._forward(ids, position)
        self.length = n
        return logits

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """One decode step of token [B] (or [B, 1]) at the next position: logits [B, vocab]."""
        if not self.length:
            raise ValueError("prefill first")
        if self.length >= self.capacity:
            raise ValueError(f"the static cache is full ({self.capacity} tokens)")
        token = token.reshape(self.batch, 1).to(self.device)
        n = self.length
        self.length += 1
        self._steps += 1
        if not self.graph:
            return self._forward(token, torch.tensor([n], device=self.device))
        if self._graph is not None:
            self._token.copy_(token)
            self._position.fill_(n)
            self._graph.replay()
            return self._logits
        if self._steps <= self.warmup:  # eager, on a side stream as capture wants (lazy inits, allocator)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                logits = self._forward(token, torch.tensor([n], device=self.device))
            torch.cuda.current_stream(self.device).wait_stream(side)
            return logits
        self._token, self._position = token.clone(), torch.tensor([n], device=self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._logits = self._forward(self._token, self._position)
        self._graph = graph
        graph.replay()  # a capture records the step without running it
        return self._logits
