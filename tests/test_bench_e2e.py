"""`sketchwalk bench e2e`: the tiny shape end to end on the CPU (fields, derived columns, breakdown),
bad inputs refused with exit 2 naming the flag, the memory refusal before any model is built, and
the memory estimate against the published parameter counts."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from sketchwalk import cli
from sketchwalk.config import SketchWalkConfig
from sketchwalk.bench import e2e_plan as plan

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--dry-run", "--seq", "128", "--decode-seq", "128", "--batch", "1", "2", "--block-size", "16",
        "--repeats", "1", "--warmup", "0"]


def _run(*argv, out=None):
    args = ["bench", "e2e", *argv] + (["--out", str(out)] if out else [])
    return cli.main(args)


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "e2e.json"
    assert _run(*FAST, "--density", "0.5,0.25", out=out) == 0
    return json.loads(out.read_text())


def test_tiny_rows_and_fields(tiny_result):
    rows = tiny_result["rows"]
    # prefill b1 + decode b1 + decode b2, each dense + 2 densities
    assert len(rows) == 9 and tiny_result["skipped"] == []
    assert {(r["phase"], r["batch"]) for r in rows} == {("prefill", 1), ("decode", 1), ("decode", 2)}
    assert [r["label"] for r in rows[:3]] == ["dense", "d=0.5", "d=0.25"]
    for r in rows:
        for key in ("shape", "n", "batch", "phase", "label", "density", "ms", "ms_dense", "speedup",
                    "attention_ms", "frontend_ms", "rest_ms", "bound_ms", "speedup_bound"):
            assert key in r, key
        assert r["shape"] == "tiny" and r["n"] == 128 and r["clock"] == "cpu"
        assert r["ms"] > 0 and r["attention_ms"] > 0
        assert math.isclose(r["speedup"], r["ms_dense"] / r["ms"], rel_tol=1e-9)
        assert math.isclose(r["attention_ms"] + r["frontend_ms"] + r["rest_ms"], r["ms"], rel_tol=1e-9)
    assert "CPU" in tiny_result["meta"]["timing"]


def test_dense_rows_and_bound(tiny_result):
    rows = tiny_result["rows"]
    for i in range(0, len(rows), 3):
        dense, sparse = rows[i], rows[i + 1:i + 3]
        assert dense["label"] == "dense" and dense["density"] == 1.0
        assert dense["speedup"] == 1.0 and dense["frontend_ms"] == 0.0 and dense["bound_ms"] == dense["ms"]
        for r in sparse:
            assert r["ms_dense"] == dense["ms"] and (r["n"], r["batch"], r["phase"]) == (dense["n"], dense["batch"], dense["phase"])
            assert math.isclose(r["bound_ms"], dense["ms"] - dense["attention_ms"] + r["attention_ms"], rel_tol=1e-9)
            assert math.isclose(r["speedup_bound"], dense["ms"] / r["bound_ms"], rel_tol=1e-9)
    # the sparse prefill runs a selection front end (block scores, sketch, walk, top-k): it takes time
    assert all(r["frontend_ms"] > 0 for r in rows[1:3])


@pytest.mark.parametrize("argv, flag", [
    (["--density", "1.5"], "--density"),
    (["--density", "0"], "--density"),
    (["--seq", "0"], "--seq"),
    (["--seq", str(2 ** 21)], "--seq"),
    (["--decode-seq", "-4"], "--decode-seq"),
    (["--batch", "0"], "--batch"),
    (["--shapes", "nosuch"], "--shapes"),
    (["--config", "/nonexistent/x.yaml"], "--config"),
    (["--repeats", "0"], "--repeats"),
])
def test_bad_inputs_exit_2_naming_the_flag(argv, flag, capsys, monkeypatch):
    import sketchwalk.bench.e2e as e2e

    monkeypatch.setattr(e2e, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    assert _run("--dry-run", *argv) == 2
    assert flag in capsys.readouterr().err


def test_bad_config_json_and_skip_layers(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"hidden_size": 64}))
    assert _run("--dry-run", "--shapes", str(bad)) == 2
    assert "--shapes" in capsys.readouterr().err and "num_hidden_layers" in str(plan.PlanError("--shapes", "num_hidden_layers"))
    cfg = tmp_path / "deep.yaml"
    cfg.write_text("density: 0.2\nskip_layers: 9\nsketch_dim: 32\n")  # tiny has 4 layers
    assert _run("--dry-run", "--config", str(cfg)) == 2
    assert "skip_layers" in capsys.readouterr().err


def test_config_json_shape(tmp_path):
    path = tmp_path / "mymodel" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(dict(plan.MODEL_SHAPES["smollm2"], architectures=["LlamaForCausalLM"])))
    shape = plan.load_shape(str(path))
    assert shape.name == "mymodel" and shape.head_dim == 64 and shape.kv_heads == 3
    assert plan.weight_count(shape) == plan.weight_count(plan.load_shape("smollm2"))


def test_weight_counts_match_the_published_models():
    # Llama-3.1-8B: 8,030,261,248 parameters; SmolLM2-135M: 134,515,008 (tied embeddings).
    assert plan.weight_count(plan.load_shape("llama8b")) == 8_030_261_248
    assert plan.weight_count(plan.load_shape("smollm2")) == 134_515_008
    # KV cache of the 8B shape: 32 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes = 128 KiB per token
    assert plan.kv_cache_bytes(plan.load_shape("llama8b"), 1, 1, 2) == 128 * 1024


def test_memory_refusal_names_seq_or_batch(monkeypatch, capsys):
    import sketchwalk.bench.e2e as e2e

    monkeypatch.setattr(e2e, "build_model", lambda *a, **k: pytest.fail("a model was built before the refusal"))
    shape = plan.load_shape("tiny")
    steps = 1
    need1 = plan.memory_need(shape, 128, 1, 4, steps)
    need2 = plan.memory_need(shape, 128, 2, 4, steps)
    assert need1 < need2
    monkeypatch.setattr(e2e, "free_memory_bytes", lambda device: need1 - 1)  # not even batch 1
    assert _run(*FAST) == 2
    err = capsys.readouterr().err
    assert "--seq" in err and "GiB" in err
    monkeypatch.setattr(e2e, "free_memory_bytes", lambda device: (need1 + need2) // 2)  # batch 1 fits, 2 does not
    assert _run(*FAST) == 2
    assert "--batch" in capsys.readouterr().err


def test_a_decode_row_prefilled_one_sequence_at_a_time_needs_one_sequences_activations():
    """Batch 8 at 64K on the 8B shape: one [8, 65536] prefill forward needs more than an H200's
    139 GiB, the same batch prefilled one sequence per forward (as decode rows are) fits; the
    saving is seven sequences' activations less the one-sequence chunk cache kept while copying."""
    shape, gib = plan.load_shape("llama8b"), 2 ** 30
    at_once = plan.memory_need(shape, 65536, 8, 2, 5)
    by_rows = plan.memory_need(shape, 65536, 8, 2, 5, prefill_rows=1)
    assert at_once > 139 * gib > by_rows
    assert at_once - by_rows == (7 * plan.activation_bytes(shape, 65536, 1, 2)
                                 - plan.kv_cache_bytes(shape, 65536 + 5, 1, 2))
    assert plan.check_memory(shape, 65536, 8, 2, 139 * gib, 5, prefill_rows=1) is None
    assert plan.check_memory(shape, 65536, 8, 2, 139 * gib, 5).flag == "--batch"


def test_the_decode_state_of_a_token_level_config_counts_towards_memory(monkeypatch, capsys):
    """Token-level scores with sum_probs keep every key per query head in the decode state: a decode
    row that would fit for dense is refused for it, naming the state, before any model is built."""
    import sketchwalk.bench.e2e as e2e
    from sketchwalk.method.batched_decode import decode_state_bytes

    monkeypatch.setattr(e2e, "build_model", lambda *a, **k: pytest.fail("a model was built before the refusal"))
    shape = plan.load_shape("tiny")
    cfg = SketchWalkConfig.from_dict(dict(SketchWalkConfig.preset("recommended").to_dict(), block_size=16,
                                          sketch_dim=16))
    state = decode_state_bytes(cfg, 4, 4, 32, 4096)
    base = plan.memory_need(shape, 4096, 1, 4, 2)
    assert state > 0 and plan.check_memory(shape, 4096, 1, 4, base, 2) is None
    err = plan.check_memory(shape, 4096, 1, 4, base, 2, state)
    assert err is not None and err.flag == "--seq" and "decode state" in err.message
    settings = plan.resolve(cli.build_parser().parse_args(
        ["bench", "e2e", "--dry-run", "--seq", "4096", "--batch", "1", "--config", "recommended", "--graphs"]))
    assert e2e.decode_state_need(shape, settings, 4096) >= 2 * decode_state_bytes(
        SketchWalkConfig.preset("recommended"), 4, 4, 32, 4096) > 0


def test_default_sizes_skip_rows_that_do_not_fit(monkeypatch, tmp_path):
    """Without explicit --seq/--batch the preset's rows that do not fit are skipped and listed, not run."""
    import sketchwalk.bench.e2e as e2e

    shape = plan.load_shape("tiny")
    # dry-run preset: 128/256 prefill, decode 256 x b1/b2; the d=0.5 config's decode state counts too.
    state = e2e.decode_state_need(shape, plan.resolve(cli.build_parser().parse_args(["bench", "e2e", "--dry-run"])), 256)
    assert state > 0
    free = plan.memory_need(shape, 256, 1, 4, 1 + 2, state)
    monkeypatch.setattr(e2e, "free_memory_bytes", lambda device: free)
    calls = []
    monkeypatch.setattr(e2e, "bench_model", lambda model, shape, s, device, keep, result, console: calls.append(keep))
    monkeypatch.setattr(e2e, "build_model", lambda *a, **k: object())
    out = tmp_path / "e.json"
    assert _run("--dry-run", out=out) == 0
    assert calls == [[("prefill", 128, 1), ("prefill", 256, 1), ("decode", 256, 1)]]
    skipped = json.loads(out.read_text())["skipped"]
    assert [(s["phase"], s["n"], s["batch"]) for s in skipped] == [("decode", 256, 2)] and "--batch" in skipped[0]["reason"]


def test_density_list_and_defaults():
    import argparse

    from sketchwalk.bench import add_kernel_arguments, flat

    p = argparse.ArgumentParser()
    add_kernel_arguments(p)
    args = p.parse_args(["--density", "0.2,0.1", "0.5", "--out", "x.json"])
    args.density = flat(args.density)
    s = plan.resolve(args)
    assert s.density == [0.5, 0.2, 0.1] and s.mode == "full" and [x.name for x in s.shapes] == ["llama8b", "smollm2"]
    assert s.decode_batch == [1, 8] and s.seq[-1] == 131072 and not s.explicit_sizes


def test_parser_build_does_not_import_torch():
    code = ("import sys, argparse; import sketchwalk.cli as c; from sketchwalk.bench import e2e_plan; "
            "p = argparse.ArgumentParser(); c._bench_arguments(p); assert 'torch' not in sys.modules, 'torch'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr


def test_help_lists_e2e(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = capsys.readouterr().out
    for flag in ("e2e", "--model", "--config", "--batch", "--repeats"):
        assert flag in text


@pytest.mark.gpu
def test_gpu_smollm2_e2e(tmp_path):
    out = tmp_path / "g.json"
    assert _run("--shapes", "smollm2", "--seq", "4096", "--decode-seq", "4096", "--batch", "1",
                "--density", "0.2", "--config", "recommended", "--graphs", out=out) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 6 and all(r["clock"] == "cuda-events" for r in rows)
    assert all(r["frontend_ms"] > 0 for r in rows if r["label"] != "dense")
    for r in rows:  # dense and both configs captured: each prefill forward and each decode step
        assert r["graph_error"] is None and r["ms_graph"] > 0, r
        assert math.isclose(r["speedup_graph"], r["ms_dense_graph"] / r["ms_graph"], rel_tol=1e-9)


def test_graphs_flag_on_the_cpu_records_why_there_is_no_capture(tmp_path):
    out = tmp_path / "g.json"
    assert _run(*FAST[:5], "--batch", "1", "--block-size", "16", "--repeats", "1", "--warmup", "0",
                "--density", "0.5", "--graphs", out=out) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["phase"] for r in rows} == {"prefill", "decode"}
    assert all(r["ms_graph"] is None and "CUDA" in r["graph_error"] and r["speedup_graph"] is None for r in rows)


def test_capture_keeps_the_causal_skip_of_an_unpadded_prefill(monkeypatch):
    """transformers 5.17 never skips the SDPA mask while capturing; inside the context an unpadded
    full prefill gets None (causal) again, a padded one or a decode row still gets its mask."""
    import torch
    from transformers import masking_utils

    from sketchwalk.bench.e2e import causal_mask_skipped_under_capture
    from sketchwalk.integration import hf

    hf.register()
    monkeypatch.setattr(masking_utils, "_ignore_causal_mask_sdpa", lambda *a, **kw: False)  # as while capturing
    funcs = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS
    before = {name: funcs[name] for name in ("sdpa", hf.ATTN_NAME, "eager")}
    kw = dict(batch_size=1, q_length=8, kv_length=8, q_offset=0, kv_offset=0,
              mask_function=masking_utils.causal_mask_function, allow_is_causal_skip=True, device="cpu")
    assert funcs["sdpa"](**kw, attention_mask=None) is not None  # the capture-time behaviour we undo
    pad = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    with causal_mask_skipped_under_capture():
        for name in ("sdpa", hf.ATTN_NAME):
            assert funcs[name](**kw, attention_mask=None) is None
            padded = funcs[name](**kw, attention_mask=pad)
            assert padded is not None and not bool(padded[0, 0, -1, 0])  # the pad key stays masked
            decode = funcs[name](**{**kw, "q_length": 1, "q_offset": 7}, attention_mask=None)
            assert decode is not None and decode.shape[-2:] == (1, 8)
        assert funcs["eager"] is before["eager"]  # None would mean "no mask" to eager attention
    assert {name: funcs[name] for name in before} == before


def test_kernels_still_refuses_unknown_shapes_and_takes_density_lists(capsys):
    """--shapes lost its argparse choices (e2e takes config.json paths): bench kernels checks it itself."""
    assert cli.main(["bench", "kernels", "--dry-run", "--shapes", "llama70b"]) == 2
    assert "--shapes" in capsys.readouterr().err
    import argparse

    from sketchwalk.bench import add_kernel_arguments, resolve_settings

    p = argparse.ArgumentParser()
    add_kernel_arguments(p)
    assert resolve_settings(p.parse_args(["--density", "0.2,1.0", "0.5"])).density == [1.0, 0.5, 0.2]


@pytest.mark.parametrize("phase,prefill,decode", [("decode", [], [256]), ("prefill", [128, 256], []),
                                                  ("both", [128, 256], [256])])
def test_phase_picks_the_rows(phase, prefill, decode):
    import sketchwalk.bench.e2e as e2e

    settings = plan.resolve(cli.build_parser().parse_args(
        ["bench", "e2e", "--dry-run", "--seq", "128", "256", "--decode-seq", "256", "--phase", phase]))
    assert settings.seq == prefill and settings.decode_seq == decode
    rows = e2e.plan_rows(settings)
    assert [n for p, n, _ in rows if p == "prefill"] == prefill
    assert sorted({n for p, n, _ in rows if p == "decode"}) == decode
