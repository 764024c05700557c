"""The ablation report: per variant accuracy (95% interval), prefill and decode latency, measured
density, and the accuracy difference to base with a paired-bootstrap 95% interval; a markdown + CSV
table, a bar chart of the differences per component group, accuracy-vs-density curves per
selector. Written to `runs/ablations/<id>/` and logged to the sweep's MLflow parent run.

Every variant answers the same RULER samples, so the difference to base is estimated on per-sample
pairs: resampling sample indices (the same for both variants) keeps the between-sample variance,
which dominates, out of the difference. Two independent intervals would overlap far more often.
"""
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from search.pareto import write_front_table
from search.session import SweepSession, config_hash, write_json
from sketchwalk.evaluation.stats import bootstrap_ci
from tracking.names import TAG_CONFIG_HASH, TAG_TRIAL_NUMBER, TAG_VARIANT, TAG_VARIANT_GROUP

from .plan import BASE, SELECTORS, Variant

LEVEL = 0.95
RESAMPLES = 2000
SampleKey = tuple  # SampleResult.key: (task, length in tokens, position in the suite)
ARTIFACT_DIR = "ablation"  # where the report goes among the parent run's artifacts


@dataclasses.dataclass
class VariantResult:
    """What a variant's trial produced.

    state: COMPLETE | FAIL | RUNNING | KILLED (MLflow run status, as in search.records) or MISSING
    (no trial yet); metrics: the trial's MLflow metrics (accuracy x100, prefill_s in s,
    decode_ms_per_token in ms, density as a fraction, ...); scores: {(task, length, position): score in
    [0, 1]} from the trial's eval.json; run_id, trial: its MLflow run and trial number.
    """

    state: str
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    scores: dict[SampleKey, float] = dataclasses.field(default_factory=dict)
    run_id: Optional[str] = None
    trial: Optional[int] = None


# -- statistics -------------------------------------------------------------------------------

def paired_bootstrap(base: Sequence[float], other: Sequence[float], *, level: float = LEVEL,
                     resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """Mean of `other - base` and its percentile-bootstrap interval, resampling the pairs.

    base, other: per-sample scores in [0, 1], aligned (same sample at the same index). Returns
    (difference, lo, hi) in points (x100); NaNs for no samples. Resampling the pairs is resampling
    their differences, so this is `bootstrap_ci` (scipy.stats.bootstrap) on them: one bootstrap for
    intervals and paired differences. Deterministic for a given seed.
    """
    if len(base) != len(other):
        raise ValueError(f"paired scores need equal lengths, got {len(base)} and {len(other)}")
    d = np.asarray(other, dtype=float) - np.asarray(base, dtype=float)
    return bootstrap_ci(d, level=level, resamples=resamples, seed=seed)


def paired_difference(base: dict[SampleKey, float], other: dict[SampleKey, float], **kw) -> tuple[float, float, float, int]:
    """`paired_bootstrap` over the samples both score dicts hold; returns (diff, lo, hi, pairs)."""
    keys = sorted(set(base) & set(other))
    return (*paired_bootstrap([base[k] for k in keys], [other[k] for k in keys], **kw), len(keys))


def excludes_zero(lo: float, hi: float) -> bool:
    """Whether the interval [lo, hi] lies strictly on one side of zero."""
    return (lo > 0 or hi < 0) and math.isfinite(lo) and math.isfinite(hi)


# -- table ------------------------------------------------------------------------------------

def _changes(v: Variant) -> str:
    if v.config is None:
        return "dense attention"
    return ", ".join(f"{k}={val}" for k, val in (v.changes or {}).items())


def report_rows(variants: list[Variant], results: dict[str, VariantResult], *, base: str = BASE, seed: int = 0,
                level: float = LEVEL, resamples: int = RESAMPLES) -> list[dict[str, Any]]:
    """One row per variant, in plan order.

    Columns: variant, group, state; accuracy, accuracy_lo, accuracy_hi (x100, the trial's own 95%
    bootstrap); diff, diff_lo, diff_hi (accuracy minus base's, x100, paired bootstrap at `level` with
    `seed`); excludes_zero ('yes' | 'no'; '' without both results); pairs (samples compared);
    prefill_s (s), prefill_forward_s (s; CUDA only), decode_ms_per_token (ms), density and
    density_decode (measured fractions of causal block pairs); changes (fields differing from base);
    also (aliases); trial.
    """
    ref = results.get(base)
    ref_ok = ref is not None and ref.state == "COMPLETE" and ref.scores
    rows = []
    for v in variants:
        r = results.get(v.name) or VariantResult("MISSING")
        m = r.metrics if r.state == "COMPLETE" else {}
        diff = lo = hi = math.nan
        pairs = 0
        if ref_ok and r.state == "COMPLETE" and r.scores:
            diff, lo, hi, pairs = paired_difference(ref.scores, r.scores, level=level, resamples=resamples, seed=seed)
        rows.append({
            "variant": v.name, "group": v.group, "state": r.state,
            "accuracy": m.get("accuracy", math.nan), "accuracy_lo": m.get("accuracy_lo", math.nan),
            "accuracy_hi": m.get("accuracy_hi", math.nan),
            "diff": diff, "diff_lo": lo, "diff_hi": hi,
            "excludes_zero": ("yes" if excludes_zero(lo, hi) else "no") if pairs else "",
            "pairs": pairs,
            "prefill_s": m.get("prefill_s", math.nan), "prefill_forward_s": m.get("prefill_forward_s", math.nan),
            "decode_ms_per_token": m.get("decode_ms_per_token", math.nan),
            "density": m.get("density", math.nan), "density_decode": m.get("density_decode", math.nan),
            "changes": _changes(v), "also": ", ".join(v.aliases), "trial": r.trial,
        })
    return rows


LEGEND = ("accuracy: RULER score x100 with the trial's 95% bootstrap interval; diff: accuracy minus base's "
          "(points) with a paired-bootstrap 95% interval over the same samples; excludes_zero: whether that "
          "interval excludes 0; prefill_s: median time to first token (s, mean over lengths); "
          "prefill_forward_s: median bare prefill forward (s, CUDA events, mean over lengths; GPU only); "
          "decode_ms_per_token: ms per generated token; density / density_decode: measured fraction of causal "
          "block pairs computed (prefill, all layers / decode); also: other names of the same config.")


def write_table(rows: list[dict[str, Any]], out_dir: Path, *, title: str) -> list[Path]:
    """`report.md` (title, legend, table) and `report.csv` (full precision) under `out_dir`."""
    md, csv = write_front_table(rows, out_dir / "report")
    md.write_text(f"# {title}\n\n{LEGEND}\n\n" + md.read_text())
    return [md, csv]


# -- collection from MLflow -------------------------------------------------------------------

def collect_results(session: SweepSession, variants: list[Variant]) -> dict[str, VariantResult]:
    """Each variant's trial from the sweep's MLflow child runs, matched by config hash (dense: the
    hash `dense`), with per-sample scores from its eval.json artifact. A variant with several runs
    (an interrupted trial and its retry) takes its FINISHED one, else its latest."""
    from sketchwalk.evaluation import EvalResult

    tracker = session.tracker()
    by_hash = {config_hash(v.sketchwalk_config()): v.name for v in variants}
    runs: dict[str, Any] = {}
    for run in tracker.children(role="trial"):
        name = by_hash.get(run.tags.get(TAG_CONFIG_HASH))
        if name is None:
            continue
        rank = (run.status == "FINISHED", int(run.tags.get(TAG_TRIAL_NUMBER, -1)))
        if name not in runs or rank > runs[name][0]:
            runs[name] = (rank, run)
    out: dict[str, VariantResult] = {}
    for name, (rank, run) in runs.items():
        state = {"FINISHED": "COMPLETE", "FAILED": "FAIL"}.get(run.status, run.status)
        scores: dict[SampleKey, float] = {}
        if state == "COMPLETE":
            result = EvalResult.from_dict(json.loads(tracker.read_text(run.run_id, "eval.json")))
            scores = {s.key: float(s.score) for s in result.samples}
        out[name] = VariantResult(state, dict(run.metrics), scores, run.run_id, rank[1])
    return out


def label_runs(session: SweepSession, variants: list[Variant]) -> None:
    """Name every MLflow child run of a variant (an interrupted attempt included) after it: tags
    sketchwalk.variant, sketchwalk.variant_group and the displayed run name, so the MLflow UI reads
    like the table."""
    tracker = session.tracker()
    by_hash = {config_hash(v.sketchwalk_config()): v for v in variants}
    for run in tracker.children(role="trial"):
        v = by_hash.get(run.tags.get(TAG_CONFIG_HASH))
        if v is not None and run.tags.get(TAG_VARIANT) != v.name:
            tracker.set_tags(run.run_id, {TAG_VARIANT: v.name, TAG_VARIANT_GROUP: v.group,
                                          "mlflow.runName": v.name})


# -- plots ------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: headless runs and CI
    import matplotlib.pyplot as plt

    return plt


def _finite(*values: float) -> bool:
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in values)


def plot_differences(rows: list[dict[str, Any]], path: Path) -> Optional[Path]:
    """Bar chart of each variant's accuracy difference to base (points) with its paired 95%
    interval as whiskers, bars coloured by component group, '*' where the interval excludes 0.
    Base and the density-curve variants (plotted by `plot_density_curves`) are left out. Returns
    the PNG path, or None when no variant has a difference to show."""
    shown = [r for r in rows if r["group"] not in ("base", "density") and _finite(r["diff"], r["diff_lo"], r["diff_hi"])]
    if not shown:
        return None
    plt = _pyplot()
    groups = list(dict.fromkeys(r["group"] for r in shown))
    colours = {g: plt.get_cmap("tab10")(i % 10) for i, g in enumerate(groups)}
    xs, x = [], 0.0
    for i, r in enumerate(shown):
        if i and r["group"] != shown[i - 1]["group"]:
            x += 0.6  # a gap between groups
        xs.append(x)
        x += 1.0
    diffs = [r["diff"] for r in shown]
    yerr = [[max(0.0, r["diff"] - r["diff_lo"]) for r in shown], [max(0.0, r["diff_hi"] - r["diff"]) for r in shown]]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(shown) + 2), 5.0))
    try:
        ax.bar(xs, diffs, color=[colours[r["group"]] for r in shown], yerr=yerr, capsize=3, ecolor="0.2")
        for xi, r in zip(xs, shown):
            if r["excludes_zero"] == "yes":
                ax.annotate("*", (xi, r["diff_hi"] if r["diff"] >= 0 else r["diff_lo"]), ha="center",
                            va="bottom" if r["diff"] >= 0 else "top", fontsize=12)
        ax.axhline(0.0, color="0.3", lw=0.8)
        ax.set_xticks(xs, [r["variant"] for r in shown], rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("accuracy - base accuracy [points, RULER x100]")
        ax.set_title("Accuracy difference to base\n(paired bootstrap 95% interval; * = the interval excludes 0)",
                     fontsize=10)
        handles = [plt.Rectangle((0, 0), 1, 1, color=colours[g]) for g in groups]
        ax.legend(handles, groups, fontsize=7, loc="best")
        ax.grid(axis="y", alpha=0.3)
        _save(fig, path)
    finally:
        plt.close(fig)
    return path


def _save(fig, path: Path) -> None:
    """Lay out and write a figure as PNG (120 dpi), creating the directory."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


_TAU_FIELDS = ("selector", "density", "top_k")


def curve_points(variants: list[Variant], results: dict[str, VariantResult]) -> dict[str, list[tuple[float, float, float, float, str]]]:
    """Accuracy-vs-density points per selector: every COMPLETE variant that differs from base only
    in selector and τ (density / top_k), base and the selector baselines included. Returns
    {selector: [(measured density, accuracy, lo, hi, variant name)] sorted by density}."""
    ref = next((v for v in variants if v.name == BASE), None)
    if ref is None or ref.config is None:
        return {}
    strip = lambda c: {k: val for k, val in c.items() if k not in _TAU_FIELDS}
    out: dict[str, list] = {}
    for v in variants:
        r = results.get(v.name)
        if v.config is None or r is None or r.state != "COMPLETE" or strip(v.config) != strip(ref.config):
            continue
        m = r.metrics
        point = (m.get("density", math.nan), m.get("accuracy", math.nan), m.get("accuracy_lo", math.nan),
                 m.get("accuracy_hi", math.nan), v.name)
        if _finite(*point[:4]):
            out.setdefault(v.selector, []).append(point)
    return {s: sorted(out[s]) for s in sorted(out, key=lambda s: (SELECTORS.index(s) if s in SELECTORS else 99, s))}


def plot_density_curves(variants: list[Variant], results: dict[str, VariantResult], path: Path) -> Optional[Path]:
    """Accuracy (with its 95% interval) vs measured prefill density, one line per selector (see
    `curve_points`), dense attention as a dashed line. Returns the PNG path, or None when there
    are fewer than two points to draw."""
    curves = curve_points(variants, results)
    if sum(len(p) for p in curves.values()) < 2:
        return None
    dense = next((results.get(v.name) for v in variants if v.config is None), None)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    try:
        for selector, pts in curves.items():
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            yerr = [[max(0.0, p[1] - p[2]) for p in pts], [max(0.0, p[3] - p[1]) for p in pts]]
            ax.errorbar(xs, ys, yerr=yerr, fmt="o-", capsize=3, ms=5, label=selector)
        if dense is not None and dense.state == "COMPLETE" and _finite(dense.metrics.get("accuracy", math.nan)):
            ax.axhline(dense.metrics["accuracy"], color="tab:red", ls="--", lw=1, label="dense")
        ax.set_xlabel("measured density [fraction of causal block pairs, prefill, all layers]")
        ax.set_ylabel("accuracy [RULER x100]")
        ax.set_title("Accuracy vs density per selector (95% intervals)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        _save(fig, path)
    finally:
        plt.close(fig)
    return path


# -- the whole report -------------------------------------------------------------------------

@dataclasses.dataclass
class AblationReport:
    """The report's rows (see `report_rows`), the files written, and the per-variant results."""

    rows: list[dict[str, Any]]
    files: list[Path]
    results: dict[str, VariantResult]


def build_report(session: SweepSession, variants: list[Variant], out_dir: Path, *, seed: int = 0,
                 log: bool = True) -> AblationReport:
    """Collect every variant's results from MLflow, write report.md / report.csv / report.json and
    the plots (differences.png, density_curves.png when there is something to draw) into `out_dir`;
    with `log`, name the child runs after their variants and log the files to the parent run."""
    results = collect_results(session, variants)
    rows = report_rows(variants, results, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = write_table(rows, out_dir, title=f"Ablation {session.sweep_id}")
    for png in (plot_differences(rows, out_dir / "differences.png"),
                plot_density_curves(variants, results, out_dir / "density_curves.png")):
        if png is not None:
            files.append(png)
    files.append(write_json(out_dir / "report.json", {
        "ablation_id": session.sweep_id, "base": BASE, "parent_run_id": session.parent_run_id,
        "bootstrap": {"paired": True, "level": LEVEL, "resamples": RESAMPLES, "seed": seed}, "rows": rows}))
    if log and session.parent_run_id:
        label_runs(session, variants)
        tracker = session.tracker()
        for f in files:
            tracker.log_file(session.parent_run_id, str(f), ARTIFACT_DIR)
        tracker.log_metrics(session.parent_run_id, {
            "variants": len(variants),
            "variants_complete": sum(r["state"] == "COMPLETE" for r in rows),
            "variants_failed": sum(r["state"] == "FAIL" for r in rows)})
    return AblationReport(rows, files, results)
