"""The kernel benchmark of issue 4: Sketch&Walk block-sparse attention against dense and sparse baselines.

For each attention shape (Llama-3.1-8B: 32 query / 8 KV heads, head_dim 128; SmolLM2-135M: 9/3,
64), batch 1, bf16, each context length and each density:

Prefill (one layer, causal)
  dense baselines  SDPA on the FLASH_ATTENTION and on the CUDNN_ATTENTION backend (enable_gqa),
                   FlexAttention dense-causal (torch.compile, its own 128-token blocks), and our
                   dense path: `block_sparse_prefill` with every causal block selected;
  sparse           `block_sparse_prefill` on the selection; FlexAttention on the same selection as
                   a BlockMask; the PyTorch reference `sparse_attention` (up to --reference-max-seq);
  front end        `SketchWalkRuntime`'s prefill selection of one layer (backend "triton"): its
                   `attention` with the final attention call stubbed out, on the second sparse layer
                   (whose walk multiplies R by W, the steady state; the first only copies W).
Decode (one query token over an L-token cache, batch 1 and 8)
  `block_sparse_decode` on the last query block's selection against the fastest dense SDPA
  backend (flash / efficient / cuDNN, enable_gqa), each timed from Python and replayed from CUDA graphs.

Selections, per density: "sketchwalk", the runtime's own selection on the random Q/K, and
"random", `select_blocks` on random scores. Both keep the sink and the diagonal and have the
same row counts (those depend only on the config), so the kernels do the same work on both; the
blocks they touch differ. Density 1.0 selects every causal block: those rows reuse the dense-path
times instead of measuring the identical launch again.

Derived columns (the pure functions below; `derive_prefill` / `derive_decode` recompute them from a row):
  speedup_vs_X          t_X / t_sparse, for each dense baseline X (and FlexAttention sparse);
  efficiency            (t_our_dense / t_sparse) x measured density: 1.0 = the sparse kernel is as
                        fast per computed block as our dense path;
  tflops_*              4 * head_dim * Hq * (causal token pairs computed) / time: pairs counted
                        exactly from the selection, the causal triangle inside the diagonal blocks;
  speedup_vs_flash_with_frontend  t_flash / (t_sparse + t_frontend);
  frontend_pct_of_sparse          100 * t_frontend / t_sparse;
  gbps_*                bytes of K and V of the selected blocks (a partial last block by its real
                        tokens) plus q and the output, / time.

Timing: medians of `triton.testing.do_bench` (which also flushes L2 before every timed call),
warm-up and repetition budgets scaled to the call's cost (about 30 repetitions); calls of 50 ms
and more (64K-128K dense) skip do_bench's fixed 5-call estimate: one warm-up, then the median of
3 calls, each after the same L2 flush. Inputs rotate over a pool of copies whose total size
exceeds 4x the L2 cache, so no call finds its inputs cached by the previous one. --dry-run
times with time.perf_counter on the CPU under the Triton interpreter: a test of the code path,
not a measurement.
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import itertools
import json
import math
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from ..config import SketchWalkConfig
from ..kernels import block_sparse_decode, block_sparse_prefill
from ..method.attention import sparse_attention
from ..method.runtime import SketchWalkRuntime
from ..method.selection import BlockSelection, select_blocks
from . import SHAPES, KernelBenchSettings

Inputs = tuple  # (q, k, v) of one pool entry
Attention = Callable[..., torch.Tensor]  # fn(q, k, v) -> out

#: Raw times (ms) of a prefill row; None = not available here (the reason is in row["na"]).
PREFILL_TIMES = ("t_flash_ms", "t_cudnn_ms", "t_flex_dense_ms", "t_our_dense_ms", "t_sparse_ms",
                 "t_flex_sparse_ms", "t_reference_ms", "t_frontend_ms", "t_our_dense_hopper_ms", "t_hopper_ms")
DENSE_BASELINES = {"flash": "t_flash_ms", "cudnn": "t_cudnn_ms", "flex_dense": "t_flex_dense_ms",
                   "our_dense": "t_our_dense_ms", "flex_sparse": "t_flex_sparse_ms"}
PREFILL_DERIVED = tuple(f"speedup_vs_{name}" for name in DENSE_BASELINES) + (
    "efficiency", "tflops_sparse", "tflops_flash", "tflops_cudnn", "tflops_our_dense",
    "speedup_vs_flash_with_frontend", "frontend_pct_of_sparse",
    "speedup_vs_cudnn_hopper", "speedup_vs_flash_hopper", "hopper_vs_portable", "efficiency_hopper", "tflops_hopper",
    "tflops_our_dense_hopper")
DECODE_TIMES = ("t_dense_ms", "t_sparse_ms", "t_dense_graph_ms", "t_sparse_graph_ms", "t_dense_steady_ms",
                "t_sparse_steady_ms")
DECODE_DERIVED = ("speedup", "speedup_graph", "gbps_sparse", "gbps_dense", "gbps_sparse_graph", "gbps_dense_graph",
                  "speedup_steady", "gbps_sparse_steady", "gbps_dense_steady")
STEADY_REPLAYS = 20
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}
L2_COVER = 4  # the input pool spans at least this many L2 caches
MAX_POOL = 8


# ----------------------------------------------------------------------------------------------
# derived columns: pure functions of the raw numbers
# ----------------------------------------------------------------------------------------------

def ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    """num / den, None if either is missing."""
    return None if num is None or den is None else num / den


def efficiency(t_our_dense_ms: Optional[float], t_sparse_ms: Optional[float], density: float) -> Optional[float]:
    """(t_our_dense / t_sparse) x density: 1.0 when time scales exactly with the computed fraction."""
    s = ratio(t_our_dense_ms, t_sparse_ms)
    return None if s is None else s * density


def causal_token_pairs(n: int) -> int:
    """(query, key) pairs of dense causal attention over n tokens: n(n+1)/2."""
    return n * (n + 1) // 2


def selected_token_pairs(indices: torch.Tensor, counts: torch.Tensor, n: int, block_size: int) -> int:
    """Causal (query, key) token pairs computed by a prefill over this selection, counted exactly.

    indices: [rows, width] key blocks of query-block row r = 0..rows-1 (-1 padded); counts: [rows];
    n: sequence length in tokens (the last block may be partial). A block j < r contributes
    (queries of block r) x (keys of block j) pairs; the diagonal j == r its causal triangle m(m+1)/2,
    m = tokens of block r.
    """
    idx = indices.detach().long().cpu()
    cnt = counts.detach().long().cpu()
    rows, width = idx.shape
    r = torch.arange(rows)[:, None]
    valid = torch.arange(width)[None, :] < cnt[:, None]
    q_tok = (n - r * block_size).clamp(0, block_size)  # [rows, 1]
    k_tok = (n - idx * block_size).clamp(0, block_size)  # [rows, width]
    below = valid & (idx >= 0) & (idx < r)
    diag = valid & (idx == r)
    return int((q_tok * k_tok * below).sum() + (q_tok * (q_tok + 1) // 2 * diag).sum())


def attention_tflops(head_dim: int, hq: int, token_pairs: int, ms: Optional[float]) -> Optional[float]:
    """Active TFLOP/s: 4 * head_dim * Hq * pairs (QK^T and PV, 2 flops per multiply-add) / time."""
    return None if ms is None else 4.0 * head_dim * hq * token_pairs / (ms * 1e-3) / 1e12


def speedup_with_frontend(t_dense_ms: Optional[float], t_sparse_ms: Optional[float],
                          t_frontend_ms: Optional[float]) -> Optional[float]:
    """t_dense / (t_sparse + t_frontend): the speedup once the selection itself is paid for."""
    if t_sparse_ms is None or t_frontend_ms is None:
        return None
    return ratio(t_dense_ms, t_sparse_ms + t_frontend_ms)


def frontend_pct(t_frontend_ms: Optional[float], t_sparse_ms: Optional[float]) -> Optional[float]:
    """The front end as a percentage of the sparse attention it feeds."""
    r = ratio(t_frontend_ms, t_sparse_ms)
    return None if r is None else 100.0 * r


def selected_kv_tokens(blocks: list[int], kv_len: int, block_size: int) -> int:
    """Cache tokens inside the selected key blocks (a partial last block counts its real tokens)."""
    return sum(max(0, min(block_size, kv_len - j * block_size)) for j in blocks)


def decode_bytes(kv_tokens: int, batch: int, hq: int, hkv: int, head_dim: int, elem_bytes: int) -> int:
    """Bytes one decode step must move: K and V of kv_tokens per sequence and KV head, q in, out out."""
    return batch * elem_bytes * head_dim * (2 * hkv * kv_tokens + 2 * hq)


def gbps(nbytes: int, ms: Optional[float]) -> Optional[float]:
    """GB/s (1e9 bytes per second)."""
    return None if ms is None else nbytes / (ms * 1e-3) / 1e9


def derive_prefill(row: dict) -> dict:
    """The derived columns of a prefill row from its raw times (ms), measured density and pair counts."""
    t = row
    out = {f"speedup_vs_{name}": ratio(t[key], t["t_sparse_ms"]) for name, key in DENSE_BASELINES.items()}
    dense_pairs = t["causal_pairs"]
    out.update(
        efficiency=efficiency(t["t_our_dense_ms"], t["t_sparse_ms"], t["measured_density"]),
        tflops_sparse=attention_tflops(t["head_dim"], t["hq"], t["selected_pairs"], t["t_sparse_ms"]),
        tflops_flash=attention_tflops(t["head_dim"], t["hq"], dense_pairs, t["t_flash_ms"]),
        tflops_cudnn=attention_tflops(t["head_dim"], t["hq"], dense_pairs, t["t_cudnn_ms"]),
        tflops_our_dense=attention_tflops(t["head_dim"], t["hq"], dense_pairs, t["t_our_dense_ms"]),
        speedup_vs_flash_with_frontend=speedup_with_frontend(t["t_flash_ms"], t["t_sparse_ms"], t["t_frontend_ms"]),
        frontend_pct_of_sparse=frontend_pct(t["t_frontend_ms"], t["t_sparse_ms"]),
        # The Hopper (TMA) path of the same launcher, on the same selection ("sparse" = the portable kernel).
        speedup_vs_cudnn_hopper=ratio(t["t_cudnn_ms"], t.get("t_hopper_ms")),
        speedup_vs_flash_hopper=ratio(t["t_flash_ms"], t.get("t_hopper_ms")),
        hopper_vs_portable=ratio(t["t_sparse_ms"], t.get("t_hopper_ms")),
        efficiency_hopper=efficiency(t.get("t_our_dense_hopper_ms"), t.get("t_hopper_ms"), t["measured_density"]),
        tflops_hopper=attention_tflops(t["head_dim"], t["hq"], t["selected_pairs"], t.get("t_hopper_ms")),
        tflops_our_dense_hopper=attention_tflops(t["head_dim"], t["hq"], dense_pairs, t.get("t_our_dense_hopper_ms")),
    )
    return out


def derive_decode(row: dict) -> dict:
    """The derived columns of a decode row from its raw times (ms) and byte counts."""
    return dict(
        speedup=ratio(row["t_dense_ms"], row["t_sparse_ms"]),
        speedup_graph=ratio(row["t_dense_graph_ms"], row["t_sparse_graph_ms"]),
        gbps_sparse=gbps(row["bytes_sparse"], row["t_sparse_ms"]),
        gbps_dense=gbps(row["bytes_dense"], row["t_dense_ms"]),
        gbps_sparse_graph=gbps(row["bytes_sparse"], row["t_sparse_graph_ms"]),
        gbps_dense_graph=gbps(row["bytes_dense"], row["t_dense_graph_ms"]),
        speedup_steady=ratio(row.get("t_dense_steady_ms"), row.get("t_sparse_steady_ms")),
        gbps_sparse_steady=gbps(row["bytes_sparse"], row.get("t_sparse_steady_ms")),
        gbps_dense_steady=gbps(row["bytes_dense"], row.get("t_dense_steady_ms")),
    )


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------

def bench_budget(expect_ms: float) -> tuple[float, float]:
    """(warmup_ms, rep_ms) for do_bench on a call of about expect_ms: ~30 repetitions, within a
    10-150 ms window (do_bench divides both by its own estimate of one call)."""
    return min(25.0, max(1.0, 3.0 * expect_ms)), min(150.0, max(10.0, 30.0 * expect_ms))


class Timer:
    """Median milliseconds of fn(): do_bench on CUDA; perf_counter on the CPU (--dry-run)."""

    CPU_REPS = 2
    LONG_MS = 50.0  # from here on do_bench's fixed 5-call estimate would double the cost of a timing
    LONG_REPS = 3
    FLUSH_BYTES = 256 * 2 ** 20  # what do_bench zeroes to flush L2

    def __init__(self, device: torch.device):
        self.device = device
        self._flush: Optional[torch.Tensor] = None

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return (f"triton.testing.do_bench median (L2 flushed before each timed call; warm-up and repetitions "
                    f"scaled to the call's cost: ~30 repetitions within 10-150 ms); calls of >= {self.LONG_MS:g} ms: "
                    f"one warm-up, then median of {self.LONG_REPS} CUDA-event-timed calls, each after the same L2 "
                    f"flush; inputs rotated over a pool >= {L2_COVER}x L2; ms")
        return f"time.perf_counter median of {self.CPU_REPS} calls after one warm-up (CPU, Triton interpreter), ms"

    def __call__(self, fn: Callable[[], Any], expect_ms: Optional[float] = None) -> float:
        """fn must have run once already (compiled / autotuned: `measure` sees to it). expect_ms: a rough
        prior (a related kernel's time) sizing the budget; without one, one timed call estimates it."""
        if self.device.type != "cuda":
            fn()
            return 1e3 * statistics.median(_wall(fn) for _ in range(self.CPU_REPS))
        warmed = expect_ms is None
        if warmed:
            expect_ms = _event_ms(fn)
        if expect_ms >= self.LONG_MS:
            return self._long(fn, warm=not warmed)
        from triton.testing import do_bench

        warmup, rep = bench_budget(expect_ms)
        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))

    def _long(self, fn: Callable[[], Any], warm: bool) -> float:
        """do_bench's procedure without its estimate: (a warm-up,) then L2 flush + timed call, LONG_REPS times."""
        if self._flush is None:
            self._flush = torch.empty(self.FLUSH_BYTES // 4, dtype=torch.int32, device=self.device)
        if warm:
            fn()
        times = []
        for _ in range(self.LONG_REPS):
            self._flush.zero_()
            times.append(_event_ms(fn))
        return statistics.median(times)


def _wall(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _event_ms(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


class Pool:
    """Input sets handed out in turn: consecutive calls read different memory (L2 cannot flatter them)."""

    def __init__(self, sets: list[Inputs]):
        self.sets = sets
        self._cycle = itertools.cycle(sets)

    def bind(self, fn: Attention) -> Callable[[], torch.Tensor]:
        """A zero-argument call of fn on the next input set."""
        return lambda: fn(*next(self._cycle))

    def graph_replay(self, fn: Attention) -> Callable[[], None]:
        """fn captured in one CUDA graph per input set, replayed in turn: GPU time without launch overhead."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile / autotune outside the capture
            for inputs in self.sets:
                fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graphs = []
        for inputs in self.sets:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn(*inputs)
            graphs.append(g)
        for g in graphs:  # the first replay uploads the graph: keep it out of the timings
            g.replay()
        replays = itertools.cycle(graphs)
        return lambda: next(replays).replay()


    def steady_ms(self, fn: Attention, replays: int = STEADY_REPLAYS) -> float:
        """ms per call of one CUDA graph that runs fn on every input set back to back (at least two
        sets: a copy is made when the pool has one), replayed `replays` times between two events.

        No L2 flush: a flush leaves the L2 full of dirty lines whose write-back the next call pays
        (~10 us on an H200, a quarter of a 128K decode step), which a decode step between other
        layers' kernels does not; and no reuse, because consecutive calls read different sets.
        """
        sets = self.sets if len(self.sets) > 1 else self.sets + [tuple(t.clone() for t in self.sets[0])]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for inputs in sets:
                fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for inputs in sets:
                fn(*inputs)
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / (replays * len(sets))


def pool_size(set_bytes: int, l2_bytes: int) -> int:
    """Copies of one input set so that all of them span L2_COVER x L2 (1 when one set already does)."""
    return max(1, min(MAX_POOL, math.ceil(L2_COVER * l2_bytes / max(1, set_bytes))))


# ----------------------------------------------------------------------------------------------
# selections
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Selection:
    """One prefill selection in the kernels' layout (int32 indices [rows, width], counts [rows])."""

    kind: str  # sketchwalk | random | dense
    density: float  # nominal
    block: BlockSelection
    n: int

    @property
    def nb(self) -> int:
        return self.block.indices.shape[0]

    @property
    def is_dense(self) -> bool:
        """Every causal block of every row: the same launch as our dense path."""
        return int(self.block.selected_pairs()) == self.nb * (self.nb + 1) // 2

    def measured_density(self) -> float:
        """Selected / causal (query-block, key-block) pairs (method.md step 8)."""
        return int(self.block.selected_pairs()) / (self.nb * (self.nb + 1) // 2)

    def token_pairs(self) -> int:
        return selected_token_pairs(self.block.indices, self.block.counts, self.n, self.block.block_size)

    def last_row(self) -> list[int]:
        """Key blocks of the last query block: what a decode step at the end of the sequence reads."""
        c = int(self.block.counts[-1])
        return self.block.indices[-1, :c].tolist()


def selection_config(density: float, block_size: int, head_dim: int) -> SketchWalkConfig:
    """Paper defaults at this density; sparse from layer 0 and prefill only (no decode state is seeded)."""
    return SketchWalkConfig(block_size=block_size, density=density, sketch_dim=min(64, head_dim), skip_layers=0,
                            phases="prefill")


def dense_selection(n: int, block_size: int, device) -> BlockSelection:
    """Every causal block of every row (our dense path)."""
    nb = -(-n // block_size)
    r = torch.arange(nb, device=device, dtype=torch.int32)
    indices = torch.where(r[None, :] <= r[:, None], r[None, :], -1).contiguous()
    return BlockSelection(indices=indices, counts=(r + 1).contiguous(), row_blocks=r.long(), block_size=block_size)


def random_selection(n: int, cfg: SketchWalkConfig, device, seed: int) -> BlockSelection:
    """`select_blocks` on uniform random scores: sink + diagonal, then random blocks up to the budget."""
    nb = -(-n // cfg.block_size)
    gen = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(nb, nb, generator=gen, device=device)
    sel = select_blocks(scores, torch.arange(nb, device=device), cfg)
    return dataclasses.replace(sel, indices=sel.indices.to(torch.int32).contiguous(),
                               counts=sel.counts.to(torch.int32).contiguous())


class FrontEnd:
    """`SketchWalkRuntime`'s prefill selection for one layer, with the attention itself stubbed out.

    `runtime.attention` ends in `self._attend(...)`; shadowing that on the instance leaves exactly
    the selection path (as benchmarks/bench_frontend.py does), without touching the runtime's code.
    """

    LAYER = 1  # the second sparse layer: R = R_prev @ W, the per-layer steady state

    def __init__(self, cfg: SketchWalkConfig, head_dim: int, scale: float):
        self.runtime = SketchWalkRuntime(cfg, num_layers=2, head_dim=head_dim, backend="triton")
        if not callable(getattr(self.runtime, "_attend", None)):
            raise RuntimeError("SketchWalkRuntime no longer has _attend: update sketchwalk.bench.kernels.FrontEnd")
        self.runtime._attend = lambda *args, **kwargs: None
        self.scale = scale

    def select(self, q, k, v) -> BlockSelection:
        """The selection of layer LAYER for q [1, Hq, n, d], k, v [1, Hkv, n, d] (walk started at layer 0)."""
        rt = self.runtime
        rt.keep_selections = True
        for layer in range(self.LAYER + 1):
            rt.attention(layer, q, k, v, None, self.scale)
        rt.keep_selections = False
        return rt.last_selection[self.LAYER][0]

    def __call__(self, q, k, v) -> None:
        self.runtime.attention(self.LAYER, q, k, v, None, self.scale)


# ----------------------------------------------------------------------------------------------
# the attention calls: each fn(q, k, v) -> out
# ----------------------------------------------------------------------------------------------

def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


def sdpa(backend: str, causal: bool) -> Attention:
    """Dense SDPA pinned to one backend (flash / cudnn / efficient), GQA without K/V copies."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pinned = getattr(SDPBackend, SDPA_BACKENDS[backend])

    def call(q, k, v):
        with sdpa_kernel(pinned):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    return call


def try_call(fn: Attention, inputs: Inputs) -> tuple[Optional[torch.Tensor], Optional[str]]:
    """(output, None) or (None, why it failed): a backend that refuses these inputs is reported n/a."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SDPA explains each refusal in a warning; the reason is enough
            return fn(*inputs), None
    except Exception as exc:  # backend refusals, compile errors, out of memory: all mean "n/a here"
        return None, _first_line(exc)


def ours_prefill(sel: BlockSelection, scale: float, path: str = "portable") -> Attention:
    """block_sparse_prefill on this selection through one kernel path ("portable" or "hopper")."""
    idx, cnt = sel.indices[None], sel.counts[None]
    return lambda q, k, v: block_sparse_prefill(q, k, v, idx, cnt, [0], sel.block_size, scale, path=path)


def hopper_na(ctx: "Context", inputs: Inputs) -> Optional[str]:
    """Why the Hopper path cannot be timed here (None when it can)."""
    from ..kernels.block_sparse_prefill import prefill_path

    if ctx.device.type != "cuda" or torch.cuda.get_device_capability(ctx.device)[0] != 9:
        return "the Hopper path needs an sm_90 GPU"
    try:
        prefill_path(*inputs, path="hopper")
    except ValueError as exc:
        return str(exc)
    return None


def ours_decode(blocks: list[int], batch: int, block_size: int, scale: float, device) -> Attention:
    """block_sparse_decode with the same key blocks for every sequence of the batch."""
    idx = torch.tensor(blocks, dtype=torch.int32, device=device)[None].expand(batch, -1).contiguous()
    cnt = torch.full((batch,), len(blocks), dtype=torch.int32, device=device)
    off = torch.zeros(batch, dtype=torch.int32, device=device)
    return lambda q, k, v: block_sparse_decode(q, k, v, idx, cnt, off, block_size, scale)


def reference(sel: BlockSelection, n: int, scale: float) -> Attention:
    pos = torch.arange(n, device=sel.indices.device)
    return lambda q, k, v: sparse_attention(q[0], k[0], v[0], pos, sel, scale)[None]


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def flex_block_mask(sel: BlockSelection, n: int):
    """The selection as a FlexAttention BlockMask: the off-diagonal picks as full blocks (no mask_mod)
    and the diagonal as the one partial block (causal mask_mod), block_size x block_size tiles.

    Relies on the BlockSelection contract: rows ascending with the diagonal kept, so entries
    0..count-2 are the off-diagonal blocks and entry count-1 is the diagonal.
    """
    from torch.nn.attention.flex_attention import BlockMask

    nb = sel.indices.shape[0]
    rows = torch.arange(nb, dtype=torch.int32, device=sel.indices.device)
    cnt = sel.counts.to(torch.int32)
    last = sel.indices.gather(1, (cnt.long() - 1)[:, None])[:, 0]
    if not torch.equal(last.to(torch.int32), rows):
        raise ValueError("selection rows must end with their diagonal block")
    # kv_indices padded to nb columns (flex's own layout); entries past the count are never read.
    full = torch.zeros(nb, nb, dtype=torch.int32, device=rows.device)
    full[:, :sel.indices.shape[1]] = sel.indices.clamp_min(0)
    partial = torch.zeros_like(full)
    partial[:, 0] = rows
    return BlockMask.from_kv_blocks(torch.ones_like(cnt)[None, None], partial[None, None], (cnt - 1)[None, None],
                                    full[None, None], BLOCK_SIZE=(sel.block_size, sel.block_size), mask_mod=_causal,
                                    seq_lengths=(n, n), compute_q_blocks=False)


class Flex:
    """FlexAttention, compiled once with dynamic shapes (one compile per head shape and tile size serves
    every length); eager (unfused, and blind to the block mask) in --dry-run."""

    DENSE_BLOCK = 128  # flex's default tile: the dense-causal baseline at its best

    def __init__(self, compiled: bool):
        from torch.nn.attention.flex_attention import flex_attention

        self.compiled = compiled
        self.broken: dict[tuple, str] = {}  # (Hq, Hkv, d, dtype, block) -> why its compile failed
        if compiled:
            import torch._dynamo

            # Several shapes x two tile sizes recompile; the default limit would fall back to eager,
            # which materialises N x N scores.
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
            self.fn = torch.compile(flex_attention, dynamic=True)
        else:
            self.fn = flex_attention

    def call(self, block_mask, scale: float) -> Attention:
        """fn(q, k, v) over block_mask. A shape whose compile failed fails fast afterwards (a retry
        would compile again, for nothing)."""
        bs = block_mask.BLOCK_SIZE[0]
        # The kernel tile must divide the mask's blocks; flex's default tile (128) may not.
        opts = {"BLOCK_M": min(bs, 64), "BLOCK_N": min(bs, 64)} if self.compiled and bs < self.DENSE_BLOCK else None

        def fn(q, k, v):
            key = (q.shape[1], k.shape[1], q.shape[-1], q.dtype, bs)
            if key in self.broken:
                raise RuntimeError(f"failed before on this shape: {self.broken[key]}")
            try:
                return self.fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True, kernel_options=opts)
            except torch.cuda.OutOfMemoryError:
                raise  # this length only
            except Exception as exc:
                self.broken[key] = _first_line(exc)
                raise
        return fn


def max_err(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[float]:
    return None if a is None or b is None else float((a.float() - b.float()).abs().max())


# ----------------------------------------------------------------------------------------------
# one (shape, length) group
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Context:
    settings: KernelBenchSettings
    device: torch.device
    dtype: torch.dtype
    timer: Timer
    l2_bytes: int
    flex: Optional[Flex]
    flex_reason: Optional[str]  # why flex is n/a, when it is
    log: Callable[[str], None]


def make_pool(ctx: Context, shapes: list[tuple[int, ...]], seed: int, count: Optional[int] = None) -> Pool:
    """Random input sets of the given tensor shapes: `count` of them, by default as many as pool_size asks."""
    set_bytes = sum(math.prod(s) for s in shapes) * torch.empty((), dtype=ctx.dtype).element_size()
    count = count or pool_size(set_bytes, ctx.l2_bytes)
    gen = torch.Generator(device=ctx.device).manual_seed(seed)
    return Pool([tuple(torch.randn(s, generator=gen, device=ctx.device, dtype=ctx.dtype) for s in shapes)
                 for _ in range(count)])


def build_selections(ctx: Context, shape: dict, n: int, pool: Pool) -> tuple[list[Selection], dict]:
    """[dense, then per density the sketchwalk and random selections] for length n, and the FrontEnd per density."""
    bs, d = ctx.settings.block_size, shape["d"]
    sels = [Selection("dense", 1.0, dense_selection(n, bs, ctx.device), n)]
    fronts = {}
    for density in ctx.settings.density:
        cfg = selection_config(density, bs, d)
        fronts[density] = FrontEnd(cfg, d, d ** -0.5)
        sels.append(Selection("sketchwalk", density, fronts[density].select(*pool.sets[0]), n))
        sels.append(Selection("random", density, random_selection(n, cfg, ctx.device, ctx.settings.seed + n), n))
    return sels, fronts


def measure(ctx: Context, pool: Pool, fn: Attention, expect_ms: Optional[float] = None):
    """(ms, None, output on the first input set), or (None, why, None) if fn fails on these inputs."""
    out, reason = try_call(fn, pool.sets[0])
    if reason is not None:
        return None, reason, None
    return ctx.timer(pool.bind(fn), expect_ms), None, out


class Measured:
    """Raw times of a row (ms, None = n/a) with the reason for each n/a."""

    def __init__(self):
        self.times: dict[str, Optional[float]] = {}
        self.why: dict[str, str] = {}

    def put(self, key: str, ms: Optional[float], reason: Optional[str] = None) -> None:
        self.times[key] = ms
        if ms is None:
            self.why[key] = reason or "not measured"

    def merged(self, *others: "Measured") -> "Measured":
        m = Measured()
        for part in (self, *others):
            m.times.update(part.times)
            m.why.update(part.why)
        return m

    def into(self, row: dict, keys: tuple[str, ...]) -> dict:
        """row with the raw times of `keys` and `na`: {key: reason} for each missing one."""
        row.update({k: self.times.get(k) for k in keys})
        row["na"] = {k: self.why.get(k, "not measured") for k in keys if row[k] is None}
        return row


def measure_hopper(ctx: Context, pool: Pool, sel: BlockSelection, scale: float, expect_ms: Optional[float],
                   m: "Measured", key: str) -> Optional[torch.Tensor]:
    """Time the Hopper path on `sel` into m[key] (n/a with the reason off sm_90); its output on the first set."""
    why = hopper_na(ctx, pool.sets[0])
    if why:
        m.put(key, None, why)
        return None
    t, reason, out = measure(ctx, pool, ours_prefill(sel, scale, "hopper"), expect_ms)
    m.put(key, t, reason)
    return out


def dense_baselines(ctx: Context, n: int, pool: Pool, dense: Selection, scale: float) -> tuple[Measured, Optional[float]]:
    """Our dense path, SDPA flash and cuDNN, FlexAttention dense-causal; and max |ours - flash|."""
    m = Measured()
    t_ours, reason, ours_out = measure(ctx, pool, ours_prefill(dense.block, scale))
    m.put("t_our_dense_ms", t_ours, reason)
    measure_hopper(ctx, pool, dense.block, scale, t_ours, m, "t_our_dense_hopper_ms")
    t, reason, flash_out = measure(ctx, pool, sdpa("flash", causal=True), t_ours)
    m.put("t_flash_ms", t, reason)
    err = max_err(ours_out, flash_out)
    del ours_out, flash_out
    t, reason, _ = measure(ctx, pool, sdpa("cudnn", causal=True), t_ours)
    m.put("t_cudnn_ms", t, reason)
    if ctx.flex is None:
        m.put("t_flex_dense_ms", None, ctx.flex_reason)
    else:
        mask = flex_block_mask(dense_selection(n, Flex.DENSE_BLOCK, ctx.device), n)
        t, reason, _ = measure(ctx, pool, ctx.flex.call(mask, scale), t_ours)
        m.put("t_flex_dense_ms", t, reason)
    return m, err


def sparse_kernels(ctx: Context, sel: Selection, pool: Pool, scale: float,
                   t_our_dense: Optional[float]) -> tuple[Measured, dict]:
    """Our kernel, FlexAttention and the reference on one selection; errors between them."""
    m, n = Measured(), sel.n
    fn = ours_prefill(sel.block, scale)
    if sel.is_dense and t_our_dense is not None:  # the very launch of our dense path: keep its time
        out, reason = try_call(fn, pool.sets[0])
        m.put("t_sparse_ms", t_our_dense)
    else:
        expect = None if t_our_dense is None else t_our_dense * sel.measured_density()
        t, reason, out = measure(ctx, pool, fn, expect)
        m.put("t_sparse_ms", t, reason)
    expect = m.times["t_sparse_ms"]
    errs = {"err_flex_sparse_vs_ours": None, "err_sparse_vs_reference": None, "err_hopper_vs_ours": None}
    hop_out = measure_hopper(ctx, pool, sel.block, scale, expect, m, "t_hopper_ms")
    errs["err_hopper_vs_ours"] = max_err(hop_out, out)
    del hop_out
    if ctx.flex is None:
        m.put("t_flex_sparse_ms", None, ctx.flex_reason)
    else:
        t, reason, flex_out = measure(ctx, pool, ctx.flex.call(flex_block_mask(sel.block, n), scale), expect)
        m.put("t_flex_sparse_ms", t, reason)
        if ctx.flex.compiled:  # eager flex ignores the block mask: only a compiled run checks the conversion
            errs["err_flex_sparse_vs_ours"] = max_err(flex_out, out)
        del flex_out
    if n > ctx.settings.reference_max_seq:
        m.put("t_reference_ms", None, f"skipped beyond --reference-max-seq {ctx.settings.reference_max_seq}")
    else:
        t, reason, ref_out = measure(ctx, pool, reference(sel.block, n, scale))
        m.put("t_reference_ms", t, reason)
        errs["err_sparse_vs_reference"] = max_err(out, ref_out)
    return m, errs


def prefill_group(ctx: Context, name: str, n: int, pool: Pool, sels: list[Selection], fronts: dict) -> list[dict]:
    """Rows of one (shape, length): dense baselines and front ends once, then every (density, kind) selection."""
    shape = SHAPES[name]
    scale = shape["d"] ** -0.5
    base, err_dense = dense_baselines(ctx, n, pool, sels[0], scale)
    frontend = {}
    for density, front in fronts.items():
        frontend[density] = Measured()
        t, reason, _ = measure(ctx, pool, front)
        frontend[density].put("t_frontend_ms", t, reason)
    rows, dense_equivalent = [], None
    for sel in sels[1:]:
        if sel.is_dense and dense_equivalent is not None:  # density 1.0: both kinds select every block
            sparse, errs = dense_equivalent
        else:
            sparse, errs = sparse_kernels(ctx, sel, pool, scale, base.times["t_our_dense_ms"])
            if sel.is_dense:
                dense_equivalent = (sparse, errs)
        row = dict(shape=name, model=shape["model"], hq=shape["hq"], hkv=shape["hkv"], head_dim=shape["d"], batch=1,
                   n=n, block_size=sel.block.block_size, density=sel.density, selection=sel.kind,
                   measured_density=sel.measured_density(), selected_blocks=int(sel.block.selected_pairs()),
                   selected_pairs=sel.token_pairs(), causal_pairs=causal_token_pairs(n),
                   dense_equivalent=sel.is_dense, err_our_dense_vs_flash=err_dense, **errs)
        row = base.merged(sparse, frontend[sel.density]).into(row, PREFILL_TIMES)
        row.update(derive_prefill(row))
        rows.append(row)
    return rows


def decode_dense(ctx: Context, pool: Pool) -> tuple[dict, dict, Optional[torch.Tensor]]:
    """Each SDPA backend on one decode step: ({backend: (ms, graph ms)}, {backend: why n/a}, an output)."""
    times, why, out = {}, {}, None
    for backend in SDPA_BACKENDS:
        fn = sdpa(backend, causal=False)
        t, reason, o = measure(ctx, pool, fn)
        if reason:
            why[backend] = reason
            continue
        out = o if out is None else out
        times[backend] = (t, graph_time(ctx, pool, fn))
    return times, why, out


def decode_group(ctx: Context, name: str, kv_len: int, batch: int, sels: list[Selection]) -> list[dict]:
    """Rows of one (shape, cache length, batch): the fastest dense SDPA, then each selection's last row."""
    shape = SHAPES[name]
    hq, hkv, d, scale = shape["hq"], shape["hkv"], shape["d"], shape["d"] ** -0.5
    bs = ctx.settings.block_size
    pool = make_pool(ctx, [(batch, hq, 1, d), (batch, hkv, kv_len, d), (batch, hkv, kv_len, d)],
                     ctx.settings.seed + 7 * kv_len + batch)
    dense, dense_why, dense_out = decode_dense(ctx, pool)
    best = min(dense, key=lambda b: dense[b][0]) if dense else None
    graphed = [b for b in dense if dense[b][1] is not None]
    best_graph = min(graphed, key=lambda b: dense[b][1]) if graphed else None
    base = Measured()
    base.put("t_dense_ms", dense[best][0] if best else None, "; ".join(f"{b}: {r}" for b, r in dense_why.items()))
    base.put("t_dense_graph_ms", dense[best_graph][1] if best_graph else None, graph_na(ctx))
    base.put("t_dense_steady_ms", steady_time(ctx, pool, sdpa(best_graph, causal=False)) if best_graph else None,
             graph_na(ctx))
    elem = pool.sets[0][0].element_size()

    rows, dense_equivalent = [], None
    for sel in sels[1:]:
        blocks = sel.last_row()
        if sel.is_dense and dense_equivalent is not None:
            sparse, err = dense_equivalent
        else:
            sparse = Measured()
            fn = ours_decode(blocks, batch, bs, scale, ctx.device)
            t, reason, out = measure(ctx, pool, fn)
            sparse.put("t_sparse_ms", t, reason)
            sparse.put("t_sparse_graph_ms", None if reason else graph_time(ctx, pool, fn), reason or graph_na(ctx))
            sparse.put("t_sparse_steady_ms", None if reason else steady_time(ctx, pool, fn), reason or graph_na(ctx))
            err = max_err(out, dense_out) if sel.is_dense else None
            del out
            if sel.is_dense:
                dense_equivalent = (sparse, err)
        row = dict(shape=name, model=shape["model"], hq=hq, hkv=hkv, head_dim=d, batch=batch, kv_len=kv_len,
                   block_size=bs, density=sel.density, selection=sel.kind,
                   measured_density=len(blocks) / sel.nb, selected_blocks=len(blocks),
                   dense_backend=best, dense_graph_backend=best_graph,
                   dense_backends_ms={b: t for b, (t, _) in dense.items()}, dense_backends_na=dense_why,
                   bytes_sparse=decode_bytes(selected_kv_tokens(blocks, kv_len, bs), batch, hq, hkv, d, elem),
                   bytes_dense=decode_bytes(kv_len, batch, hq, hkv, d, elem), err_vs_dense=err)
        row = base.merged(sparse).into(row, DECODE_TIMES)
        row.update(derive_decode(row))
        rows.append(row)
    return rows


def steady_time(ctx: Context, pool: Pool, fn: Attention) -> Optional[float]:
    """Pool.steady_ms (consecutive graph-replayed calls, no L2 flush); None without graphs here."""
    if not ctx.settings.graphs or ctx.device.type != "cuda":
        return None
    try:
        return pool.steady_ms(fn)
    except Exception as exc:  # a backend that refuses capture: report n/a rather than abort the run
        ctx.log(f"  steady-state capture failed: {_first_line(exc)}")
        return None


def graph_na(ctx: Context) -> str:
    if not ctx.settings.graphs:
        return "--no-graphs"
    return "CUDA graphs need a CUDA device" if ctx.device.type != "cuda" else "graph capture failed"


def graph_time(ctx: Context, pool: Pool, fn: Attention) -> Optional[float]:
    """Replay time from CUDA graphs; None without graphs here or if fn cannot be captured."""
    if not ctx.settings.graphs or ctx.device.type != "cuda":
        return None
    try:
        return ctx.timer(pool.graph_replay(fn))
    except Exception as exc:  # a backend that refuses capture: report n/a rather than abort the run
        ctx.log(f"  graph capture failed: {_first_line(exc)}")
        return None


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------

def environment(ctx: Context) -> dict:
    """Device and software versions, timing method, date: the JSON's `meta`."""
    import triton

    dev = ctx.device
    meta = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if dev.type == "cuda" else None,
        python=platform.python_version(), dtype=str(ctx.dtype).replace("torch.", ""),
        timing=ctx.timer.method, l2_bytes=ctx.l2_bytes,
        steady_timing=(f"decode *_steady_ms: one CUDA graph running the call on >= 2 distinct input sets back to "
                       f"back, replayed {STEADY_REPLAYS}x between two events, no L2 flush; ms per call"),
        hopper=("prefill *_hopper_*: block_sparse_prefill(path='hopper'), the TMA kernel, on the same selections; "
                "t_sparse_ms / t_our_dense_ms are the portable kernel (path='portable')"),
        flex="compiled (torch.compile, dynamic=True)" if ctx.flex and ctx.flex.compiled else
        "eager (unfused; ignores the block mask)" if ctx.flex else ctx.flex_reason,
        frontend=("SketchWalkRuntime(backend='triton').attention of the second sparse layer with the attention "
                  "stubbed: head averaging, block means, SRHT sketch, transition, walk (R @ W) and top-k; config "
                  "= paper defaults, phases='prefill', sketch_dim=min(64, head_dim)"),
        settings=dataclasses.asdict(ctx.settings))
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        meta.update(capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count)
    return meta


def _setup(settings: KernelBenchSettings, console) -> Context:
    dry = settings.mode == "dry-run"
    device = torch.device("cpu" if dry else "cuda")
    # The interpreter mis-computes bf16 dots (tests/test_kernels.py): fp32 there.
    dtype = torch.float32 if dry else torch.bfloat16
    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 60 * 2 ** 20
    else:
        l2 = 2 ** 20  # small, so that the tiny run still cycles a pool of several sets
    flex, flex_reason = None, "--no-flex"
    if settings.flex:
        try:
            flex = Flex(compiled=not dry)
        except Exception as exc:  # a torch without flex_attention
            flex_reason = f"flex_attention unavailable: {_first_line(exc)}"
    return Context(settings, device, dtype, Timer(device), l2, flex, flex_reason,
                   lambda msg: console.print(msg, highlight=False))


def run_group(ctx: Context, name: str, n: int, result: dict) -> None:
    """Prefill rows at length n (if n is in --seq) and decode rows with an n-token cache (if in --decode-seq)."""
    s, shape = ctx.settings, SHAPES[name]
    qkv = [(1, shape["hq"], n, shape["d"]), (1, shape["hkv"], n, shape["d"]), (1, shape["hkv"], n, shape["d"])]
    prefill = n in s.seq
    # Decode only needs the selections: one input set is enough for those.
    pool = make_pool(ctx, qkv, s.seed + n, count=None if prefill else 1)
    sels, fronts = build_selections(ctx, shape, n, pool)
    if prefill:
        result["prefill"] += prefill_group(ctx, name, n, pool, sels, fronts)
    del pool, fronts
    _free(ctx)
    if n in s.decode_seq:
        for batch in s.decode_batch:
            result["decode"] += decode_group(ctx, name, n, batch, sels)
            _free(ctx)


def run(settings: KernelBenchSettings, console=None) -> dict:
    """Every (shape, length) group of the settings: {"meta", "prefill", "decode", "skipped"}, also
    written to settings.out after each group. Prints the tables of each shape when it is done."""
    from ..console import make_console

    console = console or make_console(width=220)
    ctx = _setup(settings, console)
    start = time.monotonic()
    result = {"meta": environment(ctx), "prefill": [], "decode": [], "skipped": []}
    for name in settings.shapes:
        for n in sorted(set(settings.seq) | set(settings.decode_seq)):
            if settings.time_limit is not None and time.monotonic() - start > settings.time_limit:
                result["skipped"].append(dict(shape=name, n=n, reason=f"--time-limit {settings.time_limit:g} s"))
                continue
            t0 = time.monotonic()
            run_group(ctx, name, n, result)
            result["meta"]["elapsed_s"] = round(time.monotonic() - start, 1)
            ctx.log(f"{name} n={n}: {time.monotonic() - t0:.1f} s (total {result['meta']['elapsed_s']:.0f} s)")
            if settings.out:
                write_json(result, settings.out)
        print_tables(console, name, result)
    result["meta"]["elapsed_s"] = round(time.monotonic() - start, 1)
    return result


def _free(ctx: Context) -> None:
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def _finite(x):
    """NaN / inf (a broken kernel's error column) as None: the JSON stays standard."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_json(result: dict, path: str) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(_finite(result), indent=2))
    tmp.replace(out)  # readers never see a half-written file
    return out


# ----------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------

def _f(digits: int) -> Callable[[Any], str]:
    return lambda v: "n/a" if v is None else f"{v:.{digits}f}"


def _ms(v) -> str:
    return "n/a" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}")


def _us(v) -> str:
    return "n/a" if v is None else f"{1e3 * v:.1f}"


def _x(v) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _k(v) -> str:
    return f"{v // 1024}K" if v % 1024 == 0 else str(v)


DENSE_TABLE = [("N", "n", _k), ("flash ms", "t_flash_ms", _ms), ("cuDNN ms", "t_cudnn_ms", _ms),
               ("flex ms", "t_flex_dense_ms", _ms), ("ours dense ms", "t_our_dense_ms", _ms),
               ("TFLOP/s flash", "tflops_flash", _f(0)), ("TFLOP/s cuDNN", "tflops_cudnn", _f(0)),
               ("TFLOP/s ours", "tflops_our_dense", _f(0)), ("ours vs flash err", "err_our_dense_vs_flash", _f(4)),
               ("hopper dense ms", "t_our_dense_hopper_ms", _ms), ("TFLOP/s hopper", "tflops_our_dense_hopper", _f(0))]
SPARSE_TABLE = [("N", "n", _k), ("dens", "density", _f(2)), ("selection", "selection", str),
                ("meas", "measured_density", _f(3)), ("sparse ms", "t_sparse_ms", _ms),
                ("flex sp ms", "t_flex_sparse_ms", _ms), ("ref ms", "t_reference_ms", _ms),
                ("front ms", "t_frontend_ms", _ms), ("x flash", "speedup_vs_flash", _x),
                ("x cuDNN", "speedup_vs_cudnn", _x), ("x flex", "speedup_vs_flex_dense", _x),
                ("x ours", "speedup_vs_our_dense", _x), ("x flex sp", "speedup_vs_flex_sparse", _x),
                ("eff", "efficiency", _f(2)), ("TFLOP/s", "tflops_sparse", _f(0)),
                ("x flash +front", "speedup_vs_flash_with_frontend", _x), ("front %", "frontend_pct_of_sparse", _f(1)),
                ("hopper ms", "t_hopper_ms", _ms), ("x cuDNN hopper", "speedup_vs_cudnn_hopper", _x),
                ("TFLOP/s hopper", "tflops_hopper", _f(0)), ("eff hopper", "efficiency_hopper", _f(2))]
DECODE_TABLE = [("B", "batch", str), ("L", "kv_len", _k), ("dens", "density", _f(2)), ("selection", "selection", str),
                ("dense us", "t_dense_ms", _us), ("backend", "dense_backend", str), ("sparse us", "t_sparse_ms", _us),
                ("x", "speedup", _x), ("dense graph us", "t_dense_graph_ms", _us),
                ("sparse graph us", "t_sparse_graph_ms", _us), ("x graph", "speedup_graph", _x),
                ("GB/s sparse", "gbps_sparse", _f(0)), ("GB/s sparse graph", "gbps_sparse_graph", _f(0)),
                ("GB/s dense graph", "gbps_dense_graph", _f(0)), ("sparse steady us", "t_sparse_steady_ms", _us),
                ("x steady", "speedup_steady", _x), ("GB/s sparse steady", "gbps_sparse_steady", _f(0)),
                ("GB/s dense steady", "gbps_dense_steady", _f(0))]


def rich_table(title: str, rows: list[dict], columns: list[tuple[str, str, Callable]]):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for header, _, _ in columns:
        table.add_column(header, justify="right")
    for row in rows:
        table.add_row(*(fmt(row.get(key)) for _, key, fmt in columns))
    return table


def print_tables(console, name: str, result: dict) -> None:
    """The shape's prefill dense baselines, prefill sparse rows and decode rows."""
    model = SHAPES[name]["model"]
    pre = [r for r in result["prefill"] if r["shape"] == name]
    dec = [r for r in result["decode"] if r["shape"] == name]
    if pre:
        per_length = {}
        for r in pre:  # the dense columns repeat on every row of a length
            per_length.setdefault(r["n"], r)
        console.print(rich_table(f"{model} prefill: dense baselines", list(per_length.values()), DENSE_TABLE))
        console.print(rich_table(f"{model} prefill: sparse (speedups of 'sparse ms')", pre, SPARSE_TABLE))
    if dec:
        console.print(rich_table(f"{model} decode", dec, DECODE_TABLE))


def main(settings: KernelBenchSettings) -> int:
    """Run the benchmark; exit 2 without CUDA (unless --dry-run)."""
    if settings.mode != "dry-run" and not torch.cuda.is_available():
        print("sketchwalk bench kernels needs a CUDA GPU (the Triton kernels and the FlashAttention / cuDNN "
              "baselines run there); none is visible. --dry-run runs a tiny shape on the CPU under the Triton "
              "interpreter to test the code path.", file=sys.stderr)
        return 2
    result = run(settings)
    if settings.out:
        print(f"wrote {write_json(result, settings.out)} ({len(result['prefill'])} prefill rows, "
              f"{len(result['decode'])} decode rows, {result['meta']['elapsed_s']} s)")
    if result["skipped"]:
        print(f"skipped {len(result['skipped'])} groups (--time-limit)", file=sys.stderr)
    return 0
