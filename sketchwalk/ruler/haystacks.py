"""Haystacks: the noise line, the Paul Graham essays, sentence splitting and needle insertion."""
from __future__ import annotations

import json
import os
import random
import re
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from .errors import RulerError

NOISE_LINE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
ENV_ESSAYS = "SKETCHWALK_ESSAYS"

# RULER's 40 candidate needle depths in percent: round(linspace(0, 100, 40)). No value falls on
# a .5 tie, so Python's round equals numpy's here.
DEPTHS: tuple[int, ...] = tuple(round(i * 100 / 39) for i in range(40))

_HOW_TO_PROVIDE = (
    "pass --essays PATH (essays_path=PATH in Python) or set SKETCHWALK_ESSAYS=PATH, where PATH is "
    "RULER's PaulGrahamEssays.json (a JSON object with the essays in its 'text' field; one copy "
    "lives at ../shared/data/ruler/PaulGrahamEssays.json). The essays are not shipped with sketchwalk."
)


# -- essays --------------------------------------------------------------------------------------

def resolve_essays_path(essays_path: str | os.PathLike | None, task: str = "this task") -> Path:
    """The essay file to use: `essays_path`, else $SKETCHWALK_ESSAYS; RulerError saying how to provide it."""
    chosen = essays_path if essays_path not in (None, "") else os.environ.get(ENV_ESSAYS) or None
    if chosen is None:
        raise RulerError(f"{task} needs the Paul Graham essay haystack, and none was given: {_HOW_TO_PROVIDE}")
    path = Path(chosen).expanduser()
    if not path.is_file():
        raise RulerError(f"essay file {path} does not exist (needed by {task}): {_HOW_TO_PROVIDE}")
    return path


def load_essay_words(path: str | os.PathLike) -> tuple[str, ...]:
    """The essays' words: `text` whitespace-normalised and split on single spaces (RULER's rule)."""
    p = Path(path).expanduser().resolve()
    try:
        st = p.stat()
    except OSError as e:
        raise RulerError(f"cannot read essay file {p}: {e}") from e
    # Keyed on size and mtime too, so an edited file is re-read within one process.
    return _load_words(str(p), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=4)
def _load_words(path: str, _size: int, _mtime: int) -> tuple[str, ...]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise RulerError(f"cannot read essay file {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise RulerError(f"essay file {path} is not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from e
    if not isinstance(data, dict) or not isinstance(data.get("text"), str):
        raise RulerError(f"essay file {path} has no string field 'text' (expected RULER's PaulGrahamEssays.json)")
    words = tuple(re.sub(r"\s+", " ", data["text"]).strip().split(" "))
    if not words or words == ("",):
        raise RulerError(f"essay file {path} has an empty 'text'")
    return words


def essay_prefix(words: Sequence[str], num_words: int) -> str:
    """The first `num_words` words joined by single spaces, cycling through the essays when more are needed."""
    if num_words <= len(words):
        return " ".join(words[:num_words])
    reps, rest = divmod(num_words, len(words))
    return " ".join(list(words) * reps + list(words[:rest]))


# -- sentence splitting --------------------------------------------------------------------------

# RULER splits with nltk's punkt (a trained model we cannot fetch offline). Ours is a rule-based
# stand-in: a sentence ends at '.', '!' or '?' (optionally followed by closing quotes/brackets)
# when a space and an upper-case letter or digit (optionally after an opening quote/bracket)
# follow; a '.' does not end a sentence after a common abbreviation or a single-letter initial.
# The essay text has single spaces only (whitespace is normalised first), so joining the
# sentences with ' ' gives the original text back.
_CLOSERS = "\"'\u201d\u2019)]"
_OPENERS = "\"'\u201c\u2018(["
_BOUNDARY = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?= [\"'\u201c\u2018(\[]?[A-Z0-9])")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt vs etc inc ltd co corp no vol fig cf al approx ca dept est "
    "e.g i.e a.m p.m u.s u.k jan feb mar apr jun jul aug sep sept oct nov dec".split()
)


def split_sentences(text: str) -> list[str]:
    """Split single-spaced text into sentences with the offline rule above (RULER: nltk punkt)."""
    sentences, start = [], 0
    for m in _BOUNDARY.finditer(text):
        if m.group().rstrip(_CLOSERS) == ".":  # '...', '!' and '?' always end a sentence
            space = text.rfind(" ", start, m.start())
            word = text[space + 1 if space >= 0 else start:m.start()].lstrip(_OPENERS)
            if word.lower() in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
                continue
        sentences.append(text[start:m.end()])
        start = m.end() + 1  # skip the single space between sentences
    if start < len(text):
        sentences.append(text[start:])
    return sentences


# -- needle insertion ----------------------------------------------------------------------------

def insert_at_depths(sentences: Sequence[str], needles: Sequence[str], rng: random.Random) -> str:
    """Put `needles` (in order) between sentences at depths drawn without replacement from DEPTHS.

    A depth d maps to sentence boundary floor(len(sentences) * d / 100), as in RULER. Pieces are
    joined by single spaces; empty pieces (a needle at depth 0, two needles at one boundary) are
    skipped so the text never gets a leading or doubled space.
    """
    if len(needles) > len(DEPTHS):
        raise RulerError(f"cannot place {len(needles)} needles at {len(DEPTHS)} distinct depths")
    n = len(sentences)
    cuts = sorted(n * d // 100 for d in rng.sample(DEPTHS, len(needles)))
    parts, last = [], 0
    for cut, needle in zip(cuts, needles):
        parts.append(" ".join(sentences[last:cut]))
        parts.append(needle)
        last = cut
    parts.append(" ".join(sentences[last:]))
    return " ".join(p for p in parts if p)


def insert_lines(lines: Sequence[str], needles: Sequence[str], rng: random.Random) -> list[str]:
    """Insert `needles` (in order) before distinct random lines of `lines` (noise / needle haystacks).

    Positions are drawn from 0..len(lines)-1 as in RULER, so a needle always goes before an
    existing line, never after the last one. RulerError if there are fewer lines than needles.
    """
    if len(needles) > len(lines):
        raise RulerError(f"cannot place {len(needles)} needles before distinct lines of a {len(lines)}-line haystack")
    out = list(lines)
    # Inserting from the back keeps the earlier positions valid; sorting keeps needle order.
    slots = sorted(rng.sample(range(len(out)), len(needles)), reverse=True)
    for slot, needle in zip(slots, reversed(needles)):
        out.insert(slot, needle)
    return out
