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
    """Builds fwe prompts; units are RULER's `num_words` (the Zipf scale; the text has about that many words).

    As in RULER's generator: the length search starts at (budget // coded_wordlen) words and
    goes up in steps of budget // 32 (budget = max_seq_length - tokens to generate), so the
    fitted size is a grid point; the vocabulary (sorted) and the word sequence are shuffled with
    `random.Random(shuffle_seed)`, the generation seed itself, afresh for every sample: samples
    of one size put their ranks in the same order and differ only in the coded words.
    """

    unit = "words"

    def __init__(self, spec: TaskSpec, max_seq_length: int, tokens_to_generate: int, shuffle_seed: int = 42):
        self.spec = spec
        self.shuffle_seed = shuffle_seed
        self.vocab_size = max(5, max_seq_length // 50)
        budget = max_seq_length - tokens_to_generate
        # RULER's step is budget // 32; the floor of 10 only matters below ~370 tokens, where
        # RULER's own step would be a handful of words (or 0, a search that never moves).
        self.step = max(10, budget // 32)
        self.grid_origin = budget // spec.coded_wordlen
        # Enough words that ranks 2-4 all occur and the 4th clearly beats the 5th.
        self.min_units = 100
        self.max_units = None

    def build(self, rng: random.Random, n: int) -> TaskPrompt:
        """An fwe prompt for Zipf scale `n`: coded words drawn from `rng`, their order from the fixed shuffle seed."""
        s = self.spec
        vocab = sorted(distinct(rng, self.vocab_size,
                                lambda r: random_letters(r, s.coded_wordlen, string.ascii_lowercase)))
        random.Random(self.shuffle_seed).shuffle(vocab)
        vocab[0] = "..."  # the most frequent 'word' is noise the question says to ignore
        counts = zipf_counts(n, len(vocab), s.alpha)
        text = [w for w, c in zip(vocab, counts) for _ in range(c)]
        random.Random(self.shuffle_seed).shuffle(text)
        return TaskPrompt(TEMPLATES["fwe"].format(context=" ".join(text)), ANSWER_PREFIXES["fwe"], vocab[1:4])
