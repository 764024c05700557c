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
