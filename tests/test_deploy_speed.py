"""Speed at deployment lengths (`sketchwalk.bench.deploy`): the plan's validation and refusals, the
timing on the tiny shape (CPU: a code-path check), speedups against dense, the trial metrics and
objectives built on them, the sweep file's `speed:` entry, the export rule on a maximised speedup
and `sketchwalk eval --speed-lengths` refusing bad input before the model loads."""
from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

from sketchwalk import cli, models
from sketchwalk.bench.deploy import DeploymentSpeed, SpeedPlanError, measure_deployment_speed, speedups
from sketchwalk.bench.e2e import build_model
from sketchwalk.bench.e2e_plan import load_shape
from sketchwalk.config import SketchWalkConfig
from sketchwalk.evaluation.baseline import BaselineKey
from sketchwalk.evaluation.result import EvalResult

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = dict(lengths=[256, 128], shape="tiny", batch=2, repeats=1, warmup=0)


def test_plan_validates_every_field(tmp_path):
    plan = DeploymentSpeed(**TINY)
    assert plan.lengths == [128, 256]  # sorted, unique
    for bad, field in (({"lengths": [64]}, "lengths"), ({"lengths": []}, "lengths"),
                       ({"lengths": [2 ** 21]}, "lengths"), ({"lengths": [1024], "shape": "llama9b"}, "shape"),
                       ({"lengths": [1024], "batch": 0}, "batch"), ({"lengths": [1024], "colour": 1}, "colour")):
        with pytest.raises(ValidationError) as info:
            DeploymentSpeed(**bad)
        assert info.value.errors()[0]["loc"][0] == field
    # A config.json shape: its content is part of the fingerprint (the dense baseline's cache key).
    path = tmp_path / "config.json"
    path.write_text(json.dumps(load_shape("tiny").fields))
    fp = DeploymentSpeed(lengths=[1024], shape=str(path)).fingerprint()
    assert fp["shape_fields"]["num_hidden_layers"] == 4 and fp["lengths"] == [1024]


def test_plan_refuses_what_the_device_or_shape_cannot_run():
    model = build_model(load_shape("tiny"), "cpu", __import__("torch").float32, seed=0)
    plan = DeploymentSpeed(**TINY)
    plan.check(model, SketchWalkConfig(block_size=16, sketch_dim=16), free_bytes=2 ** 34)  # fits
    with pytest.raises(SpeedPlanError, match="speed.lengths") as info:
        plan.check(model, None, free_bytes=1000)
    assert "GiB" in str(info.value)
    with pytest.raises(SpeedPlanError, match="speed.shape"):  # the tiny shape has 4 layers
        plan.check(model, SketchWalkConfig(block_size=16, sketch_dim=16, skip_layers=4), free_bytes=2 ** 34)


def test_a_config_s_decode_state_counts_towards_the_plan_s_memory():
    from sketchwalk.bench.e2e_plan import memory_need
    from sketchwalk.method.batched_decode import decode_state_bytes

    shape = load_shape("tiny")
    plan = DeploymentSpeed(lengths=[4096], shape="tiny", repeats=1, warmup=0)
    token_level = SketchWalkConfig.from_dict(dict(SketchWalkConfig.preset("recommended").to_dict(), block_size=16,
                                                  sketch_dim=16))
    free = memory_need(shape, 4096, 1, 4, 1)  # enough for dense
    plan._check(shape, "cuda", 4, free, None)
    assert decode_state_bytes(token_level, 4, 4, 32, 4096) > 0
    with pytest.raises(SpeedPlanError, match="speed.lengths") as info:
        plan._check(shape, "cuda", 4, free, token_level)
    assert "decode state" in str(info.value)


def test_graphs_are_refused_off_cuda_and_for_configs_the_static_decode_lacks(capsys):
    import torch

    model = build_model(load_shape("tiny"), "cpu", torch.float32, seed=0)
    plan = DeploymentSpeed(**TINY, graphs=True)
    assert plan.fingerprint()["graphs"] is True  # the dense baseline's cache key tells the two apart
    with pytest.raises(SpeedPlanError, match="speed.graphs") as info:
        plan.check(model, None, free_bytes=2 ** 34)
    assert "CUDA" in str(info.value)
    window = SketchWalkConfig(block_size=16, sketch_dim=16, decode_query="window")
    with pytest.raises(SpeedPlanError, match="speed.graphs") as info:  # checked as if on a GPU
        plan._check(load_shape("tiny"), "cuda", 4, 2 ** 34, window)
    assert "decode_query" in str(info.value)
    plan._check(load_shape("tiny"), "cuda", 4, 2 ** 34, SketchWalkConfig(block_size=16, sketch_dim=16))
    # Prefill only: the static decode is not used, so any config is timed.
    plan.model_copy(update={"decode": False})._check(load_shape("tiny"), "cuda", 4, 2 ** 34, window)
    capsys.readouterr()
    assert cli.main(["eval", "--model", "nonexistent.gguf", "--speed-graphs"]) == 2
    assert "--speed-graphs need --speed-lengths" in capsys.readouterr().out


def test_timing_on_a_shape_and_speedups():
    import torch

    model = build_model(load_shape("tiny"), "cpu", torch.float32, seed=1)
    plan = DeploymentSpeed(**TINY)
    dense = measure_deployment_speed(model, None, plan)
    sparse = measure_deployment_speed(model, SketchWalkConfig(block_size=16, sketch_dim=16, density=0.5), plan)
    for out in (dense, sparse):
        assert out["shape"] == "tiny" and out["clock"] == "cpu" and out["batch"] == 2
        assert set(out["prefill_ms"]) == set(out["decode_ms"]) == {"128", "256"}
        assert all(v > 0 for v in [*out["prefill_ms"].values(), *out["decode_ms"].values()])
    ratios = speedups(sparse, dense)
    for phase in ("prefill", "decode"):
        for n in ("128", "256"):
            assert math.isclose(ratios[phase][n], dense[f"{phase}_ms"][n] / sparse[f"{phase}_ms"][n])
        assert math.isclose(ratios[f"{phase}_mean"], math.sqrt(ratios[phase]["128"] * ratios[phase]["256"]))
    # Without decode, only prefill; on another shape, no speedup at all.
    assert measure_deployment_speed(model, None, plan.model_copy(update={"decode": False}))["decode_ms"] == {}
    assert speedups({**sparse, "shape": "other"}, dense) == {}


def _result(speed) -> EvalResult:
    return EvalResult(model="m", config=None, device="cpu", dtype="float32",
                      accuracy={"overall": {"mean": 50.0, "lo": 40.0, "hi": 60.0, "n": 2}}, prefill_s={},
                      decode_tokens_per_s={}, density={"prefill": 1.0}, peak_memory_bytes=None, samples=[],
                      deployment_speed=speed)


def test_trial_metrics_carry_times_and_speedups():
    from search.trial import result_metrics

    dense = _result({"shape": "s", "prefill_ms": {"32768": 100.0, "65536": 400.0}, "decode_ms": {"32768": 10.0}})
    mine = _result({"shape": "s", "prefill_ms": {"32768": 50.0, "65536": 100.0}, "decode_ms": {"32768": 8.0}})
    m = result_metrics(mine, baseline=dense)
    assert m["prefill_ms_at.32768"] == 50.0 and m["decode_ms_at.32768"] == 8.0
    assert m["prefill_speedup.32768"] == 2.0 and m["prefill_speedup.65536"] == 4.0
    assert math.isclose(m["prefill_speedup"], math.sqrt(8.0)) and m["decode_speedup"] == 1.25
    alone = result_metrics(mine)  # no baseline: the times, no speedups
    assert "prefill_ms_at.65536" in alone and "prefill_speedup" not in alone
    assert "prefill_ms_at.32768" not in result_metrics(_result({}))


def test_baseline_key_includes_the_speed_plan():
    base = dict(model={"name": "m", "files": []}, suite={"name": "s"}, dtype="float32", device="cpu")
    plain = BaselineKey(**base)
    timed = BaselineKey(**base, speed=DeploymentSpeed(lengths=[32768]))
    assert "speed" not in plain.as_dict() and timed.digest() != plain.digest()
    assert timed.eval_options()["speed"].lengths == [32768]
    assert BaselineKey(**base, speed=DeploymentSpeed(lengths=[65536])).digest() != timed.digest()


def test_sweep_file_speed_entry_and_objectives():
    from search.space import resolve_objectives
    from search.spec import SweepSpecError, parse_spec

    base = {"name": "t", "space": {"density": {"type": "float", "low": 0.1, "high": 0.5}}}
    spec = parse_spec({**base, "speed": {"lengths": [32768, 65536], "shape": "llama8b"}})
    assert spec.speed.lengths == [32768, 65536] and spec.speed.shape == "llama8b"
    assert [o.name for o in resolve_objectives(spec, cuda=True)] == ["accuracy", "prefill_speedup"]
    assert resolve_objectives(spec, cuda=True)[1].maximize
    assert [o.name for o in resolve_objectives(parse_spec(base), cuda=True)] == ["accuracy", "prefill_forward"]
    with pytest.raises(SweepSpecError, match="deployment lengths"):
        parse_spec({**base, "objectives": ["accuracy", "decode_speedup"]})
    with pytest.raises(SweepSpecError, match="speed.decode"):
        parse_spec({**base, "objectives": ["accuracy", "decode_speedup"], "speed": {"lengths": [32768], "decode": False}})
    with pytest.raises(SweepSpecError, match="speed.lengths"):
        parse_spec({**base, "speed": {"lengths": [16]}})


def test_export_bounds_a_maximised_speedup_from_below():
    from search.export import NoTrialMatches, choose
    from search.records import Objective, TrialRecord

    objs = [Objective("accuracy", "maximize"), Objective("prefill_speedup", "maximize")]
    recs = [TrialRecord(i, "COMPLETE", SketchWalkConfig(density=d), {"accuracy": a, "prefill_speedup": x})
            for i, (d, a, x) in enumerate([(0.1, 20.0, 2.5), (0.2, 30.0, 1.6), (0.4, 35.0, 1.2)])]
    assert choose(recs, objs, "most-accurate-under:1.5").number == 1  # speedup >= 1.5, most accurate
    dense = TrialRecord(9, "COMPLETE", None, {"accuracy": 36.0})
    assert choose(recs, objs, "fastest-within-drop:10", baseline=dense).number == 1  # the higher speedup wins
    with pytest.raises(NoTrialMatches, match="highest available prefill_speedup is 2.5"):
        choose(recs, objs, "most-accurate-under:3")


@pytest.fixture
def no_load(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model must not be loaded for bad input")
    monkeypatch.setattr(models, "load", boom)


@pytest.mark.parametrize("argv, needle", [
    (["--speed-lengths", "64"], "--speed-lengths"),
    (["--speed-lengths", "32k,abc"], "--speed-lengths"),
    (["--speed-lengths", "32k", "--speed-shape", "llama9b"], "--speed-shape"),
    (["--speed-shape", "llama8b"], "need --speed-lengths"),
])
def test_eval_refuses_bad_speed_flags_before_loading(capsys, no_load, argv, needle):
    assert cli.main(["eval", "--dense", *argv]) == 2
    out = capsys.readouterr()
    text = " ".join((out.out + out.err).split())
    assert needle in text and "Traceback" not in text


def test_eval_summary_prints_times_and_speedups():
    from sketchwalk.evaluation.report import summary_lines

    dense = _result({"shape": "model", "batch": 1, "prefill_ms": {"512": 10.0, "32768": 100.0}, "decode_ms": {}})
    mine = _result({"shape": "model", "batch": 1, "prefill_ms": {"512": 20.0, "32768": 50.0}, "decode_ms": {}})
    text = "\n".join(summary_lines(mine, dense))
    assert "prefill forward at deployment lengths on the model (cpu, float32): 512 20.0 ms (0.50x dense), " \
           "32K 50.0 ms (2.00x dense)" in text
    assert "decode step" not in text  # not timed
    assert "x dense" not in "\n".join(summary_lines(mine))  # no baseline: times only
    shaped = _result({"shape": "llama8b", "batch": 8, "prefill_ms": {}, "decode_ms": {"65536": 30.0}})
    assert "decode step (batch 8) at deployment lengths on the llama8b shape" in "\n".join(summary_lines(shaped))


def test_plan_is_checked_before_the_model_loads(tmp_path):
    """check_before_load: from the architecture alone (config.json / GGUF header fields), the same
    refusals as after the load; a named shape must also leave room for the evaluated model's weights;
    unknown fields check only a named shape."""
    from sketchwalk import models as models_mod
    from sketchwalk.evaluation.model_facts import config_fields_without_loading

    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**load_shape("smollm2").fields, "architectures": ["LlamaForCausalLM"]}))
    fields = config_fields_without_loading(models_mod.resolve(str(d)))
    assert fields["num_hidden_layers"] == 30 and fields["num_key_value_heads"] == 3
    plan = DeploymentSpeed(lengths=[32768], repeats=1, warmup=0)
    plan.check_before_load(fields, "cuda", 2, 2 ** 35)  # fits in 32 GiB on a GPU
    with pytest.raises(SpeedPlanError, match="speed.lengths"):
        plan.check_before_load(fields, "cpu", 4, 2 ** 35)  # a layer's 9 x 32K x 32K scores: 36 GiB
    eight = DeploymentSpeed(lengths=[4096], shape="llama8b", repeats=1, warmup=0)
    eight.check_before_load(None, "cuda", 2, 2 ** 35)
    with pytest.raises(SpeedPlanError, match="speed.lengths"):  # 16 GiB of 8B weights + a 70B-sized evaluated model
        eight.check_before_load({**fields, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                                 "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128},
                                "cuda", 2, 2 ** 35)
    DeploymentSpeed(lengths=[2 ** 20]).check_before_load(None, "cpu", 4, 1)  # nothing known: left to the loaded check
    with pytest.raises(SpeedPlanError, match="speed.shape"):
        eight.check_before_load(None, "cuda", 2, 2 ** 35, SketchWalkConfig(skip_layers=32))


def test_eval_refuses_a_plan_too_big_before_loading(capsys, no_load):
    assert cli.main(["eval", "--dense", "--suite", "ruler-smoke-noise", "--speed-lengths", "1024k"]) == 2
    out = capsys.readouterr()
    text = " ".join((out.out + out.err).split())
    assert "--speed-lengths" in text and "GiB" in text and "Traceback" not in text
