"""Check and tune the Hopper paths of issue 19 on the GPU at hand; writes one JSON.

1. Correctness: the TMA prefill (`path="hopper"`, both pair settings) against the portable kernel and
   the PyTorch reference on awkward inputs (GQA groups, variable counts per row, a partial last
   block, left padding, per-KV-head selections), d = 64 and 128, bf16.
2. Prefill: Llama-3.1-8B attention shape at density 0.2 (random selection at the runtime's counts),
   num_warps x num_stages x pair x block_m, at each --lengths; active TFLOP/s from the exact token
   pairs; the portable kernel and SDPA-cuDNN dense beside it.
3. Decode: one query over an L-token cache, num_splits x num_warps x num_stages x block_n, replayed
   from a CUDA graph, GB/s of the selected K/V bytes.

    python benchmarks/tune_hopper.py --out results/kernels/tune_hopper_h200.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import MODELS, bench, graph_time, random_selection  # noqa: E402
from sketchwalk.bench.kernels import Pool, attention_tflops, causal_token_pairs, sdpa, selected_token_pairs  # noqa: E402
from sketchwalk.kernels import block_sparse_decode, block_sparse_prefill  # noqa: E402
from sketchwalk.method.attention import sparse_attention  # noqa: E402
from sketchwalk.method.selection import BlockSelection  # noqa: E402


def random_rows(bsz: int, hkv: int, n: int, offsets: list[int], bs: int, per_head: bool, gen) -> tuple:
    """Causal selections with variable counts (diagonal always kept): indices [B(, Hkv), nqb, nqb], counts [B, nqb]."""
    nqb = -(-n // bs)
    heads = hkv if per_head else 1
    idx = torch.full((bsz, heads, nqb, nqb), -1, dtype=torch.int32)
    cnt = torch.zeros(bsz, nqb, dtype=torch.int32)
    for b in range(bsz):
        for r in range(-(-(n - offsets[b]) // bs)):
            c = int(torch.randint(0, r + 1, (), generator=gen))  # off-diagonal picks of this row
            cnt[b, r] = c + 1
            for h in range(heads):
                picks = sorted(torch.randperm(r, generator=gen)[:c].tolist()) + [r]
                idx[b, h, r, :c + 1] = torch.tensor(picks, dtype=torch.int32)
    return (idx if per_head else idx[:, 0]), cnt


#: (Hq, Hkv, d, N, left pads per sequence, per-KV-head selection, block size)
CHECKS = [(32, 8, 128, 1000, [0, 37], False, 64), (9, 3, 64, 777, [0, 130], False, 64),
          (32, 8, 128, 640, [5, 0], True, 64), (8, 8, 128, 513, [0], False, 64), (32, 8, 128, 700, [0, 3], False, 128)]


def check_correctness(dev, checks=CHECKS) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for hq, hkv, d, n, offsets, per_head, bs in checks:
        bsz = len(offsets)
        q = torch.randn(bsz, hq, n, d, device=dev, dtype=torch.bfloat16)
        k = torch.randn(bsz, hkv, n, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn(bsz, hkv, n, d, device=dev, dtype=torch.bfloat16)
        idx, cnt = random_rows(bsz, hkv, n, offsets, bs, per_head, gen)
        idx, cnt = idx.to(dev), cnt.to(dev)
        portable = block_sparse_prefill(q, k, v, idx, cnt, offsets, bs, d ** -0.5, path="portable")
        row = dict(hq=hq, hkv=hkv, d=d, n=n, offsets=offsets, per_head=per_head, block_size=bs)
        for pair in (False, True):
            try:
                hop = block_sparse_prefill(q, k, v, idx, cnt, offsets, bs, d ** -0.5, path="hopper", pair=pair)
            except Exception as exc:
                row[f"error_pair{int(pair)}"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                hop = torch.full_like(q, float("nan"))
                continue
            row[f"err_hopper_pair{int(pair)}_vs_portable"] = float((hop.float() - portable.float()).abs().max())
        if not per_head:  # the reference, sequence 0 (no padding) in fp32
            nb = -(-n // bs)
            sel = BlockSelection(idx[0, :nb].long().cpu(), cnt[0, :nb].long().cpu(), torch.arange(nb), bs)
            pos = torch.arange(n)
            ref = sparse_attention(q[0].float().cpu(), k[0].float().cpu(), v[0].float().cpu(), pos, sel, d ** -0.5)
            row["err_hopper_vs_reference"] = float((hop[0].float().cpu() - ref).abs().max())
            row["err_portable_vs_reference"] = float((portable[0].float().cpu() - ref).abs().max())
        print("check", row, flush=True)
        out.append(row)
    return out


# (num_warps, num_stages, pair, block_m); block_m 256 = the whole GQA group of a block in one program
PREFILL_GRID = [(4, 2, False, 128), (4, 3, False, 128), (4, 2, True, 128), (8, 2, False, 128), (8, 3, True, 128),
                (8, 2, False, 256), (8, 3, False, 256), (8, 2, True, 256), (4, 2, False, 256)]


def tune_prefill(dev, lengths: list[int], density: float, top: int, grid=PREFILL_GRID) -> list[dict]:
    shape = MODELS["llama8b"]
    hq, hkv, d, bs = shape["hq"], shape["hkv"], shape["d"], 64
    rows, ranked = [], None
    for n in lengths:
        q = torch.randn(1, hq, n, d, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, hkv, n, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn(1, hkv, n, d, device=dev, dtype=torch.bfloat16)
        sel = random_selection(n, bs, density, dev, seed=1)
        idx, cnt = sel.indices.to(torch.int32)[None], sel.counts.to(torch.int32)[None]
        pairs = selected_token_pairs(sel.indices, sel.counts, n, bs)
        ref = block_sparse_prefill(q, k, v, idx, cnt, [0], bs, d ** -0.5, path="portable")
        t_port = bench(lambda: block_sparse_prefill(q, k, v, idx, cnt, [0], bs, d ** -0.5, path="portable"))
        t_cudnn = bench(lambda: sdpa("cudnn", True)(q, k, v))
        base = dict(n=n, density=density, measured_density=pairs / causal_token_pairs(n), t_portable_ms=t_port,
                    t_cudnn_ms=t_cudnn, tflops_portable=attention_tflops(d, hq, pairs, t_port),
                    tflops_cudnn_dense=attention_tflops(d, hq, causal_token_pairs(n), t_cudnn))
        print("prefill", base, flush=True)
        configs = grid if ranked is None else ranked[:top]
        results = []
        for nw, ns, pair, bm in configs:
            cfg = dict(num_warps=nw, num_stages=ns, pair=pair, block_m=bm)
            try:
                fn = lambda: block_sparse_prefill(q, k, v, idx, cnt, [0], bs, d ** -0.5, path="hopper",  # noqa: E731
                                                  num_warps=nw, num_stages=ns, pair=pair, block_m=bm)
                err = float((fn().float() - ref.float()).abs().max())
                t = bench(fn)
            except Exception as exc:  # out of shared memory / registers for this config
                rows.append(dict(base, **cfg, error=f"{type(exc).__name__}: {str(exc)[:200]}"))
                continue
            r = dict(base, **cfg, ms=t, err_vs_portable=err, tflops=attention_tflops(d, hq, pairs, t),
                     speedup_vs_cudnn=t_cudnn / t, speedup_vs_portable=t_port / t)
            rows.append(r)
            results.append(r)
            print("  ", {k: r[k] for k in ("num_warps", "num_stages", "pair", "block_m", "ms", "tflops",
                                           "speedup_vs_cudnn", "err_vs_portable")}, flush=True)
        if ranked is None:
            ranked = [(r["num_warps"], r["num_stages"], r["pair"], r["block_m"])
                      for r in sorted(results, key=lambda r: r["ms"])]
        q = k = v = ref = None  # free before the next length
        torch.cuda.empty_cache()
    return rows


def decode_selection(length: int, batch: int, density: float, dev, bs: int = 64) -> tuple:
    """The last query block's selection of a random `length`-token selection, the same for every sequence:
    (indices [B, count], counts [B], offsets [B] zeros, selected K/V + q/out bytes at the 8B shape)."""
    shape = MODELS["llama8b"]
    sel = random_selection(length, bs, density, dev, seed=2)
    blocks = sel.indices[-1, :int(sel.counts[-1])].to(torch.int32)
    idx = blocks[None].expand(batch, -1).contiguous()
    cnt = torch.full((batch,), blocks.numel(), dtype=torch.int32, device=dev)
    off = torch.zeros(batch, dtype=torch.int32, device=dev)
    nbytes = 2 * batch * shape["hkv"] * blocks.numel() * bs * shape["d"] * 2 + 2 * batch * shape["hq"] * shape["d"] * 2
    return idx, cnt, off, nbytes


def tune_decode(dev, cases: list[tuple[int, int]], density: float) -> list[dict]:
    shape = MODELS["llama8b"]
    hq, hkv, d, bs = shape["hq"], shape["hkv"], shape["d"], 64
    rows = []
    for length, batch in cases:
        q = torch.randn(batch, hq, 1, d, device=dev, dtype=torch.bfloat16)
        k = torch.randn(batch, hkv, length, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn(batch, hkv, length, d, device=dev, dtype=torch.bfloat16)
        idx, cnt, off, nbytes = decode_selection(length, batch, density, dev, bs)
        ref = block_sparse_decode(q, k, v, idx, cnt, off, bs, d ** -0.5, num_splits=1)
        dense = sdpa("cudnn" if batch == 1 else "flash", False)
        t_dense = graph_time(lambda: dense(q, k, v))
        t_default = graph_time(lambda: block_sparse_decode(q, k, v, idx, cnt, off, bs, d ** -0.5))
        print("decode", dict(length=length, batch=batch, blocks=int(cnt[0]), t_dense_graph_ms=t_dense,
                             t_default_graph_ms=t_default, gbps_default=nbytes / t_default / 1e6), flush=True)
        best = None
        for splits, nw, ns, bpt, fused in itertools.product([16, 32, 64], [4, 8], [2, 3], [1, 2, 4], [False, True]):
            bn = 64
            fn = lambda: block_sparse_decode(q, k, v, idx, cnt, off, bs, d ** -0.5, num_splits=splits,  # noqa: E731
                                             num_warps=nw, num_stages=ns, block_n=bn, blocks_per_tile=bpt,
                                             fused_merge=fused)
            try:
                err = float((fn().float() - ref.float()).abs().max())
                t = graph_time(fn)
            except Exception as exc:
                rows.append(dict(length=length, batch=batch, splits=splits, num_warps=nw, num_stages=ns, block_n=bn,
                                 blocks_per_tile=bpt, fused_merge=fused, error=f"{type(exc).__name__}: {str(exc)[:200]}"))
                continue
            r = dict(length=length, batch=batch, splits=splits, num_warps=nw, num_stages=ns, block_n=bn,
                     blocks_per_tile=bpt, fused_merge=fused, graph_ms=t,
                     gbps=nbytes / t / 1e6, err=err, t_dense_graph_ms=t_dense, t_default_graph_ms=t_default)
            rows.append(r)
            best = r if best is None or t < best["graph_ms"] else best
        print("  best", best, flush=True)
        q = k = v = None  # free before the next case
        torch.cuda.empty_cache()
    return rows


def decode_steady(dev, cases, density: float, configs: list[dict]) -> list[dict]:
    """Each config and dense SDPA over `sets` distinct caches in one graph (Pool.steady_ms)."""
    shape = MODELS["llama8b"]
    hq, hkv, d, bs = shape["hq"], shape["hkv"], shape["d"], 64
    rows = []
    for length, batch, sets in cases:
        data = [tuple(torch.randn(batch, h, n, d, device=dev, dtype=torch.bfloat16)
                      for h, n in ((hq, 1), (hkv, length), (hkv, length))) for _ in range(sets)]
        idx, cnt, off, nbytes = decode_selection(length, batch, density, dev, bs)
        dense = sdpa("cudnn" if batch == 1 else "flash", False)
        pool = Pool(data)  # Pool.steady_ms: one graph over the distinct sets, no L2 flush
        t_dense = pool.steady_ms(dense)
        for cfg in [{}] + configs:
            t = pool.steady_ms(lambda q, k, v: block_sparse_decode(q, k, v, idx, cnt, off, bs, d ** -0.5, **cfg))
            r = dict(length=length, batch=batch, sets=sets, config=cfg or "default", ms=t, gbps=nbytes / t / 1e6,
                     t_dense_ms=t_dense, gbps_dense=2 * batch * hkv * length * d * 2 / t_dense / 1e6,
                     speedup=t_dense / t)
            print("steady", r, flush=True)
            rows.append(r)
        data = pool = None
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--top", type=int, default=6, help="configs re-timed at the lengths after the first")
    ap.add_argument("--skip", nargs="*", default=[], choices=["check", "prefill", "decode", "steady"])
    ap.add_argument("--prefill-configs", default=None,
                    help="'warps,stages,pair,block_m;...' instead of the grid (pair 0/1)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_hopper.py needs a CUDA GPU; none is visible.", file=sys.stderr)
        return 2
    dev, res, t0 = torch.device("cuda"), {"device": torch.cuda.get_device_name()}, time.time()

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))

    if "check" not in args.skip:
        res["check"] = check_correctness(dev)
        save()
    if "prefill" not in args.skip:
        grid = PREFILL_GRID if args.prefill_configs is None else [
            (int(a), int(b), bool(int(c)), int(m)) for a, b, c, m in (x.split(",") for x in args.prefill_configs.split(";"))]
        res["prefill"] = tune_prefill(dev, args.lengths, args.density, args.top, grid)
        save()
    if "decode" not in args.skip:
        res["decode"] = tune_decode(dev, [(131072, 1), (65536, 1), (131072, 8)], args.density)
        save()
    if "steady" not in args.skip:
        configs = [dict(num_splits=sp, fused_merge=f, blocks_per_tile=bpt, num_stages=ns)
                   for sp, f, bpt, ns in [(16, True, 1, 3), (32, False, 1, 3), (16, True, 2, 3), (64, True, 1, 2),
                                          (128, True, 1, 2)]]
        res["steady"] = decode_steady(dev, [(131072, 1, 8), (65536, 1, 8), (131072, 8, 3)], args.density, configs)
        save()
    res["seconds"] = time.time() - t0
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
