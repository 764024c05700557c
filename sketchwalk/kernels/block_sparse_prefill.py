"""Block-sparse causal prefill attention (FlashAttention-2 style online softmax) in Triton.

Grid: (query tile, batch * Hkv). A program owns one KV head and BLOCK_M query rows taken from
the GQA group's query heads stacked head-major over one query block (row r of the tile is
query head `hkv*G + r // block_size`, token `r % block_size` of the block). Every selected
K/V tile is therefore loaded once for all the group's heads in the tile and reused, with no
repeat_kv copy. With G*block_size <= BLOCK_M the whole group shares one program; otherwise the
group is split into G*block_size/BLOCK_M tiles (BLOCK_M defaults to the largest power of two
<= 128 dividing G*block_size, so no rows are wasted).

Masking: selected blocks before the last one of a row are strictly below the diagonal (the
BlockSelection contract: ascending, causal, at most one entry per block), so they run without
any mask; only the last entry (the diagonal, or the ragged last block) applies the token-level
causal mask and the "key inside the real sequence" mask. Indices are read through the count,
never the -1 padding.

Left padding: sequence b has `offsets[b]` pad tokens first; real position p sits at tensor
position offsets[b] + p. Extra programs (beyond the query blocks) write zeros to the padded
query rows, so the output needs no pre-zeroing.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._triton import as_int32, check_common_inputs, dot_precision, interpreting, next_pow2, require_triton
from .block_sparse_prefill_hopper import hopper_unsupported, launch_hopper

_KERNEL = None
LOG2E = 1.4426950408889634


def _build():
    """Define the Triton kernel on first use (so TRITON_INTERPRET set before the first call is honoured)."""
    global _KERNEL, tl, _prefill_attend_block
    if _KERNEL is not None:
        return _KERNEL
    triton, tl = require_triton()

    # `global` above makes these module-level names, so the kernel finds the helper through its
    # globals (no closures, which older Triton versions cannot resolve).
    @triton.jit
    def _prefill_attend_block(acc, m_i, l_i, q, k_base, v_base, kb, off, n_real, qp,
                              stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
                              BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                              MASKED: tl.constexpr, INPUT_PRECISION: tl.constexpr):
        """Online-softmax update of (acc [M, D], m_i [M], l_i [M]) with key block `kb` (real-coordinate block index)."""
        kn = tl.arange(0, BLOCK_N)
        dcol = tl.arange(0, HEAD_DIM)
        for j in range(0, BLOCK_SIZE, BLOCK_N):
            kp = kb * BLOCK_SIZE + j + kn  # real key positions [N]
            kt = (off + kp).to(tl.int64)  # tensor positions
            if MASKED:
                k_ok = kp < n_real
                k = tl.load(k_base + kt[None, :] * stride_kn + dcol[:, None] * stride_kd, mask=k_ok[None, :], other=0.0)
                v = tl.load(v_base + kt[:, None] * stride_vn + dcol[None, :] * stride_vd, mask=k_ok[:, None], other=0.0)
            else:
                k = tl.load(k_base + kt[None, :] * stride_kn + dcol[:, None] * stride_kd)  # [D, N]: K^T
                v = tl.load(v_base + kt[:, None] * stride_vn + dcol[None, :] * stride_vd)  # [N, D]
            s = tl.dot(q, k, input_precision=INPUT_PRECISION) * qk_scale  # [M, N], log2 units
            if MASKED:
                ok = (kp[None, :] <= qp[:, None]) & (kp[None, :] < n_real)
                s = tl.where(ok, s, float("-inf"))
            # m_i starts finite (-1e30), so fully masked rows give p = 0 and alpha = 1, never NaN.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
            m_i = m_new
        return acc, m_i, l_i

    # Sizes that change with the prompt length are not specialised: Triton compiles a variant per
    # (value == 1, value % 16 == 0) pattern of its int arguments, so a timed prompt whose length
    # happened to be a multiple of 16 paid a fresh ~1 s compile (seen on the H200).
    @triton.jit(do_not_specialize=["N", "NQB", "stride_ib", "stride_ih", "stride_ir", "stride_cb"])
    def _prefill_kernel(Q, K, V, O, IDX, CNT, OFF,
                        stride_qb, stride_qh, stride_qn, stride_qd,
                        stride_kb, stride_kh, stride_kn, stride_kd,
                        stride_vb, stride_vh, stride_vn, stride_vd,
                        stride_ob, stride_oh, stride_on, stride_od,
                        stride_ib, stride_ih, stride_ir, stride_ic, stride_cb, stride_cr,
                        N, NQB, HKV, qk_scale,
                        GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, TILES: tl.constexpr,
                        INPUT_PRECISION: tl.constexpr):
        pid0 = tl.program_id(0)
        pid1 = tl.program_id(1)
        b = pid1 // HKV
        hkv = pid1 % HKV
        blk = pid0 // TILES  # < NQB: a query block (heaviest, i.e. latest, first); else a padding block
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
            # Zero the left-padded query rows: tensor positions [0, off) in chunks of BLOCK_SIZE.
            pos = (blk - NQB) * BLOCK_SIZE + qi
            ok = row_ok & (pos < off)
            tl.store(o_base + pos.to(tl.int64)[:, None] * stride_on,
                     tl.zeros([BLOCK_M, HEAD_DIM], dtype=O.dtype.element_ty), mask=ok[:, None])
        else:
            qrow = NQB - 1 - blk
            qp = qrow * BLOCK_SIZE + qi  # real query positions
            q_ok = row_ok & (qp < n_real)
            q_t = (off + qp).to(tl.int64)
            q = tl.load(Q + b64 * stride_qb + head[:, None] * stride_qh + q_t[:, None] * stride_qn
                        + dcol[None, :] * stride_qd, mask=q_ok[:, None], other=0.0)
            cnt = tl.load(CNT + b * stride_cb + qrow * stride_cr)
            idx_base = IDX + b * stride_ib + hkv * stride_ih + qrow * stride_ir
            k_base = K + b64 * stride_kb + hkv.to(tl.int64) * stride_kh
            v_base = V + b64 * stride_vb + hkv.to(tl.int64) * stride_vh
            m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
            # Entries 0 .. cnt-2 lie strictly below the diagonal: full blocks, no mask needed.
            for i in range(0, cnt - 1):
                kb = tl.load(idx_base + i * stride_ic)
                acc, m_i, l_i = _prefill_attend_block(
                    acc, m_i, l_i, q, k_base, v_base, kb, off, n_real, qp,
                    stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
                    BLOCK_SIZE, BLOCK_N, HEAD_DIM, False, INPUT_PRECISION)
            # The last entry (normally the diagonal block): causal + sequence-end masks.
            for i in range(tl.maximum(cnt - 1, 0), cnt):
                kb = tl.load(idx_base + i * stride_ic)
                acc, m_i, l_i = _prefill_attend_block(
                    acc, m_i, l_i, q, k_base, v_base, kb, off, n_real, qp,
                    stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
                    BLOCK_SIZE, BLOCK_N, HEAD_DIM, True, INPUT_PRECISION)
            # Rows that saw no key (count 0) have l = 0 and acc = 0: write zeros, not NaN.
            l_safe = tl.where(l_i > 0.0, l_i, 1.0)
            out = acc / l_safe[:, None]
            tl.store(o_base + q_t[:, None] * stride_on, out.to(O.dtype.element_ty), mask=q_ok[:, None])

    _KERNEL = _prefill_kernel
    return _KERNEL


def default_block_m(group: int, block_size: int) -> int:
    """Largest power of two <= 128 dividing group*block_size (>= 16): the query rows of one program."""
    rows = group * block_size
    bm = 128
    while bm > 16 and rows % bm:
        bm //= 2
    return bm


PATHS = ("auto", "hopper", "portable")


def prefill_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, path: str = "auto") -> str:
    """The kernel a prefill with these inputs runs: "hopper" (TMA, sm_90+) or "portable".

    q: [B, Hq, N, d]; k, v: [B, Hkv, N, d]. "auto" takes the Hopper path on a CUDA device of compute
    capability 9.x with fp16 / bf16 inputs and head_dim >= 128 (where it was measured faster: the
    Llama-3.1-8B shape), else the portable kernel (other GPUs, fp32, smaller heads, the interpreter). "hopper" forces it (under TRITON_INTERPRET=1 too, for the tests) and raises with
    the reason when the inputs cannot take it.
    """
    if path not in PATHS:
        raise ValueError(f"path = {path!r}: allowed {', '.join(PATHS)}")
    why = hopper_unsupported(q, k, v)
    if path == "hopper":
        if why:
            raise ValueError(f"path = 'hopper' cannot run these inputs: {why}")
        return "hopper"
    if path == "portable" or why or interpreting() or q.device.type != "cuda" or q.shape[-1] < AUTO_HOPPER_MIN_HEAD_DIM:
        return "portable"
    return "hopper" if torch.cuda.get_device_capability(q.device)[0] == 9 else "portable"


# Hopper-path launch defaults, chosen on an H200 by benchmarks/tune_hopper.py (results/kernels/README.md).
# At d=128, density 0.2, 32K-128K: 4 warps / 2 stages / one block per step ran 1.21-1.28x the portable
# kernel (471-497 TFLOP/s); 8 warps, 3-4 stages, pairs and whole-group 256-row tiles were all slower.
HOPPER_DEFAULTS = dict(num_warps=4, num_stages=2, pair=False)
AUTO_HOPPER_MIN_HEAD_DIM = 128


HOPPER_SMEM_BUDGET = 200 * 1024  # of the H200's 227 KB per block: room for the compiler's layout scratch


def hopper_stages(block_m: int, block_n: int, head_dim: int, elem_bytes: int) -> int:
    """Pipeline depth of the Hopper path: HOPPER_DEFAULTS' stages, fewer when that many K and V
    tiles (plus the Q tile and P's staging) would not fit in shared memory (128-token blocks at d=128)."""
    per_stage = 2 * block_n * head_dim * elem_bytes
    fixed = block_m * head_dim * elem_bytes + block_m * block_n * elem_bytes
    fits = max(1, (HOPPER_SMEM_BUDGET - fixed) // per_stage)
    return int(min(HOPPER_DEFAULTS["num_stages"], fits))


def block_sparse_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
                         counts: torch.Tensor, offsets, block_size: int, scale: float,
                         block_m: Optional[int] = None, block_n: Optional[int] = None,
                         num_warps: Optional[int] = None, num_stages: Optional[int] = None,
                         out: Optional[torch.Tensor] = None, offsets_host: Optional[list[int]] = None,
                         path: str = "auto", pair: Optional[bool] = None) -> torch.Tensor:
    """Causal attention of every query over its query block's selected key blocks.

    q: [B, Hq, N, d]; k, v: [B, Hkv, N, d] with Hq % Hkv == 0 (GQA group G = Hq/Hkv; no K/V copy);
    N is the padded tensor length; d a power of two in [16, 256] (64 and 128 are the targets);
    dtype fp16, bf16 or fp32 (accumulation is fp32; fp32 dots are exact IEEE, not TF32).
    indices: [B, nqb, max_count] int (cast to int32), per sequence and query block the selected
      key-block indices in real-token coordinates, ascending, unique, causal (<= the row), -1 padded
      (the BlockSelection contract; all entries but the last are read unmasked, so a violation reads
      out of range instead of raising); or [B, Hkv, nqb, max_count], one selection per KV head
      (`selection_heads: kv`: a group's query heads share their KV head's), with the same counts;
    counts: [B, nqb] number of valid entries per row (0 allowed: that row's outputs are zeros);
    offsets: [B] left-pad lengths: a list or a tensor; a tensor costs one device-to-host sync (the
      launcher sizes the grid from them) unless `offsets_host` gives the same values as host ints,
      and a list costs a host-to-device copy (so a call with a device tensor and `offsets_host`, as
      the runtime makes, does neither and can be captured in a CUDA graph); real position p of sequence b is tensor
      position offsets[b] + p, and block j covers real positions [j*block_size, (j+1)*block_size).
    nqb must be >= ceil((N - offsets[b]) / block_size) for every b (rows past a sequence's end are ignored).
    block_size: 16, 32, 64 or 128 tokens; scale: softmax scale (typically d**-0.5).
    block_m / block_n / num_warps / num_stages: tuning knobs (query rows per program, key
      tile within a block, launch options); defaults were tuned on an H200, per path.
    path: "auto" | "hopper" | "portable" (`prefill_path`): the TMA kernel of
      `block_sparse_prefill_hopper` or the portable one; both compute the same thing.
    pair: Hopper path only, two selected blocks per loop step (default HOPPER_DEFAULTS).
    out: optional preallocated output like q (written in full: every element, padding rows
      included, is overwritten; tests pass a NaN-filled buffer to prove it); any strides.
    q, k, v, out may have any strides (a transposed view of [B, N, H, d] is read in place).
    Returns out [B, Hq, N, d] in q's dtype, laid out like q (empty_like) unless given; left-padded
    query rows are zeros.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [B, H, N, d]")
    bsz, hq, n, d = q.shape
    hkv = k.shape[1]
    if k.shape != v.shape or k.shape[0] != bsz or k.shape[2] != n or k.shape[3] != d:
        raise ValueError(f"k/v shape {tuple(k.shape)}/{tuple(v.shape)} does not match q {tuple(q.shape)}")
    check_common_inputs(q, k, v, block_size)
    idx = as_int32(indices, q.device, "indices")
    cnt = as_int32(counts, q.device, "counts")
    off = as_int32(offsets, q.device, "offsets")
    per_head = idx.dim() == 4
    rows_shape = (idx.shape[0], idx.shape[-2]) if idx.dim() in (3, 4) else None
    if (idx.dim() not in (3, 4) or idx.shape[0] != bsz or (per_head and idx.shape[1] != hkv)
            or cnt.shape != rows_shape or off.shape != (bsz,)):
        raise ValueError(f"indices {tuple(idx.shape)}, counts {tuple(cnt.shape)}, offsets {tuple(off.shape)} "
                         f"do not match batch {bsz} (indices [B, nqb, max_count] or [B, Hkv={hkv}, nqb, max_count], "
                         f"counts [B, nqb])")
    nqb = idx.shape[-2]
    # A shared selection reads the same rows for every KV head: head stride 0.
    idx_strides = idx.stride() if per_head else (idx.stride(0), 0, idx.stride(1), idx.stride(2))
    if offsets_host is not None:
        off_host = list(offsets_host)
    else:
        off_host = offsets.tolist() if isinstance(offsets, torch.Tensor) else list(offsets)  # one sync at most
    need = max((-(-(n - o) // block_size) for o in off_host), default=0)
    if nqb < need:
        raise ValueError(f"indices has {nqb} query-block rows but a sequence needs {need}")
    group = hq // hkv
    kernel_path = prefill_path(q, k, v, path)
    bm = block_m or default_block_m(group, block_size)
    bn = block_n or (block_size if kernel_path == "hopper" else min(block_size, 64 if d > 64 else 128))
    if block_size % bn or bn < 16:
        raise ValueError(f"block_n={bn} must divide block_size={block_size} and be >= 16")
    if bm != next_pow2(bm) or bm < 16:
        raise ValueError(f"block_m must be a power of two >= 16, got {bm}")
    tiles = -(-group * block_size // bm)
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must match q: {tuple(q.shape)} {q.dtype} {q.device}")
    if n == 0 or bsz == 0:
        return out
    # Padding programs: enough blocks of block_size rows to zero the longest left padding.
    npad = -(-max(off_host, default=0) // block_size)
    if kernel_path == "hopper":
        launch_hopper(q, k.contiguous(), v.contiguous(), out, idx, cnt, off, idx_strides, nqb, npad, block_size,
                      float(scale) * LOG2E, bm, tiles, bn, num_warps or HOPPER_DEFAULTS["num_warps"],
                      num_stages or hopper_stages(bm, bn, d, q.element_size()),
                      HOPPER_DEFAULTS["pair"] if pair is None else bool(pair))
        return out
    kernel = _build()
    # Defaults from benchmarks/tune_kernels.py on an H200 (N=16K, density 0.2, block 64, bf16):
    # 4 warps won for both shapes; 3 stages for d=64 (G=3), 1 stage for d=128 (G=4), each within
    # ~5% of the next best. Re-tune for other GPUs / shapes.
    nw = num_warps or 4
    ns = num_stages or (3 if d <= 64 else 1)
    grid = ((nqb + npad) * tiles, bsz * hkv)
    kernel[grid](
        q, k, v, out, idx, cnt, off,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *idx_strides, *cnt.stride(),
        n, nqb, hkv, float(scale) * LOG2E,
        GROUP=group, BLOCK_SIZE=block_size, BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=d, TILES=tiles,
        INPUT_PRECISION=dot_precision(q.dtype), num_warps=nw, num_stages=ns)
    return out
