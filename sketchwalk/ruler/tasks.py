"""The 11 generated RULER tasks and their configuration (the table in `../shared/docs/ruler.md`)."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import RulerError
from .templates import TASK_FAMILY


@dataclass(frozen=True)
class TaskSpec:
    """One synthetic task. niah fields: haystack ('noise' | 'essay' | 'needle'), key/value types
    ('words' | 'numbers' | 'uuids'), needle counts. vt: chains/hops. cwe: common-word count and
    repeat counts (>= 4K and below-4K variants). fwe: Zipf alpha and coded-word length."""

    name: str
    family: str
    haystack: str = ""
    type_k: str = "words"
    type_v: str = "numbers"
    num_k: int = 1
    num_v: int = 1
    num_q: int = 1
    num_chains: int = 1
    num_hops: int = 4
    num_cw: int = 10
    freq_cw: int = 30
    freq_ucw: int = 3
    alpha: float = 2.0
    coded_wordlen: int = 6

    @property
    def needs_essays(self) -> bool:
        """True when the task reads the Paul Graham essay haystack."""
        return self.haystack == "essay"


def _niah(name: str, haystack: str, type_k: str, type_v: str, k: int, v: int, q: int) -> TaskSpec:
    # RULER raises the key count to at least the query count (niah_multiquery: 4 keys, 4 queries).
    return TaskSpec(name, "niah", haystack, type_k, type_v, max(k, q), v, q)


TASKS: dict[str, TaskSpec] = {s.name: s for s in (
    _niah("niah_single_1", "noise", "words", "numbers", 1, 1, 1),
    _niah("niah_single_2", "essay", "words", "numbers", 1, 1, 1),
    _niah("niah_single_3", "essay", "words", "uuids", 1, 1, 1),
    _niah("niah_multikey_1", "essay", "words", "numbers", 4, 1, 1),
    _niah("niah_multikey_2", "needle", "words", "numbers", 1, 1, 1),
    _niah("niah_multikey_3", "needle", "uuids", "uuids", 1, 1, 1),
    _niah("niah_multivalue", "essay", "words", "numbers", 1, 4, 1),
    _niah("niah_multiquery", "essay", "words", "numbers", 1, 1, 4),
    TaskSpec("vt", "vt", haystack="noise", num_chains=1, num_hops=4),
    TaskSpec("cwe", "cwe", num_cw=10, freq_cw=30, freq_ucw=3),
    TaskSpec("fwe", "fwe", alpha=2.0, coded_wordlen=6),
)}

IMPORT_ONLY = ("qa_1", "qa_2")  # RULER's qa tasks need SQuAD / HotpotQA: imported as JSONL, never generated

assert set(TASKS) | set(IMPORT_ONLY) == set(TASK_FAMILY)


def get_task(name: str) -> TaskSpec:
    """The TaskSpec of a generated task; RulerError naming the known tasks otherwise (qa_* get an import hint)."""
    if name in TASKS:
        return TASKS[name]
    if name in IMPORT_ONLY:
        raise RulerError(f"{name} is not generated here (it needs SQuAD/HotpotQA); import a RULER-format "
                         f"JSONL file for it instead (suite 'imports', or read_jsonl)")
    raise RulerError(f"unknown RULER task {name!r}; generated tasks: {', '.join(TASKS)}; "
                     f"import-only: {', '.join(IMPORT_ONLY)}")
