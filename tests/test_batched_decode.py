"""The batched decode front end (method/batched_decode.py) selects exactly what the per-sequence path does.

A left-padded batch of 3 sequences at different block indices (starting new blocks at different
steps) runs a prefill and 80+ decode steps through `SketchWalkRuntime.attention` on the batched
path; the same sequences run as batch-1 calls (the per-sequence reference path) and as the same
padded batch forced onto the per-sequence path. Selections (indices, counts, rows) must be equal
exactly, outputs to 1e-5, density counters exactly. Also: capacity growth, the Triton backend
(interpreter on CPU), generate() on a tiny LLaMA, and the op count per layer not growing with
the batch.
"""
from __future__ import annotations

import pytest
import torch

from sketchwalk.config import SketchWalkConfig
from sketchwalk.method import SketchWalkRuntime
from sketchwalk.method import batched_decode

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HQ, HKV, D, LAYERS = 4, 2, 16, 4


def rand(*shape, gen) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).float()


def padded_inputs(lens: list[int], steps: int, layers: int = LAYERS, seed: int = 0, device="cpu",
                  heads: tuple[int, int] = (HQ, HKV), scale: float = 1.0):
    """Per layer (q, k, v) [batch, H, n0 + steps, d] (H = heads: query, KV), values scaled by `scale`,
    left padded to n0 = max(lens) (NaN padding: attending or scoring a padded position would show),
    and the key_valid mask [batch, n0 + steps]. Also used by tests/test_per_head_selection.py."""
    gen = torch.Generator().manual_seed(seed)
    n0 = max(lens)
    N = n0 + steps
    inputs = []
    for _ in range(layers):
        q, k, v = (rand(len(lens), h, N, D, gen=gen) * scale for h in (heads[0], heads[1], heads[1]))
        for b, L in enumerate(lens):
            for x in (q, k, v):
                x[b, :, :n0 - L] = float("nan")
        inputs.append(tuple(x.to(device) for x in (q, k, v)))
    valid = torch.stack([torch.arange(N) >= n0 - L for L in lens]).to(device)
    return inputs, valid


def rows(sel):
    """A selection as host lists (None = dense): indices (with the -1 padding), counts, row blocks."""
    if sel is None:
        return None
    return sel.indices.long().tolist(), sel.counts.long().tolist(), sel.row_blocks.long().tolist()


def run(cfg, inputs, valid, n0: int, steps: int, batched: bool = True, backend: str = "torch"):
    """Prefill n0 tokens, then `steps` decode steps; per step and layer: (output, [selection rows per sequence])."""
    rt = SketchWalkRuntime(cfg, backend=backend)
    rt.batched_decode = batched
    rt.keep_selections = True
    scale = D ** -0.5
    for layer, (q, k, v) in enumerate(inputs):
        rt.attention(layer, q[:, :, :n0], k[:, :, :n0], v[:, :, :n0], None if valid is None else valid[:, :n0], scale)
    record = []
    for t in range(n0, n0 + steps):
        per_layer = []
        for layer, (q, k, v) in enumerate(inputs):
            out = rt.attention(layer, q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1],
                               None if valid is None else valid[:, :t + 1], scale)
            per_layer.append((out, [rows(s) for s in rt.last_selection[layer]]))
        record.append(per_layer)
    return record, rt


def solo_inputs(inputs, b: int, pad: int):
    """Sequence b of a padded batch without its padding, as a batch of 1."""
    return [tuple(x[b:b + 1, :, pad:] for x in qkv) for qkv in inputs]


def check_against_solo(cfg, lens, steps, seed=0, backend="torch", layers=LAYERS, device="cpu"):
    """The batched path vs batch-1 runs of each sequence (selections exact, outputs 1e-5) vs the same
    batch forced onto the per-sequence path (also density exact). Returns the number of free choices."""
    inputs, valid = padded_inputs(lens, steps, layers, seed, device)
    n0 = max(lens)
    got, rt = run(cfg, inputs, valid, n0, steps, backend=backend)
    assert rt._batch is not None or not cfg.sparse_decode  # the batched path ran
    forced, rt_forced = run(cfg, inputs, valid, n0, steps, batched=False, backend=backend)
    assert rt_forced._batch is None
    solo = [run(cfg, solo_inputs(inputs, b, n0 - L), None, L, steps, backend=backend)[0] for b, L in enumerate(lens)]
    choices = 0
    for step in range(steps):
        for layer in range(layers):
            out, sels = got[step][layer]
            f_out, f_sels = forced[step][layer]
            assert sels == f_sels, (step, layer)
            assert torch.allclose(out, f_out, atol=1e-5, rtol=0), (step, layer)
            for b in range(len(lens)):
                s_out, s_sels = solo[b][step][layer]
                assert sels[b] == s_sels[0], (step, layer, b, sels[b], s_sels[0])
                assert torch.allclose(out[b], s_out[0], atol=1e-5, rtol=0), (step, layer, b)
                if sels[b] is not None:
                    indices, counts, blocks = sels[b]
                    choices += counts[0] < blocks[0] + 1  # a row that really was sparse
    assert repr(rt.density()) == repr(rt_forced.density())  # exact values (repr: nan == nan)
    return choices


# lens: real prompt lengths (block_size 16). [50, 39, 21]: blocks 3/2/1, new blocks at steps 15/10/12;
# [48, 35, 5]: the first ends on a block boundary (new block, nothing to finalise, at step 0), the last is
# shorter than the decode windows; [64, 17, 30]: a boundary and a one-token block.
CASES = [
    (dict(decode_query="token", walk="product", top_k=3), [50, 39, 21]),
    (dict(decode_query="token", walk="damped", density=0.3, sink_blocks=0, local_blocks=2, skip_layers=2), [48, 35, 5]),
    (dict(decode_query="token", walk="none", top_k=2, local_blocks=2, phases="decode"), [64, 17, 30]),
    (dict(decode_query="block_mean", walk="product", density=0.3), [48, 35, 5]),
    (dict(decode_query="block_mean", walk="damped", top_k=3, sink_blocks=0, phases="decode"), [50, 39, 21]),
    (dict(decode_query="block_mean", walk="none", density=0.5, local_blocks=2, sketch="exact"), [64, 17, 30]),
    (dict(decode_query="window", decode_window=8, walk="product", top_k=3), [48, 35, 5]),
    (dict(decode_query="window", decode_window=24, walk="damped", density=0.3, local_blocks=2), [50, 39, 21]),
    (dict(decode_query="window", decode_window=40, walk="none", top_k=2, sink_blocks=0, phases="decode"), [64, 17, 30]),
    (dict(decode_query="token", walk="product", density=0.4, phases="prefill"), [50, 39, 21]),  # dense decode
    # sum_probs: G = Hq feature rows per sequence, averaged into one W row.
    (dict(head_aggregation="sum_probs", decode_query="token", walk="product", top_k=3), [50, 39, 21]),
    (dict(head_aggregation="sum_probs", decode_query="window", decode_window=8, walk="damped", density=0.3),
     [48, 35, 5]),
    (dict(head_aggregation="sum_probs", decode_query="block_mean", walk="none", top_k=2, local_blocks=2), [64, 17, 30]),
    # Sub-block scores: keys at score_block granularity (4 tokens: sub-blocks fill and start mid-block).
    (dict(score_block_size=4, decode_query="token", walk="product", top_k=3), [50, 39, 21]),
    (dict(score_block_size=8, decode_query="block_mean", walk="damped", density=0.3), [48, 35, 5]),
    (dict(score_block_size=4, head_aggregation="sum_probs", decode_query="window", decode_window=8, top_k=3),
     [64, 17, 30]),
    # Token-level key scores (score_block_size 1: every key its own sub-block, the cache's keys themselves).
    (dict(score_block_size=1, head_aggregation="sum_probs", decode_query="token", walk="none", density=0.3),
     [50, 39, 21]),
    (dict(score_block_size=2, decode_query="token", walk="damped", top_k=3), [48, 35, 5]),
    # The baseline selectors: scores from the cache, no state.
    (dict(selector="oracle", density=0.3), [50, 39, 21]),
    (dict(selector="random", top_k=3, sink_blocks=0), [48, 35, 5]),
    (dict(selector="streaming", top_k=2, local_blocks=2), [64, 17, 30]),
    # The release's structure: sink and window grow with each sequence's length during decode.
    (dict(sink_fraction=0.1, local_fraction=0.2, budget_rule="free_quantile", density=0.3, walk="damped",
          head_aggregation="sum_probs", decode_query="window", decode_window=8), [50, 39, 21]),
    (dict(selector="oracle", local_fraction=0.25, budget_rule="free_quantile", density=0.2), [64, 17, 30]),
]


def case_id(overrides: dict) -> str:
    parts = [overrides.get("selector", "sketchwalk") + (f"-sub{overrides['score_block_size']}"
                                                          if "score_block_size" in overrides else "")
             + ("-fractions" if "local_fraction" in overrides else ""),
             overrides.get("head_aggregation", "mean_qk"),
             overrides.get("decode_query", "token"), overrides.get("walk", "product"), overrides.get("phases", "both")]
    return "-".join(parts)


@pytest.mark.parametrize("overrides,lens", CASES, ids=[case_id(c[0]) for c in CASES])
def test_batched_equals_per_sequence(overrides, lens):
    cfg = SketchWalkConfig(**{"block_size": 16, "sketch_dim": 8, "skip_layers": 1, **overrides})
    choices = check_against_solo(cfg, lens, steps=84, seed=len(CASES) + sum(lens))
    if cfg.sparse_decode:
        assert choices > 0


def test_capacity_growth_mid_batch(monkeypatch):
    """Room for one more block only: the capacity grows during the run (at different blocks per sequence)."""
    monkeypatch.setattr(batched_decode, "batch_capacity", lambda blocks: blocks + 1)
    cfg = SketchWalkConfig(block_size=16, sketch_dim=8, skip_layers=1, top_k=3, decode_query="window",
                           decode_window=8, walk="damped")
    assert check_against_solo(cfg, [40, 23, 9], steps=60, seed=3, layers=3) > 0


def test_batched_decode_off_keeps_per_sequence_path():
    """`batched_decode = False` keeps every config on the per-sequence path."""
    for cfg in (SketchWalkConfig(block_size=16, sketch_dim=8, skip_layers=1, top_k=3, head_aggregation="sum_probs"),
                SketchWalkConfig(block_size=16, sketch_dim=8, skip_layers=1, top_k=3, selector="streaming")):
        inputs, valid = padded_inputs([40, 23], 10, layers=2, seed=1)
        _, rt = run(cfg, inputs, valid, 40, 10, batched=False)
        assert rt._batch is None
        _, rt = run(cfg, inputs, valid, 40, 10)
        assert rt._batch is not None


def test_decode_without_prefill_raises():
    cfg = SketchWalkConfig(block_size=16, sketch_dim=8, skip_layers=0, top_k=2)
    inputs, valid = padded_inputs([30, 20], 2, layers=1)
    q, k, v = inputs[0]
    rt = SketchWalkRuntime(cfg)
    with pytest.raises(RuntimeError, match="prefill"):
        rt.attention(0, q[:, :, 30:31], k[:, :, :31], v[:, :, :31], valid[:, :31], 0.25)


# --------------------------------------------------------------------------------------
# Triton backend (interpreter on CPU)
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,lens", [
    (dict(decode_query="block_mean"), [40, 23, 9]), (dict(head_aggregation="sum_probs"), [40, 23, 9]),
    (dict(selector="oracle"), [40, 23, 9]),
    (dict(score_block_size=1, head_aggregation="sum_probs", walk="none"), [40, 23, 9]),
    # The release's structure needs longer prompts for a free choice: sink 1 + window 1-2 + top_k 2.
    (dict(sink_fraction=0.1, local_fraction=0.2, budget_rule="free_quantile"), [100, 71, 40])],
    ids=["mean_qk", "sum_probs", "oracle", "token-keys", "release-structure"])
def test_triton_backend_batched_equals_per_sequence(overrides, lens):
    pytest.importorskip("triton", reason="triton is not installed")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = SketchWalkConfig(block_size=16, sketch_dim=8, skip_layers=1, top_k=2, **overrides)
    # 20 steps: new blocks at steps 9 / 10 / 8 (first case); layer 0 is dense (batched dense rows).
    assert check_against_solo(cfg, lens, steps=20, seed=5, backend="triton", layers=2, device=device) > 0


# --------------------------------------------------------------------------------------
# generate() on a tiny LLaMA
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("decode_query", ["token", "window"])
def test_generate_left_padded_batch_equals_batch_one(decode_query):
    from transformers import LlamaConfig, LlamaForCausalLM

    from sketchwalk import attach, detach

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                                         max_position_embeddings=512)).eval()
    lens, n_new = [90, 61, 37], 40  # different blocks; new blocks at different steps
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, 128, (L,), generator=gen) for L in lens]
    ids = torch.zeros(len(lens), max(lens), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, max(lens) - len(p):], mask[b, max(lens) - len(p):] = p, 1
    rt = attach(model, SketchWalkConfig(block_size=16, sketch_dim=8, skip_layers=1, density=0.4,
                                        decode_query=decode_query, decode_window=8))
    kw = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0)  # no early EOS
    try:
        with torch.no_grad():
            batch = model.generate(ids, attention_mask=mask, **kw)
            assert rt._batch is not None  # the batched path answered the batch
            for b, p in enumerate(prompts):
                solo = model.generate(p[None], attention_mask=torch.ones_like(p[None]), **kw)
                assert torch.equal(batch[b, -n_new:], solo[0, -n_new:]), b
        assert rt.density().sparse_layers["decode"] < 1.0
    finally:
        detach(model)


# --------------------------------------------------------------------------------------
# Op count per decode layer
# --------------------------------------------------------------------------------------

def top_level_ops(fn) -> int:
    """Top-level aten ops of one fn() call (torch.profiler; on a GPU each is at least one launch)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and
               (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def decode_ops_per_layer(lens: list[int], decode_query: str) -> float:
    """Ops per layer of the front end (attention stubbed out) for the third decode step after a prefill."""
    cfg = SketchWalkConfig(block_size=16, sketch_dim=16, skip_layers=1, density=0.3, decode_query=decode_query,
                           decode_window=8)
    layers, steps = 4, 3
    inputs, valid = padded_inputs(lens, steps, layers, seed=2)
    n0 = max(lens)
    rt = SketchWalkRuntime(cfg)
    rt._attend = lambda *a, **kw: None  # the front end only (as benchmarks/bench_frontend.py counts it)

    def step(t):
        for layer, (q, k, v) in enumerate(inputs):
            rt.attention(layer, q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1],
                         valid[:, :t + 1] if len(lens) > 1 else None, D ** -0.5)

    for layer, (q, k, v) in enumerate(inputs):
        rt.attention(layer, q[:, :, :n0], k[:, :, :n0], v[:, :, :n0], valid[:, :n0] if len(lens) > 1 else None,
                     D ** -0.5)
    step(n0)
    step(n0 + 1)
    return top_level_ops(lambda: step(n0 + 2)) / (layers - cfg.skip_layers)


@pytest.mark.parametrize("decode_query", ["token", "block_mean", "window"])
def test_ops_per_layer_do_not_grow_with_batch(decode_query):
    # no sequence starts a block at the counted step (real lengths 52.., 37.., 21.., 70..)
    one = decode_ops_per_layer([50], decode_query)
    four = decode_ops_per_layer([50, 35, 19, 68], decode_query)
    eight = decode_ops_per_layer([50, 35, 19, 68, 51, 36, 20, 69], decode_query)
    assert four <= 1.5 * one, (one, four)
    assert eight == four, (four, eight)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per-sequence"])
def test_counted_rows_leave_finished_sequences_out_of_the_density(batched):
    """Rows flagged False in `counted_rows` (answers already complete) add no decode pairs: the
    decode counters equal those of the counted sequence run alone."""
    cfg = SketchWalkConfig(block_size=16, sketch_dim=8, skip_layers=1, top_k=3)
    lens, steps = [50, 39], 20
    inputs, valid = padded_inputs(lens, steps, layers=2, seed=7)
    rt = SketchWalkRuntime(cfg, backend="torch")
    rt.batched_decode = batched
    n0, scale = max(lens), D ** -0.5
    for layer, (q, k, v) in enumerate(inputs):
        rt.attention(layer, q[:, :, :n0], k[:, :, :n0], v[:, :, :n0], valid[:, :n0], scale)
    rt.counted_rows = [True, False]
    for t in range(n0, n0 + steps):
        for layer, (q, k, v) in enumerate(inputs):
            rt.attention(layer, q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], valid[:, :t + 1], scale)
    _, solo = run(cfg, solo_inputs(inputs, 0, 0), None, lens[0], steps, batched=False)
    assert rt._pairs["decode"] == solo._pairs["decode"]
    assert rt._pairs["decode"][0][0] == rt._pairs["decode"][0][1]  # layer 0: dense, counted
    assert rt._pairs["decode"][1][0] < rt._pairs["decode"][1][1]  # layer 1: sparse


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per-sequence"])
def test_token_scores_summed_probs_no_walk_select_the_oracle(batched):
    """score_block_size 1 + sum_probs + walk none + s = 1 with an exact sketch scores each block by
    the mean over query heads of its softmax mass: the oracle's own scores, so every decode step
    selects exactly the oracle's blocks, on the batched path and on the per-sequence path."""
    base = dict(block_size=16, sketch_dim=D, skip_layers=1, density=0.5, local_blocks=1)
    token = SketchWalkConfig(**base, score_block_size=1, head_aggregation="sum_probs", walk="none",
                             sparsity_exponent=1.0, sketch="exact")
    oracle = SketchWalkConfig(**base, selector="oracle")
    inputs, valid = padded_inputs([50, 39, 21], 40, seed=11)
    got, _ = run(token, inputs, valid, 50, 40, batched=batched)
    want, _ = run(oracle, inputs, valid, 50, 40, batched=batched)
    free = 0
    for step in range(40):
        for layer in range(1, LAYERS):
            sels, o_sels = got[step][layer][1], want[step][layer][1]
            assert sels == o_sels, (step, layer)
            free += sum(c[0] > 2 and c[0] < r[0] + 1 for _, c, r in sels)  # beyond sink + local, not all
    assert free > 100  # the rows really chose (forced blocks alone would agree trivially)
    # The product walk carries the previous layers' rows into the scores: no longer the oracle's.
    walked, _ = run(token.replace(walk="product"), inputs, valid, 50, 40, batched=batched)
    assert any(walked[t][layer][1] != want[t][layer][1] for t in range(40) for layer in range(1, LAYERS))
