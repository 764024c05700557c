"""What a suite file may hold: `Suite` and `SuiteImport` (pydantic, like the sweep file and the
ablation plan), and `suite_error`, which turns their validation errors into one RulerError line
naming the field (a dotted path, e.g. `imports.0.task`) and what is allowed there
(`sketchwalk.input_errors.first_error`, shared with the sweep file and the ablation plan)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr,
                      ValidationError, ValidationInfo, field_validator, model_validator)

from ..input_errors import first_error
from .errors import RulerError
from .tasks import IMPORT_ONLY, TASKS
from .templates import TASK_FAMILY


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


def _generated_task(name: str) -> str:
    if name in IMPORT_ONLY:
        raise ValueError(f"task {name} cannot be generated (it needs SQuAD/HotpotQA); "
                         f"list a RULER JSONL for it under 'imports'")
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} "
                         f"(import-only: {', '.join(IMPORT_ONLY)})")
    return name


def _no_duplicates(items: tuple, what: str) -> tuple:
    dup = sorted({str(x) for x in items if items.count(x) > 1})
    if dup:
        raise ValueError(f"duplicate {what}: {', '.join(dup)}")
    return items


Length = Annotated[int, BeforeValidator(parse_length)]
GeneratedTask = Annotated[StrictStr, AfterValidator(_generated_task)]
ImportTask = Literal[tuple(TASK_FAMILY)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SuiteImport(_Strict):
    """A RULER-format JSONL file used as the samples of `task` at `length` tokens (None: inferred)."""

    path: Path
    task: ImportTask
    length: Optional[Length] = None

    @field_validator("path", mode="before")
    @classmethod
    def _existing_file(cls, value: Any, info: ValidationInfo) -> Path:
        if not isinstance(value, (str, Path)) or not str(value):
            raise ValueError("must be the path of a RULER-format JSONL file")
        path = Path(value).expanduser()
        # Relative to the suite file, so a suite and its JSONL files move together.
        suite_file = (info.context or {}).get("file")
        if not path.is_absolute() and suite_file is not None:
            path = Path(suite_file).parent / path
        if not path.is_file():
            raise ValueError(f"file {path} not found")
        return path


class Suite(_Strict):
    """A validated suite: generated `tasks` × `lengths` (tokens) with `samples` each, plus imports.
    `source` is the file it was read from (None when built in code); it is not a key of the file.
    `singularise_chat_template`: generate_task's option of that name (RULER's "You is" bug), off by default."""

    name: StrictStr = Field(min_length=1)
    tasks: tuple[GeneratedTask, ...] = ()
    lengths: tuple[Length, ...]
    samples: StrictInt = Field(gt=0)  # per task per length
    seed: StrictInt = 42
    imports: tuple[SuiteImport, ...] = ()
    description: StrictStr = ""
    singularise_chat_template: StrictBool = False
    source: Optional[Path] = None

    @model_validator(mode="before")
    @classmethod
    def _from_file(cls, data: Any, info: ValidationInfo) -> Any:
        suite_file = (info.context or {}).get("file")
        if suite_file is None or not isinstance(data, dict):
            return data
        if "source" in data:  # set by the loader: a file naming its own source would be ignored silently
            raise ValueError(f"source: unknown key; allowed keys here: {list(FILE_KEYS)}")
        return {"name": Path(suite_file).stem, **data, "source": Path(suite_file)}

    @field_validator("tasks")
    @classmethod
    def _distinct_tasks(cls, tasks: tuple[str, ...]) -> tuple[str, ...]:
        return _no_duplicates(tasks, "tasks")

    @field_validator("lengths")
    @classmethod
    def _lengths(cls, lengths: tuple[int, ...]) -> tuple[int, ...]:
        if not lengths:
            raise ValueError("must be a non-empty list of token counts, e.g. [4096, 8192]")
        return _no_duplicates(lengths, "lengths")

    @field_validator("imports", mode="before")
    @classmethod
    def _no_imports(cls, imports: Any) -> Any:
        return () if imports is None else imports  # `imports:` left empty in YAML

    @model_validator(mode="after")
    def _imports_fit(self) -> "Suite":
        for i, imp in enumerate(self.imports):
            if imp.length is None:
                continue
            if imp.length not in self.lengths:
                raise ValueError(f"imports.{i}.length: {imp.length} is not one of the suite's lengths "
                                 f"{list(self.lengths)}")
            if imp.task in self.tasks:
                raise ValueError(f"imports.{i}: {imp.task} at {imp.length} is both generated and imported")
        if not self.tasks and not self.imports:
            raise ValueError("no 'tasks' and no 'imports': nothing to evaluate")
        return self

    def replace(self, **changes: Any) -> "Suite":
        """A copy with `changes` applied and validated again (RulerError naming the field)."""
        data = {**self.model_dump(), **changes}
        try:
            return Suite.model_validate(data)
        except ValidationError as exc:
            raise suite_error(exc, f"suite {self.source or self.name}") from None

    def to_dict(self) -> dict[str, Any]:
        """The suite as JSON-ready values (paths as strings), as result files record it."""
        return self.model_dump(mode="json")


FILE_KEYS = tuple(k for k in Suite.model_fields if k != "source")


def suite_error(exc: ValidationError, where: str) -> RulerError:
    """The first error of a suite's validation as one line, `<where>: <field>: <message>`, worded by
    `sketchwalk.input_errors.first_error` as the sweep file's and the ablation plan's are."""
    # `source` is set by the loader, so it is no key a file may hold (FILE_KEYS).
    field, msg = first_error(exc, Suite, hidden=("source",))
    return RulerError(f"{where}: {field}: {msg}" if field else f"{where}: {msg}")
