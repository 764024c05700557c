"""`sketchwalk tensors collect | validate | compare`: tensor-level validation from the command line.

collect records a dense model's post-RoPE Q, K, V on RULER prompts (or a prompt file);
validate replays a config on them against dense attention; compare sets its selections against
the oracle's and other selectors' at the same density. validate and compare print rich tables,
write JSON (compare also a heatmap PNG) and log one MLflow run each. Registered into
`sketchwalk` through the `sketchwalk.commands` entry point.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

from sketchwalk.cli import command

DEFAULT_EXPERIMENT = "sketchwalk-tensors"
DEFAULT_OTHERS = "random,streaming"


def _console():
    from sketchwalk.console import make_console

    return make_console()


def _error(console, exc: Exception) -> int:
    from sketchwalk.console import print_error

    return print_error(console, exc)


def _index_list(text: str) -> Optional[list[int]]:
    """'all' -> None; '0,3,8-11' -> [0, 3, 8, 9, 10, 11]."""
    if text.strip().lower() == "all":
        return None
    out: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, _, hi = part.partition("-")
            out.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or indices like 0,3,8-11, got {text!r}") from None
    return out


def _length(text: str) -> int:
    from sketchwalk.ruler import parse_length

    try:
        return parse_length(text)
    except Exception as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# -- arguments --------------------------------------------------------------------------------

def _collect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", metavar="SPEC",
                   help="'smollm2-135m' (bundled default), a .gguf file or a local HF directory (default: %(default)s)")
    p.add_argument("--out", required=True, metavar="DIR", help="recording directory (meta.json + safetensors)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--task", default=None, help="RULER task to generate prompts from (default: niah_single_1)")
    src.add_argument("--suite", default=None, metavar="NAME|PATH", help="RULER suite: its tasks and lengths")
    src.add_argument("--prompt-file", default=None, metavar="PATH",
                     help="prompts: a .jsonl (one JSON string or {input, answer_prefix} object per line; RULER "
                          "files work) or a text file (one prompt)")
    p.add_argument("--length", type=_length, default=None, metavar="TOKENS",
                   help="RULER prompt length, e.g. 1024 or 8k (default: 1024 with --task; the suite's lengths "
                        "with --suite)")
    p.add_argument("--samples", type=int, default=None, help="prompts per task x length (default: 1)")
    p.add_argument("--append-answer", action="store_true",
                   help="append each RULER prompt's reference answer (teacher forcing): its tokens are the "
                        "answer rows `tensors study` measures decode recall on")
    p.add_argument("--seed", type=int, default=42, help="RULER generation seed (default: %(default)s)")
    p.add_argument("--essays", default=None, metavar="PATH", help="PaulGrahamEssays.json for essay-haystack tasks")
    p.add_argument("--layers", type=_index_list, default=None, metavar="LIST",
                   help="layers to record: 'all' (default) or indices like 0,2,8-11")
    p.add_argument("--heads", type=_index_list, default=None, metavar="LIST",
                   help="query heads to record (their KV heads come along): 'all' (default) or indices")
    p.add_argument("--max-gb", type=float, default=2.0,
                   help="refuse recordings estimated above this many GiB (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="record even above --max-gb")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--device", default=None, help="model device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _replay_arguments(p: argparse.ArgumentParser, compare: bool) -> None:
    p.add_argument("record_dir", metavar="DIR", help="a recording made by `sketchwalk tensors collect`")
    p.add_argument("--config", default=None, metavar="YAML",
                   help="SketchWalk config YAML (default: paper defaults at density 0.2)")
    if compare:
        p.add_argument("--others", default=DEFAULT_OTHERS, metavar="LIST",
                       help="selectors (names) or config YAMLs to compare besides the oracle, comma-separated; "
                            "'' for none (default: %(default)s)")
        p.add_argument("--heatmap-layer", type=int, default=None, metavar="LAYER",
                       help="layer of the heatmap PNG (default: the deepest sparse layer)")
        p.add_argument("--png", default=None, metavar="PATH", help="heatmap path (default: beside the JSON)")
    p.add_argument("--decode-steps", type=int, default=0, metavar="N",
                   help="measure the decode phase instead of the prefill: the last N tokens of each prompt are "
                        "decoded one at a time after a prefill of the rest (default: 0 = the prefill)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="result JSON (default: DIR/<action>-<config hash>.json; -decode<N> added with --decode-steps)")
    p.add_argument("--device", default=None, help="replay device (default: cuda if available, else cpu)")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"],
                   help="attention backend of the replayed runtime (default: %(default)s)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: sqlite:///<workdir>/runs/mlflow.db, as the sweep)")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment (default: %(default)s)")
    p.add_argument("--workdir", default=".", help="where runs/ lives for the default tracking URI (default: .)")
    p.add_argument("--no-tracking", action="store_true", help="do not log an MLflow run")


def _arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    _collect_arguments(sub.add_parser("collect", help="record post-RoPE Q/K/V of a dense prefill per prompt",
                                      description="Record post-RoPE Q, K, V per layer (and head subset) from "
                                                  "one dense prefill per prompt; refuses recordings above --max-gb."))
    _replay_arguments(sub.add_parser("validate", help="replay a config on a recording against dense attention",
                                     description="Per layer: output cosine, relative and max abs error vs dense "
                                                 "attention, attention-mass recall and measured density."),
                      compare=False)
    _replay_arguments(sub.add_parser("compare", help="a config's selections vs the oracle's at the same density",
                                     description="Per layer and selector: Jaccard and overlap with the oracle's "
                                                 "selected block pairs, mass recall, density; plus a heatmap PNG."),
                      compare=True)
    st = sub.add_parser("study", help="selectors x densities on recordings: recall where answers are decided",
                        description="A study plan (YAML: recordings, densities, base, variants, decode_steps, out) "
                                    "-> per variant and density: prefill / last-row / decode-answer / needle "
                                    "recall, Jaccard vs the oracle variant, measured density; block coherence "
                                    "per layer; a table, JSON and a recall-vs-density plot.")
    st.add_argument("plan", metavar="PLAN.yaml", help="the study plan (see ablations/plans/selector-study.yaml)")
    st.add_argument("--out", default=None, metavar="DIR", help="output directory (default: the plan's `out`)")
    st.add_argument("--device", default="cpu", help="replay device (default: cpu)")


@command("tensors", arguments=_arguments,
         help="tensor-level validation: record Q/K/V, replay configs vs dense and vs the oracle",
         description="collect: record a dense model's post-RoPE Q, K, V on RULER prompts. validate: replay a "
                     "SketchWalk config on them layer by layer (walk carried across layers) against dense "
                     "attention. compare: its block selections against the oracle's (exact block attention "
                     "mass) and other selectors' at the same density. validate/compare print tables, write "
                     "JSON (and a heatmap PNG) and log an MLflow run.")
def cmd_tensors(args: argparse.Namespace) -> int:
    """`sketchwalk tensors ACTION`: exit 0 on success, 2 on bad input."""
    return {"collect": _collect, "validate": _validate, "compare": _compare, "study": _study}[args.action](args)


# -- collect ----------------------------------------------------------------------------------

def _prompts(args: argparse.Namespace, tokenizer) -> tuple[list[str], Optional[list[dict]]]:
    """Prompt texts as evaluation feeds them (RULER input + answer prefix) and, for RULER prompts,
    their answer annotations (needle token spans; with --append-answer the first reference answer
    is appended, teacher-forced, and its token span recorded too)."""
    if args.prompt_file:
        path = Path(args.prompt_file)
        if path.suffix == ".jsonl":
            return _jsonl_prompts(path)[:args.samples], None
        return [path.read_text()], None
    from sketchwalk.ruler import generate_task, load_suite
    from sketchwalk.validation import answer_annotation

    if args.suite:
        suite = load_suite(args.suite)
        tasks, lengths = suite.tasks, ([args.length] if args.length else suite.lengths)
    else:
        tasks, lengths = [args.task or "niah_single_1"], [args.length or 1024]
    prompts, notes = [], []
    for task in tasks:
        for length in lengths:
            for s in generate_task(task, length, args.samples or 1, tokenizer, seed=args.seed, essays_path=args.essays):
                text = s["input"] + s.get("answer_prefix", "")
                start = None
                if args.append_answer:
                    start = len(text)
                    text += " " + ", ".join(s["outputs"])  # the answer as a greedy reply would write it
                notes.append({"task": task, "length": length,
                              **answer_annotation(tokenizer, text, s["outputs"], start)})
                prompts.append(text)
    return prompts, notes


def _jsonl_prompts(path: Path) -> list[str]:
    """One prompt per non-blank line: a JSON object with `input` (+ optional `answer_prefix`; RULER
    files qualify) or a JSON string."""
    prompts = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        if isinstance(rec, dict) and isinstance(rec.get("input"), str):
            prompts.append(rec["input"] + rec.get("answer_prefix", ""))
        elif isinstance(rec, str):
            prompts.append(rec)
        else:
            raise ValueError(f"{path} line {lineno}: expected a JSON string or an object with a string 'input'")
    return prompts


def _collect(args: argparse.Namespace) -> int:
    from rich.table import Table

    from sketchwalk import models
    from sketchwalk.ruler import RulerError
    from sketchwalk.validation import collect

    console = _console()
    try:
        model, tokenizer = models.load(args.model, dtype=args.dtype, device=args.device, attn_implementation="sdpa",
                                       progress=not args.no_progress)
        prompts, notes = _prompts(args, tokenizer)
        rec = collect(model, tokenizer, prompts, args.out, layers=args.layers, heads=args.heads,
                      max_bytes=int(args.max_gb * 1024 ** 3), force=args.force, model_name=args.model,
                      progress=not args.no_progress, annotations=notes)
    except (models.ModelSpecError, models.ModelFetchError, RulerError, OSError, ValueError) as exc:
        return _error(console, exc)
    table = Table(title=f"recorded {args.model} -> {rec.path}", show_header=False, title_justify="left")
    for key in ("num_layers", "head_dim", "dtype", "layers", "heads", "kv_heads", "prompts", "bytes"):
        table.add_row(key, str(rec.meta[key]))
    table.add_row("lengths", str(sorted({e.length for e in rec.entries})))
    console.print(table)
    return 0


# -- validate / compare -----------------------------------------------------------------------

def _config(path: Optional[str]):
    from sketchwalk import SketchWalkConfig

    return SketchWalkConfig.from_yaml(path) if path else SketchWalkConfig()


def _others(text: str) -> list[Any]:
    """Comma-separated selector names and/or config YAML paths."""
    from sketchwalk import SketchWalkConfig

    out: list[Any] = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        out.append(SketchWalkConfig.from_yaml(item) if item.endswith((".yaml", ".yml")) else item)
    return out


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _validate(args: argparse.Namespace) -> int:
    from rich.table import Table

    from sketchwalk import ConfigError
    from sketchwalk.validation import validate
    from sketchwalk.validation.validate import METRICS

    console = _console()
    try:
        config = _config(args.config)
        result = validate(args.record_dir, config, device=args.device, backend=args.backend,
                          decode_steps=args.decode_steps)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        return _error(console, exc)
    table = Table(title=f"validate {config.short_hash()} ({config.selector}) on {args.record_dir}{_phase(args)}")
    for col in ("layer", "dense") + METRICS:
        table.add_column(col.replace("_", " "), justify="right")
    for row in result.layers:
        table.add_row(str(row["layer"]), "yes" if row["dense"] else "", *(_fmt(row[m]) for m in METRICS))
    table.add_row("overall", "", *(_fmt(result.overall[m]) for m in METRICS), style="bold")
    console.print(table)
    out = _write_json(args.json or Path(args.record_dir) / f"validate-{config.short_hash()}{_suffix(args)}.json",
                      result.to_dict())
    console.print(f"wrote {out}", highlight=False)
    metrics = dict(result.overall)
    metrics.update({f"{m}.layer.{row['layer']}": row[m] for row in result.layers for m in METRICS})
    return _track(console, args, "validate", config, metrics, [out], phase=result.phase)


def _compare(args: argparse.Namespace) -> int:
    from sketchwalk import ConfigError
    from sketchwalk.validation import compare, heatmap
    from sketchwalk.validation.compare import METRICS

    console = _console()
    try:
        config = _config(args.config)
        result = compare(args.record_dir, config, _others(args.others), device=args.device, backend=args.backend,
                         decode_steps=args.decode_steps)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        return _error(console, exc)
    vs = [label for label in result.labels if label != result.reference]
    console.print(_compare_table(result, f"mass recall ({config.short_hash()} on {args.record_dir}{_phase(args)})",
                                 result.labels,
                                 lambda r: _fmt(r["recall"])))
    console.print(_compare_table(result, f"jaccard / free-block overlap with the {result.reference}", vs,
                                 lambda r: f"{_fmt(r['jaccard'])} / {_fmt(r['free_overlap'])}"))
    out = _write_json(args.json or Path(args.record_dir) / f"compare-{config.short_hash()}{_suffix(args)}.json",
                      result.to_dict())
    files = [out]
    if result.phase == "prefill":  # a decode step is one row: no grid to draw
        try:
            files.append(heatmap(result, args.png or out.with_name(f"{out.stem}-heatmap.png"),
                                 layer=args.heatmap_layer))
        except KeyError:
            layers = sorted({r["layer"] for r in result.layers})
            return _error(console, ValueError(f"--heatmap-layer {args.heatmap_layer} was not recorded: layers {layers}"))
    console.print(f"wrote {' and '.join(map(str, files))}", highlight=False)
    metrics = {f"{label}.{m}": v for label, ms in result.overall.items() for m, v in ms.items()}
    metrics.update({f"{row['selector']}.{m}.layer.{row['layer']}": row[m]
                        for row in result.layers for m in METRICS})
    return _track(console, args, "compare", config, metrics, files, others=",".join(vs), phase=result.phase)


def _phase(args: argparse.Namespace) -> str:
    return f", decode: last {args.decode_steps} tokens" if args.decode_steps else ""


def _suffix(args: argparse.Namespace) -> str:
    return f"-decode{args.decode_steps}" if args.decode_steps else ""


def _compare_table(result, title: str, labels: list[str], cell):
    """One row per layer (plus overall), one column per selector label, `cell(row)` in each."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("layer", justify="right")
    for label in labels:
        table.add_column(label, justify="right")
    for layer in sorted({r["layer"] for r in result.layers}):
        table.add_row(str(layer), *(cell(result.layer_row(label, layer)) for label in labels))
    table.add_row("overall", *(cell(result.overall[label]) for label in labels), style="bold")
    return table


def _write_json(path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str))
    return path


def _track(console, args: argparse.Namespace, action: str, config, metrics: dict[str, float],
           artifacts: list[Path], **tags: str) -> int:
    """Log one MLflow run: params = the config's fields (as a sweep trial logs them), metrics, artifacts."""
    if args.no_tracking:
        return 0
    from tracking import SweepTracker, TrackingError, init_store, resolve_tracking_uri, retrying
    from tracking.names import TAG_CONFIG_HASH  # here, with the rest of tracking: MLflow loads only when used

    try:
        uri = resolve_tracking_uri(args.tracking_uri, args.workdir)
        experiment_id = init_store(uri, args.experiment)
        # A standalone run, not part of a sweep: the tracker is used for its batching, key
        # sanitising and retrying log helpers, which address runs by id.
        tracker = SweepTracker(uri, experiment_id, f"tensors-{action}")
        all_tags = {TAG_CONFIG_HASH: config.short_hash(),
                    **{f"sketchwalk.tensors.{k}": v for k, v in dict(tags, action=action,
                                                                     record_dir=str(args.record_dir)).items()}}
        run = retrying(tracker.client.create_run, experiment_id, run_name=f"{action} {config.short_hash()}",
                       tags=all_tags, what=f"create run at {uri}")
        run_id = run.info.run_id
        tracker.log_params(run_id, config.to_dict())
        tracker.log_metrics(run_id, metrics)
        for path in artifacts:
            tracker.log_file(run_id, str(path))
        tracker.finish(run_id)
    except TrackingError as exc:
        console.print(f"[yellow]MLflow logging failed:[/yellow] {exc}", highlight=False)
        return 1
    console.print(f"MLflow run {run_id} in experiment {args.experiment!r} at {uri}", highlight=False)
    return 0


# -- study ------------------------------------------------------------------------------------

STUDY_KEYS = ("recordings", "densities", "base", "variants", "decode_steps", "out")
STUDY_METRICS = ("recall_prefill", "recall_last", "recall_decode", "needle_recall", "jaccard",
                 "density_prefill", "density_decode")


def load_study_plan(path: str) -> dict[str, Any]:
    """A validated study plan: recordings (existing recording dirs, relative to the plan), densities in
    (0, 1], variants name -> SketchWalkConfig (base fields + the variant's), decode_steps (None or
    >= 1), out (relative to the plan, or None). Errors name the key and the allowed values (ValueError / ConfigError)."""
    import yaml

    from sketchwalk import SketchWalkConfig

    plan_path = Path(path)
    data = yaml.safe_load(plan_path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a study plan is a mapping with keys {list(STUDY_KEYS)}")
    unknown = sorted(set(data) - set(STUDY_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r}; allowed: {list(STUDY_KEYS)}")
    recs = data.get("recordings")
    if not isinstance(recs, list) or not recs or not all(isinstance(r, str) for r in recs):
        raise ValueError(f"{path}: recordings: a non-empty list of recording directories")
    recordings = [str((plan_path.parent / r) if not Path(r).is_absolute() else Path(r)) for r in recs]
    for r in recordings:
        if not (Path(r) / "meta.json").is_file():
            raise ValueError(f"{path}: recordings: {r} is not a recording (no meta.json; make one with "
                             f"`sketchwalk tensors collect --append-answer`)")
    densities = data.get("densities", [0.1, 0.2, 0.3])
    if (not isinstance(densities, list) or not densities
            or not all(isinstance(d, (int, float)) and not isinstance(d, bool) and 0 < d <= 1 for d in densities)):
        raise ValueError(f"{path}: densities: a non-empty list of numbers in (0, 1], got {densities!r}")
    base = data.get("base") or {}
    variants = data.get("variants")
    if not isinstance(base, dict):
        raise ValueError(f"{path}: base: a mapping of SketchWalkConfig fields")
    if not isinstance(variants, dict) or not variants:
        raise ValueError(f"{path}: variants: a non-empty mapping name -> SketchWalkConfig fields ({{}} = base)")
    configs = {}
    for name, fields in variants.items():
        if not isinstance(fields, dict):
            raise ValueError(f"{path}: variants.{name}: a mapping of SketchWalkConfig fields")
        configs[str(name)] = SketchWalkConfig.from_dict({**base, **fields, "density": densities[0], "top_k": None})
    steps = data.get("decode_steps")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ValueError(f"{path}: decode_steps: null (the recorded answer tokens) or an integer >= 1")
    out = data.get("out")
    if out is not None and not isinstance(out, str):
        raise ValueError(f"{path}: out: a directory path (relative to the plan), got {out!r}")
    if out is not None and not Path(out).is_absolute():
        out = str(plan_path.parent / out)  # like recordings: the plan means where it lives, not the cwd
    return {"recordings": recordings, "densities": [float(d) for d in densities], "variants": configs,
            "decode_steps": steps, "out": out}


def _study(args: argparse.Namespace) -> int:
    from rich.table import Table

    from sketchwalk import ConfigError
    from sketchwalk.validation.study import study

    console = _console()
    try:
        plan = load_study_plan(args.plan)
        out = Path(args.out or plan["out"] or Path(args.plan).with_suffix(""))
        result = study(plan["recordings"], plan["variants"], plan["densities"], decode_steps=plan["decode_steps"],
                       device=args.device)
    except (ConfigError, OSError, ValueError) as exc:
        return _error(console, exc)
    rows = sorted(result.rows, key=lambda r: (r["target_density"], r["variant"]))
    table = Table(title=f"selector study: {len(result.recordings)} recording(s)")
    for col in ("variant", "density") + STUDY_METRICS:
        table.add_column(col.replace("_", " "), justify="right")
    lines = ["| variant | target density | " + " | ".join(STUDY_METRICS) + " |", "|" + "---|" * (2 + len(STUDY_METRICS))]
    for r in rows:
        cells = [_fmt(r.get(m, float("nan"))) for m in STUDY_METRICS]
        table.add_row(r["variant"], f"{r['target_density']:.2f}", *cells)
        lines.append(f"| {r['variant']} | {r['target_density']:.2f} | " + " | ".join(cells) + " |")
    console.print(table)
    out.mkdir(parents=True, exist_ok=True)
    coh = {rec: {str(k): v for k, v in layers.items()} for rec, layers in result.coherence.items()}
    lines += ["", "Block coherence per layer (within-block key variance / squared norm of the block mean), "
              "mean over recordings:", "", "| layer | coherence |", "|---|---|"]
    layers = sorted({int(k) for c in coh.values() for k in c})
    for layer in layers:
        vals = [c[str(layer)] for c in coh.values() if str(layer) in c]
        lines.append(f"| {layer} | {sum(vals) / len(vals):.3f} |")
    json_path = _write_json(out / "study.json", {**result.to_dict(), "coherence": coh,
                                                "plan": {k: v for k, v in plan.items() if k != "variants"}})
    (out / "study.md").write_text("\n".join(lines) + "\n")
    png = _plot_study(rows, out / "recall_density.png")
    console.print(f"wrote {json_path}, {out / 'study.md'}" + (f", {png}" if png else ""), highlight=False)
    return 0


def _plot_study(rows: list[dict], path: Path) -> Optional[Path]:
    """Recall vs measured density per variant: prefill, decode answer rows and needle recall panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("recall_prefill", "density_prefill", "prefill rows"), ("recall_decode", "density_decode", "answer rows (decode)"),
              ("needle_recall", "density_decode", "needle blocks, answer rows"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (metric, dens, title) in zip(axes, panels):
        for name in sorted({r["variant"] for r in rows}):
            pts = sorted((r[dens], r[metric]) for r in rows if r["variant"] == name and metric in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xlabel("measured density (sparse layers)")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
