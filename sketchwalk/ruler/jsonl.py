"""RULER-format JSONL: write our samples, read (import) files from RULER or elsewhere as they are."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional

from .errors import RulerError
from .templates import family_of

REQUIRED_FIELDS = ("index", "input", "outputs", "length")
OPTIONAL_FIELDS = ("answer_prefix", "length_w_model_temp")


def write_jsonl(path: str | os.PathLike, samples: Iterable[dict]) -> Path:
    """Write one JSON object per line (UTF-8, '\\n' endings, keys in insertion order); returns the path.

    Deterministic: the same samples give byte-identical files.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8", newline="\n") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
    return p


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validate(rec, where: str) -> dict:
    if not isinstance(rec, dict):
        raise RulerError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for field in REQUIRED_FIELDS:
        if field not in rec:
            raise RulerError(f"{where}: missing field '{field}' (RULER samples need {', '.join(REQUIRED_FIELDS)})")
    if not _is_int(rec["index"]):
        raise RulerError(f"{where}: field 'index' must be an integer, got {rec['index']!r}")
    if not isinstance(rec["input"], str):
        raise RulerError(f"{where}: field 'input' must be a string, got {type(rec['input']).__name__}")
    outs = rec["outputs"]
    if not isinstance(outs, list) or not outs or not all(isinstance(o, str) for o in outs):
        raise RulerError(f"{where}: field 'outputs' must be a non-empty list of strings, got {outs!r}")
    for field in ("length", "length_w_model_temp"):
        if field in rec and not (_is_int(rec[field]) and rec[field] >= 0):
            raise RulerError(f"{where}: field '{field}' must be a non-negative integer, got {rec[field]!r}")
    if "answer_prefix" in rec and not isinstance(rec["answer_prefix"], str):
        raise RulerError(f"{where}: field 'answer_prefix' must be a string, got {type(rec['answer_prefix']).__name__}")
    out = dict(rec)  # extra fields (token_position_answer, ...) are kept as they are
    out.setdefault("answer_prefix", "")  # old RULER files keep the prefix at the end of 'input'
    return out


def read_jsonl(path: str | os.PathLike, task: Optional[str] = None) -> list[dict]:
    """Samples of a RULER-format JSONL file (fields index, input, outputs, length; optional
    answer_prefix, default '', and length_w_model_temp; other fields kept). `task`, if given,
    must be a RULER task name (qa_1/qa_2 included) and is named in errors. Blank lines are
    skipped. RulerError names the file, line and field of the first problem."""
    if task is not None:
        family_of(task)
    label = f"{path}" + (f" ({task})" if task else "")
    p = Path(path)
    try:
        with open(p, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RulerError(f"cannot read RULER JSONL {label}: {e}") from e
    samples = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{label} line {lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise RulerError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
        samples.append(_validate(rec, where))
    if not samples:
        raise RulerError(f"RULER JSONL {label} holds no samples")
    return samples
