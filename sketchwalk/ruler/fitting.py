"""Length fitting: size a task's haystack so that the whole prompt fits `max_seq_length`.

RULER's rule: tokens(prompt incl. chat template and answer prefix) + tokens_to_generate <=
max_seq_length, counted with the model's own tokenizer. The haystack size is searched once per
(task, length) on a probe sample; every sample then starts at that size and backs off one whole
step at a time until it fits (RULER's rule; fit_and_generate has a finer opt-in mode), since
its own needles/words may tokenise a little longer.
Every sample's final prompt is counted with the real tokenizer; nothing is estimated.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Optional

from .errors import RulerError
from .prompt import Builder, TaskPrompt

# transformers' placeholder model_max_length for "unknown" (VERY_LARGE_INTEGER = 1e30).
_UNSET_MAX_LENGTH = 10 ** 9


def make_token_counter(tokenizer) -> Callable[[str], int]:
    """`count_tokens(text) -> int` for a Hugging Face tokenizer (or anything with `.encode`).

    Special tokens are not added: the chat template already writes BOS / role markers as text,
    and the evaluation harness encodes `input + answer_prefix` the same way.
    """
    encode = getattr(tokenizer, "encode", None)
    if not callable(encode):
        raise RulerError(f"tokenizer {type(tokenizer).__name__} has no encode(); pass a Hugging Face tokenizer")

    def count_tokens(text: str) -> int:
        return len(encode(text, add_special_tokens=False))

    return count_tokens


def make_wrapper(tokenizer, chat_template: bool) -> Callable[[str], str]:
    """`wrap(content) -> input`: the user turn in the tokenizer's chat template, ending where the
    assistant's reply starts (add_generation_prompt); identity when `chat_template` is False."""
    if not chat_template:
        return lambda content: content
    apply = getattr(tokenizer, "apply_chat_template", None)
    if not callable(apply):
        raise RulerError(f"tokenizer {type(tokenizer).__name__} has no apply_chat_template(); "
                         f"use chat_template=False for a base model")

    def wrap(content: str) -> str:
        try:
            text = apply([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
        except Exception as e:  # transformers raises ValueError when the tokenizer has no template
            raise RulerError(f"cannot apply the tokenizer's chat template ({e}); "
                             f"use chat_template=False for a base model") from e
        if not isinstance(text, str):
            raise RulerError(f"apply_chat_template returned {type(text).__name__}, expected str")
        return text

    return wrap


def context_limit(tokenizer, max_context: Optional[int]) -> tuple[Optional[int], str]:
    """(limit in tokens, where it came from): `max_context` if given, else the tokenizer's
    `model_max_length` unless that is transformers' 'unknown' placeholder; (None, '') if neither."""
    if max_context is not None:
        if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context <= 0:
            raise RulerError(f"max_context must be a positive int (tokens), got {max_context!r}")
        return max_context, "max_context"
    mml = getattr(tokenizer, "model_max_length", None)
    if isinstance(mml, int) and 0 < mml < _UNSET_MAX_LENGTH:
        return mml, "tokenizer.model_max_length"
    return None, ""


class _TooSmall(Exception):
    """Even the smallest haystack (`n` units, `tokens` tokens) is over the budget."""

    def __init__(self, n: int, tokens: int):
        super().__init__(n, tokens)
        self.n, self.tokens = n, tokens


_MAX_PROBES = 200  # a search on a cost that never grows would otherwise not end


def search_units(cost: Callable[[int], int], budget: int, *, lo: int, step: int,
                 cap: Optional[int] = None) -> int:
    """Largest n in [lo, cap] with cost(n) <= budget (tokens), for cost increasing in n.

    Returns what a binary search over n returns, in fewer tokenizer calls on long prompts:
    cost is nearly linear in n, so each probe goes where the tokens-per-unit slope (between
    the nearest known points) predicts the budget is crossed, aiming just past it from below
    and just short of it from above so that the bracket closes around the answer. Safeguards
    keep the worst case logarithmic: before bracketing, the minimum move doubles with every
    probe that still fits; after, a bracket that did not halve in two probes is bisected.
    Raises _TooSmall when even `lo` does not fit.
    """
    c_lo = cost(lo)
    if c_lo > budget:
        raise _TooSmall(lo, c_lo)
    ref, c_ref = lo, c_lo              # an earlier fitting point, for the slope before bracketing
    hi: Optional[int] = None
    c_hi = 0
    n = lo + step                      # first move: one step, like RULER's linear search
    min_move = 1
    widths: list[int] = []             # bracket widths after each probe, for the bisection guard
    for _ in range(_MAX_PROBES):
        if cap is not None:
            n = min(n, cap)
        if hi is not None:
            n = min(max(n, lo + 1), hi - 1)
        c = cost(n)
        fits = c <= budget
        if fits:
            if n == cap:
                return n
            ref, c_ref, lo, c_lo = lo, c_lo, n, c
            if hi is None:
                min_move *= 2
        else:
            hi, c_hi = n, c
        if hi is None:
            slope = (c_lo - c_ref) / max(lo - ref, 1)
            guess = lo + (budget - c_lo) / max(slope, 1e-9)
            # Growth is bounded against a tiny early slope.
            n = min(max(int(guess) + 1, lo + min_move), lo + 16 * max(lo - ref, step))
            continue
        if hi - lo <= 1:
            return lo
        widths.append(hi - lo)
        if len(widths) >= 3 and widths[-1] * 2 > widths[-3]:
            n = (lo + hi) // 2
            widths.clear()
            continue
        guess = lo + (budget - c_lo) * (hi - lo) / max(c_hi - c_lo, 1e-9)
        n = int(guess) + 1 if fits else int(guess)
    raise RulerError(f"haystack size search did not converge in {_MAX_PROBES} probes (last: {lo} units, "
                     f"{c_lo} tokens); the prompt does not grow with the haystack")


BACKOFF_MODES = ("step", "overshoot")  # the first is the default: RULER's


def fit_and_generate(task: str, builder: Builder, *, max_seq_length: int, tokens_to_generate: int,
                     num_samples: int, seed_text: str, wrap: Callable[[str], str],
                     count_tokens: Callable[[str], int], backoff: str = "step") -> list[dict]:
    """RULER samples for one (task, length): search the haystack size on a probe sample, then
    build `num_samples` samples, each backing off until it fits.

    backoff 'step' (default) is RULER's: a sample that does not fit loses one whole step (500
    essay words, 25 / 5 niah lines, 10 vt lines, ...) per retry, so it may land up to one step's
    tokens below the budget. 'overshoot' (opt-in, not RULER) removes only the units its excess tokens need (at
    least 1, at most one step) per retry, so it lands within a few tokens of the budget instead
    (25 uuid lines are ~2,000 tokens, a quarter of 8K); samples then differ from RULER's.

    A builder with a `grid_origin` (fwe) gets the largest fitting size on RULER's linear-search
    grid (`on_grid`) instead of the exact largest.
    Sample i draws everything from random.Random(f"{seed_text}:{i}") (re-created for every
    retry, so a sample keeps its needles and only its haystack shrinks); the probe uses
    random.Random(f"{seed_text}:fit"). `length` is RULER's: prompt tokens (chat template and
    answer prefix included) + tokens_to_generate, so length <= max_seq_length.
    """
    if backoff not in BACKOFF_MODES:
        raise RulerError(f"backoff must be one of {BACKOFF_MODES}, got {backoff!r}")
    budget = max_seq_length - tokens_to_generate

    def render(prompt: TaskPrompt) -> tuple[str, int]:
        text = wrap(prompt.content)
        return text, count_tokens(text + prompt.answer_prefix)

    probe_costs: dict[int, int] = {}

    def probe_cost(n: int) -> int:
        # The same seed for every n keeps the probe's needles fixed, so cost grows with n only.
        if n not in probe_costs:
            probe_costs[n] = render(builder.build(random.Random(seed_text + ":fit"), n))[1]
        return probe_costs[n]

    try:
        n_fit = search_units(probe_cost, budget, lo=builder.min_units, step=builder.step, cap=builder.max_units)
    except _TooSmall as e:
        raise RulerError(f"{task}: max_seq_length {max_seq_length} is too small: even {e.n} {builder.unit} "
                         f"give a {e.tokens}-token prompt, over the {budget} tokens left after "
                         f"{tokens_to_generate} for the answer") from None
    if builder.grid_origin is not None:
        n_fit = on_grid(n_fit, builder.grid_origin, builder.step, builder.min_units)
        probe_cost(n_fit)  # the per-unit estimate below reads the cost at n_fit
    if builder.max_units is not None and n_fit >= builder.max_units:
        raise RulerError(f"{task}: max_seq_length {max_seq_length} needs more than the {builder.max_units} "
                         f"{builder.unit} available (wonderwords' lists; RULER's english_words.json "
                         f"fallback is not available here); use a shorter length")
    per_unit = _tokens_per_unit(probe_costs, n_fit, builder.step)

    samples = []
    for index in range(num_samples):
        n = n_fit
        while True:
            prompt = builder.build(random.Random(f"{seed_text}:{index}"), n)
            text, tokens = render(prompt)
            if tokens <= budget:
                break
            if n <= builder.min_units:
                raise RulerError(f"{task}: sample {index} does not fit max_seq_length {max_seq_length} "
                                 f"even with {n} {builder.unit} ({tokens} + {tokens_to_generate} tokens)")
            cut = builder.step
            if backoff == "overshoot":
                cut = min(cut, max(1, math.ceil((tokens - budget) / per_unit)))
            n = max(builder.min_units, n - cut)
        samples.append({"index": index, "input": text, "outputs": list(prompt.outputs),
                        "length": tokens + tokens_to_generate, "answer_prefix": prompt.answer_prefix})
    return samples


def on_grid(n: int, origin: int, step: int, floor: int) -> int:
    """The largest point origin + k·step (k any integer) that is <= n, but at least `floor`.

    RULER's linear search (fwe) starts at `origin` and adds `step` while the prompt fits, so it
    ends on this grid; for a cost increasing in n, the last grid point at or below the largest
    fitting n is the last fitting grid point, i.e. what RULER's search finds.
    """
    return max(floor, origin + (n - origin) // step * step)


def _tokens_per_unit(costs: dict[int, int], n: int, step: int) -> float:
    """Tokens one haystack unit adds near n, from the probe costs the search measured."""
    below = [m for m in costs if m < n]
    if not below:
        return max(costs[n] / max(n, 1), 1e-6)
    # The nearest point at least a step away: local, yet wide enough to average out the
    # token-count jitter of single units.
    wide = [m for m in below if n - m >= step]
    m = max(wide) if wide else min(below)
    return max((costs[n] - costs[m]) / (n - m), 1e-6)
