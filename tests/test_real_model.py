"""The bundled SmolLM2-135M with Sketch&Walk attached answers ~1K-token needle questions (slow: real model)."""
from __future__ import annotations

import pytest
import torch

from sketchwalk import SketchWalkConfig, attach, detach
from sketchwalk.ruler import generate_task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from sketchwalk.models import load

    model, tokenizer = load("smollm2-135m", dtype="float32", device="cpu", progress=False)
    yield model, tokenizer
    detach(model)


def _answer(model, tokenizer, sample) -> str:
    ids = tokenizer(sample["input"] + sample["answer_prefix"], return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_needle_answered_with_sketchwalk_at_half_density(smollm2):
    model, tokenizer = smollm2
    samples = generate_task("niah_single_1", 1024, 2, tokenizer, seed=7, max_context=8192)
    config = SketchWalkConfig(density=0.5)
    for sample in samples:
        assert 700 < sample["length"] <= 1024
        runtime = attach(model, config)
        answer = _answer(model, tokenizer, sample)
        assert sample["outputs"][0] in answer, (answer, sample["outputs"])
        report = runtime.density()
        # Truly sparse: sparse layers computed well under all causal block pairs, in both phases.
        assert report.sparse_layers["prefill"] < 0.75
        assert report.sparse_layers["decode"] < 0.75
        assert report.dense_layer_share["prefill"] == pytest.approx(2 / 30)
        detach(model)


def test_full_density_reproduces_dense_logits(smollm2):
    model, tokenizer = smollm2
    sample = generate_task("niah_single_1", 1024, 1, tokenizer, seed=3, max_context=8192)[0]
    ids = tokenizer(sample["input"], return_tensors="pt", add_special_tokens=False).input_ids[:, :600]
    detach(model)
    with torch.no_grad():
        dense = model(ids).logits
        attach(model, SketchWalkConfig(density=1.0))
        sparse = model(ids).logits
    detach(model)
    rel = (sparse - dense).norm() / dense.norm()
    assert rel < 1e-5, rel.item()


def test_batched_evaluation_matches_batch_one(smollm2):
    """Left-padded batched answers equal the batch-1 answers (fp32, the selection is per sequence),
    the density counters cover the same samples, and only the timed samples carry latencies."""
    from sketchwalk.evaluation import evaluate

    model, tokenizer = smollm2
    config = SketchWalkConfig(density=0.5)
    # Two tasks of one length (budgets 128 and 30), prompts of different lengths: batches of 2 mix
    # the tasks and are padded, the last holds one.
    samples = {("niah_single_1", 1024): generate_task("niah_single_1", 1024, 3, tokenizer, seed=11, max_context=8192),
               ("vt", 1024): generate_task("vt", 1024, 2, tokenizer, seed=11, max_context=8192)}
    single = evaluate(model, tokenizer, config, samples, progress=False)
    batched = evaluate(model, tokenizer, config, samples, progress=False, batch_size=2, timing_samples=2)
    assert [s.prediction for s in batched.samples] == [s.prediction for s in single.samples]
    assert [s.new_tokens for s in batched.samples] == [s.new_tokens for s in single.samples]
    assert batched.accuracy == single.accuracy
    assert batched.density["prefill"] == pytest.approx(single.density["prefill"])
    assert batched.density["decode"] == pytest.approx(single.density["decode"], rel=1e-6)
    timed = [s.prefill_s == s.prefill_s for s in batched.samples]  # not NaN
    assert timed == [True, False, False, True, False]  # one sample per task of the length
    assert batched.prefill_s["1024"] > 0 and "batch-1 pass" in batched.timing
