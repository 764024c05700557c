"""RULER generators, length fitting, suites, JSONL import and scoring (CPU only).

Fast tests use a tiny regex tokenizer; tests marked `slow` use the bundled SmolLM2 tokenizer
(fetched into the cache by `sketchwalk.models.ensure_bundled_gguf`). Expected prompt strings
are written out here literally, from `../shared/docs/ruler.md`, not imported from the code.
"""
from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from sketchwalk.ruler import (RulerError, TASKS, build_suite, generate_task, list_suites, load_suite,
                              metric_for_task, postprocess, read_jsonl, score_task, string_match_all,
                              string_match_part, tokens_to_generate, write_jsonl)
from sketchwalk.ruler import templates
from sketchwalk.ruler.haystacks import DEPTHS, NOISE_LINE, split_sentences

NIAH_PLURAL = ("Some special magic {v} are hidden within the following text. Make sure to memorize it. "
               "I will quiz you about the {v} afterwards.\n")
NIAH_SINGULAR = ("A special magic {v} is hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {v} afterwards.\n")
VT_HEAD = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
CWE_HEAD = ("Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n")
CWE_TAIL = "\nQuestion: What are the 10 most common words in the above list?"
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_HEAD = ("Read the following coded text and track the frequency of each coded word. "
            "Find the three most frequently appeared coded words. ")
FWE_TAIL = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
            "What are the three most frequently appeared words in the above coded text?")
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
NEEDLE_RE = re.compile(r"One of the special magic (numbers|uuids) for (.+?) is: ([0-9a-f-]+)\.")
SMOL_HEAD = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n"
SMOL_TAIL = "<|im_end|>\n<|im_start|>assistant\n"


class RegexTokenizer:
    """Stand-in for a HF tokenizer: words and punctuation marks are tokens; a minimal chat template."""

    model_max_length = 4096

    def encode(self, text, add_special_tokens=True):
        return re.findall(r"\w+|[^\w\s]", text)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return f"<|user|>\n{messages[0]['content']}\n<|assistant|>\n"


@pytest.fixture(scope="module")
def tokenizer():
    """The bundled SmolLM2-135M-Instruct tokenizer (GGUF), loaded once per module."""
    from transformers import AutoTokenizer

    from sketchwalk.models import ModelFetchError, ensure_bundled_gguf
    try:
        path = ensure_bundled_gguf(progress=False)
    except ModelFetchError as e:
        pytest.skip(f"bundled GGUF not available: {e}")
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def generated(tokenizer, request):
    """generated(task, length, n) → samples with the real tokenizer, memoised across tests.
    Only essay tasks ask for the essays (and skip without them)."""
    cache = {}

    def get(task, length, n=3):
        if (task, length, n) not in cache:
            essays = request.getfixturevalue("essays_path") if TASKS[task].needs_essays else None
            cache[(task, length, n)] = generate_task(task, length, n, tokenizer, essays_path=essays)
        return cache[(task, length, n)]

    return get


def _raw(text: str) -> str:
    """The user turn of a SmolLM2-wrapped prompt."""
    assert text.startswith(SMOL_HEAD) and text.endswith(SMOL_TAIL)
    return text[len(SMOL_HEAD):-len(SMOL_TAIL)]


# -- task-specific content checks (shared by the fast and the slow tests) ------------------------

def check_niah(task, content, prefix, outputs):
    spec = TASKS[task]
    needles = NEEDLE_RE.findall(content)
    assert all(kind == spec.type_v for kind, _, _ in needles)  # needles always say 'numbers'/'uuids'
    single = spec.num_q * spec.num_v == 1
    v = spec.type_v[:-1] if single else spec.type_v
    head = (NIAH_SINGULAR if single else NIAH_PLURAL).format(v=v)
    assert content.startswith(head)
    m = re.search(r"\n(What is the|What are all the) special magic (\w+) for (.+) mentioned in the provided text\?$",
                  content)
    assert m and m.group(1) == ("What is the" if single else "What are all the") and m.group(2) == v
    query = m.group(3)
    keys = query.split(", and ") if spec.num_q > 1 else [query]
    if spec.num_q > 1:
        keys = keys[0].split(", ") + keys[1:]
    assert len(keys) == spec.num_q
    assert prefix == f" The special magic {v} for {query} mentioned in the provided text {'is' if single else 'are'}"
    # Every queried key has exactly num_v needles, whose values are the references, in order.
    by_key = {}
    for _, key, value in needles:
        by_key.setdefault(key, []).append(value)
    assert sorted(outputs) == sorted(val for k in keys for val in by_key[k])
    assert all(len(by_key[k]) == spec.num_v for k in keys)
    if spec.haystack == "needle":
        lines = content[len(head):m.start()].split("\n")
        assert len(lines) == len(needles) > spec.num_k  # every line is a needle-shaped distractor or a needle
        assert len(by_key) == len(needles)  # distractor keys never repeat a real key
    else:
        assert len(needles) == spec.num_k * spec.num_v
        assert len(by_key) == spec.num_k
    if spec.haystack == "noise":
        body = content[len(head):m.start()].split("\n")
        assert Counter(body)[NOISE_LINE] == len(body) - len(needles)
    for o in outputs:
        assert o in content
        if spec.type_v == "numbers":
            assert re.fullmatch(r"[1-9]\d{6}", o)
        else:
            assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", o)


def check_vt(content, prefix, outputs):
    assert content.count(VT_HEAD) == 2  # the in-context example, then the question
    question = content[content.rindex(VT_HEAD):]
    m = re.search(r"\nQuestion: Find all variables that are assigned the value (\d{5}) in the text above\.$", question)
    assert m and content.index(VT_HEAD) == 0
    value = m.group(1)
    assert prefix == (" Answer: According to the chain(s) of variable assignment in the text above, "
                      f"5 variables are assgined the value {value}, they are: ")  # RULER's typo
    assert len(outputs) == 5 and all(re.fullmatch(r"[A-Z]{5}", o) for o in outputs) and len(set(outputs)) == 5
    # RULER's bytes: noise items ('...again.\\n') and statements joined by single spaces; each hop
    # statement ends in a space, the value statement does not; the last item is a noise item.
    context = question[len(VT_HEAD):m.start()]
    items = re.findall(re.escape(NOISE_LINE + "\n") + r"|VAR [A-Z]+ = VAR [A-Z]+ |VAR [A-Z]+ = \d{5}", context)
    assert " ".join(items) == context and items[-1] == NOISE_LINE + "\n"
    chain = [it for it in items if it.startswith("VAR ")]
    assert chain == [f"VAR {outputs[0]} = {value}"] + [f"VAR {outputs[j + 1]} = VAR {outputs[j]} " for j in range(4)]
    example = content[:content.rindex(VT_HEAD)]
    # RULER's example answer: ' ' + names after the prefix's ': ' (two spaces), then four newlines.
    assert re.search(r"they are:  [A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3}\n\n\n\n$", example)
    assert value not in example


def check_cwe(content, prefix, outputs, length):
    assert prefix == CWE_PREFIX and content.startswith(CWE_HEAD) and content.endswith(CWE_TAIL)
    assert content.count(CWE_HEAD) == 2 and content.count(CWE_TAIL) == 2
    example, question = content.split("\n" + CWE_HEAD)
    ex_list, ex_answer = example[len(CWE_HEAD):].split(CWE_TAIL + CWE_PREFIX + " ")
    big = length >= 4096
    ex_counts = Counter(re.split(r" ?\d+\. ", " " + ex_list)[1:])
    assert len(ex_counts) == (40 if big else 20)
    ex_common = [w for w, c in ex_counts.items() if c == (10 if big else 3)]
    assert len(ex_common) == 10 and sorted(re.split(r" ?\d+\. ", " " + ex_answer)[1:]) == sorted(ex_common)
    items = re.split(r" ?\d+\. ", " " + question[:-len(CWE_TAIL)])[1:]
    counts = Counter(items)
    assert question.startswith("1. ") and len(items) == sum(counts.values())
    assert len(outputs) == 10 and {counts[o] for o in outputs} == {30 if big else 6}
    assert all(c == (3 if big else 1) for w, c in counts.items() if w not in outputs)
    assert not set(counts) & set(ex_counts)  # example words and question words are disjoint


def check_fwe(content, prefix, outputs):
    assert prefix == FWE_PREFIX and content.startswith(FWE_HEAD) and content.endswith(FWE_TAIL)
    words = content[len(FWE_HEAD):-len(FWE_TAIL)].split(" ")
    ranked = [w for w, _ in Counter(words).most_common()]
    counts = Counter(words)
    assert ranked[0] == "..."
    assert outputs == ranked[1:4] and counts[outputs[2]] > counts[ranked[4]]
    assert all(re.fullmatch(r"[a-z]{6}", o) for o in outputs)


def check_content(task, content, prefix, outputs, length):
    family = templates.family_of(task)
    if family == "niah":
        check_niah(task, content, prefix, outputs)
    elif family == "vt":
        check_vt(content, prefix, outputs)
    elif family == "cwe":
        check_cwe(content, prefix, outputs, length)
    else:
        check_fwe(content, prefix, outputs)


# -- templates -----------------------------------------------------------------------------------

def test_template_strings_match_ruler_md():
    assert templates.TEMPLATES["niah"] == (
        "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
        "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?")
    assert templates.ANSWER_PREFIXES["niah"] == " The special magic {type_needle_v} for {query} mentioned in the provided text are"
    assert templates.TEMPLATES["vt"] == VT_HEAD + "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above."
    assert templates.ANSWER_PREFIXES["vt"] == (" Answer: According to the chain(s) of variable assignment in the text above, "
                                                "{num_v} variables are assgined the value {query}, they are: ")  # RULER's typo
    assert templates.TEMPLATES["cwe"] == CWE_HEAD + "{context}" + CWE_TAIL
    assert templates.ANSWER_PREFIXES["cwe"] == CWE_PREFIX
    assert templates.TEMPLATES["fwe"] == FWE_HEAD + "{context}" + FWE_TAIL
    assert templates.ANSWER_PREFIXES["fwe"] == FWE_PREFIX
    assert templates.TEMPLATES["qa"] == (
        "Answer the question based on the given documents. Only give me the answer and do not output any other words."
        "\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given documents. "
        "Only give me the answer and do not output any other words.\n\nQuestion: {query}")
    assert templates.ANSWER_PREFIXES["qa"] == " Answer:"
    assert [tokens_to_generate(t) for t in ("niah_multikey_3", "vt", "cwe", "fwe", "qa_2")] == [128, 30, 120, 50, 32]
    assert templates.singularise(templates.TEMPLATES["niah"]).format(type_needle_v="number", context="C", query="k") == (
        NIAH_SINGULAR.format(v="number") + "C\nWhat is the special magic number for k mentioned in the provided text?")


def test_depths_and_sentence_splitter():
    assert len(DEPTHS) == 40 and DEPTHS[:4] == (0, 3, 5, 8) and DEPTHS[-1] == 100
    text = 'It began. Mr. Smith met J. Doe in the U.S. today! Was it "late?" No. 3 cats. E.g. this one.'
    assert split_sentences(text) == ["It began.", "Mr. Smith met J. Doe in the U.S. today!", 'Was it "late?"',
                                     "No. 3 cats.", "E.g. this one."]
    assert " ".join(split_sentences(text)) == text


@pytest.mark.parametrize("cost", [
    lambda n: 100 + 3 * n,                        # linear
    lambda n: 50 + n + n * n // 400,              # convex (cwe's list numbers grow in digits)
    lambda n: 700 + 25 * n - 3 * (n % 4 == 0),    # jittery per unit, still increasing
    lambda n: 40 + int(20 * n ** 0.8),            # concave (at least ~1 token per unit, as real units are)
])
@pytest.mark.parametrize("budget", [1000, 7937, 130_944])
def test_search_units_equals_binary_search(cost, budget):
    from sketchwalk.ruler.fitting import search_units

    lo, hi = 1, 10 ** 9  # plain binary search for the largest n with cost(n) <= budget
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid)
    calls = []
    got = search_units(lambda n: calls.append(n) or cost(n), budget, lo=1, step=25)
    assert got == lo
    assert len(calls) <= 32  # a binary search from scratch needs ~30
    assert search_units(cost, budget, lo=1, step=25, cap=lo - 3) == lo - 3  # a cap that fits is returned


# -- RULER length semantics ------------------------------------------------------------------------

def one_step_tokens(task, length, tok, essays=None, chat_template=True):
    """Tokens one back-off step (`builder.step` units) removes near the fitted haystack size,
    measured on the probe sample with the same tokenizer: RULER's worst-case shortfall."""
    import random

    from sketchwalk.ruler.fitting import make_token_counter, make_wrapper, search_units
    from sketchwalk.ruler.generate import task_builder

    builder, seed_text = task_builder(task, length, tok, essays_path=essays, chat_template=chat_template)
    wrap, count = make_wrapper(tok, chat_template), make_token_counter(tok)

    def cost(n):
        p = builder.build(random.Random(seed_text + ":fit"), n)
        return count(wrap(p.content) + p.answer_prefix)

    n = search_units(cost, length - tokens_to_generate(task), lo=builder.min_units, step=builder.step,
                     cap=builder.max_units)
    return cost(n) - cost(max(builder.min_units, n - builder.step))


def assert_ruler_length(samples, task, length, tok, essays=None):
    """RULER's fit: every sample's length (prompt + tokens to generate) is <= the target and at
    most one back-off step below it, plus slack for how much a sample's tokens differ from the
    probe's at the same size: 1%, or 3% for fwe, whose coded words are drawn per sample. fwe may
    lose one step more: RULER's linear search stops on its grid, up to a step below the largest fit."""
    slack = max(4, length * (3 if task == "fwe" else 1) // 100)
    steps = 2 if task == "fwe" else 1
    floor = length - steps * one_step_tokens(task, length, tok, essays) - slack
    for s in samples:
        assert floor <= s["length"] <= length, (task, length, s["length"], floor)


# -- generation with a stand-in tokenizer (fast) -------------------------------------------------

@pytest.mark.parametrize("task", ["niah_single_1", "niah_multikey_2", "niah_multikey_3", "vt", "cwe", "fwe"])
def test_generate_fast_no_essays(task, monkeypatch):
    monkeypatch.delenv("SKETCHWALK_ESSAYS", raising=False)  # these tasks must not need essays
    tok = RegexTokenizer()
    samples = generate_task(task, 1024, 2, tok)
    assert_ruler_length(samples, task, 1024, tok)
    for i, s in enumerate(samples):
        assert list(s) == ["index", "input", "outputs", "length", "answer_prefix"] and s["index"] == i
        assert s["input"].startswith("<|user|>\n") and s["input"].endswith("\n<|assistant|>\n")
        assert s["length"] == len(tok.encode(s["input"] + s["answer_prefix"])) + tokens_to_generate(task)
        content = s["input"][len("<|user|>\n"):-len("\n<|assistant|>\n")]
        check_content(task, content, s["answer_prefix"], s["outputs"], 1024)


def test_essay_task_needs_essays(monkeypatch, tmp_path):
    monkeypatch.delenv("SKETCHWALK_ESSAYS", raising=False)
    with pytest.raises(RulerError, match=r"--essays PATH.*SKETCHWALK_ESSAYS"):
        generate_task("niah_single_2", 1024, 1, RegexTokenizer())
    with pytest.raises(RulerError, match="does not exist"):
        generate_task("niah_single_2", 1024, 1, RegexTokenizer(), essays_path=tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"txt": "x"}')
    with pytest.raises(RulerError, match="field 'text'"):
        generate_task("niah_single_2", 1024, 1, RegexTokenizer(), essays_path=bad)


def test_essays_from_env(monkeypatch, essays_path):
    monkeypatch.setenv("SKETCHWALK_ESSAYS", str(essays_path))
    (s,) = generate_task("niah_single_2", 1024, 1, RegexTokenizer())
    assert "When I was in high school" in s["input"]


def test_length_limits():
    tok = RegexTokenizer()  # model_max_length 4096
    with pytest.raises(RulerError, match=r"max_seq_length 8192 exceeds the model's context of 4096 tokens"):
        generate_task("niah_single_1", 8192, 1, tok)
    with pytest.raises(RulerError, match=r"16384 exceeds the model's context of 8192 tokens \(max_context\)"):
        generate_task("niah_single_1", 16384, 1, tok, max_context=8192)
    assert generate_task("niah_single_1", 8192, 1, tok, max_context=8192)[0]["length"] <= 8192
    with pytest.raises(RulerError, match="too small"):
        generate_task("cwe", 300, 1, tok)
    with pytest.raises(RulerError, match="leaves no room"):
        generate_task("niah_single_1", 128, 1, tok)
    with pytest.raises(RulerError, match="qa_1 is not generated"):
        generate_task("qa_1", 1024, 1, tok)
    with pytest.raises(RulerError, match="unknown RULER task 'niah_single_9'.*niah_single_1"):
        generate_task("niah_single_9", 1024, 1, tok)


def test_base_model_prompt_has_no_wrapper():
    (s,) = generate_task("niah_single_1", 1024, 1, RegexTokenizer(), chat_template=False)
    assert s["input"].startswith(NIAH_SINGULAR.format(v="number"))
    assert s["input"].endswith(" mentioned in the provided text?")


@pytest.mark.parametrize("task, length", [("niah_single_1", 1024), ("niah_multikey_2", 2048), ("cwe", 1024)])
def test_backoff_default_is_rulers_whole_step(task, length):
    tok = RegexTokenizer()
    default = generate_task(task, length, 6, tok)
    assert default == generate_task(task, length, 6, tok, backoff="step")
    assert_ruler_length(default, task, length, tok)
    # The finer opt-in mode stays available and never lands further from the target.
    fine = generate_task(task, length, 6, tok, backoff="overshoot")
    assert all(f["length"] >= d["length"] and f["length"] <= length for f, d in zip(fine, default))
    with pytest.raises(RulerError, match="backoff"):
        generate_task("niah_single_1", 1024, 1, tok, backoff="half")


# -- generation with the real tokenizer (slow) ---------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASKS))
def test_generate_each_task(task, tokenizer, generated, request):
    samples = generated(task, 1024)
    assert [s["index"] for s in samples] == [0, 1, 2]
    essays = request.getfixturevalue("essays_path") if TASKS[task].needs_essays else None
    assert_ruler_length(samples, task, 1024, tokenizer, essays)
    ttg = tokens_to_generate(task)
    for s in samples:
        tokens = len(tokenizer.encode(s["input"] + s["answer_prefix"], add_special_tokens=False))
        assert s["length"] == tokens + ttg
        assert tokens <= 1024 - ttg
        check_content(task, _raw(s["input"]), s["answer_prefix"], s["outputs"], 1024)
    # Each sample draws its own keys / values / words.
    assert len({json.dumps(s["outputs"]) for s in samples}) == len(samples)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["niah_single_2", "niah_multikey_3", "niah_multiquery", "vt", "cwe", "fwe"])
def test_generate_at_4k(task, tokenizer, generated, request):
    essays = request.getfixturevalue("essays_path") if TASKS[task].needs_essays else None
    assert_ruler_length(generated(task, 4096, 2), task, 4096, tokenizer, essays)
    for s in generated(task, 4096, 2):
        tokens = len(tokenizer.encode(s["input"] + s["answer_prefix"], add_special_tokens=False))
        assert s["length"] == tokens + tokens_to_generate(task)
        check_content(task, _raw(s["input"]), s["answer_prefix"], s["outputs"], 4096)


@pytest.mark.slow
def test_singular_and_plural_prompts(generated):
    s = generated("niah_single_1", 1024)[0]
    key = re.search(r"for (\S+) mentioned", s["answer_prefix"]).group(1)
    assert _raw(s["input"]).startswith(NIAH_SINGULAR.format(v="number") + NOISE_LINE + "\n")
    assert _raw(s["input"]).endswith(f"\nWhat is the special magic number for {key} mentioned in the provided text?")
    assert s["answer_prefix"] == f" The special magic number for {key} mentioned in the provided text is"
    s = generated("niah_single_3", 1024)[0]
    assert _raw(s["input"]).startswith("A special magic uuid is hidden within the following text.")
    s = generated("niah_multivalue", 1024)[0]
    key = re.search(r"for (\S+) mentioned", s["answer_prefix"]).group(1)
    assert _raw(s["input"]).startswith(NIAH_PLURAL.format(v="numbers"))
    assert _raw(s["input"]).endswith(f"\nWhat are all the special magic numbers for {key} mentioned in the provided text?")
    assert s["answer_prefix"] == f" The special magic numbers for {key} mentioned in the provided text are"
    assert len(s["outputs"]) == 4
    s = generated("niah_multiquery", 1024)[0]
    assert re.search(r"numbers for [^,]+, [^,]+, [^,]+, and [^,]+ mentioned in the provided text are$", s["answer_prefix"])


@pytest.mark.slow
def test_seed_reproducibility(tokenizer, essays_path, tmp_path):
    def dump(task, seed, n, name):
        return write_jsonl(tmp_path / name, generate_task(task, 1024, n, tokenizer, seed=seed,
                                                          essays_path=essays_path)).read_bytes()

    for task in ("niah_single_2", "niah_multikey_2", "vt"):
        a, b, c = dump(task, 42, 3, "a.jsonl"), dump(task, 42, 3, "b.jsonl"), dump(task, 7, 3, "c.jsonl")
        assert a == b
        assert a != c
        # Sample i does not depend on how many samples were asked for.
        assert dump(task, 42, 2, "d.jsonl") == b"".join(a.splitlines(keepends=True)[:2])


@pytest.mark.slow
def test_build_smoke_suite(tokenizer, essays_path, tmp_path):
    data = build_suite(load_suite("ruler-smoke"), tokenizer, essays_path=essays_path)
    assert sorted(data) == [("niah_single_1", 1024), ("niah_single_1", 2048), ("niah_single_2", 1024),
                            ("niah_single_2", 2048)]
    for (task, length), samples in data.items():
        assert len(samples) == 2
        assert_ruler_length(samples, task, length, tokenizer, essays_path if TASKS[task].needs_essays else None)
    with pytest.raises(RulerError, match=r"exceed the model's context of 1024.*ruler-smoke@1024"):
        build_suite(load_suite("ruler-smoke"), tokenizer, essays_path=essays_path, max_context=1024)


# -- scoring -------------------------------------------------------------------------------------

def test_postprocess():
    assert postprocess("  7654321\x00and\t1234567 \n") == "7654321\nand\n1234567"
    assert postprocess("\x1b[0m ok") == "[0m ok"


def test_string_match_metrics():
    preds = ["The numbers are 1234567 and 7654321.", "nothing here", "ABC def"]
    refs = [["1234567", "7654321", "1111111"], ["42"], ["abc", "DEF"]]
    assert string_match_all(preds, refs) == round((2 / 3 + 0 + 1) / 3 * 100, 2) == 55.56
    assert string_match_part(preds, refs) == 66.67
    assert string_match_all(["x"], [["x"]]) == 100.0 and string_match_all(["y"], [["x"]]) == 0.0
    assert metric_for_task("qa_1") is string_match_part
    assert all(metric_for_task(t) is string_match_all for t in TASKS)
    assert score_task("vt", [" VAR ABCDE\x00 FGHIJ "], [["abcde", "fghij"]]) == 100.0
    with pytest.raises(RulerError):
        metric_for_task("mmlu")
    with pytest.raises(RulerError, match="2 predictions but 1"):
        string_match_all(["a", "b"], [["a"]])
    with pytest.raises(RulerError, match="non-empty list"):
        string_match_part(["a"], ["a"])
    with pytest.raises(RulerError, match="no predictions"):
        string_match_all([], [])


# -- JSONL ---------------------------------------------------------------------------------------

def test_jsonl_roundtrip_and_import(tmp_path):
    samples = [{"index": 0, "input": "Q ü", "outputs": ["a"], "length": 12, "answer_prefix": " A:"}]
    p = write_jsonl(tmp_path / "x" / "s.jsonl", samples)
    assert p.read_text(encoding="utf-8") == json.dumps(samples[0], ensure_ascii=False) + "\n"
    assert read_jsonl(p) == samples
    # Old and new RULER files as they are: no answer_prefix; length_w_model_temp and extras kept.
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({"index": 3, "input": "[INST] q [/INST] Answer:", "outputs": ["x", "y"], "length": 99})
                   + "\n\n" + json.dumps({"index": 4, "input": "q", "outputs": ["z"], "length": 7,
                                          "length_w_model_temp": 9, "answer_prefix": " Answer:",
                                          "token_position_answer": 2}) + "\n")
    got = read_jsonl(old, task="qa_1")
    assert got[0]["answer_prefix"] == "" and got[0]["outputs"] == ["x", "y"]
    assert got[1]["length_w_model_temp"] == 9 and got[1]["token_position_answer"] == 2


@pytest.mark.parametrize("line, message", [
    ('{"index": 0, "input": "q", "length": 5}', r"line 2: missing field 'outputs'"),
    ('{"index": 0, "outputs": ["a"], "length": 5}', r"line 2: missing field 'input'"),
    ('{"index": 0, "input": "q", "outputs": "a", "length": 5}', r"line 2: field 'outputs' must be a non-empty list"),
    ('{"index": 0, "input": "q", "outputs": ["a"], "length": "5"}', r"line 2: field 'length' must be"),
    ('{"index": 0, "input": "q", "outputs": ["a"], "length": 5, "answer_prefix": 1}', r"line 2: field 'answer_prefix'"),
    ('{"index": 0, "input": "q", "outputs": ["a"], "length": 5', r"line 2: invalid JSON"),
    ('[1, 2]', r"line 2: expected a JSON object"),
])
def test_jsonl_import_errors(tmp_path, line, message):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"index": 0, "input": "q", "outputs": ["a"], "length": 5}\n' + line + "\n")
    with pytest.raises(RulerError, match=re.escape(str(p)) + r" \(qa_2\) " + message):
        read_jsonl(p, task="qa_2")


def test_jsonl_unreadable(tmp_path):
    with pytest.raises(RulerError, match=r"cannot read RULER JSONL .*missing\.jsonl"):
        read_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(RulerError, match="holds no samples"):
        read_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(RulerError, match="unknown RULER task"):
        read_jsonl(tmp_path / "empty.jsonl", task="qa_3")


# -- suites --------------------------------------------------------------------------------------

def test_builtin_suites():
    assert {"ruler-smoke", "ruler-niah", "ruler-11"} <= set(list_suites())
    smoke = load_suite("ruler-smoke")
    assert (smoke.tasks, smoke.lengths, smoke.samples, smoke.seed) == (("niah_single_1", "niah_single_2"),
                                                                        (1024, 2048), 2, 42)
    niah = load_suite("ruler-niah")
    assert niah.tasks == tuple(t for t in TASKS if t.startswith("niah")) and len(niah.tasks) == 8
    assert (niah.lengths, niah.samples) == ((4096, 8192), 20)
    r11 = load_suite("ruler-11")
    assert r11.tasks == tuple(TASKS) and len(r11.tasks) == 11 and r11.lengths == (4096, 8192) and r11.samples == 20
    assert load_suite("ruler-11@4k,8k") == r11
    assert load_suite("ruler-11@2k").lengths == (2048,)
    assert load_suite("ruler-smoke@1024,16K").lengths == (1024, 16384)


def _write_suite(tmp_path, text):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("body, message", [
    # Every error names the file, the field (a dotted path) and what is allowed there.
    ("tasks: [niah_single_1, needle_x]\nlengths: [1024]\nsamples: 2",
     r"s\.yaml: tasks\.1: unknown task 'needle_x'; known tasks: niah_single_1, "),
    ("tasks: [qa_1]\nlengths: [1024]\nsamples: 2", r"tasks\.0: task qa_1 cannot be generated.*imports"),
    ("tasks: vt\nlengths: [1024]\nsamples: 2", r"tasks: Input should be a valid list \(got 'vt'\)"),
    ("tasks: [vt]\nlengths: [1024, -5]\nsamples: 2", r"lengths\.1: length must be positive, got -5"),
    ("tasks: [vt]\nlengths: [1024, 0]\nsamples: 2", r"lengths\.1: length must be positive"),
    ("tasks: [vt]\nlengths: [1024, 4x]\nsamples: 2", r"lengths\.1: invalid length '4x': use tokens \(8192\) or k-units"),
    ("tasks: [vt]\nlengths: []\nsamples: 2", r"lengths: must be a non-empty list of token counts"),
    ("tasks: [vt]\nsamples: 2", r"lengths: Field required"),
    ("tasks: [vt]\nlengths: [1024, 1k]\nsamples: 2", r"lengths: duplicate lengths: 1024"),
    ("tasks: [vt]\nlengths: [1024]\nsamples: 0", r"samples: Input should be greater than 0 \(got 0\)"),
    ("tasks: [vt]\nlengths: [1024]\nsamples: '3'", r"samples: Input should be a valid integer \(got '3'\)"),
    ("tasks: [vt]\nlengths: [1024]\nsamples: true", r"samples: Input should be a valid integer \(got True\)"),
    ("tasks: [vt]\nlengths: [1024]\nsamples: 2\nseed: x", r"seed: Input should be a valid integer \(got 'x'\)"),
    ("name: ''\ntasks: [vt]\nlengths: [1024]\nsamples: 2", r"name: String should have at least 1 character"),
    ("tasks: [vt, vt]\nlengths: [1024]\nsamples: 2", r"tasks: duplicate tasks: vt"),
    # An unknown key comes first (a typo also leaves its real key missing) and lists the allowed keys.
    ("tasks: [vt]\nlengths: [1024]\nsample: 3", r"sample: unknown key; allowed keys here: \['name', 'tasks', "
                                               r"'lengths', 'samples', 'seed', 'imports', 'description', 'singularise_chat_template'\] \(got 3\)"),
    ("tasks: [vt]\nlengths: [1024]\nsamples: 2\nsource: x", r"source: unknown key; allowed keys here: \['name'"),
    ("tasks: [vt]\nlengths: [1024]\nsamples: 2\nimports: [{path: nope.jsonl, task: qa_1}]",
     r"imports\.0\.path: file .*nope\.jsonl not found"),
    ("tasks: [vt]\nlengths: [1024]\nsamples: 2\nimports: [{path: q.jsonl, task: qa_9}]",
     r"imports\.0\.task: Input should be 'niah_single_1', .* 'qa_1' or 'qa_2' \(got 'qa_9'\)"),
    ("tasks: [vt]\nlengths: [1024]\nsamples: 2\nimports: [{path: q.jsonl, task: qa_1, pth: x}]",
     r"imports\.0\.pth: unknown key; allowed keys here: \['path', 'task', 'length'\]"),
    ("tasks: [vt]\nlengths: [1024]\nsamples: 2\nimports: [{path: q.jsonl, task: qa_1, length: 2k}]",
     r"imports\.0\.length: 2048 is not one of the suite's lengths \[1024\]$"),
    ("tasks: [vt]\nlengths: [1024]\nsamples: 2\nimports: [{path: q.jsonl, task: vt, length: 1k}]",
     r"imports\.0: vt at 1024 is both generated and imported$"),
    ("tasks: []\nlengths: [1024]\nsamples: 2", r"no 'tasks' and no 'imports': nothing to evaluate$"),
    ("- just a list", r"expected a mapping with keys name, tasks, lengths"),
])
def test_suite_validation(tmp_path, body, message):
    write_jsonl(tmp_path / "q.jsonl", [{"index": 0, "input": "q", "outputs": ["a"], "length": 900}])
    with pytest.raises(RulerError, match=message):
        load_suite(_write_suite(tmp_path, body))


def test_suite_replace_validates_again(tmp_path):
    """`Suite.replace` (eval/sweep --samples, the '@' lengths) re-checks the changed fields with the
    same messages as the file, and keeps where the suite came from."""
    p = _write_suite(tmp_path, "tasks: [vt]\nlengths: [1024]\nsamples: 2\n")
    suite = load_suite(p)
    assert (suite.replace(samples=5).samples, suite.replace(samples=5).source) == (5, p)
    assert suite.replace(samples=5).to_dict() == {"name": "s", "tasks": ["vt"], "lengths": [1024], "samples": 5,
                                                  "seed": 42, "imports": [], "description": "",
                                                  "singularise_chat_template": False, "source": str(p)}
    with pytest.raises(RulerError, match=r"s\.yaml: samples: Input should be greater than 0 \(got 0\)"):
        suite.replace(samples=0)
    with pytest.raises(RulerError, match=r"s\.yaml: lengths: duplicate lengths: 1024"):
        load_suite(f"{p}@1k,1024")
    with pytest.raises(ValueError, match=r"frozen"):  # immutable, as the dataclass was
        suite.samples = 3  # type: ignore[misc]


def test_suite_errors_by_name():
    with pytest.raises(RulerError, match=r"suite 'ruler-12' not found; built-in suites: ruler-11"):
        load_suite("ruler-12")
    with pytest.raises(RulerError, match="invalid length 'x4'"):
        load_suite("ruler-11@x4")


def test_suite_imports(tmp_path):
    rows = [{"index": i, "input": f"q{i}", "outputs": ["a"], "length": 900 + i, "answer_prefix": " Answer:"}
            for i in range(3)]
    write_jsonl(tmp_path / "qa1.jsonl", rows)
    write_jsonl(tmp_path / "qa2.jsonl", rows)
    p = _write_suite(tmp_path, "name: mine\ntasks: []\nlengths: [1024, 2048]\nsamples: 2\nimports:\n"
                               "  - {path: qa1.jsonl, task: qa_1}\n  - {path: qa2.jsonl, task: qa_2, length: 2k}\n")
    suite = load_suite(p)
    assert [(i.task, i.length) for i in suite.imports] == [("qa_1", None), ("qa_2", 2048)]
    data = build_suite(suite, RegexTokenizer())
    assert sorted(data) == [("qa_1", 1024), ("qa_2", 2048)]  # qa_1's length inferred from its samples
    assert data[("qa_1", 1024)] == rows[:2]
    # '@' drops imports pinned to other lengths.
    assert [i.task for i in load_suite(f"{p}@1k").imports] == ["qa_1"]


def test_short_samples_are_named_as_rulers_back_off():
    """Issue 21: half the niah_single_2 samples at 1K/2K were far below their length. That is
    RULER's step back-off (500 essay words per retry at every length); eval and sweep now say so."""
    from sketchwalk.ruler import short_samples_note

    samples = {("niah_single_2", 1024): [{"length": 1020}, {"length": 427}],
               ("niah_single_2", 2048): [{"length": 2040}, {"length": 1450}],
               ("niah_single_1", 1024): [{"length": 1019}, {"length": 1023}]}
    note = short_samples_note(samples)
    assert note.startswith("short samples: 1 of 2 niah_single_2@1024 (shortest 427 tokens), "
                           "1 of 2 niah_single_2@2048 (shortest 1450 tokens) are more than 20% below")
    assert "RULER's behaviour" in note and "500 essay words" in note and "niah_single_1" not in note
    assert short_samples_note({("vt", 1024): [{"length": 1000}]}) is None
