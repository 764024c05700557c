"""Frequent words extraction (fwe): coded words with Zipf-distributed counts; name the top three."""
from __future__ import annotations

import math
import random
import string

from .prompt import TaskPrompt
from .tasks import TaskSpec
from .templates import ANSWER_PREFIXES, TEMPLATES
from .words import distinct, random_letters


def zeta(s: float, terms: int = 64) -> float:
    """Riemann zeta ζ(s) for real s > 1 (direct sum plus Euler–Maclaurin tail; error < 1e-12 for s >= 1.5)."""
    if s <= 1:
        raise ValueError(f"zeta needs s > 1, got {s}")
    if s == 2.0:
        return math.pi ** 2 / 6
    n = terms
    head = math.fsum(k ** -s for k in range(1, n))
    return head + n ** (1 - s) / (s - 1) + 0.5 * n ** -s + s * n ** (-s - 1) / 12 \
        - s * (s + 1) * (s + 2) * n ** (-s - 3) / 720


def zipf_counts(num_words: int, vocab_size: int, alpha: float) -> list[int]:
    """Count of the rank-k word (k = 1..vocab_size): floor(num_words · k^-alpha / ζ(alpha))."""
    z = zeta(alpha)
    return [int(num_words * k ** -alpha / z) for k in range(1, vocab_size + 1)]


class FrequentWordsBuilder:
    """Builds fwe prompts; units are RULER's `num_words` (the Zipf scale; the text has about that many words)."""

    unit = "words"

    def __init__(self, spec: TaskSpec, max_seq_length: int, tokens_to_generate: int):
        self.spec = spec
        self.vocab_size = max(5, max_seq_length // 50)
        # RULER's fwe steps by 1/32 of the input budget: sample lengths vary by several per cent
        # (each sample draws its own coded words), so small steps would retry many times.
        self.step = max(10, (max_seq_length - tokens_to_generate) // 32)
        # Enough words that ranks 2-4 all occur and the 4th clearly beats the 5th.
        self.min_units = 100
        self.max_units = None

    def build(self, rng: random.Random, n: int) -> TaskPrompt:
        """An fwe prompt for Zipf scale `n`; coded words and their order drawn from `rng`."""
        s = self.spec
        vocab = distinct(rng, self.vocab_size, lambda r: random_letters(r, s.coded_wordlen, string.ascii_lowercase))
        vocab[0] = "..."  # the most frequent 'word' is noise the question says to ignore
        counts = zipf_counts(n, len(vocab), s.alpha)
        text = [w for w, c in zip(vocab, counts) for _ in range(c)]
        rng.shuffle(text)
        return TaskPrompt(TEMPLATES["fwe"].format(context=" ".join(text)), ANSWER_PREFIXES["fwe"], vocab[1:4])
