"""`sketchwalk bench e2e`: whole-model speed, dense (the model's SDPA path) vs Sketch&Walk configs.

Per model (a random-weight shape from `e2e_plan.MODEL_SHAPES` / a config.json, or a real model),
length n and config:
  prefill  the bare prefill forward of [1, n] random token ids with a KV cache and logits_to_keep=1
           (the call generate() makes first);
  decode   one decode step ([batch, 1] ids) on the cache a [batch, n] prefill built: the median of
           `repeats` consecutive steps (the cache grows by one token per step, as in generate()).
Times: CUDA events, median of `repeats` calls after `warmup` untimed ones; on the CPU wall time
(labelled "cpu": a test of the code path, not a measurement).
With --graphs (CUDA), each row also gets `ms_graph` (and `speedup_graph` against dense's): the
prefill forward captured in one CUDA graph and replayed, or one decode step replayed from a CUDA
graph on a StaticCache (`integration.static_decoder`; Sketch&Walk on its static decode state) —
the same call without the host's launch overhead. A row that cannot be captured says why in
`graph_error` (e.g. a config the static decode does not cover).

Breakdown (a second, instrumented set of the same calls, per forward, median over calls), in ms:
  attention_ms  the attention kernels: the model's SDPA call (dense), or `SketchWalkRuntime._attend`
                (the block-sparse kernel with its row packing, or FlashAttention on dense layers);
  frontend_ms   the rest of the attention function: the selection front end (0 for dense);
  rest_ms       ms - attention_ms - frontend_ms: projections, MLP, norms, the head, host work;
  bound_ms      ms_dense - attention_ms_dense + attention_ms: the model time our kernels allow,
                with a free front end; speedup_bound = ms_dense / bound_ms.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Optional

import torch

from ..config import ConfigError, SketchWalkConfig
from ..model_shape import model_shape
from .e2e_plan import E2ESettings, ModelShape, PlanError, check_memory
from .kernels import _k, _ms, _x, _f, rich_table, write_json


# -- timing -----------------------------------------------------------------------------------

def time_ms(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> float:
    """Median milliseconds of `repeats` calls of fn after `warmup` untimed ones (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


class PhaseTimer:
    """Per-forward milliseconds of the attention function and of the attention kernels inside it.

    Wraps the registered transformers attention function (looked up by `config._attn_implementation`
    on every forward) and, with Sketch&Walk attached, the runtime's `_attend` (the kernel call).
    `forward()` brackets one model call; `medians()` -> (attention_fn_ms, kernel_ms) per forward.
    """

    def __init__(self, model: torch.nn.Module, runtime, device: torch.device):
        self.model, self.runtime, self.device = model, runtime, device
        self.name = model.config._attn_implementation
        self._fn: list[list] = []
        self._kernel: list[list] = []
        self._original = None

    def _span(self, sink: list, fn, *args, **kwargs):
        if self.device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args, **kwargs)
            stop.record()
            sink[-1].append((start, stop))
        else:
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sink[-1].append(1e3 * (time.perf_counter() - t0))
        return out

    def __enter__(self) -> "PhaseTimer":
        from transformers import AttentionInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if self.name not in ALL_ATTENTION_FUNCTIONS:
            raise ValueError(f"attention implementation {self.name!r} is not timeable (use sdpa)")
        self._original = original = ALL_ATTENTION_FUNCTIONS[self.name]
        AttentionInterface.register(self.name, lambda *a, **kw: self._span(self._fn, original, *a, **kw))
        if self.runtime is not None:
            attend = self.runtime._attend
            self.runtime._attend = lambda *a, **kw: self._span(self._kernel, attend, *a, **kw)
        return self

    def forward(self, fn: Callable[[], Any]) -> Any:
        self._fn.append([])
        self._kernel.append([])
        return fn()

    def __exit__(self, *exc) -> None:
        from transformers import AttentionInterface

        AttentionInterface.register(self.name, self._original)
        if self.runtime is not None:
            del self.runtime._attend  # the instance attribute: the class method again

    def _total(self, spans: list) -> float:
        if self.device.type == "cuda":
            return sum(a.elapsed_time(b) for a, b in spans)
        return sum(spans)

    def medians(self) -> tuple[float, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        fn = statistics.median(self._total(s) for s in self._fn)
        kernel = statistics.median(self._total(s) for s in self._kernel) if self.runtime is not None else fn
        return fn, kernel


# -- rows -------------------------------------------------------------------------------------

def derive(row: dict, dense: dict) -> dict:
    """The derived fields of a row from its own times and its dense row's (same shape, n, batch, phase)."""
    row["ms_dense"] = dense["ms"]
    row["speedup"] = dense["ms"] / row["ms"] if row["ms"] else None
    row["rest_ms"] = row["ms"] - row["attention_ms"] - row["frontend_ms"]
    row["bound_ms"] = dense["ms"] - dense["attention_ms"] + row["attention_ms"]
    row["speedup_bound"] = dense["ms"] / row["bound_ms"] if row["bound_ms"] > 0 else None
    row["frontend_pct_of_attention"] = 100.0 * row["frontend_ms"] / row["attention_ms"] if row["attention_ms"] else None
    if "ms_graph" in row:  # both captured the same way: the speedup without host launch overhead
        row["ms_dense_graph"] = dense.get("ms_graph")
        row["speedup_graph"] = (row["ms_dense_graph"] / row["ms_graph"]
                                if row["ms_graph"] and row["ms_dense_graph"] else None)
    return row


@dataclasses.dataclass
class Variant:
    """One timed attention setup: dense (config None) or a Sketch&Walk config."""

    label: str
    config: Optional[SketchWalkConfig]


def variants(settings: E2ESettings, head_dim: int) -> list[Variant]:
    """dense, then d=<density> for each --density, then each --config file (by its stem)."""
    out = [Variant("dense", None)]
    extra = {} if settings.block_size is None else {"block_size": settings.block_size}
    for d in settings.density:
        out.append(Variant(f"d={d:g}", SketchWalkConfig(density=d, sketch_dim=min(64, head_dim), **extra)))
    for path in settings.configs:
        out.append(Variant(os.path.splitext(os.path.basename(path))[0], SketchWalkConfig.from_yaml(path)))
    return out


def _why(exc: BaseException) -> str:
    """One line for a row's `graph_error`: the exception's type and the first line of its message."""
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {(lines[0] if lines else '')[:300]}"


@contextlib.contextmanager
def causal_mask_skipped_under_capture():
    """Within: an unpadded full prefill builds no attention mask, during a CUDA-graph capture too.

    transformers (5.17, the GPU's version) never skips the mask while a stream is capturing, since
    it cannot read a padding mask there, and builds a full 4-D one even when there is no padding
    mask to read. That sends dense SDPA off its flash kernel (a 32K capture ran 3x slower than
    eager) and makes Sketch&Walk read left-pad offsets on the host, which a capture refuses. With
    no padding mask, no cache offset and the plain causal mask function, causal is the whole mask:
    the eager call's skip, restored. SDPA's mask function is wrapped (under every name it is
    registered as) and put back on exit.
    """
    from transformers import masking_utils
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    # Only SDPA's mask function (which `sketchwalk` registers too): None means "causal" to SDPA and
    # to our runtime, while the eager path would read it as "no mask at all".
    sdpa = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    saved = {name: fn for name, fn in list(ALL_MASK_ATTENTION_FUNCTIONS.items()) if fn is sdpa}

    def skipping(fn):
        def mask(*args, **kwargs):
            if (not args and kwargs.get("attention_mask") is None and kwargs.get("allow_is_causal_skip", False)
                    and kwargs.get("mask_function", masking_utils.causal_mask_function) is masking_utils.causal_mask_function
                    and kwargs.get("local_size") is None and kwargs.get("q_length") == kwargs.get("kv_length")
                    and isinstance(kwargs.get("q_offset", 0), int) and kwargs.get("q_offset", 0) == 0):
                return None
            return fn(*args, **kwargs)
        return mask

    for name, fn in saved.items():
        AttentionMaskInterface.register(name, skipping(fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            AttentionMaskInterface.register(name, fn)


# A decode row's cache is prefilled one sequence per forward (`row_prefill`): batch 8 at 64K on the
# 8B shape needs ~9 GiB of prefill activations instead of ~68 GiB, and decodes the same.
DECODE_PREFILL_ROWS = 1


class Bench:
    """The model under test and how to time its prefill and decode calls: the median of `repeats`
    timed calls after `warmup` untimed ones, on random token ids drawn from `seed`."""

    def __init__(self, model, name: str, device: torch.device, *, repeats: int, warmup: int, seed: int):
        self.model, self.name, self.device = model, name, device
        self.repeats, self.warmup = repeats, warmup
        self.vocab = model.config.vocab_size
        self.gen = torch.Generator(device="cpu").manual_seed(seed)

    def ids(self, batch: int, n: int) -> torch.Tensor:
        return torch.randint(0, self.vocab, (batch, n), generator=self.gen).to(self.device)

    def _prefill(self, ids):
        return self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)

    def _decode_cache(self, ids):
        """The DynamicCache a decode row starts from: its [batch, n] prefill, one sequence per forward
        (DECODE_PREFILL_ROWS), so that a long batch needs one sequence's prefill activations."""
        from transformers import DynamicCache

        from ..integration.row_prefill import prefill_by_rows

        if ids.shape[0] <= DECODE_PREFILL_ROWS:
            return self._prefill(ids).past_key_values
        cache = DynamicCache()
        prefill_by_rows(self.model, ids, DECODE_PREFILL_ROWS, cache, DynamicCache,
                        lambda chunk, part: self.model(input_ids=chunk, attention_mask=torch.ones_like(chunk),
                                                       past_key_values=part, use_cache=True,
                                                       logits_to_keep=1).logits[:, -1])
        return cache

    def graphed_prefill_ms(self, n: int, batch: int) -> tuple[Optional[float], Optional[str]]:
        """(ms, None) of the prefill forward replayed from one CUDA graph, or (None, why) when it cannot
        be captured. CUDA only. No attention mask: a mask is read on the host once per forward (the
        left-pad offsets), which a capture cannot hold, and an unpadded batch needs none."""
        ids = self.ids(batch, n)
        call = lambda: self.model(input_ids=ids, use_cache=True, logits_to_keep=1)  # noqa: E731
        graph = None
        try:
            with torch.no_grad(), causal_mask_skipped_under_capture():
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):  # eager calls first: tables and kernels cached before capture
                    for _ in range(max(self.warmup, 1)):
                        call()
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    call()
                return time_ms(graph.replay, self.repeats, self.warmup, self.device), None
        except Exception as exc:  # a capture failure is a measured fact of the row, not a crash
            torch.cuda.synchronize(self.device)
            return None, _why(exc)
        finally:
            del graph

    def graphed_decode_ms(self, n: int, batch: int) -> tuple[Optional[float], Optional[str]]:
        """(ms, None) of one decode step replayed from a CUDA graph on a StaticCache holding a [batch, n]
        prefill (the cache grows by one token per step, as in generate()), or (None, why) when the
        step cannot be captured (a config the static decode does not cover, a capture failure). CUDA only."""
        from ..integration.static_decoder import StaticDecoder

        steps = 2 + self.warmup + self.repeats  # eager warm-up and capture, then the timed replays
        try:
            with torch.no_grad(), StaticDecoder(self.model, batch, n + steps + 1, graph=True,
                                                prefill_rows=DECODE_PREFILL_ROWS) as dec:
                logits = dec.prefill(self.ids(batch, n))
                token = logits.argmax(-1)
                for _ in range(3):  # two eager steps (the first seeds the static state), the capture
                    token = dec.step(token).argmax(-1)
                return time_ms(lambda: dec.step(token), self.repeats, self.warmup, self.device), None
        except Exception as exc:  # a refusal or a capture failure is a measured fact of the row
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return None, _why(exc)

    def measure(self, phase: str, n: int, batch: int, runtime, breakdown: bool = True) -> tuple[float, float, float]:
        """(ms, attention-function ms, kernel ms) of one call of `phase` at length n, batch; without
        `breakdown` the instrumented second set of calls is skipped and both parts are NaN."""
        nan = (float("nan"), float("nan"))
        with torch.no_grad():
            if phase == "prefill":
                ids = self.ids(batch, n)
                call = lambda: self._prefill(ids)  # noqa: E731
                ms = time_ms(call, self.repeats, self.warmup, self.device)
                if not breakdown:
                    return (ms, *nan)
                with PhaseTimer(self.model, runtime, self.device) as pt:
                    for _ in range(self.repeats):
                        pt.forward(call)
                return (ms, *pt.medians())
            # The cache lives in a dict so that the timed closure and the release below share it.
            state = {"len": n, "cache": self._decode_cache(self.ids(batch, n))}
            token = self.ids(batch, 1)

            def step():
                state["len"] += 1
                mask = torch.ones(batch, state["len"], dtype=torch.long, device=self.device)
                return self.model(input_ids=token, attention_mask=mask, past_key_values=state["cache"], use_cache=True,
                                  logits_to_keep=1)

            ms = time_ms(step, self.repeats, self.warmup, self.device)
            if not breakdown:
                state.clear()
                return (ms, *nan)
            with PhaseTimer(self.model, runtime, self.device) as pt:
                for _ in range(self.repeats):
                    pt.forward(step)
            state.clear()
            return (ms, *pt.medians())


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def free_memory_bytes(device: torch.device) -> int:
    """Bytes free on the device: CUDA's mem_get_info, or the host's available memory on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 2 ** 62


def plan_rows(settings: E2ESettings) -> list[tuple[str, int, int]]:
    """(phase, n, batch) in run order: prefill (batch 1) at each --seq, decode at each --decode-seq x --batch."""
    return ([("prefill", n, 1) for n in settings.seq]
            + [("decode", n, b) for n in settings.decode_seq for b in settings.decode_batch])


def decode_state_need(shape: ModelShape, settings: E2ESettings, n: int, phase: str = "decode") -> int:
    """Bytes per sequence of the largest Sketch&Walk decode state among the run's configs after an
    n-token prefill (a prefill builds it too); a decode row's is doubled with --graphs, where the
    static state is built beside the eager one."""
    from ..method.batched_decode import decode_state_bytes

    configs = [v.config for v in variants(settings, shape.head_dim)[1:]]
    need = max((decode_state_bytes(c, shape.fields["num_hidden_layers"], shape.fields["num_attention_heads"],
                                   shape.head_dim, n) for c in configs), default=0)
    return 2 * need if settings.graphs and phase == "decode" else need


def check_plan(shape: ModelShape, settings: E2ESettings, elem_bytes: int, free: int) -> tuple[list, list]:
    """(rows that fit, skipped rows); raises PlanError when an explicitly requested row does not fit."""
    keep, skipped = [], []
    for phase, n, batch in plan_rows(settings):
        state = decode_state_need(shape, settings, n, phase)
        err = check_memory(shape, n, batch, elem_bytes, free, settings.repeats + settings.warmup, state,
                           prefill_rows=DECODE_PREFILL_ROWS if phase == "decode" else None)
        if err is None:
            keep.append((phase, n, batch))
        elif settings.explicit_sizes:
            raise err
        else:
            skipped.append(dict(shape=shape.name, phase=phase, n=n, batch=batch, reason=str(err)))
    return keep, skipped


def build_model(shape: ModelShape, device: torch.device, dtype: torch.dtype, seed: int):
    """LlamaForCausalLM of the shape with random weights, on the device, SDPA attention, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{k: v for k, v in shape.fields.items() if k not in ("architectures", "torch_dtype")})
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.set_attn_implementation("sdpa")
    return model.eval()


def bench_model(model, shape: ModelShape, settings: E2ESettings, device, rows_plan, result, console) -> None:
    """Every (phase, n, batch) row of one model, dense first, then each variant (rows appended to result)."""
    from ..integration.hf import attach, detach

    bench = Bench(model, shape.name, device, repeats=settings.repeats, warmup=settings.warmup, seed=settings.seed)
    vs = variants(settings, shape.head_dim)
    for v in vs[1:]:
        v.config.validate_for_model(shape.fields["num_hidden_layers"], shape.head_dim)
    for phase, n, batch in rows_plan:
        dense = None
        for v in vs:
            runtime = None
            if v.config is not None:
                runtime = attach(model, v.config, backend="auto")
            try:
                ms, fn_ms, kernel_ms = bench.measure(phase, n, batch, runtime)
                graphed = (None, "CUDA graphs need a CUDA device")
                if settings.graphs and device.type == "cuda":
                    graphed = (bench.graphed_prefill_ms(n, batch) if phase == "prefill"
                               else bench.graphed_decode_ms(n, batch))
            finally:
                if runtime is not None:
                    detach(model)
                _free(device)
            row = dict(shape=shape.name, model=shape.title, n=n, batch=batch, phase=phase, label=v.label,
                       density=1.0 if v.config is None else v.config.density, ms=ms,
                       attention_ms=kernel_ms, frontend_ms=max(fn_ms - kernel_ms, 0.0) if runtime else 0.0,
                       clock="cuda-events" if device.type == "cuda" else "cpu")
            if settings.graphs:
                row["ms_graph"], row["graph_error"] = graphed
            dense = row if dense is None else dense
            result["rows"].append(derive(row, dense))
            console.print(f"  {shape.name} {phase} n={n} b={batch} {v.label}: {ms:.3f} ms", highlight=False)
        if settings.out:
            write_json(result, settings.out)


def environment(settings: E2ESettings, device, dtype) -> dict:
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else
                f"cpu ({platform.processor() or platform.machine()})",
                torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                dtype=str(dtype).replace("torch.", ""),
                timing=("CUDA events, median of repeats after warm-up" if device.type == "cuda" else
                        "CPU wall clock (a code-path test, not a measurement)"),
                backend="triton" if device.type == "cuda" else "torch (reference; CPU)",
                settings={**dataclasses.asdict(settings),
                          "shapes": [dataclasses.asdict(s) for s in settings.shapes]})


TABLE = [("N", "n", _k), ("B", "batch", str), ("config", "label", str), ("ms", "ms", _ms),
         ("dense ms", "ms_dense", _ms), ("x", "speedup", _x), ("attn ms", "attention_ms", _ms),
         ("front ms", "frontend_ms", _ms), ("rest ms", "rest_ms", _ms), ("bound ms", "bound_ms", _ms),
         ("x bound", "speedup_bound", _x), ("front %", "frontend_pct_of_attention", _f(1))]
GRAPH_COLUMNS = [("graph ms", "ms_graph", _ms), ("x graph", "speedup_graph", _x)]


def print_tables(console, result: dict, cpu: bool) -> None:
    note = " [CPU times: not a measurement]" if cpu else ""
    for name in dict.fromkeys(r["shape"] for r in result["rows"]):
        for phase in ("prefill", "decode"):
            rows = [r for r in result["rows"] if r["shape"] == name and r["phase"] == phase]
            if rows:
                columns = TABLE + (GRAPH_COLUMNS if any("ms_graph" in r for r in rows) else [])
                console.print(rich_table(f"{rows[0]['model']} {phase}{note}", rows, columns))


def main(settings: E2ESettings) -> int:
    """Run the benchmark; exit 2 on a config the model refuses or a memory need above the free memory."""
    from ..console import make_console

    console = make_console(width=200)
    cuda = torch.cuda.is_available() and settings.mode != "dry-run"
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    elem = torch.finfo(dtype).bits // 8
    result = {"meta": environment(settings, device, dtype), "rows": [], "skipped": []}
    start = time.monotonic()
    try:
        if settings.model:
            from .. import models

            model, _ = models.load(settings.model, device=str(device), attn_implementation="sdpa", progress=False)
            cfg = model.config
            shape = ModelShape(settings.model, settings.model, dict(
                num_hidden_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
                num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                head_dim=model_shape(cfg)[1],
                intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
                tie_word_embeddings=getattr(cfg, "tie_word_embeddings", False)))
            elem = next(model.parameters()).element_size()
            # The weights are loaded already: check the rest against what is left plus their own size.
            free = free_memory_bytes(device) + sum(p.numel() * p.element_size() for p in model.parameters())
            keep, skipped = check_plan(shape, settings, elem, free)
            result["skipped"] += skipped
            bench_model(model, shape, settings, device, keep, result, console)
            del model
        else:
            plans = []
            for shape in settings.shapes:  # every shape checked before any model is built
                for v in variants(settings, shape.head_dim)[1:]:
                    v.config.validate_for_model(shape.fields["num_hidden_layers"], shape.head_dim)
                keep, skipped = check_plan(shape, settings, elem, free_memory_bytes(device))
                plans.append((shape, keep))
                result["skipped"] += skipped
            for shape, keep in plans:
                if not keep:
                    continue
                model = build_model(shape, device, dtype, settings.seed)
                bench_model(model, shape, settings, device, keep, result, console)
                del model
                _free(device)
    except PlanError as exc:
        print(f"sketchwalk bench e2e: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"sketchwalk bench e2e: --density/--config: {exc}", file=sys.stderr)
        return 2
    result["meta"]["elapsed_s"] = round(time.monotonic() - start, 1)
    print_tables(console, result, cpu=not cuda)
    path = write_json(result, settings.out)
    print(f"wrote {path} ({len(result['rows'])} rows, {result['meta']['elapsed_s']} s)")
    if result["skipped"]:
        print(f"skipped {len(result['skipped'])} rows that do not fit in memory (listed in the JSON)", file=sys.stderr)
    return 0
