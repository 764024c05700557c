"""Block scores of the baseline selectors (`SketchWalkConfig.selector` other than `sketchwalk`).

Each baseline only replaces the score matrix that `BlockSelector` ranks: the forced sink/local
blocks and the τ/density rule stay the same, so every baseline keeps exactly as many blocks per
row as Sketch&Walk and the measured density matches by construction. None uses the walk.
  oracle:    the exact dense softmax mass each query block puts on each key block (the upper
             bound of any block selector at that density);
  random:    a counter-based hash of (seed, layer, row, column): uniform-looking, reproducible,
             and the same for a row in prefill and in decode;
  streaming: the block index, so the most recent blocks win (StreamingLLM: sink + recent window).
"""
from __future__ import annotations

import torch

from ..config import SketchWalkConfig
from .scores import compute_dtype

# Budget for the logits of one oracle chunk ([Hq, chunk queries, keys], fp32; the softmax needs as
# much again). A chunk holds at least one query block: 8K tokens x 9 heads at B = 64 fit 14 blocks
# per chunk; 128K x 32 heads take one block per chunk, ~1 GiB, beyond the budget but bounded.
ORACLE_CHUNK_BYTES = 256 * 1024 ** 2

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def prefill_scores(q: torch.Tensor, k: torch.Tensor, cfg: SketchWalkConfig, layer: int, scale: float) -> torch.Tensor:
    """Scores of every query-block row of a prefill: q: [Hq, m, d], k: [Hkv, m, d] -> [nb, nb] (nb = ceil(m / B)),
    [Hkv, nb, nb] for the per-KV-head oracle."""
    nb = -(-k.shape[-2] // cfg.block_size)
    return _scores(q, k, cfg, layer, scale, torch.arange(nb, device=k.device), nb)


def decode_scores(q: torch.Tensor, k: torch.Tensor, cfg: SketchWalkConfig, layer: int, scale: float) -> torch.Tensor:
    """Scores of the current query-block row of a decode step: q: [Hq, 1, d] (the token at position
    m-1), k: [Hkv, m, d] (the cache, real tokens) -> [1, i+1], i = (m-1) // B ([Hkv, 1, i+1] for the
    per-KV-head oracle)."""
    nb = -(-k.shape[-2] // cfg.block_size)
    return _scores(q, k, cfg, layer, scale, torch.arange(nb - 1, nb, device=k.device), nb)


def batched_decode_scores(q: torch.Tensor, k: torch.Tensor, offsets: torch.Tensor, blocks: torch.Tensor, cap: int,
                          cfg: SketchWalkConfig, layer: int, scale: float) -> torch.Tensor:
    """Scores of every sequence's current row in a left-padded decode step: [B, cap] (fp32, fp64 for fp64);
    [B, Hkv, cap] for the per-KV-head oracle.

    q: [B, Hq, 1, d]; k: [B, Hkv, kv_len, d] the cache, sequence b's real keys from offsets[b]
    (offsets: [B] int device tensor); blocks: [B] i_b, the current query block of each sequence;
    cap: block columns (>= i_b + 1). Column j <= i_b holds what `decode_scores` gives sequence b
    alone; columns past i_b are left for the selection to mask. Oracle values equal the
    per-sequence ones up to summation order.
    """
    bsz, hq, _, d = q.shape
    cols = torch.arange(cap, device=k.device)
    # Per-KV-head oracle scores are [B, Hkv, cap]; the other selectors share theirs (validated in the config).
    if cfg.selector == "random":
        return random_scores(cfg.seed, layer, blocks, cols)
    if cfg.selector == "streaming":
        return cols.to(torch.float32).expand(bsz, cap)
    if cfg.selector != "oracle":
        raise ValueError(f"selector {cfg.selector!r} has no baseline scores (sketchwalk scores come from the walk)")
    dt = compute_dtype(q.dtype)
    hkv, kv_len = k.shape[1], k.shape[-2]
    qg = q.to(dt).view(bsz, hkv, hq // hkv, 1, d)
    logits = torch.matmul(qg, k.to(dt)[:, :, None].transpose(-1, -2))[:, :, :, 0] * scale  # [B, Hkv, g, kv_len]
    pos = torch.arange(kv_len, device=k.device)
    rel = pos[None, :] - offsets.long()[:, None]  # position in the sequence's real tokens (< 0: padding)
    logits = logits.masked_fill((rel < 0)[:, None, None], float("-inf"))
    if cfg.per_kv_head:  # [B, Hkv, kv_len], summed over each group's query heads
        probs = torch.softmax(logits, dim=-1).sum(2)
        cols_of = (rel.clamp_min(0) // cfg.block_size)[:, None].expand(bsz, hkv, kv_len)
        return probs.new_zeros(bsz, hkv, cap).scatter_add_(2, cols_of, probs) / (hq // hkv)
    probs = torch.softmax(logits, dim=-1).sum((1, 2))  # [B, kv_len], summed over heads
    out = probs.new_zeros(bsz, cap).scatter_add_(1, rel.clamp_min(0) // cfg.block_size, probs)
    return out / hq


def _scores(q, k, cfg: SketchWalkConfig, layer: int, scale: float, rows: torch.Tensor, nb: int) -> torch.Tensor:
    if cfg.selector == "oracle":
        mass = block_attention_mass(q, k, scale, cfg.block_size, q_start=k.shape[-2] - q.shape[-2],
                                    per_kv_head=cfg.per_kv_head)
        return mass  # [rows, nb], or [Hkv, rows, nb] per KV head
    cols = torch.arange(nb, device=k.device)
    if cfg.selector == "random":
        return random_scores(cfg.seed, layer, rows, cols)
    if cfg.selector == "streaming":
        return cols.to(torch.float32).expand(rows.shape[0], nb)
    raise ValueError(f"selector {cfg.selector!r} has no baseline scores (sketchwalk scores come from the walk)")


def block_attention_mass(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int, q_start: int = 0,
                         chunk_bytes: int = ORACLE_CHUNK_BYTES, per_kv_head: bool = False) -> torch.Tensor:
    """Exact dense block attention mass, averaged over query heads and over the queries of each block.
    per_kv_head: averaged over each GQA group's query heads instead, [Hkv, rows, nb].

    q: [Hq, nq, d] queries at positions q_start .. q_start+nq-1; k: [Hkv, m, d] keys at positions
    0 .. m-1 (GQA: query head h reads KV head h // (Hq / Hkv)); scale: softmax scale.
    Returns [rows, nb] in the compute dtype (fp32, fp64 for fp64 inputs), nb = ceil(m / B), one row per
    query block from q_start's block to the last query's: entry [r, j] = mean over heads and over the
    given queries t of that block of sum over keys s in block j, s <= t, of softmax_s(scale * q_t . k_s).
    Each row sums to 1 (causal mass only). Computed in chunks of whole query blocks so that the
    logits of one chunk stay within `chunk_bytes`: memory is O(chunk), not O(nq * m).
    """
    hq, nq, d = q.shape
    hkv, m = k.shape[0], k.shape[-2]
    B = block_size
    dt = compute_dtype(q.dtype)
    nb = -(-m // B)
    first_block, last_block = q_start // B, (q_start + nq - 1) // B
    out = torch.zeros(*((hkv,) if per_kv_head else ()), last_block - first_block + 1, nb, dtype=dt, device=q.device)
    qg = q.to(dt).view(hkv, hq // hkv, nq, d)  # query heads grouped by their KV head: no repeated K
    kd = k.to(dt)
    blocks_per_chunk = max(1, chunk_bytes // max(1, 4 * hq * B * m))
    for b0 in range(first_block, last_block + 1, blocks_per_chunk):
        b1 = min(b0 + blocks_per_chunk, last_block + 1)
        t0, t1 = max(b0 * B, q_start), min(b1 * B, q_start + nq)  # absolute query positions [t0, t1)
        keys = t1  # keys after the chunk's last query are masked for all of it: skip them
        logits = torch.matmul(qg[:, :, t0 - q_start:t1 - q_start], kd[:, None, :keys].transpose(-1, -2)) * scale
        q_pos = torch.arange(t0, t1, device=q.device)
        k_pos = torch.arange(keys, device=q.device)
        logits = logits.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1)  # [Hkv, g, t1 - t0, keys]
        probs = probs.sum(1) if per_kv_head else probs.sum((0, 1))[None]  # [Hkv or 1, t1 - t0, keys]
        per_block = probs.new_zeros(probs.shape[0], b1 - b0, keys).index_add_(1, q_pos // B - b0, probs)
        nkb = -(-keys // B)
        per_block = torch.nn.functional.pad(per_block, (0, nkb * B - keys)).view(-1, b1 - b0, nkb, B).sum(-1)
        out[..., b0 - first_block:b1 - first_block, :nkb] = per_block if per_kv_head else per_block[0]
    counts = query_block_sizes(q_start, nq, B, q.device).to(dt)
    return out / (counts[:, None] * (hq // hkv if per_kv_head else hq))


def query_block_sizes(q_start: int, nq: int, block_size: int, device=None) -> torch.Tensor:
    """Queries per block row for queries at positions q_start .. q_start+nq-1: [rows] int64 on `device`."""
    B = block_size
    first, last = q_start // B, (q_start + nq - 1) // B
    starts = torch.arange(first, last + 1, device=device) * B
    return (torch.clamp(starts + B, max=q_start + nq) - torch.clamp(starts, min=q_start)).long()


def random_scores(seed: int, layer: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Uniform-looking scores in [0, 2^24) from a hash of (seed, layer, row, column): [len(rows), len(cols)] fp32.

    A hash rather than a generator: one vectorised call on the device, reproducible across runs
    and devices, and a row's scores do not depend on how many rows are drawn, so decode step
    selections of block row i equal the prefill's row i. Values are 24-bit (exact in fp32).
    """
    key = _mix32(_mix32(((seed ^ (seed >> 32)) + _GOLDEN) & _M32) ^ (layer & _M32))
    h = _mix32(_mix32(rows.long()[:, None] ^ key) ^ cols.long()[None, :])
    return (h >> 8).to(torch.float32)


def _mix32(h):
    """A 32-bit integer finaliser (xor-shift-multiply, after murmur3's fmix32) on ints or int64 tensors
    holding 32-bit values. Both multipliers are odd and < 2^31, so no product leaves int64."""
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _M32
    h = h ^ (h >> 15)
    h = (h * 0x2C1B3C6D) & _M32
    return h ^ (h >> 16)
