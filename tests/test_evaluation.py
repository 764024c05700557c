"""Evaluation harness (CPU): intervals, the dense-baseline cache, input checks of `sketchwalk eval`
before any weights load, result files, and a slow end-to-end run on the bundled model."""
from __future__ import annotations

import dataclasses

import glob
import json
import math
import os
import struct
from pathlib import Path

import pytest

from sketchwalk import cli, models
from sketchwalk.config import SketchWalkConfig
from sketchwalk.evaluation import (BaselineKey, EvalResult, SampleResult, bootstrap_ci, dense_baseline,
                                   load_baseline, store_baseline, suite_fingerprint)
from sketchwalk.evaluation.harness import accuracy_table
from sketchwalk.evaluation.model_facts import context_length, gguf_metadata, model_identity, shape_without_loading
from sketchwalk.evaluation.report import result_filename, write_result
from sketchwalk.evaluation.timing import TokenClock
from sketchwalk.ruler import load_suite


# -- intervals ------------------------------------------------------------------------------------

def test_bootstrap_ci_hand_cases():
    assert bootstrap_ci([1.0] * 5) == (100.0, 100.0, 100.0)
    assert bootstrap_ci([0.0] * 3) == (0.0, 0.0, 0.0)
    assert all(math.isnan(x) for x in bootstrap_ci([]))
    m, lo, hi = bootstrap_ci([0.0, 1.0] * 10)
    assert m == 50.0 and 25 <= lo < 50 < hi <= 75
    # Fractional per-sample scores (string_match_all), and the same numbers for the same seed.
    m, lo, hi = bootstrap_ci([0.5, 0.75, 1.0, 0.25])
    assert m == 62.5 and lo <= m <= hi and lo >= 25 and hi <= 100
    assert bootstrap_ci([0.5, 0.75, 1.0, 0.25]) == (m, lo, hi)
    # A wider interval with fewer samples.
    few, many = bootstrap_ci([0.0, 1.0]), bootstrap_ci([0.0, 1.0] * 50)
    assert few[2] - few[1] > many[2] - many[1]


def _sample(task="niah_single_1", length=1024, score=1.0, index=0):
    return SampleResult(task, length, index, 900, "123", ["123"], score, 0.5, 1.0, 10, 0.5)


def test_accuracy_table_groups_and_sorts_lengths():
    rs = [_sample(length=2048, score=0.0), _sample(length=1024), _sample(length=1024, score=0.0, index=1)]
    acc = accuracy_table(rs)
    assert list(acc) == ["niah_single_1@1024", "niah_single_1@2048", "overall"]
    assert acc["niah_single_1@1024"]["mean"] == 50.0 and acc["niah_single_1@1024"]["n"] == 2
    assert acc["overall"]["n"] == 3 and acc["overall"]["mean"] == pytest.approx(100 / 3)


def test_token_clock_splits_prefill_and_decode():
    import torch

    clock = TokenClock(torch.device("cpu"))
    clock.start()
    clock.put(torch.zeros(1, 5))  # the prompt: not a token
    assert math.isnan(clock.prefill_s)
    for _ in range(3):
        clock.put(torch.zeros(1))
    assert len(clock.stamps) == 3 and 0 <= clock.prefill_s and 0 <= clock.decode_s
    assert clock.decode_s == clock.stamps[-1] - clock.stamps[0]


# -- batching -------------------------------------------------------------------------------------


class _Ids:
    def __init__(self, ids):
        self.input_ids = ids


class _CharTokenizer:
    """One token per character (ids >= 10); EOS = 2, pad = 0; decode spells tokens back as letters."""

    pad_token_id, eos_token_id = 0, 2

    def __call__(self, text, return_tensors="pt", add_special_tokens=False):
        import torch

        return _Ids(torch.tensor([[10 + ord(c) % 26 for c in text]]))

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + int(t) - 10) for t in ids if int(t) >= 10)


class _EchoModel:
    """Greedy stand-in: row b generates letters 'a'.. and ends with EOS after `_answer_length(real length)`
    of them (a per-sequence answer, so cuts and order are visible); records each call's batch."""

    def __init__(self):
        import torch

        self.calls = []
        self._p = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        return iter([self._p])

    def generate(self, ids, attention_mask, max_new_tokens, do_sample, pad_token_id, streamer=None, **kwargs):
        import torch

        real = attention_mask.sum(-1).tolist()
        self.calls.append((real, max_new_tokens))
        new = torch.full((ids.shape[0], max_new_tokens), pad_token_id, dtype=ids.dtype)
        for b, n in enumerate(real):
            stop = _answer_length(n)
            new[b, :min(stop, max_new_tokens)] = 10 + torch.arange(min(stop, max_new_tokens)) % 26
            if stop < max_new_tokens:
                new[b, stop] = 2
        return torch.cat([ids, new], dim=1)


def _answer_length(prompt_tokens: int) -> int:
    return prompt_tokens * 7 % 90 + 3  # 3..92: some answers outrun the vt and fwe budgets


def _expected_new_tokens(n: int, budget: int) -> int:
    """What a batch-1 greedy generate() of the echo model returns: answer + EOS, cut at the budget."""
    return min(_answer_length(n) + 1, budget)


def test_batched_answers_mix_tasks_of_one_length_and_cut_each_to_its_budget():
    import torch

    from sketchwalk.evaluation.harness import _run_batched
    from sketchwalk.ruler.templates import tokens_to_generate

    tok, model = _CharTokenizer(), _EchoModel()
    flat = []
    for task in ("niah_single_1", "vt", "fwe"):  # budgets 128, 30, 50
        for length in (1024, 2048):
            for i in range(3):
                text = "x" * (40 + 13 * i + len(task) + length // 512)
                flat.append((task, length, {"input": text, "answer_prefix": "", "outputs": ["abc"], "index": i}))
    results = _run_batched(model, tok, flat, torch.device("cpu"), False, 4, [])
    cut_by_budget = 0
    assert [(r.task, r.length, r.index) for r in results] == [(t, n, s["index"]) for t, n, s in flat]
    for r, (task, _, s) in zip(results, flat):
        n = len(s["input"])
        assert r.prompt_tokens == n
        assert r.new_tokens == _expected_new_tokens(n, tokens_to_generate(task))
        letters = min(_answer_length(n), tokens_to_generate(task))
        assert r.prediction == "".join(chr(ord("a") + k % 26) for k in range(letters))
        cut_by_budget += _answer_length(n) >= tokens_to_generate(task)
        assert math.isnan(r.prefill_s)  # nothing timed
    assert cut_by_budget > 0  # the per-task cut was exercised

    # 9 samples per length in batches of 4, 4, 1: tasks mixed, each batch sorted by prompt length,
    # generating up to the largest budget of its tasks.
    assert len(model.calls) == 6
    for real, budget in model.calls:
        assert real == sorted(real)
    lengths_by_call = [sorted(real) for real, _ in model.calls]
    assert sum(len(c) for c in lengths_by_call) == len(flat)
    assert max(b for _, b in model.calls) == 128 and min(b for _, b in model.calls) in (30, 50, 128)


def test_batched_answers_take_speed_from_their_timed_call():
    """A timed sample's decode rate uses the timing call's token count, not the (longer) answer's."""
    import torch

    from sketchwalk.evaluation.harness import _run_batched

    text = "y" * 61  # answer of 61 * 7 % 90 + 3 = 70 letters: longer than the 32-token timing call
    flat = [("niah_single_1", 1024, {"input": text, "answer_prefix": "", "outputs": ["abc"], "index": 0}),
            ("niah_single_1", 1024, {"input": text + "z", "answer_prefix": "", "outputs": ["abc"], "index": 1})]
    timed = [SampleResult("niah_single_1", 1024, 0, 61, "abc", ["abc"], 0.0, 0.05, 3.2, 32, 3.1, position=0)]
    results = _run_batched(_EchoModel(), _CharTokenizer(), flat, torch.device("cpu"), False, 2, timed)
    assert results[0].new_tokens == 71 and results[0].timed_tokens == 32
    assert results[0].prefill_s == 0.05 and results[0].decode_tokens_per_s == pytest.approx(31 / 3.1)
    assert results[1].timed_tokens is None and math.isnan(results[1].decode_tokens_per_s)


def test_samples_sharing_a_ruler_index_keep_their_own_identity():
    """Imported RULER niah files repeat `index` (it is the answer's character offset): keyed by it,
    two samples merged in the timing join and in the ablation report's pairing. They are keyed by
    their position in the suite now; RULER's index stays as data."""
    import torch

    from sketchwalk.evaluation.harness import _run_batched

    flat = [("niah_single_1", 1024, {"input": "y" * 61, "answer_prefix": "", "outputs": ["abc"], "index": 517}),
            ("niah_single_1", 1024, {"input": "y" * 62, "answer_prefix": "", "outputs": ["abc"], "index": 517})]
    timed = [SampleResult("niah_single_1", 1024, 517, 61, "abc", ["abc"], 0.0, 0.05, 3.2, 32, 3.1, position=0),
             SampleResult("niah_single_1", 1024, 517, 62, "abc", ["abc"], 0.0, 0.07, 3.3, 32, 3.2, position=1)]
    results = _run_batched(_EchoModel(), _CharTokenizer(), flat, torch.device("cpu"), False, 2, timed)
    assert [r.index for r in results] == [517, 517] and [r.position for r in results] == [0, 1]
    assert [r.prefill_s for r in results] == [0.05, 0.07]  # each its own timing
    assert len({r.key for r in results}) == 2
    old = EvalResult.from_dict({**_result().to_dict(), "samples": [
        {k: v for k, v in dataclasses.asdict(timed[0]).items() if k != "position"}]})
    assert old.samples[0].key == ("niah_single_1", 1024, 517)  # a result without positions: RULER's index


def test_timing_samples_spread_over_tasks_per_length():
    from sketchwalk.evaluation.harness import _timing_samples

    flat = [(t, n, {"index": i}) for n in (4096, 8192) for t in ("a", "b", "c") for i in range(3)]
    picked = [(t, n, s["index"]) for t, n, s in _timing_samples(flat, 4)]
    assert picked == [("a", 4096, 0), ("b", 4096, 0), ("c", 4096, 0), ("a", 4096, 1),
                      ("a", 8192, 0), ("b", 8192, 0), ("c", 8192, 0), ("a", 8192, 1)]
    assert len(_timing_samples(flat, 100)) == len(flat)  # capped by what exists


# -- the dense-baseline cache ------------------------------------------------------------------

def _result(acc=100.0, dtype="float32") -> EvalResult:
    return EvalResult(model="m", config=None, device="cpu", dtype=dtype,
                      accuracy={"overall": {"mean": acc, "lo": acc, "hi": acc, "n": 1}},
                      prefill_s={"1024": 0.5}, decode_tokens_per_s={"1024": 20.0}, density={"prefill": 1.0},
                      peak_memory_bytes=None, samples=[_sample()])


def _key(**changes) -> BaselineKey:
    base = dict(model={"name": "m", "files": [["/m.gguf", 10, 1]]},
                suite={"name": "s", "tasks": ["niah_single_1"], "lengths": [1024], "samples": 2, "seed": 42,
                       "imports": []},
                dtype="float32", device="cpu")
    base.update(changes)
    return BaselineKey(**base)


def test_baseline_store_load_roundtrip(tmp_path):
    key = _key()
    assert load_baseline(key, tmp_path) is None
    path = store_baseline(key, _result(), tmp_path)
    assert path.parent == tmp_path and key.digest() in path.name
    got = load_baseline(key, tmp_path)
    assert got == _result()
    assert isinstance(got.samples[0], SampleResult)


@pytest.mark.parametrize("change", [
    {"model": {"name": "m", "files": [["/m.gguf", 10, 2]]}},          # weights rewritten (mtime)
    {"model": {"name": "m", "files": [["/m.gguf", 11, 1]]}},          # size
    {"model": {"name": "m", "files": [["/other.gguf", 10, 1]]}},      # another file
    {"suite": {"name": "s", "tasks": ["niah_single_1"], "lengths": [2048], "samples": 2, "seed": 42, "imports": []}},
    {"suite": {"name": "s", "tasks": ["niah_single_1"], "lengths": [1024], "samples": 3, "seed": 42, "imports": []}},
    {"suite": {"name": "s", "tasks": ["niah_single_1"], "lengths": [1024], "samples": 2, "seed": 7, "imports": []}},
    {"dtype": "bfloat16"},
    {"device": "NVIDIA H100"},
])
def test_baseline_invalidated_by_any_component(tmp_path, change):
    store_baseline(_key(), _result(), tmp_path)
    assert _key(**change).digest() != _key().digest()
    assert load_baseline(_key(**change), tmp_path) is None


def test_dense_baseline_hit_miss_and_replacement(tmp_path):
    calls = []

    def fake_evaluate(model, tokenizer, config, samples, **kw):
        assert config is None  # a baseline is always dense
        calls.append(kw)
        return _result(acc=50.0 + len(calls))

    samples = {("niah_single_1", 1024): [{"input": "x", "outputs": ["1"]}]}
    first = dense_baseline(None, None, samples, _key(), cache_dir=tmp_path, evaluate_fn=fake_evaluate)
    assert len(calls) == 1 and first.accuracy["overall"]["mean"] == 51.0
    again = dense_baseline(None, None, samples, _key(), cache_dir=tmp_path, evaluate_fn=fake_evaluate)
    assert len(calls) == 1 and again == first  # hit: not evaluated again
    changed = _key(model={"name": "m", "files": [["/m.gguf", 10, 2]]})  # same slot, new weights
    third = dense_baseline(None, None, samples, changed, cache_dir=tmp_path, evaluate_fn=fake_evaluate)
    assert len(calls) == 2 and third.accuracy["overall"]["mean"] == 52.0
    # The stale entry of the same slot is gone; the new one is the only file.
    assert [p.name for p in tmp_path.glob("*.json")] == [changed.path(tmp_path).name]
    # A corrupted entry is a miss, not a crash.
    changed.path(tmp_path).write_text("{not json")
    dense_baseline(None, None, samples, changed, cache_dir=tmp_path, evaluate_fn=fake_evaluate)
    assert len(calls) == 3


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    from sketchwalk.evaluation import default_cache_dir

    monkeypatch.setenv("SKETCHWALK_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "baselines"
    monkeypatch.delenv("SKETCHWALK_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_dir() == Path.home() / ".cache" / "sketchwalk" / "baselines"


def test_suite_fingerprint_tracks_content(tmp_path):
    rows = [{"index": 0, "input": "q", "outputs": ["a"], "length": 900}]
    jl = tmp_path / "qa.jsonl"
    jl.write_text(json.dumps(rows[0]) + "\n")
    y = tmp_path / "s.yaml"
    y.write_text("tasks: [vt]\nlengths: [1024]\nsamples: 2\nimports: [{path: qa.jsonl, task: qa_1}]\n")
    fp = suite_fingerprint(load_suite(y))
    jl.write_text(json.dumps(dict(rows[0], outputs=["b"])) + "\n")  # same name, new content
    assert suite_fingerprint(load_suite(y)) != fp
    samples = {("vt", 1024): [{"input": "x"}]}
    assert suite_fingerprint(load_suite(y), samples) != suite_fingerprint(load_suite(y), {("vt", 1024): [{"input": "y"}]})


# -- model facts without weights ------------------------------------------------------------------

def _gguf(path: Path, kv: list[tuple[str, int, object]]) -> Path:
    """A GGUF v3 header with the given (key, type, value) pairs and no tensors."""
    out = [b"GGUF", struct.pack("<IQQ", 3, 0, len(kv))]
    for key, vtype, value in kv:
        out += [struct.pack("<Q", len(key)), key.encode(), struct.pack("<I", vtype)]
        if vtype == 8:
            out += [struct.pack("<Q", len(value)), value.encode()]
        elif vtype == 9:  # array of strings
            out.append(struct.pack("<IQ", 8, len(value)))
            out += [struct.pack("<Q", len(s)) + s.encode() for s in value]
        else:
            out.append(struct.pack("<I", value))
    path.write_bytes(b"".join(out))
    return path


def test_gguf_context_length_from_header(tmp_path):
    p = _gguf(tmp_path / "tiny.gguf", [("general.architecture", 8, "llama"),
                                       ("tokenizer.ggml.tokens", 9, ["a", "bb", "ccc"]),
                                       ("llama.context_length", 4, 2048)])
    assert gguf_metadata(p) == {"general.architecture": "llama", "llama.context_length": 2048}
    assert context_length(models.resolve(str(p))) == 2048
    ident = model_identity(models.resolve(str(p)))
    os.utime(p, ns=(1, 1))
    assert model_identity(models.resolve(str(p))) != ident


def _hf_dir(tmp_path: Path, context: int = 512, **config) -> Path:
    d = tmp_path / "tiny-llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": context, **config}))
    return d


def test_model_shape_without_weights(tmp_path):
    """(num_layers, head_dim) from a GGUF header (key_length, else embedding / heads) or config.json."""
    g = _gguf(tmp_path / "a.gguf", [("general.architecture", 8, "llama"), ("llama.block_count", 4, 30),
                                    ("llama.attention.head_count", 4, 9), ("llama.embedding_length", 4, 576)])
    assert shape_without_loading(models.resolve(str(g))) == (30, 64)
    g = _gguf(tmp_path / "b.gguf", [("general.architecture", 8, "qwen2"), ("qwen2.block_count", 4, 2),
                                    ("qwen2.attention.head_count", 4, 4), ("qwen2.embedding_length", 4, 256),
                                    ("qwen2.attention.key_length", 4, 128)])
    assert shape_without_loading(models.resolve(str(g))) == (2, 128)
    assert shape_without_loading(models.resolve(str(_gguf(tmp_path / "c.gguf", [("general.architecture", 8, "llama")])))) is None
    d = _hf_dir(tmp_path, num_hidden_layers=6, num_attention_heads=8, hidden_size=512)
    assert shape_without_loading(models.resolve(str(d))) == (6, 64)
    (d / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 3, "head_dim": 32,
                                                               "num_attention_heads": 2, "hidden_size": 512}}))
    assert shape_without_loading(models.resolve(str(d))) == (3, 32)
    (d / "config.json").write_text("{}")
    assert shape_without_loading(models.resolve(str(d))) is None


# -- `sketchwalk eval`: bad input fails before any weights load ---------------------------------

@pytest.fixture
def no_load(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model must not be loaded for bad input")
    monkeypatch.setattr(models, "load", boom)


def _eval(capsys, *argv) -> tuple[int, str]:
    rc = cli.main(["eval", *argv])
    out = capsys.readouterr()
    return rc, " ".join((out.out + out.err).split())


def _suite(tmp_path, text, name="s.yaml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("suite_text, imports, expect", [
    ("tasks: [niah_single_9]\nlengths: [256]\nsamples: 2\n", None, "unknown task 'niah_single_9'"),
    ("tasks: [vt]\nlengths: [1024]\nsamples: 2\n", None, "length(s) [1024] exceed the context"),
    ("tasks: [vt]\nlengths: [256]\nsamples: 0\n", None, "samples: Input should be greater than 0 (got 0)"),
    ("tasks: []\nlengths: [256]\nsamples: 2\nimports: [{path: qa.jsonl, task: qa_1}]\n",
     '{"index": 0, "input": "q", "length": 5}\n', "missing field 'outputs'"),
    ("tasks: []\nlengths: [256]\nsamples: 2\nimports: [{path: qa.jsonl, task: qa_1}]\n",
     '{"index": 0, "input": "q", "outputs": ["a"], "length": 5\n', "invalid JSON"),
    ("tasks: []\nlengths: [256]\nsamples: 2\nimports: [{path: qa.jsonl, task: qa_1}]\n",
     '{"index": 0, "input": "q", "outputs": ["a"], "length": 900}\n', "exceed the context"),
    ("tasks: [vt]\nlengths: [256]\nsamples: 2\nimports: [{path: missing.jsonl, task: qa_1}]\n", None, "not found"),
])
def test_eval_bad_suite_input(tmp_path, capsys, no_load, suite_text, imports, expect):
    if imports is not None:
        (tmp_path / "qa.jsonl").write_text(imports)
    rc, out = _eval(capsys, "--model", str(_hf_dir(tmp_path)), "--suite", _suite(tmp_path, suite_text))
    assert rc == 2, out
    assert expect in out


@pytest.mark.parametrize("config_text, extra, expect", [
    ("density: [\n", [], "ParserError"),
    ("density: 7\n", [], "density = 7 is invalid"),
    ("densty: 0.2\n", [], "densty"),
    (None, ["--config", "nope.yaml"], "no such file"),
    ("density: 0.2\n", ["--dense"], "--dense and --config"),
])
def test_eval_bad_config(tmp_path, capsys, no_load, config_text, extra, expect):
    suite = _suite(tmp_path, "tasks: [vt]\nlengths: [256]\nsamples: 1\n")
    args = ["--model", str(_hf_dir(tmp_path)), "--suite", suite, *extra]
    if config_text is not None:
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text(config_text)
        args += ["--config", str(cfg)]
    rc, out = _eval(capsys, *args)
    assert rc == 2 and expect in out, out


@pytest.mark.parametrize("config_text, expect", [
    ("skip_layers: 4\n", "skip_layers = 4 is invalid: allowed an integer in [0, 3] for this model (4 layers)"),
    ("sketch_dim: 64\n", "sketch_dim = 64 is invalid: allowed a power of two <= head_dim = 32"),
])
def test_eval_config_too_big_for_the_model(tmp_path, capsys, no_load, config_text, expect):
    """Fields that depend on the model's shape are checked against its header/config, before loading."""
    model = _hf_dir(tmp_path, num_hidden_layers=4, num_attention_heads=4, hidden_size=128)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(config_text)
    rc, out = _eval(capsys, "--model", str(model), "--suite", _suite(tmp_path, "tasks: [vt]\nlengths: [256]\nsamples: 1\n"),
                    "--config", str(cfg))
    assert rc == 2 and expect in out, out


def test_eval_bad_model_and_essays(tmp_path, capsys, no_load, monkeypatch):
    suite = _suite(tmp_path, "tasks: [vt]\nlengths: [256]\nsamples: 1\n")
    rc, out = _eval(capsys, "--model", str(tmp_path / "nope.gguf"), "--suite", suite)
    assert rc == 2 and "--model" in out and "nope.gguf" in out
    monkeypatch.delenv("SKETCHWALK_ESSAYS", raising=False)
    essay_suite = _suite(tmp_path, "tasks: [niah_single_2]\nlengths: [256]\nsamples: 1\n", "e.yaml")
    rc, out = _eval(capsys, "--model", str(_hf_dir(tmp_path)), "--suite", essay_suite)
    assert rc == 2 and "--essays" in out
    rc, out = _eval(capsys, "--model", str(tmp_path / "tiny-llama"), "--suite", "no-such-suite")
    assert rc == 2 and "suite 'no-such-suite' not found" in out


def test_result_file_name_and_content(tmp_path):
    path = write_result(tmp_path / "out", _result(), model="smollm2-135m", suite="ruler-smoke", config_tag="dense")
    assert path.name.startswith("smollm2-135m_ruler-smoke_dense_") and path.suffix == ".json"
    data = json.loads(path.read_text())
    assert data["run"]["model_spec"] == "smollm2-135m" and data["samples"][0]["prediction"] == "123"
    assert "/" not in result_filename("a/b.gguf", "x@4k,8k", "abc")


# -- end to end on the bundled model (slow) ----------------------------------------------------

RESULT_FIELDS = {"model", "config", "device", "dtype", "accuracy", "prefill_s", "decode_tokens_per_s", "density",
                 "peak_memory_bytes", "samples", "attention_s", "timing", "run", "suite"}
SAMPLE_FIELDS = {"task", "length", "index", "prompt_tokens", "prediction", "outputs", "score", "prefill_s",
                 "generate_s", "new_tokens", "decode_s"}


@pytest.mark.slow
def test_eval_end_to_end_dense_and_sparse(tmp_path, capsys):
    # The bundled model comes from the usual cache (fetched there if needed); baselines go to tmp.
    cache = ["--cache-dir", str(tmp_path / "baselines")]
    suite = _suite(tmp_path, "name: smoke1\ntasks: [niah_single_1]\nlengths: [1024]\nsamples: 2\nseed: 42\n")
    cfg = tmp_path / "sw.yaml"
    cfg.write_text("density: 0.5\n")
    out = tmp_path / "runs"
    assert cli.main(["eval", "--suite", suite, "--dense", "--out", str(out), *cache]) == 0
    # The sparse run finds the dense baseline of the first run in the cache: one dense evaluation in all.
    assert cli.main(["eval", "--suite", suite, "--config", str(cfg), "--out", str(out), *cache]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "dense baseline: cached" in text
    (dense_path,) = glob.glob(str(out / "smollm2-135m_smoke1_dense_*.json"))
    (sparse_path,) = [p for p in glob.glob(str(out / "*.json")) if p != dense_path]
    dense, sparse = json.loads(Path(dense_path).read_text()), json.loads(Path(sparse_path).read_text())
    for data in (dense, sparse):
        assert RESULT_FIELDS <= set(data)
        assert len(data["samples"]) == 2 and all(SAMPLE_FIELDS <= set(s) for s in data["samples"])
        assert data["device"] == "cpu" and data["dtype"] == "float32"
        assert data["prefill_s"]["1024"] > 0 and data["accuracy"]["niah_single_1@1024"]["n"] == 2
    assert dense["accuracy"]["niah_single_1@1024"]["mean"] == 100.0
    assert dense["config"] is None and dense["density"]["prefill"] == 1.0
    assert sparse["config"]["density"] == 0.5 and 0 < sparse["density"]["prefill"] < 1
    assert set(sparse["accuracy_delta_vs_dense"]) == set(sparse["accuracy"])
    assert sparse["dense_baseline"]["cached"] is True


# -- bare prefill timing ---------------------------------------------------------------------------

def _tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=64, max_position_embeddings=512,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def test_prefill_forward_timing_leaves_density_and_answers_alone():
    """Bare prefill forwards (prefill_repeats) are timed per timed sample and reported per length,
    but change neither the answers nor the measured density: the runtime's counters and the
    attention timer skip them. Without repeats nothing is reported."""
    from sketchwalk.config import SketchWalkConfig
    from sketchwalk.evaluation.harness import evaluate

    model, tok = _tiny_llama(), _CharTokenizer()
    samples = {("niah_single_1", 128): [{"input": "q" * (100 + 7 * i), "answer_prefix": "", "outputs": ["ab"],
                                         "index": i} for i in range(2)],
               ("vt", 256): [{"input": "r" * 230, "answer_prefix": "", "outputs": ["ab"], "index": 0}]}
    cfg = SketchWalkConfig(block_size=16, sketch_dim=8, skip_layers=1, density=0.3)
    plain = evaluate(model, tok, cfg, samples, progress=False, attention_timing=True)
    timed = evaluate(model, tok, cfg, samples, progress=False, attention_timing=True, prefill_repeats=3)
    assert plain.prefill_forward_s == {} and all(s.prefill_forward_s is None for s in plain.samples)
    assert set(timed.prefill_forward_s) == {"128", "256"}
    assert all(0 < v < 60 for v in timed.prefill_forward_s.values())
    assert all(s.prefill_forward_s > 0 for s in timed.samples)
    assert [s.prediction for s in timed.samples] == [s.prediction for s in plain.samples]
    assert timed.density == plain.density and 0 < timed.density["prefill"] < 1
    batched = evaluate(model, tok, cfg, samples, progress=False, batch_size=2, timing_samples=1, prefill_repeats=2)
    assert set(batched.prefill_forward_s) == {"128", "256"}  # copied from the batch-1 timing pass
    assert sum(s.prefill_forward_s is not None for s in batched.samples) == 2  # one timed per length


def test_uncounted_forwards_and_suspended_timer_record_nothing():
    """Forwards inside `runtime.uncounted()` leave the density counters as they were, and attention
    calls inside `AttentionTimer.suspended()` are not recorded (the harness's timing forwards)."""
    import torch

    from sketchwalk.config import SketchWalkConfig
    from sketchwalk.evaluation.timing import AttentionTimer
    from sketchwalk.integration import attach, detach

    model = _tiny_llama()
    runtime = attach(model, SketchWalkConfig(block_size=16, sketch_dim=8, skip_layers=1, density=0.3))
    try:
        short, long = torch.randint(1, 64, (1, 70)), torch.randint(1, 64, (1, 250))
        with torch.no_grad(), AttentionTimer(model, torch.device("cpu")) as timer:
            model(short)
            alone, calls = runtime.density(), sum(len(v) for v in timer.calls["prefill"].values())
            with runtime.uncounted(), timer.suspended():
                model(long)
            after = runtime.density()
            assert (after.overall["prefill"], after.per_layer) == (alone.overall["prefill"], alone.per_layer)
            assert sum(len(v) for v in timer.calls["prefill"].values()) == calls
            model(long)  # counted and recorded: the weighting changes, so the density does
            assert runtime.density().overall["prefill"] != alone.overall["prefill"]
            assert sum(len(v) for v in timer.calls["prefill"].values()) == 2 * calls
    finally:
        detach(model)


def test_prefill_forward_s_needs_a_repeat():
    import torch

    from sketchwalk.evaluation.timing import prefill_forward_s

    model = _tiny_llama()
    assert prefill_forward_s(model, torch.randint(1, 64, (1, 40)), 2) > 0
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        prefill_forward_s(model, torch.randint(1, 64, (1, 40)), 0)


def test_gpu_baseline_keys_carry_the_prefill_timing():
    """A GPU dense baseline cached before prefill_forward_s existed must not be reused (it lacks it);
    CPU keys are unchanged (nothing new is measured there)."""
    from sketchwalk.evaluation.timing import PREFILL_FORWARD_REPEATS

    assert _key(device="NVIDIA H200").as_dict()["prefill_forward_repeats"] == PREFILL_FORWARD_REPEATS
    assert "prefill_forward_repeats" not in _key().as_dict()


def test_model_shape_reads_objects_dicts_and_text_configs():
    """One derivation of (num_layers, head_dim) for HF config objects and config.json dicts:
    explicit head_dim wins, else hidden_size // heads; multimodal configs answer for the text model;
    a config that says neither is refused naming the field."""
    from transformers import LlamaConfig

    from sketchwalk.model_shape import model_shape

    assert model_shape(LlamaConfig(num_hidden_layers=3, hidden_size=96, num_attention_heads=3)) == (3, 32)
    assert model_shape(LlamaConfig(num_hidden_layers=2, hidden_size=96, num_attention_heads=3, head_dim=16)) == (2, 16)
    assert model_shape({"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9}) == (30, 64)
    assert model_shape({"text_config": {"num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 2},
                        "num_hidden_layers": 99}) == (4, 32)
    with pytest.raises(ValueError, match="head_dim"):
        model_shape({"num_hidden_layers": 4})
    with pytest.raises(ValueError, match="num_hidden_layers"):
        model_shape({"hidden_size": 64, "num_attention_heads": 2})


def test_eval_result_carries_the_config_object_through_json(tmp_path):
    """EvalResult.config is the SketchWalkConfig (None = dense): written as its dict, read back as
    an equal object, so a recorded eval and its trial agree on the config."""
    cfg = SketchWalkConfig(density=0.2, score_block_size=8, dense_last_blocks=1)
    res = dataclasses.replace(_result(), config=cfg)
    data = json.loads(res.to_json(tmp_path / "r.json"))
    assert data["config"] == cfg.to_dict() and data["config"]["dense_last_blocks"] == 1
    back = EvalResult.from_dict(data)
    assert isinstance(back.config, SketchWalkConfig) and back.config == cfg
    assert EvalResult.from_dict(_result().to_dict()).config is None


def test_batches_shrink_to_fit_the_decode_state(monkeypatch, capsys):
    """With little free device memory, batched answers run in smaller batches that fit the runtime's
    decode state (memory_batch_size), with a note saying so; the answers are those of the full batch.
    Without a limit (CPU: no free-memory figure) the batch stays as asked."""
    from sketchwalk.config import SketchWalkConfig
    from sketchwalk.evaluation import harness
    from sketchwalk.method.batched_decode import decode_state_bytes

    model, tok = _tiny_llama(), _CharTokenizer()
    samples = {("niah_single_1", 128): [{"input": "q" * (90 + 5 * i), "answer_prefix": "", "outputs": ["ab"],
                                         "index": i} for i in range(4)]}
    cfg = SketchWalkConfig(block_size=16, sketch_dim=16, skip_layers=1, density=0.3, score_block_size=1,
                           head_aggregation="sum_probs", walk="none")
    sizes = []
    real_generate = model.generate
    monkeypatch.setattr(model, "generate", lambda ids, **kw: sizes.append(ids.shape[0]) or real_generate(ids, **kw))
    full = harness.evaluate(model, tok, cfg, samples, progress=False, batch_size=4, timing_samples=1)
    assert sizes[-1] == 4  # one batch of 4 (after the batch-1 timing pass)
    per_seq = decode_state_bytes(cfg, 3, 4, 16, 115 + 128)  # longest prompt + the task's answer budget
    assert per_seq > 0
    monkeypatch.setattr(harness, "_free_device_bytes", lambda device: int(2.5 * per_seq / harness.DECODE_STATE_SHARE))
    sizes.clear()
    small = harness.evaluate(model, tok, cfg, samples, progress=True, batch_size=4, timing_samples=1)
    assert sizes[1:] == [2, 2]  # 2.5 sequences fit: batches of 2
    assert [s.prediction for s in small.samples] == [s.prediction for s in full.samples]
    assert "answering in batches of 2, not 4" in capsys.readouterr().out
    assert full.density == small.density


def test_decode_state_estimate_matches_what_the_runtime_holds():
    """decode_state_bytes against the bytes of the float tensors a runtime really keeps: the larger of
    its per-sequence states after a prefill and its batched state after one decode step, within 30%;
    and 0 for dense decode or a baseline selector."""
    import torch

    from sketchwalk.config import SketchWalkConfig
    from sketchwalk.method import SketchWalkRuntime
    from sketchwalk.method.batched_decode import decode_state_bytes

    layers, hq, hkv, d, n, bsz = 3, 4, 2, 16, 200, 2
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(bsz, h, n + 1, d, generator=g) for h in (hq, hkv, hkv))
    for kw in (dict(score_block_size=1, head_aggregation="sum_probs", walk="none"), dict(score_block_size=4), {}):
        cfg = SketchWalkConfig(block_size=16, sketch_dim=16, skip_layers=1, density=0.3, **kw)
        rt = SketchWalkRuntime(cfg)
        for layer in range(layers):
            rt.attention(layer, q[:, :, :n], k[:, :, :n], v[:, :, :n], None, 0.25)
        after_prefill = _float_bytes(st for per in rt._states.values() for st in per if st is not None)
        for layer in range(layers):
            rt.attention(layer, q[:, :, n:], k, v, None, 0.25)
        after_step = _float_bytes(rt._batch.layers.values())
        held = max(after_prefill, after_step)
        est = bsz * decode_state_bytes(cfg, layers, hq, d, n)
        assert 0.7 * held <= est <= 1.3 * held, (kw, held, est)
    assert decode_state_bytes(SketchWalkConfig(phases="prefill"), 30, 9, 64, 8192) == 0
    assert decode_state_bytes(SketchWalkConfig(selector="oracle"), 30, 9, 64, 8192) == 0


def _float_bytes(objects) -> int:
    """Bytes of the distinct floating-point tensors held as attributes of `objects`."""
    import torch

    seen, total = set(), 0
    for obj in objects:
        for t in vars(obj).values():
            if isinstance(t, torch.Tensor) and t.dtype.is_floating_point and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def test_deployment_speed_is_timed_after_the_samples_and_counts_nothing():
    """evaluate(speed=plan): the prefill / decode times at the plan's lengths land in
    `deployment_speed` (on the evaluated model when the plan names no shape), while the answers
    and the measured density are those of the run without it; a plan the device cannot hold is
    refused before any sample runs."""
    from sketchwalk.bench.deploy import DeploymentSpeed, SpeedPlanError
    from sketchwalk.config import SketchWalkConfig
    from sketchwalk.evaluation.harness import evaluate

    model, tok = _tiny_llama(), _CharTokenizer()
    samples = {("niah_single_1", 128): [{"input": "q" * 110, "answer_prefix": "", "outputs": ["ab"], "index": 0}]}
    cfg = SketchWalkConfig(block_size=16, sketch_dim=8, skip_layers=1, density=0.3)
    plan = DeploymentSpeed(lengths=[640, 256], repeats=1, warmup=0)  # 640 > the model's 512 positions: timing only
    plain = evaluate(model, tok, cfg, samples, progress=False)
    timed = evaluate(model, tok, cfg, samples, progress=False, speed=plan)
    assert plain.deployment_speed == {}
    speed = timed.deployment_speed
    assert set(speed["prefill_ms"]) == set(speed["decode_ms"]) == {"256", "640"}
    assert all(v > 0 for v in speed["prefill_ms"].values()) and speed["clock"] == "cpu" and speed["shape"] == "model"
    assert [s.prediction for s in timed.samples] == [s.prediction for s in plain.samples]
    assert timed.density == plain.density
    assert EvalResult.from_dict(json.loads(timed.to_json())).deployment_speed == speed
    with pytest.raises(SpeedPlanError, match="speed.lengths"):
        evaluate(model, tok, cfg, samples, progress=False, speed=DeploymentSpeed(lengths=[2 ** 20]))


def test_eval_takes_a_preset_name_and_names_the_presets_for_a_typo(tmp_path, capsys, no_load):
    from sketchwalk.config import SketchWalkConfig
    from sketchwalk.evaluation.plan import prepare_run
    suite = _suite(tmp_path, "tasks: [vt]\nlengths: [256]\nsamples: 1\n")
    model = str(_hf_dir(tmp_path))
    plan = prepare_run(model, suite, config="recommended")
    assert plan.config == SketchWalkConfig.preset("recommended")
    rc, out = _eval(capsys, "--model", model, "--suite", suite, "--config", "recomended")
    assert rc == 2 and "not a preset" in out and "recommended" in out, out
