"""Sweep the kernels' launch knobs on the GPU at hand, to choose the launchers' defaults.

Prefill: block_m x block_n x num_warps x num_stages at one length and density per model shape.
Decode: num_splits (and the launcher's default), timed plainly and replayed in a CUDA graph, so
that the Python launch overhead and the GPU time can be told apart. Times: do_bench medians, ms.

    python benchmarks/tune_kernels.py --n 16384 --density 0.2 --out results/tune_kernels.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import MODELS, bench, flash_sdpa, graph_time, random_selection  # noqa: E402
from sketchwalk.kernels import block_sparse_decode, block_sparse_prefill  # noqa: E402
from sketchwalk.kernels.block_sparse_decode import default_num_splits  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--decode-lengths", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["smollm2", "llama8b"])
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_kernels.py needs a CUDA GPU; none is visible.", file=sys.stderr)
        return 2
    dev, bs, res = torch.device("cuda"), args.block_size, {"prefill": [], "decode": []}
    for model in args.models:
        hq, hkv, d = (MODELS[model][x] for x in ("hq", "hkv", "d"))
        if not args.skip_prefill:
            n = args.n
            q = torch.randn(1, hq, n, d, device=dev, dtype=torch.bfloat16)
            k = torch.randn(1, hkv, n, d, device=dev, dtype=torch.bfloat16)
            v = torch.randn(1, hkv, n, d, device=dev, dtype=torch.bfloat16)
            sel = random_selection(n, bs, args.density, dev, seed=1)
            idx, cnt = sel.indices.to(torch.int32)[None], sel.counts.to(torch.int32)[None]
            base = block_sparse_prefill(q, k, v, idx, cnt, [0], bs, d ** -0.5)
            rows = []
            for bm, bn, nw, ns in itertools.product([None, 32, 64, 128], [32, 64], [4, 8], [1, 2, 3]):
                if bn > bs:
                    continue
                try:
                    fn = lambda: block_sparse_prefill(q, k, v, idx, cnt, [0], bs, d ** -0.5, block_m=bm,  # noqa: E731
                                                      block_n=bn, num_warps=nw, num_stages=ns)
                    err = float((fn().float() - base.float()).abs().max())
                    t = bench(fn)
                except Exception as exc:  # out of shared memory / registers for this config
                    rows.append(dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns, error=str(exc)[:200]))
                    continue
                rows.append(dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns, ms=t, max_diff=err))
            t_default = bench(lambda: block_sparse_prefill(q, k, v, idx, cnt, [0], bs, d ** -0.5))
            ok = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
            print(f"{model} prefill N={n} density={args.density}: default {t_default:.3f} ms; best:")
            for r in ok[:6]:
                print("   ", r)
            res["prefill"].append(dict(model=model, n=n, density=args.density, default_ms=t_default, rows=rows))
            del q, k, v
        for length in args.decode_lengths:
            q = torch.randn(1, hq, 1, d, device=dev, dtype=torch.bfloat16)
            k = torch.randn(1, hkv, length, d, device=dev, dtype=torch.bfloat16)
            v = torch.randn(1, hkv, length, d, device=dev, dtype=torch.bfloat16)
            sel = random_selection(length, bs, args.density, dev, seed=2)
            idx, cnt = sel.indices[-1:].to(torch.int32), sel.counts[-1:].to(torch.int32)
            off = torch.zeros(1, dtype=torch.int32, device=dev)
            dflt = default_num_splits(1, hkv, idx.shape[1], dev, bs)
            for splits in sorted({1, 2, 4, 8, 16, 32, 64, dflt}):
                fn = lambda: block_sparse_decode(q, k, v, idx, cnt, off, bs, d ** -0.5, num_splits=splits)  # noqa: E731
                t, tg = bench(fn), graph_time(fn)
                res["decode"].append(dict(model=model, length=length, density=args.density, splits=splits,
                                          default=splits == dflt, ms=t, graph_ms=tg))
                print(f"{model} decode L={length} splits={splits:3d}{'*' if splits == dflt else ' '} "
                      f"{t * 1e3:7.1f} us (graph {tg * 1e3:6.1f} us)", flush=True)
            fd = lambda: flash_sdpa(q, k, v, False)  # noqa: E731
            print(f"{model} decode L={length} dense flash {bench(fd) * 1e3:7.1f} us (graph {graph_time(fd) * 1e3:6.1f} us)")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
