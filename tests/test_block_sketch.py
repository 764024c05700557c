"""The fused selection front end (`block_sketch`) against the PyTorch reference, and the runtime wired to it.

Without CUDA the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set here before Triton is
first imported) on tiny shapes in fp32 and fp16; the `gpu` tests run the real compiler at Llama-8B
shapes (32 query heads, 8 KV heads, head_dim 128, 8K tokens, bf16) and are skipped without CUDA. With
CUDA, one test reruns the interpreter cases in a CPU-only child process (the `bench kernels --dry-run` path).
Outputs are NaN-poisoned before each launch, so an unwritten element shows up as NaN.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

_PREIMPORTED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first `import triton` (see test_kernels.py)

import pytest  # noqa: E402

triton = pytest.importorskip("triton", reason="Triton is not installed: the kernels cannot run")
if _PREIMPORTED and not torch.cuda.is_available():
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set, so its interpreter cannot run here; "
                "set TRITON_INTERPRET=1 in the environment", allow_module_level=True)

import sketchwalk.kernels as kernels  # noqa: E402
from sketchwalk.config import SketchWalkConfig  # noqa: E402
from sketchwalk.kernels import block_sketch  # noqa: E402
from sketchwalk.method.sketch import sketch_matrix  # noqa: E402
from sketchwalk.method import LayerDecodeState, SketchWalkRuntime, block_means, group_features, srht  # noqa: E402
from sketchwalk.method.scores import sketch_features  # noqa: E402
from sketchwalk.method.decode_state import seed_block_sums  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- helpers ---------------------------------------------------------------------------

def _fused(q, k, cfg, layer, **kw):
    """`block_sketch` with the arguments the runtime derives from `cfg` for this layer."""
    matrix = None if cfg.sketch == "exact" else sketch_matrix(q.shape[-1], cfg.sketch_dim, cfg.seed, layer, q.device)
    return block_sketch(q, k, block_size=cfg.block_size, matrix=matrix, **kw)

def _tensor(h: int, m: int, d: int, layout: str, gen: torch.Generator, dtype) -> torch.Tensor:
    """[h, m, d] in one of three memory layouts: contiguous, a slice of a [2, h, N, d] KV cache
    (batch 1, after 7 pad tokens, before 5 more), or token-major storage [m, h, d] transposed."""
    if layout == "contig":
        x = torch.randn(h, m, d, generator=gen)
    elif layout == "cache_slice":
        x = torch.randn(2, h, m + 12, d, generator=gen)[1, :, 7:7 + m]
    else:
        x = torch.randn(m, h, d, generator=gen).transpose(0, 1)
    return x.to(device=DEVICE, dtype=dtype)


def reference(q: torch.Tensor, k: torch.Tensor, cfg: SketchWalkConfig, layer: int):
    """(q_sums, k_sums [nb, d], q_sk, k_sk [1, nb, r]) the way the torch runtime computes them."""
    qf, kf = group_features(q, k, cfg)
    qm, km = block_means(qf, cfg.block_size), block_means(kf, cfg.block_size)
    m, nb = q.shape[1], qm.shape[1]
    counts = torch.tensor([min(cfg.block_size, m - j * cfg.block_size) for j in range(nb)],
                          dtype=torch.float32, device=q.device)[:, None]
    return qm[0] * counts, km[0] * counts, sketch_features(qm, cfg, layer), sketch_features(km, cfg, layer)


def poisoned(nb: int, d: int, r: int):
    return (torch.full((2, nb, d), float("nan"), device=DEVICE), torch.full((2, nb, r), float("nan"), device=DEVICE))


def assert_close(got: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    """fp32 rounding: elementwise relative, with an absolute floor scaled to the tensor (for cancellations)."""
    assert got.shape == ref.shape and not got.isnan().any()
    torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * float(ref.abs().max()))


# -- the kernel against the reference ----------------------------------------------------
KERNEL_CASES = [
    # hq, hkv, d, block_size, m, sketch, sketch_dim, dtype, layout
    (9, 3, 64, 16, 70, "hadamard", 32, torch.float32, "cache_slice"),
    (9, 3, 64, 32, 64, "hadamard", 64, torch.float16, "contig"),
    (9, 3, 64, 64, 40, "exact", 64, torch.float32, "token_major"),
    (4, 2, 128, 64, 150, "hadamard", 64, torch.float32, "cache_slice"),
    (4, 2, 128, 32, 97, "hadamard", 128, torch.float16, "token_major"),
    (4, 2, 128, 16, 33, "exact", 128, torch.float16, "cache_slice"),
    (4, 2, 128, 128, 200, "hadamard", 16, torch.float32, "contig"),     # 2 token chunks per block
    (4, 2, 96, 16, 50, "hadamard", 64, torch.float32, "cache_slice"),   # head_dim padded to 128
    (2, 1, 256, 64, 80, "hadamard", 256, torch.float32, "contig"),      # sketch columns in chunks
    (4, 2, 64, 16, 1, "hadamard", 32, torch.float32, "contig"),         # one token
]


@pytest.mark.parametrize("hq,hkv,d,bs,m,sketch,r,dtype,layout", KERNEL_CASES)
def test_block_sketch_matches_reference(hq, hkv, d, bs, m, sketch, r, dtype, layout):
    cfg = SketchWalkConfig(block_size=bs, sketch_dim=r, sketch=sketch, seed=3)
    gen = torch.Generator().manual_seed(hq * 1000 + d + m)
    q, k = _tensor(hq, m, d, layout, gen, dtype), _tensor(hkv, m, d, layout, gen, dtype)
    layer, nb, r_out = 5, -(-m // bs), d if sketch == "exact" else r
    got = _fused(q, k, cfg, layer, out=poisoned(nb, d, r_out))
    for g, ref in zip(got, reference(q, k, cfg, layer)):
        assert_close(g, ref)


# The shapes of `sketchwalk bench kernels --dry-run` (seq 256, block 32, fp32, sketch_dim min(64, d)) at the
# benchmark's head layouts: tiny (4/2, d 32), SmolLM2 (9/3, d 64), Llama (32/8, d 128).
DRY_RUN_CASES = [(4, 2, 32), (9, 3, 64), (32, 8, 128)]


@pytest.mark.parametrize("hq,hkv,d", DRY_RUN_CASES)
def test_block_sketch_dry_run_shapes(hq, hkv, d):
    cfg = SketchWalkConfig(block_size=32, sketch_dim=min(64, d), seed=0)
    gen = torch.Generator().manual_seed(hq + d)
    q, k = _tensor(hq, 256, d, "contig", gen, torch.float32), _tensor(hkv, 256, d, "contig", gen, torch.float32)
    got = _fused(q, k, cfg, 0, out=poisoned(8, d, min(64, d)))
    for g, ref in zip(got, reference(q, k, cfg, 0)):
        assert_close(g, ref)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="without CUDA the interpreter cases above already run in this process")
def test_block_sketch_interpreter_on_a_cuda_machine():
    """With CUDA visible the cases above run compiled; the interpreter path (`bench kernels --dry-run`, which
    broke under Triton 3.6 with NumPy 2.4 while the compiled path worked) is checked here in a CPU-only child."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"{__file__}::test_block_sketch_dry_run_shapes",
                           f"{__file__}::test_block_sketch_matches_reference"],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-1000:]


def test_sketch_matrix_is_the_layers_srht():
    """x @ M equals the reference SRHT for every layer; the matrix is built once per (layer, device)."""
    x = torch.randn(20, 80, dtype=torch.float64)
    for layer in (0, 1, 7):
        m = sketch_matrix(80, 32, 11, layer, torch.device("cpu"))
        assert m.shape == (80, 32) and m.dtype == torch.float32
        torch.testing.assert_close(x @ m.double(), srht(x, 32, 11, layer), rtol=1e-6, atol=1e-6)
        assert sketch_matrix(80, 32, 11, layer, torch.device("cpu")) is m


def test_block_sketch_rejects_what_it_does_not_compute():
    q, k = torch.randn(4, 20, 64, device=DEVICE), torch.randn(2, 20, 64, device=DEVICE)
    with pytest.raises(TypeError):
        _fused(q, k.half(), SketchWalkConfig(), 0)
    with pytest.raises(ValueError):
        _fused(q, k[:, :10], SketchWalkConfig(), 0)
    with pytest.raises(ValueError, match="matrix must be fp32"):  # a matrix for another head_dim
        block_sketch(q, k, block_size=64, matrix=sketch_matrix(32, 16, 0, 0, q.device))
    # sum_probs is not the fused kernel's: the runtime keeps such configs on the reference path.
    from sketchwalk.method.runtime import _fused_front_end_applies

    assert not _fused_front_end_applies(q, SketchWalkConfig(head_aggregation="sum_probs"))


# -- decode-state seeding from block sums -------------------------------------------------
@pytest.mark.parametrize("decode_query", ["token", "block_mean", "window"])
def test_from_block_sums_equals_seeding_from_features(decode_query):
    """Given the block sums the feature path builds, both seedings hold the same state and decode alike;
    those sums are the token-order fold's up to fp32 rounding."""
    cfg = SketchWalkConfig(block_size=16, sketch_dim=8, decode_query=decode_query, decode_window=5)
    gen = torch.Generator().manual_seed(1)
    m, d, T = 37, 16, 30
    qf, kf = torch.randn(1, m + T, d, generator=gen), torch.randn(1, m + T, d, generator=gen)
    nb = -(-m // 16)
    w = torch.softmax(torch.randn(nb, nb, generator=gen), -1).tril()
    a = LayerDecodeState(cfg, 2, d, qf[:, :m], kf[:, :m], w)
    sums = [seed_block_sums(x[:, :m], 16, nb)[:, 0] for x in (qf, kf)]  # the feature path's own block sums
    b = LayerDecodeState.from_block_sums(cfg, 2, d, sums[0], sums[1], m, qf[:, max(0, m - 5):m], w)
    assert torch.equal(a.qsum, b.qsum) and torch.equal(a.ksum, b.ksum)
    fold = torch.zeros(nb, d).index_add_(0, torch.arange(m) // 16, qf[0, :m])
    assert torch.allclose(sums[0], fold, rtol=1e-6, atol=1e-6)
    for t in range(m, m + T):
        for s in (a, b):
            s.append(qf[:, t], kf[:, t])
        assert torch.equal(a.transition_with_current_row(qf[:, t]), b.transition_with_current_row(qf[:, t])), t


# -- the runtime: triton backend (fused front end) vs torch backend -------------------------
def _sel_key(sel):
    return None if sel is None else (sel.indices.long().tolist(), sel.counts.long().tolist())


RUNTIME_CASES = [
    (dict(decode_query="token", walk="product", top_k=3), [50], torch.float32),
    (dict(decode_query="block_mean", walk="damped", density=0.3), [50, 29], torch.float32),
    (dict(decode_query="window", walk="product", top_k=2, decode_window=6, sketch="exact"), [45], torch.float16),
]


@pytest.mark.parametrize("overrides,lens,dtype", RUNTIME_CASES, ids=[c[0]["decode_query"] for c in RUNTIME_CASES])
def test_runtime_triton_selections_equal_torch(overrides, lens, dtype, monkeypatch):
    """Prefill and decode steps across a block boundary (left-padded batch): every layer's selection of
    the triton backend (fused front end, Triton attention) equals the torch backend's."""
    calls = []
    fused = kernels.block_sketch
    monkeypatch.setattr(kernels, "block_sketch", lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    cfg = SketchWalkConfig(**{"block_size": 16, "sketch_dim": 16, "skip_layers": 1, **overrides})
    layers, hq, hkv, d, T = 4, 4, 2, 32, 16
    n0, bsz = max(lens), len(lens)
    gen = torch.Generator().manual_seed(sum(lens))
    inputs = [tuple(torch.randn(bsz, h, n0 + T, d, generator=gen).to(DEVICE, dtype) for h in (hq, hkv, hkv))
              for _ in range(layers)]
    valid = torch.stack([torch.arange(n0 + T) >= n0 - L for L in lens]).to(DEVICE) if bsz > 1 else None
    runtimes = {be: SketchWalkRuntime(cfg, layers, d, backend=be) for be in ("torch", "triton")}
    for rt in runtimes.values():
        rt.keep_selections = True

    def step(q_slice, kv_end):
        sels = {}
        for be, rt in runtimes.items():
            for layer, (q, k, v) in enumerate(inputs):
                rt.attention(layer, q[:, :, q_slice], k[:, :, :kv_end], v[:, :, :kv_end],
                             None if valid is None else valid[:, :kv_end], d ** -0.5)
            sels[be] = {l: [_sel_key(s) for s in rt.last_selection[l]] for l in range(layers)}
        assert sels["triton"] == sels["torch"], kv_end

    step(slice(0, n0), n0)
    assert len(calls) == (layers - cfg.skip_layers) * bsz  # the fused front end ran for every sparse layer
    for t in range(n0, n0 + T):
        step(slice(t, t + 1), t + 1)
    density = runtimes["torch"].density().overall
    assert runtimes["triton"].density().overall == density and density["prefill"] < 1 and density["decode"] < 1


# -- GPU: real compiler, Llama-8B shapes ------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("bs,sketch", [(64, "hadamard"), (128, "hadamard"), (64, "exact")])
def test_block_sketch_gpu_llama_shape(bs, sketch):
    """32 query / 8 KV heads, head_dim 128, 8K real tokens (+ a ragged block) sliced out of a bf16 KV cache."""
    cfg = SketchWalkConfig(block_size=bs, sketch_dim=64, sketch=sketch)
    gen = torch.Generator().manual_seed(bs)
    m, d = 8192 + 37, 128
    q = torch.randn(1, 32, m + 100, d, generator=gen).to("cuda", torch.bfloat16)[0, :, 100:]
    k = torch.randn(1, 8, m + 100, d, generator=gen).to("cuda", torch.bfloat16)[0, :, 100:]
    nb, r = -(-m // bs), d if sketch == "exact" else 64
    got = _fused(q, k, cfg, 4, out=poisoned(nb, d, r))
    for g, ref in zip(got, reference(q, k, cfg, 4)):
        assert_close(g, ref, rtol=1e-4)  # fp32 sums of 4K-8K terms in two different orders


@pytest.mark.gpu
def test_runtime_gpu_fused_front_end_agrees_with_torch():
    """Llama shape, 8K bf16 prefill over 6 layers: the triton backend's selections equal the torch backend's
    on (nearly) every row: the sketches differ by fp32 rounding only, which can flip an exact near-tie."""
    cfg = SketchWalkConfig(block_size=64, sketch_dim=64, density=0.2)
    gen = torch.Generator().manual_seed(0)
    n, d, layers = 8192, 128, 6
    inputs = [tuple(torch.randn(1, h, n, d, generator=gen).to("cuda", torch.bfloat16) for h in (32, 8, 8))
              for _ in range(layers)]
    sels = {}
    for be in ("torch", "triton"):
        rt = SketchWalkRuntime(cfg, layers, d, backend=be)
        rt.keep_selections = True
        for layer, (q, k, v) in enumerate(inputs):
            rt.attention(layer, q, k, v, None, d ** -0.5)
        sels[be] = [rt.last_selection[l][0] for l in range(cfg.skip_layers, layers)]
    same = total = 0
    for a, b in zip(sels["torch"], sels["triton"]):
        same += int((a.indices.long() == b.indices.long()).all(-1).sum())
        total += a.indices.shape[0]
    assert same >= 0.99 * total, (same, total)
