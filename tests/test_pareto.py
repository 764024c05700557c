"""Pareto front, knee point, export rules, YAML export and plots on hand-built trial records."""
from __future__ import annotations

import datetime as dt
import math
import re

import pytest
import yaml

from search.export import ExportRule, NoTrialMatches, choose, export_yaml
from search.pareto import front_table, knee_point, pareto_front, write_front_table
from search.plots import plot_front, plot_parallel_coordinates
from search.records import Objective, TrialRecord
from sketchwalk.config import SketchWalkConfig

ACC = Objective("accuracy", "maximize")
DENSITY = Objective("density", "minimize")
OBJ = [ACC, DENSITY]


def rec(number, acc, measured, *, half=2.0, state="COMPLETE", **cfg):
    """A record with accuracy `acc` +- `half` (95% interval) and measured density."""
    return TrialRecord(number, state, SketchWalkConfig(**cfg), {"accuracy": acc, "accuracy_lo": acc - half, "accuracy_hi": acc + half, "density": measured}, run_id=f"run{number}")


@pytest.fixture
def records():
    # (accuracy, density): front is 0, 1, 2, 3; 4, 5, 8 are dominated; 6 (NaN) and 7 (FAIL)
    # would dominate everything if they were (wrongly) considered.
    return [
        rec(0, 90.0, 0.50, block_size=64, density=0.5),
        rec(1, 88.0, 0.30, block_size=64, density=0.3, walk="damped"),
        rec(2, 85.0, 0.20, block_size=32, density=0.2),
        rec(3, 80.0, 0.10, block_size=32, top_k=4, sparsity_exponent=4.0),
        rec(4, 84.0, 0.35, block_size=128, density=0.35, walk="none"),
        rec(5, 79.0, 0.25, block_size=16, density=0.25),
        rec(6, math.nan, 0.05, block_size=16, density=0.05),
        rec(7, 99.0, 0.01, state="FAIL", block_size=16, top_k=1),
        rec(8, 70.0, 0.15, block_size=16, top_k=2),
    ]


@pytest.fixture
def baseline():
    return TrialRecord(100, "COMPLETE", None, {"accuracy": 91.0, "accuracy_lo": 89.0, "accuracy_hi": 93.0, "density": 1.0}, run_id="dense")


def numbers(rs):
    return [r.number for r in rs]


# -- front ----------------------------------------------------------------------------------
def test_plain_front_expected_set_sorted_best_first(records):
    assert numbers(pareto_front(records, OBJ)) == [0, 1, 2, 3]


def test_nan_and_failed_records_never_on_front(records):
    front = numbers(pareto_front(records, OBJ)) + numbers(pareto_front(records, OBJ, noise_aware=True))
    assert 6 not in front and 7 not in front
    # Even alone, they are not candidates.
    assert pareto_front([records[6], records[7]], OBJ) == []


def test_directions_matter(records):
    flipped = [Objective("accuracy", "minimize"), Objective("density", "maximize")]
    # Worked out by hand: lowest accuracy / highest density trade-offs.
    assert numbers(pareto_front(records, flipped)) == [8, 5, 4, 0]


def test_noise_aware_keeps_statistically_tied_record():
    # Same density, accuracies 85 vs 84 with overlapping intervals: plain mode drops 1, noise-aware keeps it.
    rs = [rec(0, 85.0, 0.2, half=3.0), rec(1, 84.0, 0.2, half=3.0)]
    assert numbers(pareto_front(rs, OBJ)) == [0]
    assert numbers(pareto_front(rs, OBJ, noise_aware=True)) == [0, 1]


def test_noise_aware_significant_gap_still_dominates():
    rs = [rec(0, 90.0, 0.2, half=1.0), rec(1, 84.0, 0.2, half=1.0)]
    assert numbers(pareto_front(rs, OBJ, noise_aware=True)) == [0]


def test_noise_aware_drops_slower_record_with_insignificant_gain():
    # The flip side of the definition: 1 is faster and its interval is not below 0's, so it dominates 0.
    rs = [rec(0, 85.0, 0.3, half=3.0), rec(1, 84.0, 0.2, half=3.0)]
    assert numbers(pareto_front(rs, OBJ)) == [0, 1]
    assert numbers(pareto_front(rs, OBJ, noise_aware=True)) == [1]


# -- knee and table -------------------------------------------------------------------------
def test_knee_point_convex_front():
    front = [rec(0, 90.0, 0.5), rec(1, 88.0, 0.3), rec(2, 85.0, 0.2), rec(3, 60.0, 0.1)]
    assert knee_point(front, OBJ).number == 2
    assert knee_point(front[:1], OBJ).number == 0


def test_knee_point_three_objectives_closest_to_ideal():
    lat = Objective("prefill_latency", "minimize")
    rs = [rec(i, a, d) for i, (a, d) in enumerate([(90.0, 0.5), (86.0, 0.25), (70.0, 0.1)])]
    for r, s in zip(rs, (3.0, 1.5, 1.0)):
        r.metrics["prefill_s"] = s
    assert knee_point(rs, [ACC, DENSITY, lat]).number == 1


def test_front_table_rows_and_files(records, baseline, tmp_path):
    front = pareto_front(records, OBJ)
    rows = front_table(front, OBJ, baseline=baseline)
    assert [r["number"] for r in rows] == [0, 1, 2, 3]
    assert rows[1]["accuracy"] == "88.00 [86.00, 90.00]"
    assert rows[2]["accuracy_drop"] == pytest.approx(6.0)
    assert rows[3]["measured_density"] == pytest.approx(0.10)
    assert {"block_size", "walk", "top_k"} <= set(rows[0]) and "degree" not in rows[0]  # degree never varies
    assert rows[0]["density"] == pytest.approx(0.5) and rows[3]["config.density"] is None and rows[3]["top_k"] == 4
    md, csv_path = write_front_table(rows, tmp_path / "front")
    assert md.read_text().count("\n") == 2 + len(rows) and "| number |" in md.read_text()
    assert csv_path.read_text().splitlines()[0].startswith("number,accuracy,density,accuracy_drop")


# -- export rules ---------------------------------------------------------------------------
def test_fastest_within_drop(records, baseline):
    # Floor 91 - 6 = 85: trials 0, 1, 2 qualify; 2 has the lowest density.
    assert choose(records + [baseline], OBJ, "fastest-within-drop:6.0", baseline=baseline).number == 2
    assert choose(records, OBJ, "fastest-within-drop:1.0", baseline=baseline).number == 0


def test_most_accurate_under(records):
    assert choose(records, OBJ, "most-accurate-under:0.25").number == 2
    assert choose(records, OBJ, "most-accurate-under:0.3").number == 1


def test_most_accurate_under_tie_goes_to_faster():
    rs = [rec(0, 85.0, 0.2), rec(1, 85.0, 0.15), rec(2, 80.0, 0.1)]
    assert choose(rs, OBJ, "most-accurate-under:0.3").number == 1


def test_knee_rule_excludes_baseline(records, baseline):
    assert choose(records + [baseline], OBJ, "knee").number == 1


def test_impossible_constraints_raise_lookup_error(records, baseline):
    with pytest.raises(NoTrialMatches, match=r"density <= 0\.01") as e:
        choose(records, OBJ, "most-accurate-under:0.01")  # trial 7 fits but FAILed
    assert isinstance(e.value, LookupError) and "0.1" in str(e.value)
    with pytest.raises(LookupError, match=r"accuracy >= 90\.50.*best available accuracy is 90\.00"):
        choose(records + [baseline], OBJ, "fastest-within-drop:0.5", baseline=baseline)


@pytest.mark.parametrize("bad", ["fastest:2", "fastest-within-drop:abc", "fastest-within-drop:-1", "knee:3", "most-accurate-under:", ""])
def test_bad_rule_names_rule(bad):
    with pytest.raises(ValueError, match=r"rule") as e:
        ExportRule.parse(bad)
    assert e.value.field == "rule" and "fastest-within-drop:<points>" in str(e.value)


def test_rule_parse_values():
    assert ExportRule.parse("fastest-within-drop:2.0") == ExportRule("fastest-within-drop", 2.0)
    assert ExportRule.parse("knee") == ExportRule("knee")


# -- YAML export ----------------------------------------------------------------------------
def test_export_yaml_round_trip(records, tmp_path):
    r = records[3]  # top_k set, density None, non-default sparsity exponent
    path = export_yaml(r, tmp_path / "out" / "best.yaml", provenance={"sweep_id": "s1", "model": "tiny"},
                       rule="most-accurate-under:0.1", objectives=OBJ)
    expected = r.config
    assert SketchWalkConfig.from_yaml(path) == expected
    assert SketchWalkConfig.from_yaml(str(path)) == expected
    prov = yaml.safe_load(path.read_text())["provenance"]
    assert prov["sweep_id"] == "s1" and prov["model"] == "tiny"
    assert prov["trial"] == 3 and prov["run_id"] == "run3" and prov["rule"] == "most-accurate-under:0.1"
    assert prov["objectives"] == {"accuracy": 80.0, "density": 0.1}
    assert prov["accuracy_interval"] == [78.0, 82.0]
    created = dt.datetime.fromisoformat(prov["created"])
    assert created.utcoffset() == dt.timedelta(0)
    assert abs((dt.datetime.now(dt.timezone.utc) - created).total_seconds()) < 60


def test_export_yaml_refuses_baseline(baseline, tmp_path):
    with pytest.raises(ValueError, match="record"):
        export_yaml(baseline, tmp_path / "x.yaml", provenance={})


# -- plots ----------------------------------------------------------------------------------
def _check_outputs(paths):
    png, html = paths
    assert png.suffix == ".png" and html.suffix == ".html"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    text = html.read_text()
    assert "plotly" in text.lower() and len(text) > 1_000_000  # plotly.js inlined
    # Offline: no script is loaded from the CDN. (The inlined bundle itself mentions
    # cdn.plot.ly/un/ as its default topojson URL for geo maps, which these plots never fetch.)
    assert not re.search(r"<script[^>]*src=[\"'][^\"']*cdn\.plot\.ly", text)
    assert "cdn.plot.ly" not in text.replace("cdn.plot.ly/un/", "")


def test_plot_front_writes_png_and_offline_html(records, baseline, tmp_path):
    front = pareto_front(records, OBJ)
    paths = plot_front(records + [baseline], OBJ, front, baseline=baseline, path_stem=tmp_path / "plots" / "front")
    assert [p.name for p in paths] == ["front.png", "front.html"]
    _check_outputs(paths)
    assert "dense baseline" in paths[1].read_text()


def test_plot_parallel_coordinates(records, tmp_path):
    paths = plot_parallel_coordinates(records, OBJ, ["block_size", "walk", "top_k", "sparsity_exponent"], path_stem=tmp_path / "pc")
    _check_outputs(paths)
    with pytest.raises(ValueError, match="params"):
        plot_parallel_coordinates(records, OBJ, ["no_such_field"], path_stem=tmp_path / "bad")


def test_records_carry_the_config_object_not_a_dict():
    """TrialRecord.config is the SketchWalkConfig itself (a dict is refused); config_fields is
    its dict view, {} for the dense baseline."""
    cfg = SketchWalkConfig(density=0.3, dense_last_blocks=1)
    r = TrialRecord(0, "COMPLETE", cfg, {"accuracy": 1.0})
    assert r.config is cfg and r.config_fields == cfg.to_dict() and r.config_fields["dense_last_blocks"] == 1
    assert TrialRecord(-1, "COMPLETE", None, {}).config_fields == {}
    with pytest.raises(TypeError, match="SketchWalkConfig"):
        TrialRecord(1, "COMPLETE", cfg.to_dict(), {})
