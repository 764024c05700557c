"""The Sketch&Walk method on the CPU: dense equivalence, selection invariants, SRHT, walk, decode, phases,
gradients, low precision and the density report.

Every expected value is computed in the test from first principles (explicit softmax attention, brute-force
block scores, explicit matrix products); the code under test is only used for the thing being tested.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from sketchwalk.config import SketchWalkConfig
from sketchwalk.method import (BlockSelection, SketchWalkRuntime, block_means, fwht, group_features, select_blocks,
                               sketch_features, sparse_attention, srht, transition_rows, walk_update)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------

def rand(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def ref_attention(q, k, v, scale, q_pos=None, allowed=None):
    """Explicit softmax attention for one sequence. q: [Hq, nq, d]; k, v: [Hkv, nk, d].

    Causal by real position (key j visible to query at position p iff j <= p), GQA via repeat_interleave,
    `allowed`: optional extra bool mask [nq, nk].
    """
    hq, nq, _ = q.shape
    hkv, nk, _ = k.shape
    if q_pos is None:
        q_pos = torch.arange(nk - nq, nk)
    k = k.double().repeat_interleave(hq // hkv, dim=0)
    v = v.double().repeat_interleave(hq // hkv, dim=0)
    s = torch.einsum("hqd,hkd->hqk", q.double(), k) * scale
    mask = torch.arange(nk)[None, :] <= q_pos[:, None]
    if allowed is not None:
        mask = mask & allowed
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.exp(s - s.amax(-1, keepdim=True))
    p = p / p.sum(-1, keepdim=True)
    return torch.einsum("hqk,hkd->hqd", p, v)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def ref_block_means(x: torch.Tensor, B: int) -> torch.Tensor:
    """x: [n, d] -> [ceil(n/B), d], each block averaged over its real tokens (python loop)."""
    n = x.shape[0]
    return torch.stack([x[j:min(j + B, n)].mean(0) for j in range(0, n, B)])


def ref_softmax_rows(scores: np.ndarray, rows: list[int], s: float) -> np.ndarray:
    """W rows: softmax(s * scores[r, :row+1]) per row, zeros beyond the causal limit."""
    out = np.zeros_like(scores)
    for r, i in enumerate(rows):
        z = s * scores[r, : i + 1]
        e = np.exp(z - z.max())
        out[r, : i + 1] = e / e.sum()
    return out


def ref_transition(q, k, cfg: SketchWalkConfig, layer: int) -> np.ndarray:
    """Full W [nb, nb] of one sequence from raw heads q: [Hq, n, d], k: [Hkv, n, d] (mean_qk aggregation)."""
    d = q.shape[-1]
    qf, kf = q.double().mean(0), k.double().mean(0)
    qm, km = ref_block_means(qf, cfg.block_size), ref_block_means(kf, cfg.block_size)
    if cfg.sketch == "hadamard":
        qm, km = srht(qm, cfg.sketch_dim, cfg.seed, layer), srht(km, cfg.sketch_dim, cfg.seed, layer)
    scores = (qm @ km.T).numpy() / math.sqrt(d)
    return ref_softmax_rows(scores, list(range(qm.shape[0])), cfg.sparsity_exponent)


def ref_walk(ws: list[np.ndarray], cfg: SketchWalkConfig) -> list[np.ndarray]:
    """R^k per sparse layer from the list of W^k (explicit loops)."""
    out, r = [], None
    for w in ws:
        if r is None or cfg.walk == "none":
            r = w.copy()
        elif cfg.walk == "product":
            r = r @ w
        else:
            state = r
            for _ in range(cfg.degree):
                state = (1 - cfg.damping) * w + cfg.damping * (state @ w)
            r = state
        out.append(r)
    return out


def ref_tau(cfg: SketchWalkConfig, n_causal: int) -> int:
    if cfg.top_k is not None:
        return cfg.top_k
    return max(1, math.ceil(Fraction(str(cfg.density)) * n_causal))


def sel_rows(sel: BlockSelection) -> list[list[int]]:
    return [sel.indices[r, : int(sel.counts[r])].tolist() for r in range(sel.indices.shape[0])]


def free_choices(sel: BlockSelection, cfg: SketchWalkConfig) -> int:
    """Rows whose selection involved a real choice: more non-forced causal candidates than free slots > 0."""
    n = 0
    for i, row in zip(sel.row_blocks.tolist(), sel_rows(sel)):
        forced = {j for j in range(i + 1) if j < cfg.sink_blocks or j > i - cfg.local_blocks}
        slots = len(row) - len(forced)
        n += 0 < slots < i + 1 - len(forced)
    return n


def block_allowed(sel: BlockSelection, q_pos: torch.Tensor, nk: int) -> torch.Tensor:
    """[nq, nk] bool: key token j allowed for query at q_pos iff j's block is in the query block's row."""
    B = sel.block_size
    rows = {int(rb): set(r) for rb, r in zip(sel.row_blocks.tolist(), sel_rows(sel))}
    allowed = torch.zeros(len(q_pos), nk, dtype=torch.bool)
    for a, p in enumerate(q_pos.tolist()):
        for j in range(nk):
            allowed[a, j] = (j // B) in rows[p // B]
    return allowed


def run_layers(cfg, qs, ks, vs, key_valid=None, runtime=None):
    rt = runtime or SketchWalkRuntime(cfg)
    rt.keep_selections = True
    outs = [rt.attention(l, q, k, v, key_valid, q.shape[-1] ** -0.5) for l, (q, k, v) in enumerate(zip(qs, ks, vs))]
    return outs, rt


# --------------------------------------------------------------------------------------
# Dense equivalence when τ covers every causal block
# --------------------------------------------------------------------------------------

DENSE_SHAPES = [
    # (batch, Hq, Hkv, n, d, block)
    (1, 4, 4, 64, 16, 16),
    (1, 4, 4, 50, 16, 16),     # ragged last block
    (1, 6, 2, 77, 16, 16),     # GQA, ragged
    (2, 6, 2, 100, 32, 32),    # batch, GQA, ragged
    (1, 2, 1, 15, 8, 16),      # a single partial block
    (1, 3, 3, 129, 16, 64),
]


@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=[str(s) for s in DENSE_SHAPES])
@pytest.mark.parametrize("budget", [{"top_k": 1000}, {"density": 1.0}])
@pytest.mark.parametrize("walk", ["product", "damped"])
def test_full_budget_equals_dense_causal(shape, budget, walk):
    bsz, hq, hkv, n, d, B = shape
    cfg = SketchWalkConfig(block_size=B, sketch_dim=min(8, d), skip_layers=1, walk=walk, **budget)
    layers = 3
    qs = [rand(bsz, hq, n, d, seed=10 * l + 1) for l in range(layers)]
    ks = [rand(bsz, hkv, n, d, seed=10 * l + 2) for l in range(layers)]
    vs = [rand(bsz, hkv, n, d, seed=10 * l + 3) for l in range(layers)]
    outs, rt = run_layers(cfg, qs, ks, vs)
    for l in range(layers):
        assert outs[l].dtype == torch.float32 and outs[l].shape == (bsz, hq, n, d)
        for b in range(bsz):
            ref = ref_attention(qs[l][b], ks[l][b], vs[l][b], d ** -0.5)
            assert rel_err(outs[l][b], ref) <= 1e-5, (l, b)
    nb = -(-n // B)
    for l in range(1, layers):
        for b in range(bsz):
            sel = rt.last_selection[l][b]
            assert sel_rows(sel) == [list(range(i + 1)) for i in range(nb)]
    rep = rt.density()
    assert rep.overall["prefill"] == 1.0


@pytest.mark.parametrize("budget", [{"density": 1.0}, {"top_k": 2}, {"density": 0.3}])
def test_left_padded_batch_matches_unpadded(budget):
    """Padded query rows give zeros; real rows equal the unpadded sequence run alone, selections too.

    Padded K/V hold NaN and huge values: if any padded key were selected or attended the output would not be finite.
    """
    B, hq, hkv, d = 16, 6, 2, 16
    lens = [90, 53, 16, 1]
    n = max(lens)
    cfg = SketchWalkConfig(block_size=B, sketch_dim=8, skip_layers=1, **budget)
    layers = 3
    seqs = [[(rand(hq, L, d, seed=100 * b + 10 * l), rand(hkv, L, d, seed=100 * b + 10 * l + 1),
              rand(hkv, L, d, seed=100 * b + 10 * l + 2)) for l in range(layers)] for b, L in enumerate(lens)]
    qs, ks, vs = [], [], []
    for l in range(layers):
        q = torch.full((len(lens), hq, n, d), float("nan"))
        k = torch.full((len(lens), hkv, n, d), 1e30)
        v = torch.full((len(lens), hkv, n, d), float("nan"))
        k[1] = float("nan")
        for b, L in enumerate(lens):
            q[b, :, n - L:], k[b, :, n - L:], v[b, :, n - L:] = seqs[b][l]
        qs.append(q), ks.append(k), vs.append(v)
    key_valid = torch.stack([torch.arange(n) >= n - L for L in lens])
    outs, rt = run_layers(cfg, qs, ks, vs, key_valid)
    for b, L in enumerate(lens):
        solo, rt_solo = run_layers(cfg, [s[0][None] for s in seqs[b]], [s[1][None] for s in seqs[b]],
                                   [s[2][None] for s in seqs[b]])
        for l in range(layers):
            assert torch.isfinite(outs[l][b]).all()
            assert torch.equal(outs[l][b, :, : n - L], torch.zeros(hq, n - L, d))
            assert rel_err(outs[l][b, :, n - L:], solo[l][0]) <= 1e-6
            if l >= cfg.skip_layers:
                sel, sel_solo = rt.last_selection[l][b], rt_solo.last_selection[l][0]
                assert sel_rows(sel) == sel_rows(sel_solo)
                assert int(sel.indices.max()) < -(-L // B)  # block indices follow real positions
    if "top_k" in budget:  # genuinely sparse for the long rows
        assert rt.density().sparse_layers["prefill"] < 1.0


def test_sparse_output_equals_masked_dense_reference():
    """Prefill output = explicit attention restricted to the selected blocks, with token causality inside."""
    B, hq, hkv, n, d = 16, 6, 2, 107, 16
    for cfg in (SketchWalkConfig(block_size=B, sketch_dim=8, top_k=3, skip_layers=0),
                SketchWalkConfig(block_size=B, sketch_dim=16, density=0.4, skip_layers=1, sink_blocks=2,
                                 local_blocks=2, walk="damped")):
        qs = [rand(1, hq, n, d, seed=l) for l in range(3)]
        ks = [rand(1, hkv, n, d, seed=10 + l) for l in range(3)]
        vs = [rand(1, hkv, n, d, seed=20 + l) for l in range(3)]
        outs, rt = run_layers(cfg, qs, ks, vs)
        for l in range(cfg.skip_layers, 3):
            sel = rt.last_selection[l][0]
            pos = torch.arange(n)
            ref = ref_attention(qs[l][0], ks[l][0], vs[l][0], d ** -0.5, allowed=block_allowed(sel, pos, n))
            assert rel_err(outs[l][0], ref) <= 1e-5
            # and it is not the dense output (the selection really drops blocks)
            assert rel_err(outs[l][0], ref_attention(qs[l][0], ks[l][0], vs[l][0], d ** -0.5)) > 1e-3


# --------------------------------------------------------------------------------------
# Selection invariants
# --------------------------------------------------------------------------------------

def _random_selection_cases(count: int):
    rng = np.random.default_rng(2024)
    for case in range(count):
        b = int(rng.integers(1, 24))
        nrows = int(rng.integers(1, b + 1))
        row_blocks = np.sort(rng.choice(b, size=nrows, replace=False))
        if rng.random() < 0.5:
            budget = {"top_k": int(rng.integers(1, 8))}
        else:
            budget = {"density": float(rng.choice([0.05, 0.1, 0.2, 0.3, 0.25, 0.5, 0.7, 1.0]))}
        cfg = SketchWalkConfig(block_size=16, sketch_dim=8, sink_blocks=int(rng.integers(0, 3)),
                               local_blocks=int(rng.integers(1, 4)), **budget)
        kind = rng.integers(0, 3)
        if kind == 0:
            scores = rng.standard_normal((nrows, b))
        elif kind == 1:  # probability rows like the walk produces, with exact zeros
            scores = rng.random((nrows, b)) * (rng.random((nrows, b)) < 0.6)
        else:  # heavy ties
            scores = rng.integers(0, 3, size=(nrows, b)).astype(float)
        yield case, cfg, torch.tensor(scores), torch.tensor(row_blocks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_selection_invariants_random(dtype):
    for case, cfg, scores, row_blocks in _random_selection_cases(400):
        scores = scores.to(dtype)
        sel = select_blocks(scores, row_blocks, cfg)
        assert sel.indices.dtype == torch.int64 and sel.counts.dtype == torch.int64
        assert torch.equal(sel.row_blocks, row_blocks)
        assert sel.block_size == cfg.block_size
        assert sel.indices.shape[1] == int(sel.counts.max())
        for r, i in enumerate(row_blocks.tolist()):
            n_causal = i + 1
            forced = {j for j in range(n_causal) if j < cfg.sink_blocks or j > i - cfg.local_blocks}
            expected_count = min(n_causal, max(ref_tau(cfg, n_causal), len(forced)))
            cnt = int(sel.counts[r])
            assert cnt == expected_count, (case, r)
            row = sel.indices[r].tolist()
            valid, rest = row[:cnt], row[cnt:]
            assert all(x == -1 for x in rest), (case, r, row)
            assert all(a < b for a, b in zip(valid, valid[1:])), (case, r, row)  # strictly ascending
            assert all(0 <= x <= i for x in valid), (case, r, row)  # causal, no future blocks
            assert forced <= set(valid), (case, r, forced, valid)  # sinks and locals always present
            # the free slots hold the highest-scoring remaining causal blocks (ties -> lower index)
            free = [j for j in range(n_causal) if j not in forced]
            ranked = sorted(free, key=lambda j: (-float(scores[r, j]), j))
            n_free = cnt - len(forced)
            assert set(valid) - forced == set(ranked[:n_free]), (case, r)
        # helpers agree with the indices
        mask = sel.dense_block_mask(scores.shape[1])
        assert torch.equal(mask.sum(-1), sel.counts)
        assert int(sel.selected_pairs()) == int(sel.counts.sum())
        assert int(sel.causal_pairs()) == int((row_blocks + 1).sum())


def test_selection_ties_go_to_lower_block_and_short_rows_are_dense():
    cfg = SketchWalkConfig(top_k=3, sink_blocks=0, local_blocks=1)
    sel = select_blocks(torch.zeros(3, 10), torch.tensor([1, 2, 9]), cfg)
    assert sel_rows(sel) == [[0, 1], [0, 1, 2], [0, 1, 9]]
    assert sel.indices[0].tolist() == [0, 1, -1]
    # the walk's future columns are ignored even if they score highest
    scores = torch.zeros(1, 6)
    scores[0, 5] = scores[0, 4] = 100.0
    scores[0, 2] = 1.0
    sel = select_blocks(scores, torch.tensor([3]), SketchWalkConfig(top_k=2, sink_blocks=0, local_blocks=1))
    assert sel_rows(sel) == [[2, 3]]


def test_runtime_selections_satisfy_invariants():
    """Selections recorded by the runtime (prefill, many seeds, configs) obey the same contract."""
    rng = np.random.default_rng(7)
    for trial in range(12):
        B = int(rng.choice([16, 32]))
        n = int(rng.integers(1, 8 * B))
        budget = {"top_k": int(rng.integers(1, 5))} if trial % 2 else {"density": float(rng.choice([0.2, 0.5]))}
        cfg = SketchWalkConfig(block_size=B, sketch_dim=8, skip_layers=0, sink_blocks=int(rng.integers(0, 3)),
                               local_blocks=int(rng.integers(1, 4)), walk=str(rng.choice(["product", "damped", "none"])),
                               **budget)
        qs = [rand(1, 4, n, 16, seed=trial * 10 + l) for l in range(2)]
        ks = [rand(1, 2, n, 16, seed=trial * 10 + l + 5) for l in range(2)]
        _, rt = run_layers(cfg, qs, ks, ks)
        nb = -(-n // B)
        for l in range(2):
            sel = rt.last_selection[l][0]
            assert sel.row_blocks.tolist() == list(range(nb))
            for i, row in enumerate(sel_rows(sel)):
                forced = {j for j in range(i + 1) if j < cfg.sink_blocks or j > i - cfg.local_blocks}
                assert len(row) == min(i + 1, max(ref_tau(cfg, i + 1), len(forced)))
                assert forced <= set(row) and all(0 <= j <= i for j in row) and row == sorted(set(row))
                assert all(x == -1 for x in sel.indices[i, len(row):].tolist())


# --------------------------------------------------------------------------------------
# Sketches: block means, FWHT, SRHT, exact block scores
# --------------------------------------------------------------------------------------

def test_block_means_partial_last_block():
    x = rand(3, 37, 5, seed=0, dtype=torch.float64)
    got = block_means(x, 16)
    assert got.shape == (3, 3, 5)
    for h in range(3):
        assert torch.allclose(got[h], ref_block_means(x[h], 16), atol=1e-12)
    assert torch.allclose(got[0, 2], x[0, 32:].mean(0))  # 5 real tokens, not 16


def _hadamard(p: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(p)


@pytest.mark.parametrize("p", [1, 2, 8, 64, 128])
def test_fwht_is_orthonormal_hadamard(p):
    x = rand(4, 3, p, seed=p, dtype=torch.float64)
    y = fwht(x)
    assert torch.allclose(y, x @ _hadamard(p).T, atol=1e-12)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-12)
    assert torch.allclose(fwht(y), x, atol=1e-12)


def test_fwht_rejects_non_power_of_two():
    with pytest.raises(ValueError):
        fwht(torch.zeros(3, 12))


@pytest.mark.parametrize("d,r", [(64, 8), (48, 16), (16, 4)])
def test_srht_inner_products_unbiased_over_seeds(d, r):
    x = rand(d, seed=1, dtype=torch.float64)
    z = 0.6 * x + rand(d, seed=2, dtype=torch.float64)  # correlated, so x.z is far from 0
    true = float(x @ z)
    seeds = 1500
    xz = torch.stack([x, z])
    sk = [srht(xz, r, s, 0) for s in range(seeds)]
    est = np.array([float(y[0] @ y[1]) for y in sk])
    norms = np.array([float(y[0] @ y[0]) for y in sk])
    se = est.std(ddof=1) / math.sqrt(seeds)
    assert se > 0
    assert abs(est.mean() - true) < 4 * se, (est.mean(), true, se)
    se_n = norms.std(ddof=1) / math.sqrt(seeds)
    assert abs(norms.mean() - float(x @ x)) < 4 * se_n
    # a single sketch is an estimate, not the exact value
    assert np.mean(np.abs(est - true) > 1e-6 * abs(true)) > 0.9
    # shape and per-(seed, layer) determinism
    y = srht(x, r, 5, 2)
    assert y.shape == (r,) and torch.equal(y, srht(x, r, 5, 2))
    assert not torch.allclose(srht(x, r, 5, 2), srht(x, r, 5, 3))


def test_srht_full_dim_is_orthogonal():
    """With r = d (a power of two) nothing is subsampled: the SRHT is an orthogonal map."""
    x = rand(7, 32, seed=3, dtype=torch.float64)
    y = srht(x, 32, seed=11, layer_idx=4)
    assert torch.allclose(y @ y.T, x @ x.T, atol=1e-10)


def test_exact_sketchblock_logits_match_definition():
    """sketch=exact: W = softmax over causal blocks of s * (brute-force mean of q.k/sqrt(d) over the block pair)."""
    B, hq, hkv, n, d = 16, 6, 2, 71, 16
    q = rand(hq, n, d, seed=4, dtype=torch.float64)
    k = rand(hkv, n, d, seed=5, dtype=torch.float64)
    cfg = SketchWalkConfig(block_size=B, sketch="exact", sparsity_exponent=3.0, top_k=2)
    qf, kf = group_features(q, k, cfg)
    # mean_qk: K averaged over KV heads == the GQA-repeated K averaged over query heads
    assert torch.allclose(kf[0], k.repeat_interleave(hq // hkv, 0).mean(0), atol=1e-12)
    assert torch.allclose(qf[0], q.mean(0), atol=1e-12)
    nb = -(-n // B)
    qa, ka = q.mean(0), k.mean(0)
    brute = np.zeros((nb, nb))
    for i in range(nb):
        for j in range(nb):
            qi, kj = qa[i * B:(i + 1) * B], ka[j * B:(j + 1) * B]
            brute[i, j] = float((qi @ kj.T).mean()) / math.sqrt(d)  # all token pairs of the block pair
    expected = ref_softmax_rows(brute, list(range(nb)), cfg.sparsity_exponent)
    rows = torch.arange(nb)
    w = transition_rows(sketch_features(block_means(qf, B), cfg, 0), sketch_features(block_means(kf, B), cfg, 0),
                        rows, d, cfg)
    assert w.shape == (nb, nb)
    assert np.allclose(w.numpy(), expected, atol=1e-12)
    # subset of rows (as decode uses)
    w2 = transition_rows(sketch_features(block_means(qf, B)[:, [1, 4]], cfg, 0),
                         sketch_features(block_means(kf, B), cfg, 0), torch.tensor([1, 4]), d, cfg)
    assert np.allclose(w2.numpy(), expected[[1, 4]], atol=1e-12)
    # Hadamard with r = d is orthogonal, so it reproduces the exact scores
    had = cfg.replace(sketch="hadamard", sketch_dim=d)
    w3 = transition_rows(sketch_features(block_means(qf, B), had, 2), sketch_features(block_means(kf, B), had, 2),
                         rows, d, had)
    assert np.allclose(w3.numpy(), expected, atol=1e-10)
    # and with r < d it is an estimate (differs)
    est = cfg.replace(sketch="hadamard", sketch_dim=4)
    w4 = transition_rows(sketch_features(block_means(qf, B), est, 2), sketch_features(block_means(kf, B), est, 2),
                         rows, d, est)
    assert not np.allclose(w4.numpy(), expected, atol=1e-3)


def test_sum_probs_transition_is_mean_of_per_head_softmax():
    B, hq, hkv, n, d = 16, 4, 2, 60, 8
    q = rand(hq, n, d, seed=6, dtype=torch.float64)
    k = rand(hkv, n, d, seed=7, dtype=torch.float64)
    cfg = SketchWalkConfig(block_size=B, sketch="exact", head_aggregation="sum_probs", sparsity_exponent=2.0)
    qf, kf = group_features(q, k, cfg)
    assert qf.shape == (hq, n, d) and kf.shape == (hq, n, d)
    nb = -(-n // B)
    per_head = []
    for h in range(hq):
        qm, km = ref_block_means(q[h], B), ref_block_means(k[h // (hq // hkv)], B)
        per_head.append(ref_softmax_rows((qm @ km.T).numpy() / math.sqrt(d), list(range(nb)), 2.0))
    expected = np.mean(per_head, axis=0)
    w = transition_rows(block_means(qf, B), block_means(kf, B), torch.arange(nb), d, cfg)
    assert np.allclose(w.numpy(), expected, atol=1e-12)


# --------------------------------------------------------------------------------------
# The walk
# --------------------------------------------------------------------------------------

def _random_ws(layers: int, nb: int, seed: int) -> list[torch.Tensor]:
    cfg = SketchWalkConfig(sketch="exact", sparsity_exponent=2.0)
    out = []
    for l in range(layers):
        qm, km = rand(1, nb, 8, seed=seed + 2 * l, dtype=torch.float64), rand(1, nb, 8, seed=seed + 2 * l + 1,
                                                                               dtype=torch.float64)
        out.append(transition_rows(qm, km, torch.arange(nb), 8, cfg))
    return out


@pytest.mark.parametrize("walk,damping,degree", [("product", 0.25, 3), ("damped", 0.25, 3), ("damped", 0.6, 1),
                                                 ("damped", 0.0, 2), ("none", 0.25, 3)])
def test_walk_matches_explicit_formula_and_stays_stochastic(walk, damping, degree):
    nb, layers = 9, 6
    cfg = SketchWalkConfig(walk=walk, damping=damping, degree=degree)
    ws = _random_ws(layers, nb, seed=123)
    expected = ref_walk([w.numpy() for w in ws], cfg)
    rows = torch.arange(nb)
    r = None
    for l, w in enumerate(ws):
        r = walk_update(r, w, rows, cfg)
        assert np.allclose(r.numpy(), expected[l], atol=1e-12), l
        assert torch.allclose(r.sum(-1), torch.ones(nb, dtype=r.dtype), atol=1e-6)
        assert (r >= 0).all()
        assert torch.equal(torch.triu(r, diagonal=1), torch.zeros_like(r))  # lower-triangular
    if walk == "product" or (walk == "damped" and damping > 0):
        assert not np.allclose(expected[-1], ws[-1].numpy())  # the walk mixes layers
    else:  # no walk, or damping 0: R^k = W^k
        assert np.allclose(expected[-1], ws[-1].numpy())


@pytest.mark.parametrize("walk", ["product", "damped"])
def test_walk_single_row_equals_row_of_full_walk(walk):
    """Decode advances only the current row: it must equal that row of the full prefill walk."""
    nb = 8
    cfg = SketchWalkConfig(walk=walk)
    ws = _random_ws(4, nb, seed=5)
    full, row = None, None
    sel_row = torch.tensor([5])
    for w in ws:
        full = walk_update(full, w, torch.arange(nb), cfg)
        row = walk_update(row, w, sel_row, cfg)
        assert torch.allclose(row[0], full[5], atol=1e-12)


@pytest.mark.parametrize("walk", ["product", "damped", "none"])
@pytest.mark.parametrize("sketch", ["exact", "hadamard"])
def test_runtime_selection_follows_explicit_walk(walk, sketch):
    """Runtime selections = select_blocks(R^k) with W and R^k computed explicitly in the test."""
    B, hq, hkv, n, d, layers = 16, 4, 2, 150, 16, 5
    cfg = SketchWalkConfig(block_size=B, sketch_dim=8, top_k=3, skip_layers=2, walk=walk, sketch=sketch,
                           sparsity_exponent=4.0)
    qs = [rand(1, hq, n, d, seed=300 + l, dtype=torch.float64) for l in range(layers)]
    ks = [rand(1, hkv, n, d, seed=400 + l, dtype=torch.float64) for l in range(layers)]
    vs = [rand(1, hkv, n, d, seed=500 + l, dtype=torch.float64) for l in range(layers)]
    _, rt = run_layers(cfg, qs, ks, vs)
    ws = [ref_transition(qs[l][0], ks[l][0], cfg, l) for l in range(cfg.skip_layers, layers)]
    rs = ref_walk(ws, cfg)
    nb = -(-n // B)
    differs_from_w = False
    for idx, l in enumerate(range(cfg.skip_layers, layers)):
        expected = select_blocks(torch.tensor(rs[idx]), torch.arange(nb), cfg)
        got = rt.last_selection[l][0]
        assert sel_rows(got) == sel_rows(expected), l
        alone = select_blocks(torch.tensor(ws[idx]), torch.arange(nb), cfg)
        differs_from_w |= sel_rows(alone) != sel_rows(got)
    for l in range(cfg.skip_layers):
        assert rt.last_selection[l][0] is None  # skipped layers select nothing
    # "none" selects from W alone; the walks (here) change some selection
    assert differs_from_w == (walk != "none")


def test_walk_resets_per_forward_pass():
    """A second prefill (new sequence) does not continue the first one's walk."""
    B, n, d = 16, 96, 16
    cfg = SketchWalkConfig(block_size=B, sketch_dim=8, top_k=3, skip_layers=1)
    qa = [rand(1, 2, n, d, seed=l) for l in range(4)]
    qb = [rand(1, 2, n, d, seed=50 + l) for l in range(4)]
    rt = SketchWalkRuntime(cfg)
    run_layers(cfg, qa, qa, qa, runtime=rt)
    outs, rt = run_layers(cfg, qb, qb, qb, runtime=rt)
    fresh, rt2 = run_layers(cfg, qb, qb, qb)
    for l in range(4):
        assert torch.equal(outs[l], fresh[l])
        if l >= 1:
            assert sel_rows(rt.last_selection[l][0]) == sel_rows(rt2.last_selection[l][0])
            assert free_choices(rt.last_selection[l][0], cfg) > 0


# --------------------------------------------------------------------------------------
# Decode
# --------------------------------------------------------------------------------------

def _decode_inputs(layers, hq, hkv, N, d, seed, dtype=torch.float64):
    qs = [rand(1, hq, N, d, seed=seed + 3 * l, dtype=dtype) for l in range(layers)]
    ks = [rand(1, hkv, N, d, seed=seed + 3 * l + 1, dtype=dtype) for l in range(layers)]
    vs = [rand(1, hkv, N, d, seed=seed + 3 * l + 2, dtype=dtype) for l in range(layers)]
    return qs, ks, vs


def _run_decode(cfg, qs, ks, vs, n0, T):
    """Prefill n0 tokens, then T single-token decode steps; returns per step (outs [layers], selections)."""
    rt = SketchWalkRuntime(cfg)
    rt.keep_selections = True
    d = qs[0].shape[-1]
    layers = len(qs)
    pre = [rt.attention(l, qs[l][:, :, :n0], ks[l][:, :, :n0], vs[l][:, :, :n0], None, d ** -0.5)
           for l in range(layers)]
    steps = []
    for t in range(n0, n0 + T):
        outs, sels = [], []
        for l in range(layers):
            o = rt.attention(l, qs[l][:, :, t:t + 1], ks[l][:, :, :t + 1], vs[l][:, :, :t + 1], None, d ** -0.5)
            assert o.shape == (1, qs[l].shape[1], 1, d)
            outs.append(o[0, :, 0])
            sels.append(rt.last_selection[l][0])
        steps.append((t, outs, sels))
    return pre, steps, rt


_BM_PRODUCT = SketchWalkConfig(block_size=16, sketch_dim=8, top_k=3, skip_layers=1, decode_query="block_mean")
_BM_DAMPED = SketchWalkConfig(block_size=16, sketch_dim=8, density=0.5, skip_layers=1, decode_query="block_mean",
                              walk="damped", local_blocks=1)
_BM_SUM_PROBS = SketchWalkConfig(block_size=16, sketch_dim=16, top_k=3, skip_layers=0, decode_query="block_mean",
                                 head_aggregation="sum_probs", local_blocks=2, sink_blocks=0)
_BM_EXACT_NONE = SketchWalkConfig(block_size=16, sketch="exact", top_k=4, skip_layers=2, decode_query="block_mean",
                                  walk="none")
_BM_SUB_BLOCKS = SketchWalkConfig(block_size=16, sketch_dim=8, top_k=3, skip_layers=1, decode_query="block_mean",
                                  score_block_size=4)
_BM_TOKEN_KEYS = SketchWalkConfig(block_size=16, sketch_dim=8, top_k=3, skip_layers=1, decode_query="block_mean",
                                  score_block_size=1, head_aggregation="sum_probs", walk="none")


# n0 = 40: the prefill ends inside a block; n0 = 64: it ends exactly on a block boundary.
@pytest.mark.parametrize("n0", [40, 64])
@pytest.mark.parametrize("cfg", [_BM_PRODUCT, _BM_DAMPED, _BM_SUM_PROBS, _BM_EXACT_NONE, _BM_SUB_BLOCKS,
                                 _BM_TOKEN_KEYS],
                         ids=["product-topk", "damped-density", "sum_probs", "exact-none", "sub-blocks", "token-keys"])
def test_decode_block_mean_matches_from_scratch_prefill(cfg, n0):
    layers, hq, hkv, d, T = 4, 4, 2, 16, 38  # crosses two block boundaries
    N = n0 + T
    qs, ks, vs = _decode_inputs(layers, hq, hkv, N, d, seed=n0)
    _, steps, rt = _run_decode(cfg, qs, ks, vs, n0, T)
    sparse_seen = False
    for t, outs, sels in steps:
        ref_outs, ref_rt = run_layers(cfg, [q[:, :, :t + 1] for q in qs], [k[:, :, :t + 1] for k in ks],
                                      [v[:, :, :t + 1] for v in vs])
        i = t // cfg.block_size
        for l in range(layers):
            assert torch.allclose(outs[l], ref_outs[l][0, :, -1], atol=1e-12, rtol=1e-10), (t, l)
            if l < cfg.skip_layers:
                assert sels[l] is None
                continue
            assert sels[l].row_blocks.tolist() == [i]
            expected = sel_rows(ref_rt.last_selection[l][0])[-1]
            assert sel_rows(sels[l]) == [expected], (t, l)
            sparse_seen |= free_choices(sels[l], cfg) > 0
    assert sparse_seen
    dec = rt.density().per_layer["decode"]
    assert all(dec[l] == 1.0 for l in range(cfg.skip_layers))
    assert rt.density().sparse_layers["decode"] < 1.0


def _ref_decode_selection(cfg, qs, ks, t, current_query):
    """Selection for the decode step of token t: W rows computed here (earlier rows from block means, the
    current row from `current_query(qf_layer, t)`), explicit walk, select_blocks."""
    B = cfg.block_size
    i = t // B
    d = qs[0].shape[-1]
    r = None
    sels = {}
    for l in range(cfg.skip_layers, len(qs)):
        qf = qs[l][0].double().mean(0)[: t + 1]
        kf = ks[l][0].double().mean(0)[: t + 1]
        km = ref_block_means(kf, B)  # includes the current partial block
        qrows = [qf[j * B:(j + 1) * B].mean(0) for j in range(i)] + [current_query(qf, t)]
        qm = torch.stack(qrows)
        if cfg.sketch == "hadamard":
            qm, km = srht(qm, cfg.sketch_dim, cfg.seed, l), srht(km, cfg.sketch_dim, cfg.seed, l)
        w = ref_softmax_rows((qm @ km.T).numpy() / math.sqrt(d), list(range(i + 1)), cfg.sparsity_exponent)
        r = ref_walk([w], cfg)[0][i] if r is None else ref_walk_row(r, w, cfg)
        sels[l] = select_blocks(torch.tensor(r)[None], torch.tensor([i]), cfg)
    return sels


def ref_walk_row(r, w, cfg):
    if cfg.walk == "none":
        return w[-1]
    if cfg.walk == "product":
        return r @ w
    state = r
    for _ in range(cfg.degree):
        state = (1 - cfg.damping) * w[-1] + cfg.damping * (state @ w)
    return state


@pytest.mark.parametrize("mode,window", [("token", 32), ("window", 5), ("window", 24), ("block_mean", 32)])
@pytest.mark.parametrize("walk", ["product", "damped"])
def test_decode_current_row_query(mode, window, walk):
    layers, hq, hkv, d, n0, T = 4, 4, 2, 16, 37, 29  # tokens 37..65: crosses 48 and 64
    cfg = SketchWalkConfig(block_size=16, sketch_dim=8, top_k=3, skip_layers=1, decode_query=mode,
                           decode_window=window, walk=walk)
    qs, ks, vs = _decode_inputs(layers, hq, hkv, n0 + T, d, seed=77)
    if mode == "token":
        current = lambda qf, t: qf[t]  # noqa: E731
    elif mode == "window":
        current = lambda qf, t: qf[max(0, t - window + 1): t + 1].mean(0)  # noqa: E731
    else:
        current = lambda qf, t: qf[(t // 16) * 16: t + 1].mean(0)  # noqa: E731
    _, steps, _ = _run_decode(cfg, qs, ks, vs, n0, T)
    sparse_seen = 0
    for t, outs, sels in steps:
        expected = _ref_decode_selection(cfg, qs, ks, t, current)
        for l in range(cfg.skip_layers, layers):
            assert sel_rows(sels[l]) == sel_rows(expected[l]), (t, l)
            sparse_seen += free_choices(sels[l], cfg)
            # output = explicit attention of the token over its selected blocks
            allowed = block_allowed(sels[l], torch.tensor([t]), t + 1)
            ref = ref_attention(qs[l][0, :, t:t + 1], ks[l][0, :, :t + 1], vs[l][0, :, :t + 1], d ** -0.5,
                                q_pos=torch.tensor([t]), allowed=allowed)
            assert torch.allclose(outs[l], ref[:, 0], atol=1e-12)
        for l in range(cfg.skip_layers):  # dense layers
            ref = ref_attention(qs[l][0, :, t:t + 1], ks[l][0, :, :t + 1], vs[l][0, :, :t + 1], d ** -0.5)
            assert torch.allclose(outs[l], ref[:, 0], atol=1e-12)
    assert sparse_seen > 0


def test_decode_query_modes_differ():
    """token / window / block_mean drive different current rows (so the options are not silently equal)."""
    layers, n0, T = 3, 40, 20
    qs, ks, vs = _decode_inputs(layers, 4, 2, n0 + T, 16, seed=3)
    results = {}
    for mode in ("token", "window", "block_mean"):
        cfg = SketchWalkConfig(block_size=16, sketch_dim=8, top_k=2, skip_layers=0, decode_query=mode,
                               decode_window=4, sparsity_exponent=1.0, sink_blocks=0)
        _, steps, _ = _run_decode(cfg, qs, ks, vs, n0, T)
        results[mode] = [[sel_rows(s) for s in sels] for _, _, sels in steps]
    assert results["token"] != results["block_mean"] or results["window"] != results["block_mean"]


def test_decode_left_padded_batch_matches_unpadded():
    cfg = SketchWalkConfig(block_size=16, sketch_dim=8, top_k=3, skip_layers=1, decode_query="token")
    layers, hq, hkv, d, T = 3, 4, 2, 16, 20
    lens0 = [45, 30]
    n0 = max(lens0)
    seqs = [_decode_inputs(layers, hq, hkv, L + T, d, seed=900 + b) for b, L in enumerate(lens0)]
    # batched tensors, left padded by n0 - L0 (padding stays a prefix during decode)
    qs, ks, vs = [], [], []
    for l in range(layers):
        q = torch.full((2, hq, n0 + T, d), float("nan"), dtype=torch.float64)
        k = torch.full((2, hkv, n0 + T, d), float("nan"), dtype=torch.float64)
        v = torch.full((2, hkv, n0 + T, d), float("nan"), dtype=torch.float64)
        for b, L in enumerate(lens0):
            q[b, :, n0 - L:] = seqs[b][0][l][0]
            k[b, :, n0 - L:] = seqs[b][1][l][0]
            v[b, :, n0 - L:] = seqs[b][2][l][0]
        qs.append(q), ks.append(k), vs.append(v)
    rt = SketchWalkRuntime(cfg)
    rt.keep_selections = True
    valid = torch.stack([torch.arange(n0 + T) >= n0 - L for L in lens0])
    for l in range(layers):
        rt.attention(l, qs[l][:, :, :n0], ks[l][:, :, :n0], vs[l][:, :, :n0], valid[:, :n0], d ** -0.5)
    solo = [_run_decode(cfg, *seqs[b], lens0[b], T)[1] for b in range(2)]
    choices = 0
    for step in range(T):
        t = n0 + step
        for l in range(layers):
            o = rt.attention(l, qs[l][:, :, t:t + 1], ks[l][:, :, :t + 1], vs[l][:, :, :t + 1], valid[:, :t + 1],
                             d ** -0.5)
            for b in range(2):
                _, souts, ssels = solo[b][step]
                assert torch.allclose(o[b, :, 0], souts[l], atol=1e-12), (step, l, b)
                if l >= cfg.skip_layers:
                    assert sel_rows(rt.last_selection[l][b]) == sel_rows(ssels[l])
                    choices += free_choices(ssels[l], cfg)
    assert choices > 0


def test_decode_without_prefill_and_unsupported_shapes_raise():
    cfg = SketchWalkConfig(block_size=16, sketch_dim=8, top_k=2, skip_layers=0)
    q = rand(1, 2, 20, 8, seed=0)
    rt = SketchWalkRuntime(cfg)
    with pytest.raises(RuntimeError, match="prefill"):
        rt.attention(0, q[:, :, -1:], q, q, None, 0.3)
    with pytest.raises(NotImplementedError):
        rt.attention(0, q[:, :, -5:], q, q, None, 0.3)  # chunked prefill
    right_pad = torch.ones(1, 20, dtype=torch.bool)
    right_pad[0, -3:] = False
    with pytest.raises(ValueError, match="left padding"):
        rt.attention(0, q, q, q, right_pad, 0.3)


# --------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------

def test_phase_prefill_only_decode_is_dense():
    layers, hq, hkv, d, n0, T = 3, 4, 2, 16, 70, 20
    cfg = SketchWalkConfig(block_size=16, sketch_dim=8, top_k=2, skip_layers=1, phases="prefill")
    qs, ks, vs = _decode_inputs(layers, hq, hkv, n0 + T, d, seed=11)
    pre, steps, rt = _run_decode(cfg, qs, ks, vs, n0, T)
    for t, outs, sels in steps:
        for l in range(layers):
            ref = ref_attention(qs[l][0, :, t:t + 1], ks[l][0, :, :t + 1], vs[l][0, :, :t + 1], d ** -0.5)
            assert torch.allclose(outs[l], ref[:, 0], atol=1e-12)
            assert sels[l] is None
    rep = rt.density()
    assert rep.overall["decode"] == 1.0 and rep.dense_layer_share["decode"] == 1.0
    assert rep.sparse_layers["prefill"] < 1.0
    # prefill was sparse: not equal to dense
    assert rel_err(pre[2][0], ref_attention(qs[2][0, :, :n0], ks[2][0, :, :n0], vs[2][0, :, :n0], d ** -0.5)) > 1e-3


@pytest.mark.parametrize("decode_query", ["block_mean", "token"])
def test_phase_decode_only_prefill_is_dense_decode_sparse_and_consistent(decode_query):
    layers, hq, hkv, d, n0, T = 3, 4, 2, 16, 70, 30
    cfg = SketchWalkConfig(block_size=16, sketch_dim=8, top_k=3, skip_layers=1, phases="decode",
                           decode_query=decode_query)
    both = cfg.replace(phases="both")
    qs, ks, vs = _decode_inputs(layers, hq, hkv, n0 + T, d, seed=12)
    pre, steps, rt = _run_decode(cfg, qs, ks, vs, n0, T)
    _, steps_both, _ = _run_decode(both, qs, ks, vs, n0, T)
    for l in range(layers):
        ref = ref_attention(qs[l][0, :, :n0], ks[l][0, :, :n0], vs[l][0, :, :n0], d ** -0.5)
        assert rel_err(pre[l][0], ref) <= 1e-12
    rep = rt.density()
    assert rep.overall["prefill"] == 1.0 and rep.dense_layer_share["prefill"] == 1.0
    assert rep.sparse_layers["decode"] < 1.0
    assert sum(free_choices(sels[l], cfg) for _, _, sels in steps for l in range(1, layers)) > 0
    for (t, outs, sels), (_, outs_b, sels_b) in zip(steps, steps_both):
        for l in range(cfg.skip_layers, layers):
            # the decode walk only uses decode-state rows: same as with a sparse prefill
            assert sel_rows(sels[l]) == sel_rows(sels_b[l])
            assert torch.allclose(outs[l], outs_b[l], atol=1e-12)
        if decode_query == "block_mean":
            _, ref_rt = run_layers(both, [q[:, :, :t + 1] for q in qs], [k[:, :, :t + 1] for k in ks],
                                   [v[:, :, :t + 1] for v in vs])
            for l in range(cfg.skip_layers, layers):
                assert sel_rows(sels[l])[0] == sel_rows(ref_rt.last_selection[l][0])[-1]


# --------------------------------------------------------------------------------------
# Gradients and low precision
# --------------------------------------------------------------------------------------

def test_gradcheck_sparse_attention():
    B, n, d = 16, 48, 2
    cfg = SketchWalkConfig(block_size=B, sketch_dim=2, top_k=2, skip_layers=0, sink_blocks=0)
    q = rand(1, 2, n, d, seed=21, dtype=torch.float64).requires_grad_()
    k = rand(1, 1, n, d, seed=22, dtype=torch.float64).requires_grad_()
    v = rand(1, 1, n, d, seed=23, dtype=torch.float64).requires_grad_()

    def f(q_, k_, v_):
        return SketchWalkRuntime(cfg).attention(0, q_, k_, v_, None, d ** -0.5)

    rt = SketchWalkRuntime(cfg)
    rt.keep_selections = True
    rt.attention(0, q.detach(), k.detach(), v.detach(), None, d ** -0.5)
    sel = rt.last_selection[0][0]
    assert sel.counts.tolist() == [1, 2, 2]  # truly sparse: row 2 keeps its diagonal + the better of blocks 0, 1
    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6)
    # no gradient flows into values of blocks the row did not select
    out = f(q, k, v)
    out[:, :, 2 * B:].sum().backward()
    kept = set(sel_rows(sel)[2])
    for j in range(3):
        g = v.grad[0, 0, j * B:(j + 1) * B]
        assert (g.abs().sum() > 0) == (j in kept), j


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_fp32_same_selection(dtype):
    B, hq, hkv, n, d = 32, 4, 2, 200, 32
    cfg = SketchWalkConfig(block_size=B, sketch_dim=16, top_k=3, skip_layers=0)
    qs = [rand(1, hq, n, d, seed=31 + l) for l in range(2)]
    ks = [rand(1, hkv, n, d, seed=41 + l) for l in range(2)]
    vs = [rand(1, hkv, n, d, seed=51 + l) for l in range(2)]
    ref, rt32 = run_layers(cfg, qs, ks, vs)
    low, rtl = run_layers(cfg, [x.to(dtype) for x in qs], [x.to(dtype) for x in ks], [x.to(dtype) for x in vs])
    for l in range(2):
        assert low[l].dtype == dtype
        assert torch.isfinite(low[l]).all()
        assert rel_err(low[l].float(), ref[l]) < 2e-2
        assert sel_rows(rtl.last_selection[l][0]) == sel_rows(rt32.last_selection[l][0])
    assert rt32.density().overall["prefill"] < 1.0


# --------------------------------------------------------------------------------------
# Density report
# --------------------------------------------------------------------------------------

def test_density_report_matches_selections():
    B, hq, hkv, d, layers = 16, 4, 2, 16, 4
    lens = [150, 70]
    n = max(lens)
    cfg = SketchWalkConfig(block_size=B, sketch_dim=8, density=0.3, skip_layers=1)
    qs = [rand(2, hq, n, d, seed=60 + l) for l in range(layers)]
    ks = [rand(2, hkv, n, d, seed=70 + l) for l in range(layers)]
    valid = torch.stack([torch.arange(n) >= n - L for L in lens])
    _, rt = run_layers(cfg, qs, ks, ks, key_valid=valid)
    rep = rt.density()
    causal = sum(nb * (nb + 1) // 2 for nb in (-(-L // B) for L in lens))  # computed from the lengths
    tot_sel, tot_causal = 0, 0
    for l in range(layers):
        if l < cfg.skip_layers:
            assert rep.per_layer["prefill"][l] == 1.0
            sel_pairs = causal
        else:
            sel_pairs = sum(sum(len(r) for r in sel_rows(rt.last_selection[l][b])) for b in range(2))
            assert rep.per_layer["prefill"][l] == pytest.approx(sel_pairs / causal, abs=1e-12)
            assert rep.per_layer["prefill"][l] < 1.0
        tot_sel += sel_pairs
        tot_causal += causal
    sparse_sel = tot_sel - causal * cfg.skip_layers
    assert rep.overall["prefill"] == pytest.approx(tot_sel / tot_causal, abs=1e-12)
    assert rep.sparse_layers["prefill"] == pytest.approx(sparse_sel / (causal * (layers - cfg.skip_layers)), abs=1e-12)
    assert rep.dense_layer_share["prefill"] == pytest.approx(cfg.skip_layers / layers)
    assert rep.per_layer["decode"] == {} and math.isnan(rep.overall["decode"])
    # density 0.3 target: each sparse row keeps ceil(0.3 * causal) blocks, at least the forced ones
    expected = sum(min(i + 1, max(ref_tau(cfg, i + 1), 2 if i >= 1 else 1)) for L in lens for i in range(-(-L // B)))
    assert rep.sparse_layers["prefill"] == pytest.approx(expected / causal, abs=1e-12)
    rt.reset_stats()
    assert rt.density().per_layer["prefill"] == {} and rt.last_selection == {}


def test_density_report_decode_counts():
    layers, n0, T = 3, 50, 30
    cfg = SketchWalkConfig(block_size=16, sketch_dim=8, top_k=2, skip_layers=1)
    qs, ks, vs = _decode_inputs(layers, 4, 2, n0 + T, 16, seed=5)
    _, steps, rt = _run_decode(cfg, qs, ks, vs, n0, T)
    rep = rt.density()
    causal = sum(t // 16 + 1 for t in range(n0, n0 + T))
    for l in range(layers):
        if l < cfg.skip_layers:
            assert rep.per_layer["decode"][l] == 1.0
        else:
            sel = sum(len(sel_rows(s[2][l])[0]) for s in steps)
            assert rep.per_layer["decode"][l] == pytest.approx(sel / causal, abs=1e-12)
            assert sel == sum(min(t // 16 + 1, 2) for t in range(n0, n0 + T))
    assert rep.dense_layer_share["decode"] == pytest.approx(1 / 3)


def test_sparse_attention_helper_dense_when_no_selection():
    q, k, v = rand(4, 33, 8, seed=1), rand(2, 33, 8, seed=2), rand(2, 33, 8, seed=3)
    out = sparse_attention(q, k, v, torch.arange(33), None, 0.35)
    assert rel_err(out, ref_attention(q, k, v, 0.35)) <= 1e-5


def test_subblock_logits_are_log_sum_exp_of_sub_block_means():
    """score_block_size: W[i, j] = sum over j's key sub-blocks u of softmax_u(s * q̄_i·k̄_u / sqrt(d)) over
    every causal sub-block (exact sketch, mean_qk), computed here by hand; a needle-like key that one
    block mean dilutes wins its block a higher W than under the paper's block-mean score."""
    B, Bs, d, n = 16, 4, 8, 56  # 4 blocks, the last one partial (8 tokens: 2 real sub-blocks)
    cfg = SketchWalkConfig(block_size=B, sketch="exact", score_block_size=Bs, sparsity_exponent=2.0)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(1, n, d, generator=g, dtype=torch.float64)
    qf, kf = group_features(q, k, cfg)
    qm, km = block_means(qf, B), block_means(kf, Bs)
    w = transition_rows(qm, km, torch.arange(4), d, cfg)
    for i in range(4):
        causal_u = [u for u in range(km.shape[1]) if u // (B // Bs) <= i]
        logits = torch.stack([cfg.sparsity_exponent * (qm[0, i] @ km[0, u]) / math.sqrt(d) for u in causal_u])
        p = torch.softmax(logits, 0)
        expected = torch.zeros(4, dtype=torch.float64)
        for u, pu in zip(causal_u, p):
            expected[u // (B // Bs)] += pu
        assert torch.allclose(w[i], expected, atol=1e-12), i
    # A block whose one sub-block matches the query strongly (the rest opposed) is diluted by its mean.
    q1 = torch.ones(1, n, d, dtype=torch.float64)
    k1 = torch.zeros(1, n, d, dtype=torch.float64)
    k1[0, 16:20] = 3.0   # block 1: one strong sub-block ...
    k1[0, 20:32] = -1.0  # ... whose mean the rest pulls to 0
    k1[0, 32:48] = 0.1   # block 2: mildly positive everywhere
    paper = cfg.replace(score_block_size=None)
    rows = torch.tensor([3])
    w_sub = transition_rows(block_means(q1, B)[:, 3:], block_means(k1, Bs), rows, d, cfg)[0]
    w_mean = transition_rows(block_means(q1, B)[:, 3:], block_means(k1, B), rows, d, paper)[0]
    assert w_sub[1] > w_sub[2] and w_mean[1] < w_mean[2]


# --------------------------------------------------------------------------------------
# dense_last_blocks: the last query-block rows of a prefill attend densely
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dense_last_blocks_rows_dense_counted_and_equal_to_reference(backend):
    """Left-padded batch of two lengths: each sequence's last `dense_last_blocks` rows hold every causal
    block, the other rows are what the paper's rule selects from the same scores, the density counters
    include the dense rows, and the output equals the reference attention over those selections."""
    if backend == "triton":
        pytest.importorskip("triton", reason="triton is not installed")
    B, hq, hkv, d, tail = 16, 4, 2, 16, 2
    lens = [150, 70]
    n = max(lens)
    cfg = SketchWalkConfig(block_size=B, sketch_dim=8, density=0.2, skip_layers=0, dense_last_blocks=tail)
    paper = cfg.replace(dense_last_blocks=0)
    qs = [rand(2, hq, n, d, seed=80 + l) for l in range(2)]
    ks = [rand(2, hkv, n, d, seed=90 + l) for l in range(2)]
    valid = torch.stack([torch.arange(n) >= n - L for L in lens])
    outs, rt = run_layers(cfg, qs, ks, ks, key_valid=valid, runtime=SketchWalkRuntime(cfg, backend=backend))
    _, rt_paper = run_layers(paper, qs, ks, ks, key_valid=valid, runtime=SketchWalkRuntime(paper, backend="torch"))
    selected = causal = 0
    for l in range(2):
        for b, L in enumerate(lens):
            nb = -(-L // B)
            rows, base = sel_rows(rt.last_selection[l][b]), sel_rows(rt_paper.last_selection[l][b])
            assert rows[nb - tail:] == [list(range(i + 1)) for i in range(nb - tail, nb)]
            assert rows[:nb - tail] == base[:nb - tail]  # same scores, same rule above the tail
            assert all(len(r) < i + 1 for i, r in enumerate(base[nb - tail:], nb - tail) if i >= 9)  # sparse there
            selected += sum(len(r) for r in rows)
            causal += nb * (nb + 1) // 2
            off = n - L
            pos = torch.arange(L)
            ref = sparse_attention(qs[l][b, :, off:], ks[l][b, :, off:], ks[l][b, :, off:], pos,
                                   rt.last_selection[l][b], d ** -0.5)
            torch.testing.assert_close(outs[l][b, :, off:], ref, atol=2e-5, rtol=1e-4)
    assert rt.density().overall["prefill"] == pytest.approx(selected / causal, abs=1e-12)
    assert rt.density().overall["prefill"] > rt_paper.density().overall["prefill"]
