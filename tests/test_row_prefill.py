"""A batch prefilled a few rows at a time (`integration.row_prefill.prefill_by_rows`) decodes exactly
as the same batch prefilled in one forward: on a DynamicCache (eager decode) and on a StaticCache
(`StaticDecoder(prefill_rows=...)`), dense and with Sketch&Walk attached (its decode states are
joined), in fp64 on the tiny random-weight shape."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from sketchwalk.bench.e2e import build_model
from sketchwalk.bench.e2e_plan import load_shape
from sketchwalk.config import SketchWalkConfig
from sketchwalk.integration import attach, detach
from sketchwalk.integration.row_prefill import prefill_by_rows
from sketchwalk.integration.static_decoder import StaticDecoder

CONFIGS = [None, {}, SketchWalkConfig.preset("recommended").to_dict()]
IDS = ["dense", "paper", "recommended"]


@pytest.fixture(scope="module")
def tiny64():
    return build_model(load_shape("tiny"), torch.device("cpu"), torch.float64, 0)


def _ids(batch=3, n=45):
    return torch.randint(0, 512, (batch, n), generator=torch.Generator().manual_seed(batch * n))


def _attached(model, overrides):
    if overrides is None:
        return None
    cfg = SketchWalkConfig.from_dict({**overrides, "block_size": 16, "sketch_dim": 32, "density": 0.4})
    return attach(model, cfg, backend="torch")


def _decode_dynamic(model, ids, rows, steps=20):
    """Greedy logits [steps + 1, B, V] after a prefill of `rows` sequences per forward (None = all)."""
    with torch.no_grad():
        if rows is None:
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            cache, logits = out.past_key_values, [out.logits[:, -1]]
        else:
            cache = DynamicCache()
            logits = [prefill_by_rows(model, ids, rows, cache, DynamicCache,
                                      lambda chunk, part: model(input_ids=chunk, past_key_values=part, use_cache=True,
                                                                logits_to_keep=1).logits[:, -1])]
        for _ in range(steps):
            out = model(input_ids=logits[-1].argmax(-1)[:, None], past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
            logits.append(out.logits[:, -1])
    return torch.stack(logits)


def _decode_static(model, ids, rows, steps=20):
    with StaticDecoder(model, ids.shape[0], ids.shape[1] + steps + 2, prefill_rows=rows) as dec:
        logits = [dec.prefill(ids)]
        for _ in range(steps):
            logits.append(dec.step(logits[-1].argmax(-1)).clone())
    return torch.stack(logits)


@pytest.mark.parametrize("overrides", CONFIGS, ids=IDS)
@pytest.mark.parametrize("decode", [_decode_dynamic, _decode_static], ids=["dynamic-cache", "static-cache"])
@pytest.mark.parametrize("rows", [1, 2])  # 2 of 3: a short last chunk
def test_row_chunks_decode_as_one_prefill(tiny64, overrides, decode, rows):
    ids = _ids()
    runtime = _attached(tiny64, overrides)
    try:
        whole = decode(tiny64, ids, None)
        density_whole = runtime.density().overall if runtime else None
        if runtime:
            runtime.reset_stats()
        chunked = decode(tiny64, ids, rows)
        density_chunked = runtime.density().overall if runtime else None
    finally:
        detach(tiny64)
    torch.testing.assert_close(chunked, whole, rtol=1e-10, atol=1e-10)
    assert density_chunked == density_whole  # the same pairs counted, prefill and decode


def test_bad_rows_are_refused(tiny64):
    with pytest.raises(ValueError, match="prefill_rows"):
        StaticDecoder(tiny64, 2, 64, prefill_rows=0)
    with pytest.raises(ValueError, match="rows"):
        prefill_by_rows(tiny64, _ids(), 0, DynamicCache(), DynamicCache, lambda c, p: None)
