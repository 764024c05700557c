"""One selection per KV head (`selection_heads: kv`: the per-KV-head oracle and Sketch&Walk per KV head).

The spec is independent of the code under test: with one selection per KV head, KV head h and its
query heads must get exactly what a model with only that KV head (and its group's query heads)
gets from the shared selection (oracle, or Sketch&Walk with summed per-head probabilities). So a
runtime on the whole model is compared, head by head, with shared runtimes on head slices: selections exactly, outputs to 1e-5, through prefill and
decode, on the batched and the per-sequence decode paths, the PyTorch reference and the Triton
kernels (interpreter on CPU), on a left-padded batch.
"""
from __future__ import annotations

import pytest
import torch

from sketchwalk.config import ConfigError, SketchWalkConfig
from sketchwalk.method import SketchWalkRuntime, select_blocks
from sketchwalk.method.baselines import block_attention_mass
from sketchwalk.method.selection import BlockSelector
from test_batched_decode import padded_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HQ, HKV, D = 6, 2, 16
G = HQ // HKV


def rand(*shape, gen) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).float()


def inputs_for(lens: list[int], steps: int, layers: int, seed: int, device="cpu"):
    """Left-padded (q, k, v) per layer with this file's heads (test_batched_decode's helper)."""
    return padded_inputs(lens, steps, layers, seed, device, heads=(HQ, HKV), scale=2.0)


def run(cfg, inputs, valid, n0: int, steps: int, backend: str, batched: bool):
    """Prefill n0 tokens and decode `steps`; per (step, layer): output and each sequence's selection indices."""
    rt = SketchWalkRuntime(cfg, backend=backend)
    rt.batched_decode = batched
    rt.keep_selections = True
    scale = D ** -0.5
    record = []
    for t in [None] + list(range(n0, n0 + steps)):
        step = []
        for layer, (q, k, v) in enumerate(inputs):
            if t is None:
                out = rt.attention(layer, q[:, :, :n0], k[:, :, :n0], v[:, :, :n0], valid[:, :n0], scale)
            else:
                out = rt.attention(layer, q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], valid[:, :t + 1], scale)
            step.append((out, [None if s is None else s.indices.long() for s in rt.last_selection[layer]]))
        record.append(step)
    return record, rt


def cfg_of(**kw) -> SketchWalkConfig:
    return SketchWalkConfig(**{"block_size": 16, "sketch_dim": 8, "skip_layers": 1, "selector": "oracle",
                               "density": 0.3, **kw})


SELECTORS = {
    "oracle": dict(),
    # Sketch&Walk per KV head: each group's summed per-head probabilities, no walk.
    "token-keys": dict(selector="sketchwalk", head_aggregation="sum_probs", walk="none", score_block_size=1),
    "sub-blocks-window": dict(selector="sketchwalk", head_aggregation="sum_probs", walk="none", score_block_size=4,
                              decode_query="window", decode_window=8, sketch="exact"),
    "block-means": dict(selector="sketchwalk", head_aggregation="sum_probs", walk="none", decode_query="block_mean"),
}
CASES = [("torch", True, 40, [130, 90, 37], "oracle"), ("torch", False, 40, [130, 90, 37], "oracle"),
         ("triton", True, 12, [130, 90, 37], "oracle"), ("triton", False, 6, [130, 90, 37], "oracle"),
         ("triton", False, 8, [130], "oracle")]
CASES += [("torch", batched, 40, [130, 90, 37], name) for name in SELECTORS if name != "oracle" for batched in (True, False)]
CASES += [("triton", True, 12, [130, 90, 37], "token-keys"), ("triton", False, 6, [130], "token-keys")]


@pytest.mark.parametrize("backend,batched,steps,lens,selector", CASES,
                         ids=[f"{c[4]}-{c[0]}-{'batched' if c[1] else 'per-sequence'}-{len(c[3])}" for c in CASES])
def test_each_kv_head_gets_the_shared_selection_of_its_own_heads(backend, batched, steps, lens, selector):
    if backend == "triton":
        pytest.importorskip("triton", reason="triton is not installed")
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    inputs, valid = inputs_for(lens, steps, layers=3, seed=11, device=device)
    n0 = max(lens)
    # with a length-dependent window too
    cfg = cfg_of(selection_heads="kv", local_fraction=0.1, density=0.5, **SELECTORS[selector])
    got, rt = run(cfg, inputs, valid, n0, steps, backend, batched)
    differ = 0
    for h in range(HKV):
        sliced = [(q[:, h * G:(h + 1) * G], k[:, h:h + 1], v[:, h:h + 1]) for q, k, v in inputs]
        ref, rt_h = run(cfg.replace(selection_heads="shared"), sliced, valid, n0, steps, backend, batched)
        for step, (a, b) in enumerate(zip(got, ref)):
            for layer, ((out, sels), (out_h, sels_h)) in enumerate(zip(a, b)):
                assert torch.allclose(out[:, h * G:(h + 1) * G], out_h, atol=1e-5, rtol=0, equal_nan=False), (step, layer)
                for s, s_h in zip(sels, sels_h):
                    assert (s is None) == (s_h is None)
                    if s is not None:
                        assert torch.equal(s[h], s_h), (step, layer, h)
                        differ += not torch.equal(s[0], s[1])
        assert repr(rt.density()) == repr(rt_h.density())  # the same counts per row: the same density
    assert differ > 0  # the heads really chose differently somewhere


def test_per_head_block_mass_averages_to_the_shared_one():
    gen = torch.Generator().manual_seed(3)
    q, k = rand(HQ, 70, D, gen=gen) * 2, rand(HKV, 70, D, gen=gen) * 2
    for q_start, nq in ((0, 70), (69, 1), (40, 30)):
        per = block_attention_mass(q[:, q_start:q_start + nq], k, D ** -0.5, 16, q_start, per_kv_head=True)
        shared = block_attention_mass(q[:, q_start:q_start + nq], k, D ** -0.5, 16, q_start)
        assert per.shape == (HKV, *shared.shape)
        assert torch.allclose(per.mean(0), shared, atol=1e-6)
        for h in range(HKV):  # each head's = the shared mass of a model with that KV head alone
            alone = block_attention_mass(q[h * G:(h + 1) * G, q_start:q_start + nq], k[h:h + 1], D ** -0.5, 16, q_start)
            assert torch.allclose(per[h], alone, atol=1e-6)


def test_selector_with_a_head_axis_selects_each_head_as_alone():
    cfg = cfg_of(selection_heads="kv")
    selector = BlockSelector(cfg)
    gen = torch.Generator().manual_seed(5)
    for nb in (1, 4, 13):
        scores = torch.rand(HKV, nb, nb, generator=gen)
        got = selector.prefill(scores, torch.int32, nb * 16)
        assert got.heads == HKV and got.indices.shape[:2] == (HKV, nb)
        for h in range(HKV):
            ref = select_blocks(scores[h], torch.arange(nb), cfg, num_blocks=nb)
            assert torch.equal(got.indices[h].long(), ref.indices) and torch.equal(got.counts.long(), ref.counts)
        for i in range(nb):
            row = torch.rand(HKV, 1, i + 1, generator=gen)
            dec = selector.decode(row, i, torch.long, i * 16 + 1)
            for h in range(HKV):
                assert torch.equal(dec.indices[h], select_blocks(row[h], torch.tensor([i]), cfg).indices)


def test_per_head_selection_needs_a_per_head_selector_and_is_refused_by_the_tensor_tools(tmp_path):
    with pytest.raises(ConfigError, match="selection_heads") as info:
        SketchWalkConfig(selection_heads="kv", selector="random")
    assert "oracle" in str(info.value)
    from sketchwalk.validation.replay import _plan

    class Rec:
        meta = {"num_layers": 4, "head_dim": 16}
        layers = [1, 2]

    with pytest.raises(ConfigError, match="head_limit"):
        _plan(Rec(), {"x": cfg_of(selection_heads="kv")}, "cpu")
