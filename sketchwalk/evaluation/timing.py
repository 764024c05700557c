"""Timing that is honest on asynchronous devices: wall clocks with synchronisation, per-token
clocks inside `generate()`, bare prefill forwards, and per-layer attention timers."""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable, Optional

import torch


def synchronize(device: torch.device) -> None:
    """Wait for all queued work on `device` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: Bare prefill forwards per timed sample on CUDA (`prefill_forward_s`); 0 on CPU, where speed is
#: not measured for its own sake and each forward costs seconds.
PREFILL_FORWARD_REPEATS = 5


def prefill_forward_s(model: torch.nn.Module, ids: torch.Tensor, repeats: int) -> float:
    """Median seconds of `repeats` bare prefill forwards of `ids` ([1, prompt_tokens]): the model
    call generate() makes first (KV cache built, logits of the last position only), without
    generate()'s per-call host work. CUDA events around each forward on GPU, wall time on CPU.

    Why: for a small model the host work of a generate() call (cache and processor setup, Python)
    is most of its time to first token and jitters run to run, drowning what the attention config
    changes; the bare forward is what the config changes.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    cuda = ids.device.type == "cuda"
    mask = torch.ones_like(ids)
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            if cuda:
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            else:
                t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
            if cuda:
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop) / 1000.0)
            else:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


class TokenClock:
    """A `generate(streamer=...)` streamer that timestamps every new token.

    generate() calls put() once with the prompt, then once per generated token right after the
    step that produced it. Synchronising there makes each timestamp the moment the token exists
    (generate syncs every step anyway for its stopping check, so this adds nothing material).
    Use `start()` right before generate(); then prefill_s = first token - start (time to first
    token) and decode_s = last token - first token, covering new_tokens - 1 decode steps.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.t0 = 0.0
        self.stamps: list[float] = []
        self._prompt_seen = False

    def start(self) -> None:
        synchronize(self.device)
        self.stamps, self._prompt_seen = [], False
        self.t0 = time.perf_counter()

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first call carries the prompt, not a new token
            self._prompt_seen = True
            return
        synchronize(self.device)
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    @property
    def prefill_s(self) -> float:
        return self.stamps[0] - self.t0 if self.stamps else float("nan")

    @property
    def decode_s(self) -> float:
        return self.stamps[-1] - self.stamps[0] if len(self.stamps) > 1 else float("nan")


class AttentionTimer:
    """Times the attention function alone, per layer and phase, by wrapping the registered one.

    transformers looks the attention function up in ALL_ATTENTION_FUNCTIONS by
    `config._attn_implementation` on every forward, so swapping that entry for a timing wrapper
    measures exactly the attention kernel (no projections, no RoPE). 'eager' is not looked up
    there, so it is not measurable (`measurable` is False and nothing is recorded). GPU: CUDA
    events around each call, read after the sample; CPU: wall time.
    Records per (phase, layer) the seconds of every call; `medians()` -> {phase: {layer: s}}.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.device = model, device
        self.name = model.config._attn_implementation
        self.measurable = self.name not in (None, "eager")
        self.calls: dict[str, dict[int, list[float]]] = {"prefill": {}, "decode": {}}
        self._pending: list[tuple[str, int, Any, Any]] = []
        self._original: Optional[Callable] = None
        self._suspended = False

    def __enter__(self) -> "AttentionTimer":
        if not self.measurable:
            return self
        from transformers import AttentionInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self._original = ALL_ATTENTION_FUNCTIONS[self.name]
        original, cuda = self._original, self.device.type == "cuda"

        def timed(module, query, key, value, *args, **kwargs):
            if self._suspended:
                return original(module, query, key, value, *args, **kwargs)
            phase = "prefill" if query.shape[-2] == key.shape[-2] else "decode"
            layer = int(getattr(module, "layer_idx", -1))
            if cuda:
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = original(module, query, key, value, *args, **kwargs)
                stop.record()
                self._pending.append((phase, layer, start, stop))
                return out
            t0 = time.perf_counter()
            out = original(module, query, key, value, *args, **kwargs)
            self.calls[phase].setdefault(layer, []).append(time.perf_counter() - t0)
            return out

        AttentionInterface.register(self.name, timed)
        return self

    @contextlib.contextmanager
    def suspended(self):
        """Within: attention calls run unrecorded (forwards that are timed some other way)."""
        self._suspended = True
        try:
            yield
        finally:
            self._suspended = False

    def collect(self) -> None:
        """Read the CUDA events recorded so far (synchronises); a no-op on CPU."""
        if self._pending:
            synchronize(self.device)
            for phase, layer, start, stop in self._pending:
                self.calls[phase].setdefault(layer, []).append(start.elapsed_time(stop) / 1000.0)
            self._pending.clear()

    def __exit__(self, *exc) -> None:
        if self._original is not None:
            from transformers import AttentionInterface

            AttentionInterface.register(self.name, self._original)
            self._original = None
        self.collect()

    def medians(self) -> dict[str, dict[str, float]]:
        """{phase: {layer: median seconds per attention call}}; {} when not measurable."""
        return {phase: {str(layer): statistics.median(ts) for layer, ts in sorted(layers.items())}
                for phase, layers in self.calls.items() if layers}
