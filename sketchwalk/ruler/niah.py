"""Needle-in-a-haystack tasks (niah_single_*, niah_multikey_*, niah_multivalue, niah_multiquery)."""
from __future__ import annotations

import random
from typing import Optional, Sequence

from .haystacks import NOISE_LINE, essay_prefix, insert_at_depths, insert_lines, split_sentences
from .prompt import TaskPrompt
from .tasks import TaskSpec
from .templates import ANSWER_PREFIXES, TEMPLATES, singularise
from .words import distinct, random_needle_item

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."


def join_queries(queries: Sequence[str]) -> str:
    """RULER's query list: 'a', 'a, and b', 'a, b, and c' (Oxford comma even for two)."""
    if len(queries) == 1:
        return queries[0]
    return ", ".join(queries[:-1]) + ", and " + queries[-1]


class NiahBuilder:
    """Builds niah prompts; units are essay words ('essay') or haystack lines ('noise', 'needle')."""

    def __init__(self, spec: TaskSpec, max_seq_length: int, essay_words: Optional[Sequence[str]] = None):
        self.spec = spec
        self.essay_words = essay_words
        if spec.haystack == "essay":
            self.unit, self.step = "essay words", 500
        else:
            # RULER: 25 lines per step, 5 below 4K where 25 lines are a large share of the prompt.
            self.unit, self.step = "haystack lines", 25 if max_seq_length >= 4096 else 5
        # A line haystack needs a line to go before for every needle (see insert_lines).
        self.min_units = 1 if spec.haystack == "essay" else spec.num_k * spec.num_v
        self.max_units = None  # essays repeat; noise/needle lines are unbounded
        self.grid_origin = None
        self._sentences: dict[int, list[str]] = {}
        single = spec.num_q * spec.num_v == 1
        self.template = singularise(TEMPLATES["niah"]) if single else TEMPLATES["niah"]
        self.prefix = singularise(ANSWER_PREFIXES["niah"]) if single else ANSWER_PREFIXES["niah"]
        # The question names the value type in the singular when one value is asked for; the
        # needles themselves always say 'numbers' / 'uuids' (as in RULER).
        self.type_v_question = spec.type_v[:-1] if single else spec.type_v

    def _essay_sentences(self, n: int) -> list[str]:
        # Samples of one (task, length) share n, so the split is reused; keep only a few entries.
        if n not in self._sentences:
            if len(self._sentences) > 4:
                self._sentences.clear()
            self._sentences[n] = split_sentences(essay_prefix(self.essay_words, n))
        return self._sentences[n]

    def build(self, rng: random.Random, n: int) -> TaskPrompt:
        """A niah prompt whose haystack has `n` units; needles, depths and queries drawn from `rng`."""
        s = self.spec
        keys = distinct(rng, s.num_k, lambda r: random_needle_item(r, s.type_k))
        values = [[random_needle_item(rng, s.type_v) for _ in range(s.num_v)] for _ in keys]
        needles = [NEEDLE.format(type_needle_v=s.type_v, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
        rng.shuffle(needles)

        if s.haystack == "essay":
            context = insert_at_depths(self._essay_sentences(n), needles, rng)
        else:
            if s.haystack == "noise":
                lines = [NOISE_LINE] * n
            else:  # 'needle': every line is a distractor needle with a fresh key (never a real one)
                lines = [NEEDLE.format(type_needle_v=s.type_v, key=k, value=random_needle_item(rng, s.type_v))
                         for k in distinct(rng, n, lambda r: random_needle_item(r, s.type_k), exclude=keys)]
            context = "\n".join(insert_lines(lines, needles, rng))

        picked = rng.sample(range(s.num_k), s.num_q)
        query = join_queries([keys[i] for i in picked])
        outputs = [v for i in picked for v in values[i]]
        content = self.template.format(type_needle_v=self.type_v_question, context=context, query=query)
        prefix = self.prefix.format(type_needle_v=self.type_v_question, query=query)
        return TaskPrompt(content, prefix, outputs)
