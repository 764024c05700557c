"""Our RULER formatter against samples written by lm_eval's port of RULER (tests/data/ruler_reference/).

The random draws differ (other RNG streams), so each reference sample is taken apart into its
draws (names, values, keys, insertion slots) and rebuilt with our functions; the rebuilt text
must equal the reference character for character. See the README.txt beside the data.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sketchwalk.ruler.haystacks import NOISE_LINE, insert_lines
from sketchwalk.ruler.niah import NEEDLE, join_queries
from sketchwalk.ruler.templates import ANSWER_PREFIXES, TEMPLATES, singularise
from sketchwalk.ruler.variable_tracking import (HOP_STATEMENT, ICL_SEPARATOR, VALUE_STATEMENT,
                                                _noise_with_chains, _question)

REF = Path(__file__).resolve().parent / "data" / "ruler_reference"
VT_ITEM = re.compile(re.escape(NOISE_LINE + "\n") + r"|VAR [A-Z]+ = VAR [A-Z]+ |VAR [A-Z]+ = \d{5}")
NEEDLE_RE = re.compile(r"One of the special magic (numbers|uuids) for (.+) is: (.+)\.")


def _load(name: str) -> list[dict]:
    return [json.loads(line) for line in (REF / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]


class _Slots:
    """Stands in for the layout RNG: `sample` returns the reference's insertion slots."""

    def __init__(self, slots):
        self.slots = list(slots)

    def sample(self, population, k):
        assert k == len(self.slots) and all(s in population for s in self.slots)
        return self.slots


def _rebuild_vt_context(context: str) -> tuple[str, list[str], str]:
    """(our context for the reference's draws, chain names, value)."""
    items = VT_ITEM.findall(context)
    assert " ".join(items) == context
    pos = [i for i, it in enumerate(items) if it.startswith("VAR ")]
    stmts = [items[i] for i in pos]
    names = [s.split(" ")[1] for s in stmts]
    value = stmts[0].split(" = ")[1]
    chain = [VALUE_STATEMENT.format(name=names[0], value=value)]
    chain += [HOP_STATEMENT.format(name=names[j + 1], prev=names[j]) for j in range(len(names) - 1)]
    assert chain == stmts
    slots = [p - j for j, p in enumerate(pos)]  # each statement's slot before the j earlier ones
    return _noise_with_chains(_Slots(slots), len(items) - len(pos), [chain]), names, value


@pytest.mark.parametrize("name", ["vt@1024", "vt@2048"])
def test_vt_reference_rebuilt_byte_for_byte(name):
    for ref in _load(name):
        text = ref["input"]
        head = TEMPLATES["vt"].split("{context}")[0]
        cut = text.rindex(head)
        example, question = text[:cut], text[cut:]
        assert example.endswith(ICL_SEPARATOR) and not example.endswith("\n" + ICL_SEPARATOR)
        ex_body = example[:-len(ICL_SEPARATOR)]
        ex_ctx = ex_body[len(head):ex_body.index("\nQuestion: ")]
        ours_ex, ex_names, ex_value = _rebuild_vt_context(ex_ctx)
        q, p = _question(ours_ex, ex_value, len(ex_names))
        assert q + p + " " + " ".join(ex_names) == ex_body  # 'they are:  ABC ...' (two spaces)
        ctx = question[len(head):question.index("\nQuestion: ")]
        ours, names, value = _rebuild_vt_context(ctx)
        q, p = _question(ours, value, len(names))
        assert q == question and ref["outputs"] == names and len(names) == 5
        assert p.strip() == ref["gen_prefix"]  # lm_eval strips the prefix; RULER keeps its spaces
        assert p == (" Answer: According to the chain(s) of variable assignment in the text above, "
                     f"5 variables are assgined the value {value}, they are: ")


@pytest.mark.parametrize("name", ["niah_single_1@1024", "niah_multikey_2@1024", "niah_multikey_3@1024",
                                  "noise_multivalue@1024", "noise_multiquery@1024"])
def test_noise_and_needle_niah_reference_rebuilt_byte_for_byte(name):
    for ref in _load(name):
        lines = ref["input"].split("\n")
        body = lines[1:-1]
        type_v = NEEDLE_RE.fullmatch(next(ln for ln in body if ln.startswith("One of"))).group(1)
        question = lines[-1]
        query = re.fullmatch(r"What (?:is|are all) the special magic \w+ for (.+) mentioned in the provided text\?",
                             question).group(1)
        queried = query.replace(", and ", ", ").split(", ") if ", and " in query else [query]
        is_needle = [bool(NEEDLE_RE.fullmatch(ln)) and NEEDLE_RE.fullmatch(ln).group(2) in queried for ln in body]
        needles = [ln for ln, n in zip(body, is_needle) if n]
        haystack = [ln for ln, n in zip(body, is_needle) if not n]
        if name.startswith("niah_multikey"):
            assert all(NEEDLE_RE.fullmatch(ln).group(1) == type_v for ln in haystack)
        else:
            assert set(haystack) == {NOISE_LINE}
        # Our insertion, at the reference's slots (each needle before an existing haystack line).
        slots = [i - j for j, i in enumerate(i for i, n in enumerate(is_needle) if n)]

        class Rng:
            def sample(self, population, k):
                return sorted(slots, reverse=True)

        assert insert_lines(haystack, needles, Rng()) == body and not is_needle[-1]
        assert needles == [NEEDLE.format(type_needle_v=type_v, key=NEEDLE_RE.fullmatch(n).group(2),
                                         value=NEEDLE_RE.fullmatch(n).group(3)) for n in needles]
        single = len(ref["outputs"]) == 1
        template = singularise(TEMPLATES["niah"]) if single else TEMPLATES["niah"]
        prefix = singularise(ANSWER_PREFIXES["niah"]) if single else ANSWER_PREFIXES["niah"]
        tv = type_v[:-1] if single else type_v
        assert join_queries(queried) == query
        assert template.format(type_needle_v=tv, context="\n".join(body), query=query) == ref["input"]
        assert prefix.format(type_needle_v=tv, query=query) == " " + ref["gen_prefix"]
