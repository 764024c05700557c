"""The kernel benchmark as a script: the same run as `sketchwalk bench kernels` (sketchwalk/bench/kernels.py).

    python benchmarks/bench_kernels.py --out results/kernels/bench_kernels.json   # full run, H200 ~3 min
    python benchmarks/bench_kernels.py --quick                                    # short GPU run
    python benchmarks/bench_kernels.py --dry-run                                  # CPU, Triton interpreter
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sketchwalk.bench import SHAPES, add_kernel_arguments, run_kernels  # noqa: E402

# -- kept for benchmarks/tune_kernels.py, which imports these from here -------------------------
MODELS = {name: SHAPES[name] for name in ("smollm2", "llama8b")}


def bench(fn) -> float:
    """Median ms of fn() (triton.testing.do_bench, budget scaled to the call's cost)."""
    import torch

    from sketchwalk.bench.kernels import Timer

    fn()  # Timer expects a compiled fn
    return Timer(torch.device("cuda"))(fn)


def flash_sdpa(q, k, v, causal: bool):
    """Dense SDPA pinned to the FlashAttention backend."""
    from sketchwalk.bench.kernels import sdpa

    return sdpa("flash", causal)(q, k, v)


def graph_time(fn) -> float:
    """Median ms of fn() replayed from a CUDA graph (GPU time without Python launch overhead)."""
    import torch

    from sketchwalk.bench.kernels import Pool, Timer

    return Timer(torch.device("cuda"))(Pool([()]).graph_replay(fn))


def random_selection(n: int, block_size: int, density: float, device, seed: int):
    """BlockSelection (int32) of every query block of an n-token prefill, `select_blocks` on random scores."""
    from sketchwalk.bench.kernels import random_selection as _random, selection_config

    return _random(n, selection_config(density, block_size, 64), device, seed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_kernel_arguments(ap)
    return run_kernels(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
