"""Variable tracking (vt): follow a chain `VAR A = 12345`, `VAR B = VAR A`, ... through noise."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Optional

from .haystacks import NOISE_LINE
from .prompt import TaskPrompt
from .tasks import TaskSpec
from .templates import ANSWER_PREFIXES, TEMPLATES
from .words import distinct, random_letters

ICL_TOKENS = 500      # RULER sizes its one in-context example to 500 tokens (no chat template, no answer)
ICL_NAME_LEN = 3      # RULER's example uses 3-letter names (5 in the real question) ...
ICL_MAX_HOPS = 10     # ... and at most 10 hops
ICL_STEP = 5          # RULER's search/back-off step for the example, in noise lines ...
STEP = 10             # ... and for the question, at every length (RULER's `incremental`)
NAME_LEN = 5

# RULER's statements, byte for byte: a hop ends in a space, the value statement does not.
NOISE_ITEM = NOISE_LINE + "\n"  # RULER's vt noise item carries its own newline
ICL_SEPARATOR = "\n\n\n\n"  # RULER: the example ends in '\n\n' and '\n\n' follows it
VALUE_STATEMENT = "VAR {name} = {value}"
HOP_STATEMENT = "VAR {name} = VAR {prev} "


def _value(rng: random.Random, exclude=frozenset()) -> str:
    # 5-digit values, never one already used: chains and the example each have their own value,
    # so "the variables assigned the value X" is unambiguous.
    while True:
        v = str(rng.randint(10000, 99999))
        if v not in exclude:
            return v


def _chains(rng: random.Random, num_chains: int, num_hops: int, name_len: int,
            value_exclude: str = "") -> tuple[list[list[str]], list[list[str]], str]:
    """(names per chain, statement lines per chain, value of chain 0)."""
    # 'VAR' is the keyword, never a name (only possible with 3-letter names).
    names = distinct(rng, num_chains * (num_hops + 1), lambda r: random_letters(r, name_len), exclude={"VAR"})
    per_chain = [names[i * (num_hops + 1):(i + 1) * (num_hops + 1)] for i in range(num_chains)]
    chains, values = [], []
    for chain_names in per_chain:
        values.append(_value(rng, {value_exclude, *values}))
        lines = [VALUE_STATEMENT.format(name=chain_names[0], value=values[-1])]
        lines += [HOP_STATEMENT.format(name=chain_names[j + 1], prev=chain_names[j]) for j in range(num_hops)]
        chains.append(lines)
    return per_chain, chains, values[0]


def _noise_with_chains(layout_rng: random.Random, n: int, chains: list[list[str]]) -> str:
    """The vt haystack in RULER's bytes: each noise item is the noise line plus a newline, items
    and statements are joined by single spaces, so a line after the first starts with a space,
    statements sit inline ('again.\\n VAR X = 12345 The grass'), a hop is followed by two spaces,
    and the context ends in a newline (a blank line before 'Question:')."""
    items = [NOISE_ITEM] * n
    for chain in chains:
        # Sorted slots plus the running offset j keep each chain in order (as in RULER). Slots
        # are among the current items, so a statement always goes before an existing item, never
        # after the last one (RULER samples from range(len(sentences))).
        slots = sorted(layout_rng.sample(range(len(items)), len(chain)))
        for j, (slot, stmt) in enumerate(zip(slots, chain)):
            items.insert(slot + j, stmt)
    # RULER's clean-up after the join; a no-op for these statements, kept for fidelity.
    return " ".join(items).replace(". \n", ".\n")


def _question(context: str, value: str, num_v: int) -> tuple[str, str]:
    return (TEMPLATES["vt"].format(context=context, query=value),
            ANSWER_PREFIXES["vt"].format(num_v=num_v, query=value))


@dataclass(frozen=True)
class IclLayout:
    """The in-context example's shape, fixed once per generation: noise lines and a layout seed.
    Names and value are redrawn for every sample (RULER's `randomize_icl`)."""

    noise_lines: int
    layout_seed: str
    num_chains: int
    num_hops: int

    def render(self, rng: random.Random, value_exclude: str = "") -> str:
        """The example as text: question, answer prefix, a space and its answer (no separator)."""
        names, chains, value = _chains(rng, self.num_chains, self.num_hops, ICL_NAME_LEN, value_exclude)
        context = _noise_with_chains(random.Random(self.layout_seed), self.noise_lines, chains)
        question, prefix = _question(context, value, self.num_hops + 1)
        # RULER appends " " + the names to the example's prompt, which already ends in the answer
        # prefix's ': ', so its example reads 'they are:  ABC DEF' with two spaces; kept byte for byte.
        return question + prefix + " " + " ".join(names[0])


def fit_icl(spec: TaskSpec, seed_text: str, count_tokens: Callable[[str], int], search) -> IclLayout:
    """Size the example to ICL_TOKENS tokens (raw text, no chat template, as RULER counts it)
    with `search` (fitting.search_units); RULER's step for it is ICL_STEP (5) noise lines."""
    hops = min(ICL_MAX_HOPS, spec.num_hops)
    layout_seed = seed_text + ":icl-layout"

    def cost(n: int) -> int:
        return count_tokens(IclLayout(n, layout_seed, spec.num_chains, hops).render(random.Random(seed_text + ":icl-fit")))

    # A chain of h+1 statements needs at least h noise lines to be spread over.
    n = search(cost, ICL_TOKENS, lo=hops + 1, step=ICL_STEP, cap=None)
    return IclLayout(n, layout_seed, spec.num_chains, hops)


class VariableTrackingBuilder:
    """Builds vt prompts: one in-context example, then the question; units are noise lines."""

    unit = "noise lines"

    def __init__(self, spec: TaskSpec, max_seq_length: int, icl: Optional[IclLayout]):
        self.spec, self.icl = spec, icl
        # RULER backs a vt sample off by 10 lines at every length (not niah's 25 / 5 rule).
        self.step = STEP
        self.min_units = spec.num_hops + 1  # one line to go before for each of a chain's statements
        self.grid_origin = None
        self.max_units = None

    def build(self, rng: random.Random, n: int) -> TaskPrompt:
        """A vt prompt with `n` noise lines; chain names, value and positions drawn from `rng`."""
        s = self.spec
        names, chains, value = _chains(rng, s.num_chains, s.num_hops, NAME_LEN)
        context = _noise_with_chains(rng, n, chains)
        question, prefix = _question(context, value, s.num_hops + 1)
        if self.icl is not None:
            # RULER puts the example inside the user turn, three blank lines before the question.
            question = self.icl.render(rng, value_exclude=value) + ICL_SEPARATOR + question
        return TaskPrompt(question, prefix, names[0])
