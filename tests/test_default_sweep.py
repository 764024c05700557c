"""`make sweep` as a newcomer meets it (issue 21), end to end on the CPU: the shipped default sweep
(sweeps/default.yaml, as `make sweep` runs it) with a 2-trial budget on a one-task suite. It must end
with an answer: a non-empty front, a best.yaml that `sketchwalk eval --config` loads and that
reproduces its trial, and output that survives a pipe (no line wrapped, even with COLUMNS=40)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sketchwalk.config import SketchWalkConfig


@pytest.mark.slow
def test_default_sweep_ends_with_an_answer(tmp_path):
    suite = tmp_path / "one-task.yaml"
    suite.write_text(yaml.safe_dump({"name": "one-task", "tasks": ["niah_single_1"], "lengths": [1024],
                                     "samples": 2, "seed": 7}))
    env = dict(os.environ, COLUMNS="40")  # rich wrapped at $COLUMNS off a terminal
    # No sweep file: the shipped default, from a fresh working directory (runs/ is created there).
    proc = subprocess.run([sys.executable, "-m", "sketchwalk", "sweep", "--trials", "2", "--suite", str(suite),
                           "--sweep-id", "newcomer"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1500)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr

    # Nothing wrapped: every printed path is whole, the commands paste as printed.
    wrote = [line.removeprefix("wrote ") for line in out.splitlines() if line.startswith("wrote ")]
    assert wrote and all(Path(p).is_file() for p in wrote), wrote
    (hint,) = [line for line in out.splitlines() if line.startswith("MLflow: ")]
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/runs/mlflow.db, then open http://" in hint
    assert "?workflowType=machine_learning" in hint  # MLflow 3.17 opens on the runs, not the GenAI view
    (best_line,) = [line for line in out.splitlines() if line.startswith("best config (trial ")]
    best = tmp_path / "runs" / "sweeps" / "newcomer" / "best.yaml"
    assert best_line.endswith(f"sketchwalk eval --config {best}"), best_line
    assert "trial 0:" in out and "trial 1:" in out  # the live display's line per trial

    summary = json.loads((best.parent / "summary.json").read_text())
    assert summary["trials"]["complete"] == 2 and summary["front"], summary
    assert summary["stop_reason"].startswith("trials: the budget of 2")
    assert summary["exported"] == str(best) and summary["export_error"] is None
    chosen = next(r for r in summary["front"] if r["number"] == summary["chosen_trial"])
    config = SketchWalkConfig.from_yaml(best)
    assert config.sketch_dim >= 32 and config.density >= 0.3  # the restricted default space

    # The export evaluates unchanged and reproduces its trial (CPU, float32, greedy: deterministic).
    proc = subprocess.run([sys.executable, "-m", "sketchwalk", "eval", "--config", str(best), "--suite", str(suite),
                           "--out", str(tmp_path / "eval"), "--no-baseline"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (result_file,) = (tmp_path / "eval").glob("*.json")
    result = json.loads(result_file.read_text())
    assert SketchWalkConfig.from_dict(result["config"]) == config
    assert result["accuracy"]["overall"]["mean"] == pytest.approx(chosen["metrics"]["accuracy"])
