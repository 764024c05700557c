"""The Sketch&Walk selection front end vs the attention it feeds, per layer, on SmolLM2-135M shapes.

For each sequence length and backend, `SketchWalkRuntime.attention` runs over all layers (random
q/k/v; bf16 on CUDA, fp32 on CPU; batch 1, no padding) for a prefill and for decode steps on top
of it. The same attention is then timed alone from the recorded selections (the Triton kernels,
or the reference `sparse_attention`; dense layers: causal SDPA), so

    front end = runtime.attention with its final attention call stubbed out (selection only)
    total     = runtime.attention;  attention = the attention alone on the recorded selections
    (total - front end - attention: packing selections for the kernels; per layer, all layers averaged)

Also reported: a dense causal SDPA baseline, the number of PyTorch ops the runtime issues per layer
(torch.profiler, top-level aten ops: on a GPU each one is at least one kernel launch) and the
device->host synchronisations per layer (CUDA: torch.cuda.set_sync_debug_mode; CPU: the ops that
would sync on a GPU: item / equal / nonzero, as recorded by the profiler).

CUDA times come from CUDA events after warm-up (the Triton kernels compile in the warm-up);
CPU times from time.perf_counter. Medians over --reps.

    python benchmarks/bench_frontend.py --out results/bench_frontend.json                  # GPU
    python benchmarks/bench_frontend.py --device cpu --seq 512 1024 --layers 6 --decode-steps 16
    python benchmarks/bench_frontend.py --device cpu --seq 1024 --baseline-rev HEAD        # before/after

--baseline-rev REV (or --baseline-tree DIR holding an older `sketchwalk/` package) runs the same
benchmark a second time, in a subprocess, against that version of the package and prints both
side by side with the speed-up (old / new).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

# The package under test: this checkout, or an older tree given by the parent process (baseline run).
_TREE = os.environ.get("SKETCHWALK_BENCH_TREE") or str(Path(__file__).resolve().parents[1])
sys.path.insert(0, _TREE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import sketchwalk  # noqa: E402
from sketchwalk.config import SketchWalkConfig  # noqa: E402
from sketchwalk.method.attention import sparse_attention  # noqa: E402
from sketchwalk.method.runtime import SketchWalkRuntime  # noqa: E402

SMOLLM2 = dict(hq=9, hkv=3, d=64, layers=30)
SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::equal", "aten::nonzero", "aten::is_nonzero")


# ------------------------------------------------------------------------------------------
# timing helpers
# ------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn, device: torch.device) -> float:
    """Seconds of one fn() call, queue drained before and after (CUDA events on a GPU, perf_counter on CPU)."""
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def time_call(fn, device: torch.device, reps: int, warmup: int) -> float:
    """Median seconds of one fn() call after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    return statistics.median(time_once(fn, device) for _ in range(reps))


def count_ops_and_syncs(prepare, device: torch.device) -> tuple[int, int]:
    """(top-level aten ops, device->host syncs) of one call of the fn that prepare() returns.

    prepare() sets the runtime up and returns the call to count (run twice on CUDA: profiler, then
    sync debug mode; each after its own prepare(), since a decode step advances the state).
    """
    from torch.profiler import ProfilerActivity, profile

    fn = prepare()
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.events()
    ops = sum(1 for e in events if e.name.startswith("aten::") and
              (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))
    if device.type != "cuda":
        return ops, sum(1 for e in events if e.name in SYNC_OPS and
                        (e.cpu_parent is None or e.cpu_parent.name not in SYNC_OPS))
    fn = prepare()
    _sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return ops, sum(1 for w in caught if "synchroniz" in str(w.message))


# ------------------------------------------------------------------------------------------
# inputs and attention-only callables
# ------------------------------------------------------------------------------------------

def make_inputs(n_total: int, shape: dict, n_sets: int, dtype, device, seed: int = 0):
    """n_sets distinct (q, k, v) of n_total tokens, cycled over the layers (saves memory)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    sets = []
    for _ in range(n_sets):
        q = torch.randn(1, shape["hq"], n_total, shape["d"], generator=g)
        k = torch.randn(1, shape["hkv"], n_total, shape["d"], generator=g)
        v = torch.randn(1, shape["hkv"], n_total, shape["d"], generator=g)
        sets.append(tuple(x.to(device=device, dtype=dtype) for x in (q, k, v)))
    return sets


def attention_only(selections: dict, qkv: list, block_size: int, scale: float, triton: bool, decode: bool):
    """fn() running just the attention of every layer on its recorded selection (None = dense)."""
    calls = []
    for layer, (q, k, v) in enumerate(qkv):
        sel = selections.get(layer, [None])[0]
        if sel is None:
            if decode:
                calls.append(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(
                    q, k, v, scale=scale, enable_gqa=True))
            else:
                calls.append(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(
                    q, k, v, is_causal=True, scale=scale, enable_gqa=True))
        elif triton:
            from sketchwalk.kernels import block_sparse_decode, block_sparse_prefill

            idx = sel.indices.to(torch.int32).contiguous()
            cnt = sel.counts.to(device=q.device, dtype=torch.int32).contiguous()
            off = torch.zeros(1, dtype=torch.int32, device=q.device)
            if decode:
                calls.append(lambda q=q, k=k, v=v, i=idx, c=cnt, o=off: block_sparse_decode(
                    q, k, v, i, c, o, block_size, scale))
            else:
                calls.append(lambda q=q, k=k, v=v, i=idx[None], c=cnt[None]: block_sparse_prefill(
                    q, k, v, i, c, [0], block_size, scale))
        else:
            m = k.shape[-2]
            pos = torch.arange(m - q.shape[-2], m, device=q.device)
            calls.append(lambda q=q, k=k, v=v, s=sel, p=pos: sparse_attention(q[0], k[0], v[0], p, s, scale))
    return lambda: [c() for c in calls]


# ------------------------------------------------------------------------------------------
# one (length, backend) case
# ------------------------------------------------------------------------------------------

def bench_case(n: int, backend: str, args, device: torch.device, dtype) -> dict:
    shape = dict(SMOLLM2, layers=args.layers)
    cfg = SketchWalkConfig(block_size=args.block_size, density=args.density, decode_query=args.decode_query,
                           walk=args.walk)
    scale = shape["d"] ** -0.5
    steps = args.decode_steps
    sets = make_inputs(n + steps, shape, min(args.layers, 4), dtype, device)
    pre = [tuple(x[:, :, :n] for x in sets[layer % len(sets)]) for layer in range(args.layers)]
    rt = SketchWalkRuntime(cfg, args.layers, shape["d"], backend=backend)
    triton = rt.uses_triton(device)

    def prefill():
        return [rt.attention(layer, q, k, v, None, scale) for layer, (q, k, v) in enumerate(pre)]

    def step_inputs(t: int) -> list:
        """Per layer (q, k, v) of decode step t, the KV cache contiguous as transformers' DynamicCache
        hands it over (a view of the longer buffer would make the kernel path copy it)."""
        per_set = [(q[:, :, t:t + 1], k[:, :, :t + 1].contiguous(), v[:, :, :t + 1].contiguous()) for q, k, v in sets]
        return [per_set[layer % len(sets)] for layer in range(args.layers)]

    def decode_step(t: int, inputs: list | None = None):
        inputs = inputs or step_inputs(t)
        return [rt.attention(layer, q, k, v, None, scale) for layer, (q, k, v) in enumerate(inputs)]

    def time_step(t: int) -> float:
        inputs = step_inputs(t)  # built before the clock starts
        return time_once(lambda: decode_step(t, inputs), device)

    L = args.layers
    res: dict = {"seq": n, "backend": backend, "triton": triton, "layers": L}
    # -- prefill -----------------------------------------------------------------------------
    res["prefill_total_s"] = time_call(prefill, device, args.reps, args.warmup)
    rt.keep_selections = True
    prefill()
    sel_pre = dict(rt.last_selection)
    rt.keep_selections = False
    res["prefill_frontend_s"] = _frontend_only(rt, prefill, device, args)
    res["prefill_attention_s"] = time_call(attention_only(sel_pre, pre, cfg.block_size, scale, triton, False),
                                           device, args.reps, args.warmup)
    res["prefill_dense_s"] = time_call(
        lambda: [F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
                 for q, k, v in pre], device, args.reps, args.warmup)
    res["prefill_ops_per_layer"], syncs = count_ops_and_syncs(lambda: prefill, device)
    res["prefill_ops_per_layer"] /= L
    res["prefill_syncs_per_layer"] = syncs / L
    # -- decode: a fresh prefill, warm-up steps, then the timed steps ---------------------------
    if steps:
        warm = min(args.warmup, steps // 2)
        prefill()
        for t in range(n, n + warm):
            decode_step(t)
        _sync(device)
        res["decode_total_s"] = statistics.median(time_step(t) for t in range(n + warm, n + steps - 1))
        res["decode_frontend_s"] = _decode_frontend(rt, prefill, time_step, n, steps)
        t_last = n + steps - 1
        rt.keep_selections = True
        decode_step(t_last)
        sel_dec = dict(rt.last_selection)
        rt.keep_selections = False
        dec_qkv = step_inputs(t_last)
        res["decode_attention_s"] = time_call(attention_only(sel_dec, dec_qkv, cfg.block_size, scale, triton, True),
                                              device, args.reps, args.warmup)
        res["decode_dense_s"] = time_call(
            lambda: [F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True) for q, k, v in dec_qkv],
            device, args.reps, args.warmup)
        def third_step():  # a fresh prefill and two steps; the third is counted
            prefill()
            decode_step(n)
            decode_step(n + 1)
            inputs = step_inputs(n + 2)
            return lambda: decode_step(n + 2, inputs)

        ops, syncs = count_ops_and_syncs(third_step, device)
        res["decode_ops_per_layer"], res["decode_syncs_per_layer"] = ops / L, syncs / L
    for phase in ("prefill", "decode"):
        if f"{phase}_total_s" in res:
            res[f"{phase}_frontend_ms_per_layer"] = 1e3 * res[f"{phase}_frontend_s"] / L
            res[f"{phase}_attention_ms_per_layer"] = 1e3 * res[f"{phase}_attention_s"] / L
            res[f"{phase}_total_ms_per_layer"] = 1e3 * res[f"{phase}_total_s"] / L
            res[f"{phase}_dense_ms_per_layer"] = 1e3 * res[f"{phase}_dense_s"] / L
    res["density"] = rt.density().overall
    return res


def _stub_attention(rt):
    """Replace the runtime's final attention call by a no-op (selection only); returns the undo."""
    rt._attend = lambda *a, **kw: None
    return lambda: rt.__dict__.pop("_attend", None)


def _frontend_only(rt, prefill, device, args) -> float:
    undo = _stub_attention(rt)
    try:
        return time_call(prefill, device, args.reps, args.warmup)
    finally:
        undo()


def _decode_frontend(rt, prefill, time_step, n: int, steps: int) -> float:
    """Median seconds of one decode step's selection (attention stubbed) over the same steps as the total."""
    prefill()
    undo = _stub_attention(rt)
    try:
        times = [time_step(t) for t in range(n, n + steps - 1)]
        return statistics.median(times[len(times) // 4:])  # the first steps warm up
    finally:
        undo()


def run_all(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    out = []
    for n in args.seq:
        for backend in args.backends:
            r = bench_case(n, backend, args, device, dtype)
            print(f"  done seq={n} backend={backend}", file=sys.stderr, flush=True)
            out.append(r)
    return out


# ------------------------------------------------------------------------------------------
# baseline (older package) in a subprocess
# ------------------------------------------------------------------------------------------

def baseline_results(args) -> list[dict]:
    """Run this script against an older tree (--baseline-tree, or --baseline-rev via git archive)."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = args.baseline_tree
        if tree is None:
            repo = Path(__file__).resolve().parents[1]
            archive = subprocess.run(["git", "-C", str(repo), "archive", args.baseline_rev, "sketchwalk"],
                                     check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            tree = tmp
        out = Path(tmp) / "baseline.json"
        argv = [a for a in sys.argv[1:]]
        cmd = [sys.executable, __file__, *_strip_baseline_args(argv), "--out", str(out), "--quiet"]
        subprocess.run(cmd, check=True, env=dict(os.environ, SKETCHWALK_BENCH_TREE=str(tree)))
        return json.loads(out.read_text())["results"]


def _strip_baseline_args(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--baseline-rev", "--baseline-tree", "--out"):
            skip = True
            continue
        if a.startswith(("--baseline-rev=", "--baseline-tree=", "--out=")):
            continue
        out.append(a)
    return out


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------

COLUMNS = [("front end", "frontend_ms_per_layer"), ("total", "total_ms_per_layer"),
           ("attention", "attention_ms_per_layer"), ("dense", "dense_ms_per_layer"),
           ("ops", "ops_per_layer"), ("syncs", "syncs_per_layer")]


def _fmt(key: str, val) -> str:
    return "-" if val is None else (f"{val:.3f}" if "ms" in key else f"{val:.1f}")


def table_rows(results: list[dict], baseline: list[dict] | None) -> tuple[list[str], list[list[str]]]:
    """Header and rows; with a baseline each cell reads `new (old, old/new)`."""
    base = {(r["seq"], r["backend"]): r for r in baseline or []}
    headers = ["seq", "backend", "phase"] + [name + (" ms/layer" if "ms" in key else "/layer") for name, key in COLUMNS]
    rows = []
    for r in results:
        b = base.get((r["seq"], r["backend"]))
        for phase in ("prefill", "decode"):
            if f"{phase}_total_s" not in r:
                continue
            row = [str(r["seq"]), r["backend"] + (" (triton)" if r["triton"] else ""), phase]
            for _, key in COLUMNS:
                val = r[f"{phase}_{key}"]
                cell = _fmt(key, val)
                if baseline is not None:
                    old = b.get(f"{phase}_{key}") if b else None
                    ratio = f", {old / val:.2f}x" if old and val else ""
                    cell += f" ({_fmt(key, old)}{ratio})"
                row.append(cell)
            rows.append(row)
    return headers, rows


def print_table(results: list[dict], baseline: list[dict] | None) -> None:
    headers, rows = table_rows(results, baseline)
    title = "Sketch&Walk front end per layer" + (": new (old, old/new)" if baseline is not None else "")
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for h in headers:
            table.add_column(h, justify="right")
        for row in rows:
            table.add_row(*row)
        Console(width=max(120, sum(max(len(h), *(len(r[i]) for r in rows)) + 3 for i, h in enumerate(headers)))).print(table)
    except ImportError:
        print(title)
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
        print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
        for row in rows:
            print("  ".join(c.rjust(w) for c, w in zip(row, widths)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seq", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--layers", type=int, default=SMOLLM2["layers"])
    p.add_argument("--backends", nargs="+", default=None,
                   help="default: torch and triton on CUDA, torch on CPU (triton there needs TRITON_INTERPRET=1)")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--decode-query", default="token", choices=["token", "block_mean", "window"])
    p.add_argument("--walk", default="product", choices=["product", "damped", "none"])
    p.add_argument("--decode-steps", type=int, default=64, help="decode steps after the prefill (0: prefill only)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--baseline-rev", default=None, help="also run this git revision's sketchwalk/ (git archive)")
    p.add_argument("--baseline-tree", default=None, help="also run the sketchwalk/ package in this directory")
    p.add_argument("--out", default=None, help="JSON results")
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.backends is None:
        args.backends = ["torch", "triton"] if args.device.startswith("cuda") else ["torch"]
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run_all(args)
    baseline = baseline_results(args) if (args.baseline_rev or args.baseline_tree) else None
    meta = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
            "torch": torch.__version__, "package": str(Path(sketchwalk.__file__).parent), "args": vars(args)}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results, "baseline": baseline}, indent=2))
    if not args.quiet:
        print(f"package: {meta['package']}  device: {meta['device']}")
        print_table(results, baseline)


if __name__ == "__main__":
    main()
