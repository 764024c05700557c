"""Ablations (ablations/): plan validation, variant expansion, the fixed-variant sweep hook in
search/, the paired bootstrap, the report, and the tiny plan end to end on the bundled model."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from ablations.plan import (BASE, DEFAULT_COMPONENTS, DENSE_NAME, PlanError, Variant, base_config, expand_variants,
                            load_plan, parse_plan, selector_available)
from ablations.report import (VariantResult, curve_points, excludes_zero, paired_bootstrap, paired_difference,
                              plot_density_curves, plot_differences, report_rows, write_table)
from ablations.runner import sweep_spec
from search.spec import SweepSpecError, config_from_params, parse_spec, variant_config
from sketchwalk.config import PRESETS, SketchWalkConfig

REPO = Path(__file__).resolve().parent.parent
PLANS = REPO / "ablations" / "plans"
needs_selector = pytest.mark.skipif(not selector_available(),
                                    reason="SketchWalkConfig has no `selector` field yet (oracle/random/streaming)")


def _plan(**variants) -> dict:
    return {"name": "t", "suite": "ruler-smoke-noise@1k", "variants": variants}


def _names(plan: dict) -> list[str]:
    return [v.name for v in expand_variants(parse_plan(plan))]


# -- plans --------------------------------------------------------------------------------------

@needs_selector
def test_shipped_plans_validate():
    comp = load_plan(PLANS / "components.yaml")
    assert comp.suite == "ruler-11@8k" and comp.samples == 20 and comp.model == "smollm2-135m"
    names = [v.name for v in expand_variants(comp)]
    assert names[0] == BASE and len(names) == len(set(names)) == 18
    assert {"walk=none", "walk=damped", "sketch=exact", "head_aggregation=sum_probs", "sparsity_exponent=1",
            "sink_blocks=0", "skip_layers=0", "skip_layers=4", "phases=prefill", "phases=decode", DENSE_NAME,
            "baseline:oracle", "baseline:streaming", "baseline:random", "baseline:one-hop"} <= set(names)
    tiny = load_plan(PLANS / "tiny.yaml")
    assert [v.name for v in expand_variants(tiny)] == [BASE, "walk=none", DENSE_NAME, "baseline:oracle"]
    assert tiny.samples == 1 and tiny.suite.endswith("@1k")


@pytest.mark.parametrize("patch, field, needle", [
    ({"backend": "dask"}, "backend", "'optuna' or 'ray'"),
    ({"dtype": "fp8"}, "dtype", "'bfloat16'"),
    ({"name": "a b"}, "name", "pattern"),
    ({"frobnicate": 1}, "frobnicate", "unknown key; allowed keys here: ['name'"),
    ({"variants": {"baselines": ["oracel"]}}, "variants.baselines.0", "'oracle'"),
    ({"variants": {"components": ["walks"]}}, "variants.components", "allowed: ['walk'"),
    ({"variants": {"components": {"local": [{"local_blocks": 0}]}}}, "variants.components.local.0.local_blocks", ">= 1"),
    ({"variants": {"one_factor": {"walk": ["zigzag"]}}}, "variants.one_factor.walk", "['product', 'damped', 'none']"),
    ({"variants": {"one_factor": {"nope": [1]}}}, "variants.one_factor", "not a SketchWalkConfig field"),
    ({"variants": {"densities": [0.0]}}, "variants.densities", "(0, 1]"),
    ({"variants": {"extra": 1}}, "variants.extra", "unknown key; allowed keys here: ['components'"),
    ({"variants": {"baselines": ["dense"]}, "base": {"walk": "zigzag"}}, "base.walk", "product"),
    ({"variants": {"baselines": ["dense"]}, "base": {"density": 0.2}, "base_from": "x.yaml"}, "base_from", "exclude"),
    ({"variants": {"baselines": ["dense"]}, "base_from": "no/such/best.yaml"}, "base_from", "no such file"),
    ({"variants": {"one_factor": {"walk": ["product"]}}}, "variants", "nothing to compare"),
    ({"variants": {"selectors": ["oracle"]}}, "variants.selectors", "needs variants.densities"),
])
def test_plan_errors_name_the_field(patch, field, needle):
    data = {"name": "t", "variants": {"baselines": ["dense"]}}
    data.update(patch)
    with pytest.raises(PlanError) as err:
        parse_plan(data)
    assert err.value.field == field and needle in str(err.value), str(err.value)


def test_sweep_side_errors_are_named_as_plan_fields():
    plan = parse_plan({"name": "t", "concurrency": 2, "variants": {"baselines": ["dense"]}})
    with pytest.raises(PlanError, match="backend: ray") as err:
        sweep_spec(plan, expand_variants(plan))
    assert err.value.field == "<root>"


def test_bad_model_fails_before_loading(tmp_path):
    from ablations.runner import prepare_ablation
    from sketchwalk.evaluation.plan import EvalInputError

    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump({**_plan(baselines=["dense"]), "model": str(tmp_path / "missing.gguf")}))
    with pytest.raises(EvalInputError, match="missing.gguf"):
        prepare_ablation(str(f), workdir=tmp_path)


# -- variant expansion --------------------------------------------------------------------------

def test_components_default_subset_and_custom():
    base = SketchWalkConfig()
    names = _names(_plan(components="default"))
    # Switch sets equal to base (walk=product, skip_layers=2, phases=both, ...) are base itself.
    expected = [BASE] + [n for g, sets in DEFAULT_COMPONENTS.items() for s in sets
                         for n in [",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items())]
                         if base.replace(**s) != base]
    assert names == expected and len(names) == len(set(names)) == 13
    assert _names(_plan(components=["walk", "phases"])) == [BASE, "walk=damped", "walk=none", "phases=prefill",
                                                            "phases=decode"]
    variants = expand_variants(parse_plan(_plan(components={"nowalk": [{"walk": "none", "sketch": "exact"}]})))
    assert [(v.name, v.group, v.changes) for v in variants][1] == ("walk=none,sketch=exact", "nowalk",
                                                                   {"walk": "none", "sketch": "exact"})
    aliases = expand_variants(parse_plan(_plan(components=["walk"])))[0].aliases
    assert aliases == ("walk=product",)
    # An own switch set may name itself (a long set's field=value list would exceed the name limit).
    named = expand_variants(parse_plan(_plan(components={"sel": [{"name": "release", **PRESETS["release"]}]})))
    assert named[1].name == "release" and "name" not in named[1].changes
    assert SketchWalkConfig.from_dict(named[1].config) == SketchWalkConfig.preset("release")


def test_the_selector_ablation_plan_holds_the_presets_it_names():
    from pathlib import Path
    plan = Path(__file__).resolve().parents[1] / "ablations" / "plans" / "selector-ablation.yaml"
    variants = {v.name: v for v in expand_variants(load_plan(plan))}
    assert SketchWalkConfig.from_dict(variants["release"].config) == SketchWalkConfig.preset("release")
    assert SketchWalkConfig.from_dict(variants["token"].config) == SketchWalkConfig.preset("recommended")
    assert SketchWalkConfig.from_dict(variants["token_kv"].config).per_kv_head


def test_one_factor_baselines_and_duplicates():
    plan = parse_plan(_plan(one_factor={"sparsity_exponent": [1, 4, 8], "walk": ["none"]},
                            components={"walk": [{"walk": "none"}]}, baselines=["dense", "one_hop"]))
    variants = expand_variants(plan)
    by_name = {v.name: v for v in variants}
    assert [v.name for v in variants] == [BASE, "walk=none", "sparsity_exponent=1", "sparsity_exponent=4",
                                          DENSE_NAME, "baseline:one-hop"]
    assert "sparsity_exponent=8" in by_name[BASE].aliases  # 8 is the paper default: base itself
    assert by_name["walk=none"].group == "walk"  # asked twice, run once
    assert by_name[DENSE_NAME].config is None and by_name[DENSE_NAME].changes is None
    assert by_name["baseline:one-hop"].changes == {"walk": "none", "sketch": "exact"}
    configs = [json.dumps(v.config, sort_keys=True) for v in variants]
    assert len(configs) == len(set(configs))


@needs_selector
def test_baselines_and_density_curves_match_density_by_construction():
    variants = expand_variants(parse_plan(_plan(baselines=["dense", "oracle", "streaming", "random", "one_hop"],
                                                densities=[0.1, 0.2], selectors=["sketchwalk", "oracle", "random"])))
    by_name = {v.name: v for v in variants}
    assert [v.name for v in variants] == [BASE, DENSE_NAME, "baseline:oracle", "baseline:streaming", "baseline:random",
                                          "baseline:one-hop", "selector=sketchwalk@0.1", "selector=oracle@0.1",
                                          "selector=random@0.1"]
    # At base's density the curve points are base and the baselines: run once, listed as aliases.
    assert by_name[BASE].aliases == ("selector=sketchwalk@0.2",)
    assert by_name["baseline:oracle"].aliases == ("selector=oracle@0.2",)
    for name in ("baseline:oracle", "baseline:streaming", "baseline:random"):
        cfg = by_name[name].sketchwalk_config()
        assert cfg.density == 0.2 and cfg.replace(selector="sketchwalk") == base_config(parse_plan(_plan(baselines=["dense"])))
    assert by_name["selector=random@0.1"].config["density"] == 0.1


def test_base_from_an_exported_best_yaml(tmp_path):
    best = tmp_path / "best.yaml"
    best.write_text(yaml.safe_dump({"sketchwalk": SketchWalkConfig(top_k=4, skip_layers=1).to_dict(),
                                    "provenance": {"sweep_id": "s", "trial": 3}}))
    plan_file = tmp_path / "plans" / "p.yaml"
    plan_file.parent.mkdir()
    plan_file.write_text(yaml.safe_dump({"name": "p", "base_from": "../best.yaml",  # beside the plan
                                         "variants": {"one_factor": {"walk": ["none"]}}}))
    plan = load_plan(plan_file)
    assert base_config(plan) == SketchWalkConfig(top_k=4, skip_layers=1)
    variants = expand_variants(plan)
    assert variants[1].sketchwalk_config() == SketchWalkConfig(top_k=4, skip_layers=1, walk="none")


# -- the fixed-variant sweep hook (search/) ------------------------------------------------------

def test_plan_to_sweep_spec_round_trips_every_variant():
    plan = parse_plan(_plan(components=["walk", "sink_blocks"], baselines=["dense", "one_hop"],
                            one_factor={"density": [0.1]}))
    variants = expand_variants(plan)
    spec = sweep_spec(plan, variants)
    assert list(spec.variants) == [v.name for v in variants] and spec.budget.trials == len(variants)
    assert not spec.space and spec.suite == plan.suite and spec.tracking.experiment == plan.tracking.experiment
    for v in variants:
        assert variant_config(spec, v.name) == v.sketchwalk_config()
        assert config_from_params(spec, {"variant": v.name}) == v.sketchwalk_config()


@pytest.mark.parametrize("patch, field, needle", [
    ({"space": {"density": {"type": "float", "low": 0.1, "high": 0.5}}}, "<root>", "exactly one of"),
    ({"variants": {}}, "<root>", "exactly one of"),
    ({"budget": {"trials": 5}}, "<root>", "number of variants (3)"),
    ({"variants": {"a": {}, "b b": None}}, "variants", "must match"),
    ({"variants": {"a": {"nope": 1}}}, "variants", "not a SketchWalkConfig field"),
    ({"variants": {"a": {}, "b": {"walk": "zigzag"}}}, "variants.b.walk", "product"),
    ({"variants": {"a": {}, "b": {"walk": "product"}}}, "variants.b", "same config as variant 'a'"),
])
def test_fixed_variant_spec_errors(patch, field, needle):
    data = {"name": "t", "variants": {"a": {}, "b": {"walk": "none"}, "dense": None}}
    data.update(patch)
    with pytest.raises(SweepSpecError) as err:
        parse_spec(data)
    assert err.value.field == field and needle in str(err.value), str(err.value)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_variants_are_enqueued_once_in_order(tmp_path):
    """open_study enqueues the variants in plan order; reopening (a resume) adds nothing; the
    define-by-run space hands each trial its enqueued variant."""
    import optuna

    from search.optuna_driver import open_study
    from search.records import Objective
    from search.session import SweepSession
    from search.space import suggest_params

    spec = parse_spec({"name": "t", "variants": {"base": {}, "walk=none": {"walk": "none"}, "dense": None}})
    assert spec.budget.trials == 3
    session = SweepSession(spec, "t", tmp_path, "sqlite:///unused.db", "0", [Objective("accuracy", "maximize")])
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = open_study(session, storage_url=storage)
    t = study.ask()
    first = suggest_params(t, spec)
    study.tell(t, 1.0)
    study = open_study(session, storage_url=storage)  # resumed: nothing enqueued twice
    got = [first]
    while any(x.state.name == "WAITING" for x in study.trials):
        t = study.ask()
        got.append(suggest_params(t, spec))
        study.tell(t, 0.0)
    assert got == [{"variant": "base"}, {"variant": "walk=none"}, {"variant": "dense"}]
    assert len(study.trials) == 3 and config_from_params(spec, got[2]) is None
    optuna.delete_study(study_name="t", storage=storage)


def _fake_eval(acc: float):
    from sketchwalk.evaluation import EvalResult, SampleResult

    s = SampleResult("niah_single_1", 1024, 0, 1000, "1", ["1"], acc / 100, 0.1, 0.2, 3, 0.1)
    overall = {"mean": acc, "lo": acc, "hi": acc, "n": 1}
    return EvalResult("m", None, "cpu", "float32", {"niah_single_1@1024": overall, "overall": overall},
                      {"1024": 0.1}, {"1024": 20.0}, {"prefill": 0.5, "decode": 0.5}, None, [s])


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_resume_after_a_kill_runs_each_variant_once(tmp_path, monkeypatch):
    """A trial left RUNNING by a killed worker: the resumed study runs the queued variants, then
    waits for the dead trial to go stale and re-runs its variant. It never samples a variant
    again, even though the dead trial is not stale yet when the queue runs dry."""
    import types

    import optuna

    import search.optuna_driver as drv
    from search.records import Objective
    from search.session import open_session

    spec = parse_spec({"name": "kr", "variants": {"a": {}, "b": {"walk": "none"}, "dense": None}})
    session = open_session(spec, "kr", [Objective("accuracy", "maximize"), Objective("density", "minimize")],
                           workdir=tmp_path)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = drv.open_study(session, storage_url=storage, heartbeat_s=1)
    dead = study.ask()  # takes variant `a`, then its worker "dies": one heartbeat, never another
    assert drv.suggest_params(dead, spec) == {"variant": "a"}
    study._storage.record_heartbeat(dead._trial_id)
    ran = []
    monkeypatch.setattr("search.trial_body.run_trial", lambda work, config: ran.append(config) or _fake_eval(50.0))
    work = types.SimpleNamespace(model=types.SimpleNamespace(config=types.SimpleNamespace(
        num_hidden_layers=30, head_dim=64, hidden_size=576, num_attention_heads=9)), baseline=None, device="cpu",
        load_s=1.0)
    counts = drv.run_study(session, work, storage_url=storage, heartbeat_s=1)
    assert counts["complete"] == 3 and counts["running"] == 0
    study = optuna.load_study(study_name="kr", storage=storage)
    done = [t.params["variant"] for t in study.trials if t.state.name == "COMPLETE"]
    assert sorted(done) == ["a", "b", "dense"] and len(study.trials) == 4  # the dead trial + 3
    assert ran[-1] == SketchWalkConfig() and None in ran and len(ran) == 3


# -- paired bootstrap and the report --------------------------------------------------------------

def test_paired_bootstrap_identical_is_exactly_zero():
    scores = [1, 0, 1, 1, 0, 0.5, 1, 0]
    assert paired_bootstrap(scores, scores) == (0.0, 0.0, 0.0)
    assert not excludes_zero(0.0, 0.0)


def test_paired_bootstrap_detects_a_clear_shift():
    base = [0.0] * 30 + [1.0] * 10
    better = [1.0] * 30 + [1.0] * 10  # 30 of 40 samples fixed, none broken: +75 points
    diff, lo, hi = paired_bootstrap(base, better, seed=1)
    assert diff == pytest.approx(75.0) and 0 < lo <= diff <= hi <= 100 and excludes_zero(lo, hi)
    assert paired_bootstrap(base, better, seed=1) == (diff, lo, hi)  # fixed seed: reproducible
    d2, lo2, hi2 = paired_bootstrap(better, base, seed=1)
    assert d2 == pytest.approx(-75.0) and hi2 < 0
    # Pairing matters: the same two score lists shuffled independently would not be this tight.
    mixed = [1.0, 0.0] * 20
    _, lo3, hi3 = paired_bootstrap(mixed, mixed[1:] + mixed[:1], seed=1)
    assert lo3 < 0 < hi3


def test_paired_difference_aligns_samples_by_key():
    base = {("niah", 1024, 0): 1.0, ("niah", 1024, 1): 0.0, ("vt", 1024, 0): 1.0}
    other = {("vt", 1024, 0): 1.0, ("niah", 1024, 1): 0.0, ("niah", 1024, 0): 1.0, ("extra", 1, 0): 0.0}
    assert paired_difference(base, other) == (0.0, 0.0, 0.0, 3)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_bootstrap([1.0], [1.0, 0.0])
    assert all(math.isnan(x) for x in paired_bootstrap([], []))


def _fake_results() -> tuple[list[Variant], dict[str, VariantResult]]:
    base_cfg = SketchWalkConfig().to_dict()
    keys = [("niah_single_1", 1024, i) for i in range(20)]

    def metrics(acc, density, prefill=0.5):
        return {"accuracy": acc, "accuracy_lo": acc - 10, "accuracy_hi": acc + 10, "prefill_s": prefill,
                "decode_ms_per_token": 20.0, "density": density, "density_decode": density}

    variants = [
        Variant(BASE, "base", base_cfg, {}),
        Variant("walk=none", "walk", {**base_cfg, "walk": "none"}, {"walk": "none"}),
        Variant("sink_blocks=0", "sink_blocks", {**base_cfg, "sink_blocks": 0}, {"sink_blocks": 0}),
        Variant(DENSE_NAME, "baseline", None, None),
        Variant("selector=sketchwalk@0.1", "density", {**base_cfg, "density": 0.1}, {"density": 0.1}),
        Variant("skip_layers=0", "skip_layers", {**base_cfg, "skip_layers": 0}, {"skip_layers": 0}),
    ]
    results = {
        BASE: VariantResult("COMPLETE", metrics(50.0, 0.3), {k: float(i % 2) for i, k in enumerate(keys)}, "r0", 0),
        "walk=none": VariantResult("COMPLETE", metrics(50.0, 0.3), {k: float(i % 2) for i, k in enumerate(keys)}, "r1", 1),
        "sink_blocks=0": VariantResult("COMPLETE", metrics(0.0, 0.28), {k: 0.0 for k in keys}, "r2", 2),
        DENSE_NAME: VariantResult("COMPLETE", metrics(100.0, 1.0), {k: 1.0 for k in keys}, "r3", 3),
        "selector=sketchwalk@0.1": VariantResult("COMPLETE", metrics(40.0, 0.17), {k: float(i % 3 == 0) for i, k in enumerate(keys)}, "r4", 4),
        "skip_layers=0": VariantResult("FAIL", {}, {}, "r5", 5),
    }
    return variants, results


def test_report_table_from_fake_records(tmp_path):
    variants, results = _fake_results()
    rows = report_rows(variants, results, seed=0)
    by = {r["variant"]: r for r in rows}
    assert [r["variant"] for r in rows] == [v.name for v in variants]
    assert (by[BASE]["diff"], by[BASE]["diff_lo"], by[BASE]["diff_hi"], by[BASE]["excludes_zero"]) == (0, 0, 0, "no")
    assert by["walk=none"]["excludes_zero"] == "no" and by["walk=none"]["pairs"] == 20
    assert by["sink_blocks=0"]["diff"] == pytest.approx(-50.0) and by["sink_blocks=0"]["excludes_zero"] == "yes"
    assert by[DENSE_NAME]["diff"] == pytest.approx(50.0) and by[DENSE_NAME]["diff_lo"] > 0
    assert by[DENSE_NAME]["changes"] == "dense attention" and by[DENSE_NAME]["density"] == 1.0
    assert by["skip_layers=0"]["state"] == "FAIL" and math.isnan(by["skip_layers=0"]["accuracy"])
    assert by["skip_layers=0"]["excludes_zero"] == "" and by["skip_layers=0"]["pairs"] == 0
    assert by[BASE]["prefill_s"] == 0.5 and by[BASE]["decode_ms_per_token"] == 20.0
    assert report_rows(variants, results, seed=0) == rows  # deterministic
    missing = report_rows(variants, {k: v for k, v in results.items() if k != BASE})
    assert all(r["pairs"] == 0 for r in missing) and {r["state"] for r in missing[:1]} == {"MISSING"}

    md, csv_path = write_table(rows, tmp_path, title="Ablation fake")
    assert md.read_text().startswith("# Ablation fake") and "| sink_blocks=0 |" in md.read_text()
    with csv_path.open() as f:
        table = list(csv.DictReader(f))
    assert [r["variant"] for r in table] == [v.name for v in variants] and float(table[2]["diff"]) == pytest.approx(-50)

    assert plot_differences(rows, tmp_path / "d.png").stat().st_size > 0
    curves = curve_points(variants, results)
    assert [p[4] for p in curves["sketchwalk"]] == ["selector=sketchwalk@0.1", BASE]  # sorted by measured density
    assert plot_density_curves(variants, results, tmp_path / "c.png").stat().st_size > 0
    assert plot_differences([r for r in rows if r["variant"] == BASE], tmp_path / "none.png") is None


def test_cli_input_errors(capsys):
    from sketchwalk import cli

    assert cli.main(["ablate", "report"]) == 2
    assert "ablate report ID" in capsys.readouterr().out
    assert cli.main(["ablate", "--report-only"]) == 2
    assert cli.main(["ablate", str(PLANS / "missing.yaml")]) == 2
    assert "no such file" in capsys.readouterr().out


# -- end to end (slow) ----------------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_plan_end_to_end(tmp_path):
    """The shipped tiny plan through `sketchwalk ablate` (optuna backend, SQLite MLflow in a tmp
    workdir): every variant runs once under one parent run, the dense variant carries the dense
    baseline's result (reused, not evaluated twice), the oracle runs at base's measured density, and
    the report is written."""
    from mlflow.tracking import MlflowClient

    from search.session import load_session
    from sketchwalk import cli

    plan = yaml.safe_load((PLANS / "tiny.yaml").read_text())
    if not selector_available():  # the oracle needs SketchWalkConfig.selector; run the rest
        plan["variants"]["baselines"] = [b for b in plan["variants"]["baselines"] if b != "oracle"]
    plan["tracking"] = {"experiment": "test-ablate"}
    f = tmp_path / "tiny.yaml"
    f.write_text(yaml.safe_dump(plan))
    names = [v.name for v in expand_variants(load_plan(f))]

    rc = cli.main(["ablate", str(f), "--id", "tiny", "--workdir", str(tmp_path), "--no-progress"])
    assert rc == 0
    out = tmp_path / "runs" / "ablations" / "tiny"
    report = json.loads((out / "report.json").read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows) == names
    for r in rows.values():
        assert r["state"] == "COMPLETE" and r["pairs"] == 2  # niah_single_1 + vt, 1 sample each
        assert 0 <= r["accuracy_lo"] <= r["accuracy"] <= r["accuracy_hi"] <= 100
        assert r["diff_lo"] <= r["diff"] <= r["diff_hi"] and r["prefill_s"] > 0 and r["decode_ms_per_token"] > 0
    assert (rows[BASE]["diff"], rows[BASE]["diff_lo"], rows[BASE]["diff_hi"]) == (0, 0, 0)
    assert 0 < rows[BASE]["density"] < 1 and rows[DENSE_NAME]["density"] == 1.0
    if "baseline:oracle" in rows:
        assert rows["baseline:oracle"]["density"] == pytest.approx(rows[BASE]["density"], abs=1e-9)
    for name in ("report.md", "report.csv", "differences.png", "plan.yaml", "variants.json"):
        assert (out / name).is_file(), name

    session = load_session("tiny", tmp_path)
    children = session.tracker().children()
    baseline = [c for c in children if c.role == "baseline"]
    trials = [c for c in children if c.role == "trial"]
    assert len(baseline) == 1 and len(trials) == len(names)
    assert len({c.key for c in trials}) == len({c.tags["sketchwalk.config_hash"] for c in trials}) == len(names)
    assert sorted(c.tags["sketchwalk.variant"] for c in trials) == sorted(names)
    assert all(c.status == "FINISHED" and c.tags["mlflow.parentRunId"] == session.parent_run_id for c in trials)
    dense = next(c for c in trials if c.tags["sketchwalk.variant"] == DENSE_NAME)
    assert dense.metrics["accuracy"] == baseline[0].metrics["accuracy"] == rows[DENSE_NAME]["accuracy"]
    client = MlflowClient(session.tracking_uri)
    parents = client.search_runs([session.experiment_id], "tags.`sketchwalk.role` = 'sweep'")
    assert [p.info.run_id for p in parents] == [session.parent_run_id]
    assert "ablation/report.md" in [a.path for a in client.list_artifacts(session.parent_run_id, "ablation")]

    # The report alone, rebuilt from MLflow: the same numbers (fixed bootstrap seed).
    assert cli.main(["ablate", "report", "tiny", "--workdir", str(tmp_path)]) == 0
    assert json.loads((out / "report.json").read_text())["rows"] == report["rows"]


def test_committed_components_report_has_only_completed_rows():
    """Issue 18 bug 12: the committed GPU ablation report lists every variant from a completed run."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "results" / "ablation-components-h200"
    rows = json.loads((root / "report.json").read_text())["rows"]
    assert {r["state"] for r in rows} == {"COMPLETE"}
    assert all("KILLED" not in line and "RUNNING" not in line
               for line in (root / "report.md").read_text().splitlines() if line.startswith("| "))
    dense = next(r for r in rows if r["variant"] == "baseline:dense")
    assert round(dense["accuracy"], 1) == 21.4 and dense["pairs"] == 220
