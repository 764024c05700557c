"""One translator from a pydantic `ValidationError` to a one-line user error.

The sweep file (`search.spec`), the ablation plan (`ablations.plan`) and the RULER suite file
(`sketchwalk.ruler.suite_file`) are pydantic models; each caller wraps `first_error`'s
`(field, message)` in its own exception type, so all three read the same:

    space.density.bogus: unknown key; allowed keys here: ['type', 'low', 'high', ...] (got 1)

It lives in `sketchwalk` because `sketchwalk` depends on nothing of ours and the others may import it.
"""
from __future__ import annotations

import types
import typing
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Optional

from pydantic import BaseModel, Tag, ValidationError
from pydantic.fields import FieldInfo

# Prefixes pydantic puts before a validator's own message: the message already says what is wrong.
_PREFIXES = ("Value error, ", "Assertion failed, ")
_SEQUENCES = (list, tuple, set, frozenset, Sequence, Collection)
_MAPPINGS = (dict, Mapping)

# A walk position: the annotation there and, for a tagged union, its discriminator field name.
_Cursor = tuple[Any, Optional[str]]


def first_error(exc: ValidationError, root: type[BaseModel], *, hidden: Collection[str] = ()) -> tuple[str, str]:
    """The first error of `exc` (raised validating `root`) as `(field, message)`.

    `field` is the dotted path of the entry ('' for the whole document), without pydantic's union
    labels (`space.density.low`, not `space.density.float.low`). An unknown key is reported first,
    since a typo also leaves its real key missing, and its message lists the keys the model at that
    place accepts; `hidden` keys (set by the loader, not the user) are left out of that list. The
    value follows as `(got <value>)` except for a missing field, a string the message already
    quotes, and a check of a whole model (whose value is the whole mapping).
    """
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")  # stable: file order otherwise
    err = errors[0]
    loc = tuple(err["loc"])
    kind = err["type"]
    msg = err["msg"]
    for prefix in _PREFIXES:
        msg = msg.removeprefix(prefix)
    if kind == "extra_forbidden":
        path, cursor = _walk(root, loc[:-1])
        path.append(str(loc[-1]))
        keys = _model_keys(cursor[0], hidden)
        msg = "unknown key" + (f"; allowed keys here: {keys}" if keys is not None else "")
    else:
        path, cursor = _walk(root, loc)
        if kind == "tuple_type":
            msg = "Input should be a valid list"  # a tuple field is a list in YAML
        elif msg.startswith("Tuple "):
            msg = "List " + msg.removeprefix("Tuple ")  # "Tuple should have at least 1 item ..."
        elif kind == "union_tag_not_found":
            tags = _union_tags(cursor)
            if tags:
                msg += f"; expected tags: {', '.join(map(repr, tags))}"
    value = err.get("input")
    whole_model = isinstance(value, Mapping) and _is_model_like(cursor[0])
    if kind != "missing" and not whole_model and not (isinstance(value, str) and repr(value) in msg):
        msg += f" (got {value!r})"
    return ".".join(path), msg


# -- walking the models along an error location ----------------------------------------------

def _walk(root: type[BaseModel], loc: tuple) -> tuple[list[str], _Cursor]:
    """The user-facing path of `loc` and the annotation reached there ((None, None) once unknown)."""
    path: list[str] = []
    cursor: _Cursor = (root, None)
    for part in loc:
        cursor, label = _step(cursor, part)
        if not label:
            path.append(str(part))
    return path, cursor


def _step(cursor: _Cursor, part: Any) -> tuple[_Cursor, bool]:
    """One location part down from `cursor`; True when `part` is a union label, not a user key."""
    tp, disc = _unwrap(*cursor)
    if tp is None:
        return (None, None), False
    if _is_model(tp):
        field = _field(tp, part)
        return ((field.annotation, field.discriminator if isinstance(field.discriminator, str) else None)
                if field is not None else (None, None)), False
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return (_member(args, part, disc), None), True
    if origin in _MAPPINGS and len(args) == 2:
        return (args[1], None), False
    if origin in _SEQUENCES and args:
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return ((args[part] if isinstance(part, int) and part < len(args) else None), None), False
        return (args[0], None), False
    return (None, None), False


def _unwrap(tp: Any, disc: Optional[str]) -> _Cursor:
    """Strip `Annotated` (keeping a discriminator it names) and `Optional`, which add no location part."""
    while True:
        if typing.get_origin(tp) is typing.Annotated:
            for meta in tp.__metadata__:
                if isinstance(meta, FieldInfo) and isinstance(meta.discriminator, str):
                    disc = meta.discriminator
            tp = tp.__origin__
            continue
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(members) == 1:  # Optional[X]: pydantic validates X in place (nullable, no label)
                tp = members[0]
                continue
        return tp, disc


def _member(members: tuple, label: Any, disc: Optional[str]) -> Any:
    """The union member pydantic names `label`: by its `Tag`, its discriminator value or its class name."""
    for member in members:
        if typing.get_origin(member) is typing.Annotated and any(
                isinstance(m, Tag) and m.tag == label for m in member.__metadata__):
            return member
        tp, _ = _unwrap(member, None)
        if _is_model(tp) and (tp.__name__ == label or label in _tags_of(tp, disc)):
            return member
    return None


def _tags_of(model: type[BaseModel], disc: Optional[str]) -> tuple:
    field = model.model_fields.get(disc) if disc else None
    if field is None or typing.get_origin(field.annotation) is not typing.Literal:
        return ()
    return typing.get_args(field.annotation)


def _union_tags(cursor: _Cursor) -> list:
    """The tags a tagged union at `cursor` accepts (for a mapping that has no tag at all)."""
    tp, disc = _unwrap(*cursor)
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return []
    return [t for m in typing.get_args(tp) if _is_model(_unwrap(m, None)[0])
            for t in _tags_of(_unwrap(m, None)[0], disc)]


def _field(model: type[BaseModel], part: Any) -> Optional[FieldInfo]:
    if not isinstance(part, str):
        return None
    fields = model.model_fields
    return fields.get(part) or next((f for f in fields.values() if f.alias == part), None)


def _model_keys(tp: Any, hidden: Collection[str]) -> Optional[list[str]]:
    """The keys the model `tp` accepts, in declaration order (the order the docs list them); None if not a model."""
    tp, _ = _unwrap(tp, None)
    if not _is_model(tp):
        return None
    return [f.alias or name for name, f in tp.model_fields.items() if name not in hidden]


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _is_model_like(tp: Any) -> bool:
    """A model, or a union of models: an error there is about the whole mapping."""
    tp, _ = _unwrap(tp, None)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return all(_is_model_like(m) for m in typing.get_args(tp) if m is not type(None))
    return _is_model(tp)
