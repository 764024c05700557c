"""RULER suites: which tasks, at which lengths, how many samples (YAML), and building them.

A suite file (`suites/<name>.yaml`, or any path) holds:
    name: ruler-11          # optional, defaults to the file name
    description: ...        # optional, free text
    tasks: [niah_single_1, vt, ...]   # generated tasks (qa_1 / qa_2 only via imports)
    lengths: [4096, 8192]   # max_seq_length values in tokens ('4k' = 4096 also accepted)
    samples: 20             # per task per length
    seed: 42                # optional, default 42
    singularise_chat_template: false  # optional: reproduce RULER's "You is" bug (generate_task)
    imports:                # optional RULER-format JSONL files, used as they are
      - {path: qa1_4k.jsonl, task: qa_1, length: 4096}   # path relative to the YAML file;
                                                           # length optional (inferred)
`load_suite("ruler-11@4k,8k")` loads a suite with its lengths replaced by 4096 and 8192. The
file's schema and its error messages are in `suite_file.py`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import yaml
from pydantic import ValidationError

from .errors import RulerError
from .fitting import context_limit
from .generate import generate_task
from .haystacks import resolve_essays_path
from .jsonl import read_jsonl
from .suite_file import FILE_KEYS, Suite, SuiteImport, parse_length, suite_error
from .tasks import TASKS

__all__ = ["Suite", "SuiteImport", "parse_length", "list_suites", "load_suite", "build_suite", "short_samples_note"]

SUITES_DIR = Path(__file__).resolve().parent / "suites"


def list_suites() -> list[str]:
    """Names of the suites shipped in `sketchwalk/ruler/suites/`."""
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def _resolve_path(spec: str) -> Path:
    looks_like_path = spec.endswith((".yaml", ".yml")) or os.sep in spec or "/" in spec
    path = Path(spec).expanduser() if looks_like_path else SUITES_DIR / f"{spec}.yaml"
    if not path.is_file():
        what = f"suite file {path}" if looks_like_path else f"suite {spec!r}"
        raise RulerError(f"{what} not found; built-in suites: {', '.join(list_suites())}")
    return path


def load_suite(name_or_path: str | os.PathLike) -> Suite:
    """Load and validate a suite by built-in name ('ruler-11') or YAML path; a trailing
    '@4k,8k' replaces its lengths (imports with an explicit length outside them are dropped).
    RulerError names the file and the field (see `suite_file.suite_error`)."""
    spec, override = str(name_or_path), None
    if "@" in spec:
        spec, _, lens = spec.rpartition("@")
        if not lens.strip():
            raise RulerError(f"empty length list after '@' in {name_or_path!r}")
        override = tuple(parse_length(x) for x in lens.split(","))
    path = _resolve_path(spec)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise RulerError(f"cannot read suite file {path}: {e}") from e
    except yaml.YAMLError as e:
        raise RulerError(f"suite file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise RulerError(f"suite {path}: expected a mapping with keys {', '.join(FILE_KEYS)}, got {type(data).__name__}")
    try:
        suite = Suite.model_validate(data, context={"file": path})
    except ValidationError as exc:
        raise suite_error(exc, f"suite {path}") from None
    if override is not None:
        suite = suite.replace(lengths=override,
                              imports=[i for i in suite.imports if i.length is None or i.length in override])
    return suite


def build_suite(suite: Suite, tokenizer, essays_path: str | os.PathLike | None = None, *,
                chat_template: bool = True, max_context: Optional[int] = None,
                backoff: str = "step") -> dict[tuple[str, int], list[dict]]:
    """All samples of a suite: {(task, length): [RULER sample dicts]}, generated tasks first
    (task-major, lengths ascending as listed), then imports (their first `suite.samples`).

    Checks essays and the context limit before generating anything, so a bad setup fails fast.
    An import without a length is keyed by the smallest suite length >= its largest `length`.
    """
    if any(TASKS[t].needs_essays for t in suite.tasks):
        essays_path = resolve_essays_path(essays_path, f"suite {suite.name}")
    limit, source = context_limit(tokenizer, max_context)
    too_long = [n for n in suite.lengths if limit is not None and n > limit]
    if too_long and suite.tasks:
        raise RulerError(f"suite {suite.name}: length(s) {too_long} exceed the model's context of {limit} "
                         f"tokens ({source}); use e.g. '{suite.name}@{','.join(str(n) for n in suite.lengths if n <= limit) or limit}'")
    out: dict[tuple[str, int], list[dict]] = {}
    for task in suite.tasks:
        for length in suite.lengths:
            out[(task, length)] = generate_task(task, length, suite.samples, tokenizer, seed=suite.seed,
                                                essays_path=essays_path, chat_template=chat_template,
                                                max_context=max_context, backoff=backoff,
                                                singularise_chat_template=suite.singularise_chat_template)
    for imp in suite.imports:
        samples = read_jsonl(imp.path, imp.task)[:suite.samples]
        length = imp.length
        if length is None:
            longest = max(s["length"] for s in samples)
            fitting = [n for n in sorted(suite.lengths) if n >= longest]
            if not fitting:
                raise RulerError(f"suite {suite.name}: {imp.path} ({imp.task}) has samples of up to {longest} "
                                 f"tokens, more than every suite length {list(suite.lengths)}; give its 'length'")
            length = fitting[0]
        if (imp.task, length) in out:
            raise RulerError(f"suite {suite.name}: {imp.task} at {length} tokens comes from two sources "
                             f"(generated or imported twice); last: {imp.path}")
        out[(imp.task, length)] = samples
    return out


#: A sample whose RULER `length` is below this share of its suite length is reported as short.
SHORT_SHARE = 0.8


def short_samples_note(samples: dict[tuple[str, int], list[dict]]) -> Optional[str]:
    """One line naming the samples whose RULER `length` (prompt + answer budget, tokens) is below
    SHORT_SHARE of their suite length, or None. Such samples are RULER's own behaviour, not a bug
    of ours: RULER's generator retries a sample that does not fit with one whole step of haystack
    less (500 essay words at every length; 25 or 5 niah lines, 10 vt lines), and at 1-2K tokens one essay step is
    most of the prompt (measured: niah_single_2 at 299 tokens of "1024", 1322 of "2048")."""
    short = {key: [s["length"] for s in ss if s.get("length", key[1]) < SHORT_SHARE * key[1]]
             for key, ss in samples.items()}
    parts = [f"{len(v)} of {len(samples[key])} {key[0]}@{key[1]} (shortest {min(v)} tokens)"
             for key, v in short.items() if v]
    if not parts:
        return None
    return (f"short samples: {', '.join(parts)} are more than {1 - SHORT_SHARE:.0%} below their length. This is "
            f"RULER's behaviour: its generator retries a sample that does not fit with a whole step of haystack "
            f"less (500 essay words, 25 or 5 niah lines, 10 vt lines), which at short lengths is most of the prompt")
