"""backend = triton gives the reference's results: the runtime and a tiny model through both backends.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
anything imports triton); on a GPU the same tests run compiled.
"""
from __future__ import annotations

import pytest
import torch

from sketchwalk import SketchWalkConfig, SketchWalkRuntime, attach, detach

triton = pytest.importorskip("triton", reason="triton is not installed")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _run_layers(backend: str, cfg, q, k, v, key_valid, layers=3):
    rt = SketchWalkRuntime(cfg, backend=backend)
    outs = [rt.attention(layer, q, k, v, key_valid, q.shape[-1] ** -0.5) for layer in range(layers)]
    # one decode step on top of the prefill
    g = torch.Generator(device="cpu").manual_seed(11)
    k2 = torch.cat([k, torch.randn(k.shape[0], k.shape[1], 1, k.shape[3], generator=g).to(k)], 2)
    v2 = torch.cat([v, torch.randn(v.shape[0], v.shape[1], 1, v.shape[3], generator=g).to(v)], 2)
    q2 = torch.randn(q.shape[0], q.shape[1], 1, q.shape[3], generator=g).to(q)
    valid2 = None if key_valid is None else torch.cat([key_valid, torch.ones_like(key_valid[:, :1])], 1)
    outs += [rt.attention(layer, q2, k2, v2, valid2, q.shape[-1] ** -0.5) for layer in range(layers)]
    return outs, rt.density()


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("kw", [dict(top_k=3), dict(density=1.0), dict(density=0.4, phases="prefill"),
                                dict(density=0.4, score_block_size=1, head_aggregation="sum_probs", walk="none",
                                     dense_last_blocks=1)])
def test_triton_backend_matches_torch_reference(padded, kw):
    g = torch.Generator().manual_seed(3)
    bsz, hq, hkv, n, d = 2, 6, 2, 90, 32
    q, k, v = (torch.randn(bsz, h, n, d, generator=g) for h in (hq, hkv, hkv))
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    key_valid = None
    if padded:
        key_valid = torch.ones(bsz, n, dtype=torch.bool, device=DEVICE)
        key_valid[1, :23] = False
    cfg = SketchWalkConfig(block_size=16, sketch_dim=16, skip_layers=1, **kw)
    ref, dens_ref = _run_layers("torch", cfg, q, k, v, key_valid)
    out, dens = _run_layers("triton", cfg, q, k, v, key_valid)
    for a, b in zip(ref, out):
        assert torch.isfinite(b).all()
        assert ((b - a).norm() / a.norm()).item() < 1e-4
    assert dens.overall == dens_ref.overall


def test_tiny_llama_generates_identically_on_both_backends():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval().to(DEVICE)
    ids = torch.randint(0, 128, (1, 70), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    outs = {}
    for backend in ("torch", "triton"):
        attach(model, SketchWalkConfig(block_size=16, sketch_dim=16, top_k=2, skip_layers=1), backend=backend)
        with torch.no_grad():
            outs[backend] = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                           output_logits=True, return_dict_in_generate=True)
        detach(model)
    assert torch.equal(outs["torch"].sequences, outs["triton"].sequences)
    for a, b in zip(outs["torch"].logits, outs["triton"].logits):
        assert (a - b).abs().max().item() < 1e-4


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        SketchWalkRuntime(SketchWalkConfig(), backend="cuda")
