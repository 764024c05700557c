"""Benchmarks shipped with the package: `sketchwalk bench kernels` (issue 4).

This module is the command-line surface only: the model shapes, the run presets and the flags,
with no torch import, so that building the `sketchwalk` parser stays instant. The measurements
live in `sketchwalk.bench.kernels`, imported when a benchmark actually runs. The same flags serve
the CLI and the script `benchmarks/bench_kernels.py`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Optional

#: Attention shapes of the benchmarked models: query heads, KV heads, head_dim.
SHAPES = {
    "llama8b": dict(hq=32, hkv=8, d=128, model="Llama-3.1-8B"),
    "smollm2": dict(hq=9, hkv=3, d=64, model="SmolLM2-135M"),
    "tiny": dict(hq=4, hkv=2, d=32, model="tiny (--dry-run)"),
}

DEFAULT_OUT = "results/kernels/bench_kernels.json"
K = 1024

#: Run presets; explicit flags override them field by field. decode_seq None = the prefill
#: lengths from 8K on (decode of a shorter cache is launch-bound and says little).
PRESETS = {
    "full": dict(shapes=["llama8b", "smollm2"], seq=[4 * K, 8 * K, 16 * K, 32 * K, 64 * K, 128 * K],
                 decode_seq=None, decode_batch=[1, 8], density=[1.0, 0.5, 0.2, 0.1], block_size=64),
    "quick": dict(shapes=["llama8b", "smollm2"], seq=[4 * K, 16 * K], decode_seq=[16 * K], decode_batch=[1, 8],
                  density=[1.0, 0.2], block_size=64),
    # CPU, Triton interpreter: every code path on a tiny problem (a CI smoke test, not a measurement).
    "dry-run": dict(shapes=["tiny"], seq=[256], decode_seq=[256], decode_batch=[1, 2], density=[1.0, 0.5],
                    block_size=32),
}
DECODE_MIN_SEQ = 8 * K


@dataclasses.dataclass(frozen=True)
class KernelBenchSettings:
    """What one `bench kernels` run measures (a preset with the explicit flags applied)."""

    mode: str  # full | quick | dry-run
    shapes: list[str]
    seq: list[int]  # prefill lengths, tokens
    decode_seq: list[int]  # decode KV-cache lengths, tokens
    decode_batch: list[int]
    density: list[float]  # nominal densities (SketchWalkConfig.density)
    block_size: int
    reference_max_seq: int  # the PyTorch reference path is timed up to this length
    flex: bool
    graphs: bool  # decode also replayed from CUDA graphs
    time_limit: Optional[float]  # seconds; groups not started by then are skipped
    out: Optional[str]
    seed: int


def add_kernel_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `bench kernels` (shared by the CLI and benchmarks/bench_kernels.py)."""
    full = PRESETS["full"]
    p.add_argument("--out", nargs="?", const=DEFAULT_OUT, default=None, metavar="JSON",
                   help=f"write every row and the run's metadata as JSON (bare --out: {DEFAULT_OUT}); "
                        "without --out the tables are only printed. The file is rewritten after every "
                        "(shape, length) group, so an interrupted run keeps what it measured")
    p.add_argument("--shapes", nargs="+", default=None, metavar="SHAPE",
                   help="shapes: llama8b (32 q heads / 8 KV heads, d 128), smollm2 (9/3, d 64), "
                        f"tiny (4/2, d 32) (default: {' '.join(full['shapes'])}); e2e also takes a config.json path")
    p.add_argument("--seq", nargs="+", type=int, default=None, metavar="N",
                   help="prefill lengths in tokens (default: 4K 8K 16K 32K 64K 128K)")
    p.add_argument("--decode-seq", nargs="+", type=int, default=None, metavar="L",
                   help=f"decode KV-cache lengths (default: the --seq values >= {DECODE_MIN_SEQ})")
    p.add_argument("--decode-batch", "--batch", dest="decode_batch", nargs="+", type=int, default=None, metavar="B",
                   help="decode batch sizes (default: 1 8)")
    p.add_argument("--density", nargs="+", type=_floats, default=None, metavar="D",
                   help="nominal densities, SketchWalkConfig(density=D), space- or comma-separated "
                        "(default: kernels 1.0 0.5 0.2 0.1; e2e 0.2 0.1)")
    p.add_argument("--block-size", type=int, default=None, choices=[16, 32, 64, 128],
                   help="selection block size in tokens (default: 64; --dry-run: 32)")
    p.add_argument("--reference-max-seq", type=int, default=16 * K, metavar="N",
                   help="time the PyTorch reference (dense SDPA with a token mask, O(N^2) memory) only up "
                        "to this length (default: %(default)s)")
    p.add_argument("--no-flex", action="store_true",
                   help="skip FlexAttention (its torch.compile takes tens of seconds per shape)")
    p.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph replays of decode")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop starting new (shape, length) groups after this many seconds; the skipped "
                        "ones are listed in the JSON (default: no limit)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs and selections")
    e2e = p.add_argument_group("e2e only")
    e2e.add_argument("--model", default=None, metavar="SPEC",
                     help="e2e: a real model (smollm2-135m, a .gguf, an HF dir; sketchwalk.models.load) instead "
                          "of the random-weight --shapes")
    e2e.add_argument("--config", action="append", default=None, metavar="YAML",
                     help="e2e: a Sketch&Walk config file to time (repeatable; beside or instead of --density)")
    e2e.add_argument("--phase", choices=["prefill", "decode", "both"], default="both",
                     help="e2e: time only the prefill rows or only the decode rows (default: both)")
    e2e.add_argument("--repeats", type=int, default=None, metavar="N",
                     help="e2e: timed calls per measurement, median reported (default: 3; --dry-run 2)")
    e2e.add_argument("--warmup", type=int, default=None, metavar="N", help="e2e: untimed calls first (default: 1)")
    e2e.add_argument("--graphs", action="store_true",
                     help="e2e: also time each prefill forward replayed from one CUDA graph, dense and configs "
                          "alike (columns 'graph ms', 'x graph'; a capture failure is recorded in the row)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="a short GPU run: lengths 4K and 16K, densities 1.0 and 0.2, decode at 16K")
    mode.add_argument("--dry-run", action="store_true",
                      help="no GPU needed: a tiny shape (seq 256, block 32, fp32) end to end on the CPU under "
                           "the Triton interpreter (TRITON_INTERPRET=1), to test the code path; the times "
                           "mean nothing")


def _floats(text: str) -> list[float]:
    """'0.2,0.1' -> [0.2, 0.1] (a --density value; the lists of every value are flattened)."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number or comma-separated numbers: {text!r}") from None


def flat(values):
    """[[0.2, 0.1], [0.5]] -> [0.2, 0.1, 0.5]; None stays None."""
    return None if values is None else [x for v in values for x in (v if isinstance(v, list) else [v])]


def resolve_settings(args: argparse.Namespace) -> KernelBenchSettings:
    """The preset chosen by --quick / --dry-run (else the full run) with explicit flags applied."""
    mode = "dry-run" if args.dry_run else "quick" if args.quick else "full"
    preset = PRESETS[mode]

    def pick(name):
        value = flat(getattr(args, name)) if name == "density" else getattr(args, name)
        return preset[name] if value is None else value

    seq = sorted(set(pick("seq")))
    decode_seq = pick("decode_seq")
    if decode_seq is None:
        decode_seq = [n for n in seq if n >= DECODE_MIN_SEQ] or seq
    return KernelBenchSettings(
        mode=mode, shapes=list(dict.fromkeys(pick("shapes"))), seq=seq, decode_seq=sorted(set(decode_seq)),
        decode_batch=sorted(set(pick("decode_batch"))), density=sorted(set(pick("density")), reverse=True),
        block_size=pick("block_size"), reference_max_seq=args.reference_max_seq, flex=not args.no_flex,
        graphs=not args.no_graphs, time_limit=args.time_limit, out=args.out, seed=args.seed)


def run_kernels(args: argparse.Namespace) -> int:
    """Run `bench kernels` from parsed flags; exit code 0, or 2 when it cannot run here."""
    unknown = [s for s in (args.shapes or []) if s not in SHAPES]
    if unknown:
        print(f"sketchwalk bench kernels: --shapes: unknown shape(s) {unknown}; choose from {sorted(SHAPES)}",
              file=sys.stderr)
        return 2
    settings = resolve_settings(args)
    bad = [d for d in settings.density if not 0.0 < d <= 1.0] + [n for n in settings.seq + settings.decode_seq if n < 1]
    if bad or any(b < 1 for b in settings.decode_batch):
        print(f"sketchwalk bench kernels: densities must lie in (0, 1], lengths and batches be >= 1 (got {bad})",
              file=sys.stderr)
        return 2
    if settings.mode == "dry-run":
        # The interpreter switch is read when Triton is first imported: set it before anything does.
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and "triton" in sys.modules:
            print("sketchwalk bench kernels --dry-run: Triton was already imported without TRITON_INTERPRET=1; "
                  "set TRITON_INTERPRET=1 in the environment", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
    from . import kernels

    return kernels.main(settings)


def run_e2e(args: argparse.Namespace) -> int:
    """Run `bench e2e` from parsed flags; exit 0, or 2 on bad input (naming the flag) or when it cannot run."""
    from .e2e_plan import PlanError, resolve

    from .e2e_plan import DEFAULT_OUT as E2E_OUT

    args.density = flat(args.density)
    if args.out is None or args.out == DEFAULT_OUT:  # e2e always writes its JSON; bare --out = its default
        args.out = E2E_OUT
    try:
        settings = resolve(args)
    except PlanError as exc:
        print(f"sketchwalk bench e2e: {exc}", file=sys.stderr)
        return 2
    from . import e2e

    return e2e.main(settings)


__all__ = ["run_e2e", "SHAPES", "PRESETS", "DEFAULT_OUT", "KernelBenchSettings", "add_kernel_arguments", "resolve_settings",
           "run_kernels"]
