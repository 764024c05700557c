"""Block-sparse single-token decode attention with split-KV (flash-decoding) in Triton.

Kernel 1 (`_decode_split_kernel`), grid (num_splits, batch * Hkv): the selected blocks of a
sequence (entries 0 .. count-1) are cut into `num_splits` contiguous, near-equal chunks of
ceil(count / num_splits) entries; a program runs the online softmax over its chunk for all
G query heads of its KV group at once (the G query rows are padded to >= 16 so tl.dot
applies; each K/V tile is loaded once per group, with no repeat_kv copy) and writes the
partial (max m, sum l, unnormalised acc) in fp32. Empty chunks write m = -1e30, l = 0, acc = 0.

With num_splits == 1 the split kernel normalises and writes the output itself (one launch).
Kernel 2 (`_decode_merge_kernel`), grid (batch * Hq,): combines the partials,
out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s with M = max_s m_s (log2 units), writing
zeros for a sequence that attended nothing (count 0).

The query is the last tensor position L-1 (real position L-1-offsets[b]); keys are the real
positions 0 .. L-1-offsets[b] at tensor positions offsets[b] .. L-1. Every key is masked to the
real sequence, so the current partial block and padded keys are handled; decode is memory bound
so the mask costs nothing measurable.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._triton import as_int32, check_common_inputs, dot_precision, next_pow2, require_triton, sm_count

_KERNELS = None
LOG2E = 1.4426950408889634


def _build():
    """Define the Triton kernels on first use (so TRITON_INTERPRET set before the first call is honoured)."""
    global _KERNELS, tl, _decode_update
    if _KERNELS is not None:
        return _KERNELS
    triton, tl = require_triton()

    # The cache length and the selection's width change every step: not specialised (see the
    # prefill kernel), so no decode step compiles a new variant.
    @triton.jit
    def _decode_update(acc, m_i, l_i, q, k_base, v_base, kp, k_ok, off, dcol, stride_kn, stride_kd,
                       stride_vn, stride_vd, qk_scale, INPUT_PRECISION: tl.constexpr):
        """Online-softmax update of (acc [G_PAD, D], m_i, l_i) with the keys at real positions kp [N] (k_ok valid)."""
        kt = (off + kp).to(tl.int64)
        k = tl.load(k_base + kt[None, :] * stride_kn + dcol[:, None] * stride_kd, mask=k_ok[None, :], other=0.0)
        v = tl.load(v_base + kt[:, None] * stride_vn + dcol[None, :] * stride_vd, mask=k_ok[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=INPUT_PRECISION) * qk_scale  # [G_PAD, N], log2 units
        s = tl.where(k_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        return acc, m_new, l_i

    # The cache length and the selection's width change every step: not specialised (see the
    # prefill kernel), so no decode step compiles a new variant.
    @triton.jit(do_not_specialize=["L", "NUM_SPLITS", "stride_ib"])
    def _decode_split_kernel(Q, K, V, IDX, CNT, OFF, LENS, MP, LP, AP, O, DONE,
                             stride_qb, stride_qh, stride_qd, stride_ob, stride_oh, stride_od,
                             stride_kb, stride_kh, stride_kn, stride_kd,
                             stride_vb, stride_vh, stride_vn, stride_vd,
                             stride_ib, stride_ih, stride_ic,
                             L, HKV, HQ, NUM_SPLITS, qk_scale,
                             GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                             BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                             DIRECT: tl.constexpr, HAS_LENS: tl.constexpr, BLOCKS_PER_TILE: tl.constexpr,
                             FUSED_MERGE: tl.constexpr, GROUP_P2: tl.constexpr, MERGE_CHUNK: tl.constexpr):
        split = tl.program_id(0)
        pid1 = tl.program_id(1)
        b = pid1 // HKV
        hkv = pid1 % HKV
        b64 = b.to(tl.int64)
        off = tl.load(OFF + b)
        if HAS_LENS:  # a static cache: the real keys are a prefix of its buffer, their count on the device
            n_real = tl.load(LENS + b)
        else:
            n_real = L - off
        cnt = tl.load(CNT + b)
        per = (cnt + NUM_SPLITS - 1) // NUM_SPLITS
        start = split * per
        end = tl.minimum(start + per, cnt)
        g = tl.arange(0, GROUP_PAD)
        g_ok = g < GROUP
        head = hkv * GROUP + g
        dcol = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + b64 * stride_qb + head.to(tl.int64)[:, None] * stride_qh + dcol[None, :] * stride_qd,
                    mask=g_ok[:, None], other=0.0)  # [G_PAD, D]
        k_base = K + b64 * stride_kb + hkv.to(tl.int64) * stride_kh
        v_base = V + b64 * stride_vb + hkv.to(tl.int64) * stride_vh
        idx_base = IDX + b * stride_ib + hkv * stride_ih
        m_i = tl.zeros([GROUP_PAD], dtype=tl.float32) - 1.0e30
        l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
        if BLOCKS_PER_TILE == 1:
            # The key tiles of a block are unrolled so that the loop over selected blocks is the
            # innermost loop, which Triton's pipeliner can overlap (num_stages).
            for i in range(start, end):
                kb = tl.load(idx_base + i * stride_ic)
                for j in tl.static_range(0, BLOCK_SIZE, BLOCK_N):
                    kp = kb * BLOCK_SIZE + j + tl.arange(0, BLOCK_N)
                    acc, m_i, l_i = _decode_update(acc, m_i, l_i, q, k_base, v_base, kp, kp < n_real, off, dcol,
                                                   stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
                                                   INPUT_PRECISION)
        else:
            # One tile gathers BLOCKS_PER_TILE selected blocks (token t of the tile is token t % BLOCK_SIZE
            # of entry i + t // BLOCK_SIZE): more bytes in flight per program, fewer serial steps.
            t = tl.arange(0, BLOCKS_PER_TILE * BLOCK_SIZE)
            for i in range(start, end, BLOCKS_PER_TILE):
                e = i + t // BLOCK_SIZE
                e_ok = e < end
                kb = tl.load(idx_base + e * stride_ic, mask=e_ok, other=0)
                kp = kb * BLOCK_SIZE + t % BLOCK_SIZE
                acc, m_i, l_i = _decode_update(acc, m_i, l_i, q, k_base, v_base, kp, e_ok & (kp < n_real), off,
                                               dcol, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
                                               INPUT_PRECISION)
        o_ptr = O + b64 * stride_ob + head.to(tl.int64)[:, None] * stride_oh + dcol[None, :] * stride_od
        if DIRECT:
            # One split: normalise here and skip the merge launch (count 0 → l = 0 → zeros).
            l_safe = tl.where(l_i > 0.0, l_i, 1.0)
            out = acc / l_safe[:, None]
            tl.store(o_ptr, out.to(O.dtype.element_ty), mask=g_ok[:, None])
        else:
            # Partials are contiguous fp32: MP/LP [B, HQ, NUM_SPLITS], AP [B, HQ, NUM_SPLITS, D].
            row = (b64 * HQ + head.to(tl.int64)) * NUM_SPLITS + split
            tl.store(MP + row, m_i, mask=g_ok)
            tl.store(LP + row, l_i, mask=g_ok)
            tl.store(AP + row[:, None] * HEAD_DIM + dcol[None, :], acc, mask=g_ok[:, None])
            if FUSED_MERGE:
                # The last split of a (sequence, KV head) to finish merges all of them: no second launch.
                # The barrier makes every thread's partial stores precede the acq_rel atomic (release),
                # whose acquire side in the last program then sees all splits' partials.
                tl.debug_barrier()
                done = tl.atomic_add(DONE + pid1, 1, sem="acq_rel")
                if done == NUM_SPLITS - 1:
                    gm = tl.arange(0, GROUP_P2)
                    gm_ok = gm < GROUP
                    rows = (b64 * HQ + (hkv * GROUP + gm).to(tl.int64)) * NUM_SPLITS  # [G2]
                    sp = tl.arange(0, MERGE_CHUNK)
                    m_run = tl.zeros([GROUP_P2], dtype=tl.float32) - 1.0e30
                    l_run = tl.zeros([GROUP_P2], dtype=tl.float32)
                    a_run = tl.zeros([GROUP_P2, HEAD_DIM], dtype=tl.float32)
                    for s0 in range(0, NUM_SPLITS, MERGE_CHUNK):
                        ok = gm_ok[:, None] & (s0 + sp[None, :] < NUM_SPLITS)  # [G2, S]
                        r2 = rows[:, None] + s0 + sp[None, :]
                        m = tl.load(MP + r2, mask=ok, other=-1.0e30, cache_modifier=".cg")
                        lp = tl.load(LP + r2, mask=ok, other=0.0, cache_modifier=".cg")
                        a = tl.load(AP + r2[:, :, None] * HEAD_DIM + dcol[None, None, :], mask=ok[:, :, None],
                                    other=0.0, cache_modifier=".cg")  # [G2, S, D]
                        m_new = tl.maximum(m_run, tl.max(m, 1))
                        w = tl.exp2(m - m_new[:, None])
                        alpha = tl.exp2(m_run - m_new)
                        l_run = l_run * alpha + tl.sum(lp * w, 1)
                        a_run = a_run * alpha[:, None] + tl.sum(a * w[:, :, None], 1)
                        m_run = m_new
                    l_safe = tl.where(l_run > 0.0, l_run, 1.0)
                    out = a_run / l_safe[:, None]
                    tl.store(O + b64 * stride_ob + (hkv * GROUP + gm).to(tl.int64)[:, None] * stride_oh
                             + dcol[None, :] * stride_od, out.to(O.dtype.element_ty), mask=gm_ok[:, None])
                    tl.atomic_xchg(DONE + pid1, 0)  # ready for the next call (or graph replay)

    @triton.jit(do_not_specialize=["NUM_SPLITS"])
    def _decode_merge_kernel(MP, LP, AP, O, stride_ob, stride_oh, stride_od, HQ, NUM_SPLITS,
                             SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
        pid = tl.program_id(0)
        b = pid // HQ
        h = pid % HQ
        sp = tl.arange(0, SPLITS_PAD)
        s_ok = sp < NUM_SPLITS
        dcol = tl.arange(0, HEAD_DIM)
        row = pid.to(tl.int64) * NUM_SPLITS + sp
        m = tl.load(MP + row, mask=s_ok, other=-1.0e30)
        l = tl.load(LP + row, mask=s_ok, other=0.0)
        a = tl.load(AP + row[:, None] * HEAD_DIM + dcol[None, :], mask=s_ok[:, None], other=0.0)
        m_max = tl.max(m, 0)
        w = tl.exp2(m - m_max)  # empty splits have l = 0 and acc = 0, so their weight is harmless
        l_tot = tl.sum(l * w, 0)
        acc = tl.sum(a * w[:, None], 0)
        l_safe = tl.where(l_tot > 0.0, l_tot, 1.0)
        out = acc / l_safe
        tl.store(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + dcol * stride_od,
                 out.to(O.dtype.element_ty))

    _KERNELS = (_decode_split_kernel, _decode_merge_kernel)
    return _KERNELS


# Up to this many selected tokens per row one split (a single launch) wins in eager mode. H200,
# bf16 (results/kernels): one split costs ~0.8 us per selected 64-token block (~15 us at 14
# blocks, ~25 us at 28, ~52 us at 64), while split + merge costs ~30-40 us of Python launch
# overhead for 10-20 us of GPU time. Under CUDA graphs splitting wins from a few blocks on: pass
# num_splits explicitly there.
EAGER_SINGLE_SPLIT_TOKENS = 1024
# Split-kernel launch defaults, chosen on an H200 by benchmarks/tune_hopper.py (results/kernels/README.md).
DECODE_DEFAULTS = dict(num_warps=4, num_stages=3, blocks_per_tile=1, fused_merge=False)
MERGE_CHUNK = 16  # splits combined per step of the fused merge

_DONE: dict = {}  # device -> int32 zeros: per (sequence, KV head) count of finished splits


def _done_counters(device: torch.device, n: int) -> Optional[torch.Tensor]:
    """A zeroed int32 buffer of >= n counters on `device`, kept across calls (the fused merge leaves it
    zeroed). None while a CUDA graph is being captured and no buffer that large exists yet: an allocation
    there would belong to the graph's pool, so that call merges in a second launch instead."""
    buf = _DONE.get(device)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = torch.zeros(max(n, 256), dtype=torch.int32, device=device)
        _DONE[device] = buf
    return buf


def default_num_splits(batch: int, hkv: int, max_count: int, device: torch.device, block_size: int = 64) -> int:
    """KV splits per (sequence, KV head).

    One split when a row selects at most EAGER_SINGLE_SPLIT_TOKENS tokens (launch overhead
    dominates); otherwise enough splits for batch*Hkv*splits programs to fill about two waves of
    the GPU, at most one split per selected block and at most 128.
    """
    if device.type == "cuda":
        if max_count * block_size <= EAGER_SINGLE_SPLIT_TOKENS:
            return 1
        sms = sm_count(device.index if device.index is not None else torch.cuda.current_device())
        target = -(-2 * sms // max(1, batch * hkv))
    else:  # interpreter: a few splits still exercise the merge
        target = 4
    return max(1, min(target, max_count, 128))


def block_sparse_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
                        counts: torch.Tensor, offsets, block_size: int, scale: float,
                        num_splits: Optional[int] = None, block_n: Optional[int] = None,
                        num_warps: Optional[int] = None, out: Optional[torch.Tensor] = None,
                        lengths: Optional[torch.Tensor] = None, num_stages: Optional[int] = None,
                        blocks_per_tile: Optional[int] = None, fused_merge: Optional[bool] = None) -> torch.Tensor:
    """Attention of one new query token per sequence over the selected blocks of its KV cache.

    q: [B, Hq, 1, d]; k, v: [B, Hkv, L, d] (the cache including the new token; no K/V copy for GQA);
    d a power of two in [16, 256]; dtype fp16, bf16 or fp32 (fp32 accumulation, IEEE fp32 dots).
    indices: [B, max_count] int, selected key-block indices in real-token coordinates (ascending,
      -1 padded; order does not matter here), or [B, Hkv, max_count] for one selection per KV head
      (`selection_heads: kv`); counts: [B] valid entries per row, the same for every head (0 → zeros);
    offsets: [B] left-pad lengths; the query is real position L-1-offsets[b] at tensor position L-1.
    block_size: 16/32/64/128 tokens; scale: softmax scale.
    num_splits: KV splits per (sequence, KV head); default: see `default_num_splits` (tuned for eager
      launches; under CUDA graphs pass a larger value, e.g. 16-32 for long caches).
    out: optional preallocated output like q, overwritten in full.
    lengths: optional [B] int32 device tensor, real keys per sequence for a static (preallocated)
      cache: sequence b's keys are tensor positions offsets[b] .. offsets[b] + lengths[b] - 1, the new
      token the last of them (positions past it are never read); None = L - offsets[b]. Read on the
      device only, so a step with it can be replayed from a CUDA graph as the cache grows.
    num_warps / num_stages: launch options of the split kernel (loads in flight per program).
    blocks_per_tile: selected blocks gathered into one key tile (1, 2 or 4; a power of two; > 1 needs
      block_n == block_size); fused_merge: the last split to finish merges (one launch instead of two);
      defaults: DECODE_DEFAULTS.
    Returns out [B, Hq, 1, d] in q's dtype.
    """
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"q must be [B, Hq, 1, d], got {tuple(q.shape)}")
    bsz, hq, _, d = q.shape
    if k.dim() != 4 or k.shape != v.shape or k.shape[0] != bsz or k.shape[3] != d:
        raise ValueError(f"k/v shape {tuple(k.shape)}/{tuple(v.shape)} does not match q {tuple(q.shape)}")
    hkv, seq_len = k.shape[1], k.shape[2]
    check_common_inputs(q, k, v, block_size)
    idx = as_int32(indices, q.device, "indices")
    cnt = as_int32(counts, q.device, "counts")
    off = as_int32(offsets, q.device, "offsets")
    lens = off if lengths is None else as_int32(lengths, q.device, "lengths")
    if lens.shape != (bsz,):
        raise ValueError(f"lengths {tuple(lens.shape)} does not match batch {bsz}")
    per_head = idx.dim() == 3
    if (idx.dim() not in (2, 3) or idx.shape[0] != bsz or (per_head and idx.shape[1] != hkv)
            or cnt.shape != (bsz,) or off.shape != (bsz,)):
        raise ValueError(f"indices {tuple(idx.shape)}, counts {tuple(cnt.shape)}, offsets {tuple(off.shape)} "
                         f"do not match batch {bsz} (indices [B, max_count] or [B, Hkv={hkv}, max_count])")
    max_count = idx.shape[-1]
    # A shared selection reads the same row for every KV head: head stride 0.
    idx_strides = (idx.stride(0), idx.stride(1), idx.stride(2)) if per_head else (idx.stride(0), 0, idx.stride(1))
    splits = num_splits or default_num_splits(bsz, hkv, max_count, q.device, block_size)
    splits = max(1, int(splits))
    group = hq // hkv
    bn = block_n or min(block_size, 64)
    if block_size % bn or bn < 16:
        raise ValueError(f"block_n={bn} must divide block_size={block_size} and be >= 16")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must match q: {tuple(q.shape)} {q.dtype} {q.device}")
    if bsz == 0:
        return out
    bpt = DECODE_DEFAULTS["blocks_per_tile"] if blocks_per_tile is None else int(blocks_per_tile)
    if bpt < 1 or bpt != next_pow2(bpt) or (bpt > 1 and bn != block_size):
        raise ValueError(f"blocks_per_tile = {bpt}: must be a power of two >= 1, and 1 unless block_n == block_size")
    split_kernel, merge_kernel = _build()
    direct = splits == 1
    fused = (DECODE_DEFAULTS["fused_merge"] if fused_merge is None else bool(fused_merge)) and not direct
    done = _done_counters(q.device, bsz * hkv) if fused else None
    fused = done is not None
    # One fp32 workspace holds all partials (one allocation): m, l [B, Hq, S] then acc [B, Hq, S, d].
    nrow = bsz * hq * splits
    ws = out if direct else torch.empty(nrow * (d + 2), device=q.device, dtype=torch.float32)
    m_part, l_part, a_part = (ws, ws, ws) if direct else (ws[:nrow], ws[nrow:2 * nrow], ws[2 * nrow:])
    split_kernel[(splits, bsz * hkv)](
        q, k, v, idx, cnt, off, lens, m_part, l_part, a_part, out, done if fused else cnt,
        q.stride(0), q.stride(1), q.stride(3), out.stride(0), out.stride(1), out.stride(3),
        *k.stride(), *v.stride(), *idx_strides,
        seq_len, hkv, hq, splits, float(scale) * LOG2E,
        GROUP=group, GROUP_PAD=max(16, next_pow2(group)), BLOCK_SIZE=block_size, BLOCK_N=bn, HEAD_DIM=d,
        INPUT_PRECISION=dot_precision(q.dtype), DIRECT=direct, HAS_LENS=lengths is not None,
        BLOCKS_PER_TILE=bpt, FUSED_MERGE=fused, GROUP_P2=next_pow2(group), MERGE_CHUNK=MERGE_CHUNK,
        num_warps=num_warps or DECODE_DEFAULTS["num_warps"], num_stages=num_stages or DECODE_DEFAULTS["num_stages"])
    if not direct and not fused:
        merge_kernel[(bsz * hq,)](
            m_part, l_part, a_part, out, out.stride(0), out.stride(1), out.stride(3), hq, splits,
            SPLITS_PAD=max(2, next_pow2(splits)), HEAD_DIM=d, num_warps=4)
    return out
