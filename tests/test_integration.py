"""Sketch&Walk inside transformers: tiny random-weight Llama (and Qwen2 / Mistral) models on the CPU."""
from __future__ import annotations

import pytest
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import sketchwalk  # noqa: F401  (importing registers the attention with transformers)
from sketchwalk import ConfigError, SketchWalkConfig, attach, detach, get_runtime
from sketchwalk.integration.hf import ATTN_NAME


pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 128
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=512)


def sw(**kw) -> SketchWalkConfig:
    base = dict(block_size=16, sketch_dim=8, skip_layers=1)
    base.update(kw)
    return SketchWalkConfig(**base)


def tiny_llama(attn="sdpa", seed=0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**TINY, **overrides}, attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval()


def tokens(n, seed, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, n), generator=g)


@torch.no_grad()
def greedy(model, ids, n_new=16, **kw):
    out = model.generate(ids, max_new_tokens=n_new, do_sample=False, return_dict_in_generate=True,
                         output_logits=True, pad_token_id=0, **kw)
    return out.sequences, torch.stack(out.logits, 1)  # [batch, n_new, vocab]


def sel_rows(sel):
    return [sel.indices[r, : int(sel.counts[r])].tolist() for r in range(sel.indices.shape[0])]


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(autouse=True)
def _clean(llama):
    yield
    detach(llama)


# --------------------------------------------------------------------------------------
# attach / generate / detach
# --------------------------------------------------------------------------------------

def test_full_density_generate_identical_to_dense(llama):
    ids = tokens(40, seed=1)  # 40 prompt + 16 new tokens: crosses block boundaries at 48
    dense_seq, dense_logits = greedy(llama, ids)
    rt = attach(llama, sw(density=1.0))
    assert llama.config._attn_implementation == ATTN_NAME
    assert get_runtime(llama) is rt
    seq, logits = greedy(llama, ids)
    assert torch.equal(seq, dense_seq)
    assert (logits - dense_logits).abs().max().item() <= 1e-5
    rep = rt.density()
    # the runtime really ran, for every layer in both phases
    assert sorted(rep.per_layer["prefill"]) == [0, 1, 2, 3] and sorted(rep.per_layer["decode"]) == [0, 1, 2, 3]
    assert rep.overall["prefill"] == 1.0 and rep.overall["decode"] == 1.0
    assert rep.dense_layer_share["prefill"] == pytest.approx(0.25)
    detach(llama)
    assert llama.config._attn_implementation == "sdpa"
    assert get_runtime(llama) is None
    seq2, logits2 = greedy(llama, ids)
    assert torch.equal(seq2, dense_seq) and torch.equal(logits2, dense_logits)


def test_sparse_attach_reports_density_matching_selections(llama):
    ids = tokens(100, seed=2)  # 7 blocks of 16
    with torch.no_grad():
        dense = llama(ids).logits
    rt = attach(llama, sw(density=0.3))
    rt.keep_selections = True
    with torch.no_grad():
        sparse = llama(ids).logits
    assert torch.isfinite(sparse).all()
    assert (sparse - dense).abs().max() > 1e-4  # sparse attention actually changed something
    rep = rt.density()
    nb = 7
    causal = nb * (nb + 1) // 2
    assert rep.per_layer["prefill"][0] == 1.0
    for layer in (1, 2, 3):
        sel = rt.last_selection[layer][0]
        selected = sum(len(r) for r in sel_rows(sel))
        assert rep.per_layer["prefill"][layer] == pytest.approx(selected / causal, abs=1e-12)
        assert rep.per_layer["prefill"][layer] < 1.0
    assert rep.sparse_layers["prefill"] < 1.0
    rt.reset_stats()
    seq, logits = greedy(llama, ids, n_new=12)
    assert seq.shape == (1, 112) and torch.isfinite(logits).all()
    rep = rt.density()
    assert rep.sparse_layers["decode"] < 1.0 and rep.per_layer["decode"][0] == 1.0


def test_detach_restores_previous_implementation_and_reattach():
    model = tiny_llama(attn="eager", seed=3)
    ids = tokens(30, seed=3)
    with torch.no_grad():
        ref = model(ids).logits
    rt1 = attach(model, sw(density=0.5))
    rt2 = attach(model, sw(top_k=2))  # re-attach replaces the config, keeps the original "previous"
    assert rt2 is not rt1 and get_runtime(model).config.top_k == 2
    assert all(getattr(m, "_sketchwalk_runtime", None) is rt2 for m in model.modules()
               if type(m).__name__.endswith("Attention"))
    detach(model)
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    detach(model)  # idempotent
    assert model.config._attn_implementation == "eager"


def test_attach_rejects_invalid_config_before_running(llama):
    with pytest.raises(ConfigError):
        attach(llama, sw(skip_layers=4))
    with pytest.raises(ConfigError):
        attach(llama, sw(sketch_dim=32))
    assert llama.config._attn_implementation == "sdpa" and get_runtime(llama) is None


def test_mask_function_registered():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    attach(tiny_llama(num_hidden_layers=2), sw(density=1.0))
    # transformers builds no mask at all for implementations missing from this mapping
    assert ATTN_NAME in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    assert ATTN_NAME in ALL_MASK_ATTENTION_FUNCTIONS
    assert ATTN_NAME in AttentionInterface._global_mapping


# --------------------------------------------------------------------------------------
# Loading without attach (lazy runtime)
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["config", "set_attn_implementation"])
@pytest.mark.parametrize("density", [1.0, 0.5])
def test_lazy_runtime_without_attach(llama, how, density):
    ids = tokens(80, seed=4)
    with torch.no_grad():
        dense = llama(ids).logits
    swcfg = dict(block_size=16, sketch_dim=8, skip_layers=1, density=density)
    if how == "config":
        cfg = LlamaConfig(**TINY)
        cfg._attn_implementation = ATTN_NAME
        cfg.sketchwalk_config = swcfg
        model = LlamaForCausalLM(cfg).eval()
        model.load_state_dict(llama.state_dict())
    else:
        model = tiny_llama()  # same seed -> same weights as the fixture
        model.config.sketchwalk_config = swcfg
        model.set_attn_implementation(ATTN_NAME)
    assert model.config._attn_implementation == ATTN_NAME
    with torch.no_grad():
        out = model(ids).logits
    rt = get_runtime(model)
    assert rt is not None and rt.config == SketchWalkConfig.from_dict(swcfg)
    # one runtime shared by every layer, so the walk spans them
    assert {id(m._sketchwalk_runtime) for m in model.modules() if type(m).__name__ == "LlamaAttention"} == {id(rt)}
    rep = rt.density()
    assert sorted(rep.per_layer["prefill"]) == [0, 1, 2, 3]
    if density == 1.0:
        assert (out - dense).abs().max().item() <= 1e-5
        assert rep.overall["prefill"] == 1.0
    else:
        assert rep.sparse_layers["prefill"] < 1.0
        # same as attaching the same config explicitly
        ref_model = tiny_llama()
        attach(ref_model, SketchWalkConfig.from_dict(swcfg))
        with torch.no_grad():
            assert torch.allclose(out, ref_model(ids).logits, atol=1e-6)


# --------------------------------------------------------------------------------------
# Left-padded batches
# --------------------------------------------------------------------------------------

def _padded_batch(lens, seed):
    n = max(lens)
    ids = torch.zeros(len(lens), n, dtype=torch.long)
    mask = torch.zeros(len(lens), n, dtype=torch.long)
    seqs = []
    for b, L in enumerate(lens):
        s = tokens(L, seed=seed + b)[0]
        seqs.append(s)
        ids[b, n - L:] = s
        mask[b, n - L:] = 1
    return ids, mask, seqs


def _position_ids(mask):
    return (mask.cumsum(-1) - 1).clamp_min(0)


@pytest.mark.parametrize("density", [1.0, 0.5])
def test_left_padded_batch_matches_unpadded(llama, density):
    lens = [100, 70]
    n = max(lens)
    ids, mask, seqs = _padded_batch(lens, seed=10)
    rt = attach(llama, sw(density=density))
    rt.keep_selections = True
    seen_valid = []
    orig = rt.attention

    def spy(layer, q, k, v, key_valid, scale):
        seen_valid.append(None if key_valid is None else key_valid.clone())
        return orig(layer, q, k, v, key_valid, scale)

    rt.attention = spy
    with torch.no_grad():
        batch = llama(ids, attention_mask=mask, position_ids=_position_ids(mask)).logits
    # transformers handed the padding to us (mask function registered): one key_valid per layer, = the 2-D mask
    assert len(seen_valid) == 4
    for kv in seen_valid:
        assert kv is not None and torch.equal(kv, mask.bool())
    batch_sels = {l: [sel_rows(s) for s in rt.last_selection[l]] for l in (1, 2, 3)}
    for b, L in enumerate(lens):
        with torch.no_grad():
            solo = llama(seqs[b][None]).logits
        assert (batch[b, n - L:] - solo[0]).abs().max().item() <= 1e-5, b
        for l in (1, 2, 3):
            assert batch_sels[l][b] == sel_rows(rt.last_selection[l][0])  # blocks follow real positions
            if density < 1.0:  # the walk really chose blocks (not only the forced sink + diagonal)
                assert any(len(r) > 2 and len(r) < i + 1 for i, r in enumerate(batch_sels[l][b]))
    if density < 1.0:
        assert rt.density().sparse_layers["prefill"] < 1.0

    # an explicit 4-D float mask (0 = attend, dtype min = masked) gives the same logits
    allowed = torch.tril(torch.ones(n, n, dtype=torch.bool))[None] & mask.bool()[:, None, :]
    mask4d = torch.zeros(len(lens), 1, n, n).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    seen_valid.clear()
    with torch.no_grad():
        batch4d = llama(ids, attention_mask=mask4d, position_ids=_position_ids(mask)).logits
    assert all(torch.equal(kv, mask.bool()) for kv in seen_valid)
    for b, L in enumerate(lens):
        assert (batch4d[b, n - L:] - batch[b, n - L:]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("density", [1.0, 0.5])
def test_left_padded_generate_matches_unpadded(llama, density):
    lens = [100, 75]  # 7 and 5 blocks: density 0.5 leaves free choices in the long rows
    ids, mask, seqs = _padded_batch(lens, seed=20)
    attach(llama, sw(density=density, decode_query="block_mean"))
    seq, logits = greedy(llama, ids, attention_mask=mask, n_new=12)
    for b, L in enumerate(lens):
        s_seq, s_logits = greedy(llama, seqs[b][None], n_new=12)
        assert torch.equal(seq[b, -12:], s_seq[0, -12:]), b
        assert (logits[b] - s_logits[0]).abs().max().item() <= 1e-4, b


# --------------------------------------------------------------------------------------
# Sequence state
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("decode_query", ["token", "block_mean"])
def test_state_resets_per_new_sequence(llama, decode_query):
    cfg = sw(top_k=3, decode_query=decode_query)  # sink + diagonal + one block chosen by the walk
    p1, p2 = tokens(75, seed=30), tokens(70, seed=31)
    attach(llama, cfg)
    greedy(llama, p1, n_new=10)
    seq, logits = greedy(llama, p2, n_new=10)
    rt_fresh = attach(llama, cfg)  # a new runtime, no history
    seq_f, logits_f = greedy(llama, p2, n_new=10)
    assert torch.equal(seq, seq_f)
    assert torch.equal(logits, logits_f)
    assert rt_fresh.density().sparse_layers["decode"] < 1.0


# --------------------------------------------------------------------------------------
# Other LLaMA-family architectures
# --------------------------------------------------------------------------------------

def _family(name):
    cls_cfg = getattr(transformers, f"{name}Config", None)
    cls_model = getattr(transformers, f"{name}ForCausalLM", None)
    if cls_cfg is None or cls_model is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}ForCausalLM")
    return cls_cfg, cls_model


@pytest.mark.parametrize("name,extra", [("Qwen2", {}), ("Qwen3", {}), ("Mistral", {"sliding_window": None})])
def test_other_families_full_density_equal_dense(name, extra):
    cls_cfg, cls_model = _family(name)
    torch.manual_seed(5)
    model = cls_model(cls_cfg(**TINY, **extra, attn_implementation="sdpa")).eval()
    ids = tokens(45, seed=5)
    dense_seq, dense_logits = greedy(model, ids, n_new=12)
    rt = attach(model, sw(density=1.0))
    seq, logits = greedy(model, ids, n_new=12)
    assert torch.equal(seq, dense_seq)
    assert (logits - dense_logits).abs().max().item() <= 1e-5
    assert sorted(rt.density().per_layer["decode"]) == [0, 1, 2, 3]
    attach(model, sw(top_k=2))
    seq_s, logits_s = greedy(model, ids, n_new=12)
    assert torch.isfinite(logits_s).all() and get_runtime(model).density().sparse_layers["prefill"] < 1.0
    detach(model)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name,kw", [("Mistral", {"sliding_window": 8}),
                                     ("Qwen2", {"use_sliding_window": True, "sliding_window": 8,
                                                "max_window_layers": 2})])
def test_sliding_window_models_are_refused(name, kw):
    cls_cfg, cls_model = _family(name)
    torch.manual_seed(6)
    model = cls_model(cls_cfg(**TINY, **kw, attn_implementation="sdpa")).eval()
    with pytest.raises(ValueError, match="sliding-window"):
        attach(model, sw(density=1.0))
    assert model.config._attn_implementation == "sdpa"
