"""RULER prompt strings, answer prefixes and generation budgets (benchmark data: do not edit).

The strings are copied character for character from `../shared/docs/ruler.md` (they equal
NVIDIA/RULER's `scripts/data/synthetic/constants.py`); scores are only comparable with
published RULER numbers if they match exactly. One deliberate exception to the doc: the vt answer
prefix says 'assgined' (sic), RULER's own typo in constants.py (the doc has 'assigned').
"""
from __future__ import annotations

from typing import Callable

from .errors import RulerError

# family -> task template ({context}, {query} and family-specific fields are filled in by the generators)
TEMPLATES: dict[str, str] = {
    "niah": (
        "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
        "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
    ),
    "vt": (
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
        "Question: Find all variables that are assigned the value {query} in the text above."
    ),
    "cwe": (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.\n{context}\n"
        "Question: What are the 10 most common words in the above list?"
    ),
    "fwe": (
        "Read the following coded text and track the frequency of each coded word. "
        "Find the three most frequently appeared coded words. {context}\n"
        "Question: Do not provide any explanation. Please ignore the dots '....'. "
        "What are the three most frequently appeared words in the above coded text?"
    ),
    "qa": (
        "Answer the question based on the given documents. Only give me the answer and do not output any other words."
        "\n\nThe following are given documents.\n\n{context}\n\n"
        "Answer the question based on the given documents. Only give me the answer and do not output any other words."
        "\n\nQuestion: {query}"
    ),
}

ANSWER_PREFIXES: dict[str, str] = {
    "niah": " The special magic {type_needle_v} for {query} mentioned in the provided text are",
    "vt": (" Answer: According to the chain(s) of variable assignment in the text above, "
           "{num_v} variables are assgined the value {query}, they are: "),
    "cwe": " Answer: The top 10 words that appear most often in the list are:",
    "fwe": " Answer: According to the coded text above, the three most frequently appeared words are:",
    "qa": " Answer:",
}

TOKENS_TO_GENERATE: dict[str, int] = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}

# The 13 RULER tasks and their family; qa_1 / qa_2 are imported, never generated here.
TASK_FAMILY: dict[str, str] = {
    "niah_single_1": "niah", "niah_single_2": "niah", "niah_single_3": "niah",
    "niah_multikey_1": "niah", "niah_multikey_2": "niah", "niah_multikey_3": "niah",
    "niah_multivalue": "niah", "niah_multiquery": "niah",
    "vt": "vt", "cwe": "cwe", "fwe": "fwe",
    "qa_1": "qa", "qa_2": "qa",
}


def family_of(task: str) -> str:
    """The template family ('niah', 'vt', 'cwe', 'fwe', 'qa') of a RULER task name; RulerError if unknown."""
    try:
        return TASK_FAMILY[task]
    except KeyError:
        raise RulerError(f"unknown RULER task {task!r}; known tasks: {', '.join(TASK_FAMILY)}") from None


def tokens_to_generate(task: str) -> int:
    """Generation budget in tokens (max_new_tokens) RULER gives `task`: niah 128, vt 30, cwe 120, fwe 50, qa 32."""
    return TOKENS_TO_GENERATE[family_of(task)]


def singularise(text: str) -> str:
    """RULER's rewrite of a niah template / answer prefix when exactly one value is asked for.

    Order matters ('are all' before 'are'); RULER also maps 'answers' → 'answer' (absent from
    the current strings, kept for fidelity). The value type itself ('numbers' → 'number') is
    singularised separately, by dropping its final 's'.
    """
    for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        text = text.replace(old, new)
    return text


_SLOT = "\x00sketchwalk-content\x00"  # stands for the user turn when splitting a chat wrapper


def singularise_wrapper(wrap: Callable[[str], str]) -> Callable[[str], str]:
    """`wrap` with RULER's singular rewrite applied to the chat template's own text (not the user turn).

    RULER rewrites its whole prompt template, model template included, before the haystack goes
    in, so a system prompt 'You are a helpful AI assistant' becomes 'You is a helpful AI
    assistant'. That is a RULER bug (SmolLM2's token count is unchanged by it); it is
    reproduced only on request (generate_task's `singularise_chat_template`). RulerError when the
    template does not hold the user turn verbatim (the chat text cannot be told apart from it).
    """
    parts = wrap(_SLOT).split(_SLOT)
    if len(parts) != 2:
        raise RulerError("singularise_chat_template: the chat template does not hold the user turn verbatim "
                         "once, so its own text cannot be rewritten apart from it")
    before, after = parts

    def wrapped(content: str) -> str:
        text = wrap(content)
        if not (text.startswith(before) and text.endswith(after) and len(text) >= len(before) + len(after)):
            raise RulerError("singularise_chat_template: the chat template changed the user turn "
                             "(it is not embedded verbatim), so its own text cannot be rewritten apart from it")
        return singularise(before) + text[len(before):len(text) - len(after)] + singularise(after)

    return wrapped
