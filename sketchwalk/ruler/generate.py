"""`generate_task`: RULER-format samples for one synthetic task at one length."""
from __future__ import annotations

import os
from typing import Optional

from .common_words import CommonWordsBuilder
from .errors import RulerError
from .fitting import context_limit, fit_and_generate, make_token_counter, make_wrapper, search_units
from .frequent_words import FrequentWordsBuilder
from .haystacks import load_essay_words, resolve_essays_path
from .niah import NiahBuilder
from .prompt import Builder
from .tasks import get_task
from .templates import singularise_wrapper, tokens_to_generate
from .variable_tracking import VariableTrackingBuilder, fit_icl

#: Bumped whenever the same arguments start giving different samples, so that everything keyed
#: by a suite's content (dense baselines: `evaluation.baseline.suite_fingerprint`) misses.
#: 2: RULER's vt statements (hop trailing space, example's double space, 10-line step), line
#: insertion before existing lines only, fwe's fixed shuffle seed and linear-search grid.
#: 3: vt in RULER's bytes as lm_eval's port writes them: space-joined noise items that end in
#: a newline (statements inline), four newlines after the example, 'assgined' (sic).
GENERATOR_VERSION = 3


def generate_task(task: str, max_seq_length: int, num_samples: int, tokenizer, *, seed: int = 42,
                  essays_path: str | os.PathLike | None = None, chat_template: bool = True,
                  max_context: Optional[int] = None, backoff: str = "step",
                  singularise_chat_template: bool = False) -> list[dict]:
    """Generate `num_samples` RULER samples of `task` sized to `max_seq_length` tokens.

    Returns dicts with `index` (0..n-1), `input` (the prompt, chat-wrapped when `chat_template`,
    without the answer prefix), `outputs` (reference strings), `answer_prefix` (to append to
    `input` at evaluation) and `length` (RULER's: tokens of input + answer_prefix, plus the
    task's tokens to generate; always <= max_seq_length). `tokenizer`: a Hugging Face tokenizer
    (encode + apply_chat_template). Essay tasks read `essays_path`, else $SKETCHWALK_ESSAYS.
    `max_context` (tokens) overrides `tokenizer.model_max_length` as the model's context limit.
    `backoff`: 'step' (default: RULER's whole-step retries) or the finer opt-in 'overshoot'
    (see fitting.fit_and_generate).
    `singularise_chat_template` (default False): reproduce RULER's bug of running its singular
    rewrite over the chat template too on single-value niah tasks ('You are' → 'You is' in a
    system prompt; see templates.singularise_wrapper); other tasks are unaffected.
    Same arguments → identical samples; all randomness comes from `seed`.
    """
    get_task(task)  # an unknown task is refused here, before any tokenizer work
    if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length <= 0:
        raise RulerError(f"max_seq_length must be a positive int (tokens), got {max_seq_length!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
        raise RulerError(f"num_samples must be a non-negative int, got {num_samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise RulerError(f"seed must be an int, got {seed!r}")
    if not isinstance(singularise_chat_template, bool):
        raise RulerError(f"singularise_chat_template must be true or false, got {singularise_chat_template!r}")
    limit, source = context_limit(tokenizer, max_context)
    if limit is not None and max_seq_length > limit:
        raise RulerError(f"{task}: max_seq_length {max_seq_length} exceeds the model's context of {limit} "
                         f"tokens ({source}); pick a length <= {limit}")
    ttg = tokens_to_generate(task)
    if max_seq_length <= ttg:
        raise RulerError(f"{task}: max_seq_length {max_seq_length} leaves no room for a prompt "
                         f"({ttg} tokens are reserved for the answer)")

    wrap = make_wrapper(tokenizer, chat_template)
    spec = get_task(task)
    if singularise_chat_template and chat_template and spec.family == "niah" and spec.num_q * spec.num_v == 1:
        wrap = singularise_wrapper(wrap)
    builder, seed_text = task_builder(task, max_seq_length, tokenizer, seed=seed, essays_path=essays_path,
                                      chat_template=chat_template)
    return fit_and_generate(task, builder, max_seq_length=max_seq_length, tokens_to_generate=ttg,
                            num_samples=num_samples, seed_text=seed_text, wrap=wrap,
                            count_tokens=make_token_counter(tokenizer), backoff=backoff)


def task_builder(task: str, max_seq_length: int, tokenizer, *, seed: int = 42,
                 essays_path: str | os.PathLike | None = None, chat_template: bool = True) -> tuple[Builder, str]:
    """(builder, seed_text): the haystack builder `generate_task` fits for (task, max_seq_length), and
    the seed text its random streams derive from. Exposed so tests can measure what one back-off
    step costs in tokens (`builder.step` units)."""
    spec = get_task(task)
    count_tokens = make_token_counter(tokenizer)
    # Per (seed, task, length) streams: tasks and lengths never share random draws, and sample i
    # does not depend on how many samples are requested. String seeds hash with SHA-512, so
    # they are stable across runs and Python versions.
    seed_text = f"sketchwalk-ruler:{seed}:{task}:{max_seq_length}"
    if spec.family == "niah":
        words = load_essay_words(resolve_essays_path(essays_path, task)) if spec.needs_essays else None
        builder = NiahBuilder(spec, max_seq_length, words)
    elif spec.family == "vt":
        icl = fit_icl(spec, seed_text, count_tokens, search_units)
        builder = VariableTrackingBuilder(spec, max_seq_length, icl)
    elif spec.family == "cwe":
        builder = CommonWordsBuilder(spec, max_seq_length)
    else:
        # RULER shuffles fwe with its generation seed itself, the same for every sample and length.
        builder = FrequentWordsBuilder(spec, max_seq_length, tokens_to_generate(task), shuffle_seed=seed)
    return builder, seed_text
