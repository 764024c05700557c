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
`load_suite("ruler-11@4k,8k")` loads a suite with its lengths replaced by 4096 and 8192.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import RulerError
from .fitting import context_limit
from .generate import generate_task
from .haystacks import resolve_essays_path
from .jsonl import read_jsonl
from .tasks import IMPORT_ONLY, TASKS
from .templates import TASK_FAMILY

SUITES_DIR = Path(__file__).resolve().parent / "suites"
_KEYS = ("name", "description", "tasks", "lengths", "samples", "seed", "imports", "singularise_chat_template")


@dataclass(frozen=True)
class SuiteImport:
    """A RULER-format JSONL file used as the samples of `task` at `length` tokens (None: inferred)."""

    path: Path
    task: str
    length: Optional[int] = None


@dataclass(frozen=True)
class Suite:
    """A validated suite: generated `tasks` × `lengths` (tokens) with `samples` each, plus imports.
    `singularise_chat_template`: generate_task's option of that name (RULER's "You is" bug), off by default."""

    name: str
    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    samples: int
    seed: int = 42
    imports: tuple[SuiteImport, ...] = ()
    description: str = ""
    source: Optional[Path] = field(default=None, compare=False)
    singularise_chat_template: bool = False


def list_suites() -> list[str]:
    """Names of the suites shipped in `sketchwalk/ruler/suites/`."""
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def parse_length(value: Any) -> int:
    """A length in tokens from an int or a string: '4096', '4k' / '4K' (×1024), '1m' (×1024²)."""
    if isinstance(value, bool):
        raise RulerError(f"invalid length {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        text = value.strip().lower()
        mult = {"k": 1024, "m": 1024 * 1024}.get(text[-1:], 1)
        digits = text[:-1] if mult > 1 else text
        if not digits.isdigit():
            raise RulerError(f"invalid length {value!r}: use tokens (8192) or k-units (8k = 8192)")
        n = int(digits) * mult
    else:
        raise RulerError(f"invalid length {value!r}: use tokens (8192) or k-units (8k = 8192)")
    if n <= 0:
        raise RulerError(f"length must be positive, got {value!r}")
    return n


def _resolve_path(spec: str) -> Path:
    looks_like_path = spec.endswith((".yaml", ".yml")) or os.sep in spec or "/" in spec
    path = Path(spec).expanduser() if looks_like_path else SUITES_DIR / f"{spec}.yaml"
    if not path.is_file():
        what = f"suite file {path}" if looks_like_path else f"suite {spec!r}"
        raise RulerError(f"{what} not found; built-in suites: {', '.join(list_suites())}")
    return path


def load_suite(name_or_path: str | os.PathLike) -> Suite:
    """Load and validate a suite by built-in name ('ruler-11') or YAML path; a trailing
    '@4k,8k' replaces its lengths (imports with an explicit length outside them are dropped)."""
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
    suite = _validate(data, path)
    if override is not None:
        _no_duplicates(override, "lengths", path)
        suite = replace(suite, lengths=override,
                        imports=tuple(i for i in suite.imports if i.length is None or i.length in override))
    return suite


def _no_duplicates(items, what: str, path: Path) -> None:
    dup = sorted({str(x) for x in items if list(items).count(x) > 1})
    if dup:
        raise RulerError(f"suite {path}: duplicate {what}: {', '.join(dup)}")


def _validate(data: Any, path: Path) -> Suite:
    where = f"suite {path}"
    if not isinstance(data, dict):
        raise RulerError(f"{where}: expected a mapping with keys {', '.join(_KEYS)}")
    unknown = sorted(set(map(str, data)) - set(_KEYS))
    if unknown:
        raise RulerError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(_KEYS)}")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise RulerError(f"{where}: 'name' must be a non-empty string")

    tasks = data.get("tasks", [])
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise RulerError(f"{where}: 'tasks' must be a list of task names")
    for t in tasks:
        if t in IMPORT_ONLY:
            raise RulerError(f"{where}: task {t} cannot be generated (it needs SQuAD/HotpotQA); "
                             f"list a RULER JSONL for it under 'imports'")
        if t not in TASKS:
            raise RulerError(f"{where}: unknown task {t!r}; known tasks: {', '.join(TASKS)} "
                             f"(import-only: {', '.join(IMPORT_ONLY)})")
    _no_duplicates(tasks, "tasks", path)

    if "lengths" not in data:
        raise RulerError(f"{where}: missing 'lengths' (a list of token counts, e.g. [4096, 8192])")
    raw = data["lengths"]
    if not isinstance(raw, list) or not raw:
        raise RulerError(f"{where}: 'lengths' must be a non-empty list, got {raw!r}")
    try:
        lengths = tuple(parse_length(x) for x in raw)
    except RulerError as e:
        raise RulerError(f"{where}: 'lengths': {e}") from None
    _no_duplicates(lengths, "lengths", path)

    samples = data.get("samples")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples <= 0:
        raise RulerError(f"{where}: 'samples' must be a positive integer (per task per length), got {samples!r}")
    seed = data.get("seed", 42)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise RulerError(f"{where}: 'seed' must be an integer, got {seed!r}")
    quirk = data.get("singularise_chat_template", False)
    if not isinstance(quirk, bool):
        raise RulerError(f"{where}: 'singularise_chat_template' must be true or false, got {quirk!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise RulerError(f"{where}: 'description' must be a string")

    imports = []
    raw_imports = data.get("imports") or []
    if not isinstance(raw_imports, list):
        raise RulerError(f"{where}: 'imports' must be a list of {{path, task, length?}} mappings")
    for i, item in enumerate(raw_imports):
        at = f"{where}: imports[{i}]"
        if not isinstance(item, dict):
            raise RulerError(f"{at}: expected a mapping with 'path', 'task' and optional 'length'")
        extra = sorted(set(map(str, item)) - {"path", "task", "length"})
        if extra:
            raise RulerError(f"{at}: unknown key(s) {', '.join(extra)}; allowed: path, task, length")
        if not isinstance(item.get("path"), str) or not item["path"]:
            raise RulerError(f"{at}: missing 'path' (a RULER-format JSONL file)")
        task = item.get("task")
        if task not in TASK_FAMILY:
            raise RulerError(f"{at}: 'task' must be one of {', '.join(TASK_FAMILY)}, got {task!r}")
        length = None
        if item.get("length") is not None:
            try:
                length = parse_length(item["length"])
            except RulerError as e:
                raise RulerError(f"{at}: 'length': {e}") from None
            if length not in lengths:
                raise RulerError(f"{at}: length {length} is not one of the suite's lengths {list(lengths)}")
            if task in tasks:
                raise RulerError(f"{at}: {task} at {length} is both generated and imported")
        p = Path(item["path"]).expanduser()
        p = p if p.is_absolute() else path.parent / p
        if not p.is_file():
            raise RulerError(f"{at}: file {p} not found")
        imports.append(SuiteImport(p, task, length))
    if not tasks and not imports:
        raise RulerError(f"{where}: no 'tasks' and no 'imports': nothing to evaluate")
    return Suite(name, tuple(tasks), lengths, samples, seed, tuple(imports), description, path, quirk)


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
