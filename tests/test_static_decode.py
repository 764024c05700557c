"""Decode on a static cache (`StaticDecoder`, `SketchWalkRuntime.static_cache`, `method/static_decode.py`):
the same selections and logits as the eager decode on a DynamicCache, step by step across block
boundaries, for prompts that end inside a block and on a block boundary; dense and Sketch&Walk; the
reference path and the Triton kernels (interpreter on the CPU); refusals naming the field. The CUDA
graph replay itself is the `gpu` test at the end."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sketchwalk.bench.e2e import build_model  # noqa: E402
from sketchwalk.bench.e2e_plan import load_shape  # noqa: E402
from sketchwalk.config import SketchWalkConfig  # noqa: E402
from sketchwalk.integration import attach, detach  # noqa: E402
from sketchwalk.integration.static_decoder import StaticDecoder  # noqa: E402
from sketchwalk.method import static_decode  # noqa: E402
from sketchwalk.method.static_decode import static_decode_refusal  # noqa: E402

BS = 16
STEPS = 40  # crosses two block boundaries from either prompt


@pytest.fixture(scope="module")
def tiny64():
    """The tiny random-weight shape in float64: the selection math runs in fp64 too, so near-ties
    that reduction order could flip are out of reach and selections must agree exactly."""
    return build_model(load_shape("tiny"), torch.device("cpu"), torch.float64, 0)


@pytest.fixture(scope="module")
def tiny32():
    """The tiny shape in float32, for the Triton kernels (fp16/bf16/fp32 only): on the GPU where there
    is one (the kernels refuse CPU tensors outside the interpreter), else on the CPU (interpreter)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return build_model(load_shape("tiny"), device, torch.float32, 0)


def _prompt(n: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 512, (batch, n), generator=torch.Generator().manual_seed(n))


def _eager(model, ids: torch.Tensor, steps: int, runtime=None):
    """Greedy decode on a DynamicCache: (tokens fed [steps, B], logits [steps + 1, B, V], selections)."""
    sels = []
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache, logits, fed = out.past_key_values, [out.logits[:, -1]], []
        for _ in range(steps):
            token = logits[-1].argmax(-1)
            fed.append(token)
            out = model(input_ids=token[:, None], past_key_values=cache, use_cache=True, logits_to_keep=1)
            logits.append(out.logits[:, -1])
            if runtime is not None:
                sels.append({layer: [set(s.indices[0].tolist()) - {-1} for s in per_seq]
                             for layer, per_seq in runtime.last_selection.items() if per_seq[0] is not None})
    return torch.stack(fed), torch.stack(logits), sels


def _static(model, ids: torch.Tensor, fed: torch.Tensor, capacity: int, record: bool):
    """The same tokens through a StaticDecoder: (logits [steps + 1, B, V], selections per step)."""
    steps, seen = [], []
    original = static_decode.StaticDecodeBatch.step

    def spy(self, layer, q, k, lengths, sparse, first_sparse):
        idx, cnt = original(self, layer, q, k, lengths, sparse, first_sparse)
        if sparse:
            seen.append((layer, [set(row[:c].tolist()) for row, c in zip(idx, cnt.tolist())]))
        return idx, cnt

    with StaticDecoder(model, ids.shape[0], capacity) as dec:
        static_decode.StaticDecodeBatch.step = spy if record else original
        try:
            logits = [dec.prefill(ids)]
            for token in fed:
                seen.clear()
                logits.append(dec.step(token).clone())
                steps.append(dict(seen))
        finally:
            static_decode.StaticDecodeBatch.step = original
    return torch.stack(logits), steps


CASES = [pytest.param(n, "torch", o, id=f"{name}-torch-{where}")
         for n, where in ((37, "prompt-ends-inside-a-block"), (48, "prompt-ends-on-a-boundary"))
         for name, o in (("paper", {}), ("damped", {"walk": "damped"}),
                         ("block-mean-query", {"decode_query": "block_mean", "walk": "none"}),
                         ("recommended", dict(SketchWalkConfig.preset("recommended").to_dict(), block_size=BS,
                                              sketch_dim=32, density=0.4)),
                         ("sum-probs-subblocks-product", {"head_aggregation": "sum_probs", "score_block_size": 4}))]
# The interpreter runs a kernel launch in ~0.1-1 s: one case, 20 steps (crossing the boundary at 48).
CASES.append(pytest.param(37, "triton", {}, id="paper-triton-prompt-ends-inside-a-block"))


@pytest.mark.parametrize("n,backend,overrides", CASES)
def test_static_decode_equals_the_eager_decode(request, n, backend, overrides):
    # The reference path in fp64; the kernels in fp32, where both decodes still select the same
    # blocks (same fp32 selection math) and only the kernels' split-KV merge order may differ.
    model = request.getfixturevalue("tiny64" if backend == "torch" else "tiny32")
    tol = 1e-9 if backend == "torch" else 2e-5
    steps = STEPS if backend == "torch" else 20
    cfg = SketchWalkConfig.from_dict({**dict(block_size=BS, sketch_dim=32, density=0.4), **overrides})
    runtime = attach(model, cfg, backend=backend)
    try:
        runtime.keep_selections = True
        ids = _prompt(n).to(model.device)
        fed, eager_logits, eager_sels = _eager(model, ids, steps, runtime)
        eager_density = runtime.density().per_layer["decode"]
        runtime.keep_selections = False
        runtime.reset_stats()
        static_logits, static_sels = _static(model, ids, fed, capacity=n + steps + 3, record=True)
        static_density = runtime.density().per_layer["decode"]
    finally:
        detach(model)
    for step, (e, s) in enumerate(zip(eager_sels, static_sels)):
        assert set(e) == set(s) and e == s, f"step {step}: eager {e} vs static {s}"
    assert any(len(sel) < (n + step) // BS + 1 for step, per in enumerate(static_sels)  # not all dense
               for per_seq in per.values() for sel in per_seq)
    torch.testing.assert_close(static_logits, eager_logits, rtol=tol, atol=tol)
    assert static_density.keys() == eager_density.keys()
    for layer, d in eager_density.items():  # the device counters count what the host ones count
        assert static_density[layer] == pytest.approx(d, abs=1e-12)


def test_dense_model_and_dense_decode_config(tiny64):
    ids = _prompt(21, batch=1)
    fed, eager_logits, _ = _eager(tiny64, ids, 12)
    static_logits, _ = _static(tiny64, ids, fed, capacity=40, record=False)
    torch.testing.assert_close(static_logits, eager_logits, rtol=1e-9, atol=1e-9)
    # phases: prefill keeps every decode step dense: any selector decodes on a static cache.
    cfg = SketchWalkConfig(block_size=BS, sketch_dim=32, density=0.4, phases="prefill", head_aggregation="sum_probs",
                           score_block_size=1)
    assert static_decode_refusal(cfg) is None
    attach(tiny64, cfg, backend="torch")
    try:
        fed, eager_logits, _ = _eager(tiny64, ids, 12)
        static_logits, _ = _static(tiny64, ids, fed, capacity=40, record=False)
    finally:
        detach(tiny64)
    torch.testing.assert_close(static_logits, eager_logits, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("overrides,field", [
    ({"selection_heads": "kv", "selector": "oracle"}, "selector"),
    ({"decode_query": "window"}, "decode_query"),
    ({"selector": "oracle"}, "selector"),
    ({"budget_rule": "free_quantile"}, "budget_rule"),
    ({"sink_fraction": 0.02}, "sink_fraction"),
])
def test_unsupported_configs_are_refused_naming_the_field(tiny64, overrides, field):
    cfg = SketchWalkConfig(block_size=BS, sketch_dim=32, **overrides)
    assert field in static_decode_refusal(cfg)
    attach(tiny64, cfg, backend="torch")
    try:
        with pytest.raises(ValueError, match=field):
            StaticDecoder(tiny64, 1, 64)
    finally:
        detach(tiny64)


def test_bad_use_is_refused(tiny64):
    with pytest.raises(ValueError, match="capacity"):
        StaticDecoder(tiny64, 1, 1)
    with pytest.raises(ValueError, match="CUDA"):
        StaticDecoder(tiny64, 1, 64, graph=True)  # tiny64 lives on the CPU
    with StaticDecoder(tiny64, 1, 16) as dec:
        with pytest.raises(ValueError, match="prefill first"):
            dec.step(torch.tensor([1]))
        with pytest.raises(ValueError, match="capacity"):
            dec.prefill(_prompt(16, batch=1))
        dec.prefill(_prompt(15, batch=1))
        dec.step(torch.tensor([1]))
        with pytest.raises(ValueError, match="full"):
            dec.step(torch.tensor([1]))


@pytest.mark.gpu
@pytest.mark.parametrize("config", [None, {}], ids=["dense", "sketchwalk"])
def test_graph_replay_gives_the_eager_tokens_gpu(config):
    """SmolLM2 shape in bf16 on the GPU: greedy tokens from CUDA-graph replays equal those of the same
    static decode run eagerly (same kernels, same order), and the logits of the eager DynamicCache
    decode to bf16 tolerance."""
    model = build_model(load_shape("smollm2"), torch.device("cuda"), torch.bfloat16, 0)
    if config is not None:
        attach(model, SketchWalkConfig(density=0.2, **config), backend="triton")
    ids = torch.randint(0, 49152, (2, 1000), generator=torch.Generator().manual_seed(3)).cuda()
    runs = {}
    for graph in (False, True):
        with StaticDecoder(model, 2, 1200, graph=graph) as dec:
            logits, tokens = dec.prefill(ids), []
            for _ in range(80):  # crosses a block boundary
                tokens.append(logits.argmax(-1))
                logits = dec.step(tokens[-1])
            runs[graph] = torch.stack(tokens)
    assert torch.equal(runs[True], runs[False])
