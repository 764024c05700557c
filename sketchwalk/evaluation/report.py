"""Presenting results: rich tables for the terminal and one JSON file per evaluation."""
from __future__ import annotations

import datetime as _dt
import json
import math
import re
from pathlib import Path
from typing import Any, Optional

from ..bench.deploy import speedups
from .result import EvalResult


def _fmt_acc(a: Optional[dict[str, float]]) -> str:
    if not a or math.isnan(a["mean"]):
        return "-"
    return f"{a['mean']:.1f} [{a['lo']:.0f}, {a['hi']:.0f}]"


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def accuracy_delta(result: EvalResult, baseline: EvalResult) -> dict[str, float]:
    """{"task@length" | "overall": result mean - baseline mean} in accuracy points (×100)."""
    return {k: result.accuracy[k]["mean"] - baseline.accuracy[k]["mean"]
            for k in result.accuracy if k in baseline.accuracy}


def result_table(result: EvalResult, *, title: str, baseline: Optional[EvalResult] = None):
    """A rich Table: one row per task@length (and overall) with accuracy [95% bootstrap interval],
    Δ vs the dense `baseline` if given, and per-length median prefill s and decode tokens/s."""
    from rich.table import Table

    table = Table(title=f"{title}  ({result.device}, {result.dtype})", title_justify="left")
    cols = ["task@length", "n", "accuracy [95% CI]"]
    if baseline is not None:
        cols += ["dense", "Δ vs dense"]
    cols += ["prefill s", "decode tok/s"]
    for c in cols:
        table.add_column(c, justify="left" if c == "task@length" else "right")
    delta = accuracy_delta(result, baseline) if baseline is not None else {}
    for key, acc in result.accuracy.items():
        length = key.rsplit("@", 1)[1] if "@" in key else None
        row = [key, str(acc["n"]), _fmt_acc(acc)]
        if baseline is not None:
            row += [_fmt_acc(baseline.accuracy.get(key)), _fmt(delta.get(key), "+.1f")]
        row += [_fmt(result.prefill_s.get(length), ".4f") if length else "",
                _fmt(result.decode_tokens_per_s.get(length), ".1f") if length else ""]
        table.add_row(*row, style="bold" if key == "overall" else "")
    return table


def summary_lines(result: EvalResult, baseline: Optional[EvalResult] = None) -> list[str]:
    """Density, memory, attention-time and deployment-speed lines (each with device and dtype); with
    the dense `baseline`, the deployment speedups beside the times."""
    d = result.density
    tag = f"({result.device}, {result.dtype})"
    lines = [f"density {tag}: prefill {_fmt(d.get('prefill'), '.3f')}, decode {_fmt(d.get('decode'), '.3f')} "
             f"(all layers); sparse layers only {_fmt(d.get('sparse_layers', {}).get('prefill'), '.3f')} / "
             f"{_fmt(d.get('sparse_layers', {}).get('decode'), '.3f')}; dense-layer share "
             f"{_fmt(d.get('dense_layer_share', {}).get('prefill'), '.2f')} / {_fmt(d.get('dense_layer_share', {}).get('decode'), '.2f')}"]
    if result.peak_memory_bytes is not None:
        lines.append(f"peak memory {tag}: {result.peak_memory_bytes / 2**20:.0f} MiB")
    for phase, layers in result.attention_s.items():
        if layers:
            total = sum(layers.values())
            lines.append(f"attention {phase} {tag}: {total * 1e3:.2f} ms per forward over {len(layers)} layers "
                         f"(median per layer {sorted(layers.values())[len(layers) // 2] * 1e3:.3f} ms)")
    speed = result.deployment_speed
    if speed:
        ratios = speedups(speed, baseline.deployment_speed) if baseline is not None and baseline.deployment_speed else {}
        for phase, what in (("prefill", "prefill forward"), ("decode", f"decode step (batch {speed.get('batch', 1)})")):
            cells = []
            for n, ms in (speed.get(f"{phase}_ms") or {}).items():
                x = (ratios.get(phase) or {}).get(n)
                size = f"{int(n) // 1024}K" if int(n) % 1024 == 0 else str(n)
                cells.append(f"{size} {ms:.1f} ms" + (f" ({x:.2f}x dense)" if x is not None else ""))
            if cells:
                where = "the model" if speed["shape"] == "model" else f"the {speed['shape']} shape"
                lines.append(f"{what} at deployment lengths on {where} {tag}: " + ", ".join(cells))
    return lines


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def result_filename(model: str, suite: str, config_tag: str, when: Optional[_dt.datetime] = None) -> str:
    """'<model>_<suite>_<config hash | dense>_<UTC timestamp>.json', file-system safe."""
    when = when or _dt.datetime.now(_dt.timezone.utc)
    return f"{_slug(model)}_{_slug(suite)}_{_slug(config_tag)}_{when.strftime('%Y%m%dT%H%M%S%fZ')}.json"


def write_result(out_dir: str | Path, result: EvalResult, *, model: str, suite: str, config_tag: str,
                 extra: Optional[dict[str, Any]] = None) -> Path:
    """Write one evaluation as JSON into `out_dir` (created); returns the path.

    The file holds every EvalResult field (per-sample predictions included) plus `run` metadata
    (model spec, suite, config tag, UTC time) and `extra` (e.g. the dense baseline and Δ).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)
    path = out / result_filename(Path(model).stem if model.endswith(".gguf") else Path(model).name or model,
                                 suite, config_tag, now)
    data = result.to_dict()
    data["run"] = {"model_spec": model, "suite": suite, "config_tag": config_tag, "utc": now.isoformat()}
    data.update(extra or {})
    path.write_text(json.dumps(data, indent=2, default=str))
    return path
