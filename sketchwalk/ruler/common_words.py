"""Common words extraction (cwe): name the 10 words repeated most often in a numbered list."""
from __future__ import annotations

import random
from typing import Sequence

from .prompt import TaskPrompt
from .tasks import TaskSpec
from .templates import ANSWER_PREFIXES, TEMPLATES
from .words import common_word_pool


def numbered(words: Sequence[str]) -> str:
    """RULER's list format: '1. w 2. w 3. w'."""
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def _word_list(rng: random.Random, words: Sequence[str], num_common: int, freq_common: int,
               freq_uncommon: int) -> tuple[str, list[str]]:
    common, uncommon = list(words[:num_common]), list(words[num_common:])
    items = common * freq_common + uncommon * freq_uncommon
    rng.shuffle(items)
    return numbered(items), common


class CommonWordsBuilder:
    """Builds cwe prompts; units are distinct words in the question's list (10 common + the rest uncommon)."""

    unit = "distinct words"

    def __init__(self, spec: TaskSpec, max_seq_length: int):
        self.spec = spec
        self.pool = common_word_pool()
        if max_seq_length >= 4096:
            # Example: 40 words, common ×10, uncommon ×3; question: common ×30, uncommon ×3.
            self.example = (40, 10, 3)
            self.freqs = (spec.freq_cw, spec.freq_ucw)
        else:
            # Below 4K RULER shrinks both: example 20 words ×3/×1, question ×6/×1.
            self.example = (20, 3, 1)
            self.freqs = (6, 1)
        self.step = 10
        self.min_units = spec.num_cw
        # Example and question words are disjoint, so both come out of one wonderwords pool.
        self.max_units = len(self.pool) - self.example[0]
        self.grid_origin = None

    def build(self, rng: random.Random, n: int) -> TaskPrompt:
        """A cwe prompt whose question lists `n` distinct words; words and order drawn from `rng`."""
        s = self.spec
        ex_n, ex_cw, ex_ucw = self.example
        chosen = rng.sample(self.pool, ex_n + n)
        ex_context, ex_answer = _word_list(rng, chosen[:ex_n], s.num_cw, ex_cw, ex_ucw)
        context, answer = _word_list(rng, chosen[ex_n:], s.num_cw, *self.freqs)
        prefix = ANSWER_PREFIXES["cwe"]
        example = TEMPLATES["cwe"].format(context=ex_context) + prefix + " " + numbered(ex_answer)
        return TaskPrompt(example + "\n" + TEMPLATES["cwe"].format(context=context), prefix, answer)
