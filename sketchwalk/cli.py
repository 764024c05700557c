"""The `sketchwalk` command line.

Each subcommand is one `run(args) -> int` function registered with `@command(...)`, plus an
optional `arguments(parser)` function for its flags. Heavy imports (torch, transformers) stay
inside the run functions so that `sketchwalk --help` is instant.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
from importlib import metadata
from typing import Any, Callable, Optional

Run = Callable[[argparse.Namespace], int]
Arguments = Callable[[argparse.ArgumentParser], None]


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    help: str  # one line, shown in `sketchwalk --help`
    description: str  # shown in `sketchwalk NAME --help`
    run: Run
    arguments: Optional[Arguments] = None


COMMANDS: dict[str, Command] = {}


def command(name: str, *, help: str, description: str | None = None,
            arguments: Arguments | None = None) -> Callable[[Run], Run]:
    """Decorator registering `run(args) -> exit code` as subcommand `name`."""
    def register(run: Run) -> Run:
        if name in COMMANDS:
            raise ValueError(f"subcommand {name!r} registered twice")
        COMMANDS[name] = Command(name, help, description or help, run, arguments)
        return run
    return register


# -- info -------------------------------------------------------------------------------------

_VERSIONED = ("torch", "transformers", "triton", "gguf", "optuna", "ray", "mlflow")


def _dist_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _sketchwalk_version() -> str:
    try:
        import sketchwalk

        version = getattr(sketchwalk, "__version__", None)
        if version:
            return str(version)
    except ImportError:
        pass
    return _dist_version("sketchwalk-tune")


def versions() -> dict[str, str]:
    """Versions of Python and the packages the project depends on ("not installed" if absent).

    Read from package metadata rather than by importing, so this is fast and cannot fail on a
    broken install.
    """
    out = {"python": platform.python_version()}
    out.update({name: _dist_version(name) for name in _VERSIONED})
    out["sketchwalk"] = _sketchwalk_version()
    return out


def _cpu_name() -> str:
    # platform.processor() is empty on most Linux systems; /proc/cpuinfo has the model name.
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info() -> dict[str, Any]:
    """The device `load()` would pick: CUDA name and compute capability, or CPU and core count."""
    info: dict[str, Any] = {"cpu_count": os.cpu_count()}
    try:
        import torch
    except ImportError:
        return dict(info, kind="cpu", name=_cpu_name(),
                    note="torch not installed")
    info["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(idx)
        return dict(info, kind="cuda", name=torch.cuda.get_device_name(idx),
                    capability=f"{major}.{minor}", cuda_devices=torch.cuda.device_count(),
                    cuda_version=torch.version.cuda)
    return dict(info, kind="cpu", name=_cpu_name())


def model_status(spec: str, fetch: bool) -> dict[str, Any]:
    """Resolution and cache state of a model spec; fetches the bundled model unless `fetch`
    is False. Never loads weights."""
    from sketchwalk import models

    try:
        resolved = models.resolve(spec)
    except models.ModelSpecError as e:
        return {"spec": spec, "error": str(e)}
    out: dict[str, Any] = {"spec": spec, "name": resolved.name, "kind": resolved.kind,
                           "path": str(resolved.file), "source": resolved.source}
    if resolved.kind != "bundled":
        # User files have no published hash to check against.
        return dict(out, cached=True, sha256="not checked (local file)")
    if fetch:
        try:
            models.ensure_bundled_gguf(progress=True)
        except models.ModelFetchError as e:
            out["fetch_error"] = str(e)
    status = models.bundled_status()
    out.update(cached=status["cached"], sha256=status["sha256"],
               expected_sha256=models.GGUF_SHA256, size_bytes=status["size_bytes"],
               cache_dir=str(models.cache_dir()))
    return out


def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", metavar="SPEC",
                   help="model to report on: 'smollm2-135m' (the bundled default), a .gguf "
                        "file, or a local Hugging Face directory (default: %(default)s)")
    p.add_argument("--no-fetch", action="store_true",
                   help="do not download/extract the bundled model if it is not cached; just "
                        "report whether it is")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (keys: versions, device, model) instead of tables")


@command("info", arguments=_info_arguments,
         help="show package versions, the compute device and the model cache",
         description="Print the versions of Python and the key packages, the device models "
                     "load onto (CUDA GPU or CPU), and where the model comes from: its "
                     "resolved path, whether it is cached and whether its sha256 is verified. "
                     "Fetches the bundled model into the cache unless --no-fetch.")
def cmd_info(args: argparse.Namespace) -> int:
    """`sketchwalk info`: exit 0, or 1 if the model spec is invalid or the fetch failed."""
    report = {"versions": versions(), "device": device_info(),
              "model": model_status(args.model, fetch=not args.no_fetch)}
    failed = "error" in report["model"] or "fetch_error" in report["model"]
    if args.json:
        print(json.dumps(report, indent=2))
        return 1 if failed else 0

    from rich.console import Console
    from rich.table import Table

    console = Console()
    for title, section in (("Versions", report["versions"]), ("Device", report["device"]),
                           ("Model", report["model"])):
        table = Table(title=title, show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        for key, value in section.items():
            style = "red" if key in ("error", "fetch_error") or value == "not installed" else ""
            table.add_row(key, str(value), style=style)
        console.print(table)
    return 1 if failed else 0


# -- demo -------------------------------------------------------------------------------------

def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", metavar="SPEC",
                   help="'smollm2-135m' (bundled default), a .gguf file or a local HF directory (default: %(default)s)")
    p.add_argument("--suite", default="ruler-smoke", metavar="NAME|PATH",
                   help="RULER suite: a shipped name (ruler-smoke, ruler-niah, ruler-11; '@4k,8k' overrides "
                        "lengths) or a suite YAML path (default: %(default)s)")
    p.add_argument("--samples", type=int, default=None, help="samples per task per length (default: the suite's)")
    p.add_argument("--essays", default=None, metavar="PATH",
                   help="PaulGrahamEssays.json for essay-haystack tasks (default: $SKETCHWALK_ESSAYS)")
    p.add_argument("--config", default=None, metavar="YAML",
                   help="SketchWalk config YAML (default: the paper's settings at --density)")
    p.add_argument("--density", type=float, default=0.5,
                   help="τ as a fraction of causal blocks when no --config is given (default: %(default)s; the "
                        "paper's 0.2 leaves only 3-7 blocks per row at the smoke suite's 1-2K tokens)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--out", default="runs/demo.json", metavar="PATH",
                   help="JSON with both evaluations, per-sample predictions included (default: %(default)s)")


@command("demo", arguments=_demo_arguments,
         help="dense vs Sketch&Walk on a RULER suite: accuracy, prefill time, density",
         description="Evaluate the model twice on the same RULER samples, once with dense attention "
                     "and once with Sketch&Walk attached, and print accuracy (95%% bootstrap "
                     "intervals), median prefill time and measured density side by side. "
                     "Everything is checked before the model is loaded.")
def cmd_demo(args: argparse.Namespace) -> int:
    """`sketchwalk demo`: exit 0 on success, 2 on bad input."""
    import dataclasses as dc

    from rich.console import Console
    from rich.table import Table

    from .config import ConfigError, SketchWalkConfig
    from .ruler import RulerError, build_suite, load_suite

    console = Console()
    try:
        config = SketchWalkConfig.from_yaml(args.config) if args.config else SketchWalkConfig(density=args.density)
        suite = load_suite(args.suite)
        if args.samples is not None:
            suite = dc.replace(suite, samples=args.samples)
        essays = args.essays or os.environ.get("SKETCHWALK_ESSAYS")
        if any(_needs_essays(t) for t in suite.tasks) and not essays:
            raise RulerError(f"suite {suite.name} has essay-haystack tasks: pass --essays PATH or set SKETCHWALK_ESSAYS")
    except (ConfigError, RulerError, OSError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2

    from .evaluation import evaluate
    from .models import load

    model, tokenizer = load(args.model, dtype=args.dtype)
    samples = build_suite(suite, tokenizer, essays_path=essays, max_context=getattr(model.config, "max_position_embeddings", None))
    dense = evaluate(model, tokenizer, None, samples, model_name=args.model)
    sparse = evaluate(model, tokenizer, config, samples, model_name=args.model)

    table = Table(title=f"{args.model} on {suite.name} ({dense.device}, {dense.dtype})")
    for col in ("task@length", "dense acc", "sketchwalk acc", "n"):
        table.add_column(col, justify="right")
    for key, d in dense.accuracy.items():
        s = sparse.accuracy[key]
        table.add_row(key, f"{d['mean']:.1f} [{d['lo']:.0f}, {d['hi']:.0f}]", f"{s['mean']:.1f} [{s['lo']:.0f}, {s['hi']:.0f}]", str(d["n"]))
    console.print(table)
    speed = Table(title="prefill (median s per sample) and measured density")
    for col in ("length", "dense prefill s", "sketchwalk prefill s"):
        speed.add_column(col, justify="right")
    for length, t in dense.prefill_s.items():
        speed.add_row(length, f"{t:.4f}", f"{sparse.prefill_s[length]:.4f}")
    console.print(speed)
    console.print(f"SketchWalk config {config.short_hash()}: measured density prefill {sparse.density['prefill']:.3f}, "
                  f"decode {sparse.density['decode']:.3f} (all layers; sparse layers only: "
                  f"{sparse.density['sparse_layers']['prefill']:.3f} / {sparse.density['sparse_layers']['decode']:.3f})")
    out = {"suite": dc.asdict(suite), "dense": json.loads(dense.to_json()), "sketchwalk": json.loads(sparse.to_json())}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=2, default=str)
    console.print(f"wrote {args.out}")
    return 0


def _needs_essays(task: str) -> bool:
    from .ruler import TASKS

    return task in TASKS and TASKS[task].needs_essays


# -- entry point ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per registered command."""
    parser = argparse.ArgumentParser(
        prog="sketchwalk",
        description="SketchWalk Tune: Sketch&Walk block-sparse attention (arXiv 2602.07397) "
                    "on Hugging Face causal LMs: tuning, evaluation and export.",
        epilog="Run 'sketchwalk COMMAND --help' for a command's flags.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_sketchwalk_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description)
        if cmd.arguments:
            cmd.arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
