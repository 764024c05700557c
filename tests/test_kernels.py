"""Triton block-sparse kernels against the reference `sparse_attention` (and dense SDPA).

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here before Triton
is first imported): tiny shapes, fp32 and fp16 (the interpreter mis-computes bf16 tl.dot). The
`gpu` tests run the real compiler at N = 4096/8192 in bf16 and are skipped without CUDA.
Outputs are NaN-poisoned before each launch and padded K/V are NaN, so an unwritten output or an
attended padding key shows up as NaN.
"""
from __future__ import annotations

import os
import sys

import torch

_PREIMPORTED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
if not torch.cuda.is_available():
    # Must precede the first `import triton` (conftest.py sets it too, before any test module
    # can import triton; kernels are built lazily on their first call).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess

import pytest
import torch.nn.functional as F

triton = pytest.importorskip("triton", reason="Triton is not installed: the block-sparse kernels cannot run")
if _PREIMPORTED and not torch.cuda.is_available():
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set, so its interpreter cannot run here; "
                "set TRITON_INTERPRET=1 in the environment", allow_module_level=True)

from sketchwalk.kernels import block_sparse_decode, block_sparse_prefill  # noqa: E402
from sketchwalk.method.attention import sparse_attention  # noqa: E402
from sketchwalk.method.selection import BlockSelection  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


# -- helpers ---------------------------------------------------------------------------
def _rand_rows(nrows: int, row_blocks: list[int], density: float, gen: torch.Generator, max_count: int):
    """Random causal selections: sink + diagonal always, each other causal block with prob. density.

    Returns indices [nrows, max_count] (ascending, -1 padded) and counts [nrows]; rows past
    len(row_blocks) are empty (count 0).
    """
    idx = torch.full((nrows, max_count), -1, dtype=torch.int32)
    cnt = torch.zeros(nrows, dtype=torch.int32)
    for r, i in enumerate(row_blocks):
        keep = torch.rand(i + 1, generator=gen) < density
        keep[0] = keep[i] = True
        sel = torch.nonzero(keep).flatten()
        idx[r, :len(sel)] = sel.to(torch.int32)
        cnt[r] = len(sel)
    return idx, cnt


def _inputs(bsz, hq, hkv, n, d, dtype, offsets, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, hq, n, d, generator=gen)
    k = torch.randn(bsz, hkv, n, d, generator=gen)
    v = torch.randn(bsz, hkv, n, d, generator=gen)
    for b, off in enumerate(offsets):  # padded keys/values are NaN: attending one would poison the row
        k[b, :, :off] = float("nan")
        v[b, :, :off] = float("nan")
        q[b, :, :off] = float("nan")
    return [t.to(DEVICE, dtype) for t in (q, k, v)], gen


def _prefill_selection(n, offsets, bs, density, gen, extra_rows=0):
    nqb = max(-(-(n - off) // bs) for off in offsets) + extra_rows
    max_count = nqb + 2  # wider than needed: trailing -1 entries must never be read
    idx, cnt = [], []
    for off in offsets:
        nb = -(-(n - off) // bs)
        i, c = _rand_rows(nqb, list(range(nb)), density, gen, max_count)
        idx.append(i)
        cnt.append(c)
    return torch.stack(idx), torch.stack(cnt)


def _reference_prefill(q, k, v, idx, cnt, offsets, bs, scale):
    """Per sequence: reference sparse_attention on its real tokens, zeros on padded rows (fp32)."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    n = q.shape[2]
    for b, off in enumerate(offsets):
        m = n - off
        nb = -(-m // bs)
        sel = BlockSelection(indices=idx[b, :nb].long().to(q.device), counts=cnt[b, :nb].long().to(q.device),
                             row_blocks=torch.arange(nb, device=q.device), block_size=bs)
        qs, ks, vs = (t[b, :, off:].float() for t in (q, k, v))
        out[b, :, off:] = sparse_attention(qs, ks, vs, torch.arange(m, device=q.device), sel, scale)
    return out


def _check(out, ref, dtype):
    assert not torch.isnan(out).any(), "NaN left in the output (unwritten element or attended padding)"
    err = (out.float() - ref).abs().max().item()
    rel = err / max(ref.abs().max().item(), 1e-6)
    assert rel <= TOL[dtype], f"max abs error {err:.3e} (relative {rel:.3e}) above {TOL[dtype]}"


# -- prefill ---------------------------------------------------------------------------
PREFILL_CASES = [
    # (bsz, hq, hkv, n, d, bs, offsets, dtype, density, block_m, block_n)
    pytest.param(2, 6, 2, 100, 64, 32, [0, 37], torch.float32, 0.5, None, None, id="gqa3-ragged-leftpad-fp32"),
    pytest.param(2, 9, 3, 150, 128, 64, [11, 0], torch.float16, 0.6, None, None, id="gqa3x3-d128-leftpad-fp16"),
    pytest.param(1, 6, 2, 90, 64, 32, [5], torch.float32, 0.5, 16, 16, id="tiles-within-block-fp32"),
    pytest.param(1, 4, 4, 72, 64, 16, [0], torch.float16, 0.5, None, None, id="mha-bs16-fp16"),
]


@pytest.mark.parametrize("bsz,hq,hkv,n,d,bs,offsets,dtype,density,block_m,block_n", PREFILL_CASES)
def test_prefill_matches_reference(bsz, hq, hkv, n, d, bs, offsets, dtype, density, block_m, block_n, one_torch_thread):
    (q, k, v), gen = _inputs(bsz, hq, hkv, n, d, dtype, offsets)
    idx, cnt = _prefill_selection(n, offsets, bs, density, gen, extra_rows=1)
    assert (cnt[cnt > 0] < idx.shape[-1]).all()
    scale = d ** -0.5
    out = torch.full_like(q, float("nan"))
    block_sparse_prefill(q, k, v, idx.to(DEVICE), cnt.to(DEVICE), torch.tensor(offsets, device=DEVICE), bs, scale,
                         block_m=block_m, block_n=block_n, out=out)
    ref = _reference_prefill(q, k, v, idx, cnt, offsets, bs, scale)
    for b, off in enumerate(offsets):
        assert (out[b, :, :off] == 0).all(), "left-padded query rows must be exactly zero"
    _check(out, ref, dtype)


def test_prefill_all_blocks_equals_dense(one_torch_thread):
    bsz, hq, hkv, n, d, bs = 1, 6, 2, 112, 64, 32
    (q, k, v), gen = _inputs(bsz, hq, hkv, n, d, torch.float32, [0])
    idx, cnt = _prefill_selection(n, [0], bs, 1.0, gen)
    out = block_sparse_prefill(q, k, v, idx, cnt, [0], bs, d ** -0.5)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=d ** -0.5, enable_gqa=True)
    _check(out, ref, torch.float32)


def test_prefill_reads_the_models_layout_in_place(one_torch_thread):
    """q as transformers hands it over (a transposed view of [B, N, Hq, d]) gives the contiguous
    result, and the output is laid out like q, so the model's transpose(1, 2) of it is contiguous
    (no copy on either side of the kernel)."""
    bsz, hq, hkv, n, d, bs = 2, 6, 2, 96, 32, 32
    (q, k, v), gen = _inputs(bsz, hq, hkv, n, d, torch.float32, [0, 0])
    idx, cnt = _prefill_selection(n, [0, 0], bs, 0.5, gen)
    q_model = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, [B, N, Hq, d] memory
    assert not q_model.is_contiguous()
    out = block_sparse_prefill(q_model, k, v, idx, cnt, [0, 0], bs, d ** -0.5)
    ref = block_sparse_prefill(q, k, v, idx, cnt, [0, 0], bs, d ** -0.5)
    assert out.stride() == q_model.stride() and out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_prefill_zero_count_rows_are_zero(one_torch_thread):
    """A row with count 0 (not produced by select_blocks, but allowed) outputs zeros, not NaN."""
    n, d, bs = 64, 64, 32
    (q, k, v), _ = _inputs(1, 2, 1, n, d, torch.float32, [0])
    idx = torch.tensor([[[0, -1], [-1, -1]]], dtype=torch.int32)
    cnt = torch.tensor([[1, 0]], dtype=torch.int32)
    out = block_sparse_prefill(q, k, v, idx, cnt, [0], bs, d ** -0.5, out=torch.full_like(q, float("nan")))
    assert (out[:, :, bs:] == 0).all()
    ref = F.scaled_dot_product_attention(q[:, :, :bs], k[:, :, :bs], v[:, :, :bs], is_causal=True, scale=d ** -0.5,
                                         enable_gqa=True)
    _check(out[:, :, :bs], ref, torch.float32)


# -- the Hopper (TMA) prefill path: same contract, checked the same way ------------------
HOPPER_CASES = [
    # (bsz, hq, hkv, n, d, bs, offsets, density, pair)
    pytest.param(2, 9, 3, 150, 64, 64, [11, 0], 0.6, False, id="gqa3-partial-leftpad"),
    pytest.param(2, 8, 2, 200, 32, 32, [0, 45], 0.5, True, id="gqa4-pairs-odd-counts-leftpad"),
    pytest.param(1, 4, 4, 72, 16, 16, [0], 0.5, True, id="mha-bs16-pairs"),
    pytest.param(1, 4, 2, 300, 16, 128, [3], 0.7, False, id="bs128-leftpad"),
]


@pytest.mark.parametrize("bsz,hq,hkv,n,d,bs,offsets,density,pair", HOPPER_CASES)
def test_prefill_hopper_path_matches_reference(bsz, hq, hkv, n, d, bs, offsets, density, pair, one_torch_thread):
    """The TMA kernel (forced with path="hopper"; the interpreter runs it) against the reference, with
    NaN in every padded K/V/Q row: a partial last block reads past its head's rows, which must not leak."""
    (q, k, v), gen = _inputs(bsz, hq, hkv, n, d, torch.float16, offsets)
    idx, cnt = _prefill_selection(n, offsets, bs, density, gen, extra_rows=1)
    out = torch.full_like(q, float("nan"))
    block_sparse_prefill(q, k, v, idx.to(DEVICE), cnt.to(DEVICE), offsets, bs, d ** -0.5, out=out,
                         path="hopper", pair=pair, num_warps=4)
    for b, off in enumerate(offsets):
        assert (out[b, :, :off] == 0).all(), "left-padded query rows must be exactly zero"
    _check(out, _reference_prefill(q, k, v, idx, cnt, offsets, bs, d ** -0.5), torch.float16)


def test_prefill_hopper_path_per_kv_head_selection(one_torch_thread):
    """One selection per KV head ([B, Hkv, nqb, width], equal counts): each head reads its own rows."""
    bsz, hq, hkv, n, d, bs, offsets = 2, 6, 2, 128, 32, 32, [0, 20]
    (q, k, v), gen = _inputs(bsz, hq, hkv, n, d, torch.float16, offsets)
    idx0, cnt = _prefill_selection(n, offsets, bs, 0.5, gen)
    idx1 = idx0.clone()
    # Head 1: shift each row's off-diagonal picks to other causal blocks, keeping the count (and order).
    for b in range(bsz):
        for r in range(idx0.shape[1]):
            c = int(cnt[b, r])
            if c > 1:
                idx1[b, r, :c - 1] = torch.arange(c - 1, dtype=torch.int32) + (r - (c - 1))
    idx = torch.stack([idx0, idx1], 1)
    outs = [block_sparse_prefill(q, k, v, idx.to(DEVICE), cnt.to(DEVICE), offsets, bs, d ** -0.5, path=p)
            for p in ("portable", "hopper")]
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=2e-3)
    shared = block_sparse_prefill(q, k, v, idx0.to(DEVICE), cnt.to(DEVICE), offsets, bs, d ** -0.5, path="hopper")
    assert (shared[:, 3:] - outs[1][:, 3:]).abs().max() > 0.01, "head 1's own selection must change its output"


def test_prefill_path_choice_and_refusals():
    """auto takes the portable kernel off Hopper (the interpreter, fp32); a forced Hopper path says why it cannot run."""
    from sketchwalk.kernels.block_sparse_prefill import prefill_path

    q = torch.zeros(1, 2, 8, 16, device=DEVICE)
    assert prefill_path(q, q, q) == "portable"
    assert prefill_path(q.half(), q.half(), q.half(), "hopper") == "hopper"
    with pytest.raises(ValueError, match="path = 'hopper'.*fp32"):
        prefill_path(q, q, q, "hopper")
    with pytest.raises(ValueError, match="path = 'fast': allowed auto, hopper, portable"):
        prefill_path(q, q, q, "fast")


# -- decode ----------------------------------------------------------------------------
def _decode_case(bsz, hq, hkv, length, d, bs, offsets, dtype, density, seed=1):
    (q, k, v), gen = _inputs(bsz, hq, hkv, length, d, dtype, offsets, seed=seed)
    q = q[:, :, -1:].contiguous()
    cur = [(length - off - 1) // bs for off in offsets]
    max_count = max(cur) + 2
    idx, cnt = _rand_rows(bsz, cur, density, gen, max_count)
    return q, k, v, idx, cnt


def _reference_decode(q, k, v, idx, cnt, offsets, bs, scale):
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    length = k.shape[2]
    for b, off in enumerate(offsets):
        m = length - off
        sel = BlockSelection(indices=idx[b:b + 1].long().to(q.device), counts=cnt[b:b + 1].long().to(q.device),
                             row_blocks=torch.tensor([(m - 1) // bs], device=q.device), block_size=bs)
        out[b] = sparse_attention(q[b].float(), k[b, :, off:].float(), v[b, :, off:].float(),
                                  torch.tensor([m - 1], device=q.device), sel, scale)
    return out


@pytest.mark.parametrize("bsz,hq,hkv,length,d,bs,offsets,dtype,splits", [
    pytest.param(3, 6, 2, 130, 64, 32, [0, 20, 65], torch.float32, None, id="gqa-leftpad-ragged-fp32"),
    pytest.param(3, 6, 2, 130, 64, 32, [0, 20, 65], torch.float32, 1, id="one-split-fp32"),
    pytest.param(2, 9, 3, 200, 128, 64, [0, 9], torch.float16, 3, id="gqa3x3-d128-fp16"),
])
def test_decode_matches_reference(bsz, hq, hkv, length, d, bs, offsets, dtype, splits, one_torch_thread):
    q, k, v, idx, cnt = _decode_case(bsz, hq, hkv, length, d, bs, offsets, dtype, 0.5)
    out = block_sparse_decode(q, k, v, idx.to(DEVICE), cnt.to(DEVICE), offsets, bs, d ** -0.5, num_splits=splits,
                              out=torch.full_like(q, float("nan")))
    _check(out, _reference_decode(q, k, v, idx, cnt, offsets, bs, d ** -0.5), dtype)


@pytest.mark.parametrize("blocks_per_tile,fused_merge,splits", [
    pytest.param(2, False, 3, id="two-blocks-per-tile"),
    pytest.param(4, True, 2, id="four-blocks-per-tile-fused"),
    pytest.param(1, True, 5, id="fused-merge-more-splits-than-blocks"),
])
def test_decode_tiling_and_fused_merge_match_reference(blocks_per_tile, fused_merge, splits, one_torch_thread):
    """Gathering several selected blocks per key tile (a chunk's last tile partly empty) and merging
    the splits in the last split's program give the reference; the fused merge leaves its counters
    zeroed, so a second call (a graph replay) merges again."""
    import importlib

    dec_mod = importlib.import_module("sketchwalk.kernels.block_sparse_decode")
    bsz, hq, hkv, length, d, bs, offsets = 3, 6, 2, 300, 32, 32, [0, 20, 101]
    q, k, v, idx, cnt = _decode_case(bsz, hq, hkv, length, d, bs, offsets, torch.float16, 0.6)
    ref = _reference_decode(q, k, v, idx, cnt, offsets, bs, d ** -0.5)
    for _ in range(2):
        out = block_sparse_decode(q, k, v, idx.to(DEVICE), cnt.to(DEVICE), offsets, bs, d ** -0.5, num_splits=splits,
                                  out=torch.full_like(q, float("nan")), blocks_per_tile=blocks_per_tile,
                                  fused_merge=fused_merge)
        _check(out, ref, torch.float16)
    if fused_merge:
        assert int(dec_mod._DONE[q.device].abs().sum()) == 0


def test_decode_tiling_refuses_bad_values():
    q, k, v, idx, cnt = _decode_case(1, 2, 1, 64, 16, 32, [0], torch.float32, 1.0)
    with pytest.raises(ValueError, match="blocks_per_tile = 3"):
        block_sparse_decode(q, k, v, idx, cnt, [0], 32, 0.25, blocks_per_tile=3)


def test_decode_all_blocks_equals_dense_and_empty_row(one_torch_thread):
    bsz, hq, hkv, length, d, bs = 2, 6, 2, 100, 64, 32
    q, k, v, idx, cnt = _decode_case(bsz, hq, hkv, length, d, bs, [0, 0], torch.float32, 1.0)
    cnt[1] = 0  # an empty row attends nothing: zeros, not NaN
    out = block_sparse_decode(q, k, v, idx, cnt, [0, 0], bs, d ** -0.5, num_splits=2,
                              out=torch.full_like(q, float("nan")))
    ref = F.scaled_dot_product_attention(q[:1], k[:1], v[:1], scale=d ** -0.5, enable_gqa=True)
    _check(out[:1], ref, torch.float32)
    assert (out[1] == 0).all()


def _static_cache_case(lens, capacity, hq, hkv, d, bs, dtype, seed):
    """A preallocated cache [B, Hkv, capacity, d] whose sequence b holds lens[b] real keys (a prefix;
    the rest NaN, never to be read), the query of each sequence's last real token, random selections."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.full((len(lens), hkv, capacity, d), float("nan"))
    v = torch.full_like(k, float("nan"))
    for b, n in enumerate(lens):
        k[b, :, :n], v[b, :, :n] = torch.randn(hkv, n, d, generator=gen), torch.randn(hkv, n, d, generator=gen)
    q = torch.randn(len(lens), hq, 1, d, generator=gen)
    cur = [(n - 1) // bs for n in lens]
    idx, cnt = _rand_rows(len(lens), cur, 0.5, gen, max(cur) + 2)
    return [t.to(DEVICE, dtype) for t in (q, k, v)], idx, cnt


def _check_static_cache(lens, capacity, hq, hkv, d, bs, dtype, splits, seed):
    (q, k, v), idx, cnt = _static_cache_case(lens, capacity, hq, hkv, d, bs, dtype, seed)
    lengths = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    out = block_sparse_decode(q, k, v, idx.to(DEVICE), cnt.to(DEVICE), torch.zeros_like(lengths), bs, d ** -0.5,
                              num_splits=splits, out=torch.full_like(q, float("nan")), lengths=lengths)
    for b, n in enumerate(lens):  # the same attention as over a cache holding only the real keys
        ref = _reference_decode(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], idx[b:b + 1], cnt[b:b + 1], [0],
                                bs, d ** -0.5)
        _check(out[b:b + 1], ref, dtype)


@pytest.mark.parametrize("splits", [None, 1])
def test_decode_static_cache_reads_only_the_real_prefix(splits, one_torch_thread):
    _check_static_cache([1, 33, 70], 96, 6, 2, 64, 32, torch.float32, splits, seed=5)
    with pytest.raises(ValueError, match="lengths"):
        (q, k, v), idx, cnt = _static_cache_case([5], 32, 2, 1, 32, 16, torch.float32, 0)
        block_sparse_decode(q, k, v, idx, cnt, [0], 16, 1.0, lengths=torch.tensor([5, 5], dtype=torch.int32))


@pytest.mark.gpu
def test_decode_static_cache_gpu():
    _check_static_cache([1, 4000, 8191], 8192, 32, 8, 128, 64, torch.bfloat16, None, seed=9)


def test_import_does_not_need_triton():
    code = "import sys; import sketchwalk.kernels as m; assert 'triton' not in sys.modules; print(m.__all__)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


# -- GPU-sized (real compiler, bf16, fresh random inputs) ------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("n", [4096, 8192])
@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (32, 8, 128)])
@pytest.mark.parametrize("path,pair", [("portable", None), ("hopper", False), ("hopper", True)])
def test_prefill_gpu(n, hq, hkv, d, path, pair):
    if path == "hopper" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Hopper path needs an sm_90 GPU")
    offsets = [0, 301]
    (q, k, v), gen = _inputs(2, hq, hkv, n, d, torch.bfloat16, offsets, seed=n + d)
    idx, cnt = _prefill_selection(n, offsets, 64, 0.2, gen)
    out = block_sparse_prefill(q, k, v, idx.cuda(), cnt.cuda(), offsets, 64, d ** -0.5,
                               out=torch.full_like(q, float("nan")), path=path, pair=pair)
    ref = _reference_prefill(q, k, v, idx, cnt, offsets, 64, d ** -0.5)
    assert (out[1, :, :offsets[1]] == 0).all()
    _check(out, ref, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [32, 128])
@pytest.mark.parametrize("path", ["auto", "portable"])
def test_prefill_gpu_block_sizes(block_size, path):
    from sketchwalk.kernels.block_sparse_prefill import prefill_path

    n, d = 4096, 128
    (q, k, v), gen = _inputs(1, 32, 8, n, d, torch.bfloat16, [0], seed=block_size)
    if path == "auto":  # bf16 on an sm_90 GPU is what the Hopper path is for
        assert prefill_path(q, k, v) == ("hopper" if torch.cuda.get_device_capability()[0] == 9 else "portable")
    idx, cnt = _prefill_selection(n, [0], block_size, 0.2, gen)
    out = block_sparse_prefill(q, k, v, idx.cuda(), cnt.cuda(), [0], block_size, d ** -0.5, path=path)
    _check(out, _reference_prefill(q, k, v, idx, cnt, [0], block_size, d ** -0.5), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [None, 1, 8])
@pytest.mark.parametrize("n", [4096, 8192])
@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (32, 8, 128)])
def test_decode_gpu(n, hq, hkv, d, splits):
    offsets = [0, 301, 4000]
    q, k, v, idx, cnt = _decode_case(3, hq, hkv, n, d, 64, offsets, torch.bfloat16, 0.2, seed=n + d)
    out = block_sparse_decode(q, k, v, idx.cuda(), cnt.cuda(), offsets, 64, d ** -0.5, num_splits=splits,
                              out=torch.full_like(q, float("nan")))
    _check(out, _reference_decode(q, k, v, idx, cnt, offsets, 64, d ** -0.5), torch.bfloat16)


def _compiled_variants(jit_fn) -> int:
    """Number of compiled variants of a Triton kernel (Triton >= 3.2 keeps them per device)."""
    caches = getattr(jit_fn, "device_caches", None)
    if caches is not None:
        return sum(len(c[0]) for c in caches.values())
    return sum(len(c) for c in jit_fn.cache.values())


@pytest.mark.gpu
def test_one_compile_for_every_prompt_length():
    """Prompt lengths that are (or are not) multiples of 16 reuse one compiled kernel: Triton
    specialises int arguments on % 16, and on the H200 a timed 4K prompt paid a ~1.3 s compile.
    (head_dim 32 / block 32: a shape no other GPU test compiles, so each kernel adds at most one.)"""
    import importlib

    from sketchwalk.config import SketchWalkConfig
    from sketchwalk.kernels import block_sketch
    from sketchwalk.method.sketch import sketch_matrix

    pre_mod, hop_mod, dec_mod, sketch_mod = (
        importlib.import_module(f"sketchwalk.kernels.{m}")
        for m in ("block_sparse_prefill", "block_sparse_prefill_hopper", "block_sparse_decode", "block_sketch"))
    paths = ["portable", "hopper"] if torch.cuda.get_device_capability()[0] == 9 else ["portable"]

    def variants():  # the kernels are built by the first calls below
        return (_compiled_variants(pre_mod._KERNEL), *(_compiled_variants(f) for f in dec_mod._KERNELS),
                _compiled_variants(sketch_mod._KERNEL), hop_mod._KERNEL and _compiled_variants(hop_mod._KERNEL))

    cfg = SketchWalkConfig(density=0.2, block_size=32, sketch_dim=16)
    before = None
    for n in (4001, 4096, 4113, 4160):  # n % 16: 1, 0, 1, 0; block rows and selection widths vary too
        (q, k, v), gen = _inputs(1, 9, 3, n, 32, torch.bfloat16, [0], seed=n)
        idx, cnt = _prefill_selection(n, [0], 32, 0.2, gen)
        for path in paths:
            block_sparse_prefill(q, k, v, idx.cuda(), cnt.cuda(), [0], 32, 32 ** -0.5, path=path)
        qd, kd, vd, idd, cd = _decode_case(1, 9, 3, n, 32, 32, [0], torch.bfloat16, 0.2, seed=n)
        block_sparse_decode(qd, kd, vd, idd.cuda(), cd.cuda(), [0], 32, 32 ** -0.5, num_splits=4)
        block_sketch(q[0], k[0], block_size=cfg.block_size, matrix=sketch_matrix(32, cfg.sketch_dim, cfg.seed, 3, q.device))
        torch.cuda.synchronize()
        if before is None:
            before = variants()
    assert variants() == before, (before, variants())
