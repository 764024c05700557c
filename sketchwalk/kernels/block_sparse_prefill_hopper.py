"""Hopper path of the block-sparse causal prefill: K/V block gathers through TMA tensor descriptors.

Same work decomposition and contract as `block_sparse_prefill` (its module docstring): a program
owns one KV head and BLOCK_M query rows of the GQA group stacked head-major over one query block,
heaviest (latest) query blocks first; entries 0 .. count-2 of a row run unmasked, the last one
(the diagonal) with the causal and sequence-end masks.

What differs, and why it is faster on sm_90:
- K and V tiles arrive by TMA (`TensorDescriptor` over K, V viewed as [B*Hkv*N, d]): one bulk
  copy per selected block instead of per-thread gathers, and the loop over selected blocks is the
  innermost loop (the per-block key tiles are unrolled with `static_range`), so Triton's software
  pipeliner keeps `num_stages` blocks in flight and issues the two dots as async wgmma.
- The P·V product accumulates in place (`tl.dot(p, v, acc)`), the wgmma accumulator form.
- PAIR=True handles two selected blocks per step (one running-max rescale per 2 blocks).
A key row read past the end of a KV head's N rows (the diagonal step of a partial last block)
belongs to the next head, or is TMA's zero fill after the last: such keys are masked (position >=
the sequence's real length) and their V rows zeroed, so whatever they hold changes nothing.
Unmasked steps read full blocks strictly below the diagonal, always inside the sequence.

Only fp16 / bf16 with contiguous K and V (the launcher checks); the portable kernel serves the
rest, other GPUs and TRITON_INTERPRET=1 (where this path also runs, slowly, for the tests).
"""
from __future__ import annotations

import torch

from ._triton import require_triton

_KERNEL = None


def _build():
    """Define the Triton kernel on first use (so TRITON_INTERPRET set before the first call is honoured)."""
    global _KERNEL, tl, _tma_attend
    if _KERNEL is not None:
        return _KERNEL
    triton, tl = require_triton()

    @triton.jit
    def _tma_attend(acc, m_i, l_i, q, k_desc, v_desc, kv_row, kp0, qp, n_real, qk_scale,
                    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
        """Online-softmax update with the key block whose first row in the flattened K/V is kv_row
        (first real key position kp0)."""
        for j in tl.static_range(0, BLOCK_SIZE, BLOCK_N):
            k = k_desc.load([kv_row + j, 0])  # [N, D]
            v = v_desc.load([kv_row + j, 0])
            s = tl.dot(q, tl.trans(k))  # [M, N], unscaled
            if MASKED:
                kp = kp0 + j + tl.arange(0, BLOCK_N)
                ok = (kp[None, :] <= qp[:, None]) & (kp[None, :] < n_real)
                s = tl.where(ok, s, float("-inf"))
                # Rows past the sequence end are another head's (its left padding may hold anything,
                # NaN included): p = 0 there, but 0 * NaN is NaN, so they are zeroed too.
                v = tl.where((kp < n_real)[:, None], v, 0.0)
            # The scale goes into the running max (one multiply per row) and into the exponent's
            # argument as one FMA per element (qk_scale > 0, so max and scaling commute).
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s * qk_scale - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit(do_not_specialize=["N", "NQB", "stride_ib", "stride_ih", "stride_ir", "stride_cb"])
    def _prefill_tma_kernel(Q, k_desc, v_desc, O, IDX, CNT, OFF,
                            stride_qb, stride_qh, stride_qn, stride_qd,
                            stride_ob, stride_oh, stride_on, stride_od,
                            stride_ib, stride_ih, stride_ir, stride_ic, stride_cb, stride_cr,
                            N, NQB, HKV, qk_scale,
                            GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, TILES: tl.constexpr,
                            PAIR: tl.constexpr):
        pid0 = tl.program_id(0)
        pid1 = tl.program_id(1)
        b = pid1 // HKV
        hkv = pid1 % HKV
        blk = pid0 // TILES
        tile = pid0 % TILES
        r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        g = r // BLOCK_SIZE
        qi = r % BLOCK_SIZE
        row_ok = g < GROUP
        head = (hkv * GROUP + g).to(tl.int64)
        dcol = tl.arange(0, HEAD_DIM)
        b64 = b.to(tl.int64)
        off = tl.load(OFF + b)
        n_real = N - off
        o_base = O + b64 * stride_ob + head[:, None] * stride_oh + dcol[None, :] * stride_od
        if blk >= NQB:
            pos = (blk - NQB) * BLOCK_SIZE + qi
            ok = row_ok & (pos < off)
            tl.store(o_base + pos.to(tl.int64)[:, None] * stride_on,
                     tl.zeros([BLOCK_M, HEAD_DIM], dtype=O.dtype.element_ty), mask=ok[:, None])
        else:
            qrow = NQB - 1 - blk
            qp = qrow * BLOCK_SIZE + qi
            q_ok = row_ok & (qp < n_real)
            q_t = (off + qp).to(tl.int64)
            q = tl.load(Q + b64 * stride_qb + head[:, None] * stride_qh + q_t[:, None] * stride_qn
                        + dcol[None, :] * stride_qd, mask=q_ok[:, None], other=0.0)
            cnt = tl.load(CNT + b * stride_cb + qrow * stride_cr)
            idx_base = IDX + b * stride_ib + hkv * stride_ih + qrow * stride_ir
            head_row = (b * HKV + hkv) * N + off  # flattened K/V row of this head's real position 0
            m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
            n_full = tl.maximum(cnt - 1, 0)
            if PAIR:
                for i in range(0, n_full // 2):
                    kb0 = tl.load(idx_base + (2 * i) * stride_ic)
                    kb1 = tl.load(idx_base + (2 * i + 1) * stride_ic)
                    acc, m_i, l_i = _tma_attend(acc, m_i, l_i, q, k_desc, v_desc, head_row + kb0 * BLOCK_SIZE,
                                                kb0 * BLOCK_SIZE, qp, n_real, qk_scale, BLOCK_SIZE, BLOCK_N, False)
                    acc, m_i, l_i = _tma_attend(acc, m_i, l_i, q, k_desc, v_desc, head_row + kb1 * BLOCK_SIZE,
                                                kb1 * BLOCK_SIZE, qp, n_real, qk_scale, BLOCK_SIZE, BLOCK_N, False)
                first_tail = (n_full // 2) * 2
            else:
                first_tail = 0
            for i in range(first_tail, n_full):
                kb = tl.load(idx_base + i * stride_ic)
                acc, m_i, l_i = _tma_attend(acc, m_i, l_i, q, k_desc, v_desc, head_row + kb * BLOCK_SIZE,
                                            kb * BLOCK_SIZE, qp, n_real, qk_scale, BLOCK_SIZE, BLOCK_N, False)
            for i in range(n_full, cnt):
                kb = tl.load(idx_base + i * stride_ic)
                acc, m_i, l_i = _tma_attend(acc, m_i, l_i, q, k_desc, v_desc, head_row + kb * BLOCK_SIZE,
                                            kb * BLOCK_SIZE, qp, n_real, qk_scale, BLOCK_SIZE, BLOCK_N, True)
            l_safe = tl.where(l_i > 0.0, l_i, 1.0)
            out = acc / l_safe[:, None]
            tl.store(o_base + q_t[:, None] * stride_on, out.to(O.dtype.element_ty), mask=q_ok[:, None])

    _KERNEL = _prefill_tma_kernel
    return _KERNEL


def hopper_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """Why these inputs cannot take the TMA path ('' when they can).

    q: [B, Hq, N, d]; k, v: [B, Hkv, N, d]. TMA needs a 16-byte aligned base and row stride and a
    unit last stride; the flattened [B*Hkv*N, d] view needs contiguous K and V (the launcher
    makes them so, free when they already are).
    """
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (the Hopper path is fp16 / bf16; fp32 takes the portable kernel)"
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return "this Triton has no TensorDescriptor (needs Triton >= 3.4)"
    if q.shape[-1] * q.element_size() % 16:
        return "head_dim * element size is not a multiple of 16 bytes"
    return ""


def launch_hopper(q, k, v, out, idx, cnt, off, idx_strides, nqb: int, npad: int, block_size: int, qk_scale: float,
                  block_m: int, tiles: int, block_n: int, num_warps: int, num_stages: int, pair: bool) -> None:
    """Run the TMA kernel (arguments already checked and sized by `block_sparse_prefill`).

    q, out: [B, Hq, N, d] any strides; k, v: [B, Hkv, N, d] contiguous; idx / cnt / off int32 on the
    device; qk_scale: softmax scale x log2(e).
    """
    from triton.tools.tensor_descriptor import TensorDescriptor

    bsz, hq, n, d = q.shape
    hkv = k.shape[1]
    rows = bsz * hkv * n
    k_desc = TensorDescriptor(k, [rows, d], [d, 1], [block_n, d])
    v_desc = TensorDescriptor(v, [rows, d], [d, 1], [block_n, d])
    kernel = _build()
    kernel[((nqb + npad) * tiles, bsz * hkv)](
        q, k_desc, v_desc, out, idx, cnt, off,
        *q.stride(), *out.stride(), *idx_strides, *cnt.stride(),
        n, nqb, hkv, qk_scale,
        GROUP=hq // hkv, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=d, TILES=tiles,
        PAIR=pair, num_warps=num_warps, num_stages=num_stages)
