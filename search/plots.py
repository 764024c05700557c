"""Figures of a sweep: the accuracy/speed Pareto front and a parallel-coordinates view.

Each figure is written twice: a static PNG (matplotlib, Agg) for reports and an interactive HTML
(optuna.visualization / plotly) with plotly.js inlined, so it opens offline.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

from search.feasibility import constraint_label, feasible
from search.pareto import build_study, is_valid
from search.records import Objective, TrialRecord

_ACCURACY = Objective("accuracy", "maximize")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window (headless sweeps, CI)
    import matplotlib.pyplot as plt

    return plt


def _stem_paths(path_stem: str | Path) -> tuple[Path, Path]:
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    return stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".html")


def _axis_label(o: Objective) -> str:
    return f"{o.name} [{o.unit}] ({'higher' if o.maximize else 'lower'} is better)"


def _xy(objectives: Sequence[Objective]) -> tuple[Objective, Objective]:
    """The 2-D view's (x, y): the first two objectives, accuracy on y when it is one of them."""
    if len(objectives) < 2:
        raise ValueError("objectives: a front plot needs at least two objectives")
    a, b = objectives[:2]
    return (b, a) if a.name == "accuracy" else (a, b)


def _yerr(records: Sequence[TrialRecord], y: Objective) -> Optional[list[list[float]]]:
    # Intervals exist only for accuracy; clip at 0 in case an interval does not contain its mean.
    if y.name != "accuracy":
        return None
    lo = [max(0.0, r.value(y) - r.accuracy_interval[0]) for r in records]
    hi = [max(0.0, r.accuracy_interval[1] - r.value(y)) for r in records]
    return [lo, hi]


def _varying_fields(records: Sequence[TrialRecord]) -> list[str]:
    configs = [r.config_fields for r in records if r.config is not None]
    fields = list(dict.fromkeys(k for c in configs for k in c))
    return [k for k in fields if len({repr(c.get(k)) for c in configs}) > 1]


def plot_front(
    records: list[TrialRecord],
    objectives: list[Objective],
    front: list[TrialRecord],
    *,
    baseline: Optional[TrialRecord] = None,
    path_stem: str | Path,
    max_accuracy_drop: Optional[float] = None,
    noise: bool = False,
) -> list[Path]:
    """Write `<stem>.png` and `<stem>.html` of the Pareto front; returns [png, html].

    2-D on the first two objectives (accuracy on y when it is one of them). PNG: all COMPLETE
    trials grey with their 95% accuracy intervals, trials infeasible under `max_accuracy_drop`
    (`search.feasibility.feasible`, the analysis' rule) as red crosses, the constraint as a dotted
    line at dense accuracy minus the allowed drop, `front` highlighted and joined by a step line
    (the attainment staircase; orange and titled so when no trial is feasible and the front is the
    infeasible trials'), the dense `baseline` as a red star with its interval plus a dashed line at
    its value (one legend entry for both); `noise` adds "(within noise of dense)" to the title. HTML: `optuna.visualization.plot_pareto_front` of an in-memory study of
    all objectives (Optuna's plain front highlighted), plus the baseline and the given front as
    extra traces; plotly.js is inlined so the file works offline.
    """
    x, y = _xy(objectives)
    png, html = _stem_paths(path_stem)
    is_base = lambda r: baseline is not None and (r is baseline or (r.number == baseline.number and r.config is None))
    points = [r for r in records if not is_base(r) and is_valid(r, [x, y])]
    cloud = [r for r in points if feasible(r, max_accuracy_drop)]
    bad = [r for r in points if not feasible(r, max_accuracy_drop)]
    line = sorted((r for r in front if is_valid(r, [x, y])), key=lambda r: (r.value(x), r.number))
    infeasible_front = bool(line) and not any(feasible(r, max_accuracy_drop) for r in line)
    front_colour = "tab:orange" if infeasible_front else "tab:blue"
    front_label = "front of infeasible trials" if infeasible_front else "Pareto front"
    floor = (baseline.value(y) - max_accuracy_drop
             if max_accuracy_drop is not None and y.name == "accuracy" and baseline is not None
             and math.isfinite(baseline.value(y)) else None)
    # A minimised x: what is attainable at x comes from the points left of it -> step after each point.
    where = "post" if not x.maximize else "pre"
    base_ok = baseline is not None and math.isfinite(baseline.value(y))

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    try:
        if cloud:
            ax.errorbar([r.value(x) for r in cloud], [r.value(y) for r in cloud], yerr=_yerr(cloud, y),
                        fmt="o", color="0.6", ecolor="0.8", ms=4, elinewidth=0.8, zorder=1,
                        label=f"feasible trials ({len(cloud)})" if max_accuracy_drop is not None else f"trials ({len(cloud)})")
        if bad:
            ax.errorbar([r.value(x) for r in bad], [r.value(y) for r in bad], yerr=_yerr(bad, y), fmt="x",
                        color="tab:red", ecolor="mistyrose", ms=6, elinewidth=0.8,
                        label=f"infeasible trials ({len(bad)}): drop > {max_accuracy_drop:g}", zorder=1)
        if floor is not None:
            ax.axhline(floor, color="tab:red", ls=":", lw=1,
                       label=f"constraint: dense - {max_accuracy_drop:g} points", zorder=0)
        if line:
            xs, ys = [r.value(x) for r in line], [r.value(y) for r in line]
            ax.step(xs, ys, where=where, color=front_colour, lw=1.5, zorder=2)
            ax.errorbar(xs, ys, yerr=_yerr(line, y), fmt="o", color=front_colour, ms=6, capsize=3,
                        label=f"{front_label} ({len(line)})", zorder=3)
            for r in line:
                ax.annotate(f"#{r.number}", (r.value(x), r.value(y)), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if base_ok:
            star = math.isfinite(baseline.value(x))
            # One legend entry for the baseline (issue 21: "dense baseline" was listed twice): the
            # star when it is drawn, the dashed line at its level being part of it; else the line.
            ax.axhline(baseline.value(y), color="tab:red", ls="--", lw=1,
                       label="_nolegend_" if star else f"dense baseline {y.name}", zorder=0)
            if star:
                ax.errorbar([baseline.value(x)], [baseline.value(y)], yerr=_yerr([baseline], y), fmt="*", ms=14,
                            color="tab:red", capsize=3, label="dense baseline", zorder=4)
        ax.set_xlabel(_axis_label(x))
        ax.set_ylabel(_axis_label(y))
        ax.set_title(_front_title(x, y, objectives, line, infeasible_front, max_accuracy_drop, noise), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        fig.savefig(png, dpi=120)
    finally:
        plt.close(fig)

    import optuna.visualization as ov

    study = build_study([r for r in records if not is_base(r)], objectives, params=_varying_fields(records))
    ix, iy = objectives.index(x), objectives.index(y)
    fig = ov.plot_pareto_front(study, targets=lambda t: (t.values[ix], t.values[iy]),
                               target_names=[_axis_label(x), _axis_label(y)])
    if line:
        fig.add_scatter(x=[r.value(x) for r in line], y=[r.value(y) for r in line], mode="lines",
                        line_shape="hv" if where == "post" else "vh", name=front_label, hoverinfo="skip",
                        line={"color": "orange" if infeasible_front else None})
    if bad:
        fig.add_scatter(x=[r.value(x) for r in bad], y=[r.value(y) for r in bad], mode="markers",
                        name=f"infeasible (drop > {max_accuracy_drop:g})", text=[f"#{r.number}" for r in bad],
                        marker={"symbol": "x", "size": 10, "color": "red"})
    if floor is not None:
        fig.add_hline(y=floor, line_dash="dot", line_color="red",
                      annotation_text=f"constraint: dense - {max_accuracy_drop:g} points")
    fig.update_layout(title=_front_title(x, y, objectives, line, infeasible_front, max_accuracy_drop, noise)
                      .replace("\n", "<br>"))  # plotly breaks lines with <br>
    if base_ok and math.isfinite(baseline.value(x)):
        lo, hi = baseline.accuracy_interval if y.name == "accuracy" else (baseline.value(y),) * 2
        fig.add_scatter(x=[baseline.value(x)], y=[baseline.value(y)], mode="markers", name="dense baseline",
                        marker={"symbol": "star", "size": 14, "color": "red"},
                        error_y={"type": "data", "symmetric": False, "array": [hi - baseline.value(y)], "arrayminus": [baseline.value(y) - lo]})
    if base_ok:
        fig.add_hline(y=baseline.value(y), line_dash="dash", line_color="red")
    fig.write_html(html, include_plotlyjs=True)
    return [png, html]


def _front_title(x: Objective, y: Objective, objectives: Sequence[Objective], line: Sequence[TrialRecord],
                 infeasible_front: bool, max_accuracy_drop: Optional[float], noise: bool) -> str:
    """The front plot's title: what is plotted, under which constraint, and what the front is worth."""
    title = f"Pareto front: {y.name} vs {x.name}"
    if len(objectives) > 2:
        title += f" (front over {', '.join(o.name for o in objectives)})"
    if max_accuracy_drop is not None:
        title += f"; feasible: {constraint_label(max_accuracy_drop)}"
    if not line:
        title += "\nno front: no finished trial"
    elif infeasible_front:
        title += "\nno trial is feasible: the front shown is of infeasible trials"
    if noise:
        title += "\nfront within noise of dense (every accuracy interval overlaps dense's)"
    return title


def _category_order(v: Any) -> tuple:
    # None last; numbers numerically; everything else by its text.
    num = isinstance(v, (int, float)) and not isinstance(v, bool)
    return (v is None, not num, v if num else 0, str(v))


def _axis(values: list[Any], *, up_is_better: Optional[bool] = None) -> tuple[list[float], list[tuple[float, str]]]:
    """Map values to [0, 1]; returns (positions, ticks as (position, label))."""
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    if not numeric:
        cats = sorted(set(values), key=_category_order)
        pos = {c: (i / (len(cats) - 1) if len(cats) > 1 else 0.5) for i, c in enumerate(cats)}
        return [pos[v] for v in values], [(pos[c], str(c)) for c in cats]
    lo, hi = min(values), max(values)
    span = hi - lo
    norm = [(v - lo) / span if span > 0 else 0.5 for v in values]
    ticks = [(0.0, f"{lo:.4g}"), (1.0, f"{hi:.4g}")] if span > 0 else [(0.5, f"{lo:.4g}")]
    if up_is_better is False:  # minimised objective: flip so that up is always better
        norm = [1 - n for n in norm]
        ticks = [(1 - p, t) for p, t in ticks]
    return norm, ticks


def plot_parallel_coordinates(
    records: list[TrialRecord],
    objectives: list[Objective],
    params: list[str],
    *,
    path_stem: str | Path,
) -> list[Path]:
    """Write `<stem>.png` and `<stem>.html` parallel-coordinate plots; returns [png, html].

    Axes: the config fields `params`, then the objectives. One line per COMPLETE trial with a
    config and finite objectives. PNG: each axis normalised to [0, 1] (objectives flipped so up is
    better; categorical / None-bearing fields at evenly spaced labelled positions), lines coloured
    by accuracy (x100). HTML: `optuna.visualization.plot_parallel_coordinate` of an in-memory study
    with the params' distributions (coloured by Optuna's Pareto rank when multi-objective).
    """
    png, html = _stem_paths(path_stem)
    pool = [r for r in records if r.config is not None and is_valid(r, objectives)]
    if not pool:
        raise ValueError("records: no COMPLETE trial with a config and finite objectives to plot")
    missing = [p for p in params if not any(p in r.config_fields for r in pool)]
    if missing:
        raise ValueError(f"params: {missing} are not config fields of the plotted trials")
    columns = [([r.config_fields.get(p) for r in pool], None, p) for p in params]
    columns += [([r.value(o) for r in pool], o.maximize, f"{o.name}\n({'max' if o.maximize else 'min'})") for o in objectives]
    axes = [(*_axis(vals, up_is_better=better), name) for vals, better, name in columns]
    colour = [r.metrics.get("accuracy", math.nan) for r in pool]

    plt = _pyplot()
    from matplotlib import cm, colors

    fig, ax = plt.subplots(figsize=(max(8.0, 1.4 * len(axes)), 5.5))
    try:
        finite = [c for c in colour if math.isfinite(c)]
        norm = colors.Normalize(min(finite, default=0.0), max(finite, default=1.0))
        cmap = plt.get_cmap("viridis")
        xs = list(range(len(axes)))
        # Draw the most accurate last so the interesting lines sit on top.
        for i in sorted(range(len(pool)), key=lambda i: colour[i] if math.isfinite(colour[i]) else -math.inf):
            c = cmap(norm(colour[i])) if math.isfinite(colour[i]) else "0.7"
            ax.plot(xs, [a[0][i] for a in axes], color=c, alpha=0.7, lw=1.2)
        for j, (_, ticks, _) in enumerate(axes):
            ax.axvline(j, color="0.3", lw=0.8)
            for p, label in ticks:
                ax.text(j + 0.03, p, label, fontsize=7, va="center", bbox={"fc": "white", "ec": "none", "alpha": 0.7, "pad": 0.5})
        ax.set_xticks(xs, [a[2] for a in axes], fontsize=8)
        ax.set_yticks([])
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlim(-0.2, len(axes) - 0.6)
        sm = cm.ScalarMappable(norm=norm, cmap=cmap)
        fig.colorbar(sm, ax=ax, label=f"accuracy [{_ACCURACY.unit}]")
        ax.set_title(f"Parallel coordinates: {len(pool)} trials, {len(params)} params, objectives up = better")
        fig.tight_layout()
        fig.savefig(png, dpi=120)
    finally:
        plt.close(fig)

    import optuna.visualization as ov

    study = build_study(pool, objectives, params=params)
    fig = ov.plot_parallel_coordinate(study, params=list(params))
    fig.write_html(html, include_plotlyjs=True)
    return [png, html]
