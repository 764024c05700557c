"""Baseline block selectors at matched density (`SketchWalkConfig.selector`): oracle, random, streaming."""
from __future__ import annotations

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from sketchwalk import ConfigError, SketchWalkConfig, attach, detach
from sketchwalk.config import SELECTORS
from sketchwalk.method.baselines import block_attention_mass, decode_scores, prefill_scores, random_scores
from sketchwalk.method.runtime import SketchWalkRuntime
from sketchwalk.method.selection import row_budget
from sketchwalk.validation import mass_recall

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASELINES = ("oracle", "random", "streaming")


def sw(**kw) -> SketchWalkConfig:
    base = dict(block_size=16, sketch_dim=8, skip_layers=1, **({} if "top_k" in kw else {"density": 0.3}))
    return SketchWalkConfig(**{**base, **kw})


def qkv(m: int, seed: int, hq: int = 4, hkv: int = 2, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(h, m, d, generator=g) for h in (hq, hkv, hkv))


def rows(sel) -> list[list[int]]:
    return [sel.indices[r, :int(sel.counts[r])].tolist() for r in range(sel.indices.shape[0])]


def run_prefill(cfg: SketchWalkConfig, layers: list, num_layers: int = 4) -> SketchWalkRuntime:
    """Run the given per-layer (layer, q, k, v) prefills through one runtime (batch 1, no padding)."""
    rt = SketchWalkRuntime(cfg, num_layers, layers[0][1].shape[-1], backend="torch")
    rt.keep_selections = True
    for layer, q, k, v in layers:
        rt.attention(layer, q[None], k[None], v[None], None, q.shape[-1] ** -0.5)
    return rt


# --------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------

def test_unknown_selector_is_a_config_error_naming_field_value_and_allowed():
    with pytest.raises(ConfigError) as info:
        SketchWalkConfig(selector="quest")
    assert info.value.field == "selector"
    msg = str(info.value)
    assert "quest" in msg and all(s in msg for s in SELECTORS)


def test_selector_round_trips_and_default_keeps_earlier_hashes():
    # Hashes recorded before the field existed (sweeps dedup and cache on them): unchanged.
    assert SketchWalkConfig().short_hash() == "e365d1b35ec9"
    assert SketchWalkConfig(top_k=5, walk="damped", seed=3).short_hash() == "a344c00261cc"
    hashes = {SketchWalkConfig(selector=s).short_hash() for s in SELECTORS}
    assert len(hashes) == len(SELECTORS)
    cfg = SketchWalkConfig(selector="oracle", density=0.3)
    assert yaml.safe_load(cfg.to_yaml())["sketchwalk"]["selector"] == "oracle"
    assert SketchWalkConfig.from_yaml(cfg.to_yaml()) == cfg


# --------------------------------------------------------------------------------------
# matched density
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("selector", BASELINES)
@pytest.mark.parametrize("cfg_kw", [dict(density=0.3), dict(top_k=3, sink_blocks=2), dict(density=0.5, local_blocks=2)])
def test_counts_and_density_equal_sketchwalks(selector, cfg_kw):
    base = sw(**cfg_kw)
    m = 150  # partial last block
    layers = [(layer, *qkv(m, seed=layer)) for layer in range(3)]
    ref, other = run_prefill(base, layers), run_prefill(base.replace(selector=selector), layers)
    for layer in (1, 2):
        a, b = ref.last_selection[layer][0], other.last_selection[layer][0]
        assert torch.equal(a.counts, b.counts)
        assert b.counts.tolist() == [row_budget(base, i) for i in range(len(b.counts))]
    assert ref.density().per_layer == other.density().per_layer
    # decode: one step after the prefill
    q, k, v = qkv(m + 1, seed=7)
    for rt in (ref, other):
        for layer in range(3):
            rt.attention(layer, q[None, :, -1:], k[None], v[None], None, 0.25)
    assert ref.density().per_layer["decode"] == other.density().per_layer["decode"]
    assert torch.equal(ref.last_selection[2][0].counts, other.last_selection[2][0].counts)


# --------------------------------------------------------------------------------------
# oracle
# --------------------------------------------------------------------------------------

def test_block_mass_equals_brute_force_softmax():
    q, k, _ = qkv(37, seed=3, hq=6, hkv=2, d=8)
    B, scale = 4, 8 ** -0.5
    logits = (q @ k.repeat_interleave(3, 0).transpose(-1, -2)) * scale
    probs = logits.masked_fill(torch.ones(37, 37, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    nb = 10
    ref = torch.zeros(nb, nb)
    for i in range(nb):
        for j in range(nb):
            ref[i, j] = probs[:, i * B:(i + 1) * B, j * B:(j + 1) * B].sum() / (6 * min(B, 37 - i * B))
    for chunk in (1, 1 << 30):  # one block per chunk, all at once
        assert torch.allclose(block_attention_mass(q, k, scale, B, chunk_bytes=chunk), ref, atol=1e-6)
    row = block_attention_mass(q[:, -1:], k, scale, B, q_start=36)  # decode: the last token's row
    last = torch.nn.functional.pad(probs[:, -1], (0, 3)).view(6, nb, B).sum(-1).mean(0)
    assert torch.allclose(row[0], last, atol=1e-6)


def planted(nb: int, B: int, d: int = 16, strength: float = 30.0):
    """One head; key block j points along e_j; every query of block i along e_target(i): the dense
    mass of row i sits on its target block, a free (non-sink, non-local) block for i >= 2."""
    target = {i: (5 * i) % (i - 1) + 1 for i in range(2, nb)}
    k = torch.zeros(1, nb * B, d)
    q = torch.zeros(1, nb * B, d)
    for j in range(nb):
        k[0, j * B:(j + 1) * B, j] = 1.0
    for i, t in target.items():
        q[0, i * B:(i + 1) * B, t] = strength
    return q, k, target


def test_oracle_picks_the_max_mass_blocks_hand_built():
    nb, B = 12, 16
    q, k, target = planted(nb, B)
    cfg = SketchWalkConfig(block_size=B, sketch_dim=8, skip_layers=0, top_k=3, selector="oracle")  # 1 free slot
    rt = run_prefill(cfg, [(0, q, k, k)], num_layers=1)
    got = rows(rt.last_selection[0][0])
    for i, t in target.items():
        assert got[i] == sorted({0, t, i}), (i, t, got[i])
    # decode: the last token of the last block (same query direction) picks the same block
    scores = decode_scores(q[:, -1:], k, cfg, 0, 1.0)
    assert scores.shape == (1, nb) and int(scores[0, 1:nb - 1].argmax()) + 1 == target[nb - 1]


def test_oracle_recall_at_least_sketchwalks_with_planted_structure():
    B, m, d = 16, 256, 16
    g = torch.Generator().manual_seed(0)
    layers = []
    for layer in range(4):
        q, k, v = qkv(m, seed=10 + layer, d=d)
        # plant: each query block leans towards one earlier key block (shared directions)
        for i in range(2, m // B):
            j = int(torch.randint(1, i, (1,), generator=g))
            direction = torch.randn(d, generator=g)
            q[:, i * B:(i + 1) * B] += 2 * direction
            k[:, j * B:(j + 1) * B] += 2 * direction
        layers.append((layer, q, k, v))
    cfg = sw(density=0.25)
    runs = {s: run_prefill(cfg.replace(selector=s), layers) for s in SELECTORS}
    nb = m // B
    weights = torch.full((nb,), B)
    for layer, q, k, _ in layers[1:]:
        mass = block_attention_mass(q, k, d ** -0.5, B)
        recall = {s: mass_recall(mass, weights, rt.last_selection[layer][0].dense_block_mask(nb))
                  for s, rt in runs.items()}
        assert all(recall["oracle"] >= r - 1e-6 for r in recall.values()), recall
        # per row, too: the oracle maximises each row's mass at its count
        o = (mass * runs["oracle"].last_selection[layer][0].dense_block_mask(nb)).sum(-1)
        s = (mass * runs["sketchwalk"].last_selection[layer][0].dense_block_mask(nb)).sum(-1)
        assert bool((o >= s - 1e-6).all())


# --------------------------------------------------------------------------------------
# random / streaming
# --------------------------------------------------------------------------------------

def test_random_is_reproducible_differs_across_seeds_and_layers_and_matches_decode():
    q, k, _ = qkv(200, seed=1)
    cfg = sw(selector="random")
    a = prefill_scores(q, k, cfg, 2, 0.25)
    assert torch.equal(a, prefill_scores(q, k, cfg, 2, 0.25))
    assert not torch.equal(a, prefill_scores(q, k, cfg.replace(seed=1), 2, 0.25))
    assert not torch.equal(a, prefill_scores(q, k, cfg, 3, 0.25))
    # a row's scores do not depend on the other rows: decode row i == prefill row i
    m = 200
    i = (m - 1) // 16
    assert torch.equal(decode_scores(q[:, -1:], k, cfg, 2, 0.25)[0], a[i, :i + 1])
    # selections through the runtime: reproducible, seed-dependent
    layers = [(1, q, k, k)]
    s0 = rows(run_prefill(cfg, layers).last_selection[1][0])
    assert s0 == rows(run_prefill(cfg, layers).last_selection[1][0])
    assert s0 != rows(run_prefill(cfg.replace(seed=5), layers).last_selection[1][0])


def test_random_scores_rank_columns_uniformly():
    top = random_scores(0, 0, torch.arange(4000), torch.arange(8)).argmax(-1)
    counts = torch.bincount(top, minlength=8)
    assert bool(((counts > 400) & (counts < 600)).all()), counts  # expected 500 each, sd ~21


def test_streaming_picks_sink_and_most_recent_blocks():
    q, k, v = qkv(300, seed=2)
    cfg = sw(selector="streaming", density=0.3, sink_blocks=1, local_blocks=1)
    sel = run_prefill(cfg, [(1, q, k, v)]).last_selection[1][0]
    for i, picked in enumerate(rows(sel)):
        c = row_budget(cfg, i)  # the sink, then the c - 1 most recent blocks (the diagonal included)
        assert picked == sorted({0} | set(range(i - c + 2, i + 1))), (i, c, picked)


@pytest.mark.parametrize("selector", BASELINES)
def test_triton_backend_matches_torch(selector):
    """Baseline selections are built in the kernels' index dtype and run through the Triton kernels
    (Triton's interpreter on CPU): prefill and one decode step as the reference path."""
    q, k, v = (t[None] for t in qkv(80, seed=6))
    cfg = sw(selector=selector, skip_layers=0, density=0.4)
    outs = {}
    for backend in ("torch", "triton"):
        rt = SketchWalkRuntime(cfg, 2, 16, backend=backend)
        outs[backend] = (rt.attention(0, q[:, :, :79], k[:, :, :79], v[:, :, :79], None, 0.25),
                         rt.attention(0, q[:, :, 79:], k, v, None, 0.25))
    for a, b in zip(outs["torch"], outs["triton"]):
        assert torch.allclose(a, b, atol=1e-5)


# --------------------------------------------------------------------------------------
# through generate()
# --------------------------------------------------------------------------------------

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=512)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY, attn_implementation="sdpa")).eval()


@torch.no_grad()
def generate(model, cfg, ids, n_new=20):
    rt = attach(model, cfg, backend="torch")
    rt.keep_selections = True
    try:
        out = model.generate(ids, max_new_tokens=n_new, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True, output_logits=True)
    finally:
        detach(model)
    return out, rt


@pytest.mark.parametrize("selector", BASELINES)
def test_selectors_run_through_generate_at_sketchwalks_density(llama, selector):
    ids = torch.randint(1, 128, (1, 90), generator=torch.Generator().manual_seed(4))  # 90 + 20 crosses 96
    ref_out, ref = generate(llama, sw(), ids)
    out, rt = generate(llama, sw(selector=selector), ids)
    assert out.sequences.shape == ref_out.sequences.shape
    assert torch.isfinite(torch.stack(out.logits)).all()
    rep, ref_rep = rt.density(), ref.density()
    assert rep.per_layer == ref_rep.per_layer  # prefill and every decode step: same counts
    assert rep.sparse_layers["decode"] < 1.0 and rep.sparse_layers["prefill"] < 1.0
    last = rt.last_selection[3][0]  # the last decode step (position 108, block 6) of the deepest layer
    assert last.row_blocks.tolist() == [6]
    if selector == "streaming":
        c = row_budget(sw(), 6)
        assert rows(last)[0] == sorted({0} | set(range(6 - c + 2, 7)))


def test_dense_density_selectors_equal_dense_generation(llama):
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(5))
    seqs = {s: generate(llama, sw(selector=s, density=1.0), ids, n_new=8)[0].sequences for s in SELECTORS}
    assert all(torch.equal(v, seqs["sketchwalk"]) for v in seqs.values())
