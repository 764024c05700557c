"""`block_logsumexp` (sub-block block scores reduced in Triton) against its PyTorch statement and
against the transition rows the reference computes from the full logits.

Without CUDA the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, which tests/conftest.py sets
before Triton is first imported); with CUDA the same cases run compiled. The runtime wiring
(backend = triton with score_block_size) is covered in test_backend.py and test_batched_decode.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from sketchwalk.config import SketchWalkConfig
from sketchwalk.kernels import block_logsumexp, block_logsumexp_reference
from sketchwalk.method.scores import softmax_rows, transition_rows

# tests/conftest.py sets TRITON_INTERPRET=1 without CUDA before anything imports triton.
triton = pytest.importorskip("triton", reason="Triton is not installed: the kernels cannot run")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _inputs(g, rows, nf, r, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(g, rows, r, generator=gen)
    k = torch.randn(g, nf, r, generator=gen)
    return q.to(DEVICE), k.to(DEVICE)


# (groups, sub-blocks per block, real sub-blocks, sketch dim): token level (f = block), sub-blocks,
# one sub-block per block (the paper's scores), a partial last block, sketch dims below tl.dot's 16.
CASES = [(1, 16, 16 * 5, 16), (3, 16, 16 * 4 + 5, 8), (2, 4, 4 * 19 + 3, 32), (1, 1, 23, 4), (4, 8, 8 * 33, 64)]


@pytest.mark.parametrize("g,f,nf,r", CASES, ids=[f"g{c[0]}-f{c[1]}-nf{c[2]}-r{c[3]}" for c in CASES])
def test_kernel_equals_reference(g, f, nf, r):
    rows = -(-nf // f)
    q, k = _inputs(g, rows, nf, r, seed=nf + f)
    scale = 8.0 / math.sqrt(64)
    want = block_logsumexp_reference(q, k, f, scale)
    got = block_logsumexp(q, k, f, scale)
    assert got.shape == (g, rows, rows)
    causal = torch.arange(rows, device=DEVICE)[None, :] <= torch.arange(rows, device=DEVICE)[:, None]
    assert torch.isinf(got[:, ~causal]).all() and (got[:, ~causal] < 0).all()
    assert torch.allclose(got[:, causal], want[:, causal], atol=1e-4, rtol=1e-5)
    # Not causal: every column holds its log-sum-exp.
    full = block_logsumexp(q, k, f, scale, causal=False)
    assert torch.isfinite(full).all()
    assert torch.allclose(full, block_logsumexp_reference(q, k, f, scale, causal=False), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("rows_per_program", [16, 32, 64])
@pytest.mark.parametrize("precision,tol", [("ieee", 1e-4), ("tf32x3", 1e-4), ("tf32", 0.1)])
def test_speed_knobs_keep_the_values(rows_per_program, precision, tol):
    """Every tile size and dot precision gives the reference's log-sum-exps: ieee and tf32x3 to fp32
    rounding, one-pass tf32 to its ~1e-3 relative error (on CUDA; the interpreter computes in fp32)."""
    g, f, nf, r = 3, 8, 8 * 70 - 3, 64
    rows = -(-nf // f)
    q, k = _inputs(g, rows, nf, r, seed=11)
    scale = 8.0 / math.sqrt(64)
    want = block_logsumexp_reference(q, k, f, scale)
    got = block_logsumexp(q, k, f, scale, rows_per_program=rows_per_program, precision=precision)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    assert torch.allclose(got[finite], want[finite], atol=tol, rtol=1e-5)


def test_bad_knobs_are_refused():
    q, k = _inputs(1, 4, 64, 8, seed=0)
    with pytest.raises(ValueError, match="rows_per_program"):
        block_logsumexp(q, k, 16, 1.0, rows_per_program=8)
    with pytest.raises(ValueError, match="precision"):
        block_logsumexp(q, k, 16, 1.0, precision="fp16")


@pytest.mark.parametrize("f", [16, 4, 2])
def test_softmax_of_block_lse_is_the_references_transition(f):
    """W from the kernel's log-sum-exps equals `transition_rows` on the full sub-block logits (the
    reference path): the softmax over causal sub-blocks summed per block."""
    B, g, nb, r = 16, 3, 7, 16
    cfg = SketchWalkConfig(block_size=B, sketch_dim=r, score_block_size=B // f, head_aggregation="sum_probs")
    nf = nb * f - 1  # the last block is one sub-block short
    q, k = _inputs(g, nb, nf, r, seed=f)
    want = transition_rows(q, k, torch.arange(nb, device=DEVICE), 64, cfg)
    got = softmax_rows(block_logsumexp(q, k, f, cfg.sparsity_exponent / math.sqrt(64)))
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got.sum(-1), torch.ones(nb, device=DEVICE), atol=1e-5)


def test_bad_shapes_are_refused():
    q, k = _inputs(2, 4, 64, 8, seed=0)
    with pytest.raises(ValueError, match="groups and sketch dims"):
        block_logsumexp(q, k[:1], 16, 1.0)
    with pytest.raises(ValueError, match="sub-blocks per block"):
        block_logsumexp(q, k, 0, 1.0)


def test_runtime_prefill_uses_the_kernel_and_selects_as_the_reference(monkeypatch):
    """backend = triton with sub-block scores: the prefill's W comes from block_logsumexp (counted), and
    the selections equal the torch backend's (which materialises the logits) on a left-padded batch."""
    import sketchwalk.kernels as kernels
    from sketchwalk.method import SketchWalkRuntime

    calls = []
    real = kernels.block_logsumexp
    monkeypatch.setattr(kernels, "block_logsumexp", lambda *a, **kw: calls.append(a[2]) or real(*a, **kw))
    cfg = SketchWalkConfig(block_size=16, sketch_dim=16, skip_layers=0, density=0.3, score_block_size=1,
                           head_aggregation="sum_probs", walk="none", phases="prefill")
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, h, 150, 16, generator=gen).to(DEVICE) for h in (4, 2, 2))
    valid = torch.ones(2, 150, dtype=torch.bool, device=DEVICE)
    valid[1, :37] = False
    sels = {}
    for backend in ("torch", "triton"):
        rt = SketchWalkRuntime(cfg, backend=backend)
        rt.keep_selections = True
        rt.attention(0, q, k, v, valid, 0.25)
        sels[backend] = [(s.indices.tolist(), s.counts.tolist()) for s in rt.last_selection[0]]
    assert calls == [16, 16]  # one call per sequence, f = 16 token-level sub-blocks per block
    assert sels["triton"] == sels["torch"]
