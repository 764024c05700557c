"""`sketchwalk bench kernels`: flags, the derived columns on hand-made numbers, the refusal without
CUDA, and the CPU dry run (Triton interpreter) end to end in a subprocess."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sketchwalk import cli
from sketchwalk.bench import DEFAULT_OUT, add_kernel_arguments, resolve_settings
from sketchwalk.bench import kernels as bk

ROOT = Path(__file__).resolve().parents[1]


def _settings(*argv):
    import argparse

    p = argparse.ArgumentParser()
    add_kernel_arguments(p)
    return resolve_settings(p.parse_args(list(argv)))


# -- flags ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["bench", "--help"], ["bench", "kernels", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("kernels", "--out", "--shapes", "--seq", "--density", "--quick", "--dry-run"):
        assert flag in text


def test_script_help():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--dry-run" in out.stdout


def test_settings_presets_and_overrides():
    full = _settings()
    assert full.mode == "full" and full.shapes == ["llama8b", "smollm2"] and full.out is None
    assert full.seq == [4096, 8192, 16384, 32768, 65536, 131072]
    assert full.decode_seq == [8192, 16384, 32768, 65536, 131072] and full.decode_batch == [1, 8]
    assert full.density == [1.0, 0.5, 0.2, 0.1]
    assert _settings("--out").out == DEFAULT_OUT
    assert _settings("--out", "x.json").out == "x.json"
    quick = _settings("--quick", "--shapes", "smollm2", "--seq", "8192")
    assert quick.mode == "quick" and quick.shapes == ["smollm2"] and quick.seq == [8192]
    assert _settings("--dry-run").block_size == 32
    with pytest.raises(SystemExit):
        _settings("--quick", "--dry-run")


# -- derived columns ------------------------------------------------------------------------------

def test_ratios_efficiency_frontend():
    assert bk.ratio(6.0, 2.0) == 3.0 and bk.ratio(None, 2.0) is None and bk.ratio(1.0, None) is None
    # Our dense path 10 ms, sparse 2.5 ms at measured density 0.2: 4x faster for 5x less work.
    assert bk.efficiency(10.0, 2.5, 0.2) == pytest.approx(0.8)
    assert bk.efficiency(None, 2.5, 0.2) is None
    assert bk.speedup_with_frontend(12.0, 2.5, 0.5) == pytest.approx(4.0)
    assert bk.speedup_with_frontend(12.0, 2.5, None) is None
    assert bk.frontend_pct(0.5, 2.5) == pytest.approx(20.0)


def test_token_pairs_counts_the_causal_triangle():
    # n = 10, block 4: blocks hold 4, 4, 2 tokens.
    dense = bk.dense_selection(10, 4, "cpu")
    assert bk.selected_token_pairs(dense.indices, dense.counts, 10, 4) == 55 == bk.causal_token_pairs(10)
    # Row 2 (2 queries) keeps blocks 0 and 2: 2*4 + 2*3/2 = 11; rows 0, 1 dense: 10 + (16 + 10).
    idx = torch.tensor([[0, -1, -1], [0, 1, -1], [0, 2, -1]])
    assert bk.selected_token_pairs(idx, torch.tensor([1, 2, 2]), 10, 4) == 47
    # -1 padding and entries past the count are never counted.
    idx = torch.tensor([[0, 7, 7], [0, 1, 7], [0, 2, 7]])
    assert bk.selected_token_pairs(idx, torch.tensor([1, 2, 2]), 10, 4) == 47


@pytest.mark.parametrize("n,bs", [(64, 16), (100, 32), (257, 64)])
def test_dense_selection_pairs_equal_causal_pairs(n, bs):
    sel = bk.dense_selection(n, bs, "cpu")
    assert bk.selected_token_pairs(sel.indices, sel.counts, n, bs) == n * (n + 1) // 2


def test_tflops_and_gbps():
    # 1e9 pairs, d 128, 32 heads in 1 ms: 4*128*32*1e9 flop / 1e-3 s = 16384 TFLOP/s.
    assert bk.attention_tflops(128, 32, 10 ** 9, 1.0) == pytest.approx(16384.0)
    assert bk.attention_tflops(128, 32, 10 ** 9, None) is None
    assert bk.gbps(2 * 10 ** 9, 1.0) == pytest.approx(2000.0)


def test_decode_bytes_count_a_partial_last_block_by_its_tokens():
    assert bk.selected_kv_tokens([0, 2], kv_len=150, block_size=64) == 64 + 22
    assert bk.selected_kv_tokens([0, 1, 2], kv_len=150, block_size=64) == 150
    # batch 2, Hq 4, Hkv 2, d 8, bf16: K+V 2*2*86*8*2 bytes + q/out 2*4*8*2, per sequence.
    assert bk.decode_bytes(86, 2, 4, 2, 8, 2) == 2 * (2 * 2 * 86 * 8 * 2 + 2 * 4 * 8 * 2)


def test_derive_prefill_and_decode_from_raw_times():
    row = dict(t_flash_ms=8.0, t_cudnn_ms=None, t_flex_dense_ms=10.0, t_our_dense_ms=9.0, t_sparse_ms=2.0,
               t_flex_sparse_ms=3.0, t_frontend_ms=0.5, measured_density=0.25, head_dim=128, hq=32,
               selected_pairs=10 ** 9, causal_pairs=4 * 10 ** 9)
    d = bk.derive_prefill(row)
    assert set(d) == set(bk.PREFILL_DERIVED)
    assert d["speedup_vs_flash"] == 4.0 and d["speedup_vs_cudnn"] is None and d["speedup_vs_flex_dense"] == 5.0
    assert d["speedup_vs_our_dense"] == 4.5 and d["speedup_vs_flex_sparse"] == 1.5
    assert d["efficiency"] == pytest.approx(4.5 * 0.25)
    assert d["tflops_sparse"] == pytest.approx(16384.0 / 2)
    assert d["tflops_flash"] == pytest.approx(4 * 16384.0 / 8) and d["tflops_cudnn"] is None
    assert d["speedup_vs_flash_with_frontend"] == pytest.approx(8.0 / 2.5)
    assert d["frontend_pct_of_sparse"] == pytest.approx(25.0)
    dec = bk.derive_decode(dict(t_dense_ms=0.04, t_sparse_ms=0.02, t_dense_graph_ms=0.03, t_sparse_graph_ms=None,
                                bytes_sparse=10 ** 6, bytes_dense=4 * 10 ** 6))
    assert set(dec) == set(bk.DECODE_DERIVED)
    assert dec["speedup"] == pytest.approx(2.0) and dec["speedup_graph"] is None
    assert dec["gbps_sparse"] == pytest.approx(50.0) and dec["gbps_dense"] == pytest.approx(100.0)
    assert dec["gbps_dense_graph"] == pytest.approx(4e6 / 0.03e-3 / 1e9)


def test_bench_budget_scales_with_the_call():
    assert bk.bench_budget(0.01) == (1.0, 10.0)
    warm, rep = bk.bench_budget(1.0)
    assert warm == 3.0 and rep == 30.0
    assert bk.bench_budget(40.0) == (25.0, 150.0)


def test_pool_size_spans_the_l2_cache():
    l2 = 60 * 2 ** 20
    assert bk.pool_size(48 * 2 ** 20, l2) == 5  # 4 x 60 MB over 48 MB sets
    assert bk.pool_size(2 * 2 ** 30, l2) == 1
    assert bk.pool_size(1, l2) == bk.MAX_POOL


def test_flex_block_mask_is_the_selection():
    pytest.importorskip("torch.nn.attention.flex_attention")
    cfg = bk.selection_config(0.3, 16, 32)
    sel = bk.random_selection(200, cfg, "cpu", seed=1)  # 13 blocks, the last one partial
    mask = bk.flex_block_mask(sel, 200)
    assert torch.equal(mask.to_dense()[0, 0].bool(), sel.dense_block_mask(13))
    assert mask.seq_lengths == (200, 200)


# -- running -------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [[], ["--quick"]])
def test_refuses_without_cuda(extra, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench", "kernels", *extra]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "--dry-run" in err


def _finite_positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


# Columns a CPU run cannot fill: cuDNN SDPA and CUDA graphs exist on CUDA only.
CPU_NA = {"t_cudnn_ms", "speedup_vs_cudnn", "tflops_cudnn", "t_dense_graph_ms", "t_sparse_graph_ms",
          "speedup_graph", "gbps_sparse_graph", "gbps_dense_graph",
          # the Hopper path's columns need an sm_90 GPU; the steady-state decode ones CUDA graphs
          "t_our_dense_hopper_ms", "t_hopper_ms", "speedup_vs_cudnn_hopper", "speedup_vs_flash_hopper",
          "hopper_vs_portable", "efficiency_hopper", "tflops_hopper", "tflops_our_dense_hopper",
          "t_dense_steady_ms", "t_sparse_steady_ms", "speedup_steady", "gbps_sparse_steady", "gbps_dense_steady"}


def _interpreter_indexes_runtime_scalars() -> bool:
    """Triton < 3.9's interpreter turns a runtime scalar into an int with int(1-element array),
    which NumPy >= 2.4 refuses: loops bounded by a loaded count (the block-sparse kernels) fail there."""
    import numpy
    import triton

    def major_minor(v):
        return tuple(int(x) for x in v.split(".")[:2])

    return major_minor(triton.__version__) >= (3, 9) or major_minor(numpy.__version__) < (2, 4)


@pytest.mark.skipif(not _interpreter_indexes_runtime_scalars(),
                    reason="this Triton's interpreter cannot use runtime scalars as loop bounds with NumPy >= 2.4 "
                           "(fixed in Triton 3.9); the compiled kernels are unaffected")
def test_dry_run_on_cpu_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "sketchwalk", "bench", "kernels", "--dry-run", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "prefill: sparse" in proc.stdout and "decode" in proc.stdout
    result = json.loads(out.read_text())
    meta = result["meta"]
    for key in ("device", "torch", "triton", "cuda", "timing", "date", "dtype", "settings"):
        assert key in meta
    assert meta["settings"]["mode"] == "dry-run" and not result["skipped"]

    pre, dec = result["prefill"], result["decode"]
    assert {(r["density"], r["selection"]) for r in pre} == {(d, s) for d in (1.0, 0.5) for s in ("sketchwalk", "random")}
    assert len(dec) == 2 * 4  # batch 1 and 2
    for row, times, derived in [(r, bk.PREFILL_TIMES, bk.PREFILL_DERIVED) for r in pre] + \
                               [(r, bk.DECODE_TIMES, bk.DECODE_DERIVED) for r in dec]:
        for col in times + derived:
            assert col in row, col
            if col in CPU_NA:
                assert row[col] is None, col
            else:
                assert _finite_positive(row[col]), (col, row[col])
        assert set(row["na"]) == {c for c in times if row[c] is None}  # every missing time says why
        recomputed = (bk.derive_prefill if times is bk.PREFILL_TIMES else bk.derive_decode)(row)
        for col in derived:
            assert recomputed[col] == pytest.approx(row[col]), col

    for r in pre:
        assert 0 < r["selected_pairs"] <= r["causal_pairs"] == 256 * 257 // 2
        assert (r["selected_pairs"] == r["causal_pairs"]) == r["dense_equivalent"] == (r["density"] == 1.0)
        assert r["err_sparse_vs_reference"] < 1e-4 and r["err_our_dense_vs_flash"] < 1e-4
        assert r["err_flex_sparse_vs_ours"] is None  # eager flex ignores the block mask: not comparable
    sparse = [r for r in pre if r["density"] == 0.5]
    assert all(0.5 <= r["measured_density"] < 1.0 for r in sparse)
    assert all(r["efficiency"] == pytest.approx(r["t_our_dense_ms"] / r["t_sparse_ms"] * r["measured_density"])
               for r in pre)
    for r in dec:
        assert r["dense_backend"] == "flash" and r["bytes_sparse"] <= r["bytes_dense"]
        assert (r["err_vs_dense"] is not None and r["err_vs_dense"] < 1e-4) == (r["density"] == 1.0)


@pytest.mark.gpu
def test_small_gpu_run(tmp_path):
    """One short length on the real kernels (flex left out: its compile takes tens of seconds)."""
    out = tmp_path / "bench.json"
    argv = ["bench", "kernels", "--shapes", "smollm2", "--seq", "4096", "--decode-seq", "4096", "--density", "1.0",
            "0.2", "--decode-batch", "1", "--no-flex", "--out", str(out)]
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["meta"]["cuda"] and not result["meta"]["device"].startswith("cpu")
    for r in result["prefill"]:
        for col in ("t_flash_ms", "t_our_dense_ms", "t_sparse_ms", "t_reference_ms", "t_frontend_ms", "efficiency",
                    "tflops_sparse", "speedup_vs_flash_with_frontend"):
            assert _finite_positive(r[col]), col
        assert r["err_sparse_vs_reference"] < 3e-2 and r["err_our_dense_vs_flash"] < 3e-2
        if torch.cuda.get_device_capability()[0] == 9:  # the Hopper column, on the same selection
            for col in ("t_hopper_ms", "t_our_dense_hopper_ms", "tflops_hopper", "speedup_vs_cudnn_hopper"):
                assert _finite_positive(r[col]), col
            assert r["err_hopper_vs_ours"] < 3e-2
    for r in result["decode"]:
        for col in ("t_dense_ms", "t_sparse_ms", "t_dense_graph_ms", "t_sparse_graph_ms", "gbps_sparse_graph",
                    "t_sparse_steady_ms", "t_dense_steady_ms", "gbps_sparse_steady"):
            assert _finite_positive(r[col]), col
