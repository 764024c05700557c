"""Block log-sum-exp scores in Triton: the sub-block (and token-level) block scores without their logits.

With `score_block_size` set, a query-block row's transition row is the softmax over every causal
key sub-block, summed per block (`method.scores.coarse_softmax`). That equals the softmax over
blocks of each block's log-sum-exp of its sub-block logits,

    L[g, i, j] = log sum_{u in block j} exp(scale * q_sk[g, i] . k_sk[g, u]),

so a kernel that writes L ([G, rows, b]) leaves only a b-wide softmax to PyTorch. The PyTorch path
materialises the logits instead ([G, rows, nf] with nf = b * f sub-blocks: at 64K tokens and
token-level scores 9 x 1024 x 65536 fp32, 2.4 GB, and several passes over it), which is what made
token-level scores slow end to end.

Grid: (group, row tile, key block): each program loads a [ROWS, r] tile of sketched query-block
means and the f sketched sub-block keys of one block, takes their dot product in fp32 and reduces
it over the sub-blocks. Columns past a row's block (not causal) and sub-blocks past `nf` (the
partial last block) are -inf; a program whose key block lies after every row of its tile stores -inf
without computing (half of the causal grid). f, r and the tile sizes are compile-time constants (one compile per
config and shape); see block_sketch.py for why loop bounds must be.
"""
from __future__ import annotations

import math

import torch

from ._triton import check_device, next_pow2, require_triton

_KERNEL = None
ROWS = 64  # query-block rows per program (tl.dot needs >= 16); 64 was fastest on an H200 (see block_logsumexp)
PRECISIONS = ("ieee", "tf32x3", "tf32")


def _build():
    """Define the Triton kernel on first use (so TRITON_INTERPRET set before the first call is honoured)."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    triton, tl = require_triton()

    @triton.jit
    def _block_lse(Q, K, OUT, rows, nf, nb, scale,
                   sq_g, sq_r, sq_d, sk_g, sk_u, sk_d, so_g, so_r, so_b,
                   R: tl.constexpr, R_PAD: tl.constexpr, F: tl.constexpr, F_PAD: tl.constexpr,
                   ROWS: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
        g = tl.program_id(0)
        i = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
        j = tl.program_id(2)
        if CAUSAL and j > tl.program_id(1) * ROWS + ROWS - 1:
            # A key block after every row of the tile: nothing causal to score (half of the grid).
            tl.store(OUT + g * so_g + i * so_r + j * so_b, tl.full([ROWS], float("-inf"), tl.float32),
                     mask=i < rows)
        else:
            c = tl.arange(0, R_PAD)
            u = j * F + tl.arange(0, F_PAD)
            q = tl.load(Q + g * sq_g + i[:, None] * sq_r + c[None, :] * sq_d,
                        mask=(i[:, None] < rows) & (c[None, :] < R), other=0.0)
            u_ok = (tl.arange(0, F_PAD) < F) & (u < nf)
            k = tl.load(K + g * sk_g + u[None, :] * sk_u + c[:, None] * sk_d,
                        mask=u_ok[None, :] & (c[:, None] < R), other=0.0)
            logits = tl.dot(q, k, input_precision=PRECISION) * scale  # [ROWS, F_PAD], fp32 accumulation
            logits = tl.where(u_ok[None, :], logits, float("-inf"))
            mx = tl.max(logits, axis=1)
            safe = tl.where(mx == float("-inf"), 0.0, mx)
            lse = safe + tl.log(tl.sum(tl.exp(logits - safe[:, None]), axis=1))
            if CAUSAL:
                lse = tl.where(j <= i, lse, float("-inf"))
            tl.store(OUT + g * so_g + i * so_r + j * so_b, lse, mask=i < rows)

    _KERNEL = _block_lse
    return _KERNEL


def block_logsumexp(q_sk: torch.Tensor, k_sk: torch.Tensor, f: int, scale: float, causal: bool = True,
                    rows_per_program: int = ROWS, precision: str = "tf32x3") -> torch.Tensor:
    """Per-block log-sum-exp of sub-block logits: q_sk [G, rows, r], k_sk [G, nf, r] (fp32; nf <= b * f
    real sub-blocks, b = ceil(nf / f)), f sub-blocks per block, scale multiplying q·k (s / sqrt(head_dim))
    -> L [G, rows, b] fp32; causal: row i holds -inf for blocks j > i (rows are blocks 0..rows-1).
    rows_per_program (16, 32 or 64) and precision (tl.dot's input precision) are speed knobs: "ieee" is
    fp32 on the CUDA cores; "tf32x3" splits each fp32 operand into two TF32 parts on the tensor cores
    (error ~1e-6 relative, as ieee); "tf32" is one TF32 product (~1e-3 relative: not the reference).
    H200, 9 groups, r = 64, token-level keys, 32K tokens: ieee 1.25 ms, tf32 0.18 ms at 64 rows (16 rows:
    1.69 / 0.34 ms). On CUDA, or on CPU tensors under TRITON_INTERPRET=1 (which computes in fp32 whatever
    the precision)."""
    g, rows, r = q_sk.shape
    nf = k_sk.shape[-2]
    if k_sk.shape[0] != g or k_sk.shape[-1] != r:
        raise ValueError(f"q_sk {tuple(q_sk.shape)} and k_sk {tuple(k_sk.shape)}: groups and sketch dims must match")
    if f < 1 or f > 256:
        raise ValueError(f"f = {f}: sub-blocks per block must be in [1, 256]")
    if rows_per_program not in (16, 32, 64):
        raise ValueError(f"rows_per_program = {rows_per_program}: allowed 16, 32 or 64")
    if precision not in PRECISIONS:
        raise ValueError(f"precision = {precision!r}: allowed one of {list(PRECISIONS)}")
    check_device(q_sk, k_sk)
    q_sk, k_sk = q_sk.float(), k_sk.float()
    nb = -(-nf // f)
    out = torch.empty(g, rows, nb, dtype=torch.float32, device=q_sk.device)
    kernel = _build()
    grid = (g, -(-rows // rows_per_program), nb)
    kernel[grid](q_sk, k_sk, out, rows, nf, nb, float(scale),
                 *q_sk.stride(), *k_sk.stride(), *out.stride(),
                 R=r, R_PAD=max(16, next_pow2(r)), F=f, F_PAD=max(16, next_pow2(f)), ROWS=rows_per_program,
                 CAUSAL=causal, PRECISION=precision)
    return out


def block_logsumexp_reference(q_sk: torch.Tensor, k_sk: torch.Tensor, f: int, scale: float,
                              causal: bool = True) -> torch.Tensor:
    """PyTorch statement of `block_logsumexp` (same arguments and result), materialising the logits."""
    g, rows, _ = q_sk.shape
    nf = k_sk.shape[-2]
    nb = -(-nf // f)
    logits = torch.matmul(q_sk.float(), k_sk.float().transpose(-1, -2)) * scale
    logits = torch.nn.functional.pad(logits, (0, nb * f - nf), value=-math.inf)
    out = torch.logsumexp(logits.unflatten(-1, (nb, f)), dim=-1)
    if causal:
        cols = torch.arange(nb, device=q_sk.device)
        out = out.masked_fill(cols[None, :] > torch.arange(rows, device=q_sk.device)[:, None], -math.inf)
    return out
