"""Tensor-level validation: record Q/K/V, replay configs vs dense attention and vs the oracle, the CLI."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sketchwalk import SketchWalkConfig, attach, detach
from sketchwalk.method.attention import sparse_attention
from sketchwalk.method.selection import row_budget
from sketchwalk.validation import RecordSizeError, collect, compare, estimate_bytes, heatmap, load_recording, validate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 128
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=512)
LENGTHS = (100, 70)  # partial last blocks at B = 16


def sw(**kw) -> SketchWalkConfig:
    return SketchWalkConfig(**{**dict(block_size=16, sketch_dim=8, skip_layers=1, density=0.3), **kw})


def tiny_llama(attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY, attn_implementation=attn)).eval()


def prompts() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in LENGTHS]


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def record_dir(llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("rec")
    collect(llama, None, prompts(), out, progress=False, model_name="tiny")
    return out


def expected_density(cfg: SketchWalkConfig, n: int) -> float:
    nb = -(-n // cfg.block_size)
    return sum(row_budget(cfg, i) for i in range(nb)) / (nb * (nb + 1) // 2)


# --------------------------------------------------------------------------------------
# recording
# --------------------------------------------------------------------------------------

def test_files_and_meta_round_trip(llama, record_dir):
    rec = load_recording(record_dir)
    m = rec.meta
    assert (m["model"], m["num_layers"], m["num_heads"], m["num_kv_heads"], m["head_dim"], m["dtype"]) == \
        ("tiny", 4, 4, 2, 16, "float32")
    assert m["layers"] == [0, 1, 2, 3] and m["heads"] == [0, 1, 2, 3] and m["kv_heads"] == [0, 1]
    assert [(e.prompt, e.layer, e.length) for e in rec.entries] == [(p, l, n) for p, n in enumerate(LENGTHS)
                                                                    for l in range(4)]
    assert m["bytes"] == estimate_bytes(LENGTHS, 4, 4, 2, 16, torch.float32)
    assert sum((record_dir / e.file).stat().st_size for e in rec.entries) >= m["bytes"]
    # the recorded tensors are the attention inputs: dense attention over them + o_proj == the module's output
    layer = 2
    captured = {}
    attn = llama.model.layers[layer].self_attn
    handle = attn.register_forward_hook(lambda mod, args, out: captured.update(out=out[0]))  # returns None
    try:
        with torch.no_grad():
            llama(input_ids=prompts()[0][None], use_cache=False)
    finally:
        handle.remove()
    q, k, v = rec.load(0, layer)
    assert q.shape == (4, 100, 16) and k.shape == v.shape == (2, 100, 16)
    o = sparse_attention(q, k, v, torch.arange(100), None, rec.entry(0, layer).scale)
    with torch.no_grad():
        out = attn.o_proj(o.transpose(0, 1).reshape(100, -1))
    assert torch.allclose(out, captured["out"][0], atol=1e-5)
    assert llama.config._attn_implementation == "sdpa"  # the tap is gone


def test_layer_and_head_subsets(llama, record_dir, tmp_path):
    full = load_recording(record_dir)
    rec = collect(llama, None, prompts()[:1], tmp_path / "sub", layers=[1, 3], heads=[1, 2], progress=False)
    assert rec.layers == [1, 3] and [e.layer for e in rec.entries] == [1, 3]
    assert rec.meta["kv_heads"] == [0, 1] and rec.meta["q_to_kv"] == [0, 1]
    q, k, v = rec.load(0, 3)
    fq, fk, fv = full.load(0, 3)
    assert torch.equal(q, fq[[1, 2]]) and torch.equal(k, fk) and torch.equal(v, fv)
    # heads 0, 1, 2: KV heads 0, 0, 1 are not an even grouping; replay pairs each query head with its KV head
    odd = collect(llama, None, prompts()[:1], tmp_path / "odd", layers=[2, 3], heads=[0, 1, 2], progress=False)
    assert odd.meta["q_to_kv"] == [0, 0, 1]
    res = validate(tmp_path / "odd", sw(density=1.0))
    assert all(abs(r["cosine"] - 1) < 1e-5 for r in res.layers)


def test_size_guard_refuses_and_force_records(llama, tmp_path):
    with pytest.raises(RecordSizeError) as info:
        collect(llama, None, prompts(), tmp_path / "big", max_bytes=1000, progress=False)
    est = estimate_bytes(LENGTHS, 4, 4, 2, 16, torch.float32)
    assert info.value.estimate == est and info.value.limit == 1000
    assert str(est) in str(info.value) and "1000" in str(info.value)
    assert not (tmp_path / "big" / "meta.json").exists()
    rec = collect(llama, None, prompts()[:1], tmp_path / "big", layers=[0], max_bytes=1000, force=True, progress=False)
    assert len(rec.entries) == 1


def test_eager_model_is_recorded_and_restored_sketchwalk_refused(tmp_path):
    model = tiny_llama("eager")
    rec = collect(model, None, prompts()[:1], tmp_path / "eager", layers=[0], progress=False)
    assert len(rec.entries) == 1 and model.config._attn_implementation == "eager"
    attach(model, sw())
    try:
        with pytest.raises(ValueError, match="detach"):
            collect(model, None, prompts()[:1], tmp_path / "sw", progress=False)
    finally:
        detach(model)


# --------------------------------------------------------------------------------------
# validate / compare
# --------------------------------------------------------------------------------------

def test_dense_config_has_recall_and_cosine_one(record_dir):
    res = validate(record_dir, sw(density=1.0))
    assert [r["layer"] for r in res.layers] == [0, 1, 2, 3]
    for r in res.layers + res.rows:
        assert r["recall"] == pytest.approx(1.0, abs=1e-5)
        assert r["cosine"] == pytest.approx(1.0, abs=1e-5)
        assert r["rel_error"] <= 1e-5 and r["density"] == 1.0
    assert res.overall["recall"] == pytest.approx(1.0, abs=1e-5)


def test_sparse_config_measured_density_and_errors(record_dir):
    cfg = sw()
    res = validate(record_dir, cfg)
    for r in res.rows:
        n = LENGTHS[r["prompt"]]
        if r["layer"] < cfg.skip_layers:
            assert r["dense"] and r["density"] == 1.0 and r["cosine"] == pytest.approx(1.0, abs=1e-6)
        else:
            assert not r["dense"] and r["density"] == pytest.approx(expected_density(cfg, n), abs=1e-12)
            assert 0 < r["recall"] < 1 and r["cosine"] < 1 and r["rel_error"] > 0 and r["max_abs_error"] > 0
    layer1 = res.layers[1]
    assert layer1["density"] == pytest.approx(sum(expected_density(cfg, n) for n in LENGTHS) / 2)
    assert set(res.overall) == {"cosine", "rel_error", "max_abs_error", "recall", "density"}
    json.dumps(res.to_dict())  # serialisable


def test_oracle_recall_at_least_sketchwalks_on_every_layer(record_dir):
    res = compare(record_dir, sw(density=0.25), ["random", "streaming"])
    assert res.labels == ["sketchwalk", "oracle", "random", "streaming"]
    for r in res.rows:
        oracle = next(o for o in res.rows if o["selector"] == "oracle" and (o["prompt"], o["layer"]) ==
                      (r["prompt"], r["layer"]))
        assert oracle["recall"] >= r["recall"] - 1e-6, (r, oracle)
        assert r["density"] == oracle["density"]  # matched density, by construction
    for layer in (1, 2, 3):
        assert res.layer_row("oracle", layer)["jaccard"] == 1.0
        assert 0 < res.layer_row("sketchwalk", layer)["jaccard"] <= 1
    # validate's recall is compare's
    val = validate(record_dir, sw(density=0.25))
    for layer in range(4):
        assert val.layers[layer]["recall"] == pytest.approx(res.layer_row("sketchwalk", layer)["recall"], abs=1e-12)


def test_decode_replay_oracle_recall_at_least_sketchwalks_every_step(record_dir):
    """Decode steps (the last 20 tokens of each prompt after a prefill of the rest): per step and
    layer the oracle's recall bounds every selector's at the same count; dense layers recall 1."""
    cfg = sw(density=0.5)  # rows of 5-7 blocks: 1-2 free choices besides the sink and local block
    res = compare(record_dir, cfg, ["random"], decode_steps=20)
    assert res.phase == "decode" and res.labels == ["sketchwalk", "oracle", "random"]
    assert len(res.rows) == 2 * 20 * 4 * 3  # prompts x steps x layers x selectors
    by_key = {(r["selector"], r["prompt"], r["layer"], r["length"]): r for r in res.rows}
    for (label, prompt, layer, length), r in by_key.items():
        oracle = by_key[("oracle", prompt, layer, length)]
        assert oracle["recall"] >= r["recall"] - 1e-6, (r, oracle)
        i = (length - 1) // cfg.block_size
        if layer < cfg.skip_layers:
            assert r["dense"] and r["density"] == 1.0 and r["recall"] == pytest.approx(1.0, abs=1e-5)
        else:  # one decode row: row_budget of its block out of its i + 1 causal blocks
            assert not r["dense"] and r["density"] == pytest.approx(row_budget(cfg, i) / (i + 1))
    assert {r["length"] for r in res.rows if r["prompt"] == 0} == set(range(LENGTHS[0] - 19, LENGTHS[0] + 1))
    assert res.overall["oracle"]["recall"] > res.overall["random"]["recall"]
    with pytest.raises(ValueError, match="decode steps"):
        heatmap(res, "unused.png")
    val = validate(record_dir, cfg, decode_steps=20)
    assert val.phase == "decode"
    for layer in range(4):
        assert val.layers[layer]["recall"] == pytest.approx(res.layer_row("sketchwalk", layer)["recall"], abs=1e-12)
    with pytest.raises(ValueError, match="fewer than"):
        validate(record_dir, cfg, decode_steps=LENGTHS[1])


def test_walk_carried_across_recorded_layers_only(llama, tmp_path):
    # layers 2, 3 recorded, skip_layers 1: the walk starts at layer 2 (the first recorded sparse layer)
    collect(llama, None, prompts()[:1], tmp_path / "r", layers=[2, 3], progress=False)
    res = validate(tmp_path / "r", sw())
    assert [r["layer"] for r in res.layers] == [2, 3] and not any(r["dense"] for r in res.layers)


def test_heatmap_png(record_dir, tmp_path):
    res = compare(record_dir, sw(), [])
    path = heatmap(res, tmp_path / "h.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(KeyError):
        heatmap(res, tmp_path / "x.png", layer=7)


# --------------------------------------------------------------------------------------
# CLI: collect -> validate -> compare, JSON + PNG + MLflow
# --------------------------------------------------------------------------------------

def _local_model(path):
    """A tiny random Llama with a word-level tokenizer, saved as a local HF directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]"] + [f"w{i}" for i in range(VOCAB - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(path)
    tiny_llama().save_pretrained(path)
    return path


def test_cli_collect_validate_compare_end_to_end(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from sketchwalk import cli

    model = _local_model(tmp_path / "model")
    g = torch.Generator().manual_seed(2)
    lines = [json.dumps(" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 2, (n,), generator=g)))
             for n in (90, 60)]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    rec = tmp_path / "rec"
    assert cli.main(["tensors", "collect", "--model", str(model), "--prompt-file", str(tmp_path / "prompts.jsonl"),
                     "--layers", "0-3", "--out", str(rec), "--no-progress"]) == 0
    assert [e.length for e in load_recording(rec).entries if e.layer == 0] == [90, 60]
    assert cli.main(["tensors", "collect", "--model", str(model), "--prompt-file", str(tmp_path / "prompts.jsonl"),
                     "--out", str(tmp_path / "big"), "--max-gb", "1e-6", "--no-progress"]) == 2
    assert "limit" in capsys.readouterr().out

    cfg = tmp_path / "sw.yaml"
    sw(density=0.3).to_yaml(cfg)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    track = ["--tracking-uri", uri, "--experiment", "tensors-test"]
    assert cli.main(["tensors", "validate", str(rec), "--config", str(cfg), "--json", str(tmp_path / "v.json"),
                     *track]) == 0
    v = json.loads((tmp_path / "v.json").read_text())
    assert len(v["layers"]) == 4 and v["config"]["density"] == 0.3
    assert cli.main(["tensors", "compare", str(rec), "--config", str(cfg), "--others", "random,streaming",
                     "--json", str(tmp_path / "c.json"), "--png", str(tmp_path / "c.png"), *track]) == 0
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["labels"] == ["sketchwalk", "oracle", "random", "streaming"]
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "validate" in out and "overall" in out and "MLflow run" in out

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tensors-test")
    runs = {r.data.tags["sketchwalk.tensors.action"]: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"validate", "compare"}
    val, cmp_ = runs["validate"], runs["compare"]
    assert val.data.params["density"] == "0.3" and val.data.params["block_size"] == "16"
    assert val.data.metrics["recall"] == pytest.approx(v["overall"]["recall"])
    assert val.data.metrics["cosine.layer.2"] == pytest.approx(v["layers"][2]["cosine"])
    assert cmp_.data.metrics["oracle.recall"] >= cmp_.data.metrics["sketchwalk.recall"] - 1e-6
    assert {a.path for a in client.list_artifacts(val.info.run_id)} == {"v.json"}
    assert {a.path for a in client.list_artifacts(cmp_.info.run_id)} == {"c.json", "c.png"}


# --------------------------------------------------------------------------------------
# the bundled model
# --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_ruler_prompt_validation(tmp_path):
    from sketchwalk import models
    from sketchwalk.ruler import generate_task

    model, tok = models.load("smollm2-135m", dtype="float32", device="cpu", progress=False)
    sample = generate_task("niah_single_1", 1024, 1, tok, seed=0)[0]
    rec = collect(model, tok, [sample["input"] + sample["answer_prefix"]], tmp_path / "rec", progress=False)
    n = rec.entries[0].length
    assert 700 < n <= 1024 and rec.meta["num_layers"] == 30 and len(rec.entries) == 30

    dense = validate(rec, SketchWalkConfig(density=1.0))
    assert all(r["recall"] == pytest.approx(1.0, abs=1e-5) and r["cosine"] == pytest.approx(1.0, abs=1e-5)
               for r in dense.layers)

    cfg = SketchWalkConfig()  # paper defaults, density 0.2
    res = compare(rec, cfg, ["random", "streaming"])
    want = expected_density(cfg, n)
    for layer in range(cfg.skip_layers, 30):
        rows = {s: res.layer_row(s, layer) for s in res.labels}
        assert rows["oracle"]["recall"] >= rows["sketchwalk"]["recall"] - 1e-6, (layer, rows)
        assert all(r["density"] == pytest.approx(want, abs=1e-12) for r in rows.values())
    val = validate(rec, cfg)
    assert val.overall["density"] == pytest.approx(want, abs=1e-12)
    assert val.overall["recall"] == pytest.approx(res.overall["sketchwalk"]["recall"], abs=1e-9)
    # real attention is far from uniform: the oracle keeps much more mass than the density
    assert res.overall["oracle"]["recall"] > want + 0.2
