"""Benchmark the Triton block-sparse kernels against dense FlashAttention SDPA and the reference.

Prefill: block_sparse_prefill vs F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)
on the FlashAttention backend, and vs the PyTorch reference `sparse_attention` (a dense SDPA with
a token mask: an accuracy tool, timed only up to --reference-max-n).
Decode: one query token over an L-token cache, block_sparse_decode vs dense SDPA (flash backend),
timed plainly (includes Python launch overhead, which dominates at these sizes) and replayed
from a CUDA graph (GPU time only).

Selections are random (sink + diagonal always kept, then the rest drawn uniformly at random up to
the row's density via the real `select_blocks`); the kernels' cost does not depend on which
blocks are picked beyond their number. Times are medians of triton.testing.do_bench, in ms.

    python benchmarks/bench_kernels.py --out results/bench_kernels.json
    python benchmarks/bench_kernels.py --lengths 4096 8192 --densities 0.2 1.0 --models smollm2
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sketchwalk.config import SketchWalkConfig  # noqa: E402
from sketchwalk.kernels import block_sparse_decode, block_sparse_prefill  # noqa: E402
from sketchwalk.method.attention import sparse_attention  # noqa: E402
from sketchwalk.method.selection import select_blocks  # noqa: E402

MODELS = {
    "smollm2": dict(hq=9, hkv=3, d=64),       # SmolLM2-135M-like
    "llama8b": dict(hq=32, hkv=8, d=128),     # Llama-3.1-8B-like
}


def random_selection(n: int, block_size: int, density: float, device, seed: int):
    """BlockSelection for all query blocks of an n-token sequence at the given density, random scores."""
    nb = -(-n // block_size)
    gen = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(nb, nb, generator=gen, device=device)
    cfg = SketchWalkConfig(block_size=block_size, density=density)
    return select_blocks(scores, torch.arange(nb, device=device), cfg)


def flash_sdpa(q, k, v, causal: bool):
    """Dense SDPA on the FlashAttention backend (falls back to the default choice if refused)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    except RuntimeError:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


def flash_backend_ok(q, k, v) -> bool:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return True
    except RuntimeError:
        return False


def bench(fn) -> float:
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def graph_time(fn) -> float:
    """Median ms of fn replayed from a CUDA graph: GPU time without Python launch overhead."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return bench(g.replay)


def run(args) -> dict:
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    bs = args.block_size
    records = []
    for model in args.models:
        shp = MODELS[model]
        hq, hkv, d = shp["hq"], shp["hkv"], shp["d"]
        scale = d ** -0.5
        for n in args.lengths:
            torch.manual_seed(n)
            q = torch.randn(1, hq, n, d, device=dev, dtype=dtype)
            k = torch.randn(1, hkv, n, d, device=dev, dtype=dtype)
            v = torch.randn(1, hkv, n, d, device=dev, dtype=dtype)
            flash_ok = flash_backend_ok(q, k, v)
            t_dense = bench(lambda: flash_sdpa(q, k, v, True))
            dense_out = flash_sdpa(q, k, v, True)
            # decode: the last token of the same cache
            qd = q[:, :, -1:].contiguous()
            t_dense_dec = bench(lambda: flash_sdpa(qd, k, v, False))
            g_dense_dec = graph_time(lambda: flash_sdpa(qd, k, v, False))
            for density in args.densities:
                sel = random_selection(n, bs, density, dev, seed=n + int(1000 * density))
                idx = sel.indices.to(torch.int32)[None].contiguous()
                cnt = sel.counts.to(torch.int32)[None].contiguous()
                off = torch.zeros(1, dtype=torch.int32, device=dev)
                measured = float(sel.selected_pairs() / sel.causal_pairs())
                fn = lambda: block_sparse_prefill(q, k, v, idx, cnt, [0], bs, scale)  # noqa: E731  (list: no sync)
                out = fn()
                err = float((out.float() - dense_out.float()).abs().max()) if density >= 1.0 else None
                t_sparse = bench(fn)
                t_ref = None
                if n <= args.reference_max_n:
                    pos = torch.arange(n, device=dev)
                    t_ref = bench(lambda: sparse_attention(q[0], k[0], v[0], pos, sel, scale))
                # decode: the last row's selection (the query block holding the last token)
                didx, dcnt = idx[:, -1], cnt[:, -1]
                dfn = lambda: block_sparse_decode(qd, k, v, didx, dcnt, off, bs, scale)  # noqa: E731
                dout = dfn()
                derr = (float((dout.float() - flash_sdpa(qd, k, v, False).float()).abs().max())
                        if density >= 1.0 else None)
                t_dec = bench(dfn)
                g_dec = graph_time(dfn)
                rec = dict(model=model, hq=hq, hkv=hkv, head_dim=d, n=n, block_size=bs, density=density,
                           measured_density=measured, dense_flash_ms=t_dense, flash_backend=flash_ok,
                           sparse_ms=t_sparse, reference_ms=t_ref, speedup_vs_dense=t_dense / t_sparse,
                           max_abs_err_vs_dense=err, decode_dense_ms=t_dense_dec, decode_sparse_ms=t_dec,
                           decode_speedup=t_dense_dec / t_dec, decode_max_abs_err_vs_dense=derr,
                           decode_dense_graph_ms=g_dense_dec, decode_sparse_graph_ms=g_dec,
                           decode_graph_speedup=g_dense_dec / g_dec)
                records.append(rec)
                print(f"{model:8s} N={n:6d} dens={density:4.2f} (meas {measured:.3f}) | prefill dense {t_dense:8.3f} "
                      f"sparse {t_sparse:8.3f} x{t_dense / t_sparse:5.2f} ref "
                      f"{'-' if t_ref is None else f'{t_ref:8.2f}'} | decode dense {t_dense_dec * 1e3:7.1f}us "
                      f"sparse {t_dec * 1e3:7.1f}us x{t_dense_dec / t_dec:5.2f} (graphs: {g_dense_dec * 1e3:5.1f} / "
                      f"{g_dec * 1e3:5.1f}us x{g_dense_dec / g_dec:5.2f})"
                      + (f" | err {err:.2e}/{derr:.2e}" if err is not None else ""), flush=True)
            del q, k, v, qd, dense_out
            torch.cuda.empty_cache()
    import triton
    return dict(
        meta=dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  python=platform.python_version(), dtype="bfloat16", batch=1, block_size=bs,
                  time=time.strftime("%Y-%m-%dT%H:%M:%S"), timer="triton.testing.do_bench median, ms"),
        records=records)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="write the JSON results here")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.2, 0.5, 1.0])
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["smollm2", "llama8b"])
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--reference-max-n", type=int, default=16384,
                    help="time the PyTorch reference only up to this length (it materialises an N x N mask)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU (Triton kernels are compiled for it); none is visible.",
              file=sys.stderr)
        return 2
    result = run(args)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
