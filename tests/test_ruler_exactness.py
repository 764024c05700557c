"""RULER exactness (issue 21): our generators write what RULER's generator writes, rule by rule.

Each rule RULER's generator follows and ours once did not gets a direct test: the trailing space
of every vt hop statement, the double space in the vt example's answer, needles and statements
only ever inserted before an existing haystack line, fwe's one fixed shuffle seed, fwe's linear
length search in steps of (L - 50) // 32, vt's 10-line back-off, and the "You is" quirk (off by
default). Then golden samples: a few samples regenerated with fixed seeds must equal, character
for character, the committed files in tests/data/ruler_golden/.

The golden files were produced by our own generator after the fix and checked by hand against
the rules above; they are not RULER's output. The comparison with RULER's own generator output
is tests/test_ruler_reference.py: samples written by lm_eval's port of RULER's generators
(tests/data/ruler_reference/, RULER's repository cannot be fetched here), taken apart into their
random draws and rebuilt by our formatter, byte for byte. Regenerate the golden files (after
a deliberate generator change, with GENERATOR_VERSION bumped) with
    python -m tests.test_ruler_exactness --regenerate     (from the repository root)
All tests use stand-in tokenizers (no model) and run in seconds.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from pathlib import Path

import pytest

from sketchwalk.ruler import GENERATOR_VERSION, RulerError, generate_task, load_suite, read_jsonl, write_jsonl
from sketchwalk.ruler.fitting import fit_and_generate, make_token_counter, make_wrapper
from sketchwalk.ruler.frequent_words import FrequentWordsBuilder, zipf_counts
from sketchwalk.ruler.generate import task_builder
from sketchwalk.ruler.haystacks import NOISE_LINE, insert_lines
from sketchwalk.ruler.tasks import TASKS
from sketchwalk.ruler.variable_tracking import VariableTrackingBuilder

GOLDEN_DIR = Path(__file__).resolve().parent / "data" / "ruler_golden"
VT_HEAD = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
FWE_HEAD = ("Read the following coded text and track the frequency of each coded word. "
            "Find the three most frequently appeared coded words. ")
HOP_RE = re.compile(r"VAR ([A-Z]+) = VAR ([A-Z]+) ")
VALUE_RE = re.compile(r"VAR ([A-Z]+) = (\d{5})")


class SystemPromptTokenizer:
    """Stand-in HF tokenizer: words and punctuation marks are tokens; a chat template with a
    system prompt ("You are ..."), which RULER's singular rewrite turns into "You is ..."."""

    model_max_length = 8192

    def encode(self, text, add_special_tokens=True):
        return re.findall(r"\w+|[^\w\s]", text)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return f"<|system|>\nYou are a helpful assistant.\n<|user|>\n{messages[0]['content']}\n<|assistant|>\n"


class LetterRunTokenizer(SystemPromptTokenizer):
    """Upper-case runs split at M/N, so vt names cost a varying number of tokens and some
    samples do not fit at the probe's size (they back off)."""

    def encode(self, text, add_special_tokens=True):
        return re.findall(r"[A-M]+|[N-Z]+|\w+|[^\w\s]", text)


def _user_turn(text: str) -> str:
    head, tail = "<|user|>\n", "\n<|assistant|>\n"
    return text[text.index(head) + len(head):-len(tail)]


def _vt_parts(content: str) -> tuple[str, str]:
    """(the in-context example, the question) of a vt user turn."""
    cut = content.rindex(VT_HEAD)
    return content[:cut], content[cut:]


VT_ITEM_RE = re.compile(re.escape(NOISE_LINE + "\n") + r"|VAR [A-Z]+ = VAR [A-Z]+ |VAR [A-Z]+ = \d{5}")


def vt_items(part: str) -> list[str]:
    """The items of a vt example's or question's haystack: RULER joins noise items ('...again.\\n')
    and statements with single spaces, so joining them back must give the context exactly."""
    context = part[len(VT_HEAD):part.index("\nQuestion: ")]
    items = VT_ITEM_RE.findall(context)
    assert " ".join(items) == context
    return items


# -- vt: statements byte for byte ----------------------------------------------------------------

def test_vt_hop_statements_end_in_a_space_the_value_statement_does_not():
    (s,) = generate_task("vt", 1024, 1, SystemPromptTokenizer())
    example, question = _vt_parts(_user_turn(s["input"]))
    for part, hops in ((question, 4), (example, 4)):
        statements = [it for it in vt_items(part) if it.startswith("VAR ")]
        assert len(statements) == hops + 1
        assert VALUE_RE.fullmatch(statements[0]), repr(statements[0])  # no trailing space
        for prev, line in zip(statements, statements[1:]):
            m = HOP_RE.fullmatch(line)
            assert m, repr(line)
            assert line.endswith(" ") and not line.endswith("  ")
            assert m.group(2) == prev.split(" ")[1]  # each hop names the previous variable
    names = [it.split(" ")[1] for it in vt_items(question) if it.startswith("VAR ")]
    assert s["outputs"] == names
    # Inline, as RULER writes them: a hop and the next item are two spaces apart, and no line
    # ends in a statement (every statement goes before a noise item).
    assert f"VAR {names[1]} = VAR {names[0]}  " in question
    assert all(ln.endswith("again.") or ln.startswith("Question: ") or ln in ("", VT_HEAD.strip())
               for ln in question.split("\n")), question


def test_vt_example_answer_has_rulers_double_space():
    (s,) = generate_task("vt", 1024, 1, SystemPromptTokenizer())
    example, _ = _vt_parts(_user_turn(s["input"]))
    statements = [it for it in vt_items(example) if it.startswith("VAR ")]
    names = [st.split(" ")[1] for st in statements]
    value = VALUE_RE.match(statements[0]).group(2)
    # RULER: example prompt (ending in the prefix's ': ') + ' ' + ' '.join(names) + '\\n\\n', then
    # '\\n\\n' before the question: two spaces before the names, four newlines after them.
    assert example.endswith(f"{value}, they are:  {' '.join(names)}\n\n\n\n")
    assert not example.endswith("\n\n\n\n\n")
    assert len(names) == 5 and all(len(n) == 3 for n in names)


def test_vt_backs_off_by_ten_lines_at_every_length():
    for length in (1024, 2048, 4096, 8192):
        assert VariableTrackingBuilder(TASKS["vt"], length, None).step == 10
    tok = LetterRunTokenizer()
    builder, seed_text = task_builder("vt", 2048, tok)
    sizes = _sample_sizes(builder, seed_text, tok, "vt", 2048, 12)
    first = {n[0] for n in sizes.values()}
    assert len(first) == 1  # every sample starts at the probe's size
    backed_off = [n for n in sizes.values() if len(n) > 1]
    assert backed_off, "no sample backed off: the test would not see the step"
    for ns in sizes.values():
        assert all(a - b == 10 for a, b in zip(ns, ns[1:])), ns
    # And the question's noise lines are what was built: the last size tried.
    samples = generate_task("vt", 2048, 12, tok)
    for i, s in enumerate(samples):
        _, question = _vt_parts(_user_turn(s["input"]))
        assert question.count(NOISE_LINE) == sizes[i][-1]


def _sample_sizes(builder, seed_text, tok, task, length, num):
    """{sample index: haystack sizes built for it, in order}, by recognising each sample's fresh RNG."""
    from sketchwalk.ruler.templates import tokens_to_generate

    labels = {random.Random(f"{seed_text}:{i}").getstate(): i for i in range(num)}
    sizes: dict[int, list[int]] = {}
    inner = builder.build

    def build(rng, n):
        i = labels.get(rng.getstate())
        if i is not None:
            sizes.setdefault(i, []).append(n)
        return inner(rng, n)

    builder.build = build
    fit_and_generate(task, builder, max_seq_length=length, tokens_to_generate=tokens_to_generate(task),
                     num_samples=num, seed_text=seed_text, wrap=make_wrapper(tok, True),
                     count_tokens=make_token_counter(tok))
    return sizes


# -- placement: before an existing line, never after the last ------------------------------------

def test_line_insertion_goes_before_an_existing_line_only():
    lines = [f"line {i}" for i in range(3)]
    seen = set()
    for seed in range(300):
        out = insert_lines(lines, ["N"], random.Random(seed))
        assert out[-1] == "line 2"  # RULER never appends after the last haystack line
        seen.add(out.index("N"))
    assert seen == {0, 1, 2}  # ... but every position before a line occurs
    two = insert_lines(lines, ["A", "B"], random.Random(0))
    assert two.index("A") < two.index("B") and two[-1] == "line 2"
    with pytest.raises(RulerError, match="2 needles .* 1-line haystack"):
        insert_lines(["x"], ["A", "B"], random.Random(0))


def test_vt_and_noise_niah_never_end_on_an_insertion():
    from sketchwalk.ruler.variable_tracking import _noise_with_chains

    chain = ["VAR A = 1", "VAR B = VAR A ", "VAR C = VAR B "]
    firsts = set()
    for seed in range(200):
        context = _noise_with_chains(random.Random(seed), 4, [chain])
        items = context.replace("VAR B = VAR A  ", "VAR B = VAR A \x00").replace("VAR C = VAR B  ", "VAR C = VAR B \x00")
        items = [it for piece in items.split("\x00") for it in re.split(r"(?<=\n) |(?<=\d) ", piece) if it]
        assert " ".join(items) == context and items[-1] == NOISE_LINE + "\n"
        assert [it for it in items if it.startswith("VAR")] == chain and items.count(NOISE_LINE + "\n") == 4
        firsts.add(items[0])
    assert chain[0] in firsts  # a statement may go before the first line
    tok = SystemPromptTokenizer()
    for seed in range(6):
        (s,) = generate_task("vt", 1024, 1, tok, seed=seed)
        example, question = _vt_parts(_user_turn(s["input"]))
        for part in (example, question):
            assert vt_items(part)[-1] == NOISE_LINE + "\n"
        for task in ("niah_single_1", "niah_multikey_2"):
            (s,) = generate_task(task, 1024, 1, tok, seed=seed)
            body = _user_turn(s["input"]).split("\n")[1:-1]
            last = body[-1]
            assert not any(o in last for o in s["outputs"]), (task, seed, last)


# -- fwe: one shuffle seed, a linear search grid --------------------------------------------------

def test_fwe_shuffles_with_one_fixed_seed():
    builder = FrequentWordsBuilder(TASKS["fwe"], 2048, 50, shuffle_seed=42)
    a, b = (builder.build(random.Random(f"sample {i}"), 600) for i in range(2))

    def ranks(prompt):
        words = prompt.content[len(FWE_HEAD):prompt.content.index("\nQuestion:")].split(" ")
        order = {w: r for r, w in enumerate(["..."] + prompt.outputs)}
        return [order.get(w, -1) for w in words], words

    (ra, wa), (rb, wb) = ranks(a), ranks(b)
    assert wa != wb and a.outputs != b.outputs  # each sample draws its own coded words ...
    assert ra == rb  # ... but places its ranks in the same order
    # That order is random.Random(seed).shuffle of the rank-sorted text, as in RULER.
    counts = zipf_counts(600, builder.vocab_size, 2.0)
    text = [r for r, c in enumerate(counts) for _ in range(c)]
    random.Random(42).shuffle(text)
    assert [r if r < 4 else -1 for r in text] == ra
    other = FrequentWordsBuilder(TASKS["fwe"], 2048, 50, shuffle_seed=7).build(random.Random("sample 0"), 600)
    assert ranks(other)[0] != ra  # the seed is what fixes it


@pytest.mark.parametrize("length", [1024, 4096])
def test_fwe_length_search_steps_by_a_32nd_of_the_budget(length):
    tok = SystemPromptTokenizer()
    builder, seed_text = task_builder("fwe", length, tok)
    budget = length - 50
    assert builder.step == budget // 32 and builder.grid_origin == budget // 6
    sizes = _sample_sizes(builder, seed_text, tok, "fwe", length, 4)
    for ns in sizes.values():
        assert all((n - builder.grid_origin) % builder.step == 0 for n in ns), ns
    # The fit is the last grid point that fits the probe: one step more does not.
    wrap, count = make_wrapper(tok, True), make_token_counter(tok)

    def cost(n):
        p = builder.build(random.Random(seed_text + ":fit"), n)
        return count(wrap(p.content) + p.answer_prefix)

    n_fit = sizes[0][0]
    assert cost(n_fit) <= budget < cost(n_fit + builder.step)


# -- the "You is" quirk: off by default, on request only -----------------------------------------

def test_singular_rewrite_of_the_chat_template_is_opt_in():
    tok = SystemPromptTokenizer()
    plain = generate_task("niah_single_1", 1024, 2, tok)
    quirk = generate_task("niah_single_1", 1024, 2, tok, singularise_chat_template=True)
    assert all(s["input"].startswith("<|system|>\nYou are a helpful assistant.") for s in plain)
    for p, q in zip(plain, quirk):
        assert q["input"] == p["input"].replace("You are", "You is", 1)  # the user turn is untouched
        assert q["outputs"] == p["outputs"] and q["answer_prefix"] == p["answer_prefix"]
    # Only single-value niah tasks are singularised at all; vt / fwe are left as they are.
    for task in ("niah_multikey_2", "vt"):
        kind = "You is" if TASKS[task].family == "niah" else "You are"
        (s,) = generate_task(task, 1024, 1, tok, singularise_chat_template=True)
        assert s["input"].startswith(f"<|system|>\n{kind} a helpful assistant.")
    with pytest.raises(RulerError, match="singularise_chat_template must be true or false"):
        generate_task("niah_single_1", 1024, 1, tok, singularise_chat_template="yes")


def test_suite_option_for_the_quirk_is_validated_and_fingerprinted(tmp_path):
    from sketchwalk.evaluation import suite_fingerprint

    path = tmp_path / "s.yaml"
    path.write_text("tasks: [niah_single_1]\nlengths: [1024]\nsamples: 1\n")
    default = load_suite(path)
    assert default.singularise_chat_template is False
    fp = suite_fingerprint(default)
    assert fp["generator"] == GENERATOR_VERSION and "singularise_chat_template" not in fp
    path.write_text("tasks: [niah_single_1]\nlengths: [1024]\nsamples: 1\nsingularise_chat_template: true\n")
    assert suite_fingerprint(load_suite(path)) != fp
    path.write_text("tasks: [niah_single_1]\nlengths: [1024]\nsamples: 1\nsingularise_chat_template: 1\n")
    with pytest.raises(RulerError, match="singularise_chat_template: Input should be a valid boolean \\(got 1\\)"):
        load_suite(path)


def test_a_generator_change_makes_cached_dense_baselines_miss(tmp_path, monkeypatch):
    """Samples identical, generator version bumped: the cached baseline is not reused."""
    from sketchwalk.evaluation import BaselineKey, EvalResult, load_baseline, store_baseline, suite_fingerprint
    from sketchwalk.evaluation import baseline as baseline_mod

    path = tmp_path / "s.yaml"
    path.write_text("tasks: [vt]\nlengths: [1024]\nsamples: 1\n")
    suite, samples = load_suite(path), {("vt", 1024): [{"input": "x"}]}

    def key():
        return BaselineKey({"files": [["m.gguf", "abc"]]}, suite_fingerprint(suite, samples), "float32", "cpu")

    overall = {"mean": 50.0, "lo": 50.0, "hi": 50.0, "n": 1}
    result = EvalResult("m", None, "cpu", "float32", {"overall": overall}, {}, {}, {"prefill": 1.0}, None, [])
    store_baseline(key(), result, tmp_path / "cache")
    assert load_baseline(key(), tmp_path / "cache") is not None
    monkeypatch.setattr(baseline_mod, "GENERATOR_VERSION", GENERATOR_VERSION + 1)
    assert load_baseline(key(), tmp_path / "cache") is None


# -- golden samples --------------------------------------------------------------------------------

# (file stem, task, length, samples, generate_task keyword arguments); all with SystemPromptTokenizer.
GOLDEN = [
    ("vt@1024", "vt", 1024, 2, {}),
    ("vt@2048-seed7", "vt", 2048, 1, {"seed": 7}),
    ("fwe@1024", "fwe", 1024, 2, {}),
    ("niah_single_1@1024", "niah_single_1", 1024, 2, {}),
    ("niah_single_1@1024-you-is", "niah_single_1", 1024, 1, {"singularise_chat_template": True}),
    ("niah_multikey_2@1024", "niah_multikey_2", 1024, 1, {}),
    ("niah_multikey_3@1024", "niah_multikey_3", 1024, 1, {}),
    ("cwe@1024", "cwe", 1024, 1, {}),
]
# The essays are not ours to redistribute: for an essay task only each sample's sha256 is kept.
GOLDEN_ESSAY = ("niah_single_2@1024", "niah_single_2", 1024, 2)


def _generate(task, length, n, kwargs, essays=None):
    return generate_task(task, length, n, SystemPromptTokenizer(), essays_path=essays, **kwargs)


def _sha256s(samples):
    return [hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest() for s in samples]


@pytest.mark.parametrize("stem, task, length, n, kwargs", GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_samples_character_for_character(stem, task, length, n, kwargs, tmp_path):
    golden = GOLDEN_DIR / f"{stem}.jsonl"
    want = read_jsonl(golden, task)
    got = _generate(task, length, n, kwargs)
    assert len(got) == len(want) == n
    for g, w in zip(got, want):
        if g["input"] != w["input"]:
            at = next(i for i, (a, b) in enumerate(zip(g["input"] + "\0", w["input"] + "\0")) if a != b)
            pytest.fail(f"{stem} sample {g['index']}: input differs at character {at}: "
                        f"got {g['input'][at - 40:at + 40]!r}, golden {w['input'][at - 40:at + 40]!r}")
        assert {k: g[k] for k in w} == w
    assert write_jsonl(tmp_path / "got.jsonl", got).read_bytes() == golden.read_bytes()  # the file itself, byte for byte


def test_golden_essay_samples_by_hash(essays_path):
    stem, task, length, n = GOLDEN_ESSAY
    want = json.loads((GOLDEN_DIR / f"{stem}.sha256.json").read_text())
    assert _sha256s(_generate(task, length, n, {}, essays_path)) == want


def regenerate(essays: Path) -> None:
    """Rewrite the golden files from the current generator (see the module docstring)."""
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    for stem, task, length, n, kwargs in GOLDEN:
        write_jsonl(GOLDEN_DIR / f"{stem}.jsonl", _generate(task, length, n, kwargs))
    stem, task, length, n = GOLDEN_ESSAY
    (GOLDEN_DIR / f"{stem}.sha256.json").write_text(json.dumps(_sha256s(_generate(task, length, n, {}, essays))) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit("usage: python -m tests.test_ruler_exactness --regenerate")
    regenerate(Path(__file__).resolve().parents[2] / "shared" / "data" / "ruler" / "PaulGrahamEssays.json")
