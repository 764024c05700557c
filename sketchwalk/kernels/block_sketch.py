"""Fused Sketch&Walk selection front end in Triton: head average, block pooling and SRHT in one pass.

For `head_aggregation = mean_qk` the prefill front end (method.md steps 2-4) is linear up to the
division by the block's token count: block j's sketch is

    sketch_j = (1 / count_j) * (sum over the block's tokens t and heads h of x[h, t] / H) @ M,

with M = sqrt(p/r) * (diag(signs) H_p / sqrt(p))[:d, coords]: the SRHT applied to the identity,
a fixed [d, r] matrix per (layer, device), built once from the reference's own `srht` (so the
signs, coordinates and scale cannot drift from it). Head-averaging before or after pooling is the
same (both linear), so the kernel sums heads and tokens of a block together in fp32 and never
writes per-token features: Q and K are each read exactly once.

Grid: (block, 2): program (j, 0) pools query block j over the Hq query heads, (j, 1) key block j
over the Hkv KV heads. A program walks its (head, token chunk) tiles in one flat loop (so the
compiler can pipeline the loads), accumulating a [TOK, d] fp32 tile; it then reduces over
tokens, stores the block sum (of the head mean), and multiplies the block mean by M in column
chunks of at most RC sketch coordinates (bounded registers for d, r up to 256).

The head counts are compile-time constants (one compile per model shape, like head_dim), so every
loop bound is a constexpr. A runtime loop bound breaks Triton 3.6's interpreter under NumPy >= 2.4:
it turns the bound into a Python int with `int()` of a 1-element 1-D array, which NumPy 2.4 rejects
("only 0-dimensional arrays can be converted to Python scalars"); Triton 3.9 squeezes it first.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._triton import check_device, next_pow2, require_triton

_KERNEL = None
_TILE_ELEMS = 8192  # fp32 accumulator elements per program: 64 registers per thread at 4 warps


class BlockSketch(NamedTuple):
    """Output of `block_sketch` (fp32): block sums [nb, d] and sketched block means [1, nb, r]."""

    q_sums: torch.Tensor
    k_sums: torch.Tensor
    q_sk: torch.Tensor
    k_sk: torch.Tensor


def _build():
    """Define the Triton kernel on first use (so TRITON_INTERPRET set before the first call is honoured)."""
    global _KERNEL, tl, _pool_and_sketch
    if _KERNEL is not None:
        return _KERNEL
    triton, tl = require_triton()

    # A module-level helper (through `global`), called once per branch below: Q and K differ in
    # base pointer, strides and head count, and a branch-local call needs no merged variables.
    @triton.jit
    def _pool_and_sketch(X, H: tl.constexpr, stride_h, stride_n, stride_d, M, SUMS, SK, blk, m,
                         HEAD_DIM: tl.constexpr, R: tl.constexpr, BLOCK_SIZE: tl.constexpr, TOK: tl.constexpr,
                         CHUNKS: tl.constexpr, D_PAD: tl.constexpr, RC: tl.constexpr, R_CHUNKS: tl.constexpr,
                         EXACT: tl.constexpr):
        """Block `blk` of X [H, m, d]: store sum_t mean_h X to SUMS[blk] and its sketched mean to SK[blk]."""
        tok = tl.arange(0, TOK)
        dcol = tl.arange(0, D_PAD)
        d_ok = dcol < HEAD_DIM  # constexpr: folds away when HEAD_DIM == D_PAD
        start = blk * BLOCK_SIZE
        acc = tl.zeros([TOK, D_PAD], dtype=tl.float32)
        for it in range(0, H * CHUNKS):  # constexpr trip count (see the module docstring)
            h = it // CHUNKS
            pos = start + (it % CHUNKS) * TOK + tok
            ok = pos < m  # the ragged last block
            ptr = X + h.to(tl.int64) * stride_h + pos.to(tl.int64)[:, None] * stride_n + dcol[None, :] * stride_d
            acc += tl.load(ptr, mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        s = tl.sum(acc, 0) / H  # [D_PAD]: sum over the block's tokens of the mean over heads
        tl.store(SUMS + blk * HEAD_DIM + dcol, s, mask=d_ok)
        mean = s / tl.minimum(m - start, BLOCK_SIZE)  # a partial block averages its real tokens
        if EXACT:
            tl.store(SK + blk * HEAD_DIM + dcol, mean, mask=d_ok)
        else:
            for c in range(0, R_CHUNKS):
                rcol = c * RC + tl.arange(0, RC)
                r_ok = rcol < R
                mt = tl.load(M + dcol[:, None] * R + rcol[None, :], mask=d_ok[:, None] & r_ok[None, :], other=0.0)
                tl.store(SK + blk * R + rcol, tl.sum(mean[:, None] * mt, 0), mask=r_ok)

    # Length-dependent sizes are not specialised (one compiled variant for every prompt length).
    @triton.jit(do_not_specialize=["m", "nb"])
    def _block_sketch_kernel(Q, K, M, SUMS, SK,
                             stride_qh, stride_qn, stride_qd, stride_kh, stride_kn, stride_kd,
                             m, nb, HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr, R: tl.constexpr,
                             BLOCK_SIZE: tl.constexpr, TOK: tl.constexpr, CHUNKS: tl.constexpr, D_PAD: tl.constexpr,
                             RC: tl.constexpr, R_CHUNKS: tl.constexpr, EXACT: tl.constexpr):
        blk = tl.program_id(0)
        if tl.program_id(1) == 0:
            _pool_and_sketch(Q, HQ, stride_qh, stride_qn, stride_qd, M, SUMS, SK, blk, m, HEAD_DIM, R,
                             BLOCK_SIZE, TOK, CHUNKS, D_PAD, RC, R_CHUNKS, EXACT)
        else:  # the K halves of the outputs follow the Q halves: [2, nb, *]
            _pool_and_sketch(K, HKV, stride_kh, stride_kn, stride_kd, M, SUMS + nb * HEAD_DIM, SK + nb * R, blk, m,
                             HEAD_DIM, R, BLOCK_SIZE, TOK, CHUNKS, D_PAD, RC, R_CHUNKS, EXACT)

    _KERNEL = _block_sketch_kernel
    return _KERNEL


def block_sketch(q: torch.Tensor, k: torch.Tensor, *, block_size: int, matrix: Optional[torch.Tensor],
                 num_warps: Optional[int] = None, num_stages: Optional[int] = None,
                 out: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> BlockSketch:
    """The mean_qk selection front end of one sequence's prefill in one pass over Q and K.

    q: [Hq, m, d], k: [Hkv, m, d]: one sequence's real tokens (any strides: slices of a KV cache
    are read in place), fp32/fp16/bf16 (both the same dtype), d <= 256; block_size: a power of two;
    matrix: the layer's SRHT as a [d, r] fp32 matrix on q's device (`method.sketch.sketch_matrix`),
    or None for the exact sketch (r = d: the block means themselves). The head aggregation is
    mean_qk (the caller checks it). num_warps / num_stages: launch options (untuned defaults).
    out: optional contiguous fp32 buffers (sums [2, nb, d], sketches [2, nb, r]), written in full
      (tests pass NaN-filled ones); the results are views of them (Q first, then K).
    Returns fp32 `BlockSketch(q_sums, k_sums, q_sk, k_sk)`, nb = ceil(m / block_size):
      q_sums, k_sums [nb, d]: per block, the sum over its tokens of the head-averaged features;
      q_sk, k_sk [1, nb, r]: sketch_features(block_means(group_features(q, k)...)) of the reference
      (r = sketch_dim; for sketch == "exact" the block means themselves, r = d).
    """
    if q.dim() != 3 or k.dim() != 3 or q.shape[1:] != k.shape[1:] or not q.shape[0] or not k.shape[0]:
        raise ValueError(f"need q [Hq, m, d], k [Hkv, m, d] with heads; got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype:
        raise TypeError(f"q, k must share one of fp16/bf16/fp32; got {q.dtype}, {k.dtype}")
    hq, m, d = q.shape
    bs = int(block_size)
    if not 1 <= d <= 256 or bs != next_pow2(bs):
        raise ValueError(f"need head_dim in [1, 256] and a power-of-two block_size; got {d}, {bs}")
    check_device(q, k)
    exact = matrix is None
    r = d if exact else matrix.shape[1]
    if not exact and (matrix.shape[0] != d or matrix.dtype != torch.float32 or matrix.device != q.device):
        raise ValueError(f"matrix must be fp32 [{d}, r] on {q.device}; got {tuple(matrix.shape)} {matrix.dtype} "
                         f"on {matrix.device}")
    if r > next_pow2(d):
        raise ValueError(f"sketch_dim = {r} exceeds head_dim = {d} (padded to {next_pow2(d)})")
    nb = -(-m // bs)
    if out is None:
        sums = torch.empty(2, nb, d, device=q.device, dtype=torch.float32)
        sk = torch.empty(2, nb, r, device=q.device, dtype=torch.float32)
    else:
        sums, sk = out
        for buf, shape in ((sums, (2, nb, d)), (sk, (2, nb, r))):
            if buf.shape != shape or buf.dtype != torch.float32 or not buf.is_contiguous() or buf.device != q.device:
                raise ValueError(f"out buffers must be contiguous fp32 {shape} on {q.device}; got {tuple(buf.shape)}")
    res = BlockSketch(sums[0], sums[1], sk[:1], sk[1:])
    if nb == 0:
        return res
    mat = sk if exact else matrix.contiguous()  # exact: M is never read
    d_pad = next_pow2(d)
    tok = min(bs, max(16, _TILE_ELEMS // d_pad))
    rc = min(next_pow2(r), max(16, _TILE_ELEMS // d_pad))
    _build()[(nb, 2)](
        q, k, mat, sums, sk, *q.stride(), *k.stride(), m, nb, HQ=hq, HKV=k.shape[0], HEAD_DIM=d, R=r,
        BLOCK_SIZE=bs, TOK=tok, CHUNKS=bs // tok, D_PAD=d_pad, RC=rc, R_CHUNKS=-(-r // rc), EXACT=exact,
        num_warps=num_warps or 4, num_stages=num_stages or 2)
    return res
