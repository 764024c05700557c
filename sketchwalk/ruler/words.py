"""Random keys, values and words for the synthetic tasks, all drawn from a caller's `random.Random`.

Word lists are wonderwords' packaged assets (`wonderwords/assets/{adjective,noun,verb}list.txt`),
read as files so no private wonderwords API is needed; like wonderwords itself, each line is
right-stripped. RULER builds niah keys as `adjective-noun` and the cwe pool as nouns +
adjectives + verbs (deduplicated).
"""
from __future__ import annotations

import random
import string
import uuid
from functools import lru_cache
from importlib import resources

from .errors import RulerError


@lru_cache(maxsize=None)
def word_list(kind: str) -> tuple[str, ...]:
    """wonderwords' list for kind 'adjective' | 'noun' | 'verb', sorted and deduplicated (empty lines dropped)."""
    if kind not in ("adjective", "noun", "verb"):
        raise RulerError(f"unknown word list {kind!r}; use 'adjective', 'noun' or 'verb'")
    try:
        text = resources.files("wonderwords.assets").joinpath(f"{kind}list.txt").read_text(encoding="utf-8")
    except ModuleNotFoundError as e:
        raise RulerError("the RULER generators need the 'wonderwords' package (pip install wonderwords)") from e
    # Sorted so that a seed gives the same words whatever the file's line order.
    return tuple(sorted({w.rstrip() for w in text.splitlines() if w.strip()}))


@lru_cache(maxsize=None)
def common_word_pool() -> tuple[str, ...]:
    """The cwe vocabulary: nouns + adjectives + verbs, deduplicated and sorted (about 8,500 words)."""
    return tuple(sorted(set(word_list("noun")) | set(word_list("adjective")) | set(word_list("verb"))))


def random_key_word(rng: random.Random) -> str:
    """An `adjective-noun` key, uniform over all pairs (e.g. 'quizzical-lamp')."""
    adjs, nouns = word_list("adjective"), word_list("noun")
    # One draw over the product instead of materialising all ~6M pairs as RULER does.
    i = rng.randrange(len(adjs) * len(nouns))
    return f"{adjs[i // len(nouns)]}-{nouns[i % len(nouns)]}"


def random_number(rng: random.Random, digits: int = 7) -> str:
    """A random integer with exactly `digits` digits, as a string (RULER: 7-digit values)."""
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def random_uuid(rng: random.Random) -> str:
    """A version-4 UUID string built from 128 random bits."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def random_needle_item(rng: random.Random, kind: str) -> str:
    """A niah key or value of type 'words' | 'numbers' | 'uuids'."""
    if kind == "words":
        return random_key_word(rng)
    if kind == "numbers":
        return random_number(rng)
    if kind == "uuids":
        return random_uuid(rng)
    raise RulerError(f"unknown needle type {kind!r}; use 'words', 'numbers' or 'uuids'")


def random_letters(rng: random.Random, k: int, alphabet: str = string.ascii_uppercase) -> str:
    """`k` random characters of `alphabet` (vt names: uppercase; fwe coded words: lowercase)."""
    return "".join(rng.choices(alphabet, k=k))


def distinct(rng: random.Random, count: int, draw, exclude=()) -> list:
    """`count` distinct values of `draw(rng)`, none in `exclude` (redraws on collision)."""
    seen, out = set(exclude), []
    while len(out) < count:
        item = draw(rng)
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out
