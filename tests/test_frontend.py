"""The optimised selection front end computes exactly what the straightforward method does.

`SketchWalkRuntime` caches counts, masks, sketched key means and the padding offsets, and avoids
device->host syncs. Here every selection it makes is compared, bit for bit, with a naive
recomputation from scratch at every step that uses only the method's building blocks
(`block_means`, `sketch_features`, `transition_rows`, `walk_update`, `select_blocks`) the way
method.md describes them: block sums in token order, W rebuilt whole for each decode step, the
walk row from R^{k-1}, `select_blocks` on it. Also: the analytic row counts equal measured ones,
the cached selector equals `select_blocks`, and no sync-inducing call happens per layer.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from sketchwalk.config import SketchWalkConfig
from sketchwalk.method import (SketchWalkRuntime, block_means, fwht, group_features, select_blocks, sketch_features,
                               sparse_attention, transition_rows, walk_update)
from sketchwalk.method.selection import BlockSelector, row_budget

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rand(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def rows_of(sel) -> list[list[int]]:
    return [sel.indices[r, : int(sel.counts[r])].tolist() for r in range(sel.indices.shape[0])]


def same_selection(a, b) -> bool:
    """Identical indices (incl. -1 padding), counts and rows, whatever the index dtype."""
    return (a.indices.shape == b.indices.shape and torch.equal(a.indices.long(), b.indices.long())
            and torch.equal(a.counts.long(), b.counts.long()) and torch.equal(a.row_blocks.long(), b.row_blocks.long()))


# --------------------------------------------------------------------------------------
# Analytic counts and the cached selector
# --------------------------------------------------------------------------------------

def _configs():
    for budget, sink, local in itertools.product(
            [{"top_k": 1}, {"top_k": 2}, {"top_k": 5}, {"density": 0.1}, {"density": 0.2}, {"density": 0.3},
             {"density": 0.55}, {"density": 1.0}], [0, 1, 3], [1, 2, 4]):
        yield SketchWalkConfig(block_size=16, sketch_dim=8, sink_blocks=sink, local_blocks=local, **budget)
    for budget, tail in itertools.product([{"top_k": 2}, {"density": 0.2}, {"density": 1.0}], [1, 3]):
        yield SketchWalkConfig(block_size=16, sketch_dim=8, dense_last_blocks=tail, **budget)
    # The release's structure: forced blocks sized by the sequence length, a budget over the free blocks.
    for budget, fractions, rule in itertools.product(
            [{"top_k": 2}, {"density": 0.125}, {"density": 0.3}],
            [{}, {"sink_fraction": 0.025, "local_fraction": 0.05}, {"local_fraction": 0.2}],
            ["causal", "free_quantile"]):
        yield SketchWalkConfig(block_size=16, sketch_dim=8, budget_rule=rule, **budget, **fractions)
    yield SketchWalkConfig(block_size=16, sketch_dim=8, density=0.125, sink_fraction=0.05, local_fraction=0.05,
                           budget_rule="free_quantile", dense_last_blocks=4)


def _tokens(nb: int, block_size: int = 16) -> int:
    """A sequence length that fills nb blocks, the last one partly (when nb > 1)."""
    return max(1, nb * block_size - (nb % 7))


def test_row_budget_equals_measured_counts():
    """count_i = min(i+1, max(τ_i, |forced_i|)) on the host equals select_blocks' measured counts."""
    for cfg in _configs():
        for nb in (1, 2, 3, 7, 16, 33, 100):
            n = _tokens(nb)
            sel = select_blocks(torch.zeros(nb, nb), torch.arange(nb), cfg, num_blocks=nb, n_tokens=n)
            measured = sel.counts.tolist()
            assert [row_budget(cfg, i, nb, n) for i in range(nb)] == measured, (cfg, nb)
            tail = range(max(0, nb - cfg.dense_last_blocks), nb)
            assert [measured[i] for i in tail] == [i + 1 for i in tail]  # the last rows are dense
            selector = BlockSelector(cfg)
            assert selector.pairs(nb, n) == sum(measured) == int(sel.selected_pairs())
            assert selector.max_count(nb, n) == sel.indices.shape[1]
            assert selector.prefill_counts(nb, "cpu", n_tokens=n).tolist() == measured
            if not cfg.dense_last_blocks:
                assert selector.counts(0, nb, "cpu", n_tokens=n).tolist() == measured


def _score_rows(rng, rows: int, b: int, kind: int) -> torch.Tensor:
    if kind == 0:
        return torch.tensor(rng.standard_normal((rows, b)))
    if kind == 1:  # probability rows like the walk's, with exact zeros
        return torch.tensor(rng.random((rows, b)) * (rng.random((rows, b)) < 0.6))
    return torch.tensor(rng.integers(0, 3, size=(rows, b)).astype(float))  # heavy ties


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_selector_equals_select_blocks(index_dtype):
    rng = np.random.default_rng(0)
    for n, cfg in enumerate(_configs()):
        selector = BlockSelector(cfg)
        for nb in (1, 2, 5, 17, 40):
            for dtype in (torch.float32, torch.float64):
                scores = _score_rows(rng, nb, nb, n % 3).to(dtype)
                ref = select_blocks(scores, torch.arange(nb), cfg, num_blocks=nb, n_tokens=_tokens(nb))
                got = selector.prefill(scores, index_dtype, _tokens(nb))
                assert got.indices.dtype == index_dtype and got.counts.dtype == index_dtype
                assert same_selection(got, ref), (cfg, nb)
                for i in range(nb):  # a decode row sees the row's causal columns (and maybe more)
                    width = i + 1 + int(rng.integers(0, 3))
                    row = _score_rows(rng, 1, width, n % 3).to(dtype)
                    m = i * 16 + 1 + int(rng.integers(0, 16))  # a cache whose last token is in block i
                    assert same_selection(selector.decode(row, i, index_dtype, m),
                                          select_blocks(row, torch.tensor([i]), cfg, n_tokens=m)), (cfg, i)


def test_release_structure_selects_what_the_release_rule_selects():
    """sink/local fractions + free_quantile + 4 dense last rows = the authors' release rule, written
    out independently: sink and window blocks from max(1, int(f * n)) tokens, the other causal
    blocks kept where their float32 score is strictly above the row's nanquantile(1 - density),
    the last 4 rows dense (distinct scores, so no ties)."""
    cfg = SketchWalkConfig(block_size=16, sketch_dim=8, density=0.125, sink_fraction=0.025, local_fraction=0.05,
                           budget_rule="free_quantile", dense_last_blocks=4)
    rng = np.random.default_rng(1)
    for n in (17, 300, 1000, 2047, 4100):
        nb = -(-n // 16)
        rw = torch.tensor(rng.permutation(nb * nb).reshape(nb, nb) / (nb * nb), dtype=torch.float32)
        win = max(1, -(-max(1, int(0.05 * n)) // 16))
        sink = max(1, -(-max(1, int(0.025 * n)) // 16))
        q, k = torch.arange(nb)[:, None], torch.arange(nb)[None, :]
        causal = k <= q
        exclude = causal & ((k < sink) | (k >= q - win + 1))
        masked = rw.masked_fill(~causal | exclude, float("nan"))
        th = torch.nanquantile(masked, 1 - 0.125, dim=-1, keepdim=True)
        th = torch.where(torch.isnan(th), torch.inf, th)  # a row with no free block keeps only its forced ones
        th[-4:] = -torch.inf
        release = causal & ((rw > th) | exclude)
        got = select_blocks(rw, torch.arange(nb), cfg, num_blocks=nb, n_tokens=n).dense_block_mask(nb)
        assert torch.equal(got, release), n


def test_fwht_matches_stacked_butterflies_bitwise():
    """The one-launch butterfly gives the same bits as (a + b, a - b) stacked per stage."""
    def naive(x):
        p, h, y = x.shape[-1], 1, x
        while h < p:
            y = y.unflatten(-1, (p // (2 * h), 2, h))
            y = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2).flatten(-3)
            h *= 2
        return y / p ** 0.5

    for dtype in (torch.float32, torch.float64):
        for p in (1, 2, 16, 64, 128):
            x = rand(3, 50, p, seed=p, dtype=dtype) * torch.exp(3 * rand(3, 50, p, seed=p + 1, dtype=dtype))
            x[..., ::5] = -0.0
            a, b = fwht(x), naive(x)
            assert torch.equal(a, b) and torch.equal(a.signbit(), b.signbit()), (dtype, p)


# --------------------------------------------------------------------------------------
# The naive reference: everything recomputed from scratch at every step
# --------------------------------------------------------------------------------------

def token_order_block_means(x: torch.Tensor, n: int, B: int) -> torch.Tensor:
    """[G, m, d] -> [G, ceil(n/B), d]: means of the first n tokens' blocks, each summed token by token."""
    nb = -(-n // B)
    sums = x.new_zeros(nb, x.shape[0], x.shape[2])
    sums.index_add_(0, torch.arange(n) // B, x[:, :n].transpose(0, 1))  # a left fold in token order
    counts = torch.tensor([min(B, n - j * B) for j in range(nb)], dtype=x.dtype)
    return (sums / counts[:, None, None]).transpose(0, 1)


class NaiveReference:
    """Selections of one sequence, recomputed from the raw q/k of every layer at each step.

    qs, ks: per layer [Hq, N, d] / [Hkv, N, d] (real tokens only); the prefill covers m0 tokens.
    """

    def __init__(self, cfg: SketchWalkConfig, qs, ks, m0: int):
        self.cfg, self.m0 = cfg, m0
        self.d = qs[0].shape[-1]
        self.feats = [group_features(q, k, cfg) for q, k in zip(qs, ks)]

    def prefill(self) -> dict:
        cfg, B, m0 = self.cfg, self.cfg.block_size, self.m0
        nb = -(-m0 // B)
        rows = torch.arange(nb)
        r, sels = None, {}
        for layer in range(cfg.skip_layers, len(self.feats)):
            w = self.prefill_w(layer)
            r = walk_update(r, w, rows, cfg)
            sels[layer] = select_blocks(r, rows, cfg)
        return sels

    def prefill_w(self, layer: int) -> torch.Tensor:
        """W of the prefill (block means of the prompt): [nb, nb]."""
        qf, kf = self.feats[layer]
        B, m0 = self.cfg.block_size, self.m0
        nb = -(-m0 // B)
        q_sk = sketch_features(block_means(qf[:, :m0], B), self.cfg, layer)
        k_sk = sketch_features(block_means(kf[:, :m0], self.cfg.score_block), self.cfg, layer)
        return transition_rows(q_sk, k_sk, torch.arange(nb), self.d, self.cfg)

    def current_query(self, qf: torch.Tensor, t: int) -> torch.Tensor:
        """[G, d]: the query driving row t // B at decode step t (method.md, decode_query)."""
        cfg, B = self.cfg, self.cfg.block_size
        if cfg.decode_query == "token":
            return qf[:, t]
        if cfg.decode_query == "block_mean":
            return token_order_block_means(qf, t + 1, B)[:, -1]
        return qf[:, max(0, t + 1 - cfg.decode_window): t + 1].mean(1)

    def decode_w(self, layer: int, t: int) -> torch.Tensor:
        """W over blocks 0..i at decode step t, built whole: [i+1, i+1].

        Rows of blocks complete at the prefill come from the prefill; rows of blocks completed
        during decoding from their block-mean query; row i from the current query.
        """
        cfg, B = self.cfg, self.cfg.block_size
        qf, kf = self.feats[layer]
        i = t // B
        w = torch.zeros(i + 1, i + 1, dtype=qf.dtype)
        pre_final = self.m0 // B
        pw = self.prefill_w(layer)
        w[:pre_final, :pw.shape[1]] = pw[:pre_final]
        # Keys at the score granularity: [G, i+1, r] blocks, or [G, nf, r] sub-blocks (score_block_size).
        k_sk = sketch_features(token_order_block_means(kf, t + 1, cfg.score_block), cfg, layer)
        if pre_final < i:
            q_sk = sketch_features(token_order_block_means(qf, i * B, B)[:, pre_final:i], cfg, layer)
            w[pre_final:i, :i] = transition_rows(q_sk, k_sk[:, :i * cfg.sub_blocks], torch.arange(pre_final, i),
                                                 self.d, cfg)
        q_cur = sketch_features(self.current_query(qf, t)[:, None], cfg, layer)
        w[i] = transition_rows(q_cur, k_sk, torch.tensor([i]), self.d, cfg)[0]
        return w

    def decode(self, t: int) -> dict:
        cfg = self.cfg
        row = torch.tensor([t // cfg.block_size])
        r, sels = None, {}
        for layer in range(cfg.skip_layers, len(self.feats)):
            r = walk_update(r, self.decode_w(layer, t), row, cfg)
            sels[layer] = select_blocks(r, row, cfg)
        return sels


def _layer_inputs(layers, bsz, hq, hkv, N, d, seed, dtype):
    return [(rand(bsz, hq, N, d, seed=seed + 3 * l, dtype=dtype), rand(bsz, hkv, N, d, seed=seed + 3 * l + 1, dtype=dtype),
             rand(bsz, hkv, N, d, seed=seed + 3 * l + 2, dtype=dtype)) for l in range(layers)]


DECODE_CASES = [
    # (config overrides, prompt lengths (left padded to the longest), decode steps)
    (dict(decode_query="token", walk="product", top_k=3), [45], 40),
    (dict(decode_query="token", walk="damped", density=0.3), [64], 40),
    (dict(decode_query="token", walk="none", top_k=2, local_blocks=2), [37], 30),
    (dict(decode_query="block_mean", walk="product", density=0.3), [50, 29], 40),
    (dict(decode_query="block_mean", walk="damped", top_k=3, sink_blocks=0), [32], 36),
    (dict(decode_query="block_mean", walk="none", density=0.5, head_aggregation="sum_probs"), [40], 30),
    (dict(decode_query="window", walk="product", top_k=3, decode_window=5), [45, 16], 40),
    (dict(decode_query="window", walk="damped", density=0.3, decode_window=24), [47], 40),
    (dict(decode_query="window", walk="none", top_k=3, decode_window=1, sketch="exact"), [33], 20),
    (dict(decode_query="window", walk="product", top_k=2, decode_window=40, sketch_dim=16, sink_blocks=2), [70, 3], 40),
    (dict(decode_query="token", walk="product", top_k=3, score_block_size=4), [45, 30], 40),
    (dict(decode_query="window", walk="damped", density=0.3, score_block_size=8, decode_window=5), [37], 30),
    (dict(decode_query="token", walk="none", density=0.4, score_block_size=1, head_aggregation="sum_probs"),
     [45, 30], 40),
]


@pytest.mark.parametrize("overrides,lens,T", DECODE_CASES, ids=[f"{c[0]['decode_query']}-{c[0]['walk']}-b{len(c[1])}"
                                                                  for c in DECODE_CASES])
def test_runtime_equals_naive_recomputation(overrides, lens, T):
    """Prefill then T decode steps across block boundaries, left-padded batches: every selection of
    every sparse layer equals the naive recomputation exactly; outputs equal attention on it."""
    cfg = SketchWalkConfig(**{"block_size": 16, "sketch_dim": 8, "skip_layers": 1, **overrides})
    layers, hq, hkv, d = 4, 4, 2, 16
    n0, bsz = max(lens), len(lens)
    N = n0 + T
    inputs = _layer_inputs(layers, bsz, hq, hkv, N, d, seed=len(lens) * 100 + T, dtype=torch.float32)
    valid = torch.stack([torch.arange(N) >= n0 - L for L in lens]) if bsz > 1 else None
    rt = SketchWalkRuntime(cfg)
    rt.keep_selections = True
    naive = [NaiveReference(cfg, [q[b, :, n0 - L:] for q, _, _ in inputs], [k[b, :, n0 - L:] for _, k, _ in inputs], L)
             for b, L in enumerate(lens)]
    scale = d ** -0.5

    def check(outs, expected, t_real, step_name):
        for layer in range(layers):
            for b, L in enumerate(lens):
                q, k, v = (x[b, :, n0 - L:] for x in inputs[layer])
                m = t_real[b] + 1
                sel = rt.last_selection[layer][b]
                if layer < cfg.skip_layers:
                    assert sel is None
                else:
                    assert same_selection(sel, expected[b][layer]), (step_name, layer, b, rows_of(sel),
                                                                     rows_of(expected[b][layer]))
                nq = outs[layer].shape[-2]
                pos = torch.arange(m - min(nq, m), m)
                ref = sparse_attention(q[:, m - len(pos):m], k[:, :m], v[:, :m], pos, sel, scale)
                assert torch.allclose(outs[layer][b, :, nq - len(pos):], ref, atol=1e-6, rtol=0), (step_name, layer, b)

    outs = [rt.attention(l, q[:, :, :n0], k[:, :, :n0], v[:, :, :n0], None if valid is None else valid[:, :n0], scale)
            for l, (q, k, v) in enumerate(inputs)]
    check(outs, [nv.prefill() for nv in naive], [L - 1 for L in lens], "prefill")
    choices = 0
    for t in range(n0, N):
        outs = [rt.attention(l, q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1],
                             None if valid is None else valid[:, :t + 1], scale) for l, (q, k, v) in enumerate(inputs)]
        t_real = [t - (n0 - L) for L in lens]
        expected = [nv.decode(tr) for nv, tr in zip(naive, t_real)]
        check(outs, expected, t_real, f"t={t}")
        choices += sum(int(s.counts[0]) < t_real[b] // cfg.block_size + 1
                       for b, e in enumerate(expected) for s in e.values())
    assert choices > 0  # some rows really were sparse
    # density counters agree with the selections (host-side counts)
    dec = rt.density().per_layer["decode"]
    for layer in range(cfg.skip_layers, layers):
        assert 0 < dec[layer] <= 1


def test_runtime_bf16_inputs_equal_naive_on_their_fp32_features():
    """Low-precision inputs: the front end runs in fp32 on the converted features, like the naive path."""
    cfg = SketchWalkConfig(block_size=16, sketch_dim=8, skip_layers=1, top_k=3, decode_query="window", decode_window=7)
    layers, d, n0, T = 3, 16, 40, 30
    inputs = _layer_inputs(layers, 1, 4, 2, n0 + T, d, seed=5, dtype=torch.bfloat16)
    rt = SketchWalkRuntime(cfg)
    rt.keep_selections = True
    naive = NaiveReference(cfg, [q[0] for q, _, _ in inputs], [k[0] for _, k, _ in inputs], n0)
    for l, (q, k, v) in enumerate(inputs):
        rt.attention(l, q[:, :, :n0], k[:, :, :n0], v[:, :, :n0], None, d ** -0.5)
    for t in range(n0, n0 + T):
        for l, (q, k, v) in enumerate(inputs):
            out = rt.attention(l, q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], None, d ** -0.5)
            assert out.dtype == torch.bfloat16
        expected = naive.decode(t)
        for l in range(cfg.skip_layers, layers):
            assert same_selection(rt.last_selection[l][0], expected[l]), (t, l)


# --------------------------------------------------------------------------------------
# The padding-offset cache
# --------------------------------------------------------------------------------------

def test_padding_offsets_follow_the_mask_between_passes():
    """A mask edited in place, or a new mask in recycled memory, is re-read at the next pass."""
    cfg = SketchWalkConfig(block_size=16, sketch_dim=8, skip_layers=1, top_k=2)
    layers, d, n = 3, 16, 70
    inputs = _layer_inputs(layers, 2, 4, 2, n, d, seed=9, dtype=torch.float64)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, :20] = False

    def run(rt, key_valid):
        return [rt.attention(l, q, k, v, key_valid, d ** -0.5) for l, (q, k, v) in enumerate(inputs)]

    rt = SketchWalkRuntime(cfg)
    run(rt, mask)
    mask[1, :20] = True  # in place: same storage and shape, different padding
    mask[0, :33] = False
    got = run(rt, mask)
    fresh = run(SketchWalkRuntime(cfg), mask.clone())
    for a, b in zip(got, fresh):
        assert torch.equal(a, b)
    # within one pass the mask is read once; a right-padded mask is still refused at layer 0
    bad = torch.ones(2, n, dtype=torch.bool)
    bad[0, -3:] = False
    with pytest.raises(ValueError, match="left padding"):
        run(rt, bad)


# --------------------------------------------------------------------------------------
# No device->host synchronisation per layer
# --------------------------------------------------------------------------------------

SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "nonzero")


@pytest.fixture
def sync_calls(monkeypatch):
    """Counts calls of the Tensor methods that read device data on the host (syncs on a GPU)."""
    calls: list[str] = []
    for name in SYNC_METHODS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, __name=name, __orig=original, **kw):
            calls.append(__name)
            return __orig(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, wrapper)
    original_equal = torch.equal
    monkeypatch.setattr(torch, "equal", lambda *a, **kw: calls.append("equal") or original_equal(*a, **kw))
    return calls


@pytest.mark.parametrize("decode_query", ["token", "block_mean", "window"])
def test_no_host_sync_per_layer(sync_calls, decode_query):
    cfg = SketchWalkConfig(block_size=16, sketch_dim=8, skip_layers=1, density=0.3, decode_query=decode_query,
                           decode_window=8)
    layers, d, n0 = 4, 16, 50
    inputs = _layer_inputs(layers, 2, 4, 2, n0 + 20, d, seed=2, dtype=torch.float32)
    mask = torch.ones(2, n0 + 20, dtype=torch.bool)
    mask[1, :7] = False
    rt = SketchWalkRuntime(cfg)
    for key_valid, per_pass in ((None, 0), (mask, 1)):  # with a mask: one read per forward pass
        sync_calls.clear()
        for l, (q, k, v) in enumerate(inputs):
            rt.attention(l, q[:, :, :n0], k[:, :, :n0], v[:, :, :n0], None if key_valid is None else key_valid[:, :n0],
                         d ** -0.5)
        assert len(sync_calls) == per_pass, sync_calls
        for t in range(n0, n0 + 20):  # crosses the block boundaries at 64
            sync_calls.clear()
            for l, (q, k, v) in enumerate(inputs):
                rt.attention(l, q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1],
                             None if key_valid is None else key_valid[:, :t + 1], d ** -0.5)
            assert len(sync_calls) == per_pass, (t, sync_calls)
